//! Layer normalisation over the last dimension, forward and backward, for the LM head
//! (width `2·d_model`). The backward recomputes the row statistics from the input.

use rayon::prelude::*;
use reformer_engine::MemoryPool;

use crate::error::Result;
use crate::param::{param_full, HasParams, Param};

/// Variance epsilon.
pub const LN_EPS: f32 = 1e-6;

/// `y = (x − mean) / sqrt(var + eps) · gamma + beta`, per row.
#[derive(Debug)]
pub struct LayerNorm {
    pub gamma: Param,
    pub beta: Param,
    width: usize,
}

fn row_stats(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + LN_EPS).sqrt())
}

impl LayerNorm {
    pub fn new(pool: &MemoryPool, name: &str, width: usize) -> Result<Self> {
        Ok(Self {
            gamma: param_full(pool, &format!("{name}.gamma"), &[width], 1.0)?,
            beta: param_full(pool, &format!("{name}.beta"), &[width], 0.0)?,
            width,
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Normalises each row of `x` (`rows × width`) into `y`.
    pub fn forward(&self, x: &[f32], y: &mut [f32]) {
        let (g, b) = (self.gamma.value.data(), self.beta.value.data());
        y.par_chunks_mut(self.width)
            .zip(x.par_chunks(self.width))
            .for_each(|(y, x)| {
                let (mean, rstd) = row_stats(x);
                for j in 0..x.len() {
                    y[j] = (x[j] - mean) * rstd * g[j] + b[j];
                }
            });
    }

    /// Given the forward input `x` and `dy`, writes `dx` and accumulates the gradients of
    /// gamma and beta.
    pub fn backward(&mut self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let w = self.width;
        let g = self.gamma.value.data();
        dx.par_chunks_mut(w)
            .zip(x.par_chunks(w).zip(dy.par_chunks(w)))
            .for_each(|(dx, (x, dy))| {
                let (mean, rstd) = row_stats(x);
                let mut sum_d = 0.0f32;
                let mut sum_dx = 0.0f32;
                for j in 0..w {
                    let xhat = (x[j] - mean) * rstd;
                    let d = dy[j] * g[j];
                    sum_d += d;
                    sum_dx += d * xhat;
                }
                let (mean_d, mean_dx) = (sum_d / w as f32, sum_dx / w as f32);
                for j in 0..w {
                    let xhat = (x[j] - mean) * rstd;
                    dx[j] = rstd * (dy[j] * g[j] - mean_d - xhat * mean_dx);
                }
            });
        // Parameter gradients: a serial pass, so the sum order is fixed.
        let dg = self.gamma.grad.data_mut();
        let db = self.beta.grad.data_mut();
        for (x, dy) in x.chunks(w).zip(dy.chunks(w)) {
            let (mean, rstd) = row_stats(x);
            for j in 0..w {
                dg[j] += dy[j] * (x[j] - mean) * rstd;
                db[j] += dy[j];
            }
        }
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
