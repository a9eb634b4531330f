//! Ops that keep the data and change only the shape: `Reshape` (5-28; `allowzero` from 14),
//! `Flatten` (1-28), `Squeeze` and `Unsqueeze` (1-28; axes as an attribute before opset 13,
//! as an input from 13).

use super::common::{axes_in, const_ints, dim_product, has_input, input_ints, known_len};
use crate::error::{Error, Result};
use crate::ir::{Dim, Tensor, TypeInfo};
use crate::ops::typed::pooled_copy;
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

/// The shape `spec` describes for an input of shape `input` (0 copies, -1 is inferred).
pub fn reshape_dims(input: &[usize], spec: &[i64], allowzero: bool) -> Result<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(spec.len());
    let mut infer_at = None;
    for (i, &s) in spec.iter().enumerate() {
        match s {
            -1 => {
                if infer_at.replace(i).is_some() {
                    return Err(Error::Shape(format!("shape {spec:?} has more than one -1")));
                }
                out.push(1);
            }
            0 if !allowzero => out.push(*input.get(i).ok_or_else(|| {
                Error::Shape(format!(
                    "shape {spec:?} copies dim {i} of {input:?}, which has no such dim"
                ))
            })?),
            s if s < 0 => return Err(Error::Shape(format!("shape {spec:?} has invalid dim {s}"))),
            s => out.push(
                usize::try_from(s)
                    .map_err(|_| Error::Shape(format!("shape {spec:?} has invalid dim {s}")))?,
            ),
        }
    }
    if allowzero && infer_at.is_some() && spec.contains(&0) {
        return Err(Error::Shape(format!(
            "shape {spec:?} has both 0 and -1 with allowzero=1"
        )));
    }
    let known = out
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Shape(format!("shape {spec:?} overflows")))?;
    if let Some(k) = infer_at {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(Error::Shape(format!(
                "cannot reshape {input:?} ({total} elements) to {spec:?}"
            )));
        }
        out[k] = total / known;
    } else if known != total {
        return Err(Error::Shape(format!(
            "cannot reshape {input:?} ({total} elements) to {spec:?}"
        )));
    }
    Ok(out)
}

/// Symbolic version of [`reshape_dims`]. `-1` resolves when the named dims cancel between
/// input and output, e.g. `[batch, 128, 384] -> [0, -1, 12, 32]` gives `[batch, 128, 12, 32]`.
fn reshape_sym(input: Option<&[Dim]>, spec: &[i64], allowzero: bool) -> Vec<Dim> {
    let mut out: Vec<Dim> = spec
        .iter()
        .enumerate()
        .map(|(i, &s)| match s {
            0 if !allowzero => input
                .and_then(|d| d.get(i))
                .cloned()
                .unwrap_or(Dim::Unknown),
            s if s > 0 => Dim::Known(s as usize),
            0 => Dim::Known(0),
            _ => Dim::Unknown,
        })
        .collect();
    let Some(k) = spec.iter().position(|&s| s == -1) else {
        return out;
    };
    let Some(input) = input else {
        return out;
    };
    let mut in_syms: Vec<&str> = Vec::new();
    let mut in_known = 1usize;
    for d in input {
        match d {
            Dim::Known(n) => in_known = in_known.saturating_mul(*n),
            Dim::Sym(s) => in_syms.push(s),
            Dim::Unknown => return out,
        }
    }
    let mut out_known = 1usize;
    for (i, d) in out.iter().enumerate() {
        if i == k {
            continue;
        }
        match d {
            Dim::Known(n) => out_known = out_known.saturating_mul(*n),
            Dim::Sym(s) => match in_syms.iter().position(|x| x == s) {
                Some(p) => {
                    in_syms.swap_remove(p);
                }
                None => return out,
            },
            Dim::Unknown => return out,
        }
    }
    if out_known == 0 || !in_known.is_multiple_of(out_known) {
        return out;
    }
    let ratio = in_known / out_known;
    out[k] = match in_syms.as_slice() {
        [] => Dim::Known(ratio),
        [s] if ratio == 1 => Dim::Sym(s.to_string()),
        _ => Dim::Unknown,
    };
    out
}

