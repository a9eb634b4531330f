//! `TensorProto` <-> [`Tensor`]: dtype mapping, size validation and little-endian
//! (de)serialisation of raw data, typed fields and external data.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

use prost::Message;

use super::atomic::AtomicFile;
use super::external::ExternalReader;
use super::proto::tensor_proto::{DataLocation, DataType};
use super::proto::TensorProto;
use crate::error::{Error, Result};
use crate::ir::{checked_numel, DType, Tensor, TensorData};

/// Conversion buffer size; a multiple of every element size so no element straddles two chunks.
const CHUNK: usize = 64 * 1024;

/// Name of an ONNX data type code, including the types newer than [`DType::onnx_code_name`] knows.
pub(crate) fn onnx_type_name(code: i32) -> &'static str {
    DataType::try_from(code)
        .map(|d| d.as_str_name())
        .unwrap_or_else(|_| DType::onnx_code_name(code))
}

/// Converts a `TensorProto` into a tensor. External data is resolved relative to `base_dir`
/// (the folder of the model or `.pb` file); without one, external tensors are an error.
pub fn tensor_from_proto(proto: &TensorProto, base_dir: Option<&Path>) -> Result<Tensor> {
    let mut ext = ExternalReader::new(base_dir);
    decode_tensor(proto, proto.name(), &mut ext)
}

/// Converts a tensor into a `TensorProto` with little-endian `raw_data`.
pub fn tensor_to_proto(name: &str, tensor: &Tensor) -> TensorProto {
    TensorProto {
        raw_data: Some(to_le_bytes(tensor.data()).into()),
        ..tensor_header(name, tensor)
    }
}

/// Reads a file holding one serialized `TensorProto` (as in ONNX `test_data_set_N/*.pb`),
/// returning the tensor's name and value.
pub fn load_tensor_pb(path: &Path) -> Result<(String, Tensor)> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Decode {
            path: path.to_path_buf(),
            msg: "not a regular file".into(),
        });
    }
    let bytes = prost::bytes::Bytes::from(fs::read(path).map_err(|e| Error::io(path, e))?);
    let proto = TensorProto::decode(bytes).map_err(|e| Error::Decode {
        path: path.to_path_buf(),
        msg: one_line(&e.to_string()),
    })?;
    let tensor = tensor_from_proto(&proto, path.parent()).map_err(one_line_error)?;
    Ok((proto.name().to_string(), tensor))
}

/// Writes one tensor as a serialized `TensorProto` file, atomically.
pub fn save_tensor_pb(path: &Path, name: &str, tensor: &Tensor) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(&tensor_to_proto(name, tensor).encode_to_vec())?;
    file.commit()
}

