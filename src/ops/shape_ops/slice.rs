//! `Slice` (1-28): numpy-style `start:end:step` per axis. Opset < 10 takes `starts`, `ends`,
//! `axes` as attributes (step 1); from 10 they are inputs with optional `axes` and `steps`,
//! steps may be negative, and out-of-range starts/ends are clamped as the spec describes.

use super::common::{axes_in, const_ints, input_ints};
use super::strided::{dense_strides, strided_copy};
use crate::error::{Error, Result};
use crate::ir::{checked_numel, Dim, Tensor, TypeInfo};
use crate::ops::typed::{tensor, view, with_any_type, Elem};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

/// The effective slice of one axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AxisSlice {
    pub start: usize,
    pub step: i64,
    pub len: usize,
}

/// Clamps one axis's `start:end:step` against a dim of `dim` (all in i128, so `i64::MIN`
/// and `i64::MAX` sentinels cannot overflow).
fn clamp_axis(dim: usize, start: i64, end: i64, step: i64) -> Result<AxisSlice> {
    if step == 0 {
        return Err(Error::Shape("slice step must not be 0".into()));
    }
    if dim == 0 {
        return Ok(AxisSlice {
            start: 0,
            step,
            len: 0,
        });
    }
    let d = dim as i128;
    let (mut s, mut e, st) = (start as i128, end as i128, step as i128);
    if s < 0 {
        s += d;
    }
    if e < 0 {
        e += d;
    }
    let len = if st > 0 {
        s = s.clamp(0, d);
        e = e.clamp(0, d);
        if e > s {
            (e - s + st - 1) / st
        } else {
            0
        }
    } else {
        s = s.clamp(0, d - 1);
        e = e.clamp(-1, d - 1);
        if s > e {
            (s - e - st - 1) / -st
        } else {
            0
        }
    };
    Ok(AxisSlice {
        start: s as usize,
        step,
        len: len as usize,
    })
}

/// Per-axis slices of a tensor of `shape` (axes not named keep their full extent).
pub fn slice_params(
    shape: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> Result<Vec<AxisSlice>> {
    let n = starts.len();
    let default_axes: Vec<i64> = (0..n as i64).collect();
    let axes = axes.unwrap_or(&default_axes);
    if ends.len() != n || axes.len() != n || steps.is_some_and(|s| s.len() != n) {
        return Err(Error::Shape(format!(
            "slice starts {starts:?}, ends {ends:?}, axes {axes:?} and steps {steps:?} differ in length"
        )));
    }
    let axes = axes_in(axes, shape.len())?;
    let mut out: Vec<AxisSlice> = shape
        .iter()
        .map(|&d| AxisSlice {
            start: 0,
            step: 1,
            len: d,
        })
        .collect();
    for (i, &a) in axes.iter().enumerate() {
        let step = steps.map_or(1, |s| s[i]);
        out[a] = clamp_axis(shape[a], starts[i], ends[i], step)?;
    }
    Ok(out)
}

/// Copies the slice of `x` described by `params`.
pub fn slice(x: &Tensor, params: &[AxisSlice], ctx: &mut RunCtx) -> Result<Tensor> {
    let in_strides = dense_strides(x.shape());
    let shape: Vec<usize> = params.iter().map(|p| p.len).collect();
    let strides: Vec<isize> = params
        .iter()
        .zip(&in_strides)
        // A step only matters when it is taken; with two or more elements |step| < dim, so
        // the product cannot overflow.
        .map(|(p, &s)| if p.len <= 1 { 0 } else { p.step as isize * s })
        .collect();
    let base: isize = params
        .iter()
        .zip(&in_strides)
        .map(|(p, &s)| p.start as isize * s)
        .sum();
    let n = checked_numel(&shape, x.dtype().size_of())?;
    with_any_type!(x.dtype(), |T| {
        let mut out = T::filled(ctx, n);
        strided_copy(view::<T>(x)?, base, &shape, &strides, &mut out);
        tensor(shape, out)
    })
}

/// Opset < 10 attributes: starts, ends, axes.
type LegacyAttrs = (Vec<i64>, Vec<i64>, Option<Vec<i64>>);

struct SliceKernel {
    legacy: Option<LegacyAttrs>,
}

impl Kernel for SliceKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let params = match &self.legacy {
            Some((starts, ends, axes)) => {
                slice_params(x.shape(), starts, ends, axes.as_deref(), None)?
            }
            None => {
                let starts = required(inputs, 1)?.to_i64_vec()?;
                let ends = required(inputs, 2)?.to_i64_vec()?;
                let axes = input_ints(inputs, 3)?;
                let steps = input_ints(inputs, 4)?;
                slice_params(x.shape(), &starts, &ends, axes.as_deref(), steps.as_deref())?
            }
        };
        Ok(vec![slice(x, &params, ctx)?])
    }
}

