//! The one model on the GPU ([`ReformerLm`] on [`CudaBackend`]) — the same program the CPU
//! runs — against the plain reference model (`tests/reference`): losses, every parameter's
//! gradient and the parameters after Adam, for the `tiny` preset with every attention kind,
//! split head groups and dropout, and for a `cp6` training step at a moderate length. Skipped
//! where no GPU answers (fails instead with `REFORMER_REQUIRE_GPU=1`). New device buffers are
//! NaN-poisoned.
//!
//! Tolerances (stated, f32): loss within 1e-4 relative; a gradient tensor within 1e-3 of its
//! largest magnitude (cuBLAS and the kernels sum in other orders than the CPU, and an LSH
//! bucket decided by a near-tie rotation product can differ, which moves a few gradient
//! entries); parameters after Adam within 5% of the learning rate. `cp6` runs at 2048 tokens
//! with 1e-3 relative on the loss (2048 positions, 6 layers, 2 LSH rounds' combination).
//!
//! bf16 activation storage on the GPU is compared with the f32 model on the CPU backend at the
//! bf16 tolerances stated in `model_common::bf16`, and the CUDA memory plan with the device
//! pool's measured peak.

mod model_common;
mod reference;

use model_common::{compare, Tol};
use reformer::backend::{Backend, CpuBackend, CudaBackend, DType, MemoryPlan, PlanTarget};
use reformer::{Attention, ModelConfig, ReformerError, ReformerLm, StepContext};
use reformer_engine::MemoryPool;
use reformer_kernels::gpu::testing::context_for_test;
use reformer_kernels::KernelsError;

const GPU: Tol = Tol {
    loss: 1e-4,
    grad: 1e-3,
    value_over_lr: 5e-2,
};

fn backend(test: &str) -> Option<CudaBackend> {
    context_for_test(test).map(CudaBackend::from_context)
}

#[test]
fn tiny_preset_matches_the_cpu_over_three_steps() {
    let Some(b) = backend("tiny_preset_matches_the_cpu_over_three_steps") else {
        return;
    };
    compare(b, &ModelConfig::preset("tiny").unwrap(), 40, 3, 1, GPU);
}

#[test]
fn every_attention_kind_split_heads_and_dropout_match_the_cpu() {
    let Some(b) = backend("every_attention_kind_split_heads_and_dropout_match_the_cpu") else {
        return;
    };
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.n_layers = 3;
    cfg.attention = vec![Attention::Local, Attention::Lsh, Attention::Exact];
    cfg.head_group = 1;
    cfg.dropout = 0.1;
    cfg.ff_chunk = 12;
    cfg.loss_chunk = 7;
    compare(b, &cfg, 45, 2, 7, GPU);
}

#[test]
fn cp6_training_step_at_2048_tokens_matches_the_cpu() {
    let Some(b) = backend("cp6_training_step_at_2048_tokens_matches_the_cpu") else {
        return;
    };
    let mut cfg = ModelConfig::preset("cp6").unwrap();
    cfg.n_rounds = 2;
    cfg.ff_chunk = 512;
    cfg.loss_chunk = 512;
    let tol = Tol { loss: 1e-3, ..GPU };
    compare(b, &cfg, 2048, 1, 3, tol);
}

#[test]
fn a_step_past_the_budget_is_a_typed_out_of_memory_error() {
    let Some(ctx) = context_for_test("a_step_past_the_budget_is_a_typed_out_of_memory_error")
    else {
        return;
    };
    let cfg = ModelConfig::preset("cp6").unwrap();
    let b = CudaBackend::from_context(ctx);
    let mut lm = ReformerLm::new(b, &cfg).unwrap();
    // Parameters fit; a 16K-token step does not fit in 8 MiB more.
    let live = lm.backend().live_bytes();
    lm.backend().context().pool().set_budget(live + (8 << 20));
    let toks = model_common::tokens(16385, 1);
    lm.zero_grad().unwrap();
    match lm.train_step_grads(&toks, &StepContext::train(0)) {
        Err(ReformerError::Kernels(KernelsError::OutOfMemory { .. })) => {}
        other => panic!("expected the typed out-of-memory error, got {other:?}"),
    }
}

#[test]
fn bf16_activations_on_the_gpu_stay_within_the_stated_tolerance_of_f32() {
    let Some(b) = backend("bf16_activations_on_the_gpu_stay_within_the_stated_tolerance_of_f32")
    else {
        return;
    };
    let b = b.with_act_dtype(DType::BF16).unwrap();
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.n_layers = 3;
    cfg.attention = vec![Attention::Local, Attention::Lsh, Attention::Exact];
    cfg.head_group = 1;
    cfg.dropout = 0.1;
    cfg.ff_chunk = 12;
    cfg.loss_chunk = 7;
    let f32_cpu = CpuBackend::new(&MemoryPool::unlimited());
    model_common::bf16::compare(f32_cpu, b, &cfg, 45, 7, model_common::bf16::WITH_LSH);
}

