//! Optimizers (SGD with momentum or Nesterov momentum, Adam, AdamW) with PyTorch's update
//! rules, and learning-rate schedules (constant, step, cosine, each with linear warm-up).
//!
//! Weight decay applies to parameters whose `decay` flag is set: as an L2 term added to the
//! gradient for SGD and Adam, decoupled (`w -= lr * wd * w`) for AdamW. Pruning masks multiply
//! the gradient before the update and the weight after it, so pruned weights stay zero.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use super::params::ParamStore;
use crate::error::{Error, Result};
use crate::ir::Tensor;

/// Parameters per parallel update chunk.
const CHUNK: usize = 1 << 14;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    Sgd { momentum: f32, nesterov: bool },
    Adam { beta1: f32, beta2: f32, eps: f32 },
    AdamW { beta1: f32, beta2: f32, eps: f32 },
}

impl OptimizerKind {
    pub fn sgd(momentum: f32) -> OptimizerKind {
        OptimizerKind::Sgd {
            momentum,
            nesterov: false,
        }
    }

    pub fn adam() -> OptimizerKind {
        OptimizerKind::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    pub fn adamw() -> OptimizerKind {
        OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptimizerKind::Sgd {
                momentum,
                nesterov: false,
            } => write!(f, "sgd(momentum={momentum})"),
            OptimizerKind::Sgd { momentum, .. } => write!(f, "nesterov(momentum={momentum})"),
            OptimizerKind::Adam { beta1, beta2, eps } => {
                write!(f, "adam(beta1={beta1},beta2={beta2},eps={eps})")
            }
            OptimizerKind::AdamW { beta1, beta2, eps } => {
                write!(f, "adamw(beta1={beta1},beta2={beta2},eps={eps})")
            }
        }
    }
}

/// One optimizer over the trainable parameters of a [`ParamStore`].
#[derive(Clone, Debug)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub weight_decay: f32,
    /// Updates applied so far (Adam's bias correction counts them).
    pub steps: u64,
    /// Per parameter: momentum buffer (SGD) or first moment (Adam).
    first: BTreeMap<String, Vec<f32>>,
    /// Per parameter: second moment (Adam).
    second: BTreeMap<String, Vec<f32>>,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, weight_decay: f32) -> Optimizer {
        Optimizer {
            kind,
            weight_decay,
            steps: 0,
            first: BTreeMap::new(),
            second: BTreeMap::new(),
        }
    }

    /// Applies one update with learning rate `lr` to every trainable parameter that has a
    /// gradient.
    pub fn step(
        &mut self,
        store: &mut ParamStore,
        grads: &HashMap<String, Tensor>,
        lr: f32,
    ) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for p in store.iter_mut().filter(|p| p.trainable) {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let n = p.value.numel();
            let gv = g.as_f32()?;
            if gv.len() != n {
                return Err(Error::Tensor {
                    name: p.name.clone(),
                    msg: format!("gradient has {} values for {n} weights", gv.len()),
                });
            }
            let wd = if p.decay { self.weight_decay } else { 0.0 };
            let mask = p.mask.as_deref();
            let w = p.value.as_f32_mut()?;
            // Element-wise updates in parallel chunks: no reduction, so no order effects.
            let grad_at = |i: usize| mask.map_or(gv[i], |m| gv[i] * m[i]);
            match self.kind {
                OptimizerKind::Sgd { momentum, nesterov } => {
                    let fresh = !self.first.contains_key(&p.name);
                    let buf = self
                        .first
                        .entry(p.name.clone())
                        .or_insert_with(|| vec![0.0; n]);
                    w.par_chunks_mut(CHUNK)
                        .zip(buf.par_chunks_mut(CHUNK))
                        .enumerate()
                        .for_each(|(c, (w, buf))| {
                            for (k, (w, b)) in w.iter_mut().zip(buf).enumerate() {
                                let mut d = grad_at(c * CHUNK + k) + wd * *w;
                                if momentum != 0.0 {
                                    *b = if fresh { d } else { momentum * *b + d };
                                    d = if nesterov { d + momentum * *b } else { *b };
                                }
                                *w -= lr * d;
                            }
                        });
                }
                OptimizerKind::Adam { beta1, beta2, eps }
                | OptimizerKind::AdamW { beta1, beta2, eps } => {
                    let decoupled = matches!(self.kind, OptimizerKind::AdamW { .. });
                    let m = self
                        .first
                        .entry(p.name.clone())
                        .or_insert_with(|| vec![0.0; n]);
                    let v = self
                        .second
                        .entry(p.name.clone())
                        .or_insert_with(|| vec![0.0; n]);
                    let c1 = 1.0 - beta1.powi(t);
                    let c2 = 1.0 - beta2.powi(t);
                    w.par_chunks_mut(CHUNK)
                        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                        .enumerate()
                        .for_each(|(c, (w, (m, v)))| {
                            for (k, ((w, m), v)) in w.iter_mut().zip(m).zip(v).enumerate() {
                                let mut d = grad_at(c * CHUNK + k);
                                if decoupled {
                                    *w -= lr * wd * *w;
                                } else {
                                    d += wd * *w;
                                }
                                *m = beta1 * *m + (1.0 - beta1) * d;
                                *v = beta2 * *v + (1.0 - beta2) * d * d;
                                *w -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
                            }
                        });
                }
            }
            p.apply_mask()?;
        }
        Ok(())
    }

    /// The optimizer state as named tensors (`first/<param>`, `second/<param>`), for
    /// checkpoints.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "steps".to_string(),
            Tensor::from_i64(vec![1], vec![self.steps as i64])?,
        )];
        for (prefix, map) in [("first", &self.first), ("second", &self.second)] {
            for (name, v) in map {
                out.push((
                    format!("{prefix}/{name}"),
                    Tensor::from_f32(vec![v.len()], v.clone())?,
                ));
            }
        }
        Ok(out)
    }

    /// Restores what [`Optimizer::state`] saved.
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        self.first.clear();
        self.second.clear();
        for (key, t) in state {
            if key == "steps" {
                self.steps = t.to_i64_vec()?.first().copied().unwrap_or(0).max(0) as u64;
            } else if let Some(name) = key.strip_prefix("first/") {
                self.first.insert(name.to_string(), t.as_f32()?.to_vec());
            } else if let Some(name) = key.strip_prefix("second/") {
                self.second.insert(name.to_string(), t.as_f32()?.to_vec());
            }
        }
        Ok(())
    }
}

