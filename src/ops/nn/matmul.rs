//! ONNX `MatMul` (opsets 1-21): numpy matrix product with broadcast batch dims and the numpy
//! rules for 1-D operands, plus a fused activation. A constant B is packed once; when B has
//! no batch dims all of A's batch rows go through a single GEMM.

use rayon::prelude::*;

use super::{alloc_output, data, f32_input, require_f32};
use crate::error::Result;
use crate::ir::{Dim, Node, Tensor, TypeInfo};
use crate::kernels::activation::Activation;
use crate::kernels::gemm::{gemm_threads, Epilogue, Lhs, MatMut, MatRef, PackedB, Rhs};
use crate::ops::{node_error, CompileCtx, InferCtx, Kernel, OpDef, RunCtx};

pub const MATMUL: OpDef = OpDef {
    op_type: "MatMul",
    domain: "",
    opsets: (1, 21),
    infer,
    compile,
    fuses_activation: true,
};

/// Multiply-adds per product below which batches run in parallel instead of each product.
const SMALL_PRODUCT: usize = 1 << 16;

/// Numpy broadcast of two symbolic dims.
fn broadcast_dim(node: &Node, a: &Dim, b: &Dim) -> Result<Dim> {
    Ok(match (a, b) {
        (Dim::Known(1), d) | (d, Dim::Known(1)) => d.clone(),
        (Dim::Known(x), Dim::Known(y)) if x != y => {
            return Err(node_error(
                node,
                format!("batch dims {x} and {y} do not broadcast"),
            ))
        }
        (x, y) if x == y => x.clone(),
        (Dim::Known(x), _) | (_, Dim::Known(x)) => Dim::Known(*x),
        _ => Dim::Unknown,
    })
}

/// Right-aligned numpy broadcast of two batch shapes.
fn broadcast<T: Clone>(
    a: &[T],
    b: &[T],
    one: T,
    mut f: impl FnMut(&T, &T) -> Result<T>,
) -> Result<Vec<T>> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let x = if i + a.len() >= r {
                &a[i + a.len() - r]
            } else {
                &one
            };
            let y = if i + b.len() >= r {
                &b[i + b.len() - r]
            } else {
                &one
            };
            f(x, y)
        })
        .collect()
}

fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let node = ctx.node;
    let a = ctx.input_type(0)?;
    let b = ctx.input_type(1)?;
    let (Some(sa), Some(sb)) = (&a.shape, &b.shape) else {
        return Ok(vec![TypeInfo::unknown_shape(a.dtype)]);
    };
    if sa.is_empty() || sb.is_empty() {
        return Err(node_error(node, "MatMul operands must have rank 1 or more"));
    }
    let a_batch = &sa[..sa.len().saturating_sub(2)];
    let b_batch = &sb[..sb.len().saturating_sub(2)];
    let mut out = broadcast(a_batch, b_batch, Dim::Known(1), |x, y| {
        broadcast_dim(node, x, y)
    })?;
    if sa.len() >= 2 {
        out.push(sa[sa.len() - 2].clone());
    }
    if sb.len() >= 2 {
        out.push(sb[sb.len() - 1].clone());
    }
    Ok(vec![TypeInfo::new(a.dtype, out)])
}

/// B prepared at compile time: one packed matrix per batch slice (one when B is 1-D/2-D).
struct ConstB {
    shape: Vec<usize>,
    packed: Vec<PackedB>,
}

struct MatMulKernel {
    node: Node,
    act: Option<Activation>,
    b: Option<ConstB>,
}

fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let node = ctx.node;
    for i in 0..2 {
        require_f32(node, ctx.input_type(i), i)?;
    }
    // An empty B is left to the run-time path, which handles it without packing.
    let b = match ctx.constant(1).filter(|t| t.numel() > 0) {
        Some(t) => {
            let shape = t.shape().to_vec();
            let (k, n) = b_dims(node, &shape)?;
            let packed = t
                .to_f32_vec()
                .chunks_exact(k * n)
                .map(|s| MatRef::row_major(s, k, n).map(PackedB::new))
                .collect::<Result<_>>()?;
            Some(ConstB { shape, packed })
        }
        None => None,
    };
    Ok(Box::new(MatMulKernel {
        node: node.clone(),
        act: ctx.fused_activation,
        b,
    }))
}

