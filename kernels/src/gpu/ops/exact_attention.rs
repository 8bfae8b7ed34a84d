//! `exact_attention.cu`: blockwise exact attention (every key, or every earlier key when
//! causal) with an online softmax; standard (scaled) or shared-QK (unit keys, self penalty).
//!
//! `q`, `k`, `v` and the upstream `dout` are f32 or bf16 ([`ActElem`]; one type for all four,
//! widened to f32 on load); outputs, logsumexps and gradients are f32.

use cudarc::driver::PushKernelArg;

use crate::error::KernelsError;
use crate::geometry::{ATTN_ROWS_BWD, ATTN_ROWS_FWD};
use crate::gpu::launch::{exact_attention_grid, invalid};
use crate::gpu::ops::local_attention::{QkvInputs, Upstream};
use crate::gpu::ops::{launch_error, push_mask, AttnDims};
use crate::gpu::{ActElem, DeviceBuffer, GpuContext};
use crate::sources::{names::exact_attention as k, KernelFamily};

const FAMILY: KernelFamily = KernelFamily::ExactAttention;

/// How scores are formed and which pairs count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExactRule {
    /// Multiplies `q · k`.
    pub scale: f32,
    /// Exclude keys after the query.
    pub causal: bool,
    /// The key at the query's own position scores −1e5.
    pub self_penalty: bool,
    /// Keys are normalised to unit length on load (and dk taken back through it).
    pub unit_keys: bool,
}

impl ExactRule {
    /// Shared-QK attention (what LSH attention equals with one bucket): scale 1, unit keys,
    /// self penalty.
    pub fn shared_qk(causal: bool) -> Self {
        Self {
            scale: 1.0,
            causal,
            self_penalty: true,
            unit_keys: true,
        }
    }

    /// Ordinary attention: scale `1/sqrt(d)`.
    pub fn scaled(d: usize, causal: bool) -> Self {
        Self {
            scale: 1.0 / (d as f32).sqrt(),
            causal,
            self_penalty: false,
            unit_keys: false,
        }
    }
}

/// One exact attention problem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExactLaunch {
    pub dims: AttnDims,
    pub rule: ExactRule,
}

impl ExactLaunch {
    pub fn check(&self, op: &'static str) -> Result<(), KernelsError> {
        self.dims.check(op)?;
        if !self.rule.scale.is_finite() {
            return Err(invalid(op, "non-finite scale"));
        }
        Ok(())
    }

    fn scalars(&self) -> [i32; 6] {
        let r = self.rule;
        [
            self.dims.heads as i32,
            self.dims.len as i32,
            self.dims.d as i32,
            i32::from(r.causal),
            i32::from(r.self_penalty),
            i32::from(r.unit_keys),
        ]
    }
}

/// Output `[heads, len, d]` and logsumexp `[heads, len]`.
pub fn forward<T: ActElem, O: ActElem>(
    ctx: &GpuContext,
    x: QkvInputs<'_, T>,
    out: &mut DeviceBuffer<O>,
    lse: &mut DeviceBuffer<f32>,
    l: &ExactLaunch,
) -> Result<(), KernelsError> {
    const OP: &str = "exact_attn_fwd";
    l.check(OP)?;
    let vph = x.check(OP, &l.dims)?;
    l.dims.check_tensor(OP, "out", out.len())?;
    l.dims.check_rows(OP, "lse", lse.len())?;
    let cfg = exact_attention_grid(OP, l.dims.len, l.dims.heads, ATTN_ROWS_FWD)?;
    let [heads, n, d, causal, self_penalty, unit_keys] = l.scalars();
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
        .arg(&causal)
        .arg(&self_penalty)
        .arg(&unit_keys);
    b.arg(&l.rule.scale).arg(&act_bf16).arg(&out_bf16);
    // SAFETY: exact_attn_fwd(const void* q, const void* k, const void* v, key_valid, vph,
    // void* out, float* lse, heads, n, d, causal, self_penalty, unit_keys, scale, act_bf16,
    // out_bf16): q, k, v are T buffers (bf16 exactly when act_bf16 = 1, else f32), out an O
    // buffer (bf16 exactly when out_bf16 = 1); every buffer holds its [heads, n(, d)] extent
    // (checked above).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::FWD, e))?;
    Ok(())
}

/// Adds the query gradient into `dq`.
pub fn backward_dq<T: ActElem>(
    ctx: &GpuContext,
    x: QkvInputs<'_, T>,
    g: Upstream<'_, T>,
    dq: &mut DeviceBuffer<f32>,
    l: &ExactLaunch,
) -> Result<(), KernelsError> {
    const OP: &str = "exact_attn_bwd_dq";
    l.check(OP)?;
    let vph = x.check(OP, &l.dims)?;
    g.check(OP, &l.dims)?;
    l.dims.check_tensor(OP, "dq", dq.len())?;
    let cfg = exact_attention_grid(OP, l.dims.len, l.dims.heads, ATTN_ROWS_BWD)?;
    let [heads, n, d, causal, self_penalty, unit_keys] = l.scalars();
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
        .arg(&causal)
        .arg(&self_penalty)
        .arg(&unit_keys);
    b.arg(&l.rule.scale).arg(&act_bf16);
    // SAFETY: exact_attn_bwd_dq(const void* q, const void* k, const void* v, key_valid, vph,
    // const void* dout, lse, delta, float* dq, heads, n, d, causal, self_penalty, unit_keys, scale,
    // act_bf16): q, k, v, dout are T buffers (bf16 exactly when act_bf16 = 1, else f32); extents
    // checked; each query row is one block's.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::BWD_DQ, e))?;
    Ok(())
}

/// Adds the key gradient (through the unit-norm with `unit_keys`) into `dk` and the value
/// gradient into `dv`. For shared-QK attention `dk` may be the buffer [`backward_dq`] wrote:
/// both launches are ordered on the stream.
pub fn backward_dkdv<T: ActElem>(
    ctx: &GpuContext,
    x: QkvInputs<'_, T>,
    g: Upstream<'_, T>,
    dk: &mut DeviceBuffer<f32>,
    dv: &mut DeviceBuffer<f32>,
    l: &ExactLaunch,
) -> Result<(), KernelsError> {
    const OP: &str = "exact_attn_bwd_dkdv";
    l.check(OP)?;
    let vph = x.check(OP, &l.dims)?;
    g.check(OP, &l.dims)?;
    l.dims.check_tensor(OP, "dk", dk.len())?;
    l.dims.check_tensor(OP, "dv", dv.len())?;
    let cfg = exact_attention_grid(OP, l.dims.len, l.dims.heads, ATTN_ROWS_BWD)?;
    let [heads, n, d, causal, self_penalty, unit_keys] = l.scalars();
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
        .arg(&causal)
        .arg(&self_penalty)
        .arg(&unit_keys);
    b.arg(&l.rule.scale).arg(&act_bf16);
    // SAFETY: exact_attn_bwd_dkdv(const void* q, const void* k, const void* v, key_valid, vph,
    // const void* dout, lse, delta, float* dk, float* dv, heads, n, d, causal, self_penalty,
    // unit_keys, scale, act_bf16): q, k, v, dout are T buffers (bf16 exactly when act_bf16 = 1,
    // else f32); extents checked; each key row is one block's.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::BWD_DKDV, e))?;
    Ok(())
}
