//! Streaming calibration: batches from a [`BatchSource`] run through a session that shows every
//! computed value; each quantized activation feeds a bounded-memory observer, so memory does
//! not grow with the number of samples. Several batches run at once (one per thread), but
//! each observer sees the batches in order, so results are deterministic and do not depend on
//! the thread count.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use rayon::prelude::*;

use super::config::{ActivationCalib, QuantizeConfig};
use crate::data::dataset::BatchSource;
use crate::error::{Error, Result};
use crate::ir::{DType, Model, Tensor, TypeInfo, ValueInfo};
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

/// The single f32 input of a calibration model.
fn input_name(session: &Session) -> Result<String> {
    match session.input_names()[..] {
        [one] => Ok(one.to_string()),
        _ => Err(Error::Data(format!(
            "calibration needs a model with one input, this one has {}",
            session.input_names().len()
        ))),
    }
}

fn check_batch(input: &str, x: &Tensor, start: usize) -> Result<()> {
    let v = x.as_f32()?;
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

/// A session for streaming passes: it runs one batch on the calling thread, so several
/// batches run at once on as many threads (see [`stream`]), and it keeps `names` as graph
/// outputs, which keeps them materialised while the remaining activations are fused into
/// their Conv/Gemm (a ReLU whose input is not observed needs no pass of its own).
pub struct Observing {
    session: Session,
    /// Batches in flight at once.
    workers: usize,
}

impl Observing {
    /// `threads` is the number of batches run at once (0 = one per core).
    pub fn new(model: &Model, names: &[String], threads: usize) -> Result<Observing> {
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
        let session = Session::new(
            &m,
            &SessionOptions {
                threads: 1,
                plan: PlanOptions {
                    fuse_activations: true,
                    fuse_quantized: false,
                    fuse_qdq_products: false,
                },
            },
        )?;
        let workers = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        Ok(Observing { session, workers })
    }
}

/// One observed tensor's state and whose turn it is: calls for batch `k` wait until batch
/// `k - 1` has been seen, so a tensor's statistics are fed in batch order whichever thread
/// finishes first.
struct Lane<S> {
    turn: Mutex<(usize, S)>,
    ready: Condvar,
}

/// Shared state of the threads of one [`stream`].
struct Flow<'a, S> {
    lanes: Vec<Lane<S>>,
    index: HashMap<&'a str, usize>,
    done: AtomicUsize,
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
}

impl<S> Flow<'_, S> {
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
    fn take_turn(
        &self,
        i: usize,
        k: usize,
        values: Option<&[f32]>,
        visit: &(dyn Fn(&mut S, &[f32]) -> Result<()> + Sync),
    ) -> bool {
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
        match result {
            Ok(()) => true,
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }
}

/// Runs `source` (at most `limit` samples) in batches of `batch` through `obs`, calling
/// `visit` with the state of `names[i]` and its values in each batch (the graph input
/// included). Up to `obs.workers` batches run at once, each on its own thread; every
/// tensor's batches are visited in batch order, so streaming statistics come out exactly as
/// in a sequential pass, and memory stays bounded by the batches in flight. Returns the
/// states and the number of samples.
#[allow(clippy::too_many_arguments)]
fn stream<S: Send>(
    obs: &Observing,
    source: &dyn BatchSource,
    names: &[String],
    states: Vec<S>,
    limit: Option<usize>,
    batch: usize,
    phase: &'static str,
    progress: &mut dyn FnMut(CalibProgress),
    visit: &(dyn Fn(&mut S, &[f32]) -> Result<()> + Sync),
) -> Result<(Vec<S>, usize)> {
    let total = limit.map_or(source.len(), |l| l.min(source.len()));
    if total == 0 {
        return Err(Error::Data(format!(
            "the calibration set {} is empty",
            source.name()
        )));
    }
    let session = &obs.session;
    let input = input_name(session)?;
    let batch = batch.max(1);
    let batches = total.div_ceil(batch);
    let flow = Flow {
        lanes: states
            .into_iter()
            .map(|s| Lane {
                turn: Mutex::new((0, s)),
                ready: Condvar::new(),
            })
            .collect(),
        index: names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect(),
        done: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
    };
    // Batch `k` through the session; false when the stream failed.
    let run_batch = |k: usize, x: Tensor| -> bool {
        let mut seen = vec![false; flow.lanes.len()];
        if let (Some(&i), Ok(v)) = (flow.index.get(input.as_str()), x.as_f32()) {
            if !flow.take_turn(i, k, Some(v), visit) {
                return false;
            }
            seen[i] = true;
        }
        let count = x.shape().first().copied().unwrap_or(0);
        let mut ok = true;
        let ran = session.run_observed(&[(input.as_str(), x)], &mut |name, t| {
            if !ok {
                return;
            }
            if let (Some(&i), Ok(v)) = (flow.index.get(name), t.as_f32()) {
                if !seen[i] {
                    seen[i] = true;
                    ok = flow.take_turn(i, k, Some(v), visit);
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
            ok = ok && flow.take_turn(i, k, None, visit);
        }
        flow.done.fetch_add(count, Ordering::SeqCst);
        ok
    };
    // Batches are claimed and read under one lock, so the source is read front to back
    // (a streaming source such as gzipped MNIST never has to go back).
    let next_batch = Mutex::new(0usize);
    let claim = || -> Option<(usize, Tensor)> {
        let mut next = next_batch.lock().ok()?;
        let k = *next;
        if k >= batches || flow.failed.load(Ordering::SeqCst) {
            return None;
        }
        *next += 1;
        let start = k * batch;
        let count = batch.min(total - start);
        let fed = source
            .batch(start, count)
            .and_then(|(x, _)| check_batch(&input, &x, start).map(|()| x));
        match fed {
            Ok(x) => Some((k, x)),
            Err(e) => {
                flow.fail(e);
                None
            }
        }
    };
    let work = |report: &mut dyn FnMut(usize)| {
        while let Some((k, x)) = claim() {
            if !run_batch(k, x) {
                return;
            }
            report(flow.done.load(Ordering::SeqCst));
        }
    };
    let workers = obs.workers.clamp(1, batches);
    std::thread::scope(|scope| {
        for _ in 1..workers {
            scope.spawn(|| work(&mut |_| {}));
        }
        work(&mut |done| progress(CalibProgress { phase, done, total }));
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
    let states = flow
        .lanes
        .into_iter()
        .map(|l| match l.turn.into_inner() {
            Ok((_, s)) => s,
            Err(p) => p.into_inner().1,
        })
        .collect();
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
    let (observers, samples) = stream(
        obs,
        source,
        names,
        observers,
        limit,
        batch,
        "calibrate",
        progress,
        &|o: &mut Obs, v: &[f32]| o.observe(v),
    )?;
    // Threshold searches (KL tries ~2000 candidates per tensor) run on the same threads.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(obs.workers)
        .build()
        .map_err(|e| Error::Data(format!("cannot start {} threads: {e}", obs.workers)))?;
    let ranges: Vec<Result<Range>> = pool.install(|| {
        observers
            .par_iter()
            .map(|o| o.range(method, bits, scheme))
            .collect()
    });
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
        obs,
        source,
        &names,
        acc,
        limit,
        batch,
        "measure",
        progress,
        &|a: &mut (QParams, f64, f64), v: &[f32]| {
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
        },
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
