//! Plan-time fusion of `DequantizeLinear -> f32 ops -> QuantizeLinear` chains into one
//! integer step. The int8 QOperator models lithe writes keep every op without a QLinear form
//! in f32 between a DequantizeLinear and a QuantizeLinear (HardSwish after each QLinearConv of
//! PP-LCNet, MaxPool after the convolutions of the MNIST CNN); those three f32 passes cost a
//! third of the int8 latency. The file stays as it is (ONNX Runtime runs it); only the plan
//! changes.
//!
//! A chain fuses when both ends have constant per-tensor parameters on 8-bit codes and every
//! intermediate f32 value has that one reader and is not a graph output. Between the ends:
//! - any number of per-element f32 ops ([`ELEMENTWISE`]), whose other inputs are constant
//!   scalars: together with both ends they become a 256-entry code table;
//! - a MaxPool directly after the DequantizeLinear: it pools the codes (dequantization is
//!   monotone non-decreasing, so the max commutes with it);
//! - layout ops ([`LAYOUT`], constant shape inputs), run on the codes after the table: they
//!   move elements without looking at them, so they commute with a per-element map.
//!
//! The table is filled by running the unfused kernels (our DequantizeLinear, each op's own
//! compiled kernel, our QuantizeLinear) on all 256 codes, so the fused step is bit-identical
//! with the unfused path by construction. AveragePool is left alone: a mean of codes is not
//! the code of a mean.

use std::collections::{HashMap, HashSet};

use crate::error::Result;
use crate::ir::{DType, Model, Node, Tensor, TensorData};
use crate::ops::quantized::lut::{CodeTable, LutKernel, MaxPoolLutKernel};
use crate::ops::{self, CompileCtx, Kernel, RunCtx};

/// f32 ops that compute each output element from the same input element alone (with
/// constant scalar operands), position-independently: a table of their results on every
/// code is exact.
pub const ELEMENTWISE: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Sqrt",
    "Exp",
    "Log",
    "Erf",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sin",
    "Cos",
    "Tan",
    "Neg",
    "Abs",
    "Sign",
    "Identity",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
];

/// Ops that only rearrange elements (or the shape), for any element type.
pub const LAYOUT: &[&str] = &["Reshape", "Flatten", "Squeeze", "Unsqueeze"];

/// A fused chain, ready to become one plan step.
pub struct Fusion {
    /// The graph nodes the step replaces, DequantizeLinear first and QuantizeLinear last.
    pub nodes: Vec<usize>,
    /// Op types joined by `+`, as the other fused steps are labelled.
    pub label: String,
    pub kernel: Box<dyn Kernel>,
}

/// What the planner knows about value use, shared by the fusion rules.
pub struct Uses<'a> {
    /// Node input slots reading each value (a node reading it twice counts twice).
    pub readers: &'a HashMap<&'a str, usize>,
    pub graph_outputs: &'a HashSet<&'a str>,
    /// The node computing each value.
    pub producers: &'a HashMap<&'a str, usize>,
}

enum Link {
    Elementwise(usize),
    MaxPool(usize),
    Layout(usize),
}

/// The fused form of the chain starting at DequantizeLinear node `start`, or `None` when the
/// chain does not qualify. Never an error: a chain that cannot be fused runs unfused, where
/// any problem with its nodes is reported as usual.
pub fn fuse_chain(model: &Model, start: usize, uses: &Uses) -> Option<Fusion> {
    let graph = &model.graph;
    let dq = graph.nodes.get(start)?;
    if dq.op_type != "DequantizeLinear" || !default_domain(dq) {
        return None;
    }
    let in_dtype = code_type_of_dq(model, dq)?;
    if !per_tensor_constants(model, dq) {
        return None;
    }
    let [out] = dq.outputs.as_slice() else {
        return None;
    };
    let mut cur: &str = out;
    let mut links = Vec::new();
    let q_index = loop {
        if uses.graph_outputs.contains(cur) || uses.readers.get(cur) != Some(&1) {
            return None;
        }
        let (j, next) = graph
            .nodes
            .iter()
            .enumerate()
            .skip(start + 1)
            .find(|(_, n)| n.inputs.iter().any(|i| i == cur))?;
        if !default_domain(next) || next.outputs.len() != 1 || next.outputs[0].is_empty() {
            return None;
        }
        let op = next.op_type.as_str();
        let data_first = next.inputs.first().is_some_and(|i| i == cur);
        let others_constant = next
            .inputs
            .iter()
            .filter(|i| *i != cur && !i.is_empty())
            .all(|i| graph.initializers.contains_key(i));
        if !others_constant {
            return None;
        }
        match op {
            "QuantizeLinear" if data_first && per_tensor_constants(model, next) => break j,
            "MaxPool" if data_first && links.is_empty() => links.push(Link::MaxPool(j)),
            _ if ELEMENTWISE.contains(&op) && scalar_operands(model, next, cur) => {
                links.push(Link::Elementwise(j))
            }
            _ if LAYOUT.contains(&op) && data_first => links.push(Link::Layout(j)),
            _ => return None,
        }
        cur = &next.outputs[0];
    };
    build(model, start, in_dtype, &links, q_index)
}

