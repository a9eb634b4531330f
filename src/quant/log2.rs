//! Logarithmic (power-of-two) quantization (Miyashita et al. 2016; Zhou et al.'s INQ): every
//! value becomes `0` or `sign * 2^e`, so a multiplication by a weight is a shift.
//!
//! A `bits`-bit code is a sign bit above a `bits - 1`-bit magnitude code: magnitude 0 is the
//! value 0, and magnitude `m >= 1` is `2^(e_min + m - 1)`. That leaves `2^(bits-1) - 1`
//! exponents, `e_max - 2^(bits-1) + 2 ..= e_max`; with 4 bits and `e_max = 0` the magnitudes
//! are `0, 2^-6, ..., 2^-1, 1`. `e_max` comes from the data's `max |x|`.
//!
//! Rounding is to the nearest exponent in the log domain: `|x| = m 2^k` (`1 <= m < 2`) becomes
//! `2^(k+1)` when `m > sqrt 2`, else `2^k` (no float equals `sqrt 2`, so there are no ties).
//! Exponents above `e_max` saturate; magnitudes below `2^(e_min - 1)`, the linear midpoint
//! between 0 and the smallest level, become 0, and those between it and `2^e_min` become
//! `2^e_min`.

use crate::error::{Error, Result};
use crate::quant::linear::{finite_min_max, tensor_error};

/// Mantissa bits of the smallest f64 above `sqrt 2`; an f64 whose mantissa bits are at least
/// this has `m > sqrt 2`.
const SQRT2_MANTISSA: u64 = 0x6_A09E_667F_3BCD;

/// A power-of-two format: `bits` bits (2..=8) and the largest exponent `e_max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Log2Format {
    bits: u32,
    e_max: i32,
}

impl Log2Format {
    /// Exponents must stay within f32's `2^-149 ..= 2^127`; levels below f32's range decode
    /// to 0 and still encode distinctly.
    pub fn new(bits: u32, e_max: i32) -> Result<Log2Format> {
        if !(2..=8).contains(&bits) {
            return Err(Error::Data(format!(
                "power-of-two quantization needs 2 to 8 bits, got {bits}"
            )));
        }
        if !(-149..=127).contains(&e_max) {
            return Err(Error::Data(format!(
                "largest exponent {e_max} is outside f32's range"
            )));
        }
        Ok(Log2Format { bits, e_max })
    }

