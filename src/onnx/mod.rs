//! ONNX import (protobuf -> IR) and export (IR -> protobuf), with external data.

#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod proto;
