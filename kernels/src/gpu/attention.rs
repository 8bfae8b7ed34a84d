//! Attention on the GPU, mirroring the CPU API of `reformer-lsh` (same layouts, same
//! semantics — `docs/design.md` "Semantics"):
//!
//! - shared-QK LSH attention: hash ([`lsh_hash`]), stable bucket sort per round
//!   ([`lsh_sort`]), chunked attention with look-back, rounds combined by logsumexp
//!   ([`lsh_attention_forward`], [`lsh_attention_backward`]);
//! - chunked local attention ([`local_attention_forward`], [`local_attention_backward`]);
//! - blockwise exact attention, standard or shared-QK ([`exact_attention_forward`], ...).
//!
//! Inputs are `[heads, len, d]` device buffers (`heads` may fold a batch in); logsumexps are
//! `[heads, len]` (`[heads, n_rounds, len]` for LSH, as the CPU's `LshSaved`). A key mask is a
//! device byte buffer of `len` (shared by every head) or `heads·len` entries, 1 = may be attended
//! to (see [`GpuContext::upload_mask`]). Outputs are allocated from the context's pool; the
//! backward passes recompute scores from the stored logsumexps and never hold an `N × N` or
//! `N × 2m × rounds` tensor.
//!
//! Storage: the activations every function reads — `q`, `k`, `v`, `qk`, and in the backward
//! `out` and `d_out` — are `DeviceBuffer<T>` with `T` f32 or bf16 ([`ActElem`]; one `T` per
//! call). The kernels widen them to f32 on load and compute in f32; every result (outputs,
//! logsumexps, gradients) is f32. Calls on f32 buffers infer `T = f32`.

use crate::error::KernelsError;
use crate::gpu::launch::{invalid, mul};
use crate::gpu::ops::exact_attention::{self as exact, ExactLaunch};
use crate::gpu::ops::local_attention::{self as local, LocalLaunch, QkvInputs, Upstream};
use crate::gpu::ops::lsh_attention::{self as lsh, LshInputs, LshLaunch, LshUpstream};
use crate::gpu::ops::{bucket_sort, elementwise, lsh_hash as hash};
use crate::gpu::{ActElem, DeviceBuffer, GpuContext};

pub use crate::gpu::ops::exact_attention::ExactRule;
pub use crate::gpu::ops::AttnDims;

/// How many buckets a round hashes into: `b1·b2`, from one rotation of `b1/2` columns and, when
/// `b2 > 1`, a second of `b2/2` (`h = h1 + b1·h2`) — the CPU's `Buckets::Single(b)` is
/// `b1 = b, b2 = 1`, `Buckets::Factorised(b1, b2)` is `(b1, b2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LshBuckets {
    pub b1: usize,
    pub b2: usize,
}

impl LshBuckets {
    pub fn single(b: usize) -> Self {
        Self { b1: b, b2: 1 }
    }

    pub fn factorised(b1: usize, b2: usize) -> Self {
        Self { b1, b2 }
    }

    pub fn total(&self) -> usize {
        self.b1.saturating_mul(self.b2)
    }

    /// Rotation columns per round.
    pub fn rotation_cols(&self) -> usize {
        hash::rotation_cols(self.b1, self.b2)
    }
}

/// Hashing, chunking and masking of LSH attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuLshConfig {
    pub buckets: LshBuckets,
    pub n_rounds: usize,
    /// Chunk length `m` of the sorted sequence.
    pub chunk_len: usize,
    /// Exclude keys after the query.
    pub causal: bool,
}

impl GpuLshConfig {
    fn launch(&self, dims: AttnDims) -> LshLaunch {
        LshLaunch {
            dims,
            n_rounds: self.n_rounds,
            chunk: self.chunk_len,
            causal: self.causal,
        }
    }

    /// Checks the configuration against `dims`.
    pub fn check(&self, op: &'static str, dims: AttnDims) -> Result<(), KernelsError> {
        self.launch(dims).check(op)?;
        hash::check_buckets(op, self.buckets.b1, self.buckets.b2)
    }

    /// Elements of the rotations: `[n_rounds, d, rotation_cols]`.
    pub fn rotations_len(&self, d: usize) -> usize {
        self.n_rounds
            .saturating_mul(d)
            .saturating_mul(self.buckets.rotation_cols())
    }
}

