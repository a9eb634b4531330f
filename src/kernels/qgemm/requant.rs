//! Requantization of i32 accumulators to 8-bit outputs, two ways:
//!
//! * [`Requant::Float`], what ONNX Runtime's `QLinearMatMul`/`QLinearConv` do (MLAS
//!   `MlasRequantizeOutput`): `y = saturate(round_half_even(f32(acc + bias) * scale) + zp)` with
//!   `scale = a_scale * w_scale / y_scale` computed in f32 in that order
//!   ([`float_scales`]). Bit-exact with ORT.
//! * [`Requant::Fixed`], integer-only (Jacob et al. 2018; gemmlowp, TFLite): the real multiplier
//!   `M` as a Q31 `m0` in `[2^30, 2^31)` and a power-of-two exponent, applied with
//!   `SaturatingRoundingDoublingHighMul` and `RoundingDivideByPOT`. Bit-exact with TFLite's
//!   `MultiplyByQuantizedMultiplier`. It rounds twice (ties up, then ties away from zero), so it
//!   can differ from the float path by one code near ties.
//!
//! Both add the i32 bias first and the output zero point last, then clamp to `[qmin, qmax]`,
//! which a fused ReLU or ReLU6 tightens ([`Requant::fuse_clip`]).

use crate::error::{Error, Result};
use crate::quant::linear::{code_bounds, round_half_even, round_to_code};
use crate::quant::QStore;

/// `M ~= m0 * 2^(shift - 31)`: a Q31 mantissa `m0` in `[2^30, 2^31)` (or 0) and an exponent;
/// `shift < 0` is a right shift by `-shift` (the usual case, `M < 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantizedMultiplier {
    pub m0: i32,
    pub shift: i32,
}

impl QuantizedMultiplier {
    /// TFLite's `QuantizeMultiplier`: `M = q 2^shift` with `q` in `[0.5, 1)`,
    /// `m0 = round(q 2^31)` (half away from zero), renormalised when it rounds up to 2^31.
    /// Multipliers below `2^-32` become 0. `M` must be finite, non-negative and below `2^31`.
    pub fn from_real(m: f64) -> Result<QuantizedMultiplier> {
        if !(m.is_finite() && m >= 0.0) {
            return Err(Error::Data(format!(
                "requantization multiplier {m} is not a finite non-negative number"
            )));
        }
        if m == 0.0 {
            return Ok(QuantizedMultiplier { m0: 0, shift: 0 });
        }
        let (q, mut shift) = frexp(m);
        let mut m0 = (q * 2f64.powi(31)).round() as i64;
        if m0 == 1 << 31 {
            m0 /= 2;
            shift += 1;
        }
        if shift < -31 {
            return Ok(QuantizedMultiplier { m0: 0, shift: 0 });
        }
        if shift > 31 {
            return Err(Error::Data(format!(
                "requantization multiplier {m} is too large (at least 2^31)"
            )));
        }
        Ok(QuantizedMultiplier {
            m0: m0 as i32,
            shift,
        })
    }

    /// TFLite's `MultiplyByQuantizedMultiplier`: `round(x * M)` in integer arithmetic. For
    /// `M >= 1` the left-shifted `x` can leave i32 (undefined behaviour in TFLite); here the
    /// doubling high multiply is then done in 128 bits and the result saturates.
    #[inline]
    pub fn apply(&self, x: i32) -> i32 {
        if self.shift > 0 {
            let ab = (i128::from(x) << self.shift) * i128::from(self.m0);
            let nudge = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
            let v = (ab + nudge) / (1i128 << 31);
            return v.clamp(i128::from(i32::MIN), i128::from(i32::MAX)) as i32;
        }
        rounding_divide_by_pot(
            saturating_rounding_doubling_high_mul(x, self.m0),
            -self.shift,
        )
    }

    /// The real multiplier this represents.
    pub fn to_real(&self) -> f64 {
        f64::from(self.m0) * 2f64.powi(self.shift - 31)
    }
}

