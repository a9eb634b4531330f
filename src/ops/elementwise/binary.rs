//! Broadcasting arithmetic: `Add`, `Sub`, `Mul`, `Div`, `Pow` (7-28; Pow's exponent may have
//! another numeric dtype), `Mod` (10-28) and the variadic `Max`, `Min`, `Sum`, `Mean` (6-28).
//! Numeric dtypes (f16 computes in f32); integer arithmetic wraps and integer division
//! truncates toward zero as in C.

use std::borrow::Cow;

use crate::error::{Error, Result};
use crate::ir::{checked_numel, DType, Tensor, TypeInfo};
use crate::ops::broadcast::{
    binary_into, broadcast_shape, infer_broadcast, map_into, PAR_MIN_MEMORY,
};
use crate::ops::typed::{
    convert, max_nan, min_nan, narrow_f16, pooled_copy, tensor, view, with_any_type, with_num_type,
    Elem, Float, Num,
};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    /// `fmod`: the remainder takes the dividend's sign (C); otherwise the divisor's (Python).
    Mod {
        fmod: bool,
    },
    Max,
    Min,
}

/// `a op b` with broadcasting; both operands must have the same dtype.
pub fn arith(op: Arith, a: &Tensor, b: &Tensor, ctx: &mut RunCtx) -> Result<Tensor> {
    if a.dtype() != b.dtype() {
        return Err(Error::DType(format!(
            "operands of {op:?} have different types: {} and {}",
            a.dtype(),
            b.dtype()
        )));
    }
    let shape = broadcast_shape(a.shape(), b.shape())?;
    if a.dtype() == DType::F16 {
        return narrow_f16(arith(op, &a.to_f32(), &b.to_f32(), ctx)?);
    }
    with_num_type!(
        a.dtype(),
        |T| arith_typed::<T>(op, a, b, shape, ctx),
        else Err(Error::DType(format!("{op:?} does not support {}", a.dtype())))
    )
}

fn arith_typed<T: Num>(
    op: Arith,
    a: &Tensor,
    b: &Tensor,
    shape: Vec<usize>,
    ctx: &mut RunCtx,
) -> Result<Tensor> {
    let (x, y) = (view::<T>(a)?, view::<T>(b)?);
    if !T::IS_FLOAT && matches!(op, Arith::Div | Arith::Mod { .. }) && y.contains(&T::ZERO) {
        return Err(Error::Data(format!(
            "integer {} by zero",
            if op == Arith::Div {
                "division"
            } else {
                "modulo"
            }
        )));
    }
    let n = checked_numel(&shape, T::DTYPE.size_of())?;
    let mut out = T::filled(ctx, n);
    let (sa, sb) = (a.shape(), b.shape());
    let o = &mut out[..];
    match op {
        Arith::Add => binary_into(x, sa, y, sb, &shape, o, |p: T, q: T| p.add(q)),
        Arith::Sub => binary_into(x, sa, y, sb, &shape, o, |p: T, q: T| p.sub(q)),
        Arith::Mul => binary_into(x, sa, y, sb, &shape, o, |p: T, q: T| p.mul(q)),
        Arith::Div => binary_into(x, sa, y, sb, &shape, o, |p: T, q: T| p.div(q)),
        Arith::Max => binary_into(x, sa, y, sb, &shape, o, max_nan::<T>),
        Arith::Min => binary_into(x, sa, y, sb, &shape, o, min_nan::<T>),
        Arith::Mod { fmod: true } => binary_into(x, sa, y, sb, &shape, o, |p: T, q: T| p.rem(q)),
        Arith::Mod { fmod: false } => binary_into(x, sa, y, sb, &shape, o, |p: T, q: T| {
            let r = p.rem(q);
            if r != T::ZERO && ((r < T::ZERO) != (q < T::ZERO)) {
                r.add(q)
            } else {
                r
            }
        }),
    }
    tensor(shape, out)
}

/// `a ^ b`: the result has the base's dtype; the exponent may be any numeric dtype.
pub fn pow(a: &Tensor, b: &Tensor, ctx: &mut RunCtx) -> Result<Tensor> {
    let shape = broadcast_shape(a.shape(), b.shape())?;
    match a.dtype() {
        DType::F16 => narrow_f16(pow(&a.to_f32(), b, ctx)?),
        DType::F32 => pow_float::<f32>(a, b, shape, ctx),
        DType::F64 => pow_float::<f64>(a, b, shape, ctx),
        dt => with_num_type!(
            dt,
            |T| pow_int::<T>(a, b, shape),
            else Err(Error::DType(format!("Pow does not support base type {dt}")))
        ),
    }
}