/// What the LSH forward keeps for the backward: per (head, round, position) the bucket and the
/// logsumexp `z_r` of the query's scores in that round (the CPU's `LshSaved`).
#[derive(Debug)]
pub struct GpuLshSaved {
    pub dims: AttnDims,
    pub n_rounds: usize,
    pub n_buckets: usize,
    /// `[heads, n_rounds, len]`.
    pub buckets: DeviceBuffer<u32>,
    /// `[heads, n_rounds, len]`.
    pub lse: DeviceBuffer<f32>,
}

impl GpuLshSaved {
    pub fn size_in_bytes(&self) -> usize {
        self.buckets.size_in_bytes() + self.lse.size_in_bytes()
    }
}

/// Buckets `[heads, n_rounds, len]` of the raw `qk` rows under `rotations`
/// (`[n_rounds, d, rotation_cols]`, shared by every head, as the CPU's `Rotations::data`).
pub fn lsh_hash<T: ActElem>(
    ctx: &GpuContext,
    qk: &DeviceBuffer<T>,
    dims: AttnDims,
    rotations: &[f32],
    cfg: &GpuLshConfig,
) -> Result<DeviceBuffer<u32>, KernelsError> {
    const OP: &str = "lsh_hash";
    cfg.check(OP, dims)?;
    dims.check_tensor(OP, "qk", qk.len())?;
    let want = cfg.rotations_len(dims.d);
    if rotations.len() != want {
        return Err(KernelsError::Shape {
            op: "lsh rotations",
            got: vec![rotations.len()],
            expected: vec![cfg.n_rounds, dims.d, cfg.buckets.rotation_cols()],
        });
    }
    let hd = hash::HashDims {
        heads: dims.heads,
        len: dims.len,
        d: dims.d,
        n_rounds: cfg.n_rounds,
        b1: cfg.buckets.b1,
        b2: cfg.buckets.b2,
        rot_head_stride: 0,
    };
    let rot = ctx.upload(rotations)?;
    let mut buckets = ctx.alloc::<u32>(mul(OP, dims.rows(), cfg.n_rounds)?)?;
    hash::hash(ctx, qk, &rot, &mut buckets, hd)?;
    Ok(buckets)
}

/// The sorted order of every (head, round): `perm[h, r, slot] = position`, stable by
/// `bucket·len + position`, with masked positions after every real one (the CPU's sort).
/// Bucket values must be `< n_buckets`; a larger one cannot corrupt memory (the result is
/// always a permutation) but sorts by its low bytes only.
pub fn lsh_sort(
    ctx: &GpuContext,
    buckets: &DeviceBuffer<u32>,
    dims: AttnDims,
    n_rounds: usize,
    n_buckets: usize,
    key_mask: Option<&DeviceBuffer<u8>>,
) -> Result<DeviceBuffer<u32>, KernelsError> {
    const OP: &str = "lsh_sort";
    let segs = mul(OP, dims.heads, n_rounds)?;
    let total = mul(OP, segs, dims.len)?;
    if buckets.len() != total {
        return Err(KernelsError::Shape {
            op: "lsh buckets",
            got: vec![buckets.len()],
            expected: vec![dims.heads, n_rounds, dims.len],
        });
    }
    let masked_key =
        u32::try_from(n_buckets).map_err(|_| invalid(OP, format!("{n_buckets} buckets")))?;
    match key_mask {
        None => bucket_sort::sort(ctx, buckets, segs, dims.len, n_buckets.max(1)),
        Some(mask) => {
            let mut keys = ctx.alloc::<u32>(total)?;
            bucket_sort::mask_keys(
                ctx, buckets, mask, &mut keys, dims.heads, n_rounds, dims.len, masked_key,
            )?;
            bucket_sort::sort(ctx, &keys, segs, dims.len, n_buckets + 1)
        }
    }
}

/// LSH attention forward: hashes `qk` with `rotations`, sorts, attends. Returns the output
/// `[heads, len, d]` and what the backward needs.
pub fn lsh_attention_forward<T: ActElem>(
    ctx: &GpuContext,
    qk: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    dims: AttnDims,
    rotations: &[f32],
    cfg: &GpuLshConfig,
    key_mask: Option<&DeviceBuffer<u8>>,
) -> Result<(DeviceBuffer<f32>, GpuLshSaved), KernelsError> {
    let buckets = lsh_hash(ctx, qk, dims, rotations, cfg)?;
    lsh_attention_forward_with_buckets(ctx, qk, v, dims, buckets, cfg, key_mask)
}

