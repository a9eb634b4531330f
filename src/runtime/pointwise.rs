//! Chains of pointwise f32 arithmetic run as one step: `Add`, `Sub`, `Mul` and `Div` whose
//! other operand is a constant or a value computed before the chain (a scalar, or one value
//! per index of the last axis) or an earlier value of the chain, and `Erf` and `Sqrt`; the
//! chain may start with a `Cast` of i32 to f32. A transformer's bias add and GELU
//! (`Add -> Div -> Erf -> Add -> Mul -> Mul`) are such a chain, and so is the epilogue of a
//! dynamically quantized product (`MatMulInteger -> Cast -> Mul` by the scales `-> Add` the
//! bias). Unfused, every op is one more pass over a tensor that often does not fit in cache;
//! fused, the chain works through the tensor in blocks that stay in L1, reading and writing
//! each element once.
//!
//! Every element goes through the same operations in the same order as unfused, so the
//! results are the same bit for bit. When a run's operands do not fit the fast path (another
//! dtype, or an operand that would broadcast the result to a larger shape), the step runs the
//! chain's own op kernels one after another instead.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

use super::qfuse::Uses;
use crate::error::{Error, Result};
use crate::ir::{DType, Dim, Model, Node, Tensor, TensorData};
use crate::ops::erf::erf_slice_f32;
use crate::ops::{self, required, CompileCtx, Kernel, RunCtx};

/// Elements per block: a block and the chain's intermediate blocks stay in L1.
const BLOCK: usize = 1024;
/// Elements per parallel task.
const TASK: usize = 16 * BLOCK;
/// Tensors with at least this many elements split their tasks over threads.
const PAR_MIN: usize = 4 * TASK;
/// Nodes looked at past the chain's last one for its next (exporters interleave others).
const WINDOW: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// `Cast` of the chain's i32 input to f32 (first instruction only).
    CastI32,
    Add,
    Sub,
    Mul,
    Div,
    Erf,
    Sqrt,
}

impl Op {
    fn of(node: &Node) -> Option<Op> {
        if !node.domain.is_empty() || node.outputs.len() != 1 {
            return None;
        }
        if node.op_type == "Cast" {
            let to_f32 = node.attrs.len() == 1
                && node.attr_int("to").ok().flatten() == Some(i64::from(DType::F32.onnx_code()));
            return to_f32.then_some(Op::CastI32);
        }
        if !node.attrs.is_empty() {
            return None;
        }
        Some(match node.op_type.as_str() {
            "Add" => Op::Add,
            "Sub" => Op::Sub,
            "Mul" => Op::Mul,
            "Div" => Op::Div,
            "Erf" => Op::Erf,
            "Sqrt" => Op::Sqrt,
            _ => return None,
        })
    }

    fn arity(self) -> usize {
        match self {
            Op::CastI32 | Op::Erf | Op::Sqrt => 1,
            _ => 2,
        }
    }
}

/// An operand of one instruction.
#[derive(Clone, Debug)]
enum Operand {
    /// Register `k`: 0 is the chain's input, `k` the result of instruction `k - 1`.
    Reg(usize),
    /// A constant with one element, of this rank.
    Scalar(f32, usize),
    /// A constant with one value per index of the last axis, of this rank.
    Row(Arc<[f32]>, usize),
    /// Extra input `k` of the step: a value computed before the chain.
    Ext(usize),
}

struct Instr {
    op: Op,
    args: Vec<Operand>,
    /// The op's own kernel and constant inputs, for runs the fast path does not fit.
    kernel: Box<dyn Kernel>,
    consts: Vec<Option<Tensor>>,
}

/// A chain found in a graph, compiled into one kernel.
pub struct Chain {
    /// Graph node indices, in order.
    pub nodes: Vec<usize>,
    /// The chain's input, then the values computed before it that it reads.
    pub inputs: Vec<String>,
    pub output: String,
    /// The op types joined by `+`, for profiles.
    pub label: String,
    pub kernel: Box<dyn Kernel>,
}

/// What [`find`] has gathered so far.
struct Building<'a> {
    model: &'a Model,
    /// The chain starts with a Cast of its i32 input, which no later node may read.
    cast_first: bool,
    /// Chain value -> register.
    regs: HashMap<&'a str, usize>,
    /// Values computed before the chain that it reads, in order.
    exts: Vec<&'a str>,
    /// The chain input's last dimension, when known.
    last_dim: Option<usize>,
}

