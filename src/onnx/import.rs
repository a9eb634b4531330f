//! ONNX `ModelProto` -> IR [`Model`]: decode with prost, then lower graph, nodes, attributes,
//! types and tensors, rejecting what the IR cannot represent with an error naming the culprit.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::Path;

use prost::Message;

use super::external::ExternalReader;
use super::proto::attribute_proto::AttributeType;
use super::proto::tensor_shape_proto::dimension::Value as DimValue;
use super::proto::type_proto::Value as TypeValue;
use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto,
};
use super::tensor_codec::{decode_tensor, one_line, one_line_error, onnx_type_name};
use crate::error::{Error, Result};
use crate::ir::{Attr, DType, Dim, Graph, Model, Node, OpsetImport, Tensor, TypeInfo, ValueInfo};

/// Protobuf cannot represent a message of 2 GiB or more; larger models keep their weights
/// in external data, so a bigger `.onnx` file is not a model.
const MAX_PROTO_BYTES: u64 = i32::MAX as u64;

/// Reads an ONNX model file. External data is looked up beside the file.
pub fn load_model(path: &Path) -> Result<Model> {
    let decode_err = |msg: String| Error::Decode {
        path: path.to_path_buf(),
        msg,
    };
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(decode_err("not a regular file".into()));
    }
    if meta.len() > MAX_PROTO_BYTES {
        return Err(decode_err(format!(
            "the file is {} bytes, over protobuf's 2 GiB message limit (large models keep weights in external data)",
            meta.len()
        )));
    }
    // Decoded from a `Bytes` image, each tensor's raw_data is a view of it rather than a copy;
    // the image is freed once the last tensor has been converted.
    let bytes = prost::bytes::Bytes::from(fs::read(path).map_err(|e| Error::io(path, e))?);
    let proto = decode_proto(bytes, path)?;
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    lower_model(proto, Some(base), path).map_err(one_line_error)
}

/// Decodes a serialized model. `base_dir` is where external data is looked up (`None`: external
/// tensors are an error); `path_for_errors` names the source in decode errors.
pub fn decode_model(
    bytes: &[u8],
    base_dir: Option<&Path>,
    path_for_errors: &Path,
) -> Result<Model> {
    let proto = decode_proto(bytes, path_for_errors)?;
    lower_model(proto, base_dir, path_for_errors).map_err(one_line_error)
}

fn decode_proto(bytes: impl prost::bytes::Buf, path: &Path) -> Result<ModelProto> {
    ModelProto::decode(bytes).map_err(|e| Error::Decode {
        path: path.to_path_buf(),
        msg: one_line(&e.to_string()),
    })
}

fn lower_model(proto: ModelProto, base: Option<&Path>, path: &Path) -> Result<Model> {
    let Some(graph_proto) = proto.graph else {
        return Err(Error::Decode {
            path: path.to_path_buf(),
            msg: "the model has no graph".into(),
        });
    };
    // Model-local functions are only an error when a node calls one.
    let functions: HashSet<(String, String)> = proto
        .functions
        .iter()
        .map(|f| (f.domain().to_string(), f.name().to_string()))
        .collect();
    let mut ext = ExternalReader::new(base);
    let graph = lower_graph(graph_proto, &functions, &mut ext)?;
    Ok(Model {
        graph,
        ir_version: proto.ir_version.unwrap_or(0),
        opset_imports: proto
            .opset_import
            .iter()
            .map(|o| OpsetImport {
                domain: o.domain().to_string(),
                version: o.version(),
            })
            .collect(),
        producer_name: proto.producer_name.unwrap_or_default(),
        producer_version: proto.producer_version.unwrap_or_default(),
        domain: proto.domain.unwrap_or_default(),
        model_version: proto.model_version.unwrap_or(0),
        doc_string: proto.doc_string.unwrap_or_default(),
        metadata: proto
            .metadata_props
            .iter()
            .map(|e| (e.key().to_string(), e.value().to_string()))
            .collect(),
    })
}