/// LSH attention forward from given buckets `[heads, n_rounds, len]` (kept from an earlier
/// pass, or computed elsewhere — e.g. by the CPU, for parity tests).
pub fn lsh_attention_forward_with_buckets<T: ActElem>(
    ctx: &GpuContext,
    qk: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    dims: AttnDims,
    buckets: DeviceBuffer<u32>,
    cfg: &GpuLshConfig,
    key_mask: Option<&DeviceBuffer<u8>>,
) -> Result<(DeviceBuffer<f32>, GpuLshSaved), KernelsError> {
    const OP: &str = "lsh_attention_forward";
    cfg.check(OP, dims)?;
    let l = cfg.launch(dims);
    let n_buckets = cfg.buckets.total();
    let perm = lsh_sort(ctx, &buckets, dims, cfg.n_rounds, n_buckets, key_mask)?;
    let mut out = ctx.alloc::<f32>(dims.numel())?;
    let mut lse = ctx.alloc::<f32>(l.per_round_len())?;
    let x = LshInputs {
        qk,
        v,
        perm: &perm,
        key_valid: key_mask,
    };
    for round in 0..cfg.n_rounds {
        lsh::forward_round(ctx, x, &mut out, &mut lse, &l, round, true)?;
    }
    Ok((
        out,
        GpuLshSaved {
            dims,
            n_rounds: cfg.n_rounds,
            n_buckets,
            buckets,
            lse,
        },
    ))
}

/// `delta = dO · O` per row `[heads, len]`, shared by every backward pass (and every LSH
/// round), after checking that `out` and `d_out` are `[heads, len, d]`.
fn attention_delta<T: ActElem>(
    ctx: &GpuContext,
    op: &'static str,
    dims: AttnDims,
    out: &DeviceBuffer<T>,
    d_out: &DeviceBuffer<T>,
) -> Result<DeviceBuffer<f32>, KernelsError> {
    dims.check_tensor(op, "out", out.len())?;
    dims.check_tensor(op, "d_out", d_out.len())?;
    let mut delta = ctx.alloc::<f32>(dims.rows())?;
    elementwise::row_dot(ctx, d_out, out, &mut delta, dims.rows(), dims.d)?;
    Ok(delta)
}

/// LSH attention backward: from the forward's inputs, its output, the output gradient and
/// `saved`, returns `(d_qk, d_v)`. Re-sorts the saved buckets (as the CPU does) and recomputes
/// scores round by round.
#[allow(clippy::too_many_arguments)]
pub fn lsh_attention_backward<T: ActElem>(
    ctx: &GpuContext,
    qk: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    out: &DeviceBuffer<T>,
    d_out: &DeviceBuffer<T>,
    saved: &GpuLshSaved,
    cfg: &GpuLshConfig,
    key_mask: Option<&DeviceBuffer<u8>>,
) -> Result<(DeviceBuffer<f32>, DeviceBuffer<f32>), KernelsError> {
    const OP: &str = "lsh_attention_backward";
    let dims = saved.dims;
    cfg.check(OP, dims)?;
    if saved.n_rounds != cfg.n_rounds || saved.n_buckets != cfg.buckets.total() {
        return Err(KernelsError::Shape {
            op: "lsh attention saved state",
            got: vec![saved.n_rounds, saved.n_buckets],
            expected: vec![cfg.n_rounds, cfg.buckets.total()],
        });
    }
    let l = cfg.launch(dims);
    let delta = attention_delta(ctx, OP, dims, out, d_out)?;
    let perm = lsh_sort(
        ctx,
        &saved.buckets,
        dims,
        cfg.n_rounds,
        saved.n_buckets,
        key_mask,
    )?;
    let mut d_qk = ctx.alloc_zeros::<f32>(dims.numel())?;
    let mut d_v = ctx.alloc_zeros::<f32>(dims.numel())?;
    let x = LshInputs {
        qk,
        v,
        perm: &perm,
        key_valid: key_mask,
    };
    let g = LshUpstream {
        dout: d_out,
        lse: &saved.lse,
        delta: &delta,
    };
    for round in 0..cfg.n_rounds {
        lsh::backward_dq_round(ctx, x, g, &mut d_qk, &l, round)?;
        lsh::backward_dkdv_round(ctx, x, g, &mut d_qk, &mut d_v, &l, round)?;
    }
    Ok((d_qk, d_v))
}

/// Chunking of local attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuLocalConfig {
    pub chunk_len: usize,
    pub causal: bool,
}

impl GpuLocalConfig {
    fn launch(&self, dims: AttnDims) -> LocalLaunch {
        LocalLaunch {
            dims,
            chunk: self.chunk_len,
            causal: self.causal,
            scale: 1.0 / (dims.d as f32).sqrt(),
        }
    }
}

