//! AVX2 + FMA + F16C versions of the activation quantizer and the quantized
//! dot products. Every function here gives bit for bit the result of its
//! plain counterpart in [`super::blocks`]; the tests hold them to that.
//!
//! Callers must have checked [`available`] before calling anything else.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::blocks::{q8_scales, round_f16, QK};
use super::BlockQ8;
use crate::tensor::GgmlType;

/// Whether this CPU runs the kernels in this module.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Quantizes `x` into activation blocks; `x.len() == out.len() * 32`.
/// Same result as [`super::blocks::quantize_block_act`] per block.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_act(x: &[f32], out: &mut [BlockQ8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
        // SAFETY: `xb` holds 32 floats, read as four unaligned 8-lane loads;
        // `ob.qs` holds 32 bytes, written by one unaligned store.
        unsafe {
            let p = xb.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];

            // Largest magnitude: clear sign bits, then a max tree.
            let sign = _mm256_set1_ps(-0.0);
            let m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
            let m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
            let m = _mm256_max_ps(m01, m23);
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
            let amax = _mm_cvtss_f32(m1);

            let (d, id) = q8_scales(amax);
            let idv = _mm256_set1_ps(id);

            // Round half to even, as `f32::round_ties_even`.
            const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            let q = [
                _mm256_cvtps_epi32(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(v[0], idv))),
                _mm256_cvtps_epi32(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(v[1], idv))),
                _mm256_cvtps_epi32(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(v[2], idv))),
                _mm256_cvtps_epi32(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(v[3], idv))),
            ];

            let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let sum = hsum_i32(s);

            // Packing interleaves 4-element groups; the permute restores
            // element order.
            let q01 = _mm256_packs_epi32(q[0], q[1]);
            let q23 = _mm256_packs_epi32(q[2], q[3]);
            let bytes = _mm256_packs_epi16(q01, q23);
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            _mm256_storeu_si256(ob.qs.as_mut_ptr() as *mut __m256i, bytes);

            ob.d = round_f16(d);
            ob.s = round_f16(d * sum as f32);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_i32(v: __m256i) -> i32 {
    let x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let y = _mm_add_epi32(x, _mm_unpackhi_epi64(x, x));
    let z = _mm_add_epi32(y, _mm_shuffle_epi32(y, 0b01));
    _mm_cvtsi128_si32(z)
}

/// The same reduction order as [`super::blocks::hsum8`].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_ps(v: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let y = _mm_add_ps(x, _mm_movehl_ps(x, x));
    let z = _mm_add_ss(y, _mm_movehdup_ps(y));
    _mm_cvtss_f32(z)
}

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

/// Dot products of one weight row `w` (blocks of `ty`) with `out.len()`
/// activation rows (1 to 4) of `nb` blocks each, stored one after another
/// in `acts`. The weight row is unpacked once per block for all of them.
/// Same results as [`super::blocks::dot_row`].
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_tile(
    ty: GgmlType,
    w: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    out: &mut [f32],
) {
    // SAFETY (all arms): the caller's CPU check is this function's.
    unsafe {
        match (ty, out.len()) {
            (GgmlType::Q4_0, 1) => tile::<Q4_0, 1>(w, acts, nb, out),
            (GgmlType::Q4_0, 2) => tile::<Q4_0, 2>(w, acts, nb, out),
            (GgmlType::Q4_0, 3) => tile::<Q4_0, 3>(w, acts, nb, out),
            (GgmlType::Q4_0, 4) => tile::<Q4_0, 4>(w, acts, nb, out),
            (GgmlType::Q4_1, 1) => tile::<Q4_1, 1>(w, acts, nb, out),
            (GgmlType::Q4_1, 2) => tile::<Q4_1, 2>(w, acts, nb, out),
            (GgmlType::Q4_1, 3) => tile::<Q4_1, 3>(w, acts, nb, out),
            (GgmlType::Q4_1, 4) => tile::<Q4_1, 4>(w, acts, nb, out),
            (GgmlType::Q8_0, 1) => tile::<Q8_0, 1>(w, acts, nb, out),
            (GgmlType::Q8_0, 2) => tile::<Q8_0, 2>(w, acts, nb, out),
            (GgmlType::Q8_0, 3) => tile::<Q8_0, 3>(w, acts, nb, out),
            (GgmlType::Q8_0, 4) => tile::<Q8_0, 4>(w, acts, nb, out),
            _ => {}
        }
    }
}

