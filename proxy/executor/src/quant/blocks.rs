//! GGML's block formats: byte layouts, quantizers and dequantizers, in plain
//! Rust. The SIMD versions in [`super::avx2`] must agree with these bit for
//! bit.
//!
//! Layouts (little-endian), 32 elements per block:
//! - Q4_0: f16 `d`, 16 bytes; element `j` is the low nibble of byte `j`,
//!   element `j + 16` its high nibble; value `(q - 8) * d`.
//! - Q4_1: f16 `d`, f16 `m`, 16 bytes as Q4_0; value `q * d + m`.
//! - Q8_0: f16 `d`, 32 signed bytes; value `q * d`.

use half::f16;

use super::BlockQ8;
use crate::tensor::GgmlType;

/// Elements per quantized block.
pub const QK: usize = 32;

/// Reads the little-endian f16 at `bytes[at..at + 2]` as f32.
#[inline]
pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    match bytes.get(at..at + 2) {
        Some(&[lo, hi]) => f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32(),
        _ => 0.0,
    }
}

/// Rounds an f32 to the nearest f16 and back, as storing a scale in f16 does.
#[inline]
pub(super) fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Writes `x` as a little-endian f16 into `out[0..2]`.
fn put_f16(out: &mut [u8], x: f32) {
    let bits = f16::from_f32(x).to_bits().to_le_bytes();
    out[..2].copy_from_slice(&bits);
}

/// Expands one block of `ty` into 32 (or 1, for plain floats) values.
/// `block.len()` is `ty.block_bytes()` and `out.len()` is `ty.block_len()`.
pub(super) fn dequantize_block(ty: GgmlType, block: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            out[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        }
        GgmlType::F16 => out[0] = f16_at(block, 0),
        GgmlType::Q4_0 => {
            let d = f16_at(block, 0);
            for (j, &byte) in block[2..18].iter().enumerate() {
                out[j] = ((byte & 0x0F) as i32 - 8) as f32 * d;
                out[j + 16] = ((byte >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let d = f16_at(block, 0);
            let m = f16_at(block, 2);
            for (j, &byte) in block[4..20].iter().enumerate() {
                out[j] = (byte & 0x0F) as f32 * d + m;
                out[j + 16] = (byte >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(block, 0);
            for (o, &q) in out.iter_mut().zip(&block[2..34]) {
                *o = q as i8 as f32 * d;
            }
        }
    }
}

/// Q4_0 of one block, as GGML's reference quantizer does it: the scale maps
/// the element of largest magnitude to -8.
pub(super) fn quantize_block_q4_0(x: &[f32], out: &mut [u8]) {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, d);

    // Truncation after adding 8.5 rounds to nearest, as GGML does.
    for j in 0..QK / 2 {
        let lo = ((x[j] * id + 8.5) as u8).min(15);
        let hi = ((x[j + 16] * id + 8.5) as u8).min(15);
        out[2 + j] = lo | (hi << 4);
    }
}

/// Q4_1 of one block, as GGML's reference quantizer does it: 16 steps from
/// the block's minimum to its maximum.
pub(super) fn quantize_block_q4_1(x: &[f32], out: &mut [u8]) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, d);
    put_f16(&mut out[2..], min);

    for j in 0..QK / 2 {
        let lo = (((x[j] - min) * id + 0.5) as u8).min(15);
        let hi = (((x[j + 16] - min) * id + 0.5) as u8).min(15);
        out[4 + j] = lo | (hi << 4);
    }
}

/// The 8-bit quantization of one block shared by Q8_0 and the activation
/// blocks: the scale before rounding to f16, the values, and their sum.
///
/// As llama.cpp's x86 quantizer: `q = round_half_even(x * 127 / amax)`.
pub(super) fn quantize_block_q8(x: &[f32]) -> (f32, [i8; QK], i32) {
    let amax = x.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    let (d, id) = q8_scales(amax);
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        let r = (v * id).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
    }
    (d, qs, sum)
}

/// The scale and its inverse for a block whose largest magnitude is `amax`.
/// The inverse is 0 where it would be infinite (an all-zero block, or one so
/// small that its scale rounds to 0 in f16), which keeps every value finite.
#[inline]
pub(super) fn q8_scales(amax: f32) -> (f32, f32) {
    let id = 127.0 / amax;
    (amax / 127.0, if id.is_finite() { id } else { 0.0 })
}

/// Q8_0 of one block into GGML's 34-byte layout.
pub(super) fn quantize_block_q8_0(x: &[f32], out: &mut [u8]) {
    let (d, qs, _) = quantize_block_q8(x);
    put_f16(out, d);
    for (o, q) in out[2..34].iter_mut().zip(qs) {
        *o = q as u8;
    }
}

