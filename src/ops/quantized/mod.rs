//! Quantized operators: ONNX `QuantizeLinear` / `DequantizeLinear` (10-21, per tensor and per
//! axis), `DynamicQuantizeLinear` (11+), `QLinearConv` (10-21), `QLinearMatMul` (10-21), `MatMulInteger` (10-21) and
//! `ConvInteger` (10-21). The QLinear ops run integer-only: u8 activations times i8 weights
//! through [`crate::kernels::qgemm`], i32 accumulation and bias, and ONNX Runtime's float
//! requantization, so outputs are bit-identical to ORT's on the same file.

mod conv;
mod conv_nchw;
mod depthwise_avx2;
mod depthwise_vnni;
mod dynamic;
mod engine;
pub mod lut;
mod matmul;
mod params;
mod prepared;
pub(crate) mod qdq;
mod window;

use super::OpDef;

pub use conv::compile_qlinear_pool;
pub use params::{dtype_range, read_qparams, QTensorParams};

pub const OPS: &[OpDef] = &[
    qdq::QUANTIZE_LINEAR,
    qdq::DEQUANTIZE_LINEAR,
    dynamic::DYNAMIC_QUANTIZE_LINEAR,
    conv::QLINEAR_CONV,
    conv::CONV_INTEGER,
    matmul::QLINEAR_MATMUL,
    matmul::MATMUL_INTEGER,
];
