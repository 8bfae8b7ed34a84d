//! The tensor engine: f32 tensors with shapes, a memory pool that counts live and peak bytes
//! and refuses to pass a budget, a seeded RNG, and the CPU ops (rayon + `gemm`).
//!
//! Every allocation goes through a [`MemoryPool`]; outputs of an op are drawn from the pool of
//! its inputs, so a pool's peak is the peak of everything a computation held at once.

pub mod dtype;
pub mod error;
pub mod huge_pages;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod rng;
pub mod tensor;

pub use dtype::DType;
pub use error::{EngineError, Result};
pub use pool::{Buffer, Hold, MemoryPool};
pub use rng::Rng;
pub use tensor::Tensor;
