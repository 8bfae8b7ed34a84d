//! `rows.cu`: the row-wise helpers of the device model — strided 2-D copies (scaled, optionally
//! accumulating), bias addition, deterministic column sums, in-place ReLU and its backward mask,
//! and inverted dropout that replays the CPU generator (`reformer_engine::Rng`, as used by
//! `reformer_reversible::Dropout::apply`) bit for bit.
//!
//! Buffers may be longer than a call uses: every wrapper checks with [`need`] that the elements
//! it touches exist. Offsets and leading dimensions are in elements.
//!
//! [`host`] holds pure-Rust twins of every wrapper, on slices, that need no GPU. They compute
//! exactly what the kernels compute — same operations, same rounding (the kernels use explicit
//! round-to-nearest intrinsics, never fused multiply-adds), same order of addition — so a
//! wrapper's result equals its twin's bit for bit.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::error::KernelsError;
use crate::gpu::launch::{
    column_threads, grid, grid_stride, invalid, mul, need, to_i32, to_i64, GRID_STRIDE_THREADS,
    MAX_GRID_YZ, NULL_DEVICE_PTR,
};
use crate::gpu::ops::launch_error;
use crate::gpu::{ActElem, DeviceBuffer, GpuContext};
use crate::sources::{names::rows as k, KernelFamily};

const FAMILY: KernelFamily = KernelFamily::Rows;

/// A 2-D view into a buffer: element `(r, c)` lives at `offset + r·ld + c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strided {
    pub offset: usize,
    pub ld: usize,
}

impl Strided {
    pub fn new(offset: usize, ld: usize) -> Self {
        Self { offset, ld }
    }

    /// One past the last element a `rows × cols` view touches (`rows`, `cols` > 0), after
    /// checking `ld ≥ cols` when there is more than one row.
    fn end(
        &self,
        op: &'static str,
        what: &str,
        rows: usize,
        cols: usize,
    ) -> Result<usize, KernelsError> {
        if rows > 1 && self.ld < cols {
            return Err(invalid(
                op,
                format!("{what}: leading dimension {} < {cols} columns", self.ld),
            ));
        }
        mul(op, rows - 1, self.ld)?
            .checked_add(self.offset)
            .and_then(|v| v.checked_add(cols))
            .ok_or_else(|| {
                invalid(
                    op,
                    format!("{what}: {self:?} over {rows} × {cols} overflows"),
                )
            })
    }
}

/// Most row parts of the column sums (pass 1 writes `parts × cols` partial sums).
pub const COLUMN_SUM_MAX_PARTS: usize = 256;
/// Fewest rows per part of the column sums.
pub const COLUMN_SUM_MIN_ROWS_PER_PART: usize = 32;

/// `(n_parts, rows_per_part)` of the column sums over `rows` rows: a function of `rows` alone,
/// so the order of addition (and the result) is reproducible. `(0, _)` for no rows.
pub fn column_sum_parts(rows: usize) -> (usize, usize) {
    if rows == 0 {
        return (0, COLUMN_SUM_MIN_ROWS_PER_PART);
    }
    let per = rows
        .div_ceil(COLUMN_SUM_MAX_PARTS)
        .max(COLUMN_SUM_MIN_ROWS_PER_PART);
    (rows.div_ceil(per), per)
}

/// The launch of the 2-D kernels over `rows × cols` (both > 0): block `(tx, 256/tx)` with `tx`
/// whole warps across the columns, grid-stride in both dimensions.
fn tile_config(op: &'static str, rows: usize, cols: usize) -> Result<LaunchConfig, KernelsError> {
    let tx = column_threads(cols);
    let ty = GRID_STRIDE_THREADS / tx;
    let gx = (cols as u64).div_ceil(tx as u64).min(MAX_GRID_YZ);
    let gy = (rows as u64).div_ceil(ty as u64).min(MAX_GRID_YZ);
    grid(op, gx, gy, (tx, ty, 1))
}

/// Threads per block of the dropout kernel (2 warps; each warp owns 32 rows).
const DROPOUT_THREADS: u32 = 64;

