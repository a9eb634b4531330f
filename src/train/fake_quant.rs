//! Fake quantizers for quantization-aware training, one per weight scheme of the quantize
//! pass, plus activations with fixed or learned (moving-average) ranges. Each forward pass
//! sees the values the quantized model would compute with; gradients reach the f32 master
//! values straight through (Bengio et al. 2013), except k-means, where the cluster assignment
//! stays fixed and every weight of a cluster receives the cluster's summed gradient (Deep
//! Compression, Han et al. 2016).
//!
//! Weight grids follow the current weights: every forward pass chooses the scale (linear),
//! the fractional bits (fixed point) or the largest exponent (power of two) from the weights
//! as they are now, with exactly the rules the post-training pass uses, so exporting
//! `forward(w)` through that pass reproduces the trained grid.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::params::FakeQuant;
use crate::error::{Error, Result};
use crate::ir::Tensor;
use crate::passes::quantize::{activation_params, WeightScheme};
use crate::quant::calibrate::Range;
use crate::quant::fixed_point::FixedFormat;
use crate::quant::kmeans;
use crate::quant::log2::Log2Format;
use crate::quant::{PerChannel, QParams, QScheme, Quantization};

/// Weight fake quantization for the linear, fixed-point and power-of-two schemes, with the
/// grid chosen from the current weights (see the module documentation).
#[derive(Clone, Debug)]
pub struct WeightFakeQuant {
    scheme: WeightScheme,
    bits: u32,
    /// Per-output-channel grids along `axis` (linear and fixed point only, as in the pass).
    per_channel: bool,
    axis: usize,
    /// Clip to the range of least squared error instead of the min and max.
    mse: bool,
    name: String,
}

/// How a weight's grid range is chosen in each forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightRangeMode {
    /// The weights' min and max (nothing is clipped), the post-training rule.
    MinMax,
    /// Linear and fixed point: the clipping threshold (scale, or fractional bits) of least
    /// squared error, so that at 2 or 3 bits the bulk of the weights is not rounded to zero
    /// for the sake of a few large ones. The written model keeps the grid: the clipped
    /// weights sit at the grid's ends, which is where min/max re-encoding puts them.
    Mse,
}

impl std::str::FromStr for WeightRangeMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<WeightRangeMode> {
        match s.to_ascii_lowercase().as_str() {
            "minmax" | "max" => Ok(WeightRangeMode::MinMax),
            "mse" => Ok(WeightRangeMode::Mse),
            _ => Err(Error::Data(format!(
                "unknown weight range mode '{s}' (expected minmax or mse)"
            ))),
        }
    }
}

impl std::fmt::Display for WeightRangeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightRangeMode::MinMax => "minmax",
            WeightRangeMode::Mse => "mse",
        })
    }
}

/// At most this many values (evenly strided) score each candidate clipping threshold.
const MSE_SAMPLE: usize = 16384;

fn sampled_sse(x: &[f32], q: impl Fn(f32) -> f32) -> f64 {
    let step = x.len().div_ceil(MSE_SAMPLE).max(1);
    x.iter()
        .step_by(step)
        .map(|&v| {
            let d = f64::from(v) - f64::from(q(v));
            d * d
        })
        .sum()
}

/// The symmetric threshold in `[max |x| / 64, max |x|]` of least squared error on `scheme`'s
/// grid.
fn mse_threshold(x: &[f32], scheme: &QScheme, name: &str) -> Result<QParams> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut best = (f64::INFINITY, scheme.params_from_threshold(amax, name)?);
    if amax == 0.0 {
        return Ok(best.1);
    }
    // Thresholds from max |x| down to max |x| / 64 in steps of 2^(1/8).
    for k in 0..=48 {
        let p = scheme.params_from_threshold(amax * (-(k as f32) / 8.0).exp2(), name)?;
        let e = sampled_sse(x, |v| p.fake_quantize(v));
        if e < best.0 {
            best = (e, p);
        }
    }
    Ok(best.1)
}

