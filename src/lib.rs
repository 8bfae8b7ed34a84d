//! `reformer`: a byte-level Reformer language model (LSH attention + reversible residual
//! layers) with hand-written forward and backward passes, written once against a backend —
//! the CPU, a CUDA GPU, or the memory planner — with its optimizer and schedule, the data
//! pipeline, checkpoints, the trainer and sampling. `docs/architecture.md` describes the
//! layers and how a step flows through them.
//!
//! * [`config`]: model configs and the named presets (`tiny`, `cp6`, `deep20`, `wide20`).
//! * [`backend`]: the [`Backend`] trait and its three implementations (CPU, CUDA, plan).
//! * [`layers`]: the reversible block's attention and feed-forward sublayers on a backend.
//! * [`model`]: [`ReformerLm`] — embedding + axial positions → reversible stack → chunked LM
//!   head and loss, Adam.
//! * [`init`]: the initial parameter values of a config.
//! * [`optim`]: Adam's update and the warmup + cosine schedule.
//! * [`data`]: any file as bytes, train/validation split, seeded windows.
//! * [`evaluate`]: held-out bits per byte of a model on any bytes, on windows of a stated
//!   length, with the hash rounds as an option.
//! * [`duplication`]: the paper's synthetic task `0 w 0 w`, scored on its second half.
//! * [`checkpoint`]: atomic safetensors checkpoints with typed load errors.
//! * [`decode`]: incremental decoding with per-layer caches (prefill, then one step per byte).
//! * [`generate`]: temperature / top-k sampling over the decoder.
//! * [`train`]: the training loop, evaluation, save and resume.
//! * [`cli`]: what the command-line tools share: flag checks naming flag, value and range,
//!   output a closed pipe cannot crash, run folders that are not overwritten, metrics rows.

pub mod backend;
pub mod chart;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod decode;
pub mod duplication;
pub mod error;
pub mod evaluate;
pub mod generate;
pub mod init;
pub mod layers;
pub mod model;
pub mod optim;
pub mod train;

pub use backend::{Backend, CpuBackend, CudaBackend, MemoryPlan, PlanBackend};
pub use checkpoint::{Checkpoint, CheckpointError, Moments, Snapshot, TrainState};
pub use config::{Attention, ModelConfig, PRESETS, VOCAB};
pub use data::{DataError, TextData};
pub use decode::DecodeState;
pub use error::{ReformerError, Result};
pub use evaluate::{EvalOptions, Evaluation};
pub use generate::{generate, generate_with_stats, GenerateStats, SampleOptions};
pub use model::{param_specs, ReformerLm};
pub use optim::{AdamConfig, LrSchedule};
pub use reformer_reversible::StepContext;
pub use train::{StepStats, Trainer};
