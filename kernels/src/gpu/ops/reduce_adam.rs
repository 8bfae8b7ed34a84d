//! `reduce_adam.cu`: deterministic two-stage sums (of values, of squares — the global gradient
//! norm) and the Adam(W) update, which can read the squared gradient norm on the device and
//! clip by it without a host round trip.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::error::KernelsError;
use crate::gpu::launch::{exactly, grid_stride, invalid, need, to_i64, NULL_DEVICE_PTR};
use crate::gpu::ops::launch_error;
use crate::gpu::{DeviceBuffer, GpuContext};
use crate::sources::{names::reduce_adam as k, KernelFamily};

const FAMILY: KernelFamily = KernelFamily::ReduceAdam;

/// Threads per block of the partial sums and of the final reduction.
pub const REDUCE_THREADS: u32 = 256;
/// Most partial sums (blocks) per tensor: fixed, so the summation order is reproducible.
pub const MAX_PARTIALS: usize = 1024;

/// The partial-sum launch over `n` elements: always at least one block (which writes 0 for an
/// empty tensor).
pub fn partial_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(REDUCE_THREADS as usize).clamp(1, MAX_PARTIALS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn reduce_tensors(
    ctx: &GpuContext,
    kernel: &'static str,
    tensors: &[&DeviceBuffer<f32>],
    out: &mut DeviceBuffer<f32>,
) -> Result<(), KernelsError> {
    need(kernel, "out", out.len(), 1)?;
    if tensors.is_empty() {
        return crate::gpu::ops::elementwise::fill(ctx, out, 0.0);
    }
    let mut partials = ctx.alloc::<f32>(MAX_PARTIALS)?;
    for (i, x) in tensors.iter().enumerate() {
        let cfg = partial_config(x.len());
        let n = to_i64(kernel, "n", x.len())?;
        let f = ctx.function(FAMILY, kernel)?;
        let mut b = ctx.stream().launch_builder(&f);
        b.arg(x.cu()).arg(&n).arg(partials.cu_mut());
        // SAFETY: sum(_squares)_partial(const float* x, long long n, float* partials): reads
        // x[0..n), writes partials[0..gridDim.x), gridDim.x ≤ MAX_PARTIALS = partials.len().
        unsafe { b.launch(cfg) }.map_err(|e| launch_error(kernel, e))?;

        let n_partials = cfg.grid_dim.0 as i32;
        let acc = i32::from(i > 0);
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = ctx.function(FAMILY, k::REDUCE_PARTIALS)?;
        let mut b = ctx.stream().launch_builder(&f);
        b.arg(partials.cu())
            .arg(&n_partials)
            .arg(out.cu_mut())
            .arg(&acc);
        // SAFETY: reduce_partials(const float*, int n_partials, float* out, int acc): reads the
        // n_partials just written, writes out[0] (out holds at least one float).
        unsafe { b.launch(one) }.map_err(|e| launch_error(k::REDUCE_PARTIALS, e))?;
    }
    Ok(())
}

/// `out[0] = Σ_tensors Σ_i x_i²` (the squared global gradient norm), in a fixed order.
pub fn sum_squares(
    ctx: &GpuContext,
    tensors: &[&DeviceBuffer<f32>],
    out: &mut DeviceBuffer<f32>,
) -> Result<(), KernelsError> {
    reduce_tensors(ctx, k::SUM_SQUARES_PARTIAL, tensors, out)
}

/// `out[0] = Σ_i x_i`, in a fixed order.
pub fn sum(
    ctx: &GpuContext,
    x: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<f32>,
) -> Result<(), KernelsError> {
    reduce_tensors(ctx, k::SUM_PARTIAL, &[x], out)
}

/// Adam(W) hyper-parameters of one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (0: plain Adam).
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (≤ 0: no clipping); needs the squared norm.
    pub max_norm: f32,
    /// 1-based update count (bias correction).
    pub step: u32,
}

impl AdamStep {
    pub fn check(&self) -> Result<(), KernelsError> {
        const OP: &str = "adam_update";
        if self.step == 0 || self.step > i32::MAX as u32 {
            return Err(invalid(
                OP,
                format!("step {} (1-based, fits an int)", self.step),
            ));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err(invalid(
                OP,
                format!("betas ({}, {}) outside [0, 1)", self.beta1, self.beta2),
            ));
        }
        if !(self.lr.is_finite() && self.eps.is_finite() && self.weight_decay.is_finite()) {
            return Err(invalid(OP, "non-finite lr, eps or weight decay"));
        }
        Ok(())
    }
}

/// One Adam step on `param` from `grad`, updating the moments `m`, `v`:
/// `g = clip·grad`, `m = β1 m + (1−β1) g`, `v = β2 v + (1−β2) g²`,
/// `param −= lr·((m/(1−β1^t)) / (sqrt(v/(1−β2^t)) + eps) + wd·param)`, with
/// `clip = norm > max_norm ? max_norm / norm : 1`, `norm = sqrt(grad_sumsq[0])` when
/// `grad_sumsq` is given (e.g. from [`sum_squares`] over every gradient).
pub fn adam_update(
    ctx: &GpuContext,
    param: &mut DeviceBuffer<f32>,
    grad: &DeviceBuffer<f32>,
    m: &mut DeviceBuffer<f32>,
    v: &mut DeviceBuffer<f32>,
    hp: &AdamStep,
    grad_sumsq: Option<&DeviceBuffer<f32>>,
) -> Result<(), KernelsError> {
    const OP: &str = "adam_update";
    hp.check()?;
    let n = param.len();
    exactly(OP, "grad", grad.len(), n)?;
    exactly(OP, "m", m.len(), n)?;
    exactly(OP, "v", v.len(), n)?;
    if let Some(s) = grad_sumsq {
        need(OP, "grad_sumsq", s.len(), 1)?;
    }
    let Some(cfg) = grid_stride(n) else {
        return Ok(());
    };
    let n = to_i64(OP, "n", n)?;
    let step = hp.step as i32;
    let f = ctx.function(FAMILY, k::ADAM_UPDATE)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(param.cu_mut())
        .arg(grad.cu())
        .arg(m.cu_mut())
        .arg(v.cu_mut())
        .arg(&n);
    b.arg(&hp.lr)
        .arg(&hp.beta1)
        .arg(&hp.beta2)
        .arg(&hp.eps)
        .arg(&hp.weight_decay)
        .arg(&step);
    match grad_sumsq {
        Some(s) => b.arg(s.cu()),
        None => b.arg(&NULL_DEVICE_PTR),
    };
    b.arg(&hp.max_norm);
    // SAFETY: adam_update(param, grad, m, v, long long n, float lr, b1, b2, eps, wd, int step,
    // const float* grad_sumsq|null, float max_norm): the four buffers hold n floats, grad_sumsq ≥ 1.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::ADAM_UPDATE, e))?;
    Ok(())
}
