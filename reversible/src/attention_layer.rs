//! The attention sublayer `Attn(x) = drop(W_o · attention(LN(x)·W…))`, for the three kinds:
//!
//! * `Lsh`: shared `W_qk` and `W_v` (no bias), shared-QK LSH attention with rotations drawn
//!   from a stream of `(cfg.seed, ctx.step, layer)`, so the backward's recompute hashes alike.
//! * `Exact`: the same projections and exact shared-QK attention (unit keys, self penalty,
//!   scale 1): LSH attention with one bucket.
//! * `Local`: separate `W_q`, `W_k`, `W_v`, chunked local attention scaled by `1/sqrt(d_head)`.
//!
//! Heads live as `[batch·heads, len, dh]` for the attention ops. The position-wise parts (layer
//! norm, projections, `W_o`, dropout, and their backward) run over blocks of `ff_chunk`
//! positions that read and write the head layout directly, so neither `LN(x)` nor a
//! model-layout copy of the projections exists for the whole sequence. The forward keeps
//! nothing; the backward recomputes the forward from its input.
//!
//! Heads are processed in groups of [`LayerConfig::heads_per_group`]: per group, its columns
//! of the projection weights, the attention op on `[batch·group, len, dh]`, and its rows of
//! `W_o` (accumulating into the output), so only one group's head tensors exist at a time.
//! `LN(x)` is recomputed per block of rows for each group. In the backward, each group
//! recomputes its projections and attention, subtracts its share of the reconstruction, and
//! runs its own layer-norm backward on its share of `d LN(x)`: the layer norm's backward is
//! linear in its upstream gradient (input, gain and bias gradients alike), so the per-group
//! backward passes add up to the whole one without a full-length `d LN(x)` buffer. The LSH
//! rotations are drawn once per call and shared by every group, so buckets do not depend on
//! the grouping. With one group (the default) the code path is the all-heads one and the
//! weights are used in place; otherwise a group's weight columns are copied (`[d_model,
//! group·dh]`, f32) and its weight gradients accumulate in such a copy, added once per call.

use std::ops::Range;

use reformer_engine::{Buffer, Hold, MemoryPool, Tensor};
use reformer_lsh::{
    exact_attention_backward, exact_attention_forward, local_attention_backward,
    local_attention_forward, lsh_attention_backward, lsh_attention_forward, shared_qk_grad,
    shared_qk_rule, unit_keys, LocalConfig, LshConfig, LshSaved, Rotations,
};

use crate::config::{AttentionKind, LayerConfig, StepContext};
use crate::dropout::{maybe_apply, Dropout, Site};
use crate::error::{shape_err, Result, ReversibleError};
use crate::heads::{add_columns, copy_columns, gather_rows, scatter_rows, HeadDims};
use crate::layer_norm::LayerNorm;
use crate::linear::{acc_weight_grad, axpy_par, matmul, matmul_wt};
use crate::params::{HasParams, Param};
use crate::seed::{derive, DOMAIN_PARAMS, DOMAIN_ROTATIONS};

#[derive(Debug)]
enum QkWeights {
    /// `W_qk` `[d_model, H·dh]` (LSH and exact attention).
    Shared { w_qk: Param },
    /// `W_q`, `W_k` `[d_model, H·dh]` (local attention).
    Separate { w_q: Param, w_k: Param },
}

#[derive(Debug)]
pub struct AttentionLayer {
    pub ln: LayerNorm,
    qk: QkWeights,
    /// `[d_model, H·dh]`.
    pub w_v: Param,
    /// `[H·dh, d_model]`.
    pub w_o: Param,
    cfg: LayerConfig,
    layer: usize,
}

/// What the attention op produced, in head layout, for one group of heads.
enum HeadActs {
    Lsh {
        qk: Tensor,
        v: Tensor,
        out: Tensor,
        saved: LshSaved,
    },
    Exact {
        qk: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Buffer<f32>,
    },
    Local {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Buffer<f32>,
    },
}

