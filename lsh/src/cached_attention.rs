//! Attention of a block of new queries against cached keys and values, each query with its own
//! keys: the decoding step of every attention kind, and its prefill a block at a time. The CPU
//! twin of the CUDA kernel `cached_attention` (`kernels/src/cu/cached_attention.cu`).
//!
//! Queries and caches are in model layout, `[rows, heads·d]`; the key at position `p` is row
//! `p % cache_rows` of the caches (a full cache, or a ring of the last `cache_rows`). Which
//! positions a query sees is given per query ([`CachedKeys`]): lists per (head, round) for LSH
//! and local attention, a range for exact attention. Each round is one softmax (the tile of
//! [`crate::block`], with the rule's masks by position); rounds combine by logsumexp, in f64,
//! as the LSH forward combines them.

use rayon::prelude::*;

use reformer_engine::ops::dot;

use crate::block::{ScoreRule, SELF_SCORE};
use crate::error::{shape_err, AttentionError, Result};

/// Marks an unused entry of a key list.
pub const NO_KEY: u32 = u32::MAX;

/// Keys fed to one softmax at a time.
const TILE: usize = 256;

/// Which cached positions each query sees.
#[derive(Debug, Clone, Copy)]
pub enum CachedKeys<'a> {
    /// `[heads, rounds, queries, width]` positions, [`NO_KEY`] where a list is shorter.
    Lists {
        pos: &'a [u32],
        rounds: usize,
        width: usize,
    },
    /// Per query, the positions `start..end` for every head (one round).
    Ranges(&'a [(u32, u32)]),
}

impl CachedKeys<'_> {
    pub fn rounds(&self) -> usize {
        match *self {
            CachedKeys::Lists { rounds, .. } => rounds,
            CachedKeys::Ranges(_) => 1,
        }
    }

    /// The positions query `i` of `queries`, head `h`, round `r` sees, appended to `out`.
    fn collect(&self, i: usize, queries: usize, h: usize, r: usize, out: &mut Vec<u32>) {
        match *self {
            CachedKeys::Lists { pos, rounds, width } => {
                let at = ((h * rounds + r) * queries + i) * width;
                out.extend(pos[at..at + width].iter().copied().filter(|&p| p != NO_KEY));
            }
            CachedKeys::Ranges(r) => out.extend(r[i].0..r[i].1),
        }
    }
}

/// The geometry and rule of a cached attention call.
#[derive(Debug, Clone, Copy)]
pub struct CachedAttention<'a> {
    pub heads: usize,
    pub d: usize,
    /// Rows of each cache: position `p` lives in row `p % cache_rows`.
    pub cache_rows: usize,
    /// How scores are formed; the keys are used as cached (shared-QK caches hold unit keys).
    pub rule: ScoreRule,
    pub keys: CachedKeys<'a>,
}

impl CachedAttention<'_> {
    /// Checks the buffers' lengths for `queries` queries.
    pub fn check(&self, queries: usize, q: usize, k: usize, v: usize, out: usize) -> Result<()> {
        let w = self.heads * self.d;
        if self.heads == 0 || self.d == 0 || self.cache_rows == 0 {
            return Err(AttentionError::Config(format!(
                "cached attention of {} heads of {} over {} cached rows",
                self.heads, self.d, self.cache_rows
            )));
        }
        for (op, got, want) in [
            ("cached attention q", q, queries * w),
            ("cached attention out", out, queries * w),
            ("cached attention keys", k, self.cache_rows * w),
            ("cached attention values", v, self.cache_rows * w),
        ] {
            if got < want {
                return Err(shape_err(op, &[got], &[want]));
            }
        }
        match self.keys {
            CachedKeys::Lists { pos, rounds, width } => {
                let want = queries * self.heads * rounds * width;
                if pos.len() != want || rounds == 0 {
                    return Err(shape_err(
                        "cached attention key lists",
                        &[pos.len()],
                        &[self.heads, rounds, queries, width],
                    ));
                }
            }
            CachedKeys::Ranges(r) => {
                if r.len() != queries {
                    return Err(shape_err("cached attention ranges", &[r.len()], &[queries]));
                }
            }
        }
        Ok(())
    }
}

/// Per-task scratch: key positions and scores.
#[derive(Default)]
struct Scratch {
    pos: Vec<u32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
}

/// One round of one (query, head): the softmax over the keys at `pos`, online over tiles of
/// [`TILE`] keys, as [`crate::block::OnlineSoftmax`] forms it — scores `scale · q·k` with the
/// cached keys, the rule's causal and self masks by position. Leaves the
/// normalised output in `s.acc` and returns the logsumexp (`-inf`: no key allowed).
fn attend_round(
    q: &[f32],
    q_pos: u32,
    k: &[f32],
    v: &[f32],
    a: &CachedAttention,
    h: usize,
    s: &mut Scratch,
) -> f32 {
    let (d, w) = (a.d, a.heads * a.d);
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
    s.acc.clear();
    s.acc.resize(d, 0.0);
    let row = |p: u32| (p as usize % a.cache_rows) * w + h * d;
    for tile in s.pos.chunks(TILE) {
        s.scores.clear();
        for &p in tile {
            let score = if a.rule.causal && p > q_pos {
                f32::NEG_INFINITY
            } else if a.rule.self_penalty && p == q_pos {
                SELF_SCORE
            } else {
                dot(q, &k[row(p)..row(p) + d]) * a.rule.scale
            };
            s.scores.push(score);
        }
        let tile_max = s.scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let new_max = max.max(tile_max);
        if new_max == f32::NEG_INFINITY {
            continue;
        }
        let correction = (max - new_max).exp();
        if correction != 1.0 {
            sum *= correction;
            for x in &mut s.acc {
                *x *= correction;
            }
        }
        for (&p, &score) in tile.iter().zip(&s.scores) {
            let e = (score - new_max).exp();
            if e == 0.0 {
                continue;
            }
            sum += e;
            for (x, &y) in s.acc.iter_mut().zip(&v[row(p)..row(p) + d]) {
                *x += e * y;
            }
        }
        max = new_max;
    }
    if sum > 0.0 {
        let inv = 1.0 / sum;
        for x in &mut s.acc {
            *x *= inv;
        }
        max + sum.ln()
    } else {
        f32::NEG_INFINITY
    }
}