/// The fixed-point format of least squared error: the min/max one or up to three more
/// fractional bits (clipping the largest values).
fn mse_fixed(x: &[f32], bits: u32, name: &str) -> Result<FixedFormat> {
    let base = FixedFormat::for_data(bits, x, name)?;
    let mut best = (f64::INFINITY, base);
    for extra in 0..=3 {
        let Ok(f) = FixedFormat::new(bits, base.frac() + extra) else {
            break;
        };
        let p = f.to_qparams();
        let e = sampled_sse(x, |v| p.fake_quantize(v));
        if e < best.0 {
            best = (e, f);
        }
    }
    Ok(best.1)
}

impl WeightFakeQuant {
    /// For k-means weights use [`KmeansFakeQuant`].
    pub fn new(
        scheme: WeightScheme,
        bits: u32,
        per_channel: bool,
        axis: usize,
        name: impl Into<String>,
    ) -> Result<WeightFakeQuant> {
        let name = name.into();
        if scheme == WeightScheme::Kmeans {
            return Err(Error::Tensor {
                name,
                msg: "k-means weights are fake-quantized by KmeansFakeQuant".into(),
            });
        }
        if !(2..=8).contains(&bits) {
            return Err(Error::Tensor {
                name,
                msg: format!("weight bit width {bits} is outside 2..=8"),
            });
        }
        Ok(WeightFakeQuant {
            scheme,
            bits,
            per_channel: per_channel
                && matches!(scheme, WeightScheme::Linear | WeightScheme::Fixed),
            axis,
            mse: false,
            name,
        })
    }

    /// Chooses the grid range by `mode` (linear and fixed point; the power-of-two grid always
    /// follows the largest weight).
    pub fn with_range(mut self, mode: WeightRangeMode) -> WeightFakeQuant {
        self.mse = mode == WeightRangeMode::Mse;
        self
    }

    /// Values of each index of `axis`.
    fn channel_values(&self, x: &[f32], shape: &[usize]) -> Result<Vec<Vec<f32>>> {
        if self.axis >= shape.len() {
            return Err(Error::Tensor {
                name: self.name.clone(),
                msg: format!("channel axis {} does not fit shape {shape:?}", self.axis),
            });
        }
        let c = shape[self.axis];
        let inner: usize = shape[self.axis + 1..].iter().product::<usize>().max(1);
        let mut out = vec![Vec::new(); c];
        for (i, &v) in x.iter().enumerate() {
            out[(i / inner) % c].push(v);
        }
        Ok(out)
    }

    /// Per-channel `(min, max)` of `x` along `axis`.
    fn channel_ranges(&self, x: &[f32], shape: &[usize]) -> Result<Vec<(f32, f32)>> {
        if self.axis >= shape.len() {
            return Err(Error::Tensor {
                name: self.name.clone(),
                msg: format!("channel axis {} does not fit shape {shape:?}", self.axis),
            });
        }
        let c = shape[self.axis];
        let inner: usize = shape[self.axis + 1..].iter().product::<usize>().max(1);
        let mut r = vec![(f32::INFINITY, f32::NEG_INFINITY); c];
        for (i, &v) in x.iter().enumerate() {
            let e = &mut r[(i / inner) % c];
            e.0 = e.0.min(v);
            e.1 = e.1.max(v);
        }
        Ok(r)
    }

