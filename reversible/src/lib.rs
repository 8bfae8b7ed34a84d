//! What the reversible layers share on every backend: the layer configuration and the step
//! context, the random streams of a layer (parameter initialisation, LSH rotations, dropout
//! masks — each a pure function of its labels, so a recompute in the backward pass draws the
//! same ones), and the layer-norm row formulas.
//!
//! The layers themselves — the attention and feed-forward sublayers and the reversible stack
//! with its recomputing backward — are written once against the backend trait in
//! `reformer::layers` and `reformer::model`.

pub mod config;
pub mod dropout;
pub mod error;
pub mod layer_norm;
mod par;
mod seed;
pub mod streams;

pub use config::{AttentionKind, LayerConfig, StepContext};
pub use dropout::{Dropout, Site};
pub use error::{Result, ReversibleError};
pub use streams::{layer_rotations, param_stream};
