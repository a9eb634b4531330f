//! Backward rules: for each differentiable op, the gradients of a scalar loss with respect to
//! a node's inputs, given the gradients with respect to its outputs and the values the
//! forward pass kept. One module per op family; [`grad_rule`] is the registry the training
//! executor (`crate::train`) consults.
//!
//! Two ops behave differently while training: `BatchNormalization` normalises with batch
//! statistics (and moves its running averages), `Dropout` zeroes a seeded random mask. Their
//! training-mode forwards live here too ([`train_forward`]); everything else runs the
//! ordinary inference kernels forward.

mod activation;
mod batchnorm;
mod conv;
mod dense;
mod dropout;
mod elementwise;
mod pool;
mod shape;
mod softmax;
mod window;

pub use dropout::dropout_mask;
pub use elementwise::reduce_to_shape;

use crate::error::Result;
use crate::ir::{Node, Tensor};
use crate::ops::node_error;

/// What a backward rule sees of one node after the forward pass.
pub struct GradCtx<'a> {
    pub node: &'a Node,
    pub opset: i64,
    /// The forward inputs (`None` for omitted optional inputs).
    pub inputs: &'a [Option<&'a Tensor>],
    /// The forward outputs (`None` for omitted outputs).
    pub outputs: &'a [Option<&'a Tensor>],
    /// Gradient of the loss with respect to each output; `None` where nothing downstream
    /// depends on it (rules treat it as zero).
    pub grad_outputs: &'a [Option<&'a Tensor>],
    /// Which inputs need a gradient. Rules may skip the others (the image gradient of a
    /// first convolution is the most expensive thing nobody wants).
    pub wants: &'a [bool],
    /// Values a training-mode forward kept for the backward (batch statistics, masks).
    pub saved: &'a [Tensor],
}

impl<'a> GradCtx<'a> {
    /// Forward input `i`, which must be present and f32.
    pub fn input(&self, i: usize) -> Result<&'a Tensor> {
        let t = self
            .inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| node_error(self.node, format!("backward: input {i} is missing")))?;
        self.check_f32(t, "input", i)
    }

    pub fn output(&self, i: usize) -> Result<&'a Tensor> {
        let t =
            self.outputs.get(i).copied().flatten().ok_or_else(|| {
                node_error(self.node, format!("backward: output {i} was not kept"))
            })?;
        self.check_f32(t, "output", i)
    }

    /// Gradient of output `i`, or `None` when it is zero.
    pub fn grad(&self, i: usize) -> Result<Option<&'a Tensor>> {
        match self.grad_outputs.get(i).copied().flatten() {
            Some(g) => self.check_f32(g, "output gradient", i).map(Some),
            None => Ok(None),
        }
    }

    /// Gradient of output `i`, zeros of the output's shape when absent.
    pub fn grad_or_zeros(&self, i: usize) -> Result<std::borrow::Cow<'a, Tensor>> {
        match self.grad(i)? {
            Some(g) => Ok(std::borrow::Cow::Borrowed(g)),
            None => {
                let y = self.output(i)?;
                Ok(std::borrow::Cow::Owned(Tensor::from_f32(
                    y.shape().to_vec(),
                    vec![0.0; y.numel()],
                )?))
            }
        }
    }

    pub fn wants(&self, i: usize) -> bool {
        self.wants.get(i).copied().unwrap_or(false)
    }

    fn check_f32(&self, t: &'a Tensor, what: &str, i: usize) -> Result<&'a Tensor> {
        if t.dtype() != crate::ir::DType::F32 {
            return Err(node_error(
                self.node,
                format!("backward supports f32 only; {what} {i} is {}", t.dtype()),
            ));
        }
        Ok(t)
    }

    /// An error about this node.
    pub fn error(&self, msg: impl Into<String>) -> crate::Error {
        node_error(self.node, msg)
    }
}

/// Gradients with respect to each input (`None`: no gradient, or not wanted).
pub type GradFn = fn(&GradCtx) -> Result<Vec<Option<Tensor>>>;

/// What a training-mode forward sees.
pub struct TrainForwardCtx<'a> {
    pub node: &'a Node,
    pub opset: i64,
    pub inputs: &'a [Option<&'a Tensor>],
    /// Seed for anything random this step (the dropout mask), fixed per node and step.
    pub seed: u64,
}

/// The result of a training-mode forward.
pub struct TrainForward {
    pub outputs: Vec<Tensor>,
    /// Handed back to the backward rule as [`GradCtx::saved`].
    pub saved: Vec<Tensor>,
    /// New values for inputs that are state (BatchNorm running mean and variance), by input
    /// index. The executor writes them back when those inputs are parameters.
    pub updates: Vec<(usize, Tensor)>,
}

pub type TrainForwardFn = fn(&TrainForwardCtx) -> Result<TrainForward>;

/// The backward rule of `op_type` in the default domain, if lithe has one.
pub fn grad_fn(op_type: &str) -> Option<GradFn> {
    Some(match op_type {
        "Add" | "Sub" | "Mul" | "Div" => elementwise::binary,
        "Sum" | "Mean" => elementwise::variadic,
        "Neg" | "Exp" | "Log" | "Sqrt" | "Abs" => elementwise::unary,
        "Relu" | "LeakyRelu" | "Clip" | "Sigmoid" | "HardSigmoid" | "HardSwish" | "Tanh" => {
            activation::grad
        }
        "Conv" => conv::grad,
        "Gemm" => dense::gemm_grad,
        "MatMul" => dense::matmul,
        "MaxPool" | "AveragePool" => pool::grad,
        "GlobalAveragePool" | "GlobalMaxPool" => pool::global_grad,
        "BatchNormalization" => batchnorm::grad,
        "Softmax" | "LogSoftmax" => softmax::grad,
        "Dropout" => dropout::grad,
        "Identity" | "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze" => shape::reshape_like,
        "Concat" => shape::concat,
        "Split" => shape::split,
        "Slice" => shape::slice,
        "Transpose" => shape::transpose,
        _ => return None,
    })
}

/// The backward rule of `node`, or an error naming the node and its op type.
pub fn grad_rule(node: &Node) -> Result<GradFn> {
    let default_domain = node.domain.is_empty() || node.domain == "ai.onnx";
    default_domain
        .then(|| grad_fn(&node.op_type))
        .flatten()
        .ok_or_else(|| {
            node_error(
                node,
                format!(
                    "operator {} has no backward rule, so gradients cannot flow through it",
                    node.op_type
                ),
            )
        })
}

/// The training-mode forward of `node` when it differs from inference.
pub fn train_forward(node: &Node) -> Option<TrainForwardFn> {
    match node.op_type.as_str() {
        "BatchNormalization" => Some(batchnorm::train_forward),
        "Dropout" => Some(dropout::train_forward),
        _ => None,
    }
}

/// The f32 data of a tensor already checked to be f32.
pub(crate) fn f32s(t: &Tensor) -> &[f32] {
    t.as_f32().unwrap_or(&[])
}

/// A new f32 tensor.
pub(crate) fn f32_tensor(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
    Tensor::from_f32(shape.to_vec(), data)
}

#[cfg(test)]
pub(crate) mod check;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_rule_names_node_and_op() {
        let node = Node::new("fancy1", "TopK", vec!["x".into()], vec!["y".into()]);
        let err = grad_rule(&node).unwrap_err().to_string();
        assert!(err.contains("fancy1") && err.contains("TopK"), "{err}");
        assert!(grad_rule(&Node::new("c", "Conv", vec![], vec![])).is_ok());
    }
}
