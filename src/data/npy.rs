//! NumPy `.npy` files (format versions 1.0, 2.0 and 3.0) to and from [`Tensor`].
//!
//! Little-endian data only; `fortran_order` arrays are transposed into C order on read.
//! Unsigned 16- and 32-bit arrays are widened (losslessly) to i32 and i64 since the IR has no
//! unsigned types beyond u8.

use std::io::Write;
use std::path::Path;

use crate::data::atomic::write_atomic_with;
use crate::error::{Error, Result};
use crate::ir::{checked_numel, DType, Tensor, TensorData};

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// numpy itself refuses headers over 10 kB unless told otherwise; this is a sanity bound.
const MAX_HEADER_LEN: usize = 1 << 20;
/// numpy pads the header so the data starts at a multiple of this.
const ALIGN: usize = 64;
/// Nesting bound of the header literal (numpy writes depth 2).
const MAX_DEPTH: usize = 16;

/// Reads a `.npy` file.
pub fn read_npy(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_npy(&bytes, &path.display().to_string())
}

/// Writes a `.npy` file (version 1.0 unless the header needs 2.0), atomically.
pub fn write_npy(path: impl AsRef<Path>, tensor: &Tensor) -> Result<()> {
    write_atomic_with(path, |w| write_npy_to(w, tensor))
}

/// A `.npy` array's header and where its data starts, from the first bytes of the file
/// (at least the whole header).
fn parse_prefix(bytes: &[u8], name: &str) -> Result<(Header, usize)> {
    let err = |msg: String| Error::Data(format!("{name}: {msg}"));
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(err("not a .npy file (bad magic)".into()));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len_size, utf8) = match major {
        1 => (2, false),
        2 => (4, false),
        3 => (4, true),
        _ => {
            return Err(err(format!(
                "unsupported .npy format version {major}.{minor}"
            )))
        }
    };
    let header_start = 8 + len_size;
    if bytes.len() < header_start {
        return Err(err("truncated header".into()));
    }
    let header_len = if len_size == 2 {
        u16::from_le_bytes([bytes[8], bytes[9]]) as usize
    } else {
        u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
    };
    if header_len > MAX_HEADER_LEN {
        return Err(err(format!("header of {header_len} bytes is too large")));
    }
    let data_start = header_start + header_len;
    let raw = bytes
        .get(header_start..data_start)
        .ok_or_else(|| err("truncated header".into()))?;
    let text = if utf8 {
        std::str::from_utf8(raw)
            .map_err(|_| err("header is not valid UTF-8".into()))?
            .to_string()
    } else {
        // Versions 1 and 2 are latin-1, whose bytes are exactly the first 256 code points.
        raw.iter().map(|&b| b as char).collect()
    };
    let header = parse_header(&text).map_err(|m| err(format!("bad header: {m}")))?;
    Ok((header, data_start))
}

/// Where the data of a little-endian, C-order f32 or u8 array lies in a `.npy` file, read
/// from its first bytes: `(shape, dtype, data offset, data bytes)`. `None` for every other
/// array (and for a header that is not all in `prefix`): those are decoded whole.
pub(crate) fn raw_layout(prefix: &[u8]) -> Option<(Vec<usize>, DType, usize, usize)> {
    let (header, data_start) = parse_prefix(prefix, "").ok()?;
    let dtype = match header.elem {
        Elem::F32 => DType::F32,
        Elem::U8 => DType::U8,
        _ => return None,
    };
    if header.fortran_order && header.shape.len() > 1 {
        return None;
    }
    let numel = checked_numel(&header.shape, dtype.size_of()).ok()?;
    Some((header.shape, dtype, data_start, numel * dtype.size_of()))
}

