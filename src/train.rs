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
        let step = self.state.step;
        let batch = self.batch.max(1) as u64;
        self.model.zero_grad();
        let mut loss_sum = 0.0f64;
        for k in 0..batch {
            let index = step * batch + k;
            let window = self
                .data
                .train_window(self.state.data_seed, index, self.state.seq_len)?;
            let loss = self
                .model
                .train_step_grads(window, &StepContext::train(index))?;
            loss_sum += loss as f64;
        }
        if batch > 1 {
            let scale = 1.0 / batch as f32;
            for p in self.model.params_mut() {
                p.grad.data_mut().iter_mut().for_each(|g| *g *= scale);
            }
        }
        let loss = (loss_sum / batch as f64) as f32;
        let lr = self.state.schedule.lr_at(step);
        let mut params = self.model.params_mut();
        let stats = self.adam.update(&mut params, lr)?;
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
        let windows: Vec<Vec<u8>> = self
            .data
            .valid_windows(len, max_windows)
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
