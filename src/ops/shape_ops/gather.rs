//! `Gather` (1-28): picks slices along `axis` by (possibly negative) indices; embedding
//! lookups and `Shape -> Gather` dim extraction are both this op. `GatherElements` (11-28):
//! picks single elements, the index replacing the coordinate along `axis`. Out-of-range
//! indices are errors, not panics.

use super::common::axis_in;
use crate::error::{Error, Result};
use crate::ir::{checked_numel, Dim, Tensor, TypeInfo};
use crate::ops::typed::{tensor, view, with_any_type, Elem};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

/// `data` gathered along `axis` at `indices`; the output shape is
/// `data.shape[..axis] ++ indices.shape ++ data.shape[axis+1..]`.
pub fn gather(data: &Tensor, indices: &Tensor, axis: i64, ctx: &mut RunCtx) -> Result<Tensor> {
    let a = axis_in(axis, data.rank())?;
    let dim = data.shape()[a];
    let idx = indices
        .to_i64_vec()?
        .into_iter()
        .map(|i| {
            let j = if i < 0 { i + dim as i64 } else { i };
            usize::try_from(j).ok().filter(|&j| j < dim).ok_or_else(|| {
                Error::Shape(format!(
                    "index {i} is out of range for axis {a} of size {dim}"
                ))
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    let mut shape = data.shape()[..a].to_vec();
    shape.extend_from_slice(indices.shape());
    shape.extend_from_slice(&data.shape()[a + 1..]);
    let outer: usize = data.shape()[..a].iter().product();
    let inner: usize = data.shape()[a + 1..].iter().product();
    let n = checked_numel(&shape, data.dtype().size_of())?;
    with_any_type!(data.dtype(), |T| {
        let src = view::<T>(data)?;
        let mut out = T::filled(ctx, n);
        let mut pos = 0;
        for o in 0..outer {
            for &i in &idx {
                let from = (o * dim + i) * inner;
                out[pos..pos + inner].copy_from_slice(&src[from..from + inner]);
                pos += inner;
            }
        }
        tensor(shape, out)
    })
}

/// `out[i] = data[i with coordinate axis replaced by indices[i]]`; the output has the
/// indices' shape, which may be smaller than `data` along every dim.
pub fn gather_elements(
    data: &Tensor,
    indices: &Tensor,
    axis: i64,
    ctx: &mut RunCtx,
) -> Result<Tensor> {
    let rank = data.rank();
    let a = axis_in(axis, rank)?;
    let ishape = indices.shape();
    if ishape.len() != rank {
        return Err(Error::Shape(format!(
            "indices of shape {ishape:?} must have the rank of data {:?}",
            data.shape()
        )));
    }
    for (k, (&i, &d)) in ishape.iter().zip(data.shape()).enumerate() {
        if k != a && i > d {
            return Err(Error::Shape(format!(
                "indices {ishape:?} exceed data {:?} along axis {k}",
                data.shape()
            )));
        }
    }
    let dim = data.shape()[a] as i64;
    let strides = super::strided::dense_strides(data.shape());
    let idx = indices.to_i64_vec()?;
    let mut offsets = Vec::with_capacity(idx.len());
    let mut pos = vec![0usize; rank];
    for &i in &idx {
        let j = if i < 0 { i + dim } else { i };
        if !(0..dim).contains(&j) {
            return Err(Error::Shape(format!(
                "index {i} is out of range for axis {a} of size {dim}"
            )));
        }
        let off: isize = pos
            .iter()
            .zip(&strides)
            .enumerate()
            .map(|(k, (&p, &s))| {
                if k == a {
                    j as isize * s
                } else {
                    p as isize * s
                }
            })
            .sum();
        offsets.push(off as usize);
        for k in (0..rank).rev() {
            pos[k] += 1;
            if pos[k] < ishape[k] {
                break;
            }
            pos[k] = 0;
        }
    }
    with_any_type!(data.dtype(), |T| {
        let src = view::<T>(data)?;
        let mut out = T::filled(ctx, offsets.len());
        for (o, &off) in out.iter_mut().zip(&offsets) {
            *o = src[off];
        }
        tensor(ishape.to_vec(), out)
    })
}

struct GatherElementsKernel {
    axis: i64,
}

impl Kernel for GatherElementsKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        Ok(vec![gather_elements(
            required(inputs, 0)?,
            required(inputs, 1)?,
            self.axis,
            ctx,
        )?])
    }
}

pub fn infer_elements(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let data = ctx.input_type(0)?;
    let indices = ctx.input_type(1)?;
    Ok(vec![TypeInfo {
        dtype: data.dtype,
        shape: indices.shape.clone(),
    }])
}

pub fn compile_elements(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(GatherElementsKernel {
        axis: ctx.node.attr_int_or("axis", 0)?,
    }))
}

struct GatherKernel {
    axis: i64,
}

impl Kernel for GatherKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        Ok(vec![gather(
            required(inputs, 0)?,
            required(inputs, 1)?,
            self.axis,
            ctx,
        )?])
    }
}

