//! Streaming calibration: batches from a [`BatchSource`] run through a session that shows every
//! computed value; each quantized activation feeds a bounded-memory observer, so memory does
//! not grow with the number of samples. Several batches run at once (one per thread), but
//! each observer sees the batches in order, so results are deterministic and do not depend on
//! the thread count.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use rayon::prelude::*;

use super::config::{ActivationCalib, QuantizeConfig};
use crate::data::dataset::BatchSource;
use crate::error::{Error, Result};
use crate::ir::{DType, Dim, Graph, Model, Tensor, TypeInfo, ValueInfo};
use crate::quant::calibrate::{
    HistKind, Histogram, MeanStd, MinMax, Observer, Range, DEFAULT_BINS,
};
use crate::quant::{QParams, QScheme};
use crate::runtime::{PlanOptions, Session, SessionOptions};

/// Calibration progress: samples done out of the total.
#[derive(Clone, Copy, Debug)]
pub struct CalibProgress {
    pub phase: &'static str,
    pub done: usize,
    pub total: usize,
}

#[derive(Clone)]
enum Obs {
    MinMax(MinMax),
    Hist(Histogram),
    Moments(MeanStd, MinMax),
}

impl Obs {
    fn new(name: &str, method: ActivationCalib) -> Result<Obs> {
        Ok(match method {
            ActivationCalib::MinMax | ActivationCalib::None => Obs::MinMax(MinMax::new(name)),
            ActivationCalib::Sigma(_) => Obs::Moments(MeanStd::new(name), MinMax::new(name)),
            _ => Obs::Hist(Histogram::new(name, HistKind::Abs, DEFAULT_BINS)?),
        })
    }

    /// Adds another thread's observations of the same tensor (min/max observers only: the
    /// only ones streamed with [`Feed::Merged`]).
    fn merge(&mut self, other: Obs) {
        if let (Obs::MinMax(a), Obs::MinMax(b)) = (self, &other) {
            a.merge(b);
        }
    }

    fn observe(&mut self, x: &[f32]) -> Result<()> {
        match self {
            Obs::MinMax(m) => m.observe(x),
            Obs::Hist(h) => h.observe(x),
            Obs::Moments(s, m) => {
                m.observe(x)?;
                s.observe(x)
            }
        }
    }

    /// The chosen range for a `bits`-bit activation grid of `scheme`. Thresholds chosen on
    /// |x| are cut back to the observed values, so a tensor with a small negative tail (after
    /// HardSwish) does not spend half an affine grid on negatives it never has.
    fn range(&self, method: ActivationCalib, bits: u32, scheme: &QScheme) -> Result<Range> {
        let r = self.raw_range(method, bits, scheme)?;
        Ok(match self {
            Obs::Hist(h) => {
                let o = h.observed_range()?;
                let cut = Range {
                    min: r.min.max(o.min),
                    max: r.max.min(o.max),
                };
                // A threshold below every observed |x| (constant data, whose only value sits
                // on a bin edge the threshold rounds under) would cross the cut: keep the
                // observed range instead.
                if cut.min <= cut.max {
                    cut
                } else {
                    o
                }
            }
            _ => r,
        })
    }

    fn raw_range(&self, method: ActivationCalib, bits: u32, scheme: &QScheme) -> Result<Range> {
        match (self, method) {
            (Obs::MinMax(m), _) => m.range(),
            (Obs::Moments(s, m), ActivationCalib::Sigma(k)) => {
                let r = s.range(k)?;
                let o = m.range()?;
                Ok(Range {
                    min: r.min.max(o.min),
                    max: r.max.min(o.max),
                })
            }
            (Obs::Hist(h), ActivationCalib::Percentile(p)) => h.percentile_range(p),
            (Obs::Hist(h), ActivationCalib::Mse) => h.mse_range(scheme),
            (Obs::Hist(h), _) => {
                let o = h.observed_range()?;
                // One-sided data (after ReLU) uses every level of the grid; two-sided data
                // half of them per side.
                let levels = if o.min >= 0.0 || o.max <= 0.0 {
                    1usize << bits
                } else {
                    1usize << (bits - 1)
                };
                h.entropy_range(levels.min(h.nbins()))
            }
            (Obs::Moments(_, m), _) => m.range(),
        }
    }
}

