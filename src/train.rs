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
        })
    }

    /// One optimizer step on the window of the current step.
    pub fn step(&mut self) -> Result<StepStats> {
        let step = self.state.step;
        let window = self
            .data
            .train_window(self.state.data_seed, step, self.state.seq_len)?;
        self.model.zero_grad();
        let loss = self
            .model
            .train_step_grads(window, &StepContext::train(step))?;
        let lr = self.state.schedule.lr_at(step);
        let mut params = self.model.params_mut();
        let stats = self.adam.update(&mut params, lr)?;
        self.state.step += 1;
        self.state.tokens_seen += self.state.seq_len as u64;
        Ok(StepStats {
            step,
            loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens: self.state.seq_len,
        })
    }

    /// Mean validation loss (nats per byte) over up to `max_windows` fixed windows, with
    /// `rounds` hash rounds (`None`: the config's eval rounds). The training rounds are
    /// restored afterwards. `None` if the validation part is empty.
    pub fn evaluate(&mut self, max_windows: usize, rounds: Option<usize>) -> Result<Option<f32>> {
        let windows: Vec<Vec<u8>> = self
            .data
            .valid_windows(self.state.seq_len, max_windows)
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        if windows.is_empty() {
            return Ok(None);
        }
        let train_rounds = self.model.rounds();
        self.model
            .set_rounds(rounds.unwrap_or(self.model.config().eval_rounds))?;
        let result = (|| {
            let (mut sum, mut count) = (0.0f64, 0usize);
            for w in &windows {
                let n = w.len() - 1;
                let loss = self.model.eval_loss(w, &StepContext::eval(0))?;
                sum += loss as f64 * n as f64;
                count += n;
            }
            Ok(Some((sum / count as f64) as f32))
        })();
        self.model.set_rounds(train_rounds)?;
        result
    }

    /// Saves parameters, moments and state atomically to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        checkpoint::save(path, &self.model, &self.adam, &self.state)?;
        Ok(())
    }
}
