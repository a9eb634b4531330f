//! The training loop: mini-batch steps (forward, loss, backward, update), per-epoch
//! evaluation, ONNX checkpoints with resumable optimizer state, and the checks that turn bad
//! input into clear errors (sample shapes, label ranges, a loss that becomes NaN).
//!
//! Runs are reproducible: the sample order of an epoch, its augmentation and every dropout
//! mask derive from the seed, the epoch and the step, and all kernels reduce in a fixed order,
//! so the same seed and thread count give the same bits, also across a resume.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::data::{Augment, EpochLoader, EpochPlan, TrainSet};
use super::exec::{Mode, TrainGraph};
use super::loss::{check_labels, cross_entropy, Distillation, LossOutput};
use super::optim::{Optimizer, OptimizerKind, Schedule, ScheduleKind};
use super::params::ParamStore;
use super::rng::derive_seed;
use crate::data::{read_npz, write_npz, PREPROCESS_METADATA_KEY};
use crate::error::{Error, Result};
use crate::ir::{Dim, Model, Tensor};
use crate::onnx::{save_model, SaveOptions};
use crate::runtime::{Session, SessionOptions};

/// Metadata key of the training summary (JSON) in exported models.
pub const TRAIN_METADATA_KEY: &str = "lithe.train";
/// Metadata key of the number of completed epochs in checkpoints.
pub const EPOCH_METADATA_KEY: &str = "lithe.train.epoch";

#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Total epochs; training resumed at epoch `k` runs `epochs - k` more.
    pub epochs: usize,
    pub batch: usize,
    pub lr: f32,
    pub optimizer: OptimizerKind,
    pub weight_decay: f32,
    pub schedule: ScheduleKind,
    /// Linear warm-up, in epochs (fractions allowed).
    pub warmup_epochs: f32,
    pub seed: u64,
    /// Worker threads (0: one per core).
    pub threads: usize,
    pub augment: Augment,
    /// Batch size for evaluation.
    pub eval_batch: usize,
    /// Written after every epoch (ONNX, plus `<file>.state.npz` with the optimizer state).
    pub checkpoint: Option<PathBuf>,
    /// Stop each epoch after this many batches (for benchmarks and smoke tests).
    pub max_batches: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> TrainConfig {
        TrainConfig {
            epochs: 1,
            batch: 64,
            lr: 0.01,
            optimizer: OptimizerKind::sgd(0.9),
            weight_decay: 0.0,
            schedule: ScheduleKind::Constant,
            warmup_epochs: 0.0,
            seed: 0,
            threads: 0,
            augment: Augment::default(),
            eval_batch: 500,
            checkpoint: None,
            max_batches: None,
        }
    }
}

/// What one training step reports.
#[derive(Clone, Debug)]
pub struct StepStats {
    pub loss: f64,
    pub correct: usize,
    pub samples: usize,
    pub lr: f32,
}

/// Loss and accuracy over a labelled set.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalStats {
    pub samples: usize,
    pub loss: f64,
    pub accuracy: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct EpochStats {
    /// 1-based.
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test: Option<EvalStats>,
    pub seconds: f64,
    pub images_per_second: f64,
    pub lr: f32,
}

/// Progress reported to the caller of [`Trainer::fit`].
pub enum Event<'a> {
    Step {
        epoch: usize,
        batch: usize,
        batches: usize,
        stats: &'a StepStats,
        images_per_second: f64,
    },
    Epoch(&'a EpochStats),
}

struct Teacher {
    session: Session,
    input: String,
    loss: Distillation,
}

/// Trains one model.
pub struct Trainer {
    model: Model,
    graph: TrainGraph,
    pub params: ParamStore,
    pub optimizer: Optimizer,
    pub config: TrainConfig,
    input: String,
    output: String,
    /// Completed epochs.
    epoch: usize,
    /// Completed steps.
    step: usize,
    teacher: Option<Teacher>,
    pub history: Vec<EpochStats>,
}