/// `dst(r, c) = (accumulate ? dst(r, c) : 0) + alpha · src(r, c)` for `r < rows`, `c < cols`.
/// (Not accumulating writes `alpha · src(r, c)`, so a copy with `alpha = 1` keeps `−0`.)
///
/// `src` and `dst` are each f32 or bf16 ([`ActElem`]; offsets and leading dimensions in
/// elements). The arithmetic is f32 on the widened values — `alpha · src` rounded, then added to
/// the widened `dst` when accumulating — and a bf16 `dst` stores the result rounded to nearest
/// even: equal bit for bit to [`host::copy2d`].
#[allow(clippy::too_many_arguments)]
pub fn copy2d<S: ActElem, D: ActElem>(
    ctx: &GpuContext,
    src: &DeviceBuffer<S>,
    s: Strided,
    dst: &mut DeviceBuffer<D>,
    d: Strided,
    rows: usize,
    cols: usize,
    alpha: f32,
    accumulate: bool,
) -> Result<(), KernelsError> {
    const OP: &str = k::COPY2D;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let s_end = s.end(OP, "src", rows, cols)?;
    let d_end = d.end(OP, "dst", rows, cols)?;
    need(OP, "src", src.len(), s_end)?;
    need(OP, "dst", dst.len(), d_end)?;
    to_i64(OP, "src end", s_end)?;
    to_i64(OP, "dst end", d_end)?;
    let cfg = tile_config(OP, rows, cols)?;
    let (s_off, s_ld) = (to_i64(OP, "offset", s.offset)?, to_i64(OP, "ld", s.ld)?);
    let (d_off, d_ld) = (to_i64(OP, "offset", d.offset)?, to_i64(OP, "ld", d.ld)?);
    let (rows_i, cols_i) = (to_i64(OP, "rows", rows)?, to_i64(OP, "cols", cols)?);
    let acc = i32::from(accumulate);
    let (src_bf16, dst_bf16) = (i32::from(S::IS_BF16), i32::from(D::IS_BF16));
    let f = ctx.function(FAMILY, k::COPY2D)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(src.cu()).arg(&s_off).arg(&s_ld);
    b.arg(dst.cu_mut()).arg(&d_off).arg(&d_ld);
    b.arg(&rows_i).arg(&cols_i).arg(&alpha).arg(&acc);
    b.arg(&src_bf16).arg(&dst_bf16);
    // SAFETY: rows_copy2d(const void* src, long long, long long, void* dst, long long, long long,
    // long long, long long, float, int, int src_bf16, int dst_bf16) touches element
    // offset + r·ld + c, r < rows, c < cols, of each buffer — elements of 2 bytes exactly when
    // its flag is 1 (S, D bf16), else 4 (f32): below the checked ends (≤ the buffers' lengths).
    // src and dst are distinct buffers (one is borrowed shared, the other exclusively).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::COPY2D, e))?;
    Ok(())
}

/// `x[r, c] += bias[c]` over `rows × cols` (row-major, contiguous).
pub fn add_bias(
    ctx: &GpuContext,
    x: &mut DeviceBuffer<f32>,
    bias: &DeviceBuffer<f32>,
    rows: usize,
    cols: usize,
) -> Result<(), KernelsError> {
    const OP: &str = k::ADD_BIAS;
    let n = mul(OP, rows, cols)?;
    need(OP, "x", x.len(), n)?;
    need(OP, "bias", bias.len(), cols)?;
    if n == 0 {
        return Ok(());
    }
    to_i64(OP, "rows·cols", n)?;
    let cfg = tile_config(OP, rows, cols)?;
    let (rows_i, cols_i) = (to_i64(OP, "rows", rows)?, to_i64(OP, "cols", cols)?);
    let f = ctx.function(FAMILY, k::ADD_BIAS)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.cu_mut()).arg(bias.cu()).arg(&rows_i).arg(&cols_i);
    // SAFETY: rows_add_bias(float*, const float*, long long, long long): x holds rows·cols,
    // bias cols (checked above).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::ADD_BIAS, e))?;
    Ok(())
}