fn exponent_as<T: Elem>(b: &Tensor) -> Result<Cow<'_, [T]>> {
    if b.dtype() == DType::Bool {
        return Err(Error::DType("Pow does not support bool exponents".into()));
    }
    Ok(if b.dtype() == T::DTYPE {
        Cow::Borrowed(view::<T>(b)?)
    } else {
        Cow::Owned(convert::<T>(b)?)
    })
}

fn pow_float<T: Float>(
    a: &Tensor,
    b: &Tensor,
    shape: Vec<usize>,
    ctx: &mut RunCtx,
) -> Result<Tensor> {
    let x = view::<T>(a)?;
    let e = exponent_as::<T>(b)?;
    let n = checked_numel(&shape, T::DTYPE.size_of())?;
    let mut out = T::filled(ctx, n);
    let two = T::ONE.add(T::ONE);
    if e.len() == 1 && e[0] == two && n == x.len() {
        // x*x is exactly what powf(x, 2) rounds to, at a fraction of the cost.
        map_into(x, &mut out, PAR_MIN_MEMORY, |v: T| v.mul(v));
    } else {
        binary_into(
            x,
            a.shape(),
            &e,
            b.shape(),
            &shape,
            &mut out,
            |p: T, q: T| p.powf(q),
        );
    }
    tensor(shape, out)
}

fn pow_int<T: Num>(a: &Tensor, b: &Tensor, shape: Vec<usize>) -> Result<Tensor> {
    let x = view::<T>(a)?;
    let e = exponent_as::<f64>(b)?;
    let mut out = vec![T::ZERO; checked_numel(&shape, T::DTYPE.size_of())?];
    binary_into(
        x,
        a.shape(),
        &e,
        b.shape(),
        &shape,
        &mut out,
        |p: T, q: f64| {
            if (0.0..64.0).contains(&q) && q.fract() == 0.0 {
                // Exact (wrapping) integer power for the usual small non-negative exponents.
                let mut r = T::ONE;
                for _ in 0..q as u32 {
                    r = r.mul(p);
                }
                r
            } else {
                T::from_f64(p.to_f64().powf(q))
            }
        },
    );
    tensor(shape, out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variadic {
    Max,
    Min,
    Sum,
    Mean,
}

fn variadic(op: Variadic, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Tensor> {
    let ts: Vec<&Tensor> = inputs.iter().flatten().copied().collect();
    let Some((first, rest)) = ts.split_first() else {
        return Err(Error::Graph(format!("{op:?} needs at least one input")));
    };
    let bin = match op {
        Variadic::Max => Arith::Max,
        Variadic::Min => Arith::Min,
        Variadic::Sum | Variadic::Mean => Arith::Add,
    };
    let mut acc = pooled_copy(first, None, ctx)?;
    for t in rest {
        let next = arith(bin, &acc, t, ctx)?;
        ctx.release(std::mem::replace(&mut acc, next));
    }
    if op == Variadic::Mean && !ts.is_empty() {
        if !acc.dtype().is_float() {
            return Err(Error::DType(format!(
                "Mean needs float inputs, got {}",
                acc.dtype()
            )));
        }
        let count = with_any_type!(acc.dtype(), |T| tensor::<T>(
            vec![],
            vec![T::from_i64(ts.len() as i64)]
        ))?;
        let mean = arith(Arith::Div, &acc, &count, ctx)?;
        ctx.release(acc);
        acc = mean;
    }
    Ok(acc)
}

struct ArithKernel(Arith);

impl Kernel for ArithKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        Ok(vec![arith(
            self.0,
            required(inputs, 0)?,
            required(inputs, 1)?,
            ctx,
        )?])
    }
}

struct PowKernel;

impl Kernel for PowKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        Ok(vec![pow(required(inputs, 0)?, required(inputs, 1)?, ctx)?])
    }
}

struct VariadicKernel(Variadic);

impl Kernel for VariadicKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        Ok(vec![variadic(self.0, inputs, ctx)?])
    }
}

fn check_numeric(node: &crate::ir::Node, dt: DType) -> Result<()> {
    if dt == DType::Bool {
        return Err(node_error(node, "bool inputs are not supported"));
    }
    Ok(())
}

/// Binary ops: same dtype on both sides (Pow: the base's), broadcast shape.
pub fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let a = ctx.input_type(0)?;
    let b = ctx.input_type(1)?;
    check_numeric(ctx.node, a.dtype)?;
    check_numeric(ctx.node, b.dtype)?;
    if ctx.node.op_type != "Pow" && a.dtype != b.dtype {
        return Err(node_error(
            ctx.node,
            format!("input types differ: {} and {}", a.dtype, b.dtype),
        ));
    }
    Ok(vec![TypeInfo {
        dtype: a.dtype,
        shape: infer_broadcast(ctx, &[0, 1])?,
    }])
}