/// gemmlowp's `SaturatingRoundingDoublingHighMul`: the high 32 bits of `2 a b`, rounded to
/// nearest with ties toward +inf (a +-2^30 nudge, then a truncating division); the one
/// overflowing case (`a = b = i32::MIN`) saturates.
#[inline]
pub fn saturating_rounding_doubling_high_mul(a: i32, b: i32) -> i32 {
    if a == i32::MIN && b == i32::MIN {
        return i32::MAX;
    }
    let ab = i64::from(a) * i64::from(b);
    let nudge = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
    // Division truncates toward zero, as gemmlowp's does; a shift would floor.
    ((ab + nudge) / (1i64 << 31)) as i32
}

/// gemmlowp's `RoundingDivideByPOT`: `x / 2^exponent` rounded to nearest, ties away from zero.
/// `exponent` is clamped to `[0, 31]`.
#[inline]
pub fn rounding_divide_by_pot(x: i32, exponent: i32) -> i32 {
    let e = exponent.clamp(0, 31);
    let mask = ((1i64 << e) - 1) as i32;
    let remainder = x & mask;
    let threshold = (mask >> 1) + i32::from(x < 0);
    (x >> e) + i32::from(remainder > threshold)
}

/// ONNX Runtime's output scales: `a_scale * w_scale[i] / y_scale` in f32, left to right.
pub fn float_scales(a_scale: f32, w_scales: &[f32], y_scale: f32) -> Vec<f32> {
    w_scales.iter().map(|&w| a_scale * w / y_scale).collect()
}

/// Real multipliers `a_scale * w_scale[i] / y_scale` (in f64) as fixed-point multipliers.
pub fn fixed_multipliers(
    a_scale: f32,
    w_scales: &[f32],
    y_scale: f32,
) -> Result<Vec<QuantizedMultiplier>> {
    w_scales
        .iter()
        .map(|&w| {
            QuantizedMultiplier::from_real(f64::from(a_scale) * f64::from(w) / f64::from(y_scale))
        })
        .collect()
}

/// How accumulators become outputs. Scales/multipliers have one entry (per tensor) or one per
/// output column (per-channel weights).
#[derive(Clone, Debug, PartialEq)]
pub enum Requant {
    Float {
        scales: Vec<f32>,
        zero_point: i32,
        qmin: i32,
        qmax: i32,
    },
    Fixed {
        multipliers: Vec<QuantizedMultiplier>,
        zero_point: i32,
        qmin: i32,
        qmax: i32,
    },
}

impl Requant {
    pub fn zero_point(&self) -> i32 {
        match self {
            Requant::Float { zero_point, .. } | Requant::Fixed { zero_point, .. } => *zero_point,
        }
    }

    /// Output code range `[qmin, qmax]`.
    pub fn bounds(&self) -> (i32, i32) {
        match self {
            Requant::Float { qmin, qmax, .. } | Requant::Fixed { qmin, qmax, .. } => (*qmin, *qmax),
        }
    }

    fn channels(&self) -> usize {
        match self {
            Requant::Float { scales, .. } => scales.len(),
            Requant::Fixed { multipliers, .. } => multipliers.len(),
        }
    }

