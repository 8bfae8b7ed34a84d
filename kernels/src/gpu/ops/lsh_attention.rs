//! `lsh_attention.cu`: shared-QK LSH attention over the bucket-sorted order of each round, one
//! launch per round (forward, fold/combine, backward dq and dk/dv passes).
//!
//! The activations the passes read — `qk`, `v` and the upstream `dout` — are f32 or bf16
//! ([`ActElem`]; one type for all three, widened to f32 on load); everything the passes write
//! (output, logsumexps, gradients) is f32.

use cudarc::driver::PushKernelArg;

use crate::error::KernelsError;
use crate::geometry::{ATTN_ROWS_BWD, ATTN_ROWS_FWD};
use crate::gpu::launch::{chunked_attention_grid, invalid, mul, need, to_i32, warp_per_row};
use crate::gpu::ops::{launch_error, push_mask, AttnDims};
use crate::gpu::{ActElem, DeviceBuffer, GpuContext};
use crate::sources::{names::lsh_attention as k, KernelFamily};

const FAMILY: KernelFamily = KernelFamily::LshAttention;

/// The shape of one LSH attention problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LshLaunch {
    pub dims: AttnDims,
    pub n_rounds: usize,
    /// Chunk length of the sorted sequence.
    pub chunk: usize,
    pub causal: bool,
}

impl LshLaunch {
    /// The chunk length the kernels get: a chunk longer than the sequence is the sequence
    /// (one chunk, no look-back — the same attention), without a grid of idle blocks.
    pub fn effective_chunk(&self) -> usize {
        self.chunk.min(self.dims.len)
    }

    /// Elements of a per-round `[heads, n_rounds, len]` buffer (perm, buckets, lse).
    pub fn per_round_len(&self) -> usize {
        self.dims.rows().saturating_mul(self.n_rounds)
    }

    pub fn check(&self, op: &'static str) -> Result<(), KernelsError> {
        self.dims.check(op)?;
        if self.n_rounds == 0 {
            return Err(invalid(op, "LSH attention needs at least one round"));
        }
        if self.chunk == 0 {
            return Err(invalid(op, "chunk length 0"));
        }
        to_i32(op, "n_rounds", self.n_rounds)?;
        to_i32(op, "chunk", self.effective_chunk())?;
        mul(op, self.dims.rows(), self.n_rounds)?;
        Ok(())
    }

    fn check_round(&self, op: &'static str, round: usize) -> Result<(), KernelsError> {
        self.check(op)?;
        if round >= self.n_rounds {
            return Err(invalid(op, format!("round {round} of {}", self.n_rounds)));
        }
        Ok(())
    }

    fn scalars(&self, round: usize) -> LshScalars {
        LshScalars {
            heads: self.dims.heads as i32,
            n_rounds: self.n_rounds as i32,
            round: round as i32,
            n: self.dims.len as i32,
            d: self.dims.d as i32,
            chunk: self.effective_chunk() as i32,
            causal: i32::from(self.causal),
        }
    }
}

struct LshScalars {
    heads: i32,
    n_rounds: i32,
    round: i32,
    n: i32,
    d: i32,
    chunk: i32,
    causal: i32,
}

/// The inputs every pass reads: `qk`, `v` `[heads, len, d]` (f32 or bf16), `perm`
/// `[heads, n_rounds, len]` (from the bucket sort) and an optional key mask (`[len]` or
/// `[heads, len]`, 1 = real token).
#[derive(Debug, Clone, Copy)]
pub struct LshInputs<'a, T: ActElem = f32> {
    pub qk: &'a DeviceBuffer<T>,
    pub v: &'a DeviceBuffer<T>,
    pub perm: &'a DeviceBuffer<u32>,
    pub key_valid: Option<&'a DeviceBuffer<u8>>,
}

impl<T: ActElem> LshInputs<'_, T> {
    fn check(&self, op: &'static str, l: &LshLaunch) -> Result<i32, KernelsError> {
        l.dims.check_tensor(op, "qk", self.qk.len())?;
        l.dims.check_tensor(op, "v", self.v.len())?;
        need(op, "perm", self.perm.len(), l.per_round_len())?;
        l.dims
            .mask_layout(op, self.key_valid.map(DeviceBuffer::len))
    }
}

