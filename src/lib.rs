//! `reformer`: a byte-level Reformer language model (LSH attention + reversible residual
//! layers) with hand-written forward and backward passes, its optimizer and schedule, the data
//! pipeline, checkpoints and sampling. See DESIGN.md for the semantics the tests pin down.
//!
//! * [`config`]: model configs and the named presets (`tiny`, `cp6`, `deep20`, `wide20`).
//! * [`device`]: the same model on a device backend — CUDA kernels, or their CPU twins.
//! * [`model`]: embedding + axial positions → reversible stack → chunked LM head and loss.
//! * [`optim`]: Adam, warmup + cosine schedule, global-norm clipping.
//! * [`data`]: any file as bytes, train/validation split, seeded windows.
//! * [`checkpoint`]: atomic safetensors checkpoints with typed load errors.
//! * [`generate`]: temperature / top-k sampling.
//! * [`train`]: the training step, evaluation, save and resume.
//! * [`planner`]: the memory pool's peak of a training step or an inference pass, predicted
//!   before it runs, with a breakdown.

pub mod axial;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod embedding;
pub mod error;
pub mod generate;
pub mod lm_head;
pub mod model;
pub mod optim;
pub mod param;
pub mod planner;
pub mod train;

pub use checkpoint::{Checkpoint, CheckpointError, TrainState};
pub use config::{Attention, ModelConfig, PRESETS, VOCAB};
pub use data::{DataError, TextData};
pub use error::{ReformerError, Result};
pub use generate::{generate, SampleOptions};
pub use model::ReformerLm;
pub use optim::{Adam, AdamConfig, LrSchedule};
pub use param::{HasParams, Param};
pub use planner::{MemoryPlan, PlanKind};
pub use reformer_reversible::StepContext;
pub use train::{StepStats, Trainer};
