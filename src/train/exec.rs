//! The training executor: runs an IR graph forward keeping what the backward needs (a tape),
//! then walks the nodes in reverse through the backward rules of [`crate::ops::grad`],
//! accumulating one gradient per value.
//!
//! Parameters (f32 initializers) are fed at run time from a [`ParamStore`] rather than
//! compiled in as constants, so kernels never pre-pack weights that the optimizer is about to
//! change. Integer initializers (shapes, axes) stay constants. In [`Mode::Train`],
//! BatchNormalization uses batch statistics and Dropout drops (their training forwards);
//! in [`Mode::Eval`] every node runs its inference kernel.

use std::collections::HashMap;
use std::sync::Arc;

use super::params::{FakeQuant, ParamStore};
use super::rng::derive_seed;
use crate::error::{Error, Result};
use crate::ir::{DType, Dim, Model, Node, Tensor, TypeInfo};
use crate::ops::grad::{
    grad_rule, train_forward, GradCtx, GradFn, TrainForwardCtx, TrainForwardFn,
};
use crate::ops::{self, CompileCtx, Kernel, RunCtx};

type Slot = usize;

/// Ops whose outputs carry no gradient (integer results, piecewise-constant functions).
const NO_GRADIENT_OUTPUTS: &[&str] = &[
    "Shape",
    "Size",
    "ArgMax",
    "ArgMin",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "Not",
    "And",
    "Or",
    "Xor",
    "IsNaN",
    "IsInf",
    "Sign",
    "Floor",
    "Ceil",
    "Round",
    "ConstantOfShape",
    "Range",
    "Constant",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics in BatchNormalization, active Dropout.
    Train,
    /// Inference semantics, as the exported model will run.
    Eval,
}

struct Step {
    node: Node,
    kernel: Box<dyn Kernel>,
    train_fwd: Option<TrainForwardFn>,
    grad: Option<GradFn>,
    inputs: Vec<Option<Slot>>,
    outputs: Vec<Option<Slot>>,
}

/// The values of one forward pass, kept for the backward.
pub struct Tape {
    mode: Mode,
    values: Vec<Option<Tensor>>,
    /// Per step: what a training-mode forward saved.
    saved: Vec<Vec<Tensor>>,
    /// Values as produced, before an activation fake-quant hook replaced them.
    pre_hook: HashMap<Slot, Tensor>,
    /// New values of state parameters (BatchNorm running statistics), by parameter name.
    pub updates: Vec<(String, Tensor)>,
}

impl Tape {
    /// A graph output (or any kept value) by name.
    pub fn value<'a>(&'a self, graph: &TrainGraph, name: &str) -> Option<&'a Tensor> {
        graph
            .slot_of
            .get(name)
            .and_then(|&s| self.values.get(s))
            .and_then(Option::as_ref)
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }
}

/// Gradients of one backward pass.
#[derive(Debug, Default)]
pub struct Gradients {
    /// By parameter name, for trainable parameters reached by the loss (others are absent).
    pub params: HashMap<String, Tensor>,
    /// By graph input name, when asked for.
    pub inputs: HashMap<String, Tensor>,
}

pub struct TrainGraph {
    opset: i64,
    steps: Vec<Step>,
    slot_of: HashMap<String, Slot>,
    slot_names: Vec<String>,
    constants: Vec<Option<Tensor>>,
    /// Parameter name of each slot that is an f32 initializer.
    param_of: Vec<Option<String>>,
    inputs: Vec<(String, Slot, TypeInfo)>,
    outputs: Vec<(String, Slot)>,
    /// Slots read by some step (or a graph output) after step `i`: whether each slot is live.
    used: Vec<bool>,
    act_hooks: HashMap<Slot, Arc<dyn FakeQuant>>,
    pool: rayon::ThreadPool,
    /// Per step `(forward, backward)` seconds, accumulated while profiling is on.
    profile: Option<std::sync::Mutex<Vec<(f64, f64)>>>,
}