/// Round `round`'s forward: writes its logsumexps to `lse[h, round, i]` (`lse` is
/// `[heads, n_rounds, len]`) and its output to `out` `[heads, len, d]` — folded into the running
/// output of rounds `0..round` with `fold`, overwriting `out` otherwise (then fold it with
/// [`combine_round`]). Rounds must run in order.
pub fn forward_round<T: ActElem>(
    ctx: &GpuContext,
    x: LshInputs<'_, T>,
    out: &mut DeviceBuffer<f32>,
    lse: &mut DeviceBuffer<f32>,
    l: &LshLaunch,
    round: usize,
    fold: bool,
) -> Result<(), KernelsError> {
    const OP: &str = "lsh_attn_fwd";
    l.check_round(OP, round)?;
    let vph = x.check(OP, l)?;
    l.dims.check_tensor(OP, "out", out.len())?;
    need(OP, "lse", lse.len(), l.per_round_len())?;
    let cfg = chunked_attention_grid(
        OP,
        l.dims.len,
        l.effective_chunk(),
        l.dims.heads,
        ATTN_ROWS_FWD,
    )?;
    let s = l.scalars(round);
    let fold = i32::from(fold);
    let act_bf16 = i32::from(T::IS_BF16);
    let f = ctx.function(FAMILY, k::FWD)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.qk.cu()).arg(x.v.cu()).arg(x.perm.cu());
    push_mask(&mut b, x.key_valid, &vph);
    b.arg(out.cu_mut()).arg(lse.cu_mut());
    b.arg(&s.heads)
        .arg(&s.n_rounds)
        .arg(&s.round)
        .arg(&s.n)
        .arg(&s.d)
        .arg(&s.chunk);
    b.arg(&s.causal).arg(&fold).arg(&act_bf16);
    // SAFETY: lsh_attn_fwd(const void* qk, const void* v, perm, key_valid, vph, float* out,
    // float* lse, heads, rounds, round, n, d, chunk, causal, fold, act_bf16): qk and v are T
    // buffers (bf16 exactly when act_bf16 = 1, else f32); every buffer holds its
    // [heads, (rounds,) n(, d)] extent (checked).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::FWD, e))?;
    Ok(())
}

/// Folds round `round`'s output `out_r` (from [`forward_round`] without fold; its logsumexps
/// already in `lse`) into the running output `out`; round 0 copies.
pub fn combine_round(
    ctx: &GpuContext,
    out: &mut DeviceBuffer<f32>,
    out_r: &DeviceBuffer<f32>,
    lse: &DeviceBuffer<f32>,
    l: &LshLaunch,
    round: usize,
) -> Result<(), KernelsError> {
    const OP: &str = "lsh_attn_combine";
    l.check_round(OP, round)?;
    l.dims.check_tensor(OP, "out", out.len())?;
    l.dims.check_tensor(OP, "out_r", out_r.len())?;
    need(OP, "lse", lse.len(), l.per_round_len())?;
    let Some(cfg) = warp_per_row(OP, l.dims.rows())? else {
        return Ok(());
    };
    let s = l.scalars(round);
    let f = ctx.function(FAMILY, k::COMBINE)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(out.cu_mut()).arg(out_r.cu()).arg(lse.cu());
    b.arg(&s.heads)
        .arg(&s.n_rounds)
        .arg(&s.round)
        .arg(&s.n)
        .arg(&s.d);
    // SAFETY: lsh_attn_combine(out, out_r, lse, heads, rounds, round, n, d), one warp per row of
    // heads·n: out, out_r hold heads·n·d, lse heads·rounds·n (checked).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::COMBINE, e))?;
    Ok(())
}

/// The upstream quantities of the backward: `dout` `[heads, len, d]` (stored as the inputs
/// are), every round's `lse` `[heads, n_rounds, len]`, `delta = dout · out` `[heads, len]`.
#[derive(Debug, Clone, Copy)]
pub struct LshUpstream<'a, T: ActElem = f32> {
    pub dout: &'a DeviceBuffer<T>,
    pub lse: &'a DeviceBuffer<f32>,
    pub delta: &'a DeviceBuffer<f32>,
}

impl<T: ActElem> LshUpstream<'_, T> {
    fn check(&self, op: &'static str, l: &LshLaunch) -> Result<(), KernelsError> {
        l.dims.check_tensor(op, "dout", self.dout.len())?;
        need(op, "lse", self.lse.len(), l.per_round_len())?;
        l.dims.check_rows(op, "delta", self.delta.len())
    }
}