/// Decodes the bytes of a `.npy` file; `name` identifies it in error messages.
pub fn decode_npy(bytes: &[u8], name: &str) -> Result<Tensor> {
    let err = |msg: String| Error::Data(format!("{name}: {msg}"));
    let (header, data_start) = parse_prefix(bytes, name)?;
    let elem = header.elem;
    let numel = checked_numel(&header.shape, elem.size()).map_err(|e| err(e.to_string()))?;
    let nbytes = numel * elem.size();
    let data = &bytes[data_start..];
    if data.len() < nbytes {
        return Err(err(format!(
            "data is truncated: shape {:?} of {} needs {nbytes} bytes, the file has {}",
            header.shape,
            header.descr,
            data.len()
        )));
    }
    // numpy ignores bytes past the array, and so do we.
    let tensor_data = elem.decode(&data[..nbytes]);
    let tensor_data = if header.fortran_order && header.shape.len() > 1 {
        fortran_to_c(tensor_data, &header.shape)
    } else {
        tensor_data
    };
    Tensor::new(header.shape, tensor_data).map_err(|e| err(e.to_string()))
}

/// Encodes a tensor as a complete `.npy` file.
pub fn encode_npy(tensor: &Tensor) -> Vec<u8> {
    let mut out = Vec::with_capacity(tensor.size_in_bytes() + ALIGN * 2);
    // Writing to a Vec cannot fail.
    let _ = write_npy_to(&mut out, tensor);
    out
}

/// Streams a tensor in `.npy` form to `w`.
pub fn write_npy_to(w: &mut dyn Write, tensor: &Tensor) -> std::io::Result<()> {
    let shape = match tensor.shape() {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        dims => {
            let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            format!("({})", parts.join(", "))
        }
    };
    let descr = descr_of(tensor.dtype());
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let (major, len_size) = if header.len() + 1 + 10 <= u16::MAX as usize {
        (1u8, 2)
    } else {
        (2u8, 4)
    };
    let unpadded = MAGIC.len() + 2 + len_size + header.len() + 1;
    let pad = (ALIGN - unpadded % ALIGN) % ALIGN;
    header.extend(std::iter::repeat_n(' ', pad));
    header.push('\n');
    w.write_all(MAGIC)?;
    w.write_all(&[major, 0])?;
    if len_size == 2 {
        w.write_all(&(header.len() as u16).to_le_bytes())?;
    } else {
        w.write_all(&(header.len() as u32).to_le_bytes())?;
    }
    w.write_all(header.as_bytes())?;
    write_le_data(w, tensor.data())
}

fn descr_of(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::F64 => "<f8",
        DType::I8 => "|i1",
        DType::U8 => "|u1",
        DType::I16 => "<i2",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
        DType::Bool => "|b1",
    }
}

fn write_le_data(w: &mut dyn Write, data: &TensorData) -> std::io::Result<()> {
    // Chunked so large tensors do not need a second full-size buffer.
    fn chunked<T: Copy, const N: usize>(
        w: &mut dyn Write,
        v: &[T],
        to_le: impl Fn(T) -> [u8; N],
    ) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(64 * 1024);
        for chunk in v.chunks(64 * 1024 / N) {
            buf.clear();
            for &x in chunk {
                buf.extend_from_slice(&to_le(x));
            }
            w.write_all(&buf)?;
        }
        Ok(())
    }
    match data {
        TensorData::F32(v) => chunked(w, v, f32::to_le_bytes),
        TensorData::F16(v) => chunked(w, v, u16::to_le_bytes),
        TensorData::F64(v) => chunked(w, v, f64::to_le_bytes),
        TensorData::I8(v) => chunked(w, v, i8::to_le_bytes),
        TensorData::U8(v) => w.write_all(v),
        TensorData::I16(v) => chunked(w, v, i16::to_le_bytes),
        TensorData::I32(v) => chunked(w, v, i32::to_le_bytes),
        TensorData::I64(v) => chunked(w, v, i64::to_le_bytes),
        TensorData::Bool(v) => chunked(w, v, |b| [b as u8]),
    }
}

