//! Dynamic fixed point (Courbariaux et al. 2014; Gysel et al.'s Ristretto): a tensor is stored
//! as `bits`-bit two's complement integers `a` with value `a * 2^-frac`, the number of
//! fractional bits `frac` chosen per tensor from its range. It is symmetric linear quantization
//! with a power-of-two scale (see [`FixedFormat::to_qparams`]), so rescaling is a shift.

use crate::error::{Error, Result};
use crate::quant::linear::{finite_min_max, tensor_error, QParams};

/// Fractional bit counts are kept where `2^-frac` is a normal f32. A format made with
/// [`FixedFormat::new`] whose range exceeds f32 dequantizes its extremes to infinities;
/// [`FixedFormat::for_range`] never picks one.
pub const MIN_FRAC: i32 = -127;
pub const MAX_FRAC: i32 = 126;

/// A fixed-point format: `bits` bits (2..=16) of which `frac` are fractional. `frac` may exceed
/// `bits` (small values) or be negative (large ones). With 8 bits and `frac = 4` the values are
/// `-8.0, -7.9375, ..., 7.9375` in steps of `0.0625`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FixedFormat {
    bits: u32,
    frac: i32,
}

impl FixedFormat {
    pub fn new(bits: u32, frac: i32) -> Result<FixedFormat> {
        if !(2..=16).contains(&bits) {
            return Err(Error::Data(format!(
                "fixed point needs 2 to 16 bits, got {bits}"
            )));
        }
        if !(MIN_FRAC..=MAX_FRAC).contains(&frac) {
            return Err(Error::Data(format!(
                "fractional bits {frac} outside [{MIN_FRAC}, {MAX_FRAC}]"
            )));
        }
        Ok(FixedFormat { bits, frac })
    }

    /// The format with the most fractional bits in which no value of `data` saturates after
    /// rounding (`max |x| * 2^frac` rounds into `[-2^(bits-1), 2^(bits-1) - 1]`). An all-zero
    /// tensor gets `frac = bits - 1` (range `[-1, 1)`); NaN or infinities are an error naming
    /// `name`.
    pub fn for_data(bits: u32, data: &[f32], name: &str) -> Result<FixedFormat> {
        let (lo, hi) = finite_min_max(data, name)?;
        FixedFormat::for_range(bits, lo, hi, name)
    }

