//! A compiled model ready to run many times: feeds are checked against the graph's declared
//! inputs (and read in place, never copied), steps run in order inside a thread pool of the
//! requested size (or, with one thread, on the caller's thread), dead values go back to a
//! buffer pool or straight into a step that reuses their storage (Reshape and friends), and
//! an optional profile times each step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::plan::{self, Plan, PlanOptions, Slot};
use crate::error::{Error, Result};
use crate::ir::{Dim, Model, Tensor};
use crate::ops::RunCtx;

#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    /// Worker threads for kernels; 0 means one per core.
    pub threads: usize,
    pub plan: PlanOptions,
}

/// Time spent in one step during a profiled run.
#[derive(Clone, Debug)]
pub struct StepTiming {
    pub node_name: String,
    pub label: String,
    pub elapsed: Duration,
}

/// Named values, e.g. a run's outputs in graph order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Sees each value a run computes, by name.
pub type Observer<'a> = dyn FnMut(&str, &Tensor) + Send + 'a;

pub struct Session {
    plan: Plan,
    pool: rayon::ThreadPool,
    scratch: Mutex<Vec<RunCtx>>,
    /// With several threads: whether the next run stays on the caller's thread, decided
    /// from the last run's duration (see [`Session::run_inner`]).
    inline_next: AtomicBool,
}

/// A run shorter than this on one thread would not gain from more: the hand-off to the pool
/// and the wake-ups of its workers cost about as much as they save.
const INLINE_UP_TO: Duration = Duration::from_micros(300);
/// A pooled run this short goes back to the caller's thread (half the bound above, so a run
/// that two threads speed up does not flip back and forth).
const POOLED_BELOW: Duration = Duration::from_micros(150);

