//! Finite-difference gradient checks of every module's hand-written backward.
//!
//! Loss `L = Σ y1∘w1 (+ Σ y2∘w2)` with random `w`, accumulated in f64 from the f32 outputs.
//! Every coordinate of every parameter group and of the inputs is checked:
//!
//! * five-point differences `(8(L(+ε) − L(−ε)) − (L(+2ε) − L(−2ε))) / 12ε` with `ε = 2e-2`,
//!   falling back to 1e-2 and 5e-3 where a larger step would cross a kink (below);
//! * relative error `|a − n| / max(|a|, |n|, floor) ≤ 1e-2`, the floor set by the f32 rounding
//!   noise `σ_L` of the loss: `floor = 2σ_L / (ε · 1e-2)` with the measured `σ_L` ≈ 1.5e-6 for
//!   single modules (floor 1.5e-2 at ε = 2e-2) and ≈ 6e-6 for the 2-layer stack (floor 6e-2),
//!   see `common::Fd`.
//!
//! The functions are piecewise smooth: a coordinate whose perturbation changes any LSH bucket
//! or switches any ReLU is skipped. Modules must check ≥ 75% of each group; the stack ≥ 50%
//! of each group and ≥ 90% of all coordinates (groups of 8 gains lose a few to one ReLU
//! near its kink).

mod common;

use common::*;
use reformer_engine::{MemoryPool, Rng, Tensor};
use reformer_reversible::{
    AttentionKind, AttentionLayer, FeedForward, HasParams, LayerConfig, LayerNorm, ReversibleStack,
    StepContext,
};

/// Least fraction of a module's group's coordinates that must be checked (not skipped).
const MIN_CHECKED: f64 = 0.75;

/// Checks every parameter of `m`; `loss(m)` evaluates the loss (None to skip). The analytic
/// gradients are what `m` holds now.
fn check_params<M: HasParams>(
    m: &mut M,
    fd: Fd,
    mut loss: impl FnMut(&mut M) -> Option<f64>,
) -> Vec<GroupCheck> {
    let analytic: Vec<(String, Vec<f32>, Vec<f32>)> = m
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.value.to_vec(), p.grad.to_vec()))
        .collect();
    let mut out = Vec::new();
    for (pi, (name, base, grad)) in analytic.iter().enumerate() {
        out.push(check_group(name, base, grad, fd, |j, v| {
            m.params_mut()[pi].value.data_mut()[j] = v;
            let l = loss(m);
            m.params_mut()[pi].value.data_mut()[j] = base[j];
            l
        }));
    }
    out
}

/// Gives every parameter a random value, so gains and biases are not at their special
/// initial values (1 and 0).
fn randomize<M: HasParams>(m: &mut M, seed: u64) {
    let mut rng = Rng::new(seed);
    for p in m.params_mut() {
        let std = if p.value.rank() == 1 {
            0.5
        } else {
            (1.0 / p.value.dim(0) as f32).sqrt()
        };
        let offset = if p.name.ends_with("gamma") { 1.0 } else { 0.0 };
        for v in p.value.data_mut() {
            *v = rng.normal() * std + offset;
        }
    }
}

#[test]
fn layer_norm_gradients() {
    let pool = MemoryPool::unlimited();
    let mut ln = LayerNorm::new(&pool, "ln", 8).unwrap();
    randomize(&mut ln, 1);
    let mut x = randn(&pool, &[2, 5, 8], 1.5, 2);
    let w = randn(&pool, &[2, 5, 8], 1.0, 3);
    let mut dx = x.zeros_like().unwrap();
    ln.backward(&x, &w, &mut dx).unwrap();
    let base = x.to_vec();
    let mut groups = vec![check_group("x", &base, dx.data(), FD, |j, v| {
        with_coord(&mut x, j, v, |x| Some(dot64(&ln.forward(x).unwrap(), &w)))
    })];
    groups.extend(check_params(&mut ln, FD, |m| {
        Some(dot64(&m.forward(&x).unwrap(), &w))
    }));
    assert_groups(&groups, FD, 1.0, 1.0);
}