/// Time spent in one node, summed over the profiled passes.
#[derive(Clone, Debug)]
pub struct NodeTime {
    pub node: String,
    pub op_type: String,
    pub forward: f64,
    pub backward: f64,
}

impl TrainGraph {
    /// Compiles every node of `model` for training on `threads` worker threads (0: one per
    /// core). The model must be f32 and its nodes topologically ordered (as imported).
    pub fn new(model: &Model, threads: usize) -> Result<TrainGraph> {
        let graph = &model.graph;
        let opset = model.opset();
        let mut slot_of: HashMap<String, Slot> = HashMap::new();
        let mut slot_names = Vec::new();
        let mut slot = |name: &str, slot_names: &mut Vec<String>| -> Slot {
            let next = slot_of.len();
            *slot_of.entry(name.to_string()).or_insert_with(|| {
                slot_names.push(name.to_string());
                next
            })
        };
        for name in graph.initializers.keys() {
            slot(name, &mut slot_names);
        }
        let inputs: Vec<(String, Slot, TypeInfo)> = graph
            .inputs
            .iter()
            .filter(|v| !graph.initializers.contains_key(&v.name))
            .map(|v| (v.name.clone(), slot(&v.name, &mut slot_names), v.ty.clone()))
            .collect();
        let mut steps = Vec::with_capacity(graph.nodes.len());
        for node in &graph.nodes {
            let def = ops::lookup(node, opset)?;
            let input_types = node
                .inputs
                .iter()
                .map(|n| if n.is_empty() { None } else { graph.type_of(n) })
                .collect();
            let constants = node
                .inputs
                .iter()
                .map(|n| {
                    graph
                        .initializers
                        .get(n)
                        .filter(|t| t.dtype() != DType::F32)
                })
                .collect();
            let kernel = (def.compile)(&CompileCtx {
                node,
                opset,
                input_types,
                constants,
                fused_activation: None,
            })
            .map_err(|e| e.at_node(node))?;
            let step_inputs = node
                .inputs
                .iter()
                .map(|n| (!n.is_empty()).then(|| slot(n, &mut slot_names)))
                .collect();
            let step_outputs = node
                .outputs
                .iter()
                .map(|n| (!n.is_empty()).then(|| slot(n, &mut slot_names)))
                .collect();
            steps.push(Step {
                node: node.clone(),
                kernel,
                train_fwd: train_forward(node),
                grad: grad_rule(node).ok(),
                inputs: step_inputs,
                outputs: step_outputs,
            });
        }
        let outputs = graph
            .outputs
            .iter()
            .map(|v| {
                slot_of
                    .get(&v.name)
                    .map(|&s| (v.name.clone(), s))
                    .ok_or_else(|| {
                        Error::Graph(format!("graph output '{}' is never produced", v.name))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let n_slots = slot_names.len();
        let mut constants: Vec<Option<Tensor>> = vec![None; n_slots];
        let mut param_of: Vec<Option<String>> = vec![None; n_slots];
        for (name, t) in &graph.initializers {
            let s = slot_of[name];
            if t.dtype() == DType::F32 {
                param_of[s] = Some(name.clone());
            } else {
                constants[s] = Some(t.clone());
            }
        }
        // A value is used when a graph output depends on it.
        let mut used = vec![false; n_slots];
        for (_, s) in &outputs {
            used[*s] = true;
        }
        for step in steps.iter().rev() {
            if step.outputs.iter().flatten().any(|&s| used[s]) {
                for &s in step.inputs.iter().flatten() {
                    used[s] = true;
                }
            }
        }
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Graph(format!("cannot start {threads} worker threads: {e}")))?;
        Ok(TrainGraph {
            opset,
            steps,
            slot_of,
            slot_names,
            constants,
            param_of,
            inputs,
            outputs,
            used,
            act_hooks: HashMap::new(),
            pool,
            profile: None,
        })
    }

    /// Starts (or stops) timing every node's forward and backward.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(|| std::sync::Mutex::new(vec![(0.0, 0.0); self.steps.len()]));
    }

    /// The accumulated node times, slowest first.
    pub fn profile(&self) -> Vec<NodeTime> {
        let Some(p) = self.profile.as_ref().and_then(|p| p.lock().ok()) else {
            return Vec::new();
        };
        let mut out: Vec<NodeTime> = self
            .steps
            .iter()
            .zip(p.iter())
            .map(|(s, &(f, b))| NodeTime {
                node: s.node.display_name(),
                op_type: s.node.op_type.clone(),
                forward: f,
                backward: b,
            })
            .collect();
        out.sort_by(|a, b| (b.forward + b.backward).total_cmp(&(a.forward + a.backward)));
        out
    }

    fn record(&self, step: usize, forward: bool, started: Option<std::time::Instant>) {
        if let (Some(p), Some(t)) = (&self.profile, started) {
            if let Ok(mut p) = p.lock() {
                let e = t.elapsed().as_secs_f64();
                if forward {
                    p[step].0 += e;
                } else {
                    p[step].1 += e;
                }
            }
        }
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `f` inside this graph's thread pool.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    pub fn input_names(&self) -> Vec<&str> {
        self.inputs.iter().map(|(n, _, _)| n.as_str()).collect()
    }

    pub fn input_type(&self, name: &str) -> Option<&TypeInfo> {
        self.inputs
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, t)| t)
    }

