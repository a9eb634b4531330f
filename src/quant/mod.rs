//! Quantization numerics, independent of any graph: parameters, calibration, and the integer
//! formats of the model-compression literature, all working on plain `f32` slices or
//! [`crate::ir::Tensor`]s. Graph rewriting (QDQ / QOperator) is built on top of this.
//!
//! * [`linear`]: uniform affine/symmetric quantization (`d = s (q - z)`), per tensor or channel.
//! * [`calibrate`]: streaming range observers (min/max, moments, histograms) and threshold
//!   choice (max, percentile, KL divergence, MSE).
//! * [`fixed_point`]: dynamic fixed point (`a * 2^-f`) and its integer dot product.
//! * [`log2`]: power-of-two (logarithmic) quantization and multiply-by-shift.
//! * [`kmeans`]: weight sharing by 1-D k-means (Lloyd and exact dynamic programming).

pub mod calibrate;
pub mod fixed_point;
pub mod kmeans;
pub mod linear;
pub mod log2;

#[cfg(test)]
pub(crate) mod test_rng;

pub use linear::{sqnr_db, PerChannel, QParams, QScheme, QStore, Quantization};
