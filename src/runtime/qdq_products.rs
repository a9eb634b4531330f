//! Plan-time fusion of quantized products in QDQ form into the integer convolution engine,
//! as ONNX Runtime's QDQ transformer does: in
//! `DequantizeLinear(x) -> Conv | Gemm | MatMul(., DequantizeLinear(W), bias) -> [Relu | Clip]
//! -> QuantizeLinear`, with W's codes, every scale and zero point and the bias constant, the
//! chain becomes one `QLinearConv` step on the codes (Gemm and MatMul as 1x1 convolutions
//! over one-pixel images, which is their row-major layout). The file stays as it is.
//!
//! Unlike the code-table fusions of [`super::qfuse`], this one changes arithmetic: the f32
//! chain sums rounded products of dequantized values and adds the f32 bias, the integer engine
//! sums exact integer products and adds the bias rounded to the accumulator's scale
//! (`x_scale * w_scale`). An output code can differ by one where the f32 value sits on a
//! rounding edge; the integer result is the one a QOperator file and ONNX Runtime give.

use std::collections::HashMap;

use super::qfuse::{code_type_of_dq, default_domain, per_tensor_constants, Uses};
use crate::error::Result;
use crate::ir::{DType, Model, Node, Tensor, TensorData};
use crate::ops::{self, required, CompileCtx, Kernel, RunCtx};

/// A fused product, ready to become one plan step at the position of `nodes[0]`.
pub struct ProductFusion {
    /// The graph nodes the step replaces: the data's DequantizeLinear first, the
    /// QuantizeLinear last, and the weight's and bias's DequantizeLinear when nothing else
    /// reads their values.
    pub nodes: Vec<usize>,
    /// The Conv, Gemm or MatMul: the step's name.
    pub product: usize,
    pub label: String,
    /// The codes the step reads and writes.
    pub input: String,
    pub output: String,
    pub kernel: Box<dyn Kernel>,
}

