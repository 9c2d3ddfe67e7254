//! Block formats and the matrix-times-activations kernel the forward pass
//! runs on.
//!
//! Owns the arithmetic on weights (GGML's Q4_0, Q4_1, Q8_0, F16 and F32) and
//! on quantized activations; knows nothing of the model's layout. Quantized
//! products follow llama.cpp: activations are quantized to 8 bits per call
//! and multiplied block by block in integers, so results match reference
//! vectors made with llama.cpp to within float rounding.
//!
//! Every product of one weight row with one activation row is computed in
//! a fixed order whatever the batch size, thread count or instruction set,
//! so a sequence gets bit-identical logits alone or in a batch.

mod blocks;

#[cfg(target_arch = "x86_64")]
mod avx2;

use std::cell::RefCell;
use std::sync::OnceLock;

use crate::pool::ThreadPool;
use crate::tensor::{GgmlType, Layout, QMatrix, TensorBytes};

pub use blocks::{GROUP, QK};

/// One block of 32 activations quantized to 8 bits, for products with
/// quantized weights: values `qs[j] * d`, and `s = d * sum(qs)` used by Q4_1
/// weights' offsets.
///
/// `d` and `s` are f32 holding values rounded to f16, as llama.cpp's Q8_0
/// and Q8_1 blocks store them; `sum` is `sum(qs)` exactly, for weights
/// that the kernels multiply offset by a constant.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub sum: i32,
    pub qs: [i8; QK],
}

/// A slice whose length does not fit the operation; the loader validates
/// model shapes, so this means a caller bug.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error(
        "{what} has {got} values where {want} are needed; check the shapes \
         passed to the kernel"
    )]
    Length {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error(
        "a {ty} row of {cols} elements is not a whole number of {block}-element \
         blocks"
    )]
    PartialBlock {
        ty: GgmlType,
        cols: usize,
        block: usize,
    },
}

fn check_len(what: &'static str, got: usize, want: usize) -> Result<(), KernelError> {
    if got == want {
        Ok(())
    } else {
        Err(KernelError::Length { what, got, want })
    }
}

/// Bytes of one row of `cols` elements of `ty`, or the error for a row that
/// ends inside a block.
fn row_bytes(ty: GgmlType, cols: usize) -> Result<usize, KernelError> {
    ty.row_bytes(cols).ok_or(KernelError::PartialBlock {
        ty,
        cols,
        block: ty.block_len(),
    })
}

/// Expands `bytes`, one row of `ty`, into `out.len()` floats.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    check_len("row bytes", bytes.len(), row_bytes(ty, out.len())?)?;
    let chunks = bytes.chunks_exact(ty.block_bytes());
    for (block, out) in chunks.zip(out.chunks_exact_mut(ty.block_len())) {
        blocks::dequantize_block(ty, block, out);
    }
    Ok(())
}

/// Expands row `r` of `w`, in either layout, into `out` (`w.cols` floats).
pub fn dequantize_matrix_row(w: &QMatrix, r: usize, out: &mut [f32]) -> Result<(), KernelError> {
    check_len("row", out.len(), w.cols)?;
    if r >= w.rows {
        return Err(KernelError::Length {
            what: "row index",
            got: r,
            want: w.rows,
        });
    }
    let stride = row_bytes(w.ty, w.cols)?;
    check_len("weight bytes", w.bytes.as_slice().len(), stored_bytes(w)?)?;
    let bytes = w.bytes.as_slice();
    match w.layout {
        Layout::Rows => dequantize_row(w.ty, &bytes[r * stride..(r + 1) * stride], out),
        Layout::Interleaved => {
            let column = GROUP * w.ty.block_bytes();
            let group = &bytes[r / GROUP * GROUP * stride..][..GROUP * stride];
            let mut block = [0u8; 34];
            let block = &mut block[..w.ty.block_bytes().min(34)];
            let outs = out.chunks_exact_mut(w.ty.block_len());
            for (column, out) in group.chunks_exact(column).zip(outs) {
                blocks::block_from_column(w.ty, column, r % GROUP, block);
                blocks::dequantize_block(w.ty, block, out);
            }
            Ok(())
        }
    }
}

