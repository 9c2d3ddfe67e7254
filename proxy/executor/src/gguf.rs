//! Reads GGUF model files (versions 2 and 3): the header, the metadata, the
//! tensor table, and the tensors' bytes straight from a memory map.
//!
//! Everything in the file is checked when it is opened, so that accessors
//! afterwards only look things up: counts are bounded by the file's length
//! before anything is allocated, every tensor's type must be one the
//! executor runs ([`GgmlType`]), and every tensor's bytes must lie inside
//! the file. Malformed input gives a [`GgufError`], never a panic.
//!
//! This module owns no arithmetic and knows nothing of model architectures:
//! it hands out [`QMatrix`] views and `f32` vectors by tensor name.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::tensor::{ggml_type_name, GgmlType, Layout, QMatrix, TensorBytes};

/// The four bytes every GGUF file starts with.
const MAGIC: &[u8; 4] = b"GGUF";

/// Alignment of the data section and of tensor offsets when the file does
/// not set `general.alignment`. In bytes.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml's limit on a tensor's dimensions.
const MAX_DIMS: usize = 4;

/// How deep arrays of arrays may nest. Real files use one level; the limit
/// keeps a hostile file from exhausting the stack.
const MAX_ARRAY_DEPTH: usize = 8;

const SUPPORTED_TYPES: &str = "F32, F16, Q4_0, Q4_1, Q8_0";

const V1_HINT: &str = "version 1 predates 64-bit counts: convert the model \
                       again with a current llama.cpp";

/// Why a GGUF file could not be opened or a value could not be read from it.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "{path} is not a GGUF file (it starts with {found:?}, not \"GGUF\"); \
         point the executor at a .gguf model file"
    )]
    BadMagic { path: PathBuf, found: String },

    #[error(
        "{path} is GGUF version {version}, which this executor does not \
         read; {hint}"
    )]
    UnsupportedVersion {
        path: PathBuf,
        version: u32,
        hint: &'static str,
    },

    #[error(
        "{path} ends inside {what} (byte {offset} of {len}); the file is \
         truncated: download or convert it again"
    )]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        len: u64,
    },

    #[error("{path} is malformed: {detail}")]
    Malformed { path: PathBuf, detail: String },

    #[error(
        "tensor {tensor} has type {type_name}, which this executor does not \
         run; supported: {SUPPORTED_TYPES}"
    )]
    UnsupportedType { tensor: String, type_name: String },

    #[error("metadata key {key} is missing from the model file")]
    MissingKey { key: String },

    #[error("metadata key {key} is {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },

    #[error("tensor {name} is missing from the model file")]
    MissingTensor { name: String },

    #[error("tensor {name} has shape {dims:?} and type {ty}; expected {expected}")]
    WrongShape {
        name: String,
        dims: Vec<u64>,
        ty: GgmlType,
        expected: &'static str,
    },
}

/// The type of a metadata value as GGUF numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    Str,
    Array,
    U64,
    I64,
    F64,
}

