//! Comparisons and logic with broadcasting: `Equal`, `Less`, `Greater` (7-28), `LessOrEqual`,
//! `GreaterOrEqual` (12-28) take any dtype and give bool (f16 compares as f32); `And`, `Or`,
//! `Xor` (7-28) and `Not` (1-28) work on bool; `Where` (9-28) selects between two
//! same-typed operands with a bool condition.

use crate::error::{Error, Result};
use crate::ir::{checked_numel, DType, Tensor, TensorData, TypeInfo};
use crate::ops::broadcast::{binary_into, broadcast_shapes, infer_broadcast, ternary_into};
use crate::ops::typed::{tensor, view, with_any_type, Elem};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmp {
    Eq,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Logic {
    And,
    Or,
    Xor,
}

fn compare(op: Cmp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() != b.dtype() {
        return Err(Error::DType(format!(
            "compared tensors have different types: {} and {}",
            a.dtype(),
            b.dtype()
        )));
    }
    if a.dtype() == DType::F16 {
        // Comparing raw half bits would order negatives backwards and miss -0 == +0.
        return compare(op, &a.to_f32(), &b.to_f32());
    }
    let shape = broadcast_shapes(&[a.shape(), b.shape()])?;
    let mut out = vec![false; checked_numel(&shape, 1)?];
    with_any_type!(a.dtype(), |T| compare_typed::<T>(
        op, a, b, &shape, &mut out
    ))?;
    tensor(shape, out)
}

fn compare_typed<T: Elem + PartialOrd>(
    op: Cmp,
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
    out: &mut [bool],
) -> Result<()> {
    let (x, y) = (view::<T>(a)?, view::<T>(b)?);
    let (sa, sb) = (a.shape(), b.shape());
    match op {
        Cmp::Eq => binary_into(x, sa, y, sb, shape, out, |p: T, q: T| p == q),
        Cmp::Lt => binary_into(x, sa, y, sb, shape, out, |p: T, q: T| p < q),
        Cmp::Gt => binary_into(x, sa, y, sb, shape, out, |p: T, q: T| p > q),
        Cmp::Le => binary_into(x, sa, y, sb, shape, out, |p: T, q: T| p <= q),
        Cmp::Ge => binary_into(x, sa, y, sb, shape, out, |p: T, q: T| p >= q),
    }
    Ok(())
}

fn logic(op: Logic, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (x, y) = (view::<bool>(a)?, view::<bool>(b)?);
    let shape = broadcast_shapes(&[a.shape(), b.shape()])?;
    let mut out = vec![false; checked_numel(&shape, 1)?];
    let (sa, sb) = (a.shape(), b.shape());
    match op {
        Logic::And => binary_into(x, sa, y, sb, &shape, &mut out, |p, q| p & q),
        Logic::Or => binary_into(x, sa, y, sb, &shape, &mut out, |p, q| p | q),
        Logic::Xor => binary_into(x, sa, y, sb, &shape, &mut out, |p, q| p ^ q),
    }
    tensor(shape, out)
}

/// `cond ? x : y`, broadcasting all three.
pub fn select(cond: &Tensor, x: &Tensor, y: &Tensor, ctx: &mut RunCtx) -> Result<Tensor> {
    if x.dtype() != y.dtype() {
        return Err(Error::DType(format!(
            "Where branches have different types: {} and {}",
            x.dtype(),
            y.dtype()
        )));
    }
    let c = view::<bool>(cond)?;
    let shape = broadcast_shapes(&[cond.shape(), x.shape(), y.shape()])?;
    let n = checked_numel(&shape, x.dtype().size_of())?;
    with_any_type!(x.dtype(), |T| {
        let mut out = T::filled(ctx, n);
        ternary_into(
            (c, cond.shape()),
            (view::<T>(x)?, x.shape()),
            (view::<T>(y)?, y.shape()),
            &shape,
            &mut out,
            |c: bool, p: T, q: T| if c { p } else { q },
        );
        tensor(shape, out)
    })
}

enum LogicKernel {
    Cmp(Cmp),
    Logic(Logic),
    Not,
    Where,
}

impl Kernel for LogicKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let a = required(inputs, 0)?;
        let out = match self {
            LogicKernel::Cmp(op) => compare(*op, a, required(inputs, 1)?)?,
            LogicKernel::Logic(op) => logic(*op, a, required(inputs, 1)?)?,
            LogicKernel::Not => {
                let v = view::<bool>(a)?.iter().map(|&x| !x).collect();
                Tensor::new(a.shape().to_vec(), TensorData::Bool(v))?
            }
            LogicKernel::Where => select(a, required(inputs, 1)?, required(inputs, 2)?, ctx)?,
        };
        Ok(vec![out])
    }
}

fn expect_bool(ctx: &InferCtx, i: usize) -> Result<()> {
    let dt = ctx.input_type(i)?.dtype;
    if dt != DType::Bool {
        return Err(node_error(
            ctx.node,
            format!("input {i} must be bool, got {dt}"),
        ));
    }
    Ok(())
}