pub(super) fn default_domain(n: &Node) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// The code type a DequantizeLinear reads: its input's declared type, else its zero point's.
pub(super) fn code_type_of_dq(model: &Model, dq: &Node) -> Option<DType> {
    let graph = &model.graph;
    let x = dq.inputs.first().filter(|x| !x.is_empty())?;
    let declared = graph.type_of(x);
    let zp = dq.input(2).and_then(|z| graph.initializers.get(z));
    let dt = declared.map(|t| t.dtype).or(zp.map(Tensor::dtype))?;
    matches!(dt, DType::U8 | DType::I8).then_some(dt)
}

/// Scale (and zero point, when present) are initializers holding one value each.
pub(super) fn per_tensor_constants(model: &Model, n: &Node) -> bool {
    let one = |i: usize| {
        n.input(i)
            .and_then(|name| model.graph.initializers.get(name))
            .is_some_and(|t| t.numel() == 1)
    };
    one(1) && (n.input(2).is_none() || one(2))
}

/// Every input other than the chain value `cur` is a one-element constant whose rank does not
/// exceed `cur`'s, so broadcasting keeps `cur`'s shape; `cur` is read once.
fn scalar_operands(model: &Model, n: &Node, cur: &str) -> bool {
    let graph = &model.graph;
    let rank = graph.type_of(cur).and_then(|t| t.rank());
    n.inputs.iter().filter(|i| *i == cur).count() == 1
        && n.inputs
            .iter()
            .filter(|i| *i != cur && !i.is_empty())
            .all(|i| {
                graph.initializers.get(i).is_some_and(|t| {
                    t.numel() == 1 && (t.rank() == 0 || rank.is_some_and(|r| t.rank() <= r))
                })
            })
}

/// A node compiled as the unfused plan would compile it.
fn compile(model: &Model, node: &Node) -> Option<Box<dyn Kernel>> {
    let graph = &model.graph;
    let opset = model.opset();
    let def = ops::lookup(node, opset).ok()?;
    let ctx = CompileCtx {
        node,
        opset,
        input_types: node
            .inputs
            .iter()
            .map(|n| if n.is_empty() { None } else { graph.type_of(n) })
            .collect(),
        constants: graph.constant_inputs(node),
        fused_activation: None,
    };
    (def.compile)(&ctx).ok()
}

/// A compiled node with its constant inputs, run on the chain value.
struct Compiled {
    node: Node,
    kernel: Box<dyn Kernel>,
    constants: Vec<Option<Tensor>>,
    /// Position of the chain value among the inputs: the one input that is not constant.
    data: usize,
}

impl Compiled {
    fn new(model: &Model, node: &Node) -> Option<Compiled> {
        let constants: Vec<Option<Tensor>> = node
            .inputs
            .iter()
            .map(|n| model.graph.initializers.get(n).cloned())
            .collect();
        let data = node
            .inputs
            .iter()
            .zip(&constants)
            .position(|(n, c)| !n.is_empty() && c.is_none())?;
        Some(Compiled {
            node: node.clone(),
            kernel: compile(model, node)?,
            constants,
            data,
        })
    }

    fn run(&self, x: &Tensor) -> Result<Tensor> {
        let mut args: Vec<Option<&Tensor>> = self.constants.iter().map(Option::as_ref).collect();
        args[self.data] = Some(x);
        let mut out = self.kernel.run(&args, &mut RunCtx::default())?;
        match out.is_empty() {
            true => Err(ops::node_error(&self.node, "produced no output")),
            false => Ok(out.swap_remove(0)),
        }
    }
}

/// The first element of a tensor of codes, as a bit pattern.
fn first_code(t: &Tensor) -> Option<u8> {
    match t.data() {
        TensorData::U8(v) => v.first().copied(),
        TensorData::I8(v) => v.first().map(|&c| c as u8),
        _ => None,
    }
}