struct ReshapeKernel {
    allowzero: bool,
}

impl ReshapeKernel {
    fn out_shape(&self, x: &Tensor, inputs: &[Option<&Tensor>]) -> Result<Vec<usize>> {
        let spec = required(inputs, 1)?.to_i64_vec()?;
        reshape_dims(x.shape(), &spec, self.allowzero)
    }
}

impl Kernel for ReshapeKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let shape = self.out_shape(x, inputs)?;
        Ok(vec![pooled_copy(x, Some(shape), ctx)?])
    }

    fn reuses_input(&self) -> Option<usize> {
        Some(0)
    }

    fn run_owned(
        &self,
        x: Tensor,
        inputs: &[Option<&Tensor>],
        _: &mut RunCtx,
    ) -> Result<Vec<Tensor>> {
        let shape = self.out_shape(&x, inputs)?;
        Ok(vec![x.reshaped(shape)?])
    }
}

pub fn infer_reshape(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let x = ctx.input_type(0)?;
    let allowzero = ctx.node.attr_int_or("allowzero", 0)? != 0;
    let shape = match const_ints(ctx, 1)? {
        Some(spec) => {
            if let Some(concrete) = x.concrete_shape() {
                let dims = reshape_dims(&concrete, &spec, allowzero)
                    .map_err(|e| node_error(ctx.node, e.to_string()))?;
                Some(dims.into_iter().map(Dim::Known).collect())
            } else {
                Some(reshape_sym(x.shape.as_deref(), &spec, allowzero))
            }
        }
        None => known_len(ctx, 1).map(|n| vec![Dim::Unknown; n]),
    };
    Ok(vec![TypeInfo {
        dtype: x.dtype,
        shape,
    }])
}

pub fn compile_reshape(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(ReshapeKernel {
        allowzero: ctx.node.attr_int_or("allowzero", 0)? != 0,
    }))
}

/// Flatten's split point, which (unlike most axes) may equal the rank.
fn flatten_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if !(0..=r).contains(&a) {
        return Err(Error::Shape(format!(
            "Flatten axis {axis} is out of range for rank {rank}"
        )));
    }
    Ok(a as usize)
}

struct FlattenKernel {
    axis: i64,
}

impl FlattenKernel {
    fn out_shape(&self, x: &Tensor) -> Result<Vec<usize>> {
        let a = flatten_axis(self.axis, x.rank())?;
        Ok(vec![
            x.shape()[..a].iter().product(),
            x.shape()[a..].iter().product(),
        ])
    }
}

impl Kernel for FlattenKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let shape = self.out_shape(x)?;
        Ok(vec![pooled_copy(x, Some(shape), ctx)?])
    }

    fn reuses_input(&self) -> Option<usize> {
        Some(0)
    }

    fn run_owned(&self, x: Tensor, _: &[Option<&Tensor>], _: &mut RunCtx) -> Result<Vec<Tensor>> {
        let shape = self.out_shape(&x)?;
        Ok(vec![x.reshaped(shape)?])
    }
}

pub fn infer_flatten(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let x = ctx.input_type(0)?;
    let axis = ctx.node.attr_int_or("axis", 1)?;
    let shape = match &x.shape {
        Some(dims) => {
            let a =
                flatten_axis(axis, dims.len()).map_err(|e| node_error(ctx.node, e.to_string()))?;
            vec![dim_product(&dims[..a]), dim_product(&dims[a..])]
        }
        None => vec![Dim::Unknown, Dim::Unknown],
    };
    Ok(vec![TypeInfo::new(x.dtype, shape)])
}

pub fn compile_flatten(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(FlattenKernel {
        axis: ctx.node.attr_int_or("axis", 1)?,
    }))
}

