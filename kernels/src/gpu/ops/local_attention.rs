//! `local_attention.cu`: chunked local attention in original order (chunk `c` attends to
//! chunks `c−1` and `c`), separate q, k, v, scores scaled.
//!
//! `q`, `k`, `v` and the upstream `dout` are f32 or bf16 ([`ActElem`]; one type for all four,
//! widened to f32 on load); the forward's output is f32 or bf16 (its own [`ActElem`], rounded
//! once as it is stored); logsumexps and gradients are f32. [`QkvInputs`] and
//! [`Upstream`] serve the exact attention wrappers too.

use cudarc::driver::PushKernelArg;

use crate::error::KernelsError;
use crate::geometry::{ATTN_ROWS_BWD, ATTN_ROWS_FWD};
use crate::gpu::launch::{chunked_attention_grid, invalid, to_i32};
use crate::gpu::ops::{launch_error, push_mask, AttnDims};
use crate::gpu::{ActElem, DeviceBuffer, GpuContext};
use crate::sources::{names::local_attention as k, KernelFamily};

const FAMILY: KernelFamily = KernelFamily::LocalAttention;

/// The shape of one local attention problem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalLaunch {
    pub dims: AttnDims,
    pub chunk: usize,
    pub causal: bool,
    /// Score scale (the API passes `1/sqrt(d)`, as the CPU does).
    pub scale: f32,
}

impl LocalLaunch {
    /// The chunk length the kernels get: a chunk longer than the sequence is the sequence.
    pub fn effective_chunk(&self) -> usize {
        self.chunk.min(self.dims.len)
    }

    pub fn check(&self, op: &'static str) -> Result<(), KernelsError> {
        self.dims.check(op)?;
        if self.chunk == 0 {
            return Err(invalid(op, "chunk length 0"));
        }
        to_i32(op, "chunk", self.effective_chunk())?;
        if !self.scale.is_finite() {
            return Err(invalid(op, "non-finite scale"));
        }
        Ok(())
    }
}

/// `q`, `k`, `v` `[heads, len, d]` (f32 or bf16) and an optional key mask.
#[derive(Debug, Clone, Copy)]
pub struct QkvInputs<'a, T: ActElem = f32> {
    pub q: &'a DeviceBuffer<T>,
    pub k: &'a DeviceBuffer<T>,
    pub v: &'a DeviceBuffer<T>,
    pub key_valid: Option<&'a DeviceBuffer<u8>>,
}

impl<T: ActElem> QkvInputs<'_, T> {
    pub(crate) fn check(&self, op: &'static str, dims: &AttnDims) -> Result<i32, KernelsError> {
        dims.check_tensor(op, "q", self.q.len())?;
        dims.check_tensor(op, "k", self.k.len())?;
        dims.check_tensor(op, "v", self.v.len())?;
        dims.mask_layout(op, self.key_valid.map(DeviceBuffer::len))
    }
}

/// `dout` `[heads, len, d]` (stored as the inputs are), `lse` and `delta = dout · out`
/// `[heads, len]`.
#[derive(Debug, Clone, Copy)]
pub struct Upstream<'a, T: ActElem = f32> {
    pub dout: &'a DeviceBuffer<T>,
    pub lse: &'a DeviceBuffer<f32>,
    pub delta: &'a DeviceBuffer<f32>,
}

impl<T: ActElem> Upstream<'_, T> {
    pub(crate) fn check(&self, op: &'static str, dims: &AttnDims) -> Result<(), KernelsError> {
        dims.check_tensor(op, "dout", self.dout.len())?;
        dims.check_rows(op, "lse", self.lse.len())?;
        dims.check_rows(op, "delta", self.delta.len())
    }
}

/// Output `[heads, len, d]` and logsumexp `[heads, len]`.
pub fn forward<T: ActElem, O: ActElem>(
    ctx: &GpuContext,
    x: QkvInputs<'_, T>,
    out: &mut DeviceBuffer<O>,
    lse: &mut DeviceBuffer<f32>,
    l: &LocalLaunch,
) -> Result<(), KernelsError> {
    const OP: &str = "local_attn_fwd";
    l.check(OP)?;
    let vph = x.check(OP, &l.dims)?;
    l.dims.check_tensor(OP, "out", out.len())?;
    l.dims.check_rows(OP, "lse", lse.len())?;
    let cfg = chunked_attention_grid(
        OP,
        l.dims.len,
        l.effective_chunk(),
        l.dims.heads,
        ATTN_ROWS_FWD,
    )?;
    let (heads, n, d) = (l.dims.heads as i32, l.dims.len as i32, l.dims.d as i32);
    let (chunk, causal) = (l.effective_chunk() as i32, i32::from(l.causal));
    let act_bf16 = i32::from(T::IS_BF16);
    let out_bf16 = i32::from(O::IS_BF16);
    let f = ctx.function(FAMILY, k::FWD)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.q.cu()).arg(x.k.cu()).arg(x.v.cu());
    push_mask(&mut b, x.key_valid, &vph);
    b.arg(out.cu_mut()).arg(lse.cu_mut());
    b.arg(&heads)
        .arg(&n)
        .arg(&d)
        .arg(&chunk)
        .arg(&causal)
        .arg(&l.scale)
        .arg(&act_bf16)
        .arg(&out_bf16);
    // SAFETY: local_attn_fwd(const void* q, const void* k, const void* v, key_valid, vph,
    // void* out, float* lse, heads, n, d, chunk, causal, scale, act_bf16, out_bf16): q, k, v are
    // T buffers (bf16 exactly when act_bf16 = 1, else f32), out an O buffer (bf16 exactly when
    // out_bf16 = 1); every buffer holds its [heads, n(, d)] extent (checked above).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::FWD, e))?;
    Ok(())
}