/// The model inputs a batch of `source` feeds: the model's single input for a set of samples,
/// every input by name for a set holding one array per input.
pub(super) fn fed_inputs(wanted: &[&str], source: &dyn BatchSource) -> Result<Vec<String>> {
    match source.input_names() {
        None => match wanted[..] {
            [one] => Ok(vec![one.to_string()]),
            _ => Err(Error::Data(format!(
                "this model has {} inputs ({}); calibrating it needs an .npz with one array per input, named after it",
                wanted.len(),
                wanted.join(", ")
            ))),
        },
        Some(held) => {
            if let Some(missing) = wanted.iter().find(|w| !held.iter().any(|h| h == *w)) {
                return Err(Error::Data(format!(
                    "{} has no array for the model input '{missing}' (arrays: {}; inputs: {})",
                    source.name(),
                    held.join(", "),
                    wanted.join(", ")
                )));
            }
            Ok(wanted.iter().map(|w| w.to_string()).collect())
        }
    }
}

/// Samples `start .. start + count` of `source` as the feeds of `inputs` (see [`fed_inputs`]),
/// every f32 value finite.
pub(super) fn read_feeds(
    source: &dyn BatchSource,
    inputs: &[String],
    start: usize,
    count: usize,
) -> Result<Vec<(String, Tensor)>> {
    let feeds = match source.input_names() {
        None => {
            let (x, _) = source.batch(start, count)?;
            vec![(inputs[0].clone(), x)]
        }
        Some(_) => {
            let mut named = source.named_batch(start, count)?;
            named.retain(|(n, _)| inputs.contains(n));
            named
        }
    };
    for (name, x) in &feeds {
        check_batch(name, x, start)?;
    }
    Ok(feeds)
}

fn check_batch(input: &str, x: &Tensor, start: usize) -> Result<()> {
    // Integer inputs (token ids, masks) hold no NaN.
    let Ok(v) = x.as_f32() else {
        return Ok(());
    };
    if let Some(i) = v.iter().position(|f| !f.is_finite()) {
        let per = (v.len() / x.shape().first().copied().unwrap_or(1).max(1)).max(1);
        return Err(Error::Tensor {
            name: input.to_string(),
            msg: format!(
                "calibration sample {} has a non-finite value ({}); cannot calibrate on NaN or infinity",
                start + i / per,
                v[i]
            ),
        });
    }
    Ok(())
}

/// The sessions of streaming passes over one model: each runs one batch on the calling
/// thread, so several batches run at once on as many threads (see [`stream`]), and keeps the
/// observed values as graph outputs, which keeps them materialised while the remaining
/// activations are fused into their Conv/Gemm (a ReLU whose input is not observed needs no
/// pass of its own). Sessions are built on first use: min/max calibration runs a different
/// one (see [`pool_proxies`]).
pub struct Observing {
    /// The model the sessions run (tensors share their buffers with the caller's copy).
    model: Model,
    /// The tensors whose values the passes need.
    names: Vec<String>,
    /// Batches in flight at once.
    workers: usize,
    /// Every tensor of `names` materialised.
    direct: OnceLock<Session>,
    /// Tensors with a pool proxy observed through it, with the proxy of each.
    pooled: OnceLock<(Session, HashMap<String, String>)>,
}

impl Observing {
    /// `threads` is the number of batches run at once (0 = one per core).
    pub fn new(model: &Model, names: &[String], threads: usize) -> Result<Observing> {
        let workers = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        Ok(Observing {
            model: model.clone(),
            names: names.to_vec(),
            workers,
            direct: OnceLock::new(),
            pooled: OnceLock::new(),
        })
    }

    /// The session that shows every tensor of `names`.
    fn direct(&self) -> Result<&Session> {
        if let Some(s) = self.direct.get() {
            return Ok(s);
        }
        let s = observing_session(&self.model, &self.names)?;
        Ok(self.direct.get_or_init(|| s))
    }

    /// The session that shows the max-pooled form of the tensors [`pool_proxies`] finds (so
    /// their Conv + Relu + MaxPool run as one step) and every other tensor of `names`; with
    /// the proxy of each such tensor.
    fn pooled(&self) -> Result<(&Session, &HashMap<String, String>)> {
        if let Some((s, p)) = self.pooled.get() {
            return Ok((s, p));
        }
        // Whether a pool sees every element depends on shapes, which a file need not declare.
        let mut typed = self.model.clone();
        let proxies = match crate::passes::infer_shapes(&mut typed) {
            Ok(()) => pool_proxies(&typed.graph, &self.names),
            Err(_) => pool_proxies(&self.model.graph, &self.names),
        };
        let keep: Vec<String> = self
            .names
            .iter()
            .map(|n| proxies.get(n).unwrap_or(n).clone())
            .collect();
        let s = observing_session(&self.model, &keep)?;
        let (s, p) = self.pooled.get_or_init(|| (s, proxies));
        Ok((s, p))
    }
}

