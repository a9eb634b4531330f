//! ONNX `Gemm` (opsets 7-21): `Y = alpha * A' * B' + beta * C` with `transA`/`transB` and C
//! broadcast from a scalar, `[N]`, `[1, N]`, `[M, 1]` or `[M, N]`; plus a fused activation.
//! A constant B is packed once; a constant C becomes a pre-scaled bias of the GEMM epilogue.

use super::{alloc_output, data, f32_input, require_f32};
use crate::error::Result;
use crate::ir::{Dim, Node, Tensor, TypeInfo};
use crate::kernels::activation::Activation;
use crate::kernels::gemm::{gemm_threads, Bias, Epilogue, Lhs, MatMut, MatRef, PackedB, Rhs};
use crate::ops::{node_error, CompileCtx, InferCtx, Kernel, OpDef, RunCtx};

pub const GEMM: OpDef = OpDef {
    op_type: "Gemm",
    domain: "",
    opsets: (7, 21),
    infer,
    compile,
    fuses_activation: true,
};

#[derive(Clone, Copy)]
struct Attrs {
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
}

fn attrs(node: &Node) -> Result<Attrs> {
    Ok(Attrs {
        alpha: node.attr_float_or("alpha", 1.0)?,
        beta: node.attr_float_or("beta", 1.0)?,
        trans_a: node.attr_int_or("transA", 0)? != 0,
        trans_b: node.attr_int_or("transB", 0)? != 0,
    })
}

fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let node = ctx.node;
    let at = attrs(node)?;
    let a = ctx.input_type(0)?;
    let b = ctx.input_type(1)?;
    let dim = |t: &TypeInfo, trans: bool, which: &str| -> Result<Dim> {
        match &t.shape {
            None => Ok(Dim::Unknown),
            Some(s) if s.len() == 2 => Ok(s[if trans { 1 } else { 0 }].clone()),
            Some(s) => Err(node_error(
                node,
                format!("{which} must be 2-D, got rank {}", s.len()),
            )),
        }
    };
    let m = dim(a, at.trans_a, "A")?;
    let n = dim(b, !at.trans_b, "B")?;
    Ok(vec![TypeInfo::new(a.dtype, vec![m, n])])
}

/// How C enters the product, decided from its shape.
enum CPlan {
    None,
    /// `beta * C` for a one-element C, written into the output before the product.
    Scalar(f32),
    /// `beta * C` as one value per column (scalar, `[N]`, `[1, N]`).
    PerCol(Vec<f32>),
    /// `beta * C` as one value per row (`[M, 1]`).
    PerRow(Vec<f32>),
}

struct GemmKernel {
    node: Node,
    at: Attrs,
    act: Option<Activation>,
    packed_b: Option<PackedB>,
    /// A constant C, prepared (None when C is absent or only known at run time).
    c_plan: Option<CPlan>,
}

fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let node = ctx.node;
    for i in 0..3 {
        require_f32(node, ctx.input_type(i), i)?;
    }
    let at = attrs(node)?;
    let packed_b = match ctx.constant(1) {
        Some(b) => {
            let (k, n) = dims2(node, b.shape(), at.trans_b, "B")?;
            // Packed straight from the weight's own buffer: a copy first would fault in a
            // weight-sized block of fresh pages per session.
            let owned;
            let v = match b.as_f32() {
                Ok(v) => v,
                Err(_) => {
                    owned = b.to_f32_vec();
                    &owned
                }
            };
            let m = MatRef::row_major(v, b.shape()[0], b.shape()[1])?;
            let m = if at.trans_b { m.t() } else { m };
            debug_assert_eq!((m.rows(), m.cols()), (k, n));
            Some(PackedB::new(m))
        }
        None => None,
    };
    let c_plan = match (node.input(2), ctx.constant(2)) {
        (None, _) => Some(CPlan::None),
        (Some(_), Some(c)) => const_c_plan(c, at.beta),
        (Some(_), None) => None,
    };
    Ok(Box::new(GemmKernel {
        node: node.clone(),
        at,
        act: ctx.fused_activation,
        packed_b,
        c_plan,
    }))
}

/// A bias vector for a constant C that broadcasts along one axis; None for a full `[M, N]`.
fn const_c_plan(c: &Tensor, beta: f32) -> Option<CPlan> {
    let scaled = || c.to_f32_vec().iter().map(|v| beta * v).collect::<Vec<_>>();
    if c.numel() == 1 && c.rank() <= 2 {
        return Some(CPlan::Scalar(scaled()[0]));
    }
    match c.shape() {
        [_] | [1, _] => Some(CPlan::PerCol(scaled())),
        [_, 1] => Some(CPlan::PerRow(scaled())),
        _ => None,
    }
}

