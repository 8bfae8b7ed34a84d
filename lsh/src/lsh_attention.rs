//! Shared-QK LSH attention, forward and backward, exactly as `docs/design.md` "Semantics" states.
//!
//! Per head and round: hash (angular LSH), stable counting sort by bucket, chunk the sorted
//! sequence; chunk `c` attends to chunk `c` and chunk `c−1` of the same round (chunk 0 to the
//! last chunk; a single-chunk round has no look-back). Rounds are combined by logsumexp, online,
//! so only one round's sorted copies exist at a time. The backward recomputes scores from the
//! stored per-(round, query) logsumexp. Memory per head is O(N·(d + rounds)).

use rayon::prelude::*;
use reformer_engine::{ops::dot, Buffer, Hold, MemoryPool, Tensor};

use crate::block::{
    block_backward, BackwardScratch, KeyBlock, OnlineSoftmax, QueryBlock, QueryGrad, ScoreRule,
};
use crate::error::{shape_err, AttentionError, Result};
use crate::hash::Rotations;
use crate::keys::{normalize_rows_backward, normalize_rows_in_place};
use crate::layout::{check_chunk, gather_rows, Dims, KeyMask};
use crate::sort::counting_sort;

/// Chunking and masking of LSH attention (the hashing lives in [`Rotations`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LshConfig {
    /// Chunk length `m` of the sorted sequence.
    pub chunk_len: usize,
    /// Exclude keys after the query.
    pub causal: bool,
}

/// What the forward pass keeps for the backward: per (head, round, position) the bucket and
/// the logsumexp `z_r(i)` of the query's scores in that round.
#[derive(Debug)]
pub struct LshSaved {
    pub dims: Dims,
    pub n_rounds: usize,
    /// `[heads, rounds, len]`.
    pub buckets: Buffer<u32>,
    /// `[heads, rounds, len]`.
    pub lse: Buffer<f32>,
}

impl LshSaved {
    pub fn size_in_bytes(&self) -> usize {
        4 * (self.buckets.len() + self.lse.len())
    }
}

const RULE: ScoreRule = ScoreRule {
    scale: 1.0,
    causal: false,
    self_penalty: true,
};

fn rule(cfg: &LshConfig) -> ScoreRule {
    ScoreRule {
        causal: cfg.causal,
        ..RULE
    }
}

/// One round of one head laid out in sorted order.
struct SortedRound {
    /// `perm[slot] = position` (`≥ len` for padding slots).
    perm: Buffer<u32>,
    /// `inv[position] = slot`.
    inv: Buffer<u32>,
    valid: Vec<bool>,
    /// Counts `valid` in the pool.
    _valid_bytes: Hold,
}

/// Geometry of the padded, chunked sequence.
#[derive(Debug, Clone, Copy)]
struct Chunks {
    m: usize,
    count: usize,
}

impl Chunks {
    fn new(len: usize, m: usize) -> Self {
        Self {
            m,
            count: len.div_ceil(m),
        }
    }
    fn padded(&self) -> usize {
        self.m * self.count
    }
    /// Chunk looked back at by chunk `c`, if any.
    fn prev(&self, c: usize) -> Option<usize> {
        (self.count > 1).then(|| (c + self.count - 1) % self.count)
    }
    /// The key chunks chunk `c` attends to: the look-back chunk (if any), then itself.
    fn keys_of(&self, c: usize) -> impl Iterator<Item = usize> {
        self.prev(c).into_iter().chain(std::iter::once(c))
    }
}

fn check_inputs(qk: &Tensor, v: &Tensor, rot: &Rotations, cfg: &LshConfig) -> Result<Dims> {
    let dims = Dims::of("lsh attention qk", qk)?;
    dims.expect("lsh attention v", v)?;
    check_chunk(cfg.chunk_len, dims.len)?;
    if rot.d != dims.d {
        return Err(shape_err("lsh rotations", &[rot.d], &[dims.d]));
    }
    if rot.n_rounds == 0 {
        return Err(AttentionError::Config(
            "LSH attention needs at least one round".into(),
        ));
    }
    Ok(dims)
}

/// Buckets of head `h`, round `r`, hashed from the raw `qk` rows.
fn hash_round(qk_h: &[f32], rot: &Rotations, r: usize, out: &mut [u32], d: usize) {
    const ROWS: usize = 256;
    out.par_chunks_mut(ROWS)
        .enumerate()
        .for_each_init(Vec::new, |proj, (i, out)| {
            let x = &qk_h[i * ROWS * d..(i * ROWS + out.len()) * d];
            rot.hash_round(x, r, out, proj);
        });
}