pub fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let node = ctx.node;
    let op = match node.op_type.as_str() {
        "Add" => Arith::Add,
        "Sub" => Arith::Sub,
        "Mul" => Arith::Mul,
        "Div" => Arith::Div,
        "Mod" => {
            let fmod = node.attr_int_or("fmod", 0)? != 0;
            Arith::Mod { fmod }
        }
        "Pow" => return Ok(Box::new(PowKernel)),
        other => return Err(node_error(node, format!("{other} is not an arithmetic op"))),
    };
    Ok(Box::new(ArithKernel(op)))
}

/// Variadic ops: common dtype, broadcast of all inputs.
pub fn infer_variadic(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let present: Vec<usize> = (0..ctx.node.inputs.len())
        .filter(|&i| ctx.node.input(i).is_some())
        .collect();
    let Some(&first) = present.first() else {
        return Err(node_error(ctx.node, "needs at least one input"));
    };
    let dtype = ctx.input_type(first)?.dtype;
    check_numeric(ctx.node, dtype)?;
    for &i in &present {
        let dt = ctx.input_type(i)?.dtype;
        if dt != dtype {
            return Err(node_error(
                ctx.node,
                format!("input types differ: {dtype} and {dt}"),
            ));
        }
    }
    Ok(vec![TypeInfo {
        dtype,
        shape: infer_broadcast(ctx, &present)?,
    }])
}

pub fn compile_variadic(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let op = match ctx.node.op_type.as_str() {
        "Max" => Variadic::Max,
        "Min" => Variadic::Min,
        "Sum" => Variadic::Sum,
        "Mean" => Variadic::Mean,
        other => return Err(node_error(ctx.node, format!("{other} is not variadic"))),
    };
    Ok(Box::new(VariadicKernel(op)))
}

#[cfg(test)]
mod tests {
    use crate::ir::{Attr, DType, Dim, Tensor, TensorData, TypeInfo};
    use crate::ops::testutil::*;

    fn i32t(shape: &[usize], v: &[i32]) -> Option<Tensor> {
        Some(Tensor::new(shape.to_vec(), TensorData::I32(v.to_vec())).unwrap())
    }

    #[test]
    fn add_broadcasts_rows_columns_and_scalars() {
        let (s, v) = run_f32(
            "Add",
            14,
            &[],
            vec![iota(&[2, 3]), f32t(&[3], &[10., 20., 30.])],
        );
        assert_eq!(s, vec![2, 3]);
        assert_eq!(v, vec![10., 21., 32., 13., 24., 35.]);
        let (s, v) = run_f32(
            "Sub",
            14,
            &[],
            vec![iota(&[2, 1]), f32t(&[1, 3], &[1., 2., 3.])],
        );
        assert_eq!(s, vec![2, 3]);
        assert_eq!(v, vec![-1., -2., -3., 0., -1., -2.]);
        let (s, v) = run_f32("Mul", 7, &[], vec![f32t(&[], &[2.]), iota(&[3])]);
        assert_eq!((s, v), (vec![3], vec![0., 2., 4.]));
        let (s, v) = run_f32(
            "Div",
            13,
            &[],
            vec![iota(&[1, 2, 1]), f32t(&[3, 1, 2], &[1.; 6])],
        );
        assert_eq!(s, vec![3, 2, 2]);
        assert_eq!(v, vec![0., 0., 1., 1., 0., 0., 1., 1., 0., 0., 1., 1.]);
    }

    #[test]
    fn empty_and_rank_extension() {
        let (s, v) = run_f32("Add", 14, &[], vec![iota(&[0, 3]), iota(&[1, 3])]);
        assert_eq!(s, vec![0, 3]);
        assert!(v.is_empty());
        let (s, _) = run_f32("Add", 14, &[], vec![iota(&[2, 1, 1, 4]), iota(&[3, 1])]);
        assert_eq!(s, vec![2, 1, 3, 4]);
    }

    #[test]
    fn integer_division_truncates_and_rejects_zero() {
        let out = run(
            "Div",
            14,
            &[],
            vec![i64t(&[4], &[7, -7, 7, -7]), i64t(&[4], &[2, 2, -2, -2])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[3, -3, -3, 3]);
        let err = run("Div", 14, &[], vec![i64t(&[1], &[1]), i64t(&[1], &[0])], 1).unwrap_err();
        assert!(err.to_string().contains("division by zero"), "{err}");
    }

    #[test]
    fn integer_arithmetic_wraps() {
        let out = run(
            "Add",
            14,
            &[],
            vec![i32t(&[1], &[i32::MAX]), i32t(&[1], &[1])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].data(), &TensorData::I32(vec![i32::MIN]));
        let out = run(
            "Mul",
            14,
            &[],
            vec![i64t(&[2], &[3, -4]), i64t(&[], &[5])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[15, -20]);
    }

    #[test]
    fn mod_follows_divisor_sign_unless_fmod() {
        let a = i64t(&[4], &[5, -5, 5, -5]);
        let b = i64t(&[4], &[3, 3, -3, -3]);
        let out = run("Mod", 13, &[], vec![a.clone(), b.clone()], 1).unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[2, 1, -1, -2]);
        let out = run("Mod", 13, &[("fmod", Attr::Int(1))], vec![a, b], 1).unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[2, -2, 2, -2]);
        let (_, v) = run_f32(
            "Mod",
            13,
            &[("fmod", Attr::Int(1))],
            vec![f32t(&[2], &[5.5, -5.5]), f32t(&[], &[2.])],
        );
        assert_eq!(v, vec![1.5, -1.5]);
    }

