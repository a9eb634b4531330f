//! Linear (uniform, affine) quantization: a real value `d` is stored as an integer code `q` with
//! `d = scale * (q - zero_point)`, `q` in `[qmin, qmax]`.
//!
//! A [`QScheme`] says which integers are allowed (bits, signedness, symmetric or affine,
//! reduced or narrow range); [`QScheme::params_from_range`] turns a real range, usually from a
//! calibrator in [`crate::quant::calibrate`], into [`QParams`]. Rounding and saturation follow
//! ONNX `QuantizeLinear` (opsets 10-21): `q = saturate(round_half_even(x / scale) + zero_point)`,
//! and `DequantizeLinear`: `x = (q - zero_point) * scale`.

use crate::error::{Error, Result};
use crate::ir::{DType, Tensor, TensorData};

/// Which integer grid a tensor is quantized onto. Fields are private so every scheme in
/// circulation has been validated; build one with [`QScheme::new`] or a constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QScheme {
    bits: u32,
    signed: bool,
    symmetric: bool,
    reduce_range: bool,
    narrow_range: bool,
}

impl QScheme {
    /// Signed 8-bit symmetric, narrow range `[-127, 127]`, zero point 0: the usual weight
    /// scheme (ONNX Runtime's `QInt8` with `symmetric=True`, TensorRT, TFLite weights).
    pub const S8_SYMMETRIC: QScheme = QScheme {
        bits: 8,
        signed: true,
        symmetric: true,
        reduce_range: false,
        narrow_range: true,
    };
    /// Unsigned 8-bit affine `[0, 255]`: the usual activation scheme for u8 x s8 kernels.
    pub const U8_AFFINE: QScheme = QScheme {
        bits: 8,
        signed: false,
        symmetric: false,
        reduce_range: false,
        narrow_range: false,
    };
    /// Signed 8-bit affine `[-128, 127]` (TFLite's int8 activations).
    pub const S8_AFFINE: QScheme = QScheme {
        bits: 8,
        signed: true,
        symmetric: false,
        reduce_range: false,
        narrow_range: false,
    };

    /// A scheme of `bits` bits (2..=16). Symmetric schemes have zero point 0; signed symmetric
    /// ones use the narrow range `[-(2^(b-1)-1), 2^(b-1)-1]` so that `-t` and `t` are both
    /// levels (change with [`QScheme::with_narrow_range`]).
    pub fn new(bits: u32, signed: bool, symmetric: bool) -> Result<QScheme> {
        if !(2..=16).contains(&bits) {
            return Err(Error::Data(format!(
                "quantization needs 2 to 16 bits, got {bits}"
            )));
        }
        Ok(QScheme {
            bits,
            signed,
            symmetric,
            reduce_range: false,
            narrow_range: signed && symmetric,
        })
    }

    /// Drops one bit of range (8 -> 7 bits), as ONNX Runtime's `reduce_range` does for
    /// u8 x s8 kernels whose `vpmaddubsw` step saturates with full 8-bit operands.
    pub fn with_reduce_range(mut self, reduce: bool) -> Result<QScheme> {
        if reduce && self.bits < 3 {
            return Err(Error::Data(format!(
                "reduce_range needs at least 3 bits, the scheme has {}",
                self.bits
            )));
        }
        self.reduce_range = reduce;
        Ok(self)
    }

