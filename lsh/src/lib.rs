//! Attention for the Reformer engine, on the CPU: shared-QK LSH attention (angular hashing,
//! stable counting sort, chunked attention with look-back, multi-round logsumexp combination),
//! chunked local attention, and exact attention (a plain reference and a blockwise O(N)-memory
//! version). Each has a forward and a hand-written backward that recomputes scores from stored
//! logsumexps.
//!
//! Inputs are `[heads, len, d]` tensors; `heads` may fold a batch dimension in.

mod banded;
pub mod block;
pub mod bucket_index;
pub mod cached_attention;
pub mod error;
pub mod exact_attention;
pub mod hash;
pub mod keys;
pub mod layout;
pub mod local_attention;
pub mod lsh_attention;
pub mod sort;

pub use block::ScoreRule;
pub use bucket_index::{insert_all, insert_and_list, BucketIndex};
pub use cached_attention::{cached_attention, CachedAttention, CachedKeys, NO_KEY};
pub use error::{AttentionError, Result};
pub use exact_attention::{
    exact_attention_backward, exact_attention_forward, exact_attention_reference,
    exact_attention_reference_backward, scaled_rule, shared_qk_rule,
};
pub use hash::{Buckets, Rotations};
pub use keys::{shared_qk_grad, unit_keys};
pub use local_attention::{local_attention_backward, local_attention_forward, LocalConfig};
pub use lsh_attention::{lsh_attention_backward, lsh_attention_forward, LshConfig, LshSaved};
