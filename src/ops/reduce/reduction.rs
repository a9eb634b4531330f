//! `ReduceSum`, `ReduceMean`, `ReduceMax`, `ReduceMin`, `ReduceProd`, `ReduceL1`, `ReduceL2`,
//! `ReduceSumSquare`, `ReduceLogSum`, `ReduceLogSumExp` (1-28; bool Max/Min as from 20).
//! Axes are an attribute before opset 18 (13 for ReduceSum) and an optional input after,
//! where `noop_with_empty_axes` turns "no axes" from "all axes" into the identity (composite
//! reductions still apply their pointwise part, so ReduceSumSquare of no axes squares).
//!
//! One pass over the input accumulates into the output through the broadcast plan: the
//! output, seen with its reduced dims kept as 1, is an operand with stride 0 along them.
//! Runs along a reduced innermost dim fold into one accumulator (eight lanes at a time, which
//! vectorises and sums more accurately); runs along a kept innermost dim update a row of
//! accumulators elementwise.

use crate::error::{Error, Result};
use crate::ir::{DType, Dim, Tensor, TypeInfo};
use crate::ops::broadcast::Plan;
use crate::ops::elementwise::{arith, cast, Arith};
use crate::ops::typed::{
    fold_lanes, max_nan, min_nan, run_widening_f16, tensor, view, with_float_type, with_num_type,
    Float, Num,
};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    SumSquare,
    LogSum,
    LogSumExp,
}

impl Reduce {
    fn float_only(self) -> bool {
        matches!(self, Reduce::L2 | Reduce::LogSum | Reduce::LogSumExp)
    }
}

/// Folds `x` (shape `in_shape`) into accumulators of shape `keep_shape` (the input shape
/// with reduced dims set to 1). `step` adds one element to an accumulator, `combine` merges
/// two accumulators.
fn reduce_core<T: Copy>(
    x: &[T],
    in_shape: &[usize],
    keep_shape: &[usize],
    init: T,
    step: impl Fn(T, T) -> T,
    combine: impl Fn(T, T) -> T,
) -> Vec<T> {
    let mut acc = vec![init; keep_shape.iter().product()];
    let plan = Plan::new(in_shape, [keep_shape]);
    let [s] = plan.inner_strides();
    plan.for_each_run(0, x.len(), |pos, len, [ao]| {
        let src = &x[pos..pos + len];
        if s == 1 {
            for (a, &v) in acc[ao..ao + len].iter_mut().zip(src) {
                *a = step(*a, v);
            }
        } else {
            acc[ao] = combine(acc[ao], fold_lanes(src, init, &step, &combine));
        }
    });
    acc
}

/// Reductions every numeric type supports.
fn reduce_num<T: Num>(
    op: Reduce,
    x: &[T],
    shape: &[usize],
    keep: &[usize],
    count: usize,
) -> Vec<T> {
    let add = |a: T, b: T| a.add(b);
    match op {
        Reduce::Sum => reduce_core(x, shape, keep, T::ZERO, add, add),
        Reduce::Mean => {
            let mut acc = reduce_core(x, shape, keep, T::ZERO, add, add);
            let n = T::from_i64(count as i64);
            // Integer means divide with truncation; an empty float mean is 0/0 = NaN.
            acc.iter_mut().for_each(|a| {
                *a = if T::IS_FLOAT || count > 0 {
                    a.div(n)
                } else {
                    T::ZERO
                }
            });
            acc
        }
        Reduce::Max => reduce_core(x, shape, keep, T::LOWEST, max_nan, max_nan),
        Reduce::Min => reduce_core(x, shape, keep, T::HIGHEST, min_nan, min_nan),
        Reduce::Prod => {
            let mul = |a: T, b: T| a.mul(b);
            reduce_core(x, shape, keep, T::ONE, mul, mul)
        }
        Reduce::L1 => reduce_core(x, shape, keep, T::ZERO, |a, v| a.add(v.abs()), add),
        Reduce::SumSquare => reduce_core(x, shape, keep, T::ZERO, |a, v| a.add(v.mul(v)), add),
        // Float-only kinds are routed to reduce_float.
        Reduce::L2 | Reduce::LogSum | Reduce::LogSumExp => {
            reduce_core(x, shape, keep, T::ZERO, add, add)
        }
    }
}

