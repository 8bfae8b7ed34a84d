//! Inverted dropout whose masks are a pure function of (seed, step, layer, site, row): a
//! replay during the backward pass's recompute, in any chunking, draws the same mask.

use reformer_engine::Rng;

use crate::config::StepContext;
use crate::par::for_rows;
use crate::seed::{derive, DOMAIN_DROPOUT};

/// Where in a layer a mask applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// The attention layer's output (after `W_o`).
    AttentionOutput = 0,
    /// The feed-forward hidden, after the ReLU.
    FeedForwardHidden = 1,
    /// The feed-forward output (after the second linear map).
    FeedForwardOutput = 2,
}

/// One dropout mask source; `None` from [`Dropout::new`] when dropout is off.
#[derive(Debug, Clone)]
pub struct Dropout {
    rate: f32,
    scale: f32,
    base: Rng,
}

impl Dropout {
    /// The mask of `site` in layer `layer` at this step, or `None` when `rate` is 0 or the step
    /// is not a training step.
    pub fn new(rate: f32, seed: u64, ctx: &StepContext, layer: usize, site: Site) -> Option<Self> {
        (ctx.train && rate > 0.0).then(|| Self {
            rate,
            scale: 1.0 / (1.0 - rate),
            base: derive(seed, &[DOMAIN_DROPOUT, ctx.step, layer as u64, site as u64]),
        })
    }

    pub fn rate(&self) -> f32 {
        self.rate
    }

    /// State words of the base generator; row `r`'s mask is drawn from `base.fork(r)`, so
    /// these (words 0 and 3 suffice) let a GPU kernel replay the mask exactly.
    pub fn base_state(&self) -> [u64; 4] {
        self.base.state()
    }

    /// Multiplies the rows `first_row..` of a `width`-wide block `data` by the mask divided by
    /// `1 − rate`, in place. The backward pass applies the same call to the gradient.
    pub fn apply(&self, data: &mut [f32], width: usize, first_row: usize) {
        if width == 0 {
            return;
        }
        for_rows(data, width, data.len(), |i, row| {
            let mut rng = self.base.fork((first_row + i) as u64);
            for x in row.iter_mut() {
                *x = if rng.uniform() < self.rate {
                    0.0
                } else {
                    *x * self.scale
                };
            }
        });
    }
}

/// Applies `d` if present.
pub fn maybe_apply(d: Option<&Dropout>, data: &mut [f32], width: usize, first_row: usize) {
    if let Some(d) = d {
        d.apply(data, width, first_row);
    }
}
