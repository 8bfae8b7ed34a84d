//! The stack of reversible blocks. Its forward keeps only the final outputs; its backward
//! walks the layers in reverse, each rebuilding its inputs from its outputs, so activation
//! memory does not grow with depth. A storing (ordinary) path is kept for tests.

use reformer_engine::{MemoryPool, Tensor};

use crate::block::{BlockInputs, ReversibleBlock};
use crate::config::{LayerConfig, StepContext};
use crate::error::{shape_err, Result, ReversibleError};
use crate::params::{HasParams, Param};

#[derive(Debug)]
pub struct ReversibleStack {
    pub layers: Vec<ReversibleBlock>,
}

/// Every layer's sublayer inputs, kept by [`ReversibleStack::forward_storing`].
#[derive(Debug)]
pub struct StoredActivations {
    pub layers: Vec<BlockInputs>,
}

impl StoredActivations {
    pub fn size_in_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.size_in_bytes()).sum()
    }
}

/// The stack's gradients with the inputs it rebuilt from its outputs.
#[derive(Debug)]
pub struct StackBackward {
    pub x1: Tensor,
    pub x2: Tensor,
    pub dx1: Tensor,
    pub dx2: Tensor,
}

impl ReversibleStack {
    /// One block per config, parameters drawn from each config's seed (and the layer index,
    /// so equal seeds still give distinct layers). All layers must share `d_model`.
    pub fn new(cfgs: &[LayerConfig], pool: &MemoryPool) -> Result<Self> {
        if let Some(first) = cfgs.first() {
            if let Some((i, c)) = cfgs
                .iter()
                .enumerate()
                .find(|(_, c)| c.d_model != first.d_model)
            {
                return Err(ReversibleError::Config(format!(
                    "layer {i} has d_model {} but layer 0 has {}",
                    c.d_model, first.d_model
                )));
            }
        }
        let layers = cfgs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.validate()
                    .map_err(|e| ReversibleError::Config(format!("layer {i}: {e}")))?;
                ReversibleBlock::new(c, i, pool)
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// `d_model` of the layers (`None` for an empty stack).
    pub fn d_model(&self) -> Option<usize> {
        self.layers.first().map(|l| l.config().d_model)
    }

    /// Changes the LSH rounds of every layer (e.g. 4 at evaluation for a model trained with 1).
    pub fn set_rounds(&mut self, n_rounds: usize) {
        for l in &mut self.layers {
            l.set_rounds(n_rounds);
        }
    }

    fn check(&self, op: &'static str, t: &Tensor, like: Option<&Tensor>) -> Result<()> {
        if let Some(like) = like {
            if t.shape() != like.shape() {
                return Err(shape_err(op, t.shape(), like.shape()));
            }
            return Ok(());
        }
        match (t.shape(), self.d_model()) {
            ([_, len, d], Some(dm)) if *d == dm && *len > 0 => Ok(()),
            ([_, len, _], None) if *len > 0 => Ok(()),
            _ => Err(shape_err(
                op,
                t.shape(),
                &[0, 0, self.d_model().unwrap_or(0)],
            )),
        }
    }

    /// `(Y1, Y2)` from `(X1, X2)`, each `[batch, len, d_model]`. Keeps no per-layer activations.
    pub fn forward(
        &mut self,
        x1: Tensor,
        x2: Tensor,
        ctx: &StepContext,
    ) -> Result<(Tensor, Tensor)> {
        self.check("reversible stack x1", &x1, None)?;
        self.check("reversible stack x2", &x2, Some(&x1))?;
        let (mut a, mut b) = (x1, x2);
        for layer in &self.layers {
            (a, b) = layer.forward(a, b, ctx)?;
        }
        Ok((a, b))
    }

    /// Forward that also returns the buckets of every LSH layer, concatenated in layer order
    /// (each `[batch·heads, rounds, len]`): what a gradient check compares to skip points
    /// where a perturbation moves a bucket.
    pub fn forward_with_buckets(
        &mut self,
        x1: Tensor,
        x2: Tensor,
        ctx: &StepContext,
    ) -> Result<(Tensor, Tensor, Vec<u32>)> {
        self.check("reversible stack x1", &x1, None)?;
        self.check("reversible stack x2", &x2, Some(&x1))?;
        let (mut y1, mut y2) = (x1, x2);
        let mut buckets = Vec::new();
        for layer in &self.layers {
            if let Some(bk) = layer
                .attn
                .forward_add_with_buckets(&y2, &mut y1, 1.0, ctx)?
            {
                buckets.extend_from_slice(&bk);
            }
            layer.ff.forward_add(&y1, &mut y2, 1.0, ctx)?;
        }
        Ok((y1, y2, buckets))
    }

    /// `(X1, X2)` rebuilt from `(Y1, Y2)` without gradients.
    pub fn inverse(&self, y1: Tensor, y2: Tensor, ctx: &StepContext) -> Result<(Tensor, Tensor)> {
        self.check("reversible stack y1", &y1, None)?;
        self.check("reversible stack y2", &y2, Some(&y1))?;
        let (mut a, mut b) = (y1, y2);
        for layer in self.layers.iter().rev() {
            (a, b) = layer.inverse(a, b, ctx)?;
        }
        Ok((a, b))
    }

    /// Backward from the outputs and their gradients: returns `(dX1, dX2)` and accumulates
    /// parameter gradients, rebuilding each layer's inputs from its outputs.
    pub fn backward(
        &mut self,
        y1: Tensor,
        y2: Tensor,
        dy1: Tensor,
        dy2: Tensor,
        ctx: &StepContext,
    ) -> Result<(Tensor, Tensor)> {
        let r = self.backward_full(y1, y2, dy1, dy2, ctx)?;
        Ok((r.dx1, r.dx2))
    }

    /// [`ReversibleStack::backward`], also returning the rebuilt stack inputs.
    pub fn backward_full(
        &mut self,
        y1: Tensor,
        y2: Tensor,
        dy1: Tensor,
        dy2: Tensor,
        ctx: &StepContext,
    ) -> Result<StackBackward> {
        self.check("reversible stack y1", &y1, None)?;
        self.check("reversible stack y2", &y2, Some(&y1))?;
        self.check("reversible stack dy1", &dy1, Some(&y1))?;
        self.check("reversible stack dy2", &dy2, Some(&y1))?;
        let (mut a, mut b, mut da, mut db) = (y1, y2, dy1, dy2);
        for layer in self.layers.iter_mut().rev() {
            let r = layer.backward(a, b, da, db, ctx)?;
            (a, b, da, db) = (r.x1, r.x2, r.dx1, r.dx2);
        }
        Ok(StackBackward {
            x1: a,
            x2: b,
            dx1: da,
            dx2: db,
        })
    }

    /// The ordinary, non-reversible forward: keeps every layer's sublayer inputs.
    pub fn forward_storing(
        &mut self,
        x1: Tensor,
        x2: Tensor,
        ctx: &StepContext,
    ) -> Result<(Tensor, Tensor, StoredActivations)> {
        self.check("reversible stack x1", &x1, None)?;
        self.check("reversible stack x2", &x2, Some(&x1))?;
        let (mut a, mut b) = (x1, x2);
        let mut stored = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (y1, y2, s) = layer.forward_storing(a, b, ctx)?;
            (a, b) = (y1, y2);
            stored.push(s);
        }
        Ok((a, b, StoredActivations { layers: stored }))
    }

