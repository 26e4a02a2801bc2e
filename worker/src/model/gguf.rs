//! GGUF container parsing: header, metadata and tensor directory over a memory map.
//!
//! This module only understands the container. It does not know what a Llama is (see
//! `model::config`) nor how to dequantize (see `quant`). Every error names the file and,
//! where there is one, the key or tensor and the reason, because a user with a truncated
//! download must be able to tell what is wrong from the message alone.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (innermost) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{file}: cannot open: {err}")]
    Io { file: PathBuf, err: std::io::Error },
    #[error("{file}: not a GGUF file (magic bytes are {magic:?}, expected \"GGUF\")")]
    Magic { file: PathBuf, magic: [u8; 4] },
    #[error("{file}: unsupported GGUF version {version} (supported: 2, 3)")]
    Version { file: PathBuf, version: u32 },
    #[error("{file}: truncated or corrupt header at byte {offset}: {what}")]
    Header {
        file: PathBuf,
        offset: usize,
        what: String,
    },
    #[error("{file}: tensor `{tensor}`: {reason}")]
    Tensor {
        file: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("{file}: metadata `{key}`: {reason}")]
    Metadata {
        file: PathBuf,
        key: String,
        reason: String,
    },
}

/// An opened GGUF file. Tensor data stays in the memory map until the loader copies or
/// borrows it.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    mmap: Arc<Mmap>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = File::open(path).map_err(|err| GgufError::Io {
            file: path.into(),
            err,
        })?;
        // SAFETY: the map is read-only; a file truncated underneath a running worker is an
        // operator error we cannot guard against (same contract as every mmap loader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|err| GgufError::Io {
            file: path.into(),
            err,
        })?;
        let mut r = Reader {
            buf: &mmap,
            pos: 0,
            file: path,
        };
        let magic: [u8; 4] = r.bytes(4, "magic")?.try_into().unwrap_or([0; 4]);
        if &magic != MAGIC {
            return Err(GgufError::Magic {
                file: path.into(),
                magic,
            });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                file: path.into(),
                version,
            });
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        if n_tensors > 1 << 20 || n_kv > 1 << 20 {
            return Err(r.err(format!(
                "implausible counts: {n_tensors} tensors, {n_kv} metadata entries"
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata type")?;
            let value = r.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor rank")?;
            if n_dims == 0 || n_dims > 4 {
                return Err(tensor_err(
                    path,
                    &name,
                    format!("rank {n_dims} (expected 1..=4)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let ty_id = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            raw.push((name, dims, ty_id, offset));
        }
        let alignment =
            match metadata.get("general.alignment") {
                None => DEFAULT_ALIGNMENT,
                Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| {
                    GgufError::Metadata {
                        file: path.into(),
                        key: "general.alignment".into(),
                        reason: "must be a power of two".into(),
                    }
                })?,
            };
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty_id, offset) in raw {
            let ty =
                GgmlType::try_from(ty_id).map_err(|e| tensor_err(path, &name, e.to_string()))?;
            let n: u64 = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| tensor_err(path, &name, format!("dimensions {dims:?} overflow")))?;
            let row = dims[0] as usize;
            let row_bytes = ty
                .row_bytes(row)
                .map_err(|e| tensor_err(path, &name, e.to_string()))?;
            let len = (n / dims[0].max(1)) as usize * row_bytes;
            let start = data_start + offset;
            if offset % alignment != 0 {
                return Err(tensor_err(
                    path,
                    &name,
                    format!("data offset {offset} is not aligned to {alignment}"),
                ));
            }
            if start + len as u64 > file_len {
                return Err(tensor_err(
                    path,
                    &name,
                    format!(
                        "data runs to byte {} but the file has only {file_len} bytes (truncated download?)",
                        start + len as u64
                    ),
                ));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                start: start as usize,
                len,
            });
        }
        Ok(Self {
            path: path.into(),
            version,
            metadata,
            tensors,
            mmap: Arc::new(mmap),
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (bounds were checked at open).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.start..t.start + t.len]
    }

    /// The shared memory map, for weights that borrow tensor bytes without copying.
    pub fn mmap(&self) -> Arc<Mmap> {
        Arc::clone(&self.mmap)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.typed(key, Value::as_u64, "an unsigned integer")
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.typed(key, Value::as_f64, "a number")
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.md_err(key, "expected a string")),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.typed(key, Value::as_bool, "a boolean")
    }

    pub fn md_err(&self, key: &str, reason: impl Into<String>) -> GgufError {
        GgufError::Metadata {
            file: self.path.clone(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn typed<T>(
        &self,
        key: &str,
        f: impl Fn(&Value) -> Option<T>,
        what: &str,
    ) -> Result<Option<T>, GgufError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => f(v)
                .map(Some)
                .ok_or_else(|| self.md_err(key, format!("expected {what}, found {v:?}"))),
        }
    }
}

fn tensor_err(path: &Path, name: &str, reason: String) -> GgufError {
    GgufError::Tensor {
        file: path.into(),
        tensor: name.into(),
        reason,
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, what: String) -> GgufError {
        GgufError::Header {
            file: self.file.into(),
            offset: self.pos,
            what,
        }
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!("file ends while reading {what} ({n} bytes needed)"))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let b = self.bytes(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        if n > self.buf.len() as u64 {
            return Err(self.err(format!("{what}: string length {n} exceeds the file")));
        }
        let b = self.bytes(n as usize, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("{what}: not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(key)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(self.err(format!("{key}: arrays nested too deeply")));
                }
                let item_ty = self.u32(key)?;
                let n = self.u64(key)?;
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(self.err(format!("{key}: array length {n} exceeds the file")));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(item_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.err(format!("{key}: unknown metadata value type {other}"))),
        })
    }
}