fn legacy_attrs(node: &crate::ir::Node) -> Result<LegacyAttrs> {
    let get = |k: &str| {
        node.attr_ints(k)?
            .map(<[i64]>::to_vec)
            .ok_or_else(|| node_error(node, format!("missing attribute '{k}'")))
    };
    Ok((
        get("starts")?,
        get("ends")?,
        node.attr_ints("axes")?.map(<[i64]>::to_vec),
    ))
}

pub fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let node = ctx.node;
    let x = ctx.input_type(0)?;
    let Some(dims) = &x.shape else {
        return Ok(vec![TypeInfo::unknown_shape(x.dtype)]);
    };
    let (starts, ends, axes, steps) = if ctx.opset < 10 {
        let (s, e, a) = legacy_attrs(node)?;
        (Some(s), Some(e), a, None)
    } else {
        let axes = match node.input(3) {
            Some(_) => const_ints(ctx, 3)?,
            None => None,
        };
        (
            const_ints(ctx, 1)?,
            const_ints(ctx, 2)?,
            axes,
            const_ints(ctx, 4)?,
        )
    };
    let axes_known = ctx.opset < 10 || node.input(3).is_none() || axes.is_some();
    let steps_known = ctx.opset < 10 || node.input(4).is_none() || steps.is_some();
    let err = |e: Error| node_error(node, e.to_string());
    let shape = match (starts, ends) {
        (Some(starts), Some(ends)) if axes_known && steps_known => {
            let n = starts.len();
            let axes = axes.unwrap_or_else(|| (0..n as i64).collect());
            if ends.len() != n || axes.len() != n || steps.as_ref().is_some_and(|s| s.len() != n) {
                return Err(node_error(
                    node,
                    "starts, ends, axes and steps differ in length",
                ));
            }
            let axes = axes_in(&axes, dims.len()).map_err(err)?;
            let mut out = dims.clone();
            for (i, &a) in axes.iter().enumerate() {
                let step = steps.as_ref().map_or(1, |s| s[i]);
                out[a] = match &dims[a] {
                    Dim::Known(d) => {
                        Dim::Known(clamp_axis(*d, starts[i], ends[i], step).map_err(err)?.len)
                    }
                    // `x[0:]` style slices keep a named dim.
                    d if step == 1 && starts[i] == 0 && ends[i] >= i32::MAX as i64 => d.clone(),
                    _ => Dim::Unknown,
                };
            }
            out
        }
        _ if axes_known => {
            let n = axes.as_ref().map(Vec::len);
            match axes {
                Some(axes) => {
                    let axes = axes_in(&axes, dims.len()).map_err(err)?;
                    dims.iter()
                        .enumerate()
                        .map(|(i, d)| {
                            if axes.contains(&i) {
                                Dim::Unknown
                            } else {
                                d.clone()
                            }
                        })
                        .collect()
                }
                None => {
                    // Without axes, the first len(starts) dims are sliced.
                    let sliced = n
                        .or_else(|| super::common::known_len(ctx, 1))
                        .unwrap_or(dims.len());
                    dims.iter()
                        .enumerate()
                        .map(|(i, d)| if i < sliced { Dim::Unknown } else { d.clone() })
                        .collect()
                }
            }
        }
        _ => vec![Dim::Unknown; dims.len()],
    };
    Ok(vec![TypeInfo::new(x.dtype, shape)])
}

