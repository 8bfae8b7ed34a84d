//! Attention over blocks in original order, where query block `i` attends to a band of key
//! blocks: local attention (`i−1` and `i`) and blockwise exact attention (every block up to
//! `i`, or every block). O(N) memory: one online-softmax tile per task and a logsumexp per
//! query. The backward runs two passes so every task writes only its own rows: one over
//! query blocks for `dq`, one over key blocks for `dk` and `dv`.

use std::ops::RangeInclusive;

use rayon::prelude::*;
use reformer_engine::{ops::dot, Buffer, Hold, Tensor};

use crate::block::{
    block_backward, BackwardScratch, KeyBlock, OnlineSoftmax, QueryBlock, QueryGrad, ScoreRule,
};
use crate::error::Result;
use crate::layout::{Dims, KeyMask};

/// Which key blocks a query block sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Band {
    /// Block `i` sees blocks `i−1` and `i` (no wrap-around).
    Local,
    /// Block `i` sees blocks `0..=i`.
    UpToSelf,
    /// Every block sees every block.
    All,
}

impl Band {
    fn keys_of(self, i: usize, nb: usize) -> RangeInclusive<usize> {
        match self {
            Band::Local => i.saturating_sub(1)..=i,
            Band::UpToSelf => 0..=i,
            Band::All => 0..=nb - 1,
        }
    }
    fn queries_of(self, j: usize, nb: usize) -> RangeInclusive<usize> {
        match self {
            Band::Local => j..=(j + 1).min(nb - 1),
            Band::UpToSelf => j..=nb - 1,
            Band::All => 0..=nb - 1,
        }
    }
}

/// Inputs shared by forward and backward.
pub(crate) struct Banded<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub dims: Dims,
    pub block: usize,
    pub band: Band,
    pub rule: ScoreRule,
    pub mask: KeyMask<'a>,
}

struct Geometry {
    positions: Vec<u32>,
    nb: usize,
    /// Counts `positions` and one head's validity mask in the pool.
    _bytes: Hold,
}

