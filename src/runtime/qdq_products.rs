//! Plan-time fusion of quantized products in QDQ form into the integer convolution engine,
//! as ONNX Runtime's QDQ transformer does: in
//! `DequantizeLinear(x) -> Conv | Gemm | MatMul(., DequantizeLinear(W), bias) -> [Relu | Clip]
//! -> QuantizeLinear`, with W's codes, every scale and zero point and the bias constant, the
//! chain becomes one `QLinearConv` step on the codes (Gemm and MatMul as 1x1 convolutions
//! over one-pixel images, which is their row-major layout). The file stays as it is.
//!
//! Unlike the code-table fusions of [`super::qfuse`], this one changes arithmetic: the f32
//! chain sums rounded products of dequantized values and adds the f32 bias, the integer engine
//! sums exact integer products and adds the bias in the accumulator's scale
//! (`x_scale * w_scale`; an int32 bias through a DequantizeLinear of that scale is taken as it
//! is, an f32 bias is rounded to it). An output code can differ by one where the f32 value sits
//! on a rounding edge; the integer result is the one the QOperator form of the same model gives
//! (and ONNX Runtime's optimizer, where it fuses the same pattern: measured bit-identical on
//! the MNIST CNN in `tests/quantize.rs`).

use std::collections::HashMap;

use super::qfuse::{code_type_of_dq, default_domain, per_tensor_constants, Uses};
use crate::error::Result;
use crate::ir::{DType, Model, Node, Tensor, TensorData};
use crate::ops::quantized::qdq::{check_block_size, quantize_output_dtype};
use crate::ops::{self, required, CompileCtx, Kernel, RunCtx};

/// A fused product, ready to become one plan step at the position of `nodes[0]`.
pub struct ProductFusion {
    /// The graph nodes the step replaces, the step's position first: the data's
    /// DequantizeLinear when nothing else reads its value, else the product; the
    /// QuantizeLinear last; the weight's and bias's DequantizeLinear when nothing else reads
    /// their values.
    pub nodes: Vec<usize>,
    /// The Conv, Gemm or MatMul: the step's name.
    pub product: usize,
    /// Weight or bias DequantizeLinear nodes (index, value) this product reads but shares with
    /// other readers: absorbed only if every reader is a fused product.
    shared: Vec<(usize, String)>,
    pub label: String,
    /// The codes the step reads and writes.
    pub input: String,
    pub output: String,
    pub kernel: Box<dyn Kernel>,
}

/// Every fusable product of the graph, keyed by the index of its first node (see
/// [`ProductFusion::nodes`]).
pub fn find(model: &Model, uses: &Uses) -> HashMap<usize, ProductFusion> {
    let mut out: HashMap<usize, ProductFusion> = HashMap::new();
    for (j, node) in model.graph.nodes.iter().enumerate() {
        if matches!(node.op_type.as_str(), "Conv" | "Gemm" | "MatMul") && default_domain(node) {
            if let Some(f) = fuse_product(model, uses, j) {
                out.insert(f.nodes[0], f);
            }
        }
    }
    // A weight read by several products: its DequantizeLinear would run on every inference
    // for nothing once all of them are fused.
    let mut fused_reads: HashMap<&str, usize> = HashMap::new();
    for f in out.values() {
        for (_, v) in &f.shared {
            *fused_reads.entry(v.as_str()).or_default() += 1;
        }
    }
    let idle: Vec<usize> = out
        .values()
        .flat_map(|f| &f.shared)
        .filter(|(_, v)| {
            !uses.graph_outputs.contains(v.as_str())
                && uses.readers.get(v.as_str()) == fused_reads.get(v.as_str())
        })
        .map(|&(i, _)| i)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if let Some(f) = out.values_mut().next() {
        f.nodes.extend(idle);
    }
    out
}

/// The value `name` is an intermediate with one reader.
fn sole_use(uses: &Uses, name: &str) -> bool {
    !uses.graph_outputs.contains(name) && uses.readers.get(name) == Some(&1)
}

/// How the weight matrix is laid out.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Conv,
    /// `[N, K]` weights (Gemm with transB = 1).
    RowsNk,
    /// `[K, N]` weights (MatMul, Gemm with transB = 0).
    RowsKn,
}

