//! x86 versions of the activation quantizer and the quantized dot products:
//! AVX2 + FMA + F16C, and the same with AVX-512 VNNI's byte dot product on
//! 256-bit registers. Every function here gives bit for bit the result of
//! its plain counterpart in [`super::blocks`]; the tests hold them to that.
//!
//! Callers must have checked [`available`] (or [`vnni_available`]) before
//! calling anything else.

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

/// How many calls' worth of weight rows ahead a tile kernel prefetches.
const PREFETCH_GROUPS: usize = 2;

/// Weight rows per call of a tile kernel at most.
pub(super) const MAX_ROWS: usize = 4;

/// Activation rows per call of a tile kernel at most.
pub(super) const MAX_ACTS: usize = 4;

/// Results of one tile: `[weight row][activation row]`.
pub(super) type TileOut = [[f32; MAX_ACTS]; MAX_ROWS];

/// Defines a tile kernel: the dot products of `R` weight rows (blocks of
/// type `T`, `stride` bytes apart in `w`) with `C` activation rows of `nb`
/// blocks each, stored one after another in `acts`, into `out[r][c]`.
/// Each weight block is unpacked once for all `C` activation rows and
/// each activation block loaded once for all `R` weight rows.
///
/// Same results as [`super::blocks::dot_row`]: one 8-lane accumulator per
/// product, a fused multiply-add per block, the Q4_1 offset term summed per
/// block with a fused multiply-add.
macro_rules! tile_kernel {
    ($name:ident, $features:literal, $vnni:literal) => {
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $name<const T: u8, const R: usize, const C: usize>(
            w: &[u8],
            stride: usize,
            acts: &[BlockQ8],
            nb: usize,
            prefetch: bool,
            out: &mut TileOut,
        ) {
            let bytes = match T {
                Q4_0 => 18,
                Q4_1 => 20,
                _ => 34,
            };
            if R == 0 || R > MAX_ROWS || C > MAX_ACTS {
                return;
            }
            if nb * bytes > stride || w.len() < (R - 1) * stride + nb * bytes {
                return;
            }
            if acts.len() < nb * C {
                return;
            }
            let wp = w.as_ptr();
            let ap = acts.as_ptr();

            // Reading R rows side by side hides the stream from the
            // hardware prefetcher, so fetch the rows PREFETCH_GROUPS calls
            // ahead (the next rows of a matrix follow these) spread over
            // this call's blocks. Prefetches never fault, so running past
            // the end of the matrix is harmless.
            let group = R * stride;
            let ahead = wp.wrapping_add(group * PREFETCH_GROUPS);
            let lines = group.div_ceil(64);

            let ones = _mm256_set1_epi16(1);
            let low = _mm256_set1_epi8(0x0F);
            let mut acc = [[_mm256_setzero_ps(); C]; R];

            // Q4_1 offset terms: lane `2r + 1` of `mt[c]` sums row r's.
            let mut mt = [_mm256_setzero_ps(); C];

            for b in 0..nb {
                if prefetch {
                    for line in b * lines / nb..(b + 1) * lines / nb {
                        let p = ahead.wrapping_add(line * 64) as *const i8;
                        _mm_prefetch::<_MM_HINT_T0>(p);
                    }
                }

                // SAFETY: `b < nb` and `r < R`, so every weight block read
                // lies within `w` and activation block `c * nb + b` within
                // `acts` (checked above). All loads are unaligned.
                unsafe {
                    // Scales (and Q4_1 offsets) of the R weight blocks as
                    // lanes 2r (and 2r + 1): the first 4 bytes of a block.
                    let mut raw = [0i32; 4];
                    for r in 0..R {
                        let blk = wp.add(r * stride + b * bytes);
                        raw[r] = (blk as *const i32).read_unaligned();
                    }
                    let dm = _mm256_cvtph_ps(_mm_setr_epi32(raw[0], raw[1], raw[2], raw[3]));

                    let mut dx = [_mm256_setzero_ps(); C];
                    let mut x = [_mm256_setzero_si256(); C];
                    for c in 0..C {
                        let a = &*ap.add(c * nb + b);
                        dx[c] = _mm256_broadcast_ss(&a.d);
                        x[c] = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                        if T == Q4_1 {
                            mt[c] = _mm256_fmadd_ps(dm, _mm256_broadcast_ss(&a.s), mt[c]);
                        }
                    }

                    // VNNI multiplies unsigned by signed bytes without
                    // saturating: signed weights are offset to unsigned
                    // (Q8_0 by 128, Q4_0 by 8, i.e. left as stored) and the
                    // offset times each lane's activation sum taken off
                    // first, so the lanes stay exact.
                    let mut base = [_mm256_setzero_si256(); C];
                    if $vnni && T != Q4_1 {
                        let off = _mm256_set1_epi8(if T == Q8_0 { -128 } else { 8 });
                        for c in 0..C {
                            let sum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), off, x[c]);
                            base[c] = _mm256_sub_epi32(_mm256_setzero_si256(), sum);
                        }
                    }

                    for r in 0..R {
                        let blk = wp.add(r * stride + b * bytes);
                        let dw = _mm256_permutevar8x32_ps(dm, _mm256_set1_epi32(2 * r as i32));

                        // Weight bytes in element order: Q4 nibbles as
                        // 0..=15, Q8_0 as stored.
                        let wq = if T == Q8_0 {
                            _mm256_loadu_si256(blk.add(2) as *const __m256i)
                        } else {
                            let skip = if T == Q4_1 { 4 } else { 2 };
                            let nib = _mm_loadu_si128(blk.add(skip) as *const __m128i);
                            let both = _mm256_set_m128i(_mm_srli_epi16(nib, 4), nib);
                            _mm256_and_si256(both, low)
                        };

                        // Without VNNI: the byte multiply saturates pairs
                        // at i16, so signed weights multiply as magnitudes
                        // by sign-adjusted activations (|w| <= 128,
                        // |x| <= 127: pairs fit).
                        let (wu, ws) = if $vnni {
                            let flip = _mm256_set1_epi8(if T == Q8_0 { -128 } else { 0 });
                            (_mm256_xor_si256(wq, flip), wq)
                        } else if T == Q4_1 {
                            (wq, wq)
                        } else {
                            let ws = if T == Q4_0 {
                                _mm256_sub_epi8(wq, _mm256_set1_epi8(8))
                            } else {
                                wq
                            };
                            (_mm256_sign_epi8(ws, ws), ws)
                        };

                        for c in 0..C {
                            let lanes = if $vnni {
                                _mm256_dpbusd_epi32(base[c], wu, x[c])
                            } else if T == Q4_1 {
                                _mm256_madd_epi16(_mm256_maddubs_epi16(wu, x[c]), ones)
                            } else {
                                let xs = _mm256_sign_epi8(x[c], ws);
                                _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xs), ones)
                            };
                            let d = _mm256_mul_ps(dw, dx[c]);
                            acc[r][c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[r][c]);
                        }
                    }
                }
            }

            // Offsets of rows 0..4 from lanes 1, 3, 5, 7.
            for c in 0..C {
                let lo = _mm256_castps256_ps128(mt[c]);
                let hi = _mm256_extractf128_ps(mt[c], 1);
                let offs = _mm_shuffle_ps(lo, hi, 0b11_01_11_01);
                let mut offs_arr = [0.0f32; 4];
                // SAFETY: a 4-float store into a 4-float array.
                unsafe { _mm_storeu_ps(offs_arr.as_mut_ptr(), offs) };

                let mut sums = [0.0f32; 4];
                hsum_rows::<R, C>(&acc, c, &mut sums);
                for r in 0..R {
                    out[r][c] = if T == Q4_1 {
                        sums[r] + offs_arr[r]
                    } else {
                        sums[r]
                    };
                }
            }
        }
    };
}

