//! Reversible residual layers for the Reformer engine, on the CPU: layer norm, the chunked
//! feed-forward, the attention sublayer (LSH, local or exact), the reversible block and the
//! stack, each with a hand-written forward and backward (no autograd tape).
//!
//! The stack's forward keeps only its outputs; its backward rebuilds each layer's inputs from
//! that layer's outputs (`X2 = Y2 − FF(Y1)`, `X1 = Y1 − Attn(X2)`), recomputing the sublayers
//! with the same LSH rotations and dropout masks (both drawn from `(seed, step, layer)`), so
//! stored activations do not grow with depth. Every buffer is drawn from the engine's
//! [`reformer_engine::MemoryPool`], so a pool's peak is the peak of the computation.
//!
//! Tensors are `[batch, len, d_model]`; inside attention, heads fold into the batch:
//! `[batch·heads, len, d_head]`. Position-wise work (layer norms, projections, the
//! feed-forward) runs over blocks of `ff_chunk` positions, so besides the two streams and
//! their gradients a layer holds only head-layout activations of one attention call and
//! chunk-sized scratch.
//!
//! Randomness is a pure function of labels: parameters of `(cfg.seed, layer)`, LSH rotations
//! of `(cfg.seed, ctx.step, layer)` (shared by every head and batch element of the call),
//! dropout masks of `(cfg.seed, ctx.step, layer, site, position)`.
//!
//! The storing path ([`ReversibleStack::forward_storing`] / `backward_storing`) keeps every
//! layer's sublayer inputs instead of rebuilding them; tests compare the two.

pub mod attention_layer;
pub mod block;
pub mod config;
pub mod dropout;
pub mod error;
pub mod feed_forward;
pub mod heads;
pub mod layer_norm;
pub mod linear;
mod par;
pub mod params;
mod seed;
pub mod stack;

pub use attention_layer::{layer_rotations, AttentionLayer};
pub use block::{BlockBackward, BlockInputs, ReversibleBlock};
pub use config::{AttentionKind, LayerConfig, StepContext};
pub use dropout::{Dropout, Site};
pub use error::{Result, ReversibleError};
pub use feed_forward::FeedForward;
pub use layer_norm::LayerNorm;
pub use params::{HasParams, Param};
pub use stack::{ReversibleStack, StackBackward, StoredActivations};