fn reduce_float<T: Float>(
    op: Reduce,
    x: &Tensor,
    keep: &[usize],
    count: usize,
    ctx: &mut RunCtx,
) -> Result<Vec<T>> {
    let shape = x.shape();
    let v = view::<T>(x)?;
    let add = |a: T, b: T| a.add(b);
    Ok(match op {
        Reduce::L2 => {
            let mut acc = reduce_core(v, shape, keep, T::ZERO, |a, v| a.add(v.mul(v)), add);
            acc.iter_mut().for_each(|a| *a = a.sqrt());
            acc
        }
        Reduce::LogSum => {
            let mut acc = reduce_core(v, shape, keep, T::ZERO, add, add);
            acc.iter_mut().for_each(|a| *a = a.ln());
            acc
        }
        Reduce::LogSumExp => {
            // Shift by the maximum so exp cannot overflow; infinite maxima shift by 0.
            let mut max = reduce_core(v, shape, keep, T::LOWEST, max_nan, max_nan);
            max.iter_mut().for_each(|m| {
                if m.sub(*m) != T::ZERO {
                    *m = T::ZERO;
                }
            });
            let m = tensor(keep.to_vec(), max.clone())?;
            let shifted = arith(Arith::Sub, x, &m, ctx)?;
            let e: Vec<T> = view::<T>(&shifted)?.iter().map(|&s| s.exp()).collect();
            ctx.release(shifted);
            let sum = reduce_core(&e, shape, keep, T::ZERO, add, add);
            sum.iter().zip(&max).map(|(&s, &m)| s.ln().add(m)).collect()
        }
        _ => reduce_num(op, v, shape, keep, count),
    })
}

/// Reduces `x` over `axes` (already normalised; empty means none). Returns the result with
/// reduced dims kept as 1.
pub fn reduce(op: Reduce, x: &Tensor, axes: &[usize], ctx: &mut RunCtx) -> Result<Tensor> {
    let mut keep = x.shape().to_vec();
    for &a in axes {
        keep[a] = 1;
    }
    let count: usize = axes.iter().map(|&a| x.shape()[a]).product();
    let dt = x.dtype();
    if dt == DType::Bool && matches!(op, Reduce::Max | Reduce::Min) {
        // Max is "any" and Min is "all", with false < true.
        let bytes = cast(x, DType::U8, ctx)?;
        let reduced = reduce(op, &bytes, axes, ctx)?;
        return cast(&reduced, DType::Bool, ctx);
    }
    let unsupported = || Error::DType(format!("{op:?} does not support {dt}"));
    if op.float_only() || dt.is_float() {
        with_float_type!(
            dt,
            |T| tensor(keep.clone(), reduce_float::<T>(op, x, &keep, count, ctx)?),
            else Err(unsupported())
        )
    } else {
        with_num_type!(
            dt,
            |T| tensor(
                keep.clone(),
                reduce_num::<T>(op, view::<T>(x)?, x.shape(), &keep, count)
            ),
            else Err(unsupported())
        )
    }
}

/// Axes settings of one node.
struct AxesSpec {
    /// From the attribute (older opsets); `None` means read input 1 (if any).
    attr: Option<Vec<i64>>,
    from_input: bool,
    keepdims: bool,
    noop_empty: bool,
}

fn axes_spec(ctx_node: &crate::ir::Node, opset: i64) -> Result<AxesSpec> {
    let input_since = if ctx_node.op_type == "ReduceSum" {
        13
    } else {
        18
    };
    let from_input = opset >= input_since;
    Ok(AxesSpec {
        attr: if from_input {
            None
        } else {
            ctx_node.attr_ints("axes")?.map(<[i64]>::to_vec)
        },
        from_input,
        keepdims: ctx_node.attr_int_or("keepdims", 1)? != 0,
        noop_empty: from_input && ctx_node.attr_int_or("noop_with_empty_axes", 0)? != 0,
    })
}

impl AxesSpec {
    /// The normalised axes to reduce for rank `rank`, given the axes values (if any).
    fn resolve(&self, given: Option<&[i64]>, rank: usize) -> Result<Vec<usize>> {
        let given = self.attr.as_deref().or(given);
        match given {
            Some(a) if !a.is_empty() => {
                let mut axes = Vec::with_capacity(a.len());
                for &v in a {
                    let n = super::axis_index(v, rank)?;
                    if !axes.contains(&n) {
                        axes.push(n);
                    }
                }
                axes.sort_unstable();
                Ok(axes)
            }
            _ if self.noop_empty => Ok(Vec::new()),
            _ => Ok((0..rank).collect()),
        }
    }
}

struct ReduceKernel {
    op: Reduce,
    spec: AxesSpec,
}

impl ReduceKernel {
    fn eval(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let given = if self.spec.from_input {
            super::input_axes(inputs, 1)?
        } else {
            None
        };
        let axes = self.spec.resolve(given.as_deref(), x.rank())?;
        let out = reduce(self.op, x, &axes, ctx)?;
        if self.spec.keepdims {
            return Ok(vec![out]);
        }
        let shape: Vec<usize> = x
            .shape()
            .iter()
            .enumerate()
            .filter(|(i, _)| !axes.contains(i))
            .map(|(_, &d)| d)
            .collect();
        Ok(vec![out.reshaped(shape)?])
    }
}