    /// Narrow range drops the most negative code of a signed grid (-128 at 8 bits) so the grid
    /// is symmetric around 0. Ignored for unsigned schemes.
    pub fn with_narrow_range(mut self, narrow: bool) -> QScheme {
        self.narrow_range = narrow && self.signed;
        self
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    pub fn is_signed(&self) -> bool {
        self.signed
    }

    pub fn is_symmetric(&self) -> bool {
        self.symmetric
    }

    pub fn reduce_range(&self) -> bool {
        self.reduce_range
    }

    pub fn narrow_range(&self) -> bool {
        self.narrow_range
    }

    /// Narrowest tensor element type holding the codes: u8 or i8 up to 8 bits, i16 for wider
    /// signed grids, i32 for wider unsigned ones (the IR has no u16).
    pub fn storage_dtype(&self) -> DType {
        match (self.signed, self.bits <= 8) {
            (false, true) => DType::U8,
            (true, true) => DType::I8,
            (true, false) => DType::I16,
            (false, false) => DType::I32,
        }
    }

    /// Bits actually used for the grid (one less under `reduce_range`).
    pub fn effective_bits(&self) -> u32 {
        self.bits - u32::from(self.reduce_range)
    }

    pub fn qmin(&self) -> i32 {
        let b = self.effective_bits();
        if self.signed {
            -(1 << (b - 1)) + i32::from(self.narrow_range)
        } else {
            0
        }
    }

    pub fn qmax(&self) -> i32 {
        let b = self.effective_bits();
        if self.signed {
            (1 << (b - 1)) - 1
        } else {
            (1 << b) - 1
        }
    }

    /// Parameters covering the real range `[min, max]` of tensor `name`.
    ///
    /// * Affine: the range is first widened to contain 0 (so 0 is exactly representable, which
    ///   zero padding and ReLU rely on), then `s = (max - min) / (qmax - qmin)` and
    ///   `z = round_half_even(qmin - min / s)`.
    /// * Symmetric: `t = max(|min|, |max|)`, `s = t / qmax`, `z = 0`. For an unsigned symmetric
    ///   scheme the grid covers `[0, t]` and negative values saturate to 0.
    ///
    /// A range so small that the scale would be below `f32::MIN_POSITIVE` (an all-zero tensor)
    /// gets `scale = 1.0, zero_point = 0`, as ONNX Runtime's quantization tools do; a constant
    /// `c != 0` gets the ordinary scale of `[min(c, 0), max(c, 0)]`. NaN or infinite bounds are
    /// an error naming `name`.
    pub fn params_from_range(&self, min: f32, max: f32, name: &str) -> Result<QParams> {
        if !min.is_finite() || !max.is_finite() {
            return Err(tensor_error(
                name,
                format!("cannot quantize the non-finite range [{min}, {max}]"),
            ));
        }
        if min > max {
            return Err(tensor_error(
                name,
                format!("empty range: min {min} is above max {max}"),
            ));
        }
        let (qmin, qmax) = (self.qmin(), self.qmax());
        let degenerate = QParams {
            scale: 1.0,
            zero_point: 0i32.clamp(qmin, qmax),
            qmin,
            qmax,
        };
        if self.symmetric {
            let t = f64::from(min.abs().max(max.abs()));
            let scale = (t / f64::from(qmax)) as f32;
            if !is_usable_scale(scale) {
                return Ok(degenerate);
            }
            return Ok(QParams {
                scale,
                zero_point: 0,
                qmin,
                qmax,
            });
        }
        let lo = f64::from(min.min(0.0));
        let hi = f64::from(max.max(0.0));
        let scale = ((hi - lo) / f64::from(qmax - qmin)) as f32;
        if !is_usable_scale(scale) {
            return Ok(degenerate);
        }
        let z = (f64::from(qmin) - lo / f64::from(scale)).round_ties_even();
        Ok(QParams {
            scale,
            zero_point: (z as i32).clamp(qmin, qmax),
            qmin,
            qmax,
        })
    }

    /// Parameters for a symmetric threshold `t` (range `[-t, t]`), as the |x| calibrators give.
    pub fn params_from_threshold(&self, t: f32, name: &str) -> Result<QParams> {
        if t < 0.0 {
            return Err(tensor_error(name, format!("negative threshold {t}")));
        }
        self.params_from_range(-t, t, name)
    }

    /// Per-tensor parameters from the data's own min and max.
    pub fn params_for(&self, data: &[f32], name: &str) -> Result<QParams> {
        let (min, max) = finite_min_max(data, name)?;
        self.params_from_range(min, max, name)
    }

    /// Per-channel parameters along `axis` of a row-major tensor of `shape`: one [`QParams`]
    /// per index of that axis, each from the min and max of its slice.
    pub fn params_per_channel(
        &self,
        data: &[f32],
        shape: &[usize],
        axis: usize,
        name: &str,
    ) -> Result<PerChannel> {
        let layout = ChannelLayout::new(shape, axis, data.len(), name)?;
        let mut lo = vec![f32::INFINITY; layout.channels];
        let mut hi = vec![f32::NEG_INFINITY; layout.channels];
        layout.for_each_run(|c, range| {
            let (a, b) = min_max(&data[range]);
            lo[c] = lo[c].min(a);
            hi[c] = hi[c].max(b);
        });
        check_finite(data, name)?;
        let params = lo
            .iter()
            .zip(&hi)
            .map(|(&a, &b)| {
                // A channel with no elements (an axis of a zero-sized tensor) keeps the safe default.
                let (a, b) = if a > b { (0.0, 0.0) } else { (a, b) };
                self.params_from_range(a, b, name)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PerChannel { axis, params })
    }
}

/// Per-tensor quantization parameters: `d = scale * (q - zero_point)`, `q` in `[qmin, qmax]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: i32,
    pub qmin: i32,
    pub qmax: i32,
}

impl QParams {
    /// Checked constructor for parameters that come from a file or a user.
    pub fn new(scale: f32, zero_point: i32, qmin: i32, qmax: i32, name: &str) -> Result<QParams> {
        let p = QParams {
            scale,
            zero_point,
            qmin,
            qmax,
        };
        p.validate(name)?;
        Ok(p)
    }

    /// A finite positive scale and a non-empty grid; the zero point may lie outside the grid
    /// (ONNX allows it), it only shifts codes.
    pub fn validate(&self, name: &str) -> Result<()> {
        if !is_usable_scale(self.scale) {
            return Err(tensor_error(
                name,
                format!("scale {} is not a finite positive number", self.scale),
            ));
        }
        if self.qmin > self.qmax {
            return Err(tensor_error(
                name,
                format!("empty integer range [{}, {}]", self.qmin, self.qmax),
            ));
        }
        Ok(())
    }

    /// `saturate(round_half_even(x / scale) + zero_point)`, computed as ONNX Runtime's MLAS
    /// does: `x / scale` clamped to `[qmin - zp, qmax - zp]`, rounded, shifted by the zero
    /// point. Infinities saturate; NaN becomes `qmin` (the clamp's `max` drops it), as in MLAS.
    #[inline]
    pub fn quantize(&self, x: f32) -> i32 {
        let (lo, hi) = code_bounds(self.qmin, self.qmax, self.zero_point);
        round_to_code(x / self.scale, lo, hi).wrapping_add(self.zero_point)
    }

    /// `(q - zero_point) * scale`, computed in f32 as ONNX `DequantizeLinear` does.
    #[inline]
    pub fn dequantize(&self, q: i32) -> f32 {
        (q.wrapping_sub(self.zero_point)) as f32 * self.scale
    }

    /// Quantize then dequantize: the value the quantized model will see (QAT, SQNR).
    #[inline]
    pub fn fake_quantize(&self, x: f32) -> f32 {
        self.dequantize(self.quantize(x))
    }

