//! Chains of pointwise f32 arithmetic run as one step: `Add`, `Sub`, `Mul` and `Div` whose
//! other operand is a constant (a scalar, or one value per index of the last axis) or an
//! earlier value of the chain, and `Erf` and `Sqrt`. A transformer's bias add and GELU
//! (`Add -> Div -> Erf -> Add -> Mul -> Mul`) are such a chain. Unfused, every op is one more
//! pass over a tensor that often does not fit in cache; fused, the chain works through the
//! tensor in blocks that stay in L1, reading and writing each element once.
//!
//! Every element goes through the same f32 operations in the same order as unfused, so the
//! results are the same bit for bit. When a run's input does not fit the fast path (not f32,
//! or a constant that would broadcast the result to a larger shape), the step runs the
//! chain's own op kernels one after another instead.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

use super::qfuse::Uses;
use crate::error::{Error, Result};
use crate::ir::{DType, Model, Node, Tensor};
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
    Add,
    Sub,
    Mul,
    Div,
    Erf,
    Sqrt,
}

impl Op {
    fn of(node: &Node) -> Option<Op> {
        if !node.domain.is_empty() || node.outputs.len() != 1 || !node.attrs.is_empty() {
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
            Op::Erf | Op::Sqrt => 1,
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
}

struct Instr {
    op: Op,
    args: Vec<Operand>,
    /// The op's own kernel and its inputs, for runs the fast path does not fit.
    kernel: Box<dyn Kernel>,
}

/// A chain found in a graph, compiled into one kernel.
pub struct Chain {
    /// Graph node indices, in order.
    pub nodes: Vec<usize>,
    pub input: String,
    pub output: String,
    /// The op types joined by `+`, for profiles.
    pub label: String,
    pub kernel: Box<dyn Kernel>,
}

/// The longest chain (of two or more nodes) starting at node `start`, if any: each node
/// reads only chain values and supported constants, and every value but the last is read
/// by chain nodes only (and is no graph output), so nothing outside needs it.
pub fn find(model: &Model, start: usize, uses: &Uses, absorbed: &[bool]) -> Option<Chain> {
    let graph = &model.graph;
    // Before opset 7 the arithmetic ops broadcast by attribute.
    if model.opset() < 7 || absorbed[start] {
        return None;
    }
    let first = &graph.nodes[start];
    Op::of(first)?;
    let computed: Vec<&String> = first
        .inputs
        .iter()
        .filter(|i| !graph.initializers.contains_key(*i))
        .collect();
    let input = computed.first()?.as_str();
    if input.is_empty() || computed.iter().any(|c| c.as_str() != input) {
        return None;
    }
    if graph.type_of(input).is_some_and(|t| t.dtype != DType::F32) {
        return None;
    }
    let mut regs: HashMap<&str, usize> = HashMap::from([(input, 0)]);
    let mut nodes = Vec::new();
    let mut instrs = Vec::new();
    let mut j = start;
    let mut skipped = 0;
    while j < graph.nodes.len() && skipped <= WINDOW {
        let node = &graph.nodes[j];
        let reads_chain = node
            .inputs
            .iter()
            .any(|i| regs.get(i.as_str()).is_some_and(|&r| r > 0));
        if j > start && !reads_chain {
            skipped += 1;
            j += 1;
            continue;
        }
        let Some(instr) = (!absorbed[j])
            .then(|| instruction(model, node, &regs))
            .flatten()
        else {
            break;
        };
        regs.insert(node.outputs[0].as_str(), nodes.len() + 1);
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
    let label = nodes
        .iter()
        .map(|&n| graph.nodes[n].op_type.as_str())
        .collect::<Vec<_>>()
        .join("+");
    let output = graph.nodes[*nodes.last()?].outputs[0].clone();
    Some(Chain {
        nodes,
        input: input.to_string(),
        output,
        label,
        kernel: Box::new(ChainKernel { instrs }),
    })
}

/// `node` as an instruction over the chain's registers `regs`, if it can join.
fn instruction(model: &Model, node: &Node, regs: &HashMap<&str, usize>) -> Option<Instr> {
    let op = Op::of(node)?;
    if node.inputs.len() != op.arity() {
        return None;
    }
    let graph = &model.graph;
    let mut args = Vec::with_capacity(node.inputs.len());
    for name in &node.inputs {
        if let Some(&r) = regs.get(name.as_str()) {
            args.push(Operand::Reg(r));
            continue;
        }
        let t = graph.initializers.get(name)?;
        let v = t.as_f32().ok()?;
        let dims = t.shape();
        args.push(match v.len() {
            1 => Operand::Scalar(v[0], dims.len()),
            n if n > 1 && dims.last() == Some(&n) => Operand::Row(v.into(), dims.len()),
            _ => return None,
        });
    }
    // At least one operand is a chain value (the first node reads the chain's input).
    if !args.iter().any(|a| matches!(a, Operand::Reg(_))) {
        return None;
    }
    let ctx = CompileCtx {
        node,
        opset: model.opset(),
        input_types: node.inputs.iter().map(|n| graph.type_of(n)).collect(),
        constants: node
            .inputs
            .iter()
            .map(|n| graph.initializers.get(n))
            .collect(),
        fused_activation: None,
    };
    let kernel = (ops::lookup(node, model.opset()).ok()?.compile)(&ctx).ok()?;
    Some(Instr { op, args, kernel })
}

struct ChainKernel {
    instrs: Vec<Instr>,
}

/// An operand as one block sees it.
#[derive(Clone, Copy)]
enum Src<'a> {
    Slice(&'a [f32]),
    Scalar(f32),
    /// The whole row, and the last-axis index of the block's first element.
    Row(&'a [f32], usize),
}

impl ChainKernel {
    /// Whether a run on `x` can take the fast path: f32, and no constant broadcasts the
    /// result beyond `x`'s shape.
    fn fits(&self, x: &Tensor) -> bool {
        let rank = x.shape().len();
        let last = x.shape().last().copied();
        x.dtype() == DType::F32
            && self.instrs.iter().flat_map(|i| &i.args).all(|a| match a {
                Operand::Reg(_) => true,
                Operand::Scalar(_, r) => *r <= rank,
                Operand::Row(v, r) => *r <= rank && last == Some(v.len()),
            })
    }

    /// The chain on elements `offset..offset + x.len()` of the flattened input.
    fn span(&self, offset: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
        let mut regs = vec![vec![0f32; BLOCK]; self.instrs.len()];
        for (b, (xb, ob)) in x.chunks(BLOCK).zip(out.chunks_mut(BLOCK)).enumerate() {
            let at = offset + b * BLOCK;
            let len = xb.len();
            for (k, instr) in self.instrs.iter().enumerate() {
                let (done, rest) = regs.split_at_mut(k);
                let dst = &mut rest[0][..len];
                let src = |a| operand(a, xb, done, at);
                match (instr.op, instr.args.as_slice()) {
                    (Op::Erf, [a]) => match src(a) {
                        Src::Slice(a) => erf_slice_f32(a, dst),
                        _ => return Err(Error::Graph("pointwise chain: bad Erf operand".into())),
                    },
                    (Op::Sqrt, [a]) => match src(a) {
                        Src::Slice(a) => dst.iter_mut().zip(a).for_each(|(d, &v)| *d = v.sqrt()),
                        _ => return Err(Error::Graph("pointwise chain: bad Sqrt operand".into())),
                    },
                    (op, [a, b]) => binary(op, src(a), src(b), dst)?,
                    _ => return Err(Error::Graph("pointwise chain: bad arity".into())),
                }
            }
            ob.copy_from_slice(&regs[self.instrs.len() - 1][..len]);
        }
        Ok(())
    }

    /// Every op's own kernel in turn, as the unfused graph would run them.
    fn unfused(&self, x: &Tensor, ctx: &mut RunCtx) -> Result<Tensor> {
        let mut values: Vec<Tensor> = Vec::with_capacity(self.instrs.len());
        for instr in &self.instrs {
            let consts: Vec<Option<Tensor>> = instr
                .args
                .iter()
                .map(|a| match a {
                    Operand::Reg(_) => Ok(None),
                    Operand::Scalar(v, r) => Tensor::from_f32(vec![1; *r], vec![*v]).map(Some),
                    Operand::Row(v, r) => {
                        let mut dims = vec![1; *r];
                        dims[r - 1] = v.len();
                        Tensor::from_f32(dims, v.to_vec()).map(Some)
                    }
                })
                .collect::<Result<_>>()?;
            let args: Vec<Option<&Tensor>> = instr
                .args
                .iter()
                .zip(&consts)
                .map(|(a, c)| match a {
                    Operand::Reg(0) => Some(x),
                    Operand::Reg(r) => values.get(r - 1),
                    _ => c.as_ref(),
                })
                .collect();
            let out = instr.kernel.run(&args, ctx)?.into_iter().next();
            values.push(out.ok_or_else(|| Error::Graph("pointwise op gave no output".into()))?);
        }
        values
            .pop()
            .ok_or_else(|| Error::Graph("empty pointwise chain".into()))
    }
}

/// Operand `a` for the block of `x` at flattened position `at`, with the instructions
/// before this one done (`done`).
fn operand<'a>(a: &'a Operand, x: &'a [f32], done: &'a [Vec<f32>], at: usize) -> Src<'a> {
    match a {
        Operand::Reg(0) => Src::Slice(x),
        Operand::Reg(r) => Src::Slice(&done[r - 1][..x.len()]),
        Operand::Scalar(v, _) => Src::Scalar(*v),
        Operand::Row(v, _) => Src::Row(v, at % v.len()),
    }
}

impl Kernel for ChainKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        if !self.fits(x) {
            return Ok(vec![self.unfused(x, ctx)?]);
        }
        let xv = x.as_f32()?;
        let mut out = ctx.alloc_f32_overwrite(xv.len());
        if xv.len() >= PAR_MIN && crate::kernels::par::threads() > 1 {
            xv.par_chunks(TASK)
                .zip(out.par_chunks_mut(TASK))
                .enumerate()
                .try_for_each(|(t, (s, d))| {
                    crate::kernels::par::sequential(|| self.span(t * TASK, s, d))
                })?;
        } else {
            self.span(0, xv, &mut out)?;
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
        Op::Erf | Op::Sqrt => Err(Error::Graph("pointwise chain: unary op as binary".into())),
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
        _ => return Err(Error::Graph("pointwise chain: no chain operand".into())),
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
