//! Threshold rules over a [`Histogram`]: non-saturating max, percentile, KL divergence
//! (entropy) and minimum expected MSE.
//!
//! Rules over an [`HistKind::Abs`] histogram choose a threshold `t` and return `[-t, t]`,
//! narrowed to `[0, t]` (or `[-t, 0]`) when every observed value had one sign, so an affine
//! scheme does not waste half its codes on a ReLU output.

use super::histogram::{HistKind, HistView, Histogram};
use super::kl;
use super::Range;
use crate::error::Result;
use crate::quant::linear::{tensor_error, QParams, QScheme};

/// Number of range shrink factors the MSE rule tries on a signed histogram.
const MSE_STEPS: usize = 1024;

impl Histogram {
    /// The non-saturating range: all observed values fit.
    pub fn max_range(&self) -> Result<Range> {
        Ok(full_range(&self.view()?))
    }

    /// Range keeping `p` percent of the values (`0 < p <= 100`), interpolating linearly inside
    /// the bin where the cut falls. An abs histogram cuts the top `100 - p` percent of `|x|`; a
    /// signed one cuts `(100 - p) / 2` percent from each tail, as ONNX Runtime's percentile
    /// calibrator does. `p = 100` gives [`Histogram::max_range`].
    pub fn percentile_range(&self, p: f64) -> Result<Range> {
        if !(p > 0.0 && p <= 100.0) {
            return Err(tensor_error(
                self.name(),
                format!("percentile {p} is not in (0, 100]"),
            ));
        }
        let v = self.view()?;
        if v.bins.is_empty() {
            return Ok(full_range(&v));
        }
        let q = p / 100.0;
        Ok(match v.kind {
            HistKind::Abs => abs_range(&v, quantile(&v, q) as f32),
            HistKind::Signed => {
                let cut = (1.0 - q) / 2.0;
                Range {
                    min: quantile(&v, cut) as f32,
                    max: quantile(&v, 1.0 - cut) as f32,
                }
            }
        })
    }

    /// TensorRT's entropy calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017), in
    /// the formulation of MXNet and ONNX Runtime. Needs an [`HistKind::Abs`] histogram of `n`
    /// bins; `levels` is the number of quantized bins, 128 for 8 bits (`2^(b-1)`).
    ///
    /// For every candidate `i` in `max(levels, 128)..=n` bins (capped at `n`):
    /// * `P` = bins `[0, i)`, with all counts beyond (the outliers) added to bin `i - 1`;
    /// * `Q` = bins `[0, i)` merged into `levels` groups of `i / levels` bins (the last group
    ///   takes the remainder), each group's total spread evenly over the bins where `P` is
    ///   non-zero, and 0 where `P` is 0;
    /// * both smoothed (zero bins get 1e-4, taken from the non-zero ones) and normalised.
    ///
    /// The threshold is the right edge `i * width` of the `i` minimising `KL(P || Q)`; ties go
    /// to the smaller `i`. TensorRT's slides put it at `(i + 0.5) * width`, half a bin further.
    ///
    /// Exact zeros are left out of `P` and `Q`: every range represents 0 exactly (zero point),
    /// so they carry no information about where to clip, but after ReLU they are most of the
    /// data (62-97 % in the MNIST CNNs) and their spike in bin 0, smeared over a whole group in
    /// `Q`, dominates the divergence and pulls the threshold down to a fraction of the useful
    /// range (LeNet-5's hidden FC layer: 3.5 instead of 13.8 of max 14.2, costing top-1).
    pub fn entropy_range(&self, levels: usize) -> Result<Range> {
        let v = self.view()?;
        if v.kind != HistKind::Abs {
            return Err(tensor_error(
                self.name(),
                "KL calibration needs a histogram of |x|",
            ));
        }
        if v.bins.is_empty() {
            return Ok(full_range(&v));
        }
        let n = v.bins.len();
        if levels < 2 || levels > n {
            return Err(tensor_error(
                self.name(),
                format!("KL calibration needs 2 <= levels <= {n} bins, got {levels}"),
            ));
        }
        let mut h: Vec<f64> = v.bins.iter().map(|&c| c as f64).collect();
        h[0] = (h[0] - v.zeros as f64).max(0.0);
        // Candidates start at bin 128 as in TensorRT (or at `levels` when that is larger), never
        // at `levels` alone: with few levels (3- to 6-bit activations) a threshold in the
        // nearly empty low bins would win, because Q is normalised over the few values below
        // it and so lands its mass in the same last bin where P piles up everything clipped
        // (the MNIST CNN's input, mostly background at |x| = 0.42, was clipped to 0.0055).
        let first = levels.max(kl::MIN_KL_CANDIDATE_BINS).min(n);
        let best = kl::best_candidate(&h, levels, first);
        let t = (best as f64 * v.width).min(f64::from(v.min.abs().max(v.max.abs())));
        Ok(abs_range(&v, t as f32))
    }

