//! Running mean and variance for `mu +- k sigma` ranges.

use super::{Observer, Range};
use crate::error::Result;
use crate::quant::linear::{check_finite, tensor_error};

/// Running mean and population variance. Each batch is reduced in f64 with a two-pass mean and
/// sum of squared deviations, then combined with the running totals by Chan et al.'s parallel
/// form of Welford's update, which stays accurate over billions of values.
#[derive(Clone, Debug)]
pub struct MeanStd {
    name: String,
    count: u64,
    mean: f64,
    m2: f64,
}

impl MeanStd {
    pub fn new(name: &str) -> MeanStd {
        MeanStd {
            name: name.to_string(),
            count: 0,
            mean: 0.0,
            m2: 0.0,
        }
    }

    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// Population standard deviation (divides by n).
    pub fn std(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            (self.m2 / self.count as f64).sqrt()
        }
    }

    /// `[mu - k sigma, mu + k sigma]`, not clipped to the observed values. With `k = 2` an 8-bit
    /// affine scheme gets `s = 4 sigma / 255`. A constant tensor gives the empty-width range
    /// `[mu, mu]`, which [`crate::quant::QScheme::params_from_range`] handles.
    pub fn range(&self, k: f32) -> Result<Range> {
        if self.count == 0 {
            return Err(tensor_error(&self.name, "no values observed"));
        }
        if !(k.is_finite() && k >= 0.0) {
            return Err(tensor_error(
                &self.name,
                format!("invalid sigma multiple {k}"),
            ));
        }
        let half = f64::from(k) * self.std();
        Ok(Range {
            min: (self.mean - half) as f32,
            max: (self.mean + half) as f32,
        })
    }

    pub fn merge(&mut self, other: &MeanStd) {
        self.combine(other.count, other.mean, other.m2);
    }

    fn combine(&mut self, n_b: u64, mean_b: f64, m2_b: f64) {
        if n_b == 0 {
            return;
        }
        let n_a = self.count as f64;
        let n = n_a + n_b as f64;
        let delta = mean_b - self.mean;
        self.mean += delta * (n_b as f64 / n);
        self.m2 += m2_b + delta * delta * (n_a * n_b as f64 / n);
        self.count += n_b;
    }
}

impl Observer for MeanStd {
    fn observe(&mut self, x: &[f32]) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let sum = sum_f64(x, |v| v);
        if !sum.is_finite() {
            check_finite(x, &self.name)?;
        }
        let mean = sum / x.len() as f64;
        let m2 = sum_f64(x, |v| (v - mean) * (v - mean));
        self.combine(x.len() as u64, mean, m2);
        Ok(())
    }

    fn count(&self) -> u64 {
        self.count
    }
}

/// Sum of `f(x)` in f64 over four independent lanes so the loop vectorises.
fn sum_f64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; 4];
    let chunks = x.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..4 {
            acc[i] += f(f64::from(c[i]));
        }
    }
    for &v in rest {
        acc[0] += f(f64::from(v));
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QScheme;

    #[test]
    fn two_sigma_range_of_plus_minus_one() {
        let mut m = MeanStd::new("x");
        for _ in 0..10 {
            m.observe(&[-1.0, 1.0, -1.0, 1.0, 1.0, -1.0]).unwrap();
        }
        assert_eq!(m.mean(), 0.0);
        assert_eq!(m.std(), 1.0);
        let r = m.range(2.0).unwrap();
        assert_eq!((r.min, r.max), (-2.0, 2.0));
        let p = r.params(&QScheme::U8_AFFINE, "x").unwrap();
        assert_eq!(p.scale, (4.0f64 / 255.0) as f32);
    }

    #[test]
    fn batched_equals_one_shot() {
        let x: Vec<f32> = (0..10_000)
            .map(|i| 1000.0 + ((i * 7919 % 1000) as f32) * 0.01)
            .collect();
        let mut one = MeanStd::new("x");
        one.observe(&x).unwrap();
        let mut many = MeanStd::new("x");
        for c in x.chunks(37) {
            many.observe(c).unwrap();
        }
        let mean: f64 = x.iter().map(|&v| f64::from(v)).sum::<f64>() / x.len() as f64;
        let var: f64 = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / x.len() as f64;
        for m in [&one, &many] {
            assert!((m.mean() - mean).abs() < 1e-9);
            assert!((m.std() - var.sqrt()).abs() < 1e-9);
        }
        assert!(many.observe(&[f32::INFINITY]).is_err());
        assert_eq!(many.count(), 10_000);
        assert!(MeanStd::new("e").range(2.0).is_err());
    }
}
