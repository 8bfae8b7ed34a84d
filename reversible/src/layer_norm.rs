//! Layer norm over the last dimension with a learned gain and bias. The forward keeps
//! nothing; the backward recomputes each row's mean and inverse deviation from its input.

use reformer_engine::{MemoryPool, Tensor};

use crate::error::{shape_err, Result};
use crate::linear::COL_BLOCK;
use crate::par::for_rows;
use crate::params::{HasParams, Param};

/// Added to the variance.
pub const LN_EPS: f32 = 1e-6;

#[derive(Debug)]
pub struct LayerNorm {
    pub gamma: Param,
    pub beta: Param,
    dim: usize,
}

/// Mean and `1/sqrt(var + eps)` of one row (two passes).
#[inline]
pub fn row_stats(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + LN_EPS).sqrt())
}

/// `y = (x − mean)·rstd·g + b` for one row.
#[inline]
pub fn normalize_row(x: &[f32], mean: f32, rstd: f32, g: &[f32], b: &[f32], y: &mut [f32]) {
    for j in 0..x.len() {
        y[j] = (x[j] - mean) * rstd * g[j] + b[j];
    }
}

/// Adds one row's input gradient to `dx`: with `dxhat = dy·g`,
/// `dx += rstd·(dxhat − mean(dxhat) − xhat·mean(dxhat·xhat))`.
#[inline]
pub fn backward_row_add(x: &[f32], dy: &[f32], g: &[f32], mean: f32, rstd: f32, dx: &mut [f32]) {
    let dim = x.len();
    let (mut s1, mut s2) = (0.0f32, 0.0f32);
    for j in 0..dim {
        let dxh = dy[j] * g[j];
        s1 += dxh;
        s2 += dxh * (x[j] - mean) * rstd;
    }
    let (m1, m2) = (s1 / dim as f32, s2 / dim as f32);
    for j in 0..dim {
        let xhat = (x[j] - mean) * rstd;
        dx[j] += rstd * (dy[j] * g[j] - m1 - xhat * m2);
    }
}

impl LayerNorm {
    /// Gain 1 and bias 0, named `{prefix}.gamma` and `{prefix}.beta`.
    pub fn new(pool: &MemoryPool, prefix: &str, dim: usize) -> Result<Self> {
        Ok(Self {
            gamma: Param::full(pool, format!("{prefix}.gamma"), &[dim], 1.0)?,
            beta: Param::full(pool, format!("{prefix}.beta"), &[dim], 0.0)?,
            dim,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    fn check_rows(&self, op: &'static str, len: usize) -> Result<usize> {
        if len.checked_rem(self.dim) != Some(0) {
            return Err(shape_err(op, &[len], &[0, self.dim]));
        }
        Ok(len / self.dim)
    }

    /// `y = LN(x)` for the rows of `x` (`rows × dim`, flat); `y` is overwritten.
    pub fn forward_rows(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.check_rows("layer norm input", x.len())?;
        if y.len() != x.len() {
            return Err(shape_err("layer norm output", &[y.len()], &[x.len()]));
        }
        let (g, b, dim) = (self.gamma.value.data(), self.beta.value.data(), self.dim);
        let n = x.len();
        for_rows(y, dim, n, |r, y| {
            let x = &x[r * dim..(r + 1) * dim];
            let (mean, rstd) = row_stats(x);
            normalize_row(x, mean, rstd, g, b, y);
        });
        Ok(())
    }

    /// `LN(x)` of a `[.., dim]` tensor, from `x`'s pool.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.zeros_like()?;
        self.forward_rows(x.data(), y.data_mut())?;
        Ok(y)
    }

    /// Adds the gradient w.r.t. `x` to `dx` and accumulates the gain and bias gradients, for
    /// the rows of `x` with output gradient `dy`. Scratch (two floats per row) comes from
    /// `pool`.
    pub fn backward_rows(
        &mut self,
        pool: &MemoryPool,
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
    ) -> Result<()> {
        let rows = self.check_rows("layer norm backward input", x.len())?;
        for (op, t) in [("layer norm dy", dy.len()), ("layer norm dx", dx.len())] {
            if t != x.len() {
                return Err(shape_err(op, &[t], &[x.len()]));
            }
        }
        let (dim, n) = (self.dim, x.len());
        let mut stats = pool.alloc::<f32>(2 * rows)?;
        for_rows(&mut stats, 2, n, |r, st| {
            (st[0], st[1]) = row_stats(&x[r * dim..(r + 1) * dim]);
        });
        let (g, stats) = (self.gamma.value.data(), &stats[..]);
        for_rows(dx, dim, n, |r, dx| {
            let (x, dy) = (&x[r * dim..(r + 1) * dim], &dy[r * dim..(r + 1) * dim]);
            backward_row_add(x, dy, g, stats[2 * r], stats[2 * r + 1], dx);
        });
        // Gain and bias gradients: column sums in f64, a block of columns per task, into
        // `[gain block, bias block]` pairs.
        let mut sums = pool.alloc::<f32>(2 * dim.div_ceil(COL_BLOCK) * COL_BLOCK)?;
        for_rows(&mut sums, 2 * COL_BLOCK, n, |cb, out| {
            let c0 = cb * COL_BLOCK;
            let cols = COL_BLOCK.min(dim - c0);
            let (mut ag, mut ab) = ([0.0f64; COL_BLOCK], [0.0f64; COL_BLOCK]);
            for r in 0..rows {
                let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
                let (xr, dyr) = (&x[r * dim + c0..], &dy[r * dim + c0..]);
                for j in 0..cols {
                    ag[j] += (dyr[j] * (xr[j] - mean) * rstd) as f64;
                    ab[j] += dyr[j] as f64;
                }
            }
            for j in 0..cols {
                out[j] = ag[j] as f32;
                out[COL_BLOCK + j] = ab[j] as f32;
            }
        });
        let (dg, db) = (self.gamma.grad.data_mut(), self.beta.grad.data_mut());
        for j in 0..dim {
            let (cb, k) = (j / COL_BLOCK, j % COL_BLOCK);
            dg[j] += sums[cb * 2 * COL_BLOCK + k];
            db[j] += sums[cb * 2 * COL_BLOCK + COL_BLOCK + k];
        }
        Ok(())
    }

    /// Tensor form of [`LayerNorm::backward_rows`]: adds into `dx`.
    pub fn backward(&mut self, x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        dy.expect_shape("layer norm dy", x.shape())?;
        dx.expect_shape("layer norm dx", x.shape())?;
        let pool = x.pool().clone();
        self.backward_rows(&pool, x.data(), dy.data(), dx.data_mut())
    }
}

impl HasParams for LayerNorm {
    fn params(&self) -> Vec<&Param> {
        vec![&self.gamma, &self.beta]
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        vec![&mut self.gamma, &mut self.beta]
    }
}