impl Session {
    pub fn new(model: &Model, options: &SessionOptions) -> Result<Session> {
        let plan = plan::build(model, &options.plan)?;
        let threads = if options.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            options.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Graph(format!("cannot start {threads} worker threads: {e}")))?;
        Ok(Session {
            plan,
            pool,
            scratch: Mutex::new(Vec::new()),
            inline_next: AtomicBool::new(false),
        })
    }

    /// The label of each planned step: op types joined by `+` where nodes run fused.
    pub fn step_labels(&self) -> Vec<&str> {
        self.plan.steps.iter().map(|s| s.label.as_str()).collect()
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub fn input_names(&self) -> Vec<&str> {
        self.plan
            .inputs
            .iter()
            .map(|(n, _, _)| n.as_str())
            .collect()
    }

    pub fn output_names(&self) -> Vec<&str> {
        self.plan.outputs.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Declared type of each graph input.
    pub fn input_types(&self) -> impl Iterator<Item = (&str, &crate::ir::TypeInfo)> {
        self.plan.inputs.iter().map(|(n, _, t)| (n.as_str(), t))
    }

    /// Runs the model; `feeds` are matched to graph inputs by name. Returns the graph outputs
    /// in declaration order.
    pub fn run(&self, feeds: &[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>> {
        self.run_inner(feeds, None, None)
    }

    /// As [`Session::run`], also showing every computed value (by name) to `observer` as soon
    /// as it exists. Calibration uses this to collect activation statistics without keeping
    /// the values. With activation fusion on, a fused op's pre-activation output is not seen.
    pub fn run_observed(
        &self,
        feeds: &[(&str, Tensor)],
        observer: &mut Observer,
    ) -> Result<Vec<(String, Tensor)>> {
        self.run_inner(feeds, None, Some(observer))
    }

    /// Gives tensors of an earlier run (its outputs, once read) back to the buffer pool, so
    /// later runs reuse their storage instead of zeroing fresh pages for it.
    pub fn recycle(&self, tensors: impl IntoIterator<Item = Tensor>) {
        let Ok(mut pool) = self.scratch.lock() else {
            return;
        };
        if pool.is_empty() {
            pool.push(RunCtx::default());
        }
        if let Some(ctx) = pool.last_mut() {
            for t in tensors {
                ctx.release(t);
            }
        }
    }

    /// As [`Session::run`], also timing every step.
    pub fn run_profiled(
        &self,
        feeds: &[(&str, Tensor)],
    ) -> Result<(NamedTensors, Vec<StepTiming>)> {
        let mut timings = Vec::with_capacity(self.plan.steps.len());
        let out = self.run_inner(feeds, Some(&mut timings), None)?;
        Ok((out, timings))
    }

    fn run_inner(
        &self,
        feeds: &[(&str, Tensor)],
        mut timings: Option<&mut Vec<StepTiming>>,
        mut observer: Option<&mut Observer>,
    ) -> Result<Vec<(String, Tensor)>> {
        // Feeds are only read, never copied: they live in `fed` beside the computed values.
        let mut fed: Vec<(Slot, &Tensor)> = Vec::with_capacity(self.plan.inputs.len());
        for (name, slot, ty) in &self.plan.inputs {
            let tensor = feeds
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::Input {
                    name: name.clone(),
                    msg: "no value was given for this graph input".into(),
                })?;
            check_feed(name, tensor, ty)?;
            fed.push((*slot, tensor));
        }
        for (name, _) in feeds {
            if !self.plan.inputs.iter().any(|(n, _, _)| n == name) {
                return Err(Error::Input {
                    name: name.to_string(),
                    msg: format!(
                        "the model has no such input (inputs: {})",
                        self.input_names().join(", ")
                    ),
                });
            }
        }
        let mut values: Vec<Option<Tensor>> = (0..self.plan.slot_count).map(|_| None).collect();
        let mut ctx = self
            .scratch
            .lock()
            .ok()
            .and_then(|mut s| s.pop())
            .unwrap_or_default();
        let body =
            || -> Result<()> {
                for step in &self.plan.steps {
                    let started = timings.as_ref().map(|_| Instant::now());
                    let owned = step
                        .owned_input
                        .and_then(|i| step.inputs[i])
                        .and_then(|s| values[s].take());
                    let outputs =
                        {
                            let args: Vec<Option<&Tensor>> = step
                                .inputs
                                .iter()
                                .map(|s| {
                                    s.and_then(|s| {
                                        values[s]
                                            .as_ref()
                                            .or_else(|| self.plan.constants.get(&s))
                                            .or_else(|| fed.iter().find(|f| f.0 == s).map(|f| f.1))
                                    })
                                })
                                .collect();
                            let missing = step.inputs.iter().zip(&args).enumerate().position(
                                |(i, (s, a))| {
                                    s.is_some()
                                        && a.is_none()
                                        && !(owned.is_some() && step.owned_input == Some(i))
                                },
                            );
                            if let Some(missing) = missing {
                                return Err(Error::Node {
                                    node: step.node_name.clone(),
                                    op_type: step.op_type.clone(),
                                    msg: format!("input {missing} has no value at run time"),
                                });
                            }
                            let result = match owned {
                                Some(t) => step.kernel.run_owned(t, &args, &mut ctx),
                                None => step.kernel.run(&args, &mut ctx),
                            };
                            // A kernel that already named its node (the exact node of a
                            // fused step) keeps that name; the step's is not repeated.
                            result.map_err(|e| match e {
                                Error::Node { .. }
                                | Error::Attribute { .. }
                                | Error::UnsupportedOp { .. } => e,
                                other => Error::Node {
                                    node: step.node_name.clone(),
                                    op_type: step.op_type.clone(),
                                    msg: other.to_string(),
                                },
                            })?
                        };
                    if outputs.len() < step.outputs.len() {
                        return Err(Error::Node {
                            node: step.node_name.clone(),
                            op_type: step.op_type.clone(),
                            msg: format!(
                                "produced {} outputs, expected {}",
                                outputs.len(),
                                step.outputs.len()
                            ),
                        });
                    }
                    for (slot, t) in step.outputs.iter().zip(outputs) {
                        if let Some(obs) = observer.as_deref_mut() {
                            obs(&self.plan.slot_names[*slot], &t);
                        }
                        values[*slot] = Some(t);
                    }
                    for slot in &step.release_after {
                        if let Some(t) = values[*slot].take() {
                            ctx.release(t);
                        }
                    }
                    if let (Some(t), Some(start)) = (timings.as_deref_mut(), started) {
                        t.push(StepTiming {
                            node_name: step.node_name.clone(),
                            label: step.label.clone(),
                            elapsed: start.elapsed(),
                        });
                    }
                }
                Ok(())
            };
        // One thread, or a run too short to share: run right here. Handing the run to a pool
        // worker and waiting for it costs two thread wake-ups, as much as a small model's
        // whole run. Several threads: the last run's duration decides for the next one.
        let inline = self.threads() == 1 || self.inline_next.load(Ordering::Relaxed);
        let started = Instant::now();
        let result = if inline {
            crate::kernels::par::sequential(body)
        } else {
            self.pool.install(body)
        };
        if self.threads() > 1 && result.is_ok() {
            let took = started.elapsed();
            let next = if inline {
                took <= INLINE_UP_TO
            } else {
                took < POOLED_BELOW
            };
            self.inline_next.store(next, Ordering::Relaxed);
        }
        if let Ok(mut s) = self.scratch.lock() {
            s.push(ctx);
        }
        result?;
        self.plan
            .outputs
            .iter()
            .map(|(name, slot)| {
                let t = values[*slot]
                    .take()
                    .or_else(|| self.plan.constants.get(slot).cloned())
                    .or_else(|| fed.iter().find(|f| f.0 == *slot).map(|f| f.1.clone()))
                    .ok_or_else(|| Error::Graph(format!("output '{name}' was not computed")))?;
                Ok((name.clone(), t))
            })
            .collect()
    }
}

fn check_feed(name: &str, t: &Tensor, ty: &crate::ir::TypeInfo) -> Result<()> {
    let err = |msg: String| Error::Input {
        name: name.to_string(),
        msg,
    };
    if t.dtype() != ty.dtype {
        return Err(err(format!("expected {} but got {}", ty.dtype, t.dtype())));
    }
    if let Some(dims) = &ty.shape {
        if dims.len() != t.rank() {
            return Err(err(format!("expected shape {ty} but got {:?}", t.shape())));
        }
        for (d, &n) in dims.iter().zip(t.shape()) {
            if let Dim::Known(k) = d {
                if *k != n {
                    return Err(err(format!("expected shape {ty} but got {:?}", t.shape())));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DType, Graph, Node, TypeInfo, ValueInfo};

    fn relu_model() -> Model {
        let graph = Graph {
            inputs: vec![ValueInfo::new(
                "x",
                TypeInfo::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(3)]),
            )],
            outputs: vec![ValueInfo::new("z", TypeInfo::unknown_shape(DType::F32))],
            nodes: vec![
                Node::new("r1", "Relu", vec!["x".into()], vec!["y".into()]),
                Node::new("r2", "Sigmoid", vec!["y".into()], vec!["z".into()]),
            ],
            ..Graph::default()
        };
        Model::new(graph, 13)
    }

    #[test]
    fn runs_a_chain_and_checks_feeds() {
        let s = Session::new(
            &relu_model(),
            &SessionOptions {
                threads: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let x = Tensor::from_f32(vec![2, 3], vec![-1.0, 0.0, 1.0, 2.0, -3.0, 4.0]).unwrap();
        let out = s.run(&[("x", x)]).unwrap();
        let z = out[0].1.as_f32().unwrap();
        assert_eq!(z[0], 0.5);
        assert!((z[2] - crate::kernels::activation::sigmoid(1.0)).abs() < 1e-7);

        let bad = Tensor::from_f32(vec![2, 4], vec![0.0; 8]).unwrap();
        let err = s.run(&[("x", bad)]).unwrap_err().to_string();
        assert!(
            err.contains("'x'") && err.contains("expected shape"),
            "{err}"
        );
        let err = s.run(&[]).unwrap_err().to_string();
        assert!(err.contains("no value"), "{err}");

        let mut seen = Vec::new();
        let x = Tensor::from_f32(vec![1, 3], vec![-1.0, 0.0, 1.0]).unwrap();
        s.run_observed(&[("x", x)], &mut |name, t| {
            seen.push((name.to_string(), t.shape().to_vec()))
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![("y".to_string(), vec![1, 3]), ("z".to_string(), vec![1, 3])]
        );
    }
    /// x -> Relu -> y -> Reshape -> r -> Sigmoid -> z, plus y -> Reshape -> r2 (y read twice)
    /// and x -> Reshape -> rx (a feed, which must stay borrowed). Outputs z, r2, rx and x.
    fn reshape_model() -> Model {
        let mut graph = Graph {
            inputs: vec![ValueInfo::new("x", TypeInfo::known(DType::F32, &[2, 3]))],
            outputs: ["z", "r2", "rx", "x"]
                .iter()
                .map(|n| ValueInfo::new(*n, TypeInfo::unknown_shape(DType::F32)))
                .collect(),
            nodes: vec![
                Node::new("relu", "Relu", vec!["x".into()], vec!["y".into()]),
                Node::new(
                    "view",
                    "Reshape",
                    vec!["y".into(), "shape".into()],
                    vec!["r".into()],
                ),
                Node::new("sig", "Sigmoid", vec!["r".into()], vec!["z".into()]),
                Node::new(
                    "y_flat",
                    "Reshape",
                    vec!["y".into(), "shape".into()],
                    vec!["r2".into()],
                ),
                Node::new(
                    "x_flat",
                    "Reshape",
                    vec!["x".into(), "shape".into()],
                    vec!["rx".into()],
                ),
                Node::new(
                    "z_flat",
                    "Reshape",
                    vec!["z".into(), "shape".into()],
                    vec!["unused".into()],
                ),
            ],
            ..Graph::default()
        };
        graph
            .initializers
            .insert("shape".into(), Tensor::from_i64(vec![1], vec![-1]).unwrap());
        Model::new(graph, 14)
    }

    #[test]
    fn reshape_takes_dead_values_and_feeds_stay_borrowed() {
        let model = reshape_model();
        for threads in [1, 2] {
            let s = Session::new(
                &model,
                &SessionOptions {
                    threads,
                    ..Default::default()
                },
            )
            .unwrap();
            let owned: Vec<(&str, Option<usize>)> = s
                .plan
                .steps
                .iter()
                .map(|st| (st.node_name.as_str(), st.owned_input))
                .collect();
            // Only the second reader of y may take it; feeds and graph outputs stay put.
            assert_eq!(
                owned,
                vec![
                    ("relu", None),
                    ("view", None),
                    ("sig", None),
                    ("y_flat", Some(0)),
                    ("x_flat", None),
                    ("z_flat", None),
                ]
            );
            let xv = vec![-1.0, 0.0, 1.0, 2.0, -3.0, 4.0];
            let x = Tensor::from_f32(vec![2, 3], xv.clone()).unwrap();
            let out = s.run(&[("x", x)]).unwrap();
            let get = |n: &str| &out.iter().find(|(k, _)| k == n).unwrap().1;
            let relu: Vec<f32> = xv.iter().map(|v| v.max(0.0)).collect();
            assert_eq!(get("r2").shape(), &[6]);
            assert_eq!(get("r2").as_f32().unwrap(), &relu[..]);
            assert_eq!(get("rx").as_f32().unwrap(), &xv[..]);
            assert_eq!(get("x").shape(), &[2, 3]);
            assert_eq!(get("x").as_f32().unwrap(), &xv[..]);
            let z = get("z").as_f32().unwrap();
            assert!((z[3] - crate::kernels::activation::sigmoid(2.0)).abs() < 1e-7);
        }
    }
    #[test]
    fn conv_pool_fusion_matches_separate_steps() {
        use crate::ir::Attr;
        use crate::kernels::testutil::Rng;
        let mut rng = Rng::new(7);
        let ints = |v: &[i64]| Attr::Ints(v.to_vec());
        let mut graph = Graph {
            inputs: vec![ValueInfo::new(
                "x",
                TypeInfo::new(
                    DType::F32,
                    vec![
                        Dim::Sym("N".into()),
                        Dim::Known(3),
                        Dim::Known(9),
                        Dim::Known(9),
                    ],
                ),
            )],
            outputs: vec![ValueInfo::new("y", TypeInfo::unknown_shape(DType::F32))],
            nodes: vec![
                Node::new(
                    "c1",
                    "Conv",
                    vec!["x".into(), "w1".into(), "b1".into()],
                    vec!["c1o".into()],
                )
                .with_attr("pads", ints(&[1, 1, 1, 1])),
                Node::new("r1", "Relu", vec!["c1o".into()], vec!["r1o".into()]),
                Node::new("p1", "MaxPool", vec!["r1o".into()], vec!["p1o".into()])
                    .with_attr("kernel_shape", ints(&[2, 2]))
                    .with_attr("strides", ints(&[2, 2])),
                Node::new(
                    "c2",
                    "Conv",
                    vec!["p1o".into(), "w2".into()],
                    vec!["c2o".into()],
                ),
                Node::new("p2", "AveragePool", vec!["c2o".into()], vec!["y".into()])
                    .with_attr("kernel_shape", ints(&[3, 3]))
                    .with_attr("strides", ints(&[2, 2]))
                    .with_attr("pads", ints(&[1, 1, 1, 1]))
                    .with_attr("ceil_mode", Attr::Int(1))
                    .with_attr("count_include_pad", Attr::Int(1)),
            ],
            ..Graph::default()
        };
        for (name, shape) in [
            ("w1", vec![4, 3, 3, 3]),
            ("b1", vec![4]),
            ("w2", vec![5, 4, 1, 1]),
        ] {
            let n = shape.iter().product();
            graph
                .initializers
                .insert(name.into(), Tensor::from_f32(shape, rng.vec(n)).unwrap());
        }
        let model = Model::new(graph, 18);
        let x = Tensor::from_f32(vec![3, 3, 9, 9], rng.vec(3 * 3 * 81)).unwrap();
        for threads in [1, 2] {
            let session = |fuse: bool| {
                let options = SessionOptions {
                    threads,
                    plan: PlanOptions {
                        fuse_activations: fuse,
                        fuse_quantized: fuse,
                        fuse_qdq_products: fuse,
                    },
                };
                Session::new(&model, &options).unwrap()
            };
            let (fused, plain) = (session(true), session(false));
            let labels: Vec<&str> = fused.plan.steps.iter().map(|s| s.label.as_str()).collect();
            assert_eq!(labels, ["Conv+Relu+MaxPool", "Conv+AveragePool"]);
            assert_eq!(plain.plan.steps.len(), 5);
            let want = plain.run(&[("x", x.clone())]).unwrap();
            let got = fused.run(&[("x", x.clone())]).unwrap();
            assert_eq!(got[0].1.shape(), &[3, 5, 3, 3]);
            assert_eq!(got[0].1.shape(), want[0].1.shape());
            assert_eq!(got[0].1.as_f32().unwrap(), want[0].1.as_f32().unwrap());
        }
    }
}