pub fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let legacy = if ctx.opset < 10 {
        Some(legacy_attrs(ctx.node)?)
    } else {
        None
    };
    Ok(Box::new(SliceKernel { legacy }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Attr, DType};
    use crate::ops::testutil::*;

    fn sl(
        shape: &[usize],
        starts: &[i64],
        ends: &[i64],
        axes: Option<&[i64]>,
        steps: Option<&[i64]>,
    ) -> (Vec<usize>, Vec<f32>) {
        let n = starts.len();
        let axes_t = axes.map(|a| i64t(&[n], a)).unwrap_or(None);
        let steps_t = steps.map(|s| i64t(&[n], s)).unwrap_or(None);
        let mut inputs = vec![iota(shape), i64t(&[n], starts), i64t(&[n], ends), axes_t];
        if steps_t.is_some() {
            inputs.push(steps_t);
        }
        run_f32("Slice", 13, &[], inputs)
    }

    #[test]
    fn positive_steps_and_clamping() {
        let (s, v) = sl(&[3, 4], &[1, 1], &[3, 3], None, None);
        assert_eq!(s, vec![2, 2]);
        assert_eq!(v, vec![5., 6., 9., 10.]);
        let (s, v) = sl(&[3, 4], &[0], &[i64::MAX], Some(&[1]), Some(&[3]));
        assert_eq!(s, vec![3, 2]);
        assert_eq!(v, vec![0., 3., 4., 7., 8., 11.]);
        let (s, _) = sl(&[3, 4], &[-100], &[100], Some(&[-1]), None);
        assert_eq!(s, vec![3, 4]);
        let (s, v) = sl(&[10], &[-3], &[-1], None, None);
        assert_eq!((s, v), (vec![2], vec![7., 8.]));
        let (s, _) = sl(&[10], &[5], &[2], None, None);
        assert_eq!(s, vec![0]);
    }

    #[test]
    fn negative_steps() {
        let (s, v) = sl(&[5], &[-1], &[i64::MIN], None, Some(&[-1]));
        assert_eq!((s, v), (vec![5], vec![4., 3., 2., 1., 0.]));
        let (s, v) = sl(&[5], &[10], &[0], None, Some(&[-2]));
        assert_eq!((s, v), (vec![2], vec![4., 2.]));
        let (s, v) = sl(&[2, 3], &[-1, 2], &[-10, 0], Some(&[0, 1]), Some(&[-1, -1]));
        assert_eq!(s, vec![2, 2]);
        assert_eq!(v, vec![5., 4., 2., 1.]);
        let (s, _) = sl(&[0, 3], &[0], &[-1], None, Some(&[-1]));
        assert_eq!(s, vec![0, 3]);
    }

    #[test]
    fn legacy_attributes_and_errors() {
        let attrs = [
            ("starts", Attr::Ints(vec![1])),
            ("ends", Attr::Ints(vec![1000])),
            ("axes", Attr::Ints(vec![1])),
        ];
        let (s, v) = run_f32("Slice", 9, &attrs, vec![iota(&[2, 3])]);
        assert_eq!(s, vec![2, 2]);
        assert_eq!(v, vec![1., 2., 4., 5.]);
        let bad = vec![
            iota(&[4]),
            i64t(&[1], &[0]),
            i64t(&[1], &[4]),
            None,
            i64t(&[1], &[0]),
        ];
        assert!(run("Slice", 13, &[], bad, 1).is_err());
        let bad = vec![
            iota(&[4]),
            i64t(&[1], &[0]),
            i64t(&[1], &[4]),
            i64t(&[1], &[1]),
        ];
        assert!(run("Slice", 13, &[], bad, 1).is_err());
    }

    #[test]
    fn infer_keeps_symbolic_dims() {
        let x = TypeInfo::new(DType::F32, vec![sym("b"), sym("s"), Dim::Known(8)]);
        let types = vec![
            Some(x),
            Some(TypeInfo::known(DType::I64, &[1])),
            Some(TypeInfo::known(DType::I64, &[1])),
            Some(TypeInfo::known(DType::I64, &[1])),
        ];
        let out = crate::ops::testutil::infer(
            "Slice",
            13,
            &[],
            types.clone(),
            vec![None, i64t(&[1], &[2]), i64t(&[1], &[-1]), i64t(&[1], &[2])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, Some(vec![sym("b"), sym("s"), Dim::Known(5)]));
        let out = crate::ops::testutil::infer(
            "Slice",
            13,
            &[],
            types.clone(),
            vec![
                None,
                i64t(&[1], &[0]),
                i64t(&[1], &[i64::MAX]),
                i64t(&[1], &[1]),
            ],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, Some(vec![sym("b"), sym("s"), Dim::Known(8)]));
        let out = crate::ops::testutil::infer(
            "Slice",
            13,
            &[],
            types,
            vec![None, None, None, i64t(&[1], &[1])],
            1,
        )
        .unwrap();
        assert_eq!(
            out[0].shape,
            Some(vec![sym("b"), Dim::Unknown, Dim::Known(8)])
        );
    }

    #[test]
    fn clamp_matches_numpy() {
        // Expected lengths from Python's len(range(10)[start:end:step]).
        for (start, end, step, want) in [
            (0, 10, 1, 10),
            (-1, -11, -1, 10),
            (9, -100, -3, 4),
            (3, 3, 1, 0),
            (i64::MIN, i64::MAX, 4, 3),
            (i64::MAX, i64::MIN, i64::MIN, 1),
        ] {
            assert_eq!(
                clamp_axis(10, start, end, step).unwrap().len,
                want,
                "{start}:{end}:{step}"
            );
        }
    }
}
