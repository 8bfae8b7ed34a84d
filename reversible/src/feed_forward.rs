//! The feed-forward sublayer `FF(x) = W2·drop(ReLU(W1·LN(x) + b1)) + b2` (then dropout),
//! applied in chunks of `ff_chunk` positions in forward and backward, so the `d_ff`-wide
//! hidden exists for one chunk at a time. The backward recomputes each chunk's hidden and can
//! rebuild the block's input on the way (`X2 = Y2 − FF(Y1)`).

use reformer_engine::{Buffer, MemoryPool, Tensor};

use crate::config::{LayerConfig, StepContext};
use crate::dropout::{maybe_apply, Dropout, Site};
use crate::error::{shape_err, Result};
use crate::layer_norm::LayerNorm;
use crate::linear::{
    acc_weight_grad, add_bias, add_column_sums, matmul, matmul_wt, relu, relu_backward,
};
use crate::params::{HasParams, Param};
use crate::seed::{derive, DOMAIN_PARAMS};

#[derive(Debug)]
pub struct FeedForward {
    pub ln: LayerNorm,
    /// `[d_model, d_ff]`.
    pub w1: Param,
    pub b1: Param,
    /// `[d_ff, d_model]`.
    pub w2: Param,
    pub b2: Param,
    d_model: usize,
    d_ff: usize,
    ff_chunk: usize,
    dropout: f32,
    seed: u64,
    layer: usize,
}

/// Per-chunk scratch: `ln` `[c, d_model]`, `h` and `g` `[c, d_ff]`, `f` `[c, d_model]`.
struct Scratch {
    ln: Tensor,
    h: Tensor,
    g: Option<Tensor>,
    f: Tensor,
}

impl FeedForward {
    /// Parameters `{prefix}.ff.*` and `{prefix}.ln_ff.*`; weights `N(0, 1/fan_in)`, biases 0,
    /// drawn from `cfg.seed` and `layer`.
    pub fn new(cfg: &LayerConfig, layer: usize, prefix: &str, pool: &MemoryPool) -> Result<Self> {
        cfg.validate()?;
        let (d, f) = (cfg.d_model, cfg.d_ff);
        let mut rng = derive(cfg.seed, &[DOMAIN_PARAMS, layer as u64, 1]);
        Ok(Self {
            ln: LayerNorm::new(pool, &format!("{prefix}.ln_ff"), d)?,
            w1: Param::randn(
                pool,
                format!("{prefix}.ff.w1"),
                &[d, f],
                (d as f32).powf(-0.5),
                &mut rng,
            )?,
            b1: Param::full(pool, format!("{prefix}.ff.b1"), &[f], 0.0)?,
            w2: Param::randn(
                pool,
                format!("{prefix}.ff.w2"),
                &[f, d],
                (f as f32).powf(-0.5),
                &mut rng,
            )?,
            b2: Param::full(pool, format!("{prefix}.ff.b2"), &[d], 0.0)?,
            d_model: d,
            d_ff: f,
            ff_chunk: cfg.ff_chunk,
            dropout: cfg.dropout,
            seed: cfg.seed,
            layer,
        })
    }

    pub fn ff_chunk(&self) -> usize {
        self.ff_chunk
    }

    fn rows_of(&self, op: &'static str, x: &Tensor) -> Result<usize> {
        if x.shape().last() != Some(&self.d_model) {
            return Err(shape_err(op, x.shape(), &[0, self.d_model]));
        }
        Ok(x.numel() / self.d_model)
    }

    fn masks(&self, ctx: &StepContext) -> (Option<Dropout>, Option<Dropout>) {
        let mk = |site| Dropout::new(self.dropout, self.seed, ctx, self.layer, site);
        (mk(Site::FeedForwardHidden), mk(Site::FeedForwardOutput))
    }

