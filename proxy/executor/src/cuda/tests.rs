//! The CUDA path against the CPU path and the reference vectors. Tests
//! that need a GPU say why they are skipped when none is usable; with
//! `SWITCHYARD_REQUIRE_GPU=1` (as `scripts/gpu-check.sh` sets) they fail
//! instead.

#![allow(unsafe_code, reason = "tests launch kernels directly")]

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::model::{dequantize_into, CudaModel};
use super::{compile, Gpu, REQUIRE_GPU_ENV};
use crate::compute::{Need, Next};
use crate::gguf::GgufFile;
use crate::model::Row;
use crate::quant::{dequantize_row, quantize_row_q4_0, quantize_row_q4_1, quantize_row_q8_0};
use crate::sampler::{argmax, log_sum_exp};
use crate::tensor::GgmlType;
use crate::test_support::{check_against_reference, open_model_or_skip, synthetic};

/// A usable GPU, or `None` after saying why `test` is skipped.
fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(gpu) => Some(gpu),
        Err(why) => {
            let required = std::env::var(REQUIRE_GPU_ENV).as_deref() == Ok("1");
            assert!(
                !required,
                "{test}: {REQUIRE_GPU_ENV}=1 but no usable GPU: {why}"
            );
            eprintln!("skipping {test}: no usable GPU: {why}");
            None
        }
    }
}

use synthetic::weights as random;

fn assert_close(got: &[f32], want: &[f32], tolerance: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() / scale <= tolerance,
            "{what}: element {i} is {g}, expected {w}"
        );
    }
}

#[test]
fn kernels_compile_with_nvrtc() {
    // NVRTC needs no GPU: `make setup` installs it so that CI compiles
    // the kernels on every run.
    match compile() {
        Ok(_) => {}
        Err(why) if why.contains("cannot be loaded") => {
            let required = std::env::var("SWITCHYARD_REQUIRE_NVRTC").as_deref() == Ok("1");
            assert!(!required, "SWITCHYARD_REQUIRE_NVRTC=1 but {why}");
            eprintln!("skipping kernels_compile_with_nvrtc: {why}");
        }
        Err(why) => panic!("the kernels do not compile: {why}"),
    }
}

#[test]
fn opening_a_gpu_never_panics() {
    // On a machine without the libraries this is the "no GPU" answer; on
    // one with a GPU, a working device. Either way, no panic.
    match Gpu::open(0) {
        Ok(gpu) => assert!(gpu.total_memory > 0, "{gpu:?}"),
        Err(why) => assert!(!why.is_empty()),
    }
    let far = Gpu::open(1 << 20).unwrap_err();
    assert!(!far.is_empty());
}

