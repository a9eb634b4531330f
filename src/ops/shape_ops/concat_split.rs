//! `Concat` (4-28) and `Split` (2-28: sizes as the `split` attribute before opset 13, as an
//! input from 13; `num_outputs` from 18, where an uneven split makes the last part smaller).

use super::common::{axis_in, const_ints, input_ints, unify};
use crate::error::{Error, Result};
use crate::ir::{checked_numel, Dim, Tensor, TypeInfo};
use crate::ops::typed::{tensor, view, with_any_type, Elem};
use crate::ops::{node_error, CompileCtx, InferCtx, Kernel, RunCtx};

/// Joins tensors along `axis`; all must share dtype, rank and the other dims.
pub fn concat(parts: &[&Tensor], axis: i64, ctx: &mut RunCtx) -> Result<Tensor> {
    let Some(first) = parts.first() else {
        return Err(Error::Graph("Concat needs at least one input".into()));
    };
    let rank = first.rank();
    let a = axis_in(axis, rank)?;
    let mut shape = first.shape().to_vec();
    shape[a] = 0;
    for t in parts {
        let same = t.rank() == rank
            && t.shape()
                .iter()
                .zip(first.shape())
                .enumerate()
                .all(|(i, (x, y))| i == a || x == y);
        if t.dtype() != first.dtype() || !same {
            return Err(Error::Shape(format!(
                "cannot concatenate {} {:?} with {} {:?} on axis {a}",
                first.dtype(),
                first.shape(),
                t.dtype(),
                t.shape()
            )));
        }
        shape[a] += t.shape()[a];
    }
    let n = checked_numel(&shape, first.dtype().size_of())?;
    let outer: usize = shape[..a].iter().product();
    let inner: usize = shape[a + 1..].iter().product();
    with_any_type!(first.dtype(), |T| {
        let srcs = parts
            .iter()
            .map(|t| Ok((view::<T>(t)?, t.shape()[a] * inner)))
            .collect::<Result<Vec<_>>>()?;
        let mut out = T::filled(ctx, n);
        let mut pos = 0;
        for o in 0..outer {
            for &(src, block) in &srcs {
                out[pos..pos + block].copy_from_slice(&src[o * block..(o + 1) * block]);
                pos += block;
            }
        }
        tensor(shape, out)
    })
}

struct ConcatKernel {
    axis: i64,
}

impl Kernel for ConcatKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let parts: Vec<&Tensor> = inputs.iter().flatten().copied().collect();
        Ok(vec![concat(&parts, self.axis, ctx)?])
    }
}

fn concat_axis(node: &crate::ir::Node) -> Result<i64> {
    node.attr_int("axis")?
        .ok_or_else(|| node_error(node, "missing attribute 'axis'"))
}