/// The longest chain (of two or more nodes) starting at node `start`, if any: each node
/// reads only chain values, constants and values computed outside the chain, and every
/// value but the last is read by chain nodes only (and is no graph output), so nothing
/// outside needs it. Its step must run where its last node would.
pub fn find(model: &Model, start: usize, uses: &Uses, absorbed: &[bool]) -> Option<Chain> {
    let graph = &model.graph;
    // Before opset 7 the arithmetic ops broadcast by attribute.
    if model.opset() < 7 || absorbed[start] {
        return None;
    }
    let first = &graph.nodes[start];
    let first_op = Op::of(first)?;
    let computed: Vec<&String> = first
        .inputs
        .iter()
        .filter(|i| !graph.initializers.contains_key(*i))
        .collect();
    let input = computed.first()?.as_str();
    if input.is_empty() || computed.iter().any(|c| c.as_str() != input) {
        return None;
    }
    let input_type = graph.type_of(input);
    let wanted = match first_op {
        Op::CastI32 => DType::I32,
        _ => DType::F32,
    };
    if input_type.as_ref().is_some_and(|t| t.dtype != wanted) {
        return None;
    }
    let last_dim = input_type
        .and_then(|t| t.shape)
        .and_then(|s| match s.last() {
            Some(Dim::Known(n)) => Some(*n),
            _ => None,
        });
    let mut b = Building {
        model,
        cast_first: first_op == Op::CastI32,
        regs: HashMap::from([(input, 0)]),
        exts: Vec::new(),
        last_dim,
    };
    let mut nodes = Vec::new();
    let mut instrs = Vec::new();
    let mut j = start;
    let mut skipped = 0;
    while j < graph.nodes.len() && skipped <= WINDOW {
        let node = &graph.nodes[j];
        let reads_chain = node
            .inputs
            .iter()
            .any(|i| b.regs.get(i.as_str()).is_some_and(|&r| r > 0));
        if j > start && !reads_chain {
            skipped += 1;
            j += 1;
            continue;
        }
        let Some(instr) = (!absorbed[j])
            .then(|| instruction(&mut b, node, j == start))
            .flatten()
        else {
            break;
        };
        b.regs.insert(node.outputs[0].as_str(), nodes.len() + 1);
        nodes.push(j);
        instrs.push(instr);
        skipped = 0;
        j += 1;
    }
    // Trim until no value but the last is needed outside the chain.
    while nodes.len() >= 2 {
        let inner = &nodes[..nodes.len() - 1];
        let escapes = inner.iter().any(|&n| {
            let v = graph.nodes[n].outputs[0].as_str();
            let within: usize = nodes
                .iter()
                .map(|&m| graph.nodes[m].inputs.iter().filter(|i| *i == v).count())
                .sum();
            uses.graph_outputs.contains(v) || uses.readers.get(v).copied().unwrap_or(0) != within
        });
        if !escapes {
            break;
        }
        nodes.pop();
        instrs.pop();
    }
    if nodes.len() < 2 {
        return None;
    }
    // Only the extra inputs the trimmed chain still reads: a dropped node's may be computed
    // after the chain's new last node, where the step runs.
    let mut exts: Vec<&str> = Vec::new();
    for arg in instrs.iter_mut().flat_map(|i| i.args.iter_mut()) {
        if let Operand::Ext(k) = arg {
            let name = b.exts[*k];
            *k = match exts.iter().position(|e| *e == name) {
                Some(p) => p,
                None => {
                    exts.push(name);
                    exts.len() - 1
                }
            };
        }
    }
    let label = nodes
        .iter()
        .map(|&n| graph.nodes[n].op_type.as_str())
        .collect::<Vec<_>>()
        .join("+");
    let output = graph.nodes[*nodes.last()?].outputs[0].clone();
    let inputs = std::iter::once(input)
        .chain(exts.iter().copied())
        .map(str::to_string)
        .collect();
    Some(Chain {
        nodes,
        inputs,
        output,
        label,
        kernel: Box::new(ChainKernel {
            instrs,
            exts: exts.len(),
        }),
    })
}

