//! The reversible block's two sublayers on a [`Backend`]: the attention sublayer
//! ([`AttnLayer`]: layer norm, projections into head layout, LSH / local / exact attention,
//! output projection, dropout) and the feed-forward ([`FfLayer`]). Position-wise work runs in
//! blocks of `ff_chunk` rows, heads in groups of `head_group`, so a sublayer holds the head
//! layout of one group and chunk-sized scratch beside the streams. LSH rotations and dropout
//! masks are drawn from `(seed, step, layer)`, so the backward's recomputation replays them;
//! the backward can subtract the sublayer's output from its stream on the way
//! (`reconstruct`), which is how the reversible stack rebuilds each block's input.
//! Parameters are indices into the model's value and gradient lists.

use reformer_reversible::{
    layer_rotations, AttentionKind, Dropout, LayerConfig, Site, StepContext,
};

use crate::backend::{
    AttnCall, Backend, ExactForward, HeadShape, LocalForward, LshForward, Strided,
};
use crate::error::{ReformerError, Result};

/// Row blocks `(r0, rows)` of `total` rows, `chunk` at a time.
pub(crate) fn blocks(total: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..total)
        .step_by(chunk)
        .map(move |r0| (r0, chunk.min(total - r0)))
}

/// Two distinct elements of `v`, mutably.
pub(crate) fn pair_mut<T>(v: &mut [T], i: usize, j: usize) -> Result<(&mut T, &mut T)> {
    if i == j || i >= v.len() || j >= v.len() {
        return Err(ReformerError::InvalidArgument(format!(
            "parameter indices {i} and {j} of {}",
            v.len()
        )));
    }
    if i < j {
        let (a, b) = v.split_at_mut(j);
        Ok((&mut a[i], &mut b[0]))
    } else {
        let (a, b) = v.split_at_mut(i);
        Ok((&mut b[0], &mut a[j]))
    }
}

/// The rows of a batch: `seqs` sequences of `len` positions each (padded to the longest),
/// stored one after another, so row `s·len + p` is position `p` of sequence `s`; `lens[s]`
/// of them are real, the rest padding (masked as keys, outside the loss).
#[derive(Debug, Clone)]
pub struct Seqs {
    pub len: usize,
    pub lens: Vec<usize>,
}

impl Seqs {
    /// One unpadded sequence.
    pub fn one(len: usize) -> Self {
        Self {
            len,
            lens: vec![len],
        }
    }

    pub fn count(&self) -> usize {
        self.lens.len()
    }

    /// Rows of the streams.
    pub fn rows(&self) -> usize {
        self.count() * self.len
    }

    /// Whether some sequence is padded.
    pub fn padded(&self) -> bool {
        self.lens.iter().any(|&l| l < self.len)
    }

    /// The parts of rows `r0..r0 + c` that lie in one sequence each: `(sequence, first
    /// position, rows, offset of the part in the block)`.
    fn parts(&self, r0: usize, c: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        let len = self.len.max(1);
        let mut row = r0;
        std::iter::from_fn(move || {
            if row >= r0 + c {
                return None;
            }
            let (s, p) = (row / len, row % len);
            let n = (len - p).min(r0 + c - row);
            let part = (s, p, n, row - r0);
            row += n;
            Some(part)
        })
    }
}

/// Copies rows `r0..r0 + rows` of a `width`-wide buffer into the top of `dst`.
pub(crate) fn rows_in<B: Backend>(
    b: &B,
    src: &B::Buf,
    dst: &mut B::Buf,
    r0: usize,
    rows: usize,
    width: usize,
) -> Result<()> {
    b.copy2d(
        src,
        Strided::new(r0 * width, width),
        dst,
        Strided::new(0, width),
        rows,
        width,
        1.0,
        false,
    )
}

/// `dst[r0.., :] (+)= alpha · src[..rows, :]` for a `width`-wide `dst`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_out<B: Backend>(
    b: &B,
    src: &B::Buf,
    dst: &mut B::Buf,
    r0: usize,
    rows: usize,
    width: usize,
    alpha: f32,
    accumulate: bool,
) -> Result<()> {
    b.copy2d(
        src,
        Strided::new(0, width),
        dst,
        Strided::new(r0 * width, width),
        rows,
        width,
        alpha,
        accumulate,
    )
}