impl Trainer {
    /// Prepares `model` (one input, first output = logits `[N, classes]`) for training.
    pub fn new(model: Model, config: TrainConfig) -> Result<Trainer> {
        if config.batch == 0 {
            return Err(Error::Data("the batch size must be at least 1".into()));
        }
        if !(config.lr.is_finite() && config.lr > 0.0) {
            return Err(Error::Data(format!(
                "learning rate {} must be positive",
                config.lr
            )));
        }
        let graph = TrainGraph::new(&model, config.threads)?;
        let input = match graph.input_names().as_slice() {
            [one] => one.to_string(),
            names => {
                return Err(Error::Graph(format!(
                    "training needs a model with exactly one input, this one has {}: {}",
                    names.len(),
                    names.join(", ")
                )))
            }
        };
        let output = graph
            .output_names()
            .first()
            .map(|s| s.to_string())
            .ok_or_else(|| Error::Graph("the model has no outputs".into()))?;
        let params = ParamStore::from_graph(&model.graph);
        if params.trainable_count() == 0 {
            return Err(Error::Graph(
                "the model has no trainable parameters (f32 initializers)".into(),
            ));
        }
        graph.check_differentiable(&params)?;
        let epoch = model
            .metadata_value(EPOCH_METADATA_KEY)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let optimizer = Optimizer::new(config.optimizer, config.weight_decay);
        Ok(Trainer {
            model,
            graph,
            params,
            optimizer,
            config,
            input,
            output,
            epoch,
            step: 0,
            teacher: None,
            history: Vec::new(),
        })
    }

    /// Trains against a teacher's soft targets from now on.
    pub fn set_teacher(&mut self, teacher: &Model, loss: Distillation) -> Result<()> {
        let session = Session::new(
            teacher,
            &SessionOptions {
                threads: self.graph.threads(),
                ..SessionOptions::default()
            },
        )?;
        let input = session
            .input_names()
            .first()
            .map(|s| s.to_string())
            .ok_or_else(|| Error::Graph("the teacher model has no inputs".into()))?;
        self.teacher = Some(Teacher {
            session,
            input,
            loss,
        });
        Ok(())
    }

    pub fn graph(&self) -> &TrainGraph {
        &self.graph
    }

    pub fn graph_mut(&mut self) -> &mut TrainGraph {
        &mut self.graph
    }

    pub fn epochs_done(&self) -> usize {
        self.epoch
    }

    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// Number of classes, when the output's last dim is known.
    fn classes(&self) -> Option<usize> {
        let ty = self.model.graph.outputs.first()?;
        ty.ty.shape.as_ref()?.last()?.known()
    }

    /// Checks a set fits the model: sample shape against the input, labels against the
    /// classes.
    pub fn check_data(&self, set: &TrainSet) -> Result<()> {
        if set.is_empty() {
            return Err(Error::Data(format!(
                "{}: the data set is empty",
                set.name()
            )));
        }
        if let Some(ty) = self.graph.input_type(&self.input) {
            if let Some(dims) = &ty.shape {
                let fits = dims.len() == set.sample_shape().len() + 1
                    && dims[1..]
                        .iter()
                        .zip(set.sample_shape())
                        .all(|(d, &n)| !matches!(d, Dim::Known(k) if *k != n));
                if !fits {
                    return Err(Error::Data(format!(
                        "{} has samples of shape {:?}, but the model input '{}' expects {ty} \
                         (choose a matching --arch or --preprocess)",
                        set.name(),
                        set.sample_shape(),
                        self.input
                    )));
                }
            }
        }
        if let Some(c) = self.classes() {
            check_labels(set.labels(), c)
                .map_err(|e| Error::Data(format!("{}: {e}", set.name())))?;
        }
        Ok(())
    }

    fn loss(&self, logits: &Tensor, x: Option<&Tensor>, labels: &[i64]) -> Result<LossOutput> {
        let logits = as_2d(logits, labels.len())?;
        match (&self.teacher, x) {
            (Some(t), Some(x)) => {
                let out = t.session.run(&[(t.input.as_str(), x.clone())])?;
                let zt = out
                    .into_iter()
                    .next()
                    .map(|(_, v)| v)
                    .ok_or_else(|| Error::Graph("the teacher produced no output".into()))?;
                t.loss.loss(&logits, &as_2d(&zt, labels.len())?, labels)
            }
            _ => cross_entropy(&logits, labels),
        }
    }

