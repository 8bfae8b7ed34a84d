//! Adam's hyper-parameters and per-element update (with bias correction and a clipping factor
//! folded in), and the learning-rate schedule (linear warmup, then cosine decay). The moments
//! live on the model's backend ([`crate::model::ReformerLm::adam_update`]); every backend's
//! update op applies [`AdamCoefficients::apply`]'s formula.

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

/// What one update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateStats {
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

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
        use crate::backend::{AdamHp, Backend, CpuBackend};
        let b = CpuBackend::new(&reformer_engine::MemoryPool::unlimited());
        let cfg = AdamConfig::default();
        let mut w = b.upload(&[3], &[1.0, -2.0, 3.0]).unwrap();
        let (mut m, mut v) = (b.zeros(&[3]).unwrap(), b.zeros(&[3]).unwrap());
        for step in 1..=300 {
            // loss = ½‖w‖², grad = w
            let wv = b.download(&w).unwrap();
            let mut g = b.upload(&[3], &wv).unwrap();
            let norm = (b.sum_squares(&[&g]).unwrap().sqrt()) as f32;
            let clip = match cfg.clip_norm {
                Some(max) if norm > max => max / norm,
                _ => 1.0,
            };
            let hp = AdamHp {
                lr: 0.05,
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                step,
                clip,
            };
            b.adam_update(&mut w, &mut g, &mut m, &mut v, &hp).unwrap();
        }
        let w = b.download(&w).unwrap();
        assert!(w.iter().all(|w| w.abs() < 0.05), "{w:?}");
    }
}
