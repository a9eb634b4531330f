//! The graph IR: a model is a graph of nodes over named values, plus the metadata that
//! must survive a round trip through ONNX.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use super::dtype::DType;
use super::tensor::Tensor;
use crate::error::{Error, Result};

/// One dimension of a value's shape: known, named (symbolic, e.g. `batch`), or unknown.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(usize),
    Sym(String),
    Unknown,
}

impl Dim {
    pub fn known(&self) -> Option<usize> {
        match self {
            Dim::Known(n) => Some(*n),
            _ => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// Element type and (possibly partial) shape of a value. `shape: None` means unknown rank.
#[derive(Clone, Debug, PartialEq)]
pub struct TypeInfo {
    pub dtype: DType,
    pub shape: Option<Vec<Dim>>,
}

impl TypeInfo {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> TypeInfo {
        TypeInfo {
            dtype,
            shape: Some(shape),
        }
    }

    pub fn known(dtype: DType, shape: &[usize]) -> TypeInfo {
        TypeInfo::new(dtype, shape.iter().map(|&d| Dim::Known(d)).collect())
    }

    pub fn unknown_shape(dtype: DType) -> TypeInfo {
        TypeInfo { dtype, shape: None }
    }

    /// The concrete shape, if every dimension is known.
    pub fn concrete_shape(&self) -> Option<Vec<usize>> {
        self.shape.as_ref()?.iter().map(Dim::known).collect()
    }

    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(Vec::len)
    }
}

impl fmt::Display for TypeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.shape {
            None => write!(f, "{}[..]", self.dtype),
            Some(dims) => {
                write!(f, "{}[", self.dtype)?;
                for (i, d) in dims.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{d}")?;
                }
                f.write_str("]")
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub ty: TypeInfo,
    pub doc_string: String,
}

impl ValueInfo {
    pub fn new(name: impl Into<String>, ty: TypeInfo) -> ValueInfo {
        ValueInfo {
            name: name.into(),
            ty,
            doc_string: String::new(),
        }
    }
}

/// A typed node attribute. Sub-graph attributes (If, Loop, Scan) are not supported.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Float(f32),
    Int(i64),
    String(String),
    Tensor(Tensor),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<String>),
}

impl Attr {
    pub fn kind(&self) -> &'static str {
        match self {
            Attr::Float(_) => "float",
            Attr::Int(_) => "int",
            Attr::String(_) => "string",
            Attr::Tensor(_) => "tensor",
            Attr::Floats(_) => "floats",
            Attr::Ints(_) => "ints",
            Attr::Strings(_) => "strings",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    /// Operator domain; empty for the default ONNX domain (`ai.onnx`).
    pub domain: String,
    /// Input value names; an empty string marks an omitted optional input.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: BTreeMap<String, Attr>,
    pub doc_string: String,
}

impl Node {
    pub fn new(
        name: impl Into<String>,
        op_type: impl Into<String>,
        inputs: Vec<String>,
        outputs: Vec<String>,
    ) -> Node {
        Node {
            name: name.into(),
            op_type: op_type.into(),
            inputs,
            outputs,
            ..Node::default()
        }
    }

    pub fn with_attr(mut self, key: &str, value: Attr) -> Node {
        self.attrs.insert(key.to_string(), value);
        self
    }

    /// The name used in messages: the node name, or its op type and first output when unnamed.
    pub fn display_name(&self) -> String {
        if self.name.is_empty() {
            format!(
                "{}->{}",
                self.op_type,
                self.outputs.first().map(String::as_str).unwrap_or("?")
            )
        } else {
            self.name.clone()
        }
    }

