//! The reversible block: `Y1 = X1 + Attn(X2)`, `Y2 = X2 + FF(Y1)` (each sublayer normalises
//! its own input). Its backward starts from the outputs and rebuilds the inputs:
//! recompute `FF(Y1)`, `X2 = Y2 − FF(Y1)`; recompute `Attn(X2)`, `X1 = Y1 − Attn(X2)`,
//! accumulating gradients on the way. All of it works in place on the four tensors it is given.

use reformer_engine::{MemoryPool, Tensor};

use crate::attention_layer::AttentionLayer;
use crate::config::{LayerConfig, StepContext};
use crate::error::{shape_err, Result};
use crate::feed_forward::FeedForward;
use crate::params::{HasParams, Param};

#[derive(Debug)]
pub struct ReversibleBlock {
    pub attn: AttentionLayer,
    pub ff: FeedForward,
    index: usize,
}

/// What the non-reversible (storing) path keeps per block: the input of each sublayer.
#[derive(Debug)]
pub struct BlockInputs {
    /// Input of the attention sublayer (`X2`).
    pub x2: Tensor,
    /// Input of the feed-forward sublayer (`Y1`).
    pub y1: Tensor,
}

impl BlockInputs {
    pub fn size_in_bytes(&self) -> usize {
        self.x2.size_in_bytes() + self.y1.size_in_bytes()
    }
}

/// A block's gradients with the inputs it rebuilt.
#[derive(Debug)]
pub struct BlockBackward {
    pub x1: Tensor,
    pub x2: Tensor,
    pub dx1: Tensor,
    pub dx2: Tensor,
}

fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(shape_err(op, b.shape(), a.shape()));
    }
    Ok(())
}

impl ReversibleBlock {
    /// Layer `index` of a stack; parameter names start with `layers.{index}.`.
    pub fn new(cfg: &LayerConfig, index: usize, pool: &MemoryPool) -> Result<Self> {
        let prefix = format!("layers.{index}");
        Ok(Self {
            attn: AttentionLayer::new(cfg, index, &prefix, pool)?,
            ff: FeedForward::new(cfg, index, &prefix, pool)?,
            index,
        })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn config(&self) -> &LayerConfig {
        self.attn.config()
    }

    pub fn set_rounds(&mut self, n_rounds: usize) {
        self.attn.set_rounds(n_rounds);
    }

    /// `(Y1, Y2)` from `(X1, X2)`, reusing the input buffers.
    pub fn forward(&self, x1: Tensor, x2: Tensor, ctx: &StepContext) -> Result<(Tensor, Tensor)> {
        same_shape("reversible block x2", &x1, &x2)?;
        let mut y1 = x1;
        self.attn.forward_add(&x2, &mut y1, 1.0, ctx)?;
        let mut y2 = x2;
        self.ff.forward_add(&y1, &mut y2, 1.0, ctx)?;
        Ok((y1, y2))
    }

    /// `(X1, X2)` from `(Y1, Y2)` without gradients.
    pub fn inverse(&self, y1: Tensor, y2: Tensor, ctx: &StepContext) -> Result<(Tensor, Tensor)> {
        same_shape("reversible block y2", &y1, &y2)?;
        let mut x2 = y2;
        self.ff.forward_add(&y1, &mut x2, -1.0, ctx)?;
        let mut x1 = y1;
        self.attn.forward_add(&x2, &mut x1, -1.0, ctx)?;
        Ok((x1, x2))
    }

    /// Backward from the outputs and their gradients: rebuilds `(X1, X2)`, returns them with
    /// `(dX1, dX2)`, and accumulates parameter gradients. Works in place on the four tensors.
    pub fn backward(
        &mut self,
        y1: Tensor,
        y2: Tensor,
        dy1: Tensor,
        dy2: Tensor,
        ctx: &StepContext,
    ) -> Result<BlockBackward> {
        same_shape("reversible block y2", &y1, &y2)?;
        same_shape("reversible block dy1", &y1, &dy1)?;
        same_shape("reversible block dy2", &y1, &dy2)?;
        let (mut y1, mut x2) = (y1, y2);
        let (mut dx1, mut dx2) = (dy1, dy2);
        // Y2 = X2 + FF(Y1): dY1 += FF'(Y1)ᵀ dY2, X2 = Y2 − FF(Y1).
        self.ff.backward(&y1, &dx2, &mut dx1, Some(&mut x2), ctx)?;
        // Y1 = X1 + Attn(X2): dX2 = dY2 + Attn'(X2)ᵀ dY1, X1 = Y1 − Attn(X2).
        self.attn
            .backward(&x2, &dx1, &mut dx2, Some(&mut y1), ctx)?;
        Ok(BlockBackward {
            x1: y1,
            x2,
            dx1,
            dx2,
        })
    }

    /// Forward that also returns the sublayers' inputs, for [`ReversibleBlock::backward_storing`].
    pub fn forward_storing(
        &self,
        x1: Tensor,
        x2: Tensor,
        ctx: &StepContext,
    ) -> Result<(Tensor, Tensor, BlockInputs)> {
        same_shape("reversible block x2", &x1, &x2)?;
        let mut y1 = x1;
        self.attn.forward_add(&x2, &mut y1, 1.0, ctx)?;
        let saved = BlockInputs {
            x2: x2.try_clone()?,
            y1: y1.try_clone()?,
        };
        let mut y2 = x2;
        self.ff.forward_add(&y1, &mut y2, 1.0, ctx)?;
        Ok((y1, y2, saved))
    }

    /// The ordinary backward from stored sublayer inputs (no reconstruction): `(dX1, dX2)`.
    pub fn backward_storing(
        &mut self,
        saved: &BlockInputs,
        dy1: Tensor,
        dy2: Tensor,
        ctx: &StepContext,
    ) -> Result<(Tensor, Tensor)> {
        same_shape("reversible block dy1", &saved.y1, &dy1)?;
        same_shape("reversible block dy2", &saved.y1, &dy2)?;
        same_shape("reversible block stored x2", &saved.y1, &saved.x2)?;
        let (mut dx1, mut dx2) = (dy1, dy2);
        self.ff.backward(&saved.y1, &dx2, &mut dx1, None, ctx)?;
        self.attn.backward(&saved.x2, &dx1, &mut dx2, None, ctx)?;
        Ok((dx1, dx2))
    }
}

impl HasParams for ReversibleBlock {
    fn params(&self) -> Vec<&Param> {
        let mut v = self.attn.params();
        v.extend(self.ff.params());
        v
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut v = self.attn.params_mut();
        v.extend(self.ff.params_mut());
        v
    }
}