pub fn infer_concat(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let node = ctx.node;
    let axis = concat_axis(node)?;
    let present: Vec<usize> = (0..node.inputs.len())
        .filter(|&i| node.input(i).is_some())
        .collect();
    let Some(&first) = present.first() else {
        return Err(node_error(node, "needs at least one input"));
    };
    let dtype = ctx.input_type(first)?.dtype;
    let mut shape: Option<Vec<Dim>> = None;
    let mut axis_dims: Vec<Dim> = Vec::new();
    let mut rank_known = true;
    for &i in &present {
        let t = ctx.input_type(i)?;
        if t.dtype != dtype {
            return Err(node_error(
                node,
                format!("input types differ: {dtype} and {}", t.dtype),
            ));
        }
        let Some(dims) = &t.shape else {
            rank_known = false;
            continue;
        };
        let a = axis_in(axis, dims.len()).map_err(|e| node_error(node, e.to_string()))?;
        axis_dims.push(dims[a].clone());
        shape = Some(match shape {
            None => dims.clone(),
            Some(prev) => {
                if prev.len() != dims.len() {
                    return Err(node_error(
                        node,
                        format!("inputs have ranks {} and {}", prev.len(), dims.len()),
                    ));
                }
                prev.iter()
                    .zip(dims)
                    .enumerate()
                    .map(|(k, (p, d))| {
                        if k == a {
                            Ok(Dim::Unknown)
                        } else {
                            unify(p, d).map_err(|m| node_error(node, m))
                        }
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        });
    }
    let shape = shape.map(|mut dims| {
        // Only the first input's rank fixes the axis index; all ranks are equal by now.
        if let Ok(a) = axis_in(axis, dims.len()) {
            dims[a] = if rank_known {
                axis_dims
                    .iter()
                    .try_fold(0usize, |acc, d| d.known().map(|n| acc + n))
                    .map_or(Dim::Unknown, Dim::Known)
            } else {
                Dim::Unknown
            };
        }
        dims
    });
    Ok(vec![TypeInfo { dtype, shape }])
}

pub fn compile_concat(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(ConcatKernel {
        axis: concat_axis(ctx.node)?,
    }))
}

/// The part sizes along a dim of length `dim`: explicit `split`, or `parts` equal parts
/// (the last one smaller when `uneven_ok`).
fn split_sizes(
    dim: usize,
    split: Option<&[i64]>,
    parts: usize,
    uneven_ok: bool,
) -> Result<Vec<usize>> {
    if let Some(split) = split {
        let sizes = split
            .iter()
            .map(|&s| usize::try_from(s))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| Error::Shape(format!("split sizes {split:?} must not be negative")))?;
        if sizes.iter().sum::<usize>() != dim || sizes.len() != parts {
            return Err(Error::Shape(format!(
                "split sizes {split:?} do not cut a dim of {dim} into {parts} outputs"
            )));
        }
        return Ok(sizes);
    }
    if parts == 0 {
        return Err(Error::Shape("Split needs at least one output".into()));
    }
    if dim.is_multiple_of(parts) {
        return Ok(vec![dim / parts; parts]);
    }
    let chunk = dim.div_ceil(parts);
    if !uneven_ok || chunk * (parts - 1) > dim {
        return Err(Error::Shape(format!(
            "a dim of {dim} cannot be split into {parts} equal parts"
        )));
    }
    let mut sizes = vec![chunk; parts - 1];
    sizes.push(dim - chunk * (parts - 1));
    Ok(sizes)
}

struct SplitKernel {
    axis: i64,
    split: Option<Vec<i64>>,
    parts: usize,
    uneven_ok: bool,
}

impl SplitKernel {
    fn split<T: Elem>(
        &self,
        x: &Tensor,
        ctx: &mut RunCtx,
        split: Option<&[i64]>,
    ) -> Result<Vec<Tensor>> {
        let a = axis_in(self.axis, x.rank())?;
        let sizes = split_sizes(x.shape()[a], split, self.parts, self.uneven_ok)?;
        let src = view::<T>(x)?;
        let outer: usize = x.shape()[..a].iter().product();
        let inner: usize = x.shape()[a + 1..].iter().product();
        let row = x.shape()[a] * inner;
        let mut start = 0;
        let mut outs = Vec::with_capacity(sizes.len());
        for &s in &sizes {
            let block = s * inner;
            let mut out = T::filled(ctx, outer * block);
            for o in 0..outer {
                let from = o * row + start;
                out[o * block..(o + 1) * block].copy_from_slice(&src[from..from + block]);
            }
            let mut shape = x.shape().to_vec();
            shape[a] = s;
            outs.push(tensor(shape, out)?);
            start += block;
        }
        Ok(outs)
    }
}

impl Kernel for SplitKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = crate::ops::required(inputs, 0)?;
        let split = match &self.split {
            Some(s) => Some(s.clone()),
            None => input_ints(inputs, 1)?,
        };
        with_any_type!(x.dtype(), |T| self.split::<T>(x, ctx, split.as_deref()))
    }
}

/// Split's attributes: the axis, attribute sizes (opset < 13), and whether an uneven
/// `num_outputs` split is allowed (opset >= 18).
fn split_attrs(node: &crate::ir::Node, opset: i64) -> Result<(i64, Option<Vec<i64>>, bool)> {
    let axis = node.attr_int_or("axis", 0)?;
    let split = if opset < 13 {
        node.attr_ints("split")?.map(<[i64]>::to_vec)
    } else {
        None
    };
    let uneven = opset >= 18 && node.attr_int("num_outputs")?.is_some();
    Ok((axis, split, uneven))
}

pub fn infer_split(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let node = ctx.node;
    let x = ctx.input_type(0)?;
    let (axis, split, uneven) = split_attrs(node, ctx.opset)?;
    let given = split.is_some() || (ctx.opset >= 13 && node.input(1).is_some());
    let split = match split {
        Some(s) => Some(s),
        None if ctx.opset >= 13 => const_ints(ctx, 1)?,
        None => None,
    };
    let parts = node.outputs.len();
    let Some(dims) = &x.shape else {
        return Ok(vec![TypeInfo::unknown_shape(x.dtype); parts]);
    };
    let a = axis_in(axis, dims.len()).map_err(|e| node_error(node, e.to_string()))?;
    let checked = |d: usize, s: Option<&[i64]>| -> Result<Vec<Dim>> {
        Ok(split_sizes(d, s, parts, uneven)
            .map_err(|e| node_error(node, e.to_string()))?
            .into_iter()
            .map(Dim::Known)
            .collect())
    };
    let sizes: Vec<Dim> = match (&split, &dims[a]) {
        (Some(s), Dim::Known(d)) => checked(*d, Some(s))?,
        (Some(s), _) => s
            .iter()
            .map(|&v| usize::try_from(v).map_or(Dim::Unknown, Dim::Known))
            .collect(),
        (None, Dim::Known(d)) if !given => checked(*d, None)?,
        _ => vec![Dim::Unknown; parts],
    };
    Ok(sizes
        .into_iter()
        .map(|s| {
            let mut d = dims.clone();
            d[a] = s;
            TypeInfo::new(x.dtype, d)
        })
        .collect())
}

