//! `Expand` (8-28: broadcast to the broadcast of the input shape and a shape tensor) and
//! `Tile` (6-28: repeat along each dim).

use super::common::{const_ints, known_dims, known_len, to_dims};
use crate::error::{Error, Result};
use crate::ir::{checked_numel, Dim, Tensor, TypeInfo};
use crate::ops::broadcast::{broadcast_dims, broadcast_into, broadcast_shape};
use crate::ops::typed::{tensor, view, with_any_type, Elem};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

/// `x` broadcast against `shape` (either side may have the larger dims).
pub fn expand(x: &Tensor, shape: &[usize], ctx: &mut RunCtx) -> Result<Tensor> {
    let out_shape = broadcast_shape(x.shape(), shape)?;
    let n = checked_numel(&out_shape, x.dtype().size_of())?;
    with_any_type!(x.dtype(), |T| {
        let mut out = T::filled(ctx, n);
        broadcast_into(view::<T>(x)?, x.shape(), &out_shape, &mut out);
        tensor(out_shape, out)
    })
}

struct ExpandKernel;

impl Kernel for ExpandKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let shape = to_dims(&required(inputs, 1)?.to_i64_vec()?, "Expand shape")?;
        Ok(vec![expand(x, &shape, ctx)?])
    }
}

pub fn infer_expand(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let x = ctx.input_type(0)?;
    let target: Option<Vec<Dim>> = match const_ints(ctx, 1)? {
        Some(v) => Some(known_dims(
            &to_dims(&v, "shape").map_err(|e| node_error(ctx.node, e.to_string()))?,
        )),
        None => known_len(ctx, 1).map(|n| vec![Dim::Unknown; n]),
    };
    let shape = match (&x.shape, target) {
        (Some(dims), Some(t)) => {
            Some(broadcast_dims(dims, &t).map_err(|m| node_error(ctx.node, m))?)
        }
        _ => None,
    };
    Ok(vec![TypeInfo {
        dtype: x.dtype,
        shape,
    }])
}

pub fn compile_expand(_ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(ExpandKernel))
}

/// Appends `src` (shape `shape`) tiled `reps` times per dim to `out`. Each level builds one
/// copy of its block and then duplicates it in place, so the copies are long memcpys.
fn tile_into<T: Copy>(src: &[T], shape: &[usize], reps: &[usize], out: &mut Vec<T>) {
    let Some((&d, rest)) = shape.split_first() else {
        out.extend_from_slice(src);
        return;
    };
    let inner: usize = rest.iter().product();
    let start = out.len();
    for i in 0..d {
        tile_into(&src[i * inner..(i + 1) * inner], rest, &reps[1..], out);
    }
    let end = out.len();
    if reps[0] == 0 {
        out.truncate(start);
    }
    for _ in 1..reps[0] {
        out.extend_from_within(start..end);
    }
}

pub fn tile(x: &Tensor, reps: &[i64], ctx: &mut RunCtx) -> Result<Tensor> {
    if reps.len() != x.rank() {
        return Err(Error::Shape(format!(
            "Tile repeats {reps:?} do not match rank {}",
            x.rank()
        )));
    }
    let reps = to_dims(reps, "Tile repeats")?;
    let shape: Vec<usize> = x
        .shape()
        .iter()
        .zip(&reps)
        .map(|(&d, &r)| d.checked_mul(r))
        .collect::<Option<_>>()
        .ok_or_else(|| Error::TooLarge(format!("Tile of {:?} by {reps:?}", x.shape())))?;
    let n = checked_numel(&shape, x.dtype().size_of())?;
    with_any_type!(x.dtype(), |T| {
        let mut out = T::filled(ctx, n);
        out.clear();
        if n > 0 {
            tile_into(view::<T>(x)?, x.shape(), &reps, &mut out);
        }
        tensor::<T>(shape, out)
    })
}

struct TileKernel;

