//! ONNX import (protobuf -> IR) and export (IR -> protobuf), with external data.
//!
//! [`load_model`] / [`decode_model`] lower a `ModelProto` into [`crate::ir::Model`]
//! (`Constant` nodes become initializers, nodes come out topologically ordered);
//! [`save_model`] / [`encode_model`] raise it back. Import then export then import gives an
//! equal `Model`.

mod atomic;
mod export;
mod external;
mod import;
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod proto;
mod tensor_codec;

pub use export::{
    encode_model, save_model, ExternalData, SaveOptions, DEFAULT_EXTERNAL_THRESHOLD,
    MIN_EXTERNAL_TENSOR_BYTES,
};
pub use external::EXTERNAL_ALIGN;
pub use import::{decode_model, load_model};
pub use tensor_codec::{load_tensor_pb, save_tensor_pb, tensor_from_proto, tensor_to_proto};