/// `(K, N)` of B's matrices (a 1-D B is a `[K, 1]` column).
fn b_dims(node: &Node, shape: &[usize]) -> Result<(usize, usize)> {
    match shape {
        [] => Err(node_error(node, "B must have rank 1 or more")),
        [k] => Ok((*k, 1)),
        [.., k, n] => Ok((*k, *n)),
    }
}

/// Row-major strides of `shape`, 0 on broadcast (size-1) axes of an operand padded to `rank`.
fn batch_strides(shape: &[usize], rank: usize, out: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; rank];
    let mut s = 1;
    for i in (0..shape.len()).rev() {
        let pos = rank - shape.len() + i;
        strides[pos] = if shape[i] == 1 && out[pos] != 1 { 0 } else { s };
        s *= shape[i];
    }
    strides
}

impl Kernel for MatMulKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let node = &self.node;
        let a = f32_input(node, inputs, 0)?;
        let b_t = match &self.b {
            Some(_) => None,
            None => Some(f32_input(node, inputs, 1)?),
        };
        let b_shape: &[usize] = match (&self.b, b_t) {
            (Some(c), _) => &c.shape,
            (None, Some(t)) => t.shape(),
            (None, None) => &[],
        };
        let sa = a.shape();
        if sa.is_empty() {
            return Err(node_error(node, "A must have rank 1 or more"));
        }
        let (m, k) = if sa.len() == 1 {
            (1, sa[0])
        } else {
            (sa[sa.len() - 2], sa[sa.len() - 1])
        };
        let (kb, n) = b_dims(node, b_shape)?;
        if k != kb {
            return Err(node_error(
                node,
                format!("A {sa:?} and B {b_shape:?}: inner dimensions {k} and {kb} differ"),
            ));
        }
        let a_batch = &sa[..sa.len().saturating_sub(2)];
        let b_batch = &b_shape[..b_shape.len().saturating_sub(2)];
        let batch = broadcast(a_batch, b_batch, 1usize, |&x, &y| {
            if x == y || y == 1 {
                Ok(x)
            } else if x == 1 {
                Ok(y)
            } else {
                Err(node_error(
                    node,
                    format!("batch dims of A {sa:?} and B {b_shape:?} do not broadcast"),
                ))
            }
        })?;
        let batches: usize = batch.iter().product();
        let mut out_shape = batch.clone();
        if sa.len() >= 2 {
            out_shape.push(m);
        }
        if b_shape.len() >= 2 {
            out_shape.push(n);
        }
        let mut out = alloc_output(node, ctx, &out_shape)?;
        let epi = Epilogue {
            act: self.act,
            ..Epilogue::default()
        };
        let threads = crate::kernels::par::threads();
        let rhs_at = |bi: usize| -> Result<Rhs> {
            Ok(match (&self.b, b_t) {
                (Some(c), _) => Rhs::Packed(&c.packed[bi]),
                (None, Some(t)) => Rhs::Mat(MatRef::row_major(&data(t)[bi * k * n..], k, n)?),
                (None, None) => missing_b(node)?,
            })
        };
        if out.is_empty() {
            return Ok(vec![Tensor::from_f32(out_shape, out)?]);
        }
        if b_batch.iter().product::<usize>() == 1 && a_batch.len() >= b_batch.len() {
            // One B for every batch: fold A's batch dims into M for a single product.
            let rows = batches * m;
            let lhs = MatRef::row_major(data(a), rows, k)?;
            gemm_threads(
                threads,
                1.0,
                Lhs::Mat(lhs),
                rhs_at(0)?,
                0.0,
                MatMut::row_major(&mut out, rows, n)?,
                epi,
            )
            .map_err(|e| e.at_node(node))?;
            return Ok(vec![Tensor::from_f32(out_shape, out)?]);
        }
        let a_str = batch_strides(a_batch, batch.len(), &batch);
        let b_str = batch_strides(b_batch, batch.len(), &batch);
        let offsets = |idx: usize| {
            let (mut rem, mut ao, mut bo) = (idx, 0, 0);
            for d in (0..batch.len()).rev() {
                let i = rem % batch[d];
                rem /= batch[d];
                ao += i * a_str[d];
                bo += i * b_str[d];
            }
            (ao, bo)
        };
        let one = |(idx, dst): (usize, &mut [f32]), gemm_t: usize| -> Result<()> {
            let (ao, bo) = offsets(idx);
            let lhs = MatRef::row_major(&data(a)[ao * m * k..], m, k)?;
            gemm_threads(
                gemm_t,
                1.0,
                Lhs::Mat(lhs),
                rhs_at(bo)?,
                0.0,
                MatMut::row_major(dst, m, n)?,
                epi,
            )
        };
        if threads > 1 && m * n * k < SMALL_PRODUCT {
            out.par_chunks_mut(m * n)
                .enumerate()
                .try_for_each(|c| one(c, 1))
        } else {
            out.chunks_mut(m * n)
                .enumerate()
                .try_for_each(|c| one(c, threads))
        }
        .map_err(|e| e.at_node(node))?;
        Ok(vec![Tensor::from_f32(out_shape, out)?])
    }
}