/// Round `round`'s dq pass: adds the query gradient into `dqk`.
pub fn backward_dq_round<T: ActElem>(
    ctx: &GpuContext,
    x: LshInputs<'_, T>,
    g: LshUpstream<'_, T>,
    dqk: &mut DeviceBuffer<f32>,
    l: &LshLaunch,
    round: usize,
) -> Result<(), KernelsError> {
    const OP: &str = "lsh_attn_bwd_dq";
    l.check_round(OP, round)?;
    let vph = x.check(OP, l)?;
    g.check(OP, l)?;
    l.dims.check_tensor(OP, "dqk", dqk.len())?;
    let cfg = chunked_attention_grid(
        OP,
        l.dims.len,
        l.effective_chunk(),
        l.dims.heads,
        ATTN_ROWS_BWD,
    )?;
    let s = l.scalars(round);
    let act_bf16 = i32::from(T::IS_BF16);
    let f = ctx.function(FAMILY, k::BWD_DQ)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.qk.cu()).arg(x.v.cu()).arg(x.perm.cu());
    push_mask(&mut b, x.key_valid, &vph);
    b.arg(g.dout.cu())
        .arg(g.lse.cu())
        .arg(g.delta.cu())
        .arg(dqk.cu_mut());
    b.arg(&s.heads)
        .arg(&s.n_rounds)
        .arg(&s.round)
        .arg(&s.n)
        .arg(&s.d)
        .arg(&s.chunk);
    b.arg(&s.causal).arg(&act_bf16);
    // SAFETY: lsh_attn_bwd_dq(const void* qk, const void* v, perm, key_valid, vph, const void*
    // dout, lse, delta, float* dqk, heads, rounds, round, n, d, chunk, causal, act_bf16): qk, v
    // and dout are T buffers (bf16 exactly when act_bf16 = 1, else f32); buffer extents checked
    // above; each query row is one block's.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::BWD_DQ, e))?;
    Ok(())
}

/// Round `round`'s dk/dv pass: adds the key gradient (through the unit-norm) into `dqk` and
/// the value gradient into `dv`.
pub fn backward_dkdv_round<T: ActElem>(
    ctx: &GpuContext,
    x: LshInputs<'_, T>,
    g: LshUpstream<'_, T>,
    dqk: &mut DeviceBuffer<f32>,
    dv: &mut DeviceBuffer<f32>,
    l: &LshLaunch,
    round: usize,
) -> Result<(), KernelsError> {
    const OP: &str = "lsh_attn_bwd_dkdv";
    l.check_round(OP, round)?;
    let vph = x.check(OP, l)?;
    g.check(OP, l)?;
    l.dims.check_tensor(OP, "dqk", dqk.len())?;
    l.dims.check_tensor(OP, "dv", dv.len())?;
    let cfg = chunked_attention_grid(
        OP,
        l.dims.len,
        l.effective_chunk(),
        l.dims.heads,
        ATTN_ROWS_BWD,
    )?;
    let s = l.scalars(round);
    let act_bf16 = i32::from(T::IS_BF16);
    let f = ctx.function(FAMILY, k::BWD_DKDV)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.qk.cu()).arg(x.v.cu()).arg(x.perm.cu());
    push_mask(&mut b, x.key_valid, &vph);
    b.arg(g.dout.cu())
        .arg(g.lse.cu())
        .arg(g.delta.cu())
        .arg(dqk.cu_mut())
        .arg(dv.cu_mut());
    b.arg(&s.heads)
        .arg(&s.n_rounds)
        .arg(&s.round)
        .arg(&s.n)
        .arg(&s.d)
        .arg(&s.chunk);
    b.arg(&s.causal).arg(&act_bf16);
    // SAFETY: lsh_attn_bwd_dkdv(const void* qk, const void* v, perm, key_valid, vph, const void*
    // dout, lse, delta, float* dqk, float* dv, heads, rounds, round, n, d, chunk, causal,
    // act_bf16): qk, v and dout are T buffers (bf16 exactly when act_bf16 = 1, else f32); extents
    // checked above; each key row is one block's.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::BWD_DKDV, e))?;
    Ok(())
}