impl Banded<'_> {
    fn geometry(&self) -> Result<Geometry> {
        Ok(Geometry {
            _bytes: self.q.pool().hold(5 * self.dims.len)?,
            positions: (0..self.dims.len as u32).collect(),
            nb: self.dims.len.div_ceil(self.block),
        })
    }

    fn rows(&self, b: usize) -> std::ops::Range<usize> {
        b * self.block..((b + 1) * self.block).min(self.dims.len)
    }

    fn valid(&self, h: usize) -> Vec<bool> {
        (0..self.dims.len).map(|p| self.mask.valid(h, p)).collect()
    }

    fn head<'t>(&self, t: &'t [f32], h: usize) -> &'t [f32] {
        let n = self.dims.len * self.dims.d;
        &t[h * n..(h + 1) * n]
    }

    fn key_block<'t>(&self, h: usize, j: usize, g: &'t Geometry, valid: &'t [bool]) -> KeyBlock<'t>
    where
        Self: 't,
    {
        let d = self.dims.d;
        let r = self.rows(j);
        KeyBlock {
            k: &self.head(self.k.data(), h)[r.start * d..r.end * d],
            v: &self.head(self.v.data(), h)[r.start * d..r.end * d],
            pos: &g.positions[r.clone()],
            valid: &valid[r],
        }
    }

    /// Output `[heads, len, d]` and logsumexp `[heads, len]`.
    pub fn forward(&self) -> Result<(Tensor, Buffer<f32>)> {
        let pool = self.q.pool().clone();
        let Dims { heads, len, d } = self.dims;
        let g = self.geometry()?;
        let mut out = Tensor::zeros(&pool, &self.dims.shape())?;
        let mut lse = pool.alloc::<f32>(heads * len)?;
        let tile_bytes = OnlineSoftmax::new(self.block, d, self.block).bytes();
        out.data_mut()
            .par_chunks_mut(len * d)
            .zip(lse.par_chunks_mut(len))
            .enumerate()
            .try_for_each(|(h, (out_h, lse_h))| -> Result<()> {
                let valid = self.valid(h);
                let q_h = self.head(self.q.data(), h);
                out_h
                    .par_chunks_mut(self.block * d)
                    .zip(lse_h.par_chunks_mut(self.block))
                    .enumerate()
                    .try_for_each(|(i, (o, z))| -> Result<()> {
                        let _hold = pool.hold(tile_bytes)?;
                        let r = self.rows(i);
                        let qb = QueryBlock {
                            q: &q_h[r.start * d..r.end * d],
                            pos: &g.positions[r.clone()],
                        };
                        let mut state = OnlineSoftmax::new(r.len(), d, self.block);
                        for j in self.band.keys_of(i, g.nb) {
                            state.update(&qb, &self.key_block(h, j, &g, &valid), self.rule);
                        }
                        state.finish(o, z);
                        Ok(())
                    })
            })?;
        Ok((out, lse))
    }

    /// `(dq, dk, dv)` from the forward's output, its logsumexp and the output gradient.
    pub fn backward(
        &self,
        out: &Tensor,
        lse: &[f32],
        d_out: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let pool = self.q.pool().clone();
        let Dims { heads, len, d } = self.dims;
        let g = self.geometry()?;
        let mut delta = pool.alloc::<f32>(heads * len)?;
        delta
            .par_iter_mut()
            .zip(out.data().par_chunks(d).zip(d_out.data().par_chunks(d)))
            .for_each(|(x, (o, g))| *x = dot(o, g));
        let mut dq = Tensor::zeros(&pool, &self.dims.shape())?;
        let mut dk = Tensor::zeros(&pool, &self.dims.shape())?;
        let mut dv = Tensor::zeros(&pool, &self.dims.shape())?;
        let tile_bytes = 2 * 4 * self.block * self.block;
        let grad = |h: usize, i: usize| {
            let r = self.rows(i);
            QueryGrad {
                d_out: &self.head(d_out.data(), h)[r.start * d..r.end * d],
                lse: &lse[h * len + r.start..h * len + r.end],
                delta: &delta[h * len + r.start..h * len + r.end],
            }
        };
        let query_block = |h: usize, i: usize| {
            let r = self.rows(i);
            QueryBlock {
                q: &self.head(self.q.data(), h)[r.start * d..r.end * d],
                pos: &g.positions[r],
            }
        };
        // Pass 1: dq, one task per query block.
        dq.data_mut()
            .par_chunks_mut(len * d)
            .enumerate()
            .try_for_each(|(h, dq_h)| -> Result<()> {
                let valid = self.valid(h);
                dq_h.par_chunks_mut(self.block * d)
                    .enumerate()
                    .try_for_each(|(i, dq_i)| -> Result<()> {
                        let _hold = pool.hold(tile_bytes)?;
                        let mut scratch = BackwardScratch::default();
                        for j in self.band.keys_of(i, g.nb) {
                            let kb = self.key_block(h, j, &g, &valid);
                            let (qb, gr) = (query_block(h, i), grad(h, i));
                            block_backward(
                                &qb,
                                &kb,
                                &gr,
                                d,
                                self.rule,
                                Some(&mut *dq_i),
                                None,
                                None,
                                &mut scratch,
                            );
                        }
                        Ok(())
                    })
            })?;
        // Pass 2: dk and dv, one task per key block.
        dk.data_mut()
            .par_chunks_mut(len * d)
            .zip(dv.data_mut().par_chunks_mut(len * d))
            .enumerate()
            .try_for_each(|(h, (dk_h, dv_h))| -> Result<()> {
                let valid = self.valid(h);
                dk_h.par_chunks_mut(self.block * d)
                    .zip(dv_h.par_chunks_mut(self.block * d))
                    .enumerate()
                    .try_for_each(|(j, (dk_j, dv_j))| -> Result<()> {
                        let _hold = pool.hold(tile_bytes)?;
                        let mut scratch = BackwardScratch::default();
                        let kb = self.key_block(h, j, &g, &valid);
                        for i in self.band.queries_of(j, g.nb) {
                            let (qb, gr) = (query_block(h, i), grad(h, i));
                            block_backward(
                                &qb,
                                &kb,
                                &gr,
                                d,
                                self.rule,
                                None,
                                Some(&mut *dk_j),
                                Some(&mut *dv_j),
                                &mut scratch,
                            );
                        }
                        Ok(())
                    })
            })?;
        Ok((dq, dk, dv))
    }
}
