//! Adam with bias correction, a learning-rate schedule (linear warmup, then cosine decay) and
//! gradient clipping by global norm. The optimizer's moments are tensors from the pool, one
//! pair per parameter, in the model's parameter order.
//!
//! Every sum here has a fixed order (fixed-size blocks, combined serially), so a step is
//! bit-for-bit reproducible on the CPU whatever the thread count.

use rayon::prelude::*;
use reformer_engine::Tensor;

use crate::error::{ReformerError, Result};
use crate::param::Param;

/// Adam hyper-parameters. Defaults: the Reformer reference config for Crime and Punishment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Clip the gradient's global L2 norm to this value (`None`: no clipping).
    pub clip_norm: Option<f32>,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            beta1: 0.86,
            beta2: 0.92,
            eps: 1e-9,
            clip_norm: Some(1.0),
        }
    }
}

/// Linear warmup from `lr/warmup` to `lr` over `warmup` steps, then cosine decay to
/// `lr · final_fraction` at `total_steps` (constant after).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub lr: f32,
    pub warmup: u64,
    pub total_steps: u64,
    pub final_fraction: f32,
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self {
            lr: 0.01,
            warmup: 100,
            total_steps: 10_000,
            final_fraction: 0.1,
        }
    }
}

impl LrSchedule {
    /// Learning rate of the update with 0-based index `step`.
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.lr * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        let f = self.final_fraction as f64;
        (self.lr as f64 * (f + (1.0 - f) * cos)) as f32
    }
}

/// Adam's state: first and second moments per parameter, and the number of updates made.
/// The constants of one Adam update: clipping factor, betas, bias-corrected step size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamCoefficients {
    clip: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    /// `lr / (1 − β1^t)`.
    step_size: f32,
    /// `1 / sqrt(1 − β2^t)`.
    rc2: f32,
}

impl AdamCoefficients {
    /// Update `step` (1-based) at learning rate `lr`, the gradient scaled by `clip` first.
    pub fn new(cfg: &AdamConfig, lr: f32, step: u64, clip: f32) -> Self {
        let t = step.min(i32::MAX as u64) as i32;
        let c1 = 1.0 - (cfg.beta1 as f64).powi(t);
        let c2 = 1.0 - (cfg.beta2 as f64).powi(t);
        Self {
            clip,
            b1: cfg.beta1,
            b2: cfg.beta2,
            eps: cfg.eps,
            step_size: (lr as f64 / c1) as f32,
            rc2: (1.0 / c2.sqrt()) as f32,
        }
    }

    /// The update of one block of a parameter `w` from its gradient `g` and moments `m`, `v`.
    pub fn apply(&self, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        for i in 0..w.len() {
            let g = g[i] * self.clip;
            m[i] = self.b1 * m[i] + (1.0 - self.b1) * g;
            v[i] = self.b2 * v[i] + (1.0 - self.b2) * g * g;
            w[i] -= self.step_size * m[i] / (v[i].sqrt() * self.rc2 + self.eps);
        }
    }
}

#[derive(Debug)]
pub struct Adam {
    pub cfg: AdamConfig,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub step: u64,
}

/// What one update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateStats {
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
}

const BLOCK: usize = 1 << 14;

/// `Σ x²` in f64 with a fixed summation order.
fn sum_squares(x: &[f32]) -> f64 {
    let partial: Vec<f64> = x
        .par_chunks(BLOCK)
        .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>())
        .collect();
    partial.iter().sum()
}

/// The global L2 norm of all gradients.
pub fn global_grad_norm(params: &[&mut Param]) -> f32 {
    params
        .iter()
        .map(|p| sum_squares(p.grad.data()))
        .sum::<f64>()
        .sqrt() as f32
}

