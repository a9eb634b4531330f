//! `Transpose` (1-28): permutes dims (default: reverses them) through a strided copy, which
//! moves whole rows when the innermost dim stays in place and tiles element-wise moves.

use super::strided::{dense_strides, strided_copy};
use crate::error::{Error, Result};
use crate::ir::{checked_numel, Dim, Tensor, TypeInfo};
use crate::ops::typed::{tensor, view, with_any_type, Elem};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

/// `perm` checked to be a permutation of `0..rank` (default: reversed dims).
fn permutation(perm: Option<&[i64]>, rank: usize) -> Result<Vec<usize>> {
    let Some(perm) = perm else {
        return Ok((0..rank).rev().collect());
    };
    let mut seen = vec![false; rank];
    let ok = perm.len() == rank
        && perm.iter().all(|&p| {
            usize::try_from(p)
                .ok()
                .filter(|&p| p < rank && !seen[p])
                .map(|p| seen[p] = true)
                .is_some()
        });
    if !ok {
        return Err(Error::Shape(format!(
            "perm {perm:?} is not a permutation of the {rank} dims"
        )));
    }
    Ok(perm.iter().map(|&p| p as usize).collect())
}

/// `x` with its dims permuted so output dim `k` is input dim `perm[k]`.
pub fn transpose(x: &Tensor, perm: &[usize], ctx: &mut RunCtx) -> Result<Tensor> {
    let in_strides = dense_strides(x.shape());
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let strides: Vec<isize> = perm.iter().map(|&p| in_strides[p]).collect();
    let n = checked_numel(&shape, x.dtype().size_of())?;
    with_any_type!(x.dtype(), |T| {
        let mut out = T::filled(ctx, n);
        strided_copy(view::<T>(x)?, 0, &shape, &strides, &mut out);
        tensor(shape, out)
    })
}

struct TransposeKernel {
    perm: Option<Vec<i64>>,
}

impl Kernel for TransposeKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let perm = permutation(self.perm.as_deref(), x.rank())?;
        Ok(vec![transpose(x, &perm, ctx)?])
    }
}

pub fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let x = ctx.input_type(0)?;
    let perm = ctx.node.attr_ints("perm")?;
    let shape = match (&x.shape, perm) {
        (Some(dims), perm) => {
            let p =
                permutation(perm, dims.len()).map_err(|e| node_error(ctx.node, e.to_string()))?;
            Some(p.iter().map(|&i| dims[i].clone()).collect())
        }
        (None, Some(perm)) => Some(vec![Dim::Unknown; perm.len()]),
        (None, None) => None,
    };
    Ok(vec![TypeInfo {
        dtype: x.dtype,
        shape,
    }])
}

pub fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(TransposeKernel {
        perm: ctx.node.attr_ints("perm")?.map(<[i64]>::to_vec),
    }))
}

#[cfg(test)]
mod tests {
    use crate::ir::{Attr, DType, Dim, TypeInfo};
    use crate::ops::testutil::*;

    fn naive(shape: &[usize], perm: &[usize]) -> Vec<f32> {
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let n: usize = shape.iter().product();
        let mut in_strides = vec![1; shape.len()];
        for k in (0..shape.len().saturating_sub(1)).rev() {
            in_strides[k] = in_strides[k + 1] * shape[k + 1];
        }
        (0..n)
            .map(|flat| {
                let mut rem = flat;
                let mut off = 0;
                for k in (0..out_shape.len()).rev() {
                    off += (rem % out_shape[k]) * in_strides[perm[k]];
                    rem /= out_shape[k];
                }
                off as f32
            })
            .collect()
    }

    #[test]
    fn permutations_match_naive() {
        for (shape, perm) in [
            (vec![2, 3], vec![1, 0]),
            (vec![40, 30], vec![1, 0]),
            (vec![2, 3, 4, 5], vec![0, 2, 1, 3]),
            (vec![2, 12, 20, 16], vec![0, 2, 3, 1]),
            (vec![2, 3, 4, 5], vec![3, 2, 1, 0]),
            (vec![1, 5, 1, 7], vec![2, 3, 0, 1]),
        ] {
            let p: Vec<i64> = perm.iter().map(|&x| x as i64).collect();
            let (s, v) = run_f32(
                "Transpose",
                13,
                &[("perm", Attr::Ints(p))],
                vec![iota(&shape)],
            );
            assert_eq!(s, perm.iter().map(|&p| shape[p]).collect::<Vec<_>>());
            assert_eq!(v, naive(&shape, &perm), "{shape:?} {perm:?}");
        }
    }

    #[test]
    fn default_reverses_and_bad_perm_errors() {
        let (s, v) = run_f32("Transpose", 13, &[], vec![iota(&[2, 3])]);
        assert_eq!(s, vec![3, 2]);
        assert_eq!(v, vec![0., 3., 1., 4., 2., 5.]);
        assert!(run(
            "Transpose",
            13,
            &[("perm", Attr::Ints(vec![0, 0]))],
            vec![iota(&[2, 2])],
            1
        )
        .is_err());
        let out = run("Transpose", 13, &[], vec![i64t(&[2, 1], &[4, 5])], 1).unwrap();
        assert_eq!(out[0].shape(), &[1, 2]);
        let ty = TypeInfo::new(DType::F32, vec![sym("b"), Dim::Known(3)]);
        let out = infer("Transpose", 13, &[], vec![Some(ty)], vec![], 1).unwrap();
        assert_eq!(out[0].shape, Some(vec![Dim::Known(3), sym("b")]));
    }
}
