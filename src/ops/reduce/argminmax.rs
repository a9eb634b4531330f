//! `ArgMax` and `ArgMin` (1-28): i64 index of the extreme value along `axis`, first
//! occurrence unless `select_last_index` (opset 12+), with `keepdims`.

use crate::error::{Error, Result};
use crate::ir::{DType, Dim, Tensor, TypeInfo};
use crate::ops::typed::{view, with_num_type, Elem};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

struct ArgKernel {
    max: bool,
    axis: i64,
    keepdims: bool,
    last: bool,
}

impl ArgKernel {
    /// Indices for `x` viewed as `[outer, n, inner]`, walking rows so reads are contiguous.
    fn indices<T: Elem + PartialOrd>(
        &self,
        x: &[T],
        outer: usize,
        n: usize,
        inner: usize,
    ) -> Vec<i64> {
        let mut idx = vec![0i64; outer * inner];
        let better = |v: T, best: T| {
            let strictly = if self.max { v > best } else { v < best };
            strictly || (self.last && v == best)
        };
        for o in 0..outer {
            let block = &x[o * n * inner..(o + 1) * n * inner];
            let mut best = block[..inner].to_vec();
            let out = &mut idx[o * inner..(o + 1) * inner];
            for k in 1..n {
                let row = &block[k * inner..(k + 1) * inner];
                for ((b, i), &v) in best.iter_mut().zip(out.iter_mut()).zip(row) {
                    if better(v, *b) {
                        *b = v;
                        *i = k as i64;
                    }
                }
            }
        }
        idx
    }

    fn eval(&self, x: &Tensor) -> Result<Tensor> {
        let a = super::axis_index(self.axis, x.rank())?;
        let shape = x.shape();
        let n = shape[a];
        if n == 0 {
            return Err(Error::Shape(format!(
                "cannot take the arg of an empty axis {a} of {shape:?}"
            )));
        }
        let outer: usize = shape[..a].iter().product();
        let inner: usize = shape[a + 1..].iter().product();
        let idx = if x.dtype() == DType::F16 {
            self.indices(&x.to_f32_vec(), outer, n, inner)
        } else {
            with_num_type!(
                x.dtype(),
                |T| self.indices(view::<T>(x)?, outer, n, inner),
                else return Err(Error::DType(format!("ArgMax/ArgMin do not support {}", x.dtype())))
            )
        };
        let mut out_shape = shape.to_vec();
        if self.keepdims {
            out_shape[a] = 1;
        } else {
            out_shape.remove(a);
        }
        Tensor::from_i64(out_shape, idx)
    }
}

impl Kernel for ArgKernel {
    fn run(&self, inputs: &[Option<&Tensor>], _ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        Ok(vec![self.eval(required(inputs, 0)?)?])
    }
}

pub fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let x = ctx.input_type(0)?;
    let axis = ctx.node.attr_int_or("axis", 0)?;
    let keepdims = ctx.node.attr_int_or("keepdims", 1)? != 0;
    let shape = match &x.shape {
        Some(dims) => {
            let a = super::axis_index(axis, dims.len())
                .map_err(|e| node_error(ctx.node, e.to_string()))?;
            let mut d = dims.clone();
            if keepdims {
                d[a] = Dim::Known(1);
            } else {
                d.remove(a);
            }
            Some(d)
        }
        None => None,
    };
    Ok(vec![TypeInfo {
        dtype: DType::I64,
        shape,
    }])
}

pub fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let node = ctx.node;
    Ok(Box::new(ArgKernel {
        max: node.op_type == "ArgMax",
        axis: node.attr_int_or("axis", 0)?,
        keepdims: node.attr_int_or("keepdims", 1)? != 0,
        last: node.attr_int_or("select_last_index", 0)? != 0,
    }))
}

#[cfg(test)]
mod tests {
    use crate::ir::Attr;
    use crate::ops::testutil::*;

    fn arg(
        op: &str,
        attrs: &[(&str, Attr)],
        shape: &[usize],
        data: &[f32],
    ) -> (Vec<usize>, Vec<i64>) {
        let out = run(op, 13, attrs, vec![f32t(shape, data)], 1)
            .unwrap()
            .remove(0);
        (out.shape().to_vec(), out.as_i64().unwrap().to_vec())
    }

    #[test]
    fn argmax_argmin_axes_and_ties() {
        let d = [2., 1., 3., 10., 3., 3.];
        assert_eq!(arg("ArgMax", &[], &[2, 3], &d), (vec![1, 3], vec![1, 1, 0]));
        assert_eq!(
            arg(
                "ArgMax",
                &[("axis", Attr::Int(-1)), ("keepdims", Attr::Int(0))],
                &[2, 3],
                &d
            ),
            (vec![2], vec![2, 0])
        );
        assert_eq!(
            arg("ArgMin", &[("axis", Attr::Int(1))], &[2, 3], &d),
            (vec![2, 1], vec![1, 1])
        );
        let ties = [1., 5., 5., 1.];
        assert_eq!(
            arg("ArgMax", &[("keepdims", Attr::Int(0))], &[4], &ties),
            (vec![], vec![1])
        );
        assert_eq!(
            arg(
                "ArgMax",
                &[
                    ("select_last_index", Attr::Int(1)),
                    ("keepdims", Attr::Int(0))
                ],
                &[4],
                &ties
            ),
            (vec![], vec![2])
        );
        assert_eq!(
            arg(
                "ArgMin",
                &[
                    ("select_last_index", Attr::Int(1)),
                    ("keepdims", Attr::Int(0))
                ],
                &[4],
                &ties
            ),
            (vec![], vec![3])
        );
        assert!(run(
            "ArgMax",
            13,
            &[("axis", Attr::Int(2))],
            vec![iota(&[2, 2])],
            1
        )
        .is_err());
    }
}
