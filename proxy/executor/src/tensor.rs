//! Tensor element types as GGUF numbers them, and the bytes of one tensor.
//!
//! Shared by the file reader ([`crate::gguf`]) and the kernels
//! ([`crate::quant`]); owns no arithmetic.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// The element types the executor computes with. Other GGUF types are
/// rejected by name when a file is opened (see [`ggml_type_name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl GgmlType {
    /// The type with GGUF's numeric id, or `None` for one we do not run.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        match id {
            0 => Some(GgmlType::F32),
            1 => Some(GgmlType::F16),
            2 => Some(GgmlType::Q4_0),
            3 => Some(GgmlType::Q4_1),
            8 => Some(GgmlType::Q8_0),
            _ => None,
        }
    }

    /// Elements per block (1 for plain floats).
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 => 2,
            // f16 scale + 16 bytes of nibbles
            GgmlType::Q4_0 => 18,
            // f16 scale + f16 minimum + 16 bytes of nibbles
            GgmlType::Q4_1 => 20,
            // f16 scale + 32 signed bytes
            GgmlType::Q8_0 => 34,
        }
    }

    /// Bytes taken by a row of `len` elements, or `None` when `len` is not a
    /// whole number of blocks.
    pub fn row_bytes(self, len: usize) -> Option<usize> {
        if !len.is_multiple_of(self.block_len()) {
            return None;
        }
        Some(len / self.block_len() * self.block_bytes())
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// GGUF's name for any type id, supported or not, for error messages.
pub fn ggml_type_name(id: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// Where a tensor's bytes live: in the memory-mapped model file, or in memory
/// (synthetic tensors in tests, weights converted at load).
#[derive(Clone)]
pub enum TensorBytes {
    Mapped(Arc<memmap2::Mmap>, Range<usize>),
    Owned(Arc<[u8]>),
}

impl TensorBytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            // The range was checked against the map's length when the file
            // was opened.
            TensorBytes::Mapped(map, range) => &map[range.clone()],
            TensorBytes::Owned(bytes) => bytes,
        }
    }

    /// Lets the OS take back the resident pages of the file that lie wholly
    /// inside a mapped tensor, for a tensor whose bytes have been copied:
    /// later reads fault them back in from the file. Owned bytes are left
    /// alone. Best effort: a refusal (an unusual page size, say) is
    /// ignored, costing only memory.
    pub fn release_pages(&self) {
        const PAGE: usize = 4096;
        let TensorBytes::Mapped(map, range) = self else {
            return;
        };
        let (start, end) = (range.start.next_multiple_of(PAGE), range.end / PAGE * PAGE);
        if end > start {
            // SAFETY: the map is read-only (`Mmap`, never `MmapMut`), so
            // dropping its pages loses nothing: the next read of them
            // loads the file's bytes again.
            #[allow(unsafe_code)]
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

impl fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            TensorBytes::Mapped(..) => "mapped",
            TensorBytes::Owned(..) => "owned",
        };
        write!(f, "TensorBytes({kind}, {} bytes)", self.as_slice().len())
    }
}

/// How the blocks of a matrix are ordered in its bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// GGML's: row after row, each row's blocks in order.
    #[default]
    Rows,
    /// Groups of 8 rows, the last one padded with zero rows; within a
    /// group, block column after block column, the 8 rows' blocks of one
    /// column interleaved so the kernels read them as one stream. Built by
    /// [`crate::quant::interleave`], which documents the byte order.
    Interleaved,
}

/// A matrix of `rows` rows of `cols` elements each, in one [`GgmlType`],
/// its blocks ordered as `layout` says. In GGUF terms `cols` is `ne[0]` and
/// `rows` is `ne[1]`.
#[derive(Clone, Debug)]
pub struct QMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub layout: Layout,
    pub bytes: TensorBytes,
}

impl QMatrix {
    /// The bytes of row `r` in GGML's layout, or `None` when `r >= rows`
    /// or the rows are interleaved (see
    /// [`crate::quant::dequantize_matrix_row`], which reads either layout).
    pub fn row(&self, r: usize) -> Option<&[u8]> {
        if self.layout != Layout::Rows {
            return None;
        }
        let stride = self.row_stride();
        self.bytes.as_slice().get(r * stride..(r + 1) * stride)
    }

    /// Bytes per row.
    pub fn row_stride(&self) -> usize {
        self.ty.row_bytes(self.cols).unwrap_or(0)
    }
}