/// Local attention forward: output `[heads, len, d]` and logsumexp `[heads, len]`.
#[allow(clippy::too_many_arguments)]
pub fn local_attention_forward<T: ActElem>(
    ctx: &GpuContext,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    dims: AttnDims,
    cfg: &GpuLocalConfig,
    key_mask: Option<&DeviceBuffer<u8>>,
) -> Result<(DeviceBuffer<f32>, DeviceBuffer<f32>), KernelsError> {
    local_attention_forward_as(ctx, q, k, v, dims, cfg, key_mask)
}

/// [`local_attention_forward`] with the output stored as `O` (bf16: rounded to nearest even
/// by the kernel as it stores each value — the same values as converting the f32 output — with
/// no f32 copy).
pub fn local_attention_forward_as<T: ActElem, O: ActElem>(
    ctx: &GpuContext,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    dims: AttnDims,
    cfg: &GpuLocalConfig,
    key_mask: Option<&DeviceBuffer<u8>>,
) -> Result<(DeviceBuffer<O>, DeviceBuffer<f32>), KernelsError> {
    let l = cfg.launch(dims);
    l.check("local_attention_forward")?;
    let mut out = ctx.alloc::<O>(dims.numel())?;
    let mut lse = ctx.alloc::<f32>(dims.rows())?;
    let x = QkvInputs {
        q,
        k,
        v,
        key_valid: key_mask,
    };
    local::forward(ctx, x, &mut out, &mut lse, &l)?;
    Ok((out, lse))
}

/// Gradients `(dq, dk, dv)` of one attention backward.
pub type QkvGrads = (DeviceBuffer<f32>, DeviceBuffer<f32>, DeviceBuffer<f32>);

/// Local attention backward: `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub fn local_attention_backward<T: ActElem>(
    ctx: &GpuContext,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    out: &DeviceBuffer<T>,
    lse: &DeviceBuffer<f32>,
    d_out: &DeviceBuffer<T>,
    dims: AttnDims,
    cfg: &GpuLocalConfig,
    key_mask: Option<&DeviceBuffer<u8>>,
) -> Result<QkvGrads, KernelsError> {
    const OP: &str = "local_attention_backward";
    let l = cfg.launch(dims);
    l.check(OP)?;
    let delta = attention_delta(ctx, OP, dims, out, d_out)?;
    let x = QkvInputs {
        q,
        k,
        v,
        key_valid: key_mask,
    };
    let g = Upstream {
        dout: d_out,
        lse,
        delta: &delta,
    };
    let mut dq = ctx.alloc_zeros::<f32>(dims.numel())?;
    let mut dk = ctx.alloc_zeros::<f32>(dims.numel())?;
    let mut dv = ctx.alloc_zeros::<f32>(dims.numel())?;
    local::backward_dq(ctx, x, g, &mut dq, &l)?;
    local::backward_dkdv(ctx, x, g, &mut dk, &mut dv, &l)?;
    Ok((dq, dk, dv))
}

/// Exact attention forward: output `[heads, len, d]` and logsumexp `[heads, len]`. With
/// [`ExactRule::shared_qk`], pass `qk` as both `q` and `k` (keys are normalised on load).
#[allow(clippy::too_many_arguments)]
pub fn exact_attention_forward<T: ActElem>(
    ctx: &GpuContext,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    dims: AttnDims,
    rule: ExactRule,
    key_mask: Option<&DeviceBuffer<u8>>,
) -> Result<(DeviceBuffer<f32>, DeviceBuffer<f32>), KernelsError> {
    exact_attention_forward_as(ctx, q, k, v, dims, rule, key_mask)
}

/// [`exact_attention_forward`] with the output stored as `O` (as
/// [`local_attention_forward_as`]).
pub fn exact_attention_forward_as<T: ActElem, O: ActElem>(
    ctx: &GpuContext,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    dims: AttnDims,
    rule: ExactRule,
    key_mask: Option<&DeviceBuffer<u8>>,
) -> Result<(DeviceBuffer<O>, DeviceBuffer<f32>), KernelsError> {
    let l = ExactLaunch { dims, rule };
    l.check("exact_attention_forward")?;
    let mut out = ctx.alloc::<O>(dims.numel())?;
    let mut lse = ctx.alloc::<f32>(dims.rows())?;
    let x = QkvInputs {
        q,
        k,
        v,
        key_valid: key_mask,
    };
    exact::forward(ctx, x, &mut out, &mut lse, &l)?;
    Ok((out, lse))
}

/// `(dq, dk, dv)`; `dk` is `None` when it was added into `dq` (shared-QK).
type SharedOrSeparate = (
    DeviceBuffer<f32>,
    Option<DeviceBuffer<f32>>,
    DeviceBuffer<f32>,
);