pub fn compile_split(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let (axis, split, uneven_ok) = split_attrs(ctx.node, ctx.opset)?;
    Ok(Box::new(SplitKernel {
        axis,
        split,
        parts: ctx.node.outputs.len(),
        uneven_ok,
    }))
}

#[cfg(test)]
mod tests {
    use crate::ir::{Attr, DType, Dim, TypeInfo};
    use crate::ops::testutil::*;

    #[test]
    fn concat_axes() {
        let (s, v) = run_f32(
            "Concat",
            13,
            &[("axis", Attr::Int(1))],
            vec![iota(&[2, 2]), f32t(&[2, 1], &[9., 8.])],
        );
        assert_eq!(s, vec![2, 3]);
        assert_eq!(v, vec![0., 1., 9., 2., 3., 8.]);
        let (s, v) = run_f32(
            "Concat",
            13,
            &[("axis", Attr::Int(-2))],
            vec![iota(&[1, 2]), iota(&[0, 2]), iota(&[1, 2])],
        );
        assert_eq!(s, vec![2, 2]);
        assert_eq!(v, vec![0., 1., 0., 1.]);
        let out = run(
            "Concat",
            13,
            &[("axis", Attr::Int(0))],
            vec![i64t(&[1], &[1]), i64t(&[2], &[-1, 4])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[1, -1, 4]);
        let err = run(
            "Concat",
            13,
            &[("axis", Attr::Int(0))],
            vec![iota(&[1, 2]), iota(&[1, 3])],
            1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("test_node"), "{err}");
    }

    #[test]
    fn concat_infers_symbolic_dims() {
        let a = TypeInfo::new(DType::F32, vec![sym("b"), Dim::Known(2)]);
        let b = TypeInfo::new(DType::F32, vec![Dim::Unknown, Dim::Known(3)]);
        let out = infer(
            "Concat",
            13,
            &[("axis", Attr::Int(1))],
            vec![Some(a.clone()), Some(b)],
            vec![],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, Some(vec![sym("b"), Dim::Known(5)]));
        let c = TypeInfo::new(DType::F32, vec![Dim::Known(1), sym("s")]);
        let out = infer(
            "Concat",
            13,
            &[("axis", Attr::Int(1))],
            vec![Some(a), Some(c)],
            vec![],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, Some(vec![Dim::Known(1), Dim::Unknown]));
    }

    #[test]
    fn split_variants() {
        let x = iota(&[2, 6]);
        let out = run("Split", 13, &[("axis", Attr::Int(1))], vec![x.clone()], 3).unwrap();
        assert_eq!(out[1].shape(), &[2, 2]);
        assert_eq!(out[1].as_f32().unwrap(), &[2., 3., 8., 9.]);
        let out = run(
            "Split",
            13,
            &[("axis", Attr::Int(-1))],
            vec![x.clone(), i64t(&[2], &[1, 5])],
            2,
        )
        .unwrap();
        assert_eq!(out[0].as_f32().unwrap(), &[0., 6.]);
        assert_eq!(out[1].shape(), &[2, 5]);
        let out = run(
            "Split",
            11,
            &[("axis", Attr::Int(1)), ("split", Attr::Ints(vec![4, 2]))],
            vec![x.clone()],
            2,
        )
        .unwrap();
        assert_eq!(out[1].as_f32().unwrap(), &[4., 5., 10., 11.]);
        let out = run(
            "Split",
            18,
            &[("axis", Attr::Int(1)), ("num_outputs", Attr::Int(4))],
            vec![x.clone()],
            4,
        )
        .unwrap();
        assert_eq!(
            out.iter().map(|t| t.shape()[1]).collect::<Vec<_>>(),
            vec![2, 2, 2, 0]
        );
        assert!(run("Split", 13, &[("axis", Attr::Int(1))], vec![x.clone()], 4).is_err());
        assert!(run(
            "Split",
            13,
            &[("axis", Attr::Int(1))],
            vec![x, i64t(&[2], &[1, 2])],
            2
        )
        .is_err());
    }
}
