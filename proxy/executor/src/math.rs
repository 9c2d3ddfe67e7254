//! Elementwise float functions of the forward pass, eight lanes at a time
//! where the CPU allows: `exp`, the SiLU gate and softmax.
//!
//! Owns only arithmetic on slices of f32; knows nothing of the model.
//! `exp` is glibc's `expf` algorithm (a 32-entry table of 2^(i/32) and a
//! cubic, in f64) step for step, so it gives the bits that `f32::exp`
//! gives on glibc, and the vector versions give the bits of the plain
//! ones. That matters more than it seems: the model's 8-bit activations
//! turn a last-bit change anywhere into a different rounding somewhere,
//! and the reference tests' per-step bounds are close to what such noise
//! reaches. Calling libm once per element cost as much as the rest of a
//! decode step's attention.

/// `2^(i/32)` for i in 0..32, as f64 bits less `i << 47`, so that adding
/// `k << 47` for `k ≡ i (mod 32)` gives `2^(k/32)` (glibc's `__exp2f_data`).
const EXP2_TABLE: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

/// 32 / ln 2: `x * EXP_INV_LN2_N = k + r` with integer k, |r| <= 1/2.
const EXP_INV_LN2_N: f64 = std::f64::consts::LOG2_E * 32.0;

/// Adding it rounds to an integer in the low mantissa bits.
const EXP_SHIFT: f64 = 6755399441055744.0;

/// The cubic for `2^(r/32)`, highest degree first.
const EXP_POLY: [f64; 3] = [
    0.05550361559341535 / 32768.0,
    0.2402284522445722 / 1024.0,
    0.6931471806916203 / 32.0,
];

/// Above this `exp` overflows to infinity; below `EXP_UNDER` it is 0.
const EXP_OVER: f32 = 88.72283;
const EXP_UNDER: f32 = -103.97208;

/// `e^x` rounded to f32, as glibc's `expf` computes it (with fused
/// multiply-adds, as its x86-64 FMA build does).
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x + x;
    }
    if x > EXP_OVER {
        return f32::INFINITY;
    }
    if x < EXP_UNDER {
        return 0.0;
    }
    let xd = f64::from(x);
    let kd = EXP_INV_LN2_N.mul_add(xd, EXP_SHIFT);
    let ki = kd.to_bits();
    let kd = kd - EXP_SHIFT;
    let r = EXP_INV_LN2_N.mul_add(xd, -kd);
    let t = EXP2_TABLE[(ki % 32) as usize].wrapping_add(ki << 47);
    let s = f64::from_bits(t);
    let z = EXP_POLY[0].mul_add(r, EXP_POLY[1]);
    let r2 = r * r;
    let y = EXP_POLY[2].mul_add(r, 1.0);
    let y = z.mul_add(r2, y);
    (y * s) as f32
}

/// `gate[i] = silu(gate[i]) * up[i]`, the SwiGLU of the feed-forward
/// block, over the shorter of the two.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU supports what the module needs, checked above.
        #[allow(unsafe_code)]
        unsafe {
            x86::silu_mul(gate, up)
        };
        return;
    }
    silu_mul_plain(gate, up);
}

/// The plain version of [`silu_mul`].
pub fn silu_mul_plain(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

/// Softmax of `x` in place: `exp(x[i] - max)`, summed in order, each
/// divided by the sum.
pub fn softmax(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU supports what the module needs, checked above.
        #[allow(unsafe_code)]
        unsafe {
            x86::softmax(x)
        };
        return;
    }
    softmax_plain(x);
}

/// [`softmax`] of each `len`-long row of `x` (the last may be shorter),
/// with the same results, faster: each row's sum is a chain of dependent
/// additions that must keep its order, so rows are summed side by side.
pub fn softmax_rows(x: &mut [f32], len: usize) {
    if len == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU supports what the module needs, checked above.
        #[allow(unsafe_code)]
        unsafe {
            x86::softmax_rows(x, len)
        };
        return;
    }
    for row in x.chunks_mut(len) {
        softmax_plain(row);
    }
}

