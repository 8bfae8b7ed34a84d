//! The reversible stack against itself and against the storing (ordinary) path:
//! reconstruction of the inputs from the outputs, equality of gradients, dropout replay,
//! determinism per step, changing the LSH rounds, parameter names and errors.

mod common;

use common::*;
use reformer_engine::{MemoryPool, Tensor};
use reformer_reversible::{
    AttentionKind, HasParams, LayerConfig, ReversibleError, ReversibleStack, StepContext,
};

const SHAPE: [usize; 3] = [2, 32, 16];

struct Run {
    y1: Tensor,
    y2: Tensor,
    dx1: Tensor,
    dx2: Tensor,
    grads: Vec<(String, Tensor)>,
}

fn grads(stack: &ReversibleStack) -> Vec<(String, Tensor)> {
    stack
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.grad.try_clone().unwrap()))
        .collect()
}

fn inputs(pool: &MemoryPool) -> [Tensor; 4] {
    [1, 2, 3, 4].map(|s| randn(pool, &SHAPE, 1.0, s))
}

fn run_reversible(stack: &mut ReversibleStack, pool: &MemoryPool, ctx: &StepContext) -> Run {
    let [x1, x2, g1, g2] = inputs(pool);
    stack.zero_grad();
    let (y1, y2) = stack.forward(x1, x2, ctx).unwrap();
    let (y1c, y2c) = (y1.try_clone().unwrap(), y2.try_clone().unwrap());
    let (dx1, dx2) = stack.backward(y1, y2, g1, g2, ctx).unwrap();
    Run {
        y1: y1c,
        y2: y2c,
        dx1,
        dx2,
        grads: grads(stack),
    }
}

fn run_storing(stack: &mut ReversibleStack, pool: &MemoryPool, ctx: &StepContext) -> Run {
    let [x1, x2, g1, g2] = inputs(pool);
    stack.zero_grad();
    let (y1, y2, stored) = stack.forward_storing(x1, x2, ctx).unwrap();
    assert_eq!(stored.layers.len(), stack.len());
    let (dx1, dx2) = stack.backward_storing(stored, g1, g2, ctx).unwrap();
    Run {
        y1,
        y2,
        dx1,
        dx2,
        grads: grads(stack),
    }
}

/// Relative tolerance of reversible against storing gradients: the reversible path reads
/// inputs rebuilt with errors of a few f32 ulps (≤ 1e-4 absolute, see the reconstruction
/// test), so each gradient tensor may differ by 1e-4 of its largest entry.
const REV_TOL: f32 = 1e-4;

fn assert_same_gradients(rev: &Run, st: &Run) {
    // The forward passes are the same computation.
    assert_eq!(rev.y1.data(), st.y1.data(), "y1 of the two forward paths");
    assert_eq!(rev.y2.data(), st.y2.data(), "y2 of the two forward paths");
    let mut pairs: Vec<(&str, &Tensor, &Tensor)> =
        vec![("dx1", &rev.dx1, &st.dx1), ("dx2", &rev.dx2, &st.dx2)];
    for ((n, a), (m, b)) in rev.grads.iter().zip(&st.grads) {
        assert_eq!(n, m);
        pairs.push((n, a, b));
    }
    let mut worst = 0.0f32;
    for (name, a, b) in pairs {
        let scale = max_abs(b).max(1e-6);
        assert!(scale > 1e-6, "{name}: gradient is all zero");
        let rel = a.max_abs_diff(b).unwrap() / scale;
        worst = worst.max(rel);
        assert!(
            rel <= REV_TOL,
            "{name}: reversible vs storing differ by {rel:.2e} of the largest entry"
        );
    }
    eprintln!("largest relative difference, reversible vs storing: {worst:.2e}");
}