fn sort_round(
    pool: &MemoryPool,
    buckets: &[u32],
    n_buckets: usize,
    chunks: Chunks,
    mask: &KeyMask,
    h: usize,
) -> Result<SortedRound> {
    let len = buckets.len();
    let padded = chunks.padded();
    // Padding slots go to an extra last bucket, so they sort after every real position.
    // So do positions the key mask marks as padding: they take no part in hashing, and a
    // padded key cannot move a real position to another chunk.
    let mut keys = pool.alloc::<u32>(padded)?;
    for (p, k) in keys.iter_mut().enumerate() {
        *k = if mask.valid(h, p) {
            buckets[p]
        } else {
            n_buckets as u32
        };
    }
    let mut perm = pool.alloc::<u32>(padded)?;
    let counts_bytes = pool.hold(4 * (n_buckets + 2))?;
    let mut counts = Vec::new();
    counting_sort(&keys, n_buckets + 1, &mut perm, &mut counts);
    drop((keys, counts, counts_bytes));
    let mut inv = pool.alloc::<u32>(len)?;
    for (slot, &p) in perm.iter().enumerate() {
        if (p as usize) < len {
            inv[p as usize] = slot as u32;
        }
    }
    let _valid_bytes = pool.hold(perm.len())?;
    let valid = perm.iter().map(|&p| mask.valid(h, p as usize)).collect();
    Ok(SortedRound {
        perm,
        inv,
        valid,
        _valid_bytes,
    })
}

/// LSH attention forward. `qk`, `v`: `[heads, len, d]`. Returns the output `[heads, len, d]`
/// and what the backward needs.
pub fn lsh_attention_forward(
    qk: &Tensor,
    v: &Tensor,
    rot: &Rotations,
    cfg: &LshConfig,
    key_mask: Option<&[bool]>,
) -> Result<(Tensor, LshSaved)> {
    let dims = check_inputs(qk, v, rot, cfg)?;
    let mask = KeyMask::new(key_mask, dims)?;
    let pool = qk.pool().clone();
    let Dims { heads, len, d } = dims;
    let n_rounds = rot.n_rounds;
    let mut out = Tensor::zeros(&pool, &dims.shape())?;
    let mut buckets = pool.alloc::<u32>(heads * n_rounds * len)?;
    let mut lse = pool.alloc::<f32>(heads * n_rounds * len)?;
    // Heads run one after another (the chunks inside a head run in parallel), so only one
    // head's working buffers exist at a time.
    let work = out
        .data_mut()
        .chunks_mut(len * d)
        .zip(buckets.chunks_mut(n_rounds * len))
        .zip(lse.chunks_mut(n_rounds * len))
        .enumerate();
    work.into_iter()
        .try_for_each(|(h, ((out_h, buckets_h), lse_h))| {
            let range = h * len * d..(h + 1) * len * d;
            forward_head(
                &pool,
                &qk.data()[range.clone()],
                &v.data()[range],
                rot,
                cfg,
                &mask,
                h,
                d,
                out_h,
                buckets_h,
                lse_h,
            )
        })?;
    Ok((
        out,
        LshSaved {
            dims,
            n_rounds,
            buckets,
            lse,
        },
    ))
}

/// The rows one chunk task works on, gathered from original order: the query chunk and the
/// key/value chunks it attends to (look-back first, then its own), with unit keys.
struct ChunkTiles {
    q: Vec<f32>,
    k: [Vec<f32>; 2],
    v: [Vec<f32>; 2],
}

impl ChunkTiles {
    fn bytes(m: usize, d: usize) -> usize {
        4 * 5 * m * d
    }

    fn gather(qk_h: &[f32], v_h: &[f32], perm: &[u32], chunks: Chunks, c: usize, d: usize) -> Self {
        let (m, len) = (chunks.m, qk_h.len() / d);
        let rows = |c: usize| &perm[c * m..(c + 1) * m];
        let mut t = ChunkTiles {
            q: vec![0.0; m * d],
            k: [vec![0.0; m * d], vec![0.0; m * d]],
            v: [vec![0.0; m * d], vec![0.0; m * d]],
        };
        gather_rows(qk_h, rows(c), len, d, &mut t.q);
        for (i, kc) in chunks.keys_of(c).enumerate() {
            gather_rows(qk_h, rows(kc), len, d, &mut t.k[i]);
            normalize_rows_in_place(&mut t.k[i], d);
            gather_rows(v_h, rows(kc), len, d, &mut t.v[i]);
        }
        t
    }