    fn quantization(&self, x: &[f32], shape: &[usize]) -> Result<Quantization> {
        match self.scheme {
            WeightScheme::Linear if self.mse => {
                let s = QScheme::new(self.bits, true, true)?;
                Ok(if self.per_channel {
                    let params = self
                        .channel_values(x, shape)?
                        .iter()
                        .map(|c| mse_threshold(c, &s, &self.name))
                        .collect::<Result<_>>()?;
                    Quantization::PerChannel(PerChannel {
                        axis: self.axis,
                        params,
                    })
                } else {
                    Quantization::PerTensor(mse_threshold(x, &s, &self.name)?)
                })
            }
            WeightScheme::Linear => {
                let s = QScheme::new(self.bits, true, true)?;
                Ok(if self.per_channel {
                    Quantization::PerChannel(s.params_per_channel(x, shape, self.axis, &self.name)?)
                } else {
                    Quantization::PerTensor(s.params_for(x, &self.name)?)
                })
            }
            _ => {
                let formats: Vec<FixedFormat> = if self.mse {
                    if self.per_channel {
                        self.channel_values(x, shape)?
                            .iter()
                            .map(|c| {
                                if c.is_empty() {
                                    FixedFormat::new(self.bits, self.bits as i32 - 1)
                                } else {
                                    mse_fixed(c, self.bits, &self.name)
                                }
                            })
                            .collect::<Result<_>>()?
                    } else {
                        vec![mse_fixed(x, self.bits, &self.name)?]
                    }
                } else if self.per_channel {
                    self.channel_ranges(x, shape)?
                        .into_iter()
                        .map(|(lo, hi)| {
                            if lo > hi {
                                FixedFormat::new(self.bits, self.bits as i32 - 1)
                            } else {
                                FixedFormat::for_range(self.bits, lo, hi, &self.name)
                            }
                        })
                        .collect::<Result<_>>()?
                } else {
                    vec![FixedFormat::for_data(self.bits, x, &self.name)?]
                };
                let params: Vec<QParams> = formats.iter().map(FixedFormat::to_qparams).collect();
                Ok(if self.per_channel {
                    Quantization::PerChannel(PerChannel {
                        axis: self.axis,
                        params,
                    })
                } else {
                    Quantization::PerTensor(params[0])
                })
            }
        }
    }
}

impl FakeQuant for WeightFakeQuant {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let data = x.as_f32()?;
        crate::quant::linear::finite_min_max(data, &self.name)?;
        let v = if self.scheme == WeightScheme::Log {
            let f = Log2Format::for_data(self.bits, data, &self.name)?;
            data.iter().map(|&w| f.fake_quantize(w)).collect()
        } else {
            let q = self.quantization(data, x.shape())?;
            let mut v = data.to_vec();
            q.fake_quantize(&mut v, x.shape(), &self.name)?;
            v
        };
        Tensor::from_f32(x.shape().to_vec(), v)
    }

    /// The grid always covers the weights (it is chosen from them), so nothing is clipped
    /// and the gradient passes unchanged.
    fn backward(&self, _x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        Ok(grad.clone())
    }
}

/// k-means weight sharing with a fixed assignment: the forward pass replaces every weight by
/// its cluster's centroid (the mean of the cluster's master values), the backward pass gives
/// every weight of a cluster the sum of the cluster's gradients. Master weights that start at
/// their centroids ([`KmeansFakeQuant::new`] returns them) therefore receive identical updates
/// from any element-wise optimizer and stay equal to the centroid: training the weights is
/// training the codebook, the centroid's gradient being the per-cluster sum.
#[derive(Clone, Debug)]
pub struct KmeansFakeQuant {
    indices: Vec<u16>,
    k: usize,
    name: String,
}

impl KmeansFakeQuant {
    /// Clusters `w` into at most `2^bits` centroids (optimal 1-D k-means, as the quantize
    /// pass does) and returns the quantizer and the weights set to their centroids.
    pub fn new(w: &Tensor, bits: u32, name: &str) -> Result<(KmeansFakeQuant, Tensor)> {
        let cb = kmeans::optimal(w.as_f32()?, 1usize << bits, name)?;
        let snapped = Tensor::from_f32(w.shape().to_vec(), cb.reconstruct())?;
        Ok((KmeansFakeQuant::from_codebook(&cb, name), snapped))
    }

    pub fn from_codebook(cb: &kmeans::Codebook, name: &str) -> KmeansFakeQuant {
        KmeansFakeQuant {
            indices: cb.indices.clone(),
            k: cb.centroids.len(),
            name: name.to_string(),
        }
    }

    fn check(&self, n: usize) -> Result<()> {
        if n != self.indices.len() {
            return Err(Error::Tensor {
                name: self.name.clone(),
                msg: format!(
                    "{n} values for a k-means assignment of {} weights",
                    self.indices.len()
                ),
            });
        }
        Ok(())
    }