pub(crate) fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Escapes control characters: names inside a file may hold newlines, and every error
/// about a file must stay one line.
fn escape_controls(s: String) -> String {
    if !s.chars().any(char::is_control) {
        return s;
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Makes an error raised while reading a file print as one line, whatever the file's
/// names contain.
pub(crate) fn one_line_error(e: Error) -> Error {
    let f = escape_controls;
    match e {
        Error::Decode { path, msg } => Error::Decode { path, msg: f(msg) },
        Error::Format(m) => Error::Format(f(m)),
        Error::UnsupportedOp {
            op_type,
            domain,
            opset,
            node,
        } => Error::UnsupportedOp {
            op_type: f(op_type),
            domain: f(domain),
            opset,
            node: f(node),
        },
        Error::Attribute { node, msg } => Error::Attribute {
            node: f(node),
            msg: f(msg),
        },
        Error::Node { node, op_type, msg } => Error::Node {
            node: f(node),
            op_type: f(op_type),
            msg: f(msg),
        },
        Error::Tensor { name, msg } => Error::Tensor {
            name: f(name),
            msg: f(msg),
        },
        Error::Shape(m) => Error::Shape(f(m)),
        Error::DType(m) => Error::DType(f(m)),
        Error::Graph(m) => Error::Graph(f(m)),
        Error::TooLarge(m) => Error::TooLarge(f(m)),
        Error::ExternalData { tensor, msg } => Error::ExternalData {
            tensor: f(tensor),
            msg: f(msg),
        },
        Error::Input { name, msg } => Error::Input {
            name: f(name),
            msg: f(msg),
        },
        Error::Data(m) => Error::Data(f(m)),
        other => other,
    }
}

/// Error text with a bound: a hostile file can declare a shape with millions of dimensions.
fn clip(s: String) -> String {
    const MAX: usize = 240;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// A `TensorProto` with name, type and dims but no data.
pub(crate) fn tensor_header(name: &str, tensor: &Tensor) -> TensorProto {
    TensorProto {
        dims: tensor.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(tensor.dtype().onnx_code()),
        name: (!name.is_empty()).then(|| name.to_string()),
        ..TensorProto::default()
    }
}

/// Decodes `proto`, naming it `label` in errors (attribute tensors often have no name).
pub(crate) fn decode_tensor(
    proto: &TensorProto,
    label: &str,
    ext: &mut ExternalReader<'_>,
) -> Result<Tensor> {
    let err = |msg: String| Error::Tensor {
        name: label.to_string(),
        msg: clip(msg),
    };
    if proto.segment.is_some() {
        return Err(err("segmented tensors are not supported".into()));
    }
    let code = proto.data_type.unwrap_or(0);
    let dtype = DType::from_onnx_code(code).ok_or_else(|| {
        err(format!(
            "data type {} ({code}) is not supported",
            onnx_type_name(code)
        ))
    })?;
    let shape = dims_to_shape(&proto.dims).map_err(err)?;
    let numel = checked_numel(&shape, dtype.size_of()).map_err(|e| err(e.to_string()))?;
    // Cannot overflow: checked_numel bounds numel * size by MAX_TENSOR_BYTES.
    let byte_len = numel * dtype.size_of();

    let data = if proto.data_location == Some(DataLocation::External as i32) {
        let mut reader = ext.open(label, &proto.external_data, byte_len as u64)?;
        read_le(dtype, numel, &mut reader).map_err(|e| Error::ExternalData {
            tensor: label.to_string(),
            msg: format!("reading {byte_len} bytes failed: {e}"),
        })?
    } else if let Some(raw) = &proto.raw_data {
        if raw.len() != byte_len {
            return Err(err(format!(
                "raw_data has {} bytes but shape {shape:?} of {dtype} needs {byte_len}",
                raw.len()
            )));
        }
        from_le_bytes(dtype, raw)
    } else {
        typed_field_data(proto, dtype, numel).map_err(|m| err(format!("{m} (shape {shape:?})")))?
    };
    Tensor::new(shape, data).map_err(|e| err(e.to_string()))
}

/// ONNX dims to a shape; negative dimensions are errors.
pub(crate) fn dims_to_shape(dims: &[i64]) -> Result<Vec<usize>, String> {
    dims.iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("dims {dims:?} contain a negative size")))
        .collect()
}

/// Data from the typed repeated fields, which ONNX assigns per dtype (int32_data carries every
/// type narrower than 32 bits, f16 as its raw bit pattern).
fn typed_field_data(
    proto: &TensorProto,
    dtype: DType,
    numel: usize,
) -> std::result::Result<TensorData, String> {
    fn check<T>(v: &[T], field: &str, numel: usize) -> std::result::Result<(), String> {
        if v.len() == numel {
            Ok(())
        } else {
            Err(format!(
                "{field} has {} values but {numel} are needed",
                v.len()
            ))
        }
    }
    let narrow = |conv: fn(&[i32]) -> TensorData| {
        check(&proto.int32_data, "int32_data", numel).map(|()| conv(&proto.int32_data))
    };
    match dtype {
        DType::F32 => {
            check(&proto.float_data, "float_data", numel)?;
            Ok(TensorData::F32(proto.float_data.clone()))
        }
        DType::F64 => {
            check(&proto.double_data, "double_data", numel)?;
            Ok(TensorData::F64(proto.double_data.clone()))
        }
        DType::I64 => {
            check(&proto.int64_data, "int64_data", numel)?;
            Ok(TensorData::I64(proto.int64_data.clone()))
        }
        DType::I32 => narrow(|v| TensorData::I32(v.to_vec())),
        DType::I16 => narrow(|v| TensorData::I16(v.iter().map(|&x| x as i16).collect())),
        DType::I8 => narrow(|v| TensorData::I8(v.iter().map(|&x| x as i8).collect())),
        DType::U8 => narrow(|v| TensorData::U8(v.iter().map(|&x| x as u8).collect())),
        DType::Bool => narrow(|v| TensorData::Bool(v.iter().map(|&x| x != 0).collect())),
        DType::F16 => narrow(|v| TensorData::F16(v.iter().map(|&x| x as u16).collect())),
    }
}

/// Reads `numel` little-endian elements of `dtype` from `r`, in bounded chunks so that
/// memory stays proportional to the tensor rather than to any declared length.
pub(crate) fn read_le(dtype: DType, numel: usize, r: &mut dyn Read) -> io::Result<TensorData> {
    Ok(match dtype {
        DType::F32 => TensorData::F32(read_vec(numel, r, f32::from_le_bytes)?),
        DType::F16 => TensorData::F16(read_vec(numel, r, u16::from_le_bytes)?),
        DType::F64 => TensorData::F64(read_vec(numel, r, f64::from_le_bytes)?),
        DType::I8 => TensorData::I8(read_vec(numel, r, i8::from_le_bytes)?),
        DType::U8 => TensorData::U8(read_vec(numel, r, u8::from_le_bytes)?),
        DType::I16 => TensorData::I16(read_vec(numel, r, i16::from_le_bytes)?),
        DType::I32 => TensorData::I32(read_vec(numel, r, i32::from_le_bytes)?),
        DType::I64 => TensorData::I64(read_vec(numel, r, i64::from_le_bytes)?),
        DType::Bool => TensorData::Bool(read_vec(numel, r, |b: [u8; 1]| b[0] != 0)?),
    })
}

/// [`read_le`] of bytes already in memory (a whole number of `dtype` elements), in one pass.
fn from_le_bytes(dtype: DType, raw: &[u8]) -> TensorData {
    fn conv<T, const N: usize>(raw: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        raw.chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect()
    }
    match dtype {
        DType::F32 => TensorData::F32(conv(raw, f32::from_le_bytes)),
        DType::F16 => TensorData::F16(conv(raw, u16::from_le_bytes)),
        DType::F64 => TensorData::F64(conv(raw, f64::from_le_bytes)),
        DType::I8 => TensorData::I8(conv(raw, i8::from_le_bytes)),
        DType::U8 => TensorData::U8(raw.to_vec()),
        DType::I16 => TensorData::I16(conv(raw, i16::from_le_bytes)),
        DType::I32 => TensorData::I32(conv(raw, i32::from_le_bytes)),
        DType::I64 => TensorData::I64(conv(raw, i64::from_le_bytes)),
        DType::Bool => TensorData::Bool(raw.iter().map(|&b| b != 0).collect()),
    }
}

fn read_vec<T, const N: usize>(
    numel: usize,
    r: &mut dyn Read,
    conv: impl Fn([u8; N]) -> T,
) -> io::Result<Vec<T>> {
    // Callers validated numel against the bytes actually available; a large external data
    // file may still hold more than memory does: an error, not an abort.
    let mut out = Vec::new();
    out.try_reserve_exact(numel).map_err(|_| {
        io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!(
                "cannot allocate {} bytes for the tensor",
                numel.saturating_mul(N)
            ),
        )
    })?;
    let mut left = numel * N;
    let mut buf = vec![0u8; left.min(CHUNK)];
    while left > 0 {
        let n = left.min(buf.len());
        r.read_exact(&mut buf[..n])?;
        out.extend(buf[..n].chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            conv(a)
        }));
        left -= n;
    }
    Ok(out)
}

