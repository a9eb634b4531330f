//! The typed graph IR at the centre of lithe: everything (import, export, runtime, passes)
//! reads and writes these types and never protobuf structures.

pub mod dtype;
pub mod graph;
pub mod tensor;

pub use dtype::DType;
pub use graph::{Attr, Dim, Graph, Model, Node, OpsetImport, TypeInfo, ValueInfo};
pub use tensor::{checked_numel, Tensor, TensorData};