    /// As [`FixedFormat::for_data`], for known extremes.
    pub fn for_range(bits: u32, lo: f32, hi: f32, name: &str) -> Result<FixedFormat> {
        let probe = FixedFormat::new(bits, 0)?;
        if !lo.is_finite() || !hi.is_finite() {
            return Err(tensor_error(
                name,
                format!("cannot choose a fixed-point format for [{lo}, {hi}]"),
            ));
        }
        let amax = lo.abs().max(hi.abs());
        if amax == 0.0 {
            return FixedFormat::new(bits, bits as i32 - 1);
        }
        let fits = |f: i32| {
            let fmt = FixedFormat { frac: f, ..probe };
            let q = |x: f32| (f64::from(x) * pow2(f)).round_ties_even();
            q(hi) <= f64::from(fmt.amax()) && q(lo) >= f64::from(fmt.amin())
        };
        // Start from the exponent of max |x| (2^(e-1) <= max < 2^e), then settle by checking.
        let e = f64::from(amax).log2().floor() as i32 + 1;
        let mut f = (bits as i32 - 1 - e).clamp(MIN_FRAC, MAX_FRAC);
        while f < MAX_FRAC && fits(f + 1) {
            f += 1;
        }
        while f > MIN_FRAC && !fits(f) {
            f -= 1;
        }
        FixedFormat::new(bits, f)
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    pub fn frac(&self) -> i32 {
        self.frac
    }

    /// Smallest integer, `-2^(bits-1)`.
    pub fn amin(&self) -> i32 {
        -(1 << (self.bits - 1))
    }

    /// Largest integer, `2^(bits-1) - 1`.
    pub fn amax(&self) -> i32 {
        (1 << (self.bits - 1)) - 1
    }

    /// Value of one unit, `2^-frac`.
    pub fn step(&self) -> f32 {
        pow2(-self.frac) as f32
    }

    pub fn min_value(&self) -> f32 {
        self.dequantize(self.amin())
    }

    pub fn max_value(&self) -> f32 {
        self.dequantize(self.amax())
    }

    /// `clamp(round_half_even(x * 2^frac))`; NaN maps to 0.
    pub fn quantize(&self, x: f32) -> i32 {
        let v = (f64::from(x) * pow2(self.frac)).round_ties_even();
        if v.is_nan() {
            0
        } else {
            v.clamp(f64::from(self.amin()), f64::from(self.amax())) as i32
        }
    }

    pub fn dequantize(&self, a: i32) -> f32 {
        (f64::from(a) * pow2(-self.frac)) as f32
    }

    pub fn quantize_slice(&self, x: &[f32]) -> Vec<i32> {
        x.iter().map(|&v| self.quantize(v)).collect()
    }

    pub fn dequantize_slice(&self, a: &[i32]) -> Vec<f32> {
        a.iter().map(|&v| self.dequantize(v)).collect()
    }

    /// The same grid as linear quantization parameters: `scale = 2^-frac`, zero point 0.
    pub fn to_qparams(&self) -> QParams {
        QParams {
            scale: self.step(),
            zero_point: 0,
            qmin: self.amin(),
            qmax: self.amax(),
        }
    }
}

/// Fixed-point dot product as integer hardware computes it: `acc = sum a[i] * b[i]` has
/// `fa + fb` fractional bits; it is rescaled to `out`'s fractional bits by an arithmetic shift
/// (rounding half away from zero when shifting right) and saturated to `out`'s bits.
///
/// The accumulator is a 32-bit register: the result equals a wrapping i32 accumulation
/// whenever the exact sum fits in i32, and is an error otherwise (at 8 bits that takes more
/// than 2^17 terms).
pub fn dot(
    a: &[i32],
    fa: FixedFormat,
    b: &[i32],
    fb: FixedFormat,
    out: FixedFormat,
) -> Result<i32> {
    if a.len() != b.len() {
        return Err(Error::Shape(format!(
            "fixed-point dot of lengths {} and {}",
            a.len(),
            b.len()
        )));
    }
    let acc: i64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| i64::from(x) * i64::from(y))
        .sum();
    let acc = i32::try_from(acc).map_err(|_| {
        Error::Data(format!(
            "fixed-point dot product {acc} overflows the 32-bit accumulator"
        ))
    })?;
    Ok(rescale(acc, fa.frac + fb.frac, out))
}

/// Moves an integer with `from_frac` fractional bits to `out`'s format: shift, round half away
/// from zero, saturate.
pub fn rescale(acc: i32, from_frac: i32, out: FixedFormat) -> i32 {
    let shift = from_frac - out.frac;
    let v = if shift >= 0 {
        rounding_shift_right(i64::from(acc), shift as u32)
    } else if -shift >= 32 {
        // Any non-zero value saturates.
        i64::from(acc.signum()) << 40
    } else {
        i64::from(acc) << (-shift)
    };
    v.clamp(i64::from(out.amin()), i64::from(out.amax())) as i32
}

/// `x / 2^s` rounded to nearest, ties away from zero (gemmlowp's `RoundingDivideByPOT`).
pub fn rounding_shift_right(x: i64, s: u32) -> i64 {
    if s == 0 {
        return x;
    }
    if s >= 63 {
        return 0;
    }
    let half = 1i64 << (s - 1);
    if x >= 0 {
        (x + half) >> s
    } else {
        -((-x + half) >> s)
    }
}