impl HeadActs {
    fn out(&self) -> &Tensor {
        match self {
            HeadActs::Lsh { out, .. }
            | HeadActs::Exact { out, .. }
            | HeadActs::Local { out, .. } => out,
        }
    }
}

/// One pass of the sublayer: heads `h0..h0 + dims.heads` of every batch element.
#[derive(Debug, Clone, Copy)]
struct Group {
    h0: usize,
    /// The group's head split (`dims.heads` heads).
    dims: HeadDims,
    /// The group is every head: the weights are used whole, in place.
    all: bool,
}

impl Group {
    /// The group's columns of a `[d_model, H·dh]` projection weight (and rows of `W_o`).
    fn cols(&self) -> Range<usize> {
        let dh = self.dims.d_head;
        self.h0 * dh..(self.h0 + self.dims.heads) * dh
    }

    /// The group's rows of `W_o` `[H·dh, d_model]`, as a range of its values.
    fn w_o_rows(&self, d: usize) -> Range<usize> {
        let c = self.cols();
        c.start * d..c.end * d
    }

    /// Copies of the group's columns of `weights` (`[d, width]` each), from `pool`; none for
    /// the all-heads group.
    fn column_copies(
        &self,
        pool: &MemoryPool,
        weights: &[&Param],
        d: usize,
        width: usize,
    ) -> Result<Vec<Buffer<f32>>> {
        if self.all {
            return Ok(Vec::new());
        }
        weights
            .iter()
            .map(|w| {
                let mut b = pool.alloc::<f32>(d * self.dims.width())?;
                copy_columns(w.value.data(), width, self.cols().start, &mut b)?;
                Ok(b)
            })
            .collect()
    }
}

/// The rotations layer `layer` with config `cfg` hashes with at `ctx.step` for sequences of
/// length `len`: a pure function of `(cfg.seed, ctx.step, layer)`, so any backend (the GPU
/// mirror of the model included) hashes exactly as [`AttentionLayer`] does.
pub fn layer_rotations(
    cfg: &LayerConfig,
    layer: usize,
    len: usize,
    ctx: &StepContext,
) -> Result<Rotations> {
    let mut rng = derive(cfg.seed, &[DOMAIN_ROTATIONS, ctx.step, layer as u64]);
    Ok(Rotations::random(
        cfg.d_head,
        cfg.n_rounds,
        cfg.buckets_for(len),
        &mut rng,
    )?)
}

/// Row blocks `(r0, rows)` of `total` positions, `chunk` at a time.
fn blocks(total: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..total)
        .step_by(chunk.max(1))
        .map(move |r0| (r0, chunk.max(1).min(total - r0)))
}

impl AttentionLayer {
    /// Parameters `{prefix}.attn.*` and `{prefix}.ln_attn.*`; weights `N(0, 1/fan_in)` drawn
    /// from `cfg.seed` and `layer`.
    pub fn new(cfg: &LayerConfig, layer: usize, prefix: &str, pool: &MemoryPool) -> Result<Self> {
        cfg.validate()?;
        let (d, width) = (cfg.d_model, cfg.n_heads * cfg.d_head);
        let mut rng = derive(cfg.seed, &[DOMAIN_PARAMS, layer as u64, 0]);
        let std_in = (d as f32).powf(-0.5);
        let mut w = |name: &str, shape: &[usize], std: f32| {
            Param::randn(pool, format!("{prefix}.attn.{name}"), shape, std, &mut rng)
        };
        let qk = match cfg.attention {
            AttentionKind::Lsh | AttentionKind::Exact => QkWeights::Shared {
                w_qk: w("w_qk", &[d, width], std_in)?,
            },
            AttentionKind::Local => QkWeights::Separate {
                w_q: w("w_q", &[d, width], std_in)?,
                w_k: w("w_k", &[d, width], std_in)?,
            },
        };
        let w_v = w("w_v", &[d, width], std_in)?;
        let w_o = w("w_o", &[width, d], (width as f32).powf(-0.5))?;
        Ok(Self {
            ln: LayerNorm::new(pool, &format!("{prefix}.ln_attn"), d)?,
            qk,
            w_v,
            w_o,
            cfg: cfg.clone(),
            layer,
        })
    }

