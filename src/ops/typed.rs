//! Element-type plumbing shared by the tensor ops: a trait over the Rust types behind each
//! [`DType`] and macros that turn a run-time dtype into a compile-time type, so one generic
//! kernel body serves every dtype an op accepts.

use super::RunCtx;
use crate::error::{Error, Result};
use crate::ir::dtype::{f16_to_f32, f32_to_f16};
use crate::ir::{DType, Tensor, TensorData};

/// Runs `$body` with `$T` bound to the Rust type of any IR dtype (f16 as its `u16` bits).
macro_rules! with_any_type {
    ($dt:expr, |$T:ident| $body:expr) => {
        match $dt {
            $crate::ir::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::ir::DType::F16 => {
                type $T = u16;
                $body
            }
            $crate::ir::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::ir::DType::I8 => {
                type $T = i8;
                $body
            }
            $crate::ir::DType::U8 => {
                type $T = u8;
                $body
            }
            $crate::ir::DType::I16 => {
                type $T = i16;
                $body
            }
            $crate::ir::DType::I32 => {
                type $T = i32;
                $body
            }
            $crate::ir::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::ir::DType::Bool => {
                type $T = bool;
                $body
            }
        }
    };
}

/// Runs `$body` with `$T` bound to a [`Num`] type, or evaluates `$other` for bool and f16.
macro_rules! with_num_type {
    ($dt:expr, |$T:ident| $body:expr, else $other:expr) => {
        match $dt {
            $crate::ir::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::ir::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::ir::DType::I8 => {
                type $T = i8;
                $body
            }
            $crate::ir::DType::U8 => {
                type $T = u8;
                $body
            }
            $crate::ir::DType::I16 => {
                type $T = i16;
                $body
            }
            $crate::ir::DType::I32 => {
                type $T = i32;
                $body
            }
            $crate::ir::DType::I64 => {
                type $T = i64;
                $body
            }
            _ => $other,
        }
    };
}

/// Runs `$body` with `$T` bound to f32 or f64, or evaluates `$other`.
macro_rules! with_float_type {
    ($dt:expr, |$T:ident| $body:expr, else $other:expr) => {
        match $dt {
            $crate::ir::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::ir::DType::F64 => {
                type $T = f64;
                $body
            }
            _ => $other,
        }
    };
}

pub(crate) use {with_any_type, with_float_type, with_num_type};

/// A Rust type that stores the elements of one [`DType`]. `u16` stands for f16 bits, which is
/// unambiguous because the IR has no u16 type; arithmetic on f16 widens to f32 first.
pub trait Elem: Copy + Default + PartialEq + Send + Sync + std::fmt::Debug + 'static {
    const DTYPE: DType;
    const IS_FLOAT: bool;
    fn view(data: &TensorData) -> Option<&[Self]>;
    fn wrap(v: Vec<Self>) -> TensorData;
    /// `len` default-valued elements; f32 buffers come from the run's pool.
    fn filled(_ctx: &mut RunCtx, len: usize) -> Vec<Self> {
        vec![Self::default(); len]
    }
    /// Value conversions with C cast semantics (float to int truncates and saturates).
    fn to_f64(self) -> f64;
    fn to_i64(self) -> i64;
    fn from_f64(v: f64) -> Self;
    fn from_i64(v: i64) -> Self;
}

macro_rules! impl_elem {
    ($t:ty, $dt:ident, $float:expr, $to_f64:expr, $to_i64:expr, $from_f64:expr, $from_i64:expr) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$dt;
            const IS_FLOAT: bool = $float;
            fn view(data: &TensorData) -> Option<&[Self]> {
                match data {
                    TensorData::$dt(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: Vec<Self>) -> TensorData {
                TensorData::$dt(v)
            }
            #[inline]
            fn to_f64(self) -> f64 {
                let f: fn($t) -> f64 = $to_f64;
                f(self)
            }
            #[inline]
            fn to_i64(self) -> i64 {
                let f: fn($t) -> i64 = $to_i64;
                f(self)
            }
            #[inline]
            fn from_f64(v: f64) -> Self {
                let f: fn(f64) -> $t = $from_f64;
                f(v)
            }
            #[inline]
            fn from_i64(v: i64) -> Self {
                let f: fn(i64) -> $t = $from_i64;
                f(v)
            }
        }
    };
}

