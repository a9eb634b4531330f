//! IR [`Model`] -> ONNX `ModelProto`: tensors as little-endian `raw_data` (or external data),
//! initializers as initializers, and every name, doc string and piece of metadata kept.

use std::path::Path;

use prost::Message;

use super::atomic::AtomicFile;
use super::external::{entries, ExternalWriter};
use super::proto::attribute_proto::AttributeType;
use super::proto::tensor_proto::DataLocation;
use super::proto::tensor_shape_proto::{dimension::Value as DimValue, Dimension};
use super::proto::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use super::tensor_codec::{tensor_header, tensor_to_proto};
use crate::error::{Error, Result};
use crate::ir::{Attr, Dim, Model, Node, Tensor, TypeInfo};

/// Serialized size above which [`ExternalData::Auto`] moves weights out by default: below
/// protobuf's 2 GiB limit with room for the graph itself.
pub const DEFAULT_EXTERNAL_THRESHOLD: u64 = 1_800_000_000;

/// Initializers smaller than this stay inside the `.onnx` file even when saving external data
/// (the ONNX tools' convention: shapes and biases are not worth a seek).
pub const MIN_EXTERNAL_TENSOR_BYTES: usize = 1024;

/// Largest message protobuf implementations accept.
const MAX_PROTO_BYTES: usize = i32::MAX as usize;

/// Where initializer data goes when saving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExternalData {
    /// Everything inside the `.onnx` file; an error if that exceeds 2 GiB.
    Never,
    /// External data when the inline model would serialize to more than `threshold_bytes`.
    Auto { threshold_bytes: u64 },
    /// Initializers of at least [`MIN_EXTERNAL_TENSOR_BYTES`] go to the external data file.
    Always,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveOptions {
    /// External data is written to `<model file name>.data` beside the model.
    pub external_data: ExternalData,
}

impl Default for SaveOptions {
    fn default() -> SaveOptions {
        SaveOptions {
            external_data: ExternalData::Auto {
                threshold_bytes: DEFAULT_EXTERNAL_THRESHOLD,
            },
        }
    }
}

/// Serializes a model with every tensor inline.
pub fn encode_model(model: &Model) -> Result<Vec<u8>> {
    let proto = raise_model(model, &mut |name, t| Ok(tensor_to_proto(name, t)))?;
    check_size(&proto)?;
    Ok(proto.encode_to_vec())
}

/// Writes a model to `path` atomically (temporary file, fsync, rename), with external data
/// in `<file name>.data` beside it when `opts` asks for it.
pub fn save_model(model: &Model, path: &Path, opts: &SaveOptions) -> Result<()> {
    let external = match opts.external_data {
        ExternalData::Never => false,
        ExternalData::Always => true,
        ExternalData::Auto { threshold_bytes } => inline_size(model)? > threshold_bytes,
    };
    let bytes = if external {
        let file_name = path.file_name().ok_or_else(|| {
            Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
            )
        })?;
        let location = format!("{}.data", file_name.to_string_lossy());
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut writer: Option<ExternalWriter> = None;
        let proto = raise_model(model, &mut |name, t| {
            if t.size_in_bytes() < MIN_EXTERNAL_TENSOR_BYTES {
                return Ok(tensor_to_proto(name, t));
            }
            let w = match &mut writer {
                Some(w) => w,
                None => writer.insert(ExternalWriter::create(dir, &location)?),
            };
            let slot = w.append(t.data())?;
            Ok(TensorProto {
                data_location: Some(DataLocation::External as i32),
                external_data: entries(w.location(), &slot),
                ..tensor_header(name, t)
            })
        })?;
        check_size(&proto)?;
        let bytes = proto.encode_to_vec();
        drop(proto);
        // The data file goes first so the model never points at data that is not there yet.
        if let Some(w) = writer {
            w.commit()?;
        }
        bytes
    } else {
        encode_model(model)?
    };
    let mut file = AtomicFile::create(path)?;
    file.write_all(&bytes)?;
    file.commit()
}

/// Serialized size of the model with all data inline, without building the data.
fn inline_size(model: &Model) -> Result<u64> {
    let skeleton = raise_model(model, &mut |name, t| Ok(tensor_header(name, t)))?;
    let data: u64 = model
        .graph
        .initializers
        .values()
        .map(|t| t.size_in_bytes() as u64 + 16)
        .sum();
    Ok(skeleton.encoded_len() as u64 + data)
}

