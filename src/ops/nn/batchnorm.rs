//! ONNX `BatchNormalization` (opsets 6-21), inference mode only:
//! `y = (x - mean) / sqrt(var + epsilon) * scale + bias`, per channel (axis 1).
//! Constant statistics are folded at compile time into one multiply-add per element.
//! `training_mode = 1`, the training outputs and the old `spatial = 0` form are errors.

use rayon::prelude::*;

use super::{alloc_output, data, f32_input, require_f32};
use crate::error::Result;
use crate::ir::{Node, Tensor, TypeInfo};
use crate::ops::activation::infer_same_as_first;
use crate::ops::{node_error, CompileCtx, InferCtx, Kernel, OpDef, RunCtx};

pub const BATCH_NORMALIZATION: OpDef = OpDef {
    op_type: "BatchNormalization",
    domain: "",
    opsets: (6, 21),
    infer,
    compile,
    fuses_activation: false,
};

/// Elements below which the normalisation stays on one thread.
const PAR_MIN_ELEMS: usize = 1 << 16;

fn check_mode(node: &Node) -> Result<()> {
    if node.attr_int_or("training_mode", 0)? != 0 {
        return Err(node_error(
            node,
            "training_mode=1 is not supported (inference only)",
        ));
    }
    if node.attr_int_or("spatial", 1)? == 0 {
        return Err(node_error(node, "spatial=0 is not supported"));
    }
    if node.outputs.iter().skip(1).any(|o| !o.is_empty()) {
        return Err(node_error(
            node,
            "the training outputs (running mean/var, saved mean/var) are not supported",
        ));
    }
    Ok(())
}

fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    check_mode(ctx.node)?;
    infer_same_as_first(ctx)
}

/// Per-channel `(a, b)` with `y = a * x + b`.
fn fold(node: &Node, stats: [&[f32]; 4], eps: f32) -> Result<(Vec<f32>, Vec<f32>)> {
    let [scale, bias, mean, var] = stats;
    let c = scale.len();
    if bias.len() != c || mean.len() != c || var.len() != c {
        return Err(node_error(
            node,
            format!(
                "scale, bias, mean and var have {}, {}, {} and {} values; they must agree",
                c,
                bias.len(),
                mean.len(),
                var.len()
            ),
        ));
    }
    let a: Vec<f32> = scale
        .iter()
        .zip(var)
        .map(|(&s, &v)| s / (v + eps).sqrt())
        .collect();
    let b = bias
        .iter()
        .zip(mean)
        .zip(&a)
        .map(|((&bb, &m), &aa)| bb - m * aa)
        .collect();
    Ok((a, b))
}

struct BatchNormKernel {
    node: Node,
    eps: f32,
    folded: Option<(Vec<f32>, Vec<f32>)>,
}

fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let node = ctx.node;
    check_mode(node)?;
    for i in 0..5 {
        require_f32(node, ctx.input_type(i), i)?;
    }
    let eps = node.attr_float_or("epsilon", 1e-5)?;
    let consts: Option<Vec<Vec<f32>>> = (1..5)
        .map(|i| ctx.constant(i).map(Tensor::to_f32_vec))
        .collect();
    let folded = match consts {
        Some(v) => Some(fold(node, [&v[0], &v[1], &v[2], &v[3]], eps)?),
        None => None,
    };
    Ok(Box::new(BatchNormKernel {
        node: node.clone(),
        eps,
        folded,
    }))
}

impl Kernel for BatchNormKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let node = &self.node;
        let x = f32_input(node, inputs, 0)?;
        let computed;
        let (a, b) = match &self.folded {
            Some((a, b)) => (a, b),
            None => {
                let mut stats = [&[][..]; 4];
                for (i, s) in stats.iter_mut().enumerate() {
                    *s = data(f32_input(node, inputs, i + 1)?);
                }
                computed = fold(node, stats, self.eps)?;
                (&computed.0, &computed.1)
            }
        };
        let s = x.shape();
        if s.len() < 2 || s[1] != a.len() {
            return Err(node_error(
                node,
                format!(
                    "input of shape {s:?} does not have {} channels on axis 1",
                    a.len()
                ),
            ));
        }
        let c = s[1];
        let plane: usize = s[2..].iter().product();
        let mut out = alloc_output(node, ctx, s)?;
        if plane > 0 {
            let one = |(i, (dst, src)): (usize, (&mut [f32], &[f32]))| {
                let (ai, bi) = (a[i % c], b[i % c]);
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = ai * v + bi;
                }
            };
            if crate::kernels::par::threads() > 1 && out.len() >= PAR_MIN_ELEMS {
                out.par_chunks_mut(plane)
                    .zip(data(x).par_chunks(plane))
                    .enumerate()
                    .for_each(one);
            } else {
                out.chunks_mut(plane)
                    .zip(data(x).chunks(plane))
                    .enumerate()
                    .for_each(one);
            }
        }
        Ok(vec![Tensor::from_f32(s.to_vec(), out)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Attr;
    use crate::ops::nn::test_support::{node, run};

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_f32(shape.to_vec(), v).unwrap()
    }

    #[test]
    fn normalises_per_channel() {
        let x = t(&[1, 2, 2], vec![1., 3., 10., 20.]);
        let scale = t(&[2], vec![2., 0.5]);
        let bias = t(&[2], vec![1., -1.]);
        let mean = t(&[2], vec![1., 10.]);
        let var = t(&[2], vec![4., 25.]);
        let n = node("BatchNormalization", 5).with_attr("epsilon", Attr::Float(0.0));
        let ins = [Some(&x), Some(&scale), Some(&bias), Some(&mean), Some(&var)];
        for constant in [[false, true, true, true, true], [false; 5]] {
            let out = run(&n, 15, &ins, &constant, None).unwrap();
            // Channel 0: (x - 1) / 2 * 2 + 1; channel 1: (x - 10) / 5 * 0.5 - 1.
            assert_eq!(out[0].as_f32().unwrap(), &[1., 3., -1., 0.]);
        }
    }

    #[test]
    fn training_forms_and_mismatches_are_errors() {
        let x = t(&[1, 2, 2], vec![0.0; 4]);
        let v = t(&[2], vec![1.0; 2]);
        let ins = [Some(&x), Some(&v), Some(&v), Some(&v), Some(&v)];
        let n = node("BatchNormalization", 5).with_attr("training_mode", Attr::Int(1));
        let err = run(&n, 15, &ins, &[false; 5], None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("training_mode") && err.contains("n0"), "{err}");
        let mut n = node("BatchNormalization", 5);
        n.outputs.push("running_mean".into());
        assert!(run(&n, 9, &ins, &[false; 5], None).is_err());
        let x3 = t(&[1, 3, 1], vec![0.0; 3]);
        let ins = [Some(&x3), Some(&v), Some(&v), Some(&v), Some(&v)];
        assert!(run(&node("BatchNormalization", 5), 15, &ins, &[false; 5], None).is_err());
    }
}