/// `out[c] = (accumulate ? out[c] : 0) + Σ_r x[r, c]` for `c < cols`, over `rows × cols`
/// (row-major, contiguous). Summed in f64 in a fixed order (rows in parts of
/// [`column_sum_parts`], each part in row order, then the parts in order), rounded to f32 once,
/// then added to `out`: deterministic, and equal to [`host::column_sums`] bit for bit. Uses a
/// scratch of `parts · cols` f64 (at most 256 · cols · 8 bytes) from the context's pool.
pub fn column_sums(
    ctx: &GpuContext,
    x: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<f32>,
    rows: usize,
    cols: usize,
    accumulate: bool,
) -> Result<(), KernelsError> {
    const OP: &str = "rows column_sums";
    let n = mul(OP, rows, cols)?;
    need(OP, "x", x.len(), n)?;
    need(OP, "out", out.len(), cols)?;
    if cols == 0 {
        return Ok(());
    }
    to_i64(OP, "rows·cols", n)?;
    let (n_parts, per_part) = column_sum_parts(rows);
    let cols_i = to_i64(OP, "cols", cols)?;
    let acc = i32::from(accumulate);
    let n_parts_i = to_i32(OP, "parts", n_parts)?;

    // Pass 1: f64 partial sums, stored in an f32 buffer of twice the length (the pool holds no
    // f64 buffers; device allocations are 256-byte aligned, so the doubles are aligned).
    let scratch_len = mul(OP, mul(OP, n_parts, cols)?, 2)?;
    let mut parts = ctx.alloc::<f32>(scratch_len.max(1))?;
    if n_parts > 0 {
        let cfg = tile_config(OP, n_parts, cols)?;
        let rows_i = to_i64(OP, "rows", rows)?;
        let per_i = to_i64(OP, "rows per part", per_part)?;
        let f = ctx.function(FAMILY, k::COLUMN_SUMS_PARTS)?;
        let mut b = ctx.stream().launch_builder(&f);
        b.arg(x.cu())
            .arg(parts.cu_mut())
            .arg(&rows_i)
            .arg(&cols_i)
            .arg(&per_i);
        // SAFETY: rows_column_sums_parts(const float* x, double* parts, long long rows, long long
        // cols, long long rows_per_part): reads x[r·cols + c], r < rows (x holds rows·cols),
        // writes parts[p·cols + c] for p < ceil(rows / rows_per_part) = n_parts: n_parts·cols
        // doubles = scratch_len floats, which `parts` holds.
        unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::COLUMN_SUMS_PARTS, e))?;
    }
    // Pass 2: add the parts in order, round, (accumulate into) out.
    let cfg = grid_stride(cols).expect("cols > 0");
    let f = ctx.function(FAMILY, k::COLUMN_SUMS_FINISH)?;
    let mut b = ctx.stream().launch_builder(&f);
    if n_parts > 0 {
        b.arg(parts.cu());
    } else {
        b.arg(&NULL_DEVICE_PTR);
    }
    b.arg(out.cu_mut()).arg(&n_parts_i).arg(&cols_i).arg(&acc);
    // SAFETY: rows_column_sums_finish(const double* parts, float* out, int n_parts, long long
    // cols, int accumulate): reads parts[p·cols + c] for p < n_parts (written by pass 1 on the
    // same stream; not read when n_parts = 0), writes out[c], c < cols (out holds ≥ cols).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::COLUMN_SUMS_FINISH, e))?;
    // `parts` is freed stream-ordered when it drops here, after the launches above.
    Ok(())
}

/// `x[i] = max(x[i], 0)` for `i < n` (exactly: `x > 0 ? x : 0`, so NaN and `−0` become `+0`).
pub fn relu_in_place(
    ctx: &GpuContext,
    x: &mut DeviceBuffer<f32>,
    n: usize,
) -> Result<(), KernelsError> {
    const OP: &str = k::RELU;
    need(OP, "x", x.len(), n)?;
    let Some(cfg) = grid_stride(n) else {
        return Ok(());
    };
    let n_i = to_i64(OP, "n", n)?;
    let f = ctx.function(FAMILY, k::RELU)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.cu_mut()).arg(&n_i);
    // SAFETY: rows_relu(float*, long long) touches x[0..n); x holds at least n.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::RELU, e))?;
    Ok(())
}