/// Activation rows per call of [`dot_tile`] at most.
pub(super) const MAX_TILE: usize = 4;

/// [`dot_tile`] for one weight type `T` and `C` activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<const T: u8, const C: usize>(
    w: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    out: &mut [f32],
) {
    let bytes = match T {
        Q4_0 => 18,
        Q4_1 => 20,
        _ => 34,
    };
    if w.len() < nb * bytes || acts.len() < nb * C || out.len() < C {
        return;
    }
    let wp = w.as_ptr();
    let ap = acts.as_ptr();

    let ones = _mm256_set1_epi16(1);
    let low = _mm256_set1_epi8(0x0F);
    let eight = _mm256_set1_epi8(8);
    let mut acc = [[_mm256_setzero_ps(); 2]; C];
    let mut summs = [[0.0f32; 2]; C];

    // One block of the weight row against block `b` of every activation
    // row, into accumulator `$half` (even or odd blocks).
    macro_rules! block {
        ($b:expr, $half:expr) => {{
            let b = $b;
            // SAFETY: `b < nb`, so the weight block lies within `w` and
            // block `b` of activation row `c < C` within `acts` (both checked
            // above); all loads are unaligned.
            unsafe {
                let blk = wp.add(b * bytes);
                let (wq, dw, m) = match T {
                    Q4_1 => {
                        let dm =
                            _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
                        let nib = _mm_loadu_si128(blk.add(4) as *const __m128i);
                        let both = _mm256_set_m128i(_mm_srli_epi16(nib, 4), nib);
                        let wq = _mm256_and_si256(both, low);
                        (wq, _mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
                    }
                    Q4_0 => {
                        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(
                            (blk as *const u16).read_unaligned() as i32,
                        ));
                        let nib = _mm_loadu_si128(blk.add(2) as *const __m128i);
                        let both = _mm256_set_m128i(_mm_srli_epi16(nib, 4), nib);
                        let wq = _mm256_sub_epi8(_mm256_and_si256(both, low), eight);
                        (wq, _mm_cvtss_f32(dm), 0.0)
                    }
                    _ => {
                        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(
                            (blk as *const u16).read_unaligned() as i32,
                        ));
                        let wq = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                        (wq, _mm_cvtss_f32(dm), 0.0)
                    }
                };

                // Signed weights: multiply magnitudes by sign-adjusted
                // activations, since the byte multiply takes one unsigned
                // operand. Products fit: |w| <= 128, |x| <= 127.
                let wabs = _mm256_sign_epi8(wq, wq);
                for c in 0..C {
                    let a = &*ap.add(c * nb + b);
                    let xq = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                    let p = if T == Q4_1 {
                        _mm256_maddubs_epi16(wq, xq)
                    } else {
                        _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xq, wq))
                    };
                    let lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                    let d = _mm256_set1_ps(dw * a.d);
                    acc[c][$half] = _mm256_fmadd_ps(d, lanes, acc[c][$half]);
                    if T == Q4_1 {
                        summs[c][$half] += m * a.s;
                    }
                }
            }
        }};
    }

    // Blocks in pairs so each accumulator is a fixed register.
    let mut b = 0;
    while b + 2 <= nb {
        block!(b, 0);
        block!(b + 1, 1);
        b += 2;
    }
    if b < nb {
        block!(b, 0);
    }

    for c in 0..C {
        let sum = hsum_ps(_mm256_add_ps(acc[c][0], acc[c][1]));
        out[c] = if T == Q4_1 {
            sum + (summs[c][0] + summs[c][1])
        } else {
            sum
        };
    }
}
