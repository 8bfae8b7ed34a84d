//! The device model ([`DeviceLm`]) on the host backend — the CPU twins of the CUDA kernels —
//! against the reference model ([`ReformerLm`]): losses, every parameter's gradient, and the
//! parameters after Adam steps, on random configurations (attention kinds, head groups, row
//! blocks, loss chunks, dropout, lengths that leave partial chunks).
//!
//! This checks the device model's orchestration (row blocks, head layouts, reconstruction,
//! gradient flow, optimizer) on every machine; `tests/gpu_parity_model.rs` runs the same
//! comparison with the CUDA backend where a GPU answers.
//!
//! Tolerances (f32): loss within 1e-5 relative; a gradient tensor within 1e-4 of its largest
//! magnitude (the two sides sum in different orders: bias after or within a product, row
//! blocks); parameters after Adam within 1e-5 of their largest magnitude... scaled by the
//! learning rate they moved by.

use proptest::prelude::*;
use reformer::device::{DeviceLm, HostBackend};
use reformer::{Adam, AdamConfig, Attention, HasParams, ModelConfig, ReformerLm, StepContext};
use reformer_engine::{MemoryPool, Rng};

fn tokens(n: usize, seed: u64) -> Vec<u8> {
    let alphabet = b"abcde fghij.,";
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| alphabet[rng.below(alphabet.len())])
        .collect()
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

fn assert_tensor_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = max_abs(want).max(1e-6);
    let (i, err) = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0, 0.0f32), |(bi, be), (i, e)| {
            if e > be || e.is_nan() {
                (i, e)
            } else {
                (bi, be)
            }
        });
    assert!(
        err <= rel * scale,
        "{what}: element {i} differs by {err} (got {}, want {}; tolerance {rel} × {scale})",
        got[i],
        want[i]
    );
}

/// Runs `steps` training steps on both models from the same initial parameters and compares.
fn compare(cfg: &ModelConfig, len: usize, steps: u64, seed: u64) {
    let pool = MemoryPool::unlimited();
    let mut cpu = ReformerLm::new(cfg, &pool).unwrap();
    let dev_pool = MemoryPool::unlimited();
    let mut dev = DeviceLm::from_model(HostBackend::poisoned(&dev_pool), &cpu).unwrap();
    let acfg = AdamConfig::default();
    let mut adam = Adam::new(acfg, &cpu.params()).unwrap();
    let names: Vec<String> = cpu.params().iter().map(|p| p.name.clone()).collect();
    assert_eq!(dev.names(), &names[..]);
    for step in 0..steps {
        let toks = tokens(len + 1, seed + step);
        let ctx = StepContext::train(step);
        cpu.zero_grad();
        let want = cpu.train_step_grads(&toks, &ctx).unwrap();
        dev.zero_grad().unwrap();
        let got = dev.train_step_grads(&toks, &ctx).unwrap();
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "step {step}: loss {got} vs {want}"
        );
        let grads = dev.download_grads().unwrap();
        for (p, g) in cpu.params().iter().zip(&grads) {
            assert_tensor_close(
                &format!("step {step}: gradient of {}", p.name),
                g,
                p.grad.data(),
                1e-4,
            );
        }
        let lr = 0.01;
        let want_stats = adam.update(&mut cpu.params_mut(), lr).unwrap();
        let got_stats = dev.adam_update(acfg, lr).unwrap();
        assert!(
            (got_stats.grad_norm - want_stats.grad_norm).abs() <= 1e-4 * want_stats.grad_norm,
            "gradient norm {} vs {}",
            got_stats.grad_norm,
            want_stats.grad_norm
        );
        let values = dev.download_values().unwrap();
        for (p, v) in cpu.params().iter().zip(&values) {
            // Adam moves each weight by about lr; compare the values at a fraction of that.
            let err = v
                .iter()
                .zip(p.value.data())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                err <= 1e-2 * lr + 1e-6 * max_abs(p.value.data()),
                "step {step}: value of {} differs by {err}",
                p.name
            );
        }
    }
    // Evaluation (no dropout), with more rounds than training.
    let toks = tokens(len + 1, seed + 100);
    cpu.set_rounds(3).unwrap();
    dev.set_rounds(3).unwrap();
    let ctx = StepContext::eval(0);
    let want = cpu.eval_loss(&toks, &ctx).unwrap();
    let got = dev.eval_loss(&toks, &ctx).unwrap();
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "eval loss {got} vs {want}"
    );
}

fn tiny() -> ModelConfig {
    ModelConfig::preset("tiny").unwrap()
}

#[test]
fn tiny_preset_matches_the_reference_over_three_steps() {
    compare(&tiny(), 40, 3, 1);
}

#[test]
fn every_attention_kind_split_heads_and_dropout_match() {
    let mut cfg = tiny();
    cfg.n_layers = 3;
    cfg.attention = vec![Attention::Local, Attention::Lsh, Attention::Exact];
    cfg.head_group = 1;
    cfg.dropout = 0.1;
    cfg.ff_chunk = 12;
    cfg.loss_chunk = 7;
    compare(&cfg, 45, 2, 7);
}

#[test]
fn parameter_download_round_trips_into_a_model() {
    let cfg = tiny();
    let pool = MemoryPool::unlimited();
    let cpu = ReformerLm::new(&cfg, &pool).unwrap();
    let mut dev = DeviceLm::from_model(HostBackend::new(&pool), &cpu).unwrap();
    let toks = tokens(33, 3);
    dev.zero_grad().unwrap();
    dev.train_step_grads(&toks, &StepContext::train(0)).unwrap();
    dev.adam_update(AdamConfig::default(), 0.01).unwrap();
    let mut back = ReformerLm::new(&cfg, &pool).unwrap();
    dev.copy_values_into(&mut back).unwrap();
    let values = dev.download_values().unwrap();
    for (p, v) in back.params().iter().zip(&values) {
        assert_eq!(p.value.data(), &v[..], "{}", p.name);
    }
    // And it moved: at least one parameter differs from the initial model.
    assert!(cpu
        .params()
        .iter()
        .zip(back.params())
        .any(|(a, b)| a.value.data() != b.value.data()));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn random_configurations_match_the_reference(
        seed in 0u64..1000,
        len in 9usize..70,
        kinds in proptest::collection::vec(0usize..3, 1..4),
        head_group in 0usize..3,
        ff_chunk in 5usize..40,
        loss_chunk in 3usize..40,
        dropout in prop_oneof![Just(0.0f32), 0.05f32..0.3],
        rounds in 1usize..3,
    ) {
        let mut cfg = tiny();
        cfg.n_layers = kinds.len();
        cfg.attention = kinds
            .iter()
            .map(|&k| [Attention::Local, Attention::Lsh, Attention::Exact][k])
            .collect();
        cfg.head_group = head_group;
        cfg.ff_chunk = ff_chunk;
        cfg.loss_chunk = loss_chunk;
        cfg.dropout = dropout;
        cfg.n_rounds = rounds;
        cfg.seed = seed;
        compare(&cfg, len, 1, seed);
    }
}