impl MetaType {
    fn from_id(id: u32) -> Option<MetaType> {
        Some(match id {
            0 => MetaType::U8,
            1 => MetaType::I8,
            2 => MetaType::U16,
            3 => MetaType::I16,
            4 => MetaType::U32,
            5 => MetaType::I32,
            6 => MetaType::F32,
            7 => MetaType::Bool,
            8 => MetaType::Str,
            9 => MetaType::Array,
            10 => MetaType::U64,
            11 => MetaType::I64,
            12 => MetaType::F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type takes in the file: an
    /// array's element count is checked against it before allocating.
    fn min_size(self) -> u64 {
        match self {
            MetaType::U8 | MetaType::I8 | MetaType::Bool => 1,
            MetaType::U16 | MetaType::I16 => 2,
            MetaType::U32 | MetaType::I32 | MetaType::F32 => 4,
            MetaType::U64 | MetaType::I64 | MetaType::F64 => 8,
            // A length prefix.
            MetaType::Str => 8,
            // An element type and a count.
            MetaType::Array => 12,
        }
    }

    /// GGUF's number for the type.
    pub fn id(self) -> u32 {
        match self {
            MetaType::U8 => 0,
            MetaType::I8 => 1,
            MetaType::U16 => 2,
            MetaType::I16 => 3,
            MetaType::U32 => 4,
            MetaType::I32 => 5,
            MetaType::F32 => 6,
            MetaType::Bool => 7,
            MetaType::Str => 8,
            MetaType::Array => 9,
            MetaType::U64 => 10,
            MetaType::I64 => 11,
            MetaType::F64 => 12,
        }
    }

    /// The type's name in error messages.
    pub fn name(self) -> &'static str {
        match self {
            MetaType::U8 => "u8",
            MetaType::I8 => "i8",
            MetaType::U16 => "u16",
            MetaType::I16 => "i16",
            MetaType::U32 => "u32",
            MetaType::I32 => "i32",
            MetaType::F32 => "f32",
            MetaType::Bool => "bool",
            MetaType::Str => "string",
            MetaType::Array => "array",
            MetaType::U64 => "u64",
            MetaType::I64 => "i64",
            MetaType::F64 => "f64",
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    /// Elements all of `elem` type (arrays may nest).
    Array {
        elem: MetaType,
        items: Vec<MetaValue>,
    },
}

impl MetaValue {
    /// The value as an unsigned integer, for any integer type whose value
    /// is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, for any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A description of the value's type for error messages, such as
    /// "string" or "array of i32".
    pub fn type_desc(&self) -> String {
        match self {
            MetaValue::Array { elem, .. } => format!("array of {}", elem.name()),
            other => other.meta_type().name().to_string(),
        }
    }

    pub fn meta_type(&self) -> MetaType {
        match self {
            MetaValue::U8(_) => MetaType::U8,
            MetaValue::I8(_) => MetaType::I8,
            MetaValue::U16(_) => MetaType::U16,
            MetaValue::I16(_) => MetaType::I16,
            MetaValue::U32(_) => MetaType::U32,
            MetaValue::I32(_) => MetaType::I32,
            MetaValue::F32(_) => MetaType::F32,
            MetaValue::Bool(_) => MetaType::Bool,
            MetaValue::Str(_) => MetaType::Str,
            MetaValue::U64(_) => MetaType::U64,
            MetaValue::I64(_) => MetaType::I64,
            MetaValue::F64(_) => MetaType::F64,
            MetaValue::Array { .. } => MetaType::Array,
        }
    }
}

/// Where one tensor is and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Elements along each dimension, innermost first (ggml's `ne`): a
    /// matrix of `rows` rows of `cols` is `[cols, rows]`.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the first byte from the start of the data section.
    pub offset: u64,
    /// Bytes the tensor takes.
    pub size: usize,
    /// The tensor's bytes as a range of the whole file.
    pub file_range: Range<usize>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open GGUF file: parsed metadata and tensor table over a memory map of
/// the whole file.
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    map: Arc<memmap2::Mmap>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps the file at `path` and checks all of it but the tensors' values.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io_err)?;
        let map = map_file(&file).map_err(io_err)?;
        parse(path, Arc::new(map))
    }

    /// The GGUF version: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Alignment of tensor data in bytes (`general.alignment`, default
    /// [`DEFAULT_ALIGNMENT`]).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Offset in the file where tensor data begins.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// The value of metadata `key`, if present.
    pub fn metadata(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All metadata in file order.
    pub fn metadata_entries(&self) -> impl Iterator<Item = (&str, &MetaValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.metadata(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
        })
    }

    /// Metadata `key` as a `u32`: any integer type is accepted when its
    /// value fits.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let value = self.require(key)?;
        value
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| wrong_type(key, "an integer from 0 to 2^32-1", value))
    }

