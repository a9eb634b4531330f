//! Calibration: choosing the real range a tensor is quantized over, from data seen in batches.
//!
//! Observers are streaming and bounded in memory: feed them any number of batches with
//! [`Observer::observe`], then ask for a [`Range`]. Every observer carries the tensor's name so
//! its errors (NaN or infinite data, nothing observed) say which tensor is at fault.
//!
//! * [`MinMax`]: running (or exponentially averaged) min and max.
//! * [`MeanStd`]: running mean and variance (Welford/Chan), range `mu +- k sigma`.
//! * [`Histogram`]: 2048-bin histogram of `|x|` or `x` that re-bins as the range grows, with
//!   threshold rules: non-saturating max, percentile, KL divergence (TensorRT's entropy
//!   calibration) and minimum expected MSE.
//!
//! A [`Range`] becomes quantization parameters through [`Range::params`], for symmetric or
//! affine schemes alike.

mod histogram;
mod kl;
mod minmax;
mod moments;
mod threshold;

pub use histogram::{HistKind, Histogram, DEFAULT_BINS, MAX_BINS};
pub use minmax::MinMax;
pub use moments::MeanStd;

use crate::error::Result;
use crate::quant::linear::{QParams, QScheme};

/// A real interval `[min, max]` chosen by calibration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Range {
    pub min: f32,
    pub max: f32,
}

impl Range {
    /// `[-t, t]`.
    pub fn symmetric(t: f32) -> Range {
        Range { min: -t, max: t }
    }

    /// `max(|min|, |max|)`: the threshold a symmetric scheme uses.
    pub fn threshold(&self) -> f32 {
        self.min.abs().max(self.max.abs())
    }

    /// Quantization parameters of `scheme` for this range (see [`QScheme::params_from_range`]).
    pub fn params(&self, scheme: &QScheme, name: &str) -> Result<QParams> {
        scheme.params_from_range(self.min, self.max, name)
    }
}

/// A streaming statistic over the values of one tensor.
pub trait Observer {
    /// Adds a batch of values. NaN or infinite values are an error naming the tensor, and the
    /// observer is left as it was before the call.
    fn observe(&mut self, x: &[f32]) -> Result<()>;

    /// Number of values observed so far.
    fn count(&self) -> u64;
}
