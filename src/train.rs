//! [`Trainer`]: the training loop's state machine, the same on every backend. One step = the
//! step's seeded data windows, forward and backward of each, Adam with the scheduled learning
//! rate; evaluation on fixed validation windows with the evaluation rounds; save and resume
//! through checkpoints (parameters and Adam's moments are downloaded to save, uploaded to
//! resume, so a run can move between the CPU and a GPU at any checkpoint).
//!
//! Everything a step does is a function of the checkpointed state (step index, data seed,
//! parameters, moments), so a resumed run repeats an uninterrupted one bit for bit on the CPU.

use std::path::Path;

use crate::backend::Backend;
use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::config::ModelConfig;
use crate::data::TextData;
use crate::error::{ReformerError, Result};
use crate::evaluate::evaluate_windows;
use crate::model::ReformerLm;
use crate::optim::{AdamConfig, LrSchedule};
use crate::StepContext;

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

/// Nats to bits.
pub fn bits(nats: f32) -> f32 {
    nats / std::f32::consts::LN_2
}

pub struct Trainer<B: Backend> {
    pub lm: ReformerLm<B>,
    pub state: TrainState,
    pub data: TextData,
    /// Windows of `state.seq_len` tokens per optimizer step (at least 1; see
    /// [`Trainer::step`]). Not stored in checkpoints: a resumed run continues its
    /// uninterrupted twin exactly when it is given the same batch again.
    pub batch: usize,
    /// Windows per forward pass (at least 1, at most `batch`): the step's windows run in
    /// batches of this many, each one forward and backward over `[micro_batch, seq_len]`,
    /// their gradients accumulated. Memory grows with it; `batch` by default.
    pub micro_batch: usize,
}

impl<B: Backend> Trainer<B> {
    /// A freshly initialised model (deterministic in `cfg.seed`, the same on every backend).
    pub fn new(
        backend: B,
        cfg: &ModelConfig,
        data: TextData,
        seq_len: usize,
        data_seed: u64,
        schedule: LrSchedule,
        adam: AdamConfig,
    ) -> Result<Self> {
        let lm = ReformerLm::new(backend, cfg)?;
        let state = TrainState {
            step: 0,
            tokens_seen: 0,
            seq_len,
            data_seed,
            schedule,
            adam,
        };
        Ok(Self {
            lm,
            state,
            data,
            batch: 1,
            micro_batch: 1,
        })
    }

    /// Sets the windows per step (at least 1), all in one forward pass. A fresh trainer has 1.
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self.micro_batch = self.batch;
        self
    }

    /// Sets the windows per forward pass: a divisor of `batch` (every pass weighs alike in
    /// the step's mean).
    pub fn with_micro_batch(mut self, micro_batch: usize) -> Result<Self> {
        if micro_batch == 0 || !self.batch.is_multiple_of(micro_batch) {
            return Err(ReformerError::InvalidArgument(format!(
                "{micro_batch} windows per forward pass do not divide the {} windows of a step",
                self.batch
            )));
        }
        self.micro_batch = micro_batch;
        Ok(self)
    }

    /// Continues from a loaded checkpoint: its config, parameters, moments and state.
    pub fn from_checkpoint(backend: B, ck: &Checkpoint, data: TextData) -> Result<Self> {
        let lm = ReformerLm::from_checkpoint(backend, ck)?;
        Ok(Self {
            lm,
            state: ck.state.clone(),
            data,
            batch: 1,
            micro_batch: 1,
        })
    }

    /// One optimizer step on the `batch` windows of the current step: the gradient of the
    /// mean loss over the windows, in forward passes of `micro_batch` windows.
    ///
    /// Window `k` of step `s` is the data pipeline's window number `s·batch + k`. Pass `j` of
    /// step `s` (windows `j·micro_batch ..`) runs with the step context number
    /// `s·passes + j`: its LSH rotations are shared by its windows, its dropout masks drawn per
    /// row. With one window per pass, window `k` of step `s` has context `s·batch + k` (as
    /// before batches were real); with one window per step, window `s` has context `s`.
    pub fn step(&mut self) -> Result<StepStats> {
        let batch = self.batch.max(1);
        self.lm.zero_grad()?;
        let lm = &mut self.lm;
        let (loss, passes) = train_windows(
            &self.data,
            &self.state,
            batch,
            self.micro_batch,
            |ws, ctx| Ok(lm.train_batch_grads(ws, None, ctx)?.mean() as f32),
        )?;
        let lr = self.state.schedule.lr_at(self.state.step);
        let stats = self
            .lm
            .adam_update_scaled(self.state.adam, lr, 1.0 / passes as f32)?;
        Ok(advance(&mut self.state, batch, loss, lr, stats.grad_norm))
    }

    /// Mean validation loss (nats per byte) over up to `max_windows` fixed windows of the
    /// training length, with `rounds` hash rounds (`None`: the config's eval rounds). The
    /// training rounds are restored afterwards. `None` if the validation part is empty.
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
        let windows = self.data.valid_windows(len, max_windows);
        if windows.is_empty() {
            return Ok(None);
        }
        let e = evaluate_windows(&mut self.lm, &windows, self.micro_batch, rounds)?;
        Ok(Some(e.loss as f32))
    }

    /// Saves parameters, moments and state atomically to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let snapshot = self.lm.snapshot()?;
        checkpoint::save(path, &snapshot, &self.state)?;
        Ok(())
    }
}

/// Runs `grads` (one pass's forward and backward over its windows, returning their mean
/// loss) on the `batch` windows of the step `state` is at, `micro` windows a pass, and returns
/// the mean loss and the number of passes. Window `k` of step `s` is the data pipeline's window
/// `s·batch + k`; pass `j` has the step context number `s·passes + j`.
pub(crate) fn train_windows(
    data: &TextData,
    state: &TrainState,
    batch: usize,
    micro: usize,
    mut grads: impl FnMut(&[&[u8]], &StepContext) -> Result<f32>,
) -> Result<(f32, usize)> {
    let batch = batch.max(1);
    let micro = micro.clamp(1, batch);
    let passes = batch.div_ceil(micro);
    let first = state.step * batch as u64;
    let mut windows = Vec::with_capacity(batch);
    for k in 0..batch as u64 {
        windows.push(data.train_window(state.data_seed, first + k, state.seq_len)?);
    }
    let mut loss_sum = 0.0f64;
    for (j, ws) in windows.chunks(micro).enumerate() {
        let ctx = StepContext::train(state.step * passes as u64 + j as u64);
        loss_sum += grads(ws, &ctx)? as f64 * ws.len() as f64;
    }
    Ok(((loss_sum / batch as f64) as f32, passes))
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