/// The element types a `.npy` file may hold, as stored on disk.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Elem {
    F16,
    F32,
    F64,
    I8,
    U8,
    I16,
    I32,
    I64,
    U16,
    U32,
    Bool,
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::I8 | Elem::U8 | Elem::Bool => 1,
            Elem::F16 | Elem::I16 | Elem::U16 => 2,
            Elem::F32 | Elem::I32 | Elem::U32 => 4,
            Elem::F64 | Elem::I64 => 8,
        }
    }

    /// `bytes.len()` is a multiple of the element size (checked by the caller).
    fn decode(self, bytes: &[u8]) -> TensorData {
        // A collect over exact chunks vectorizes (about 50 GB/s for f32 with rustc 1.95) and,
        // unlike filling a zeroed buffer, writes the output once.
        fn le<T, const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            bytes
                .chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect()
        }
        match self {
            Elem::F16 => TensorData::F16(le(bytes, u16::from_le_bytes)),
            Elem::F32 => TensorData::F32(le(bytes, f32::from_le_bytes)),
            Elem::F64 => TensorData::F64(le(bytes, f64::from_le_bytes)),
            Elem::I8 => TensorData::I8(bytes.iter().map(|&b| b as i8).collect()),
            Elem::U8 => TensorData::U8(bytes.to_vec()),
            Elem::I16 => TensorData::I16(le(bytes, i16::from_le_bytes)),
            Elem::I32 => TensorData::I32(le(bytes, i32::from_le_bytes)),
            Elem::I64 => TensorData::I64(le(bytes, i64::from_le_bytes)),
            Elem::U16 => TensorData::I32(le(bytes, |a| u16::from_le_bytes(a) as i32)),
            Elem::U32 => TensorData::I64(le(bytes, |a| u32::from_le_bytes(a) as i64)),
            // numpy treats any non-zero byte as True when it reads such a buffer.
            Elem::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        }
    }
}

fn parse_descr(descr: &str) -> std::result::Result<Elem, String> {
    let (order, code) = match descr.chars().next() {
        Some(c @ ('<' | '>' | '|' | '=')) => (c, &descr[1..]),
        _ => ('=', descr),
    };
    let elem = match code {
        "f2" | "e" => Elem::F16,
        "f4" | "f" => Elem::F32,
        "f8" | "d" => Elem::F64,
        "i1" | "b" => Elem::I8,
        "u1" | "B" => Elem::U8,
        "i2" | "h" => Elem::I16,
        "i4" | "i" => Elem::I32,
        "i8" | "q" => Elem::I64,
        "u2" | "H" => Elem::U16,
        "u4" | "I" => Elem::U32,
        "b1" | "?" => Elem::Bool,
        _ => {
            return Err(format!(
            "unsupported dtype '{descr}' (supported: <f2 <f4 <f8 |i1 |u1 <i2 <i4 <i8 <u2 <u4 |b1)"
        ))
        }
    };
    if order == '>' && elem.size() > 1 {
        return Err(format!(
            "big-endian dtype '{descr}' is not supported; convert it with \
             arr.astype(arr.dtype.newbyteorder('<')) before saving"
        ));
    }
    Ok(elem)
}

struct Header {
    descr: String,
    elem: Elem,
    fortran_order: bool,
    shape: Vec<usize>,
}