fn build(
    model: &Model,
    start: usize,
    in_dtype: DType,
    links: &[Link],
    q_index: usize,
) -> Option<Fusion> {
    let nodes = &model.graph.nodes;
    let dq = &nodes[start];
    let q = &nodes[q_index];
    let index = |l: &Link| match *l {
        Link::Elementwise(j) | Link::MaxPool(j) | Link::Layout(j) => j,
    };
    // The table covers the elementwise ops and the QuantizeLinear; the pool and the layout
    // ops act on codes around it.
    let dq_kernel = Compiled::new(model, dq)?;
    let mut tail = Vec::new();
    for l in links {
        if let Link::Elementwise(j) = *l {
            tail.push(Compiled::new(model, &nodes[j])?);
        }
    }
    tail.push(Compiled::new(model, q)?);
    let run_tail = |x: Tensor| -> Option<Tensor> { tail.iter().try_fold(x, |v, s| s.run(&v).ok()) };
    let real = dq_kernel.run(&CodeTable::all_codes(in_dtype).ok()?).ok()?;
    let table = CodeTable::from_outputs(in_dtype, &run_tail(real)?).ok()?;

    let head: Box<dyn Kernel> = match links.first() {
        Some(&Link::MaxPool(p)) => {
            // What the f32 chain makes of a window covering only padding (`f32::MIN`).
            let lowest = Tensor::from_f32(vec![1], vec![f32::MIN]).ok()?;
            let empty = first_code(&run_tail(lowest)?)?;
            Box::new(MaxPoolLutKernel::new(dq, &nodes[p], table, empty).ok()?)
        }
        _ => Box::new(LutKernel::new(dq, table)),
    };
    let mut layout = Vec::new();
    for l in links {
        if let Link::Layout(j) = *l {
            layout.push(LayoutStep::new(model, &nodes[j])?);
        }
    }
    let kernel: Box<dyn Kernel> = if layout.is_empty() {
        head
    } else {
        Box::new(WithLayout {
            head,
            steps: layout,
        })
    };
    let mut all = vec![start];
    all.extend(links.iter().map(index));
    all.push(q_index);
    let label: Vec<&str> = all.iter().map(|&j| nodes[j].op_type.as_str()).collect();
    Some(Fusion {
        label: label.join("+"),
        nodes: all,
        kernel,
    })
}

/// A layout op run on codes, with its constant inputs.
struct LayoutStep {
    kernel: Box<dyn Kernel>,
    /// Inputs after the data input.
    constants: Vec<Option<Tensor>>,
}

impl LayoutStep {
    fn new(model: &Model, node: &Node) -> Option<LayoutStep> {
        Some(LayoutStep {
            kernel: compile(model, node)?,
            constants: node
                .inputs
                .iter()
                .skip(1)
                .map(|n| model.graph.initializers.get(n).cloned())
                .collect(),
        })
    }

    /// Moves `x` through the op, reusing its storage when the kernel can.
    fn run(&self, x: Tensor, ctx: &mut RunCtx) -> Result<Tensor> {
        let mut args: Vec<Option<&Tensor>> = vec![None];
        args.extend(self.constants.iter().map(Option::as_ref));
        let mut out = if self.kernel.reuses_input() == Some(0) {
            self.kernel.run_owned(x, &args, ctx)?
        } else {
            args[0] = Some(&x);
            self.kernel.run(&args, ctx)?
        };
        match out.is_empty() {
            true => Err(crate::error::Error::Graph(
                "a layout op produced no output".into(),
            )),
            false => Ok(out.swap_remove(0)),
        }
    }
}

/// The integer head of a chain followed by its layout ops.
struct WithLayout {
    head: Box<dyn Kernel>,
    steps: Vec<LayoutStep>,
}

impl Kernel for WithLayout {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let out = self.head.run(inputs, ctx)?;
        self.finish(out, ctx)
    }

    fn reuses_input(&self) -> Option<usize> {
        self.head.reuses_input()
    }

    fn run_owned(
        &self,
        owned: Tensor,
        inputs: &[Option<&Tensor>],
        ctx: &mut RunCtx,
    ) -> Result<Vec<Tensor>> {
        let out = self.head.run_owned(owned, inputs, ctx)?;
        self.finish(out, ctx)
    }
}