fn lower_graph(
    g: GraphProto,
    functions: &HashSet<(String, String)>,
    ext: &mut ExternalReader<'_>,
) -> Result<Graph> {
    if let Some(s) = g.sparse_initializer.first() {
        let name = s.values.as_ref().map(TensorProto::name).unwrap_or("");
        return Err(Error::Tensor {
            name: name.to_string(),
            msg: "sparse initializers are not supported".into(),
        });
    }
    let mut initializers = BTreeMap::new();
    for t in g.initializer {
        let name = t.name().to_string();
        if name.is_empty() {
            return Err(Error::Graph("an initializer has no name".into()));
        }
        let tensor = decode_tensor(&t, &name, ext)?;
        // Release each proto's bytes as soon as its tensor exists, keeping peak memory near
        // one copy of the weights.
        drop(t);
        define_initializer(&mut initializers, name, tensor)?;
    }

    // An input that also has an initializer is a constant with a default value, not a feed.
    let inputs = g
        .input
        .iter()
        .filter(|vi| !initializers.contains_key(vi.name()))
        .map(|vi| lower_value_info(vi, "graph input"))
        .collect::<Result<Vec<_>>>()?;
    let outputs = g
        .output
        .iter()
        .map(|vi| lower_value_info(vi, "graph output"))
        .collect::<Result<Vec<_>>>()?;
    // value_info is advisory: entries the IR cannot type (sequences, strings...) are dropped.
    let value_info = g
        .value_info
        .iter()
        .filter(|vi| !vi.name().is_empty())
        .filter_map(|vi| Some((vi.name().to_string(), lower_type(vi.r#type.as_ref()).ok()?)))
        .collect();

    let mut nodes = Vec::with_capacity(g.node.len());
    for n in g.node {
        match lower_node(n, functions, ext)? {
            Lowered::Node(node) => nodes.push(node),
            Lowered::Constant(name, tensor) => define_initializer(&mut initializers, name, tensor)?,
        }
    }

    let mut graph = Graph {
        name: g.name.unwrap_or_default(),
        doc_string: g.doc_string.unwrap_or_default(),
        nodes,
        inputs,
        outputs,
        initializers,
        value_info,
    };
    check_graph(&mut graph)?;
    Ok(graph)
}

fn define_initializer(
    initializers: &mut BTreeMap<String, Tensor>,
    name: String,
    tensor: Tensor,
) -> Result<()> {
    if initializers.contains_key(&name) {
        return Err(Error::Graph(format!(
            "value '{name}' is defined more than once"
        )));
    }
    initializers.insert(name, tensor);
    Ok(())
}

/// Checks single assignment and that outputs are produced, then orders nodes topologically
/// (leaving an already ordered file untouched so a round trip keeps its order).
fn check_graph(graph: &mut Graph) -> Result<()> {
    let mut defined: HashSet<&str> = graph.initializers.keys().map(String::as_str).collect();
    let produced = graph.inputs.iter().map(|v| v.name.as_str()).chain(
        graph
            .nodes
            .iter()
            .flat_map(|n| n.outputs.iter().map(String::as_str)),
    );
    for name in produced.filter(|s| !s.is_empty()) {
        if !defined.insert(name) {
            return Err(Error::Graph(format!(
                "value '{name}' is defined more than once"
            )));
        }
    }
    if let Some(out) = graph
        .outputs
        .iter()
        .find(|o| !defined.contains(o.name.as_str()))
    {
        return Err(Error::Graph(format!(
            "graph output '{}' is not produced by any node, input or initializer",
            out.name
        )));
    }
    if !in_topological_order(graph) {
        graph.topo_sort()?;
    }
    Ok(())
}

fn in_topological_order(graph: &Graph) -> bool {
    let mut available: HashSet<&str> = graph
        .inputs
        .iter()
        .map(|v| v.name.as_str())
        .chain(graph.initializers.keys().map(String::as_str))
        .collect();
    available.insert("");
    for node in &graph.nodes {
        if !node.inputs.iter().all(|i| available.contains(i.as_str())) {
            return false;
        }
        available.extend(node.outputs.iter().map(String::as_str));
    }
    true
}

fn lower_value_info(vi: &ValueInfoProto, role: &str) -> Result<ValueInfo> {
    let name = vi.name();
    if name.is_empty() {
        return Err(Error::Graph(format!("a {role} has no name")));
    }
    let ty = lower_type(vi.r#type.as_ref())
        .map_err(|msg| Error::Graph(format!("{role} '{name}': {msg}")))?;
    Ok(ValueInfo {
        name: name.to_string(),
        ty,
        doc_string: vi.doc_string().to_string(),
    })
}

fn lower_type(tp: Option<&TypeProto>) -> std::result::Result<TypeInfo, String> {
    let value = tp.and_then(|t| t.value.as_ref()).ok_or("has no type")?;
    let t = match value {
        TypeValue::TensorType(t) => t,
        TypeValue::SequenceType(_) => return Err("sequence types are not supported".into()),
        TypeValue::MapType(_) => return Err("map types are not supported".into()),
        TypeValue::OptionalType(_) => return Err("optional types are not supported".into()),
        TypeValue::SparseTensorType(_) => {
            return Err("sparse tensor types are not supported".into())
        }
        TypeValue::OpaqueType(_) => return Err("opaque types are not supported".into()),
    };
    let code = t.elem_type();
    let dtype = DType::from_onnx_code(code).ok_or_else(|| {
        format!(
            "element type {} ({code}) is not supported",
            onnx_type_name(code)
        )
    })?;
    let shape = t.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(DimValue::DimValue(v)) => usize::try_from(*v).map_or(Dim::Unknown, Dim::Known),
                Some(DimValue::DimParam(p)) if !p.is_empty() => Dim::Sym(p.clone()),
                _ => Dim::Unknown,
            })
            .collect()
    });
    Ok(TypeInfo { dtype, shape })
}

enum Lowered {
    Node(Node),
    /// A `Constant` node, folded into an initializer named by its output.
    Constant(String, Tensor),
}

fn lower_node(
    n: NodeProto,
    functions: &HashSet<(String, String)>,
    ext: &mut ExternalReader<'_>,
) -> Result<Lowered> {
    let mut node = Node {
        name: n.name.unwrap_or_default(),
        op_type: n.op_type.unwrap_or_default(),
        domain: n.domain.unwrap_or_default(),
        inputs: n.input,
        outputs: n.output,
        attrs: BTreeMap::new(),
        doc_string: n.doc_string.unwrap_or_default(),
    };
    let node_err = |node: &Node, msg: &str| Error::Node {
        node: node.display_name(),
        op_type: node.op_type.clone(),
        msg: msg.to_string(),
    };
    if node.op_type.is_empty() {
        return Err(node_err(&node, "the node has no op_type"));
    }
    let default_domain = node.domain.is_empty() || node.domain == "ai.onnx";
    if default_domain && matches!(node.op_type.as_str(), "If" | "Loop" | "Scan") {
        return Err(node_err(
            &node,
            "control flow with subgraphs (If, Loop, Scan) is not supported",
        ));
    }
    if functions.contains(&(node.domain.clone(), node.op_type.clone())) {
        return Err(node_err(
            &node,
            "calls a model-local function, which is not supported",
        ));
    }
    let is_constant = default_domain && node.op_type == "Constant";
    for a in n.attribute {
        let (key, value) = lower_attr(&node, a, is_constant, ext)?;
        if node.attrs.contains_key(&key) {
            return Err(Error::Attribute {
                node: node.display_name(),
                msg: format!("attribute '{key}' appears twice"),
            });
        }
        node.attrs.insert(key, value);
    }
    if is_constant {
        let (name, tensor) = constant_value(node)?;
        return Ok(Lowered::Constant(name, tensor));
    }
    Ok(Lowered::Node(node))
}

/// The tensor a `Constant` node produces (ONNX Constant, opsets 1-21).
fn constant_value(node: Node) -> Result<(String, Tensor)> {
    let err = |msg: String| Error::Node {
        node: node.display_name(),
        op_type: node.op_type.clone(),
        msg,
    };
    let output = match node.outputs.as_slice() {
        [o] if !o.is_empty() => o.clone(),
        _ => return Err(err("a Constant node needs exactly one named output".into())),
    };
    if node.inputs.iter().any(|i| !i.is_empty()) {
        return Err(err("a Constant node takes no inputs".into()));
    }
    let mut attrs = node.attrs.iter();
    let (key, value) = match (attrs.next(), attrs.next()) {
        (Some(kv), None) => kv,
        _ => {
            return Err(err(
                "a Constant node needs exactly one value attribute".into()
            ))
        }
    };
    let tensor = match (key.as_str(), value) {
        ("value", Attr::Tensor(t)) => t.clone(),
        ("value_float", Attr::Float(v)) => Tensor::scalar_f32(*v),
        ("value_int", Attr::Int(v)) => Tensor::scalar_i64(*v),
        ("value_floats", Attr::Floats(v)) => Tensor::from_f32(vec![v.len()], v.clone())?,
        ("value_ints", Attr::Ints(v)) => Tensor::from_i64(vec![v.len()], v.clone())?,
        ("value_string" | "value_strings", _) => {
            return Err(err("string constants are not supported".into()))
        }
        (k, v) => {
            return Err(err(format!(
                "unexpected Constant attribute '{k}' of kind {}",
                v.kind()
            )))
        }
    };
    Ok((output, tensor))
}

fn lower_attr(
    node: &Node,
    a: AttributeProto,
    is_constant: bool,
    ext: &mut ExternalReader<'_>,
) -> Result<(String, Attr)> {
    let name = a.name().to_string();
    let err = |msg: &str| Error::Attribute {
        node: node.display_name(),
        msg: format!("attribute '{name}': {msg}"),
    };
    if name.is_empty() {
        return Err(err("the attribute has no name"));
    }
    if !a.ref_attr_name().is_empty() {
        return Err(err(
            "refers to a function attribute, which is only valid inside functions",
        ));
    }
    let ty = match a.r#type {
        Some(code) if code != AttributeType::Undefined as i32 => AttributeType::try_from(code)
            .map_err(|_| err(&format!("unknown attribute type {code}")))?,
        // IR version 1 files have no type field: infer it from the field that is set.
        _ => infer_attr_type(&a).ok_or_else(|| err("the attribute has no value"))?,
    };
    let value = match ty {
        AttributeType::Float => Attr::Float(a.f()),
        AttributeType::Int => Attr::Int(a.i()),
        AttributeType::String => Attr::String(String::from_utf8_lossy(a.s()).into_owned()),
        AttributeType::Tensor => {
            let t =
                a.t.as_ref()
                    .ok_or_else(|| err("has type TENSOR but holds no tensor"))?;
            let label = match node.outputs.first() {
                Some(o) if is_constant && !o.is_empty() => o.clone(),
                _ if !t.name().is_empty() => t.name().to_string(),
                _ => format!("{}.{name}", node.display_name()),
            };
            Attr::Tensor(decode_tensor(t, &label, ext)?)
        }
        AttributeType::Floats => Attr::Floats(a.floats),
        AttributeType::Ints => Attr::Ints(a.ints),
        AttributeType::Strings => Attr::Strings(
            a.strings
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
        ),
        AttributeType::Graph | AttributeType::Graphs => {
            return Err(err("graph attributes (subgraphs) are not supported"))
        }
        AttributeType::SparseTensor | AttributeType::SparseTensors => {
            return Err(err("sparse tensor attributes are not supported"))
        }
        AttributeType::TypeProto | AttributeType::TypeProtos => {
            return Err(err("type attributes are not supported"))
        }
        AttributeType::Tensors => return Err(err("tensor list attributes are not supported")),
        AttributeType::Undefined => return Err(err("the attribute has no value")),
    };
    Ok((name, value))
}

fn infer_attr_type(a: &AttributeProto) -> Option<AttributeType> {
    Some(if a.f.is_some() {
        AttributeType::Float
    } else if a.i.is_some() {
        AttributeType::Int
    } else if a.s.is_some() {
        AttributeType::String
    } else if a.t.is_some() {
        AttributeType::Tensor
    } else if a.g.is_some() {
        AttributeType::Graph
    } else if a.sparse_tensor.is_some() {
        AttributeType::SparseTensor
    } else if a.tp.is_some() {
        AttributeType::TypeProto
    } else if !a.floats.is_empty() {
        AttributeType::Floats
    } else if !a.ints.is_empty() {
        AttributeType::Ints
    } else if !a.strings.is_empty() {
        AttributeType::Strings
    } else if !a.tensors.is_empty() {
        AttributeType::Tensors
    } else if !a.graphs.is_empty() {
        AttributeType::Graphs
    } else if !a.sparse_tensors.is_empty() {
        AttributeType::SparseTensors
    } else if !a.type_protos.is_empty() {
        AttributeType::TypeProtos
    } else {
        return None;
    })
}