/// `(rows, cols)` of a 2-D operand after optional transposition.
fn dims2(node: &Node, shape: &[usize], trans: bool, which: &str) -> Result<(usize, usize)> {
    match *shape {
        [r, c] => Ok(if trans { (c, r) } else { (r, c) }),
        _ => Err(node_error(
            node,
            format!("{which} must be 2-D, got shape {shape:?}"),
        )),
    }
}

impl Kernel for GemmKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let node = &self.node;
        let at = self.at;
        let a = f32_input(node, inputs, 0)?;
        let (m, k) = dims2(node, a.shape(), at.trans_a, "A")?;
        let am = MatRef::row_major(data(a), a.shape()[0], a.shape()[1])?;
        let am = if at.trans_a { am.t() } else { am };
        let b_in;
        let rhs = match &self.packed_b {
            Some(p) => Rhs::Packed(p),
            None => {
                b_in = f32_input(node, inputs, 1)?;
                dims2(node, b_in.shape(), at.trans_b, "B")?;
                let bm = MatRef::row_major(data(b_in), b_in.shape()[0], b_in.shape()[1])?;
                Rhs::Mat(if at.trans_b { bm.t() } else { bm })
            }
        };
        let (kb, n) = match rhs {
            Rhs::Packed(p) => (p.rows(), p.cols()),
            Rhs::Mat(mm) => (mm.rows(), mm.cols()),
            Rhs::Gather(g) => (g.rows(), g.cols()),
        };
        if kb != k {
            return Err(node_error(
                node,
                format!("A' is {m}x{k} but B' is {kb}x{n}: inner dimensions differ"),
            ));
        }
        let mut out = alloc_output(node, ctx, &[m, n])?;
        let mut beta = 0.0;
        let bias = match &self.c_plan {
            Some(CPlan::None) => Bias::None,
            Some(CPlan::Scalar(v)) => {
                out.fill(*v);
                beta = 1.0;
                Bias::None
            }
            Some(CPlan::PerCol(v)) => per_col(node, v, n)?,
            Some(CPlan::PerRow(v)) => per_row(node, v, m)?,
            None => {
                let c = f32_input(node, inputs, 2)?;
                broadcast_c(node, c, m, n, &mut out)?;
                beta = at.beta;
                Bias::None
            }
        };
        gemm_threads(
            crate::kernels::par::threads(),
            at.alpha,
            Lhs::Mat(am),
            rhs,
            beta,
            MatMut::row_major(&mut out, m, n)?,
            Epilogue {
                bias,
                act: self.act,
            },
        )
        .map_err(|e| e.at_node(node))?;
        Ok(vec![Tensor::from_f32(vec![m, n], out)?])
    }
}

fn per_col<'a>(node: &Node, v: &'a [f32], n: usize) -> Result<Bias<'a>> {
    if v.len() == n {
        Ok(Bias::PerCol(v))
    } else {
        Err(node_error(
            node,
            format!("C has {} columns, cannot broadcast to {n}", v.len()),
        ))
    }
}

fn per_row<'a>(node: &Node, v: &'a [f32], m: usize) -> Result<Bias<'a>> {
    if v.len() == m {
        Ok(Bias::PerRow(v))
    } else {
        Err(node_error(
            node,
            format!("C has {} rows, cannot broadcast to {m}", v.len()),
        ))
    }
}

