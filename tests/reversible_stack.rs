//! The reversible stack's contract, on the one model (CPU backend): LSH rotations and dropout
//! masks are a function of the step (the same step repeats bit for bit, another step hashes
//! otherwise); the rounds can change between training and evaluation; head groups give the
//! all-heads result; parameter names are unique and structured; bad input is a typed error.
//! That the backward's reconstruction of every block's input is right is pinned by the
//! comparison with the storing reference model (`tests/model_steps_cpu.rs`,
//! `tests/reference_model.rs`): gradients of the first layer of six match within 1e-4.

use reformer::{Attention, CpuBackend, ModelConfig, ReformerError, ReformerLm, StepContext};
use reformer_engine::{MemoryPool, Rng};

fn tokens(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| b'a' + rng.below(12) as u8).collect()
}

fn model(cfg: &ModelConfig) -> ReformerLm<CpuBackend> {
    ReformerLm::new(CpuBackend::poisoned(&MemoryPool::unlimited()), cfg).unwrap()
}

fn lsh_cfg() -> ModelConfig {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.attention = vec![Attention::Lsh, Attention::Lsh];
    cfg.dropout = 0.1;
    cfg
}

#[test]
fn same_step_same_result_another_step_other_rotations_and_masks() {
    let mut m = model(&lsh_cfg());
    let toks = tokens(65, 1);
    let loss = |m: &mut ReformerLm<CpuBackend>, ctx: StepContext| {
        m.zero_grad().unwrap();
        let l = m.train_step_grads(&toks, &ctx).unwrap();
        (l.to_bits(), m.download_grads().unwrap())
    };
    let (a, ga) = loss(&mut m, StepContext::train(3));
    let (b, gb) = loss(&mut m, StepContext::train(3));
    assert_eq!(a, b, "the same step gave another loss");
    assert_eq!(ga, gb, "the same step gave other gradients");
    let (c, _) = loss(&mut m, StepContext::train(4));
    assert_ne!(a, c, "another step drew the same rotations and masks");
    // Evaluation has no dropout; its rotations still follow the step.
    let e = |m: &mut ReformerLm<CpuBackend>, s| m.eval_loss(&toks, &StepContext::eval(s)).unwrap();
    assert_eq!(e(&mut m, 5).to_bits(), e(&mut m, 5).to_bits());
    assert_ne!(e(&mut m, 5).to_bits(), e(&mut m, 6).to_bits());
}

#[test]
fn rounds_can_change_between_training_and_evaluation() {
    let mut cfg = lsh_cfg();
    cfg.dropout = 0.0;
    let mut m = model(&cfg);
    assert_eq!(m.rounds(), cfg.n_rounds);
    let toks = tokens(65, 2);
    let ctx = StepContext::eval(0);
    let two = m.eval_loss(&toks, &ctx).unwrap();
    m.set_rounds(4).unwrap();
    assert_eq!(m.rounds(), 4);
    let four = m.eval_loss(&toks, &ctx).unwrap();
    assert!(two.is_finite() && four.is_finite());
    assert_ne!(two, four, "4 rounds gave the 2-round loss");
    // Training with the new rounds works, and going back restores the old result exactly.
    m.zero_grad().unwrap();
    m.train_step_grads(&toks, &StepContext::train(0)).unwrap();
    m.set_rounds(2).unwrap();
    assert_eq!(m.eval_loss(&toks, &ctx).unwrap().to_bits(), two.to_bits());
    assert!(matches!(
        m.set_rounds(0),
        Err(ReformerError::InvalidArgument(_))
    ));
}

#[test]
fn head_groups_give_the_all_heads_result() {
    for kinds in [
        vec![Attention::Lsh, Attention::Lsh],
        vec![Attention::Local, Attention::Exact],
    ] {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.attention = kinds.clone();
        cfg.n_heads = 4;
        cfg.d_head = 8;
        let toks = tokens(50, 3);
        let run = |group: usize| {
            let mut c = cfg.clone();
            c.head_group = group;
            let mut m = model(&c);
            m.zero_grad().unwrap();
            let loss = m.train_step_grads(&toks, &StepContext::train(1)).unwrap();
            (loss, m.download_grads().unwrap())
        };
        let (l0, g0) = run(0);
        for group in [1, 3] {
            let (l, g) = run(group);
            assert!(
                (l - l0).abs() <= 1e-6 * l0.abs(),
                "{kinds:?}, groups of {group}: loss {l} vs {l0}"
            );
            for (i, (a, b)) in g.iter().zip(&g0).enumerate() {
                let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
                let diff = a
                    .iter()
                    .zip(b)
                    .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    diff <= 1e-4 * scale,
                    "{kinds:?}, groups of {group}: gradient {i} differs by {diff} of {scale}"
                );
                assert!(b.iter().any(|&v| v != 0.0), "gradient {i} is all zero");
            }
        }
    }
}

#[test]
fn parameter_names_are_unique_and_structured() {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.n_layers = 3;
    cfg.attention = vec![Attention::Local, Attention::Lsh, Attention::Exact];
    let specs = reformer::param_specs(&cfg);
    let names: Vec<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
    let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "duplicate names in {names:?}");
    for want in [
        "embed.tokens",
        "embed.axial.0",
        "layers.0.attn.w_q",
        "layers.0.attn.w_k",
        "layers.1.attn.w_qk",
        "layers.2.attn.w_qk",
        "layers.2.ff.b2",
        "head.weight",
    ] {
        assert!(names.contains(&want), "missing {want} in {names:?}");
    }
    assert!(!names.contains(&"layers.1.attn.w_q"));
    // Layers draw their own weights: two layers of the same kind start apart.
    let m = model(&cfg);
    let values = m.download_values().unwrap();
    let w = |name: &str| &values[names.iter().position(|n| *n == name).unwrap()];
    assert_ne!(w("layers.1.attn.w_qk"), w("layers.2.attn.w_qk"));
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let mut m = model(&cfg);
    let ctx = StepContext::train(0);
    assert!(matches!(
        m.train_step_grads(b"a", &ctx),
        Err(ReformerError::InvalidArgument(_))
    ));
    assert!(matches!(
        m.train_step_grads(&tokens(cfg.max_len() + 2, 1), &ctx),
        Err(ReformerError::Length { .. })
    ));
    assert!(m.set_value(0, &[1.0]).is_err());
    assert!(m.set_value(10_000, &[]).is_err());
}
