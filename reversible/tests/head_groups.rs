//! Processing the attention sublayer a group of heads at a time (`LayerConfig::head_group`)
//! computes the same function as all heads at once.
//!
//! For each attention kind (local, LSH, exact), a 4-head layer (batch 2, length 32, d_model 16,
//! heads of 4, dropout 0.1, random layer-norm gain and bias) runs its forward (with the LSH
//! buckets) and its backward (input gradient added onto a random `dx`, reconstruction
//! subtracted from a random tensor, every parameter gradient) with `head_group` 1, 2 and 3
//! (groups 3 + 1) and with all heads (`head_group` 0).
//!
//! * LSH buckets must be identical: the rotations are shared by every head and drawn once per
//!   call, whatever the grouping.
//! * Every other value must agree within `|a − b| ≤ 1e-5 · max(1, |b|)` (1e-5 absolute, or
//!   relative for entries above 1): only the order of float additions differs (the output
//!   accumulates one group's `W_o` rows at a time, the layer-norm backward runs per group,
//!   weight gradients are summed per group before being added).
//! * `head_group` equal to (or above) the number of heads is the all-heads path: bit for bit.

mod common;

use common::*;
use reformer_engine::{MemoryPool, Rng, Tensor};
use reformer_reversible::{AttentionKind, AttentionLayer, HasParams, LayerConfig, StepContext};

const SHAPE: [usize; 3] = [2, 32, 16];
const TOL: f32 = 1e-5;

fn cfg(attention: AttentionKind, head_group: usize) -> LayerConfig {
    LayerConfig {
        d_model: 16,
        d_ff: 16,
        n_heads: 4,
        d_head: 4,
        attention,
        chunk_len: 4,
        n_buckets: None,
        n_rounds: 2,
        ff_chunk: 5,
        head_group,
        causal: true,
        dropout: 0.1,
        seed: 11,
    }
}

/// Named values, and the LSH buckets.
type Outcome = (Vec<(String, Vec<f32>)>, Option<Vec<u32>>);

/// Everything one forward and backward produce, by name.
fn run(attention: AttentionKind, head_group: usize) -> Outcome {
    let pool = MemoryPool::unlimited();
    let mut layer = AttentionLayer::new(&cfg(attention, head_group), 3, "l", &pool).unwrap();
    let mut rng = Rng::new(5);
    for p in layer.params_mut() {
        if p.value.rank() == 1 {
            let offset = if p.name.ends_with("gamma") { 1.0 } else { 0.0 };
            for v in p.value.data_mut() {
                *v = offset + 0.5 * rng.normal();
            }
        }
    }
    let ctx = StepContext::train(3);
    let x = randn(&pool, &SHAPE, 1.0, 1);
    let (out, buckets) = layer.forward_with_buckets(&x, &ctx).unwrap();
    let d_out = randn(&pool, &SHAPE, 1.0, 2);
    let mut dx = randn(&pool, &SHAPE, 1.0, 3);
    let mut rebuilt = randn(&pool, &SHAPE, 1.0, 4);
    layer
        .backward(&x, &d_out, &mut dx, Some(&mut rebuilt), &ctx)
        .unwrap();
    let mut values: Vec<(String, Vec<f32>)> = vec![
        ("output".into(), out.to_vec()),
        ("dx".into(), dx.to_vec()),
        ("reconstruction".into(), rebuilt.to_vec()),
    ];
    for p in layer.params() {
        values.push((format!("d {}", p.name), p.grad.to_vec()));
    }
    (values, buckets.map(|b| b.to_vec()))
}

fn max_scaled_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&a, &b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f32::max)
}

#[test]
fn head_groups_match_all_heads() {
    for kind in [
        AttentionKind::Local,
        AttentionKind::Lsh,
        AttentionKind::Exact,
    ] {
        let (all, all_buckets) = run(kind, 0);
        assert_eq!(all_buckets.is_some(), kind == AttentionKind::Lsh);
        for group in [1, 2, 3] {
            let (grouped, buckets) = run(kind, group);
            assert_eq!(buckets, all_buckets, "{kind:?}, group {group}: LSH buckets");
            for ((name, a), (_, b)) in grouped.iter().zip(&all) {
                let diff = max_scaled_diff(a, b);
                eprintln!("{kind:?} group {group} {name:<16} max scaled diff {diff:.2e}");
                assert!(
                    diff <= TOL,
                    "{kind:?}, group {group}: {name} differs by {diff:.3e} (> {TOL:e})"
                );
                assert!(b.iter().any(|&v| v != 0.0), "{kind:?}: {name} is all zero");
            }
        }
        // One group of every head is the all-heads path.
        for group in [4, 9] {
            let (same, buckets) = run(kind, group);
            assert_eq!(buckets, all_buckets);
            for ((name, a), (_, b)) in same.iter().zip(&all) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(a), bits(b), "{kind:?}, group {group}: {name}");
            }
        }
    }
}

/// A model's stack of such layers gives the same loss gradients whatever the grouping (the
/// grouping reaches every layer through `LayerConfig`); checked on the reversible stack with
/// local and LSH layers.
#[test]
fn stack_backward_matches_with_head_groups() {
    use reformer_reversible::ReversibleStack;
    let run = |head_group: usize| {
        let pool = MemoryPool::unlimited();
        let cfgs: Vec<LayerConfig> = alternating(2, 0.1)
            .into_iter()
            .map(|c| LayerConfig {
                n_heads: 4,
                d_head: 4,
                head_group,
                ..c
            })
            .collect();
        let mut stack = ReversibleStack::new(&cfgs, &pool).unwrap();
        let ctx = StepContext::train(2);
        let shape = [2, 24, 16];
        let [x1, x2, g1, g2] = [1, 2, 3, 4].map(|s| randn(&pool, &shape, 1.0, s));
        let (y1, y2) = stack.forward(x1, x2, &ctx).unwrap();
        let outs: Vec<Vec<f32>> = [&y1, &y2].iter().map(|t: &&Tensor| t.to_vec()).collect();
        let (dx1, dx2) = stack.backward(y1, y2, g1, g2, &ctx).unwrap();
        let mut v = outs;
        v.extend([dx1.to_vec(), dx2.to_vec()]);
        v.extend(stack.params().iter().map(|p| p.grad.to_vec()));
        v
    };
    let all = run(0);
    let one = run(1);
    for (i, (a, b)) in one.iter().zip(&all).enumerate() {
        let diff = max_scaled_diff(a, b);
        assert!(diff <= TOL, "stack value {i} differs by {diff:.3e}");
    }
}
