//! What the quantize pass is asked to do.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};

/// How weights are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightScheme {
    /// Symmetric linear, `w = s q`, signed codes in `[-(2^(b-1)-1), 2^(b-1)-1]` (i8 storage).
    Linear,
    /// Dynamic fixed point: linear with power-of-two scales `2^-f` and zero point 0, for
    /// weights and activations.
    Fixed,
    /// Power-of-two magnitudes `±2^e` (and 0): i8-container codes and a Gather over the
    /// `2^b`-entry codebook (per tensor).
    Log,
    /// k-means weight sharing with `2^b` centroids: u8 indices and a Gather over the codebook
    /// (per tensor).
    Kmeans,
}

impl FromStr for WeightScheme {
    type Err = Error;
    fn from_str(s: &str) -> Result<WeightScheme> {
        match s.to_ascii_lowercase().as_str() {
            "linear" | "int" | "affine" => Ok(WeightScheme::Linear),
            "fixed" | "fixed-point" | "dfp" => Ok(WeightScheme::Fixed),
            "log" | "log2" | "pow2" => Ok(WeightScheme::Log),
            "kmeans" | "k-means" => Ok(WeightScheme::Kmeans),
            _ => Err(Error::Data(format!(
                "unknown scheme '{s}' (expected linear, fixed, log or kmeans)"
            ))),
        }
    }
}

impl fmt::Display for WeightScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightScheme::Linear => "linear",
            WeightScheme::Fixed => "fixed",
            WeightScheme::Log => "log",
            WeightScheme::Kmeans => "kmeans",
        })
    }
}

/// How an activation's range is chosen from the calibration data.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationCalib {
    /// KL divergence over a 2048-bin histogram of |x| (TensorRT's entropy calibration).
    Entropy,
    /// Observed min and max (no saturation).
    MinMax,
    /// Keep this percentage of |x|.
    Percentile(f64),
    /// Minimum expected squared error.
    Mse,
    /// `mean ± k std`, within the observed range.
    Sigma(f32),
    /// Activations stay f32 (weight-only quantization).
    None,
    /// Ranges taken at run time from each batch (`DynamicQuantizeLinear -> MatMulInteger`,
    /// as ONNX Runtime's `quantize_dynamic` writes): no calibration.
    Dynamic,
}

impl FromStr for ActivationCalib {
    type Err = Error;
    fn from_str(s: &str) -> Result<ActivationCalib> {
        let lower = s.to_ascii_lowercase();
        let (key, value) = match lower.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (lower.trim(), None),
        };
        let num = |what: &str| -> Result<f64> {
            let v = value.ok_or_else(|| {
                Error::Data(format!("'{s}': {what} needs a value, e.g. {what}=99.99"))
            })?;
            v.parse::<f64>()
                .map_err(|_| Error::Data(format!("'{s}': '{v}' is not a number")))
        };
        let calib = match key {
            "kl" | "entropy" => ActivationCalib::Entropy,
            "minmax" | "max" => ActivationCalib::MinMax,
            "mse" => ActivationCalib::Mse,
            "none" | "f32" => ActivationCalib::None,
            "dynamic" => ActivationCalib::Dynamic,
            "percentile" | "pct" => ActivationCalib::Percentile(num("percentile")?),
            "sigma" | "std" => ActivationCalib::Sigma(num("sigma")? as f32),
            _ => {
                return Err(Error::Data(format!(
                    "unknown activation calibration '{s}' (expected kl, minmax, percentile=P, mse, sigma=K, none or dynamic)"
                )))
            }
        };
        calib.validate()?;
        Ok(calib)
    }
}

impl ActivationCalib {
    pub fn validate(&self) -> Result<()> {
        match *self {
            ActivationCalib::Percentile(p) if !(p > 0.0 && p <= 100.0) => {
                Err(Error::Data(format!("percentile {p} must be in (0, 100]")))
            }
            ActivationCalib::Sigma(k) if !(k.is_finite() && k > 0.0) => Err(Error::Data(format!(
                "sigma multiple {k} must be a positive number"
            ))),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for ActivationCalib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActivationCalib::Entropy => f.write_str("kl"),
            ActivationCalib::MinMax => f.write_str("minmax"),
            ActivationCalib::Percentile(p) => write!(f, "percentile={p}"),
            ActivationCalib::Mse => f.write_str("mse"),
            ActivationCalib::Sigma(k) => write!(f, "sigma={k}"),
            ActivationCalib::None => f.write_str("none"),
            ActivationCalib::Dynamic => f.write_str("dynamic"),
        }
    }
}

