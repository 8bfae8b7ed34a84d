//! `layer_norm.cu`: layer norm over the last dimension of a `[rows, cols]` tensor, forward
//! (keeping mean and rstd per row) and backward (dx per row; dgamma, dbeta as fixed partial sums
//! reduced in a fixed order: deterministic, no atomics).

use cudarc::driver::PushKernelArg;

use crate::error::KernelsError;
use crate::gpu::launch::{
    column_threads, grid, invalid, mul, need, to_i32, to_i64, warp_per_row, NULL_DEVICE_PTR,
};
use crate::gpu::ops::launch_error;
use crate::gpu::{DeviceBuffer, GpuContext};
use crate::sources::{names::layer_norm as k, KernelFamily};

const FAMILY: KernelFamily = KernelFamily::LayerNorm;

/// At most this many row parts in the parameter-gradient reduction.
pub const MAX_PARTS: usize = 1024;
/// At least this many rows per part.
pub const MIN_ROWS_PER_PART: usize = 32;

/// `(n_parts, rows_per_part)` of the parameter-gradient reduction over `rows` rows: a function
/// of `rows` alone, so the summation order (and the result) is reproducible.
pub fn param_parts(rows: usize) -> (usize, usize) {
    if rows == 0 {
        return (0, MIN_ROWS_PER_PART);
    }
    let per = rows.div_ceil(MAX_PARTS).max(MIN_ROWS_PER_PART);
    (rows.div_ceil(per), per)
}

/// Checks the buffers of a layer norm over `rows × cols`.
pub fn check(
    op: &'static str,
    rows: usize,
    cols: usize,
    x: usize,
    gamma: usize,
    y: usize,
    stats: &[(&str, usize)],
) -> Result<(), KernelsError> {
    if cols == 0 {
        return Err(invalid(op, "cols = 0"));
    }
    let n = mul(op, rows, cols)?;
    need(op, "x", x, n)?;
    need(op, "gamma/beta", gamma, cols)?;
    need(op, "output", y, n)?;
    for &(what, len) in stats {
        need(op, what, len, rows)?;
    }
    to_i64(op, "rows", rows)?;
    to_i32(op, "cols", cols)?;
    Ok(())
}

/// `y = (x − mean)·rstd·gamma + beta` per row, `rstd = 1/sqrt(var + eps)` (biased variance);
/// stores mean and rstd when given (the backward needs them).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    ctx: &GpuContext,
    x: &DeviceBuffer<f32>,
    gamma: &DeviceBuffer<f32>,
    beta: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
    mut stats: Option<(&mut DeviceBuffer<f32>, &mut DeviceBuffer<f32>)>,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<(), KernelsError> {
    const OP: &str = "layer_norm_fwd";
    let stat_lens: Vec<(&str, usize)> = match &stats {
        Some((m, r)) => vec![("mean", m.len()), ("rstd", r.len())],
        None => vec![],
    };
    check(
        OP,
        rows,
        cols,
        x.len(),
        gamma.len().min(beta.len()),
        y.len(),
        &stat_lens,
    )?;
    let Some(cfg) = warp_per_row(OP, rows)? else {
        return Ok(());
    };
    let (rows, cols) = (to_i64(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
    let f = ctx.function(FAMILY, k::FWD)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.cu()).arg(gamma.cu()).arg(beta.cu()).arg(y.cu_mut());
    match stats.as_mut() {
        Some((mean, rstd)) => b.arg(mean.cu_mut()).arg(rstd.cu_mut()),
        None => b.arg(&NULL_DEVICE_PTR).arg(&NULL_DEVICE_PTR),
    };
    b.arg(&rows).arg(&cols).arg(&eps);
    // SAFETY: layer_norm_fwd(x, gamma, beta, y, mean|null, rstd|null, long long rows, int cols,
    // float eps): x, y hold rows·cols, gamma, beta cols, mean, rstd rows (checked above).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::FWD, e))?;
    Ok(())
}

/// Buffers of the layer norm backward.
#[derive(Debug)]
pub struct LayerNormGrads<'a> {
    pub dx: &'a mut DeviceBuffer<f32>,
    pub dgamma: &'a mut DeviceBuffer<f32>,
    pub dbeta: &'a mut DeviceBuffer<f32>,
    /// Add into `dx` instead of overwriting it.
    pub accumulate_dx: bool,
    /// Add into `dgamma`, `dbeta` instead of overwriting them.
    pub accumulate_params: bool,
}