    pub fn kind(&self) -> AttentionKind {
        self.cfg.attention
    }

    pub fn config(&self) -> &LayerConfig {
        &self.cfg
    }

    /// Changes the number of LSH rounds (no effect on the other kinds).
    pub fn set_rounds(&mut self, n_rounds: usize) {
        self.cfg.n_rounds = n_rounds;
    }

    /// Changes the heads per pass (see [`LayerConfig::head_group`]; no effect on the
    /// parameters, and on results only through rounding).
    pub fn set_head_group(&mut self, head_group: usize) {
        self.cfg.head_group = head_group;
    }

    /// The rotations this layer hashes with at `ctx.step` for sequences of length `len`.
    /// Round `r`'s rotation does not depend on the number of rounds.
    pub fn rotations(&self, len: usize, ctx: &StepContext) -> Result<Rotations> {
        layer_rotations(&self.cfg, self.layer, len, ctx)
    }

    /// For an LSH layer, the rotations of this call (shared by every head group) and their
    /// bytes counted in `pool`.
    fn call_rotations(
        &self,
        pool: &MemoryPool,
        len: usize,
        ctx: &StepContext,
    ) -> Result<Option<(Rotations, Hold)>> {
        if self.cfg.attention != AttentionKind::Lsh {
            return Ok(None);
        }
        let rot = self.rotations(len, ctx)?;
        let bytes = pool.hold(4 * rot.data.len())?;
        Ok(Some((rot, bytes)))
    }

    fn dims(&self, op: &'static str, x: &Tensor) -> Result<HeadDims> {
        match *x.shape() {
            [batch, len, d] if d == self.cfg.d_model && len > 0 => Ok(HeadDims {
                batch,
                len,
                heads: self.cfg.n_heads,
                d_head: self.cfg.d_head,
            }),
            _ => Err(shape_err(op, x.shape(), &[0, 0, self.cfg.d_model])),
        }
    }

    /// The head groups of one call, in order.
    fn groups(&self, hd: HeadDims) -> impl Iterator<Item = Group> {
        let all = self.cfg.heads_per_group() >= hd.heads;
        self.cfg.head_groups().map(move |(h0, heads)| Group {
            h0,
            dims: HeadDims { heads, ..hd },
            all,
        })
    }

    /// The projection weights in the order of the head tensors they make.
    fn projection_weights(&self) -> Vec<&Param> {
        match &self.qk {
            QkWeights::Shared { w_qk } => vec![w_qk, &self.w_v],
            QkWeights::Separate { w_q, w_k } => vec![w_q, w_k, &self.w_v],
        }
    }

    /// `LN(x)·W[:, group columns]` for each projection weight, in the group's head layout, a
    /// block of rows at a time.
    fn project(&self, pool: &MemoryPool, x: &Tensor, grp: Group) -> Result<Vec<Tensor>> {
        let gd = grp.dims;
        let (d, width, gw, chunk) = (
            self.cfg.d_model,
            self.cfg.n_heads * self.cfg.d_head,
            gd.width(),
            self.cfg.ff_chunk,
        );
        let weights = self.projection_weights();
        let mut heads = weights
            .iter()
            .map(|_| Tensor::zeros(pool, &gd.head_shape()))
            .collect::<reformer_engine::Result<Vec<_>>>()?;
        let c_max = chunk.min(gd.rows());
        let mut ln = pool.alloc::<f32>(c_max * d)?;
        let mut p = pool.alloc::<f32>(c_max * gw)?;
        let copies = grp.column_copies(pool, &weights, d, width)?;
        let cols: Vec<&[f32]> = if grp.all {
            weights.iter().map(|w| w.value.data()).collect()
        } else {
            copies.iter().map(|b| &b[..]).collect()
        };
        for (r0, c) in blocks(gd.rows(), chunk) {
            let (ln, p) = (&mut ln[..c * d], &mut p[..c * gw]);
            self.ln.forward_rows(&x.data()[r0 * d..(r0 + c) * d], ln)?;
            for (w, dst) in cols.iter().zip(heads.iter_mut()) {
                matmul(p, ln, w, c, d, gw, false)?;
                scatter_rows(dst, p, r0, c, gd)?;
            }
        }
        Ok(heads)
    }