#[test]
fn cp6_with_bf16_activations_on_the_gpu_stays_within_the_stated_tolerance_of_f32() {
    let Some(b) =
        backend("cp6_with_bf16_activations_on_the_gpu_stays_within_the_stated_tolerance_of_f32")
    else {
        return;
    };
    let b = b.with_act_dtype(DType::BF16).unwrap();
    let mut cfg = ModelConfig::preset("cp6").unwrap();
    cfg.n_rounds = 2;
    cfg.ff_chunk = 512;
    cfg.loss_chunk = 512;
    let f32_cpu = CpuBackend::new(&MemoryPool::unlimited());
    model_common::bf16::compare(f32_cpu, b, &cfg, 2048, 3, model_common::bf16::WITH_LSH);
}

/// cp6 at 8192 tokens, two training steps on the GPU with activations in `act`: the pool's
/// peak against the device plan's.
fn plan_against_measurement(test: &str, act: DType) {
    let Some(ctx) = context_for_test(test) else {
        return;
    };
    let b = CudaBackend::from_context(ctx).with_act_dtype(act).unwrap();
    let mut cfg = ModelConfig::preset("cp6").unwrap();
    cfg.n_rounds = 2;
    let len = 8192;
    let mut lm = ReformerLm::new(b, &cfg).unwrap();
    let toks = model_common::tokens(len + 1, 2);
    // Step 0 allocates Adam's moments; step 1 is the steady state the plan describes.
    for step in 0..2 {
        lm.backend().reset_peak();
        lm.zero_grad().unwrap();
        lm.train_step_grads(&toks, &StepContext::train(step))
            .unwrap();
        lm.adam_update(reformer::AdamConfig::default(), 1e-3)
            .unwrap();
    }
    lm.backend().synchronize().unwrap();
    let measured = lm.backend().peak_bytes();
    let plan = MemoryPlan::new(&cfg, len, true, PlanTarget::Cuda, act).unwrap();
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "cp6 at {len}, {act:?} activations: device pool peak {measured} B, plan {} B\n",
            plan.peak
        )
        .as_bytes(),
    );
    let err = (measured as f64 - plan.peak as f64).abs() / plan.peak as f64;
    assert!(
        err <= 1e-3,
        "measured {measured} B, planned {} B ({:.3}% apart)\n{plan}",
        plan.peak,
        100.0 * err
    );
}

#[test]
fn the_device_plan_equals_the_measured_pool_peak() {
    plan_against_measurement("the_device_plan_equals_the_measured_pool_peak", DType::F32);
}

#[test]
fn the_bf16_device_plan_equals_the_measured_pool_peak() {
    plan_against_measurement(
        "the_bf16_device_plan_equals_the_measured_pool_peak",
        DType::BF16,
    );
}

/// The incremental decoder on the GPU (its caches, `cached_attention.cu`, `ew_unit_rows`,
/// host-side bucket indexes) against the CPU's: logits after a prefill, a block of 20 bytes and
/// 20 single steps, every attention kind, 2 rounds; relative 1e-4 of the largest logit.
#[test]
fn decoding_matches_the_cpu() {
    let Some(b) = backend("decoding_matches_the_cpu") else {
        return;
    };
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.n_layers = 4;
    cfg.attention = vec![
        Attention::Local,
        Attention::Lsh,
        Attention::Exact,
        Attention::Lsh,
    ];
    cfg.n_rounds = 2;
    cfg.eval_rounds = 2;
    let gpu = ReformerLm::new(b, &cfg).unwrap();
    let cpu = ReformerLm::new(CpuBackend::new(&MemoryPool::unlimited()), &cfg).unwrap();
    let text = model_common::tokens(140, 21);
    let (mut sg, mut sc) = (
        gpu.start_decoding(text.len()).unwrap(),
        cpu.start_decoding(text.len()).unwrap(),
    );
    let prefill = 100;
    let mut worst = 0.0f32;
    // The prefill (a full forward), then a block fed incrementally, then single steps.
    for (i, chunk) in [&text[..prefill], &text[prefill..prefill + 20]]
        .into_iter()
        .chain(text[prefill + 20..].chunks(1))
        .enumerate()
    {
        let (g, c) = if i == 0 {
            (
                gpu.prefill(&mut sg, chunk).unwrap(),
                cpu.prefill(&mut sc, chunk).unwrap(),
            )
        } else {
            (
                gpu.decode(&mut sg, chunk).unwrap(),
                cpu.decode(&mut sc, chunk).unwrap(),
            )
        };
        let scale = model_common::max_abs(&c).max(1.0);
        let err = g
            .iter()
            .zip(&c)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(
            err <= 1e-4 * scale,
            "feed {i}: logits differ by {err} (scale {scale})"
        );
        worst = worst.max(err / scale);
    }
    eprintln!("decoding: worst logit difference {worst:.2e} of the largest logit");
}
