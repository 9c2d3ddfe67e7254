//! x86 versions of the activation quantizer and the quantized dot products:
//! AVX2 + FMA + F16C, and the same with AVX-512 VNNI's byte dot product on
//! 256-bit registers. Every function here gives bit for bit the result of
//! its plain counterpart in [`super::blocks`]; the tests hold them to that.
//!
//! Callers must have checked [`available`] (or [`vnni_available`]) before
//! calling anything else.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::blocks::{q8_scales, round_f16, GROUP, QK};
use super::{BlockQ8, GroupOut, ACTS as MAX_ACTS};
use crate::tensor::GgmlType;

/// Whether this CPU runs the kernels in this module.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Whether this CPU also runs the VNNI kernels.
pub(super) fn vnni_available() -> bool {
    available() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
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
            ob.sum = sum;
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

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

/// How far ahead of the column being read a group kernel prefetches.
const PREFETCH_BYTES: usize = 1024;

/// Defines a group kernel: the dot products of the 8 weight rows of one
/// interleaved group (blocks of type `T`, `nb` block columns in `w`, see
/// [`super::blocks::interleave_column`]) with `C` activation rows of `nb`
/// blocks each, stored one after another in `acts`, into `out[c][r]`.
///
/// Lane r of every vector is weight row r. Per block column, the weights
/// are unpacked once into 8 vectors, vector k holding elements 4k..4k + 4
/// of every row; per activation row, 4-byte broadcasts of its elements
/// 4k..4k + 4 multiply them, so 8 integer dot steps leave each row's exact
/// block sum in its lane, and one conversion and one fused multiply-add
/// scale 8 results. Same results as [`super::blocks::dot_block`].
macro_rules! group_kernel {
    ($name:ident, $features:literal, $vnni:literal) => {
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $name<const T: u8, const C: usize>(
            w: &[u8],
            acts: &[BlockQ8],
            nb: usize,
            out: &mut GroupOut,
        ) {
            let (head, quants) = match T {
                Q4_0 => (2, 16),
                Q4_1 => (4, 16),
                _ => (2, 32),
            };
            let column = GROUP * (head + quants);
            if C == 0 || C > MAX_ACTS || w.len() < nb * column || acts.len() < nb * C {
                return;
            }
            let wp = w.as_ptr();
            let ap = acts.as_ptr();
            let low = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); C];

            for b in 0..nb {
                // SAFETY: `b < nb`, so the column's bytes lie within `w`
                // and activation block `c * nb + b` within `acts` (checked
                // above). All loads are unaligned.
                unsafe {
                    let col = wp.add(b * column);

                    // The group's stream, and the next group's after it,
                    // fetched PREFETCH_BYTES ahead: the computation on one
                    // column is long enough at larger batches that the
                    // hardware prefetcher falls behind. Prefetches never
                    // fault, so running past the end is harmless.
                    if PREFETCH_BYTES > 0 {
                        let ahead = col.wrapping_add(PREFETCH_BYTES);
                        for line in (0..column).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
                        }
                    }
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(col as *const __m128i));
                    let mw = if T == Q4_1 {
                        _mm256_cvtph_ps(_mm_loadu_si128(col.add(16) as *const __m128i))
                    } else {
                        _mm256_setzero_ps()
                    };

                    // Weight bytes: Q4 nibbles as 0..=15 (Q4_0's are its
                    // values plus 8), Q8_0 as stored.
                    let q = col.add(GROUP * head);
                    let mut wq = [_mm256_setzero_si256(); 8];
                    if T == Q8_0 {
                        for (k, wq) in wq.iter_mut().enumerate() {
                            *wq = _mm256_loadu_si256(q.add(32 * k) as *const __m256i);
                        }
                    } else {
                        for j in 0..4 {
                            let p = _mm256_loadu_si256(q.add(32 * j) as *const __m256i);
                            wq[j] = _mm256_and_si256(p, low);
                            wq[j + 4] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
                        }
                    }

                    // The byte products take unsigned weights. VNNI does
                    // not saturate: Q8_0 is offset by 128 and Q4_0 left 8
                    // above its values, the offset times the activations'
                    // sum taken off. AVX2's pairs saturate at i16, so Q8_0
                    // multiplies magnitudes by sign-adjusted activations
                    // (|w| <= 128, |x| <= 127: pairs fit).
                    let signs = wq;
                    if T == Q8_0 {
                        for wq in wq.iter_mut() {
                            *wq = if $vnni {
                                _mm256_xor_si256(*wq, _mm256_set1_epi8(-128))
                            } else {
                                _mm256_sign_epi8(*wq, *wq)
                            };
                        }
                    }

                    // AVX2 on Q4 weights: weights are 0..=15 and
                    // activations within +-128, so a byte pair's sum is
                    // within +-3840 and a block's 8 steps within +-30720.
                    // The steps then add up in 16 bits, exactly, and one
                    // widening per block does what one per step did: a
                    // third fewer instructions where batches make the
                    // kernel compute-bound. Same integers, same results.
                    if !$vnni && T != Q8_0 {
                        for (c, acc) in acc.iter_mut().enumerate() {
                            let a = &*ap.add(c * nb + b);
                            let x = a.qs.as_ptr() as *const i32;
                            let mut pairs = _mm256_setzero_si256();
                            for (k, wq) in wq.iter().enumerate() {
                                let xk = _mm256_set1_epi32(x.add(k).read_unaligned());
                                let p = _mm256_maddubs_epi16(*wq, xk);
                                pairs = _mm256_add_epi16(pairs, p);
                            }
                            let bias = if T == Q4_0 { -8 * a.sum } else { 0 };
                            let isum = _mm256_add_epi32(
                                _mm256_madd_epi16(pairs, ones),
                                _mm256_set1_epi32(bias),
                            );
                            let d = _mm256_mul_ps(dw, _mm256_set1_ps(a.d));
                            *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), *acc);
                            if T == Q4_1 {
                                *acc = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s), *acc);
                            }
                        }
                        continue;
                    }

                    // Integer sums, step k of every activation row before
                    // step k + 1, so consecutive dot steps are independent.
                    let mut isum = [_mm256_setzero_si256(); C];
                    for (c, isum) in isum.iter_mut().enumerate() {
                        let a = &*ap.add(c * nb + b);
                        let bias = match T {
                            Q4_0 => -8 * a.sum,
                            Q8_0 if $vnni => -128 * a.sum,
                            _ => 0,
                        };
                        *isum = _mm256_set1_epi32(bias);
                    }
                    for k in 0..8 {
                        for (c, isum) in isum.iter_mut().enumerate() {
                            let a = &*ap.add(c * nb + b);
                            let x = a.qs.as_ptr() as *const i32;
                            let xk = _mm256_set1_epi32(x.add(k).read_unaligned());
                            *isum = if $vnni {
                                _mm256_dpbusd_epi32(*isum, wq[k], xk)
                            } else {
                                let xs = if T == Q8_0 {
                                    _mm256_sign_epi8(xk, signs[k])
                                } else {
                                    xk
                                };
                                let pairs = _mm256_maddubs_epi16(wq[k], xs);
                                _mm256_add_epi32(*isum, _mm256_madd_epi16(pairs, ones))
                            };
                        }
                    }

                    for (c, (acc, isum)) in acc.iter_mut().zip(isum).enumerate() {
                        let a = &*ap.add(c * nb + b);
                        let d = _mm256_mul_ps(dw, _mm256_set1_ps(a.d));
                        *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), *acc);
                        if T == Q4_1 {
                            *acc = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s), *acc);
                        }
                    }
                }
            }

            for (out, acc) in out.iter_mut().zip(acc) {
                // SAFETY: an 8-float store into an 8-float array.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc) };
            }
        }
    };
}