tile_kernel!(tile_avx2, "avx2,fma,f16c", false);
tile_kernel!(tile_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", true);

/// Horizontal sums of `acc[r][c]` for every row r, in the order of
/// [`super::blocks::hsum8`]: adjacent pairs, then pairs of those, then the
/// two halves.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_rows<const R: usize, const C: usize>(acc: &[[__m256; C]; R], c: usize, out: &mut [f32; 4]) {
    let mut v = [_mm256_setzero_ps(); 4];
    for r in 0..R.min(4) {
        v[r] = acc[r][c];
    }
    let t0 = _mm256_hadd_ps(v[0], v[1]);
    let t1 = _mm256_hadd_ps(v[2], v[3]);
    let t = _mm256_hadd_ps(t0, t1);
    let sums = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    // SAFETY: a 4-float store into a 4-float array.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), sums) };
}

/// Which tile kernel [`dot_tile`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Flavor {
    Avx2,
    Vnni,
}

/// Dot products of `rows` weight rows (1 to 4; blocks of `ty`, `stride`
/// bytes apart in `w`) with `acts.len() / nb` activation rows (1 to 4) of
/// `nb` blocks each, into `out[r][c]`. Same results as
/// [`super::blocks::dot_row`]. With `prefetch`, also fetches the weight
/// rows that follow into cache (for the first of several calls on the same
/// rows).
///
/// # Safety
/// The CPU runs `flavor`: [`available`] for AVX2, [`vnni_available`] for
/// VNNI.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dot_tile(
    flavor: Flavor,
    ty: GgmlType,
    w: &[u8],
    stride: usize,
    rows: usize,
    acts: &[BlockQ8],
    nb: usize,
    prefetch: bool,
    out: &mut TileOut,
) {
    let cols = acts.len().checked_div(nb).unwrap_or(0);

    // One arm per (flavor, type, rows, acts): the tile shapes are constants
    // so accumulators stay in registers.
    macro_rules! by_shape {
        ($kernel:ident, $t:expr) => {
            match (rows, cols) {
                (1, 1) => $kernel::<{ $t }, 1, 1>(w, stride, acts, nb, prefetch, out),
                (1, 2) => $kernel::<{ $t }, 1, 2>(w, stride, acts, nb, prefetch, out),
                (1, 3) => $kernel::<{ $t }, 1, 3>(w, stride, acts, nb, prefetch, out),
                (1, 4) => $kernel::<{ $t }, 1, 4>(w, stride, acts, nb, prefetch, out),
                (2, 1) => $kernel::<{ $t }, 2, 1>(w, stride, acts, nb, prefetch, out),
                (2, 2) => $kernel::<{ $t }, 2, 2>(w, stride, acts, nb, prefetch, out),
                (2, 3) => $kernel::<{ $t }, 2, 3>(w, stride, acts, nb, prefetch, out),
                (2, 4) => $kernel::<{ $t }, 2, 4>(w, stride, acts, nb, prefetch, out),
                (3, 1) => $kernel::<{ $t }, 3, 1>(w, stride, acts, nb, prefetch, out),
                (3, 2) => $kernel::<{ $t }, 3, 2>(w, stride, acts, nb, prefetch, out),
                (3, 3) => $kernel::<{ $t }, 3, 3>(w, stride, acts, nb, prefetch, out),
                (3, 4) => $kernel::<{ $t }, 3, 4>(w, stride, acts, nb, prefetch, out),
                (4, 1) => $kernel::<{ $t }, 4, 1>(w, stride, acts, nb, prefetch, out),
                (4, 2) => $kernel::<{ $t }, 4, 2>(w, stride, acts, nb, prefetch, out),
                (4, 3) => $kernel::<{ $t }, 4, 3>(w, stride, acts, nb, prefetch, out),
                (4, 4) => $kernel::<{ $t }, 4, 4>(w, stride, acts, nb, prefetch, out),
                _ => {}
            }
        };
    }
    macro_rules! by_type {
        ($kernel:ident) => {
            match ty {
                GgmlType::Q4_0 => by_shape!($kernel, Q4_0),
                GgmlType::Q4_1 => by_shape!($kernel, Q4_1),
                GgmlType::Q8_0 => by_shape!($kernel, Q8_0),
                GgmlType::F32 | GgmlType::F16 => {}
            }
        };
    }

    // SAFETY: the caller checked the CPU for `flavor`.
    unsafe {
        match flavor {
            Flavor::Avx2 => by_type!(tile_avx2),
            Flavor::Vnni => by_type!(tile_vnni),
        }
    }
}