    /// Quantizes `x` into `out`, whose element type must hold `[qmin, qmax]`.
    pub fn quantize_slice<T: QStore>(&self, x: &[f32], out: &mut [T]) -> Result<()> {
        check_lengths(x.len(), out.len())?;
        check_store::<T>(self)?;
        let (lo, hi) = code_bounds(self.qmin, self.qmax, self.zero_point);
        #[cfg(target_arch = "x86_64")]
        if std::mem::size_of::<T>() == 1 && crate::kernels::simd::has_avx512() {
            // SAFETY: AVX-512 F was detected just above; `T` is one byte, so `out` covers
            // `x.len()` bytes (lengths checked above).
            unsafe {
                quantize_bytes_avx512(
                    x,
                    self.scale,
                    (lo, hi),
                    self.zero_point,
                    out.as_mut_ptr() as *mut i8,
                )
            };
            return Ok(());
        }
        for (o, &v) in out.iter_mut().zip(x) {
            *o = T::from_code(round_to_code(v / self.scale, lo, hi).wrapping_add(self.zero_point));
        }
        Ok(())
    }

    pub fn dequantize_slice<T: QStore>(&self, q: &[T], out: &mut [f32]) -> Result<()> {
        check_lengths(q.len(), out.len())?;
        for (o, &c) in out.iter_mut().zip(q) {
            *o = self.dequantize(c.code());
        }
        Ok(())
    }

    /// Fake-quantizes `x` in place.
    pub fn fake_quantize_slice(&self, x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = self.fake_quantize(*v);
        }
    }

    /// Largest and smallest real values the grid represents.
    pub fn real_range(&self) -> (f32, f32) {
        (self.dequantize(self.qmin), self.dequantize(self.qmax))
    }
}

/// Per-channel parameters: `params[c]` applies to index `c` of `axis`.
#[derive(Clone, Debug, PartialEq)]
pub struct PerChannel {
    pub axis: usize,
    pub params: Vec<QParams>,
}

/// Per-tensor or per-channel parameters, applied to a row-major tensor of a given shape.
#[derive(Clone, Debug, PartialEq)]
pub enum Quantization {
    PerTensor(QParams),
    PerChannel(PerChannel),
}

impl Quantization {
    /// Smallest `qmin` and largest `qmax` over all channels.
    pub fn code_range(&self) -> (i32, i32) {
        match self {
            Quantization::PerTensor(p) => (p.qmin, p.qmax),
            Quantization::PerChannel(pc) => {
                pc.params.iter().fold((i32::MAX, i32::MIN), |(a, b), p| {
                    (a.min(p.qmin), b.max(p.qmax))
                })
            }
        }
    }

    /// Applies `f(params, element_range)` over every run of elements sharing parameters.
    fn for_each_run(
        &self,
        shape: &[usize],
        len: usize,
        name: &str,
        mut f: impl FnMut(&QParams, std::ops::Range<usize>),
    ) -> Result<()> {
        match self {
            Quantization::PerTensor(p) => {
                f(p, 0..len);
                Ok(())
            }
            Quantization::PerChannel(pc) => {
                let layout = ChannelLayout::new(shape, pc.axis, len, name)?;
                if layout.channels != pc.params.len() {
                    return Err(tensor_error(
                        name,
                        format!(
                            "axis {} has {} channels but {} parameter sets were given",
                            pc.axis,
                            layout.channels,
                            pc.params.len()
                        ),
                    ));
                }
                layout.for_each_run(|c, r| f(&pc.params[c], r));
                Ok(())
            }
        }
    }

    /// Quantizes `x` (row-major, `shape`) into `out`.
    pub fn quantize<T: QStore>(
        &self,
        x: &[f32],
        shape: &[usize],
        out: &mut [T],
        name: &str,
    ) -> Result<()> {
        check_lengths(x.len(), out.len())?;
        let mut res = Ok(());
        self.for_each_run(shape, x.len(), name, |p, r| {
            if res.is_ok() {
                res = p.quantize_slice(&x[r.clone()], &mut out[r]);
            }
        })?;
        res
    }

    pub fn dequantize<T: QStore>(
        &self,
        q: &[T],
        shape: &[usize],
        out: &mut [f32],
        name: &str,
    ) -> Result<()> {
        check_lengths(q.len(), out.len())?;
        self.for_each_run(shape, q.len(), name, |p, r| {
            for (o, &c) in out[r.clone()].iter_mut().zip(&q[r]) {
                *o = p.dequantize(c.code());
            }
        })
    }

    pub fn fake_quantize(&self, x: &mut [f32], shape: &[usize], name: &str) -> Result<()> {
        let len = x.len();
        self.for_each_run(shape, len, name, |p, r| p.fake_quantize_slice(&mut x[r]))
    }

    /// Quantizes an f32 tensor into the narrowest integer tensor type holding the code range
    /// (u8, i8, i16 or i32).
    pub fn quantize_tensor(&self, t: &Tensor, name: &str) -> Result<Tensor> {
        let x = t.as_f32().map_err(|e| tensor_error(name, e.to_string()))?;
        let shape = t.shape();
        let (lo, hi) = self.code_range();
        let data = if lo >= 0 && hi <= 255 {
            let mut q = vec![0u8; x.len()];
            self.quantize(x, shape, &mut q, name)?;
            TensorData::U8(q)
        } else if lo >= -128 && hi <= 127 {
            let mut q = vec![0i8; x.len()];
            self.quantize(x, shape, &mut q, name)?;
            TensorData::I8(q)
        } else if lo >= -32768 && hi <= 32767 {
            let mut q = vec![0i16; x.len()];
            self.quantize(x, shape, &mut q, name)?;
            TensorData::I16(q)
        } else {
            let mut q = vec![0i32; x.len()];
            self.quantize(x, shape, &mut q, name)?;
            TensorData::I32(q)
        };
        Tensor::new(shape.to_vec(), data)
    }

