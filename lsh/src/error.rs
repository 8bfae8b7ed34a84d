use reformer_engine::EngineError;
use thiserror::Error;

/// Errors of the attention crate.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum AttentionError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("shape mismatch in {op}: got {got:?}, expected {expected:?}")]
    Shape {
        op: &'static str,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("invalid attention configuration: {0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, AttentionError>;

pub(crate) fn shape_err(op: &'static str, got: &[usize], expected: &[usize]) -> AttentionError {
    AttentionError::Shape {
        op,
        got: got.to_vec(),
        expected: expected.to_vec(),
    }
}
