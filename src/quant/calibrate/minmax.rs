//! Running min/max: the non-saturating range of everything observed.

use super::{Observer, Range};
use crate::error::Result;
use crate::quant::linear::{finite_min_max, tensor_error};

/// Running minimum and maximum, optionally as an exponential moving average of per-batch
/// extremes (`r <- r + c (batch - r)`, the estimator of TensorFlow's QAT and PyTorch's
/// `MovingAverageMinMaxObserver`), which forgets early outliers.
#[derive(Clone, Debug)]
pub struct MinMax {
    name: String,
    min: f32,
    max: f32,
    count: u64,
    averaging: Option<f32>,
}

impl MinMax {
    pub fn new(name: &str) -> MinMax {
        MinMax {
            name: name.to_string(),
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count: 0,
            averaging: None,
        }
    }

    /// Moving average with constant `c` in `(0, 1]`; the first batch initialises the range.
    pub fn moving_average(name: &str, c: f32) -> Result<MinMax> {
        if !(c > 0.0 && c <= 1.0) {
            return Err(tensor_error(
                name,
                format!("moving-average constant {c} is not in (0, 1]"),
            ));
        }
        Ok(MinMax {
            averaging: Some(c),
            ..MinMax::new(name)
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The observed range, or an error when nothing was observed.
    pub fn range(&self) -> Result<Range> {
        if self.count == 0 {
            return Err(tensor_error(&self.name, "no values observed"));
        }
        Ok(Range {
            min: self.min,
            max: self.max,
        })
    }

    /// Combines another observer of the same tensor (e.g. from another thread). Averaging
    /// observers are combined by taking the wider range.
    pub fn merge(&mut self, other: &MinMax) {
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.count += other.count;
    }
}

impl Observer for MinMax {
    fn observe(&mut self, x: &[f32]) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let (lo, hi) = finite_min_max(x, &self.name)?;
        match self.averaging {
            Some(c) if self.count > 0 => {
                self.min += c * (lo - self.min);
                self.max += c * (hi - self.max);
            }
            _ => {
                self.min = self.min.min(lo);
                self.max = self.max.max(hi);
            }
        }
        self.count += x.len() as u64;
        Ok(())
    }

    fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_min_max_over_batches() {
        let mut m = MinMax::new("x");
        assert!(m.range().is_err());
        m.observe(&[1.0, 2.0]).unwrap();
        m.observe(&[]).unwrap();
        m.observe(&[-3.0, 0.5]).unwrap();
        assert_eq!(
            m.range().unwrap(),
            Range {
                min: -3.0,
                max: 2.0
            }
        );
        assert_eq!(m.count(), 4);
        let err = m.observe(&[0.0, f32::NAN]).unwrap_err().to_string();
        assert!(err.contains("'x'"), "{err}");
        assert_eq!(m.count(), 4);
    }

    #[test]
    fn moving_average_forgets_outliers() {
        let mut m = MinMax::moving_average("x", 0.5).unwrap();
        m.observe(&[-8.0, 8.0]).unwrap();
        m.observe(&[-1.0, 1.0]).unwrap();
        m.observe(&[-1.0, 1.0]).unwrap();
        // 8 -> 4.5 -> 2.75
        assert_eq!(m.range().unwrap().max, 2.75);
        assert_eq!(m.range().unwrap().min, -2.75);
        assert!(MinMax::moving_average("x", 0.0).is_err());
    }
}