/// Every fusable product of the graph, keyed by the index of its data's DequantizeLinear.
pub fn find(model: &Model, uses: &Uses) -> HashMap<usize, ProductFusion> {
    let graph = &model.graph;
    let producer: HashMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut out = HashMap::new();
    for (j, node) in graph.nodes.iter().enumerate() {
        if matches!(node.op_type.as_str(), "Conv" | "Gemm" | "MatMul") && default_domain(node) {
            if let Some(f) = fuse_product(model, uses, &producer, j) {
                out.insert(f.nodes[0], f);
            }
        }
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

fn fuse_product(
    model: &Model,
    uses: &Uses,
    producer: &HashMap<&str, usize>,
    j: usize,
) -> Option<ProductFusion> {
    let graph = &model.graph;
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
        || !sole_use(uses, x)
    {
        return None;
    }
    let x_codes = dq_x.input(0)?;
    let x_dtype = code_type_of_dq(model, dq_x)?;
    let x_scale = graph.initializers.get(dq_x.input(1)?)?.clone();
    let x_zp = zero_point(model, dq_x, x_dtype, 1)?;

    // The weight: constant 8-bit codes through a DequantizeLinear, per tensor or per output
    // channel.
    let dq_w_index = *producer.get(p.input(1)?)?;
    let dq_w = &graph.nodes[dq_w_index];
    if dq_w.op_type != "DequantizeLinear" || !default_domain(dq_w) {
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

    // The bias: an f32 constant or constant i32 codes through a DequantizeLinear.
    let mut absorbed_bias = None;
    let bias = match p.input(2) {
        None => None,
        Some(b) => {
            let (shape, v) = match graph.initializers.get(b) {
                Some(t) => (t.shape().to_vec(), t.as_f32().ok()?.to_vec()),
                None => {
                    let k = *producer.get(b)?;
                    let (shape, v) = dequantized_constant(model, &graph.nodes[k])?;
                    if sole_use(uses, b) {
                        absorbed_bias = Some(k);
                    }
                    (shape, v)
                }
            };
            // One value per output channel: a Gemm's C of shape [N] or [1, N], not [M, N].
            if v.len() != n_out || shape.last() != Some(&n_out) {
                return None;
            }
            Some(v)
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
    if q.op_type != "QuantizeLinear" || !default_domain(q) || !per_tensor_constants(model, q) {
        return None;
    }
    if q.input(0) != Some(act.map_or(y.as_str(), |a| graph.nodes[a].outputs[0].as_str())) {
        return None;
    }
    let y_dtype = match q.input(2).and_then(|z| graph.initializers.get(z)) {
        Some(z) => z.dtype(),
        None => DType::U8,
    };
    if !matches!(y_dtype, DType::U8 | DType::I8) {
        return None;
    }
    let y_scale = graph.initializers.get(q.input(1)?)?.clone();
    let y_zp = zero_point(model, q, y_dtype, 1)?;

    // The bias in accumulator units, `x_scale * w_scale` per channel, as QLinearConv takes it.
    let xs = *x_scale.as_f32().ok()?.first()?;
    let ws = w_scale.as_f32().ok()?;
    let bias_codes = match bias {
        None => None,
        Some(b) => {
            let codes: Option<Vec<i32>> = b
                .iter()
                .enumerate()
                .map(|(c, &v)| {
                    let s = f64::from(xs) * f64::from(ws[if ws.len() == 1 { 0 } else { c }]);
                    let r = (f64::from(v) / s).round_ties_even();
                    (s > 0.0 && r.abs() <= f64::from(i32::MAX)).then_some(r as i32)
                })
                .collect();
            Some(Tensor::new(vec![n_out], TensorData::I32(codes?)).ok()?)
        }
    };

    let weight = match kind {
        Kind::Conv => w.clone(),
        Kind::RowsNk => w.clone().reshaped(vec![n_out, w.shape()[1], 1, 1]).ok()?,
        Kind::RowsKn => transposed_codes(w)?,
    };
    let k_in = weight.shape().get(1).copied()?;
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

    let mut nodes = vec![dq_x_index];
    if sole_use(uses, p.input(1)?) {
        nodes.push(dq_w_index);
    }
    nodes.extend(absorbed_bias);
    nodes.push(j);
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
        label: label.join("+"),
        input: x_codes.to_string(),
        output: q_out.clone(),
        kernel: Box::new(kernel),
    })
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

/// The shape and values of a DequantizeLinear of constant i32 codes (a bias), per tensor or
/// along axis 0 of a vector.
fn dequantized_constant(model: &Model, dq: &Node) -> Option<(Vec<usize>, Vec<f32>)> {
    let g = &model.graph;
    if dq.op_type != "DequantizeLinear" || !default_domain(dq) {
        return None;
    }
    let codes = g.initializers.get(dq.input(0)?)?;
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
    let at = |v: &[f32], i: usize| v[if v.len() == 1 { 0 } else { i }];
    let values = c
        .iter()
        .enumerate()
        .map(|(i, &q)| {
            let z = zp[if zp.len() == 1 { 0 } else { i }];
            ((i64::from(q) - i64::from(z)) as f32) * at(scale, i)
        })
        .collect();
    Some((codes.shape().to_vec(), values))
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
                if shape.last() != Some(&k) {
                    return Err(ops::node_error(
                        &self.node,
                        format!("input of shape {shape:?} does not end in the weight's {k}"),
                    ));
                }
                let rows = x.numel() / k;
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
                TensorData::U8(v) => {
                    let (lo, hi) = (lo as u8, hi as u8);
                    v.iter_mut().for_each(|c| *c = (*c).clamp(lo, hi));
                }
                TensorData::I8(v) => {
                    let (lo, hi) = (lo as i8, hi as i8);
                    v.iter_mut().for_each(|c| *c = (*c).clamp(lo, hi));
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
        let s = Session::new(model, &SessionOptions { threads: 1, plan }).unwrap();
        let out = s.run(&[("x", x.clone())]).unwrap();
        let TensorData::U8(v) = out[0].1.data() else {
            panic!("not u8")
        };
        let labels = s.step_labels().into_iter().map(String::from).collect();
        (v.clone(), labels)
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

    /// f32 weights (not quantized) and a data input with a second reader stay unfused.
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