    fn key_block<'a>(
        &'a self,
        i: usize,
        kc: usize,
        chunks: Chunks,
        sorted: &'a SortedRound,
    ) -> KeyBlock<'a> {
        let m = chunks.m;
        KeyBlock {
            k: &self.k[i],
            v: &self.v[i],
            pos: &sorted.perm[kc * m..(kc + 1) * m],
            valid: &sorted.valid[kc * m..(kc + 1) * m],
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_head(
    pool: &MemoryPool,
    qk_h: &[f32],
    v_h: &[f32],
    rot: &Rotations,
    cfg: &LshConfig,
    mask: &KeyMask,
    h: usize,
    d: usize,
    out_h: &mut [f32],
    buckets_h: &mut [u32],
    lse_h: &mut [f32],
) -> Result<()> {
    let len = qk_h.len() / d;
    let chunks = Chunks::new(len, cfg.chunk_len);
    let padded = chunks.padded();
    let m = chunks.m;
    let rule = rule(cfg);
    let n_buckets = rot.buckets.total();

    // Running logsumexp over rounds, per position, in f64: a query that sees only itself has
    // z = −1e5, where f32 cannot resolve the ln(rounds) that combining adds.
    let mut z_acc = pool.alloc::<f64>(len)?;
    z_acc.fill(f64::NEG_INFINITY);
    // This round's outputs and logsumexps, in sorted order.
    let mut os = pool.alloc::<f32>(padded * d)?;
    let mut zs = pool.alloc::<f32>(padded)?;
    let tile_bytes = OnlineSoftmax::new(m, d, m).bytes() + ChunkTiles::bytes(m, d);

    for r in 0..rot.n_rounds {
        let b_r = &mut buckets_h[r * len..(r + 1) * len];
        hash_round(qk_h, rot, r, b_r, d);
        let sorted = sort_round(pool, b_r, n_buckets, chunks, mask, h)?;
        os.par_chunks_mut(m * d)
            .zip(zs.par_chunks_mut(m))
            .enumerate()
            .try_for_each(|(c, (o_c, z_c))| -> Result<()> {
                let _hold = pool.hold(tile_bytes)?;
                let tiles = ChunkTiles::gather(qk_h, v_h, &sorted.perm, chunks, c, d);
                let qb = QueryBlock {
                    q: &tiles.q,
                    pos: &sorted.perm[c * m..(c + 1) * m],
                };
                let mut state = OnlineSoftmax::new(m, d, m);
                for (i, kc) in chunks.keys_of(c).enumerate() {
                    state.update(&qb, &tiles.key_block(i, kc, chunks, &sorted), rule);
                }
                state.finish(o_c, z_c);
                Ok(())
            })?;
        // Combine this round into the output, in original order.
        let lse_r = &mut lse_h[r * len..(r + 1) * len];
        let (os, zs, inv) = (&os[..], &zs[..], &sorted.inv[..]);
        out_h
            .par_chunks_mut(d)
            .zip(lse_r.par_iter_mut())
            .zip(z_acc.par_iter_mut())
            .enumerate()
            .for_each(|(p, ((o, z_out), z_acc))| {
                let s = inv[p] as usize;
                let z = zs[s];
                *z_out = z;
                if z == f32::NEG_INFINITY {
                    return;
                }
                let z = z as f64;
                let z_new = log_add_exp(*z_acc, z);
                let (a, b) = ((*z_acc - z_new).exp() as f32, (z - z_new).exp() as f32);
                for (o, x) in o.iter_mut().zip(&os[s * d..(s + 1) * d]) {
                    *o = a * *o + b * x;
                }
                *z_acc = z_new;
            });
    }
    Ok(())
}

fn add_row(dst: &mut [f32], src: &[f32]) {
    for (a, b) in dst.iter_mut().zip(src) {
        *a += b;
    }
}

fn log_add_exp(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// LSH attention backward: from the forward's inputs, its output `out`, the output gradient
/// `d_out` and `saved`, returns `(d_qk, d_v)`. Scores are recomputed with the buckets the
/// forward pass used; nothing of size `N × 2m × rounds` is held at once.
#[allow(clippy::too_many_arguments)]
pub fn lsh_attention_backward(
    qk: &Tensor,
    v: &Tensor,
    out: &Tensor,
    d_out: &Tensor,
    saved: &LshSaved,
    rot: &Rotations,
    cfg: &LshConfig,
    key_mask: Option<&[bool]>,
) -> Result<(Tensor, Tensor)> {
    let dims = check_inputs(qk, v, rot, cfg)?;
    dims.expect("lsh attention out", out)?;
    dims.expect("lsh attention d_out", d_out)?;
    if saved.dims != dims || saved.n_rounds != rot.n_rounds {
        return Err(shape_err(
            "lsh attention saved state",
            &[
                saved.dims.heads,
                saved.n_rounds,
                saved.dims.len,
                saved.dims.d,
            ],
            &[dims.heads, rot.n_rounds, dims.len, dims.d],
        ));
    }
    let mask = KeyMask::new(key_mask, dims)?;
    let pool = qk.pool().clone();
    let Dims { len, d, .. } = dims;
    let n_rounds = rot.n_rounds;
    let mut d_qk = Tensor::zeros(&pool, &dims.shape())?;
    let mut d_v = Tensor::zeros(&pool, &dims.shape())?;
    // One head at a time, as in the forward pass.
    let work = d_qk
        .data_mut()
        .chunks_mut(len * d)
        .zip(d_v.data_mut().chunks_mut(len * d))
        .enumerate();
    work.into_iter().try_for_each(|(h, (dqk_h, dv_h))| {
        let range = h * len * d..(h + 1) * len * d;
        let per_round = h * n_rounds * len..(h + 1) * n_rounds * len;
        backward_head(
            &pool,
            HeadInputs {
                qk: &qk.data()[range.clone()],
                v: &v.data()[range.clone()],
                out: &out.data()[range.clone()],
                d_out: &d_out.data()[range],
                buckets: &saved.buckets[per_round.clone()],
                lse: &saved.lse[per_round],
            },
            rot,
            cfg,
            &mask,
            h,
            d,
            dqk_h,
            dv_h,
        )
    })?;
    Ok((d_qk, d_v))
}

struct HeadInputs<'a> {
    qk: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    d_out: &'a [f32],
    buckets: &'a [u32],
    lse: &'a [f32],
}

#[allow(clippy::too_many_arguments)]
fn backward_head(
    pool: &MemoryPool,
    x: HeadInputs,
    rot: &Rotations,
    cfg: &LshConfig,
    mask: &KeyMask,
    h: usize,
    d: usize,
    dqk_h: &mut [f32],
    dv_h: &mut [f32],
) -> Result<()> {
    let len = x.qk.len() / d;
    let n_rounds = rot.n_rounds;
    let chunks = Chunks::new(len, cfg.chunk_len);
    let padded = chunks.padded();
    let m = chunks.m;
    let rule = rule(cfg);
    let n_buckets = rot.buckets.total();

    // Per position: the logsumexp over all rounds (f64), and delta = d_out · out. Round r's
    // probabilities are exp(s − z_r)·w_r with w_r = exp(z_r − Z): the weight is folded into
    // d_out and delta, so scores are compared with z_r, never with Z − f32 rounding.
    let mut z_all = pool.alloc::<f64>(len)?;
    let mut delta = pool.alloc::<f32>(len)?;
    z_all
        .par_iter_mut()
        .zip(delta.par_iter_mut())
        .enumerate()
        .for_each(|(p, (z, delta))| {
            *z = (0..n_rounds)
                .map(|r| x.lse[r * len + p] as f64)
                .fold(f64::NEG_INFINITY, log_add_exp);
            *delta = dot(&x.d_out[p * d..(p + 1) * d], &x.out[p * d..(p + 1) * d]);
        });
    // Gradients in sorted order: own-chunk and look-back contributions kept apart so every
    // chunk task writes only its own rows (deterministic, no atomics). Key gradients are with
    // respect to the unit keys until the scatter sends them through the normalisation.
    let mut dq_s = pool.alloc::<f32>(padded * d)?;
    let mut dk_own = pool.alloc::<f32>(padded * d)?;
    let mut dk_back = pool.alloc::<f32>(padded * d)?;
    let mut dv_own = pool.alloc::<f32>(padded * d)?;
    let mut dv_back = pool.alloc::<f32>(padded * d)?;
    let tile_bytes = ChunkTiles::bytes(m, d) + 4 * (m * d + 2 * m + 2 * m * m);

    for r in 0..n_rounds {
        let sorted = sort_round(
            pool,
            &x.buckets[r * len..(r + 1) * len],
            n_buckets,
            chunks,
            mask,
            h,
        )?;
        let perm = &sorted.perm[..];
        let rows = m * d;
        dq_s.par_chunks_mut(rows)
            .zip(dk_own.par_chunks_mut(rows))
            .zip(dk_back.par_chunks_mut(rows))
            .zip(dv_own.par_chunks_mut(rows))
            .zip(dv_back.par_chunks_mut(rows))
            .enumerate()
            .try_for_each(|(c, ((((dq, dk_o), dk_b), dv_o), dv_b))| -> Result<()> {
                let _hold = pool.hold(tile_bytes)?;
                for buf in [&mut *dq, &mut *dk_o, &mut *dk_b, &mut *dv_o, &mut *dv_b] {
                    buf.fill(0.0);
                }
                let tiles = ChunkTiles::gather(x.qk, x.v, perm, chunks, c, d);
                // This chunk's d_out rows, z_r and delta, weighted by w_r.
                let (mut g_out, mut zs, mut deltas) =
                    (vec![0.0; rows], vec![f32::NEG_INFINITY; m], vec![0.0; m]);
                for (i, &p) in perm[c * m..(c + 1) * m].iter().enumerate() {
                    let p = p as usize;
                    let z_r = if p < len {
                        x.lse[r * len + p]
                    } else {
                        f32::NEG_INFINITY
                    };
                    if z_r == f32::NEG_INFINITY {
                        continue;
                    }
                    let w = (z_r as f64 - z_all[p]).exp() as f32;
                    (zs[i], deltas[i]) = (z_r, w * delta[p]);
                    for (g, &o) in g_out[i * d..(i + 1) * d]
                        .iter_mut()
                        .zip(&x.d_out[p * d..(p + 1) * d])
                    {
                        *g = w * o;
                    }
                }
                let qb = QueryBlock {
                    q: &tiles.q,
                    pos: &perm[c * m..(c + 1) * m],
                };
                let g = QueryGrad {
                    d_out: &g_out,
                    lse: &zs,
                    delta: &deltas,
                };
                let mut scratch = BackwardScratch::default();
                for (i, kc) in chunks.keys_of(c).enumerate() {
                    let kb = tiles.key_block(i, kc, chunks, &sorted);
                    let (dk, dv) = if kc == c {
                        (&mut *dk_o, &mut *dv_o)
                    } else {
                        (&mut *dk_b, &mut *dv_b)
                    };
                    block_backward(
                        &qb,
                        &kb,
                        &g,
                        d,
                        rule,
                        Some(&mut *dq),
                        Some(dk),
                        Some(dv),
                        &mut scratch,
                    );
                }
                Ok(())
            })?;
        // Scatter back to original order. The look-back gradient of key chunk c was written
        // by query chunk c+1 (wrapping), at the same row within the chunk.
        let (dq_s, dk_own, dk_back, dv_own, dv_back, inv) = (
            &dq_s[..],
            &dk_own[..],
            &dk_back[..],
            &dv_own[..],
            &dv_back[..],
            &sorted.inv[..],
        );
        dqk_h
            .par_chunks_mut(d)
            .zip(dv_h.par_chunks_mut(d))
            .enumerate()
            .for_each_init(
                || vec![0.0f32; d],
                |dk, (p, (dqk, dv))| {
                    let s = inv[p] as usize;
                    let own = s * d..(s + 1) * d;
                    add_row(dqk, &dq_s[own.clone()]);
                    add_row(dv, &dv_own[own.clone()]);
                    dk.copy_from_slice(&dk_own[own]);
                    if chunks.count > 1 {
                        let (c, off) = (s / m, s % m);
                        let b = ((c + 1) % chunks.count) * m + off;
                        add_row(dk, &dk_back[b * d..(b + 1) * d]);
                        add_row(dv, &dv_back[b * d..(b + 1) * d]);
                    }
                    // Keys are the normalised qk: send their gradient through the normalisation.
                    normalize_rows_backward(&x.qk[p * d..(p + 1) * d], dk, dqk, d);
                },
            );
    }
    Ok(())
}