/// `out[i, h] = Σ_r w_r · softmax_r(q_i,h · keys) · values` over the keys each query sees, with
/// `q_pos[i]` the position of query `i` (for the rule's masks). A query that sees no key gets 0.
pub fn cached_attention(
    q: &[f32],
    q_pos: &[u32],
    k_cache: &[f32],
    v_cache: &[f32],
    a: &CachedAttention,
    out: &mut [f32],
) -> Result<()> {
    let queries = q_pos.len();
    a.check(queries, q.len(), k_cache.len(), v_cache.len(), out.len())?;
    let (heads, d) = (a.heads, a.d);
    let w = heads * d;
    let task = |s: &mut Scratch, (task, o): (usize, &mut [f32])| {
        let (i, h) = (task / heads, task % heads);
        let q_row = &q[i * w + h * d..i * w + (h + 1) * d];
        o.fill(0.0);
        // Rounds combine by logsumexp in f64, as the LSH forward combines them.
        let mut z_acc = f64::NEG_INFINITY;
        for r in 0..a.keys.rounds() {
            s.pos.clear();
            a.keys.collect(i, queries, h, r, &mut s.pos);
            let z = attend_round(q_row, q_pos[i], k_cache, v_cache, a, h, s);
            if z == f32::NEG_INFINITY {
                continue;
            }
            let z = z as f64;
            let m = z_acc.max(z);
            let z_new = m + ((z_acc - m).exp() + (z - m).exp()).ln();
            let (wa, wb) = ((z_acc - z_new).exp() as f32, (z - z_new).exp() as f32);
            for (o, x) in o.iter_mut().zip(&s.acc) {
                *o = wa * *o + wb * x;
            }
            z_acc = z_new;
        }
    };
    let out = &mut out[..queries * w];
    if queries < 4 {
        // A decoding step: waking the pool costs more than its few hundred keys.
        let mut s = Scratch::default();
        out.chunks_mut(d).enumerate().for_each(|t| task(&mut s, t));
    } else {
        out.par_chunks_mut(d)
            .enumerate()
            .for_each_init(Scratch::default, task);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact_attention::shared_qk_rule;
    use crate::keys::normalize_rows_in_place;
    use crate::{exact_attention_reference, unit_keys};
    use reformer_engine::{MemoryPool, Rng, Tensor};

    fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
        let mut v = vec![0.0; n];
        rng.fill_normal(&mut v, 1.0);
        v
    }

    /// Exact shared-QK attention of the last position over ranges equals the plain reference's
    /// last rows, head by head.
    #[test]
    fn ranges_give_exact_attention() {
        let (heads, d, n) = (2, 8, 37);
        let mut rng = Rng::new(5);
        let (qk, v) = (
            random(&mut rng, n * heads * d),
            random(&mut rng, n * heads * d),
        );
        let ranges: Vec<(u32, u32)> = (0..n as u32).map(|p| (0, p + 1)).collect();
        let pos: Vec<u32> = (0..n as u32).collect();
        let a = CachedAttention {
            heads,
            d,
            cache_rows: n,
            rule: shared_qk_rule(true),
            keys: CachedKeys::Ranges(&ranges),
        };
        // The cache holds the unit keys, as the decoder writes them.
        let mut keys = qk.clone();
        normalize_rows_in_place(&mut keys, d);
        let mut out = vec![f32::NAN; n * heads * d];
        cached_attention(&qk, &pos, &keys, &v, &a, &mut out).unwrap();
        // Head layout for the reference.
        let pool = MemoryPool::unlimited();
        let to_heads = |x: &[f32]| {
            let mut t = vec![0.0; x.len()];
            for p in 0..n {
                for h in 0..heads {
                    t[(h * n + p) * d..(h * n + p + 1) * d]
                        .copy_from_slice(&x[(p * heads + h) * d..(p * heads + h + 1) * d]);
                }
            }
            Tensor::from_vec(&pool, &[heads, n, d], t).unwrap()
        };
        let q_t = to_heads(&qk);
        let k_t = unit_keys(&q_t).unwrap();
        let want = exact_attention_reference(&q_t, &k_t, &to_heads(&v), shared_qk_rule(true), None)
            .unwrap();
        for p in 0..n {
            for h in 0..heads {
                for j in 0..d {
                    let (g, w) = (
                        out[(p * heads + h) * d + j],
                        want.data()[(h * n + p) * d + j],
                    );
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{p} {h} {j}: {g} {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn short_buffers_are_shape_errors() {
        let a = CachedAttention {
            heads: 1,
            d: 4,
            cache_rows: 4,
            rule: shared_qk_rule(true),
            keys: CachedKeys::Ranges(&[(0, 1)]),
        };
        let x = vec![0.0; 16];
        let mut out = vec![0.0; 2];
        assert!(cached_attention(&x, &[0], &x, &x, &a, &mut out).is_err());
    }
}
