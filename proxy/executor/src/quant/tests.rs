use std::sync::Arc;

use half::f16;

use super::*;

const QUANTIZED: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];
const ALL: [GgmlType; 5] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
];

/// Deterministic pseudo-random numbers (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// A row whose 32-element blocks have scales spread over four decades
    /// and a mean offset, as real weights and activations do.
    fn row(&mut self, len: usize) -> Vec<f32> {
        let mut x = Vec::with_capacity(len);
        let (mut scale, mut offset) = (1.0, 0.0);
        for j in 0..len {
            if j % QK == 0 {
                scale = 10f32.powf(self.unit() * 2.0);
                offset = self.unit() * scale * 0.3;
            }
            x.push(self.unit() * scale + offset);
        }
        x
    }
}

fn encode(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(x.len()).unwrap()];
    match ty {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        GgmlType::Q4_0 => quantize_row_q4_0(x, &mut out).unwrap(),
        GgmlType::Q4_1 => quantize_row_q4_1(x, &mut out).unwrap(),
        GgmlType::Q8_0 => quantize_row_q8_0(x, &mut out).unwrap(),
    }
    out
}

fn random_matrix(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> QMatrix {
    let mut bytes = Vec::new();
    for _ in 0..rows {
        bytes.extend(encode(ty, &rng.row(cols)));
    }
    QMatrix {
        ty,
        rows,
        cols,
        layout: Layout::Rows,
        bytes: TensorBytes::Owned(Arc::from(bytes)),
    }
}

fn dequantized(w: &QMatrix) -> Vec<Vec<f32>> {
    (0..w.rows)
        .map(|r| {
            let mut out = vec![0.0; w.cols];
            dequantize_row(w.ty, w.row(r).unwrap(), &mut out).unwrap();
            out
        })
        .collect()
}

/// The activations as the quantized kernels see them.
fn quantized_acts(x: &[f32]) -> Vec<BlockQ8> {
    let mut acts = vec![BlockQ8::default(); x.len() / QK];
    quantize_row_q8_1(x, &mut acts).unwrap();
    acts
}

fn act_values(acts: &[BlockQ8]) -> Vec<f32> {
    acts.iter()
        .flat_map(|a| a.qs.map(|q| q as f32 * a.d))
        .collect()
}

/// The product in f64 over dequantized weights and activations (quantized
/// and dequantized first when the weights are quantized), and the scale of
/// its terms, `sum |w_j * x_j|`, for tolerances.
///
/// For Q4_1 the offset `m` meets the activations through the stored
/// `s = f16(d * sum(q))` rather than `d * sum(q)`, as in llama.cpp, so the
/// reference uses it too; that is the only place the kernels' arithmetic
/// departs from the exact product of the dequantized values.
fn reference(w: &QMatrix, x: &[f32], n: usize) -> Vec<(f64, f64)> {
    let wd = dequantized(w);
    let mut out = vec![(0.0, 0.0); n * w.rows];
    for (i, xrow) in x.chunks_exact(w.cols.max(1)).take(n).enumerate() {
        let acts = if w.ty.block_len() == 1 {
            Vec::new()
        } else {
            quantized_acts(xrow)
        };
        let xv = if w.ty.block_len() == 1 {
            xrow.to_vec()
        } else {
            act_values(&acts)
        };
        for (r, wrow) in wd.iter().enumerate() {
            let mut sum = 0.0f64;
            let mut scale = 0.0f64;
            for (&a, &b) in wrow.iter().zip(&xv) {
                sum += a as f64 * b as f64;
                scale += (a as f64 * b as f64).abs();
            }
            if w.ty == GgmlType::Q4_1 {
                for (blk, a) in w.row(r).unwrap().chunks_exact(20).zip(&acts) {
                    let m = blocks::f16_at(blk, 2) as f64;
                    let exact: f64 = a.qs.iter().map(|&q| q as f64 * a.d as f64).sum();
                    sum += m * (a.s as f64 - exact);
                    scale += (m * a.s as f64).abs();
                }
            }
            out[i * w.rows + r] = (sum, scale);
        }
    }
    out
}

fn pools() -> Vec<ThreadPool> {
    [1, 2, 3].map(|t| ThreadPool::new(t).unwrap()).into()
}

fn run(isa: Isa, pool: &ThreadPool, w: &QMatrix, x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n * w.rows];
    matmul_on(isa, pool, w, x, n, &mut out).unwrap();
    out
}