/// The plain version of [`softmax`].
pub fn softmax_plain(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = exp(*v - max);
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// AVX2 + FMA versions. A slice's last partial vector is copied into a
/// zero-padded one, so every element goes through the same instructions.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{EXP2_TABLE, EXP_INV_LN2_N, EXP_OVER, EXP_POLY, EXP_SHIFT, EXP_UNDER};

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// [`super::exp`] on 4 lanes, widened to f64.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp4(x: __m128) -> __m128 {
        let xd = _mm256_cvtps_pd(x);
        let n = _mm256_set1_pd(EXP_INV_LN2_N);
        let shift = _mm256_set1_pd(EXP_SHIFT);
        let kd = _mm256_fmadd_pd(n, xd, shift);
        let ki = _mm256_castpd_si256(kd);
        let kd = _mm256_sub_pd(kd, shift);
        let r = _mm256_fmsub_pd(n, xd, kd);
        let i = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
        // SAFETY: every index is below 32, the table's length.
        let table = EXP2_TABLE.as_ptr() as *const i64;
        let t = unsafe { _mm256_i64gather_epi64::<8>(table, i) };
        let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
        let c = EXP_POLY.map(|c| _mm256_set1_pd(c));
        let z = _mm256_fmadd_pd(c[0], r, c[1]);
        let r2 = _mm256_mul_pd(r, r);
        let y = _mm256_fmadd_pd(c[2], r, _mm256_set1_pd(1.0));
        let y = _mm256_fmadd_pd(z, r2, y);
        _mm256_cvtpd_ps(_mm256_mul_pd(y, s))
    }

    /// [`super::exp`] on 8 lanes, out-of-range and NaN lanes included.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp8(x: __m256) -> __m256 {
        let lo = exp4(_mm256_castps256_ps128(x));
        let hi = exp4(_mm256_extractf128_ps::<1>(x));
        let y = _mm256_set_m128(hi, lo);
        let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(EXP_OVER));
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_UNDER));
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let y = _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), over);
        let y = _mm256_andnot_ps(under, y);
        _mm256_blendv_ps(y, _mm256_add_ps(x, x), nan)
    }

    /// Runs `f` on each whole 8-float vector of `x`, then on the rest
    /// zero-padded, storing back only the real elements. `f` gets the
    /// vector's first index.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn map8(x: &mut [f32], mut f: impl FnMut(usize, __m256) -> __m256) {
        let mut chunks = x.chunks_exact_mut(8);
        let mut at = 0;
        for c in &mut chunks {
            // SAFETY: `c` holds 8 floats; unaligned load and store.
            unsafe {
                let v = f(at, _mm256_loadu_ps(c.as_ptr()));
                _mm256_storeu_ps(c.as_mut_ptr(), v);
            }
            at += 8;
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut pad = [0.0f32; 8];
            pad[..rest.len()].copy_from_slice(rest);
            // SAFETY: `pad` holds 8 floats.
            unsafe {
                let v = f(at, _mm256_loadu_ps(pad.as_ptr()));
                _mm256_storeu_ps(pad.as_mut_ptr(), v);
            }
            rest.copy_from_slice(&pad[..rest.len()]);
        }
    }

    /// The 8 floats of `x` from `at`, zero-padded past its end.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn load8(x: &[f32], at: usize) -> __m256 {
        let mut pad = [0.0f32; 8];
        let from = x.get(at..).unwrap_or_default();
        let from = &from[..from.len().min(8)];
        pad[..from.len()].copy_from_slice(from);
        // SAFETY: `pad` holds 8 floats.
        unsafe { _mm256_loadu_ps(pad.as_ptr()) }
    }

    /// [`super::silu_mul_plain`] on AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let len = gate.len().min(up.len());
        let (gate, up) = (&mut gate[..len], &up[..len]);
        let sign = _mm256_set1_ps(-0.0);
        let one = _mm256_set1_ps(1.0);
        map8(gate, |at, g| {
            let u = match up.get(at..at + 8) {
                // SAFETY: `u` holds 8 floats; an unaligned load.
                Some(u) => unsafe { _mm256_loadu_ps(u.as_ptr()) },
                None => load8(up, at),
            };
            let e = exp8(_mm256_xor_ps(g, sign));
            _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u)
        });
    }

    /// [`super::softmax_plain`] on AVX2: the maximum, exponentials and
    /// divisions eight at a time, the sum in order.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax(x: &mut [f32]) {
        exp_less_max(x);
        let [sum] = in_order_sums([x]);
        divide(x, sum);
    }

    /// [`super::softmax_rows`] on AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax_rows(x: &mut [f32], len: usize) {
        for row in x.chunks_mut(len) {
            exp_less_max(row);
        }
        for rows in x.chunks_mut(4 * len) {
            let mut sums = [0.0f32; 4];
            let mut r = rows.chunks(len);
            match (r.next(), r.next(), r.next(), r.next()) {
                (Some(a), Some(b), Some(c), Some(d)) if d.len() == len => {
                    sums = in_order_sums([a, b, c, d]);
                }
                (Some(a), Some(b), Some(c), None) if c.len() == len => {
                    sums[..3].copy_from_slice(&in_order_sums([a, b, c]));
                }
                (Some(a), Some(b), None, None) if b.len() == len => {
                    sums[..2].copy_from_slice(&in_order_sums([a, b]));
                }
                // A shorter last row: each row alone.
                _ => {
                    for (sum, row) in sums.iter_mut().zip(rows.chunks(len)) {
                        [*sum] = in_order_sums([row]);
                    }
                }
            }
            for (row, &sum) in rows.chunks_mut(len).zip(&sums) {
                divide(row, sum);
            }
        }
    }

    /// `x[i] = exp(x[i] - max)`. The maximum is taken eight lanes at a
    /// time: `max_ps(v, m)` keeps `m` when `v` is NaN, as `f32::max`
    /// keeps the number, and a maximum of either zero's sign gives the
    /// same differences' exponentials.
    #[target_feature(enable = "avx2,fma")]
    fn exp_less_max(x: &mut [f32]) {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let chunks = x.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            // SAFETY: `c` holds 8 floats; an unaligned load.
            m = _mm256_max_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, m);
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 floats; an unaligned store.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        let max = lanes
            .iter()
            .chain(rest)
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let m = _mm256_set1_ps(max);
        map8(x, |_, v| exp8(_mm256_sub_ps(v, m)));
    }

    /// Each row's sum, element by element in order from 0.0, for `N`
    /// rows of equal length at once: `N` independent chains of additions.
    #[inline]
    fn in_order_sums<const N: usize>(rows: [&[f32]; N]) -> [f32; N] {
        let len = rows.iter().map(|r| r.len()).min().unwrap_or(0);
        let rows = rows.map(|r| &r[..len]);
        let mut sums = [0.0f32; N];
        for t in 0..len {
            for (sum, row) in sums.iter_mut().zip(&rows) {
                *sum += row[t];
            }
        }
        sums
    }

    /// `x[i] /= sum`, eight at a time.
    #[target_feature(enable = "avx2,fma")]
    fn divide(x: &mut [f32], sum: f32) {
        let s = _mm256_set1_ps(sum);
        map8(x, |_, v| _mm256_div_ps(v, s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Floats spread over exp's whole interesting range and past it.
    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (0..2_000_000)
            .map(|i| -110.0 + 200.0 * (i as f32 / 2_000_000.0))
            .collect();
        v.extend((0..200_000).map(|i| (i as f32 - 100_000.0) * 1e-5));
        v.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        v.extend([EXP_OVER, EXP_UNDER, 88.7, -103.9, -87.5, f32::MIN_POSITIVE]);
        v
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn exp_gives_glibcs_bits() {
        for x in inputs() {
            let (got, want) = (exp(x), x.exp());
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "exp({x:e}) = {got:e}, glibc {want:e}"
            );
        }
    }

    #[test]
    fn exp_is_close_to_f64() {
        for x in inputs().into_iter().filter(|x| x.abs() < 88.0) {
            let want = f64::from(x).exp();
            let err = (f64::from(exp(x)) - want).abs() / want;
            assert!(err < 1.2e-7, "exp({x}): relative error {err}");
        }
    }

    #[test]
    fn plain_and_vector_versions_agree_bit_for_bit() {
        let all = inputs();
        let (mut a, mut b) = (all.clone(), all.clone());
        silu_mul_plain(&mut a, &all);
        silu_mul(&mut b, &all);
        let nan_eq = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .all(|(p, q)| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()))
        };
        assert!(nan_eq(&a, &b), "silu");
        for len in [1, 7, 8, 9, 16, 103, 1536] {
            let x: Vec<f32> = (0..len)
                .map(|i| (i * 7919 % 1000) as f32 / 37.0 - 13.0)
                .map(|v| if v > 10.0 { v * 4.0 } else { v })
                .collect();
            let (mut a, mut b) = (x.clone(), x.clone());
            softmax_plain(&mut a);
            softmax(&mut b);
            assert_eq!(bits(&a), bits(&b), "softmax, len {len}");
            let total: f32 = b.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "softmax sums to {total}");
        }
    }

    #[test]
    fn softmax_rows_equals_softmax_of_each_row() {
        let x: Vec<f32> = (0..1000)
            .map(|i| (i * 7919 % 1000) as f32 / 37.0 - 13.0)
            .collect();
        for (rows, len) in [(1, 103), (2, 9), (3, 104), (4, 8), (5, 17), (9, 64)] {
            for cut in [0, 1, 5] {
                let n = (rows * len - cut).max(1);
                let mut want = x[..n].to_vec();
                for row in want.chunks_mut(len) {
                    softmax_plain(row);
                }
                let mut got = x[..n].to_vec();
                softmax_rows(&mut got, len);
                assert_eq!(bits(&got), bits(&want), "{rows} rows of {len}, {cut} short");
            }
        }
        let mut nan = vec![1.0, f32::NAN, 3.0, -0.0, 0.0, 2.0, 1.0, 0.5, 0.25, 4.0];
        let mut want = nan.clone();
        softmax_plain(&mut want);
        softmax_rows(&mut nan, 10);
        let same = nan
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        assert!(same, "{nan:?} vs {want:?}");
    }
}