/// A block of rows of a sublayer's input with its layer norm: the rows, `LN` of them, and the
/// per-row statistics the backward reads. Every sublayer normalises its input this way.
pub(crate) struct LnBlock<B: Backend> {
    xs: B::Buf,
    pub(crate) ln: B::Buf,
    mean: B::Buf,
    rstd: B::Buf,
}

impl<B: Backend> LnBlock<B> {
    pub(crate) fn new(b: &B, rows: usize, d: usize) -> Result<Self> {
        Ok(Self {
            xs: b.alloc(&[rows, d])?,
            ln: b.alloc(&[rows, d])?,
            mean: b.alloc(&[rows])?,
            rstd: b.alloc(&[rows])?,
        })
    }

    /// Rows `r0..r0 + c` of `x` (width `d`) and their layer norm with gain and bias `(g, beta)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load(
        &mut self,
        b: &B,
        vals: &[B::Buf],
        (g, beta): (usize, usize),
        x: &B::Buf,
        r0: usize,
        c: usize,
        d: usize,
    ) -> Result<()> {
        rows_in(b, x, &mut self.xs, r0, c, d)?;
        b.layer_norm_forward(
            &self.xs,
            &vals[g],
            &vals[beta],
            &mut self.ln,
            &mut self.mean,
            &mut self.rstd,
            c,
            d,
        )
    }

    /// Adds `LN'ᵀ dy` to rows `r0..r0 + c` of `dx` (through the scratch `dxs`) and accumulates
    /// the gain and bias gradients.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        b: &B,
        vals: &[B::Buf],
        grads: &mut [B::Buf],
        (g, beta): (usize, usize),
        dy: &B::Buf,
        dxs: &mut B::Buf,
        dx: &mut B::Buf,
        r0: usize,
        c: usize,
        d: usize,
    ) -> Result<()> {
        let (dg, db) = pair_mut(grads, g, beta)?;
        b.layer_norm_backward(
            &self.xs, &vals[g], &self.mean, &self.rstd, dy, dxs, dg, db, c, d,
        )?;
        rows_out(b, dxs, dx, r0, c, d, 1.0, true)
    }
}

/// One group of heads `h0..h0 + heads` of a call over a batch of sequences.
#[derive(Debug, Clone, Copy)]
struct Group<'a> {
    h0: usize,
    heads: usize,
    d_head: usize,
    seqs: &'a Seqs,
    /// The group is every head (weights are used whole, in place).
    all: bool,
}

impl Group<'_> {
    fn width(&self) -> usize {
        self.heads * self.d_head
    }

    /// Head layout `[seqs·heads, len, dh]`: head `j` of sequence `s` is head-row `s·heads + j`.
    fn shape(&self) -> HeadShape {
        HeadShape {
            heads: self.seqs.count() * self.heads,
            len: self.seqs.len,
            d: self.d_head,
        }
    }

    fn rows(&self) -> usize {
        self.seqs.rows()
    }

    /// For the model-layout block of rows `r0..r0 + c` (`[c, width]`), each head's part of
    /// each sequence in it: `(head layout view, block view, rows)`.
    fn views(&self, r0: usize, c: usize) -> impl Iterator<Item = (Strided, Strided, usize)> + '_ {
        let (dh, gw, len, heads) = (self.d_head, self.width(), self.seqs.len, self.heads);
        self.seqs.parts(r0, c).flat_map(move |(s, p, n, at)| {
            (0..heads).map(move |j| {
                (
                    Strided::new(((s * heads + j) * len + p) * dh, dh),
                    Strided::new(at * gw + j * dh, gw),
                    n,
                )
            })
        })
    }

    /// Head-layout activation rows `r0..r0 + c` → model layout block `[c, width]`.
    fn gather<B: Backend>(
        &self,
        b: &B,
        heads: &B::Act,
        block: &mut B::Buf,
        r0: usize,
        c: usize,
    ) -> Result<()> {
        for (h, m, n) in self.views(r0, c) {
            b.copy_from_act(heads, h, block, m, n, self.d_head)?;
        }
        Ok(())
    }

    /// Head-layout gradient rows (f32) `r0..r0 + c` → model layout block `[c, width]`.
    fn gather_grad<B: Backend>(
        &self,
        b: &B,
        heads: &B::Buf,
        block: &mut B::Buf,
        r0: usize,
        c: usize,
    ) -> Result<()> {
        for (h, m, n) in self.views(r0, c) {
            b.copy2d(heads, h, block, m, n, self.d_head, 1.0, false)?;
        }
        Ok(())
    }

    /// Model layout block `[c, width]` → head-layout activation rows `r0..r0 + c`.
    fn scatter<B: Backend>(
        &self,
        b: &B,
        block: &B::Buf,
        heads: &mut B::Act,
        r0: usize,
        c: usize,
    ) -> Result<()> {
        for (h, m, n) in self.views(r0, c) {
            b.copy_to_act(block, m, heads, h, n, self.d_head)?;
        }
        Ok(())
    }
}