#[test]
fn six_layers_rebuild_their_inputs() {
    let pool = MemoryPool::unlimited();
    let mut stack = ReversibleStack::new(&alternating(6, 0.0), &pool).unwrap();
    let ctx = StepContext::train(11);
    let [x1, x2, g1, g2] = inputs(&pool);
    let (y1, y2) = stack
        .forward(x1.try_clone().unwrap(), x2.try_clone().unwrap(), &ctx)
        .unwrap();
    // The layers change the streams (so the reconstruction is not trivial) ...
    assert!(y1.max_abs_diff(&x1).unwrap() > 0.1 && y2.max_abs_diff(&x2).unwrap() > 0.1);
    // ... and the inverse alone, and the backward, give the inputs back.
    let (r1, r2) = stack
        .inverse(y1.try_clone().unwrap(), y2.try_clone().unwrap(), &ctx)
        .unwrap();
    let back = stack.backward_full(y1, y2, g1, g2, &ctx).unwrap();
    for (name, got, want) in [
        ("inverse x1", &r1, &x1),
        ("inverse x2", &r2, &x2),
        ("backward x1", &back.x1, &x1),
        ("backward x2", &back.x2, &x2),
    ] {
        let err = got.max_abs_diff(want).unwrap();
        eprintln!("{name}: max abs error {err:.2e}");
        assert!(
            err <= 1e-4,
            "{name}: rebuilt input off by {err:.2e} (> 1e-4)"
        );
    }
}

#[test]
fn reversible_gradients_equal_storing_gradients() {
    let pool = MemoryPool::unlimited();
    let mut stack = ReversibleStack::new(&alternating(6, 0.0), &pool).unwrap();
    let ctx = StepContext::train(3);
    let rev = run_reversible(&mut stack, &pool, &ctx);
    let st = run_storing(&mut stack, &pool, &ctx);
    assert_same_gradients(&rev, &st);
}

#[test]
fn dropout_replays_on_recompute() {
    let pool = MemoryPool::unlimited();
    let mut stack = ReversibleStack::new(&alternating(4, 0.2), &pool).unwrap();
    let ctx = StepContext::train(9);
    let rev = run_reversible(&mut stack, &pool, &ctx);
    let st = run_storing(&mut stack, &pool, &ctx);
    assert_same_gradients(&rev, &st);
    // Dropout is on in training and off in evaluation: the outputs differ.
    let [x1, x2, ..] = inputs(&pool);
    let (e1, _) = stack.forward(x1, x2, &StepContext::eval(9)).unwrap();
    assert!(
        e1.max_abs_diff(&rev.y1).unwrap() > 1e-2,
        "dropout had no effect"
    );
    // Another step draws other masks.
    let [x1, x2, ..] = inputs(&pool);
    let (o1, _) = stack.forward(x1, x2, &StepContext::train(10)).unwrap();
    assert!(
        o1.max_abs_diff(&rev.y1).unwrap() > 1e-2,
        "masks did not change with the step"
    );
}

#[test]
fn same_step_same_output_other_step_other_rotations() {
    let pool = MemoryPool::unlimited();
    let mut stack = ReversibleStack::new(&alternating(2, 0.0), &pool).unwrap();
    let fwd = |stack: &mut ReversibleStack, step| {
        let [x1, x2, ..] = inputs(&pool);
        stack.forward(x1, x2, &StepContext::eval(step)).unwrap().0
    };
    let a = fwd(&mut stack, 1);
    let b = fwd(&mut stack, 1);
    let c = fwd(&mut stack, 2);
    assert_eq!(a.data(), b.data(), "same step, different output");
    assert!(
        a.max_abs_diff(&c).unwrap() > 0.0,
        "new step, same LSH rotations"
    );
}

#[test]
fn rounds_can_change_between_training_and_evaluation() {
    let pool = MemoryPool::unlimited();
    let cfgs: Vec<LayerConfig> = alternating(2, 0.0)
        .into_iter()
        .map(|c| LayerConfig { n_rounds: 1, ..c })
        .collect();
    let mut stack = ReversibleStack::new(&cfgs, &pool).unwrap();
    let ctx = StepContext::eval(0);
    let out = |stack: &mut ReversibleStack| {
        let [x1, x2, ..] = inputs(&pool);
        stack.forward(x1, x2, &ctx).unwrap().0
    };
    let one = out(&mut stack);
    stack.set_rounds(4);
    assert!(stack.layers.iter().all(|l| l.config().n_rounds == 4));
    let four = out(&mut stack);
    assert!(
        one.max_abs_diff(&four).unwrap() > 0.0,
        "4 rounds gave the output of 1"
    );
    // The backward works with the new rounds too.
    let [x1, x2, g1, g2] = inputs(&pool);
    let (y1, y2) = stack.forward(x1, x2, &ctx).unwrap();
    stack.backward(y1, y2, g1, g2, &ctx).unwrap();
}