fn feed_forward_gradients(dropout: f32) {
    let pool = MemoryPool::unlimited();
    // ff_chunk 5 divides neither len 7 nor batch·len 14.
    let cfg = LayerConfig {
        ff_chunk: 5,
        head_group: 0,
        dropout,
        ..small_cfg(AttentionKind::Local, 11)
    };
    let ctx = StepContext::train(3);
    let mut ff = FeedForward::new(&cfg, 0, "layers.0", &pool).unwrap();
    randomize(&mut ff, 4);
    let mut x = randn(&pool, &[2, 7, 8], 1.0, 5);
    let w = randn(&pool, &[2, 7, 8], 1.0, 6);
    let mut dx = x.zeros_like().unwrap();
    ff.backward(&x, &w, &mut dx, None, &ctx).unwrap();
    let active0 = ff.active_units(&x).unwrap().to_vec();
    let loss = |m: &FeedForward, x: &Tensor| {
        (m.active_units(x).unwrap().to_vec() == active0)
            .then(|| dot64(&m.forward(x, &ctx).unwrap(), &w))
    };
    let base = x.to_vec();
    let mut groups = vec![check_group("x", &base, dx.data(), FD, |j, v| {
        with_coord(&mut x, j, v, |x| loss(&ff, x))
    })];
    groups.extend(check_params(&mut ff, FD, |m| loss(m, &x)));
    assert_groups(&groups, FD, MIN_CHECKED, MIN_CHECKED);
}

#[test]
fn feed_forward_gradients_in_chunks() {
    feed_forward_gradients(0.0);
}

#[test]
fn feed_forward_gradients_with_dropout() {
    feed_forward_gradients(0.25);
}

fn attention_gradients(kind: AttentionKind) {
    let pool = MemoryPool::unlimited();
    let cfg = small_cfg(kind, 21);
    let ctx = StepContext::train(7);
    let mut layer = AttentionLayer::new(&cfg, 1, "layers.1", &pool).unwrap();
    randomize(&mut layer, 8);
    let mut x = randn(&pool, &[2, 16, 8], 1.0, 9);
    let w = randn(&pool, &[2, 16, 8], 1.0, 10);
    let (_, b0) = layer.forward_with_buckets(&x, &ctx).unwrap();
    let b0: Option<Vec<u32>> = b0.map(|b| b.to_vec());
    assert_eq!(b0.is_some(), kind == AttentionKind::Lsh);
    let mut dx = x.zeros_like().unwrap();
    layer.backward(&x, &w, &mut dx, None, &ctx).unwrap();
    let loss = |m: &AttentionLayer, x: &Tensor| {
        let (y, b) = m.forward_with_buckets(x, &ctx).unwrap();
        (b.map(|b| b.to_vec()) == b0).then(|| dot64(&y, &w))
    };
    let base = x.to_vec();
    let mut groups = vec![check_group("x", &base, dx.data(), FD, |j, v| {
        with_coord(&mut x, j, v, |x| loss(&layer, x))
    })];
    groups.extend(check_params(&mut layer, FD, |m| loss(m, &x)));
    assert_groups(&groups, FD, MIN_CHECKED, MIN_CHECKED);
}

#[test]
fn local_attention_layer_gradients() {
    attention_gradients(AttentionKind::Local);
}

#[test]
fn lsh_attention_layer_gradients() {
    attention_gradients(AttentionKind::Lsh);
}

#[test]
fn exact_attention_layer_gradients() {
    attention_gradients(AttentionKind::Exact);
}

/// Every piecewise decision of a stack's forward: each LSH layer's buckets and each
/// feed-forward's active ReLUs, from the stored sublayer inputs.
fn discrete_state(
    stack: &mut ReversibleStack,
    x1: &Tensor,
    x2: &Tensor,
    ctx: &StepContext,
) -> Vec<u32> {
    let (_, _, stored) = stack
        .forward_storing(x1.try_clone().unwrap(), x2.try_clone().unwrap(), ctx)
        .unwrap();
    let mut state = Vec::new();
    for (layer, s) in stack.layers.iter().zip(&stored.layers) {
        if let (_, Some(b)) = layer.attn.forward_with_buckets(&s.x2, ctx).unwrap() {
            state.extend_from_slice(&b);
        }
        state.extend(
            layer
                .ff
                .active_units(&s.y1)
                .unwrap()
                .iter()
                .map(|&a| a as u32),
        );
    }
    state
}

