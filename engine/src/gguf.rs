//! GGUF reader: metadata and tensor directory of a memory-mapped file.
//!
//! The file is mapped, never read whole: tensor data stays in the page cache and quantized weights
//! are used in place (`WeightBytes::Mapped`). Every length and count in the header is checked
//! against the bytes that are actually there before anything is allocated, so a truncated or
//! hostile file is a clear error naming the file, never a panic or an absurd allocation.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Longest metadata string accepted (a chat template is a few KiB; 16 MiB is generous).
const MAX_STRING_BYTES: u64 = 16 << 20;
/// Deepest nesting of metadata arrays accepted.
const MAX_ARRAY_DEPTH: usize = 4;
/// Most dimensions a tensor may declare.
const MAX_DIMS: u32 = 8;

/// Why a GGUF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot open: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic {magic:?})")]
    NotGguf { path: PathBuf, magic: [u8; 4] },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: truncated or corrupt at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: usize,
        what: String,
    },
    #[error("{path}: tensor `{name}` has unsupported type id {type_id}")]
    UnsupportedType {
        path: PathBuf,
        name: String,
        type_id: u32,
    },
    #[error("{path}: tensor `{name}` lies outside the file (needs bytes {start}..{end}, file has {len})")]
    TensorOutOfBounds {
        path: PathBuf,
        name: String,
        start: u64,
        end: u64,
        len: usize,
    },
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is any integer type with a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64).or(match *self {
                GgufValue::I8(v) => Some(v as f64),
                GgufValue::I16(v) => Some(v as f64),
                GgufValue::I32(v) => Some(v as f64),
                GgufValue::I64(v) => Some(v as f64),
                _ => None,
            }),
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    /// GGUF tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` is the contiguous (innermost) one.
    pub dims: Vec<u64>,
    /// ggml storage type id (see `crate::quant::GgmlDType::from_ggml_id`).
    pub type_id: u32,
    /// Byte offset from the start of the file.
    pub offset: usize,
    /// Byte length.
    pub len: usize,
}