fn parse_header(text: &str) -> std::result::Result<Header, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let value = p.value(0)?;
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(format!(
            "unexpected text after the dictionary at byte {}",
            p.i
        ));
    }
    let Value::Dict(entries) = value else {
        return Err("the header is not a dictionary".into());
    };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    for (k, v) in entries {
        match (k.as_str(), v) {
            ("descr", Value::Str(s)) => descr = Some(s),
            ("descr", Value::List) => {
                return Err("structured (record) dtypes are not supported".into())
            }
            ("descr", _) => return Err("'descr' is not a string".into()),
            ("fortran_order", Value::Bool(b)) => fortran = Some(b),
            ("fortran_order", _) => return Err("'fortran_order' is not True/False".into()),
            ("shape", Value::Tuple(items)) => {
                let mut dims = Vec::with_capacity(items.len());
                for it in items {
                    match it {
                        Value::Int(n) => dims.push(
                            usize::try_from(n).map_err(|_| format!("dimension {n} is invalid"))?,
                        ),
                        _ => return Err("'shape' holds a non-integer".into()),
                    }
                }
                shape = Some(dims);
            }
            ("shape", _) => return Err("'shape' is not a tuple".into()),
            // numpy rejects extra keys; being lenient costs nothing and helps hand-made files.
            _ => {}
        }
    }
    let descr = descr.ok_or("missing 'descr'")?;
    let elem = parse_descr(&descr)?;
    Ok(Header {
        descr,
        elem,
        fortran_order: fortran.ok_or("missing 'fortran_order'")?,
        shape: shape.ok_or("missing 'shape'")?,
    })
}

enum Value {
    Str(String),
    Bool(bool),
    Int(i128),
    None,
    Tuple(Vec<Value>),
    /// Only ever a structured dtype's field list, which is rejected, so its items are dropped.
    List,
    Dict(Vec<(String, Value)>),
}

/// A parser for the Python literal subset numpy writes: dicts with string keys, strings,
/// booleans, None, integers (with Python 2's `L` suffix), tuples and lists.
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", c as char, self.i))
        }
    }

    fn value(&mut self, depth: usize) -> std::result::Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err("nested too deeply".into());
        }
        match self.peek() {
            Some(b'{') => {
                self.i += 1;
                let mut entries = Vec::new();
                loop {
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                        return Ok(Value::Dict(entries));
                    }
                    let Value::Str(key) = self.value(depth + 1)? else {
                        return Err(format!("dictionary key is not a string at byte {}", self.i));
                    };
                    self.expect(b':')?;
                    let v = self.value(depth + 1)?;
                    entries.push((key, v));
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {}
                        _ => return Err(format!("expected ',' or '}}' at byte {}", self.i)),
                    }
                }
            }
            Some(open @ (b'(' | b'[')) => {
                self.i += 1;
                let close = if open == b'(' { b')' } else { b']' };
                let mut items = Vec::new();
                loop {
                    if self.peek() == Some(close) {
                        self.i += 1;
                        return Ok(if open == b'(' {
                            Value::Tuple(items)
                        } else {
                            Value::List
                        });
                    }
                    items.push(self.value(depth + 1)?);
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(c) if c == close => {}
                        _ => {
                            return Err(format!(
                                "expected ',' or a closing bracket at byte {}",
                                self.i
                            ))
                        }
                    }
                }
            }
            Some(q @ (b'\'' | b'"')) => {
                self.i += 1;
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i] != q {
                    // numpy never escapes, but skipping escapes keeps us in step with Python.
                    if self.s[self.i] == b'\\' {
                        self.i += 1;
                    }
                    self.i += 1;
                }
                if self.i >= self.s.len() {
                    return Err("unterminated string".into());
                }
                let text = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.i += 1;
                Ok(Value::Str(text))
            }
            Some(c) if c.is_ascii_digit() || c == b'-' || c == b'+' => {
                let start = self.i;
                self.i += 1;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                let n: i128 = digits
                    .parse()
                    .map_err(|_| format!("bad integer '{digits}' at byte {start}"))?;
                if matches!(self.s.get(self.i), Some(b'L' | b'l')) {
                    self.i += 1;
                }
                Ok(Value::Int(n))
            }
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_alphanumeric() {
                    self.i += 1;
                }
                match &self.s[start..self.i] {
                    b"True" => Ok(Value::Bool(true)),
                    b"False" => Ok(Value::Bool(false)),
                    b"None" => Ok(Value::None),
                    w => Err(format!(
                        "unexpected word '{}' at byte {start}",
                        String::from_utf8_lossy(w)
                    )),
                }
            }
            Some(c) => Err(format!("unexpected '{}' at byte {}", c as char, self.i)),
            None => Err("unexpected end of header".into()),
        }
    }
}