/// `node` as an instruction of the chain `b` is building, if it can join.
fn instruction<'a>(b: &mut Building<'a>, node: &'a Node, first: bool) -> Option<Instr> {
    let op = Op::of(node)?;
    if node.inputs.len() != op.arity() || (op == Op::CastI32 && !first) {
        return None;
    }
    let graph = &b.model.graph;
    let mut args = Vec::with_capacity(node.inputs.len());
    let mut consts = Vec::with_capacity(node.inputs.len());
    for name in &node.inputs {
        consts.push(None);
        if let Some(&r) = b.regs.get(name.as_str()) {
            // The i32 input of a chain that starts with a Cast is for the Cast alone.
            if r == 0 && b.cast_first && !first {
                return None;
            }
            args.push(Operand::Reg(r));
            continue;
        }
        if let Some(t) = graph.initializers.get(name) {
            let v = t.as_f32().ok()?;
            let dims = t.shape();
            args.push(match v.len() {
                1 => Operand::Scalar(v[0], dims.len()),
                n if n > 1 && dims.last() == Some(&n) => Operand::Row(v.into(), dims.len()),
                _ => return None,
            });
            *consts.last_mut()? = Some(t.clone());
            continue;
        }
        // Computed outside the chain (the step runs where the chain's last node would, so
        // after it), and not a column (one value per row) or a full tensor.
        let shape_fits = graph.type_of(name).and_then(|t| t.shape).is_none_or(|s| {
            match (s.last(), b.last_dim) {
                (None, _) => true,
                (Some(Dim::Known(1)), _) => s.iter().all(|d| *d == Dim::Known(1)),
                (Some(Dim::Known(n)), Some(last)) => *n == last,
                _ => true,
            }
        });
        if name.is_empty() || !shape_fits {
            return None;
        }
        let k = match b.exts.iter().position(|e| e == name) {
            Some(k) => k,
            None => {
                b.exts.push(name.as_str());
                b.exts.len() - 1
            }
        };
        args.push(Operand::Ext(k));
    }
    // At least one operand is a chain value (the first node reads the chain's input).
    if !args.iter().any(|a| matches!(a, Operand::Reg(_))) {
        return None;
    }
    let ctx = CompileCtx {
        node,
        opset: b.model.opset(),
        input_types: node.inputs.iter().map(|n| graph.type_of(n)).collect(),
        constants: node
            .inputs
            .iter()
            .map(|n| graph.initializers.get(n))
            .collect(),
        fused_activation: None,
    };
    let kernel = (ops::lookup(node, b.model.opset()).ok()?.compile)(&ctx).ok()?;
    Some(Instr {
        op,
        args,
        kernel,
        consts,
    })
}

struct ChainKernel {
    instrs: Vec<Instr>,
    /// Extra inputs of the step, after the chain's input.
    exts: usize,
}

/// The chain's input, as one task sees it.
#[derive(Clone, Copy)]
enum Input<'a> {
    F32(&'a [f32]),
    I32(&'a [i32]),
}

impl Input<'_> {
    fn len(&self) -> usize {
        match self {
            Input::F32(v) => v.len(),
            Input::I32(v) => v.len(),
        }
    }

    fn range(&self, r: std::ops::Range<usize>) -> Self {
        match self {
            Input::F32(v) => Input::F32(&v[r]),
            Input::I32(v) => Input::I32(&v[r]),
        }
    }
}

