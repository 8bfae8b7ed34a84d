//! The error type of the `reformer` crate: one enum that names the problem, wrapping the
//! errors of the crates below (engine, attention, reversible layers) and those of the data
//! pipeline and checkpoints.

use thiserror::Error;

use crate::checkpoint::CheckpointError;
use crate::data::DataError;

/// Every fallible call of this crate returns this error.
#[derive(Debug, Error)]
pub enum ReformerError {
    #[error(transparent)]
    Engine(#[from] reformer_engine::EngineError),
    #[error(transparent)]
    Attention(#[from] reformer_lsh::AttentionError),
    #[error(transparent)]
    Reversible(#[from] reformer_reversible::ReversibleError),
    #[error(transparent)]
    Kernels(#[from] reformer_kernels::KernelsError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("unknown preset `{name}`; known presets: {known}")]
    UnknownPreset { name: String, known: String },
    #[error("sequence length {len} is outside what this model serves (1 ..= {max_len}, the axial table's capacity)")]
    Length { len: usize, max_len: usize },
    #[error("non-finite {what} ({value}) at step {step}")]
    NonFinite {
        what: &'static str,
        value: f32,
        step: u64,
    },
    #[error("decoding needs {needed} positions but its caches hold {capacity}: start decoding with a larger capacity (the model serves at most {max_len}), or keep only the last bytes of the context")]
    DecodeCapacity {
        needed: usize,
        capacity: usize,
        max_len: usize,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

pub type Result<T> = std::result::Result<T, ReformerError>;