/// The stack's loss carries more f32 rounding noise than a single module's (measured about
/// 6e-6: larger residual streams, two layers of rounding); `noise` is twice that, giving a
/// floor of 6e-2 at the first step.
const FD_STACK: Fd = Fd {
    steps: &[2e-2, 1e-2, 5e-3],
    tol: 1e-2,
    noise: 1.2e-5,
    fourth_order: true,
};

fn stack_gradients(kinds: &[AttentionKind], dropout: f32) {
    let pool = MemoryPool::unlimited();
    let cfgs: Vec<LayerConfig> = kinds
        .iter()
        .enumerate()
        .map(|(i, &k)| LayerConfig {
            dropout,
            d_ff: 8,
            chunk_len: 2,
            ff_chunk: 3,
            head_group: 0,
            n_rounds: 1,
            ..small_cfg(k, 100 + i as u64)
        })
        .collect();
    let ctx = StepContext::train(5);
    let mut stack = ReversibleStack::new(&cfgs, &pool).unwrap();
    randomize(&mut stack, 12);
    // Small enough that few ReLUs or buckets sit near a switch: 8 positions in 4 chunks of 2
    // (LSH chunk 0 looks back at chunk 3), feed-forward chunks of 3 (3 + 3 + 2), d_ff 8, one
    // LSH round (several rounds are checked on the layer alone).
    let shape = [1, 8, 8];
    let mut x1 = randn(&pool, &shape, 1.0, 13);
    let mut x2 = randn(&pool, &shape, 1.0, 14);
    let w1 = randn(&pool, &shape, 1.0, 15);
    let w2 = randn(&pool, &shape, 1.0, 16);
    let (_, _, b0) = stack
        .forward_with_buckets(x1.try_clone().unwrap(), x2.try_clone().unwrap(), &ctx)
        .unwrap();
    assert_eq!(b0.is_empty(), !kinds.contains(&AttentionKind::Lsh));
    let state0 = discrete_state(&mut stack, &x1, &x2, &ctx);
    let (y1, y2) = stack
        .forward(x1.try_clone().unwrap(), x2.try_clone().unwrap(), &ctx)
        .unwrap();
    let (dx1, dx2) = stack
        .backward(
            y1,
            y2,
            w1.try_clone().unwrap(),
            w2.try_clone().unwrap(),
            &ctx,
        )
        .unwrap();
    let loss = |s: &mut ReversibleStack, a: &Tensor, b: &Tensor| {
        if discrete_state(s, a, b, &ctx) != state0 {
            return None;
        }
        let (y1, y2) = s
            .forward(a.try_clone().unwrap(), b.try_clone().unwrap(), &ctx)
            .unwrap();
        Some(dot64(&y1, &w1) + dot64(&y2, &w2))
    };
    let (base1, base2) = (x1.to_vec(), x2.to_vec());
    let mut groups = Vec::new();
    groups.push(check_group("x1", &base1, dx1.data(), FD_STACK, |j, v| {
        let other = &x2;
        with_coord(&mut x1, j, v, |a| loss(&mut stack, a, other))
    }));
    groups.push(check_group("x2", &base2, dx2.data(), FD_STACK, |j, v| {
        let other = &x1;
        with_coord(&mut x2, j, v, |b| loss(&mut stack, other, b))
    }));
    groups.extend(check_params(&mut stack, FD_STACK, |s| loss(s, &x1, &x2)));
    assert_eq!(groups.len(), 2 + stack.params().len());
    assert_groups(&groups, FD_STACK, 0.5, 0.9);
}

#[test]
fn two_layer_stack_gradients_lsh_then_local() {
    stack_gradients(&[AttentionKind::Lsh, AttentionKind::Local], 0.0);
}

#[test]
fn two_layer_stack_gradients_with_dropout_exact_then_lsh() {
    stack_gradients(&[AttentionKind::Exact, AttentionKind::Lsh], 0.1);
}