    /// The range minimising the expected squared quantization error of `scheme` over the
    /// histogram (see [`Histogram::expected_mse`]). An abs histogram tries every threshold on
    /// a bin edge up to `max |x|`; a signed one tries the observed range shrunk by factors
    /// `k / 1024`, `k = 1..=1024`. Ties go to the smaller range.
    pub fn mse_range(&self, scheme: &QScheme) -> Result<Range> {
        let v = self.view()?;
        if v.bins.is_empty() {
            return Ok(full_range(&v));
        }
        let mut best: Option<(f64, Range)> = None;
        let mut consider = |r: Range| -> Result<()> {
            let p = r.params(scheme, self.name())?;
            let e = mse_of(&v, &p);
            if best.is_none_or(|(b, _)| e < b) {
                best = Some((e, r));
            }
            Ok(())
        };
        match v.kind {
            HistKind::Abs => {
                let amax = f64::from(v.min.abs().max(v.max.abs()));
                let steps = ((amax / v.width).ceil() as usize).clamp(1, v.bins.len());
                for i in 1..=steps {
                    consider(abs_range(&v, (i as f64 * v.width).min(amax) as f32))?;
                }
            }
            HistKind::Signed => {
                for k in 1..=MSE_STEPS {
                    let a = k as f32 / MSE_STEPS as f32;
                    consider(Range {
                        min: v.min * a,
                        max: v.max * a,
                    })?;
                }
            }
        }
        match best {
            Some((_, r)) => Ok(r),
            None => Ok(full_range(&v)),
        }
    }

    /// Expected squared error per value of quantizing the observed data with `params`,
    /// assuming values spread uniformly inside each bin. The error of rounding is integrated
    /// exactly over each bin (a sawtooth between the grid's end levels, a parabola beyond them),
    /// so spikes (the zeros after a ReLU) and coarse low-bit grids are both handled. For an abs
    /// histogram the error of `|x|` is used, exact for zero-point-0 grids.
    pub fn expected_mse(&self, params: &QParams) -> Result<f64> {
        params.validate(self.name())?;
        Ok(mse_of(&self.view()?, params))
    }
}

fn full_range(v: &HistView) -> Range {
    match v.kind {
        HistKind::Abs => abs_range(v, v.min.abs().max(v.max.abs())),
        HistKind::Signed => Range {
            min: v.min,
            max: v.max,
        },
    }
}

/// `[-t, t]`, or one-sided when the observed data has one sign.
fn abs_range(v: &HistView, t: f32) -> Range {
    if v.min >= 0.0 {
        Range { min: 0.0, max: t }
    } else if v.max <= 0.0 {
        Range { min: -t, max: 0.0 }
    } else {
        Range::symmetric(t)
    }
}

/// Value below which a fraction `q` of the counts lies, interpolated inside its bin and clamped
/// to the observed values.
fn quantile(v: &HistView, q: f64) -> f64 {
    let target = q * v.total as f64;
    let (lo, hi) = match v.kind {
        HistKind::Abs => (0.0, f64::from(v.min.abs().max(v.max.abs()))),
        HistKind::Signed => (f64::from(v.min), f64::from(v.max)),
    };
    let mut cum = 0f64;
    for (b, &c) in v.bins.iter().enumerate() {
        let c = c as f64;
        if c > 0.0 && cum + c >= target {
            let frac = ((target - cum) / c).clamp(0.0, 1.0);
            return (v.lo + (b as f64 + frac) * v.width).clamp(lo, hi);
        }
        cum += c;
    }
    hi
}

fn mse_of(v: &HistView, p: &QParams) -> f64 {
    let s = f64::from(p.scale);
    let kmin = f64::from(p.qmin) - f64::from(p.zero_point);
    let kmax = f64::from(p.qmax) - f64::from(p.zero_point);
    if v.bins.is_empty() {
        // Every value equals `min` (or |x| = 0 for an abs histogram).
        let x = if v.kind == HistKind::Abs { 0.0 } else { v.min };
        let e = f64::from(x) - f64::from(p.fake_quantize(x));
        return e * e;
    }
    let mut sum = 0.0;
    for (b, &c) in v.bins.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let a = v.lo + b as f64 * v.width;
        sum += c as f64 / v.width * sq_error_integral(a, a + v.width, s, kmin * s, kmax * s);
    }
    sum / v.total as f64
}

