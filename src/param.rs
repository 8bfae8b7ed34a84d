//! Parameter containers shared with the reversible stack, and helpers over them.

pub use reformer_reversible::{HasParams, Param};

use reformer_engine::{MemoryPool, Rng, Tensor};

use crate::error::Result;

/// A parameter of `shape` with Gaussian entries of standard deviation `std` (zeros for
/// `std == 0`) and a zero gradient, both from `pool`.
pub fn param_randn(
    pool: &MemoryPool,
    name: &str,
    shape: &[usize],
    std: f32,
    rng: &mut Rng,
) -> Result<Param> {
    let value = if std == 0.0 {
        Tensor::zeros(pool, shape)?
    } else {
        Tensor::randn(pool, shape, std, rng)?
    };
    let grad = Tensor::zeros(pool, shape)?;
    Ok(Param {
        name: name.to_string(),
        value,
        grad,
    })
}

/// A parameter filled with `value`, with a zero gradient.
pub fn param_full(pool: &MemoryPool, name: &str, shape: &[usize], value: f32) -> Result<Param> {
    Ok(Param {
        name: name.to_string(),
        value: Tensor::full(pool, shape, value)?,
        grad: Tensor::zeros(pool, shape)?,
    })
}
