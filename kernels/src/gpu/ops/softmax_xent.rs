//! `softmax_xent.cu`: cross-entropy over rows of logits `[rows, vocab]` (one chunk of positions
//! of the chunked LM loss). A target `>= vocab` ([`IGNORE`]) marks an ignored row.

use cudarc::driver::PushKernelArg;

use crate::error::KernelsError;
use crate::gpu::launch::{grid_stride, invalid, mul, need, to_i32, to_i64, warp_per_row};
use crate::gpu::ops::launch_error;
use crate::gpu::{DeviceBuffer, GpuContext};
use crate::sources::{names::softmax_xent as k, KernelFamily};

const FAMILY: KernelFamily = KernelFamily::SoftmaxXent;

/// The target of an ignored row (loss 0, gradient 0).
pub const IGNORE: u32 = u32::MAX;

/// Checks the buffers of a loss over `rows × vocab`.
pub fn check(
    op: &'static str,
    rows: usize,
    vocab: usize,
    logits: usize,
    targets: usize,
    per_row: &[(&str, usize)],
) -> Result<(), KernelsError> {
    if vocab == 0 {
        return Err(invalid(op, "vocab = 0"));
    }
    need(op, "logits", logits, mul(op, rows, vocab)?)?;
    need(op, "targets", targets, rows)?;
    for &(what, len) in per_row {
        need(op, what, len, rows)?;
    }
    to_i64(op, "rows", rows)?;
    to_i32(op, "vocab", vocab)?;
    Ok(())
}

/// `lse[r] = log Σ_c exp(logits[r, c])`, `loss[r] = lse[r] − logits[r, target[r]]`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    ctx: &GpuContext,
    logits: &DeviceBuffer<f32>,
    targets: &DeviceBuffer<u32>,
    loss: &mut DeviceBuffer<f32>,
    lse: &mut DeviceBuffer<f32>,
    rows: usize,
    vocab: usize,
) -> Result<(), KernelsError> {
    const OP: &str = "xent_fwd";
    check(
        OP,
        rows,
        vocab,
        logits.len(),
        targets.len(),
        &[("loss", loss.len()), ("lse", lse.len())],
    )?;
    let Some(cfg) = warp_per_row(OP, rows)? else {
        return Ok(());
    };
    let (rows, vocab) = (to_i64(OP, "rows", rows)?, to_i32(OP, "vocab", vocab)?);
    let f = ctx.function(FAMILY, k::FWD)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(logits.cu())
        .arg(targets.cu())
        .arg(loss.cu_mut())
        .arg(lse.cu_mut());
    b.arg(&rows).arg(&vocab);
    // SAFETY: xent_fwd(logits, targets, loss, lse, long long rows, int vocab): logits hold
    // rows·vocab, the others rows (checked); a target >= vocab is never used as an index.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::FWD, e))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn backward_impl(
    ctx: &GpuContext,
    logits: &DeviceBuffer<f32>,
    targets: &DeviceBuffer<u32>,
    lse: &DeviceBuffer<f32>,
    dlogits: Option<&mut DeviceBuffer<f32>>,
    rows: usize,
    vocab: usize,
    scale: f32,
) -> Result<(), KernelsError> {
    const OP: &str = "xent_bwd";
    check(
        OP,
        rows,
        vocab,
        logits.len(),
        targets.len(),
        &[("lse", lse.len())],
    )?;
    let n = rows * vocab;
    if let Some(d) = &dlogits {
        need(OP, "dlogits", d.len(), n)?;
    }
    let Some(cfg) = grid_stride(n) else {
        return Ok(());
    };
    let (rows, vocab) = (to_i64(OP, "rows", rows)?, to_i32(OP, "vocab", vocab)?);
    let f = ctx.function(FAMILY, k::BWD)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(logits.cu()).arg(targets.cu()).arg(lse.cu());
    match dlogits {
        Some(d) => b.arg(d.cu_mut()),
        None => b.arg(logits.cu()),
    };
    b.arg(&rows).arg(&vocab).arg(&scale);
    // SAFETY: xent_bwd(logits, targets, lse, dlogits, long long rows, int vocab, float scale):
    // each thread reads then writes one element, so dlogits may be logits; sizes checked above.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::BWD, e))?;
    Ok(())
}

/// `dlogits = scale · (softmax(logits) − onehot(target))`; zero rows for ignored targets.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    ctx: &GpuContext,
    logits: &DeviceBuffer<f32>,
    targets: &DeviceBuffer<u32>,
    lse: &DeviceBuffer<f32>,
    dlogits: &mut DeviceBuffer<f32>,
    rows: usize,
    vocab: usize,
    scale: f32,
) -> Result<(), KernelsError> {
    backward_impl(ctx, logits, targets, lse, Some(dlogits), rows, vocab, scale)
}

/// [`backward`] writing the gradient over the logits themselves.
pub fn backward_in_place(
    ctx: &GpuContext,
    logits: &mut DeviceBuffer<f32>,
    targets: &DeviceBuffer<u32>,
    lse: &DeviceBuffer<f32>,
    rows: usize,
    vocab: usize,
    scale: f32,
) -> Result<(), KernelsError> {
    backward_impl(ctx, logits, targets, lse, None, rows, vocab, scale)
}