/// An operand as one block sees it.
#[derive(Clone, Copy)]
enum Src<'a> {
    Slice(&'a [f32]),
    Scalar(f32),
    /// The whole row, and the last-axis index of the block's first element.
    Row(&'a [f32], usize),
}

/// An extra input on the fast path.
#[derive(Clone, Copy)]
enum Ext<'a> {
    Scalar(f32),
    Row(&'a [f32]),
}

impl ChainKernel {
    /// The extra inputs as the fast path takes them, or `None` when a run must take the
    /// unfused path: the input's dtype is not the chain's, or an operand would broadcast
    /// the result beyond `x`'s shape.
    fn fast_operands<'a>(&self, x: &Tensor, exts: &[&'a Tensor]) -> Option<Vec<Ext<'a>>> {
        let rank = x.shape().len();
        let last = x.shape().last().copied();
        let wanted = match self.instrs.first()?.op {
            Op::CastI32 => DType::I32,
            _ => DType::F32,
        };
        let consts_fit = self.instrs.iter().flat_map(|i| &i.args).all(|a| match a {
            Operand::Reg(_) | Operand::Ext(_) => true,
            Operand::Scalar(_, r) => *r <= rank,
            Operand::Row(v, r) => *r <= rank && last == Some(v.len()),
        });
        if x.dtype() != wanted || !consts_fit {
            return None;
        }
        exts.iter()
            .map(|t| {
                let v = t.as_f32().ok()?;
                let fits = t.shape().len() <= rank;
                match v.len() {
                    1 if fits => Some(Ext::Scalar(v[0])),
                    n if fits && last == Some(n) && t.shape().last() == Some(&n) => {
                        Some(Ext::Row(v))
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// The chain on elements `offset..offset + x.len()` of the flattened input.
    fn span(&self, offset: usize, x: Input, exts: &[Ext], out: &mut [f32]) -> Result<()> {
        let mut regs = vec![vec![0f32; BLOCK]; self.instrs.len()];
        let blocks = x.len().div_ceil(BLOCK);
        for (b, ob) in out.chunks_mut(BLOCK).enumerate().take(blocks) {
            let at = offset + b * BLOCK;
            let len = ob.len();
            let xb = x.range(b * BLOCK..b * BLOCK + len);
            for (k, instr) in self.instrs.iter().enumerate() {
                let (done, rest) = regs.split_at_mut(k);
                let dst = &mut rest[0][..len];
                let src = |a| operand(a, xb, exts, done, at, len);
                match (instr.op, instr.args.as_slice()) {
                    (Op::CastI32, _) => match xb {
                        Input::I32(v) => dst.iter_mut().zip(v).for_each(|(d, &v)| *d = v as f32),
                        Input::F32(_) => return Err(chain_error("Cast of an f32 input")),
                    },
                    (Op::Erf, [a]) => match src(a)? {
                        Src::Slice(a) => erf_slice_f32(a, dst),
                        _ => return Err(chain_error("Erf of a broadcast operand")),
                    },
                    (Op::Sqrt, [a]) => match src(a)? {
                        Src::Slice(a) => dst.iter_mut().zip(a).for_each(|(d, &v)| *d = v.sqrt()),
                        _ => return Err(chain_error("Sqrt of a broadcast operand")),
                    },
                    (op, [a, b]) => binary(op, src(a)?, src(b)?, dst)?,
                    _ => return Err(chain_error("an op with the wrong operand count")),
                }
            }
            ob.copy_from_slice(&regs[self.instrs.len() - 1][..len]);
        }
        Ok(())
    }

    /// Every op's own kernel in turn, as the unfused graph would run them.
    fn unfused(&self, x: &Tensor, exts: &[&Tensor], ctx: &mut RunCtx) -> Result<Tensor> {
        let mut values: Vec<Tensor> = Vec::with_capacity(self.instrs.len());
        for instr in &self.instrs {
            let args: Vec<Option<&Tensor>> = instr
                .args
                .iter()
                .zip(&instr.consts)
                .map(|(a, c)| match a {
                    Operand::Reg(0) => Some(x),
                    Operand::Reg(r) => values.get(r - 1),
                    Operand::Ext(k) => exts.get(*k).copied(),
                    Operand::Scalar(..) | Operand::Row(..) => c.as_ref(),
                })
                .collect();
            let out = instr.kernel.run(&args, ctx)?.into_iter().next();
            values.push(out.ok_or_else(|| chain_error("an op gave no output"))?);
        }
        values.pop().ok_or_else(|| chain_error("no ops"))
    }
}

fn chain_error(what: &str) -> Error {
    Error::Graph(format!("pointwise chain: {what}"))
}

/// Operand `a` for the block of `len` elements at flattened position `at`, with the
/// instructions before this one done (`done`).
fn operand<'a>(
    a: &'a Operand,
    x: Input<'a>,
    exts: &'a [Ext],
    done: &'a [Vec<f32>],
    at: usize,
    len: usize,
) -> Result<Src<'a>> {
    Ok(match a {
        Operand::Reg(0) => match x {
            Input::F32(v) => Src::Slice(v),
            Input::I32(_) => return Err(chain_error("an i32 input read as f32")),
        },
        Operand::Reg(r) => Src::Slice(&done[r - 1][..len]),
        Operand::Scalar(v, _) => Src::Scalar(*v),
        Operand::Row(v, _) => Src::Row(v, at % v.len()),
        Operand::Ext(k) => match exts.get(*k) {
            Some(Ext::Scalar(v)) => Src::Scalar(*v),
            Some(Ext::Row(v)) => Src::Row(v, at % v.len()),
            None => return Err(chain_error("a missing extra input")),
        },
    })
}

impl Kernel for ChainKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let exts: Vec<&Tensor> = (1..=self.exts)
            .map(|i| required(inputs, i))
            .collect::<Result<_>>()?;
        let Some(fast) = self.fast_operands(x, &exts) else {
            return Ok(vec![self.unfused(x, &exts, ctx)?]);
        };
        let xv = match x.data() {
            TensorData::I32(v) => Input::I32(v),
            _ => Input::F32(x.as_f32()?),
        };
        let n = xv.len();
        let mut out = ctx.alloc_f32_overwrite(n);
        if n >= PAR_MIN && crate::kernels::par::threads() > 1 {
            out.par_chunks_mut(TASK)
                .enumerate()
                .try_for_each(|(t, d)| {
                    let at = t * TASK;
                    let xs = xv.range(at..at + d.len());
                    crate::kernels::par::sequential(|| self.span(at, xs, &fast, d))
                })?;
        } else {
            self.span(0, xv, &fast, &mut out)?;
        }
        Ok(vec![Tensor::from_f32(x.shape().to_vec(), out)?])
    }
}

