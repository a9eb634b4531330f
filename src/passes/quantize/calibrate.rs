//! Streaming calibration: batches from a [`BatchSource`] run through a session that shows every
//! computed value; each quantized activation feeds a bounded-memory observer, so memory does
//! not grow with the number of samples. Batches are read in order, so results are
//! deterministic.

use std::collections::BTreeMap;

use super::config::{ActivationCalib, QuantizeConfig};
use crate::data::dataset::BatchSource;
use crate::error::{Error, Result};
use crate::ir::{Model, Tensor};
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

/// Runs `source` (at most `limit` samples) in batches through `session`, calling `visit` with
/// each tensor of `names` (the graph input included) as it is computed.
fn stream(
    session: &Session,
    source: &dyn BatchSource,
    limit: Option<usize>,
    batch: usize,
    phase: &'static str,
    progress: &mut dyn FnMut(CalibProgress),
    visit: &mut (dyn FnMut(&str, &[f32]) -> Result<()> + Send),
) -> Result<usize> {
    let total = limit.map_or(source.len(), |l| l.min(source.len()));
    if total == 0 {
        return Err(Error::Data(format!(
            "the calibration set {} is empty",
            source.name()
        )));
    }
    let input = input_name(session)?;
    let mut start = 0;
    while start < total {
        let count = batch.max(1).min(total - start);
        let (x, _) = source.batch(start, count)?;
        check_batch(&input, &x, start)?;
        visit(&input, x.as_f32()?)?;
        let mut failure: Option<Error> = None;
        session.run_observed(&[(input.as_str(), x)], &mut |name, t| {
            if failure.is_some() {
                return;
            }
            if let Ok(v) = t.as_f32() {
                if let Err(e) = visit(name, v) {
                    failure = Some(e);
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        start += count;
        progress(CalibProgress {
            phase,
            done: start,
            total,
        });
    }
    Ok(total)
}

/// A session that computes every value separately (no activation fusion), so pre-activation
/// tensors are observed too.
pub fn observing_session(model: &Model, threads: usize) -> Result<Session> {
    Session::new(
        model,
        &SessionOptions {
            threads,
            plan: PlanOptions::unfused(),
        },
    )
}

/// [`calibrate`] with the method, bit width, sample limit and batch size of `config`, on the
/// activation grid those imply; an error when there is no calibration data.
pub fn calibrate_with_config(
    session: &Session,
    source: Option<&dyn BatchSource>,
    names: &[String],
    config: &QuantizeConfig,
    progress: &mut dyn FnMut(CalibProgress),
) -> Result<(BTreeMap<String, Range>, usize)> {
    let source = source
        .ok_or_else(|| Error::Data("activation quantization needs calibration data".into()))?;
    let act_scheme = QScheme::new(config.activation_bits, false, false)?;
    calibrate(
        session,
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
    session: &Session,
    source: &dyn BatchSource,
    names: &[String],
    method: ActivationCalib,
    bits: u32,
    scheme: &QScheme,
    limit: Option<usize>,
    batch: usize,
    progress: &mut dyn FnMut(CalibProgress),
) -> Result<(BTreeMap<String, Range>, usize)> {
    let mut observers: BTreeMap<String, Obs> = names
        .iter()
        .map(|n| Ok((n.clone(), Obs::new(n, method)?)))
        .collect::<Result<_>>()?;
    let samples = stream(
        session,
        source,
        limit,
        batch,
        "calibrate",
        progress,
        &mut |name, v| match observers.get_mut(name) {
            Some(o) => o.observe(v),
            None => Ok(()),
        },
    )?;
    let ranges = observers
        .iter()
        .map(|(n, o)| Ok((n.clone(), o.range(method, bits, scheme)?)))
        .collect::<Result<_>>()?;
    Ok((ranges, samples))
}

/// SQNR (dB) of fake-quantizing each tensor of `params` with its parameters, over the
/// calibration data.
pub fn activation_sqnr(
    session: &Session,
    source: &dyn BatchSource,
    params: &BTreeMap<String, QParams>,
    limit: Option<usize>,
    batch: usize,
    progress: &mut dyn FnMut(CalibProgress),
) -> Result<BTreeMap<String, f64>> {
    let mut acc: BTreeMap<String, (f64, f64)> =
        params.keys().map(|k| (k.clone(), (0.0, 0.0))).collect();
    stream(
        session,
        source,
        limit,
        batch,
        "measure",
        progress,
        &mut |name, v| {
            if let (Some(p), Some(a)) = (params.get(name), acc.get_mut(name)) {
                let (mut s, mut n) = (0f64, 0f64);
                for &x in v {
                    let d = f64::from(x - p.fake_quantize(x));
                    s += f64::from(x) * f64::from(x);
                    n += d * d;
                }
                a.0 += s;
                a.1 += n;
            }
            Ok(())
        },
    )?;
    Ok(acc
        .into_iter()
        .map(|(k, (s, n))| {
            let db = if n == 0.0 {
                f64::INFINITY
            } else {
                10.0 * (s / n).log10()
            };
            (k, db)
        })
        .collect())
}