/// Writes C broadcast to `[m, n]` into `out` (the GEMM then scales it by beta).
fn broadcast_c(node: &Node, c: &Tensor, m: usize, n: usize, out: &mut [f32]) -> Result<()> {
    let v = data(c);
    let (cr, cc) = match *c.shape() {
        [] => (1, 1),
        [x] => (1, x),
        [r, x] => (r, x),
        _ => (0, 0),
    };
    let ok = (cr == 1 || cr == m) && (cc == 1 || cc == n) && v.len() == cr * cc;
    if !ok {
        return Err(node_error(
            node,
            format!(
                "C of shape {:?} does not broadcast to [{m}, {n}]",
                c.shape()
            ),
        ));
    }
    for (i, row) in out.chunks_exact_mut(n).enumerate() {
        let src = &v[if cr == 1 { 0 } else { i * cc }..][..cc];
        if cc == 1 {
            row.fill(src[0]);
        } else {
            row.copy_from_slice(src);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Attr, DType};
    use crate::kernels::gemm::gemm_reference;
    use crate::kernels::testutil::{assert_close, Rng};
    use crate::ops::nn::test_support::{infer, node, run};

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_f32(shape.to_vec(), v).unwrap()
    }

    #[test]
    fn hand_checked_small_product() {
        // [[1, 2], [3, 4]] x [[5, 6], [7, 8]] = [[19, 22], [43, 50]]; C = [1, -100].
        let a = t(&[2, 2], vec![1., 2., 3., 4.]);
        let b = t(&[2, 2], vec![5., 6., 7., 8.]);
        let c = t(&[2], vec![1., -100.]);
        let n = node("Gemm", 3);
        for constant in [[false, true, true], [false, false, false]] {
            let out = run(&n, 13, &[Some(&a), Some(&b), Some(&c)], &constant, None).unwrap();
            assert_eq!(out[0].as_f32().unwrap(), &[20., -78., 44., -50.]);
            let out = run(
                &n,
                13,
                &[Some(&a), Some(&b), Some(&c)],
                &constant,
                Some(Activation::Relu),
            )
            .unwrap();
            assert_eq!(out[0].as_f32().unwrap(), &[20., 0., 44., 0.]);
        }
    }

    #[test]
    fn transposes_scales_and_every_c_broadcast() {
        let mut rng = Rng::new(1);
        let (m, k, n) = (5, 7, 9);
        let a_t = t(&[k, m], rng.vec(k * m));
        let b_t = t(&[n, k], rng.vec(n * k));
        let node = node("Gemm", 3)
            .with_attr("transA", Attr::Int(1))
            .with_attr("transB", Attr::Int(1))
            .with_attr("alpha", Attr::Float(0.5))
            .with_attr("beta", Attr::Float(-2.0));
        let cs = [
            t(&[], vec![3.0]),
            t(&[1], vec![3.0]),
            t(&[n], rng.vec(n)),
            t(&[1, n], rng.vec(n)),
            t(&[m, 1], rng.vec(m)),
            t(&[m, n], rng.vec(m * n)),
        ];
        for c in &cs {
            // Reference: C broadcast into the output, then alpha*A'B' + beta*C.
            let mut want = vec![0.0; m * n];
            broadcast_c(&node, c, m, n, &mut want).unwrap();
            let am = MatRef::row_major(data(&a_t), k, m).unwrap().t();
            let bm = MatRef::row_major(data(&b_t), n, k).unwrap().t();
            gemm_reference(
                0.5,
                am,
                bm,
                -2.0,
                MatMut::row_major(&mut want, m, n).unwrap(),
                Epilogue::default(),
            )
            .unwrap();
            for constant in [
                [false, true, true],
                [false, false, false],
                [true, false, true],
            ] {
                let out = run(
                    &node,
                    11,
                    &[Some(&a_t), Some(&b_t), Some(c)],
                    &constant,
                    None,
                )
                .unwrap();
                assert_eq!(out[0].shape(), &[m, n]);
                assert_close(
                    out[0].as_f32().unwrap(),
                    &want,
                    1e-5,
                    &format!("C {:?}", c.shape()),
                );
            }
        }
        // No C at all.
        let mut node = node;
        node.inputs.truncate(2);
        let out = run(&node, 11, &[Some(&a_t), Some(&b_t)], &[false, true], None).unwrap();
        let mut want = vec![0.0; m * n];
        let am = MatRef::row_major(data(&a_t), k, m).unwrap().t();
        let bm = MatRef::row_major(data(&b_t), n, k).unwrap().t();
        gemm_reference(
            0.5,
            am,
            bm,
            0.0,
            MatMut::row_major(&mut want, m, n).unwrap(),
            Epilogue::default(),
        )
        .unwrap();
        assert_close(out[0].as_f32().unwrap(), &want, 1e-5, "no C");
    }

    #[test]
    fn errors_and_inference() {
        let a = t(&[2, 3], vec![0.0; 6]);
        let b = t(&[2, 3], vec![0.0; 6]);
        let err = run(
            &node("Gemm", 2),
            13,
            &[Some(&a), Some(&b)],
            &[false, true],
            None,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("n0") && err.contains("inner"), "{err}");
        let c = t(&[3], vec![0.0; 3]);
        let b = t(&[3, 2], vec![0.0; 6]);
        assert!(run(
            &node("Gemm", 3),
            13,
            &[Some(&a), Some(&b), Some(&c)],
            &[false, true, true],
            None
        )
        .is_err());
        let ty = infer(
            &node("Gemm", 2).with_attr("transB", Attr::Int(1)),
            13,
            vec![
                Some(TypeInfo::new(
                    DType::F32,
                    vec![Dim::Sym("N".into()), Dim::Known(3136)],
                )),
                Some(TypeInfo::known(DType::F32, &[128, 3136])),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            ty[0].shape.as_deref().unwrap(),
            &[Dim::Sym("N".into()), Dim::Known(128)]
        );
    }
}