    /// Metadata `key` as an `f32`: f32 and f64 values are accepted.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        match self.require(key)? {
            MetaValue::F32(v) => Ok(*v),
            // Narrowing is what the model computes with anyway.
            MetaValue::F64(v) => Ok(*v as f32),
            other => Err(wrong_type(key, "a float", other)),
        }
    }

    /// Metadata `key` as a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            MetaValue::Bool(v) => Ok(*v),
            other => Err(wrong_type(key, "a bool", other)),
        }
    }

    /// Metadata `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let value = self.require(key)?;
        value
            .as_str()
            .ok_or_else(|| wrong_type(key, "a string", value))
    }

    /// Metadata `key` as an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let value = self.require(key)?;
        let expected = "an array of strings";
        let MetaValue::Array { items, .. } = value else {
            return Err(wrong_type(key, expected, value));
        };
        items
            .iter()
            .map(|item| {
                item.as_str()
                    .ok_or_else(|| wrong_type(key, expected, value))
            })
            .collect()
    }

    /// Metadata `key` as an array of `i32`: any integer element type is
    /// accepted when every value fits.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        let value = self.require(key)?;
        let expected = "an array of 32-bit integers";
        let MetaValue::Array { items, .. } = value else {
            return Err(wrong_type(key, expected, value));
        };
        items
            .iter()
            .map(|item| {
                item.as_i64()
                    .and_then(|v| i32::try_from(v).ok())
                    .ok_or_else(|| wrong_type(key, expected, value))
            })
            .collect()
    }

    /// All tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn require_tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// The bytes of tensor `name`, borrowed from the memory map.
    pub fn tensor_bytes(&self, name: &str) -> Result<TensorBytes, GgufError> {
        let info = self.require_tensor(name)?;
        Ok(TensorBytes::Mapped(
            self.map.clone(),
            info.file_range.clone(),
        ))
    }

    /// Tensor `name` as a matrix of `dims[1]` rows of `dims[0]` columns.
    /// Dimensions past the second must be 1.
    pub fn matrix(&self, name: &str) -> Result<QMatrix, GgufError> {
        let info = self.require_tensor(name)?;
        let extra_ok = info.dims.iter().skip(2).all(|&d| d == 1);
        if info.dims.len() < 2 || !extra_ok {
            return Err(wrong_shape(info, "a 2-D matrix"));
        }

        // Both fit in usize: their product was checked against the file.
        let (cols, rows) = (info.dims[0] as usize, info.dims[1] as usize);
        Ok(QMatrix {
            ty: info.ty,
            rows,
            cols,
            layout: Layout::Rows,
            bytes: TensorBytes::Mapped(self.map.clone(), info.file_range.clone()),
        })
    }

    /// Tensor `name` as a vector of `f32`, converted from F32 or F16.
    /// Dimensions past the first must be 1.
    pub fn vector_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self.require_tensor(name)?;
        let expected = "a 1-D F32 or F16 vector";
        if info.dims.iter().skip(1).any(|&d| d != 1) {
            return Err(wrong_shape(info, expected));
        }

        let bytes = &self.map[info.file_range.clone()];
        match info.ty {
            GgmlType::F32 => Ok(bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            GgmlType::F16 => Ok(bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            _ => Err(wrong_shape(info, expected)),
        }
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
    GgufError::WrongType {
        key: key.to_string(),
        expected,
        found: found.type_desc(),
    }
}

fn wrong_shape(info: &TensorInfo, expected: &'static str) -> GgufError {
    GgufError::WrongShape {
        name: info.name.clone(),
        dims: info.dims.clone(),
        ty: info.ty,
        expected,
    }
}

/// Maps `file` read-only.
#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the map is read-only and we never hand out a mutable view.
    // The remaining hazard is another process truncating or rewriting the
    // model file while it is mapped, which would change or fault the bytes
    // under us; model files are treated as immutable while served, as
    // llama.cpp and every other mmap-based loader do.
    unsafe { memmap2::Mmap::map(file) }
}