    /// Dequantizes a u8/i8/i16/i32 tensor to f32.
    pub fn dequantize_tensor(&self, t: &Tensor, name: &str) -> Result<Tensor> {
        let shape = t.shape();
        let mut out = vec![0f32; t.numel()];
        match t.data() {
            TensorData::U8(q) => self.dequantize(q, shape, &mut out, name)?,
            TensorData::I8(q) => self.dequantize(q, shape, &mut out, name)?,
            TensorData::I16(q) => self.dequantize(q, shape, &mut out, name)?,
            TensorData::I32(q) => self.dequantize(q, shape, &mut out, name)?,
            other => {
                return Err(tensor_error(
                    name,
                    format!("cannot dequantize a {} tensor", other.dtype()),
                ))
            }
        }
        Tensor::from_f32(shape.to_vec(), out)
    }
}

/// Integer element types that can hold quantized codes.
pub trait QStore: Copy {
    const MIN: i32;
    const MAX: i32;
    /// Converts a code already known to lie in `[MIN, MAX]`.
    fn from_code(q: i32) -> Self;
    fn code(self) -> i32;
}

macro_rules! qstore {
    ($t:ty) => {
        impl QStore for $t {
            const MIN: i32 = <$t>::MIN as i32;
            const MAX: i32 = <$t>::MAX as i32;
            #[inline]
            fn from_code(q: i32) -> Self {
                q as $t
            }
            #[inline]
            fn code(self) -> i32 {
                self as i32
            }
        }
    };
}
qstore!(u8);
qstore!(i8);
qstore!(u16);
qstore!(i16);
qstore!(i32);

/// Signal-to-quantization-noise ratio in dB: `10 log10(sum x^2 / sum (x - xq)^2)`, accumulated
/// in f64. Identical inputs give `+inf`.
pub fn sqnr_db(x: &[f32], xq: &[f32]) -> Result<f64> {
    check_lengths(x.len(), xq.len())?;
    let (mut sig, mut noise) = (0f64, 0f64);
    for (&a, &b) in x.iter().zip(xq) {
        let (a, b) = (f64::from(a), f64::from(b));
        sig += a * a;
        noise += (a - b) * (a - b);
    }
    Ok(if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (sig / noise).log10()
    })
}

/// Round half to even of an f32, exact for every input (the sign of a zero result may differ),
/// written with the `x + 2^23 - 2^23` trick so loops over it vectorise on baseline x86-64, where
/// `round_ties_even` is a libm call.
#[inline]
pub fn round_half_even(x: f32) -> f32 {
    const TWO_23: f32 = 8_388_608.0;
    // Adding 2^23 (with x's sign) leaves no fraction bits, so the FPU's default
    // round-to-nearest-even does the work; from 2^23 up every f32 is already an integer.
    if x.abs() < TWO_23 {
        let m = TWO_23.copysign(x);
        (x + m) - m
    } else {
        x
    }
}

/// `[qmin - zp, qmax - zp]` as f32 bounds for [`round_to_code`]: rounded inward when not
/// exactly representable and limited to i32's range, so a value clamped to them converts to
/// i32 exactly and adding `zp` back stays within `[qmin, qmax]` without overflow. (Only grids
/// wider than 2^24 codes are affected: they saturate up to 127 codes short of their ends.)
#[inline]
pub(crate) fn code_bounds(qmin: i32, qmax: i32, zp: i32) -> (f32, f32) {
    const TOP: i64 = 2_147_483_520; // largest f32 below 2^31
    let lo_i = (i64::from(qmin) - i64::from(zp)).clamp(i64::from(i32::MIN), TOP);
    let hi_i = (i64::from(qmax) - i64::from(zp)).clamp(i64::from(i32::MIN), TOP);
    // Only integers beyond 2^24 round, and those are non-zero: one ulp is one bit step of
    // the magnitude (`f32::next_up` needs Rust 1.86).
    let mut lo = lo_i as f32;
    if (lo as i64) < lo_i {
        let b = lo.to_bits();
        lo = f32::from_bits(if lo > 0.0 { b + 1 } else { b - 1 });
    }
    let mut hi = hi_i as f32;
    if (hi as i64) > hi_i {
        let b = hi.to_bits();
        hi = f32::from_bits(if hi > 0.0 { b - 1 } else { b + 1 });
    }
    (lo, hi)
}

/// `round_half_even(clamp(v, lo, hi))` as i32 for bounds from [`code_bounds`]; NaN becomes
/// `lo`. Written so loops over it vectorise (a saturating `as` cast would be scalarised).
#[inline]
pub(crate) fn round_to_code(v: f32, lo: f32, hi: f32) -> i32 {
    let v = if v > lo { v } else { lo };
    let v = if v < hi { v } else { hi };
    // SAFETY: `v` is finite and within [lo, hi], integers in i32's range by `code_bounds`
    // (or at most half a unit inside them), so the rounded value is an i32.
    unsafe { round_half_even(v).to_int_unchecked::<i32>() }
}

