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
use crate::train::StepStats;

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
        let step = self.state.step;
        let batch = self.batch.max(1) as u64;
        self.lm.zero_grad()?;
        let mut loss_sum = 0.0f64;
        for k in 0..batch {
            let index = step * batch + k;
            let window = self
                .data
                .train_window(self.state.data_seed, index, self.state.seq_len)?;
            let loss = self
                .lm
                .train_step_grads(window, &StepContext::train(index))?;
            loss_sum += loss as f64;
        }
        let loss = (loss_sum / batch as f64) as f32;
        let lr = self.state.schedule.lr_at(step);
        let stats = self
            .lm
            .adam_update_scaled(self.state.adam, lr, 1.0 / batch as f32)?;
        let tokens = self.state.seq_len * batch as usize;
        self.state.step += 1;
        self.state.tokens_seen += tokens as u64;
        Ok(StepStats {
            step,
            loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens,
        })
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
        let windows: Vec<Vec<u8>> = self
            .data
            .valid_windows(len, max_windows)
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        if windows.is_empty() {
            return Ok(None);
        }
        let cfg = self.lm.config().clone();
        let train_rounds = self.lm.rounds();
        self.lm.set_rounds(rounds.unwrap_or(cfg.eval_rounds))?;
        let result = (|| {
            let (mut sum, mut count) = (0.0f64, 0usize);
            for w in &windows {
                sum += self.lm.eval_loss_sum(w, &StepContext::eval(0))?;
                count += w.len() - 1;
            }
            Ok(Some((sum / count as f64) as f32))
        })();
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