/// `integral over [a, b] of (x - Q(x))^2 dx` for the grid `Q(x) = s * round(x / s)` clamped to
/// `[lo, hi]` (both multiples of `s`).
fn sq_error_integral(a: f64, b: f64, s: f64, lo: f64, hi: f64) -> f64 {
    let mut total = 0.0;
    if a < lo {
        let e = b.min(lo);
        total += ((e - lo).powi(3) - (a - lo).powi(3)) / 3.0;
    }
    let (m0, m1) = (a.max(lo), b.min(hi));
    if m0 < m1 {
        total += sawtooth_integral(m0, m1, s);
    }
    if b > hi {
        let st = a.max(hi);
        total += ((b - hi).powi(3) - (st - hi).powi(3)) / 3.0;
    }
    total
}

/// `integral over [a, b] of (x - s round(x / s))^2 dx`. With `y = x / s + 1/2 = n + f`, the
/// antiderivative from the start of a rounding cell is `s^3 (n / 12 + ((f - 1/2)^3 + 1/8) / 3)`;
/// differences of whole cells are taken as integers so large `n` does not cancel.
fn sawtooth_integral(a: f64, b: f64, s: f64) -> f64 {
    let split = |x: f64| {
        let y = x / s + 0.5;
        let n = y.floor();
        (n, y - n)
    };
    let (na, fa) = split(a);
    let (nb, fb) = split(b);
    s * s * s * ((nb - na) / 12.0 + ((fb - 0.5).powi(3) - (fa - 0.5).powi(3)) / 3.0)
}