    /// One optimisation step on a batch with learning rate `lr`.
    pub fn train_step(&mut self, x: Tensor, labels: &[i64], lr: f32) -> Result<StepStats> {
        let seed = derive_seed(self.config.seed, self.step as u64, 0x4452_4f50);
        let teacher_x = self.teacher.as_ref().map(|_| x.clone());
        let tape = self.graph.forward(
            &self.params,
            vec![(self.input.clone(), x)],
            Mode::Train,
            seed,
        )?;
        let logits = tape
            .value(&self.graph, &self.output)
            .ok_or_else(|| Error::Graph(format!("output '{}' was not computed", self.output)))?;
        let out = self.loss(logits, teacher_x.as_ref(), labels)?;
        if !out.loss.is_finite() {
            return Err(Error::Data(format!(
                "the loss became {} at step {} (epoch {}) with learning rate {lr}; \
                 lower the learning rate (--lr) or check the data",
                out.loss,
                self.step + 1,
                self.epoch + 1
            )));
        }
        let grad = out.grad.reshaped(logits.shape().to_vec())?;
        let grads = self.graph.backward(
            &self.params,
            &tape,
            vec![(self.output.clone(), grad)],
            false,
        )?;
        for (name, value) in &tape.updates {
            self.params.set_value(name, value.clone())?;
        }
        let (optimizer, params) = (&mut self.optimizer, &mut self.params);
        self.graph
            .install(|| optimizer.step(params, &grads.params, lr))?;
        self.step += 1;
        Ok(StepStats {
            loss: out.loss,
            correct: out.correct,
            samples: labels.len(),
            lr,
        })
    }

    /// Loss and accuracy on `set` in inference mode.
    pub fn evaluate(&self, set: &TrainSet) -> Result<EvalStats> {
        self.check_data(set)?;
        let mut rng = super::rng::Rng::new(0);
        let (mut loss, mut correct) = (0.0f64, 0usize);
        let all: Vec<usize> = (0..set.len()).collect();
        for idx in all.chunks(self.config.eval_batch.max(1)) {
            let (x, labels) = set.gather(idx, Augment::default(), &mut rng)?;
            let tape =
                self.graph
                    .forward(&self.params, vec![(self.input.clone(), x)], Mode::Eval, 0)?;
            let logits = tape.value(&self.graph, &self.output).ok_or_else(|| {
                Error::Graph(format!("output '{}' was not computed", self.output))
            })?;
            let out = cross_entropy(&as_2d(logits, labels.len())?, &labels)?;
            loss += out.loss * labels.len() as f64;
            correct += out.correct;
        }
        Ok(EvalStats {
            samples: set.len(),
            loss: loss / set.len() as f64,
            accuracy: correct as f64 / set.len() as f64,
        })
    }

    fn schedule(&self, steps_per_epoch: usize) -> Schedule {
        Schedule {
            base_lr: self.config.lr,
            kind: self.config.schedule,
            warmup_steps: (self.config.warmup_epochs * steps_per_epoch as f32).round() as usize,
            steps_per_epoch,
            total_steps: steps_per_epoch * self.config.epochs,
        }
    }

    /// Trains until `config.epochs` epochs are done, evaluating on `test` after each epoch
    /// and reporting progress to `observer`.
    pub fn fit(
        &mut self,
        train: Arc<TrainSet>,
        test: Option<&TrainSet>,
        observer: &mut dyn FnMut(Event),
    ) -> Result<()> {
        self.check_data(&train)?;
        if let Some(t) = test {
            self.check_data(t)?;
        }
        let full = EpochPlan {
            batch: self.config.batch,
            seed: self.config.seed,
            epoch: 0,
            shuffle: true,
            augment: self.config.augment,
            prefetch: 3,
        }
        .batches(train.len());
        let per_epoch = self.config.max_batches.map_or(full, |m| m.min(full));
        let schedule = self.schedule(per_epoch);
        // A resumed run continues the step count where the checkpoint left it.
        self.step = self.step.max(self.epoch * per_epoch);
        while self.epoch < self.config.epochs {
            let plan = EpochPlan {
                batch: self.config.batch,
                seed: self.config.seed,
                epoch: self.epoch,
                shuffle: true,
                augment: self.config.augment,
                prefetch: 3,
            };
            let started = Instant::now();
            let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
            let mut lr = self.config.lr;
            for batch in EpochLoader::new(train.clone(), plan).take(per_epoch) {
                let batch = batch?;
                lr = schedule.lr_at(self.step);
                let stats = self.train_step(batch.x, &batch.labels, lr)?;
                loss_sum += stats.loss * stats.samples as f64;
                correct += stats.correct;
                seen += stats.samples;
                observer(Event::Step {
                    epoch: self.epoch + 1,
                    batch: batch.index + 1,
                    batches: per_epoch,
                    stats: &stats,
                    images_per_second: seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
                });
            }
            let train_secs = started.elapsed().as_secs_f64();
            self.epoch += 1;
            let test_stats = test.map(|t| self.evaluate(t)).transpose()?;
            let stats = EpochStats {
                epoch: self.epoch,
                train_loss: loss_sum / seen.max(1) as f64,
                train_accuracy: correct as f64 / seen.max(1) as f64,
                test: test_stats,
                seconds: train_secs,
                images_per_second: seen as f64 / train_secs.max(1e-9),
                lr,
            };
            self.history.push(stats.clone());
            if let Some(path) = self.config.checkpoint.clone() {
                self.save_checkpoint(&path)?;
            }
            observer(Event::Epoch(&stats));
        }
        Ok(())
    }

