//! `elementwise.cu`: fill, scale, add, axpy, relu forward/backward, f32 <-> bf16 casts, row dot
//! products. Element counts are the buffers' own lengths; operands must match exactly.

use cudarc::driver::PushKernelArg;
use half::bf16;

use crate::error::KernelsError;
use crate::gpu::launch::{exactly, grid_stride, need, to_i32, to_i64, warp_per_row};
use crate::gpu::ops::launch_error;
use crate::gpu::{ActElem, DeviceBuffer, GpuContext};
use crate::sources::{names::elementwise as k, KernelFamily};

const FAMILY: KernelFamily = KernelFamily::Elementwise;

/// `x[i] = value`.
pub fn fill(ctx: &GpuContext, x: &mut DeviceBuffer<f32>, value: f32) -> Result<(), KernelsError> {
    let Some(cfg) = grid_stride(x.len()) else {
        return Ok(());
    };
    let n = to_i64("ew_fill", "n", x.len())?;
    let f = ctx.function(FAMILY, k::FILL)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.cu_mut()).arg(&value).arg(&n);
    // SAFETY: ew_fill(float*, float, long long) writes x[0..n), n = x.len().
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::FILL, e))?;
    Ok(())
}

/// `y = alpha · x`.
pub fn scale(
    ctx: &GpuContext,
    x: &DeviceBuffer<f32>,
    alpha: f32,
    y: &mut DeviceBuffer<f32>,
) -> Result<(), KernelsError> {
    exactly("ew_scale", "y", y.len(), x.len())?;
    let Some(cfg) = grid_stride(x.len()) else {
        return Ok(());
    };
    let n = to_i64("ew_scale", "n", x.len())?;
    let f = ctx.function(FAMILY, k::SCALE)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.cu()).arg(&alpha).arg(y.cu_mut()).arg(&n);
    // SAFETY: ew_scale(const float*, float, float*, long long) touches x, y [0..n), both n long.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::SCALE, e))?;
    Ok(())
}

/// `x = alpha · x`.
pub fn scale_in_place(
    ctx: &GpuContext,
    x: &mut DeviceBuffer<f32>,
    alpha: f32,
) -> Result<(), KernelsError> {
    let Some(cfg) = grid_stride(x.len()) else {
        return Ok(());
    };
    let n = to_i64("ew_scale", "n", x.len())?;
    let f = ctx.function(FAMILY, k::SCALE)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.cu()).arg(&alpha).arg(x.cu()).arg(&n);
    // SAFETY: ew_scale allows y == x (each element read then written by one thread); n = x.len().
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::SCALE, e))?;
    Ok(())
}

/// `y = a + b`.
pub fn add(
    ctx: &GpuContext,
    a: &DeviceBuffer<f32>,
    b_in: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
) -> Result<(), KernelsError> {
    exactly("ew_add", "b", b_in.len(), a.len())?;
    exactly("ew_add", "y", y.len(), a.len())?;
    let Some(cfg) = grid_stride(a.len()) else {
        return Ok(());
    };
    let n = to_i64("ew_add", "n", a.len())?;
    let f = ctx.function(FAMILY, k::ADD)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(a.cu()).arg(b_in.cu()).arg(y.cu_mut()).arg(&n);
    // SAFETY: ew_add(const float*, const float*, float*, long long); all three hold n floats.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::ADD, e))?;
    Ok(())
}

/// `y += alpha · x`.
pub fn axpy(
    ctx: &GpuContext,
    alpha: f32,
    x: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
) -> Result<(), KernelsError> {
    exactly("ew_axpy", "y", y.len(), x.len())?;
    let Some(cfg) = grid_stride(x.len()) else {
        return Ok(());
    };
    let n = to_i64("ew_axpy", "n", x.len())?;
    let f = ctx.function(FAMILY, k::AXPY)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(&alpha).arg(x.cu()).arg(y.cu_mut()).arg(&n);
    // SAFETY: ew_axpy(float, const float*, float*, long long); x and y are distinct n-float buffers.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::AXPY, e))?;
    Ok(())
}

/// `y = max(x, 0)`.
pub fn relu_forward(
    ctx: &GpuContext,
    x: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
) -> Result<(), KernelsError> {
    exactly("ew_relu_fwd", "y", y.len(), x.len())?;
    let Some(cfg) = grid_stride(x.len()) else {
        return Ok(());
    };
    let n = to_i64("ew_relu_fwd", "n", x.len())?;
    let f = ctx.function(FAMILY, k::RELU_FWD)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.cu()).arg(y.cu_mut()).arg(&n);
    // SAFETY: ew_relu_fwd(const float*, float*, long long); x and y hold n floats.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::RELU_FWD, e))?;
    Ok(())
}