/// A one-thread session over `model` with `names` kept as graph outputs.
fn observing_session(model: &Model, names: &[String]) -> Result<Session> {
    let mut m = model.clone();
    let graph = &mut m.graph;
    let mut keep: Vec<String> = names.to_vec();
    // Conv + AveragePool fusion sums in another order than AveragePool alone: keep their
    // inputs separate too, so every observed value is what the unfused graph computes
    // (activation epilogues and max pooling are exact either way).
    for n in graph.nodes.iter().filter(|n| n.op_type == "AveragePool") {
        if let Some(i) = n.inputs.first() {
            keep.push(i.clone());
        }
    }
    let inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    let produced: HashSet<&str> = graph
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(String::as_str))
        .collect();
    let mut outputs: HashSet<String> = graph.outputs.iter().map(|v| v.name.clone()).collect();
    let mut extra = Vec::new();
    for name in keep {
        if !inputs.contains(name.as_str())
            && produced.contains(name.as_str())
            && outputs.insert(name.clone())
        {
            let ty = graph
                .type_of(&name)
                .unwrap_or_else(|| TypeInfo::unknown_shape(DType::F32));
            extra.push(ValueInfo::new(&name, ty));
        }
    }
    graph.outputs.extend(extra);
    Session::new(
        &m,
        &SessionOptions {
            threads: 1,
            plan: PlanOptions {
                fuse_activations: true,
                fuse_quantized: false,
                fuse_qdq_products: false,
            },
        },
    )
}

/// Tensors of `names` whose min and max can be read off a max pool of them: the output of a
/// Relu whose only reader is a MaxPool with windows that cover every input element (so the
/// largest value survives the pool) and no Indices output. Observing the pool's output
/// instead lets the session run Conv + Relu + MaxPool as one step, never writing the
/// four-times-larger unpooled tensor, and hands the observer a quarter of the values. The
/// smallest value does not survive, but a Relu output's range starts at 0, which every
/// activation grid contains anyway. Maps each such tensor to the pool's output.
fn pool_proxies(graph: &Graph, names: &[String]) -> HashMap<String, String> {
    let graph_outputs: HashSet<&str> = graph.outputs.iter().map(|v| v.name.as_str()).collect();
    let mut proxies = HashMap::new();
    for name in names {
        let from_relu = graph
            .nodes
            .iter()
            .any(|n| n.op_type == "Relu" && n.domain.is_empty() && n.outputs.first() == Some(name));
        if !from_relu || graph_outputs.contains(name.as_str()) {
            continue;
        }
        let mut readers = graph
            .nodes
            .iter()
            .filter(|n| n.inputs.iter().any(|i| i == name));
        let (Some(pool), None) = (readers.next(), readers.next()) else {
            continue;
        };
        let sole_input = pool.inputs.iter().filter(|i| *i == name).count() == 1;
        let single_output = pool.outputs.iter().skip(1).all(String::is_empty);
        if pool.op_type != "MaxPool"
            || !pool.domain.is_empty()
            || pool.inputs.first() != Some(name)
            || !sole_input
            || !single_output
        {
            continue;
        }
        let Some(out) = pool.outputs.first().filter(|o| !o.is_empty()) else {
            continue;
        };
        if covers_every_element(graph, name, pool) {
            proxies.insert(name.clone(), out.clone());
        }
    }
    proxies
}

