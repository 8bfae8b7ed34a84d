//! The comparison of the one model on a backend with the plain reference model
//! (`tests/reference`), shared by the CPU test (`tests/model_steps_cpu.rs`) and the GPU parity
//! test (`tests/gpu_parity_model.rs`); and bf16 activation storage against f32. A test file
//! that uses it declares `mod reference;` too.

#![allow(dead_code)]

use crate::reference::{adam_step, RefModel};
use reformer::{AdamConfig, Backend, ModelConfig, ReformerLm, StepContext};
use reformer_engine::Rng;

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

/// `max |got − want| ≤ rel · max(max |want|, floor, 1e-6)`.
pub fn assert_tensor_close(what: &str, got: &[f32], want: &[f32], rel: f32, floor: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = max_abs(want).max(floor).max(1e-6);
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

/// Runs `steps` training steps of the one model on `backend` and of the plain reference model
/// (`tests/reference`, f64, every activation stored) from the same parameters, and compares
/// the losses and every gradient, then the model's Adam update with the reference's Adam
/// applied to the model's own gradients (so an element whose exact gradient is zero, where
/// Adam turns rounding noise of either sign into a step of about `lr`, compares alike); the
/// reference continues from the model's parameters. Last, an evaluation loss with 3 rounds.
pub fn compare<B: Backend>(
    backend: B,
    cfg: &ModelConfig,
    len: usize,
    steps: u64,
    seed: u64,
    tol: Tol,
) {
    let mut model = ReformerLm::new(backend, cfg).unwrap();
    let snap = model.snapshot().unwrap();
    let names = snap.names.clone();
    let mut reference = RefModel::new(cfg, snap.names, snap.shapes, snap.values);
    let acfg = AdamConfig::default();
    let (mut m, mut v): (Vec<Vec<f32>>, Vec<Vec<f32>>) = reference
        .values
        .iter()
        .map(|x| (vec![0.0; x.len()], vec![0.0; x.len()]))
        .unzip();
    for step in 0..steps {
        let toks = tokens(len + 1, seed + step);
        let ctx = StepContext::train(step);
        let (want, ref_grads) = reference.loss_and_grads(&toks, &ctx);
        model.zero_grad().unwrap();
        let got = model.train_step_grads(&toks, &ctx).unwrap() as f64;
        assert!(
            (got - want).abs() <= tol.loss as f64 * want.abs(),
            "step {step}: loss {got} vs the reference's {want}"
        );
        let grads = model.download_grads().unwrap();
        // A gradient that is zero in exact arithmetic is rounding noise in f32: below a
        // hundredth of the largest gradient anywhere, a tensor's own maximum is not its scale.
        let floor = 1e-2 * ref_grads.iter().map(|g| max_abs(g)).fold(0.0, f32::max);
        for ((name, g), r) in names.iter().zip(&grads).zip(&ref_grads) {
            assert_tensor_close(
                &format!("step {step}: gradient of {name}"),
                g,
                r,
                tol.grad,
                floor,
            );
        }
        let lr = 0.01;
        let want_norm = adam_step(
            &acfg,
            lr,
            step + 1,
            &mut reference.values,
            &grads,
            &mut m,
            &mut v,
        );
        let got_stats = model.adam_update(acfg, lr).unwrap();
        assert!(
            (got_stats.grad_norm - want_norm).abs() <= tol.grad * want_norm,
            "gradient norm {} vs {want_norm}",
            got_stats.grad_norm
        );
        let values = model.download_values().unwrap();
        for ((name, got), want) in names.iter().zip(&values).zip(&reference.values) {
            // Adam moves each weight by about lr; compare the values at a fraction of that.
            let err = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                err <= tol.value_over_lr * lr + 1e-6 * max_abs(want),
                "step {step}: value of {name} differs by {err}"
            );
        }
        reference.values = values;
    }
    // Evaluation (no dropout), with more rounds than training.
    let toks = tokens(len + 1, seed + 100);
    model.set_rounds(3).unwrap();
    let mut eval_cfg = cfg.clone();
    eval_cfg.n_rounds = 3;
    let r = &reference;
    let eval_ref = RefModel::new(
        &eval_cfg,
        r.names.clone(),
        r.shapes.clone(),
        r.values.clone(),
    );
    let ctx = StepContext::eval(0);
    let want = eval_ref.loss(&toks, &ctx);
    let got = model.eval_loss(&toks, &ctx).unwrap() as f64;
    assert!(
        (got - want).abs() <= tol.loss as f64 * want.abs(),
        "eval loss {got} vs the reference's {want}"
    );
}

/// bf16 activation storage against f32.
pub mod bf16 {
    use reformer::{param_specs, Backend, ModelConfig, ReformerLm, StepContext};

    use super::tokens;