/// `dst[i] = a[i] op b[i]`, with operands broadcast from scalars and rows.
fn binary(op: Op, a: Src, b: Src, dst: &mut [f32]) -> Result<()> {
    macro_rules! each {
        ($f:expr) => {
            zip_with(a, b, dst, $f)
        };
    }
    match op {
        Op::Add => each!(|p, q| p + q),
        Op::Sub => each!(|p, q| p - q),
        Op::Mul => each!(|p, q| p * q),
        Op::Div => each!(|p, q| p / q),
        Op::CastI32 | Op::Erf | Op::Sqrt => Err(chain_error("a unary op as binary")),
    }
}

#[inline(always)]
fn zip_with(a: Src, b: Src, dst: &mut [f32], f: impl Fn(f32, f32) -> f32) -> Result<()> {
    match (a, b) {
        (Src::Slice(a), Src::Slice(b)) => {
            for ((d, &p), &q) in dst.iter_mut().zip(a).zip(b) {
                *d = f(p, q);
            }
        }
        (Src::Slice(a), Src::Scalar(q)) => dst.iter_mut().zip(a).for_each(|(d, &p)| *d = f(p, q)),
        (Src::Scalar(p), Src::Slice(b)) => dst.iter_mut().zip(b).for_each(|(d, &q)| *d = f(p, q)),
        (Src::Slice(a), Src::Row(row, col)) => by_row(dst, a, row, col, &f),
        (Src::Row(row, col), Src::Slice(b)) => by_row(dst, b, row, col, |q, p| f(p, q)),
        _ => return Err(chain_error("no chain operand")),
    }
    Ok(())
}

/// `dst[i] = f(a[i], row[(col + i) % row.len()])`, one contiguous run per row segment.
#[inline(always)]
fn by_row(dst: &mut [f32], a: &[f32], row: &[f32], col: usize, f: impl Fn(f32, f32) -> f32) {
    let (mut i, mut c) = (0, col);
    while i < dst.len() {
        let n = (row.len() - c).min(dst.len() - i);
        for ((d, &p), &q) in dst[i..i + n]
            .iter_mut()
            .zip(&a[i..i + n])
            .zip(&row[c..c + n])
        {
            *d = f(p, q);
        }
        i += n;
        c = 0;
    }
}

#[cfg(test)]
mod tests {
    use crate::ir::{DType, Dim, Graph, Model, Node, Tensor, TypeInfo, ValueInfo};
    use crate::runtime::{PlanOptions, Session, SessionOptions};

    fn node(name: &str, op: &str, inputs: &[&str], output: &str) -> Node {
        Node::new(
            name,
            op,
            inputs.iter().map(|s| s.to_string()).collect(),
            vec![output.to_string()],
        )
    }

