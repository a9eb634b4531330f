//! Pointwise activations, applied in place. Shared by the standalone activation ops and by the
//! fused epilogues of Conv/Gemm/MatMul so both compute bit-identical results.

/// An activation that can run as a kernel epilogue.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Relu,
    /// Clamp to `[min, max]`; ReLU6 is `Clip { min: 0, max: 6 }`.
    Clip {
        min: f32,
        max: f32,
    },
    Sigmoid,
    /// `max(0, min(1, alpha * x + beta))`.
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    /// `x * max(0, min(1, x / 6 + 1/2))`.
    HardSwish,
    Tanh,
    LeakyRelu {
        alpha: f32,
    },
}

impl Activation {
    #[inline]
    pub fn apply_scalar(self, x: f32) -> f32 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Clip { min, max } => x.max(min).min(max),
            Activation::Sigmoid => sigmoid(x),
            Activation::HardSigmoid { alpha, beta } => (alpha * x + beta).clamp(0.0, 1.0),
            Activation::HardSwish => x * (x * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0),
            Activation::Tanh => x.tanh(),
            Activation::LeakyRelu { alpha } => {
                if x < 0.0 {
                    alpha * x
                } else {
                    x
                }
            }
        }
    }

    /// Applies the activation to every element of `data`.
    pub fn apply(self, data: &mut [f32]) {
        match self {
            // The simple clamps auto-vectorise well in this form.
            Activation::Relu => data.iter_mut().for_each(|x| *x = x.max(0.0)),
            Activation::Clip { min, max } => data.iter_mut().for_each(|x| *x = x.max(min).min(max)),
            other => data.iter_mut().for_each(|x| *x = other.apply_scalar(*x)),
        }
    }
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    // Split by sign so exp never overflows.
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_match_definitions() {
        assert_eq!(Activation::Relu.apply_scalar(-1.0), 0.0);
        assert_eq!(
            Activation::Clip { min: 0.0, max: 6.0 }.apply_scalar(7.0),
            6.0
        );
        assert!((Activation::HardSwish.apply_scalar(1.0) - 1.0 * (1.0 / 6.0 + 0.5)).abs() < 1e-7);
        assert_eq!(Activation::HardSwish.apply_scalar(-4.0), 0.0);
        assert_eq!(Activation::HardSwish.apply_scalar(4.0), 4.0);
        assert!((sigmoid(-100.0)).abs() < 1e-30);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
    }
}