#[test]
fn dequantization_matches_the_cpu() {
    let Some(gpu) = gpu_or_skip("dequantization_matches_the_cpu") else {
        return;
    };
    let n = 32 * 97;
    let values = random(7, n, 2.5);
    for ty in synthetic::TYPES {
        let mut bytes = vec![0u8; ty.row_bytes(n).unwrap()];
        match ty {
            GgmlType::F32 => {
                for (v, o) in values.iter().zip(bytes.chunks_exact_mut(4)) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            GgmlType::F16 => {
                for (v, o) in values.iter().zip(bytes.chunks_exact_mut(2)) {
                    o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
                }
            }
            GgmlType::Q4_0 => quantize_row_q4_0(&values, &mut bytes).unwrap(),
            GgmlType::Q4_1 => quantize_row_q4_1(&values, &mut bytes).unwrap(),
            GgmlType::Q8_0 => quantize_row_q8_0(&values, &mut bytes).unwrap(),
        }
        let mut want = vec![0.0f32; n];
        dequantize_row(ty, &bytes, &mut want).unwrap();
        let mut device = gpu.stream.alloc_zeros::<f32>(n).unwrap();
        dequantize_into(&gpu, ty, &bytes, n, &mut device.slice_mut(..)).unwrap();
        let got = gpu.stream.clone_dtoh(&device).unwrap();
        assert_close(&got, &want, 1e-6, ty.name());
    }
}

#[test]
fn norm_swiglu_and_summary_kernels_match_the_cpu() {
    let Some(gpu) = gpu_or_skip("norm_swiglu_and_summary_kernels_match_the_cpu") else {
        return;
    };
    let s = &gpu.stream;
    let k = &gpu.kernels;
    let rows_cfg = |rows: usize, threads: u32| LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };

    // rms_norm over 5 rows of 576, gathering rows 4, 0 and 2.
    let (rows, d, eps) = (5usize, 576usize, 1e-5f32);
    let x = random(11, rows * d, 3.0);
    let w = random(12, d, 1.0);
    let pick = [4i32, 0, 2];
    let (x_dev, w_dev, pick_dev) = (
        s.clone_htod(&x).unwrap(),
        s.clone_htod(&w).unwrap(),
        s.clone_htod(&pick).unwrap(),
    );
    let mut out = s.alloc_zeros::<f32>(pick.len() * d).unwrap();
    let d_i = d as i32;
    let mut l = s.launch_builder(&k.rms_norm);
    l.arg(&x_dev)
        .arg(&pick_dev)
        .arg(&w_dev)
        .arg(&mut out)
        .arg(&d_i)
        .arg(&eps);
    unsafe { l.launch(rows_cfg(pick.len(), 256)) }.unwrap();
    let got = s.clone_dtoh(&out).unwrap();
    for (j, &r) in pick.iter().enumerate() {
        let xr = &x[r as usize * d..][..d];
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        let want: Vec<f32> = xr.iter().zip(&w).map(|(v, g)| v * inv * g).collect();
        assert_close(&got[j * d..][..d], &want, 1e-5, "rms_norm");
    }

    // SwiGLU over 3 rows of 1536.
    let (n, ff) = (3usize, 1536usize);
    let gate_up = random(13, n * 2 * ff, 6.0);
    let gu_dev = s.clone_htod(&gate_up).unwrap();
    let mut h = s.alloc_zeros::<f32>(n * ff).unwrap();
    let (n_i, ff_i) = (n as i32, ff as i32);
    let mut l = s.launch_builder(&k.silu_mul);
    l.arg(&gu_dev).arg(&mut h).arg(&n_i).arg(&ff_i);
    unsafe { l.launch(Gpu::elements(n * ff)) }.unwrap();
    let got = s.clone_dtoh(&h).unwrap();
    for i in 0..n {
        let mut gate = gate_up[i * 2 * ff..][..ff].to_vec();
        crate::math::silu_mul_plain(&mut gate, &gate_up[i * 2 * ff + ff..][..ff]);
        assert_close(&got[i * ff..][..ff], &gate, 1e-5, "silu_mul");
    }

    // The logits summary over 4 rows of 49152, one with a tie for best.
    let vocab = 49152usize;
    let mut logits = random(14, 4 * vocab, 12.0);
    logits[3 * vocab + 100] = 50.0;
    logits[3 * vocab + 7000] = 50.0;
    let l_dev = s.clone_htod(&logits).unwrap();
    let mut summary = s.alloc_zeros::<f32>(4 * 3).unwrap();
    let vocab_i = vocab as i32;
    let mut l = s.launch_builder(&k.logit_summary);
    l.arg(&l_dev).arg(&mut summary).arg(&vocab_i);
    unsafe { l.launch(rows_cfg(4, 1024)) }.unwrap();
    let got = s.clone_dtoh(&summary).unwrap();
    for (i, row) in logits.chunks_exact(vocab).enumerate() {
        let best = argmax(row);
        assert_eq!(got[3 * i] as u32, best, "row {i}: best token");
        assert_eq!(got[3 * i + 1], row[best as usize], "row {i}: best logit");
        let lse = log_sum_exp(row);
        assert!(
            (got[3 * i + 2] - lse).abs() < 1e-4,
            "row {i}: lse {} vs {lse}",
            got[3 * i + 2]
        );
    }
    assert_eq!(got[9] as u32, 100, "the lowest id wins a tie");
}