    /// `y = gelu(x + bias)` as BERT exports it, on `[rows, cols]`.
    fn bias_gelu(cols: usize) -> Graph {
        let mut g = Graph {
            inputs: vec![ValueInfo::new(
                "x",
                TypeInfo::new(DType::F32, vec![Dim::Sym("rows".into()), Dim::Known(cols)]),
            )],
            outputs: vec![ValueInfo::new("y", TypeInfo::unknown_shape(DType::F32))],
            nodes: vec![
                node("bias", "Add", &["x", "b"], "h"),
                node("scale", "Div", &["h", "sqrt2"], "t"),
                node("erf", "Erf", &["t"], "e"),
                node("one", "Add", &["e", "c1"], "a"),
                node("gate", "Mul", &["h", "a"], "m"),
                node("half", "Mul", &["m", "c05"], "y"),
            ],
            ..Graph::default()
        };
        let bias = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let init = &mut g.initializers;
        init.insert("b".into(), Tensor::from_f32(vec![cols], bias).unwrap());
        init.insert(
            "sqrt2".into(),
            Tensor::from_f32(vec![], vec![std::f32::consts::SQRT_2]).unwrap(),
        );
        init.insert("c1".into(), Tensor::from_f32(vec![], vec![1.0]).unwrap());
        init.insert("c05".into(), Tensor::from_f32(vec![], vec![0.5]).unwrap());
        g
    }

    fn session(g: &Graph, fused: bool, threads: usize) -> Session {
        let plan = match fused {
            true => PlanOptions::default(),
            false => PlanOptions::unfused(),
        };
        Session::new(
            &Model::new(g.clone(), 14),
            &SessionOptions { threads, plan },
        )
        .unwrap()
    }

    fn input(rows: usize, cols: usize) -> Tensor {
        let v = (0..rows * cols)
            .map(|i| ((i * 7919) % 2000) as f32 / 250.0 - 4.0)
            .collect();
        Tensor::from_f32(vec![rows, cols], v).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.as_f32().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn bias_gelu_runs_as_one_step_with_the_same_bits() {
        // 1536 columns: blocks and parallel tasks start mid-row; 300 rows: several tasks.
        let g = bias_gelu(1536);
        for threads in [1, 2] {
            let fused = session(&g, true, threads);
            let (_, steps) = fused.run_profiled(&[("x", input(300, 1536))]).unwrap();
            assert_eq!(steps.len(), 1);
            assert_eq!(steps[0].label, "Add+Div+Erf+Add+Mul+Mul");
            let x = input(300, 1536);
            let want = session(&g, false, 1).run(&[("x", x.clone())]).unwrap();
            let got = fused.run(&[("x", x)]).unwrap();
            assert_eq!(got[0].1.shape(), &[300, 1536]);
            assert_eq!(bits(&got[0].1), bits(&want[0].1), "{threads} threads");
        }
    }

    #[test]
    fn dynamic_product_epilogue_reads_scales_computed_inside_its_span() {
        // MatMulInteger's i32 output -> Cast -> Mul by the product scales -> Add bias, with
        // the scales (input scale x weight scales) computed between the Cast and their Mul.
        let cols = 40;
        let mut g = Graph {
            inputs: vec![
                ValueInfo::new("acc", TypeInfo::unknown_shape(DType::I32)),
                ValueInfo::new("xs", TypeInfo::unknown_shape(DType::F32)),
            ],
            outputs: vec![ValueInfo::new("y", TypeInfo::unknown_shape(DType::F32))],
            nodes: vec![
                node("to_f32", "Cast", &["acc"], "f"),
                node("scales", "Mul", &["xs", "ws"], "ps"),
                node("rescale", "Mul", &["f", "ps"], "m"),
                node("bias", "Add", &["b", "m"], "y"),
            ],
            ..Graph::default()
        };
        g.nodes[0].attrs.insert(
            "to".into(),
            crate::ir::Attr::Int(i64::from(DType::F32.onnx_code())),
        );
        let ws = (0..cols).map(|i| 1e-3 * (i + 1) as f32).collect();
        let b = (0..cols).map(|i| (i as f32).cos()).collect();
        g.initializers
            .insert("ws".into(), Tensor::from_f32(vec![cols], ws).unwrap());
        g.initializers
            .insert("b".into(), Tensor::from_f32(vec![cols], b).unwrap());
        let acc: Vec<i32> = (0..70 * cols as i32)
            .map(|i| i * 7919 % 100_003 - 50_000)
            .collect();
        let feeds = [
            (
                "acc",
                Tensor::new(vec![70, cols], crate::ir::TensorData::I32(acc)).unwrap(),
            ),
            ("xs", Tensor::from_f32(vec![], vec![0.0371]).unwrap()),
        ];
        let (got, steps) = session(&g, true, 1).run_profiled(&feeds).unwrap();
        let labels: Vec<&str> = steps.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["Mul", "Cast+Mul+Add"]);
        let want = session(&g, false, 1).run(&feeds).unwrap();
        assert_eq!(bits(&got[0].1), bits(&want[0].1));
    }

