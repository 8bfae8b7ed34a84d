//! Errors of the reversible crate: the engine's and the attention crate's, plus configuration
//! problems of a layer.

use reformer_engine::EngineError;
use reformer_lsh::AttentionError;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ReversibleError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Attention(#[from] AttentionError),
    #[error("invalid layer configuration: {0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, ReversibleError>;