pub fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let data = ctx.input_type(0)?;
    let indices = ctx.input_type(1)?;
    if !matches!(indices.dtype, crate::ir::DType::I32 | crate::ir::DType::I64) {
        return Err(node_error(
            ctx.node,
            format!("indices must be i32 or i64, got {}", indices.dtype),
        ));
    }
    let axis = ctx.node.attr_int_or("axis", 0)?;
    let shape = match (&data.shape, &indices.shape) {
        (Some(d), Some(i)) => {
            let a = axis_in(axis, d.len()).map_err(|e| node_error(ctx.node, e.to_string()))?;
            if let (Dim::Known(n), Some(values)) = (&d[a], ctx.constant(1)) {
                for v in values.to_i64_vec()? {
                    if v >= *n as i64 || v < -(*n as i64) {
                        return Err(node_error(
                            ctx.node,
                            format!("index {v} is out of range for axis {a} of size {n}"),
                        ));
                    }
                }
            }
            let mut s = d[..a].to_vec();
            s.extend_from_slice(i);
            s.extend_from_slice(&d[a + 1..]);
            Some(s)
        }
        _ => None,
    };
    Ok(vec![TypeInfo {
        dtype: data.dtype,
        shape,
    }])
}

pub fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(GatherKernel {
        axis: ctx.node.attr_int_or("axis", 0)?,
    }))
}

#[cfg(test)]
mod tests {
    use crate::ir::{Attr, DType, Dim, TypeInfo};
    use crate::ops::testutil::*;

    #[test]
    fn gathers_rows_columns_and_scalars() {
        let (s, v) = run_f32(
            "Gather",
            13,
            &[],
            vec![iota(&[3, 2]), i64t(&[2, 2], &[0, 2, -1, 1])],
        );
        assert_eq!(s, vec![2, 2, 2]);
        assert_eq!(v, vec![0., 1., 4., 5., 4., 5., 2., 3.]);
        let (s, v) = run_f32(
            "Gather",
            13,
            &[("axis", Attr::Int(-1))],
            vec![iota(&[2, 3]), i64t(&[], &[2])],
        );
        assert_eq!((s, v), (vec![2], vec![2., 5.]));
        let out = run(
            "Gather",
            13,
            &[],
            vec![i64t(&[3], &[1, 128, 384]), i64t(&[], &[1])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape(), &[] as &[usize]);
        assert_eq!(out[0].as_i64().unwrap(), &[128]);
    }

    #[test]
    fn out_of_range_is_an_error() {
        let err = run("Gather", 13, &[], vec![iota(&[3, 2]), i64t(&[1], &[3])], 1).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        assert!(run("Gather", 13, &[], vec![iota(&[3, 2]), i64t(&[1], &[-4])], 1).is_err());
    }

    #[test]
    fn gather_elements_replaces_one_coordinate() {
        // Spec example: axis 1.
        let out = run_f32(
            "GatherElements",
            13,
            &[("axis", Attr::Int(1))],
            vec![
                f32t(&[2, 2], &[1., 2., 3., 4.]),
                i64t(&[2, 2], &[0, 0, 1, 0]),
            ],
        );
        assert_eq!(out, (vec![2, 2], vec![1., 1., 4., 3.]));
        // Axis 0 with fewer index rows than data rows, and a negative index.
        let out = run_f32(
            "GatherElements",
            13,
            &[],
            vec![iota(&[3, 3]), i64t(&[2, 3], &[1, 2, 0, 2, 0, -3])],
        );
        assert_eq!(out, (vec![2, 3], vec![3., 7., 2., 6., 1., 2.]));
        assert!(run(
            "GatherElements",
            13,
            &[],
            vec![iota(&[2]), i64t(&[1], &[2])],
            1
        )
        .is_err());
    }

    #[test]
    fn infer_with_symbolic_indices() {
        let data = TypeInfo::known(DType::F32, &[30522, 384]);
        let idx = TypeInfo::new(DType::I64, vec![sym("b"), sym("s")]);
        let out = infer("Gather", 13, &[], vec![Some(data), Some(idx)], vec![], 1).unwrap();
        assert_eq!(
            out[0].shape,
            Some(vec![sym("b"), sym("s"), Dim::Known(384)])
        );
    }
}