/// The SIMD instruction sets this CPU runs.
fn simd() -> Vec<Isa> {
    let mut isas = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            isas.push(Isa::Avx2);
        } else {
            eprintln!("skipping AVX2 comparison: this CPU lacks AVX2, FMA or F16C");
        }
        if avx2::vnni_available() {
            isas.push(Isa::Vnni);
        } else {
            eprintln!("skipping VNNI comparison: this CPU lacks AVX-512 VNNI or VL");
        }
    }
    isas
}

#[test]
fn dequantize_matches_hand_built_rows() {
    // Two Q8_0 blocks: scales 0.5 and -2, a few set values.
    let mut bytes = vec![0u8; 68];
    bytes[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
    bytes[2] = 10;
    bytes[33] = (-3i8) as u8;
    bytes[34..36].copy_from_slice(&f16::from_f32(-2.0).to_bits().to_le_bytes());
    bytes[36] = 1;
    let mut out = vec![0.0; 64];
    dequantize_row(GgmlType::Q8_0, &bytes, &mut out).unwrap();
    assert_eq!((out[0], out[31], out[32], out[33]), (5.0, -1.5, -2.0, 0.0));

    let f32_bytes: Vec<u8> = [1.5f32, -0.25]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut out = vec![0.0; 2];
    dequantize_row(GgmlType::F32, &f32_bytes, &mut out).unwrap();
    assert_eq!(out, [1.5, -0.25]);

    let f16_bytes = [0x00, 0x3C, 0x00, 0xC0]; // 1.0, -2.0
    dequantize_row(GgmlType::F16, &f16_bytes, &mut out).unwrap();
    assert_eq!(out, [1.0, -2.0]);
}

#[test]
fn dequantize_rejects_mismatched_lengths() {
    let mut out = vec![0.0; 32];
    let err = dequantize_row(GgmlType::Q4_1, &[0; 18], &mut out).unwrap_err();
    assert_eq!(
        err,
        KernelError::Length {
            what: "row bytes",
            got: 18,
            want: 20
        }
    );
    let mut out = vec![0.0; 33];
    let err = dequantize_row(GgmlType::Q8_0, &[0; 34], &mut out).unwrap_err();
    assert!(matches!(err, KernelError::PartialBlock { cols: 33, .. }));
}

#[test]
fn quantize_round_trip_error_is_within_half_a_step() {
    let mut rng = Rng(0x5EED);
    let x = rng.row(32 * 64);
    for ty in QUANTIZED {
        let bytes = encode(ty, &x);
        let mut back = vec![0.0; x.len()];
        dequantize_row(ty, &bytes, &mut back).unwrap();
        for (b, blk) in bytes.chunks_exact(ty.block_bytes()).enumerate() {
            let d = blocks::f16_at(blk, 0).abs();
            let m = if ty == GgmlType::Q4_1 {
                blocks::f16_at(blk, 2).abs()
            } else {
                0.0
            };

            // Half a step, plus the f16 rounding of the stored scale and
            // minimum; Q4_0 clips its top value by a whole step.
            let bound = match ty {
                GgmlType::Q4_0 => d * 1.01,
                GgmlType::Q4_1 => d * 0.51 + m * 1e-3,
                _ => d * 0.57,
            };
            for j in b * QK..(b + 1) * QK {
                let err = (x[j] - back[j]).abs();
                assert!(err <= bound, "{ty} element {j}: {} -> {}", x[j], back[j]);
            }
        }
    }

    // Activations: the same bound as Q8_0, and `s` is d * sum(q) to f16.
    let acts = quantized_acts(&x);
    for (a, xb) in acts.iter().zip(x.chunks_exact(QK)) {
        for (&q, &v) in a.qs.iter().zip(xb) {
            assert!((q as f32 * a.d - v).abs() <= a.d * 0.57);
        }
        let sum: f32 = a.qs.iter().map(|&q| q as f32).sum::<f32>() * a.d;
        assert!((a.s - sum).abs() <= sum.abs() * 1e-3 + 1e-6);
    }
}

#[test]
fn quantizers_reject_mismatched_lengths() {
    let x = vec![0.0; 64];
    assert!(quantize_row_q4_0(&x, &mut [0; 35]).is_err());
    assert!(quantize_row_q4_1(&x[..40], &mut [0; 40]).is_err());
    assert!(quantize_row_q8_0(&x, &mut [0; 34]).is_err());
    assert!(quantize_row_q8_1(&x, &mut [BlockQ8::default(); 3]).is_err());
}

#[test]
fn matmul_matches_f64_reference_for_every_type() {
    let mut rng = Rng(42);
    let pools = pools();
    for ty in ALL {
        let widths: &[usize] = if ty.block_len() == 1 {
            &[5, 32, 77]
        } else {
            &[32, 96, 160]
        };
        for &cols in widths {
            for rows in [1, 7, 37] {
                let w = random_matrix(&mut rng, ty, rows, cols);
                for n in [1, 3, 8, 33] {
                    let x = rng.row(n * cols);
                    let want = reference(&w, &x, n);
                    for pool in &pools {
                        let got = matmul_vec(pool, &w, &x, n);
                        for (k, (&g, &(r, scale))) in got.iter().zip(&want).enumerate() {
                            let tol = 1e-5 * scale + 1e-30;
                            assert!(
                                (g as f64 - r).abs() <= tol,
                                "{ty} {rows}x{cols} n={n} threads={}: out[{k}] = {g}, \
                                 want {r} (scale {scale})",
                                pool.threads()
                            );
                        }
                    }
                }
            }
        }
    }
}

fn matmul_vec(pool: &ThreadPool, w: &QMatrix, x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n * w.rows];
    matmul(pool, w, x, n, &mut out).unwrap();
    out
}