/// The attention sublayer's parameters and configuration.
#[derive(Debug, Clone)]
pub(crate) struct AttnLayer {
    pub cfg: LayerConfig,
    pub layer: usize,
    pub ln_g: usize,
    pub ln_b: usize,
    /// Projection weights `[d_model, H·dh]` in the order of the head tensors they make:
    /// `[w_qk, w_v]` (LSH, exact) or `[w_q, w_k, w_v]` (local).
    pub proj: Vec<usize>,
    /// `[H·dh, d_model]`.
    pub w_o: usize,
}

/// What the attention op produced for one group, in head layout.
enum HeadActs<B: Backend> {
    Lsh {
        qk: B::Act,
        v: B::Act,
        out: B::Act,
        saved: B::LshSaved,
    },
    Exact {
        qk: B::Act,
        v: B::Act,
        out: B::Act,
        lse: B::Buf,
    },
    Local {
        q: B::Act,
        k: B::Act,
        v: B::Act,
        out: B::Act,
        lse: B::Buf,
    },
}

impl<B: Backend> HeadActs<B> {
    fn out(&self) -> &B::Act {
        match self {
            HeadActs::Lsh { out, .. }
            | HeadActs::Exact { out, .. }
            | HeadActs::Local { out, .. } => out,
        }
    }
}