/// [`QParams::quantize_slice`] for one-byte codes, 16 values per step, with the same steps as
/// [`round_to_code`]: divide, clamp to `[lo, hi]` (NaN becomes `lo`, as `maxps` returns its
/// second operand when the first is NaN), round half to even, add the zero point.
///
/// # Safety
/// AVX-512 F; `out` writable for `x.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_bytes_avx512(
    x: &[f32],
    scale: f32,
    (lo, hi): (f32, f32),
    zp: i32,
    out: *mut i8,
) {
    use std::arch::x86_64::*;
    let (s, l, h, z) = (
        _mm512_set1_ps(scale),
        _mm512_set1_ps(lo),
        _mm512_set1_ps(hi),
        _mm512_set1_epi32(zp),
    );
    let mut i = 0;
    while i < x.len() {
        let lanes = (x.len() - i).min(16);
        let mask = ((1u32 << lanes) - 1) as __mmask16;
        // SAFETY: the masked load and store touch only the `lanes` elements from `i`.
        unsafe {
            let v = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, x.as_ptr().add(i)), s);
            let v = _mm512_min_ps(_mm512_max_ps(v, l), h);
            let q = _mm512_add_epi32(_mm512_cvtps_epi32(v), z);
            _mm512_mask_cvtepi32_storeu_epi8(out.add(i), mask, q);
        }
        i += lanes;
    }
}

/// Min and max of `data`, or an error naming `name` when a value is NaN or infinite or the slice
/// is empty.
pub fn finite_min_max(data: &[f32], name: &str) -> Result<(f32, f32)> {
    if data.is_empty() {
        return Err(tensor_error(
            name,
            "cannot take the range of an empty tensor",
        ));
    }
    let (lo, hi) = min_max(data);
    if !lo.is_finite() || !hi.is_finite() {
        check_finite(data, name)?;
    }
    Ok((lo, hi))
}

/// Min and max, poisoned by non-finite values: a NaN or infinity anywhere makes both results
/// NaN, for the caller to report. Calibration's MinMax observer and the histograms scan every
/// activation value with this, so AVX CPUs take a 32-lane loop (four independent vectors: a
/// single accumulator waits on the latency of `minps` each step and runs at a quarter of
/// the load bandwidth); min and max are exact, so both routes give the same values (up to the
/// sign of a zero extreme, which no range or scale depends on).
pub fn min_max(data: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if data.len() >= 64 && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX was detected at run time.
        return unsafe { min_max_avx(data) };
    }
    min_max_portable(data)
}

/// Eight independent lanes of plain compares and a `x * 0` accumulator (0 for finite `x`,
/// NaN otherwise) keep the loop vectorisable without AVX.
fn min_max_portable(data: &[f32]) -> (f32, f32) {
    let mut lo = [f32::INFINITY; 8];
    let mut hi = [f32::NEG_INFINITY; 8];
    let mut poison = [0f32; 8];
    let chunks = data.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
            poison[i] += c[i] * 0.0;
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        lo[i] = if v < lo[i] { v } else { lo[i] };
        hi[i] = if v > hi[i] { v } else { hi[i] };
        poison[i] += v * 0.0;
    }
    if poison.iter().any(|p| p.is_nan()) {
        return (f32::NAN, f32::NAN);
    }
    let lo = lo.iter().fold(f32::INFINITY, |a, &b| a.min(b));
    let hi = hi.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    (lo, hi)
}

/// [`min_max_portable`] over four 8-lane vectors at a time. `minps(x, acc)` returns `acc`
/// when `x` is NaN, so NaN never enters the extremes; the `x * 0` sum catches it (and
/// infinities) instead.
///
/// # Safety
/// AVX must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn min_max_avx(data: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_ps();
    let mut lo = [_mm256_set1_ps(f32::INFINITY); 4];
    let mut hi = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
    let mut poison = [zero; 4];
    let chunks = data.chunks_exact(32);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..4 {
            // SAFETY: `c` holds 32 floats, so the 8 from `8 * j` are in bounds.
            let x = unsafe { _mm256_loadu_ps(c.as_ptr().add(8 * j)) };
            lo[j] = _mm256_min_ps(x, lo[j]);
            hi[j] = _mm256_max_ps(x, hi[j]);
            poison[j] = _mm256_add_ps(poison[j], _mm256_mul_ps(x, zero));
        }
    }
    let mut l = [0f32; 8];
    let mut h = [0f32; 8];
    let mut p = [0f32; 8];
    let lo = _mm256_min_ps(_mm256_min_ps(lo[0], lo[1]), _mm256_min_ps(lo[2], lo[3]));
    let hi = _mm256_max_ps(_mm256_max_ps(hi[0], hi[1]), _mm256_max_ps(hi[2], hi[3]));
    let poison = _mm256_add_ps(
        _mm256_add_ps(poison[0], poison[1]),
        _mm256_add_ps(poison[2], poison[3]),
    );
    // SAFETY: each array holds 8 floats.
    unsafe {
        _mm256_storeu_ps(l.as_mut_ptr(), lo);
        _mm256_storeu_ps(h.as_mut_ptr(), hi);
        _mm256_storeu_ps(p.as_mut_ptr(), poison);
    }
    let (rlo, rhi) = min_max_portable(rest);
    if p.iter().any(|v| v.is_nan()) || rlo.is_nan() {
        return (f32::NAN, f32::NAN);
    }
    let lo = l.iter().fold(rlo, |a, &b| a.min(b));
    let hi = h.iter().fold(rhi, |a, &b| a.max(b));
    (lo, hi)
}

/// Error naming the first non-finite element of `data`.
pub(crate) fn check_finite(data: &[f32], name: &str) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(tensor_error(
            name,
            format!(
                "element {i} is {}; cannot quantize non-finite values",
                data[i]
            ),
        )),
        None => Ok(()),
    }
}

