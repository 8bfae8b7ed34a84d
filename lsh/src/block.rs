//! The tile every attention kind is built from: one block of queries against one block of
//! keys, with masks decided by original positions, accumulated with an online softmax
//! (forward) or recomputed from a stored logsumexp (backward) — the flash-attention scheme on
//! the CPU. LSH attention feeds it sorted chunks, local attention consecutive chunks, and
//! blockwise exact attention every earlier block.

use reformer_engine::matmul::{gemm, Par};
use reformer_engine::ops::exp_shifted_sum;

/// Score given to a key at the query's own position (shared-QK attention): finite, so a token
/// attends to itself only when nothing else is allowed.
pub const SELF_SCORE: f32 = -1e5;

/// How scores are formed and which pairs count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreRule {
    /// Multiplies `q · k` (1 for shared-QK attention, `1/sqrt(d_k)` otherwise).
    pub scale: f32,
    /// Exclude keys whose position is after the query's.
    pub causal: bool,
    /// Give the key at the query's own position the score [`SELF_SCORE`].
    pub self_penalty: bool,
}

/// Queries of one block: rows `q` (`len × d`) and their original positions.
#[derive(Debug, Clone, Copy)]
pub struct QueryBlock<'a> {
    pub q: &'a [f32],
    pub pos: &'a [u32],
}

/// Keys and values of one block, their original positions, and whether each may be attended
/// to (false for padding).
#[derive(Debug, Clone, Copy)]
pub struct KeyBlock<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub pos: &'a [u32],
    pub valid: &'a [bool],
}

impl KeyBlock<'_> {
    pub fn len(&self) -> usize {
        self.pos.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }
}

/// Scores `s = scale · q kᵀ` for a query block against a key block, masked: excluded pairs are
/// `-inf`, the self pair is [`SELF_SCORE`]. `s` is `mq × mk`.
fn masked_scores(qb: &QueryBlock, kb: &KeyBlock, d: usize, rule: ScoreRule, s: &mut [f32]) {
    let (mq, mk) = (qb.pos.len(), kb.len());
    let s = &mut s[..mq * mk];
    gemm(s, qb.q, kb.k, mq, d, mk, false, true, false, Par::Serial)
        .expect("block buffers are sized by their callers");
    for (i, row) in s.chunks_exact_mut(mk).enumerate() {
        let qp = qb.pos[i];
        for (j, x) in row.iter_mut().enumerate() {
            let kp = kb.pos[j];
            if !kb.valid[j] || (rule.causal && kp > qp) {
                *x = f32::NEG_INFINITY;
            } else if rule.self_penalty && kp == qp {
                *x = SELF_SCORE;
            } else {
                *x *= rule.scale;
            }
        }
    }
}

/// Running softmax state of a query block: row maxima, row sums, unnormalised outputs.
#[derive(Debug)]
pub struct OnlineSoftmax {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
    scores: Vec<f32>,
    d: usize,
}

impl OnlineSoftmax {
    pub fn new(rows: usize, d: usize, max_keys: usize) -> Self {
        Self {
            max: vec![f32::NEG_INFINITY; rows],
            sum: vec![0.0; rows],
            acc: vec![0.0; rows * d],
            scores: vec![0.0; rows * max_keys],
            d,
        }
    }

    /// Bytes this state holds (for the memory accounting of callers).
    pub fn bytes(&self) -> usize {
        4 * (self.max.len() + self.sum.len() + self.acc.len() + self.scores.len())
    }

    /// Folds one key block into the state.
    pub fn update(&mut self, qb: &QueryBlock, kb: &KeyBlock, rule: ScoreRule) {
        let (mq, mk, d) = (qb.pos.len(), kb.len(), self.d);
        if mk == 0 || mq == 0 {
            return;
        }
        if self.scores.len() < mq * mk {
            self.scores.resize(mq * mk, 0.0);
        }
        masked_scores(qb, kb, d, rule, &mut self.scores);
        let s = &mut self.scores[..mq * mk];
        for i in 0..mq {
            let row = &mut s[i * mk..(i + 1) * mk];
            let row_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = self.max[i].max(row_max);
            if new_max == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let correction = (self.max[i] - new_max).exp();
            if correction != 1.0 {
                self.sum[i] *= correction;
                for a in &mut self.acc[i * d..(i + 1) * d] {
                    *a *= correction;
                }
            }
            self.sum[i] += exp_shifted_sum(row, new_max);
            self.max[i] = new_max;
        }
        gemm(
            &mut self.acc,
            s,
            kb.v,
            mq,
            mk,
            d,
            false,
            false,
            true,
            Par::Serial,
        )
        .expect("block buffers are sized by their callers");
    }