impl Kernel for TileKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let reps = required(inputs, 1)?.to_i64_vec()?;
        Ok(vec![tile(required(inputs, 0)?, &reps, ctx)?])
    }
}

pub fn infer_tile(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let x = ctx.input_type(0)?;
    let shape = match (&x.shape, const_ints(ctx, 1)?) {
        (Some(dims), Some(reps)) => {
            if reps.len() != dims.len() {
                return Err(node_error(
                    ctx.node,
                    format!("repeats {reps:?} do not match rank {}", dims.len()),
                ));
            }
            Some(
                dims.iter()
                    .zip(&reps)
                    .map(|(d, &r)| match (d, r) {
                        (d, 1) => d.clone(),
                        (_, 0) => Dim::Known(0),
                        (Dim::Known(n), r) if r > 0 => Dim::Known(n * r as usize),
                        _ => Dim::Unknown,
                    })
                    .collect(),
            )
        }
        (Some(dims), None) => Some(vec![Dim::Unknown; dims.len()]),
        (None, _) => None,
    };
    Ok(vec![TypeInfo {
        dtype: x.dtype,
        shape,
    }])
}

pub fn compile_tile(_ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(TileKernel))
}

#[cfg(test)]
mod tests {
    use crate::ir::{DType, Dim, TypeInfo};
    use crate::ops::testutil::*;

    #[test]
    fn expand_is_multidirectional() {
        let col = f32t(&[3, 1], &[1., 2., 3.]);
        let (s, v) = run_f32("Expand", 13, &[], vec![col.clone(), i64t(&[2], &[1, 2])]);
        assert_eq!(s, vec![3, 2]);
        assert_eq!(v, vec![1., 1., 2., 2., 3., 3.]);
        let (s, v) = run_f32("Expand", 13, &[], vec![col.clone(), i64t(&[3], &[2, 1, 1])]);
        assert_eq!(s, vec![2, 3, 1]);
        assert_eq!(v, vec![1., 2., 3., 1., 2., 3.]);
        let (s, _) = run_f32("Expand", 13, &[], vec![col.clone(), i64t(&[1], &[1])]);
        assert_eq!(s, vec![3, 1]);
        assert!(run("Expand", 13, &[], vec![col, i64t(&[2], &[2, 1])], 1).is_err());
        let x = TypeInfo::new(DType::F32, vec![sym("b"), Dim::Known(1)]);
        let out = infer(
            "Expand",
            13,
            &[],
            vec![Some(x.clone()), None],
            vec![None, i64t(&[2], &[1, 4])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, Some(vec![sym("b"), Dim::Known(4)]));
        let out = infer(
            "Expand",
            13,
            &[],
            vec![Some(x), Some(TypeInfo::known(DType::I64, &[3]))],
            vec![],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, Some(vec![Dim::Unknown; 3]));
    }

    #[test]
    fn tile_repeats_each_dim() {
        let (s, v) = run_f32("Tile", 13, &[], vec![iota(&[2, 2]), i64t(&[2], &[2, 3])]);
        assert_eq!(s, vec![4, 6]);
        assert_eq!(&v[..6], &[0., 1., 0., 1., 0., 1.]);
        assert_eq!(&v[12..18], &[0., 1., 0., 1., 0., 1.]);
        let (s, v) = run_f32("Tile", 13, &[], vec![iota(&[2]), i64t(&[1], &[0])]);
        assert_eq!((s, v), (vec![0], vec![]));
        let (s, _) = run_f32("Tile", 13, &[], vec![iota(&[0, 2]), i64t(&[2], &[3, 1])]);
        assert_eq!(s, vec![0, 2]);
        assert!(run("Tile", 13, &[], vec![iota(&[2]), i64t(&[2], &[1, 1])], 1).is_err());
        assert!(run("Tile", 13, &[], vec![iota(&[2]), i64t(&[1], &[-1])], 1).is_err());
    }
}