/// Adds the query gradient into `dq`.
pub fn backward_dq<T: ActElem>(
    ctx: &GpuContext,
    x: QkvInputs<'_, T>,
    g: Upstream<'_, T>,
    dq: &mut DeviceBuffer<f32>,
    l: &LocalLaunch,
) -> Result<(), KernelsError> {
    const OP: &str = "local_attn_bwd_dq";
    l.check(OP)?;
    let vph = x.check(OP, &l.dims)?;
    g.check(OP, &l.dims)?;
    l.dims.check_tensor(OP, "dq", dq.len())?;
    let cfg = chunked_attention_grid(
        OP,
        l.dims.len,
        l.effective_chunk(),
        l.dims.heads,
        ATTN_ROWS_BWD,
    )?;
    let (heads, n, d) = (l.dims.heads as i32, l.dims.len as i32, l.dims.d as i32);
    let (chunk, causal) = (l.effective_chunk() as i32, i32::from(l.causal));
    let act_bf16 = i32::from(T::IS_BF16);
    let f = ctx.function(FAMILY, k::BWD_DQ)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.q.cu()).arg(x.k.cu()).arg(x.v.cu());
    push_mask(&mut b, x.key_valid, &vph);
    b.arg(g.dout.cu())
        .arg(g.lse.cu())
        .arg(g.delta.cu())
        .arg(dq.cu_mut());
    b.arg(&heads)
        .arg(&n)
        .arg(&d)
        .arg(&chunk)
        .arg(&causal)
        .arg(&l.scale)
        .arg(&act_bf16);
    // SAFETY: local_attn_bwd_dq(const void* q, const void* k, const void* v, key_valid, vph,
    // const void* dout, lse, delta, float* dq, heads, n, d, chunk, causal, scale, act_bf16): q, k,
    // v, dout are T buffers (bf16 exactly when act_bf16 = 1, else f32); extents checked above;
    // each query row belongs to one block.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::BWD_DQ, e))?;
    Ok(())
}

/// Adds the key and value gradients into `dk`, `dv`.
pub fn backward_dkdv<T: ActElem>(
    ctx: &GpuContext,
    x: QkvInputs<'_, T>,
    g: Upstream<'_, T>,
    dk: &mut DeviceBuffer<f32>,
    dv: &mut DeviceBuffer<f32>,
    l: &LocalLaunch,
) -> Result<(), KernelsError> {
    const OP: &str = "local_attn_bwd_dkdv";
    l.check(OP)?;
    let vph = x.check(OP, &l.dims)?;
    g.check(OP, &l.dims)?;
    l.dims.check_tensor(OP, "dk", dk.len())?;
    l.dims.check_tensor(OP, "dv", dv.len())?;
    let cfg = chunked_attention_grid(
        OP,
        l.dims.len,
        l.effective_chunk(),
        l.dims.heads,
        ATTN_ROWS_BWD,
    )?;
    let (heads, n, d) = (l.dims.heads as i32, l.dims.len as i32, l.dims.d as i32);
    let (chunk, causal) = (l.effective_chunk() as i32, i32::from(l.causal));
    let act_bf16 = i32::from(T::IS_BF16);
    let f = ctx.function(FAMILY, k::BWD_DKDV)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.q.cu()).arg(x.k.cu()).arg(x.v.cu());
    push_mask(&mut b, x.key_valid, &vph);
    b.arg(g.dout.cu())
        .arg(g.lse.cu())
        .arg(g.delta.cu())
        .arg(dk.cu_mut())
        .arg(dv.cu_mut());
    b.arg(&heads)
        .arg(&n)
        .arg(&d)
        .arg(&chunk)
        .arg(&causal)
        .arg(&l.scale)
        .arg(&act_bf16);
    // SAFETY: local_attn_bwd_dkdv(const void* q, const void* k, const void* v, key_valid, vph,
    // const void* dout, lse, delta, float* dk, float* dv, heads, n, d, chunk, causal, scale,
    // act_bf16): q, k, v, dout are T buffers (bf16 exactly when act_bf16 = 1, else f32); extents
    // checked above; each key row belongs to one block.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::BWD_DKDV, e))?;
    Ok(())
}