group_kernel!(group_avx2, "avx2,fma,f16c", false);
group_kernel!(group_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", true);

/// Which group kernel [`dot_group`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Flavor {
    Avx2,
    Vnni,
}

/// Dot products of the 8 rows of one interleaved group of `ty` (`nb`
/// block columns in `w`) with `acts.len() / nb` activation rows (1 to
/// [`MAX_ACTS`]) of `nb` blocks each, into `out[act][row]`. Same results
/// as [`super::blocks::dot_group`].
///
/// # Safety
/// The CPU runs `flavor`: [`available`] for AVX2, [`vnni_available`] for
/// VNNI.
pub(super) unsafe fn dot_group(
    flavor: Flavor,
    ty: GgmlType,
    w: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    out: &mut GroupOut,
) {
    let cols = acts.len().checked_div(nb).unwrap_or(0);

    // One arm per (flavor, type, acts): the tile shapes are constants so
    // accumulators stay in registers.
    macro_rules! by_acts {
        ($kernel:ident, $t:expr) => {
            match cols {
                1 => $kernel::<{ $t }, 1>(w, acts, nb, out),
                2 => $kernel::<{ $t }, 2>(w, acts, nb, out),
                3 => $kernel::<{ $t }, 3>(w, acts, nb, out),
                4 => $kernel::<{ $t }, 4>(w, acts, nb, out),
                5 => $kernel::<{ $t }, 5>(w, acts, nb, out),
                6 => $kernel::<{ $t }, 6>(w, acts, nb, out),
                7 => $kernel::<{ $t }, 7>(w, acts, nb, out),
                8 => $kernel::<{ $t }, 8>(w, acts, nb, out),
                _ => {}
            }
        };
    }
    macro_rules! by_type {
        ($kernel:ident) => {
            match ty {
                GgmlType::Q4_0 => by_acts!($kernel, Q4_0),
                GgmlType::Q4_1 => by_acts!($kernel, Q4_1),
                GgmlType::Q8_0 => by_acts!($kernel, Q8_0),
                GgmlType::F32 | GgmlType::F16 => {}
            }
        };
    }

    // SAFETY: the caller checked the CPU for `flavor`.
    unsafe {
        match flavor {
            Flavor::Avx2 => by_type!(group_avx2),
            Flavor::Vnni => by_type!(group_vnni),
        }
    }
}