impl WithLayout {
    fn finish(&self, mut out: Vec<Tensor>, ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let Some(mut v) = out.pop() else {
            return Ok(out);
        };
        for s in &self.steps {
            v = s.run(v, ctx)?;
        }
        Ok(vec![v])
    }
}

#[cfg(test)]
mod tests {
    use crate::ir::{
        Attr, DType, Dim, Graph, Model, Node, Tensor, TensorData, TypeInfo, ValueInfo,
    };
    use crate::kernels::testutil::Rng;
    use crate::runtime::{PlanOptions, Session, SessionOptions};

    fn code(dt: DType, v: i64) -> Tensor {
        let data = match dt {
            DType::U8 => TensorData::U8(vec![v as u8]),
            _ => TensorData::I8(vec![v as i8]),
        };
        Tensor::new(vec![], data).unwrap()
    }

    fn codes(dt: DType, shape: Vec<usize>, bits: Vec<u8>) -> Tensor {
        let data = match dt {
            DType::U8 => TensorData::U8(bits),
            _ => TensorData::I8(bits.into_iter().map(|b| b as i8).collect()),
        };
        Tensor::new(shape, data).unwrap()
    }

    /// `x (codes) -> DequantizeLinear -> ops -> QuantizeLinear -> y` with per-tensor
    /// parameters; `ops` read and write values named `v0`, `v1`, ... (DequantizeLinear
    /// writes `v0`, QuantizeLinear reads the last).
    fn chain(
        in_dt: DType,
        out_dt: DType,
        in_shape: &[usize],
        ops: Vec<Node>,
        consts: Vec<(&str, Tensor)>,
    ) -> Model {
        let last = format!("v{}", ops.len());
        let mut nodes = vec![Node::new(
            "dq",
            "DequantizeLinear",
            vec!["x".into(), "s_in".into(), "z_in".into()],
            vec!["v0".into()],
        )];
        nodes.extend(ops);
        nodes.push(Node::new(
            "q",
            "QuantizeLinear",
            vec![last, "s_out".into(), "z_out".into()],
            vec!["y".into()],
        ));
        let dims: Vec<Dim> = in_shape.iter().map(|&d| Dim::Known(d)).collect();
        let mut graph = Graph {
            inputs: vec![ValueInfo::new("x", TypeInfo::new(in_dt, dims.clone()))],
            outputs: vec![ValueInfo::new("y", TypeInfo::unknown_shape(out_dt))],
            nodes,
            ..Graph::default()
        };
        // The dequantized value's type, as shape inference records it in real models.
        graph
            .value_info
            .insert("v0".into(), TypeInfo::new(DType::F32, dims));
        let (zi, zo) = (
            if in_dt == DType::U8 { 131 } else { -3 },
            if out_dt == DType::U8 { 120 } else { 5 },
        );
        for (name, t) in [
            ("s_in", Tensor::scalar_f32(0.043)),
            ("z_in", code(in_dt, zi)),
            ("s_out", Tensor::scalar_f32(0.029)),
            ("z_out", code(out_dt, zo)),
        ]
        .into_iter()
        .chain(consts)
        {
            graph.initializers.insert(name.into(), t);
        }
        Model::new(graph, 18)
    }

    fn options(fuse: bool) -> PlanOptions {
        PlanOptions {
            fuse_quantized: fuse,
            fuse_qdq_products: false,
            ..PlanOptions::default()
        }
    }

    fn session(model: &Model, fuse: bool) -> Session {
        let plan = options(fuse);
        Session::new(model, &SessionOptions { threads: 1, plan }).unwrap()
    }

    fn labels(model: &Model, fuse: bool) -> Vec<String> {
        let plan = crate::runtime::plan::build(model, &options(fuse)).unwrap();
        plan.steps.into_iter().map(|s| s.label).collect()
    }

    /// Runs fused and unfused on `x`: same result, and the fused plan is one step labelled
    /// `label`.
    fn check(model: &Model, x: Tensor, label: &str) {
        let (fused, plain) = (session(model, true), session(model, false));
        assert_eq!(labels(model, true), [label]);
        assert!(labels(model, false).len() > 1);
        let want = plain.run(&[("x", x.clone())]).unwrap();
        let got = fused.run(&[("x", x)]).unwrap();
        assert_eq!(got[0].1, want[0].1, "{label}");
    }

    fn unary(op: &str) -> Node {
        Node::new("op", op, vec!["v0".into()], vec!["v1".into()])
    }

