//! The LM head and its loss: `concat(Y1, Y2)` → LayerNorm(2·d_model) → Linear(2·d_model → 256)
//! → cross-entropy against the next byte, computed in chunks of `loss_chunk` positions so the
//! logits never exist for the whole sequence.
//!
//! Training uses [`LmHead::loss_and_backward`], which runs forward and backward chunk by chunk:
//! each chunk's logits are computed once, turned into the chunk's loss and its gradient, and
//! dropped before the next chunk. Memory for the head is `O(loss_chunk · (2·d_model + 256))`
//! beyond its inputs and the `dY1, dY2` it returns.

use rayon::prelude::*;
use reformer_engine::matmul::{gemm, Par};
use reformer_engine::{MemoryPool, Rng, Tensor};
use reformer_reversible::LayerNorm;

use crate::config::VOCAB;
use crate::error::{ReformerError, Result};
use crate::param::{param_randn, HasParams, Param};

#[derive(Debug)]
pub struct LmHead {
    pub norm: LayerNorm,
    /// `[2·d_model, 256]`.
    pub weight: Param,
    /// `[256]`.
    pub bias: Param,
    d_model: usize,
    chunk: usize,
}

/// Scratch for one chunk, drawn from the pool once per call.
struct Scratch {
    h: Tensor,
    hn: Tensor,
    logits: Tensor,
}

impl Scratch {
    fn new(pool: &MemoryPool, rows: usize, width: usize) -> Result<Self> {
        Ok(Self {
            h: Tensor::zeros(pool, &[rows, width])?,
            hn: Tensor::zeros(pool, &[rows, width])?,
            logits: Tensor::zeros(pool, &[rows, VOCAB])?,
        })
    }
}

/// One row's cross-entropy `logsumexp(row) − row[target]`; the row becomes its gradient
/// `scale · (softmax(row) − onehot(target))`.
pub fn cross_entropy_row(row: &mut [f32], target: usize, scale: f32) -> f32 {
    let lse = reformer_engine::ops::logsumexp(row);
    let loss = lse - row[target];
    for v in row.iter_mut() {
        *v = (*v - lse).exp() * scale;
    }
    row[target] -= scale;
    loss
}

impl LmHead {
    pub fn new(pool: &MemoryPool, d_model: usize, chunk: usize, rng: &mut Rng) -> Result<Self> {
        let width = 2 * d_model;
        let std = (1.0 / width as f32).sqrt();
        Ok(Self {
            norm: LayerNorm::new(pool, "head.norm", width)?,
            weight: param_randn(pool, "head.weight", &[width, VOCAB], std, rng)?,
            bias: param_randn(pool, "head.bias", &[VOCAB], 0.0, rng)?,
            d_model,
            chunk: chunk.max(1),
        })
    }