/// Where Squeeze/Unsqueeze find their axes: the attribute (opset < 13) or input 1.
fn attr_axes(node: &crate::ir::Node, opset: i64) -> Result<Option<Vec<i64>>> {
    if opset < 13 {
        Ok(node.attr_ints("axes")?.map(<[i64]>::to_vec))
    } else {
        Ok(None)
    }
}

fn squeeze_shape(shape: &[usize], axes: Option<&[i64]>) -> Result<Vec<usize>> {
    match axes {
        // An empty axes list squeezes every unit axis, as no list does (ONNX Runtime).
        None | Some([]) => Ok(shape.iter().copied().filter(|&d| d != 1).collect()),
        Some(axes) => {
            let axes = axes_in(axes, shape.len())?;
            for &a in &axes {
                if shape[a] != 1 {
                    return Err(Error::Shape(format!(
                        "cannot squeeze axis {a} of shape {shape:?}: its size is not 1"
                    )));
                }
            }
            Ok(shape
                .iter()
                .enumerate()
                .filter(|(i, _)| !axes.contains(i))
                .map(|(_, &d)| d)
                .collect())
        }
    }
}

/// Output positions of the inserted axes, sorted, for an input of rank `rank`.
fn unsqueeze_axes(axes: &[i64], rank: usize) -> Result<Vec<usize>> {
    axes_in(axes, rank + axes.len())
}

fn unsqueeze_shape<D: Clone>(shape: &[D], axes: &[usize], one: D) -> Vec<D> {
    let mut src = shape.iter();
    (0..shape.len() + axes.len())
        .map(|i| {
            if axes.contains(&i) {
                one.clone()
            } else {
                src.next().cloned().unwrap_or_else(|| one.clone())
            }
        })
        .collect()
}

struct SqueezeKernel {
    unsqueeze: bool,
    axes: Option<Vec<i64>>,
}

impl SqueezeKernel {
    fn out_shape(&self, x: &Tensor, inputs: &[Option<&Tensor>]) -> Result<Vec<usize>> {
        let axes = match &self.axes {
            Some(a) => Some(a.clone()),
            None => input_ints(inputs, 1)?,
        };
        if self.unsqueeze {
            let axes = axes.ok_or_else(|| Error::Graph("Unsqueeze needs axes".into()))?;
            Ok(unsqueeze_shape(
                x.shape(),
                &unsqueeze_axes(&axes, x.rank())?,
                1,
            ))
        } else {
            squeeze_shape(x.shape(), axes.as_deref())
        }
    }
}

impl Kernel for SqueezeKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let shape = self.out_shape(x, inputs)?;
        Ok(vec![pooled_copy(x, Some(shape), ctx)?])
    }

    fn reuses_input(&self) -> Option<usize> {
        Some(0)
    }

    fn run_owned(
        &self,
        x: Tensor,
        inputs: &[Option<&Tensor>],
        _: &mut RunCtx,
    ) -> Result<Vec<Tensor>> {
        let shape = self.out_shape(&x, inputs)?;
        Ok(vec![x.reshaped(shape)?])
    }
}