    /// A group's projections and the attention op (`rot`: the call's LSH rotations).
    fn heads_forward(
        &self,
        pool: &MemoryPool,
        x: &Tensor,
        grp: Group,
        rot: Option<&Rotations>,
    ) -> Result<HeadActs> {
        let causal = self.cfg.causal;
        let mut heads = self.project(pool, x, grp)?.into_iter();
        let mut next = || {
            heads
                .next()
                .ok_or_else(|| ReversibleError::Config("missing projection".into()))
        };
        Ok(match self.cfg.attention {
            AttentionKind::Lsh => {
                let (qk, v) = (next()?, next()?);
                let rot = rot
                    .ok_or_else(|| ReversibleError::Config("LSH layer without rotations".into()))?;
                let lsh = LshConfig {
                    chunk_len: self.cfg.chunk_len,
                    causal,
                };
                let (out, saved) = lsh_attention_forward(&qk, &v, rot, &lsh, None)?;
                HeadActs::Lsh { qk, v, out, saved }
            }
            AttentionKind::Exact => {
                let (qk, v) = (next()?, next()?);
                let k = unit_keys(&qk)?;
                let (out, lse) =
                    exact_attention_forward(&qk, &k, &v, shared_qk_rule(causal), None)?;
                HeadActs::Exact { qk, k, v, out, lse }
            }
            AttentionKind::Local => {
                let (q, k, v) = (next()?, next()?, next()?);
                let local = LocalConfig {
                    chunk_len: self.cfg.chunk_len,
                    causal,
                };
                let (out, lse) = local_attention_forward(&q, &k, &v, &local, None)?;
                HeadActs::Local { q, k, v, out, lse }
            }
        })
    }

    fn output_dropout(&self, ctx: &StepContext) -> Option<Dropout> {
        Dropout::new(
            self.cfg.dropout,
            self.cfg.seed,
            ctx,
            self.layer,
            Site::AttentionOutput,
        )
    }

    /// `out += sign · drop(merge(o)·W_o[group rows])`, a block of rows at a time (`o`: the
    /// group's attention output). Dropout is elementwise, so applying it per group is exact.
    fn output_add(
        &self,
        pool: &MemoryPool,
        o: &Tensor,
        grp: Group,
        out: &mut Tensor,
        sign: f32,
        ctx: &StepContext,
    ) -> Result<()> {
        let gd = grp.dims;
        let (d, gw, chunk) = (self.cfg.d_model, gd.width(), self.cfg.ff_chunk);
        let w_o = &self.w_o.value.data()[grp.w_o_rows(d)];
        let mask = self.output_dropout(ctx);
        let c_max = chunk.min(gd.rows());
        let mut m = pool.alloc::<f32>(c_max * gw)?;
        let mut y = pool.alloc::<f32>(c_max * d)?;
        for (r0, c) in blocks(gd.rows(), chunk) {
            let (m, y) = (&mut m[..c * gw], &mut y[..c * d]);
            gather_rows(o, m, r0, c, gd)?;
            matmul(y, m, w_o, c, gw, d, false)?;
            maybe_apply(mask.as_ref(), y, d, r0);
            axpy_par(&mut out.data_mut()[r0 * d..(r0 + c) * d], sign, y);
        }
        Ok(())
    }

