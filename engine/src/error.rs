use thiserror::Error;

/// Errors of the tensor engine. Each names the problem and what to do about it.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum EngineError {
    #[error("shape mismatch in {op}: got {got:?}, expected {expected:?}")]
    ShapeMismatch {
        op: &'static str,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(
        "memory budget exceeded: requested {requested} bytes with {live} bytes live, budget {budget} bytes; \
         lower the sequence length or batch, or raise the budget"
    )]
    OutOfMemory {
        requested: usize,
        live: usize,
        budget: usize,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the CUDA backend is unavailable: {0}; running on the CPU instead")]
    CudaUnavailable(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;