impl AttnLayer {
    fn groups<'a>(&self, seqs: &'a Seqs) -> impl Iterator<Item = Group<'a>> {
        let all = self.cfg.heads_per_group() >= self.cfg.n_heads;
        let d_head = self.cfg.d_head;
        self.cfg.head_groups().map(move |(h0, heads)| Group {
            h0,
            heads,
            d_head,
            seqs,
            all,
        })
    }

    pub(crate) fn width(&self) -> usize {
        self.cfg.n_heads * self.cfg.d_head
    }

    fn dropout(&self, ctx: &StepContext) -> Option<Dropout> {
        Dropout::new(
            self.cfg.dropout,
            self.cfg.seed,
            ctx,
            self.layer,
            Site::AttentionOutput,
        )
    }

    /// The group's columns `[d, gw]` of weight `w` (none for the all-heads group).
    fn column_copy<B: Backend>(&self, b: &B, w: &B::Buf, grp: Group) -> Result<B::Buf> {
        let (d, gw) = (self.cfg.d_model, grp.width());
        let mut c = b.alloc(&[d, gw])?;
        b.copy2d(
            w,
            Strided::new(grp.h0 * grp.d_head, self.width()),
            &mut c,
            Strided::new(0, gw),
            d,
            gw,
            1.0,
            false,
        )?;
        Ok(c)
    }

    /// The group's rows `[gw, d]` of `W_o` (none for the all-heads group).
    fn w_o_rows<B: Backend>(&self, b: &B, w_o: &B::Buf, grp: Group) -> Result<B::Buf> {
        let (d, gw) = (self.cfg.d_model, grp.width());
        let mut c = b.alloc(&[gw, d])?;
        b.copy2d(
            w_o,
            Strided::new(grp.h0 * grp.d_head * d, d),
            &mut c,
            Strided::new(0, d),
            gw,
            d,
            1.0,
            false,
        )?;
        Ok(c)
    }

    /// `LN(x)·W[:, group columns]` for each projection, in head layout.
    fn project<B: Backend>(
        &self,
        b: &B,
        vals: &[B::Buf],
        x: &B::Buf,
        grp: Group,
    ) -> Result<Vec<B::Act>> {
        let (d, gw, chunk, len) = (self.cfg.d_model, grp.width(), self.cfg.ff_chunk, grp.rows());
        let mut heads = self
            .proj
            .iter()
            .map(|_| b.alloc_act(&grp.shape().dims()))
            .collect::<Result<Vec<_>>>()?;
        let c_max = chunk.min(len);
        let mut ln = LnBlock::new(b, c_max, d)?;
        let mut p = b.alloc(&[c_max, gw])?;
        let copies = if grp.all {
            Vec::new()
        } else {
            self.proj
                .iter()
                .map(|&w| self.column_copy(b, &vals[w], grp))
                .collect::<Result<Vec<_>>>()?
        };
        for (r0, c) in blocks(len, chunk) {
            ln.load(b, vals, (self.ln_g, self.ln_b), x, r0, c, d)?;
            for (i, dst) in heads.iter_mut().enumerate() {
                let w = if grp.all {
                    &vals[self.proj[i]]
                } else {
                    &copies[i]
                };
                b.gemm(&mut p, &ln.ln, w, c, d, gw, false, false, false)?;
                grp.scatter(b, &p, dst, r0, c)?;
            }
        }
        Ok(heads)
    }

    /// The group's attention call: its head layout, and the key mask when a sequence is padded.
    fn call<'m, B: Backend>(&self, grp: Group, mask: Option<&'m B::Mask>) -> AttnCall<'m, B::Mask> {
        AttnCall {
            shape: grp.shape(),
            chunk: self.cfg.chunk_len,
            causal: self.cfg.causal,
            mask,
        }
    }

    /// The key mask of the group's head layout, when some sequence is padded.
    fn mask<B: Backend>(&self, b: &B, grp: Group) -> Result<Option<B::Mask>> {
        if !grp.seqs.padded() {
            return Ok(None);
        }
        Ok(Some(b.key_mask(&grp.seqs.lens, grp.heads, grp.seqs.len)?))
    }

    fn heads_forward<B: Backend>(
        &self,
        b: &B,
        vals: &[B::Buf],
        x: &B::Buf,
        grp: Group,
        rot: Option<&reformer_lsh::Rotations>,
        call: &AttnCall<'_, B::Mask>,
    ) -> Result<HeadActs<B>> {
        let mut heads = self.project(b, vals, x, grp)?.into_iter();
        let mut next = || {
            heads
                .next()
                .ok_or_else(|| ReformerError::Config("missing projection".into()))
        };
        Ok(match self.cfg.attention {
            AttentionKind::Lsh => {
                let (qk, v) = (next()?, next()?);
                let rot =
                    rot.ok_or_else(|| ReformerError::Config("LSH layer without rotations".into()))?;
                let (out, saved) = b.lsh_forward(&qk, &v, rot, call)?;
                HeadActs::Lsh { qk, v, out, saved }
            }
            AttentionKind::Exact => {
                let (qk, v) = (next()?, next()?);
                let (out, lse) = b.exact_forward(&qk, &v, call)?;
                HeadActs::Exact { qk, v, out, lse }
            }
            AttentionKind::Local => {
                let (q, k, v) = (next()?, next()?, next()?);
                let (out, lse) = b.local_forward(&q, &k, &v, call)?;
                HeadActs::Local { q, k, v, out, lse }
            }
        })
    }

    fn rotations(&self, len: usize, ctx: &StepContext) -> Result<Option<reformer_lsh::Rotations>> {
        if self.cfg.attention != AttentionKind::Lsh {
            return Ok(None);
        }
        Ok(Some(layer_rotations(&self.cfg, self.layer, len, ctx)?))
    }

    /// `out += sign · drop(merge(o)·W_o[group rows])`.
    #[allow(clippy::too_many_arguments)]
    fn output_add<B: Backend>(
        &self,
        b: &B,
        vals: &[B::Buf],
        o: &B::Act,
        grp: Group,
        out: &mut B::Buf,
        sign: f32,
        ctx: &StepContext,
    ) -> Result<()> {
        let (d, gw, chunk) = (self.cfg.d_model, grp.width(), self.cfg.ff_chunk);
        let copy = if grp.all {
            None
        } else {
            Some(self.w_o_rows(b, &vals[self.w_o], grp)?)
        };
        let w_o = copy.as_ref().unwrap_or(&vals[self.w_o]);
        let mask = self.dropout(ctx);
        let c_max = chunk.min(grp.rows());
        let mut m = b.alloc(&[c_max, gw])?;
        let mut y = b.alloc(&[c_max, d])?;
        for (r0, c) in blocks(grp.rows(), chunk) {
            grp.gather(b, o, &mut m, r0, c)?;
            b.gemm(&mut y, &m, w_o, c, gw, d, false, false, false)?;
            if let Some(mask) = &mask {
                b.dropout_rows(&mut y, c, d, r0, mask)?;
            }
            rows_out(b, &y, out, r0, c, d, sign, true)?;
        }
        Ok(())
    }

    /// `out += sign · Attn(x)` for `x`, `out` `[seqs.rows(), d_model]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_add<B: Backend>(
        &self,
        b: &B,
        vals: &[B::Buf],
        x: &B::Buf,
        out: &mut B::Buf,
        sign: f32,
        seqs: &Seqs,
        ctx: &StepContext,
    ) -> Result<()> {
        let rot = self.rotations(seqs.len, ctx)?;
        self.forward_add_with(b, vals, x, out, sign, seqs, ctx, rot.as_ref())
    }

    /// [`AttnLayer::forward_add`] with the LSH rotations given (the decoder's prefill draws
    /// them for its capacity, not the context's length).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_add_with<B: Backend>(
        &self,
        b: &B,
        vals: &[B::Buf],
        x: &B::Buf,
        out: &mut B::Buf,
        sign: f32,
        seqs: &Seqs,
        ctx: &StepContext,
        rot: Option<&reformer_lsh::Rotations>,
    ) -> Result<()> {
        for grp in self.groups(seqs) {
            let mask = self.mask(b, grp)?;
            let call = self.call::<B>(grp, mask.as_ref());
            let acts = self.heads_forward(b, vals, x, grp, rot, &call)?;
            self.output_add(b, vals, acts.out(), grp, out, sign, ctx)?;
        }
        Ok(())
    }

    /// Backward at input `x` with output gradient `d_out`: adds the input gradient to `dx`,
    /// accumulates parameter gradients, and with `reconstruct` subtracts `Attn(x)` from it.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        b: &B,
        vals: &[B::Buf],
        grads: &mut [B::Buf],
        x: &B::Buf,
        d_out: &B::Buf,
        dx: &mut B::Buf,
        mut reconstruct: Option<&mut B::Buf>,
        seqs: &Seqs,
        ctx: &StepContext,
    ) -> Result<()> {
        let rot = self.rotations(seqs.len, ctx)?;
        for grp in self.groups(seqs) {
            let mask = self.mask(b, grp)?;
            let call = self.call::<B>(grp, mask.as_ref());
            let acts = self.heads_forward(b, vals, x, grp, rot.as_ref(), &call)?;
            if let Some(r) = reconstruct.as_deref_mut() {
                self.output_add(b, vals, acts.out(), grp, r, -1.0, ctx)?;
            }
            let d_heads = self.output_backward(b, vals, grads, acts.out(), d_out, grp, ctx)?;
            let head_grads: Vec<B::Buf> = match acts {
                HeadActs::Lsh { qk, v, out, saved } => {
                    let rot = rot.as_ref().ok_or_else(|| {
                        ReformerError::Config("LSH layer without rotations".into())
                    })?;
                    let fwd = LshForward {
                        qk: &qk,
                        v: &v,
                        out: &out,
                        saved: &saved,
                    };
                    let (d_qk, d_v) = b.lsh_backward(fwd, &d_heads, rot, &call)?;
                    vec![d_qk, d_v]
                }
                HeadActs::Exact { qk, v, out, lse } => {
                    let fwd = ExactForward {
                        qk: &qk,
                        v: &v,
                        out: &out,
                        lse: &lse,
                    };
                    let (d_qk, d_v) = b.exact_backward(fwd, &d_heads, &call)?;
                    vec![d_qk, d_v]
                }
                HeadActs::Local { q, k, v, out, lse } => {
                    let fwd = LocalForward {
                        q: &q,
                        k: &k,
                        v: &v,
                        out: &out,
                        lse: &lse,
                    };
                    let (d_q, d_k, d_v) = b.local_backward(fwd, &d_heads, &call)?;
                    vec![d_q, d_k, d_v]
                }
            };
            drop(d_heads);
            self.projection_backward(b, vals, grads, x, &head_grads, dx, grp)?;
        }
        Ok(())
    }

    /// Through the dropout and the group's rows of `W_o`: accumulates `dW_o` and returns the
    /// gradient of the group's attention output in head layout.
    #[allow(clippy::too_many_arguments)]
    fn output_backward<B: Backend>(
        &self,
        b: &B,
        vals: &[B::Buf],
        grads: &mut [B::Buf],
        o: &B::Act,
        d_out: &B::Buf,
        grp: Group,
        ctx: &StepContext,
    ) -> Result<B::Act> {
        let (d, gw, chunk) = (self.cfg.d_model, grp.width(), self.cfg.ff_chunk);
        let mask = self.dropout(ctx);
        let copy = if grp.all {
            None
        } else {
            Some(self.w_o_rows(b, &vals[self.w_o], grp)?)
        };
        let w_o = copy.as_ref().unwrap_or(&vals[self.w_o]);
        let mut dw = if grp.all {
            None
        } else {
            Some(b.zeros(&[gw, d])?)
        };
        let c_max = chunk.min(grp.rows());
        let mut m = b.alloc(&[c_max, gw])?;
        let mut g = b.alloc(&[c_max, d])?;
        let mut d_heads = b.alloc_act(&grp.shape().dims())?;
        for (r0, c) in blocks(grp.rows(), chunk) {
            grp.gather(b, o, &mut m, r0, c)?;
            rows_in(b, d_out, &mut g, r0, c, d)?;
            if let Some(mask) = &mask {
                b.dropout_rows(&mut g, c, d, r0, mask)?;
            }
            let target = match dw.as_mut() {
                Some(t) => t,
                None => &mut grads[self.w_o],
            };
            b.gemm(target, &m, &g, gw, c, d, true, false, true)?;
            b.gemm(&mut m, &g, w_o, c, d, gw, false, true, false)?;
            grp.scatter(b, &m, &mut d_heads, r0, c)?;
        }
        if let Some(dw) = dw {
            b.copy2d(
                &dw,
                Strided::new(0, d),
                &mut grads[self.w_o],
                Strided::new(grp.h0 * grp.d_head * d, d),
                gw,
                d,
                1.0,
                true,
            )?;
        }
        Ok(d_heads)
    }

    /// Through the group's projection columns and the layer norm: accumulates weight and
    /// layer-norm gradients and adds the input gradient to `dx`.
    #[allow(clippy::too_many_arguments)]
    fn projection_backward<B: Backend>(
        &self,
        b: &B,
        vals: &[B::Buf],
        grads: &mut [B::Buf],
        x: &B::Buf,
        head_grads: &[B::Buf],
        dx: &mut B::Buf,
        grp: Group,
    ) -> Result<()> {
        if head_grads.len() != self.proj.len() {
            return Err(ReformerError::Config(
                "attention weights and gradients of different kinds".into(),
            ));
        }
        let (d, gw, chunk, width) = (
            self.cfg.d_model,
            grp.width(),
            self.cfg.ff_chunk,
            self.width(),
        );
        let c_max = chunk.min(grp.rows());
        let mut ln = LnBlock::new(b, c_max, d)?;
        let mut d_ln = b.alloc(&[c_max, d])?;
        let mut dxs = b.alloc(&[c_max, d])?;
        let mut g = b.alloc(&[c_max, gw])?;
        let (copies, mut dws) = if grp.all {
            (Vec::new(), Vec::new())
        } else {
            let copies = self
                .proj
                .iter()
                .map(|&w| self.column_copy(b, &vals[w], grp))
                .collect::<Result<Vec<_>>>()?;
            let dws = self
                .proj
                .iter()
                .map(|_| b.zeros(&[d, gw]))
                .collect::<Result<Vec<_>>>()?;
            (copies, dws)
        };
        for (r0, c) in blocks(grp.rows(), chunk) {
            ln.load(b, vals, (self.ln_g, self.ln_b), x, r0, c, d)?;
            for (i, hg) in head_grads.iter().enumerate() {
                grp.gather_grad(b, hg, &mut g, r0, c)?;
                let (dw, w) = if grp.all {
                    (&mut grads[self.proj[i]], &vals[self.proj[i]])
                } else {
                    (&mut dws[i], &copies[i])
                };
                b.gemm(dw, &ln.ln, &g, d, c, gw, true, false, true)?;
                b.gemm(&mut d_ln, &g, w, c, gw, d, false, true, i > 0)?;
            }
            let params = (self.ln_g, self.ln_b);
            ln.backward(b, vals, grads, params, &d_ln, &mut dxs, dx, r0, c, d)?;
        }
        for (i, dw) in dws.iter().enumerate() {
            b.copy2d(
                dw,
                Strided::new(0, gw),
                &mut grads[self.proj[i]],
                Strided::new(grp.h0 * grp.d_head, width),
                d,
                gw,
                1.0,
                true,
            )?;
        }
        Ok(())
    }
}

