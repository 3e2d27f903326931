//! A bounded GGUF header reader.
//!
//! candle's `gguf_file::Content::read` trusts the counts and lengths in the file: a few flipped
//! header bytes make it allocate terabytes (the process aborts) or overflow a capacity (it
//! panics), and `general.alignment = 0` divides by zero. This reader parses the same format into
//! candle's own [`Content`] (so candle's tensor reader and dequantisation are used unchanged), but
//! checks every count, string length, array length, dimension, tensor offset and extent against
//! the bytes left in the file and against fixed limits before anything is allocated. Errors name
//! the field and its byte offset. Tensors in ggml's MXFP4 format (GPT-OSS's experts), which
//! candle does not know, are listed apart ([`GgufHeader::mxfp4`]) under the same checks.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic, DEFAULT_ALIGNMENT};
use candle_core::quantized::GgmlDType;

/// Longest string accepted (a key, a token, a chat template).
const MAX_STRING_BYTES: u64 = 16 << 20;
/// Most elements accepted in one metadata array (vocabularies of a few million tokens fit).
const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Most metadata values (array elements included) in one header.
const MAX_VALUES: u64 = 1 << 25;
/// Deepest array nesting accepted.
const MAX_ARRAY_DEPTH: u32 = 3;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Largest `general.alignment` accepted.
const MAX_ALIGNMENT: u64 = 1 << 16;

/// A tensor in ggml's MXFP4 blocks (`GGML_TYPE_MXFP4`: 32 values in 17 bytes, see
/// [`crate::model::mxfp4`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mxfp4Tensor {
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Offset of its data from [`Content::tensor_data_offset`].
    pub offset: u64,
}

/// A checked GGUF header: candle's content, and the MXFP4 tensors candle's cannot describe.
#[derive(Debug)]
pub struct GgufHeader {
    /// Metadata and every tensor in a format candle reads.
    pub content: Content,
    /// The tensors in MXFP4 (experts' weights only).
    pub mxfp4: HashMap<String, Mxfp4Tensor>,
}

impl GgufHeader {
    /// Whether the file has a tensor of that name, in any format.
    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name) || self.mxfp4.contains_key(name)
    }

    /// The shape (outermost first) of the tensor `name`, in any format.
    pub fn dims(&self, name: &str) -> Option<&[usize]> {
        match self.content.tensor_infos.get(name) {
            Some(i) => Some(i.shape.dims()),
            None => self.mxfp4.get(name).map(|t| t.shape.as_slice()),
        }
    }
}

/// ggml's type code of MXFP4.
const MXFP4_CODE: u32 = 39;

/// A tensor's format: one candle reads, or MXFP4.
#[derive(Debug, Clone, Copy)]
enum Format {
    Candle(GgmlDType),
    Mxfp4,
}

impl Format {
    /// Values per block and bytes per block.
    fn block(self) -> (usize, usize) {
        match self {
            Format::Candle(dt) => (dt.block_size(), dt.type_size()),
            Format::Mxfp4 => (crate::model::mxfp4::BLOCK, crate::model::mxfp4::GGML_BLOCK_BYTES),
        }
    }
}