/// Reads little-endian values from the file, turning a short read into a
/// [`GgufError::Truncated`] that says what was being read.
struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
    /// What is being read, for error messages ("metadata entry 3").
    what: String,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn truncated(&self) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what: self.what.clone(),
            offset: self.pos as u64,
            len: self.bytes.len() as u64,
        }
    }

    fn malformed(&self, detail: String) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_path_buf(),
            detail,
        }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated());
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N as u64)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, GgufError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Refuses a count of things each at least `min_size` bytes long when
    /// the rest of the file could not hold that many, so that no count
    /// makes us allocate more than the file's size.
    fn check_count(&self, n: u64, min_size: u64, of: &str) -> Result<(), GgufError> {
        if n.saturating_mul(min_size) > self.remaining() {
            let detail = format!(
                "{} claims {n} {of}, more than the {} bytes left could hold; \
                 the file is truncated or corrupt: download or convert it again",
                self.what,
                self.remaining()
            );
            return Err(self.malformed(detail));
        }
        Ok(())
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            let detail = format!("a string in {} is not valid UTF-8", self.what);
            self.malformed(detail)
        })
    }

    fn meta_type(&mut self) -> Result<MetaType, GgufError> {
        let id = self.u32()?;
        MetaType::from_id(id).ok_or_else(|| {
            let detail = format!("{} has unknown value type {id}", self.what);
            self.malformed(detail)
        })
    }

    fn value(&mut self, ty: MetaType, depth: usize) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            MetaType::U8 => MetaValue::U8(self.u8()?),
            MetaType::I8 => MetaValue::I8(self.u8()? as i8),
            MetaType::U16 => MetaValue::U16(self.u16()?),
            MetaType::I16 => MetaValue::I16(self.u16()? as i16),
            MetaType::U32 => MetaValue::U32(self.u32()?),
            MetaType::I32 => MetaValue::I32(self.u32()? as i32),
            MetaType::F32 => MetaValue::F32(f32::from_bits(self.u32()?)),
            MetaType::U64 => MetaValue::U64(self.u64()?),
            MetaType::I64 => MetaValue::I64(self.u64()? as i64),
            MetaType::F64 => MetaValue::F64(f64::from_bits(self.u64()?)),
            MetaType::Str => MetaValue::Str(self.string()?),
            MetaType::Bool => match self.u8()? {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    let detail = format!("{} has bool byte {b}, not 0 or 1", self.what);
                    return Err(self.malformed(detail));
                }
            },
            MetaType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    let detail = format!(
                        "{} nests arrays more than {MAX_ARRAY_DEPTH} deep",
                        self.what
                    );
                    return Err(self.malformed(detail));
                }
                let elem = self.meta_type()?;

                // The count was bounded by the bytes left, so this
                // allocation is at most the file's size.
                let n = self.u64()?;
                self.check_count(n, elem.min_size(), "array elements")?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                MetaValue::Array { elem, items }
            }
        })
    }
}