impl Kernel for ReduceKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        run_widening_f16(inputs, |inputs| self.eval(inputs, ctx))
    }
}

pub fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let node = ctx.node;
    let x = ctx.input_type(0)?;
    let bool_ok = matches!(node.op_type.as_str(), "ReduceMax" | "ReduceMin");
    if x.dtype == DType::Bool && !bool_ok {
        return Err(node_error(node, "bool inputs are not supported"));
    }
    let spec = axes_spec(node, ctx.opset)?;
    let given = if spec.from_input && node.input(1).is_some() {
        match ctx.constant(1) {
            Some(t) => Some(t.to_i64_vec()?),
            None => {
                // Axes only known at run time.
                let shape = match (&x.shape, spec.keepdims) {
                    (Some(d), true) => Some(vec![Dim::Unknown; d.len()]),
                    _ => None,
                };
                return Ok(vec![TypeInfo {
                    dtype: x.dtype,
                    shape,
                }]);
            }
        }
    } else {
        None
    };
    let Some(dims) = &x.shape else {
        return Ok(vec![TypeInfo::unknown_shape(x.dtype)]);
    };
    let axes = spec
        .resolve(given.as_deref(), dims.len())
        .map_err(|e| node_error(node, e.to_string()))?;
    let shape = dims
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match (axes.contains(&i), spec.keepdims) {
            (false, _) => Some(d.clone()),
            (true, true) => Some(Dim::Known(1)),
            (true, false) => None,
        })
        .collect();
    Ok(vec![TypeInfo::new(x.dtype, shape)])
}

pub fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let node = ctx.node;
    let op = match node.op_type.as_str() {
        "ReduceSum" => Reduce::Sum,
        "ReduceMean" => Reduce::Mean,
        "ReduceMax" => Reduce::Max,
        "ReduceMin" => Reduce::Min,
        "ReduceProd" => Reduce::Prod,
        "ReduceL1" => Reduce::L1,
        "ReduceL2" => Reduce::L2,
        "ReduceSumSquare" => Reduce::SumSquare,
        "ReduceLogSum" => Reduce::LogSum,
        "ReduceLogSumExp" => Reduce::LogSumExp,
        other => return Err(node_error(node, format!("{other} is not a reduction"))),
    };
    Ok(Box::new(ReduceKernel {
        op,
        spec: axes_spec(node, ctx.opset)?,
    }))
}

#[cfg(test)]
mod tests {
    use crate::ir::{Attr, DType, Dim, TypeInfo};
    use crate::ops::testutil::*;

    fn red(
        op: &str,
        opset: i64,
        attrs: &[(&str, Attr)],
        shape: &[usize],
        axes: Option<&[i64]>,
    ) -> (Vec<usize>, Vec<f32>) {
        let mut inputs = vec![iota(shape)];
        if let Some(a) = axes {
            inputs.push(i64t(&[a.len()], a));
        }
        run_f32(op, opset, attrs, inputs)
    }