    #[test]
    fn values_needed_outside_end_the_chain() {
        // The GELU input is also a graph output: the bias add stays its own step.
        let mut g = bias_gelu(8);
        g.outputs
            .push(ValueInfo::new("h", TypeInfo::unknown_shape(DType::F32)));
        let (_, steps) = session(&g, true, 1)
            .run_profiled(&[("x", input(3, 8))])
            .unwrap();
        let labels: Vec<&str> = steps.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["Add", "Div+Erf+Add+Mul+Mul"]);
        // `1 + erf` also read by a node that cannot join (a Relu): a chain ends with it. The
        // bias add cannot start one (the gate reads its output past any chain's end), and the
        // gate reads two values computed outside a chain starting at it.
        let mut g = bias_gelu(8);
        g.nodes.push(node("other", "Relu", &["a"], "r"));
        g.outputs
            .push(ValueInfo::new("r", TypeInfo::unknown_shape(DType::F32)));
        let (got, steps) = session(&g, true, 1)
            .run_profiled(&[("x", input(3, 8))])
            .unwrap();
        let labels: Vec<&str> = steps.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["Add", "Div+Erf+Add", "Mul", "Mul", "Relu"]);
        let want = session(&g, false, 1).run(&[("x", input(3, 8))]).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(bits(&g.1), bits(&w.1), "{}", g.0);
        }
    }

    #[test]
    fn a_trimmed_chain_reads_only_what_its_own_nodes_read() {
        // The chain first reaches the Mul by `e`, computed after `u`; `u` is also read
        // outside, so the chain ends at `u` and must not wait for `e`.
        let mut g = Graph {
            inputs: vec![
                ValueInfo::new("x", TypeInfo::unknown_shape(DType::F32)),
                ValueInfo::new("z", TypeInfo::unknown_shape(DType::F32)),
            ],
            outputs: vec![
                ValueInfo::new("w", TypeInfo::unknown_shape(DType::F32)),
                ValueInfo::new("r", TypeInfo::unknown_shape(DType::F32)),
            ],
            nodes: vec![
                node("a", "Add", &["x", "one"], "t"),
                node("b", "Add", &["t", "one"], "u"),
                node("p", "Neg", &["z"], "e"),
                node("c", "Mul", &["u", "e"], "v"),
                node("d", "Add", &["v", "one"], "w"),
                node("outside", "Relu", &["u"], "r"),
            ],
            ..Graph::default()
        };
        g.initializers
            .insert("one".into(), Tensor::from_f32(vec![], vec![1.0]).unwrap());
        let feeds = [("x", input(4, 8)), ("z", input(4, 8))];
        let (got, steps) = session(&g, true, 1).run_profiled(&feeds).unwrap();
        let labels: Vec<&str> = steps.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["Add+Add", "Neg", "Mul", "Add", "Relu"]);
        let want = session(&g, false, 1).run(&feeds).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(bits(&g.1), bits(&w.1), "{}", g.0);
        }
    }

    #[test]
    fn inputs_off_the_fast_path_run_the_ops_one_by_one() {
        // A [1, 8] input against an [8] row broadcasts like any other; a [3, 1] input would
        // broadcast the result to [3, 8]: the unfused ops handle it.
        let mut g = bias_gelu(8);
        g.inputs[0].ty = TypeInfo::unknown_shape(DType::F32);
        for x in [input(1, 8), input(3, 1)] {
            let want = session(&g, false, 1).run(&[("x", x.clone())]).unwrap();
            let got = session(&g, true, 1).run(&[("x", x)]).unwrap();
            assert_eq!(got[0].1.shape(), want[0].1.shape());
            assert_eq!(bits(&got[0].1), bits(&want[0].1));
        }
    }
}