/// `g[i] = h[i] > 0 ? g[i] : 0` for `i < n` (the ReLU backward in place; `h` is the ReLU's
/// output or input).
pub fn relu_mask_in_place(
    ctx: &GpuContext,
    h: &DeviceBuffer<f32>,
    g: &mut DeviceBuffer<f32>,
    n: usize,
) -> Result<(), KernelsError> {
    const OP: &str = k::RELU_MASK;
    need(OP, "h", h.len(), n)?;
    need(OP, "g", g.len(), n)?;
    let Some(cfg) = grid_stride(n) else {
        return Ok(());
    };
    let n_i = to_i64(OP, "n", n)?;
    let f = ctx.function(FAMILY, k::RELU_MASK)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(h.cu()).arg(g.cu_mut()).arg(&n_i);
    // SAFETY: rows_relu_mask(const float*, float*, long long) touches h, g [0..n); both hold at
    // least n and are distinct buffers.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::RELU_MASK, e))?;
    Ok(())
}

/// Inverted dropout of `rows × cols` (row-major, contiguous), replaying the CPU's masks bit for
/// bit: row `r` uses the generator `base.fork(first_row + r)` and draws one `uniform()` per
/// column in order; `x = u < rate ? 0 : x · (1/(1−rate))` (the scale computed in f32, as
/// `Dropout` does). `s0`, `s3` are words 0 and 3 of `base.state()`.
#[allow(clippy::too_many_arguments)]
pub fn dropout_rows(
    ctx: &GpuContext,
    x: &mut DeviceBuffer<f32>,
    rows: usize,
    cols: usize,
    first_row: u64,
    rate: f32,
    s0: u64,
    s3: u64,
) -> Result<(), KernelsError> {
    const OP: &str = k::DROPOUT;
    let n = mul(OP, rows, cols)?;
    need(OP, "x", x.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    to_i64(OP, "rows·cols", n)?;
    let scale = host::dropout_scale(rate);
    let rows_per_block = (DROPOUT_THREADS / 32) as u64 * 32;
    let blocks = (rows as u64).div_ceil(rows_per_block);
    let cfg = grid(OP, blocks, 1, (DROPOUT_THREADS, 1, 1))?;
    let (rows_i, cols_i) = (to_i64(OP, "rows", rows)?, to_i64(OP, "cols", cols)?);
    let f = ctx.function(FAMILY, k::DROPOUT)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.cu_mut()).arg(&rows_i).arg(&cols_i).arg(&first_row);
    b.arg(&rate).arg(&scale).arg(&s0).arg(&s3);
    // SAFETY: rows_dropout(float*, long long rows, long long cols, unsigned long long, float,
    // float, unsigned long long, unsigned long long) touches x[r·cols + c], r < rows, c < cols;
    // x holds at least rows·cols.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::DROPOUT, e))?;
    Ok(())
}

/// CPU twins of the wrappers, on slices: the same results bit for bit, no GPU needed. They
/// panic (like slice indexing) where the wrappers return an argument error.
pub mod host {
    use rayon::prelude::*;

    use super::{column_sum_parts, Strided};
    use crate::gpu::ActElem;

    /// Elements per parallel task of the element-wise twins (results do not depend on it: each
    /// element is computed alone).
    const PAR_BLOCK: usize = 1 << 14;

