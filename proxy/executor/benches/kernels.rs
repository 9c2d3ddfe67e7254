//! Speed of the matrix kernels on SmolLM2-135M's shapes.
//!
//! Run with `cargo bench -p switchyard-executor --bench kernels`. Prints, for
//! single matrices and for the whole model's matrix set, the time per call,
//! GFLOP/s, weight bytes read per second, and how much batching 8 sequences
//! gains over 1. Weights are random but well-formed blocks; each of the 30
//! layers has its own, so the model estimate streams 96 MB of weights per
//! step as the real model does.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use half::f16;
use switchyard_executor::pool::ThreadPool;
use switchyard_executor::quant::{interleave, matmul};
use switchyard_executor::tensor::{GgmlType, Layout, QMatrix, TensorBytes};

/// SmolLM2-135M: width, FFN width, KV width, vocabulary, layers.
const DIM: usize = 576;
const FFN: usize = 1536;
const KV: usize = 192;
const VOCAB: usize = 49152;
const LAYERS: usize = 30;

/// Measuring time per repetition; the best of `REPS` is reported, since on a
/// shared machine noise only ever adds time.
const MEASURE: Duration = Duration::from_millis(300);
const REPS: usize = 5;

type BenchResult = Result<(), Box<dyn std::error::Error>>;

fn main() -> BenchResult {
    let mut seed = 0x1234_5678_9ABC_DEF0u64;
    let ffn_up = random_matrix(&mut seed, GgmlType::Q4_1, FFN, DIM);
    let ffn_down = random_matrix(&mut seed, GgmlType::Q4_1, DIM, FFN);
    let output = random_matrix(&mut seed, GgmlType::Q8_0, VOCAB, DIM);
    let layers: Vec<Vec<QMatrix>> = (0..LAYERS)
        .map(|_| {
            [
                (DIM, DIM),
                (KV, DIM),
                (KV, DIM),
                (DIM, DIM),
                (FFN, DIM),
                (FFN, DIM),
                (DIM, FFN),
            ]
            .map(|(rows, cols)| random_matrix(&mut seed, GgmlType::Q4_1, rows, cols))
            .into()
        })
        .collect();

    for threads in [1, 2] {
        let pool = ThreadPool::new(threads)?;
        println!("== {threads} thread(s)");
        for (name, w) in [
            ("ffn_down 576x1536 Q4_1", &ffn_down),
            ("ffn_up 1536x576 Q4_1", &ffn_up),
            ("output 49152x576 Q8_0", &output),
        ] {
            let mut per_call = [0.0; 2];
            for (slot, n) in [1, 8].into_iter().enumerate() {
                let x = activations(&mut seed, n * w.cols);
                let mut out = vec![0.0; n * w.rows];
                let t = best_time(|| matmul(&pool, w, &x, n, &mut out))?;
                per_call[slot] = t;
                let flops = 2.0 * (w.rows * w.cols * n) as f64;
                let bytes = w.bytes.as_slice().len() as f64;
                println!(
                    "{name:24} n={n}: {:8.1} us  {:6.1} GFLOP/s  {:6.1} GB/s weights",
                    t * 1e6,
                    flops / t / 1e9,
                    bytes / t / 1e9,
                );
            }
            println!(
                "{name:24} n=8 / n=1 throughput: {:.2}x",
                8.0 * per_call[0] / per_call[1]
            );
        }

        // The whole model's matrices for one decode step of `n` sequences.
        let mut step = [0.0; 2];
        for (slot, n) in [1, 8].into_iter().enumerate() {
            let x_dim = activations(&mut seed, n * DIM);
            let x_ffn = activations(&mut seed, n * FFN);
            let mut out = vec![0.0; n * VOCAB];
            let t = best_time(|| {
                for layer in &layers {
                    for w in layer {
                        let x = if w.cols == DIM { &x_dim } else { &x_ffn };
                        matmul(&pool, w, x, n, &mut out[..n * w.rows])?;
                    }
                }
                matmul(&pool, &output, &x_dim, n, &mut out)
            })?;
            step[slot] = t;
            println!(
                "model step n={n}: {:7.2} ms  {:7.1} tokens/s (matrices only)",
                t * 1e3,
                n as f64 / t,
            );
        }
        println!(
            "model step n=8 / n=1 throughput: {:.2}x",
            8.0 * step[0] / step[1]
        );
    }
    Ok(())
}

/// Seconds per call of `f`: the best mean over `REPS` runs of `MEASURE`.
fn best_time<E>(mut f: impl FnMut() -> Result<(), E>) -> Result<f64, E> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..REPS {
        let start = Instant::now();
        let mut calls = 0u32;
        while start.elapsed() < MEASURE {
            f()?;
            calls += 1;
        }
        best = best.min(start.elapsed().as_secs_f64() / calls as f64);
    }
    Ok(best)
}

fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn activations(seed: &mut u64, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| (next(seed) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect()
}

/// Random quantized values with plausible scales: written as bytes
/// directly, which is much faster than quantizing 100M floats.
fn random_matrix(seed: &mut u64, ty: GgmlType, rows: usize, cols: usize) -> QMatrix {
    let len = ty.row_bytes(cols).unwrap_or(0) * rows;
    let mut bytes: Vec<u8> = (0..len).map(|_| next(seed) as u8).collect();
    let d = f16::from_f32(0.01).to_bits().to_le_bytes();
    let m = f16::from_f32(-0.08).to_bits().to_le_bytes();
    for block in bytes.chunks_exact_mut(ty.block_bytes()) {
        block[..2].copy_from_slice(&d);
        if ty == GgmlType::Q4_1 {
            block[2..4].copy_from_slice(&m);
        }
    }
    let w = QMatrix {
        ty,
        rows,
        cols,
        layout: Layout::Rows,
        bytes: TensorBytes::Owned(Arc::from(bytes)),
    };

    // As the model loader does.
    interleave(&w).unwrap_or(w)
}