/// An activation block from 32 values: scale and `s` rounded through f16
/// as llama.cpp stores them, so dot products match its results.
pub(super) fn quantize_block_act(x: &[f32]) -> BlockQ8 {
    let (d, qs, sum) = quantize_block_q8(x);
    BlockQ8 {
        d: round_f16(d),
        s: round_f16(d * sum as f32),
        sum,
        qs,
    }
}

/// The integer values of one weight block, in element order, and its scale
/// and offset (`m` is 0 except for Q4_1). Q4_0 values are already shifted
/// to -8..=7.
pub(super) fn weight_block_ints(ty: GgmlType, block: &[u8]) -> ([i8; QK], f32, f32) {
    let mut q = [0i8; QK];
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (skip, shift) = if ty == GgmlType::Q4_0 { (2, 8) } else { (4, 0) };
            for (j, &byte) in block[skip..skip + 16].iter().enumerate() {
                q[j] = (byte & 0x0F) as i8 - shift;
                q[j + 16] = (byte >> 4) as i8 - shift;
            }
            let m = if ty == GgmlType::Q4_1 {
                f16_at(block, 2)
            } else {
                0.0
            };
            (q, f16_at(block, 0), m)
        }
        GgmlType::Q8_0 => {
            for (o, &b) in q.iter_mut().zip(&block[2..34]) {
                *o = b as i8;
            }
            (q, f16_at(block, 0), 0.0)
        }
        GgmlType::F32 | GgmlType::F16 => (q, 0.0, 0.0),
    }
}

/// Horizontal sum of 8 lanes: adjacent pairs, pairs of those, then the two
/// halves.
#[inline]
pub(super) fn hsum8(v: [f32; 8]) -> f32 {
    ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))
}

/// One block's step of the dot product of a weight row of quantized `ty`
/// with an activation row, in the arithmetic every kernel uses:
///
/// - the exact integer sum of the block's 32 products;
/// - that sum, as f32 (exact: it is below 2^24), times `d_w * d_x` (one
///   f32 product), fused-added into a single f32 accumulator;
/// - for Q4_1, then `m * s` fused-added into the same accumulator.
///
/// The product of a row is `acc` after its last block, starting from 0.
#[inline]
pub(super) fn dot_block(ty: GgmlType, block: &[u8], a: &BlockQ8, acc: f32) -> f32 {
    let (q, dw, m) = weight_block_ints(ty, block);
    let isum: i32 = q
        .iter()
        .zip(&a.qs)
        .map(|(&w, &x)| w as i32 * x as i32)
        .sum();
    let acc = (dw * a.d).mul_add(isum as f32, acc);
    if ty == GgmlType::Q4_1 {
        m.mul_add(a.s, acc)
    } else {
        acc
    }
}

/// Rows per group of the interleaved layout.
pub const GROUP: usize = 8;

/// Bytes at the start of a block before its quantized values (the f16
/// scale, and for Q4_1 the f16 minimum), and bytes of quantized values.
fn block_parts(ty: GgmlType) -> (usize, usize) {
    match ty {
        GgmlType::Q4_0 => (2, 16),
        GgmlType::Q4_1 => (4, 16),
        GgmlType::Q8_0 => (2, 32),
        GgmlType::F32 | GgmlType::F16 => (0, ty.block_bytes()),
    }
}

/// Interleaves one block column of a group: `blocks[r]` is row r's block
/// (GGML's layout, `ty.block_bytes()` long, or `None` for a padding row),
/// `out` the group's `GROUP * ty.block_bytes()` bytes for that column.
///
/// Order: each f16 header field of rows 0..8 side by side (scales, then
/// Q4_1's minimums), then the quantized bytes in 4-byte pieces: piece j of
/// rows 0..8, for j in order. A 32-byte load of piece j holds, for every
/// row, elements 4j..4j + 4 (Q8_0), or 4j..4j + 4 in low nibbles and
/// 16 + 4j.. in high ones (Q4).
pub(super) fn interleave_column(ty: GgmlType, blocks: &[Option<&[u8]>; GROUP], out: &mut [u8]) {
    let (head, quants) = block_parts(ty);
    for (r, block) in blocks.iter().enumerate() {
        let Some(block) = block else {
            for f in 0..head / 2 {
                out[f * 2 * GROUP + 2 * r..][..2].fill(0);
            }
            for j in 0..quants / 4 {
                out[head * GROUP + j * 4 * GROUP + 4 * r..][..4].fill(0);
            }
            continue;
        };
        for f in 0..head / 2 {
            out[f * 2 * GROUP + 2 * r..][..2].copy_from_slice(&block[2 * f..2 * f + 2]);
        }
        for j in 0..quants / 4 {
            let at = head * GROUP + j * 4 * GROUP + 4 * r;
            out[at..at + 4].copy_from_slice(&block[head + 4 * j..head + 4 * j + 4]);
        }
    }
}