    /// The twin of [`super::copy2d`]: `dst(r, c) = narrow(accumulate ? widen(dst(r, c)) +
    /// alpha·widen(src(r, c)) : alpha·widen(src(r, c)))`, the product and the sum rounded in
    /// f32, a bf16 `dst` rounded to nearest even ([`ActElem::widen`], [`ActElem::narrow`]; both
    /// the identity for f32). (NaN inputs give NaN on both sides, but not necessarily the same
    /// payload: the device's arithmetic makes canonical NaNs.)
    #[allow(clippy::too_many_arguments)]
    pub fn copy2d<S: ActElem, D: ActElem>(
        src: &[S],
        s: Strided,
        dst: &mut [D],
        d: Strided,
        rows: usize,
        cols: usize,
        alpha: f32,
        accumulate: bool,
    ) {
        if cols == 0 || rows == 0 {
            return;
        }
        let row = |dr: &mut [D], sr: &[S]| {
            if accumulate {
                for (o, &x) in dr.iter_mut().zip(sr) {
                    *o = D::narrow(o.widen() + alpha * x.widen());
                }
            } else {
                for (o, &x) in dr.iter_mut().zip(sr) {
                    *o = D::narrow(alpha * x.widen());
                }
            }
        };
        let sv = &src[s.offset..];
        let dv = &mut dst[d.offset..];
        if rows == 1 {
            // One long row (a whole buffer): blocks of it in parallel.
            let (dr, sr) = (&mut dv[..cols], &sv[..cols]);
            dr.par_chunks_mut(PAR_BLOCK)
                .zip(sr.par_chunks(PAR_BLOCK))
                .for_each(|(o, x)| row(o, x));
        } else if rows * cols >= PAR_BLOCK && d.ld >= cols {
            // Rows in parallel: each row of `dst` is its own slice (rows do not overlap).
            dv[..(rows - 1) * d.ld + cols]
                .par_chunks_mut(d.ld)
                .enumerate()
                .for_each(|(r, dr)| row(&mut dr[..cols], &sv[r * s.ld..][..cols]));
        } else {
            for r in 0..rows {
                row(&mut dv[r * d.ld..][..cols], &sv[r * s.ld..][..cols]);
            }
        }
    }

    /// `x[r, c] += bias[c]`.
    pub fn add_bias(x: &mut [f32], bias: &[f32], rows: usize, cols: usize) {
        if cols == 0 {
            return;
        }
        let bias = &bias[..cols];
        x[..rows * cols]
            .par_chunks_mut(cols * (PAR_BLOCK / cols).max(1))
            .for_each(|block| {
                for row in block.chunks_exact_mut(cols) {
                    for (v, &b) in row.iter_mut().zip(bias) {
                        *v += b;
                    }
                }
            });
    }

    /// `out[c] = (accumulate ? out[c] : 0) + Σ_r x[r, c]`, in the kernels' order: f64 sums of
    /// each part of [`column_sum_parts`] rows, the parts added in order, rounded once.
    pub fn column_sums(x: &[f32], out: &mut [f32], rows: usize, cols: usize, accumulate: bool) {
        if cols == 0 {
            return;
        }
        let x = &x[..rows * cols];
        let (_, per) = column_sum_parts(rows);
        // Blocks of columns in parallel; each column's sums keep the kernel's order.
        const COLS: usize = 16;
        out[..cols]
            .par_chunks_mut(COLS)
            .enumerate()
            .for_each(|(cb, out)| {
                let c0 = cb * COLS;
                let w = out.len();
                let mut total = [0.0f64; COLS];
                let mut part = [0.0f64; COLS];
                for block in x.chunks(per * cols) {
                    part.fill(0.0);
                    for row in block.chunks_exact(cols) {
                        for (p, &v) in part.iter_mut().zip(&row[c0..c0 + w]) {
                            *p += v as f64;
                        }
                    }
                    for (t, &p) in total.iter_mut().zip(&part) {
                        *t += p;
                    }
                }
                for (o, &t) in out.iter_mut().zip(&total) {
                    let t = t as f32;
                    *o = if accumulate { *o + t } else { t };
                }
            });
    }

    /// `x[i] = x[i] > 0 ? x[i] : 0` for `i < n`.
    pub fn relu_in_place(x: &mut [f32], n: usize) {
        x[..n].par_chunks_mut(PAR_BLOCK).for_each(|x| {
            for v in x {
                *v = if *v > 0.0 { *v } else { 0.0 };
            }
        });
    }

