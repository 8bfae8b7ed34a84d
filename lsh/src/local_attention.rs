//! Chunked local attention: in original order, chunk `c` attends to chunk `c` and chunk `c−1`
//! (chunk 0 only to itself); separate q, k, v; scores scaled by `1/sqrt(d_k)`; causal by
//! default. A length that is not a multiple of the chunk gets a shorter last chunk.

use reformer_engine::{Buffer, Tensor};

use crate::banded::{Band, Banded};
use crate::block::ScoreRule;
use crate::error::Result;
use crate::layout::{check_chunk, Dims, KeyMask};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalConfig {
    pub chunk_len: usize,
    pub causal: bool,
}

fn banded<'a>(
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    cfg: &LocalConfig,
    key_mask: Option<&'a [bool]>,
) -> Result<Banded<'a>> {
    let dims = Dims::of("local attention q", q)?;
    dims.expect("local attention k", k)?;
    dims.expect("local attention v", v)?;
    check_chunk(cfg.chunk_len, dims.len)?;
    Ok(Banded {
        q,
        k,
        v,
        dims,
        block: cfg.chunk_len,
        band: Band::Local,
        rule: ScoreRule {
            scale: 1.0 / (dims.d as f32).sqrt(),
            causal: cfg.causal,
            self_penalty: false,
        },
        mask: KeyMask::new(key_mask, dims)?,
    })
}

/// Output `[heads, len, d]` and the per-query logsumexp `[heads, len]` the backward needs.
pub fn local_attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &LocalConfig,
    key_mask: Option<&[bool]>,
) -> Result<(Tensor, Buffer<f32>)> {
    banded(q, k, v, cfg, key_mask)?.forward()
}

/// `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub fn local_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &[f32],
    d_out: &Tensor,
    cfg: &LocalConfig,
    key_mask: Option<&[bool]>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let b = banded(q, k, v, cfg, key_mask)?;
    b.dims.expect("local attention out", out)?;
    b.dims.expect("local attention d_out", d_out)?;
    b.backward(out, lse, d_out)
}