pub(crate) fn tensor_error(name: &str, msg: impl Into<String>) -> Error {
    Error::Tensor {
        name: name.to_string(),
        msg: msg.into(),
    }
}

fn is_usable_scale(s: f32) -> bool {
    s.is_finite() && s >= f32::MIN_POSITIVE
}

fn check_lengths(a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::Shape(format!(
            "input has {a} elements but output has {b}"
        )));
    }
    Ok(())
}

fn check_store<T: QStore>(p: &QParams) -> Result<()> {
    if p.qmin < T::MIN || p.qmax > T::MAX {
        return Err(Error::DType(format!(
            "codes [{}, {}] do not fit an integer type of range [{}, {}]",
            p.qmin,
            p.qmax,
            T::MIN,
            T::MAX
        )));
    }
    Ok(())
}

/// Row-major layout seen as `outer x channels x inner` around one axis.
struct ChannelLayout {
    outer: usize,
    channels: usize,
    inner: usize,
}

impl ChannelLayout {
    fn new(shape: &[usize], axis: usize, len: usize, name: &str) -> Result<ChannelLayout> {
        if axis >= shape.len() {
            return Err(tensor_error(
                name,
                format!("channel axis {axis} is out of range for shape {shape:?}"),
            ));
        }
        let numel: usize = shape.iter().product();
        if numel != len {
            return Err(tensor_error(
                name,
                format!("shape {shape:?} has {numel} elements but the data has {len}"),
            ));
        }
        Ok(ChannelLayout {
            outer: shape[..axis].iter().product(),
            channels: shape[axis],
            inner: shape[axis + 1..].iter().product(),
        })
    }