    /// Writes normalised outputs (`rows × d`) and logsumexps (`rows`). A row with no allowed
    /// key gets output 0 and logsumexp `-inf`.
    pub fn finish(&self, out: &mut [f32], lse: &mut [f32]) {
        let d = self.d;
        for i in 0..self.max.len() {
            let o = &mut out[i * d..(i + 1) * d];
            if self.sum[i] > 0.0 {
                let inv = 1.0 / self.sum[i];
                for (o, a) in o.iter_mut().zip(&self.acc[i * d..(i + 1) * d]) {
                    *o = a * inv;
                }
                lse[i] = self.max[i] + self.sum[i].ln();
            } else {
                o.fill(0.0);
                lse[i] = f32::NEG_INFINITY;
            }
        }
    }
}

/// Upstream quantities of a query block for the backward pass.
#[derive(Debug, Clone, Copy)]
pub struct QueryGrad<'a> {
    /// Gradient of the output rows (`mq × d`).
    pub d_out: &'a [f32],
    /// The logsumexp that normalised these queries' probabilities (all rounds and blocks).
    pub lse: &'a [f32],
    /// `d_out · out` per row.
    pub delta: &'a [f32],
}

/// Scratch for [`block_backward`].
#[derive(Debug, Default)]
pub struct BackwardScratch {
    p: Vec<f32>,
    dp: Vec<f32>,
}

impl BackwardScratch {
    pub fn bytes(&self) -> usize {
        4 * (self.p.capacity() + self.dp.capacity())
    }
}

/// Adds to `dq` (`mq × d`), `dk` and `dv` (`mk × d`) the gradients of one (query block, key
/// block) tile, recomputing probabilities `p = exp(s − lse)`. Any of the three may be `None`.
#[allow(clippy::too_many_arguments)]
pub fn block_backward(
    qb: &QueryBlock,
    kb: &KeyBlock,
    g: &QueryGrad,
    d: usize,
    rule: ScoreRule,
    dq: Option<&mut [f32]>,
    dk: Option<&mut [f32]>,
    dv: Option<&mut [f32]>,
    scratch: &mut BackwardScratch,
) {
    let (mq, mk) = (qb.pos.len(), kb.len());
    if mq == 0 || mk == 0 {
        return;
    }
    scratch.p.resize(mq * mk, 0.0);
    scratch.dp.resize(mq * mk, 0.0);
    masked_scores(qb, kb, d, rule, &mut scratch.p);
    let p = &mut scratch.p[..mq * mk];
    for i in 0..mq {
        let z = g.lse[i];
        let row = &mut p[i * mk..(i + 1) * mk];
        if z == f32::NEG_INFINITY {
            row.fill(0.0);
        } else {
            exp_shifted_sum(row, z);
        }
    }
    if let Some(dv) = dv {
        // dv += pᵀ · d_out
        gemm(dv, p, g.d_out, mk, mq, d, true, false, true, Par::Serial)
            .expect("block buffers are sized by their callers");
    }
    if dq.is_none() && dk.is_none() {
        return;
    }
    // dp = d_out · vᵀ, then ds = p ∘ (dp − delta), zero where the score is a constant.
    let dp = &mut scratch.dp[..mq * mk];
    gemm(
        dp,
        g.d_out,
        kb.v,
        mq,
        d,
        mk,
        false,
        true,
        false,
        Par::Serial,
    )
    .expect("block buffers are sized by their callers");
    for i in 0..mq {
        let qp = qb.pos[i];
        let delta = g.delta[i];
        for j in 0..mk {
            let idx = i * mk + j;
            let constant = rule.self_penalty && kb.pos[j] == qp;
            dp[idx] = if constant {
                0.0
            } else {
                p[idx] * (dp[idx] - delta) * rule.scale
            };
        }
    }
    if let Some(dq) = dq {
        gemm(dq, dp, kb.k, mq, mk, d, false, false, true, Par::Serial)
            .expect("block buffers are sized by their callers");
    }
    if let Some(dk) = dk {
        gemm(dk, dp, qb.q, mk, mq, d, true, false, true, Par::Serial)
            .expect("block buffers are sized by their callers");
    }
}