fn missing_b<'a>(node: &Node) -> Result<Rhs<'a>> {
    Err(node_error(node, "input B is missing"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::DType;
    use crate::kernels::testutil::{assert_close, Rng};
    use crate::ops::nn::test_support::{infer, node, run};

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_f32(shape.to_vec(), v).unwrap()
    }

    /// numpy.matmul by definition, for the test shapes.
    fn naive(a: &Tensor, b: &Tensor) -> (Vec<usize>, Vec<f32>) {
        let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
        let a2 = if sa.len() == 1 {
            vec![1, sa[0]]
        } else {
            sa.clone()
        };
        let b2 = if sb.len() == 1 {
            vec![sb[0], 1]
        } else {
            sb.clone()
        };
        let (m, k, n) = (a2[a2.len() - 2], a2[a2.len() - 1], b2[b2.len() - 1]);
        let ab = &a2[..a2.len() - 2];
        let bb = &b2[..b2.len() - 2];
        let r = ab.len().max(bb.len());
        let pad = |s: &[usize]| -> Vec<usize> {
            std::iter::repeat_n(1, r - s.len())
                .chain(s.iter().copied())
                .collect()
        };
        let (pa, pb) = (pad(ab), pad(bb));
        let batch: Vec<usize> = pa.iter().zip(&pb).map(|(&x, &y)| x.max(y)).collect();
        let total: usize = batch.iter().product();
        let mut out = vec![0.0; total * m * n];
        for idx in 0..total {
            let mut rem = idx;
            let (mut ai, mut bi) = (0, 0);
            let (mut asz, mut bsz) = (1, 1);
            for d in (0..r).rev() {
                let i = rem % batch[d];
                rem /= batch[d];
                ai += if pa[d] == 1 { 0 } else { i } * asz;
                bi += if pb[d] == 1 { 0 } else { i } * bsz;
                asz *= pa[d];
                bsz *= pb[d];
            }
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0;
                    for p in 0..k {
                        acc += data(a)[ai * m * k + i * k + p] * data(b)[bi * k * n + p * n + j];
                    }
                    out[idx * m * n + i * n + j] = acc;
                }
            }
        }
        let mut shape = batch;
        if sa.len() >= 2 {
            shape.push(m);
        }
        if sb.len() >= 2 {
            shape.push(n);
        }
        (shape, out)
    }

    #[test]
    fn hand_checked_vector_cases() {
        let a = t(&[2], vec![1., 2.]);
        let b = t(&[2], vec![3., 4.]);
        let out = run(
            &node("MatMul", 2),
            13,
            &[Some(&a), Some(&b)],
            &[false, false],
            None,
        )
        .unwrap();
        assert_eq!(out[0].shape(), &[] as &[usize]);
        assert_eq!(out[0].as_f32().unwrap(), &[11.0]);
        let m = t(&[2, 2], vec![1., 2., 3., 4.]);
        let out = run(
            &node("MatMul", 2),
            13,
            &[Some(&m), Some(&b)],
            &[false, true],
            None,
        )
        .unwrap();
        assert_eq!(out[0].shape(), &[2]);
        assert_eq!(out[0].as_f32().unwrap(), &[11.0, 25.0]);
        let out = run(
            &node("MatMul", 2),
            13,
            &[Some(&a), Some(&m)],
            &[false, true],
            None,
        )
        .unwrap();
        assert_eq!(out[0].shape(), &[2]);
        assert_eq!(out[0].as_f32().unwrap(), &[7.0, 10.0]);
    }

    #[test]
    fn broadcast_batches_match_naive() {
        let mut rng = Rng::new(2);
        let cases: &[(&[usize], &[usize])] = &[
            (&[3, 4, 5], &[5, 6]),
            (&[2, 1, 4, 5], &[3, 5, 2]),
            (&[4, 5], &[2, 3, 5, 7]),
            (&[2, 3, 4, 5], &[2, 3, 5, 6]),
            (&[1, 7], &[3, 7, 2]),
            (&[3, 2, 8], &[8]),
            (&[8], &[3, 8, 2]),
            (&[2, 40, 64], &[2, 64, 40]),
        ];
        for (sa, sb) in cases {
            let a = t(sa, rng.vec(sa.iter().product()));
            let b = t(sb, rng.vec(sb.iter().product()));
            let (shape, want) = naive(&a, &b);
            for constant in [[false, false], [false, true]] {
                for act in [None, Some(Activation::Relu)] {
                    let out = run(
                        &node("MatMul", 2),
                        13,
                        &[Some(&a), Some(&b)],
                        &constant,
                        act,
                    )
                    .unwrap();
                    assert_eq!(out[0].shape(), &shape[..], "{sa:?} x {sb:?}");
                    let want: Vec<f32> = want
                        .iter()
                        .map(|&v| act.map_or(v, |f| f.apply_scalar(v)))
                        .collect();
                    assert_close(
                        out[0].as_f32().unwrap(),
                        &want,
                        1e-5,
                        &format!("{sa:?} x {sb:?}"),
                    );
                }
            }
        }
    }

    #[test]
    fn errors_and_symbolic_inference() {
        let a = t(&[2, 3], vec![0.0; 6]);
        let b = t(&[2, 3], vec![0.0; 6]);
        let err = run(
            &node("MatMul", 2),
            13,
            &[Some(&a), Some(&b)],
            &[false, false],
            None,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("n0") && err.contains("inner"), "{err}");
        let a = t(&[2, 2, 3], vec![0.0; 12]);
        let b = t(&[3, 3, 2], vec![0.0; 18]);
        assert!(run(
            &node("MatMul", 2),
            13,
            &[Some(&a), Some(&b)],
            &[false, false],
            None
        )
        .is_err());
        let ty = infer(
            &node("MatMul", 2),
            13,
            vec![
                Some(TypeInfo::new(
                    DType::F32,
                    vec![Dim::Sym("B".into()), Dim::Sym("S".into()), Dim::Known(384)],
                )),
                Some(TypeInfo::known(DType::F32, &[384, 1536])),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            ty[0].shape.as_deref().unwrap(),
            &[Dim::Sym("B".into()), Dim::Sym("S".into()), Dim::Known(1536)]
        );
    }
}