    /// Adds a group's LSH buckets (`[batch·group, rounds, len]`) into `kept`, the call's
    /// `[batch·H, rounds, len]` buckets (allocated at the first group).
    fn keep_buckets(
        &self,
        pool: &MemoryPool,
        kept: &mut Option<Buffer<u32>>,
        buckets: Buffer<u32>,
        hd: HeadDims,
        grp: Group,
    ) -> Result<()> {
        if grp.all {
            *kept = Some(buckets);
            return Ok(());
        }
        let per_head = buckets.len() / (hd.batch * grp.dims.heads).max(1);
        if kept.is_none() {
            *kept = Some(pool.alloc::<u32>(hd.batch * hd.heads * per_head)?);
        }
        let all = kept.as_mut().expect("allocated above");
        for (i, src) in buckets.chunks_exact(per_head).enumerate() {
            let (b, j) = (i / grp.dims.heads, i % grp.dims.heads);
            let dst = (b * hd.heads + grp.h0 + j) * per_head;
            all[dst..dst + per_head].copy_from_slice(src);
        }
        Ok(())
    }

    /// `out += sign · Attn(x)`; with `keep_buckets`, also the LSH buckets.
    fn forward_core(
        &self,
        x: &Tensor,
        out: &mut Tensor,
        sign: f32,
        ctx: &StepContext,
        keep_buckets: bool,
    ) -> Result<Option<Buffer<u32>>> {
        let hd = self.dims("attention input", x)?;
        out.expect_shape("attention output", x.shape())?;
        let pool = x.pool().clone();
        let rot = self.call_rotations(&pool, hd.len, ctx)?;
        let mut kept = None;
        for grp in self.groups(hd) {
            let acts = self.heads_forward(&pool, x, grp, rot.as_ref().map(|r| &r.0))?;
            self.output_add(&pool, acts.out(), grp, out, sign, ctx)?;
            if let (true, HeadActs::Lsh { saved, .. }) = (keep_buckets, acts) {
                self.keep_buckets(&pool, &mut kept, saved.buckets, hd, grp)?;
            }
        }
        Ok(kept)
    }

    /// `out += sign · Attn(x)` for `x`, `out` `[batch, len, d_model]`.
    pub fn forward_add(
        &self,
        x: &Tensor,
        out: &mut Tensor,
        sign: f32,
        ctx: &StepContext,
    ) -> Result<()> {
        self.forward_core(x, out, sign, ctx, false).map(|_| ())
    }

    /// `Attn(x)` for `x` `[batch, len, d_model]`.
    pub fn forward(&self, x: &Tensor, ctx: &StepContext) -> Result<Tensor> {
        let mut out = x.zeros_like()?;
        self.forward_add(x, &mut out, 1.0, ctx)?;
        Ok(out)
    }

    /// [`AttentionLayer::forward_add`], also returning, for an LSH layer, the buckets it
    /// hashed to (`[batch·H, rounds, len]`).
    pub fn forward_add_with_buckets(
        &self,
        x: &Tensor,
        out: &mut Tensor,
        sign: f32,
        ctx: &StepContext,
    ) -> Result<Option<Buffer<u32>>> {
        self.forward_core(x, out, sign, ctx, true)
    }

    /// `Attn(x)` and, for an LSH layer, the buckets it hashed to.
    pub fn forward_with_buckets(
        &self,
        x: &Tensor,
        ctx: &StepContext,
    ) -> Result<(Tensor, Option<Buffer<u32>>)> {
        let mut out = x.zeros_like()?;
        let b = self.forward_core(x, &mut out, 1.0, ctx, true)?;
        Ok((out, b))
    }