    fn for_each_run(&self, mut f: impl FnMut(usize, std::ops::Range<usize>)) {
        for o in 0..self.outer {
            for c in 0..self.channels {
                let start = (o * self.channels + c) * self.inner;
                f(c, start..start + self.inner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_min_max_matches_the_portable_loop() {
        let mut rng = crate::quant::test_rng::Rng::new(11);
        for len in [0usize, 1, 7, 31, 32, 63, 64, 65, 100, 1000, 4099] {
            let mut x: Vec<f32> = (0..len).map(|_| rng.gaussian() * 3.0).collect();
            assert_eq!(min_max(&x), min_max_portable(&x), "len {len}");
            // A non-finite value anywhere (vector body or scalar tail) poisons both results.
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in [0, len / 2, len.saturating_sub(1)] {
                    if at >= len {
                        continue;
                    }
                    let keep = x[at];
                    x[at] = bad;
                    let (lo, hi) = min_max(&x);
                    assert!(lo.is_nan() && hi.is_nan(), "len {len}, {bad} at {at}");
                    x[at] = keep;
                }
            }
        }
    }

    #[test]
    fn symmetric_s8_of_minus_one_half() {
        let p = QScheme::S8_SYMMETRIC
            .params_from_range(-1.0, 0.5, "w")
            .unwrap();
        assert_eq!(p.scale, (1.0f64 / 127.0) as f32);
        assert_eq!((p.zero_point, p.qmin, p.qmax), (0, -127, 127));
        assert_eq!(p.quantize(-1.0), -127);
        assert_eq!(p.quantize(0.5), 64); // 63.5 rounds to even
        assert_eq!(p.quantize(-2.0), -127);
    }

    #[test]
    fn affine_u8_of_minus_one_three() {
        let p = QScheme::U8_AFFINE
            .params_from_range(-1.0, 3.0, "a")
            .unwrap();
        assert_eq!(p.scale, (4.0f64 / 255.0) as f32);
        // -(-1)/s = 63.75 -> 64
        assert_eq!(p.zero_point, 64);
        assert_eq!(p.quantize(0.0), 64);
        assert_eq!(p.dequantize(64), 0.0);
        assert_eq!(p.quantize(3.0), 255);
        assert_eq!(p.quantize(-1.0), 0);
    }

    #[test]
    fn affine_range_is_extended_to_zero() {
        let p = QScheme::U8_AFFINE.params_from_range(2.0, 4.0, "a").unwrap();
        assert_eq!(p.zero_point, 0);
        assert_eq!(p.scale, (4.0f64 / 255.0) as f32);
        let p = QScheme::U8_AFFINE
            .params_from_range(-4.0, -2.0, "a")
            .unwrap();
        assert_eq!(p.zero_point, 255);
        assert_eq!(p.fake_quantize(0.0), 0.0);
    }

    #[test]
    fn zero_is_exact_for_every_scheme() {
        for bits in [2, 3, 4, 5, 8, 16] {
            for signed in [false, true] {
                for sym in [false, true] {
                    let s = QScheme::new(bits, signed, sym).unwrap();
                    for (lo, hi) in [(-1.3, 2.7), (0.1, 5.0), (-3.0, -0.2), (-1e-3, 7e4)] {
                        let p = s.params_from_range(lo, hi, "t").unwrap();
                        assert_eq!(p.fake_quantize(0.0), 0.0, "{s:?} {lo} {hi}");
                    }
                }
            }
        }
    }

    #[test]
    fn grid_bounds() {
        let s = |b, sg, sy| QScheme::new(b, sg, sy).unwrap();
        assert_eq!(
            (s(8, true, false).qmin(), s(8, true, false).qmax()),
            (-128, 127)
        );
        assert_eq!(
            (s(8, true, true).qmin(), s(8, true, true).qmax()),
            (-127, 127)
        );
        assert_eq!(
            (s(4, false, false).qmin(), s(4, false, false).qmax()),
            (0, 15)
        );
        assert_eq!((s(2, true, true).qmin(), s(2, true, true).qmax()), (-1, 1));
        assert_eq!(
            (s(16, true, false).qmin(), s(16, true, false).qmax()),
            (-32768, 32767)
        );
        let r = QScheme::U8_AFFINE.with_reduce_range(true).unwrap();
        assert_eq!((r.qmin(), r.qmax()), (0, 127));
        let r = QScheme::S8_SYMMETRIC.with_reduce_range(true).unwrap();
        assert_eq!((r.qmin(), r.qmax()), (-63, 63));
        assert_eq!(QScheme::U8_AFFINE.storage_dtype(), DType::U8);
        assert_eq!(s(4, true, true).storage_dtype(), DType::I8);
        assert_eq!(s(16, true, false).storage_dtype(), DType::I16);
        assert!(QScheme::new(1, true, true).is_err());
        assert!(QScheme::new(17, true, true).is_err());
        assert!(QScheme::new(2, true, true)
            .unwrap()
            .with_reduce_range(true)
            .is_err());
    }

    #[test]
    fn degenerate_ranges_get_safe_scales() {
        for s in [
            QScheme::U8_AFFINE,
            QScheme::S8_SYMMETRIC,
            QScheme::S8_AFFINE,
        ] {
            let p = s.params_for(&[0.0; 10], "z").unwrap();
            assert_eq!((p.scale, p.zero_point), (1.0, 0));
            assert_eq!(p.fake_quantize(0.0), 0.0);
        }
        let p = QScheme::S8_SYMMETRIC.params_for(&[3.0; 4], "c").unwrap();
        assert_eq!(p.scale, (3.0f64 / 127.0) as f32);
        assert_eq!(p.fake_quantize(3.0), 127.0 * p.scale);
        let p = QScheme::U8_AFFINE.params_for(&[-2.0; 4], "c").unwrap();
        assert!(p.scale > 0.0);
        assert_eq!(p.quantize(-2.0), 0);
        let tiny = QScheme::U8_AFFINE
            .params_from_range(0.0, 1e-40, "t")
            .unwrap();
        assert_eq!(tiny.scale, 1.0);
    }

    #[test]
    fn non_finite_inputs_are_errors_naming_the_tensor() {
        let e = QScheme::U8_AFFINE
            .params_for(&[1.0, f32::NAN], "conv1.weight")
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("conv1.weight") && msg.contains("NaN"), "{msg}");
        assert!(QScheme::U8_AFFINE
            .params_for(&[f32::INFINITY], "x")
            .is_err());
        assert!(QScheme::U8_AFFINE.params_for(&[], "x").is_err());
        assert!(QScheme::U8_AFFINE
            .params_from_range(1.0, -1.0, "x")
            .is_err());
        assert!(QParams::new(0.0, 0, 0, 255, "x").is_err());
        assert!(QParams::new(f32::NAN, 0, 0, 255, "x").is_err());
    }

    #[test]
    fn quantize_rounds_half_to_even_and_saturates() {
        let p = QParams {
            scale: 0.5,
            zero_point: 10,
            qmin: 0,
            qmax: 20,
        };
        // x/s = 0.5, 1.5, 2.5, -0.5, -1.5
        assert_eq!(p.quantize(0.25), 10);
        assert_eq!(p.quantize(0.75), 12);
        assert_eq!(p.quantize(1.25), 12);
        assert_eq!(p.quantize(-0.25), 10);
        assert_eq!(p.quantize(-0.75), 8);
        assert_eq!(p.quantize(100.0), 20);
        assert_eq!(p.quantize(-100.0), 0);
        assert_eq!(p.quantize(f32::INFINITY), 20);
        assert_eq!(p.quantize(f32::NEG_INFINITY), 0);
        assert_eq!(p.quantize(f32::NAN), 0);
        assert_eq!(p.dequantize(12), 1.0);
    }

    #[test]
    fn slice_quantization_matches_the_scalar_rule() {
        let specials = [
            0.25f32,
            0.75,
            1.25,
            -0.25,
            -0.75,
            63.75,
            -64.25,
            1e9,
            -1e9,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let mut state = 7u32;
        for len in 0..45 {
            let x: Vec<f32> = (0..len)
                .map(|i| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    if i % 3 == 0 {
                        specials[(state >> 8) as usize % specials.len()]
                    } else {
                        ((state >> 8) as f32 / (1 << 24) as f32 - 0.5) * 300.0
                    }
                })
                .collect();
            for (zp, qmin, qmax) in [(10, 0, 255), (-3, -128, 127)] {
                let p = QParams {
                    scale: 0.5,
                    zero_point: zp,
                    qmin,
                    qmax,
                };
                let want: Vec<i32> = x.iter().map(|&v| p.quantize(v)).collect();
                if qmin == 0 {
                    let mut out = vec![0u8; len];
                    p.quantize_slice(&x, &mut out).unwrap();
                    assert!(
                        out.iter().zip(&want).all(|(&a, &b)| i32::from(a) == b),
                        "len {len}"
                    );
                } else {
                    let mut out = vec![0i8; len];
                    p.quantize_slice(&x, &mut out).unwrap();
                    assert!(
                        out.iter().zip(&want).all(|(&a, &b)| i32::from(a) == b),
                        "len {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn code_bounds_are_exact_and_inward() {
        assert_eq!(code_bounds(0, 255, 128), (-128.0, 127.0));
        assert_eq!(
            code_bounds(i32::MIN, i32::MAX, 0),
            (-2147483648.0, 2147483520.0)
        );
        let (lo, hi) = code_bounds(-16_777_217, 16_777_217, 0);
        assert_eq!((lo, hi), (-16_777_216.0, 16_777_216.0));
        // 2^24 + 3 rounds to 2^24 + 4 as f32; inward is 2^24 + 2.
        assert_eq!(
            code_bounds(-16_777_219, 16_777_219, 0),
            (-16_777_218.0, 16_777_218.0)
        );
        let p = QParams {
            scale: 1.0,
            zero_point: -5,
            qmin: i32::MIN,
            qmax: i32::MAX,
        };
        assert_eq!(p.quantize(f32::INFINITY), 2147483520 - 5);
        // i32::MIN + 5 is not an f32; the bound rounds inward to -2^31 + 128.
        assert_eq!(p.quantize(f32::NEG_INFINITY), -2147483520 - 5);
        assert_eq!(p.quantize(-7.5), -13);
    }

    #[test]
    fn round_half_even_matches_std() {
        let mut x = -1.7e7f32;
        while x < 1.7e7 {
            for v in [x, x + 0.5, x + 0.25, x + 0.75, x * 1e-6, x * 1.3e-5] {
                assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
            }
            x += 977.0;
        }
        for v in [
            0.5, 1.5, 2.5, -0.5, -2.5, 4194303.5, 8388607.5, -8388607.5, 1e30, -1e30, 0.49999997,
        ] {
            assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
        }
        assert!(round_half_even(f32::NAN).is_nan());
        assert_eq!(round_half_even(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn per_channel_along_axis() {
        // shape [2, 3]: channel axis 0 has rows [-1, 0, 1] and [0, 2, 4].
        let x = [-1.0, 0.0, 1.0, 0.0, 2.0, 4.0];
        let pc = QScheme::S8_SYMMETRIC
            .params_per_channel(&x, &[2, 3], 0, "w")
            .unwrap();
        assert_eq!(pc.params[0].scale, (1.0f64 / 127.0) as f32);
        assert_eq!(pc.params[1].scale, (4.0f64 / 127.0) as f32);
        let q = Quantization::PerChannel(pc);
        let mut codes = [0i8; 6];
        q.quantize(&x, &[2, 3], &mut codes, "w").unwrap();
        assert_eq!(codes, [-127, 0, 127, 0, 64, 127]);
        // Axis 1 of the same data: columns [-1, 0], [0, 2], [1, 4].
        let pc = QScheme::S8_SYMMETRIC
            .params_per_channel(&x, &[2, 3], 1, "w")
            .unwrap();
        assert_eq!(pc.params.len(), 3);
        assert_eq!(pc.params[1].scale, (2.0f64 / 127.0) as f32);
        assert!(QScheme::S8_SYMMETRIC
            .params_per_channel(&x, &[2, 3], 2, "w")
            .is_err());
        assert!(QScheme::S8_SYMMETRIC
            .params_per_channel(&x, &[2, 2], 0, "w")
            .is_err());
    }

    #[test]
    fn tensor_round_trip_picks_narrow_types() {
        let t = Tensor::from_f32(vec![2, 2], vec![-1.0, 0.0, 0.5, 3.0]).unwrap();
        let p = QScheme::U8_AFFINE
            .params_for(t.as_f32().unwrap(), "t")
            .unwrap();
        let q = Quantization::PerTensor(p);
        let qt = q.quantize_tensor(&t, "t").unwrap();
        assert!(matches!(qt.data(), TensorData::U8(_)));
        let back = q.dequantize_tensor(&qt, "t").unwrap();
        for (a, b) in back.as_f32().unwrap().iter().zip(t.as_f32().unwrap()) {
            assert!((a - b).abs() <= p.scale / 2.0 + 1e-6);
        }
        let s16 = QScheme::new(16, true, true).unwrap();
        let q16 = Quantization::PerTensor(s16.params_for(t.as_f32().unwrap(), "t").unwrap());
        assert!(matches!(
            q16.quantize_tensor(&t, "t").unwrap().data(),
            TensorData::I16(_)
        ));
        let wrong = QParams {
            scale: 1.0,
            zero_point: 0,
            qmin: -128,
            qmax: 127,
        };
        let mut out = [0u8; 4];
        assert!(wrong.quantize_slice(&[0.0; 4], &mut out).is_err());
    }

    #[test]
    fn sqnr_matches_definition_and_grows_with_bits() {
        assert_eq!(sqnr_db(&[1.0, 2.0], &[1.0, 2.0]).unwrap(), f64::INFINITY);
        // signal 1+4 = 5, noise 0.01 + 0 -> 10 log10(500)
        let v = sqnr_db(&[1.0, 2.0], &[1.1, 2.0]).unwrap();
        assert!(
            (v - 10.0 * (5.0f64 / 0.010000001).log10()).abs() < 1e-3,
            "{v}"
        );
        let x: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin()).collect();
        let mut last = f64::NEG_INFINITY;
        for bits in [2, 4, 6, 8] {
            let p = QScheme::new(bits, true, true)
                .unwrap()
                .params_for(&x, "x")
                .unwrap();
            let mut xq = x.clone();
            p.fake_quantize_slice(&mut xq);
            let s = sqnr_db(&x, &xq).unwrap();
            assert!(s > last + 5.0, "{bits} bits: {s} dB after {last}");
            last = s;
        }
        // About 6 dB per bit: 8-bit symmetric of a sinusoid is near 6.02*8 + 1.76 - 3 dB.
        assert!(last > 40.0 && last < 52.0, "{last}");
    }
}