/// Little-endian bytes of a tensor's data (bool as one byte, f16 as its bits).
pub(crate) fn to_le_bytes(data: &TensorData) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * data.dtype().size_of());
    // Writing into a Vec cannot fail.
    let _ = write_le(data, &mut out);
    out
}

/// Streams a tensor's data as little-endian bytes.
pub(crate) fn write_le(data: &TensorData, w: &mut dyn Write) -> io::Result<()> {
    match data {
        TensorData::F32(v) => write_vec(v, w, f32::to_le_bytes),
        TensorData::F16(v) => write_vec(v, w, u16::to_le_bytes),
        TensorData::F64(v) => write_vec(v, w, f64::to_le_bytes),
        TensorData::I8(v) => write_vec(v, w, i8::to_le_bytes),
        TensorData::U8(v) => w.write_all(v),
        TensorData::I16(v) => write_vec(v, w, i16::to_le_bytes),
        TensorData::I32(v) => write_vec(v, w, i32::to_le_bytes),
        TensorData::I64(v) => write_vec(v, w, i64::to_le_bytes),
        TensorData::Bool(v) => write_vec(v, w, |b: bool| [b as u8]),
    }
}

fn write_vec<T: Copy, const N: usize>(
    v: &[T],
    w: &mut dyn Write,
    conv: impl Fn(T) -> [u8; N],
) -> io::Result<()> {
    // Converting into fixed-size slots vectorizes; growing a Vec element by element did not.
    let mut buf = vec![0u8; CHUNK.min(v.len() * N)];
    for chunk in v.chunks(CHUNK / N) {
        let bytes = &mut buf[..chunk.len() * N];
        for (o, &x) in bytes.chunks_exact_mut(N).zip(chunk) {
            o.copy_from_slice(&conv(x));
        }
        w.write_all(bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(t: &Tensor) -> Tensor {
        tensor_from_proto(&tensor_to_proto("t", t), None).unwrap()
    }

    #[test]
    fn raw_data_round_trips_across_chunk_boundaries() {
        // Sizes past the 64 KiB conversion chunk for each element width.
        let n = 3 * CHUNK / 2 + 3;
        let tensors = [
            Tensor::new(
                vec![n],
                TensorData::F32((0..n).map(|i| i as f32 * 0.5).collect()),
            ),
            Tensor::new(vec![n], TensorData::F16((0..n).map(|i| i as u16).collect())),
            Tensor::new(
                vec![n],
                TensorData::F64((0..n).map(|i| -(i as f64)).collect()),
            ),
            Tensor::new(vec![n], TensorData::I8((0..n).map(|i| i as i8).collect())),
            Tensor::new(vec![n], TensorData::U8((0..n).map(|i| i as u8).collect())),
            Tensor::new(vec![n], TensorData::I16((0..n).map(|i| i as i16).collect())),
            Tensor::new(
                vec![n],
                TensorData::I32((0..n).map(|i| i as i32 - 7).collect()),
            ),
            Tensor::new(
                vec![n],
                TensorData::I64((0..n).map(|i| (i as i64) << 33).collect()),
            ),
            Tensor::new(
                vec![n],
                TensorData::Bool((0..n).map(|i| i % 3 == 0).collect()),
            ),
        ];
        for t in tensors {
            let t = t.unwrap();
            assert_eq!(round_trip(&t), t, "{}", t.dtype());
        }
    }

    #[test]
    fn raw_bytes_are_little_endian() {
        let t = Tensor::new(vec![2], TensorData::I16(vec![1, -2])).unwrap();
        assert_eq!(
            tensor_to_proto("x", &t).raw_data.unwrap(),
            vec![1, 0, 0xfe, 0xff]
        );
        let b = Tensor::new(vec![2], TensorData::Bool(vec![true, false])).unwrap();
        assert_eq!(tensor_to_proto("b", &b).raw_data.unwrap(), vec![1, 0]);
    }

    #[test]
    fn short_reader_is_an_error() {
        let bytes = [0u8; 7];
        assert!(read_le(DType::F32, 2, &mut &bytes[..]).is_err());
    }

    #[test]
    fn segmented_tensors_are_errors() {
        let mut p = tensor_to_proto("seg", &Tensor::scalar_f32(1.0));
        p.segment = Some(super::super::proto::tensor_proto::Segment {
            begin: Some(0),
            end: Some(1),
        });
        let e = tensor_from_proto(&p, None).unwrap_err().to_string();
        assert!(e.contains("seg") && e.contains("segment"), "{e}");
    }

    #[test]
    fn error_text_is_bounded_and_single_line() {
        let p = TensorProto {
            name: Some("many\ndims".into()),
            data_type: Some(1),
            dims: vec![1; 100_000],
            raw_data: Some(Default::default()),
            ..TensorProto::default()
        };
        let e = one_line_error(tensor_from_proto(&p, None).unwrap_err()).to_string();
        assert!(e.len() < 400, "{} bytes", e.len());
        assert!(!e.contains('\n') && e.contains("many\\ndims"), "{e}");
    }
}