/// Parses the header, metadata and tensor table of a mapped file.
fn parse(path: PathBuf, map: Arc<memmap2::Mmap>) -> Result<GgufFile, GgufError> {
    let bytes: &[u8] = &map;
    let mut r = Reader {
        path: &path,
        bytes,
        pos: 0,
        what: "the header".to_string(),
    };

    // Magic first, so any non-GGUF file gets the same plain answer.
    let magic = r.take(bytes.len().min(4) as u64)?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic {
            found: String::from_utf8_lossy(magic).into_owned(),
            path,
        });
    }

    // Version 1 used 32-bit counts; a byte-swapped version is a big-endian
    // file, which would read as garbage.
    let version = r.u32()?;
    let hint = match version {
        2 | 3 => "",
        1 => V1_HINT,
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            "the file is big-endian: convert it again for little-endian machines"
        }
        _ => "only versions 2 and 3 are supported",
    };
    if !hint.is_empty() {
        return Err(GgufError::UnsupportedVersion {
            path,
            version,
            hint,
        });
    }

    // A metadata entry takes at least a key length and a type; a tensor
    // entry a name length, a dimension count, a type and an offset. The
    // tensor count is checked after the metadata, so that a file cut short
    // inside the metadata is reported as such.
    let tensor_count = r.u64()?;
    let meta_count = r.u64()?;
    r.check_count(meta_count, 8 + 4, "metadata entries")?;

    // Metadata.
    let mut metadata = Vec::with_capacity(meta_count as usize);
    let mut meta_index = HashMap::with_capacity(meta_count as usize);
    for i in 0..meta_count {
        r.what = format!("metadata entry {i}");
        let key = r.string()?;
        r.what = format!("metadata entry {i} ({key})");
        let ty = r.meta_type()?;
        let value = r.value(ty, 0)?;
        if meta_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(r.malformed(format!("metadata key {key} appears twice")));
        }
        metadata.push((key, value));
    }

    // Alignment, needed to place the data section.
    let alignment = match metadata
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .map(|(_, v)| v)
    {
        None => DEFAULT_ALIGNMENT,
        Some(MetaValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(other) => {
            let detail = format!(
                "general.alignment must be a power of two stored as u32, \
                 found {other:?}"
            );
            return Err(r.malformed(detail));
        }
    };

    // Tensor table; sizes and offsets are checked once the data section's
    // start is known.
    r.what = "the tensor table".to_string();
    r.check_count(tensor_count, 8 + 4 + 4 + 8, "tensors")?;
    let mut raw = Vec::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        r.what = format!("tensor table entry {i}");
        let name = r.string()?;
        r.what = format!("tensor table entry {i} ({name})");
        let n_dims = r.u32()? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            let detail = format!("tensor {name} has {n_dims} dimensions, not 1 to {MAX_DIMS}");
            return Err(r.malformed(detail));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(r.u64()?);
        }
        let type_id = r.u32()?;
        let offset = r.u64()?;
        raw.push((name, dims, type_id, offset));
    }

    // The data section starts at the next aligned offset.
    let table_end = r.pos as u64;
    let data_start = table_end.div_ceil(alignment) * alignment;

    let file_len = bytes.len() as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    let mut tensor_index = HashMap::with_capacity(raw.len());
    for (name, dims, type_id, offset) in raw {
        let info = check_tensor(&r, name, dims, type_id, offset, data_start, alignment)?;
        if info.file_range.end as u64 > file_len {
            return Err(GgufError::Truncated {
                path: path.clone(),
                what: format!(
                    "the data of tensor {} (bytes {}..{})",
                    info.name, info.file_range.start, info.file_range.end
                ),
                offset: file_len,
                len: file_len,
            });
        }
        if tensor_index
            .insert(info.name.clone(), tensors.len())
            .is_some()
        {
            return Err(r.malformed(format!("tensor {} appears twice", info.name)));
        }
        tensors.push(info);
    }

    Ok(GgufFile {
        path,
        version,
        alignment,
        data_start,
        metadata,
        meta_index,
        tensors,
        tensor_index,
        map,
    })
}

/// Checks one tensor table entry's type, shape and offset, and works out
/// its bytes' place in the file (not yet checked against the file's end).
fn check_tensor(
    r: &Reader<'_>,
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    offset: u64,
    data_start: u64,
    alignment: u64,
) -> Result<TensorInfo, GgufError> {
    let Some(ty) = GgmlType::from_id(type_id) else {
        return Err(GgufError::UnsupportedType {
            tensor: name,
            type_name: match ggml_type_name(type_id) {
                "unknown" => format!("unknown ({type_id})"),
                known => known.to_string(),
            },
        });
    };

    if !offset.is_multiple_of(alignment) {
        let detail = format!(
            "tensor {name} starts at data offset {offset}, which is not a \
             multiple of the alignment ({alignment} bytes)"
        );
        return Err(r.malformed(detail));
    }

    // Rows must be whole blocks for the kernels to walk them.
    let row_len = dims[0];
    let block_len = ty.block_len() as u64;
    if !row_len.is_multiple_of(block_len) {
        let detail = format!(
            "tensor {name} has rows of {row_len} elements, not a whole \
             number of {ty} blocks of {block_len}"
        );
        return Err(r.malformed(detail));
    }

    // Sizes are computed with overflow checks: the counts are untrusted.
    // The element count must fit too, for a zero dimension would let the
    // others be anything.
    let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let size = dims[1..]
        .iter()
        .try_fold(row_len / block_len * ty.block_bytes() as u64, |acc, &d| {
            acc.checked_mul(d)
        });
    let range = size.zip(elements).and_then(|(size, _)| {
        let start = data_start.checked_add(offset)?;
        let end = start.checked_add(size)?;
        Some((usize::try_from(start).ok()?, usize::try_from(end).ok()?))
    });
    let Some((start, end)) = range else {
        let detail = format!("tensor {name} has impossible size {dims:?} at offset {offset}");
        return Err(r.malformed(detail));
    };

    Ok(TensorInfo {
        name,
        dims,
        ty,
        offset,
        size: end - start,
        file_range: start..end,
    })
}

#[cfg(test)]
mod tests;
