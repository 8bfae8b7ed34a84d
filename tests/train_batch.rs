//! Several windows per optimizer step: the step's gradient is the mean of the windows'
//! gradients (checked against each window's gradient computed on its own), the windows are the
//! data pipeline's windows `step·batch + k`, the reported loss is their mean, and a run
//! resumed from a checkpoint with the same batch continues bit-exactly.

use std::path::Path;

use reformer::data::TextData;
use reformer::{AdamConfig, CpuBackend, LrSchedule, ModelConfig, StepContext, Trainer};
use reformer_engine::{MemoryPool, Rng};

const SEQ: usize = 32;

fn text() -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"the ", b"king ", b"and ", b"queen ", b"of ", b"love ", b"said ", b".\n",
    ];
    let mut rng = Rng::new(5);
    (0..800)
        .flat_map(|_| words[rng.below(words.len())].to_vec())
        .collect()
}

fn trainer(pool: &MemoryPool, batch: usize) -> Trainer<CpuBackend> {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.dropout = 0.1; // each window has its own masks: the reference must replay them
    let data = TextData::from_bytes(Path::new("generated"), text(), 0.05, SEQ).unwrap();
    let schedule = LrSchedule {
        lr: 0.01,
        warmup: 2,
        total_steps: 10,
        final_fraction: 0.1,
    };
    Trainer::new(
        CpuBackend::new(pool),
        &cfg,
        data,
        SEQ,
        3,
        schedule,
        AdamConfig::default(),
    )
    .unwrap()
    .with_batch(batch)
}

fn grads(t: &Trainer<CpuBackend>) -> Vec<Vec<f32>> {
    t.lm.download_grads().unwrap()
}

/// With one window per forward pass, window `k` of step `s` runs with its own step context
/// `s·batch + k` (its own masks and rotations); with dropout on.
#[test]
fn a_batch_step_averages_the_window_gradients() {
    batch_step_averages_the_window_gradients(1, 0.1);
}

/// With the step's windows in one forward pass, they share the context `s`; dropout off
/// (in a batch each row draws its own mask, so a window's masks are not those of it alone).
#[test]
fn a_batch_in_one_pass_averages_the_window_gradients() {
    batch_step_averages_the_window_gradients(3, 0.0);
}

fn batch_step_averages_the_window_gradients(micro: usize, dropout: f32) {
    let pool = MemoryPool::unlimited();
    let batch = 3;
    let mut t = trainer(&pool, batch).with_micro_batch(micro).unwrap();
    t.lm.set_dropout(dropout);
    t.step().unwrap(); // step 0: windows 0, 1, 2
    let step = t.state.step; // 1: windows 3, 4, 5
    let passes = (batch / micro) as u64;

    // Reference: each window on its own, from the same parameters, then the mean.
    let mut mean: Option<Vec<Vec<f32>>> = None;
    let mut loss_sum = 0.0f64;
    for k in 0..batch as u64 {
        let index = step * batch as u64 + k;
        let window = t.data.train_window(3, index, SEQ).unwrap().to_vec();
        let ctx = StepContext::train(step * passes + k / micro as u64);
        t.lm.zero_grad().unwrap();
        loss_sum += t.lm.train_step_grads(&window, &ctx).unwrap() as f64;
        let g = grads(&t);
        match &mut mean {
            None => mean = Some(g),
            Some(m) => m
                .iter_mut()
                .zip(&g)
                .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b)),
        }
    }
    let mean: Vec<Vec<f32>> = mean
        .unwrap()
        .into_iter()
        .map(|g| g.into_iter().map(|v| v / batch as f32).collect())
        .collect();

    let stats = t.step().unwrap();
    assert_eq!(stats.step, step);
    assert_eq!(stats.tokens, batch * SEQ);
    assert_eq!(t.state.tokens_seen, 2 * (batch * SEQ) as u64);
    let want_loss = (loss_sum / batch as f64) as f32;
    assert!(
        (stats.loss - want_loss).abs() <= 1e-6 * want_loss.abs(),
        "loss {} vs mean of windows {want_loss}",
        stats.loss
    );
    // The step leaves the passes' summed gradient in the gradient buffers (the optimizer
    // folds the mean's 1/passes into its update).
    let got: Vec<Vec<f32>> = grads(&t)
        .into_iter()
        .map(|g| g.into_iter().map(|v| v / passes as f32).collect())
        .collect();
    let (mut worst, mut norm) = (0.0f32, 0.0f32);
    for (g, m) in got.iter().zip(&mean) {
        for (a, b) in g.iter().zip(m) {
            worst = worst.max((a - b).abs());
            norm = norm.max(b.abs());
        }
    }
    assert!(norm > 0.0, "the reference gradient is zero");
    assert!(
        worst <= 1e-5 * norm + 1e-7,
        "batch gradient differs from the mean of the window gradients by {worst} (max |g| {norm})"
    );
}

#[test]
fn one_window_per_step_is_the_old_step() {
    // batch 1 uses window `step` with context `step`, as before batches existed.
    let pool = MemoryPool::unlimited();
    let mut t = trainer(&pool, 1);
    t.step().unwrap();
    let window = t.data.train_window(3, 1, SEQ).unwrap().to_vec();
    let mut reference = trainer(&pool, 1);
    reference.step().unwrap();
    reference.lm.zero_grad().unwrap();
    let want = reference
        .lm
        .train_step_grads(&window, &StepContext::train(1))
        .unwrap();
    let got = t.step().unwrap().loss;
    assert_eq!(got.to_bits(), want.to_bits());
}

#[test]
fn a_resumed_batch_run_continues_exactly() {
    let pool = MemoryPool::unlimited();
    let dir = std::env::temp_dir().join(format!("reformer-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ck.safetensors");
    let mut t = trainer(&pool, 4).with_micro_batch(2).unwrap();
    t.step().unwrap();
    t.save(&path).unwrap();
    assert!(trainer(&pool, 4).with_micro_batch(3).is_err());
    let ck = reformer::checkpoint::load(&path).unwrap();
    let data = TextData::from_bytes(Path::new("generated"), text(), 0.05, SEQ).unwrap();
    let mut resumed = Trainer::from_checkpoint(CpuBackend::new(&pool), &ck, data)
        .unwrap()
        .with_batch(4)
        .with_micro_batch(2)
        .unwrap();
    let (a, b) = (t.step().unwrap(), resumed.step().unwrap());
    assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    assert_eq!(a.tokens, 4 * SEQ);
    std::fs::remove_dir_all(&dir).ok();
}
