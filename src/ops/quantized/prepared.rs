//! The kernel shape shared by the quantized product ops (QLinearConv, ConvInteger,
//! QLinearMatMul, MatMulInteger): weights, scales and zero points are nearly always
//! initializers, so they are converted once when the plan is compiled (packed weights,
//! requantization multipliers); when any of them is computed at run time, every run converts
//! them afresh.

use crate::error::Result;
use crate::ir::{DType, Node, Tensor};
use crate::ops::{required, CompileCtx, Kernel, RunCtx};

/// Builds the prepared form of a node from its inputs (entry 0, the data, is not read) and
/// the data's element type.
pub(super) type PrepareFn<P> = fn(&Node, DType, &[Option<&Tensor>]) -> Result<P>;

/// A prepared node applied to its data input.
pub(super) trait Apply: Send + Sync + 'static {
    fn apply(&self, node: &Node, x: &Tensor, ctx: &mut RunCtx) -> Result<Tensor>;
}

struct PreparedKernel<P> {
    node: Node,
    prepare: PrepareFn<P>,
    prepared: Option<P>,
}

/// Prepares the node now when every input after the data is constant (or absent) and, if
/// `needs_dtype`, the data's type is known; else leaves it to each run. (The QLinear ops take
/// the data type from their zero points, and shape inference may not know it: preparing on
/// every run would repack the weights each time.)
pub(super) fn compile<P: Apply>(
    ctx: &CompileCtx,
    needs_dtype: bool,
    prepare: PrepareFn<P>,
) -> Result<Box<dyn Kernel>> {
    let node = ctx.node;
    let inputs: Vec<Option<&Tensor>> = (0..node.inputs.len())
        .map(|i| if i == 0 { None } else { ctx.constant(i) })
        .collect();
    let all_constant =
        (1..node.inputs.len()).all(|i| node.input(i).is_none() || inputs[i].is_some());
    let dtype = match ctx.input_type(0).map(|t| t.dtype) {
        Some(d) => Some(d),
        None if !needs_dtype => Some(DType::U8),
        None => None,
    };
    let prepared = match dtype {
        Some(dtype) if all_constant => Some(prepare(node, dtype, &inputs)?),
        _ => None,
    };
    Ok(Box::new(PreparedKernel {
        node: node.clone(),
        prepare,
        prepared,
    }))
}

impl<P: Apply> Kernel for PreparedKernel<P> {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let built;
        let p = match &self.prepared {
            Some(p) => p,
            None => {
                built = (self.prepare)(&self.node, x.dtype(), inputs)?;
                &built
            }
        };
        Ok(vec![p.apply(&self.node, x, ctx)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static PREPARED: AtomicUsize = AtomicUsize::new(0);

    struct Identity;

    impl Apply for Identity {
        fn apply(&self, _: &Node, x: &Tensor, _: &mut RunCtx) -> Result<Tensor> {
            Ok(x.clone())
        }
    }

    fn prepare(_: &Node, _: DType, _: &[Option<&Tensor>]) -> Result<Identity> {
        PREPARED.fetch_add(1, Ordering::SeqCst);
        Ok(Identity)
    }

    /// With constant weights, a QLinear-style kernel is prepared once when the plan is
    /// compiled, even without a known data type (intermediate values often have none), and
    /// never again per run: a regression once made every run repack the weights.
    #[test]
    fn constant_weights_are_prepared_once_at_compile_time() {
        let node = Node {
            name: "conv".into(),
            op_type: "QLinearConv".into(),
            domain: String::new(),
            inputs: vec!["x".into(), "w".into()],
            outputs: vec!["y".into()],
            attrs: Default::default(),
            doc_string: String::new(),
        };
        let w = Tensor::scalar_f32(1.0);
        let ctx = CompileCtx {
            node: &node,
            opset: 13,
            input_types: vec![None, None],
            constants: vec![None, Some(&w)],
            fused_activation: None,
        };
        let before = PREPARED.load(Ordering::SeqCst);
        let kernel = compile(&ctx, false, prepare).unwrap();
        assert_eq!(PREPARED.load(Ordering::SeqCst), before + 1);
        let x = Tensor::scalar_f32(2.0);
        let mut run = RunCtx::default();
        for _ in 0..3 {
            kernel.run(&[Some(&x), Some(&w)], &mut run).unwrap();
        }
        assert_eq!(PREPARED.load(Ordering::SeqCst), before + 1);
        // A weight computed at run time is prepared on every run.
        let ctx = CompileCtx {
            constants: vec![None, None],
            ..ctx
        };
        let kernel = compile(&ctx, false, prepare).unwrap();
        kernel.run(&[Some(&x), Some(&w)], &mut run).unwrap();
        kernel.run(&[Some(&x), Some(&w)], &mut run).unwrap();
        assert_eq!(PREPARED.load(Ordering::SeqCst), before + 3);
    }
}