macro_rules! impl_int_elem {
    ($t:ty, $dt:ident) => {
        impl_elem!(
            $t,
            $dt,
            false,
            |x| x as f64,
            |x| x as i64,
            |v| v as $t,
            |v| v as $t
        );
    };
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    const IS_FLOAT: bool = true;
    fn view(data: &TensorData) -> Option<&[Self]> {
        match data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<Self>) -> TensorData {
        TensorData::F32(v)
    }
    fn filled(ctx: &mut RunCtx, len: usize) -> Vec<Self> {
        ctx.alloc_f32(len)
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn to_i64(self) -> i64 {
        self as i64
    }
    #[inline]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline]
    fn from_i64(v: i64) -> Self {
        v as f32
    }
}

impl_elem!(f64, F64, true, |x| x, |x| x as i64, |v| v, |v| v as f64);
impl_elem!(
    u16,
    F16,
    true,
    |x| f16_to_f32(x) as f64,
    |x| f16_to_f32(x) as i64,
    |v| f32_to_f16(v as f32),
    |v| f32_to_f16(v as f32)
);
impl_elem!(
    bool,
    Bool,
    false,
    |x| x as u8 as f64,
    |x| x as i64,
    |v| v != 0.0,
    |v| v != 0
);
impl_int_elem!(i8, I8);
impl_int_elem!(u8, U8);
impl_int_elem!(i16, I16);
impl_int_elem!(i32, I32);
impl_int_elem!(i64, I64);

/// The elements of `t` as `T`, or a type error naming both types.
pub fn view<T: Elem>(t: &Tensor) -> Result<&[T]> {
    T::view(t.data())
        .ok_or_else(|| Error::DType(format!("expected a {} tensor, got {}", T::DTYPE, t.dtype())))
}

/// One element converted with C cast semantics: floats go through f64 (float to int
/// truncates toward zero and saturates, NaN gives 0), integers and bools through i64 (narrowing
/// wraps), anything to bool is `!= 0`.
#[inline]
pub fn cast_elem<S: Elem, D: Elem>(x: S) -> D {
    if S::IS_FLOAT {
        D::from_f64(x.to_f64())
    } else {
        D::from_i64(x.to_i64())
    }
}

/// Every element of `t` converted to `D` (see [`cast_elem`]).
pub fn convert<D: Elem>(t: &Tensor) -> Result<Vec<D>> {
    with_any_type!(t.dtype(), |S| Ok(view::<S>(t)?
        .iter()
        .map(|&x| cast_elem::<S, D>(x))
        .collect()))
}

pub fn tensor<T: Elem>(shape: Vec<usize>, data: Vec<T>) -> Result<Tensor> {
    Tensor::new(shape, T::wrap(data))
}

/// Arithmetic on the numeric types (not bool, not f16). Integer arithmetic wraps like C on
/// two's-complement machines instead of panicking on overflow.
pub trait Num: Elem + PartialOrd {
    const ZERO: Self;
    const ONE: Self;
    /// Identity of max (`-inf` for floats).
    const LOWEST: Self;
    /// Identity of min (`+inf` for floats).
    const HIGHEST: Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    /// Integer division truncates toward zero; callers reject zero divisors first.
    fn div(self, o: Self) -> Self;
    /// Remainder with the sign of the dividend (C `fmod`, Rust `%`); zero divisors give 0
    /// for integers.
    fn rem(self, o: Self) -> Self;
    fn neg(self) -> Self;
    fn abs(self) -> Self;
    fn is_nan(self) -> bool;
}

macro_rules! impl_num_int {
    ($t:ty) => {
        impl Num for $t {
            const ZERO: Self = 0;
            const ONE: Self = 1;
            const LOWEST: Self = <$t>::MIN;
            const HIGHEST: Self = <$t>::MAX;
            #[inline]
            fn add(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            #[inline]
            fn sub(self, o: Self) -> Self {
                self.wrapping_sub(o)
            }
            #[inline]
            fn mul(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            #[inline]
            fn div(self, o: Self) -> Self {
                if o == 0 {
                    0
                } else {
                    self.wrapping_div(o)
                }
            }
            #[inline]
            fn rem(self, o: Self) -> Self {
                if o == 0 {
                    0
                } else {
                    self.wrapping_rem(o)
                }
            }
            #[inline]
            fn neg(self) -> Self {
                (0 as $t).wrapping_sub(self)
            }
            #[inline]
            #[allow(unused_comparisons)]
            fn abs(self) -> Self {
                if self < 0 {
                    self.neg()
                } else {
                    self
                }
            }
            #[inline]
            fn is_nan(self) -> bool {
                false
            }
        }
    };
}

macro_rules! impl_num_float {
    ($t:ty) => {
        impl Num for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const LOWEST: Self = <$t>::NEG_INFINITY;
            const HIGHEST: Self = <$t>::INFINITY;
            #[inline]
            fn add(self, o: Self) -> Self {
                self + o
            }
            #[inline]
            fn sub(self, o: Self) -> Self {
                self - o
            }
            #[inline]
            fn mul(self, o: Self) -> Self {
                self * o
            }
            #[inline]
            fn div(self, o: Self) -> Self {
                self / o
            }
            #[inline]
            fn rem(self, o: Self) -> Self {
                self % o
            }
            #[inline]
            fn neg(self) -> Self {
                -self
            }
            #[inline]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}

impl_num_int!(i8);
impl_num_int!(u8);
impl_num_int!(i16);
impl_num_int!(i32);
impl_num_int!(i64);
impl_num_float!(f32);
impl_num_float!(f64);

/// Max that propagates NaN, as numpy's `maximum` (and so ONNX's reference) does.
#[inline]
pub fn max_nan<T: Num>(a: T, b: T) -> T {
    if a > b || a.is_nan() {
        a
    } else {
        b
    }
}

/// Min that propagates NaN.
#[inline]
pub fn min_nan<T: Num>(a: T, b: T) -> T {
    if a < b || a.is_nan() {
        a
    } else {
        b
    }
}

/// Folds `xs` with eight independent accumulators merged at the end: the loop vectorises and,
/// for sums, rounding error grows more slowly than with one running total. `step` adds an
/// element to an accumulator, `combine` merges two accumulators.
#[inline]
pub fn fold_lanes<T: Copy, A: Copy>(
    xs: &[T],
    init: A,
    step: impl Fn(A, T) -> A,
    combine: impl Fn(A, A) -> A,
) -> A {
    let mut lanes = [init; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = step(*l, v);
        }
    }
    let mut r = init;
    for l in lanes {
        r = combine(r, l);
    }
    for &v in rest {
        r = step(r, v);
    }
    r
}

/// Sum of `xs` (see [`fold_lanes`]).
#[inline]
pub fn sum_lanes<T: Num>(xs: &[T]) -> T {
    fold_lanes(xs, T::ZERO, T::add, T::add)
}

/// Floating-point math on f32 and f64.
pub trait Float: Num {
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn powf(self, e: Self) -> Self;
    fn floor(self) -> Self;
    fn ceil(self) -> Self;
    fn round_even(self) -> Self;
    fn erf(self) -> Self;
    /// `dst[i] = erf(src[i])`, vectorised where the type has a fast path.
    fn erf_slice(src: &[Self], dst: &mut [Self]);
    /// `v[i] = exp(v[i])`, vectorised where the type has a fast path (f32: within 2 ulp).
    fn exp_in_place(v: &mut [Self]);
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn tan(self) -> Self;
    fn from_usize(n: usize) -> Self;
}

macro_rules! impl_float {
    ($t:ty, $erf:path, $erf_slice:path, $exp_in_place:path) => {
        impl Float for $t {
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn powf(self, e: Self) -> Self {
                <$t>::powf(self, e)
            }
            #[inline]
            fn floor(self) -> Self {
                <$t>::floor(self)
            }
            #[inline]
            fn ceil(self) -> Self {
                <$t>::ceil(self)
            }
            #[inline]
            fn round_even(self) -> Self {
                <$t>::round_ties_even(self)
            }
            #[inline]
            fn erf(self) -> Self {
                $erf(self)
            }
            fn erf_slice(src: &[Self], dst: &mut [Self]) {
                $erf_slice(src, dst)
            }
            fn exp_in_place(v: &mut [Self]) {
                $exp_in_place(v)
            }
            #[inline]
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            #[inline]
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            #[inline]
            fn tan(self) -> Self {
                <$t>::tan(self)
            }
            #[inline]
            fn from_usize(n: usize) -> Self {
                n as $t
            }
        }
    };
}

impl_float!(
    f32,
    super::erf::erf_f32,
    super::erf::erf_slice_f32,
    super::expf::exp_in_place
);
impl_float!(f64, super::erf::erf, erf_slice_f64, exp_in_place_f64);

fn exp_in_place_f64(v: &mut [f64]) {
    v.iter_mut().for_each(|x| *x = x.exp());
}

fn erf_slice_f64(src: &[f64], dst: &mut [f64]) {
    for (o, &v) in dst.iter_mut().zip(src) {
        *o = super::erf::erf(v);
    }
}

/// A copy of `t` (f32 storage from the run's pool), reshaped to `shape` when given. The
/// "view" ops (Reshape, Squeeze, Identity...) must return owned tensors; this keeps their
/// copies from allocating in steady state.
pub fn pooled_copy(t: &Tensor, shape: Option<Vec<usize>>, ctx: &mut RunCtx) -> Result<Tensor> {
    let shape = shape.unwrap_or_else(|| t.shape().to_vec());
    with_any_type!(t.dtype(), |T| {
        let src = view::<T>(t)?;
        let mut out = T::filled(ctx, src.len());
        out.copy_from_slice(src);
        tensor(shape, out)
    })
}

/// f16 tensors widened to f32 so float kernels need only f32/f64 bodies; other tensors
/// pass through untouched. Returns whether anything was widened.
pub fn widen_f16<'a>(
    inputs: &[Option<&'a Tensor>],
) -> (Vec<Option<std::borrow::Cow<'a, Tensor>>>, bool) {
    let mut any = false;
    let out = inputs
        .iter()
        .map(|t| {
            t.map(|t| {
                if t.dtype() == DType::F16 {
                    any = true;
                    std::borrow::Cow::Owned(t.to_f32())
                } else {
                    std::borrow::Cow::Borrowed(t)
                }
            })
        })
        .collect();
    (out, any)
}

/// Narrows an f32 result back to f16 storage.
pub fn narrow_f16(t: Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::F32 => {
            let (shape, data) = t.into_parts();
            let v = match data {
                TensorData::F32(v) => v.into_iter().map(f32_to_f16).collect(),
                _ => Vec::new(),
            };
            Tensor::new(shape, TensorData::F16(v))
        }
        _ => Ok(t),
    }
}

/// Runs a float kernel body on f16 inputs by widening them to f32 and narrowing the float
/// outputs back; other dtypes run directly.
pub fn run_widening_f16(
    inputs: &[Option<&Tensor>],
    body: impl FnOnce(&[Option<&Tensor>]) -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    let (wide, any) = widen_f16(inputs);
    if !any {
        return body(inputs);
    }
    let refs: Vec<Option<&Tensor>> = wide.iter().map(|t| t.as_deref()).collect();
    body(&refs)?.into_iter().map(narrow_f16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_follow_c_casts() {
        assert_eq!(i32::from_f64(-2.7), -2);
        assert_eq!(u8::from_i64(300), 44);
        assert!(bool::from_f64(0.5));
        assert_eq!(<u16 as Elem>::to_f64(f32_to_f16(1.5)), 1.5);
        assert_eq!(i8::from_f64(1e9), i8::MAX);
        assert_eq!(i64::MIN.div(-1), i64::MIN);
        assert_eq!((-7i32).div(2), -3);
    }

    #[test]
    fn nan_propagating_extrema() {
        assert!(max_nan(f32::NAN, 1.0).is_nan());
        assert!(max_nan(1.0, f32::NAN).is_nan());
        assert_eq!(min_nan(2, 3), 2);
    }
}