fn exact_backward_into<T: ActElem>(
    ctx: &GpuContext,
    x: QkvInputs<'_, T>,
    out: &DeviceBuffer<T>,
    lse: &DeviceBuffer<f32>,
    d_out: &DeviceBuffer<T>,
    l: &ExactLaunch,
    shared: bool,
) -> Result<SharedOrSeparate, KernelsError> {
    const OP: &str = "exact_attention_backward";
    l.check(OP)?;
    let dims = l.dims;
    let delta = attention_delta(ctx, OP, dims, out, d_out)?;
    let g = Upstream {
        dout: d_out,
        lse,
        delta: &delta,
    };
    let mut dq = ctx.alloc_zeros::<f32>(dims.numel())?;
    let mut dv = ctx.alloc_zeros::<f32>(dims.numel())?;
    exact::backward_dq(ctx, x, g, &mut dq, l)?;
    if shared {
        // Shared-QK: the key gradient lands in the same buffer, after the dq pass (one stream).
        exact::backward_dkdv(ctx, x, g, &mut dq, &mut dv, l)?;
        Ok((dq, None, dv))
    } else {
        let mut dk = ctx.alloc_zeros::<f32>(dims.numel())?;
        exact::backward_dkdv(ctx, x, g, &mut dk, &mut dv, l)?;
        Ok((dq, Some(dk), dv))
    }
}

/// Exact attention backward: `(dq, dk, dv)`, `dk` with respect to the raw keys (through the
/// unit-norm when `rule.unit_keys`).
#[allow(clippy::too_many_arguments)]
pub fn exact_attention_backward<T: ActElem>(
    ctx: &GpuContext,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    out: &DeviceBuffer<T>,
    lse: &DeviceBuffer<f32>,
    d_out: &DeviceBuffer<T>,
    dims: AttnDims,
    rule: ExactRule,
    key_mask: Option<&DeviceBuffer<u8>>,
) -> Result<QkvGrads, KernelsError> {
    let x = QkvInputs {
        q,
        k,
        v,
        key_valid: key_mask,
    };
    let (dq, dk, dv) =
        exact_backward_into(ctx, x, out, lse, d_out, &ExactLaunch { dims, rule }, false)?;
    let dk = dk.ok_or_else(|| invalid("exact_attention_backward", "no key gradient"))?;
    Ok((dq, dk, dv))
}

/// Exact shared-QK attention forward (queries `qk`, keys its unit rows, self penalty): what LSH
/// attention equals with one bucket and one chunk.
pub fn exact_shared_qk_forward<T: ActElem>(
    ctx: &GpuContext,
    qk: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    dims: AttnDims,
    causal: bool,
    key_mask: Option<&DeviceBuffer<u8>>,
) -> Result<(DeviceBuffer<f32>, DeviceBuffer<f32>), KernelsError> {
    exact_shared_qk_forward_as(ctx, qk, v, dims, causal, key_mask)
}

/// [`exact_shared_qk_forward`] with the output stored as `O` (as
/// [`local_attention_forward_as`]).
pub fn exact_shared_qk_forward_as<T: ActElem, O: ActElem>(
    ctx: &GpuContext,
    qk: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    dims: AttnDims,
    causal: bool,
    key_mask: Option<&DeviceBuffer<u8>>,
) -> Result<(DeviceBuffer<O>, DeviceBuffer<f32>), KernelsError> {
    exact_attention_forward_as(ctx, qk, qk, v, dims, ExactRule::shared_qk(causal), key_mask)
}

/// Backward of [`exact_shared_qk_forward`]: `(d_qk, d_v)`, the query and key gradients summed
/// in one buffer.
#[allow(clippy::too_many_arguments)]
pub fn exact_shared_qk_backward<T: ActElem>(
    ctx: &GpuContext,
    qk: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    out: &DeviceBuffer<T>,
    lse: &DeviceBuffer<f32>,
    d_out: &DeviceBuffer<T>,
    dims: AttnDims,
    causal: bool,
    key_mask: Option<&DeviceBuffer<u8>>,
) -> Result<(DeviceBuffer<f32>, DeviceBuffer<f32>), KernelsError> {
    let x = QkvInputs {
        q: qk,
        k: qk,
        v,
        key_valid: key_mask,
    };
    let l = ExactLaunch {
        dims,
        rule: ExactRule::shared_qk(causal),
    };
    let (dqk, _, dv) = exact_backward_into(ctx, x, out, lse, d_out, &l, true)?;
    Ok((dqk, dv))
}