    /// `g[i] = h[i] > 0 ? g[i] : 0` for `i < n`.
    pub fn relu_mask_in_place(h: &[f32], g: &mut [f32], n: usize) {
        g[..n]
            .par_chunks_mut(PAR_BLOCK)
            .zip(h[..n].par_chunks(PAR_BLOCK))
            .for_each(|(g, h)| {
                for (g, &h) in g.iter_mut().zip(h) {
                    *g = if h > 0.0 { *g } else { 0.0 };
                }
            });
    }

    /// `1 / (1 − rate)` in f32, as `reformer_reversible::Dropout` computes it.
    pub fn dropout_scale(rate: f32) -> f32 {
        1.0 / (1.0 - rate)
    }

    fn splitmix64(x: &mut u64) -> u64 {
        *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The state of `base.fork(label)` from words 0 and 3 of `base`'s state.
    fn fork_state(s0: u64, s3: u64, label: u64) -> [u64; 4] {
        let mut x = s0 ^ label.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ s3;
        let mut seed = splitmix64(&mut x);
        [
            splitmix64(&mut seed),
            splitmix64(&mut seed),
            splitmix64(&mut seed),
            splitmix64(&mut seed),
        ]
    }

    fn next_u64(s: &mut [u64; 4]) -> u64 {
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    fn uniform(s: &mut [u64; 4]) -> f32 {
        (next_u64(s) >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Inverted dropout of `rows × cols`, replaying `Dropout::apply` bit for bit.
    #[allow(clippy::too_many_arguments)]
    pub fn dropout_rows(
        x: &mut [f32],
        rows: usize,
        cols: usize,
        first_row: u64,
        rate: f32,
        s0: u64,
        s3: u64,
    ) {
        if cols == 0 {
            return;
        }
        let scale = dropout_scale(rate);
        x[..rows * cols]
            .par_chunks_exact_mut(cols)
            .enumerate()
            .for_each(|(r, row)| {
                let mut s = fork_state(s0, s3, first_row.wrapping_add(r as u64));
                for v in row {
                    *v = if uniform(&mut s) < rate {
                        0.0
                    } else {
                        *v * scale
                    };
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_sum_parts_cover_every_row_once() {
        for rows in [1, 31, 32, 33, 1000, 8192, 8193, 1 << 19] {
            let (parts, per) = column_sum_parts(rows);
            assert!(parts <= COLUMN_SUM_MAX_PARTS, "{rows}");
            assert!(per >= COLUMN_SUM_MIN_ROWS_PER_PART, "{rows}");
            assert!(parts * per >= rows && (parts - 1) * per < rows, "{rows}");
        }
        assert_eq!(column_sum_parts(0).0, 0);
    }

    #[test]
    fn strided_end_checks_ld_and_overflow() {
        let s = Strided::new(3, 10);
        assert_eq!(s.end("t", "s", 4, 7).unwrap(), 3 + 30 + 7);
        assert_eq!(Strided::new(0, 2).end("t", "s", 1, 7).unwrap(), 7);
        assert!(Strided::new(0, 6).end("t", "s", 2, 7).is_err());
        assert!(Strided::new(1, usize::MAX).end("t", "s", 3, 1).is_err());
    }

    #[test]
    fn tile_config_stays_within_limits() {
        let cfg = tile_config("t", 1 << 20, 4096).unwrap();
        assert_eq!(cfg.block_dim, (256, 1, 1));
        assert_eq!(cfg.grid_dim, (16, MAX_GRID_YZ as u32, 1));
        let cfg = tile_config("t", 10, 1).unwrap();
        assert_eq!(cfg.block_dim, (32, 8, 1));
        assert_eq!(cfg.grid_dim, (1, 2, 1));
    }

    #[test]
    fn host_copy2d_respects_offsets_and_accumulates() {
        let src: Vec<f32> = (0..20).map(|v| v as f32).collect();
        let mut dst = vec![1.0f32; 12];
        host::copy2d(
            &src,
            Strided::new(1, 5),
            &mut dst,
            Strided::new(2, 4),
            2,
            2,
            2.0,
            true,
        );
        assert_eq!(
            dst,
            [1.0, 1.0, 3.0, 5.0, 1.0, 1.0, 13.0, 15.0, 1.0, 1.0, 1.0, 1.0]
        );
    }

    #[test]
    fn host_copy2d_to_bf16_rounds_to_nearest_even_like_the_kernel() {
        use half::bf16;
        // (f32 bits in, bf16 bits out) of a copy with alpha = 1: the kernel's float_to_bf16_bits.
        let cases: &[(u32, u16)] = &[
            (0x3F80_0000, 0x3F80), // 1.0, exact
            (0x3F80_8000, 0x3F80), // tie, even upper half: stays
            (0x3F81_8000, 0x3F82), // tie, odd upper half: up to even
            (0x3F80_8001, 0x3F81), // past the tie: up
            (0x3F80_7FFF, 0x3F80), // below the tie: down
            (0xBF81_8000, 0xBF82), // negative tie: magnitude to even
            (0x8000_0000, 0x8000), // -0 stays -0
            (0x7F7F_FFFF, 0x7F80), // f32::MAX rounds to +inf
            (0xFF80_0000, 0xFF80), // -inf
            (0x0000_8001, 0x0001), // subnormal, rounds up
            (0x7F80_0001, 0x7FC0), // signalling NaN: upper bits, quiet bit set
            (0x7FC0_0000, 0x7FC0), // quiet NaN
        ];
        let src: Vec<f32> = cases.iter().map(|&(b, _)| f32::from_bits(b)).collect();
        let mut dst = vec![bf16::from_bits(0x1234); cases.len() + 1];
        let n = cases.len();
        host::copy2d(
            &src,
            Strided::new(0, n),
            &mut dst,
            Strided::new(1, n),
            1,
            n,
            1.0,
            false,
        );
        assert_eq!(dst[0].to_bits(), 0x1234, "outside the extent");
        for (i, &(x, want)) in cases.iter().enumerate() {
            assert_eq!(
                dst[i + 1].to_bits(),
                want,
                "{x:#010x} -> {:#06x}, want {want:#06x}",
                dst[i + 1].to_bits()
            );
            assert_eq!(
                bf16::from_f32(f32::from_bits(x)).to_bits(),
                want,
                "half agrees"
            );
        }

        // Accumulating: dst widened, alpha·src rounded in f32, the f32 sum rounded once.
        let src = [1.5f32, -3.0, 1e-3];
        let mut dst = [
            bf16::from_f32(2.0),
            bf16::from_f32(0.5),
            bf16::from_f32(1.0),
        ];
        host::copy2d(
            &src,
            Strided::new(0, 1),
            &mut dst,
            Strided::new(0, 1),
            3,
            1,
            0.5,
            true,
        );
        let want = [2.0f32 + 0.75, 0.5 - 1.5, 1.0 + 0.5 * 1e-3].map(bf16::from_f32);
        assert_eq!(dst.map(|v| v.to_bits()), want.map(|v| v.to_bits()));
    }

    #[test]
    fn host_copy2d_is_the_f32_formula_for_f32_and_widens_bf16_exactly() {
        use half::bf16;
        let src: Vec<f32> = (0..40).map(|i| (i as f32 - 17.3) * 0.37).collect();
        let s = Strided::new(3, 9);
        let d = Strided::new(1, 8);
        for accumulate in [false, true] {
            let mut a: Vec<f32> = (0..40).map(|i| i as f32 * 0.11).collect();
            let mut b = a.clone();
            // The f32 formula, written out.
            for r in 0..4 {
                for c in 0..6 {
                    let v = -1.25 * src[3 + 9 * r + c];
                    let o = &mut a[1 + 8 * r + c];
                    *o = if accumulate { *o + v } else { v };
                }
            }
            host::copy2d(&src, s, &mut b, d, 4, 6, -1.25, accumulate);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        // bf16 -> f32: the widened values, scaled in f32.
        let src16: Vec<bf16> = src.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut out = vec![0.0f32; 40];
        host::copy2d(&src16, s, &mut out, d, 4, 6, 2.0, false);
        for r in 0..4 {
            for c in 0..6 {
                let want = 2.0 * src16[3 + 9 * r + c].to_f32();
                assert_eq!(out[1 + 8 * r + c].to_bits(), want.to_bits());
            }
        }
    }
}