    /// The `i`th input name when present and not omitted.
    pub fn input(&self, i: usize) -> Option<&str> {
        self.inputs
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    fn attr_err(&self, key: &str, want: &str, got: &Attr) -> Error {
        Error::Attribute {
            node: self.display_name(),
            msg: format!("attribute '{key}' should be {want}, found {}", got.kind()),
        }
    }

    pub fn attr_int(&self, key: &str) -> Result<Option<i64>> {
        match self.attrs.get(key) {
            None => Ok(None),
            Some(Attr::Int(v)) => Ok(Some(*v)),
            Some(other) => Err(self.attr_err(key, "an int", other)),
        }
    }

    pub fn attr_int_or(&self, key: &str, default: i64) -> Result<i64> {
        Ok(self.attr_int(key)?.unwrap_or(default))
    }

    pub fn attr_float(&self, key: &str) -> Result<Option<f32>> {
        match self.attrs.get(key) {
            None => Ok(None),
            Some(Attr::Float(v)) => Ok(Some(*v)),
            Some(other) => Err(self.attr_err(key, "a float", other)),
        }
    }

    pub fn attr_float_or(&self, key: &str, default: f32) -> Result<f32> {
        Ok(self.attr_float(key)?.unwrap_or(default))
    }

    pub fn attr_ints(&self, key: &str) -> Result<Option<&[i64]>> {
        match self.attrs.get(key) {
            None => Ok(None),
            Some(Attr::Ints(v)) => Ok(Some(v)),
            Some(other) => Err(self.attr_err(key, "a list of ints", other)),
        }
    }

    pub fn attr_floats(&self, key: &str) -> Result<Option<&[f32]>> {
        match self.attrs.get(key) {
            None => Ok(None),
            Some(Attr::Floats(v)) => Ok(Some(v)),
            Some(other) => Err(self.attr_err(key, "a list of floats", other)),
        }
    }

    pub fn attr_string(&self, key: &str) -> Result<Option<&str>> {
        match self.attrs.get(key) {
            None => Ok(None),
            Some(Attr::String(v)) => Ok(Some(v)),
            Some(other) => Err(self.attr_err(key, "a string", other)),
        }
    }

    pub fn attr_tensor(&self, key: &str) -> Result<Option<&Tensor>> {
        match self.attrs.get(key) {
            None => Ok(None),
            Some(Attr::Tensor(v)) => Ok(Some(v)),
            Some(other) => Err(self.attr_err(key, "a tensor", other)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Graph {
    pub name: String,
    pub doc_string: String,
    /// Nodes in topological order (kept so by every pass; see [`Graph::topo_sort`]).
    pub nodes: Vec<Node>,
    /// Graph inputs that the caller feeds (initializers are not listed here).
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    /// Constant tensors by value name, in a stable order.
    pub initializers: BTreeMap<String, Tensor>,
    /// Known types of intermediate values (from the file or from shape inference).
    pub value_info: BTreeMap<String, TypeInfo>,
}

impl Graph {
    /// Orders nodes so that every node comes after the producers of its inputs, or reports
    /// the value that can never be computed (a cycle or a missing producer).
    pub fn topo_sort(&mut self) -> Result<()> {
        let mut available: HashSet<&str> = self
            .inputs
            .iter()
            .map(|v| v.name.as_str())
            .chain(self.initializers.keys().map(String::as_str))
            .collect();
        available.insert("");
        let mut placed = vec![false; self.nodes.len()];
        let mut order = Vec::with_capacity(self.nodes.len());
        // Index consumers by input so the sort is linear in graph size.
        let mut waiting_on: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut missing = vec![0usize; self.nodes.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            let mut seen = HashSet::new();
            for inp in &node.inputs {
                if !available.contains(inp.as_str()) && seen.insert(inp.as_str()) {
                    missing[i] += 1;
                    waiting_on.entry(inp.as_str()).or_default().push(i);
                }
            }
        }
        let mut ready: Vec<usize> = (0..self.nodes.len()).filter(|&i| missing[i] == 0).collect();
        ready.reverse();
        while let Some(i) = ready.pop() {
            if placed[i] {
                continue;
            }
            placed[i] = true;
            order.push(i);
            let mut newly = Vec::new();
            for out in &self.nodes[i].outputs {
                if let Some(consumers) = waiting_on.remove(out.as_str()) {
                    for c in consumers {
                        missing[c] -= 1;
                        if missing[c] == 0 {
                            newly.push(c);
                        }
                    }
                }
            }
            // Keep the original relative order among nodes that become ready together.
            newly.sort_unstable_by(|a, b| b.cmp(a));
            ready.extend(newly);
            ready.sort_unstable_by(|a, b| b.cmp(a));
        }
        if order.len() != self.nodes.len() {
            let stuck = (0..self.nodes.len()).find(|&i| !placed[i]).unwrap_or(0);
            let node = &self.nodes[stuck];
            let produced: HashSet<&str> = self
                .nodes
                .iter()
                .flat_map(|n| n.outputs.iter().map(String::as_str))
                .collect();
            let value = node
                .inputs
                .iter()
                .find(|v| !available.contains(v.as_str()) && !produced.contains(v.as_str()))
                .cloned();
            return Err(match value {
                Some(v) => Error::Graph(format!(
                    "node '{}' ({}) reads '{v}', which no node, input or initializer provides",
                    node.display_name(),
                    node.op_type
                )),
                None => Error::Graph(format!(
                    "node '{}' ({}) is part of a cycle",
                    node.display_name(),
                    node.op_type
                )),
            });
        }
        let mut old: Vec<Option<Node>> = std::mem::take(&mut self.nodes)
            .into_iter()
            .map(Some)
            .collect();
        self.nodes = order.into_iter().filter_map(|i| old[i].take()).collect();
        Ok(())
    }

    /// The node that produces `value`, if any.
    pub fn producer(&self, value: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.outputs.iter().any(|o| o == value))
    }

    /// How many node inputs and graph outputs read each value.
    pub fn use_counts(&self) -> HashMap<String, usize> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for node in &self.nodes {
            for inp in node.inputs.iter().filter(|s| !s.is_empty()) {
                *counts.entry(inp.clone()).or_default() += 1;
            }
        }
        for out in &self.outputs {
            *counts.entry(out.name.clone()).or_default() += 1;
        }
        counts
    }

    /// Type of a named value, from graph inputs/outputs, initializers or inferred value info.
    pub fn type_of(&self, value: &str) -> Option<TypeInfo> {
        if let Some(t) = self.initializers.get(value) {
            return Some(TypeInfo::known(t.dtype(), t.shape()));
        }
        if let Some(v) = self.inputs.iter().find(|v| v.name == value) {
            return Some(v.ty.clone());
        }
        if let Some(t) = self.value_info.get(value) {
            return Some(t.clone());
        }
        self.outputs
            .iter()
            .find(|v| v.name == value)
            .map(|v| v.ty.clone())
    }

    /// Per input of `node`, the initializer it reads, if any (`None` for omitted inputs).
    pub fn constant_inputs(&self, node: &Node) -> Vec<Option<&Tensor>> {
        node.inputs
            .iter()
            .map(|n| {
                if n.is_empty() {
                    None
                } else {
                    self.initializers.get(n)
                }
            })
            .collect()
    }

    /// Drops initializers that nothing reads any more.
    pub fn prune_unused_initializers(&mut self) {
        let used = self.use_counts();
        self.initializers.retain(|k, _| used.contains_key(k));
    }

    /// A value name not yet used anywhere in the graph, starting from `base`.
    pub fn fresh_name(&self, base: &str) -> String {
        let taken = |s: &str| {
            self.initializers.contains_key(s)
                || self.inputs.iter().any(|v| v.name == s)
                || self
                    .nodes
                    .iter()
                    .any(|n| n.outputs.iter().any(|o| o == s) || n.name == s)
        };
        if !taken(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|s| !taken(s))
            .expect("unbounded counter always finds a free name")
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct OpsetImport {
    pub domain: String,
    pub version: i64,
}

/// A whole model: graph plus the file-level metadata ONNX carries.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Model {
    pub graph: Graph,
    pub ir_version: i64,
    pub opset_imports: Vec<OpsetImport>,
    pub producer_name: String,
    pub producer_version: String,
    pub domain: String,
    pub model_version: i64,
    pub doc_string: String,
    /// `metadata_props`, in file order. lithe records preprocessing here (key `lithe.preprocess`).
    pub metadata: Vec<(String, String)>,
}

impl Model {
    pub fn new(graph: Graph, opset: i64) -> Model {
        Model {
            graph,
            ir_version: 8,
            opset_imports: vec![OpsetImport {
                domain: String::new(),
                version: opset,
            }],
            producer_name: "lithe".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            ..Model::default()
        }
    }

    /// Opset version of the default ONNX domain.
    pub fn opset(&self) -> i64 {
        self.opset_imports
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .unwrap_or(1)
    }

    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn set_metadata(&mut self, key: &str, value: String) {
        if let Some(slot) = self.metadata.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value;
        } else {
            self.metadata.push((key.to_string(), value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node::new(
            name,
            "Relu",
            inputs.iter().map(|s| s.to_string()).collect(),
            outputs.iter().map(|s| s.to_string()).collect(),
        )
    }

    #[test]
    fn topo_sort_orders_and_detects_missing() {
        let mut g = Graph {
            inputs: vec![ValueInfo::new("x", TypeInfo::known(DType::F32, &[1]))],
            nodes: vec![node("b", &["a"], &["b"]), node("a", &["x"], &["a"])],
            ..Graph::default()
        };
        g.topo_sort().unwrap();
        assert_eq!(g.nodes[0].name, "a");
        g.nodes.push(node("c", &["nope"], &["c"]));
        let err = g.topo_sort().unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn topo_sort_detects_cycles() {
        let mut g = Graph {
            nodes: vec![node("a", &["b"], &["a"]), node("b", &["a"], &["b"])],
            ..Graph::default()
        };
        assert!(g.topo_sort().unwrap_err().to_string().contains("cycle"));
    }
}
