//! Derivation of independent RNG streams from a layer's seed and labels, so that a stream
//! (parameter init, rotations of a step, a dropout mask) is a pure function of its labels.

use reformer_engine::Rng;

/// Domains keep the streams of different uses apart.
pub(crate) const DOMAIN_PARAMS: u64 = 0x5041_5241_4D53; // "PARAMS"
pub(crate) const DOMAIN_ROTATIONS: u64 = 0x524F_5441_5445; // "ROTATE"
pub(crate) const DOMAIN_DROPOUT: u64 = 0x4452_4F50_4F55; // "DROPOU"

/// `Rng::new(seed)` forked by each label in turn.
pub(crate) fn derive(seed: u64, labels: &[u64]) -> Rng {
    labels
        .iter()
        .fold(Rng::new(seed), |rng, &label| rng.fork(label))
}
