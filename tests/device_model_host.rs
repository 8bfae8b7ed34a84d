//! The device model ([`DeviceLm`]) on the host backend — the CPU twins of the CUDA kernels —
//! against the reference model ([`ReformerLm`]): losses, every parameter's gradient, and the
//! parameters after Adam steps, on random configurations (attention kinds, head groups, row
//! blocks, loss chunks, dropout, lengths that leave partial chunks).
//!
//! This checks the device model's orchestration (row blocks, head layouts, reconstruction,
//! gradient flow, optimizer) on every machine; `tests/gpu_parity_model.rs` runs the same
//! comparison with the CUDA backend where a GPU answers.
//!
//! Tolerances (f32, `device_common::HOST`): loss within 1e-5 relative; a gradient tensor within
//! 1e-4 of its largest magnitude (the two sides sum in different orders: the bias after or
//! within a product, row blocks); parameters after an Adam step within 1% of the learning rate.

mod device_common;

use device_common::{compare, tokens, HOST};
use proptest::prelude::*;
use reformer::device::{DeviceLm, HostBackend};
use reformer::{AdamConfig, Attention, HasParams, ModelConfig, ReformerLm, StepContext};
use reformer_engine::MemoryPool;

fn tiny() -> ModelConfig {
    ModelConfig::preset("tiny").unwrap()
}

#[test]
fn tiny_preset_matches_the_reference_over_three_steps() {
    compare(
        HostBackend::poisoned(&MemoryPool::unlimited()),
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
        HostBackend::poisoned(&MemoryPool::unlimited()),
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
    let b = HostBackend::poisoned(&MemoryPool::unlimited());
    compare(b, &cfg, 2048, 1, 3, HOST);
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
        compare(HostBackend::poisoned(&MemoryPool::unlimited()), &cfg, len, 1, seed, HOST);
    }
}