    /// Backward at input `x` with output gradient `d_out`: recomputes the forward, adds the
    /// input gradient to `dx`, accumulates parameter gradients, and, with `reconstruct`,
    /// subtracts the recomputed `Attn(x)` from it (turning `Y1` into `X1`). One head group at
    /// a time: each group's share of the reconstruction and of every gradient is added in
    /// turn.
    pub fn backward(
        &mut self,
        x: &Tensor,
        d_out: &Tensor,
        dx: &mut Tensor,
        mut reconstruct: Option<&mut Tensor>,
        ctx: &StepContext,
    ) -> Result<()> {
        let hd = self.dims("attention backward input", x)?;
        d_out.expect_shape("attention d_out", x.shape())?;
        dx.expect_shape("attention dx", x.shape())?;
        if let Some(r) = reconstruct.as_deref() {
            r.expect_shape("attention reconstruction", x.shape())?;
        }
        let pool = x.pool().clone();
        let rot = self.call_rotations(&pool, hd.len, ctx)?;
        for grp in self.groups(hd) {
            let acts = self.heads_forward(&pool, x, grp, rot.as_ref().map(|r| &r.0))?;
            if let Some(r) = reconstruct.as_deref_mut() {
                self.output_add(&pool, acts.out(), grp, r, -1.0, ctx)?;
            }
            let d_heads = self.output_backward(&pool, acts.out(), d_out, grp, ctx)?;
            // Through the attention op, to gradients of the projections in head layout.
            let grads: Vec<Tensor> = match acts {
                HeadActs::Lsh { qk, v, out, saved } => {
                    let lsh = LshConfig {
                        chunk_len: self.cfg.chunk_len,
                        causal: self.cfg.causal,
                    };
                    let rot = rot.as_ref().map(|r| &r.0).ok_or_else(|| {
                        ReversibleError::Config("LSH layer without rotations".into())
                    })?;
                    let (d_qk, d_v) =
                        lsh_attention_backward(&qk, &v, &out, &d_heads, &saved, rot, &lsh, None)?;
                    vec![d_qk, d_v]
                }
                HeadActs::Exact { qk, k, v, out, lse } => {
                    let rule = shared_qk_rule(self.cfg.causal);
                    let (d_q, d_k, d_v) =
                        exact_attention_backward(&qk, &k, &v, &out, &lse, &d_heads, rule, None)?;
                    drop((k, v, out, lse));
                    vec![shared_qk_grad(&qk, d_q, &d_k), d_v]
                }
                HeadActs::Local { q, k, v, out, lse } => {
                    let local = LocalConfig {
                        chunk_len: self.cfg.chunk_len,
                        causal: self.cfg.causal,
                    };
                    let (d_q, d_k, d_v) =
                        local_attention_backward(&q, &k, &v, &out, &lse, &d_heads, &local, None)?;
                    vec![d_q, d_k, d_v]
                }
            };
            drop(d_heads);
            self.projection_backward(&pool, x, &grads, dx, grp)?;
        }
        Ok(())
    }

    /// Through the dropout and the group's rows of `W_o`, a block of rows at a time:
    /// accumulates those rows of `dW_o` and returns the gradient of the group's attention
    /// output in head layout.
    fn output_backward(
        &mut self,
        pool: &MemoryPool,
        o: &Tensor,
        d_out: &Tensor,
        grp: Group,
        ctx: &StepContext,
    ) -> Result<Tensor> {
        let gd = grp.dims;
        let (d, gw, chunk) = (self.cfg.d_model, gd.width(), self.cfg.ff_chunk);
        let rows = grp.w_o_rows(d);
        let mask = self.output_dropout(ctx);
        let c_max = chunk.min(gd.rows());
        let mut m = pool.alloc::<f32>(c_max * gw)?;
        let mut g = pool.alloc::<f32>(c_max * d)?;
        let mut d_heads = Tensor::zeros(pool, &gd.head_shape())?;
        for (r0, c) in blocks(gd.rows(), chunk) {
            let (m, g) = (&mut m[..c * gw], &mut g[..c * d]);
            gather_rows(o, m, r0, c, gd)?;
            g.copy_from_slice(&d_out.data()[r0 * d..(r0 + c) * d]);
            maybe_apply(mask.as_ref(), g, d, r0);
            acc_weight_grad(&mut self.w_o.grad.data_mut()[rows.clone()], m, g, c, gw, d)?;
            matmul_wt(m, g, &self.w_o.value.data()[rows.clone()], c, d, gw, false)?;
            scatter_rows(&mut d_heads, m, r0, c, gd)?;
        }
        Ok(d_heads)
    }

