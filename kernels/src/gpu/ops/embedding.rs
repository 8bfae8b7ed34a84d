//! `embedding.cu`: token embedding (gather forward, deterministic scatter-add backward) and the
//! two-axis axial position embedding (concatenated per-axis tables).

use cudarc::driver::PushKernelArg;

use crate::error::KernelsError;
use crate::gpu::launch::{column_threads, grid, grid_stride, invalid, mul, need, to_i32, to_i64};
use crate::gpu::ops::launch_error;
use crate::gpu::{DeviceBuffer, GpuContext};
use crate::sources::{names::embedding as k, KernelFamily};

const FAMILY: KernelFamily = KernelFamily::Embedding;

/// Checks a token embedding over `n_tokens` tokens of a `[vocab, dim]` table.
pub fn check_tokens(
    op: &'static str,
    n_tokens: usize,
    dim: usize,
    vocab: usize,
    tokens: usize,
    table: usize,
    rows: usize,
) -> Result<(), KernelsError> {
    if dim == 0 || vocab == 0 {
        return Err(invalid(op, format!("dim = {dim}, vocab = {vocab}")));
    }
    need(op, "tokens", tokens, n_tokens)?;
    need(op, "table", table, mul(op, vocab, dim)?)?;
    need(op, "rows", rows, mul(op, n_tokens, dim)?)?;
    to_i64(op, "n_tokens", n_tokens)?;
    to_i32(op, "dim", dim)?;
    to_i32(op, "vocab", vocab)?;
    Ok(())
}

/// `out[i, :] (+)= table[tokens[i], :]`. A token `>= vocab` gives a zero row (the kernel never
/// indexes with it).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    ctx: &GpuContext,
    tokens: &DeviceBuffer<u32>,
    table: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<f32>,
    n_tokens: usize,
    dim: usize,
    vocab: usize,
    accumulate: bool,
) -> Result<(), KernelsError> {
    const OP: &str = "embedding_fwd";
    check_tokens(
        OP,
        n_tokens,
        dim,
        vocab,
        tokens.len(),
        table.len(),
        out.len(),
    )?;
    let Some(cfg) = grid_stride(n_tokens * dim) else {
        return Ok(());
    };
    let n = to_i64(OP, "n_tokens", n_tokens)?;
    let (dim, vocab) = (to_i32(OP, "dim", dim)?, to_i32(OP, "vocab", vocab)?);
    let acc = i32::from(accumulate);
    let f = ctx.function(FAMILY, k::FWD)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(tokens.cu()).arg(table.cu()).arg(out.cu_mut());
    b.arg(&n).arg(&dim).arg(&vocab).arg(&acc);
    // SAFETY: embedding_fwd(tokens, table, out, long long n, int dim, int vocab, int acc): tokens
    // hold n, table vocab·dim, out n·dim (checked); out-of-range tokens are not dereferenced.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::FWD, e))?;
    Ok(())
}

/// `dtable[v, :] (+)= Σ_{i: tokens[i] = v} dout[i, :]`, summed in order of `i` (deterministic).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    ctx: &GpuContext,
    tokens: &DeviceBuffer<u32>,
    dout: &DeviceBuffer<f32>,
    dtable: &mut DeviceBuffer<f32>,
    n_tokens: usize,
    dim: usize,
    vocab: usize,
    accumulate: bool,
) -> Result<(), KernelsError> {
    const OP: &str = "embedding_bwd";
    check_tokens(
        OP,
        n_tokens,
        dim,
        vocab,
        tokens.len(),
        dtable.len(),
        dout.len(),
    )?;
    let threads = column_threads(dim);
    let cfg = grid(
        OP,
        vocab as u64,
        dim.div_ceil(threads as usize) as u64,
        (threads, 1, 1),
    )?;
    let n = to_i64(OP, "n_tokens", n_tokens)?;
    let dim = to_i32(OP, "dim", dim)?;
    let acc = i32::from(accumulate);
    let f = ctx.function(FAMILY, k::BWD)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(tokens.cu()).arg(dout.cu()).arg(dtable.cu_mut());
    b.arg(&n).arg(&dim).arg(&acc);
    // SAFETY: embedding_bwd(tokens, dout, dtable, long long n, int dim, int acc), grid (vocab,
    // ceil(dim / threads)): block v writes dtable[v, c < dim]; dout holds n·dim (checked).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::BWD, e))?;
    Ok(())
}

/// A two-axis axial position table: position `p` is `(p / a2, p % a2)`, its embedding
/// `concat(e1[p / a2, 0..d1], e2[p % a2, 0..d2])`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AxialShape {
    pub a1: usize,
    pub a2: usize,
    pub d1: usize,
    pub d2: usize,
}

impl AxialShape {
    pub fn dim(&self) -> usize {
        self.d1 + self.d2
    }

    pub fn capacity(&self) -> usize {
        self.a1.saturating_mul(self.a2)
    }