    /// Per-cluster sums of `v` (f64).
    fn sums(&self, v: &[f32]) -> Vec<f64> {
        let mut s = vec![0f64; self.k];
        for (&x, &i) in v.iter().zip(&self.indices) {
            s[usize::from(i)] += f64::from(x);
        }
        s
    }

    /// The current codebook: the mean master value of each cluster.
    pub fn centroids(&self, w: &[f32]) -> Result<Vec<f32>> {
        self.check(w.len())?;
        let mut counts = vec![0u64; self.k];
        for &i in &self.indices {
            counts[usize::from(i)] += 1;
        }
        Ok(self
            .sums(w)
            .into_iter()
            .zip(counts)
            .map(|(s, n)| (s / n.max(1) as f64) as f32)
            .collect())
    }

    /// Cluster of each weight.
    pub fn indices(&self) -> &[u16] {
        &self.indices
    }
}

impl FakeQuant for KmeansFakeQuant {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.centroids(x.as_f32()?)?;
        let v = self.indices.iter().map(|&i| c[usize::from(i)]).collect();
        Tensor::from_f32(x.shape().to_vec(), v)
    }

    fn backward(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let g = grad.as_f32()?;
        self.check(g.len())?;
        self.check(x.numel())?;
        let sums = self.sums(g);
        let v = self
            .indices
            .iter()
            .map(|&i| sums[usize::from(i)] as f32)
            .collect();
        Tensor::from_f32(grad.shape().to_vec(), v)
    }
}

/// How activation ranges evolve during quantization-aware training.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActRangeMode {
    /// The calibrated range is kept.
    Fixed,
    /// Learned: each training forward pass moves the range towards the batch's min and max,
    /// `r = m r + (1 - m) batch` (the moving average of TensorFlow's QAT), starting from the
    /// calibrated range.
    Ema { momentum: f32 },
}

impl std::str::FromStr for ActRangeMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<ActRangeMode> {
        let lower = s.to_ascii_lowercase();
        let (key, value) = match lower.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (lower.trim(), None),
        };
        match (key, value) {
            ("fixed", None) => Ok(ActRangeMode::Fixed),
            ("ema", v) => {
                let momentum = match v {
                    None => 0.99,
                    Some(v) => v
                        .parse::<f32>()
                        .map_err(|_| Error::Data(format!("'{s}': '{v}' is not a number")))?,
                };
                if !(0.0..1.0).contains(&momentum) {
                    return Err(Error::Data(format!(
                        "moving-average momentum {momentum} must be in [0, 1)"
                    )));
                }
                Ok(ActRangeMode::Ema { momentum })
            }
            _ => Err(Error::Data(format!(
                "unknown activation range mode '{s}' (expected fixed or ema[=MOMENTUM])"
            ))),
        }
    }
}

impl std::fmt::Display for ActRangeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActRangeMode::Fixed => f.write_str("fixed"),
            ActRangeMode::Ema { momentum } => write!(f, "ema={momentum}"),
        }
    }
}

/// Activation fake quantization with the parameters the quantize pass derives from a range
/// ([`activation_params`]: u8 affine, or power-of-two scales for fixed point). The range is
/// fixed or learned ([`ActRangeMode`]); learning happens only while
/// [`ActivationFakeQuant::set_observing`] is on, so evaluation passes leave it alone.
#[derive(Debug)]
pub struct ActivationFakeQuant {
    scheme: WeightScheme,
    bits: u32,
    mode: ActRangeMode,
    range: Mutex<Range>,
    observing: AtomicBool,
    name: String,
}

impl ActivationFakeQuant {
    pub fn new(
        range: Range,
        scheme: WeightScheme,
        bits: u32,
        mode: ActRangeMode,
        name: impl Into<String>,
    ) -> Result<ActivationFakeQuant> {
        let name = name.into();
        activation_params(range, scheme, bits, &name)?;
        Ok(ActivationFakeQuant {
            scheme,
            bits,
            mode,
            range: Mutex::new(range),
            observing: AtomicBool::new(false),
            name,
        })
    }

