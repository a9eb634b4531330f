//! Typed errors of the library. Every message names what it is about: the file, the node,
//! the tensor. The binary adds context with anyhow; the library never panics on bad input.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid ONNX model: {msg}")]
    Decode { path: PathBuf, msg: String },
    #[error("{0}")]
    Format(String),
    #[error("unsupported operator {op_type} (domain '{domain}', opset {opset}) at node '{node}'")]
    UnsupportedOp {
        op_type: String,
        domain: String,
        opset: i64,
        node: String,
    },
    #[error("node '{node}': {msg}")]
    Attribute { node: String, msg: String },
    #[error("node '{node}' ({op_type}): {msg}")]
    Node {
        node: String,
        op_type: String,
        msg: String,
    },
    #[error("tensor '{name}': {msg}")]
    Tensor { name: String, msg: String },
    #[error("shape error: {0}")]
    Shape(String),
    #[error("type error: {0}")]
    DType(String),
    #[error("graph error: {0}")]
    Graph(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("external data for tensor '{tensor}': {msg}")]
    ExternalData { tensor: String, msg: String },
    #[error("input '{name}': {msg}")]
    Input { name: String, msg: String },
    #[error("{0}")]
    Data(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Attaches node identity to a node-agnostic error raised inside an op.
    pub fn at_node(self, node: &crate::ir::Node) -> Error {
        match self {
            Error::Node { .. } | Error::Attribute { .. } | Error::UnsupportedOp { .. } => self,
            other => Error::Node {
                node: node.display_name(),
                op_type: node.op_type.clone(),
                msg: other.to_string(),
            },
        }
    }
}