/// Bytes `w` must hold for its type, shape and layout.
fn stored_bytes(w: &QMatrix) -> Result<usize, KernelError> {
    let stride = row_bytes(w.ty, w.cols)?;
    Ok(match w.layout {
        Layout::Rows => w.rows * stride,
        Layout::Interleaved => w.rows.next_multiple_of(GROUP) * stride,
    })
}

/// `w` with its rows interleaved in groups of [`GROUP`] for the kernels
/// (see [`crate::tensor::Layout::Interleaved`]): the same results from
/// [`matmul`], read as one contiguous stream per group. The bytes are a
/// new copy, as large as the original plus at most 7 rows of padding.
/// Matrices of plain floats, and those already interleaved, come back as
/// they are.
pub fn interleave(w: &QMatrix) -> Result<QMatrix, KernelError> {
    if w.ty.block_len() == 1 || w.layout == Layout::Interleaved {
        return Ok(w.clone());
    }
    let stride = row_bytes(w.ty, w.cols)?;
    check_len("weight bytes", w.bytes.as_slice().len(), w.rows * stride)?;
    let mut out = vec![0u8; w.rows.next_multiple_of(GROUP) * stride];
    if stride > 0 {
        for (g, dst) in out.chunks_exact_mut(GROUP * stride).enumerate() {
            interleave_group(w, g * GROUP, dst);
        }
    }
    Ok(QMatrix {
        layout: Layout::Interleaved,
        bytes: TensorBytes::Owned(out.into()),
        ..w.clone()
    })
}

/// Interleaves rows `r0..r0 + GROUP` of `w` (GGML's layout, shape
/// checked; rows past the end are zeros) into `out`.
fn interleave_group(w: &QMatrix, r0: usize, out: &mut [u8]) {
    let bytes = w.bytes.as_slice();
    let (block, stride) = (w.ty.block_bytes(), w.ty.block_bytes() * (w.cols / QK));
    for (b, column) in out.chunks_exact_mut(GROUP * block).enumerate() {
        let blocks: [Option<&[u8]>; GROUP] = std::array::from_fn(|i| {
            let at = (r0 + i) * stride + b * block;
            bytes.get(at..at + block).filter(|_| r0 + i < w.rows)
        });
        blocks::interleave_column(w.ty, &blocks, column);
    }
}

/// Quantizes `x` to Q4_0 bytes as GGML's reference quantizer does (for
/// building test weights).
pub fn quantize_row_q4_0(x: &[f32], out: &mut [u8]) -> Result<(), KernelError> {
    quantize_weights(GgmlType::Q4_0, x, out, blocks::quantize_block_q4_0)
}

/// Quantizes `x` to Q4_1 bytes as GGML's reference quantizer does.
pub fn quantize_row_q4_1(x: &[f32], out: &mut [u8]) -> Result<(), KernelError> {
    quantize_weights(GgmlType::Q4_1, x, out, blocks::quantize_block_q4_1)
}

/// Quantizes `x` to Q8_0 bytes as llama.cpp's x86 quantizer does (scale
/// `amax / 127`, values rounded half to even).
pub fn quantize_row_q8_0(x: &[f32], out: &mut [u8]) -> Result<(), KernelError> {
    quantize_weights(GgmlType::Q8_0, x, out, blocks::quantize_block_q8_0)
}

fn quantize_weights(
    ty: GgmlType,
    x: &[f32],
    out: &mut [u8],
    block: fn(&[f32], &mut [u8]),
) -> Result<(), KernelError> {
    check_len("quantized row bytes", out.len(), row_bytes(ty, x.len())?)?;
    let chunks = out.chunks_exact_mut(ty.block_bytes());
    for (x, out) in x.chunks_exact(QK).zip(chunks) {
        block(x, out);
    }
    Ok(())
}