    /// Positions per chunk.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    pub fn set_chunk(&mut self, chunk: usize) {
        self.chunk = chunk.max(1);
    }

    fn check(&self, y1: &Tensor, y2: &Tensor, len: usize) -> Result<()> {
        let d = self.d_model;
        for (name, y) in [("Y1", y1), ("Y2", y2)] {
            if y.numel() != len * d || y.shape().last() != Some(&d) {
                return Err(ReformerError::InvalidArgument(format!(
                    "LM head: {name} has shape {:?}, expected {len} positions of width {d}",
                    y.shape()
                )));
            }
        }
        Ok(())
    }

    /// Logits of rows `start..start + rows` into the scratch (concat, norm, linear).
    fn chunk_logits(
        &self,
        y1: &[f32],
        y2: &[f32],
        start: usize,
        rows: usize,
        s: &mut Scratch,
    ) -> Result<()> {
        let d = self.d_model;
        let w = 2 * d;
        let h = &mut s.h.data_mut()[..rows * w];
        for (r, row) in h.chunks_mut(w).enumerate() {
            let p = start + r;
            row[..d].copy_from_slice(&y1[p * d..(p + 1) * d]);
            row[d..].copy_from_slice(&y2[p * d..(p + 1) * d]);
        }
        let hn = &mut s.hn.data_mut()[..rows * w];
        self.norm.forward_rows(h, hn)?;
        let logits = &mut s.logits.data_mut()[..rows * VOCAB];
        let bias = self.bias.value.data();
        for row in logits.chunks_mut(VOCAB) {
            row.copy_from_slice(bias);
        }
        gemm(
            logits,
            hn,
            self.weight.value.data(),
            rows,
            w,
            VOCAB,
            false,
            false,
            true,
            Par::Rayon,
        )?;
        Ok(())
    }

    /// Summed cross-entropy (nats) of predicting `targets[p]` from position `p`, for
    /// `p < targets.len()`; `y1`, `y2` hold `targets.len()` positions.
    pub fn loss(&self, y1: &Tensor, y2: &Tensor, targets: &[u8]) -> Result<f64> {
        let len = targets.len();
        self.check(y1, y2, len)?;
        let rows_max = self.chunk.min(len.max(1));
        let mut s = Scratch::new(y1.pool(), rows_max, 2 * self.d_model)?;
        let mut total = 0.0f64;
        for start in (0..len).step_by(self.chunk) {
            let rows = self.chunk.min(len - start);
            self.chunk_logits(y1.data(), y2.data(), start, rows, &mut s)?;
            let logits = &s.logits.data()[..rows * VOCAB];
            let per_row: Vec<f32> = logits
                .par_chunks(VOCAB)
                .zip(targets[start..start + rows].par_iter())
                .map(|(row, &t)| reformer_engine::ops::logsumexp(row) - row[t as usize])
                .collect();
            total += per_row.iter().map(|&l| l as f64).sum::<f64>();
        }
        Ok(total)
    }

    /// The summed loss, as [`LmHead::loss`], and its backward for the loss scaled by
    /// `scale` (use `1/len` for the mean): returns `(sum, dY1, dY2)` and accumulates the
    /// head's parameter gradients. Each chunk's logits are computed once and dropped.
    pub fn loss_and_backward(
        &mut self,
        y1: &Tensor,
        y2: &Tensor,
        targets: &[u8],
        scale: f32,
    ) -> Result<(f64, Tensor, Tensor)> {
        let len = targets.len();
        self.check(y1, y2, len)?;
        let d = self.d_model;
        let w = 2 * d;
        let pool = y1.pool();
        let mut dy1 = Tensor::zeros(pool, y1.shape())?;
        let mut dy2 = Tensor::zeros(pool, y2.shape())?;
        let rows_max = self.chunk.min(len.max(1));
        let mut s = Scratch::new(pool, rows_max, w)?;
        let mut dhn = Tensor::zeros(pool, &[rows_max, w])?;
        let mut dh = Tensor::zeros(pool, &[rows_max, w])?;
        let mut total = 0.0f64;
        for start in (0..len).step_by(self.chunk) {
            let rows = self.chunk.min(len - start);
            self.chunk_logits(y1.data(), y2.data(), start, rows, &mut s)?;
            // Loss and d(loss)/d(logits) = scale · (softmax − onehot), in place.
            let logits = &mut s.logits.data_mut()[..rows * VOCAB];
            let per_row: Vec<f32> = logits
                .par_chunks_mut(VOCAB)
                .zip(targets[start..start + rows].par_iter())
                .map(|(row, &t)| cross_entropy_row(row, t as usize, scale))
                .collect();
            total += per_row.iter().map(|&l| l as f64).sum::<f64>();
            let dlogits = &s.logits.data()[..rows * VOCAB];
            let hn = &s.hn.data()[..rows * w];
            // dW += hnᵀ · dlogits; db += Σ_rows dlogits.
            gemm(
                self.weight.grad.data_mut(),
                hn,
                dlogits,
                w,
                rows,
                VOCAB,
                true,
                false,
                true,
                Par::Rayon,
            )?;
            let db = self.bias.grad.data_mut();
            for row in dlogits.chunks(VOCAB) {
                for (g, v) in db.iter_mut().zip(row) {
                    *g += v;
                }
            }
            // dhn = dlogits · Wᵀ, then through the norm.
            let dhn = &mut dhn.data_mut()[..rows * w];
            gemm(
                dhn,
                dlogits,
                self.weight.value.data(),
                rows,
                VOCAB,
                w,
                false,
                true,
                false,
                Par::Rayon,
            )?;
            let dh = &mut dh.data_mut()[..rows * w];
            dh.fill(0.0);
            self.norm
                .backward_rows(pool, &s.h.data()[..rows * w], dhn, dh)?;
            let (d1, d2) = (dy1.data_mut(), dy2.data_mut());
            for (r, row) in dh.chunks(w).enumerate() {
                let p = start + r;
                d1[p * d..(p + 1) * d].copy_from_slice(&row[..d]);
                d2[p * d..(p + 1) * d].copy_from_slice(&row[d..]);
            }
        }
        Ok((total, dy1, dy2))
    }

    /// The 256 logits at position `pos` (for sampling).
    pub fn logits_at(&self, y1: &Tensor, y2: &Tensor, pos: usize) -> Result<Vec<f32>> {
        let d = self.d_model;
        let len = y1.numel() / d.max(1);
        self.check(y1, y2, len)?;
        if pos >= len {
            return Err(ReformerError::InvalidArgument(format!(
                "logits at position {pos} of a {len}-position sequence"
            )));
        }
        let mut s = Scratch::new(y1.pool(), 1, 2 * d)?;
        self.chunk_logits(y1.data(), y2.data(), pos, 1, &mut s)?;
        Ok(s.logits.data().to_vec())
    }
}

impl HasParams for LmHead {
    fn params(&self) -> Vec<&Param> {
        let mut v = self.norm.params();
        v.push(&self.weight);
        v.push(&self.bias);
        v
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut v = self.norm.params_mut();
        v.push(&mut self.weight);
        v.push(&mut self.bias);
        v
    }
}