/// Whether every element of `input` (NCHW with known H and W) lies in some window of `pool`,
/// resolved exactly as the kernel resolves them.
fn covers_every_element(graph: &Graph, input: &str, pool: &crate::ir::Node) -> bool {
    let Some(dims) = graph.type_of(input).and_then(|t| t.shape) else {
        return false;
    };
    let [_, _, Dim::Known(h), Dim::Known(w)] = dims[..] else {
        return false;
    };
    let Ok(window) = crate::ops::nn::PoolWindow::parse(pool) else {
        return false;
    };
    let Ok(shape) = window.resolve(&[1, 1, h, w]) else {
        return false;
    };
    let g = &shape.geom;
    let (oh, ow) = (shape.out_shape[2], shape.out_shape[3]);
    let axis = |len: usize, out: usize, a: usize| {
        let mut hit = vec![false; len];
        for o in 0..out {
            for t in 0..g.kernel[a] {
                // Window positions in padded coordinates; pads hold no input element.
                let p = o * g.stride[a] + t * g.dilation[a];
                if let Some(i) = p.checked_sub(g.pads[a]).filter(|&i| i < len) {
                    hit[i] = true;
                }
            }
        }
        hit.iter().all(|&x| x)
    };
    axis(h, oh, 0) && axis(w, ow, 1)
}

/// One observed tensor's state and whose turn it is: calls for batch `k` wait until batch
/// `k - 1` has been seen, so a tensor's statistics are fed in batch order whichever thread
/// finishes first.
struct Lane<S> {
    turn: Mutex<(usize, S)>,
    ready: Condvar,
}

/// Shared state of the threads of one [`stream`].
struct Flow<S> {
    lanes: Vec<Lane<S>>,
    done: AtomicUsize,
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
}

impl<S> Flow<S> {
    /// Records the first error and wakes every waiting thread so all of them stop.
    fn fail(&self, e: Error) {
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
        self.failed.store(true, Ordering::SeqCst);
        for lane in &self.lanes {
            // Taking the lock orders this wake-up after any check of `failed` made under it.
            drop(lane.turn.lock());
            lane.ready.notify_all();
        }
    }

    /// Waits for batch `k`'s turn on lane `i`, feeds `values` (if any) and passes the turn on.
    /// False when the stream failed.
    fn take_turn(&self, i: usize, k: usize, values: Option<&[f32]>, visit: &Visit<S>) -> bool {
        let lane = &self.lanes[i];
        let Ok(mut g) = lane.turn.lock() else {
            return false;
        };
        while g.0 != k {
            if self.failed.load(Ordering::SeqCst) {
                return false;
            }
            g = match lane.ready.wait(g) {
                Ok(g) => g,
                Err(_) => return false,
            };
        }
        if self.failed.load(Ordering::SeqCst) {
            return false;
        }
        let result = values.map_or(Ok(()), |v| visit(&mut g.1, v));
        g.0 = k + 1;
        drop(g);
        lane.ready.notify_all();
        self.check(result)
    }

