//! Training on the CPU, over the same IR graphs lithe optimizes: reverse-mode autodiff
//! ([`exec`], with the backward rules of [`crate::ops::grad`]), losses including
//! distillation ([`loss`]), trainable/frozen/masked/fake-quantized parameters ([`params`]),
//! optimizers and learning-rate schedules ([`optim`]), a seeded data pipeline with
//! augmentation ([`data`]) and the loop that ties them together with checkpoints ([`fit`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use lithe::data::Split;
//! use lithe::train::{TrainConfig, TrainSet, Trainer};
//!
//! let model = lithe::zoo::build("lenet5", &lithe::zoo::ZooConfig::mnist(0))?;
//! let train = Arc::new(TrainSet::open("mnist", Split::Train, None)?);
//! let test = TrainSet::open("mnist", Split::Test, None)?;
//! let mut trainer = Trainer::new(model, TrainConfig { epochs: 2, ..TrainConfig::default() })?;
//! trainer.fit(train, Some(&test), &mut |_| {})?;
//! let trained = trainer.export();
//! # Ok::<(), lithe::Error>(())
//! ```

pub mod data;
pub mod exec;
pub mod fake_quant;
pub mod fit;
pub mod loss;
pub mod optim;
pub mod params;
pub mod rng;

pub use data::{Augment, Batch, EpochLoader, EpochPlan, TrainSet};
pub use exec::{Gradients, Mode, NodeTime, Tape, TrainGraph};
pub use fake_quant::{
    ActRangeMode, ActivationFakeQuant, KmeansFakeQuant, WeightFakeQuant, WeightRangeMode,
};
pub use fit::{
    state_path, EpochStats, EvalStats, Event, StepStats, TrainConfig, Trainer, EPOCH_METADATA_KEY,
    TRAIN_METADATA_KEY,
};
pub use loss::{cross_entropy, Distillation, LossOutput};
pub use optim::{Optimizer, OptimizerKind, Schedule, ScheduleKind};
pub use params::{FakeQuant, LinearFakeQuant, Param, ParamStore};
pub use rng::Rng;
