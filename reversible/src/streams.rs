//! The random streams of a layer, each a pure function of its labels: parameter
//! initialisation of `(seed, layer, sublayer)` and LSH rotations of `(seed, step, layer)`, so a
//! backward pass's recompute, a resumed run and every backend draw the same ones.

use reformer_engine::Rng;
use reformer_lsh::Rotations;

use crate::config::{LayerConfig, StepContext};
use crate::error::Result;
use crate::seed::{derive, DOMAIN_PARAMS, DOMAIN_ROTATIONS};

/// The parameter stream of sublayer `sublayer` (0: attention, 1: feed-forward) of layer
/// `layer` with layer seed `seed`.
pub fn param_stream(seed: u64, layer: usize, sublayer: u64) -> Rng {
    derive(seed, &[DOMAIN_PARAMS, layer as u64, sublayer])
}

/// The LSH rotations of layer `layer` at this step for sequences of `len` positions (shared by
/// every head and every sequence of the call).
pub fn layer_rotations(
    cfg: &LayerConfig,
    layer: usize,
    len: usize,
    ctx: &StepContext,
) -> Result<Rotations> {
    let mut rng = derive(cfg.seed, &[DOMAIN_ROTATIONS, ctx.step, layer as u64]);
    Ok(Rotations::random(
        cfg.d_head,
        cfg.n_rounds,
        cfg.buckets_for(len),
        &mut rng,
    )?)
}