/// Quantizes activations `x` into `x.len() / 32` blocks: the Q8_1 of
/// llama.cpp (the Q8_0 values and scale, plus `s`), used against every
/// quantized weight type.
pub fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ8]) -> Result<(), KernelError> {
    if !x.len().is_multiple_of(QK) {
        return Err(KernelError::PartialBlock {
            ty: GgmlType::Q8_0,
            cols: x.len(),
            block: QK,
        });
    }
    check_len("activation blocks", out.len(), x.len() / QK)?;
    quantize_act(Isa::detect(), x, out);
    Ok(())
}

/// The instruction set a kernel call runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 plus AVX-512 VNNI's byte dot product (on 256-bit registers).
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

/// Environment variable that caps the instruction set the kernels use, for
/// comparing them: `scalar`, `avx2` or `vnni`. Unset, or a set this CPU
/// lacks, means the best it has.
pub const ISA_ENV: &str = "SWITCHYARD_KERNEL_ISA";

impl Isa {
    /// The instruction set kernel calls use: the best this CPU supports,
    /// capped by [`ISA_ENV`]. Decided once per process.
    fn detect() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = Isa::best();
            let wanted = match std::env::var(ISA_ENV).as_deref() {
                Ok("scalar") => Isa::Scalar,
                #[cfg(target_arch = "x86_64")]
                Ok("avx2") => Isa::Avx2,
                _ => best,
            };
            let isa = if wanted.rank() <= best.rank() {
                wanted
            } else {
                best
            };
            tracing::debug!(isa = ?isa, "matrix kernels chose an instruction set");
            isa
        })
    }

    /// The fastest this CPU supports. Feature detection is cached by std.
    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if avx2::vnni_available() {
            return Isa::Vnni;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            return Isa::Avx2;
        }
        Isa::Scalar
    }

    /// Order of capability: each runs on any CPU that runs a higher one.
    fn rank(self) -> u8 {
        match self {
            Isa::Scalar => 0,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => 1,
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni => 2,
        }
    }
}

/// `x.len() == out.len() * 32`, checked by callers.
fn quantize_act(isa: Isa, x: &[f32], out: &mut [BlockQ8]) {
    match isa {
        Isa::Scalar => {
            for (x, out) in x.chunks_exact(QK).zip(out.iter_mut()) {
                *out = blocks::quantize_block_act(x);
            }
        }
        // SAFETY: both are only chosen after `avx2::available()`.
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx2 | Isa::Vnni => unsafe { avx2::quantize_act(x, out) },
    }
}

/// Multiplies `n` activation rows by the transpose of `w`: `x` holds `n`
/// rows of `w.cols` floats, and `out[i * w.rows + r]` becomes the dot
/// product of row `r` of `w` with row `i` of `x`. Rows of `w` are split
/// over the pool's threads.
///
/// Quantized weights take activations quantized to 8 bits (see
/// [`quantize_row_q8_1`]); F32 and F16 weights take them as they are.
/// Returns an error, touching nothing, when a length does not match.
pub fn matmul(
    pool: &ThreadPool,
    w: &QMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    matmul_on(Isa::detect(), pool, w, x, n, out)
}

fn matmul_on(
    isa: Isa,
    pool: &ThreadPool,
    w: &QMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    check_len("weight bytes", w.bytes.as_slice().len(), stored_bytes(w)?)?;
    check_len("activations", x.len(), n * w.cols)?;
    check_len("output", out.len(), n * w.rows)?;
    if n == 0 || w.rows == 0 {
        return Ok(());
    }

    // Empty rows: every product is an empty sum (and the loops below need
    // non-zero strides).
    if w.cols == 0 {
        out.fill(0.0);
        return Ok(());
    }

    match w.ty {
        GgmlType::F32 | GgmlType::F16 => matmul_float(pool, w, x, out),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            with_act_scratch(n * (w.cols / QK), |acts| {
                quantize_act(isa, x, acts);
                matmul_quant(isa, pool, w, acts, out);
            });
        }
    }
    Ok(())
}