/// The feed-forward sublayer `W2·drop(ReLU(W1·LN(x) + b1)) + b2` (then dropout).
#[derive(Debug, Clone)]
pub(crate) struct FfLayer {
    pub cfg: LayerConfig,
    pub layer: usize,
    pub ln_g: usize,
    pub ln_b: usize,
    pub w1: usize,
    pub b1: usize,
    pub w2: usize,
    pub b2: usize,
}

/// Per-chunk scratch of the feed-forward.
struct FfScratch<B: Backend> {
    ln: LnBlock<B>,
    h: B::Buf,
    g: Option<B::Buf>,
    f: B::Buf,
}

type Masks = (Option<Dropout>, Option<Dropout>);

impl FfLayer {
    fn masks(&self, ctx: &StepContext) -> Masks {
        let mk = |site| Dropout::new(self.cfg.dropout, self.cfg.seed, ctx, self.layer, site);
        (mk(Site::FeedForwardHidden), mk(Site::FeedForwardOutput))
    }

    fn scratch<B: Backend>(&self, b: &B, rows: usize, with_g: bool) -> Result<FfScratch<B>> {
        let (d, f) = (self.cfg.d_model, self.cfg.d_ff);
        let c = self.cfg.ff_chunk.min(rows).max(1);
        Ok(FfScratch {
            ln: LnBlock::new(b, c, d)?,
            h: b.alloc(&[c, f])?,
            g: if with_g {
                Some(b.alloc(&[c, f])?)
            } else {
                None
            },
            f: b.alloc(&[c, d])?,
        })
    }

