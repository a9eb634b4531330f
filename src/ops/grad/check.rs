//! Finite-difference gradient checks of single nodes, shared by the rule tests.
//!
//! The loss is `sum_k <w_k, y_k>` over the node's f32 outputs for fixed random weights `w`,
//! accumulated in f64; each input element is moved by `±eps` and the central difference is
//! compared with the analytic gradient.

use super::{grad_rule, train_forward, GradCtx, TrainForwardCtx};
use crate::ir::{DType, Node, Tensor};
use crate::ops::{lookup, CompileCtx, RunCtx};

/// Small deterministic generator for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-1, 1).
    pub fn sym(&mut self) -> f32 {
        self.next_f32() * 2.0 - 1.0
    }

    pub fn tensor(&mut self, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_f32(shape.to_vec(), (0..n).map(|_| self.sym()).collect()).unwrap()
    }

    /// Values at least `gap` apart in magnitude from zero (away from the kink of ReLU-likes).
    pub fn away_from_zero(&mut self, shape: &[usize], gap: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| {
                let x = self.sym();
                x.signum() * (gap + x.abs())
            })
            .collect();
        Tensor::from_f32(shape.to_vec(), v).unwrap()
    }

    /// Distinct values: a shuffled ladder with step `step`, centred on zero.
    pub fn distinct(&mut self, shape: &[usize], step: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut v: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * step).collect();
        for i in (1..n).rev() {
            let j = (self.next_f32() * (i + 1) as f32) as usize % (i + 1);
            v.swap(i, j);
        }
        Tensor::from_f32(shape.to_vec(), v).unwrap()
    }
}

fn forward(node: &Node, opset: i64, inputs: &[Option<Tensor>]) -> (Vec<Tensor>, Vec<Tensor>) {
    let refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
    if let Some(f) = train_forward(node) {
        let out = f(&TrainForwardCtx {
            node,
            opset,
            inputs: &refs,
            seed: 7,
        })
        .unwrap();
        return (out.outputs, out.saved);
    }
    let def = lookup(node, opset).unwrap();
    let kernel = (def.compile)(&CompileCtx {
        node,
        opset,
        input_types: refs
            .iter()
            .map(|t| t.map(|t| crate::ir::TypeInfo::known(t.dtype(), t.shape())))
            .collect(),
        constants: refs
            .iter()
            .map(|t| t.filter(|t| t.dtype() != DType::F32))
            .collect(),
        fused_activation: None,
    })
    .unwrap();
    (kernel.run(&refs, &mut RunCtx::default()).unwrap(), vec![])
}

fn loss(outputs: &[Tensor], weights: &[Tensor]) -> f64 {
    outputs
        .iter()
        .zip(weights)
        .filter(|(y, _)| y.dtype() == DType::F32)
        .map(|(y, w)| {
            y.as_f32()
                .unwrap()
                .iter()
                .zip(w.as_f32().unwrap())
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
        })
        .sum()
}

/// Checks the analytic gradients of every input with `wants[i]` against central differences
/// with step `eps`; `tol` bounds `|analytic - numeric| / max(1, |numeric|)`.
pub fn check_node(
    node: &Node,
    opset: i64,
    inputs: &[Option<Tensor>],
    wants: &[bool],
    eps: f32,
    tol: f64,
) {
    let mut rng = Rng::new(99);
    let (outputs, saved) = forward(node, opset, inputs);
    let weights: Vec<Tensor> = outputs
        .iter()
        .map(|y| {
            if y.dtype() == DType::F32 {
                rng.tensor(y.shape())
            } else {
                y.clone()
            }
        })
        .collect();
    let rule = grad_rule(node).unwrap();
    let in_refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
    let out_refs: Vec<Option<&Tensor>> = outputs.iter().map(Some).collect();
    let grad_refs: Vec<Option<&Tensor>> = weights
        .iter()
        .map(|w| (w.dtype() == DType::F32).then_some(w))
        .collect();
    let mut wants_all = wants.to_vec();
    wants_all.resize(inputs.len(), false);
    let grads = rule(&GradCtx {
        node,
        opset,
        inputs: &in_refs,
        outputs: &out_refs,
        grad_outputs: &grad_refs,
        wants: &wants_all,
        saved: &saved,
    })
    .unwrap();
    for (i, want) in wants_all.iter().enumerate() {
        if !want {
            continue;
        }
        let x = inputs[i].as_ref().unwrap();
        let g = grads
            .get(i)
            .and_then(Option::as_ref)
            .unwrap_or_else(|| panic!("{}: no gradient for input {i}", node.op_type));
        assert_eq!(g.shape(), x.shape(), "{}: gradient {i} shape", node.op_type);
        let analytic = g.as_f32().unwrap();
        for (e, &a) in analytic.iter().enumerate() {
            let probe = |delta: f32| {
                let mut moved = inputs.to_vec();
                if let Some(t) = moved[i].as_mut() {
                    t.as_f32_mut().unwrap()[e] += delta;
                }
                let (out, _) = forward(node, opset, &moved);
                loss(&out, &weights)
            };
            let numeric = (probe(eps) - probe(-eps)) / (2.0 * eps as f64);
            let err = (a as f64 - numeric).abs() / numeric.abs().max(1.0);
            assert!(
                err <= tol,
                "{} input {i} element {e}: analytic {} numeric {numeric} (shape {:?})",
                node.op_type,
                a,
                x.shape()
            );
        }
    }
}