pub fn infer_squeeze(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let x = ctx.input_type(0)?;
    let node = ctx.node;
    let unsqueeze = node.op_type == "Unsqueeze";
    let err = |e: Error| node_error(node, e.to_string());
    let axes = match attr_axes(node, ctx.opset)? {
        Some(a) => Some(a),
        None => const_ints(ctx, 1)?,
    };
    // Squeeze with an empty axes list is Squeeze without one.
    let axes = axes.filter(|a| unsqueeze || !a.is_empty());
    let axes_given = axes.is_some() || (ctx.opset >= 13 && has_input(node, 1));
    let shape = match (&x.shape, axes) {
        (Some(dims), Some(axes)) if unsqueeze => {
            let at = unsqueeze_axes(&axes, dims.len()).map_err(err)?;
            Some(unsqueeze_shape(dims, &at, Dim::Known(1)))
        }
        (Some(dims), Some(axes)) => {
            let at = axes_in(&axes, dims.len()).map_err(err)?;
            for &a in &at {
                if let Dim::Known(n) = dims[a] {
                    if n != 1 {
                        return Err(node_error(
                            node,
                            format!("cannot squeeze axis {a}: its size is {n}"),
                        ));
                    }
                }
            }
            Some(
                dims.iter()
                    .enumerate()
                    .filter(|(i, _)| !at.contains(i))
                    .map(|(_, d)| d.clone())
                    .collect(),
            )
        }
        (Some(dims), None) if !unsqueeze && !axes_given => {
            // Squeeze of every 1: only decidable when no dim could secretly be 1.
            if dims.iter().all(|d| matches!(d, Dim::Known(_))) {
                Some(
                    dims.iter()
                        .filter(|d| **d != Dim::Known(1))
                        .cloned()
                        .collect(),
                )
            } else {
                None
            }
        }
        (Some(dims), None) if unsqueeze => {
            known_len(ctx, 1).map(|n| vec![Dim::Unknown; dims.len() + n])
        }
        _ => None,
    };
    Ok(vec![TypeInfo {
        dtype: x.dtype,
        shape,
    }])
}

