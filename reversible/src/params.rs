//! Named parameters with gradient buffers, and the trait that lists them.

use reformer_engine::{MemoryPool, Rng, Tensor};

use crate::error::Result;

/// A trainable tensor and its gradient (same shape). Backward passes add into `grad`; call
/// [`HasParams::zero_grad`] between steps.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub value: Tensor,
    pub grad: Tensor,
}

impl Param {
    /// Wraps `value`, with a zero gradient drawn from the same pool.
    pub fn new(name: impl Into<String>, value: Tensor) -> Result<Self> {
        let grad = value.zeros_like()?;
        Ok(Self {
            name: name.into(),
            value,
            grad,
        })
    }

    /// Gaussian entries with standard deviation `std`.
    pub fn randn(
        pool: &MemoryPool,
        name: impl Into<String>,
        shape: &[usize],
        std: f32,
        rng: &mut Rng,
    ) -> Result<Self> {
        Self::new(name, Tensor::randn(pool, shape, std, rng)?)
    }

    /// Every entry `value`.
    pub fn full(
        pool: &MemoryPool,
        name: impl Into<String>,
        shape: &[usize],
        value: f32,
    ) -> Result<Self> {
        Self::new(name, Tensor::full(pool, shape, value)?)
    }

    pub fn numel(&self) -> usize {
        self.value.numel()
    }

    /// Bytes of value and gradient together.
    pub fn size_in_bytes(&self) -> usize {
        self.value.size_in_bytes() + self.grad.size_in_bytes()
    }

    pub fn zero_grad(&mut self) {
        self.grad.data_mut().fill(0.0);
    }
}

/// Anything that owns parameters. Names are unique and stable (checkpoints key on them).
pub trait HasParams {
    fn params(&self) -> Vec<&Param>;
    fn params_mut(&mut self) -> Vec<&mut Param>;

    /// Sets every gradient to zero.
    fn zero_grad(&mut self) {
        for p in self.params_mut() {
            p.zero_grad();
        }
    }

    /// Number of scalar parameters.
    fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }

    /// Bytes of all values and gradients.
    fn param_bytes(&self) -> usize {
        self.params().iter().map(|p| p.size_in_bytes()).sum()
    }
}
