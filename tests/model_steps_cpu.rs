//! The one model ([`ReformerLm`]) on the CPU backend against the plain reference model
//! (`tests/reference`: f64, no reversibility, no chunking): losses, every parameter's
//! gradient, and the parameters after Adam steps, on the presets and on random configurations
//! (attention kinds, head groups, row blocks, loss chunks, dropout, lengths that leave partial
//! chunks). New buffers are NaN-poisoned, so a read of an unwritten element shows.
//! `tests/gpu_parity_model.rs` runs the same comparison with the CUDA backend.
//!
//! Tolerances (f32, `model_common::HOST`): loss within 1e-5 relative; a gradient tensor within
//! 1e-4 of its largest magnitude (or of a hundredth of the largest gradient, for tensors whose
//! exact gradient is zero); parameters after an Adam step within 1% of the learning rate.

mod model_common;
mod reference;

use model_common::{compare, tokens, HOST};
use proptest::prelude::*;
use reformer::{AdamConfig, Attention, CpuBackend, ModelConfig, ReformerLm, StepContext};
use reformer_engine::MemoryPool;

fn tiny() -> ModelConfig {
    ModelConfig::preset("tiny").unwrap()
}

#[test]
fn tiny_preset_matches_the_reference_over_three_steps() {
    compare(
        CpuBackend::poisoned(&MemoryPool::unlimited()),
        &tiny(),
        40,
        3,
        1,
        HOST,
    );
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
    compare(
        CpuBackend::poisoned(&MemoryPool::unlimited()),
        &cfg,
        45,
        2,
        7,
        HOST,
    );
}

#[test]
fn cp6_training_step_at_2048_tokens_matches_the_reference() {
    let mut cfg = ModelConfig::preset("cp6").unwrap();
    cfg.n_rounds = 2;
    cfg.ff_chunk = 512;
    cfg.loss_chunk = 512;
    let b = CpuBackend::poisoned(&MemoryPool::unlimited());
    compare(b, &cfg, 2048, 1, 3, HOST);
}

#[test]
fn a_snapshot_round_trips_into_a_model() {
    let cfg = tiny();
    let pool = MemoryPool::unlimited();
    let mut lm = ReformerLm::new(CpuBackend::new(&pool), &cfg).unwrap();
    let initial = lm.snapshot().unwrap();
    assert!(initial.moments.is_none());
    let toks = tokens(33, 3);
    lm.zero_grad().unwrap();
    lm.train_step_grads(&toks, &StepContext::train(0)).unwrap();
    lm.adam_update(AdamConfig::default(), 0.01).unwrap();
    let snap = lm.snapshot().unwrap();
    let back = ReformerLm::from_snapshot(CpuBackend::poisoned(&pool), &snap).unwrap();
    assert_eq!(back.snapshot().unwrap(), snap);
    assert_eq!(snap.moments.as_ref().unwrap().step, 1);
    // And it moved: at least one parameter differs from the initial model.
    assert!(initial.values.iter().zip(&snap.values).any(|(a, b)| a != b));
    // A snapshot of another config's parameters is refused.
    let mut other = snap.clone();
    other.config.d_ff += 1;
    assert!(ReformerLm::from_snapshot(CpuBackend::new(&pool), &other).is_err());
}

#[test]
fn initial_values_are_a_function_of_the_seed() {
    let cfg = tiny();
    let pool = MemoryPool::unlimited();
    let a = ReformerLm::new(CpuBackend::new(&pool), &cfg).unwrap();
    let b = ReformerLm::new(CpuBackend::poisoned(&pool), &cfg).unwrap();
    let mut other = cfg.clone();
    other.seed += 1;
    let c = ReformerLm::new(CpuBackend::new(&pool), &other).unwrap();
    let (a, b, c) = (
        a.download_values().unwrap(),
        b.download_values().unwrap(),
        c.download_values().unwrap(),
    );
    assert_eq!(a, b);
    // Every random tensor differs under another seed; gains are 1 and shifts and biases 0.
    for ((name, x), y) in reformer::param_specs(&cfg)
        .iter()
        .map(|s| &s.0)
        .zip(&a)
        .zip(&c)
    {
        if name.ends_with("gamma") {
            assert!(x.iter().all(|&v| v == 1.0), "{name}");
        } else if name.ends_with("beta") || name.contains(".b") || name == "head.bias" {
            assert!(x.iter().all(|&v| v == 0.0), "{name}");
        } else {
            assert_ne!(x, y, "{name} does not depend on the seed");
            let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
            assert!(rms > 0.01 && rms < 2.0, "{name}: rms {rms}");
        }
    }
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
        compare(CpuBackend::poisoned(&MemoryPool::unlimited()), &cfg, len, 1, seed, HOST);
    }
}