#[test]
fn parameter_names_are_unique_and_structured() {
    let pool = MemoryPool::unlimited();
    let mut cfgs = alternating(4, 0.0);
    cfgs[2].attention = AttentionKind::Exact;
    let stack = ReversibleStack::new(&cfgs, &pool).unwrap();
    let names: Vec<&str> = stack.params().iter().map(|p| p.name.as_str()).collect();
    let unique: std::collections::HashSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "duplicate names in {names:?}");
    for want in [
        "layers.0.ln_attn.gamma",
        "layers.0.ln_attn.beta",
        "layers.0.attn.w_q",
        "layers.0.attn.w_k",
        "layers.0.attn.w_v",
        "layers.0.attn.w_o",
        "layers.0.ln_ff.gamma",
        "layers.0.ln_ff.beta",
        "layers.0.ff.w1",
        "layers.0.ff.b1",
        "layers.0.ff.w2",
        "layers.0.ff.b2",
        "layers.1.attn.w_qk",
        "layers.2.attn.w_qk",
        "layers.3.ff.w2",
    ] {
        assert!(names.contains(&want), "missing {want} in {names:?}");
    }
    assert!(!names.contains(&"layers.1.attn.w_q"));
    for p in stack.params() {
        assert_eq!(p.value.shape(), p.grad.shape(), "{}", p.name);
    }
    // Layers with equal seeds still start different.
    let same_seed: Vec<LayerConfig> = alternating(2, 0.0)
        .into_iter()
        .map(|c| LayerConfig {
            seed: 5,
            attention: AttentionKind::Local,
            ..c
        })
        .collect();
    let s = ReversibleStack::new(&same_seed, &pool).unwrap();
    let w = |i: usize| {
        s.layers[i]
            .params()
            .iter()
            .find(|p| p.name.ends_with("w_o"))
            .unwrap()
            .value
            .to_vec()
    };
    assert_ne!(w(0), w(1));
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let pool = MemoryPool::unlimited();
    let mut stack = ReversibleStack::new(&alternating(2, 0.0), &pool).unwrap();
    let ctx = StepContext::train(0);
    let x = |shape: &[usize]| Tensor::zeros(&pool, shape).unwrap();
    // Wrong width.
    let e = stack
        .forward(x(&[1, 8, 15]), x(&[1, 8, 15]), &ctx)
        .unwrap_err();
    assert!(matches!(e, ReversibleError::Shape { .. }), "{e}");
    // Streams of different shapes.
    let e = stack
        .forward(x(&[1, 8, 16]), x(&[1, 9, 16]), &ctx)
        .unwrap_err();
    assert!(matches!(e, ReversibleError::Shape { .. }), "{e}");
    // Rank 2.
    assert!(stack.forward(x(&[8, 16]), x(&[8, 16]), &ctx).is_err());
    // Gradients of another shape.
    assert!(stack
        .backward(
            x(&[1, 8, 16]),
            x(&[1, 8, 16]),
            x(&[1, 8, 16]),
            x(&[1, 4, 16]),
            &ctx
        )
        .is_err());
    // Bad configurations.
    for bad in [
        LayerConfig {
            d_model: 0,
            ..alternating(1, 0.0)[0].clone()
        },
        LayerConfig {
            ff_chunk: 0,
            ..alternating(1, 0.0)[0].clone()
        },
        LayerConfig {
            dropout: 1.0,
            ..alternating(1, 0.0)[0].clone()
        },
        LayerConfig {
            n_rounds: 0,
            ..alternating(2, 0.0)[1].clone()
        },
        LayerConfig {
            n_buckets: Some(reformer_lsh::Buckets::Single(3)),
            ..alternating(2, 0.0)[1].clone()
        },
    ] {
        assert!(ReversibleStack::new(&[bad], &pool).is_err());
    }
    let mixed = [
        alternating(1, 0.0)[0].clone(),
        LayerConfig {
            d_model: 8,
            ..alternating(1, 0.0)[0].clone()
        },
    ];
    assert!(ReversibleStack::new(&mixed, &pool).is_err());
    // A budget too small for the step is a typed error.
    // Room for the two inputs and one more stream, not for a whole layer's work.
    let stream = 512 * 16 * 4;
    let small = MemoryPool::with_budget(3 * stream);
    let mut tiny = ReversibleStack::new(&alternating(1, 0.0), &MemoryPool::unlimited()).unwrap();
    let (a, b) = (
        Tensor::zeros(&small, &[1, 512, 16]).unwrap(),
        Tensor::zeros(&small, &[1, 512, 16]).unwrap(),
    );
    let e = tiny.forward(a, b, &ctx).unwrap_err();
    assert!(
        matches!(
            e,
            ReversibleError::Engine(reformer_engine::EngineError::OutOfMemory { .. })
        ),
        "{e}"
    );
}