    pub fn output_names(&self) -> Vec<&str> {
        self.outputs.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Fake-quantizes the value `name` (a node output) in every forward pass, with a
    /// straight-through gradient. `None` removes the hook.
    pub fn set_activation_fake_quant(
        &mut self,
        name: &str,
        fq: Option<Arc<dyn FakeQuant>>,
    ) -> Result<()> {
        let slot = *self.slot_of.get(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            msg: "no such value in the graph".into(),
        })?;
        match fq {
            Some(f) => {
                self.act_hooks.insert(slot, f);
            }
            None => {
                self.act_hooks.remove(&slot);
            }
        }
        Ok(())
    }

    /// Checks that gradients can flow from the outputs to every trainable parameter: each
    /// node in between needs a backward rule. The error names the first node without one.
    pub fn check_differentiable(&self, store: &ParamStore) -> Result<()> {
        let requires = self.requires_grad(store, false);
        for step in &self.steps {
            let on_path = step
                .outputs
                .iter()
                .flatten()
                .any(|&s| self.used[s] && requires[s]);
            if on_path && step.grad.is_none() {
                return Err(grad_rule(&step.node).err().unwrap_or_else(|| {
                    Error::Graph(format!(
                        "node '{}' has no backward rule",
                        step.node.display_name()
                    ))
                }));
            }
        }
        Ok(())
    }

    /// Which values depend on a trainable parameter (or on a graph input, if asked).
    fn requires_grad(&self, store: &ParamStore, inputs: bool) -> Vec<bool> {
        let mut req = vec![false; self.slot_names.len()];
        for (s, p) in self.param_of.iter().enumerate() {
            if let Some(p) = p {
                req[s] = store.get(p).is_some_and(|p| p.trainable);
            }
        }
        if inputs {
            for (_, s, _) in &self.inputs {
                req[*s] = true;
            }
        }
        for step in &self.steps {
            if NO_GRADIENT_OUTPUTS.contains(&step.node.op_type.as_str()) {
                continue;
            }
            if step.inputs.iter().flatten().any(|&s| req[s]) {
                for &s in step.outputs.iter().flatten() {
                    req[s] = true;
                }
            }
        }
        req
    }