    fn scratch(
        &self,
        pool: &MemoryPool,
        rows: usize,
        backward: bool,
        dropout: bool,
    ) -> Result<Scratch> {
        let c = self.ff_chunk.min(rows).max(1);
        Ok(Scratch {
            ln: Tensor::zeros(pool, &[c, self.d_model])?,
            h: Tensor::zeros(pool, &[c, self.d_ff])?,
            g: if backward || dropout {
                Some(Tensor::zeros(pool, &[c, self.d_ff])?)
            } else {
                None
            },
            f: Tensor::zeros(pool, &[c, self.d_model])?,
        })
    }

    /// For rows `r0..r0+c` of `x`: `s.ln = LN(x)`, `s.h = ReLU(ln·W1 + b1)`, the dropped
    /// hidden (in `s.g` when dropout is on, else `s.h` itself), `s.f = FF(x)` after dropout.
    /// Returns whether the dropped hidden is in `s.g`.
    fn chunk_forward(
        &self,
        s: &mut Scratch,
        x: &[f32],
        r0: usize,
        c: usize,
        masks: &(Option<Dropout>, Option<Dropout>),
    ) -> Result<bool> {
        let (d, f) = (self.d_model, self.d_ff);
        let ln = &mut s.ln.data_mut()[..c * d];
        self.ln.forward_rows(&x[r0 * d..(r0 + c) * d], ln)?;
        let h = &mut s.h.data_mut()[..c * f];
        matmul(h, ln, self.w1.value.data(), c, d, f, false)?;
        add_bias(h, self.b1.value.data());
        relu(h);
        let in_g = match (&masks.0, s.g.as_mut()) {
            (Some(m), Some(g)) => {
                let g = &mut g.data_mut()[..c * f];
                g.copy_from_slice(h);
                m.apply(g, f, r0);
                true
            }
            _ => false,
        };
        let hd: &[f32] = match (in_g, &s.g) {
            (true, Some(g)) => &g.data()[..c * f],
            _ => &s.h.data()[..c * f],
        };
        let out = &mut s.f.data_mut()[..c * d];
        matmul(out, hd, self.w2.value.data(), c, f, d, false)?;
        add_bias(out, self.b2.value.data());
        maybe_apply(masks.1.as_ref(), out, d, r0);
        Ok(in_g)
    }

    /// `out += sign · FF(x)`, chunk by chunk. `x`, `out`: `[.., d_model]`, same shape.
    pub fn forward_add(
        &self,
        x: &Tensor,
        out: &mut Tensor,
        sign: f32,
        ctx: &StepContext,
    ) -> Result<()> {
        let rows = self.rows_of("feed-forward input", x)?;
        out.expect_shape("feed-forward output", x.shape())?;
        let masks = self.masks(ctx);
        let mut s = self.scratch(x.pool(), rows, false, masks.0.is_some())?;
        let d = self.d_model;
        for r0 in (0..rows).step_by(self.ff_chunk) {
            let c = self.ff_chunk.min(rows - r0);
            self.chunk_forward(&mut s, x.data(), r0, c, &masks)?;
            crate::linear::axpy_par(
                &mut out.data_mut()[r0 * d..(r0 + c) * d],
                sign,
                &s.f.data()[..c * d],
            );
        }
        Ok(())
    }

    /// Which hidden units are active (pre-activation `> 0`), `[rows, d_ff]` as 0/1, chunk by
    /// chunk. A diagnostic: the feed-forward is smooth except where this pattern changes, so a
    /// gradient check skips perturbations that change it.
    pub fn active_units(&self, x: &Tensor) -> Result<Buffer<u8>> {
        let rows = self.rows_of("feed-forward input", x)?;
        let mut out = x.pool().alloc::<u8>(rows * self.d_ff)?;
        let mut s = self.scratch(x.pool(), rows, false, false)?;
        let f = self.d_ff;
        for r0 in (0..rows).step_by(self.ff_chunk) {
            let c = self.ff_chunk.min(rows - r0);
            self.chunk_forward(&mut s, x.data(), r0, c, &(None, None))?;
            for (o, &h) in out[r0 * f..(r0 + c) * f]
                .iter_mut()
                .zip(&s.h.data()[..c * f])
            {
                *o = u8::from(h > 0.0);
            }
        }
        Ok(out)
    }