    /// Through the group's columns of the projections and the layer norm, a block of rows at a
    /// time: accumulates the weight and layer-norm gradients and adds the input gradient to
    /// `dx`. `grads` are the group's head-layout gradients of the projections, in the order of
    /// `projection_weights`. The layer norm's backward runs on this group's share of
    /// `d LN(x)` (it is linear in it).
    fn projection_backward(
        &mut self,
        pool: &MemoryPool,
        x: &Tensor,
        grads: &[Tensor],
        dx: &mut Tensor,
        grp: Group,
    ) -> Result<()> {
        let gd = grp.dims;
        let (d, width, gw, chunk) = (
            self.cfg.d_model,
            self.cfg.n_heads * self.cfg.d_head,
            gd.width(),
            self.cfg.ff_chunk,
        );
        let c_max = chunk.min(gd.rows());
        let mut ln = pool.alloc::<f32>(c_max * d)?;
        let mut d_ln = pool.alloc::<f32>(c_max * d)?;
        let mut g = pool.alloc::<f32>(c_max * gw)?;
        // A split group reads copies of its weight columns and sums its weight gradients in
        // `[d, gw]` buffers, added into the full gradients once at the end.
        let copies = grp.column_copies(pool, &self.projection_weights(), d, width)?;
        let mut dws = copies
            .iter()
            .map(|_| pool.alloc::<f32>(d * gw))
            .collect::<reformer_engine::Result<Vec<_>>>()?;
        for (r0, c) in blocks(gd.rows(), chunk) {
            let span = r0 * d..(r0 + c) * d;
            let (ln, d_ln, g) = (&mut ln[..c * d], &mut d_ln[..c * d], &mut g[..c * gw]);
            self.ln.forward_rows(&x.data()[span.clone()], ln)?;
            let weights: Vec<&mut Param> = match &mut self.qk {
                QkWeights::Shared { w_qk } => vec![w_qk, &mut self.w_v],
                QkWeights::Separate { w_q, w_k } => vec![w_q, w_k, &mut self.w_v],
            };
            if weights.len() != grads.len() {
                return Err(ReversibleError::Config(
                    "attention weights and gradients of different kinds".into(),
                ));
            }
            for (i, (w, grad)) in weights.into_iter().zip(grads).enumerate() {
                gather_rows(grad, g, r0, c, gd)?;
                let (dw, wv): (&mut [f32], &[f32]) = if grp.all {
                    (w.grad.data_mut(), w.value.data())
                } else {
                    (&mut dws[i], &copies[i])
                };
                acc_weight_grad(dw, ln, g, c, d, gw)?;
                matmul_wt(d_ln, g, wv, c, gw, d, i > 0)?;
            }
            self.ln.backward_rows(
                pool,
                &x.data()[span.clone()],
                d_ln,
                &mut dx.data_mut()[span],
            )?;
        }
        if !grp.all {
            let weights: Vec<&mut Param> = match &mut self.qk {
                QkWeights::Shared { w_qk } => vec![w_qk, &mut self.w_v],
                QkWeights::Separate { w_q, w_k } => vec![w_q, w_k, &mut self.w_v],
            };
            for (w, dw) in weights.into_iter().zip(&dws) {
                add_columns(w.grad.data_mut(), width, grp.cols().start, dw)?;
            }
        }
        Ok(())
    }
}

impl HasParams for AttentionLayer {
    fn params(&self) -> Vec<&Param> {
        let mut v = self.ln.params();
        match &self.qk {
            QkWeights::Shared { w_qk } => v.push(w_qk),
            QkWeights::Separate { w_q, w_k } => v.extend([w_q, w_k]),
        }
        v.extend([&self.w_v, &self.w_o]);
        v
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut v = self.ln.params_mut();
        match &mut self.qk {
            QkWeights::Shared { w_qk } => v.push(w_qk),
            QkWeights::Separate { w_q, w_k } => v.extend([w_q, w_k]),
        }
        v.extend([&mut self.w_v, &mut self.w_o]);
        v
    }
}
