//! Exact attention, twice: a plain reference that forms every score (f64 accumulation; for
//! tests and small lengths), and a blockwise version with an online softmax and O(N) memory,
//! which the benchmarks use as the exact-attention baseline. Both take a [`ScoreRule`], so the
//! same code serves shared-QK attention (unit keys, self penalty, scale 1) and ordinary scaled
//! attention.

use rayon::prelude::*;
use reformer_engine::{Buffer, Tensor};

use crate::banded::{Band, Banded};
use crate::block::{ScoreRule, SELF_SCORE};
use crate::error::Result;
use crate::layout::{Dims, KeyMask};

/// Query and key block length of the blockwise exact attention.
pub const EXACT_BLOCK: usize = 64;

/// The rule of shared-QK attention: scale 1, self penalty, causal as given.
pub fn shared_qk_rule(causal: bool) -> ScoreRule {
    ScoreRule {
        scale: 1.0,
        causal,
        self_penalty: true,
    }
}

/// The rule of ordinary attention: scale `1/sqrt(d)`, no self penalty.
pub fn scaled_rule(d: usize, causal: bool) -> ScoreRule {
    ScoreRule {
        scale: 1.0 / (d as f32).sqrt(),
        causal,
        self_penalty: false,
    }
}

fn banded<'a>(
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    rule: ScoreRule,
    key_mask: Option<&'a [bool]>,
) -> Result<Banded<'a>> {
    let dims = Dims::of("exact attention q", q)?;
    dims.expect("exact attention k", k)?;
    dims.expect("exact attention v", v)?;
    Ok(Banded {
        q,
        k,
        v,
        dims,
        block: EXACT_BLOCK,
        band: if rule.causal {
            Band::UpToSelf
        } else {
            Band::All
        },
        rule,
        mask: KeyMask::new(key_mask, dims)?,
    })
}

/// Blockwise exact attention: output `[heads, len, d]` and logsumexp `[heads, len]`.
pub fn exact_attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rule: ScoreRule,
    key_mask: Option<&[bool]>,
) -> Result<(Tensor, Buffer<f32>)> {
    banded(q, k, v, rule, key_mask)?.forward()
}

/// Backward of [`exact_attention_forward`]: `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub fn exact_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &[f32],
    d_out: &Tensor,
    rule: ScoreRule,
    key_mask: Option<&[bool]>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let b = banded(q, k, v, rule, key_mask)?;
    b.dims.expect("exact attention out", out)?;
    b.dims.expect("exact attention d_out", d_out)?;
    b.backward(out, lse, d_out)
}

/// Probabilities of one head's query `i` over all keys (f64), `None` where excluded.
fn reference_probs(
    q: &[f32],
    k: &[f32],
    i: usize,
    h: usize,
    dims: Dims,
    rule: ScoreRule,
    mask: &KeyMask,
) -> Vec<Option<f64>> {
    let d = dims.d;
    let scores: Vec<Option<f64>> = (0..dims.len)
        .map(|j| {
            if !mask.valid(h, j) || (rule.causal && j > i) {
                None
            } else if rule.self_penalty && j == i {
                Some(SELF_SCORE as f64)
            } else {
                let s: f64 = (0..d)
                    .map(|x| q[i * d + x] as f64 * k[j * d + x] as f64)
                    .sum();
                Some(s * rule.scale as f64)
            }
        })
        .collect();
    let m = scores
        .iter()
        .flatten()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = scores.iter().flatten().map(|s| (s - m).exp()).sum();
    scores
        .iter()
        .map(|s| s.map(|s| (s - m).exp() / z))
        .collect()
}

/// Reference exact attention: every score formed explicitly, in f64.
pub fn exact_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rule: ScoreRule,
    key_mask: Option<&[bool]>,
) -> Result<Tensor> {
    let b = banded(q, k, v, rule, key_mask)?;
    let Dims { len, d, .. } = b.dims;
    let mut out = Tensor::zeros(q.pool(), &b.dims.shape())?;
    out.data_mut()
        .par_chunks_mut(len * d)
        .enumerate()
        .for_each(|(h, o)| {
            let (qh, kh, vh) = (
                &q.data()[h * len * d..],
                &k.data()[h * len * d..],
                &v.data()[h * len * d..],
            );
            for i in 0..len {
                for (j, p) in reference_probs(qh, kh, i, h, b.dims, rule, &b.mask)
                    .into_iter()
                    .enumerate()
                {
                    if let Some(p) = p {
                        for x in 0..d {
                            o[i * d + x] += (p * vh[j * d + x] as f64) as f32;
                        }
                    }
                }
            }
        });
    Ok(out)
}

/// Backward of [`exact_attention_reference`]: `(dq, dk, dv)`, in f64 per query.
pub fn exact_attention_reference_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_out: &Tensor,
    rule: ScoreRule,
    key_mask: Option<&[bool]>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let b = banded(q, k, v, rule, key_mask)?;
    b.dims.expect("exact attention d_out", d_out)?;
    let Dims { heads, len, d } = b.dims;
    let mut dq = vec![0.0f64; heads * len * d];
    let mut dk = vec![0.0f64; heads * len * d];
    let mut dv = vec![0.0f64; heads * len * d];
    for h in 0..heads {
        let off = h * len * d;
        let (qh, kh, vh, gh) = (
            &q.data()[off..],
            &k.data()[off..],
            &v.data()[off..],
            &d_out.data()[off..],
        );
        for i in 0..len {
            let p = reference_probs(qh, kh, i, h, b.dims, rule, &b.mask);
            // dp_j = g_i · v_j ; ds_j = p_j (dp_j − Σ p dp)
            let dp: Vec<f64> = (0..len)
                .map(|j| {
                    (0..d)
                        .map(|x| gh[i * d + x] as f64 * vh[j * d + x] as f64)
                        .sum()
                })
                .collect();
            let mean: f64 = p
                .iter()
                .zip(&dp)
                .filter_map(|(p, dp)| p.map(|p| p * dp))
                .sum();
            for j in 0..len {
                let Some(pj) = p[j] else { continue };
                for x in 0..d {
                    dv[off + j * d + x] += pj * gh[i * d + x] as f64;
                }
                if rule.self_penalty && j == i {
                    continue;
                }
                let ds = pj * (dp[j] - mean) * rule.scale as f64;
                for x in 0..d {
                    dq[off + i * d + x] += ds * kh[j * d + x] as f64;
                    dk[off + j * d + x] += ds * qh[i * d + x] as f64;
                }
            }
        }
    }
    let pool = q.pool();
    let to_tensor = |x: Vec<f64>| {
        Tensor::from_vec(
            pool,
            &b.dims.shape(),
            x.into_iter().map(|v| v as f32).collect(),
        )
    };
    Ok((to_tensor(dq)?, to_tensor(dk)?, to_tensor(dv)?))
}