/// Reads and checks the header of the GGUF file at `path`: afterwards every tensor of the returned
/// header lies inside the file and has a whole number of quantisation blocks per row.
pub fn read_gguf_header(path: &Path) -> Result<GgufHeader> {
    let file = File::open(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
    let file_len = file.metadata()?.len();
    let mut r = Bounded { inner: BufReader::with_capacity(1 << 16, file), pos: 0, len: file_len, values: 0 };
    r.content().map_err(|e| anyhow::anyhow!("{} is not a valid GGUF file (truncated or corrupt?): {e}", path.display()))
}

/// A reader that knows how many bytes the file has left.
struct Bounded<R> {
    inner: R,
    pos: u64,
    len: u64,
    values: u64,
}

fn dtype_of(code: u32) -> Option<GgmlDType> {
    Some(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        // 9 (Q8_1) is only ggml's intermediate for dot products: no file stores weights in it,
        // and candle cannot dequantize it, so it is refused here like any unknown type.
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// GGUF value type codes.
mod ty {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl<R: Read> Bounded<R> {
    fn left(&self) -> u64 {
        self.len - self.pos
    }

    fn bytes<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        if (N as u64) > self.left() {
            bail!("{field} at byte {}: the file ends after {} more bytes", self.pos, self.left());
        }
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b).with_context(|| format!("reading {field} at byte {}", self.pos))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(field)?))
    }

    fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(field)?))
    }

    /// A count or length: 32 bits in GGUF v1, 64 bits later.
    fn count(&mut self, v: VersionedMagic, field: &str) -> Result<u64> {
        match v {
            VersionedMagic::GgufV1 => Ok(u64::from(self.u32(field)?)),
            _ => self.u64(field),
        }
    }

    /// Checks that `n` items of at least `min_bytes` each fit in what is left of the file.
    fn fits(&self, at: u64, n: u64, min_bytes: u64, field: &str) -> Result<()> {
        if n.saturating_mul(min_bytes) > self.left() {
            bail!(
                "{field} at byte {at} is {n}, but {n} x {min_bytes} bytes cannot fit in the {} bytes left in the file",
                self.left()
            );
        }
        Ok(())
    }

    fn string(&mut self, v: VersionedMagic, field: &str) -> Result<String> {
        let at = self.pos;
        let n = self.count(v, &format!("length of {field}"))?;
        if n > MAX_STRING_BYTES {
            bail!("length of {field} at byte {at} is {n} bytes, above the limit of {MAX_STRING_BYTES}");
        }
        self.fits(at, n, 1, &format!("length of {field}"))?;
        let mut b = vec![0u8; n as usize];
        self.inner.read_exact(&mut b).with_context(|| format!("reading {field} at byte {}", self.pos))?;
        self.pos += n;
        // As candle does: GGUF strings should not be NUL-terminated but some are, and some are
        // not valid UTF-8.
        while b.last() == Some(&0) {
            b.pop();
        }
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Fewest bytes a value of type `t` takes in the file.
    fn min_bytes(v: VersionedMagic, t: u32) -> u64 {
        let count = if v == VersionedMagic::GgufV1 { 4 } else { 8 };
        match t {
            ty::U8 | ty::I8 | ty::BOOL => 1,
            ty::U16 | ty::I16 => 2,
            ty::U32 | ty::I32 | ty::F32 => 4,
            ty::U64 | ty::I64 | ty::F64 => 8,
            ty::STRING => count,
            _ => 4 + count,
        }
    }

    fn value(&mut self, v: VersionedMagic, t: u32, depth: u32, field: &str) -> Result<Value> {
        self.values += 1;
        if self.values > MAX_VALUES {
            bail!("{field} at byte {}: more than {MAX_VALUES} metadata values in the header", self.pos);
        }
        Ok(match t {
            ty::U8 => Value::U8(self.bytes::<1>(field)?[0]),
            ty::I8 => Value::I8(self.bytes::<1>(field)?[0] as i8),
            ty::U16 => Value::U16(u16::from_le_bytes(self.bytes(field)?)),
            ty::I16 => Value::I16(i16::from_le_bytes(self.bytes(field)?)),
            ty::U32 => Value::U32(self.u32(field)?),
            ty::I32 => Value::I32(i32::from_le_bytes(self.bytes(field)?)),
            ty::F32 => Value::F32(f32::from_le_bytes(self.bytes(field)?)),
            ty::U64 => Value::U64(self.u64(field)?),
            ty::I64 => Value::I64(i64::from_le_bytes(self.bytes(field)?)),
            ty::F64 => Value::F64(f64::from_le_bytes(self.bytes(field)?)),
            ty::BOOL => {
                let at = self.pos;
                match self.bytes::<1>(field)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => bail!("{field} at byte {at}: boolean byte {b} is neither 0 nor 1"),
                }
            }
            ty::STRING => Value::String(self.string(v, field)?),
            ty::ARRAY => {
                let at = self.pos;
                if depth >= MAX_ARRAY_DEPTH {
                    bail!("{field} at byte {at}: arrays nested deeper than {MAX_ARRAY_DEPTH}");
                }
                let et = self.u32(&format!("element type of {field}"))?;
                if et > ty::F64 {
                    bail!("element type of {field} at byte {at} is {et}, not a GGUF value type");
                }
                let at = self.pos;
                let n = self.count(v, &format!("length of {field}"))?;
                if n > MAX_ARRAY_LEN {
                    bail!("length of {field} at byte {at} is {n}, above the limit of {MAX_ARRAY_LEN}");
                }
                self.fits(at, n, Self::min_bytes(v, et), &format!("length of {field}"))?;
                let mut out = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    out.push(self.value(v, et, depth + 1, field)?);
                }
                Value::Array(out)
            }
            other => bail!("{field} at byte {}: value type {other} is not a GGUF value type", self.pos - 4),
        })
    }

    fn content(&mut self) -> Result<GgufHeader> {
        let magic = u32::from_le_bytes(self.bytes("magic")?);
        if magic != 0x4655_4747 && magic != 0x4747_5546 {
            bail!("magic at byte 0 is 0x{magic:08x}, not `GGUF`");
        }
        let version = self.u32("version")?;
        let v = match version {
            1 => VersionedMagic::GgufV1,
            2 => VersionedMagic::GgufV2,
            3 => VersionedMagic::GgufV3,
            other => bail!("version at byte 4 is {other} (supported: 1, 2, 3)"),
        };
        let at = self.pos;
        let n_tensors = self.count(v, "tensor count")?;
        // A tensor entry is at least a name length, a dimension count, a type and an offset.
        let tensor_min = Self::min_bytes(v, ty::STRING) + 4 + 4 + 8;
        self.fits(at, n_tensors, tensor_min, "tensor count")?;
        let at = self.pos;
        let n_kv = self.count(v, "metadata count")?;
        self.fits(at, n_kv, Self::min_bytes(v, ty::STRING) + 4 + 1, "metadata count")?;

        let mut metadata = HashMap::new();
        for i in 0..n_kv {
            let key = self.string(v, &format!("metadata key #{i}"))?;
            let field = format!("metadata `{key}`");
            let t = self.u32(&format!("type of {field}"))?;
            let value = self.value(v, t, 0, &field)?;
            if metadata.insert(key.clone(), value).is_some() {
                bail!("metadata key `{key}` appears twice");
            }
        }

        let mut tensor_infos = HashMap::new();
        let mut mxfp4 = HashMap::new();
        let mut order = Vec::new();
        for i in 0..n_tensors {
            let name = self.string(v, &format!("name of tensor #{i}"))?;
            let at = self.pos;
            let n_dims = self.u32(&format!("dimension count of tensor `{name}`"))?;
            if n_dims > MAX_DIMS {
                bail!("dimension count of tensor `{name}` at byte {at} is {n_dims}, above ggml's {MAX_DIMS}");
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                let x = self.count(v, &format!("dimension {d} of tensor `{name}`"))?;
                dims.push(usize::try_from(x).with_context(|| format!("dimension {d} of tensor `{name}` is {x}"))?);
            }
            let at = self.pos;
            let code = self.u32(&format!("type of tensor `{name}`"))?;
            let format = match code {
                MXFP4_CODE if name.ends_with("_exps.weight") => Format::Mxfp4,
                MXFP4_CODE => bail!("tensor `{name}` at byte {at} is MXFP4, which is read for experts' weights only"),
                _ => Format::Candle(dtype_of(code).with_context(|| {
                    format!("type of tensor `{name}` at byte {at} is {code}, not a supported ggml type")
                })?),
            };
            let offset = self.u64(&format!("data offset of tensor `{name}`"))?;
            // ggml lists the innermost dimension first; candle's shapes are outermost first.
            let inner = dims.first().copied().unwrap_or(1);
            dims.reverse();
            if tensor_infos.contains_key(&name) || mxfp4.contains_key(&name) {
                bail!("tensor `{name}` appears twice");
            }
            match format {
                Format::Candle(dtype) => {
                    tensor_infos.insert(name.clone(), TensorInfo { ggml_dtype: dtype, shape: dims.into(), offset });
                }
                Format::Mxfp4 => {
                    mxfp4.insert(name.clone(), Mxfp4Tensor { shape: dims, offset });
                }
            }
            order.push((name, inner, format));
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(a) => {
                let a = match a {
                    Value::U8(x) => u64::from(*x),
                    Value::U16(x) => u64::from(*x),
                    Value::U32(x) => u64::from(*x),
                    Value::U64(x) => *x,
                    Value::I8(x) => u64::try_from(*x).unwrap_or(0),
                    Value::I16(x) => u64::try_from(*x).unwrap_or(0),
                    Value::I32(x) => u64::try_from(*x).unwrap_or(0),
                    Value::I64(x) => u64::try_from(*x).unwrap_or(0),
                    other => bail!("metadata `general.alignment` is {other:?}, not an integer"),
                };
                if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
                    bail!("metadata `general.alignment` is {a}: it must be a power of two up to {MAX_ALIGNMENT}");
                }
                a
            }
        };
        let data_offset = self.pos.div_ceil(alignment) * alignment;

        for (name, inner, format) in order {
            let (dims, offset) = match format {
                Format::Candle(_) => (tensor_infos[&name].shape.dims(), tensor_infos[&name].offset),
                Format::Mxfp4 => (mxfp4[&name].shape.as_slice(), mxfp4[&name].offset),
            };
            let (bs, ts) = format.block();
            let elems = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .with_context(|| format!("tensor `{name}`: shape {dims:?} overflows"))?;
            if inner % bs != 0 {
                bail!("tensor `{name}`: its rows of {inner} elements are not whole blocks of {bs} ({format:?})");
            }
            let end = (elems / bs as u64)
                .checked_mul(ts as u64)
                .and_then(|bytes| data_offset.checked_add(offset)?.checked_add(bytes));
            match end {
                _ if offset % alignment != 0 => {
                    bail!("tensor `{name}`: data offset {offset} is not a multiple of the alignment {alignment}")
                }
                Some(end) if end <= self.len => {}
                _ => bail!(
                    "truncated: tensor `{name}` ({format:?}, shape {dims:?}, data offset {offset}) ends beyond the file's {} bytes",
                    self.len
                ),
            }
        }
        let content = Content { magic: v, metadata, tensor_infos, tensor_data_offset: data_offset };
        Ok(GgufHeader { content, mxfp4 })
    }
}