/// Every row of `rows` wanting logits, whole, as vectors.
fn full_logits(model: &mut CudaModel, rows: &[Row]) -> Vec<Vec<f32>> {
    let step = model.forward(rows, |_| Need::Full).unwrap();
    (0..step.len())
        .map(|i| match step.get(i) {
            Some(Next::Logits(l)) => l.to_vec(),
            other => panic!("row {i}: {other:?}"),
        })
        .collect()
}

#[test]
fn synthetic_models_on_the_gpu_match_a_plain_reference() {
    let tokens = synthetic::TOKENS;
    for ty in synthetic::TYPES {
        let Some(gpu) = gpu_or_skip("synthetic_models_on_the_gpu_match_a_plain_reference") else {
            return;
        };
        let (file, weights) = synthetic::build(ty);
        let file = GgufFile::open(&file.0).unwrap();
        let mut model = CudaModel::load(gpu, &file, 3, 64, 32).unwrap();
        let want = synthetic::reference_logits(&weights, &tokens);

        // Sequence 0: all tokens as one prefill, logits at every position.
        model.add_sequence().unwrap();
        let rows = synthetic::rows(0, &tokens);
        let prefill = full_logits(&mut model, &rows);
        for (pos, (got, want)) in prefill.iter().zip(&want).enumerate() {
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            // f32 throughout on dequantized weights: close to f64.
            assert_close(got, &want, 1e-4, &format!("{ty} position {pos}"));
        }

        // Sequences 1 and 2 decode the same tokens one step at a time,
        // side by side in each step, 2 one token behind 1.
        model.add_sequence().unwrap();
        model.add_sequence().unwrap();
        for step in 0..=tokens.len() {
            let mut rows = Vec::new();
            if step < tokens.len() {
                rows.push(Row {
                    seq: 1,
                    token: tokens[step],
                    logits: true,
                });
            }
            if step > 0 {
                rows.push(Row {
                    seq: 2,
                    token: tokens[step - 1],
                    logits: true,
                });
            }
            let got = full_logits(&mut model, &rows);
            let mut got = got.iter();
            if step < tokens.len() {
                assert_close(
                    got.next().unwrap(),
                    &prefill[step],
                    1e-5,
                    &format!("{ty} seq 1 step {step}"),
                );
            }
            if step > 0 {
                assert_close(
                    got.next().unwrap(),
                    &prefill[step - 1],
                    1e-5,
                    &format!("{ty} seq 2 step {step}"),
                );
            }
        }

        // Greedy rows bring back only their best token and normaliser.
        model.clear();
        model.add_sequence().unwrap();
        let rows = synthetic::rows(0, &tokens);
        let best = model.forward(&rows, |_| Need::Best).unwrap();
        for (pos, row) in prefill.iter().enumerate() {
            match best.get(pos) {
                Some(Next::Best { token, logit, lse }) => {
                    assert_eq!(token, argmax(row), "{ty} position {pos}");
                    assert_eq!(logit, row[token as usize]);
                    assert!((lse - log_sum_exp(row)).abs() < 1e-4);
                }
                other => panic!("{ty} position {pos}: {other:?}"),
            }
        }
    }
}

