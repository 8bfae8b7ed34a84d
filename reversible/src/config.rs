//! Layer configuration and the per-step context.

use reformer_lsh::Buckets;

use crate::error::{Result, ReversibleError};

/// Which attention a layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionKind {
    /// Chunked local attention, separate `W_q`, `W_k`, `W_v`, scores scaled by `1/sqrt(d_head)`.
    Local,
    /// Shared-QK LSH attention (`W_qk`, `W_v`), rotations drawn per step.
    Lsh,
    /// Exact shared-QK attention: the same function as LSH attention with one bucket.
    Exact,
}

/// One reversible layer: `Y1 = X1 + Attn(LN(X2))`, `Y2 = X2 + FF(LN(Y1))`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerConfig {
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub d_head: usize,
    pub attention: AttentionKind,
    /// Chunk length of LSH (sorted order) and local (original order) attention.
    pub chunk_len: usize,
    /// Buckets per LSH round; `None` means [`Buckets::auto`]`(len, chunk_len)` at each call,
    /// and a count given here is an upper bound (see [`LayerConfig::buckets_for`]).
    pub n_buckets: Option<Buckets>,
    /// LSH hash rounds (ignored by the other kinds).
    pub n_rounds: usize,
    /// Positions per chunk of the position-wise work: the feed-forward (its `d_ff`-wide
    /// hidden exists for this many rows at a time) and the attention sublayer's layer norm,
    /// projections and output projection. Chunks run over `batch·len` rows and may cross
    /// sequence boundaries; results do not depend on the chunk size beyond rounding.
    pub ff_chunk: usize,
    /// Heads per pass of the attention sublayer: its projections, attention op and output
    /// projection run for this many heads at a time, so only one group's head-layout tensors
    /// (`[batch·group, len, d_head]`) exist at once. `0`, or at least `n_heads`, means every
    /// head in one pass. Results do not depend on it beyond rounding (the LSH rotations are
    /// shared by all heads, so buckets do not change); a last group may be smaller.
    pub head_group: usize,
    pub causal: bool,
    /// Dropout rate at the attention output, the feed-forward hidden and the feed-forward
    /// output; 0 turns it off. Applied only when [`StepContext::train`] is set.
    pub dropout: f32,
    /// Seeds the parameters' initialisation, the LSH rotations and the dropout masks.
    pub seed: u64,
}

impl LayerConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("n_heads", self.n_heads),
            ("d_head", self.d_head),
            ("chunk_len", self.chunk_len),
            ("ff_chunk", self.ff_chunk),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ReversibleError::Config(format!("{name} must be positive")));
            }
        }
        if self.attention == AttentionKind::Lsh && self.n_rounds == 0 {
            return Err(ReversibleError::Config(
                "LSH attention needs n_rounds >= 1".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ReversibleError::Config(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if let Some(b) = &self.n_buckets {
            b.validate()?;
        }
        Ok(())
    }

    /// Heads per pass of the attention sublayer (see [`LayerConfig::head_group`]): in
    /// `1..=n_heads`.
    pub fn heads_per_group(&self) -> usize {
        match self.head_group {
            0 => self.n_heads,
            g => g.min(self.n_heads),
        }
    }

    /// The head groups `(first head, heads)` of one pass each, in order.
    pub fn head_groups(&self) -> impl Iterator<Item = (usize, usize)> {
        let (h, g) = (self.n_heads, self.heads_per_group().max(1));
        (0..h).step_by(g).map(move |h0| (h0, g.min(h - h0)))
    }

    /// The buckets an LSH layer uses for sequences of length `len`: the automatic count
    /// (the power of two nearest `2·len/chunk`), or the configured one when it is smaller.
    /// A configured count is an upper bound: presets state theirs for their full length
    /// (e.g. `cp6`'s 64·128 at 2^19), and a shorter sequence, which could not fill that many
    /// buckets, gets the automatic count instead of thousands of empty buckets.
    pub fn buckets_for(&self, len: usize) -> Buckets {
        let auto = Buckets::auto(len, self.chunk_len);
        match &self.n_buckets {
            Some(b) if b.total() <= auto.total() => b.clone(),
            _ => auto,
        }
    }
}

/// What varies per training (or evaluation) step. `step` seeds the LSH rotations and the
/// dropout masks of that step, so the backward pass's recompute sees the same ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StepContext {
    pub step: u64,
    pub train: bool,
}

impl StepContext {
    pub fn train(step: u64) -> Self {
        Self { step, train: true }
    }
    pub fn eval(step: u64) -> Self {
        Self { step, train: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsh(n_buckets: Option<Buckets>) -> LayerConfig {
        LayerConfig {
            d_model: 8,
            d_ff: 8,
            n_heads: 1,
            d_head: 8,
            attention: AttentionKind::Lsh,
            chunk_len: 64,
            n_buckets,
            n_rounds: 1,
            ff_chunk: 8,
            head_group: 0,
            causal: true,
            dropout: 0.0,
            seed: 0,
        }
    }

    #[test]
    fn configured_buckets_are_an_upper_bound() {
        let cp6 = lsh(Some(Buckets::Factorised(64, 128)));
        // full length: the preset's count (below the automatic 128·128)
        assert_eq!(cp6.buckets_for(1 << 19), Buckets::Factorised(64, 128));
        // a 4096-token training sequence cannot fill 8192 buckets: automatic 128
        assert_eq!(cp6.buckets_for(4096), Buckets::Single(128));
        assert_eq!(lsh(None).buckets_for(1 << 16), Buckets::Factorised(32, 64));
    }

    #[test]
    fn head_groups_cover_every_head_once() {
        let with = |n_heads, head_group| LayerConfig {
            n_heads,
            head_group,
            ..lsh(None)
        };
        let groups = |c: LayerConfig| c.head_groups().collect::<Vec<_>>();
        assert_eq!(groups(with(8, 0)), vec![(0, 8)]);
        assert_eq!(groups(with(8, 8)), vec![(0, 8)]);
        assert_eq!(groups(with(8, 20)), vec![(0, 8)]);
        assert_eq!(groups(with(8, 1)).len(), 8);
        assert_eq!(groups(with(8, 3)), vec![(0, 3), (3, 3), (6, 2)]);
        assert_eq!(with(2, 0).heads_per_group(), 2);
        assert_eq!(with(2, 1).heads_per_group(), 1);
    }
}