    /// Whether forward passes update a learned range (on for training steps only).
    pub fn set_observing(&self, on: bool) {
        self.observing.store(on, Ordering::Relaxed);
    }

    pub fn range(&self) -> Range {
        *self.range.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn params(&self) -> Result<QParams> {
        Ok(activation_params(self.range(), self.scheme, self.bits, &self.name)?.params)
    }
}

impl FakeQuant for ActivationFakeQuant {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut v = x.as_f32()?.to_vec();
        if let (ActRangeMode::Ema { momentum }, true) =
            (self.mode, self.observing.load(Ordering::Relaxed))
        {
            if !v.is_empty() {
                let (lo, hi) = crate::quant::linear::finite_min_max(&v, &self.name)?;
                let mut r = self.range.lock().unwrap_or_else(|e| e.into_inner());
                r.min = momentum * r.min + (1.0 - momentum) * lo;
                r.max = momentum * r.max + (1.0 - momentum) * hi;
            }
        }
        self.params()?.fake_quantize_slice(&mut v);
        Tensor::from_f32(x.shape().to_vec(), v)
    }

    /// Straight through inside the grid's range, zero where the forward pass clipped.
    fn backward(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (lo, hi) = self.params()?.real_range();
        let g = grad
            .as_f32()?
            .iter()
            .zip(x.as_f32()?)
            .map(|(&g, &v)| if v >= lo && v <= hi { g } else { 0.0 })
            .collect();
        Tensor::from_f32(grad.shape().to_vec(), g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
        Tensor::from_f32(shape, v).unwrap()
    }

    #[test]
    fn weight_grids_follow_the_weights_and_pass_gradients_through() {
        let w = t(vec![2, 3], vec![0.5, -0.25, 0.1, 2.0, -1.2, 0.3]);
        let g = t(vec![2, 3], vec![1.0, -2.0, 3.0, 0.5, 0.0, -1.0]);
        for scheme in [WeightScheme::Linear, WeightScheme::Fixed, WeightScheme::Log] {
            let fq = WeightFakeQuant::new(scheme, 4, true, 0, "w").unwrap();
            let y = fq.forward(&w).unwrap();
            // Re-quantizing quantized weights changes nothing: the export is the trained grid.
            assert_eq!(
                fq.forward(&y).unwrap().as_f32().unwrap(),
                y.as_f32().unwrap()
            );
            assert_eq!(
                fq.backward(&w, &g).unwrap().as_f32().unwrap(),
                g.as_f32().unwrap()
            );
        }
        let log = WeightFakeQuant::new(WeightScheme::Log, 4, false, 0, "w").unwrap();
        let y = log.forward(&w).unwrap();
        assert_eq!(y.as_f32().unwrap(), &[0.5, -0.25, 0.125, 2.0, -1.0, 0.25]);
        // Linear 2-bit symmetric per channel: codes -1, 0, 1 times max|row|.
        let lin = WeightFakeQuant::new(WeightScheme::Linear, 2, true, 0, "w").unwrap();
        assert_eq!(
            lin.forward(&w).unwrap().as_f32().unwrap(),
            &[0.5, 0.0, 0.0, 2.0, -2.0, 0.0]
        );
        assert!(WeightFakeQuant::new(WeightScheme::Kmeans, 4, true, 0, "w").is_err());

        // Least-squares clipping: one outlier no longer rounds the bulk to zero, and the
        // clipped grid survives min/max re-encoding (the outlier sits at the grid's end).
        let mut v: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 64.0).collect();
        v.push(2.0);
        let w = t(vec![1, 65], v);
        for scheme in [WeightScheme::Linear, WeightScheme::Fixed] {
            let minmax = WeightFakeQuant::new(scheme, 2, false, 0, "w").unwrap();
            let mse = minmax.clone().with_range(WeightRangeMode::Mse);
            let err = |y: &Tensor| -> f32 {
                y.as_f32()
                    .unwrap()
                    .iter()
                    .zip(w.as_f32().unwrap())
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum()
            };
            let (a, b) = (minmax.forward(&w).unwrap(), mse.forward(&w).unwrap());
            assert!(err(&b) < err(&a), "{scheme}: {} vs {}", err(&b), err(&a));
            assert_eq!(
                minmax.forward(&b).unwrap().as_f32().unwrap(),
                b.as_f32().unwrap()
            );
        }
    }