#[cfg(test)]
mod tests {
    use super::super::Observer;
    use super::*;

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        crate::quant::test_rng::Rng::new(seed).gaussians(n)
    }

    #[test]
    fn sawtooth_integral_matches_numeric() {
        for &(a, b, s) in &[
            (0.0, 0.5, 1.0),
            (-3.3, 7.1, 0.7),
            (100.2, 100.9, 0.25),
            (-0.1, 0.1, 1.0),
        ] {
            let n = 200_000;
            let h = (b - a) / n as f64;
            let num: f64 = (0..n)
                .map(|i| {
                    let x = a + (i as f64 + 0.5) * h;
                    let e = x - s * (x / s).round();
                    e * e * h
                })
                .sum();
            let exact = sawtooth_integral(a, b, s);
            assert!(
                (num - exact).abs() < 1e-6 * (1.0 + exact),
                "{a} {b} {s}: {num} vs {exact}"
            );
        }
        // One full cell: s^3 / 12.
        assert!((sawtooth_integral(-0.5, 0.5, 1.0) - 1.0 / 12.0).abs() < 1e-12);
        // Clipped part: error (x - hi)^2 beyond hi = 1 over [1, 2] is 1/3.
        assert!((sq_error_integral(1.0, 2.0, 1.0, -1.0, 1.0) - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn percentile_cuts_the_tail() {
        let mut h = Histogram::new("x", HistKind::Abs, 1000).unwrap();
        let data: Vec<f32> = (1..=1000).map(|i| i as f32 / 100.0).collect(); // 0.01..10
        h.observe(&data).unwrap();
        let r = h.percentile_range(99.0).unwrap();
        assert_eq!(r.min, 0.0);
        assert!((r.max - 9.9).abs() < 0.011, "{r:?}");
        assert_eq!(h.percentile_range(100.0).unwrap().max, 10.0);
        assert!(h.percentile_range(0.0).is_err());
        let mut s = Histogram::new("x", HistKind::Signed, 2000).unwrap();
        let sym: Vec<f32> = (-1000..=1000).map(|i| i as f32 / 100.0).collect();
        s.observe(&sym).unwrap();
        let r = s.percentile_range(98.0).unwrap();
        assert!(
            (r.min + 9.8).abs() < 0.02 && (r.max - 9.8).abs() < 0.02,
            "{r:?}"
        );
        assert_eq!(
            s.max_range().unwrap(),
            Range {
                min: -10.0,
                max: 10.0
            }
        );
    }

    #[test]
    fn kl_on_gaussian_clips_the_tail() {
        let x = gaussian(200_000, 7);
        let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let mut h = Histogram::new("act", HistKind::Abs, 2048).unwrap();
        for c in x.chunks(1000) {
            h.observe(c).unwrap();
        }
        let r = h.entropy_range(128).unwrap();
        assert_eq!(r.min, -r.max);
        // Max |x| of 200k normal samples is about 4.5 sigma; KL clips the sparse tail (numpy's
        // run of the same algorithm on such a sample gives 0.87 max |x|).
        assert!(
            r.max < 0.95 * amax && r.max > 3.0,
            "t = {} of max {amax}",
            r.max
        );
        let s = Histogram::new("s", HistKind::Signed, 2048).unwrap();
        assert!(s.entropy_range(128).is_err());
        assert!(h.entropy_range(4096).is_err());
    }

    #[test]
    fn kl_ignores_the_zero_spike_after_relu() {
        // The same half-Gaussian with and without 90 % exact zeros (a ReLU output): zeros are
        // exact in every range, so the threshold must not move.
        let pos: Vec<f32> = gaussian(100_000, 3).into_iter().map(f32::abs).collect();
        let mut plain = Histogram::new("a", HistKind::Abs, 2048).unwrap();
        let mut relu = Histogram::new("b", HistKind::Abs, 2048).unwrap();
        for c in pos.chunks(1000) {
            plain.observe(c).unwrap();
            relu.observe(&[0.0; 9000]).unwrap();
            relu.observe(c).unwrap();
        }
        let (a, b) = (
            plain.entropy_range(256).unwrap(),
            relu.entropy_range(256).unwrap(),
        );
        assert_eq!(a, b);
        // Merging keeps the zero count.
        let mut merged = Histogram::new("c", HistKind::Abs, 2048).unwrap();
        merged.merge(&relu).unwrap();
        assert_eq!(merged.entropy_range(256).unwrap(), b);
    }

    #[test]
    fn kl_with_few_levels_never_clips_below_a_sixteenth_of_the_maximum() {
        // MNIST's normalised input: mostly background at -0.4242, a few anti-aliased pixels
        // near zero, strokes up to 2.82. With 8 levels, candidates starting at bin 8 chose
        // a threshold of 0.0055 (below all the data that matters).
        let mut x = vec![-0.4242f32; 8000];
        x.extend((0..50).map(|i| -0.4242 + 0.005 * i as f32));
        x.extend((0..1950).map(|i| 2.8215 * (i as f32 / 1949.0)));
        let mut h = Histogram::new("input", HistKind::Abs, 2048).unwrap();
        h.observe(&x).unwrap();
        let r = h.entropy_range(8).unwrap();
        assert!(r.max >= 2.8215 / 16.0, "threshold {}", r.max);
    }

    #[test]
    fn mse_threshold_shrinks_with_fewer_bits() {
        let x = gaussian(100_000, 11);
        let mut h = Histogram::new("w", HistKind::Abs, 2048).unwrap();
        h.observe(&x).unwrap();
        let t4 = h
            .mse_range(&QScheme::new(4, true, true).unwrap())
            .unwrap()
            .max;
        let t8 = h.mse_range(&QScheme::S8_SYMMETRIC).unwrap().max;
        // Known optimal clipping of a unit Gaussian: about 2.5 sigma at 4 bits (Banner et al.),
        // much wider at 8 bits.
        assert!(t4 > 2.0 && t4 < 3.0, "{t4}");
        assert!(t8 > t4 + 0.8, "{t8} vs {t4}");
        // The model error agrees with the measured error of fake quantization.
        let p = QScheme::new(4, true, true)
            .unwrap()
            .params_from_threshold(t4, "w")
            .unwrap();
        let measured: f64 = x
            .iter()
            .map(|&v| (f64::from(v) - f64::from(p.fake_quantize(v))).powi(2))
            .sum::<f64>()
            / x.len() as f64;
        let model = h.expected_mse(&p).unwrap();
        assert!(
            (model - measured).abs() < 0.03 * measured,
            "{model} vs {measured}"
        );
    }

    #[test]
    fn mse_on_signed_histogram_with_affine_scheme() {
        let x: Vec<f32> = gaussian(50_000, 5)
            .iter()
            .map(|v| v.abs() * 0.5 - 0.2)
            .collect();
        let mut h = Histogram::new("a", HistKind::Signed, 2048).unwrap();
        h.observe(&x).unwrap();
        let scheme = QScheme::new(4, false, false).unwrap();
        let r = h.mse_range(&scheme).unwrap();
        let full = h.max_range().unwrap();
        assert!(
            r.max < full.max && r.max > 0.5 * full.max.min(1.5),
            "{r:?} of {full:?}"
        );
        let e_best = h.expected_mse(&r.params(&scheme, "a").unwrap()).unwrap();
        let e_full = h.expected_mse(&full.params(&scheme, "a").unwrap()).unwrap();
        assert!(e_best < e_full);
    }

    #[test]
    fn degenerate_histograms_fall_back_to_the_observed_value() {
        let mut h = Histogram::new("z", HistKind::Abs, 2048).unwrap();
        h.observe(&[0.0; 50]).unwrap();
        assert_eq!(h.entropy_range(128).unwrap(), Range { min: 0.0, max: 0.0 });
        assert_eq!(
            h.percentile_range(99.9).unwrap(),
            Range { min: 0.0, max: 0.0 }
        );
        let p = h.mse_range(&QScheme::S8_SYMMETRIC).unwrap();
        assert_eq!(p, Range { min: 0.0, max: 0.0 });
        let e = Histogram::new("e", HistKind::Abs, 2048).unwrap();
        assert!(e.max_range().unwrap_err().to_string().contains("'e'"));
    }
}
