//! The Reformer language model: byte embedding + axial positions, duplicated into `(X1, X2)`,
//! the reversible stack, and the chunked LM head. Forward and backward are written by hand;
//! the stack recomputes its activations in the backward, so what a training step holds does
//! not grow with depth.

use reformer_engine::{MemoryPool, Rng, Tensor};
use reformer_reversible::{ReversibleStack, StepContext};

use crate::axial::AxialPositions;
use crate::config::ModelConfig;
use crate::embedding::TokenEmbedding;
use crate::error::{ReformerError, Result};
use crate::lm_head::LmHead;
use crate::param::{HasParams, Param};

pub struct ReformerLm {
    cfg: ModelConfig,
    pool: MemoryPool,
    pub tokens: TokenEmbedding,
    pub positions: AxialPositions,
    pub stack: ReversibleStack,
    pub head: LmHead,
    rounds: usize,
}

impl ReformerLm {
    /// A freshly initialised model (all tensors from `pool`), deterministic in `cfg.seed`.
    pub fn new(cfg: &ModelConfig, pool: &MemoryPool) -> Result<Self> {
        cfg.validate()?;
        let rng = Rng::new(cfg.seed);
        let tokens = TokenEmbedding::new(pool, cfg.d_model, &mut rng.fork(1001))?;
        let positions =
            AxialPositions::new(pool, cfg.axial_shape, cfg.axial_dims, &mut rng.fork(1002))?;
        let stack = ReversibleStack::new(&cfg.layer_configs(), pool)?;
        let head = LmHead::new(pool, cfg.d_model, cfg.loss_chunk, &mut rng.fork(1003))?;
        Ok(Self {
            cfg: cfg.clone(),
            pool: pool.clone(),
            tokens,
            positions,
            stack,
            head,
            rounds: cfg.n_rounds,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn pool(&self) -> &MemoryPool {
        &self.pool
    }

    /// Hash rounds of the LSH layers from now on.
    pub fn set_rounds(&mut self, n_rounds: usize) -> Result<()> {
        if n_rounds == 0 {
            return Err(ReformerError::InvalidArgument(
                "LSH attention needs at least one hash round".into(),
            ));
        }
        if n_rounds != self.rounds {
            self.stack.set_rounds(n_rounds);
            self.rounds = n_rounds;
        }
        Ok(())
    }

    pub fn rounds(&self) -> usize {
        self.rounds
    }

    /// Positions per chunk of the LM head (the loss).
    pub fn set_loss_chunk(&mut self, chunk: usize) {
        self.head.set_chunk(chunk);
    }

    fn check_len(&self, len: usize) -> Result<()> {
        if len == 0 || len > self.cfg.max_len() {
            return Err(ReformerError::Length {
                len,
                max_len: self.cfg.max_len(),
            });
        }
        Ok(())
    }

    /// Embeds `inputs` into `(X1, X2)`, both `[1, len, d_model]`.
    fn embed(&self, inputs: &[u8]) -> Result<(Tensor, Tensor)> {
        let len = inputs.len();
        let mut x = Tensor::zeros(&self.pool, &[1, len, self.cfg.d_model])?;
        self.tokens.forward(inputs, x.data_mut());
        self.positions.forward_add(x.data_mut(), len)?;
        let x2 = x.try_clone()?;
        Ok((x, x2))
    }

    /// Runs embedding and stack: `(Y1, Y2)`.
    fn forward_stack(&mut self, inputs: &[u8], ctx: &StepContext) -> Result<(Tensor, Tensor)> {
        self.check_len(inputs.len())?;
        let (x1, x2) = self.embed(inputs)?;
        Ok(self.stack.forward(x1, x2, ctx)?)
    }

    fn split(tokens: &[u8]) -> Result<(&[u8], &[u8])> {
        if tokens.len() < 2 {
            return Err(ReformerError::InvalidArgument(format!(
                "a training sequence needs at least 2 tokens (inputs + next-byte targets), got {}",
                tokens.len()
            )));
        }
        Ok((&tokens[..tokens.len() - 1], &tokens[1..]))
    }

    /// Forward and backward of one sequence: `tokens` holds `len + 1` bytes, position `p`
    /// predicts `tokens[p + 1]`. Returns the mean loss in nats and **adds** the gradients of
    /// the mean loss to every parameter's `grad` (call [`HasParams::zero_grad`] first).
    pub fn train_step_grads(&mut self, tokens: &[u8], ctx: &StepContext) -> Result<f32> {
        let (inputs, targets) = Self::split(tokens)?;
        let len = inputs.len();
        let (y1, y2) = self.forward_stack(inputs, ctx)?;
        let (sum, dy1, dy2) = self
            .head
            .loss_and_backward(&y1, &y2, targets, 1.0 / len as f32)?;
        let loss = (sum / len as f64) as f32;
        if !loss.is_finite() {
            return Err(ReformerError::NonFinite {
                what: "loss",
                value: loss,
                step: ctx.step,
            });
        }
        let (mut dx1, dx2) = self.stack.backward(y1, y2, dy1, dy2, ctx)?;
        // X1 and X2 are the same embedding: its gradient is the sum.
        for (a, b) in dx1.data_mut().iter_mut().zip(dx2.data()) {
            *a += b;
        }
        let dx = dx1.data();
        self.positions.backward(dx, len)?;
        self.tokens.backward(inputs, dx);
        Ok(loss)
    }

    /// Mean loss (nats) of one sequence of `len + 1` bytes, without gradients, with the
    /// rounds currently set (see [`ReformerLm::set_rounds`]).
    pub fn eval_loss(&mut self, tokens: &[u8], ctx: &StepContext) -> Result<f32> {
        let sum = self.eval_loss_sum(tokens, ctx)?;
        Ok((sum / (tokens.len() - 1) as f64) as f32)
    }

    /// The summed loss (nats) over the `len` positions of `tokens` (`len + 1` bytes),
    /// accumulated in f64.
    pub fn eval_loss_sum(&mut self, tokens: &[u8], ctx: &StepContext) -> Result<f64> {
        let (inputs, targets) = Self::split(tokens)?;
        let (y1, y2) = self.forward_stack(inputs, ctx)?;
        self.head.loss(&y1, &y2, targets)
    }

    /// The 256 logits predicting the byte after `context`.
    pub fn next_logits(&mut self, context: &[u8], ctx: &StepContext) -> Result<Vec<f32>> {
        let (y1, y2) = self.forward_stack(context, ctx)?;
        self.head.logits_at(&y1, &y2, context.len() - 1)
    }
}

impl std::fmt::Debug for ReformerLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReformerLm")
            .field("config", &self.cfg)
            .field("params", &self.num_params())
            .field("rounds", &self.rounds)
            .finish()
    }
}

impl HasParams for ReformerLm {
    /// Embedding, axial tables, the stack's parameters in its order, then the head.
    fn params(&self) -> Vec<&Param> {
        let mut v = self.tokens.params();
        v.extend(self.positions.params());
        v.extend(self.stack.params());
        v.extend(self.head.params());
        v
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut v = self.tokens.params_mut();
        v.extend(self.positions.params_mut());
        v.extend(self.stack.params_mut());
        v.extend(self.head.params_mut());
        v
    }
}