thread_local! {
    /// Quantized activations of the current call, kept between calls so a
    /// decode step does not allocate.
    static ACT_SCRATCH: RefCell<Vec<BlockQ8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` scratch blocks, this thread's if free, else new ones.
fn with_act_scratch(len: usize, f: impl FnOnce(&mut [BlockQ8])) {
    let mut f = Some(f);
    let _ = ACT_SCRATCH.try_with(|cell| {
        if let Ok(mut scratch) = cell.try_borrow_mut() {
            if scratch.len() < len {
                scratch.resize(len, BlockQ8::default());
            }
            if let Some(f) = f.take() {
                f(&mut scratch[..len]);
            }
        }
    });
    if let Some(f) = f.take() {
        f(&mut vec![BlockQ8::default(); len]);
    }
}

/// Groups of [`GROUP`] weight rows per pool task: about four tasks per
/// thread, so a thread slowed by other load is covered by the rest, and at
/// least two groups so a task's overhead stays small.
fn groups_per_task(groups: usize, threads: usize) -> usize {
    if threads <= 1 {
        groups.max(1)
    } else {
        groups.div_ceil(threads * 4).max(2)
    }
}

/// Rows of a plain-float matrix per pool task, as [`groups_per_task`].
fn rows_per_task(rows: usize, threads: usize) -> usize {
    groups_per_task(rows.div_ceil(GROUP), threads) * GROUP
}

/// The output matrix, written by many tasks at once at distinct indices.
#[derive(Clone, Copy)]
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint elements (see `SharedOut::write`), and the
// slice outlives the pool job that uses it.
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn new(out: &mut [f32]) -> SharedOut {
        SharedOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// Stores `v` at `idx` (ignored if out of bounds).
    ///
    /// # Safety
    /// No other thread reads or writes `idx` during the job, and the slice
    /// given to `new` is not otherwise used until the job ends.
    #[allow(unsafe_code)]
    unsafe fn write(&self, idx: usize, v: f32) {
        if idx < self.len {
            // SAFETY: in bounds; exclusive per the caller's contract.
            unsafe { self.ptr.add(idx).write(v) }
        }
    }

    /// Stores `v` at `at..at + v.len()` (nothing if that runs past the
    /// end): one copy where a group's results are contiguous.
    ///
    /// # Safety
    /// As for [`SharedOut::write`], for every index of the run.
    #[allow(unsafe_code)]
    unsafe fn write_run(&self, at: usize, v: &[f32]) {
        if at.checked_add(v.len()).is_some_and(|end| end <= self.len) {
            // SAFETY: in bounds; exclusive per the caller's contract;
            // `v` is the caller's own array, not part of the output.
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.ptr.add(at), v.len()) }
        }
    }
}

/// Activation rows multiplied in one kernel call, at most.
const ACTS: usize = 8;

/// Results of one kernel call: `[activation row][weight row]`.
type GroupOut = [[f32; GROUP]; ACTS];

/// The quantized case of [`matmul`]: `acts` holds the rows of quantized
/// activations, `w.cols / 32` blocks each.
///
/// Weights are read one group of [`GROUP`] interleaved rows at a time,
/// against all activation rows, [`ACTS`] at a time, while the group is in
/// cache. A matrix in GGML's row layout is interleaved group by group as
/// it goes (slower; [`interleave`] does it once).
fn matmul_quant(isa: Isa, pool: &ThreadPool, w: &QMatrix, acts: &[BlockQ8], out: &mut [f32]) {
    let (rows, nb) = (w.rows, w.cols / QK);
    let group_bytes = GROUP * w.ty.block_bytes() * nb;
    let groups = rows.div_ceil(GROUP);
    let bytes = w.bytes.as_slice();
    let chunk = groups_per_task(groups, pool.threads());
    let out = SharedOut::new(out);

    let task = |t: usize| {
        let mut scratch = Vec::new();
        let mut res = [[0.0f32; GROUP]; ACTS];
        for g in t * chunk..((t + 1) * chunk).min(groups) {
            let group = match w.layout {
                Layout::Interleaved => match bytes.get(g * group_bytes..(g + 1) * group_bytes) {
                    Some(group) => group,
                    None => return,
                },
                Layout::Rows => {
                    scratch.resize(group_bytes, 0);
                    interleave_group(w, g * GROUP, &mut scratch);
                    &scratch[..]
                }
            };
            let r = g * GROUP;
            let nr = (rows - r).min(GROUP);
            for (k, tile) in acts.chunks(nb * ACTS).enumerate() {
                let nc = tile.len() / nb;
                dot_group(isa, w.ty, group, tile, nb, &mut res);
                for (c, res) in res.iter().enumerate().take(nc) {
                    // SAFETY: this task alone owns the rows of its groups
                    // in every output row, and `out` is not used until
                    // the job ends.
                    #[allow(unsafe_code)]
                    unsafe {
                        out.write_run((k * ACTS + c) * rows + r, &res[..nr]);
                    }
                }
            }
        }
    };
    pool.for_each(groups.div_ceil(chunk), &task);
}

/// Dot products of one interleaved group of 8 weight rows (`nb` block
/// columns in `w`) with the activation rows of `nb` blocks each stored one
/// after another in `acts` (at most [`ACTS`]), into `out[act][row]`.
#[inline]
fn dot_group(isa: Isa, ty: GgmlType, w: &[u8], acts: &[BlockQ8], nb: usize, out: &mut GroupOut) {
    match isa {
        Isa::Scalar => blocks::dot_group(ty, w, acts, nb, out),
        // SAFETY: `Isa::Avx2` is only chosen after `avx2::available()`.
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe { avx2::dot_group(avx2::Flavor::Avx2, ty, w, acts, nb, out) },
        // SAFETY: `Isa::Vnni` is only chosen after `avx2::vnni_available()`.
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Vnni => unsafe { avx2::dot_group(avx2::Flavor::Vnni, ty, w, acts, nb, out) },
    }
}

/// The F32 and F16 case of [`matmul`]: plain float dot products.
///
/// Limitation: one weight row is expanded to f32 at a time and the dot
/// product is left to the compiler's vectorizer; fine for the small float
/// matrices some models carry, several times slower than the quantized path
/// per weight byte.
fn matmul_float(pool: &ThreadPool, w: &QMatrix, x: &[f32], out: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    let stride = w.row_stride();
    let bytes = w.bytes.as_slice();
    let chunk = rows_per_task(rows, pool.threads());
    let out = SharedOut::new(out);

    let task = |t: usize| {
        let r0 = t * chunk;
        let r1 = (r0 + chunk).min(rows);
        let Some(rows_bytes) = bytes.get(r0 * stride..r1 * stride) else {
            return;
        };
        let mut wrow = vec![0.0f32; cols];
        for (r, row) in (r0..r1).zip(rows_bytes.chunks_exact(stride)) {
            if dequantize_row(w.ty, row, &mut wrow).is_err() {
                return;
            }
            for (i, xrow) in x.chunks_exact(cols).enumerate() {
                // SAFETY: as in `matmul_quant`.
                #[allow(unsafe_code)]
                unsafe {
                    out.write(i * rows + r, dot_f32(&wrow, xrow));
                }
            }
        }
    };
    pool.for_each(rows.div_ceil(chunk), &task);
}

/// Float dot product with 8 partial sums, which the compiler vectorizes.
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in a8.zip(b8) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    blocks::hsum8(acc) + tail
}

#[cfg(test)]
mod tests;