    /// True for `Ok`; records an error and returns false.
    fn check(&self, result: Result<()>) -> bool {
        match result {
            Ok(()) => true,
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }
}

/// Adds one batch of a tensor's values to its state.
type Visit<S> = dyn Fn(&mut S, &[f32]) -> Result<()> + Sync;

/// How the states of a [`stream`] take the batches.
enum Feed<'f, S> {
    /// One state per tensor, fed the batches in order: for statistics whose result depends
    /// on the order (re-binning histograms, floating-point sums).
    InOrder(&'f Visit<S>),
    /// One state per tensor and thread, fed the batches that thread runs, combined in thread
    /// order at the end: for statistics that come out the same in any order (min and max).
    /// No thread ever waits for another's batch.
    Merged(&'f Visit<S>, &'f (dyn Fn(&mut S, S) + Sync)),
}

/// What one thread sees of the stream's states for one batch: `(tensor, values)`, with no
/// values for a tensor the run did not show; false when the stream failed.
type Sink<'s> = dyn FnMut(usize, Option<&[f32]>) -> bool + Send + 's;

/// Runs `source` (at most `limit` samples) in batches of `batch` through `session` on
/// `workers` threads, feeding each state of `states` the values of its tensor of `names`
/// (the graph input included; a tensor in `alias` is seen through the value it maps to).
/// Up to `workers` batches run at once, each on its own thread; with [`Feed::InOrder`]
/// every tensor's batches are visited in batch order, so streaming statistics come out
/// exactly as in a sequential pass. Memory stays bounded by the batches in flight. Returns
/// the states and the number of samples.
#[allow(clippy::too_many_arguments)]
fn stream<S: Send + Sync + Clone>(
    (session, workers, alias): (&Session, usize, &HashMap<String, String>),
    source: &dyn BatchSource,
    names: &[String],
    states: Vec<S>,
    limit: Option<usize>,
    batch: usize,
    phase: &'static str,
    progress: &mut dyn FnMut(CalibProgress),
    feed: Feed<S>,
) -> Result<(Vec<S>, usize)> {
    let total = limit.map_or(source.len(), |l| l.min(source.len()));
    if total == 0 {
        return Err(Error::Data(format!(
            "the calibration set {} is empty",
            source.name()
        )));
    }
    let inputs = fed_inputs(&session.input_names(), source)?;
    let batch = batch.max(1);
    let batches = total.div_ceil(batch);
    // Observed value -> the states that see it.
    let mut index: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in names.iter().enumerate() {
        let seen_as = alias.get(n).unwrap_or(n);
        index.entry(seen_as.as_str()).or_default().push(i);
    }
    let initial = match feed {
        Feed::Merged(..) => Some(states.clone()),
        Feed::InOrder(_) => None,
    };
    let flow = Flow {
        lanes: states
            .into_iter()
            .map(|s| Lane {
                turn: Mutex::new((0, s)),
                ready: Condvar::new(),
            })
            .collect(),
        done: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
    };
    // Batch `k` through the session; false when the stream failed.
    let run_batch = |feeds: Vec<(String, Tensor)>, sink: &mut Sink| -> bool {
        let mut seen = vec![false; flow.lanes.len()];
        for (input, x) in &feeds {
            if let (Some(lanes), Ok(v)) = (index.get(input.as_str()), x.as_f32()) {
                for &i in lanes {
                    if !sink(i, Some(v)) {
                        return false;
                    }
                    seen[i] = true;
                }
            }
        }
        let count = feeds
            .first()
            .and_then(|(_, x)| x.shape().first().copied())
            .unwrap_or(0);
        let feeds: Vec<(&str, Tensor)> =
            feeds.iter().map(|(n, x)| (n.as_str(), x.clone())).collect();
        let mut ok = true;
        let ran = session.run_observed(&feeds, &mut |name, t| {
            if let (Some(lanes), Ok(v)) = (index.get(name), t.as_f32()) {
                for &i in lanes {
                    if ok && !seen[i] {
                        seen[i] = true;
                        ok = sink(i, Some(v));
                    }
                }
            }
        });
        match ran {
            // The observed values are graph outputs of this session: handing their buffers
            // back lets the next batch reuse them (fresh ones are zeroed page by page).
            Ok(outputs) => session.recycle(outputs.into_iter().map(|(_, t)| t)),
            Err(e) => {
                flow.fail(e);
                return false;
            }
        }
        // Tensors this run did not show still pass the turn on.
        for (i, _) in seen.iter().enumerate().filter(|(_, s)| !**s) {
            ok = ok && sink(i, None);
        }
        flow.done.fetch_add(count, Ordering::SeqCst);
        ok
    };
    // Batches are claimed and read under one lock, so the source is read front to back
    // (a streaming source such as gzipped MNIST never has to go back).
    let next_batch = Mutex::new(0usize);
    let claim = || -> Option<(usize, Vec<(String, Tensor)>)> {
        let mut next = next_batch.lock().ok()?;
        let k = *next;
        if k >= batches || flow.failed.load(Ordering::SeqCst) {
            return None;
        }
        *next += 1;
        let start = k * batch;
        let count = batch.min(total - start);
        match read_feeds(source, &inputs, start, count) {
            Ok(x) => Some((k, x)),
            Err(e) => {
                flow.fail(e);
                None
            }
        }
    };
    // One thread's share of the batches; returns its own states under `Feed::Merged`.
    let work = |report: &mut dyn FnMut(usize)| -> Option<Vec<S>> {
        let mut own = initial.clone();
        while let Some((k, x)) = claim() {
            let ok = match (&feed, own.as_mut()) {
                (Feed::Merged(visit, _), Some(own)) => run_batch(x, &mut |i, values| {
                    values.is_none_or(|v| flow.check(visit(&mut own[i], v)))
                }),
                (Feed::InOrder(visit), _) | (Feed::Merged(visit, _), None) => {
                    run_batch(x, &mut |i, values| flow.take_turn(i, k, values, *visit))
                }
            };
            if !ok {
                break;
            }
            report(flow.done.load(Ordering::SeqCst));
        }
        own
    };
    let workers = workers.clamp(1, batches);
    let mut parts = Vec::with_capacity(workers);
    std::thread::scope(|scope| {
        let others: Vec<_> = (1..workers)
            .map(|_| scope.spawn(|| work(&mut |_| {})))
            .collect();
        parts.push(work(&mut |done| {
            progress(CalibProgress { phase, done, total })
        }));
        for h in others {
            match h.join() {
                Ok(p) => parts.push(p),
                Err(_) => flow.fail(Error::Data(format!(
                    "calibration on {}: a worker thread panicked",
                    source.name()
                ))),
            }
        }
    });
    if let Some(e) = flow.error.into_inner().ok().flatten() {
        return Err(e);
    }
    if flow.failed.into_inner() {
        return Err(Error::Data(format!(
            "calibration on {} stopped: a worker thread failed",
            source.name()
        )));
    }
    progress(CalibProgress {
        phase,
        done: total,
        total,
    });
    let mut states: Vec<S> = flow
        .lanes
        .into_iter()
        .map(|l| match l.turn.into_inner() {
            Ok((_, s)) => s,
            Err(p) => p.into_inner().1,
        })
        .collect();
    if let Feed::Merged(_, merge) = feed {
        for part in parts.into_iter().flatten() {
            for (s, p) in states.iter_mut().zip(part) {
                merge(s, p);
            }
        }
    }
    Ok((states, total))
}

/// [`calibrate`] with the method, bit width, sample limit and batch size of `config`, on the
/// activation grid those imply; an error when there is no calibration data.
pub fn calibrate_with_config(
    obs: &Observing,
    source: Option<&dyn BatchSource>,
    names: &[String],
    config: &QuantizeConfig,
    progress: &mut dyn FnMut(CalibProgress),
) -> Result<(BTreeMap<String, Range>, usize)> {
    let source = source
        .ok_or_else(|| Error::Data("activation quantization needs calibration data".into()))?;
    let act_scheme = QScheme::new(config.activation_bits, false, false)?;
    calibrate(
        obs,
        source,
        names,
        config.activations,
        config.activation_bits,
        &act_scheme,
        config.calib_limit,
        config.batch_size,
        progress,
    )
}

/// The most samples a min/max pass runs at once. MNIST CNN, 1000 samples, two threads: the
/// whole `lithe quantize` run takes 10-15 % less time in batches of 16 than of 100.
const MIN_MAX_RUN_BATCH: usize = 16;

/// Observes `names` over the calibration data and picks a range for each.
#[allow(clippy::too_many_arguments)]
pub fn calibrate(
    obs: &Observing,
    source: &dyn BatchSource,
    names: &[String],
    method: ActivationCalib,
    bits: u32,
    scheme: &QScheme,
    limit: Option<usize>,
    batch: usize,
    progress: &mut dyn FnMut(CalibProgress),
) -> Result<(BTreeMap<String, Range>, usize)> {
    let observers: Vec<Obs> = names
        .iter()
        .map(|n| Obs::new(n, method))
        .collect::<Result<_>>()?;
    // Min and max come out the same in any batch order, and through a covering max pool.
    let min_max = matches!(method, ActivationCalib::MinMax | ActivationCalib::None);
    let no_alias = HashMap::new();
    let (session, alias) = match min_max {
        true => obs.pooled()?,
        false => (obs.direct()?, &no_alias),
    };
    let visit = |o: &mut Obs, v: &[f32]| o.observe(v);
    let merge = |a: &mut Obs, b: Obs| a.merge(b);
    let (feed, batch) = match min_max {
        // Min and max do not depend on how the samples are batched, so these passes run
        // batches small enough for a batch's activations to stay in cache.
        true => (Feed::Merged(&visit, &merge), batch.min(MIN_MAX_RUN_BATCH)),
        false => (Feed::InOrder(&visit), batch),
    };
    let (observers, samples) = stream(
        (session, obs.workers, alias),
        source,
        names,
        observers,
        limit,
        batch,
        "calibrate",
        progress,
        feed,
    )?;
    let range = |(n, o): (&String, &Obs)| {
        let r = o.range(method, bits, scheme)?;
        // A Relu output seen through a max pool: the pool's smallest value only bounds the
        // tensor's from above; 0 bounds it from below and keeps the range non-saturating.
        Ok(match alias.contains_key(n) {
            true => Range {
                min: r.min.min(0.0),
                ..r
            },
            false => r,
        })
    };
    let ranges: Vec<Result<Range>> = if min_max {
        names.iter().zip(&observers).map(range).collect()
    } else {
        // Threshold searches (KL tries ~2000 candidates per tensor) run on the same threads.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(obs.workers)
            .build()
            .map_err(|e| Error::Data(format!("cannot start {} threads: {e}", obs.workers)))?;
        pool.install(|| names.par_iter().zip(&observers).map(range).collect())
    };
    let ranges = names
        .iter()
        .cloned()
        .zip(ranges)
        .map(|(n, r)| Ok((n, r?)))
        .collect::<Result<_>>()?;
    Ok((ranges, samples))
}

/// SQNR (dB) of fake-quantizing each tensor of `params` with its parameters, over the
/// calibration data.
pub fn activation_sqnr(
    obs: &Observing,
    source: &dyn BatchSource,
    params: &BTreeMap<String, QParams>,
    limit: Option<usize>,
    batch: usize,
    progress: &mut dyn FnMut(CalibProgress),
) -> Result<BTreeMap<String, f64>> {
    let names: Vec<String> = params.keys().cloned().collect();
    let acc: Vec<(QParams, f64, f64)> = params.values().map(|p| (*p, 0.0, 0.0)).collect();
    let (acc, _) = stream(
        (obs.direct()?, obs.workers, &HashMap::new()),
        source,
        &names,
        acc,
        limit,
        batch,
        "measure",
        progress,
        Feed::InOrder(&|a: &mut (QParams, f64, f64), v: &[f32]| {
            let p = a.0;
            let (mut s, mut n) = (0f64, 0f64);
            for &x in v {
                let d = f64::from(x - p.fake_quantize(x));
                s += f64::from(x) * f64::from(x);
                n += d * d;
            }
            a.1 += s;
            a.2 += n;
            Ok(())
        }),
    )?;
    Ok(names
        .into_iter()
        .zip(acc)
        .map(|(k, (_, s, n))| {
            let db = if n == 0.0 {
                f64::INFINITY
            } else {
                10.0 * (s / n).log10()
            };
            (k, db)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::TensorSource;
    use crate::ir::{Attr, Node};
    use crate::quant::test_rng::Rng;

    /// x [N, 2, side, side] -> Conv 3x3 (pad 1) -> Relu -> MaxPool -> Flatten -> Gemm -> y,
    /// with no declared intermediate types (the proxy search infers them).
    fn conv_relu_pool(side: usize, pool: Node) -> Model {
        let mut rng = Rng::new(3);
        let ints = |v: &[i64]| Attr::Ints(v.to_vec());
        let mut graph = Graph {
            inputs: vec![ValueInfo::new(
                "x",
                TypeInfo::new(
                    DType::F32,
                    vec![
                        Dim::Sym("N".into()),
                        Dim::Known(2),
                        Dim::Known(side),
                        Dim::Known(side),
                    ],
                ),
            )],
            outputs: vec![ValueInfo::new("y", TypeInfo::unknown_shape(DType::F32))],
            nodes: vec![
                Node::new(
                    "conv",
                    "Conv",
                    vec!["x".into(), "w".into(), "b".into()],
                    vec!["c".into()],
                )
                .with_attr("pads", ints(&[1, 1, 1, 1])),
                Node::new("relu", "Relu", vec!["c".into()], vec!["r".into()]),
                pool,
                Node::new("flat", "Flatten", vec!["p".into()], vec!["f".into()]),
                Node::new(
                    "fc",
                    "Gemm",
                    vec!["f".into(), "fw".into()],
                    vec!["y".into()],
                )
                .with_attr("transB", Attr::Int(1)),
            ],
            ..Graph::default()
        };
        let mut weight = |graph: &mut Graph, name: &str, shape: Vec<usize>| {
            let n = shape.iter().product();
            let v = (0..n).map(|_| rng.gaussian() * 0.5).collect();
            graph
                .initializers
                .insert(name.into(), Tensor::from_f32(shape, v).unwrap());
        };
        weight(&mut graph, "w", vec![4, 2, 3, 3]);
        weight(&mut graph, "b", vec![4]);
        // The Gemm's width is the pool's output size.
        let mut head = Model::new(graph.clone(), 13);
        head.graph.nodes.truncate(3);
        crate::passes::infer_shapes(&mut head).unwrap();
        let flat = match head.graph.value_info["p"].shape.as_deref() {
            Some([_, c, h, w]) => [c, h, w]
                .iter()
                .map(|d| match d {
                    Dim::Known(n) => *n,
                    _ => panic!("unknown pool output dim"),
                })
                .product::<usize>(),
            _ => panic!("no pool output shape"),
        };
        weight(&mut graph, "fw", vec![3, flat]);
        Model::new(graph, 13)
    }

    fn max_pool(kernel: i64, stride: i64) -> Node {
        Node::new("pool", "MaxPool", vec!["r".into()], vec!["p".into()])
            .with_attr("kernel_shape", Attr::Ints(vec![kernel, kernel]))
            .with_attr("strides", Attr::Ints(vec![stride, stride]))
    }

    #[test]
    fn a_relu_is_seen_through_a_max_pool_only_when_the_pool_sees_every_element() {
        let names = ["x".to_string(), "r".to_string(), "y".to_string()];
        let proxies = |side, pool| {
            let model = conv_relu_pool(side, pool);
            let obs = Observing::new(&model, &names, 1).unwrap();
            let (session, proxies) = obs.pooled().unwrap();
            (session.step_labels().join(" "), proxies.clone())
        };
        let want = HashMap::from([("r".to_string(), "p".to_string())]);
        let (labels, got) = proxies(8, max_pool(2, 2));
        assert_eq!(got, want);
        assert!(labels.starts_with("Conv+Relu+MaxPool"), "{labels}");
        // Overlapping windows (3 wide, stride 2) over 9 columns cover every one.
        assert_eq!(proxies(9, max_pool(3, 2)).1, want);
        // Stride 2 over an odd side leaves the last row and column out; stride 3 over
        // 2-wide windows skips every third.
        assert!(proxies(9, max_pool(2, 2)).1.is_empty());
        assert!(proxies(9, max_pool(2, 3)).1.is_empty());
        // Ceil mode adds the window over the last row and column.
        let ceil = max_pool(2, 2).with_attr("ceil_mode", Attr::Int(1));
        assert_eq!(proxies(9, ceil).1, want);
        // Average pooling keeps no maximum.
        let avg = Node::new("pool", "AveragePool", vec!["r".into()], vec!["p".into()])
            .with_attr("kernel_shape", Attr::Ints(vec![2, 2]))
            .with_attr("strides", Attr::Ints(vec![2, 2]));
        assert!(proxies(8, avg).1.is_empty());
    }

    #[test]
    fn min_max_through_the_pool_matches_the_direct_pass() {
        let model = conv_relu_pool(8, max_pool(2, 2));
        let mut rng = Rng::new(5);
        let x = (0..37 * 128).map(|_| rng.gaussian()).collect();
        let source = TensorSource::new(
            "memory",
            Tensor::from_f32(vec![37, 2, 8, 8], x).unwrap(),
            None,
        )
        .unwrap();
        let names: Vec<String> = ["x", "r", "y"].iter().map(|s| s.to_string()).collect();
        let scheme = QScheme::new(8, false, false).unwrap();
        let run = |threads| {
            let obs = Observing::new(&model, &names, threads).unwrap();
            let (ranges, n) = calibrate(
                &obs,
                &source,
                &names,
                ActivationCalib::MinMax,
                8,
                &scheme,
                None,
                5,
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(n, 37);
            ranges
        };
        let ranges = run(1);
        assert_eq!(ranges, run(3));
        // Every value of every tensor, in order, through the unfused session.
        let obs = Observing::new(&model, &names, 1).unwrap();
        let states = names.iter().map(|n| MinMax::new(n)).collect();
        let (direct, _) = stream(
            (obs.direct().unwrap(), 2, &HashMap::new()),
            &source,
            &names,
            states,
            None,
            5,
            "test",
            &mut |_| {},
            Feed::InOrder(&|m: &mut MinMax, v: &[f32]| m.observe(v)),
        )
        .unwrap();
        for (name, m) in names.iter().zip(&direct) {
            let want = m.range().unwrap();
            let got = ranges[name];
            assert_eq!(got.max, want.max, "{name}");
            match name.as_str() {
                "r" => assert_eq!(got.min, 0.0),
                _ => assert_eq!(got.min, want.min, "{name}"),
            }
            assert_eq!(
                got.params(&scheme, name).unwrap(),
                want.params(&scheme, name).unwrap()
            );
        }
    }
}