    fn check_feed(&self, name: &str, t: &Tensor, ty: &TypeInfo) -> Result<()> {
        let err = |msg: String| Error::Input {
            name: name.to_string(),
            msg,
        };
        if t.dtype() != ty.dtype {
            return Err(err(format!("expected {} but got {}", ty.dtype, t.dtype())));
        }
        if let Some(dims) = &ty.shape {
            let fits = dims.len() == t.rank()
                && dims
                    .iter()
                    .zip(t.shape())
                    .all(|(d, &n)| !matches!(d, Dim::Known(k) if *k != n));
            if !fits {
                return Err(err(format!("expected shape {ty} but got {:?}", t.shape())));
            }
        }
        Ok(())
    }

    /// Runs the graph forward. `step_seed` seeds the random parts (dropout masks) of this
    /// step; the same seed gives the same masks.
    pub fn forward(
        &self,
        store: &ParamStore,
        feeds: Vec<(String, Tensor)>,
        mode: Mode,
        step_seed: u64,
    ) -> Result<Tape> {
        let mut values: Vec<Option<Tensor>> = vec![None; self.slot_names.len()];
        for (name, t) in feeds {
            let (_, slot, ty) =
                self.inputs
                    .iter()
                    .find(|(n, _, _)| *n == name)
                    .ok_or_else(|| Error::Input {
                        name: name.clone(),
                        msg: format!(
                            "the model has no such input (inputs: {})",
                            self.input_names().join(", ")
                        ),
                    })?;
            self.check_feed(&name, &t, ty)?;
            values[*slot] = Some(t);
        }
        if let Some((name, _, _)) = self.inputs.iter().find(|(_, s, _)| values[*s].is_none()) {
            return Err(Error::Input {
                name: name.clone(),
                msg: "no value was given for this graph input".into(),
            });
        }
        for (s, p) in self.param_of.iter().enumerate() {
            let Some(name) = p else { continue };
            let param = store.get(name).ok_or_else(|| Error::Tensor {
                name: name.clone(),
                msg: "parameter missing from the store".into(),
            })?;
            if let Some(fq) = &param.fake_quant {
                values[s] = Some(fq.forward(&param.value)?);
            }
        }
        let mut tape = Tape {
            mode,
            values,
            saved: Vec::with_capacity(self.steps.len()),
            pre_hook: HashMap::new(),
            updates: Vec::new(),
        };
        self.pool
            .install(|| self.run_steps(store, &mut tape, step_seed))?;
        Ok(tape)
    }