/// How the learning rate evolves over training.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScheduleKind {
    Constant,
    /// Multiply by `gamma` every `every` epochs.
    Step {
        every: usize,
        gamma: f32,
    },
    /// Cosine from the base rate down to `base * min_factor` at the last step.
    Cosine {
        min_factor: f32,
    },
}

impl FromStr for ScheduleKind {
    type Err = Error;
    /// `constant`, `cosine`, `step` (x0.1 every 10 epochs) or `step:EVERY:GAMMA`.
    fn from_str(s: &str) -> Result<ScheduleKind> {
        let bad = || {
            Error::Data(format!(
                "unknown schedule '{s}' (expected constant, cosine, step or step:EVERY:GAMMA)"
            ))
        };
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["constant"] | ["const"] => Ok(ScheduleKind::Constant),
            ["cosine"] => Ok(ScheduleKind::Cosine { min_factor: 0.0 }),
            ["step"] => Ok(ScheduleKind::Step {
                every: 10,
                gamma: 0.1,
            }),
            ["step", every, gamma] => Ok(ScheduleKind::Step {
                every: every.parse().ok().filter(|&e| e > 0).ok_or_else(bad)?,
                gamma: gamma
                    .parse()
                    .ok()
                    .filter(|g: &f32| g.is_finite())
                    .ok_or_else(bad)?,
            }),
            _ => Err(bad()),
        }
    }
}

/// A learning rate for every step: linear warm-up over `warmup_steps`, then `kind`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub base_lr: f32,
    pub kind: ScheduleKind,
    pub warmup_steps: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
}

impl Schedule {
    pub fn lr_at(&self, step: usize) -> f32 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        match self.kind {
            ScheduleKind::Constant => self.base_lr,
            ScheduleKind::Step { every, gamma } => {
                let epoch = step / self.steps_per_epoch.max(1);
                self.base_lr * gamma.powi((epoch / every.max(1)) as i32)
            }
            ScheduleKind::Cosine { min_factor } => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                let min = self.base_lr as f64 * min_factor as f64;
                (min + (self.base_lr as f64 - min) * cos) as f32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Graph, Node};

    fn store(w: Vec<f32>) -> ParamStore {
        let mut g = Graph::default();
        g.initializers
            .insert("w".into(), Tensor::from_f32(vec![w.len(), 1], w).unwrap());
        g.nodes.push(Node::new(
            "m",
            "MatMul",
            vec!["x".into(), "w".into()],
            vec!["y".into()],
        ));
        ParamStore::from_graph(&g)
    }