#[test]
fn simd_activation_quantizer_equals_scalar_bit_for_bit() {
    let Some(&isa) = simd().first() else { return };
    let mut rng = Rng(7);
    let mut x = rng.row(32 * 200);

    // Edge blocks: all zero, exact halves (ties), one huge value, tiny
    // values, a negative extreme.
    x[..32].fill(0.0);
    for j in 0..32 {
        x[32 + j] = (j as f32 - 16.0) * 0.5;
        x[64 + j] = if j == 3 { 3e38 } else { j as f32 };
        x[96 + j] = j as f32 * 1e-40;
        x[128 + j] = -(j as f32);
    }
    let mut want = vec![BlockQ8::default(); 200];
    let mut got = vec![BlockQ8::default(); 200];
    quantize_act(Isa::Scalar, &x, &mut want);
    quantize_act(isa, &x, &mut got);
    for (b, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.qs, w.qs, "block {b}");
        assert_eq!(g.d.to_bits(), w.d.to_bits(), "block {b}");
        assert_eq!(g.s.to_bits(), w.s.to_bits(), "block {b}");
        assert_eq!(g.sum, w.sum, "block {b}");
    }
}

#[test]
fn simd_matmul_equals_scalar_bit_for_bit() {
    let isas = simd();
    let mut rng = Rng(99);
    let pool = ThreadPool::new(2).unwrap();
    for ty in QUANTIZED {
        for (rows, cols) in [(67, 576), (5, 32), (3, 1536), (9, 96)] {
            let mut w = random_matrix(&mut rng, ty, rows, cols);

            // Extreme weights: Q8_0's -128 and all-ones nibbles.
            if let TensorBytes::Owned(bytes) = &w.bytes {
                let mut bytes = bytes.to_vec();
                let skip = if ty == GgmlType::Q4_1 { 4 } else { 2 };
                let fill = if ty == GgmlType::Q8_0 { 0x80 } else { 0xFF };
                bytes[skip..skip + 16].fill(fill);
                w.bytes = TensorBytes::Owned(Arc::from(bytes));
            }
            let wi = interleave(&w).unwrap();
            for n in [1, 2, 3, 4, 5, 8, 9, 17] {
                let mut x = rng.row(n * cols);
                x[..32].fill(1.0);
                let want = run(Isa::Scalar, &pool, &w, &x, n);
                let scalar_interleaved = run(Isa::Scalar, &pool, &wi, &x, n);
                assert_eq!(
                    bits(&scalar_interleaved),
                    bits(&want),
                    "{ty} {rows}x{cols} n={n}"
                );
                for &isa in &isas {
                    for m in [&w, &wi] {
                        let got = run(isa, &pool, m, &x, n);
                        for (k, (g, s)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                s.to_bits(),
                                "{isa:?} {ty} {:?} {rows}x{cols} n={n} [{k}]: {g} vs {s}",
                                m.layout
                            );
                        }
                    }
                }
            }
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn interleaved_rows_read_back_as_written() {
    let mut rng = Rng(11);
    for ty in QUANTIZED {
        let w = random_matrix(&mut rng, ty, 13, 96);
        let wi = interleave(&w).unwrap();
        assert_eq!(wi.layout, Layout::Interleaved);
        assert_eq!(wi.bytes.as_slice().len(), 16 * w.row_stride());
        let want = dequantized(&w);
        for (r, want) in want.iter().enumerate() {
            let mut got = vec![0.0; 96];
            dequantize_matrix_row(&wi, r, &mut got).unwrap();
            assert_eq!(&got, want, "{ty} row {r}");
        }
        assert!(dequantize_matrix_row(&wi, 13, &mut [0.0; 96]).is_err());
    }
}

#[test]
fn batch_size_and_thread_count_do_not_change_results() {
    let mut rng = Rng(3);
    let pools = pools();
    for ty in ALL {
        let w = interleave(&random_matrix(&mut rng, ty, 45, 128)).unwrap();
        let n = 9;
        let x = rng.row(n * 128);
        let batched = matmul_vec(&pools[0], &w, &x, n);
        for pool in &pools {
            assert_eq!(matmul_vec(pool, &w, &x, n), batched, "{ty}");
            for i in 0..n {
                let one = matmul_vec(pool, &w, &x[i * 128..(i + 1) * 128], 1);
                assert_eq!(one, batched[i * 45..(i + 1) * 45], "{ty} row {i}");
            }
        }
    }
}

#[test]
fn matmul_rejects_wrong_shapes_without_writing() {
    let mut rng = Rng(1);
    let pool = ThreadPool::new(1).unwrap();
    let w = random_matrix(&mut rng, GgmlType::Q4_1, 4, 64);
    let mut out = vec![7.0; 8];
    assert!(matmul(&pool, &w, &[0.0; 127], 2, &mut out).is_err());
    assert!(matmul(&pool, &w, &[0.0; 128], 2, &mut out[..7]).is_err());
    let short = QMatrix {
        bytes: TensorBytes::Owned(Arc::from(vec![0u8; 79])),
        ..w.clone()
    };
    assert!(matmul(&pool, &short, &[0.0; 128], 2, &mut out).is_err());
    let partial = QMatrix { cols: 48, ..w };
    assert!(matmul(&pool, &partial, &[0.0; 96], 2, &mut out).is_err());
    assert!(out.iter().all(|&v| v == 7.0));
}

#[test]
fn empty_rows_give_zero_products() {
    let pool = ThreadPool::new(2).unwrap();
    let w = QMatrix {
        ty: GgmlType::Q8_0,
        rows: 3,
        cols: 0,
        layout: Layout::Rows,
        bytes: TensorBytes::Owned(Arc::from(Vec::new())),
    };
    let mut out = vec![1.0; 6];
    matmul(&pool, &w, &[], 2, &mut out).unwrap();
    assert_eq!(out, [0.0; 6]);
}