    /// Stated tolerances of bf16 activations against f32. bf16 keeps 8 significant bits (about
    /// 2e-3 relative per stored value) and everything accumulates in f32. Without LSH the loss
    /// stays near that scale; a gradient tensor moves more — the attention backward's
    /// `dO·v − dO·o` cancels, ReLU units near zero flip with the rounded attention output —
    /// most in small models (measured on the CPU backend, which rounds as the GPU does: `tiny` at 45 tokens up to 5.3e-2 in
    /// one tensor and 1.1e-2 over all; `cp6` at 2048 tokens 1.3e-2 and 1.0e-3). With LSH they are larger: the buckets are hashed
    /// from the stored (rounded) `qk`, and a position whose rotation products nearly tie moves
    /// to another bucket — it attends to other keys, as under another hash seed. The forward
    /// and its recomputation in the backward hash the same stored values, so training is
    /// consistent; only the comparison with f32 sees the moves (measured: `tiny` 0.12 in one
    /// tensor and 2.7e-2 over all, `cp6` 9.8e-2 and 5.7e-3, the worst in the `w_qk` of the LSH
    /// layers).
    #[derive(Debug, Clone, Copy)]
    pub struct Bf16Tol {
        /// Loss (training windows and evaluation), relative.
        pub loss: f64,
        /// Each gradient tensor: `|g_bf16 - g_f32| / |g_f32|` (Euclidean norms).
        pub tensor: f64,
        /// All gradients together, the same ratio.
        pub global: f64,
    }

    /// Local and exact attention only.
    pub const NO_HASH: Bf16Tol = Bf16Tol {
        loss: 1e-4,
        tensor: 0.1,
        global: 3e-2,
    };

    /// With LSH layers (buckets hashed from rounded `qk`).
    pub const WITH_LSH: Bf16Tol = Bf16Tol {
        loss: 2e-3,
        tensor: 0.25,
        global: 0.1,
    };

    pub struct Run {
        pub losses: Vec<f32>,
        pub grads: Vec<Vec<f32>>,
        pub eval: f32,
    }

    /// Two training windows' losses and their accumulated gradients, then an evaluation loss
    /// with 3 rounds, of the model `cfg` initialises, on `backend`.
    pub fn run<B: Backend>(backend: B, cfg: &ModelConfig, len: usize, seed: u64) -> Run {
        let mut dev = ReformerLm::new(backend, cfg).unwrap();
        let mut losses = Vec::new();
        dev.zero_grad().unwrap();
        for w in 0..2 {
            let toks = tokens(len + 1, seed + w);
            losses.push(dev.train_step_grads(&toks, &StepContext::train(w)).unwrap());
        }
        let grads = dev.download_grads().unwrap();
        dev.set_rounds(3).unwrap();
        let eval = dev
            .eval_loss(&tokens(len + 1, seed + 100), &StepContext::eval(0))
            .unwrap();
        Run {
            losses,
            grads,
            eval,
        }
    }

    fn sq_diff(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum()
    }

    fn sq(a: &[f32]) -> f64 {
        a.iter().map(|x| (*x as f64).powi(2)).sum()
    }

    /// Runs `cfg` on `f32` (activations in f32) and on `bf16` (activations in bf16), checks
    /// `tol` and that the runs differ; returns the worst (loss, tensor, global) ratios. With
    /// `BF16_VERBOSE` set, prints every tensor's ratio.
    pub fn compare<F: Backend, H: Backend>(
        f32: F,
        bf16: H,
        cfg: &ModelConfig,
        len: usize,
        seed: u64,
        tol: Bf16Tol,
    ) -> (f64, f64, f64) {
        let names: Vec<String> = param_specs(cfg).into_iter().map(|(name, _)| name).collect();
        let f = run(f32, cfg, len, seed);
        let b = run(bf16, cfg, len, seed);
        let pairs = b.losses.iter().zip(&f.losses).chain([(&b.eval, &f.eval)]);
        let mut worst_loss = 0.0f64;
        for (i, (got, want)) in pairs.enumerate() {
            let rel = (*got as f64 - *want as f64).abs() / (*want as f64).abs();
            assert!(
                rel <= tol.loss,
                "loss {i} (2 = evaluation): bf16 {got} vs f32 {want}"
            );
            worst_loss = worst_loss.max(rel);
        }
        let (mut num, mut den, mut worst_tensor) = (0.0f64, 0.0f64, 0.0f64);
        for ((name, got), want) in names.iter().zip(&b.grads).zip(&f.grads) {
            assert!(
                got.iter().all(|x| x.is_finite()),
                "gradient of {name}: not finite"
            );
            let (n, d) = (sq_diff(got, want), sq(want));
            let rel = (n / d.max(1e-30)).sqrt();
            assert!(
                rel <= tol.tensor,
                "gradient of {name}: bf16 differs from f32 by {rel:.3e} (norm ratio)"
            );
            if std::env::var("BF16_VERBOSE").is_ok() {
                eprintln!("{name}: {rel:.3e}");
            }
            worst_tensor = worst_tensor.max(rel);
            num += n;
            den += d;
        }
        let global = (num / den).sqrt();
        assert!(
            global <= tol.global,
            "all gradients: bf16 differs from f32 by {global:.3e} (norm ratio)"
        );
        // The rounding happened: a bf16 path that stored f32 would pass the checks above.
        assert!(
            global > 1e-7 && b.losses != f.losses,
            "the bf16 run equals the f32 run: activations were not rounded"
        );
        eprintln!(
            "{len} tokens: worst loss {worst_loss:.2e}, worst tensor {worst_tensor:.2e}, all \
             gradients {global:.2e}"
        );
        (worst_loss, worst_tensor, global)
    }
}