#[test]
fn position_chunking_does_not_change_results() {
    // Chunks of 7 positions cross the batch boundary (rows 0..64, sequences of 32); one chunk
    // of 1000 covers everything. Same seeds, so the same parameters, rotations and masks.
    let pool = MemoryPool::unlimited();
    let with_chunk = |ff_chunk| -> Vec<LayerConfig> {
        alternating(4, 0.1)
            .into_iter()
            .map(|c| LayerConfig { ff_chunk, ..c })
            .collect()
    };
    let ctx = StepContext::train(4);
    let mut a = ReversibleStack::new(&with_chunk(7), &pool).unwrap();
    let mut b = ReversibleStack::new(&with_chunk(1000), &pool).unwrap();
    let ra = run_reversible(&mut a, &pool, &ctx);
    let rb = run_reversible(&mut b, &pool, &ctx);
    let mut pairs = vec![
        ("y1", &ra.y1, &rb.y1),
        ("y2", &ra.y2, &rb.y2),
        ("dx1", &ra.dx1, &rb.dx1),
        ("dx2", &ra.dx2, &rb.dx2),
    ];
    for ((n, x), (_, y)) in ra.grads.iter().zip(&rb.grads) {
        pairs.push((n, x, y));
    }
    for (name, x, y) in pairs {
        let rel = x.max_abs_diff(y).unwrap() / max_abs(y).max(1e-6);
        assert!(
            rel <= 1e-5,
            "{name}: chunk 7 vs 1000 differ by {rel:.2e} of the largest entry"
        );
    }
}

#[test]
fn exact_layer_is_lsh_layer_with_one_bucket() {
    use reformer_reversible::AttentionLayer;
    let pool = MemoryPool::unlimited();
    let base = alternating(2, 0.0)[1].clone();
    // One bucket and one chunk covering the sequence: LSH attention is exact attention.
    let lsh_cfg = LayerConfig {
        n_buckets: Some(reformer_lsh::Buckets::Single(1)),
        chunk_len: SHAPE[1],
        ..base.clone()
    };
    let exact_cfg = LayerConfig {
        attention: AttentionKind::Exact,
        ..base
    };
    let mut lsh = AttentionLayer::new(&lsh_cfg, 3, "l", &pool).unwrap();
    let mut exact = AttentionLayer::new(&exact_cfg, 3, "l", &pool).unwrap();
    for (a, b) in lsh.params().iter().zip(exact.params()) {
        assert_eq!(
            a.value.data(),
            b.value.data(),
            "{}: same seed, same init",
            a.name
        );
    }
    let ctx = StepContext::train(0);
    let [x, g, ..] = inputs(&pool);
    let (ya, yb) = (
        lsh.forward(&x, &ctx).unwrap(),
        exact.forward(&x, &ctx).unwrap(),
    );
    let rel = ya.max_abs_diff(&yb).unwrap() / max_abs(&yb);
    assert!(rel <= 1e-5, "outputs differ by {rel:.2e}");
    let (mut da, mut db) = (x.zeros_like().unwrap(), x.zeros_like().unwrap());
    lsh.backward(&x, &g, &mut da, None, &ctx).unwrap();
    exact.backward(&x, &g, &mut db, None, &ctx).unwrap();
    let rel = da.max_abs_diff(&db).unwrap() / max_abs(&db);
    assert!(rel <= 1e-4, "input gradients differ by {rel:.2e}");
    for (a, b) in lsh.params().iter().zip(exact.params()) {
        let rel = a.grad.max_abs_diff(&b.grad).unwrap() / max_abs(&b.grad);
        assert!(rel <= 1e-4, "{}: gradients differ by {rel:.2e}", a.name);
    }
}