fn pow2(e: i32) -> f64 {
    2f64.powi(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_bits_four_fractional() {
        let f = FixedFormat::new(8, 4).unwrap();
        assert_eq!(
            (f.min_value(), f.max_value(), f.step()),
            (-8.0, 7.9375, 0.0625)
        );
        assert_eq!(f.quantize(1.03125), 16); // 16.5 -> even
        assert_eq!(f.quantize(1.09375), 18); // 17.5 -> even
        assert_eq!(f.quantize(100.0), 127);
        assert_eq!(f.quantize(-100.0), -128);
        assert_eq!(f.quantize(f32::NAN), 0);
        assert_eq!(f.dequantize(-3), -0.1875);
        let p = f.to_qparams();
        assert_eq!(
            (p.scale, p.zero_point, p.qmin, p.qmax),
            (0.0625, 0, -128, 127)
        );
    }

    #[test]
    fn frac_is_the_largest_that_fits() {
        let f = |d: &[f32]| FixedFormat::for_data(8, d, "t").unwrap().frac();
        assert_eq!(f(&[7.9, -1.0]), 4);
        assert_eq!(f(&[-8.0]), 4); // -128 fits
        assert_eq!(f(&[8.0]), 3); // 128 does not
        assert_eq!(f(&[7.97]), 3); // rounds to 128 at f = 4
        assert_eq!(f(&[0.3]), 8); // 0.3 * 256 = 76.8
        assert_eq!(f(&[1000.0]), -3); // 125 * 8
        assert_eq!(f(&[0.0, 0.0]), 7);
        assert_eq!(f(&[1e-30]), 106); // 1e-30 * 2^106 = 81.1
        assert_eq!(f(&[1e-40]), MAX_FRAC);
        assert_eq!(
            FixedFormat::for_data(16, &[3.0e38], "t").unwrap().frac(),
            -113
        );
        let msg = FixedFormat::for_data(8, &[f32::NAN], "fc1")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("fc1"), "{msg}");
        assert!(FixedFormat::new(1, 0).is_err());
        assert!(FixedFormat::new(8, 500).is_err());
    }

    #[test]
    fn quantization_error_is_at_most_half_a_step() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i as f32) * 0.731).sin() * 3.7)
            .collect();
        for bits in [4, 8, 12, 16] {
            let f = FixedFormat::for_data(bits, &x, "x").unwrap();
            let back = f.dequantize_slice(&f.quantize_slice(&x));
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() <= f.step() / 2.0 * (1.0 + 1e-6));
            }
        }
    }

    #[test]
    fn dot_product_rescales_with_rounding() {
        let fa = FixedFormat::new(8, 4).unwrap();
        let fb = FixedFormat::new(8, 6).unwrap();
        let a = fa.quantize_slice(&[1.5, -2.25]);
        let b = fb.quantize_slice(&[0.5, 0.75]);
        assert_eq!(
            (a.as_slice(), b.as_slice()),
            (&[24, -36][..], &[32, 48][..])
        );
        // acc = 768 - 1728 = -960 with 10 fractional bits = -0.9375
        let out4 = FixedFormat::new(8, 4).unwrap();
        assert_eq!(dot(&a, fa, &b, fb, out4).unwrap(), -15);
        // At 3 fractional bits -960 / 128 = -7.5 rounds away from zero.
        let out3 = FixedFormat::new(8, 3).unwrap();
        assert_eq!(dot(&a, fa, &b, fb, out3).unwrap(), -8);
        // More fractional bits than the accumulator: a left shift, saturating at 8 bits.
        let out12 = FixedFormat::new(16, 12).unwrap();
        assert_eq!(dot(&a, fa, &b, fb, out12).unwrap(), -3840);
        let out_small = FixedFormat::new(8, 12).unwrap();
        assert_eq!(dot(&a, fa, &b, fb, out_small).unwrap(), -128);
        assert!(dot(&a, fa, &b[..1], fb, out4).is_err());
        let big = vec![32767; 4];
        let f16 = FixedFormat::new(16, 0).unwrap();
        assert!(dot(&big, f16, &big, f16, f16).is_err());
    }

    #[test]
    fn rounding_shift_right_is_symmetric() {
        assert_eq!(rounding_shift_right(5, 1), 3);
        assert_eq!(rounding_shift_right(-5, 1), -3);
        assert_eq!(rounding_shift_right(4, 1), 2);
        assert_eq!(rounding_shift_right(-6, 2), -2); // -1.5
        assert_eq!(rounding_shift_right(-5, 2), -1); // -1.25
        assert_eq!(rounding_shift_right(7, 0), 7);
        assert_eq!(rounding_shift_right(i64::MAX, 70), 0);
    }
}