/// `dx = rstd·(g − mean(g) − xhat·mean(g·xhat))`, `g = dy·gamma`; `dgamma = Σ_rows dy·xhat`,
/// `dbeta = Σ_rows dy`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    ctx: &GpuContext,
    x: &DeviceBuffer<f32>,
    gamma: &DeviceBuffer<f32>,
    mean: &DeviceBuffer<f32>,
    rstd: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<f32>,
    grads: LayerNormGrads<'_>,
    rows: usize,
    cols: usize,
) -> Result<(), KernelsError> {
    const OP: &str = "layer_norm backward";
    check(
        OP,
        rows,
        cols,
        x.len().min(dy.len()),
        gamma.len().min(grads.dgamma.len()).min(grads.dbeta.len()),
        grads.dx.len(),
        &[("mean", mean.len()), ("rstd", rstd.len())],
    )?;
    let (n_parts, per_part) = param_parts(rows);
    let rows_i = to_i64(OP, "rows", rows)?;
    let cols_i = to_i32(OP, "cols", cols)?;

    if let Some(cfg) = warp_per_row(OP, rows)? {
        let acc = i32::from(grads.accumulate_dx);
        let f = ctx.function(FAMILY, k::BWD_DX)?;
        let mut b = ctx.stream().launch_builder(&f);
        b.arg(x.cu())
            .arg(gamma.cu())
            .arg(mean.cu())
            .arg(rstd.cu())
            .arg(dy.cu());
        b.arg(grads.dx.cu_mut()).arg(&rows_i).arg(&cols_i).arg(&acc);
        // SAFETY: layer_norm_bwd_dx(x, gamma, mean, rstd, dy, dx, long long, int, int): sizes
        // checked above (x, dy, dx rows·cols; gamma cols; mean, rstd rows).
        unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::BWD_DX, e))?;
    }

    let acc_p = i32::from(grads.accumulate_params);
    if n_parts == 0 {
        // No rows: the sums are zero.
        if !grads.accumulate_params {
            crate::gpu::ops::elementwise::fill(ctx, grads.dgamma, 0.0)?;
            crate::gpu::ops::elementwise::fill(ctx, grads.dbeta, 0.0)?;
        }
        return Ok(());
    }
    let part_len = mul(OP, n_parts, cols)?;
    let mut dgamma_parts = ctx.alloc::<f32>(part_len)?;
    let mut dbeta_parts = ctx.alloc::<f32>(part_len)?;
    let threads = column_threads(cols);
    let col_blocks = cols.div_ceil(threads as usize) as u64;
    let per_part_i = to_i64(OP, "rows per part", per_part)?;
    {
        let cfg = grid(OP, col_blocks, n_parts as u64, (threads, 1, 1))?;
        let f = ctx.function(FAMILY, k::BWD_PARAMS)?;
        let mut b = ctx.stream().launch_builder(&f);
        b.arg(x.cu()).arg(mean.cu()).arg(rstd.cu()).arg(dy.cu());
        b.arg(dgamma_parts.cu_mut()).arg(dbeta_parts.cu_mut());
        b.arg(&rows_i).arg(&cols_i).arg(&per_part_i);
        // SAFETY: layer_norm_bwd_params(x, mean, rstd, dy, dgamma_parts, dbeta_parts, long long
        // rows, int cols, long long rows_per_part): part p < n_parts reads rows below `rows` and
        // writes parts[p, 0..cols); parts hold n_parts·cols.
        unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::BWD_PARAMS, e))?;
    }
    let n_parts_i = to_i32(OP, "parts", n_parts)?;
    let cfg = grid(OP, col_blocks, 1, (threads, 1, 1))?;
    for (parts, out) in [
        (&dgamma_parts, &mut *grads.dgamma),
        (&dbeta_parts, &mut *grads.dbeta),
    ] {
        let f = ctx.function(FAMILY, k::REDUCE_PARTS)?;
        let mut b = ctx.stream().launch_builder(&f);
        b.arg(parts.cu())
            .arg(out.cu_mut())
            .arg(&n_parts_i)
            .arg(&cols_i)
            .arg(&acc_p);
        // SAFETY: layer_norm_reduce_parts(const float* parts, float* out, int n_parts, int cols,
        // int accumulate): parts hold n_parts·cols, out at least cols.
        unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::REDUCE_PARTS, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_every_row_once() {
        for rows in [1, 31, 32, 33, 1000, 32 * 1024, 32 * 1024 + 1, 1 << 19] {
            let (parts, per) = param_parts(rows);
            assert!(parts <= MAX_PARTS, "{rows}");
            assert!(parts * per >= rows && (parts - 1) * per < rows, "{rows}");
        }
        assert_eq!(param_parts(0).0, 0);
    }
}