fn check_size(proto: &ModelProto) -> Result<()> {
    let len = proto.encoded_len();
    if len > MAX_PROTO_BYTES {
        return Err(Error::TooLarge(format!(
            "the model serializes to {len} bytes, over protobuf's 2 GiB limit; save it with external data"
        )));
    }
    Ok(())
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

type TensorSink<'a> = dyn FnMut(&str, &Tensor) -> Result<TensorProto> + 'a;

/// Builds the `ModelProto`; `sink` turns each initializer into its `TensorProto`.
fn raise_model(model: &Model, sink: &mut TensorSink<'_>) -> Result<ModelProto> {
    let g = &model.graph;
    // A model without a version (built in memory) gets the one Model::new uses.
    let ir_version = if model.ir_version > 0 {
        model.ir_version
    } else {
        8
    };
    let initializer = g
        .initializers
        .iter()
        .map(|(name, t)| sink(name, t))
        .collect::<Result<Vec<_>>>()?;
    let mut input: Vec<ValueInfoProto> = g
        .inputs
        .iter()
        .map(|v| raise_value_info(&v.name, &v.ty, &v.doc_string))
        .collect();
    // Before IR version 4 every initializer had to be listed as a graph input as well.
    if ir_version < 4 {
        input.extend(
            g.initializers.iter().map(|(name, t)| {
                raise_value_info(name, &TypeInfo::known(t.dtype(), t.shape()), "")
            }),
        );
    }
    let graph = GraphProto {
        node: g.nodes.iter().map(raise_node).collect(),
        name: opt(&g.name),
        initializer,
        doc_string: opt(&g.doc_string),
        input,
        output: g
            .outputs
            .iter()
            .map(|v| raise_value_info(&v.name, &v.ty, &v.doc_string))
            .collect(),
        value_info: g
            .value_info
            .iter()
            .map(|(name, ty)| raise_value_info(name, ty, ""))
            .collect(),
        ..GraphProto::default()
    };
    Ok(ModelProto {
        ir_version: Some(ir_version),
        opset_import: model
            .opset_imports
            .iter()
            .map(|o| OperatorSetIdProto {
                domain: Some(o.domain.clone()),
                version: Some(o.version),
            })
            .collect(),
        producer_name: opt(&model.producer_name),
        producer_version: opt(&model.producer_version),
        domain: opt(&model.domain),
        model_version: (model.model_version != 0).then_some(model.model_version),
        doc_string: opt(&model.doc_string),
        graph: Some(graph),
        metadata_props: model
            .metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: Some(k.clone()),
                value: Some(v.clone()),
            })
            .collect(),
        ..ModelProto::default()
    })
}

fn raise_value_info(name: &str, ty: &TypeInfo, doc: &str) -> ValueInfoProto {
    let shape = ty.shape.as_ref().map(|dims| TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dimension {
                denotation: None,
                value: match d {
                    Dim::Known(n) => Some(DimValue::DimValue(*n as i64)),
                    Dim::Sym(s) => Some(DimValue::DimParam(s.clone())),
                    Dim::Unknown => None,
                },
            })
            .collect(),
    });
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            denotation: None,
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(ty.dtype.onnx_code()),
                shape,
            })),
        }),
        doc_string: opt(doc),
        ..ValueInfoProto::default()
    }
}

fn raise_node(n: &Node) -> NodeProto {
    NodeProto {
        input: n.inputs.clone(),
        output: n.outputs.clone(),
        name: opt(&n.name),
        op_type: Some(n.op_type.clone()),
        domain: opt(&n.domain),
        attribute: n.attrs.iter().map(|(k, v)| raise_attr(k, v)).collect(),
        doc_string: opt(&n.doc_string),
        ..NodeProto::default()
    }
}

fn raise_attr(name: &str, a: &Attr) -> AttributeProto {
    let mut p = AttributeProto {
        name: Some(name.to_string()),
        ..AttributeProto::default()
    };
    let ty = match a {
        Attr::Float(v) => {
            p.f = Some(*v);
            AttributeType::Float
        }
        Attr::Int(v) => {
            p.i = Some(*v);
            AttributeType::Int
        }
        Attr::String(s) => {
            p.s = Some(s.as_bytes().to_vec());
            AttributeType::String
        }
        Attr::Tensor(t) => {
            p.t = Some(tensor_to_proto("", t));
            AttributeType::Tensor
        }
        Attr::Floats(v) => {
            p.floats = v.clone();
            AttributeType::Floats
        }
        Attr::Ints(v) => {
            p.ints = v.clone();
            AttributeType::Ints
        }
        Attr::Strings(v) => {
            p.strings = v.iter().map(|s| s.as_bytes().to_vec()).collect();
            AttributeType::Strings
        }
    };
    p.r#type = Some(ty as i32);
    p
}
