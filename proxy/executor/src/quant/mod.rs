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
use crate::tensor::{GgmlType, QMatrix};

pub use blocks::QK;

/// One block of 32 activations quantized to 8 bits, for products with
/// quantized weights: values `qs[j] * d`, and `s = d * sum(qs)` used by Q4_1
/// weights' offsets.
///
/// `d` and `s` are f32 holding values rounded to f16, as llama.cpp's Q8_0
/// and Q8_1 blocks store them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
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
    let stride = row_bytes(w.ty, w.cols)?;
    check_len("weight bytes", w.bytes.as_slice().len(), w.rows * stride)?;
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

/// Rows of the weight matrix per pool task: about four tasks per thread, so
/// a thread slowed by other load is covered by the rest, at least 16 rows so
/// a task's overhead stays small, and a multiple of [`ROWS`].
fn rows_per_task(rows: usize, threads: usize) -> usize {
    let per = if threads <= 1 {
        rows
    } else {
        rows.div_ceil(threads * 4).max(16)
    };
    per.next_multiple_of(ROWS).max(ROWS)
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
}

/// Weight rows and activation rows multiplied in one kernel call, at most.
const ROWS: usize = 4;
const ACTS: usize = 4;

/// Results of one kernel call: `[weight row][activation row]`.
type TileOut = [[f32; ACTS]; ROWS];

/// The quantized case of [`matmul`]: `acts` holds the rows of quantized
/// activations, `w.cols / 32` blocks each.
fn matmul_quant(isa: Isa, pool: &ThreadPool, w: &QMatrix, acts: &[BlockQ8], out: &mut [f32]) {
    let (rows, nb) = (w.rows, w.cols / QK);
    let stride = w.ty.block_bytes() * nb;
    let bytes = w.bytes.as_slice();
    let chunk = rows_per_task(rows, pool.threads());
    let out = SharedOut::new(out);

    let task = |t: usize| {
        let r0 = t * chunk;
        let r1 = (r0 + chunk).min(rows);

        // Up to 4 weight rows against all activation rows, 4 at a time,
        // while the weight rows are in L1.
        let mut res = [[0.0f32; ACTS]; ROWS];
        for r in (r0..r1).step_by(ROWS) {
            let nr = (r1 - r).min(ROWS);
            let Some(wrows) = bytes.get(r * stride..(r + nr) * stride) else {
                return;
            };
            for (t, tile) in acts.chunks(nb * ACTS).enumerate() {
                let nc = tile.len() / nb;
                let first = t == 0;
                dot_tile(isa, w.ty, wrows, stride, nr, tile, nb, first, &mut res);
                for (i, res) in res.iter().enumerate().take(nr) {
                    for (c, &v) in res.iter().enumerate().take(nc) {
                        // SAFETY: this task alone owns rows `r0..r1` of
                        // every output row, and `out` is not used until
                        // the job ends.
                        #[allow(unsafe_code)]
                        unsafe {
                            out.write((t * ACTS + c) * rows + r + i, v);
                        }
                    }
                }
            }
        }
    };
    pool.for_each(rows.div_ceil(chunk), &task);
}

/// Dot products of `nr` weight rows (`stride` bytes apart in `w`) with the
/// activation rows of `nb` blocks each stored one after another in `acts`
/// (at most [`ROWS`] and [`ACTS`]), into `out[row][act]`; `prefetch` asks
/// for the following weight rows to be fetched into cache.
#[inline]
#[allow(clippy::too_many_arguments)]
fn dot_tile(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    stride: usize,
    nr: usize,
    acts: &[BlockQ8],
    nb: usize,
    prefetch: bool,
    out: &mut TileOut,
) {
    match isa {
        Isa::Scalar => {
            for (r, out) in out.iter_mut().enumerate().take(nr) {
                let Some(row) = w.get(r * stride..(r + 1) * stride) else {
                    return;
                };
                for (o, a) in out.iter_mut().zip(acts.chunks_exact(nb)) {
                    *o = blocks::dot_row(ty, row, a);
                }
            }
        }
        // SAFETY: `Isa::Avx2` is only chosen after `avx2::available()`.
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe {
            let flavor = avx2::Flavor::Avx2;
            avx2::dot_tile(flavor, ty, w, stride, nr, acts, nb, prefetch, out)
        },
        // SAFETY: `Isa::Vnni` is only chosen after `avx2::vnni_available()`.
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Vnni => unsafe {
            let flavor = avx2::Flavor::Vnni;
            avx2::dot_tile(flavor, ty, w, stride, nr, acts, nb, prefetch, out)
        },
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