    /// `FF(x)` as a new tensor.
    pub fn forward(&self, x: &Tensor, ctx: &StepContext) -> Result<Tensor> {
        let mut out = x.zeros_like()?;
        self.forward_add(x, &mut out, 1.0, ctx)?;
        Ok(out)
    }

    /// Backward of `FF` at input `x` with output gradient `dy`, chunk by chunk: adds the input
    /// gradient to `dx`, accumulates parameter gradients, and, with `reconstruct`, subtracts
    /// the recomputed `FF(x)` from it (turning `Y2` into `X2`).
    pub fn backward(
        &mut self,
        x: &Tensor,
        dy: &Tensor,
        dx: &mut Tensor,
        mut reconstruct: Option<&mut Tensor>,
        ctx: &StepContext,
    ) -> Result<()> {
        let rows = self.rows_of("feed-forward backward input", x)?;
        dy.expect_shape("feed-forward dy", x.shape())?;
        dx.expect_shape("feed-forward dx", x.shape())?;
        if let Some(r) = reconstruct.as_deref() {
            r.expect_shape("feed-forward reconstruction", x.shape())?;
        }
        let masks = self.masks(ctx);
        let pool = x.pool().clone();
        let mut s = self.scratch(&pool, rows, true, masks.0.is_some())?;
        let (d, f) = (self.d_model, self.d_ff);
        for r0 in (0..rows).step_by(self.ff_chunk) {
            let c = self.ff_chunk.min(rows - r0);
            let span = r0 * d..(r0 + c) * d;
            let in_g = self.chunk_forward(&mut s, x.data(), r0, c, &masks)?;
            if let Some(r) = reconstruct.as_deref_mut() {
                crate::linear::axpy_par(
                    &mut r.data_mut()[span.clone()],
                    -1.0,
                    &s.f.data()[..c * d],
                );
            }
            let Scratch { ln, h, g, f: fbuf } = &mut s;
            let g = g
                .as_mut()
                .map(|g| &mut g.data_mut()[..c * f])
                .unwrap_or_default();
            let (ln, h) = (&ln.data()[..c * d], &h.data()[..c * f]);
            // df = drop₂(dy), in the output buffer.
            let df = &mut fbuf.data_mut()[..c * d];
            df.copy_from_slice(&dy.data()[span.clone()]);
            maybe_apply(masks.1.as_ref(), df, d, r0);
            // dW2 += hdᵀ df; db2 += Σ df.
            let hd: &[f32] = if in_g { g } else { h };
            acc_weight_grad(self.w2.grad.data_mut(), hd, df, c, f, d)?;
            add_column_sums(self.b2.grad.data_mut(), df);
            // dh = drop₁(df·W2ᵀ) ∘ [h > 0], in g.
            matmul_wt(g, df, self.w2.value.data(), c, d, f, false)?;
            maybe_apply(masks.0.as_ref(), g, f, r0);
            relu_backward(g, h);
            // dW1 += lnᵀ dh; db1 += Σ dh; dln = dh·W1ᵀ (in the output buffer).
            acc_weight_grad(self.w1.grad.data_mut(), ln, g, c, d, f)?;
            add_column_sums(self.b1.grad.data_mut(), g);
            matmul_wt(df, g, self.w1.value.data(), c, f, d, false)?;
            self.ln
                .backward_rows(&pool, &x.data()[span.clone()], df, &mut dx.data_mut()[span])?;
        }
        Ok(())
    }
}

impl HasParams for FeedForward {
    fn params(&self) -> Vec<&Param> {
        let mut v = self.ln.params();
        v.extend([&self.w1, &self.b1, &self.w2, &self.b2]);
        v
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut v = self.ln.params_mut();
        v.extend([&mut self.w1, &mut self.b1, &mut self.w2, &mut self.b2]);
        v
    }
}