fn fuse_product(model: &Model, uses: &Uses, j: usize) -> Option<ProductFusion> {
    let graph = &model.graph;
    let producer = uses.producers;
    let p = &graph.nodes[j];
    let [y] = p.outputs.as_slice() else {
        return None;
    };
    let kind = match p.op_type.as_str() {
        "Conv" => Kind::Conv,
        "Gemm" => {
            let attr = |k: &str, d: i64| p.attr_int_or(k, d).ok();
            let plain = p.attr_float_or("alpha", 1.0).ok()? == 1.0
                && p.attr_float_or("beta", 1.0).ok()? == 1.0
                && attr("transA", 0)? == 0;
            if !plain {
                return None;
            }
            match attr("transB", 0)? {
                0 => Kind::RowsKn,
                _ => Kind::RowsNk,
            }
        }
        _ => Kind::RowsKn,
    };
    // The data: codes through a per-tensor DequantizeLinear read by this node alone.
    let x = p.input(0)?;
    let dq_x_index = *producer.get(x)?;
    let dq_x = &graph.nodes[dq_x_index];
    if dq_x.op_type != "DequantizeLinear"
        || !default_domain(dq_x)
        || !per_tensor_constants(model, dq_x)
    {
        return None;
    }
    let x_codes = dq_x.input(0)?;
    let x_dtype = code_type_of_dq(model, dq_x)?;
    if !unblocked(dq_x) {
        return None;
    }
    let x_scale = graph.initializers.get(dq_x.input(1)?)?.clone();
    let x_zp = zero_point(model, dq_x, x_dtype, 1)?;

    // The weight: constant 8-bit codes through a DequantizeLinear, per tensor or per output
    // channel.
    let dq_w_index = *producer.get(p.input(1)?)?;
    let dq_w = &graph.nodes[dq_w_index];
    if dq_w.op_type != "DequantizeLinear" || !default_domain(dq_w) || !unblocked(dq_w) {
        return None;
    }
    let w = graph.initializers.get(dq_w.input(0)?)?;
    if !matches!(w.dtype(), DType::I8 | DType::U8) {
        return None;
    }
    let w_scale = graph.initializers.get(dq_w.input(1)?)?;
    let channels = if w_scale.numel() == 1 { 1 } else { 0 };
    let out_axis = match kind {
        Kind::Conv | Kind::RowsNk => 0,
        Kind::RowsKn => 1,
    };
    let n_out = *w.shape().get(out_axis)?;
    if channels == 0 {
        let axis = dq_w.attr_int_or("axis", 1).ok()?;
        let axis = if axis < 0 {
            axis + w.rank() as i64
        } else {
            axis
        };
        if axis != out_axis as i64 || w_scale.numel() != n_out || w_scale.rank() != 1 {
            return None;
        }
    }
    let w_zp = zero_point(model, dq_w, w.dtype(), w_scale.numel())?;
    if kind != Kind::Conv && w.rank() != 2 {
        return None;
    }
    // MatMul takes two inputs; a third would be mistaken for a bias.
    if p.op_type == "MatMul" && p.inputs.len() != 2 {
        return None;
    }
    let xs = *graph
        .initializers
        .get(dq_x.input(1)?)?
        .as_f32()
        .ok()?
        .first()?;
    let ws = w_scale.as_f32().ok()?;
    let acc_scale = |c: usize| xs * ws[if ws.len() == 1 { 0 } else { c }];

    // The bias: an f32 constant, or constant i32 codes through a DequantizeLinear, one value
    // per output channel (a Gemm's C of shape [N] or [1, N], not [M, N]; a Conv's of rank 1).
    let mut absorbed_bias = None;
    let bias_codes = match p.input(2) {
        None => None,
        Some(b) => {
            let codes = match graph.initializers.get(b) {
                Some(t) => {
                    bias_shape_fits(t.shape(), n_out, kind)?;
                    rounded_bias(t.as_f32().ok()?, &acc_scale)?
                }
                None => {
                    let k = *producer.get(b)?;
                    let codes = bias_codes_of_dq(model, &graph.nodes[k], n_out, kind, &acc_scale)?;
                    absorbed_bias = Some(k);
                    codes
                }
            };
            Some(Tensor::new(vec![n_out], TensorData::I32(codes)).ok()?)
        }
    };

    // After the product: an optional Relu or constant Clip, then a per-tensor QuantizeLinear.
    if !sole_use(uses, y) {
        return None;
    }
    let reader_of = |v: &str| {
        graph
            .nodes
            .iter()
            .enumerate()
            .skip(j + 1)
            .find(|(_, n)| n.inputs.iter().any(|i| i == v))
    };
    let (mut k, mut next) = reader_of(y)?;
    let mut act = None;
    if matches!(next.op_type.as_str(), "Relu" | "Clip") && default_domain(next) {
        let [a] = next.outputs.as_slice() else {
            return None;
        };
        if next.input(0) != Some(y.as_str())
            || !sole_use(uses, a)
            || !next
                .inputs
                .iter()
                .skip(1)
                .all(|i| i.is_empty() || graph.initializers.contains_key(i))
        {
            return None;
        }
        act = Some(k);
        (k, next) = reader_of(a)?;
    }
    let q = next;
    let [q_out] = q.outputs.as_slice() else {
        return None;
    };
    if q.op_type != "QuantizeLinear"
        || !default_domain(q)
        || !per_tensor_constants(model, q)
        || !unblocked(q)
    {
        return None;
    }
    if q.input(0) != Some(act.map_or(y.as_str(), |a| graph.nodes[a].outputs[0].as_str())) {
        return None;
    }
    // As QuantizeLinear decides it: the zero point's type, else `output_dtype` (opset 21).
    let zp_type = q
        .input(2)
        .and_then(|z| graph.initializers.get(z))
        .map(Tensor::dtype);
    let y_dtype = quantize_output_dtype(q, zp_type).ok()?;
    if !matches!(y_dtype, DType::U8 | DType::I8) {
        return None;
    }
    let y_scale = graph.initializers.get(q.input(1)?)?.clone();
    let y_zp = zero_point(model, q, y_dtype, 1)?;

    let weight = match kind {
        Kind::Conv => w.clone(),
        Kind::RowsNk => w.clone().reshaped(vec![n_out, w.shape()[1], 1, 1]).ok()?,
        Kind::RowsKn => transposed_codes(w)?,
    };
    let k_in = weight.shape().get(1).copied().filter(|&k| k > 0)?;
    let mut conv = Node {
        name: p.name.clone(),
        op_type: "QLinearConv".into(),
        domain: String::new(),
        inputs: [
            "x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp", "b",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        outputs: vec![q_out.clone()],
        attrs: Default::default(),
        doc_string: String::new(),
    };
    if kind == Kind::Conv {
        conv.attrs = p.attrs.clone();
    }
    if bias_codes.is_none() {
        conv.inputs.truncate(8);
    }
    let w_scale = w_scale.clone();
    let constants: Vec<Option<&Tensor>> = vec![
        None,
        Some(&x_scale),
        Some(&x_zp),
        Some(&weight),
        Some(&w_scale),
        Some(&w_zp),
        Some(&y_scale),
        Some(&y_zp),
        bias_codes.as_ref(),
    ];
    let def = ops::lookup(&conv, model.opset().max(10)).ok()?;
    let ctx = CompileCtx {
        node: &conv,
        opset: model.opset().max(10),
        input_types: vec![None; conv.inputs.len()],
        constants: constants[..conv.inputs.len()].to_vec(),
        fused_activation: None,
    };
    let inner = (def.compile)(&ctx).ok()?;
    let clamp = match act {
        None => None,
        Some(a) => Some(code_range(model, &graph.nodes[a], q, y_dtype)?),
    };
    let kernel = QdqProduct {
        inner,
        rows: (kind != Kind::Conv).then_some((k_in, n_out)),
        clamp,
        node: p.clone(),
    };

    // A data DequantizeLinear with other readers (a transformer's normalised hidden state
    // feeds its query, key and value projections) is shared: planned for its other readers
    // unless all of them are fused products too. The step then sits where the product was.
    let data_shared = !sole_use(uses, x);
    let mut nodes = vec![if data_shared { j } else { dq_x_index }];
    let mut shared = Vec::new();
    if data_shared {
        shared.push((dq_x_index, x.to_string()));
    }
    match sole_use(uses, p.input(1)?) {
        true => nodes.push(dq_w_index),
        false => shared.push((dq_w_index, p.input(1)?.to_string())),
    }
    match absorbed_bias {
        Some(k) if sole_use(uses, p.input(2)?) => nodes.push(k),
        Some(k) => shared.push((k, p.input(2)?.to_string())),
        None => {}
    }
    if !data_shared {
        nodes.push(j);
    }
    nodes.extend(act);
    nodes.push(k);
    let mut label = vec!["DequantizeLinear", p.op_type.as_str()];
    if let Some(a) = act {
        label.push(graph.nodes[a].op_type.as_str());
    }
    label.push("QuantizeLinear");
    Some(ProductFusion {
        nodes,
        product: j,
        shared,
        label: label.join("+"),
        input: x_codes.to_string(),
        output: q_out.clone(),
        kernel: Box::new(kernel),
    })
}

/// No blocked quantization (`block_size`, opset 21): only per-tensor and per-axis fuse.
fn unblocked(n: &Node) -> bool {
    check_block_size(n).is_ok()
}

fn bias_shape_fits(shape: &[usize], n_out: usize, kind: Kind) -> Option<()> {
    let fits = match kind {
        Kind::Conv => shape == [n_out],
        _ => shape == [n_out] || shape == [1, n_out],
    };
    fits.then_some(())
}

/// An f32 bias in accumulator units (`x_scale * w_scale` per channel), as QLinearConv takes it.
fn rounded_bias(b: &[f32], acc_scale: &dyn Fn(usize) -> f32) -> Option<Vec<i32>> {
    b.iter()
        .enumerate()
        .map(|(c, &v)| {
            let s = f64::from(acc_scale(c));
            let r = (f64::from(v) / s).round_ties_even();
            (s > 0.0 && r.abs() <= f64::from(i32::MAX)).then_some(r as i32)
        })
        .collect()
}

/// The int32 codes of a bias DequantizeLinear: as they are when its scale is the accumulator's
/// and its zero point 0 (how quantizers write it), else its values rounded to that scale.
fn bias_codes_of_dq(
    model: &Model,
    dq: &Node,
    n_out: usize,
    kind: Kind,
    acc_scale: &dyn Fn(usize) -> f32,
) -> Option<Vec<i32>> {
    let g = &model.graph;
    if dq.op_type != "DequantizeLinear" || !default_domain(dq) || !unblocked(dq) {
        return None;
    }
    let codes = g.initializers.get(dq.input(0)?)?;
    bias_shape_fits(codes.shape(), n_out, kind)?;
    let TensorData::I32(c) = codes.data() else {
        return None;
    };
    let scale = g.initializers.get(dq.input(1)?)?.as_f32().ok()?;
    let zp: Vec<i32> = match dq.input(2) {
        None => vec![0; scale.len()],
        Some(z) => match g.initializers.get(z)?.data() {
            TensorData::I32(z) => z.clone(),
            _ => return None,
        },
    };
    if zp.len() != scale.len() || (scale.len() != 1 && scale.len() != c.len()) {
        return None;
    }
    let at = |i: usize| if scale.len() == 1 { 0 } else { i };
    let exact = (0..c.len()).all(|i| zp[at(i)] == 0 && scale[at(i)] == acc_scale(i));
    if exact {
        return Some(c.clone());
    }
    let values: Vec<f32> = c
        .iter()
        .enumerate()
        .map(|(i, &q)| ((i64::from(q) - i64::from(zp[at(i)])) as f32) * scale[at(i)])
        .collect();
    rounded_bias(&values, acc_scale)
}

/// The zero point of a (De)QuantizeLinear as a constant of `dtype` (zero when absent), with
/// `count` values.
fn zero_point(model: &Model, n: &Node, dtype: DType, count: usize) -> Option<Tensor> {
    match n.input(2) {
        Some(z) => {
            let t = model.graph.initializers.get(z)?;
            (t.dtype() == dtype && t.numel() == count).then(|| t.clone())
        }
        None => Tensor::zeros(dtype, if count == 1 { vec![] } else { vec![count] }).ok(),
    }
}

/// `[K, N]` codes as `[N, K, 1, 1]`.
fn transposed_codes(w: &Tensor) -> Option<Tensor> {
    let (k, n) = (w.shape()[0], w.shape()[1]);
    let t = |v: &[u8]| -> Vec<u8> {
        let mut o = vec![0u8; v.len()];
        for r in 0..k {
            for c in 0..n {
                o[c * k + r] = v[r * n + c];
            }
        }
        o
    };
    let data = match w.data() {
        TensorData::U8(v) => TensorData::U8(t(v)),
        TensorData::I8(v) => {
            let bytes: Vec<u8> = v.iter().map(|&b| b as u8).collect();
            TensorData::I8(t(&bytes).into_iter().map(|b| b as i8).collect())
        }
        _ => return None,
    };
    Tensor::new(vec![n, k, 1, 1], data).ok()
}

/// The codes an activation between the product and its QuantizeLinear leaves alone: since
/// quantization is monotone, `Q(relu(y)) = max(Q(y), Q(0))` and
/// `Q(clip(y, lo, hi)) = clamp(Q(y), Q(lo), Q(hi))`. `Q` is our own QuantizeLinear kernel,
/// so the bounds round exactly as the unfused chain would.
fn code_range(model: &Model, act: &Node, q: &Node, dtype: DType) -> Option<(i32, i32)> {
    let g = &model.graph;
    let scalar = |i: usize| -> Option<Option<f32>> {
        let Some(n) = act.input(i) else {
            return Some(None);
        };
        let t = g.initializers.get(n)?;
        if t.numel() != 1 {
            return None;
        }
        Some(Some(*t.as_f32().ok()?.first()?))
    };
    let (lo, hi) = match act.op_type.as_str() {
        "Relu" => (Some(0.0), None),
        _ if model.opset() < 11 => (
            act.attr_float("min").ok()?.or(Some(f32::MIN)),
            act.attr_float("max").ok()?.or(Some(f32::MAX)),
        ),
        _ => (scalar(1)?, scalar(2)?),
    };
    let def = ops::lookup(q, model.opset()).ok()?;
    let constants = g.constant_inputs(q);
    let ctx = CompileCtx {
        node: q,
        opset: model.opset(),
        input_types: vec![None; q.inputs.len()],
        constants: constants.clone(),
        fused_activation: None,
    };
    let kernel = (def.compile)(&ctx).ok()?;
    let code = |v: f32| -> Option<i32> {
        let x = Tensor::from_f32(vec![1], vec![v]).ok()?;
        let mut args = constants.clone();
        args[0] = Some(&x);
        let out = kernel.run(&args, &mut RunCtx::default()).ok()?;
        match out.first()?.data() {
            TensorData::U8(c) => c.first().map(|&c| i32::from(c)),
            TensorData::I8(c) => c.first().map(|&c| i32::from(c)),
            _ => None,
        }
    };
    let (qmin, qmax) = match dtype {
        DType::I8 => (-128, 127),
        _ => (0, 255),
    };
    let lo = match lo {
        Some(v) => code(v)?,
        None => qmin,
    };
    let hi = match hi {
        Some(v) => code(v)?,
        None => qmax,
    };
    (lo <= hi).then_some((lo, hi))
}

/// The fused step: the integer convolution on the codes, then the activation's code range.
struct QdqProduct {
    inner: Box<dyn Kernel>,
    /// Gemm / MatMul: `(K, N)`; rows of K codes run as one-pixel images.
    rows: Option<(usize, usize)>,
    clamp: Option<(i32, i32)>,
    node: Node,
}

impl Kernel for QdqProduct {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let mut y = match self.rows {
            None => self.inner.run(&[Some(x)], ctx)?,
            Some((k, n)) => {
                let shape = x.shape();
                if shape.last() != Some(&k) || (self.node.op_type == "Gemm" && shape.len() != 2) {
                    return Err(ops::node_error(
                        &self.node,
                        format!("input of shape {shape:?} does not end in the weight's {k}"),
                    ));
                }
                let rows = shape[..shape.len() - 1].iter().product();
                let images = x.clone().reshaped(vec![rows, k, 1, 1])?;
                let mut out = self.inner.run(&[Some(&images)], ctx)?;
                let mut dims = shape[..shape.len() - 1].to_vec();
                dims.push(n);
                let y = out
                    .pop()
                    .ok_or_else(|| ops::node_error(&self.node, "no output"))?;
                vec![y.reshaped(dims)?]
            }
        };
        if let (Some((lo, hi)), Some(t)) = (self.clamp, y.first_mut()) {
            match t.data_mut() {
                // The bounds were checked against the output type at plan time; max/min
                // (not clamp) cannot panic even so.
                TensorData::U8(v) => {
                    let (lo, hi) = (lo.clamp(0, 255) as u8, hi.clamp(0, 255) as u8);
                    v.iter_mut().for_each(|c| *c = (*c).max(lo).min(hi));
                }
                TensorData::I8(v) => {
                    let (lo, hi) = (lo.clamp(-128, 127) as i8, hi.clamp(-128, 127) as i8);
                    v.iter_mut().for_each(|c| *c = (*c).max(lo).min(hi));
                }
                _ => {}
            }
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Attr, Dim, Graph, TypeInfo, ValueInfo};
    use crate::quant::test_rng::Rng;
    use crate::runtime::{PlanOptions, Session, SessionOptions};

    fn u8s(shape: Vec<usize>, rng: &mut Rng) -> Tensor {
        let n = shape.iter().product();
        let v = (0..n).map(|_| rng.range_i32(0, 255) as u8).collect();
        Tensor::new(shape, TensorData::U8(v)).unwrap()
    }

    fn i8s(shape: Vec<usize>, rng: &mut Rng) -> Tensor {
        let n = shape.iter().product();
        let v = (0..n).map(|_| rng.range_i32(-127, 127) as i8).collect();
        Tensor::new(shape, TensorData::I8(v)).unwrap()
    }

    fn f32s(n: usize, lo: f32, hi: f32, rng: &mut Rng) -> Tensor {
        let v = (0..n)
            .map(|_| lo + (hi - lo) * rng.uniform() as f32)
            .collect();
        Tensor::from_f32(vec![n], v).unwrap()
    }

    fn scalar_u8(v: u8) -> Tensor {
        Tensor::new(vec![], TensorData::U8(vec![v])).unwrap()
    }

    fn node(op: &str, inputs: &[&str], output: &str) -> Node {
        Node::new(
            output,
            op,
            inputs.iter().map(|s| s.to_string()).collect(),
            vec![output.to_string()],
        )
    }

    /// A graph on input codes `x` of `shape` with output `y`.
    fn model(shape: &[usize], nodes: Vec<Node>, consts: Vec<(&str, Tensor)>) -> Model {
        let dims = shape.iter().map(|&d| Dim::Known(d)).collect();
        let mut graph = Graph {
            inputs: vec![ValueInfo::new("x", TypeInfo::new(DType::U8, dims))],
            outputs: vec![ValueInfo::new("y", TypeInfo::unknown_shape(DType::U8))],
            nodes,
            ..Graph::default()
        };
        for (name, t) in consts {
            graph.initializers.insert(name.into(), t);
        }
        Model::new(graph, 18)
    }

    fn run(model: &Model, plan: PlanOptions, x: &Tensor) -> (Vec<u8>, Vec<String>) {
        let (t, labels) = run_any(model, plan, x);
        let TensorData::U8(v) = t.data() else {
            panic!("not u8")
        };
        (v.clone(), labels)
    }

    fn run_any(model: &Model, plan: PlanOptions, x: &Tensor) -> (Tensor, Vec<String>) {
        let s = Session::new(model, &SessionOptions { threads: 1, plan }).unwrap();
        let mut out = s.run(&[("x", x.clone())]).unwrap();
        let labels = s.step_labels().into_iter().map(String::from).collect();
        (out.swap_remove(0).1, labels)
    }

    /// The QDQ convolution, fused, gives exactly what the same parameters give as a
    /// QLinearConv (bias rounded to `x_scale * w_scale`).
    #[test]
    fn fused_conv_is_qlinearconv() {
        let mut rng = Rng::new(3);
        let (xs, ys) = (0.021f32, 0.047f32);
        let w = i8s(vec![4, 3, 3, 3], &mut rng);
        let ws = f32s(4, 0.002, 0.01, &mut rng);
        let b = f32s(4, -0.5, 0.5, &mut rng);
        let b_codes: Vec<i32> = (0..4)
            .map(|c| {
                let s = f64::from(xs) * f64::from(ws.as_f32().unwrap()[c]);
                (f64::from(b.as_f32().unwrap()[c]) / s).round_ties_even() as i32
            })
            .collect();
        let attrs = |n: Node| {
            n.with_attr("pads", Attr::Ints(vec![1, 0, 2, 1]))
                .with_attr("strides", Attr::Ints(vec![2, 1]))
        };
        let common = || {
            vec![
                ("xs", Tensor::scalar_f32(xs)),
                ("xz", scalar_u8(117)),
                ("w", w.clone()),
                ("ws", ws.clone()),
                ("wz", Tensor::zeros(DType::I8, vec![4]).unwrap()),
                ("ys", Tensor::scalar_f32(ys)),
                ("yz", scalar_u8(121)),
            ]
        };
        let qdq = model(
            &[2, 3, 9, 8],
            vec![
                node("DequantizeLinear", &["w", "ws", "wz"], "wf").with_attr("axis", Attr::Int(0)),
                node("DequantizeLinear", &["x", "xs", "xz"], "xf"),
                attrs(node("Conv", &["xf", "wf", "b"], "conv")),
                node("QuantizeLinear", &["conv", "ys", "yz"], "y"),
            ],
            [common(), vec![("b", b.clone())]].concat(),
        );
        let qop = model(
            &[2, 3, 9, 8],
            vec![attrs(node(
                "QLinearConv",
                &["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "bq"],
                "y",
            ))],
            [
                common(),
                vec![(
                    "bq",
                    Tensor::new(vec![4], TensorData::I32(b_codes)).unwrap(),
                )],
            ]
            .concat(),
        );
        let x = u8s(vec![2, 3, 9, 8], &mut rng);
        let (fused, labels) = run(&qdq, PlanOptions::default(), &x);
        // One step: the weight's DequantizeLinear is absorbed too.
        assert_eq!(labels, ["DequantizeLinear+Conv+QuantizeLinear"]);
        let (want, _) = run(&qop, PlanOptions::default(), &x);
        assert_eq!(fused, want);
        // The f32 chain agrees but for codes on a rounding edge.
        let (plain, labels) = run(&qdq, PlanOptions::unfused(), &x);
        assert_eq!(labels.len(), 4);
        let off: Vec<i32> = plain
            .iter()
            .zip(&fused)
            .map(|(&a, &b)| i32::from(a) - i32::from(b))
            .filter(|d| *d != 0)
            .collect();
        assert!(off.iter().all(|d| d.abs() == 1), "{off:?}");
        assert!(
            off.len() * 50 < fused.len(),
            "{} of {}",
            off.len(),
            fused.len()
        );
    }

    /// Gemm (both weight layouts, i32 bias through a DequantizeLinear, Clip) and a 3-D MatMul
    /// (Relu) match their f32 chains but for codes on a rounding edge, with the activation's
    /// bounds applied to the codes.
    #[test]
    fn fused_gemm_and_matmul_follow_the_f32_chain() {
        let mut rng = Rng::new(9);
        let (k, n) = (37, 6);
        let base = |rng: &mut Rng| {
            vec![
                ("xs", Tensor::scalar_f32(0.03)),
                ("xz", scalar_u8(100)),
                ("ws", f32s(n, 0.003, 0.008, rng)),
                ("ys", Tensor::scalar_f32(0.02)),
                ("yz", scalar_u8(90)),
            ]
        };
        for case in 0..3 {
            let mut consts = base(&mut rng);
            let (shape, product, act, axis) = match case {
                0 => {
                    consts.push(("w", i8s(vec![n, k], &mut rng)));
                    consts.push(("bq", {
                        let v = (0..n).map(|_| rng.range_i32(-3000, 3000)).collect();
                        Tensor::new(vec![n], TensorData::I32(v)).unwrap()
                    }));
                    consts.push(("bs", Tensor::scalar_f32(0.03 * 0.005)));
                    (
                        vec![5, k],
                        node("Gemm", &["xf", "wf", "b"], "p").with_attr("transB", Attr::Int(1)),
                        node("Clip", &["p", "lo", "hi"], "a"),
                        0,
                    )
                }
                1 => {
                    consts.push(("w", i8s(vec![k, n], &mut rng)));
                    consts.push(("b", f32s(n, -1.0, 1.0, &mut rng)));
                    (
                        vec![5, k],
                        node("Gemm", &["xf", "wf", "b"], "p"),
                        node("Relu", &["p"], "a"),
                        1,
                    )
                }
                _ => {
                    consts.push(("w", i8s(vec![k, n], &mut rng)));
                    (
                        vec![2, 3, k],
                        node("MatMul", &["xf", "wf"], "p"),
                        node("Relu", &["p"], "a"),
                        1,
                    )
                }
            };
            consts.push(("lo", Tensor::scalar_f32(-0.5)));
            consts.push(("hi", Tensor::scalar_f32(0.7)));
            let mut nodes = vec![
                node("DequantizeLinear", &["w", "ws"], "wf").with_attr("axis", Attr::Int(axis)),
                node("DequantizeLinear", &["x", "xs", "xz"], "xf"),
            ];
            if case == 0 {
                nodes.push(node("DequantizeLinear", &["bq", "bs"], "b"));
            }
            nodes.extend([
                product,
                act,
                node("QuantizeLinear", &["a", "ys", "yz"], "y"),
            ]);
            let m = model(&shape, nodes, consts);
            let x = u8s(shape.clone(), &mut rng);
            let (fused, labels) = run(&m, PlanOptions::default(), &x);
            assert_eq!(labels.len(), 1, "case {case}: {labels:?}");
            let (plain, _) = run(&m, PlanOptions::unfused(), &x);
            let off = plain.iter().zip(&fused).filter(|(a, b)| a != b).count();
            assert!(
                plain.iter().zip(&fused).all(|(&a, &b)| a.abs_diff(b) <= 1),
                "case {case}"
            );
            assert!(
                off * 20 < fused.len(),
                "case {case}: {off} of {}",
                fused.len()
            );
            // The activation clamps codes: Relu at the zero point, Clip at Q(-0.5), Q(0.7).
            let (lo, hi) = if case == 0 { (65, 125) } else { (90, 255) };
            assert!(fused.iter().all(|&c| (lo..=hi).contains(&c)), "case {case}");
            assert!(fused.contains(&lo), "case {case}: nothing clamped");
        }
    }

    /// Data, weight (`[k, n]`, scales along axis 1) and output parameters of a MatMul.
    fn matmul_params(k: usize, n: usize, rng: &mut Rng) -> Vec<(&'static str, Tensor)> {
        vec![
            ("xs", Tensor::scalar_f32(0.05)),
            ("xz", scalar_u8(128)),
            ("w", i8s(vec![k, n], rng)),
            ("ws", f32s(n, 0.004, 0.009, rng)),
            ("ys", Tensor::scalar_f32(0.02)),
        ]
    }

    /// QuantizeLinear-21 without a zero point takes its type from `output_dtype`: the fused
    /// step writes i8 codes too, clamped by the Clip in i8 terms.
    #[test]
    fn output_type_comes_from_output_dtype() {
        let mut rng = Rng::new(21);
        let (k, n) = (9, 5);
        let m = model(
            &[3, k],
            vec![
                node("DequantizeLinear", &["w", "ws"], "wf").with_attr("axis", Attr::Int(1)),
                node("DequantizeLinear", &["x", "xs", "xz"], "xf"),
                node("MatMul", &["xf", "wf"], "p"),
                node("Clip", &["p", "lo", "hi"], "a"),
                node("QuantizeLinear", &["a", "ys"], "y").with_attr("output_dtype", Attr::Int(3)),
            ],
            [
                matmul_params(k, n, &mut rng),
                vec![
                    ("lo", Tensor::scalar_f32(-1.0)),
                    ("hi", Tensor::scalar_f32(1.0)),
                ],
            ]
            .concat(),
        );
        let m = Model::new(m.graph, 21);
        let x = u8s(vec![3, k], &mut rng);
        let (fused, labels) = run_any(&m, PlanOptions::default(), &x);
        assert_eq!(labels.len(), 1, "{labels:?}");
        let (plain, _) = run_any(&m, PlanOptions::unfused(), &x);
        let (TensorData::I8(a), TensorData::I8(b)) = (fused.data(), plain.data()) else {
            panic!("{} and {}", fused.dtype(), plain.dtype())
        };
        assert!(a.iter().zip(b).all(|(&p, &q)| p.abs_diff(q) <= 1));
        assert!(a.iter().all(|&c| (-50..=50).contains(&c)));
    }

    /// A weight DequantizeLinear read by two fused products is not planned at all.
    #[test]
    fn shared_weight_is_absorbed_when_every_reader_fuses() {
        let mut rng = Rng::new(2);
        let (k, n) = (6, 4);
        let mut m = model(
            &[2, k],
            vec![
                node("DequantizeLinear", &["w", "ws"], "wf").with_attr("axis", Attr::Int(1)),
                node("DequantizeLinear", &["x", "xs", "xz"], "xa"),
                node("DequantizeLinear", &["x", "xs", "xz"], "xb"),
                node("MatMul", &["xa", "wf"], "pa"),
                node("MatMul", &["xb", "wf"], "pb"),
                node("QuantizeLinear", &["pa", "ys", "yz"], "ya"),
                node("QuantizeLinear", &["pb", "ys", "yz"], "yb"),
            ],
            [matmul_params(k, n, &mut rng), vec![("yz", scalar_u8(100))]].concat(),
        );
        m.graph.outputs = ["ya", "yb"]
            .iter()
            .map(|o| ValueInfo::new(*o, TypeInfo::unknown_shape(DType::U8)))
            .collect();
        let x = u8s(vec![2, k], &mut rng);
        let s = Session::new(&m, &SessionOptions::default()).unwrap();
        assert_eq!(
            s.step_labels(),
            [
                "DequantizeLinear+MatMul+QuantizeLinear",
                "DequantizeLinear+MatMul+QuantizeLinear"
            ]
        );
        let out = s.run(&[("x", x)]).unwrap();
        assert_eq!(out[0].1, out[1].1);
    }

    /// One data DequantizeLinear read by two products (a transformer's query and key
    /// projections): both fuse, and the DequantizeLinear is planned only while an unfused
    /// reader needs its values.
    #[test]
    fn shared_data_fuses_into_every_product() {
        let mut rng = Rng::new(8);
        let (k, n) = (6, 4);
        for extra_reader in [false, true] {
            let mut nodes = vec![
                node("DequantizeLinear", &["w", "ws"], "wf").with_attr("axis", Attr::Int(1)),
                node("DequantizeLinear", &["x", "xs", "xz"], "xf"),
                node("MatMul", &["xf", "wf"], "pa"),
                node("MatMul", &["xf", "wf"], "pb"),
                node("QuantizeLinear", &["pa", "ys", "yz"], "ya"),
                node("QuantizeLinear", &["pb", "ys", "yz"], "yb"),
            ];
            let mut outputs = vec!["ya", "yb"];
            if extra_reader {
                nodes.push(node("Relu", &["xf"], "r"));
                outputs.push("r");
            }
            let mut m = model(
                &[2, k],
                nodes,
                [matmul_params(k, n, &mut rng), vec![("yz", scalar_u8(100))]].concat(),
            );
            m.graph.outputs = outputs
                .iter()
                .map(|&o| {
                    let dtype = if o == "r" { DType::F32 } else { DType::U8 };
                    ValueInfo::new(o, TypeInfo::unknown_shape(dtype))
                })
                .collect();
            let x = u8s(vec![2, k], &mut rng);
            let fused = Session::new(&m, &SessionOptions::default()).unwrap();
            let product = "DequantizeLinear+MatMul+QuantizeLinear";
            let want: Vec<&str> = match extra_reader {
                false => vec![product, product],
                true => vec!["DequantizeLinear", product, product, "Relu"],
            };
            assert_eq!(fused.step_labels(), want);
            let got = fused.run(&[("x", x.clone())]).unwrap();
            let plain = Session::new(
                &m,
                &SessionOptions {
                    plan: PlanOptions::unfused(),
                    ..SessionOptions::default()
                },
            )
            .unwrap()
            .run(&[("x", x)])
            .unwrap();
            assert_eq!(got.len(), plain.len());
            // Codes within one step of the unfused f32 path; the Relu's values exact.
            for ((name, a), (_, b)) in got.iter().zip(&plain) {
                let (a, b) = (a.to_f32_vec(), b.to_f32_vec());
                let tol = if name == "r" { 0.0 } else { 1.0 };
                assert!(
                    a.iter().zip(&b).all(|(p, q)| (p - q).abs() <= tol),
                    "{name}"
                );
            }
        }
    }

    /// f32 weights (not quantized) stay unfused.
    #[test]
    fn declines_what_it_cannot_run_on_codes() {
        let mut rng = Rng::new(5);
        let consts = |rng: &mut Rng| {
            vec![
                ("xs", Tensor::scalar_f32(0.03)),
                ("xz", scalar_u8(100)),
                ("ys", Tensor::scalar_f32(0.02)),
                ("yz", scalar_u8(90)),
                ("wf", f32s(12, -1.0, 1.0, rng).reshaped(vec![3, 4]).unwrap()),
            ]
        };
        let f32_weight = model(
            &[2, 4],
            vec![
                node("DequantizeLinear", &["x", "xs", "xz"], "xf"),
                node("Gemm", &["xf", "wf"], "p").with_attr("transB", Attr::Int(1)),
                node("QuantizeLinear", &["p", "ys", "yz"], "y"),
            ],
            consts(&mut rng),
        );
        let x = u8s(vec![2, 4], &mut rng);
        let (_, labels) = run(&f32_weight, PlanOptions::default(), &x);
        assert_eq!(labels, ["DequantizeLinear", "Gemm", "QuantizeLinear"]);
    }
}