    /// The ordinary backward from stored activations: `(dX1, dX2)`; accumulates parameter
    /// gradients exactly like [`ReversibleStack::backward`] but reads inputs instead of
    /// rebuilding them.
    pub fn backward_storing(
        &mut self,
        stored: StoredActivations,
        dy1: Tensor,
        dy2: Tensor,
        ctx: &StepContext,
    ) -> Result<(Tensor, Tensor)> {
        if stored.layers.len() != self.layers.len() {
            return Err(shape_err(
                "stored activations (layers)",
                &[stored.layers.len()],
                &[self.layers.len()],
            ));
        }
        self.check("reversible stack dy1", &dy1, None)?;
        self.check("reversible stack dy2", &dy2, Some(&dy1))?;
        let (mut da, mut db) = (dy1, dy2);
        let mut stored = stored.layers;
        for layer in self.layers.iter_mut().rev() {
            let s = stored
                .pop()
                .ok_or_else(|| shape_err("stored activations", &[0], &[1]))?;
            (da, db) = layer.backward_storing(&s, da, db, ctx)?;
        }
        Ok((da, db))
    }
}

impl HasParams for ReversibleStack {
    fn params(&self) -> Vec<&Param> {
        self.layers.iter().flat_map(|l| l.params()).collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.params_mut())
            .collect()
    }
}