pub fn compile_squeeze(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let node = ctx.node;
    let unsqueeze = node.op_type == "Unsqueeze";
    let axes = attr_axes(node, ctx.opset)?;
    if unsqueeze && axes.is_none() && (ctx.opset < 13 || !has_input(node, 1)) {
        return Err(node_error(node, "Unsqueeze needs axes"));
    }
    Ok(Box::new(SqueezeKernel { unsqueeze, axes }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Attr, DType};
    use crate::ops::testutil::*;

    #[test]
    fn reshape_rules() {
        assert_eq!(
            reshape_dims(&[2, 3, 4], &[0, -1], false).unwrap(),
            vec![2, 12]
        );
        assert_eq!(reshape_dims(&[2, 3, 4], &[-1], false).unwrap(), vec![24]);
        assert_eq!(reshape_dims(&[2, 0], &[0, 5], true).unwrap(), vec![0, 5]);
        assert!(reshape_dims(&[2, 0], &[0, 5], false).is_err());
        assert!(reshape_dims(&[2, 3], &[4, -1], false).is_err());
        assert!(reshape_dims(&[2, 3], &[-1, -1], false).is_err());
        assert!(reshape_dims(&[2, 3], &[7], false).is_err());
        assert!(reshape_dims(&[2, 3], &[0, 0, 0], false).is_err());
        assert!(reshape_dims(&[0, 3], &[0, -1], true).is_err());
    }

    #[test]
    fn reshape_runs_and_infers() {
        let (s, v) = run_f32(
            "Reshape",
            14,
            &[],
            vec![iota(&[2, 3]), i64t(&[2], &[3, -1])],
        );
        assert_eq!(s, vec![3, 2]);
        assert_eq!(v, (0..6).map(|x| x as f32).collect::<Vec<_>>());
        let x = TypeInfo::new(DType::F32, vec![sym("b"), Dim::Known(128), Dim::Known(384)]);
        let t = |spec: &[i64]| {
            infer(
                "Reshape",
                14,
                &[],
                vec![
                    Some(x.clone()),
                    Some(TypeInfo::known(DType::I64, &[spec.len()])),
                ],
                vec![None, i64t(&[spec.len()], spec)],
                1,
            )
            .unwrap()
            .remove(0)
            .shape
            .unwrap()
        };
        assert_eq!(
            t(&[0, 0, 12, 32]),
            vec![sym("b"), Dim::Known(128), Dim::Known(12), Dim::Known(32)]
        );
        assert_eq!(
            t(&[0, -1, 12, 32]),
            vec![sym("b"), Dim::Known(128), Dim::Known(12), Dim::Known(32)]
        );
        assert_eq!(t(&[-1, 384]), vec![Dim::Unknown, Dim::Known(384)]);
        assert_eq!(
            t(&[0, 128, -1]),
            vec![sym("b"), Dim::Known(128), Dim::Known(384)]
        );
        assert_eq!(
            t(&[-1, 128, 384]),
            vec![sym("b"), Dim::Known(128), Dim::Known(384)]
        );
        // Unknown shape values: rank from the shape tensor's length.
        let out = infer(
            "Reshape",
            14,
            &[],
            vec![Some(x), Some(TypeInfo::known(DType::I64, &[3]))],
            vec![],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, Some(vec![Dim::Unknown; 3]));
    }

    #[test]
    fn flatten_axes() {
        let (s, _) = run_f32("Flatten", 13, &[], vec![iota(&[2, 3, 4])]);
        assert_eq!(s, vec![2, 12]);
        let (s, _) = run_f32(
            "Flatten",
            13,
            &[("axis", Attr::Int(0))],
            vec![iota(&[2, 3, 4])],
        );
        assert_eq!(s, vec![1, 24]);
        let (s, _) = run_f32(
            "Flatten",
            13,
            &[("axis", Attr::Int(3))],
            vec![iota(&[2, 3, 4])],
        );
        assert_eq!(s, vec![24, 1]);
        let (s, _) = run_f32(
            "Flatten",
            13,
            &[("axis", Attr::Int(-1))],
            vec![iota(&[2, 3, 4])],
        );
        assert_eq!(s, vec![6, 4]);
        let x = TypeInfo::new(DType::F32, vec![sym("n"), Dim::Known(3), Dim::Known(4)]);
        let out = infer("Flatten", 13, &[], vec![Some(x)], vec![], 1).unwrap();
        assert_eq!(out[0].shape, Some(vec![sym("n"), Dim::Known(12)]));
    }

    #[test]
    fn squeeze_and_unsqueeze_across_opsets() {
        let x = iota(&[1, 3, 1]);
        let (s, _) = run_f32("Squeeze", 13, &[], vec![x.clone()]);
        assert_eq!(s, vec![3]);
        let (s, _) = run_f32("Squeeze", 13, &[], vec![x.clone(), i64t(&[1], &[-1])]);
        assert_eq!(s, vec![1, 3]);
        // An empty axes list squeezes every unit axis, as ONNX Runtime does.
        let (s, _) = run_f32("Squeeze", 13, &[], vec![x.clone(), i64t(&[0], &[])]);
        assert_eq!(s, vec![3]);
        let (s, _) = run_f32(
            "Squeeze",
            11,
            &[("axes", Attr::Ints(vec![0]))],
            vec![x.clone()],
        );
        assert_eq!(s, vec![3, 1]);
        assert!(run("Squeeze", 13, &[], vec![x.clone(), i64t(&[1], &[1])], 1).is_err());
        let (s, _) = run_f32("Unsqueeze", 13, &[], vec![iota(&[3]), i64t(&[2], &[0, -1])]);
        assert_eq!(s, vec![1, 3, 1]);
        let (s, _) = run_f32(
            "Unsqueeze",
            11,
            &[("axes", Attr::Ints(vec![1]))],
            vec![iota(&[2, 3])],
        );
        assert_eq!(s, vec![2, 1, 3]);
        let (s, _) = run_f32(
            "Unsqueeze",
            13,
            &[],
            vec![f32t(&[], &[5.]), i64t(&[1], &[0])],
        );
        assert_eq!(s, vec![1]);
        assert!(run(
            "Unsqueeze",
            13,
            &[],
            vec![iota(&[3]), i64t(&[2], &[0, 0])],
            1
        )
        .is_err());
        let ty = TypeInfo::new(DType::I64, vec![sym("s")]);
        let out = infer(
            "Unsqueeze",
            13,
            &[],
            vec![Some(ty), None],
            vec![None, i64t(&[1], &[0])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, Some(vec![Dim::Known(1), sym("s")]));
    }
}