    /// The value of `slot`: computed, fed, a parameter from the store, or a constant.
    fn lookup<'a>(
        &'a self,
        store: &'a ParamStore,
        values: &'a [Option<Tensor>],
        s: Slot,
    ) -> Option<&'a Tensor> {
        values[s]
            .as_ref()
            .or_else(|| {
                self.param_of[s]
                    .as_ref()
                    .and_then(|p| store.get(p))
                    .map(|p| &p.value)
            })
            .or(self.constants[s].as_ref())
    }

    fn run_steps(&self, store: &ParamStore, tape: &mut Tape, step_seed: u64) -> Result<()> {
        let mut ctx = RunCtx::default();
        for (i, step) in self.steps.iter().enumerate() {
            let node = &step.node;
            let args: Vec<Option<&Tensor>> = step
                .inputs
                .iter()
                .map(|s| s.and_then(|s| self.lookup(store, &tape.values, s)))
                .collect();
            if let Some(k) = step
                .inputs
                .iter()
                .zip(&args)
                .position(|(s, a)| s.is_some() && a.is_none())
            {
                return Err(ops::node_error(
                    node,
                    format!("input {k} has no value at run time"),
                ));
            }
            let started = self.profile.as_ref().map(|_| std::time::Instant::now());
            let (outputs, saved, updates) = match (tape.mode, step.train_fwd) {
                (Mode::Train, Some(f)) => {
                    let r = f(&TrainForwardCtx {
                        node,
                        opset: self.opset,
                        inputs: &args,
                        seed: derive_seed(step_seed, i as u64, 0x7261_6e64),
                    })
                    .map_err(|e| e.at_node(node))?;
                    (r.outputs, r.saved, r.updates)
                }
                _ => (
                    step.kernel
                        .run(&args, &mut ctx)
                        .map_err(|e| e.at_node(node))?,
                    Vec::new(),
                    Vec::new(),
                ),
            };
            self.record(i, true, started);
            for (k, t) in updates {
                let param = step
                    .inputs
                    .get(k)
                    .copied()
                    .flatten()
                    .and_then(|s| self.param_of[s].clone());
                if let Some(name) = param {
                    tape.updates.push((name, t));
                }
            }
            tape.saved.push(saved);
            if outputs.len() < step.outputs.iter().flatten().count() {
                return Err(ops::node_error(
                    node,
                    format!(
                        "produced {} outputs, expected {}",
                        outputs.len(),
                        step.outputs.len()
                    ),
                ));
            }
            for (slot, t) in step.outputs.iter().zip(outputs) {
                let Some(slot) = *slot else { continue };
                let t = match self.act_hooks.get(&slot) {
                    Some(fq) => {
                        let q = fq.forward(&t)?;
                        tape.pre_hook.insert(slot, t);
                        q
                    }
                    None => t,
                };
                tape.values[slot] = Some(t);
            }
        }
        Ok(())
    }

    /// Backpropagates `seeds` (gradients of the loss with respect to graph outputs, by
    /// name) through the tape. Returns the gradient of every trainable parameter reached,
    /// and of the graph inputs when `input_grads` is set.
    pub fn backward(
        &self,
        store: &ParamStore,
        tape: &Tape,
        seeds: Vec<(String, Tensor)>,
        input_grads: bool,
    ) -> Result<Gradients> {
        self.pool
            .install(|| self.backward_inner(store, tape, seeds, input_grads))
    }

    fn backward_inner(
        &self,
        store: &ParamStore,
        tape: &Tape,
        seeds: Vec<(String, Tensor)>,
        input_grads: bool,
    ) -> Result<Gradients> {
        let requires = self.requires_grad(store, input_grads);
        let mut grads: Vec<Option<Tensor>> = vec![None; self.slot_names.len()];
        for (name, g) in seeds {
            let slot = *self.slot_of.get(&name).ok_or_else(|| Error::Tensor {
                name: name.clone(),
                msg: "gradient given for a value the graph does not have".into(),
            })?;
            let v = tape.values[slot].as_ref().ok_or_else(|| Error::Tensor {
                name: name.clone(),
                msg: "gradient given for a value the forward pass did not compute".into(),
            })?;
            if v.shape() != g.shape() || g.dtype() != DType::F32 {
                return Err(Error::Tensor {
                    name,
                    msg: format!(
                        "gradient {} {:?} does not match the value's shape {:?}",
                        g.dtype(),
                        g.shape(),
                        v.shape()
                    ),
                });
            }
            accumulate(&mut grads[slot], g)?;
        }
        for (i, step) in self.steps.iter().enumerate().rev() {
            let has_grad = step.outputs.iter().flatten().any(|&s| grads[s].is_some());
            let wants: Vec<bool> = step
                .inputs
                .iter()
                .map(|s| s.is_some_and(|s| requires[s]))
                .collect();
            if !has_grad || !wants.iter().any(|&w| w) {
                for &s in step.outputs.iter().flatten() {
                    grads[s] = None;
                }
                continue;
            }
            let node = &step.node;
            let rule = step.grad.ok_or_else(|| {
                grad_rule(node)
                    .err()
                    .unwrap_or_else(|| ops::node_error(node, "no backward rule"))
            })?;
            // Straight-through estimator for hooked activations.
            for &s in step.outputs.iter().flatten() {
                if let (Some(fq), Some(pre), Some(g)) = (
                    self.act_hooks.get(&s),
                    tape.pre_hook.get(&s),
                    grads[s].as_ref(),
                ) {
                    grads[s] = Some(fq.backward(pre, g)?);
                }
            }
            let args: Vec<Option<&Tensor>> = step
                .inputs
                .iter()
                .map(|s| s.and_then(|s| self.lookup(store, &tape.values, s)))
                .collect();
            let outs: Vec<Option<&Tensor>> = step
                .outputs
                .iter()
                .map(|s| s.and_then(|s| tape.values[s].as_ref()))
                .collect();
            let gouts: Vec<Option<&Tensor>> = step
                .outputs
                .iter()
                .map(|s| s.and_then(|s| grads[s].as_ref()))
                .collect();
            let started = self.profile.as_ref().map(|_| std::time::Instant::now());
            let result = rule(&GradCtx {
                node,
                opset: self.opset,
                inputs: &args,
                outputs: &outs,
                grad_outputs: &gouts,
                wants: &wants,
                saved: tape.saved.get(i).map_or(&[], Vec::as_slice),
            })
            .map_err(|e| e.at_node(node))?;
            self.record(i, false, started);
            for &s in step.outputs.iter().flatten() {
                grads[s] = None;
            }
            for (k, g) in result.into_iter().enumerate() {
                let (Some(g), Some(&Some(s))) = (g, step.inputs.get(k)) else {
                    continue;
                };
                if !wants[k] {
                    continue;
                }
                let x = args[k].map(Tensor::shape).unwrap_or(&[]);
                if g.shape() != x {
                    return Err(ops::node_error(
                        node,
                        format!(
                            "backward produced a gradient of shape {:?} for input {k} of shape {x:?}",
                            g.shape()
                        ),
                    ));
                }
                accumulate(&mut grads[s], g)?;
            }
        }
        let mut out = Gradients::default();
        for (s, p) in self.param_of.iter().enumerate() {
            let Some(name) = p else { continue };
            let Some(g) = grads[s].take() else { continue };
            let Some(param) = store.get(name) else {
                continue;
            };
            if !param.trainable {
                continue;
            }
            let g = match &param.fake_quant {
                Some(fq) => fq.backward(&param.value, &g)?,
                None => g,
            };
            out.params.insert(name.clone(), g);
        }
        if input_grads {
            for (name, s, _) in &self.inputs {
                if let Some(g) = grads[*s].take() {
                    out.inputs.insert(name.clone(), g);
                }
            }
        }
        Ok(out)
    }
}