    /// The model with the trained parameters and BatchNorm statistics, ready for inference,
    /// with a training summary (and the preprocessing, see [`Trainer::set_preprocess`]) in
    /// its metadata.
    pub fn export(&self) -> Model {
        let mut model = self.model.clone();
        self.params.write_to(&mut model.graph);
        model.set_metadata(EPOCH_METADATA_KEY, self.epoch.to_string());
        let last = self.history.last();
        // f32 hyper-parameters as their shortest decimal form (0.02, not 0.0199999996).
        let short = |v: f32| v.to_string().parse::<f64>().unwrap_or(v as f64);
        let summary = serde_json::json!({
            "epochs": self.epoch,
            "batch": self.config.batch,
            "lr": short(self.config.lr),
            "optimizer": self.config.optimizer.to_string(),
            "weight_decay": short(self.config.weight_decay),
            "seed": self.config.seed,
            "test_accuracy": last.and_then(|s| s.test.as_ref()).map(|t| t.accuracy),
        });
        model.set_metadata(TRAIN_METADATA_KEY, summary.to_string());
        model
    }

    /// Preprocess spec recorded for the data the model was trained on, if any.
    pub fn preprocess_of(set: &TrainSet) -> Option<String> {
        set.preprocess().map(|p| p.to_string())
    }

    /// Writes the model (ONNX, atomically) and `<path>.state.npz` with the optimizer state.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        save_model(&self.export(), path, &SaveOptions::default())?;
        let mut state = self.optimizer.state()?;
        state.push((
            "trainer/step".into(),
            Tensor::from_i64(vec![1], vec![self.step as i64])?,
        ));
        write_npz(state_path(path), &state)
    }

    /// Restores the optimizer state and step count saved beside a checkpoint (the
    /// parameters and epoch count come with the checkpoint model itself). Returns false
    /// when there is no state file.
    pub fn load_state(&mut self, checkpoint: &Path) -> Result<bool> {
        let p = state_path(checkpoint);
        if !p.is_file() {
            return Ok(false);
        }
        let state = read_npz(&p)?;
        self.optimizer.load_state(&state)?;
        if let Some((_, t)) = state.iter().find(|(k, _)| k == "trainer/step") {
            self.step = t.to_i64_vec()?.first().copied().unwrap_or(0).max(0) as usize;
        }
        Ok(true)
    }

    /// Records the preprocessing of the training data in the model metadata.
    pub fn set_preprocess(&mut self, spec: &str) {
        self.model
            .set_metadata(PREPROCESS_METADATA_KEY, spec.to_string());
    }
}

/// The optimizer-state file of a checkpoint.
pub fn state_path(checkpoint: &Path) -> PathBuf {
    let mut name = checkpoint.as_os_str().to_owned();
    name.push(".state.npz");
    PathBuf::from(name)
}

/// Logits as `[n, classes]` (trailing unit dims, as from a 1x1 conv head, are dropped).
fn as_2d(logits: &Tensor, n: usize) -> Result<Tensor> {
    let numel = logits.numel();
    let first = logits.shape().first().copied();
    let trailing_ones = logits
        .shape()
        .get(2..)
        .is_some_and(|d| d.iter().all(|&x| x == 1));
    if first != Some(n) || n == 0 || (logits.rank() != 2 && !trailing_ones) {
        return Err(Error::Shape(format!(
            "the model output {:?} is not [batch={n}, classes] logits",
            logits.shape()
        )));
    }
    logits.clone().reshaped(vec![n, numel / n])
}