    /// Checks the shape serves `n` positions and the buffers' sizes.
    pub fn check(
        &self,
        op: &'static str,
        n: usize,
        e1: usize,
        e2: usize,
        rows: usize,
    ) -> Result<(), KernelsError> {
        if self.a1 == 0 || self.a2 == 0 || self.dim() == 0 {
            return Err(invalid(op, format!("empty axial shape {self:?}")));
        }
        if n > self.capacity() {
            return Err(invalid(
                op,
                format!(
                    "{n} positions exceed the axial table's {} ({self:?})",
                    self.capacity()
                ),
            ));
        }
        need(op, "e1", e1, mul(op, self.a1, self.d1)?)?;
        need(op, "e2", e2, mul(op, self.a2, self.d2)?)?;
        need(op, "rows", rows, mul(op, n, self.dim())?)?;
        to_i64(op, "n", n)?;
        for (what, v) in [
            ("a1", self.a1),
            ("a2", self.a2),
            ("d1", self.d1),
            ("d2", self.d2),
        ] {
            to_i32(op, what, v)?;
        }
        to_i32(op, "d1 + d2", self.dim())?;
        Ok(())
    }
}

/// `out[i, :] (+)= concat(e1[p / a2, :], e2[p % a2, :])`, `p = first + i`, for `i < n`.
#[allow(clippy::too_many_arguments)]
pub fn axial_forward(
    ctx: &GpuContext,
    e1: &DeviceBuffer<f32>,
    e2: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<f32>,
    first: usize,
    n: usize,
    shape: AxialShape,
    accumulate: bool,
) -> Result<(), KernelsError> {
    const OP: &str = "axial_pos_fwd";
    let end = first
        .checked_add(n)
        .ok_or_else(|| invalid(OP, format!("positions {first} + {n}")))?;
    shape.check(OP, end, e1.len(), e2.len(), end * shape.dim())?;
    need(OP, "rows", out.len(), mul(OP, n, shape.dim())?)?;
    let Some(cfg) = grid_stride(n * shape.dim()) else {
        return Ok(());
    };
    let first = to_i64(OP, "first", first)?;
    let n = to_i64(OP, "n", n)?;
    let (a2, d1, d2) = (shape.a2 as i32, shape.d1 as i32, shape.d2 as i32);
    let acc = i32::from(accumulate);
    let f = ctx.function(FAMILY, k::AXIAL_FWD)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(e1.cu()).arg(e2.cu()).arg(out.cu_mut());
    b.arg(&first).arg(&n).arg(&a2).arg(&d1).arg(&d2).arg(&acc);
    // SAFETY: axial_pos_fwd(e1, e2, out, long long first, long long n, int a2, int d1, int d2,
    // int acc): first + n ≤ a1·a2 so every row index is below a1 (e1) or a2 (e2); out holds
    // n·(d1 + d2) (checked above).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::AXIAL_FWD, e))?;
    Ok(())
}

/// `de1[i1, :] (+)= Σ_{i2} dout[i1·a2 + i2, 0..d1]`, `de2[i2, :] (+)= Σ_{i1} dout[.., d1..]`
/// over positions `< n` (rows of the tables no position reaches get 0, or keep their value).
#[allow(clippy::too_many_arguments)]
pub fn axial_backward(
    ctx: &GpuContext,
    dout: &DeviceBuffer<f32>,
    de1: &mut DeviceBuffer<f32>,
    de2: &mut DeviceBuffer<f32>,
    n: usize,
    shape: AxialShape,
    accumulate: bool,
) -> Result<(), KernelsError> {
    const OP: &str = "axial_pos_bwd";
    shape.check(OP, n, de1.len(), de2.len(), dout.len())?;
    let n = to_i64(OP, "n", n)?;
    let (a1, a2, d1, d2) = (
        shape.a1 as i32,
        shape.a2 as i32,
        shape.d1 as i32,
        shape.d2 as i32,
    );
    let acc = i32::from(accumulate);
    if shape.d1 > 0 {
        let threads = column_threads(shape.d1);
        let cfg = grid(
            OP,
            shape.a1 as u64,
            shape.d1.div_ceil(threads as usize) as u64,
            (threads, 1, 1),
        )?;
        let f = ctx.function(FAMILY, k::AXIAL_BWD_FIRST)?;
        let mut b = ctx.stream().launch_builder(&f);
        b.arg(dout.cu()).arg(de1.cu_mut());
        b.arg(&n).arg(&a2).arg(&d1).arg(&d2).arg(&acc);
        // SAFETY: axial_pos_bwd_first(dout, de1, long long n, int a2, int d1, int d2, int acc),
        // grid (a1, ceil(d1 / threads)): writes de1[i1 < a1, c < d1], reads rows p < n of dout.
        unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::AXIAL_BWD_FIRST, e))?;
    }
    if shape.d2 > 0 {
        let threads = column_threads(shape.d2);
        let cfg = grid(
            OP,
            shape.a2 as u64,
            shape.d2.div_ceil(threads as usize) as u64,
            (threads, 1, 1),
        )?;
        let f = ctx.function(FAMILY, k::AXIAL_BWD_SECOND)?;
        let mut b = ctx.stream().launch_builder(&f);
        b.arg(dout.cu()).arg(de2.cu_mut());
        b.arg(&n).arg(&a1).arg(&a2).arg(&d1).arg(&d2).arg(&acc);
        // SAFETY: axial_pos_bwd_second(dout, de2, long long n, int a1, int a2, int d1, int d2,
        // int acc), grid (a2, ceil(d2 / threads)): writes de2[i2 < a2, c < d2], reads rows p < n.
        unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::AXIAL_BWD_SECOND, e))?;
    }
    Ok(())
}