/// Row `r`'s block (GGML's layout) from one interleaved block column
/// `column` (see [`interleave_column`]), into `out`.
pub(super) fn block_from_column(ty: GgmlType, column: &[u8], r: usize, out: &mut [u8]) {
    let (head, quants) = block_parts(ty);
    for f in 0..head / 2 {
        out[2 * f..2 * f + 2].copy_from_slice(&column[f * 2 * GROUP + 2 * r..][..2]);
    }
    for j in 0..quants / 4 {
        let at = head * GROUP + j * 4 * GROUP + 4 * r;
        out[head + 4 * j..head + 4 * j + 4].copy_from_slice(&column[at..at + 4]);
    }
}

/// Dot products of the 8 rows of one interleaved group (`nb` block
/// columns in `group`) with the activation rows in `acts` (`nb` blocks
/// each, at most `out.len()`), into `out[act][row]`; see [`dot_block`].
pub(super) fn dot_group(
    ty: GgmlType,
    group: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    out: &mut [[f32; GROUP]],
) {
    let col_bytes = GROUP * ty.block_bytes();
    let mut block = [0u8; 34];
    let block = &mut block[..ty.block_bytes().min(34)];
    for (out, acts) in out.iter_mut().zip(acts.chunks_exact(nb)) {
        for (r, o) in out.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for (column, a) in group.chunks_exact(col_bytes).zip(acts) {
                block_from_column(ty, column, r, block);
                acc = dot_block(ty, block, a, acc);
            }
            *o = acc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn q4_0_block_dequantizes_low_nibbles_then_high() {
        let mut block = vec![0u8; 18];
        block[..2].copy_from_slice(&f16_bytes(0.5));
        for j in 0..16 {
            // low nibble j, high nibble 15 - j
            block[2 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let mut out = [0.0f32; 32];
        dequantize_block(GgmlType::Q4_0, &block, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(out[j + 16], (7.0 - j as f32) * 0.5);
        }
    }

    #[test]
    fn q4_1_block_adds_the_minimum() {
        let mut block = vec![0u8; 20];
        block[..2].copy_from_slice(&f16_bytes(0.25));
        block[2..4].copy_from_slice(&f16_bytes(-1.5));
        block[4] = 0x3A; // element 0 = 10, element 16 = 3
        block[19] = 0xF0; // element 15 = 0, element 31 = 15
        let mut out = [0.0f32; 32];
        dequantize_block(GgmlType::Q4_1, &block, &mut out);
        assert_eq!(out[0], 10.0 * 0.25 - 1.5);
        assert_eq!(out[16], 3.0 * 0.25 - 1.5);
        assert_eq!(out[15], -1.5);
        assert_eq!(out[31], 15.0 * 0.25 - 1.5);
        assert_eq!(out[1], -1.5);
    }

    #[test]
    fn q8_0_block_reads_signed_bytes() {
        let mut block = vec![0u8; 34];
        block[..2].copy_from_slice(&f16_bytes(2.0));
        block[2] = (-128i8) as u8;
        block[3] = 127;
        block[33] = (-1i8) as u8;
        let mut out = [0.0f32; 32];
        dequantize_block(GgmlType::Q8_0, &block, &mut out);
        assert_eq!(out[0], -256.0);
        assert_eq!(out[1], 254.0);
        assert_eq!(out[2], 0.0);
        assert_eq!(out[31], -2.0);
    }

    #[test]
    fn q8_rounds_half_to_even_and_maps_amax_to_127() {
        let mut x = [0.0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -3.5;
        x[3] = -127.0;
        let (d, qs, sum) = quantize_block_q8(&x);
        assert_eq!(d, 1.0);
        assert_eq!(&qs[..4], &[127, 2, -4, -127]);
        assert_eq!(sum, -2);
    }

    #[test]
    fn all_zero_block_quantizes_to_zero() {
        let x = [0.0f32; 32];
        let a = quantize_block_act(&x);
        assert_eq!((a.d, a.s), (0.0, 0.0));
        assert!(a.qs.iter().all(|&q| q == 0));
        let mut out = [0xFFu8; 20];
        quantize_block_q4_1(&x, &mut out);
        assert!(out.iter().all(|&b| b == 0));
    }
}