    fn grads(g: Vec<f32>) -> HashMap<String, Tensor> {
        let n = g.len();
        HashMap::from([("w".to_string(), Tensor::from_f32(vec![n, 1], g).unwrap())])
    }

    fn w(s: &ParamStore) -> Vec<f32> {
        s.get("w").unwrap().value.as_f32().unwrap().to_vec()
    }

    #[test]
    fn sgd_momentum_nesterov_and_decay() {
        let mut s = store(vec![1.0, 2.0]);
        let mut o = Optimizer::new(OptimizerKind::sgd(0.9), 0.1);
        o.step(&mut s, &grads(vec![1.0, 1.0]), 0.5).unwrap();
        // d = g + 0.1 w = [1.1, 1.2]; buf = d; w -= 0.5 d.
        assert_eq!(w(&s), vec![1.0 - 0.55, 2.0 - 0.6]);
        o.step(&mut s, &grads(vec![0.0, 0.0]), 0.5).unwrap();
        let d0 = 0.9 * 1.1 + 0.1 * 0.45;
        assert!((w(&s)[0] - (0.45 - 0.5 * d0)).abs() < 1e-6);

        let mut s = store(vec![1.0]);
        let mut o = Optimizer::new(
            OptimizerKind::Sgd {
                momentum: 0.5,
                nesterov: true,
            },
            0.0,
        );
        o.step(&mut s, &grads(vec![2.0]), 0.1).unwrap();
        // buf = 2; d = 2 + 0.5 * 2 = 3.
        assert!((w(&s)[0] - 0.7).abs() < 1e-6);
    }

    #[test]
    fn adam_first_step_moves_by_lr_and_masks_hold() {
        for kind in [OptimizerKind::adam(), OptimizerKind::adamw()] {
            let mut s = store(vec![1.0, -1.0, 3.0]);
            s.set_mask("w", &[true, true, false]).unwrap();
            let mut o = Optimizer::new(kind, 0.0);
            o.step(&mut s, &grads(vec![0.3, -5.0, 1.0]), 0.01).unwrap();
            let v = w(&s);
            assert!(
                (v[0] - 0.99).abs() < 1e-5 && (v[1] + 0.99).abs() < 1e-5,
                "{v:?}"
            );
            assert_eq!(v[2], 0.0);
            let state = o.state().unwrap();
            let mut o2 = Optimizer::new(kind, 0.0);
            o2.load_state(&state).unwrap();
            assert_eq!(o2.steps, 1);
            let mut s2 = s.clone();
            o.step(&mut s, &grads(vec![0.1, 0.1, 0.1]), 0.01).unwrap();
            o2.step(&mut s2, &grads(vec![0.1, 0.1, 0.1]), 0.01).unwrap();
            assert_eq!(w(&s), w(&s2));
        }
        // AdamW decays decoupled from the gradient.
        let mut s = store(vec![2.0]);
        let mut o = Optimizer::new(OptimizerKind::adamw(), 0.5);
        o.step(&mut s, &grads(vec![0.0]), 0.1).unwrap();
        assert!((w(&s)[0] - 1.9).abs() < 1e-6);
    }

    #[test]
    fn schedules() {
        let base = Schedule {
            base_lr: 1.0,
            kind: ScheduleKind::Constant,
            warmup_steps: 4,
            steps_per_epoch: 10,
            total_steps: 104,
        };
        assert_eq!(base.lr_at(0), 0.25);
        assert_eq!(base.lr_at(3), 1.0);
        assert_eq!(base.lr_at(50), 1.0);
        let step = Schedule {
            kind: "step:2:0.5".parse().unwrap(),
            warmup_steps: 0,
            ..base
        };
        assert_eq!(step.lr_at(19), 1.0);
        assert_eq!(step.lr_at(20), 0.5);
        assert_eq!(step.lr_at(45), 0.25);
        let cos = Schedule {
            kind: "cosine".parse().unwrap(),
            ..base
        };
        assert_eq!(cos.lr_at(4), 1.0);
        assert!((cos.lr_at(54) - 0.5).abs() < 1e-6);
        assert!(cos.lr_at(104).abs() < 1e-6);
        assert!("linear".parse::<ScheduleKind>().is_err());
    }
}