    /// `e_max` = `max |x|` rounded in the log domain (so the largest value is not clipped by
    /// more than a factor `sqrt 2`). All-zero data gets `e_max = 0`; NaN or infinities are an
    /// error naming `name`.
    pub fn for_data(bits: u32, data: &[f32], name: &str) -> Result<Log2Format> {
        let (lo, hi) = finite_min_max(data, name)?;
        let amax = lo.abs().max(hi.abs());
        let e_max = if amax == 0.0 {
            0
        } else {
            round_log2(amax).clamp(-149, 127)
        };
        Log2Format::new(bits, e_max).map_err(|e| tensor_error(name, e.to_string()))
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    pub fn e_max(&self) -> i32 {
        self.e_max
    }

    /// Number of non-zero magnitudes, `2^(bits-1) - 1`.
    pub fn exponents(&self) -> i32 {
        (1 << (self.bits - 1)) - 1
    }

    pub fn e_min(&self) -> i32 {
        self.e_max - self.exponents() + 1
    }

    fn sign_bit(&self) -> u8 {
        1 << (self.bits - 1)
    }

    /// Code of `x`. NaN encodes as 0.
    pub fn encode(&self, x: f32) -> u8 {
        if x.is_nan() || x == 0.0 {
            return 0;
        }
        let sign = if x < 0.0 { self.sign_bit() } else { 0 };
        let mag = x.abs();
        let e_min = self.e_min();
        let m = if f64::from(mag) < pow2(e_min - 1) {
            0
        } else {
            round_log2(mag).clamp(e_min, self.e_max) - e_min + 1
        };
        if m == 0 {
            0
        } else {
            sign | m as u8
        }
    }

    /// Sign and exponent of a code, `None` for a zero code. Bits above the format are ignored.
    pub fn exponent(&self, code: u8) -> Option<(bool, i32)> {
        let m = i32::from(code & (self.sign_bit() - 1));
        if m == 0 {
            None
        } else {
            Some((code & self.sign_bit() != 0, self.e_min() + m - 1))
        }
    }

    pub fn decode(&self, code: u8) -> f32 {
        match self.exponent(code) {
            None => 0.0,
            Some((neg, e)) => {
                let v = pow2(e) as f32;
                if neg {
                    -v
                } else {
                    v
                }
            }
        }
    }

    /// Encode then decode.
    pub fn fake_quantize(&self, x: f32) -> f32 {
        self.decode(self.encode(x))
    }

    pub fn encode_slice(&self, x: &[f32]) -> Vec<u8> {
        x.iter().map(|&v| self.encode(v)).collect()
    }

    pub fn decode_slice(&self, codes: &[u8]) -> Vec<f32> {
        codes.iter().map(|&c| self.decode(c)).collect()
    }

    /// `a * w` for the weight of `code`, in the units of `a`, by shifting (see [`shift_mul`]).
    pub fn mul(&self, a: i32, code: u8) -> i64 {
        match self.exponent(code) {
            None => 0,
            Some((neg, e)) => shift_mul(a, neg, e),
        }
    }

    /// `sum a[i] * w[i]` by shifts, in the units of `a` (an activation with `f` fractional bits
    /// gives a result with `f` fractional bits). Each product is rounded as [`shift_mul`] does
    /// and the sum saturates to i64.
    pub fn dot(&self, a: &[i32], codes: &[u8]) -> Result<i64> {
        if a.len() != codes.len() {
            return Err(Error::Shape(format!(
                "power-of-two dot of lengths {} and {}",
                a.len(),
                codes.len()
            )));
        }
        Ok(a.iter()
            .zip(codes)
            .fold(0i64, |acc, (&x, &c)| acc.saturating_add(self.mul(x, c))))
    }
}

/// `a * (+-2^e)` as integer hardware does it: a left shift for `e >= 0` (saturating to i64),
/// a right shift rounding half away from zero for `e < 0`.
pub fn shift_mul(a: i32, neg: bool, e: i32) -> i64 {
    let a = i64::from(a);
    let v = if e >= 0 {
        if e >= 32 && a != 0 {
            if a > 0 {
                i64::MAX
            } else {
                i64::MIN
            }
        } else {
            a << e
        }
    } else {
        crate::quant::fixed_point::rounding_shift_right(a, e.unsigned_abs())
    };
    if neg {
        v.saturating_neg()
    } else {
        v
    }
}

/// `round(log2 |x|)` for finite non-zero `x`, rounding up when the mantissa exceeds `sqrt 2`.
pub fn round_log2(x: f32) -> i32 {
    // Through f64 every f32, subnormals included, is normal.
    let bits = f64::from(x.abs()).to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let mantissa = bits & ((1u64 << 52) - 1);
    exp + i32::from(mantissa >= SQRT2_MANTISSA)
}

fn pow2(e: i32) -> f64 {
    2f64.powi(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_bit_levels() {
        let f = Log2Format::new(4, 0).unwrap();
        assert_eq!((f.e_min(), f.e_max(), f.exponents()), (-6, 0, 7));
        let mags: Vec<f32> = (0..8).map(|m| f.decode(m)).collect();
        assert_eq!(
            mags,
            [0.0, 1.0 / 64.0, 1.0 / 32.0, 0.0625, 0.125, 0.25, 0.5, 1.0]
        );
        assert_eq!(f.decode(0b1111), -1.0);
        assert_eq!(f.decode(0b1000), 0.0);
        assert_eq!(f.encode(-0.25), 0b1101);
        assert_eq!(f.exponent(0b1101), Some((true, -2)));
        assert_eq!(f.exponent(0), None);
    }

    #[test]
    fn rounds_in_the_log_domain() {
        let f = Log2Format::new(4, 0).unwrap();
        // Between 0.25 and 0.5 the log-domain midpoint is 0.25 * sqrt 2 = 0.35355.
        assert_eq!(f.fake_quantize(0.3535), 0.25);
        assert_eq!(f.fake_quantize(0.3536), 0.5);
        // (0.375 would go up if rounding were linear.)
        assert_eq!(f.fake_quantize(0.37), 0.5);
        assert_eq!(f.fake_quantize(0.36), 0.5);
        assert_eq!(f.fake_quantize(-0.3), -0.25);
        // Saturation and underflow: 2^-7 = 0.0078125 is the zero threshold.
        assert_eq!(f.fake_quantize(7.0), 1.0);
        assert_eq!(f.fake_quantize(0.0079), 1.0 / 64.0);
        assert_eq!(f.fake_quantize(0.0078), 0.0);
        assert_eq!(f.encode(f32::NAN), 0);
        assert_eq!(f.encode(-0.0), 0);
        // The f32 nearest sqrt 2 is below it, the next one above.
        let below = std::f32::consts::SQRT_2;
        assert_eq!(round_log2(below), 0);
        assert_eq!(round_log2(f32::from_bits(below.to_bits() + 1)), 1);
        assert_eq!(round_log2(1e-45), -149);
    }

    #[test]
    fn e_max_from_data() {
        let f = Log2Format::for_data(3, &[0.1, -0.7, 0.3], "w").unwrap();
        // 0.7 = 1.4 * 2^-1, 1.4 < sqrt 2 -> e_max = -1; 3 bits: exponents -3..=-1.
        assert_eq!((f.e_max(), f.e_min()), (-1, -3));
        assert_eq!(
            f.decode_slice(&f.encode_slice(&[0.1, -0.7, 0.3])),
            [0.125, -0.5, 0.25]
        );
        assert_eq!(Log2Format::for_data(3, &[0.0], "w").unwrap().e_max(), 0);
        let ternary = Log2Format::for_data(2, &[0.9, -0.2, 0.6], "w").unwrap();
        assert_eq!(
            ternary.decode_slice(&ternary.encode_slice(&[0.9, -0.2, 0.6, -1.0])),
            [1.0, 0.0, 1.0, -1.0]
        );
        assert!(Log2Format::for_data(4, &[f32::INFINITY], "w")
            .unwrap_err()
            .to_string()
            .contains("'w'"));
        assert!(Log2Format::new(9, 0).is_err());
        assert!(Log2Format::new(4, 200).is_err());
    }

    #[test]
    fn multiplication_is_a_shift() {
        assert_eq!(shift_mul(3, false, 2), 12);
        assert_eq!(shift_mul(3, true, 2), -12);
        assert_eq!(shift_mul(12, false, -3), 2); // 1.5 -> 2
        assert_eq!(shift_mul(-12, false, -3), -2);
        assert_eq!(shift_mul(-11, false, -3), -1); // -1.375
        assert_eq!(shift_mul(5, false, 40), i64::MAX);
        assert_eq!(shift_mul(0, false, 40), 0);
        // Activation 1.5 with 4 fractional bits (24) times weights 0.25 and -0.5:
        let f = Log2Format::new(4, 0).unwrap();
        let w = f.encode_slice(&[0.25, -0.5]);
        assert_eq!(f.mul(24, w[0]), 6); // 0.375 * 16
        assert_eq!(f.dot(&[24, 8], &w).unwrap(), 6 - 4);
        // Matches the float dot product of the decoded weights when no rounding occurs.
        let a = [16, -32, 48, 128];
        let x = [0.5f32, 0.13, -0.9, 0.02];
        let c = f.encode_slice(&x);
        let exact: f32 = a
            .iter()
            .zip(f.decode_slice(&c))
            .map(|(&a, w)| a as f32 * w)
            .sum();
        assert_eq!(f.dot(&a, &c).unwrap() as f32, exact);
        assert!(f.dot(&a, &c[..2]).is_err());
    }
}