/// `dx (+)= x > 0 ? dy : 0` (`x`: the relu's input).
pub fn relu_backward(
    ctx: &GpuContext,
    x: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<f32>,
    dx: &mut DeviceBuffer<f32>,
    accumulate: bool,
) -> Result<(), KernelsError> {
    exactly("ew_relu_bwd", "dy", dy.len(), x.len())?;
    exactly("ew_relu_bwd", "dx", dx.len(), x.len())?;
    let Some(cfg) = grid_stride(x.len()) else {
        return Ok(());
    };
    let n = to_i64("ew_relu_bwd", "n", x.len())?;
    let acc = i32::from(accumulate);
    let f = ctx.function(FAMILY, k::RELU_BWD)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.cu())
        .arg(dy.cu())
        .arg(dx.cu_mut())
        .arg(&n)
        .arg(&acc);
    // SAFETY: ew_relu_bwd(const float*, const float*, float*, long long, int); all hold n floats.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::RELU_BWD, e))?;
    Ok(())
}

/// `y = bf16(x)` (round to nearest even).
pub fn f32_to_bf16(
    ctx: &GpuContext,
    x: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<bf16>,
) -> Result<(), KernelsError> {
    exactly("ew_f32_to_bf16", "y", y.len(), x.len())?;
    let Some(cfg) = grid_stride(x.len()) else {
        return Ok(());
    };
    let n = to_i64("ew_f32_to_bf16", "n", x.len())?;
    let f = ctx.function(FAMILY, k::F32_TO_BF16)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.cu()).arg(y.cu_mut()).arg(&n);
    // SAFETY: ew_f32_to_bf16(const float*, unsigned short*, long long) (bf16 bits); x holds n
    // floats, y n bf16.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::F32_TO_BF16, e))?;
    Ok(())
}

/// `y = f32(x)` (exact).
pub fn bf16_to_f32(
    ctx: &GpuContext,
    x: &DeviceBuffer<bf16>,
    y: &mut DeviceBuffer<f32>,
) -> Result<(), KernelsError> {
    exactly("ew_bf16_to_f32", "y", y.len(), x.len())?;
    let Some(cfg) = grid_stride(x.len()) else {
        return Ok(());
    };
    let n = to_i64("ew_bf16_to_f32", "n", x.len())?;
    let f = ctx.function(FAMILY, k::BF16_TO_F32)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.cu()).arg(y.cu_mut()).arg(&n);
    // SAFETY: ew_bf16_to_f32(const unsigned short*, float*, long long) (bf16 bits); x holds n
    // bf16, y n floats.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::BF16_TO_F32, e))?;
    Ok(())
}

/// `x[r, :] /= sqrt(|x[r, :]|² + 1e-12)` in place for `rows` rows of `cols` (unit keys; the
/// CPU twin is `reformer_lsh::keys::normalize_rows_in_place`).
pub fn unit_rows(
    ctx: &GpuContext,
    x: &mut DeviceBuffer<f32>,
    rows: usize,
    cols: usize,
) -> Result<(), KernelsError> {
    const OP: &str = "ew_unit_rows";
    need(OP, "x", x.len(), crate::gpu::launch::mul(OP, rows, cols)?)?;
    let Some(cfg) = warp_per_row(OP, rows)? else {
        return Ok(());
    };
    let (rows, cols) = (to_i64(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
    let f = ctx.function(FAMILY, k::UNIT_ROWS)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.cu_mut()).arg(&rows).arg(&cols);
    // SAFETY: ew_unit_rows(float* x, long long rows, int cols): x holds rows·cols floats
    // (checked above); each warp reads and writes its own row.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::UNIT_ROWS, e))?;
    Ok(())
}

/// `out[r] = Σ_c a[r, c] · b[r, c]` for `rows` rows of `cols`. `a` and `b` are f32 or bf16
/// (widened on load); the products and sums are f32, `out` is f32.
pub fn row_dot<T: ActElem>(
    ctx: &GpuContext,
    a: &DeviceBuffer<T>,
    b_in: &DeviceBuffer<T>,
    out: &mut DeviceBuffer<f32>,
    rows: usize,
    cols: usize,
) -> Result<(), KernelsError> {
    const OP: &str = "ew_row_dot";
    let n = crate::gpu::launch::mul(OP, rows, cols)?;
    need(OP, "a", a.len(), n)?;
    need(OP, "b", b_in.len(), n)?;
    need(OP, "out", out.len(), rows)?;
    let Some(cfg) = warp_per_row(OP, rows)? else {
        return Ok(());
    };
    let (rows, cols) = (to_i64(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
    let act_bf16 = i32::from(T::IS_BF16);
    let f = ctx.function(FAMILY, k::ROW_DOT)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(a.cu())
        .arg(b_in.cu())
        .arg(out.cu_mut())
        .arg(&rows)
        .arg(&cols)
        .arg(&act_bf16);
    // SAFETY: ew_row_dot(const void* a, const void* b, float* out, long long rows, int cols, int
    // act_bf16): a and b are T buffers (bf16 exactly when act_bf16 = 1, else f32) holding
    // rows·cols elements, out holds rows floats (checked above).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::ROW_DOT, e))?;
    Ok(())
}