    /// Tightens the output range to a fused activation clamping real values to `[lo, hi]`
    /// (ReLU: `[0, inf]`, ReLU6: `[0, 6]`), with the output scale `y_scale`. Bounds are
    /// quantized like `QuantizeLinear` (half to even); an infinite bound leaves that side.
    pub fn fuse_clip(mut self, lo: f32, hi: f32, y_scale: f32) -> Result<Requant> {
        if !(y_scale.is_finite() && y_scale > 0.0) || lo.is_nan() || hi.is_nan() || lo > hi {
            return Err(Error::Data(format!(
                "cannot fuse the clip [{lo}, {hi}] at output scale {y_scale}"
            )));
        }
        let zp = self.zero_point();
        let code = |v: f32| -> Option<i32> {
            v.is_finite()
                .then(|| round_half_even(v / y_scale) as i64 + i64::from(zp))
                .map(|c| c.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32)
        };
        let (qlo, qhi) = (code(lo), code(hi));
        match &mut self {
            Requant::Float { qmin, qmax, .. } | Requant::Fixed { qmin, qmax, .. } => {
                let (omin, omax) = (*qmin, *qmax);
                // Kept inside the original grid: a clip entirely outside it pins every output
                // to the nearest end.
                if let Some(c) = qlo {
                    *qmin = omin.max(c).min(omax);
                }
                if let Some(c) = qhi {
                    *qmax = omax.min(c).max(omin);
                }
                if *qmin > *qmax {
                    *qmax = *qmin;
                }
            }
        }
        Ok(self)
    }

    /// Checks the parameters against `n` output columns and an output type of range
    /// `[tmin, tmax]`.
    pub(super) fn validate(&self, n: usize, tmin: i32, tmax: i32) -> Result<()> {
        let c = self.channels();
        if c != 1 && c != n {
            return Err(Error::Shape(format!(
                "qgemm: {c} requantization scales for {n} columns"
            )));
        }
        if let Requant::Float { scales, .. } = self {
            if let Some(s) = scales.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
                return Err(Error::Data(format!(
                    "qgemm: requantization scale {s} is not finite and non-negative"
                )));
            }
        }
        let (qmin, qmax) = self.bounds();
        if qmin > qmax || qmin < tmin || qmax > tmax {
            return Err(Error::Data(format!(
                "qgemm: output range [{qmin}, {qmax}] does not fit the output type [{tmin}, {tmax}]"
            )));
        }
        Ok(())
    }

    /// Requantizes one row of accumulators into `out`: adds `bias`, scales, adds the zero
    /// point, clamps. Scalar and per-column parameters and the bias are dispatched outside the
    /// element loop so each variant vectorises.
    pub(super) fn apply_row<T: QStore>(&self, acc: &[i32], bias: Option<&[i32]>, out: &mut [T]) {
        use std::iter::repeat;
        match (self, bias) {
            (Requant::Float { scales, .. }, Some(b)) if scales.len() > 1 => {
                self.float_row(acc, b.iter().copied(), scales.iter().copied(), out)
            }
            (Requant::Float { scales, .. }, Some(b)) => {
                self.float_row(acc, b.iter().copied(), repeat(scales[0]), out)
            }
            (Requant::Float { scales, .. }, None) if scales.len() > 1 => {
                self.float_row(acc, repeat(0), scales.iter().copied(), out)
            }
            (Requant::Float { scales, .. }, None) => {
                self.float_row(acc, repeat(0), repeat(scales[0]), out)
            }
            (Requant::Fixed { multipliers, .. }, Some(b)) if multipliers.len() > 1 => {
                self.fixed_row(acc, b.iter().copied(), multipliers.iter().copied(), out)
            }
            (Requant::Fixed { multipliers, .. }, Some(b)) => {
                self.fixed_row(acc, b.iter().copied(), repeat(multipliers[0]), out)
            }
            (Requant::Fixed { multipliers, .. }, None) if multipliers.len() > 1 => {
                self.fixed_row(acc, repeat(0), multipliers.iter().copied(), out)
            }
            (Requant::Fixed { multipliers, .. }, None) => {
                self.fixed_row(acc, repeat(0), repeat(multipliers[0]), out)
            }
        }
    }

    /// MLAS's order: `f32(acc + bias) * scale`, clamped to `[qmin - zp, qmax - zp]`, rounded
    /// half to even, plus `zp`.
    fn float_row<T: QStore>(
        &self,
        acc: &[i32],
        bias: impl Iterator<Item = i32>,
        scales: impl Iterator<Item = f32>,
        out: &mut [T],
    ) {
        let zp = self.zero_point();
        let (qmin, qmax) = self.bounds();
        let (lo, hi) = code_bounds(qmin, qmax, zp);
        for (((o, &a), b), s) in out.iter_mut().zip(acc).zip(bias).zip(scales) {
            let v = a.wrapping_add(b) as f32 * s;
            *o = T::from_code(round_to_code(v, lo, hi).wrapping_add(zp));
        }
    }

    fn fixed_row<T: QStore>(
        &self,
        acc: &[i32],
        bias: impl Iterator<Item = i32>,
        multipliers: impl Iterator<Item = QuantizedMultiplier>,
        out: &mut [T],
    ) {
        let zp = i64::from(self.zero_point());
        let (qmin, qmax) = self.bounds();
        for (((o, &a), b), m) in out.iter_mut().zip(acc).zip(bias).zip(multipliers) {
            let v = i64::from(m.apply(a.wrapping_add(b))) + zp;
            *o = T::from_code(v.clamp(i64::from(qmin), i64::from(qmax)) as i32);
        }
    }
}