/// Output form of the quantized model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantFormat {
    /// QuantizeLinear/DequantizeLinear pairs around f32 ops (what ONNX Runtime fuses).
    Qdq,
    /// QLinearConv / QLinearMatMul with u8 tensors between them: integer-only execution.
    QOperator,
}

impl FromStr for QuantFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<QuantFormat> {
        match s.to_ascii_lowercase().as_str() {
            "qdq" => Ok(QuantFormat::Qdq),
            "qop" | "qoperator" | "integer" => Ok(QuantFormat::QOperator),
            _ => Err(Error::Data(format!(
                "unknown format '{s}' (expected qdq or qop)"
            ))),
        }
    }
}

/// Configuration of [`super::quantize`]. The default is int8: symmetric s8 weights per output
/// channel (min/max), u8 asymmetric activations per tensor calibrated by KL divergence,
/// QDQ output.
#[derive(Clone, Debug, Serialize)]
pub struct QuantizeConfig {
    pub scheme: WeightScheme,
    /// 2..=8.
    pub weight_bits: u32,
    /// 2..=8.
    pub activation_bits: u32,
    pub activations: ActivationCalib,
    /// Per-output-channel weight parameters (linear and fixed schemes).
    pub per_channel: bool,
    /// Node names left in f32.
    pub exclude: Vec<String>,
    pub format: QuantFormat,
    /// Calibration batch size.
    pub batch_size: usize,
    /// Use at most this many calibration samples.
    pub calib_limit: Option<usize>,
    /// Measure activation SQNR with a second pass over the calibration data.
    pub measure_activation_sqnr: bool,
    /// Worker threads for calibration (0 = one per core).
    pub threads: usize,
    /// QOperator form: replace DequantizeLinear -> pointwise activation -> QuantizeLinear by a
    /// 256-entry lookup table (`Cast` + `Gather`). Exact in any runtime, but a generic Gather
    /// is slower than the three elementwise ops in both lithe and ONNX Runtime today.
    pub lookup_tables: bool,
}

impl Default for QuantizeConfig {
    fn default() -> Self {
        QuantizeConfig {
            scheme: WeightScheme::Linear,
            weight_bits: 8,
            activation_bits: 8,
            activations: ActivationCalib::Entropy,
            per_channel: true,
            exclude: Vec::new(),
            format: QuantFormat::Qdq,
            batch_size: 100,
            calib_limit: Some(1000),
            measure_activation_sqnr: true,
            threads: 0,
            lookup_tables: false,
        }
    }
}

impl QuantizeConfig {
    pub fn validate(&self) -> Result<()> {
        for (what, b) in [
            ("weight", self.weight_bits),
            ("activation", self.activation_bits),
        ] {
            if !(2..=8).contains(&b) {
                return Err(Error::Data(format!(
                    "{what} bit width {b} is out of range: lithe quantizes to 2..=8 bits"
                )));
            }
        }
        self.activations.validate()?;
        if self.activations == ActivationCalib::Dynamic {
            if !matches!(self.scheme, WeightScheme::Linear | WeightScheme::Fixed) {
                return Err(Error::Data(format!(
                    "dynamic activations multiply integer weights; the {} scheme has none (use --scheme linear or fixed)",
                    self.scheme
                )));
            }
            if self.format == QuantFormat::QOperator || self.activation_bits != 8 {
                return Err(Error::Data(
                    "dynamic activations are 8-bit and written in their own form (DynamicQuantizeLinear -> MatMulInteger): drop --format qop and --activation-bits".into(),
                ));
            }
        }
        if self.format == QuantFormat::QOperator {
            if matches!(self.scheme, WeightScheme::Log | WeightScheme::Kmeans) {
                return Err(Error::Data(format!(
                    "the {} scheme has no integer operator form; use --format qdq",
                    self.scheme
                )));
            }
            if self.activations == ActivationCalib::None {
                return Err(Error::Data(
                    "the QOperator form needs quantized activations".into(),
                ));
            }
            if self.activation_bits != 8 {
                return Err(Error::Data(format!(
                    "the QOperator form needs 8-bit activations (got {}); use --format qdq",
                    self.activation_bits
                )));
            }
        }
        if self.batch_size == 0 {
            return Err(Error::Data(
                "calibration batch size must be positive".into(),
            ));
        }
        Ok(())
    }
}
