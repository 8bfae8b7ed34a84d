//! [`DeviceTrainer`]: [`crate::Trainer`]'s training loop with the model on a device — the same
//! windows, schedule, optimizer and evaluation, and checkpoints in the same format (parameters
//! and Adam's moments are downloaded to save, uploaded to resume), so a run can move between
//! the CPU reference and a GPU at any checkpoint.

use std::path::Path;

use reformer_engine::MemoryPool;
use reformer_reversible::StepContext;

use super::backend::Backend;
use super::model::DeviceLm;
use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::config::ModelConfig;
use crate::data::TextData;
use crate::error::Result;
use crate::model::ReformerLm;
use crate::optim::{Adam, AdamConfig, LrSchedule};
use crate::param::HasParams;
use crate::train::{advance, train_windows, validation_loss, StepStats};

pub struct DeviceTrainer<B: Backend> {
    pub lm: DeviceLm<B>,
    pub state: TrainState,
    pub data: TextData,
    /// Windows per optimizer step, as [`crate::Trainer`]'s `batch`.
    pub batch: usize,
}

impl<B: Backend> DeviceTrainer<B> {
    /// A fresh model (initialised on the host exactly as [`crate::Trainer::new`] does, then
    /// uploaded).
    pub fn new(
        backend: B,
        cfg: &ModelConfig,
        data: TextData,
        seq_len: usize,
        data_seed: u64,
        schedule: LrSchedule,
        adam: AdamConfig,
    ) -> Result<Self> {
        let lm = {
            let host = ReformerLm::new(cfg, &MemoryPool::unlimited())?;
            DeviceLm::from_model(backend, &host)?
        };
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
        })
    }

    /// Sets the windows per step (at least 1).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Resumes from a checkpoint written by either trainer.
    pub fn from_checkpoint(backend: B, ck: &Checkpoint, data: TextData) -> Result<Self> {
        let pool = MemoryPool::unlimited();
        let mut model = ReformerLm::new(&ck.config, &pool)?;
        let mut adam = Adam::new(ck.state.adam, &model.params())?;
        ck.restore(&mut model, Some(&mut adam))?;
        let mut lm = DeviceLm::from_model(backend, &model)?;
        if adam.step > 0 {
            lm.load_adam(&adam)?;
        }
        Ok(Self {
            lm,
            state: ck.state.clone(),
            data,
            batch: 1,
        })
    }

    /// One optimizer step on the `batch` windows of the current step, as
    /// [`crate::Trainer::step`]: window `k` of step `s` is the pipeline's window `s·batch + k`
    /// with that number's step context; the gradient is the mean over the windows.
    pub fn step(&mut self) -> Result<StepStats> {
        let batch = self.batch.max(1);
        self.lm.zero_grad()?;
        let lm = &mut self.lm;
        let loss = train_windows(&self.data, &self.state, batch, |w, ctx| {
            lm.train_step_grads(w, ctx)
        })?;
        let lr = self.state.schedule.lr_at(self.state.step);
        let stats = self
            .lm
            .adam_update_scaled(self.state.adam, lr, 1.0 / batch as f32)?;
        Ok(advance(&mut self.state, batch, loss, lr, stats.grad_norm))
    }

    /// Mean validation loss (nats per byte) over up to `max_windows` windows of the training
    /// length, with `rounds` hash rounds (default: the config's evaluation rounds); `None`
    /// without validation data.
    pub fn evaluate(&mut self, max_windows: usize, rounds: Option<usize>) -> Result<Option<f32>> {
        self.evaluate_len(self.state.seq_len, max_windows, rounds)
    }

    /// [`DeviceTrainer::evaluate`] on validation windows of `len` tokens.
    pub fn evaluate_len(
        &mut self,
        len: usize,
        max_windows: usize,
        rounds: Option<usize>,
    ) -> Result<Option<f32>> {
        let train_rounds = self.lm.rounds();
        self.lm
            .set_rounds(rounds.unwrap_or(self.lm.config().eval_rounds))?;
        let lm = &mut self.lm;
        let result = validation_loss(&self.data, len, max_windows, |w| {
            lm.eval_loss_sum(w, &StepContext::eval(0))
        });
        self.lm.set_rounds(train_rounds)?;
        result
    }

    /// The model and optimizer on the host (for checkpoints and sampling).
    pub fn to_host(&self, pool: &MemoryPool) -> Result<(ReformerLm, Adam)> {
        let mut model = ReformerLm::new(self.lm.config(), pool)?;
        self.lm.copy_values_into(&mut model)?;
        let mut adam = Adam::new(self.state.adam, &model.params())?;
        self.lm.copy_adam_into(&mut adam)?;
        Ok((model, adam))
    }

    /// Writes a checkpoint in the CPU trainer's format.
    pub fn save(&self, path: &Path) -> Result<()> {
        let (model, adam) = self.to_host(&MemoryPool::unlimited())?;
        checkpoint::save(path, &model, &adam, &self.state)?;
        Ok(())
    }
}
