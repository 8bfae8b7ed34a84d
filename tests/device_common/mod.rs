//! The comparison of the device model with the reference model, shared by the host-twin test
//! (`tests/device_model_host.rs`) and the GPU parity test (`tests/gpu_parity_model.rs`).

#![allow(dead_code)]

use reformer::device::{Backend, DeviceLm};
use reformer::{Adam, AdamConfig, HasParams, ModelConfig, ReformerLm, StepContext};
use reformer_engine::{MemoryPool, Rng};

/// Tolerances of one comparison (f32).
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    /// Loss, relative.
    pub loss: f32,
    /// A gradient tensor's largest difference over its largest magnitude.
    pub grad: f32,
    /// Parameters after Adam: largest difference over the learning rate.
    pub value_over_lr: f32,
}

pub const HOST: Tol = Tol {
    loss: 1e-5,
    grad: 1e-4,
    value_over_lr: 1e-2,
};

pub fn tokens(n: usize, seed: u64) -> Vec<u8> {
    let alphabet = b"abcde fghij.,";
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| alphabet[rng.below(alphabet.len())])
        .collect()
}

pub fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

pub fn assert_tensor_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
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
pub fn compare<B: Backend>(
    backend: B,
    cfg: &ModelConfig,
    len: usize,
    steps: u64,
    seed: u64,
    tol: Tol,
) {
    let pool = MemoryPool::unlimited();
    let mut cpu = ReformerLm::new(cfg, &pool).unwrap();
    let mut dev = DeviceLm::from_model(backend, &cpu).unwrap();
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
            (got - want).abs() <= tol.loss * want.abs(),
            "step {step}: loss {got} vs {want}"
        );
        let grads = dev.download_grads().unwrap();
        for (p, g) in cpu.params().iter().zip(&grads) {
            assert_tensor_close(
                &format!("step {step}: gradient of {}", p.name),
                g,
                p.grad.data(),
                tol.grad,
            );
        }
        let lr = 0.01;
        let want_stats = adam.update(&mut cpu.params_mut(), lr).unwrap();
        let got_stats = dev.adam_update(acfg, lr).unwrap();
        assert!(
            (got_stats.grad_norm - want_stats.grad_norm).abs() <= tol.grad * want_stats.grad_norm,
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
                err <= tol.value_over_lr * lr + 1e-6 * max_abs(p.value.data()),
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
        (got - want).abs() <= tol.loss * want.abs(),
        "eval loss {got} vs {want}"
    );
}