    /// Every elementwise op on all 256 codes, u8 and i8 in and out.
    #[test]
    fn tables_equal_the_unfused_chain_on_every_code() {
        let ops: Vec<(Node, Vec<(&str, Tensor)>)> = vec![
            (unary("HardSwish"), vec![]),
            (
                unary("HardSigmoid")
                    .with_attr("alpha", Attr::Float(0.3))
                    .with_attr("beta", Attr::Float(0.4)),
                vec![],
            ),
            (unary("Relu"), vec![]),
            (
                unary("LeakyRelu").with_attr("alpha", Attr::Float(0.1)),
                vec![],
            ),
            (unary("Sigmoid"), vec![]),
            (unary("Tanh"), vec![]),
            (
                Node::new(
                    "op",
                    "Clip",
                    vec!["v0".into(), "lo".into(), "hi".into()],
                    vec!["v1".into()],
                ),
                vec![
                    ("lo", Tensor::scalar_f32(-0.5)),
                    ("hi", Tensor::scalar_f32(1.5)),
                ],
            ),
            (
                Node::new(
                    "op",
                    "Clip",
                    vec!["v0".into(), String::new(), "hi".into()],
                    vec!["v1".into()],
                ),
                vec![("hi", Tensor::scalar_f32(0.7))],
            ),
            (unary("Exp"), vec![]),
            (unary("Erf"), vec![]),
            (unary("Abs"), vec![]),
            (unary("Neg"), vec![]),
            (unary("Round"), vec![]),
            (unary("Sqrt"), vec![]),
            (unary("Identity"), vec![]),
            (
                Node::new(
                    "op",
                    "Sub",
                    vec!["c".into(), "v0".into()],
                    vec!["v1".into()],
                ),
                vec![("c", Tensor::scalar_f32(0.25))],
            ),
            (
                Node::new(
                    "op",
                    "Mul",
                    vec!["v0".into(), "c".into()],
                    vec!["v1".into()],
                ),
                vec![("c", Tensor::from_f32(vec![1, 1], vec![1.7]).unwrap())],
            ),
            (
                Node::new(
                    "op",
                    "Div",
                    vec!["c".into(), "v0".into()],
                    vec!["v1".into()],
                ),
                vec![("c", Tensor::scalar_f32(0.5))],
            ),
        ];
        let all: Vec<u8> = (0..=255).collect();
        for (op, consts) in ops {
            for in_dt in [DType::U8, DType::I8] {
                for out_dt in [DType::U8, DType::I8] {
                    let label = format!("DequantizeLinear+{}+QuantizeLinear", op.op_type);
                    let m = chain(in_dt, out_dt, &[2, 128], vec![op.clone()], consts.clone());
                    check(&m, codes(in_dt, vec![2, 128], all.clone()), &label);
                }
            }
        }
    }

    /// Several elementwise ops and a layout op in one chain; a bare requantization.
    #[test]
    fn longer_and_empty_chains_fuse() {
        let all: Vec<u8> = (0..=255).collect();
        let ops = vec![
            Node::new("a", "HardSwish", vec!["v0".into()], vec!["v1".into()]),
            Node::new(
                "b",
                "Reshape",
                vec!["v1".into(), "shape".into()],
                vec!["v2".into()],
            ),
            Node::new("c", "Add", vec!["v2".into(), "c".into()], vec!["v3".into()]),
        ];
        let consts = vec![
            ("shape", Tensor::from_i64(vec![2], vec![16, -1]).unwrap()),
            ("c", Tensor::scalar_f32(0.125)),
        ];
        let m = chain(DType::U8, DType::I8, &[2, 128], ops, consts);
        check(
            &m,
            codes(DType::U8, vec![2, 128], all.clone()),
            "DequantizeLinear+HardSwish+Reshape+Add+QuantizeLinear",
        );
        let m = chain(DType::I8, DType::U8, &[256], vec![], vec![]);
        check(
            &m,
            codes(DType::I8, vec![256], all),
            "DequantizeLinear+QuantizeLinear",
        );
    }