    /// Rows `r0..r0 + c` of `x`: `s.ln = LN(x)`, `s.h = ReLU(ln·W1 + b1)`, the dropped hidden
    /// in `s.g` when dropout is on (returns true), `s.f = FF(x)`.
    #[allow(clippy::too_many_arguments)]
    fn chunk_forward<B: Backend>(
        &self,
        b: &B,
        vals: &[B::Buf],
        s: &mut FfScratch<B>,
        x: &B::Buf,
        r0: usize,
        c: usize,
        masks: &Masks,
    ) -> Result<bool> {
        let (d, f) = (self.cfg.d_model, self.cfg.d_ff);
        s.ln.load(b, vals, (self.ln_g, self.ln_b), x, r0, c, d)?;
        b.gemm(
            &mut s.h,
            &s.ln.ln,
            &vals[self.w1],
            c,
            d,
            f,
            false,
            false,
            false,
        )?;
        b.add_bias(&mut s.h, &vals[self.b1], c, f)?;
        b.relu_in_place(&mut s.h, c * f)?;
        let in_g = match (&masks.0, s.g.as_mut()) {
            (Some(m), Some(g)) => {
                b.copy2d(
                    &s.h,
                    Strided::new(0, c * f),
                    g,
                    Strided::new(0, c * f),
                    1,
                    c * f,
                    1.0,
                    false,
                )?;
                b.dropout_rows(g, c, f, r0, m)?;
                true
            }
            _ => false,
        };
        let hd = match (in_g, &s.g) {
            (true, Some(g)) => g,
            _ => &s.h,
        };
        b.gemm(&mut s.f, hd, &vals[self.w2], c, f, d, false, false, false)?;
        b.add_bias(&mut s.f, &vals[self.b2], c, d)?;
        if let Some(m) = &masks.1 {
            b.dropout_rows(&mut s.f, c, d, r0, m)?;
        }
        Ok(in_g)
    }