impl GgufTensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file: metadata, tensor directory, and the mapping the tensors live in.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    /// Metadata key/value pairs.
    pub metadata: HashMap<String, GgufValue>,
    /// Tensors by name.
    pub tensors: HashMap<String, GgufTensorInfo>,
    /// Tensor names in file order.
    pub tensor_order: Vec<String>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and private to this process; if another process
        // truncates the file underneath us, reads fault. Model files are treated as immutable
        // while served, as llama.cpp and candle also assume.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path.to_path_buf(), Arc::new(map))
    }

    /// Parses a GGUF image held in memory (copied into an anonymous mapping, so the result is
    /// the same type as [`GgufFile::open`]'s); `name` stands in for the path in errors. For
    /// tests and the fuzz targets.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Self, GgufError> {
        let path = PathBuf::from(name);
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        if bytes.len() < 4 {
            let mut magic = [0u8; 4];
            magic[..bytes.len()].copy_from_slice(bytes);
            return Err(GgufError::NotGguf { path, magic });
        }
        let mut map = memmap2::MmapMut::map_anon(bytes.len()).map_err(io)?;
        map.copy_from_slice(bytes);
        let map = map.make_read_only().map_err(io)?;
        Self::parse(path, Arc::new(map))
    }

    fn parse(path: PathBuf, map: Arc<memmap2::Mmap>) -> Result<Self, GgufError> {
        let bytes: &[u8] = &map;
        if bytes.len() < 4 || &bytes[..4] != GGUF_MAGIC {
            let mut magic = [0u8; 4];
            for (d, s) in magic.iter_mut().zip(bytes.iter()) {
                *d = *s;
            }
            return Err(GgufError::NotGguf { path, magic });
        }
        let mut cur = Cursor {
            bytes,
            pos: 4,
            path: &path,
        };
        let version = cur.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version { path, version });
        }
        let tensor_count = cur.u64()?;
        let kv_count = cur.u64()?;
        // Each key/value needs at least 12 bytes and each tensor info at least 24: a count the
        // file cannot hold is rejected before anything is reserved for it.
        cur.check_count(kv_count, 12, "metadata count")?;
        cur.check_count(tensor_count, 24, "tensor count")?;

        let mut metadata = HashMap::with_capacity(kv_count as usize);
        for _ in 0..kv_count {
            let key = cur.string()?;
            let ty = cur.u32()?;
            let value = cur.value(ty, 0)?;
            metadata.insert(key, value);
        }

        let mut infos = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let name = cur.string()?;
            let n_dims = cur.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(cur.corrupt(format!("tensor `{name}` declares {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(cur.u64()?);
            }
            let type_id = cur.u32()?;
            let offset = cur.u64()?;
            infos.push((name, dims, type_id, offset));
        }

        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(cur.corrupt(format!(
                "general.alignment {alignment} is not a power of two"
            )));
        }
        let data_start = (cur.pos as u64).div_ceil(alignment) * alignment;

        let mut tensors = HashMap::with_capacity(infos.len());
        let mut tensor_order = Vec::with_capacity(infos.len());
        for (name, dims, type_id, offset) in infos {
            let Some((block_size, type_size, type_name)) = ggml_type_layout(type_id) else {
                return Err(GgufError::UnsupportedType {
                    path,
                    name,
                    type_id,
                });
            };
            let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let byte_len = elements.and_then(|n| {
                let bs = block_size as u64;
                (n % bs == 0)
                    .then(|| (n / bs).checked_mul(type_size as u64))
                    .flatten()
            });
            let start = data_start.checked_add(offset);
            let (Some(byte_len), Some(start)) = (byte_len, start) else {
                return Err(cur.corrupt(format!(
                    "tensor `{name}` has impossible shape {dims:?} for {type_name}"
                )));
            };
            let end = start.saturating_add(byte_len);
            if end > bytes.len() as u64 {
                return Err(GgufError::TensorOutOfBounds {
                    path,
                    name,
                    start,
                    end,
                    len: bytes.len(),
                });
            }
            tensor_order.push(name.clone());
            tensors.insert(
                name.clone(),
                GgufTensorInfo {
                    name,
                    dims,
                    type_id,
                    offset: start as usize,
                    len: byte_len as usize,
                },
            );
        }
        Ok(GgufFile {
            path,
            map,
            metadata,
            tensors,
            tensor_order,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mapping tensor data lives in; `info.offset..info.offset + info.len` is one tensor.
    pub fn mapping(&self) -> &Arc<memmap2::Mmap> {
        &self.map
    }

    /// The bytes of one tensor, borrowed from the mapping.
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> &[u8] {
        &self.map[info.offset..info.offset + info.len]
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
}

/// Block layout of a ggml type id: (elements per block, bytes per block, name).
///
/// The reader needs sizes to bound-check tensors before any kernel module is involved; the
/// kernels' `GgmlDType` carries the same table and a test keeps the two in step.
pub fn ggml_type_layout(type_id: u32) -> Option<(usize, usize, &'static str)> {
    Some(match type_id {
        0 => (1, 4, "F32"),
        1 => (1, 2, "F16"),
        2 => (32, 18, "Q4_0"),
        3 => (32, 20, "Q4_1"),
        6 => (32, 22, "Q5_0"),
        7 => (32, 24, "Q5_1"),
        8 => (32, 34, "Q8_0"),
        9 => (32, 36, "Q8_1"),
        10 => (256, 84, "Q2_K"),
        11 => (256, 110, "Q3_K"),
        12 => (256, 144, "Q4_K"),
        13 => (256, 176, "Q5_K"),
        14 => (256, 210, "Q6_K"),
        15 => (256, 292, "Q8_K"),
        30 => (1, 2, "BF16"),
        _ => return None,
    })
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn corrupt(&self, what: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            offset: self.pos,
            what,
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&[u8], GgufError> {
        if n > self.remaining() {
            return Err(self.corrupt(format!("needs {n} more bytes, {} left", self.remaining())));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn check_count(&self, count: u64, min_item_bytes: u64, what: &str) -> Result<(), GgufError> {
        if count.saturating_mul(min_item_bytes) > self.remaining() as u64 {
            return Err(self.corrupt(format!(
                "{what} {count} cannot fit in the {} bytes left",
                self.remaining()
            )));
        }
        Ok(())
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        if len > MAX_STRING_BYTES {
            return Err(self.corrupt(format!("string of {len} bytes exceeds the limit")));
        }
        let raw = self.take(len as usize)?;
        // Lossy: some published GGUF vocabularies carry invalid UTF-8 in byte tokens.
        Ok(String::from_utf8_lossy(raw).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(self.array::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => GgufValue::Bool(self.array::<1>()?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt("metadata arrays nested too deep".into()));
                }
                let item_ty = self.u32()?;
                let n = self.u64()?;
                let min = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    _ => 8,
                };
                self.check_count(n, min, "array length")?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.corrupt(format!("unknown metadata value type {other}"))),
        })
    }
}

/// Writes GGUF v3 files: used to build tiny models for tests and to export weights.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry.
    pub fn metadata(&mut self, key: &str, value: GgufValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor; `dims` in GGUF order (innermost first), `data` already in `type_id` layout.
    pub fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), type_id, data));
        self
    }

    /// Serialises everything into bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out)
            .expect("writing to a Vec cannot fail");
        out
    }

    /// Serialises everything into `out`, tensor data straight from where it is held (a merged
    /// model is hundreds of MiB; it is not copied into one buffer first).
    pub fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut head = Vec::new();
        head.extend_from_slice(GGUF_MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut head, key);
            head.extend_from_slice(&value_type(value).to_le_bytes());
            write_value(&mut head, value);
        }
        let align = DEFAULT_ALIGNMENT as usize;
        let mut offset = 0usize;
        for (name, dims, type_id, data) in &self.tensors {
            write_string(&mut head, name);
            head.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&type_id.to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += data.len().div_ceil(align) * align;
        }
        head.resize(head.len().div_ceil(align) * align, 0);
        out.write_all(&head)?;
        let zeros = [0u8; DEFAULT_ALIGNMENT as usize];
        for (_, _, _, data) in &self.tensors {
            out.write_all(data)?;
            out.write_all(&zeros[..data.len().div_ceil(align) * align - data.len()])?;
        }
        Ok(())
    }

    /// Writes the file.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(File::create(path)?);
        self.write_to(&mut out)?;
        std::io::Write::flush(&mut out)
    }
}