pub fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let node = ctx.node;
    match node.op_type.as_str() {
        "Not" => {
            expect_bool(ctx, 0)?;
            Ok(vec![ctx.input_type(0)?.clone()])
        }
        "And" | "Or" | "Xor" => {
            expect_bool(ctx, 0)?;
            expect_bool(ctx, 1)?;
            Ok(vec![TypeInfo {
                dtype: DType::Bool,
                shape: infer_broadcast(ctx, &[0, 1])?,
            }])
        }
        "Where" => {
            expect_bool(ctx, 0)?;
            let (x, y) = (ctx.input_type(1)?.dtype, ctx.input_type(2)?.dtype);
            if x != y {
                return Err(node_error(
                    node,
                    format!("branches have different types: {x} and {y}"),
                ));
            }
            Ok(vec![TypeInfo {
                dtype: x,
                shape: infer_broadcast(ctx, &[0, 1, 2])?,
            }])
        }
        _ => {
            let (a, b) = (ctx.input_type(0)?.dtype, ctx.input_type(1)?.dtype);
            if a != b {
                return Err(node_error(node, format!("input types differ: {a} and {b}")));
            }
            Ok(vec![TypeInfo {
                dtype: DType::Bool,
                shape: infer_broadcast(ctx, &[0, 1])?,
            }])
        }
    }
}

pub fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let k = match ctx.node.op_type.as_str() {
        "Equal" => LogicKernel::Cmp(Cmp::Eq),
        "Less" => LogicKernel::Cmp(Cmp::Lt),
        "Greater" => LogicKernel::Cmp(Cmp::Gt),
        "LessOrEqual" => LogicKernel::Cmp(Cmp::Le),
        "GreaterOrEqual" => LogicKernel::Cmp(Cmp::Ge),
        "And" => LogicKernel::Logic(Logic::And),
        "Or" => LogicKernel::Logic(Logic::Or),
        "Xor" => LogicKernel::Logic(Logic::Xor),
        "Not" => LogicKernel::Not,
        "Where" => LogicKernel::Where,
        other => return Err(node_error(ctx.node, format!("{other} is not a logic op"))),
    };
    Ok(Box::new(k))
}

#[cfg(test)]
mod tests {
    use crate::ir::{DType, Dim, Tensor, TensorData, TypeInfo};
    use crate::ops::testutil::*;

    fn bools(shape: &[usize], v: &[bool]) -> Option<Tensor> {
        Some(Tensor::new(shape.to_vec(), TensorData::Bool(v.to_vec())).unwrap())
    }

    fn run_bool(op: &str, inputs: Vec<Option<Tensor>>) -> (Vec<usize>, Vec<bool>) {
        let out = run(op, 16, &[], inputs, 1).unwrap().remove(0);
        match out.data() {
            TensorData::Bool(v) => (out.shape().to_vec(), v.clone()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn comparisons_broadcast() {
        let a = f32t(&[2, 2], &[1., 2., 3., 4.]);
        let b = f32t(&[2], &[2., 3.]);
        assert_eq!(
            run_bool("Equal", vec![a.clone(), b.clone()]).1,
            vec![false, false, false, false]
        );
        assert_eq!(
            run_bool("Less", vec![a.clone(), b.clone()]).1,
            vec![true, true, false, false]
        );
        assert_eq!(
            run_bool("Greater", vec![a.clone(), b.clone()]).1,
            vec![false, false, true, true]
        );
        assert_eq!(
            run_bool("LessOrEqual", vec![a.clone(), f32t(&[], &[2.])]).1,
            vec![true, true, false, false]
        );
        assert_eq!(
            run_bool("GreaterOrEqual", vec![a, f32t(&[2, 1], &[2., 4.])]).1,
            vec![false, true, false, true]
        );
        let (s, v) = run_bool("Equal", vec![i64t(&[3], &[1, 2, 3]), i64t(&[], &[2])]);
        assert_eq!((s, v), (vec![3], vec![false, true, false]));
        let nan = f32t(&[1], &[f32::NAN]);
        assert_eq!(run_bool("Equal", vec![nan.clone(), nan]).1, vec![false]);
    }

    #[test]
    fn logic_ops() {
        let a = bools(&[4], &[false, false, true, true]);
        let b = bools(&[4], &[false, true, false, true]);
        assert_eq!(
            run_bool("And", vec![a.clone(), b.clone()]).1,
            vec![false, false, false, true]
        );
        assert_eq!(
            run_bool("Or", vec![a.clone(), b.clone()]).1,
            vec![false, true, true, true]
        );
        assert_eq!(
            run_bool("Xor", vec![a.clone(), b]).1,
            vec![false, true, true, false]
        );
        assert_eq!(run_bool("Not", vec![a]).1, vec![true, true, false, false]);
        assert!(run("And", 16, &[], vec![iota(&[1]), iota(&[1])], 1).is_err());
    }

    #[test]
    fn where_selects_with_broadcasting() {
        let c = bools(&[2, 1], &[true, false]);
        let (s, v) = run_f32(
            "Where",
            16,
            &[],
            vec![c.clone(), iota(&[3]), f32t(&[], &[-1.])],
        );
        assert_eq!(s, vec![2, 3]);
        assert_eq!(v, vec![0., 1., 2., -1., -1., -1.]);
        let out = run(
            "Where",
            16,
            &[],
            vec![c, i64t(&[1], &[7]), i64t(&[2, 2], &[1, 2, 3, 4])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[7, 7, 3, 4]);
    }

    #[test]
    fn infer_is_bool_and_symbolic() {
        let t = TypeInfo::new(DType::I64, vec![sym("n"), Dim::Known(1)]);
        let out = infer(
            "Equal",
            13,
            &[],
            vec![Some(t.clone()), Some(TypeInfo::known(DType::I64, &[3]))],
            vec![],
            1,
        )
        .unwrap();
        assert_eq!(
            out[0],
            TypeInfo::new(DType::Bool, vec![sym("n"), Dim::Known(3)])
        );
        assert!(infer(
            "Where",
            16,
            &[],
            vec![Some(t.clone()), Some(t.clone()), Some(t)],
            vec![],
            1
        )
        .is_err());
    }
}
