//! lithe: make trained neural networks small and fast, and prove it.
//!
//! The [`ir`] graph is the centre: [`onnx`] lowers files into it and raises it back out,
//! [`runtime`] executes it with the [`kernels`] through the [`ops`], and [`passes`] rewrite it.

pub mod analysis;
pub mod data;
pub mod error;
pub mod eval;
pub mod ir;
pub mod kernels;
pub mod memory;
pub mod onnx;
pub mod ops;
pub mod passes;
pub mod quant;
pub mod runtime;
pub mod train;
pub mod zoo;

pub use error::{Error, Result};
