//! Test helpers: build a one-node graph fragment, infer, compile and run it, and check that
//! what ran agrees with what inference promised.

use super::{lookup, CompileCtx, InferCtx, RunCtx};
use crate::error::Result;
use crate::ir::{Attr, Dim, Node, Tensor, TypeInfo};

pub fn node(op: &str, n_in: usize, n_out: usize, attrs: &[(&str, Attr)]) -> Node {
    let mut n = Node::new(
        "test_node",
        op,
        (0..n_in).map(|i| format!("in{i}")).collect(),
        (0..n_out).map(|i| format!("out{i}")).collect(),
    );
    for (k, v) in attrs {
        n = n.with_attr(k, v.clone());
    }
    n
}

fn with_omitted(mut n: Node, inputs: &[Option<Tensor>]) -> Node {
    for (i, t) in inputs.iter().enumerate() {
        if t.is_none() {
            n.inputs[i].clear();
        }
    }
    n
}

/// Inference on types only (`consts` marks inputs known before running).
pub fn infer(
    op: &str,
    opset: i64,
    attrs: &[(&str, Attr)],
    types: Vec<Option<TypeInfo>>,
    consts: Vec<Option<Tensor>>,
    n_out: usize,
) -> Result<Vec<TypeInfo>> {
    let node = node(op, types.len(), n_out, attrs);
    let def = lookup(&node, opset)?;
    let ctx = InferCtx {
        node: &node,
        opset,
        input_types: types,
        constants: (0..node.inputs.len())
            .map(|i| consts.get(i).and_then(Option::as_ref))
            .collect(),
    };
    (def.infer)(&ctx)
}

/// Runs the op twice, once with its inputs unknown at compile time and once with all of them
/// constant, checks both agree with each other and with inference, and returns the outputs.
pub fn run(
    op: &str,
    opset: i64,
    attrs: &[(&str, Attr)],
    inputs: Vec<Option<Tensor>>,
    n_out: usize,
) -> Result<Vec<Tensor>> {
    let dynamic = run_mode(op, opset, attrs, &inputs, n_out, false)?;
    let constant = run_mode(op, opset, attrs, &inputs, n_out, true)?;
    // Debug text compares NaNs as equal, which `==` would not.
    assert_eq!(
        format!("{dynamic:?}"),
        format!("{constant:?}"),
        "constant and dynamic inputs disagree"
    );
    Ok(dynamic)
}

fn run_mode(
    op: &str,
    opset: i64,
    attrs: &[(&str, Attr)],
    inputs: &[Option<Tensor>],
    n_out: usize,
    as_constants: bool,
) -> Result<Vec<Tensor>> {
    let node = with_omitted(node(op, inputs.len(), n_out, attrs), inputs);
    let def = lookup(&node, opset)?;
    let types: Vec<Option<TypeInfo>> = inputs
        .iter()
        .map(|t| t.as_ref().map(|t| TypeInfo::known(t.dtype(), t.shape())))
        .collect();
    let constants: Vec<Option<&Tensor>> = inputs
        .iter()
        .map(|t| t.as_ref().filter(|_| as_constants))
        .collect();
    let ictx = InferCtx {
        node: &node,
        opset,
        input_types: types.clone(),
        constants: constants.clone(),
    };
    let inferred = (def.infer)(&ictx)?;
    let cctx = CompileCtx {
        node: &node,
        opset,
        input_types: types,
        constants,
        fused_activation: None,
    };
    let kernel = (def.compile)(&cctx)?;
    let refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
    let mut rctx = RunCtx::default();
    let outs = kernel.run(&refs, &mut rctx)?;
    assert!(
        outs.len() >= inferred.len().min(n_out),
        "{op}: {} outputs, inference promised {}",
        outs.len(),
        inferred.len()
    );
    for (i, (t, ty)) in outs.iter().zip(&inferred).enumerate() {
        assert_eq!(t.dtype(), ty.dtype, "{op}: output {i} dtype");
        if let Some(dims) = &ty.shape {
            assert_eq!(dims.len(), t.rank(), "{op}: output {i} rank ({ty})");
            for (d, &n) in dims.iter().zip(t.shape()) {
                if let Dim::Known(k) = d {
                    assert_eq!(*k, n, "{op}: output {i} shape {:?} vs {ty}", t.shape());
                }
            }
        }
    }
    Ok(outs)
}

/// Runs and returns the single f32 output's shape and values.
pub fn run_f32(
    op: &str,
    opset: i64,
    attrs: &[(&str, Attr)],
    inputs: Vec<Option<Tensor>>,
) -> (Vec<usize>, Vec<f32>) {
    let out = run(op, opset, attrs, inputs, 1)
        .unwrap_or_else(|e| panic!("{op}: {e}"))
        .remove(0);
    (
        out.shape().to_vec(),
        out.as_f32().expect("f32 output").to_vec(),
    )
}

pub fn f32t(shape: &[usize], data: &[f32]) -> Option<Tensor> {
    Some(Tensor::from_f32(shape.to_vec(), data.to_vec()).expect("test tensor"))
}

pub fn i64t(shape: &[usize], data: &[i64]) -> Option<Tensor> {
    Some(Tensor::from_i64(shape.to_vec(), data.to_vec()).expect("test tensor"))
}

pub fn iota(shape: &[usize]) -> Option<Tensor> {
    let n: usize = shape.iter().product();
    f32t(shape, &(0..n).map(|x| x as f32).collect::<Vec<_>>())
}

pub fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "length: {got:?} vs {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= tol * (1.0 + w.abs()) || (g.is_nan() && w.is_nan());
        assert!(
            ok,
            "element {i}: got {g}, want {w}\n got {got:?}\nwant {want:?}"
        );
    }
}

pub fn sym(name: &str) -> Dim {
    Dim::Sym(name.into())
}