/// `acc += g`, or `acc = g` when empty.
fn accumulate(acc: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    match acc {
        None => *acc = Some(g),
        Some(a) => {
            for (x, &y) in a.as_f32_mut()?.iter_mut().zip(g.as_f32()?) {
                *x += y;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Attr, Graph, ValueInfo};
    use crate::train::rng::Rng;
    use crate::zoo::{self, ZooConfig};

    fn random(rng: &mut Rng, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_f32(
            shape.to_vec(),
            (0..n).map(|_| rng.normal() as f32).collect(),
        )
        .unwrap()
    }

    /// `sum(w * output)` in f64 for fixed weights `w`.
    fn loss(g: &TrainGraph, store: &ParamStore, x: &Tensor, w: &Tensor) -> f64 {
        let tape = g
            .forward(store, vec![("input".into(), x.clone())], Mode::Train, 5)
            .unwrap();
        let y = tape.value(g, g.output_names()[0]).unwrap();
        y.as_f32()
            .unwrap()
            .iter()
            .zip(w.as_f32().unwrap())
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    }

    /// Compares analytic gradients of a few elements of every trainable parameter and of the
    /// input with central differences.
    fn check_model(model: &Model, x: Tensor, per_param: usize, tol: f64) {
        let g = TrainGraph::new(model, 2).unwrap();
        let store = ParamStore::from_graph(&model.graph);
        let mut rng = Rng::new(3);
        let out_name = g.output_names()[0].to_string();
        let tape = g
            .forward(&store, vec![("input".into(), x.clone())], Mode::Train, 5)
            .unwrap();
        let y = tape.value(&g, &out_name).unwrap();
        let w = random(&mut rng, y.shape());
        let grads = g
            .backward(&store, &tape, vec![(out_name, w.clone())], true)
            .unwrap();
        let eps = 1e-3f32;
        let numeric =
            |store: &ParamStore, x: &Tensor, set: &dyn Fn(&mut ParamStore, &mut Tensor, f32)| {
                let (mut s1, mut x1) = (store.clone(), x.clone());
                set(&mut s1, &mut x1, eps);
                let (mut s2, mut x2) = (store.clone(), x.clone());
                set(&mut s2, &mut x2, -eps);
                (loss(&g, &s1, &x1, &w) - loss(&g, &s2, &x2, &w)) / (2.0 * eps as f64)
            };
        let names: Vec<String> = store.trainable().map(|p| p.name.clone()).collect();
        for name in names {
            let analytic = grads
                .params
                .get(&name)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let n = analytic.numel();
            for k in 0..per_param.min(n) {
                let e = (k * 7919 + 13) % n;
                let num = numeric(&store, &x, &|s, _, d| {
                    let mut v = s.get(&name).unwrap().value.clone();
                    v.as_f32_mut().unwrap()[e] += d;
                    s.set_value(&name, v).unwrap();
                });
                let a = analytic.as_f32().unwrap()[e] as f64;
                assert!(
                    (a - num).abs() <= tol * num.abs().max(1.0),
                    "{}: {name}[{e}]: analytic {a} numeric {num}",
                    model.graph.name
                );
            }
        }
        let gx = grads.inputs.get("input").unwrap_or_else(|| {
            panic!(
                "no input grad; have {:?}",
                grads.params.keys().collect::<Vec<_>>()
            )
        });
        for k in 0..per_param.min(x.numel()) {
            let e = (k * 104_729 + 5) % x.numel();
            let num = numeric(&store, &x, &|_, x, d| x.as_f32_mut().unwrap()[e] += d);
            let a = gx.as_f32().unwrap()[e] as f64;
            assert!(
                (a - num).abs() <= tol * num.abs().max(1.0),
                "input[{e}]: analytic {a} numeric {num}"
            );
        }
    }

    /// The model with its kinks smoothed (ReLU and ReLU6 to Tanh, max to average pooling):
    /// with hundreds of ReLUs some sit within eps of zero and spoil central differences.
    /// The kinked ops are checked on their own with inputs away from the kinks.
    fn smooth(mut model: Model) -> Model {
        for n in &mut model.graph.nodes {
            match n.op_type.as_str() {
                "Relu" | "Clip" => {
                    n.op_type = "Tanh".into();
                    n.inputs.truncate(1);
                }
                "MaxPool" => n.op_type = "AveragePool".into(),
                _ => {}
            }
        }
        model
    }

    #[test]
    fn zoo_models_match_finite_differences() {
        let mut rng = Rng::new(11);
        for (name, input) in [
            ("lenet5", [1, 16, 16]),
            ("resnet-small", [3, 8, 8]),
            ("mobilenet-small", [3, 8, 8]),
            ("vgg-small", [2, 8, 8]),
            ("mlp-1200", [1, 4, 4]),
        ] {
            let cfg = ZooConfig {
                input,
                classes: 5,
                seed: 4,
            };
            let model = smooth(zoo::build(name, &cfg).unwrap());
            let mut shape = vec![3];
            shape.extend(input);
            check_model(&model, random(&mut rng, &shape), 6, 5e-3);
        }
    }

    #[test]
    fn mixed_graph_with_broadcasting_concat_and_softmax() {
        // input [2,3,5,5] -> Conv(group 3, stride 2, pad 1) -> Mul(broadcast [3,1,1]) ->
        // Concat with a Tanh branch -> AveragePool -> Reshape -> MatMul -> Softmax.
        let mut rng = Rng::new(2);
        let mut g = Graph {
            inputs: vec![ValueInfo::new(
                "input",
                TypeInfo::known(DType::F32, &[2, 3, 5, 5]),
            )],
            outputs: vec![ValueInfo::new("y", TypeInfo::unknown_shape(DType::F32))],
            ..Graph::default()
        };
        for (name, shape) in [
            ("w", vec![3, 1, 3, 3]),
            ("s", vec![3, 1, 1]),
            ("m", vec![54, 4]),
        ] {
            g.initializers.insert(name.into(), random(&mut rng, &shape));
        }
        g.initializers.insert(
            "shape".into(),
            Tensor::from_i64(vec![2], vec![2, -1]).unwrap(),
        );
        let n = |name: &str, op: &str, i: &[&str], o: &str| {
            Node::new(
                name,
                op,
                i.iter().map(|s| s.to_string()).collect(),
                vec![o.into()],
            )
        };
        g.nodes = vec![
            n("c", "Conv", &["input", "w"], "c")
                .with_attr("group", Attr::Int(3))
                .with_attr("strides", Attr::Ints(vec![2, 2]))
                .with_attr("pads", Attr::Ints(vec![1, 1, 1, 1])),
            n("mul", "Mul", &["c", "s"], "m1"),
            n("t", "Tanh", &["m1"], "t"),
            n("cat", "Concat", &["m1", "t"], "cat").with_attr("axis", Attr::Int(1)),
            n("ap", "AveragePool", &["cat"], "ap")
                .with_attr("kernel_shape", Attr::Ints(vec![2, 2]))
                .with_attr("strides", Attr::Ints(vec![1, 1]))
                .with_attr("pads", Attr::Ints(vec![1, 1, 0, 0])),
            n("r", "Reshape", &["ap", "shape"], "r"),
            n("mm", "MatMul", &["r", "m"], "mm"),
            n("sm", "Softmax", &["mm"], "y"),
        ];
        let model = Model::new(g, 13);
        check_model(&model, random(&mut rng, &[2, 3, 5, 5]), 10, 1e-2);
    }

    #[test]
    fn op_without_backward_is_named() {
        let mut rng = Rng::new(1);
        let mut g = Graph {
            inputs: vec![ValueInfo::new(
                "input",
                TypeInfo::known(DType::F32, &[2, 3]),
            )],
            outputs: vec![ValueInfo::new("y", TypeInfo::unknown_shape(DType::F32))],
            ..Graph::default()
        };
        g.initializers.insert("w".into(), random(&mut rng, &[3, 3]));
        g.nodes = vec![
            Node::new(
                "mm",
                "MatMul",
                vec!["input".into(), "w".into()],
                vec!["h".into()],
            ),
            Node::new("erf_7", "Erf", vec!["h".into()], vec!["y".into()]),
        ];
        let model = Model::new(g, 13);
        let graph = TrainGraph::new(&model, 1).unwrap();
        let store = ParamStore::from_graph(&model.graph);
        let err = graph.check_differentiable(&store).unwrap_err().to_string();
        assert!(
            err.contains("erf_7") && err.contains("Erf") && err.contains("backward"),
            "{err}"
        );
        // Frozen parameters need no path.
        let mut frozen = store.clone();
        frozen.set_trainable("w", false).unwrap();
        graph.check_differentiable(&frozen).unwrap();
    }

    #[test]
    fn feeds_are_checked() {
        let model = zoo::build("lenet-300-100", &ZooConfig::mnist(0)).unwrap();
        let g = TrainGraph::new(&model, 1).unwrap();
        let store = ParamStore::from_graph(&model.graph);
        let bad = Tensor::from_f32(vec![2, 3, 32, 32], vec![0.0; 6144]).unwrap();
        let err = g
            .forward(&store, vec![("input".into(), bad)], Mode::Train, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("input") && err.contains("[2, 3, 32, 32]"),
            "{err}"
        );
    }
}
