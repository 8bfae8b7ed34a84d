//! Dense row-major f32 tensors whose storage is counted by a [`MemoryPool`].

use crate::error::{EngineError, Result};
use crate::matmul::{self, Par};
use crate::pool::{Buffer, MemoryPool};
use crate::rng::Rng;

#[derive(Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    buf: Buffer<f32>,
}

fn numel(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d)
            .ok_or_else(|| EngineError::InvalidArgument(format!("shape {shape:?} overflows")))
    })
}

impl Tensor {
    pub fn zeros(pool: &MemoryPool, shape: &[usize]) -> Result<Self> {
        Ok(Self {
            shape: shape.to_vec(),
            buf: pool.alloc(numel(shape)?)?,
        })
    }

    pub fn full(pool: &MemoryPool, shape: &[usize], value: f32) -> Result<Self> {
        let mut t = Self::zeros(pool, shape)?;
        t.data_mut().fill(value);
        Ok(t)
    }

    pub fn from_vec(pool: &MemoryPool, shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let n = numel(shape)?;
        if n != data.len() {
            return Err(EngineError::ShapeMismatch {
                op: "from_vec",
                got: vec![data.len()],
                expected: vec![n],
            });
        }
        Ok(Self {
            shape: shape.to_vec(),
            buf: pool.adopt(data)?,
        })
    }

    /// Gaussian entries with standard deviation `std`.
    pub fn randn(pool: &MemoryPool, shape: &[usize], std: f32, rng: &mut Rng) -> Result<Self> {
        let mut t = Self::zeros(pool, shape)?;
        rng.fill_normal(t.data_mut(), std);
        Ok(t)
    }

    /// A zero tensor of the same shape, from the same pool.
    pub fn zeros_like(&self) -> Result<Self> {
        Self::zeros(self.pool(), &self.shape)
    }

    pub fn try_clone(&self) -> Result<Self> {
        Ok(Self {
            shape: self.shape.clone(),
            buf: self.buf.try_clone()?,
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.buf.len()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.buf.len() * 4
    }

    pub fn pool(&self) -> &MemoryPool {
        self.buf.pool()
    }

    pub fn data(&self) -> &[f32] {
        &self.buf
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.buf
    }

    pub fn to_vec(&self) -> Vec<f32> {
        self.buf.to_vec()
    }

    /// Same data, new shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        if numel(shape)? != self.numel() {
            return Err(EngineError::ShapeMismatch {
                op: "reshape",
                got: shape.to_vec(),
                expected: self.shape.clone(),
            });
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Checks this tensor has exactly `shape`.
    pub fn expect_shape(&self, op: &'static str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(EngineError::ShapeMismatch {
                op,
                got: self.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(())
    }

    /// `[.., k] · [k, n] -> [.., n]` (the leading dimensions are flattened into rows).
    /// With `transpose_w` the weight is stored `[n, k]`.
    pub fn matmul(&self, w: &Tensor, transpose_w: bool) -> Result<Tensor> {
        let k = *self.shape.last().unwrap_or(&0);
        let (wk, n) = match (w.shape.as_slice(), transpose_w) {
            (&[a, b], false) => (a, b),
            (&[a, b], true) => (b, a),
            _ => {
                return Err(EngineError::ShapeMismatch {
                    op: "matmul (weight must be 2-d)",
                    got: w.shape.clone(),
                    expected: vec![k, 0],
                })
            }
        };
        if wk != k || self.rank() == 0 {
            return Err(EngineError::ShapeMismatch {
                op: "matmul",
                got: self.shape.clone(),
                expected: vec![wk],
            });
        }
        let m = self.numel() / k.max(1);
        let mut out_shape = self.shape.clone();
        *out_shape.last_mut().expect("rank checked above") = n;
        let mut out = Tensor::zeros(self.pool(), &out_shape)?;
        matmul::gemm(
            out.data_mut(),
            self.data(),
            w.data(),
            m,
            k,
            n,
            false,
            transpose_w,
            false,
            Par::Rayon,
        )?;
        Ok(out)
    }

    /// Largest absolute difference to `other` (shapes must agree).
    pub fn max_abs_diff(&self, other: &Tensor) -> Result<f32> {
        other.expect_shape("max_abs_diff", &self.shape)?;
        Ok(self
            .data()
            .iter()
            .zip(other.data())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max))
    }
}
