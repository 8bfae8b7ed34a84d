//! The training loop's state machine: one step = a seeded data window, forward and backward,
//! Adam with the scheduled learning rate; evaluation on fixed validation windows with the
//! evaluation rounds; save and resume through checkpoints.
//!
//! Everything a step does is a function of the checkpointed state (step index, data seed,
//! parameters, moments), so a resumed run repeats an uninterrupted one bit for bit on the CPU.

use std::path::Path;

use reformer_engine::MemoryPool;
use reformer_reversible::StepContext;

use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::config::ModelConfig;
use crate::data::TextData;
use crate::error::Result;
use crate::model::ReformerLm;
use crate::optim::{Adam, AdamConfig, LrSchedule};
use crate::param::HasParams;

/// What one training step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Index of the step just made (0-based).
    pub step: u64,
    /// Mean training loss, nats per byte.
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens: usize,
}

pub struct Trainer {
    pub model: ReformerLm,
    pub adam: Adam,
    pub state: TrainState,
    pub data: TextData,
    /// Windows of `state.seq_len` tokens per optimizer step (at least 1; see
    /// [`Trainer::step`]). Not stored in checkpoints: a resumed run continues its
    /// uninterrupted twin exactly when it is given the same batch again.
    pub batch: usize,
}

/// Nats to bits.
pub fn bits(nats: f32) -> f32 {
    nats / std::f32::consts::LN_2
}

impl Trainer {
    /// A fresh model and optimizer.
    pub fn new(
        cfg: &ModelConfig,
        pool: &MemoryPool,
        data: TextData,
        seq_len: usize,
        data_seed: u64,
        schedule: LrSchedule,
        adam: AdamConfig,
    ) -> Result<Self> {
        let model = ReformerLm::new(cfg, pool)?;
        let adam_state = Adam::new(adam, &model.params())?;
        let state = TrainState {
            step: 0,
            tokens_seen: 0,
            seq_len,
            data_seed,
            schedule,
            adam,
        };
        Ok(Self {
            model,
            adam: adam_state,
            state,
            data,
            batch: 1,
        })
    }

    /// Continues from a loaded checkpoint: its config, parameters, moments and state.
    pub fn from_checkpoint(ck: &Checkpoint, pool: &MemoryPool, data: TextData) -> Result<Self> {
        let mut model = ReformerLm::new(&ck.config, pool)?;
        let mut adam = Adam::new(ck.state.adam, &model.params())?;
        ck.restore(&mut model, Some(&mut adam))?;
        Ok(Self {
            model,
            adam,
            state: ck.state.clone(),
            data,
            batch: 1,
        })
    }

    /// Sets the windows per step (at least 1). A fresh trainer has 1.
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// One optimizer step on the `batch` windows of the current step: the gradient of the
    /// mean loss over the windows, accumulated one window at a time (memory as for one).
    ///
    /// Window `k` of step `s` is the data pipeline's window number `s·batch + k`, run with
    /// the step context of that number (its own dropout masks and LSH rotations); with one
    /// window per step this is window `s` with context `s`.
    pub fn step(&mut self) -> Result<StepStats> {
        let batch = self.batch;
        self.model.zero_grad();
        let model = &mut self.model;
        let loss = train_windows(&self.data, &self.state, batch, |w, ctx| {
            model.train_step_grads(w, ctx)
        })?;
        if batch > 1 {
            let scale = 1.0 / batch as f32;
            for p in self.model.params_mut() {
                p.grad.data_mut().iter_mut().for_each(|g| *g *= scale);
            }
        }
        let lr = self.state.schedule.lr_at(self.state.step);
        let mut params = self.model.params_mut();
        let stats = self.adam.update(&mut params, lr)?;
        Ok(advance(&mut self.state, batch, loss, lr, stats.grad_norm))
    }

    /// Mean validation loss (nats per byte) over up to `max_windows` fixed windows, with
    /// `rounds` hash rounds (`None`: the config's eval rounds). The training rounds are
    /// restored afterwards. `None` if the validation part is empty.
    pub fn evaluate(&mut self, max_windows: usize, rounds: Option<usize>) -> Result<Option<f32>> {
        self.evaluate_len(self.state.seq_len, max_windows, rounds)
    }

    /// [`Trainer::evaluate`] on validation windows of `len` tokens instead of the training
    /// length (so runs with different `--seq-len` can be compared on the same windows).
    pub fn evaluate_len(
        &mut self,
        len: usize,
        max_windows: usize,
        rounds: Option<usize>,
    ) -> Result<Option<f32>> {
        let train_rounds = self.model.rounds();
        self.model
            .set_rounds(rounds.unwrap_or(self.model.config().eval_rounds))?;
        let model = &mut self.model;
        let result = validation_loss(&self.data, len, max_windows, |w| {
            model.eval_loss_sum(w, &StepContext::eval(0))
        });
        self.model.set_rounds(train_rounds)?;
        result
    }

    /// Saves parameters, moments and state atomically to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        checkpoint::save(path, &self.model, &self.adam, &self.state)?;
        Ok(())
    }
}

/// Runs `grads` (one window's forward and backward, returning its mean loss) on each of the
/// `batch` windows of the step `state` is at, and returns their mean loss. Window `k` of step
/// `s` is the data pipeline's window `s·batch + k`, with the step context of that number (its
/// own dropout masks and LSH rotations): both trainers, on every device, step through the data
/// alike.
pub(crate) fn train_windows(
    data: &TextData,
    state: &TrainState,
    batch: usize,
    mut grads: impl FnMut(&[u8], &StepContext) -> Result<f32>,
) -> Result<f32> {
    let batch = batch.max(1) as u64;
    let mut loss_sum = 0.0f64;
    for k in 0..batch {
        let index = state.step * batch + k;
        let window = data.train_window(state.data_seed, index, state.seq_len)?;
        loss_sum += grads(window, &StepContext::train(index))? as f64;
    }
    Ok((loss_sum / batch as f64) as f32)
}

/// Counts a finished step of `batch` windows in `state` and reports it.
pub(crate) fn advance(
    state: &mut TrainState,
    batch: usize,
    loss: f32,
    lr: f32,
    grad_norm: f32,
) -> StepStats {
    let step = state.step;
    let tokens = state.seq_len * batch.max(1);
    state.step += 1;
    state.tokens_seen += tokens as u64;
    StepStats {
        step,
        loss,
        lr,
        grad_norm,
        tokens,
    }
}

/// Mean loss (nats per byte) over up to `max_windows` fixed validation windows of `len`
/// tokens, `loss_sum` giving one window's summed loss; `None` without validation data.
pub(crate) fn validation_loss(
    data: &TextData,
    len: usize,
    max_windows: usize,
    mut loss_sum: impl FnMut(&[u8]) -> Result<f64>,
) -> Result<Option<f32>> {
    let windows = data.valid_windows(len, max_windows);
    if windows.is_empty() {
        return Ok(None);
    }
    let (mut sum, mut count) = (0.0f64, 0usize);
    for w in windows {
        sum += loss_sum(w)?;
        count += w.len() - 1;
    }
    Ok(Some((sum / count as f64) as f32))
}