fn value_type(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => write_string(out, s),
        GgufValue::Array(items) => {
            // Empty arrays are written as arrays of u8; readers accept any item type for them.
            let ty = items.first().map(value_type).unwrap_or(0);
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tmp(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, bytes).expect("write");
        (dir, path)
    }

    fn sample() -> GgufWriter {
        let mut w = GgufWriter::new();
        w.metadata("general.architecture", GgufValue::String("llama".into()))
            .metadata("llama.block_count", GgufValue::U32(2))
            .metadata(
                "tokenizer.ggml.tokens",
                GgufValue::Array(vec![
                    GgufValue::String("a".into()),
                    GgufValue::String("b".into()),
                ]),
            )
            .tensor(
                "w",
                &[4, 2],
                0,
                (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect(),
            )
            .tensor("v", &[3], 0, vec![0u8; 12]);
        w
    }

    #[test]
    fn round_trips_metadata_and_tensors() {
        let (_d, path) = write_tmp(&sample().to_bytes());
        let f = GgufFile::open(&path).expect("open");
        assert_eq!(
            f.get("general.architecture").and_then(GgufValue::as_str),
            Some("llama")
        );
        assert_eq!(
            f.get("llama.block_count").and_then(GgufValue::as_u64),
            Some(2)
        );
        assert_eq!(f.tensor_order, vec!["w".to_string(), "v".to_string()]);
        let w = &f.tensors["w"];
        assert_eq!(w.dims, vec![4, 2]);
        assert_eq!(w.offset % 32, 0);
        let data = f.tensor_data(w);
        assert_eq!(
            f32::from_le_bytes([data[28], data[29], data[30], data[31]]),
            7.0
        );
    }

    #[test]
    fn rejects_non_gguf_file_naming_it() {
        let (_d, path) = write_tmp(b"PK\x03\x04 not a model");
        let err = GgufFile::open(&path).expect_err("must fail").to_string();
        assert!(
            err.contains("m.gguf") && err.contains("not a GGUF file"),
            "{err}"
        );
    }

    #[test]
    fn rejects_every_truncation_without_panicking() {
        let bytes = sample().to_bytes();
        // The last tensor has 12 data bytes followed by 20 bytes of alignment padding.
        for cut in 0..bytes.len() - 20 {
            assert!(
                GgufFile::from_bytes("cut.gguf", &bytes[..cut]).is_err(),
                "truncated at {cut} was accepted"
            );
        }
        let whole = GgufFile::from_bytes("whole.gguf", &bytes).expect("the whole image parses");
        assert_eq!(whole.tensor_order, vec!["w".to_string(), "v".to_string()]);
        assert_eq!(whole.tensor_data(&whole.tensors["v"]), &[0u8; 12][..]);
    }

    #[test]
    fn rejects_absurd_counts_before_allocating() {
        let mut bytes = sample().to_bytes();
        // kv_count lives at bytes 16..24.
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let (_d, path) = write_tmp(&bytes);
        let err = GgufFile::open(&path).expect_err("must fail").to_string();
        assert!(err.contains("metadata count"), "{err}");
    }

    #[test]
    fn rejects_unknown_tensor_type() {
        let mut w = GgufWriter::new();
        w.tensor("x", &[32], 99, vec![0u8; 32]);
        let (_d, path) = write_tmp(&w.to_bytes());
        assert!(matches!(
            GgufFile::open(&path),
            Err(GgufError::UnsupportedType { type_id: 99, .. })
        ));
    }

    #[test]
    fn reads_the_default_model() {
        let path = crate::testing::default_model_path();
        let f = GgufFile::open(&path).expect("open");
        assert_eq!(f.tensors.len(), 272);
        assert_eq!(
            f.get("llama.embedding_length").and_then(GgufValue::as_u64),
            Some(576)
        );
        assert_eq!(f.tensors["blk.0.attn_q.weight"].type_id, 3);
    }
}
