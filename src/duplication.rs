//! The Reformer paper's synthetic duplication task (Kitaev et al. 2020, §2 and Table 2):
//! sequences `0 w 0 w` whose symbols `w` are uniform in `1..=127`; loss and accuracy count
//! only the second half, which a model can predict only by attending back `|w| + 1` positions.
//!
//! A sequence of `2(n + 1)` bytes gives `2n + 1` positions (position `p` predicts byte `p + 1`);
//! the counted positions are `n + 1 ..`, whose targets are the second `w`. Sequence `i` of a
//! stream is a pure function of `(seed, i)`, like the text pipeline's windows.

use reformer_engine::Rng;

use crate::backend::Backend;
use crate::config::{Attention, ModelConfig};
use crate::error::{ReformerError, Result};
use crate::model::ReformerLm;
use crate::optim::{AdamConfig, LrSchedule};
use crate::StepContext;

/// Largest symbol of `w` (the paper's 127; 0 is the separator).
pub const MAX_SYMBOL: u8 = 127;

/// The task with halves `w` of `n` symbols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duplication {
    pub n: usize,
}

/// Accuracy and loss on the counted positions of some sequences.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// Fraction of counted positions whose argmax prediction is the target.
    pub accuracy: f64,
    /// Mean loss (nats) per counted position.
    pub loss: f64,
    /// Counted positions.
    pub positions: usize,
}

impl Duplication {
    /// The task with `n` symbols per half (at least 1).
    pub fn new(n: usize) -> Result<Self> {
        if n == 0 {
            return Err(ReformerError::InvalidArgument(
                "the duplication task needs at least one symbol per half".into(),
            ));
        }
        Ok(Self { n })
    }

    /// Bytes per sequence: `2(n + 1)`.
    pub fn seq_bytes(&self) -> usize {
        2 * (self.n + 1)
    }

    /// Positions a model sees per sequence: `2n + 1`.
    pub fn positions(&self) -> usize {
        self.seq_bytes() - 1
    }

    /// The first counted position: the second separator, which predicts `w[0]`.
    pub fn loss_from(&self) -> usize {
        self.n + 1
    }

    /// Sequence `index` of the stream `seed`: `0 w 0 w`.
    pub fn sequence(&self, seed: u64, index: u64) -> Vec<u8> {
        let mut rng = Rng::new(seed).fork(index);
        let w: Vec<u8> = (0..self.n)
            .map(|_| 1 + rng.below(MAX_SYMBOL as usize) as u8)
            .collect();
        let mut s = Vec::with_capacity(self.seq_bytes());
        for _ in 0..2 {
            s.push(0);
            s.extend_from_slice(&w);
        }
        s
    }

    /// The paper's model for this task: one layer of `attention`, d_model = d_ff = 256, 4
    /// heads of 64, chunks of `chunk_len`, `rounds` hash rounds (training and evaluation), no
    /// dropout, automatic bucket count, and a plain learned position embedding: the axial
    /// table `1 × len` (a factorised `a1 × a2` table makes the offset `n` hard to express where
    /// `p mod a2` wraps: with `8 × 8` and `n = 31`, full attention stalled at 0.16 nats).
    pub fn model(&self, attention: Attention, chunk_len: usize, rounds: usize) -> ModelConfig {
        let len = self.positions();
        ModelConfig {
            n_layers: 1,
            d_model: 256,
            d_ff: 256,
            n_heads: 4,
            d_head: 64,
            attention: vec![attention],
            chunk_len,
            buckets: None,
            n_rounds: rounds,
            eval_rounds: rounds,
            ff_chunk: 4096,
            head_group: 0,
            loss_chunk: 4096,
            axial_shape: (1, len),
            axial_dims: (64, 192),
            dropout: 0.0,
            seed: 0,
        }
    }

    /// Trains `lm` for `schedule.total_steps` steps of `batch` sequences (step `s` takes
    /// sequences `s·batch ..` of the stream `seed`, its step context `s`), calling
    /// `on_step(step, loss)` after each with the step's mean counted loss (nats); `on_step`
    /// returning `false` stops early. Returns the steps made.
    pub fn train<B: Backend>(
        &self,
        lm: &mut ReformerLm<B>,
        batch: usize,
        seed: u64,
        schedule: LrSchedule,
        adam: AdamConfig,
        mut on_step: impl FnMut(u64, f64) -> bool,
    ) -> Result<u64> {
        let batch = batch.max(1);
        for step in 0..schedule.total_steps {
            let seqs: Vec<Vec<u8>> = (0..batch as u64)
                .map(|k| self.sequence(seed, step * batch as u64 + k))
                .collect();
            let refs: Vec<&[u8]> = seqs.iter().map(|s| s.as_slice()).collect();
            lm.zero_grad()?;
            let loss = lm.train_batch_grads_from(
                &refs,
                None,
                self.loss_from(),
                &StepContext::train(step),
            )?;
            lm.adam_update(adam, schedule.lr_at(step))?;
            if !on_step(step, loss.mean()) {
                return Ok(step + 1);
            }
        }
        Ok(schedule.total_steps)
    }

    /// Accuracy and loss of `lm` on sequences `0 .. count` of the stream `seed`, in batches
    /// of `batch`; batch `j` runs with the evaluation context `j` (its own LSH rotations).
    pub fn score<B: Backend>(
        &self,
        lm: &mut ReformerLm<B>,
        count: usize,
        batch: usize,
        seed: u64,
    ) -> Result<Score> {
        if count == 0 {
            return Err(ReformerError::InvalidArgument(
                "scoring needs at least one sequence".into(),
            ));
        }
        let (mut right, mut positions, mut loss) = (0usize, 0usize, 0.0f64);
        let seqs: Vec<Vec<u8>> = (0..count as u64).map(|i| self.sequence(seed, i)).collect();
        for (j, group) in seqs.chunks(batch.max(1)).enumerate() {
            let refs: Vec<&[u8]> = group.iter().map(|s| s.as_slice()).collect();
            let ctx = StepContext::eval(j as u64);
            let preds = lm.eval_batch_argmax(&refs, None, &ctx)?;
            for (seq, pred) in group.iter().zip(&preds) {
                for p in self.loss_from()..pred.len() {
                    right += usize::from(pred[p] == seq[p + 1]);
                    positions += 1;
                }
            }
            let l = lm.eval_batch_loss_from(&refs, None, self.loss_from(), &ctx)?;
            loss += l.sums.iter().sum::<f64>();
        }
        Ok(Score {
            accuracy: right as f64 / positions.max(1) as f64,
            loss: loss / positions.max(1) as f64,
            positions,
        })
    }
}

/// `lm`'s parameters in a model whose layers of kind `from` run as `to` (LSH and exact
/// attention share their parameters), with `rounds` hash rounds: how a model trained with one
/// attention is evaluated with another.
pub fn with_attention<B: Backend>(
    lm: &ReformerLm<B>,
    backend: B,
    from: Attention,
    to: Attention,
    rounds: usize,
) -> Result<ReformerLm<B>> {
    let shared = |a: Attention| matches!(a, Attention::Lsh | Attention::Exact);
    if from != to && !(shared(from) && shared(to)) {
        return Err(ReformerError::InvalidArgument(format!(
            "{} attention's parameters cannot run as {} attention",
            from.name(),
            to.name()
        )));
    }
    let mut snap = lm.snapshot()?;
    snap.moments = None;
    for a in snap.config.attention.iter_mut().filter(|a| **a == from) {
        *a = to;
    }
    snap.config.n_rounds = rounds;
    snap.config.eval_rounds = rounds;
    ReformerLm::from_snapshot(backend, &snap)
}