/// `m = q * 2^e` with `q` in `[0.5, 1)`, for finite `m > 0`.
fn frexp(m: f64) -> (f64, i32) {
    let bits = m.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    if exp == 0 {
        // Subnormal: scale into the normal range first.
        let (q, e) = frexp(m * 2f64.powi(64));
        return (q, e - 64);
    }
    let q = f64::from_bits((bits & !(0x7ffu64 << 52)) | (1022u64 << 52));
    (q, exp - 1022)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiplier_decomposition() {
        let q = QuantizedMultiplier::from_real(0.5).unwrap();
        assert_eq!((q.m0, q.shift), (1 << 30, 0));
        let q = QuantizedMultiplier::from_real(0.1).unwrap();
        // 0.1 = 0.8 * 2^-3; round(0.8 * 2^31) = 1717986918
        assert_eq!((q.m0, q.shift), (1_717_986_918, -3));
        assert!((q.to_real() - 0.1).abs() < 1e-10);
        let q = QuantizedMultiplier::from_real(1.5).unwrap();
        assert_eq!((q.m0, q.shift), (1_610_612_736, 1));
        // Rounds up to 2^31 and renormalises.
        let q = QuantizedMultiplier::from_real(1.0 - 1e-12).unwrap();
        assert_eq!((q.m0, q.shift), (1 << 30, 1));
        assert_eq!(QuantizedMultiplier::from_real(1e-12).unwrap().m0, 0);
        assert_eq!(QuantizedMultiplier::from_real(0.0).unwrap().apply(12345), 0);
        assert!(QuantizedMultiplier::from_real(-1.0).is_err());
        assert!(QuantizedMultiplier::from_real(f64::NAN).is_err());
        assert!(QuantizedMultiplier::from_real(1e10).is_err());
        assert_eq!(frexp(8.0), (0.5, 4));
        assert_eq!(frexp(f64::MIN_POSITIVE / 4.0), (0.5, -1023));
    }

    #[test]
    fn gemmlowp_primitives() {
        // 2 * 2^30 * 2^30 / 2^32 = 2^29
        assert_eq!(
            saturating_rounding_doubling_high_mul(1 << 30, 1 << 30),
            1 << 29
        );
        assert_eq!(
            saturating_rounding_doubling_high_mul(i32::MIN, i32::MIN),
            i32::MAX
        );
        // 3 * 2^30 * 2 / 2^32 = 1.5 -> 2, but -1.5 -> -1: gemmlowp's nudge with a truncating
        // division rounds ties up, not away from zero.
        assert_eq!(saturating_rounding_doubling_high_mul(3, 1 << 30), 2);
        assert_eq!(saturating_rounding_doubling_high_mul(-3, 1 << 30), -1);
        assert_eq!(saturating_rounding_doubling_high_mul(-7, 1 << 29), -2); // -1.75
        assert_eq!(saturating_rounding_doubling_high_mul(5, 1 << 29), 1); // 1.25
        assert_eq!(rounding_divide_by_pot(5, 1), 3);
        assert_eq!(rounding_divide_by_pot(-5, 1), -3);
        assert_eq!(rounding_divide_by_pot(-6, 2), -2);
        assert_eq!(rounding_divide_by_pot(-5, 2), -1);
        assert_eq!(rounding_divide_by_pot(i32::MIN, 31), -1);
        assert_eq!(rounding_divide_by_pot(i32::MAX, 31), 1);
        assert_eq!(rounding_divide_by_pot(7, 0), 7);
    }

    #[test]
    fn fixed_point_apply_matches_rounded_product() {
        // acc * M for M = 0.0123: exact ties are rare, so compare with f64 rounding.
        let q = QuantizedMultiplier::from_real(0.0123).unwrap();
        for acc in [
            -100_000,
            -8131,
            -1,
            0,
            1,
            81,
            8131,
            1 << 20,
            i32::MAX,
            i32::MIN,
        ] {
            let want = (f64::from(acc) * q.to_real()).round() as i32;
            assert_eq!(q.apply(acc), want, "{acc}");
        }
        // 2^-1 exactly: ties round up (see gemmlowp_primitives).
        let half = QuantizedMultiplier::from_real(0.5).unwrap();
        assert_eq!((half.apply(3), half.apply(-3), half.apply(5)), (2, -1, 3));
        // 2^-2 goes through RoundingDivideByPOT, whose ties go away from zero: -1.5 -> -2.
        let quarter = QuantizedMultiplier::from_real(0.25).unwrap();
        assert_eq!((quarter.apply(6), quarter.apply(-6)), (2, -2));
        let big = QuantizedMultiplier::from_real(4.0).unwrap();
        assert_eq!(big.apply(3), 12);
        assert_eq!(big.apply(1 << 30), i32::MAX);
    }

    #[test]
    fn float_requant_rounds_half_even_and_clamps() {
        let rq = Requant::Float {
            scales: vec![0.5],
            zero_point: 10,
            qmin: 0,
            qmax: 255,
        };
        let mut out = [0i32; 6];
        rq.apply_row(&[1, 3, 5, -1, -1000, 1000], None, &mut out);
        // 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0
        assert_eq!(out, [10, 12, 12, 10, 0, 255]);
        let fx = Requant::Fixed {
            multipliers: vec![QuantizedMultiplier::from_real(0.5).unwrap()],
            zero_point: 10,
            qmin: 0,
            qmax: 255,
        };
        fx.apply_row(&[0, 2, 4, -2, -1000, 1000], Some(&[1; 6]), &mut out);
        // gemmlowp ties round up: 0.5 -> 1, 1.5 -> 2, 2.5 -> 3, -0.5 -> 0
        assert_eq!(out, [11, 12, 13, 10, 0, 255]);
    }

    #[test]
    fn fused_relu_and_relu6_tighten_the_range() {
        let rq = Requant::Float {
            scales: vec![1.0],
            zero_point: 100,
            qmin: 0,
            qmax: 255,
        };
        let relu = rq.clone().fuse_clip(0.0, f32::INFINITY, 0.05).unwrap();
        assert_eq!(relu.bounds(), (100, 255));
        let relu6 = rq.clone().fuse_clip(0.0, 6.0, 0.05).unwrap();
        assert_eq!(relu6.bounds(), (100, 220));
        let above = rq.clone().fuse_clip(20.0, 30.0, 0.05).unwrap();
        assert_eq!(above.bounds(), (255, 255));
        let below = rq.clone().fuse_clip(-30.0, -20.0, 0.05).unwrap();
        assert_eq!(below.bounds(), (0, 0));
        assert!(rq.clone().fuse_clip(1.0, 0.0, 0.05).is_err());
        assert!(rq.fuse_clip(0.0, 6.0, 0.0).is_err());
    }
}