/// Reorders column-major data of `shape` into row-major order.
fn fortran_to_c(data: TensorData, shape: &[usize]) -> TensorData {
    fn permute<T: Copy>(v: Vec<T>, shape: &[usize]) -> Vec<T> {
        if v.is_empty() {
            return v;
        }
        let rank = shape.len();
        let mut f_stride = vec![1usize; rank];
        for k in 1..rank {
            f_stride[k] = f_stride[k - 1] * shape[k - 1];
        }
        let mut out = Vec::with_capacity(v.len());
        let mut idx = vec![0usize; rank];
        let mut off = 0usize;
        for _ in 0..v.len() {
            out.push(v[off]);
            // Odometer over the C-order index, keeping the Fortran offset in step.
            for k in (0..rank).rev() {
                idx[k] += 1;
                off += f_stride[k];
                if idx[k] < shape[k] {
                    break;
                }
                off -= f_stride[k] * shape[k];
                idx[k] = 0;
            }
        }
        out
    }
    match data {
        TensorData::F32(v) => TensorData::F32(permute(v, shape)),
        TensorData::F16(v) => TensorData::F16(permute(v, shape)),
        TensorData::F64(v) => TensorData::F64(permute(v, shape)),
        TensorData::I8(v) => TensorData::I8(permute(v, shape)),
        TensorData::U8(v) => TensorData::U8(permute(v, shape)),
        TensorData::I16(v) => TensorData::I16(permute(v, shape)),
        TensorData::I32(v) => TensorData::I32(permute(v, shape)),
        TensorData::I64(v) => TensorData::I64(permute(v, shape)),
        TensorData::Bool(v) => TensorData::Bool(permute(v, shape)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::{fixture, TempDir};

    fn samples() -> Vec<Tensor> {
        vec![
            Tensor::from_f32(
                vec![2, 3],
                vec![1.5, -2.0, 0.0, f32::MAX, f32::MIN_POSITIVE, 7.25],
            )
            .unwrap(),
            Tensor::new(vec![3], TensorData::F16(vec![0x3c00, 0xc000, 0x7bff])).unwrap(),
            Tensor::new(vec![2, 2], TensorData::F64(vec![1e300, -1e-300, 0.5, 3.0])).unwrap(),
            Tensor::new(vec![4], TensorData::I8(vec![-128, -1, 0, 127])).unwrap(),
            Tensor::new(vec![2, 1, 2], TensorData::U8(vec![0, 1, 254, 255])).unwrap(),
            Tensor::new(vec![3], TensorData::I16(vec![i16::MIN, 0, i16::MAX])).unwrap(),
            Tensor::new(vec![3], TensorData::I32(vec![i32::MIN, 5, i32::MAX])).unwrap(),
            Tensor::new(vec![1, 3], TensorData::I64(vec![i64::MIN, -7, i64::MAX])).unwrap(),
            Tensor::new(vec![3], TensorData::Bool(vec![true, false, true])).unwrap(),
            Tensor::scalar_f32(42.0),
            Tensor::zeros(DType::F32, vec![0, 5]).unwrap(),
        ]
    }

    #[test]
    fn round_trip_every_dtype_in_memory_and_on_disk() {
        let dir = TempDir::new("npy");
        for (i, t) in samples().into_iter().enumerate() {
            let bytes = encode_npy(&t);
            // numpy aligns the data start to 64 bytes.
            let hl = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
            assert_eq!((10 + hl) % 64, 0);
            assert_eq!(decode_npy(&bytes, "mem").unwrap(), t);
            let p = dir.path(&format!("t{i}.npy"));
            write_npy(&p, &t).unwrap();
            assert_eq!(read_npy(&p).unwrap(), t);
        }
    }

    #[test]
    fn reads_files_written_by_numpy() {
        // Made by tests/fixtures/data/make_fixtures.py: arange(6) reshaped to (2, 3) in each dtype.
        for (file, dtype) in [
            ("f4.npy", DType::F32),
            ("f8.npy", DType::F64),
            ("f2.npy", DType::F16),
            ("i1.npy", DType::I8),
            ("u1.npy", DType::U8),
            ("i2.npy", DType::I16),
            ("i4.npy", DType::I32),
            ("i8.npy", DType::I64),
        ] {
            let t = read_npy(fixture(file)).unwrap();
            assert_eq!(t.dtype(), dtype, "{file}");
            assert_eq!(t.shape(), &[2, 3], "{file}");
            assert_eq!(t.to_f32_vec(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "{file}");
        }
        let b = read_npy(fixture("b1.npy")).unwrap();
        assert_eq!(
            b.data(),
            &TensorData::Bool(vec![true, false, true, false, true, false])
        );
        let s = read_npy(fixture("scalar.npy")).unwrap();
        assert_eq!(s.shape(), &[] as &[usize]);
        assert_eq!(s.to_f32_vec(), vec![3.5]);
        let u = read_npy(fixture("u4.npy")).unwrap();
        assert_eq!(u.data(), &TensorData::I64(vec![0, 1, 4_000_000_000]));
    }

    #[test]
    fn reads_versions_2_and_3_and_fortran_order() {
        let expect: Vec<f32> = (0..24).map(|x| x as f32).collect();
        for file in ["v2.npy", "v3.npy", "fortran.npy"] {
            let t = read_npy(fixture(file)).unwrap();
            assert_eq!(t.shape(), &[2, 3, 4], "{file}");
            assert_eq!(t.to_f32_vec(), expect, "{file}");
        }
    }

    #[test]
    fn big_endian_is_a_clear_error() {
        let err = read_npy(fixture("big_endian.npy")).unwrap_err().to_string();
        assert!(
            err.contains("big_endian.npy") && err.contains("big-endian"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = encode_npy(&Tensor::from_f32(vec![2, 2], vec![1.0; 4]).unwrap());
        // Every truncation and every single-byte corruption of the header.
        for n in 0..good.len() {
            let _ = decode_npy(&good[..n], "cut");
        }
        for i in 0..80 {
            for b in [0u8, b'(', b')', b'{', b'\'', b'9', b'-', 0xff] {
                let mut bad = good.clone();
                bad[i] = b;
                let _ = decode_npy(&bad, "flip");
            }
        }
        for header in [
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }",
            "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }",
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
            "{'descr': '<f4', 'shape': (1,), }",
            "((((((((((((((((((((((((((((((((((((((((",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), } trailing",
        ] {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&[1, 0]);
            bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&[0; 4]);
            let err = decode_npy(&bytes, "hdr.npy").unwrap_err().to_string();
            assert!(err.starts_with("hdr.npy: "), "{err}");
        }
    }

    #[test]
    fn tolerates_python2_longs_and_extra_spacing() {
        let header = "{ 'shape' : (2L, 1L) , 'fortran_order':True,'descr':'<i4' }";
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&7i32.to_le_bytes());
        bytes.extend_from_slice(&8i32.to_le_bytes());
        let t = decode_npy(&bytes, "py2").unwrap();
        assert_eq!(t.shape(), &[2, 1]);
        assert_eq!(t.data(), &TensorData::I32(vec![7, 8]));
    }

    #[test]
    fn fortran_transpose_matches_index_math() {
        // A (2, 3) array [[0,1,2],[3,4,5]] stored column-major is 0,3,1,4,2,5.
        let d = fortran_to_c(TensorData::I32(vec![0, 3, 1, 4, 2, 5]), &[2, 3]);
        assert_eq!(d, TensorData::I32(vec![0, 1, 2, 3, 4, 5]));
    }
}