    #[test]
    fn kmeans_centroid_gradient_is_the_cluster_sum() {
        let w = t(vec![6], vec![0.1, 0.12, 0.9, 1.0, 0.11, 0.95]);
        let (fq, snapped) = KmeansFakeQuant::new(&w, 1, "w").unwrap();
        let s = snapped.as_f32().unwrap().to_vec();
        assert_eq!(fq.indices(), &[0, 0, 1, 1, 0, 1]);
        assert!((s[0] - 0.11).abs() < 1e-6 && (s[2] - 0.95).abs() < 1e-6);
        assert_eq!(fq.forward(&snapped).unwrap().as_f32().unwrap(), &s[..]);
        let g = t(vec![6], vec![1.0, 2.0, -1.0, 0.5, 3.0, 0.25]);
        let back = fq.backward(&snapped, &g).unwrap();
        assert_eq!(
            back.as_f32().unwrap(),
            &[6.0, 6.0, -0.25, -0.25, 6.0, -0.25]
        );
        let cb = kmeans::Codebook {
            centroids: fq.centroids(&s).unwrap(),
            indices: fq.indices().to_vec(),
        };
        assert_eq!(
            cb.cluster_grad_sums(g.as_f32().unwrap()).unwrap(),
            vec![6.0, -0.25]
        );
        // One SGD step on the master weights moves each centroid by -lr * (cluster sum) and
        // leaves the weights on their centroids.
        let lr = 0.1;
        let stepped: Vec<f32> = s
            .iter()
            .zip(back.as_f32().unwrap())
            .map(|(w, g)| w - lr * g)
            .collect();
        let c = fq.centroids(&stepped).unwrap();
        assert!((c[0] - (0.11 - 0.6)).abs() < 1e-6 && (c[1] - (0.95 + 0.025)).abs() < 1e-6);
        let y = fq.forward(&t(vec![6], stepped.clone())).unwrap();
        assert_eq!(y.as_f32().unwrap(), &stepped[..]);
        assert!(fq.forward(&t(vec![2], vec![0.0; 2])).is_err());
    }

    #[test]
    fn activation_ranges_are_fixed_or_move_only_while_observing() {
        let r = Range { min: 0.0, max: 1.0 };
        let x = t(vec![4], vec![0.0, 0.5, 3.0, -1.0]);
        let fixed =
            ActivationFakeQuant::new(r, WeightScheme::Linear, 8, ActRangeMode::Fixed, "a").unwrap();
        fixed.set_observing(true);
        let y = fixed.forward(&x).unwrap();
        let y = y.as_f32().unwrap();
        assert_eq!((y[0], y[3]), (0.0, 0.0));
        assert!((y[2] - 1.0).abs() < 1e-6);
        assert!((y[1] - 0.5).abs() <= 0.5 / 255.0);
        assert_eq!(fixed.range(), r);
        let g = fixed.backward(&x, &t(vec![4], vec![1.0; 4])).unwrap();
        assert_eq!(g.as_f32().unwrap(), &[1.0, 1.0, 0.0, 0.0]);

        let ema = ActivationFakeQuant::new(
            r,
            WeightScheme::Linear,
            8,
            ActRangeMode::Ema { momentum: 0.5 },
            "a",
        )
        .unwrap();
        ema.forward(&x).unwrap();
        assert_eq!(ema.range(), r, "not observing: evaluation leaves the range");
        ema.set_observing(true);
        ema.forward(&x).unwrap();
        assert_eq!(
            ema.range(),
            Range {
                min: -0.5,
                max: 2.0
            }
        );
        assert_eq!(
            "ema=0.9".parse::<ActRangeMode>().unwrap(),
            ActRangeMode::Ema { momentum: 0.9 }
        );
        assert!("ema=1.5".parse::<ActRangeMode>().is_err());
        assert!("learned".parse::<ActRangeMode>().is_err());
    }
}