#[test]
fn forward_pass_on_the_gpu_matches_llama_cpp_with_teacher_forcing() {
    let Some(file) = open_model_or_skip("forward_pass_on_the_gpu_matches_llama_cpp") else {
        return;
    };
    let Some(gpu) = gpu_or_skip("forward_pass_on_the_gpu_matches_llama_cpp") else {
        return;
    };
    let longest = crate::test_support::cases()
        .iter()
        .map(|c| c.prompt.len() + c.greedy.len())
        .max()
        .unwrap();
    let model = CudaModel::load(gpu, &file, 1, longest + 1, longest + 1).unwrap();
    let model = std::cell::RefCell::new(model);
    check_against_reference(|case| {
        let mut model = model.borrow_mut();
        model.clear();
        model.add_sequence().unwrap();
        full_logits(&mut model, &case.forced_rows())
    });
}

#[test]
fn a_model_too_big_for_the_gpu_is_a_clear_error() {
    let Some(file) = open_model_or_skip("a_model_too_big_for_the_gpu_is_a_clear_error") else {
        return;
    };
    let Some(gpu) = gpu_or_skip("a_model_too_big_for_the_gpu_is_a_clear_error") else {
        return;
    };
    // 100,000 sequences of 8192 positions: terabytes of KV cache.
    let err = CudaModel::load(gpu, &file, 100_000, 8192, 512).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("out of device memory"), "{message}");
    assert!(message.contains("lower max_batch or context"), "{message}");
}

#[test]
fn the_start_up_check_refuses_logits_that_differ() {
    use super::model::logits_agree;
    let want = random(21, 1000, 4.0);
    assert_eq!(logits_agree(&want, &want), Ok(()));

    // Noise well inside the tolerances passes.
    let near: Vec<f32> = want
        .iter()
        .zip(random(22, 1000, 0.02))
        .map(|(w, e)| w + e)
        .collect();
    assert_eq!(logits_agree(&want, &near), Ok(()));

    // Another best token, a shifted distribution, garbage: refused.
    let mut other = want.clone();
    let best = argmax(&want) as usize;
    other[(best + 1) % 1000] = want[best] + 5.0;
    assert!(logits_agree(&want, &other).is_err());
    let flat = vec![0.0f32; 1000];
    assert!(logits_agree(&want, &flat).is_err());
    let nan = vec![f32::NAN; 1000];
    assert!(logits_agree(&want, &nan).is_err());
    assert!(logits_agree(&want, &want[..999]).is_err());

    // A greedy summary: the CPU's own pick and log-probability pass;
    // another token, a wrong log-probability or garbage do not.
    use super::model::best_agrees;
    let lp = want[best] - log_sum_exp(&want);
    assert_eq!(best_agrees(&want, best as u32, lp), Ok(()));
    assert_eq!(best_agrees(&want, best as u32, lp + 0.01), Ok(()));
    assert!(best_agrees(&want, best as u32, lp - 2.0).is_err());
    assert!(best_agrees(&want, best as u32, f32::NAN).is_err());
    assert!(best_agrees(&want, 5000, lp).is_err());
    let mut sharp = want.clone();
    sharp[best] += 10.0;
    let other = (best as u32 + 1) % 1000;
    let other_lp = sharp[other as usize] - log_sum_exp(&sharp);
    assert!(best_agrees(&sharp, other, other_lp).is_err());
}

#[test]
fn the_start_up_check_passes_with_fewer_sequences_than_its_tokens() {
    let test = "the_start_up_check_passes_with_fewer_sequences_than_its_tokens";
    let Some(file) = open_model_or_skip(test) else {
        return;
    };
    let cpu = crate::model::Model::load(&file).unwrap();
    let pool = crate::pool::ThreadPool::new(2).unwrap();
    // The check's prompt wants logits at each of its 12 positions; a
    // pool's max_batch (8 by default) caps the logits of one piece, not of
    // the step.
    for max_batch in [1, 8] {
        let Some(gpu) = gpu_or_skip(test) else {
            return;
        };
        let mut model = CudaModel::load(gpu, &file, max_batch, 64, 256 + max_batch).unwrap();
        if let Err(e) = model.check_against(&cpu, &pool) {
            panic!("max_batch {max_batch}: {e}");
        }
    }
}