    /// `out += sign · FF(x)` over `rows` rows.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_add<B: Backend>(
        &self,
        b: &B,
        vals: &[B::Buf],
        x: &B::Buf,
        out: &mut B::Buf,
        sign: f32,
        rows: usize,
        ctx: &StepContext,
    ) -> Result<()> {
        let masks = self.masks(ctx);
        let mut s = self.scratch(b, rows, masks.0.is_some())?;
        let d = self.cfg.d_model;
        for (r0, c) in blocks(rows, self.cfg.ff_chunk) {
            self.chunk_forward(b, vals, &mut s, x, r0, c, &masks)?;
            rows_out(b, &s.f, out, r0, c, d, sign, true)?;
        }
        Ok(())
    }

    /// Backward at `x` with output gradient `dy`: adds the input gradient to `dx`,
    /// accumulates parameter gradients, and with `reconstruct` subtracts `FF(x)` from it.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        b: &B,
        vals: &[B::Buf],
        grads: &mut [B::Buf],
        x: &B::Buf,
        dy: &B::Buf,
        dx: &mut B::Buf,
        mut reconstruct: Option<&mut B::Buf>,
        rows: usize,
        ctx: &StepContext,
    ) -> Result<()> {
        let masks = self.masks(ctx);
        let mut s = self.scratch(b, rows, true)?;
        let (d, f) = (self.cfg.d_model, self.cfg.d_ff);
        let c_max = self.cfg.ff_chunk.min(rows).max(1);
        let mut dxs = b.alloc(&[c_max, d])?;
        for (r0, c) in blocks(rows, self.cfg.ff_chunk) {
            let in_g = self.chunk_forward(b, vals, &mut s, x, r0, c, &masks)?;
            if let Some(r) = reconstruct.as_deref_mut() {
                rows_out(b, &s.f, r, r0, c, d, -1.0, true)?;
            }
            let FfScratch { ln, h, g, f: df } = &mut s;
            let g = g
                .as_mut()
                .ok_or_else(|| ReformerError::Config("feed-forward scratch without g".into()))?;
            // df = drop₂(dy).
            rows_in(b, dy, df, r0, c, d)?;
            if let Some(m) = &masks.1 {
                b.dropout_rows(df, c, d, r0, m)?;
            }
            // dW2 += hdᵀ df; db2 += Σ df.
            let hd: &B::Buf = if in_g { g } else { h };
            b.gemm(&mut grads[self.w2], hd, df, f, c, d, true, false, true)?;
            b.column_sums_acc(df, &mut grads[self.b2], c, d)?;
            // dh = drop₁(df·W2ᵀ) ∘ [h > 0].
            b.gemm(g, df, &vals[self.w2], c, d, f, false, true, false)?;
            if let Some(m) = &masks.0 {
                b.dropout_rows(g, c, f, r0, m)?;
            }
            b.relu_mask_in_place(h, g, c * f)?;
            // dW1 += lnᵀ dh; db1 += Σ dh; dln = dh·W1ᵀ (into df).
            b.gemm(&mut grads[self.w1], &ln.ln, g, d, c, f, true, false, true)?;
            b.column_sums_acc(g, &mut grads[self.b1], c, f)?;
            b.gemm(df, g, &vals[self.w1], c, f, d, false, true, false)?;
            let params = (self.ln_g, self.ln_b);
            ln.backward(b, vals, grads, params, df, &mut dxs, dx, r0, c, d)?;
        }
        Ok(())
    }
}