    #[test]
    fn chains_that_must_stay_unfused() {
        let steps = |m: &Model| labels(m, true).len();
        // The f32 value is a graph output too.
        let mut m = chain(DType::U8, DType::U8, &[4], vec![unary("Relu")], vec![]);
        m.graph
            .outputs
            .push(ValueInfo::new("v1", TypeInfo::unknown_shape(DType::F32)));
        assert_eq!(steps(&m), 3);
        // Per-axis dequantization.
        let mut m = chain(DType::U8, DType::U8, &[2, 2], vec![unary("Relu")], vec![]);
        let g = &mut m.graph.initializers;
        g.insert(
            "s_in".into(),
            Tensor::from_f32(vec![2], vec![0.1, 0.2]).unwrap(),
        );
        g.insert(
            "z_in".into(),
            Tensor::new(vec![2], TensorData::U8(vec![1, 2])).unwrap(),
        );
        assert_eq!(steps(&m), 3);
        // A Clip bound computed at run time, an op the table cannot hold, a pool that is
        // not monotone-exact.
        for (op, extra) in [
            (
                Node::new(
                    "op",
                    "Clip",
                    vec!["v0".into(), "x2".into()],
                    vec!["v1".into()],
                ),
                true,
            ),
            (unary("Softmax"), false),
            (
                unary("AveragePool").with_attr("kernel_shape", Attr::Ints(vec![2, 2])),
                false,
            ),
        ] {
            let mut m = chain(DType::U8, DType::U8, &[1, 1, 2, 2], vec![op], vec![]);
            if extra {
                m.graph
                    .inputs
                    .push(ValueInfo::new("x2", TypeInfo::new(DType::F32, vec![])));
            }
            assert_eq!(steps(&m), 3);
        }
    }

    /// Integer MaxPool against DequantizeLinear -> MaxPool -> QuantizeLinear on random codes,
    /// over strides, pads (windows of padding only among them), dilations, `ceil_mode`,
    /// `auto_pad` and 1-D windows, with an identity table and with a real one.
    #[test]
    fn integer_max_pool_equals_the_unfused_chain() {
        let mut rng = Rng::new(11);
        let ints = |v: Vec<i64>| Attr::Ints(v);
        let mut compared = 0;
        for case in 0..120 {
            let one_d = case % 5 == 4;
            let rank = if one_d { 1 } else { 2 };
            let r = |rng: &mut Rng, lo, hi| rng.range(lo, hi) as i64;
            let kernel: Vec<i64> = (0..rank).map(|_| r(&mut rng, 1, 3)).collect();
            let mut pool = Node::new("p", "MaxPool", vec!["v0".into()], vec!["v1".into()])
                .with_attr("kernel_shape", ints(kernel.clone()))
                .with_attr(
                    "strides",
                    ints((0..rank).map(|_| r(&mut rng, 1, 3)).collect()),
                )
                .with_attr(
                    "dilations",
                    ints((0..rank).map(|_| r(&mut rng, 1, 2)).collect()),
                )
                .with_attr("ceil_mode", Attr::Int(r(&mut rng, 0, 1)));
            if case % 7 == 3 {
                pool = pool.with_attr("auto_pad", Attr::String("SAME_UPPER".into()));
            } else {
                // Up to the kernel extent: some windows see only padding.
                let pads = (0..2 * rank)
                    .map(|i| r(&mut rng, 0, kernel[i % rank] as usize))
                    .collect();
                pool = pool.with_attr("pads", ints(pads));
            }
            let mut shape = vec![rng.range(1, 2), rng.range(1, 3)];
            shape.extend((0..rank).map(|_| rng.range(2, 9)));
            let in_dt = if case % 2 == 0 { DType::U8 } else { DType::I8 };
            let same = case % 3 == 0;
            let out_dt = if same || case % 4 < 2 {
                in_dt
            } else {
                DType::U8
            };
            let mut m = chain(in_dt, out_dt, &shape, vec![pool], vec![]);
            if same {
                let g = &mut m.graph.initializers;
                let (s, z) = (g["s_in"].clone(), g["z_in"].clone());
                g.insert("s_out".into(), s);
                g.insert("z_out".into(), z);
            }
            let n = shape.iter().product();
            let bits = (0..n).map(|_| rng.next_u64() as u8).collect();
            let x = codes(in_dt, shape.clone(), bits);
            // Geometries with no output are errors either way.
            let plain = session(&m, false).run(&[("x", x.clone())]);
            let fused = session(&m, true);
            assert_eq!(
                labels(&m, true)[0],
                "DequantizeLinear+MaxPool+QuantizeLinear"
            );
            let got = fused.run(&[("x", x)]);
            match (plain, got) {
                (Ok(want), Ok(got)) => {
                    assert_eq!(got[0].1, want[0].1, "case {case} {shape:?}");
                    compared += 1;
                }
                (Err(_), Err(_)) => {}
                (want, got) => panic!("case {case}: {:?} vs {:?}", want.err(), got.err()),
            }
        }
        assert!(compared > 100, "only {compared} geometries ran");
    }
}