impl Adam {
    /// Zero moments shaped like `params` (from each parameter's pool).
    pub fn new(cfg: AdamConfig, params: &[&Param]) -> Result<Self> {
        let mut m = Vec::with_capacity(params.len());
        let mut v = Vec::with_capacity(params.len());
        for p in params {
            m.push(p.value.zeros_like()?);
            v.push(p.value.zeros_like()?);
        }
        Ok(Self { cfg, m, v, step: 0 })
    }

    /// One update of `params` from their gradients with learning rate `lr`: clips by global
    /// norm (if configured), then Adam with bias correction. A non-finite gradient norm is an
    /// error and leaves the parameters untouched.
    pub fn update(&mut self, params: &mut [&mut Param], lr: f32) -> Result<UpdateStats> {
        if params.len() != self.m.len() {
            return Err(ReformerError::InvalidArgument(format!(
                "optimizer holds state for {} parameters, got {}",
                self.m.len(),
                params.len()
            )));
        }
        for (p, m) in params.iter().zip(&self.m) {
            if p.value.shape() != m.shape() || p.grad.shape() != m.shape() {
                return Err(ReformerError::InvalidArgument(format!(
                    "parameter {} has shape {:?}, optimizer state {:?}",
                    p.name,
                    p.value.shape(),
                    m.shape()
                )));
            }
        }
        let grad_norm = global_grad_norm(params);
        if !grad_norm.is_finite() {
            return Err(ReformerError::NonFinite {
                what: "gradient norm",
                value: grad_norm,
                step: self.step,
            });
        }
        let clip = match self.cfg.clip_norm {
            Some(max) if grad_norm > max => max / grad_norm,
            _ => 1.0,
        };
        self.step += 1;
        let k = AdamCoefficients::new(&self.cfg, lr, self.step, clip);
        for ((p, m), v) in params.iter_mut().zip(&mut self.m).zip(&mut self.v) {
            let Param { value, grad, .. } = &mut **p;
            value
                .data_mut()
                .par_chunks_mut(BLOCK)
                .zip(grad.data().par_chunks(BLOCK))
                .zip(m.data_mut().par_chunks_mut(BLOCK))
                .zip(v.data_mut().par_chunks_mut(BLOCK))
                .for_each(|(((w, g), m), v)| k.apply(w, g, m, v));
        }
        Ok(UpdateStats { lr, grad_norm })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reformer_engine::MemoryPool;

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = LrSchedule {
            lr: 0.01,
            warmup: 10,
            total_steps: 110,
            final_fraction: 0.1,
        };
        assert!((s.lr_at(0) - 0.001).abs() < 1e-9);
        assert!((s.lr_at(9) - 0.01).abs() < 1e-9);
        assert!((s.lr_at(10) - 0.01).abs() < 1e-9);
        assert!((s.lr_at(60) - 0.0055).abs() < 1e-6);
        assert!((s.lr_at(110) - 0.001).abs() < 1e-9);
        assert!((s.lr_at(1000) - 0.001).abs() < 1e-9);
    }

    #[test]
    fn adam_minimises_a_quadratic_and_clips() {
        let pool = MemoryPool::unlimited();
        let mut p = Param {
            name: "w".into(),
            value: Tensor::from_vec(&pool, &[3], vec![1.0, -2.0, 3.0]).unwrap(),
            grad: Tensor::zeros(&pool, &[3]).unwrap(),
        };
        let mut adam = Adam::new(AdamConfig::default(), &[&p]).unwrap();
        for _ in 0..300 {
            // loss = ½‖w‖², grad = w
            let w = p.value.to_vec();
            p.grad.data_mut().copy_from_slice(&w);
            adam.update(&mut [&mut p], 0.05).unwrap();
        }
        assert!(
            p.value.data().iter().all(|w| w.abs() < 0.05),
            "{:?}",
            p.value.data()
        );
        assert_eq!(adam.step, 300);
        p.grad.data_mut().copy_from_slice(&[f32::NAN, 0.0, 0.0]);
        assert!(matches!(
            adam.update(&mut [&mut p], 0.05),
            Err(ReformerError::NonFinite { .. })
        ));
    }
}