    #[test]
    fn sum_and_mean_over_axes() {
        // iota [2,3,4]: sum over axis 1 -> [[12,15,18,21],[48,51,54,57]]
        let (s, v) = red("ReduceSum", 13, &[], &[2, 3, 4], Some(&[1]));
        assert_eq!(s, vec![2, 1, 4]);
        assert_eq!(v, vec![12., 15., 18., 21., 48., 51., 54., 57.]);
        let (s, v) = red(
            "ReduceMean",
            13,
            &[("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(0))],
            &[2, 3, 4],
            None,
        );
        assert_eq!(s, vec![2, 3]);
        assert_eq!(v, vec![1.5, 5.5, 9.5, 13.5, 17.5, 21.5]);
        let (s, v) = red("ReduceSum", 11, &[], &[2, 3], None);
        assert_eq!((s, v), (vec![1, 1], vec![15.]));
        let (s, v) = red(
            "ReduceMean",
            18,
            &[("keepdims", Attr::Int(0))],
            &[2, 3],
            Some(&[0, -1]),
        );
        assert_eq!((s, v), (vec![], vec![2.5]));
        // Long rows take the eight-lane path.
        let (_, v) = red("ReduceSum", 13, &[], &[2, 100], Some(&[1]));
        assert_eq!(v, vec![4950., 14950.]);
    }

    #[test]
    fn noop_with_empty_axes_is_identity_plus_pointwise() {
        let attrs = [("noop_with_empty_axes", Attr::Int(1))];
        let (s, v) = red("ReduceSum", 13, &attrs, &[2, 2], None);
        assert_eq!((s, v), (vec![2, 2], vec![0., 1., 2., 3.]));
        let (_, v) = red("ReduceSumSquare", 18, &attrs, &[2, 2], Some(&[]));
        assert_eq!(v, vec![0., 1., 4., 9.]);
        let (s, v) = red("ReduceMax", 18, &[], &[2, 2], Some(&[]));
        assert_eq!((s, v), (vec![1, 1], vec![3.]));
    }

    #[test]
    fn every_kind_on_one_row() {
        let x = f32t(&[4], &[1., -2., 3., -4.]);
        let one = |op: &str| run_f32(op, 13, &[("keepdims", Attr::Int(0))], vec![x.clone()]).1[0];
        assert_eq!(one("ReduceMax"), 3.);
        assert_eq!(one("ReduceMin"), -4.);
        assert_eq!(one("ReduceProd"), 24.);
        assert_eq!(one("ReduceL1"), 10.);
        assert_eq!(one("ReduceSumSquare"), 30.);
        assert_close(&[one("ReduceL2")], &[30f32.sqrt()], 1e-7);
        let y = f32t(&[3], &[1., 2., 3.]);
        let lse = run_f32("ReduceLogSumExp", 13, &[], vec![y.clone()]).1[0];
        assert_close(&[lse], &[(1f32.exp() + 2f32.exp() + 3f32.exp()).ln()], 1e-6);
        let big = run_f32(
            "ReduceLogSumExp",
            13,
            &[],
            vec![f32t(&[2], &[1000., 1000.])],
        )
        .1[0];
        assert_close(&[big], &[1000. + std::f32::consts::LN_2], 1e-6);
        let ls = run_f32("ReduceLogSum", 13, &[], vec![y]).1[0];
        assert_close(&[ls], &[6f32.ln()], 1e-7);
    }

    #[test]
    fn empty_reductions_use_identities() {
        let (s, v) = red("ReduceSum", 13, &[], &[2, 0], Some(&[1]));
        assert_eq!((s, v), (vec![2, 1], vec![0., 0.]));
        let (_, v) = red(
            "ReduceMax",
            13,
            &[("axes", Attr::Ints(vec![1]))],
            &[2, 0],
            None,
        );
        assert_eq!(v, vec![f32::NEG_INFINITY; 2]);
        let (_, v) = red(
            "ReduceProd",
            13,
            &[("axes", Attr::Ints(vec![1]))],
            &[1, 0],
            None,
        );
        assert_eq!(v, vec![1.]);
    }

    #[test]
    fn integer_reductions() {
        let out = run(
            "ReduceSum",
            13,
            &[("keepdims", Attr::Int(0))],
            vec![i64t(&[2, 2], &[1, 2, 3, 4]), i64t(&[1], &[0])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[4, 6]);
        let out = run("ReduceMax", 13, &[], vec![i64t(&[3], &[-5, 9, 2])], 1).unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[9]);
        assert!(run("ReduceL2", 13, &[], vec![i64t(&[1], &[3])], 1).is_err());
    }

    #[test]
    fn bool_max_is_any_and_min_is_all() {
        use crate::ir::{Tensor, TensorData};
        let b = Some(
            Tensor::new(
                vec![2, 2],
                TensorData::Bool(vec![true, false, false, false]),
            )
            .unwrap(),
        );
        let out = run(
            "ReduceMax",
            20,
            &[("keepdims", Attr::Int(0))],
            vec![b.clone(), i64t(&[1], &[1])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].data(), &TensorData::Bool(vec![true, false]));
        let out = run(
            "ReduceMin",
            20,
            &[("keepdims", Attr::Int(0))],
            vec![b, None],
            1,
        )
        .unwrap();
        assert_eq!(out[0].data(), &TensorData::Bool(vec![false]));
    }

    #[test]
    fn infer_keeps_symbolic_dims() {
        let x = TypeInfo::new(DType::F32, vec![sym("b"), sym("s"), Dim::Known(384)]);
        let out = infer(
            "ReduceMean",
            14,
            &[("axes", Attr::Ints(vec![-1]))],
            vec![Some(x.clone())],
            vec![],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, Some(vec![sym("b"), sym("s"), Dim::Known(1)]));
        let out = infer(
            "ReduceSum",
            13,
            &[],
            vec![Some(x.clone()), Some(TypeInfo::known(DType::I64, &[1]))],
            vec![],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, Some(vec![Dim::Unknown; 3]));
        let out = infer(
            "ReduceSum",
            13,
            &[("keepdims", Attr::Int(0))],
            vec![Some(x), None],
            vec![None, i64t(&[1], &[1])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, Some(vec![sym("b"), Dim::Known(384)]));
    }
}