    #[test]
    fn pow_mixed_types_and_square_fast_path() {
        let (_, v) = run_f32(
            "Pow",
            14,
            &[],
            vec![f32t(&[3], &[-2., 0.5, 3.]), f32t(&[], &[2.])],
        );
        assert_eq!(v, vec![4., 0.25, 9.]);
        let (_, v) = run_f32(
            "Pow",
            14,
            &[],
            vec![f32t(&[2], &[4., 9.]), i64t(&[2], &[2, 3])],
        );
        assert_eq!(v, vec![16., 729.]);
        let (_, v) = run_f32(
            "Pow",
            14,
            &[],
            vec![f32t(&[2], &[4., 9.]), f32t(&[2, 1], &[0.5, -1.])],
        );
        assert_close(&v, &[2., 3., 0.25, 1. / 9.], 1e-7);
        let out = run(
            "Pow",
            14,
            &[],
            vec![i64t(&[3], &[2, -3, 10]), i64t(&[3], &[10, 3, 0])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[1024, -27, 1]);
    }

    #[test]
    fn f16_computes_in_f32() {
        use crate::ir::dtype::{f16_to_f32, f32_to_f16};
        let h = |v: &[f32]| {
            Some(
                Tensor::new(
                    vec![v.len()],
                    TensorData::F16(v.iter().map(|&x| f32_to_f16(x)).collect()),
                )
                .unwrap(),
            )
        };
        let out = run("Add", 14, &[], vec![h(&[1.5, 2.0]), h(&[0.25, -4.0])], 1).unwrap();
        match out[0].data() {
            TensorData::F16(v) => {
                assert_eq!(
                    v.iter().map(|&b| f16_to_f32(b)).collect::<Vec<_>>(),
                    vec![1.75, -2.0]
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mismatches_are_errors() {
        let err = run("Add", 14, &[], vec![iota(&[2, 3]), iota(&[4])], 1).unwrap_err();
        assert!(err.to_string().contains("test_node"), "{err}");
        let err = run("Add", 14, &[], vec![iota(&[2]), i64t(&[2], &[1, 2])], 1).unwrap_err();
        assert!(err.to_string().contains("differ"), "{err}");
    }

    #[test]
    fn infer_symbolic() {
        let t = |d: Vec<Dim>| Some(TypeInfo::new(DType::F32, d));
        let out = infer(
            "Add",
            14,
            &[],
            vec![
                t(vec![sym("b"), sym("s"), Dim::Known(384)]),
                t(vec![Dim::Known(384)]),
            ],
            vec![],
            1,
        )
        .unwrap();
        assert_eq!(
            out[0],
            TypeInfo::new(DType::F32, vec![sym("b"), sym("s"), Dim::Known(384)])
        );
        let out = infer(
            "Mul",
            14,
            &[],
            vec![
                t(vec![sym("b"), Dim::Known(1)]),
                Some(TypeInfo::unknown_shape(DType::F32)),
            ],
            vec![],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, None);
    }

    #[test]
    fn variadic_ops() {
        let a = f32t(&[3], &[1., 5., 3.]);
        let b = f32t(&[2, 1], &[2., 4.]);
        let (s, v) = run_f32("Max", 13, &[], vec![a.clone(), b.clone()]);
        assert_eq!(s, vec![2, 3]);
        assert_eq!(v, vec![2., 5., 3., 4., 5., 4.]);
        let (_, v) = run_f32("Min", 13, &[], vec![a.clone(), b.clone(), f32t(&[], &[0.])]);
        assert_eq!(v, vec![0.; 6]);
        let (_, v) = run_f32("Sum", 13, &[], vec![a.clone()]);
        assert_eq!(v, vec![1., 5., 3.]);
        let (_, v) = run_f32("Mean", 13, &[], vec![a, b]);
        assert_eq!(v, vec![1.5, 3.5, 2.5, 2.5, 4.5, 3.5]);
        let (_, v) = run_f32(
            "Max",
            13,
            &[],
            vec![f32t(&[2], &[f32::NAN, 1.]), f32t(&[2], &[0., 2.])],
        );
        assert!(v[0].is_nan() && v[1] == 2.);
    }
}
