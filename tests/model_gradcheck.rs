//! Gradient check of the whole model by central differences (the `tiny` preset, and a stack of
//! every attention kind with dropout and head groups): embedding, axial tables, head norm and
//! head linear (several coordinates each), and a few coordinates of every parameter of the
//! reversible stack.
//!
//! The LSH layers hash with one bucket here: a perturbation must not move a key to another
//! bucket (hashing is piecewise constant, so finite differences across a bucket change
//! measure nothing). With one bucket the LSH layer is still chunked shared-QK attention with
//! look-back, the self penalty and several rounds.

use reformer::{Attention, CpuBackend, ModelConfig, ReformerLm, StepContext};
use reformer_engine::{MemoryPool, Rng};
use reformer_lsh::Buckets;

/// Step sizes. The feed-forward's ReLU has kinks: a large step can straddle one, a small one
/// drowns in f32 rounding; a correct gradient matches at one of these scales at least, a wrong
/// one at neither.
const H: [f32; 2] = [3e-3, 1e-3];
const TOL: f32 = 1e-2;

fn tokens(n: usize, seed: u64) -> Vec<u8> {
    // A mildly structured byte stream (a few letters), so the loss has real structure.
    let alphabet = b"abcde fghij";
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| alphabet[rng.below(alphabet.len())])
        .collect()
}

#[test]
fn tiny_model_gradients_match_central_differences() {
    check_model(ModelConfig::preset("tiny").unwrap(), TOL);
}

/// Every attention kind in one stack, heads in groups of one, feed-forward and loss in small
/// row blocks: the layer and stack checks of the reversible layers, on the one model. (With
/// dropout the f32 difference quotients straddle the dropped ReLU units' kinks too often; the
/// dropout path is checked against the reference model, whose own f64 gradients are checked by
/// central differences with dropout on, in `tests/reference_model.rs`.)
#[test]
fn every_layer_kind_with_head_groups_matches_central_differences() {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.n_layers = 3;
    cfg.attention = vec![Attention::Local, Attention::Lsh, Attention::Exact];
    cfg.head_group = 1;
    cfg.ff_chunk = 12;
    cfg.loss_chunk = 7;
    // Three layers deep, an f32 difference quotient of a bias feeding ReLU units near their
    // kinks is good to about 1e-2 (the worst seen: 1.08e-2 on `layers.1.ff.b1`, whose analytic
    // value matches the f64 reference model within 1e-4): twice the tolerance here.
    check_model(cfg, 2.0 * TOL);
}

fn check_model(mut cfg: ModelConfig, tol: f32) {
    cfg.buckets = Some(Buckets::Single(1));
    let pool = MemoryPool::unlimited();
    let mut model = ReformerLm::new(CpuBackend::new(&pool), &cfg).unwrap();
    let toks = tokens(33, 5); // 32 positions: 4 chunks of 8, 2 loss chunks of 16
    let ctx = StepContext::train(3);

    model.zero_grad().unwrap();
    let loss = model.train_step_grads(&toks, &ctx).unwrap();
    assert!(loss.is_finite());
    let analytic = model.download_grads().unwrap();
    let names = model.names().to_vec();
    let mut values = model.download_values().unwrap();

    let mut rng = Rng::new(11);
    let mut worst = (0.0f32, String::new());
    let mut checked = 0;
    for (pi, name) in names.iter().enumerate() {
        let g = &analytic[pi];
        // The coordinates with the largest gradients (well above f32 noise) and one at random
        // among those that matter at all.
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        let n_top = if name.starts_with("embed") || name.starts_with("head") {
            4
        } else {
            2
        };
        let mut coords: Vec<usize> = order.iter().copied().take(n_top).collect();
        let live: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| g[i].abs() > 0.25 * g[order[0]].abs())
            .collect();
        if !live.is_empty() {
            coords.push(live[rng.below(live.len())]);
        }
        for &i in &coords {
            let orig = values[pi][i];
            let mut diff = |h: f32| {
                let mut eval = |v: f32| {
                    values[pi][i] = v;
                    model.set_value(pi, &values[pi]).unwrap();
                    model.eval_loss_sum(&toks, &ctx).unwrap() / (toks.len() - 1) as f64
                };
                let (up, down) = (eval(orig + h), eval(orig - h));
                // The step actually taken in f32.
                let step = (orig + h) as f64 - (orig - h) as f64;
                (up - down) / step
            };
            let a = g[i];
            // Relative error, with a floor at the f32 noise of the difference quotient; the
            // better of the step sizes counts (see H).
            let (err, numeric) = H
                .iter()
                .map(|&h| {
                    let numeric = diff(h) as f32;
                    let err = (a - numeric).abs() / a.abs().max(numeric.abs()).max(1e-3);
                    (err, numeric)
                })
                .fold(
                    (f32::INFINITY, 0.0),
                    |best, x| if x.0 < best.0 { x } else { best },
                );
            values[pi][i] = orig;
            model.set_value(pi, &values[pi]).unwrap();
            checked += 1;
            if err > worst.0 {
                worst = (
                    err,
                    format!("{name}[{i}]: analytic {a:e}, numeric {numeric:e}"),
                );
            }
            assert!(
                err <= tol,
                "{name}[{i}]: analytic {a:e} vs central difference {numeric:e} (rel err {err:e})"
            );
        }
    }
    eprintln!(
        "checked {checked} coordinates over {} parameters; worst rel err {:e} at {}",
        names.len(),
        worst.0,
        worst.1
    );
    assert!(names.iter().any(|n| n == "embed.tokens"));
    assert!(names.iter().any(|n| n == "head.weight"));
}
