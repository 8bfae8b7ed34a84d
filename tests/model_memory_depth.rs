//! Activation memory does not grow with depth, at model level: the pool's peak of one full
//! training step (`Trainer::step`: embedding, reversible stack forward, chunked loss, the
//! recomputing backward, Adam) at 6 layers minus that at 2 layers equals the difference in
//! parameters + gradients + Adam moments, within 5% of the peak difference.
//!
//! Both depths use the same local/LSH alternation, so the layer that sets the peak (the last
//! LSH layer's backward) is of the same kind at both. Runs on 2 rayon threads: attention
//! chunk tasks hold tiles concurrently, a jitter of at most one tile (~130 KiB here), well
//! inside the tolerance. The storing alternative would add 2 streams (2 × 2 MiB) per layer.

use std::path::Path;

use reformer::config::Attention;
use reformer::data::TextData;
use reformer::planner::{MemoryPlan, PlanKind};
use reformer::{AdamConfig, LrSchedule, ModelConfig, Trainer};
use reformer_engine::{DType, Device, MemoryPool, Rng};

const LEN: usize = 4096;
const TOLERANCE: f64 = 0.05;
const THREADS: usize = 2;

fn config(n_layers: usize) -> ModelConfig {
    let mut cfg = ModelConfig::preset("deep20").unwrap();
    cfg.n_layers = n_layers;
    cfg.attention = (0..n_layers)
        .map(|i| {
            if i % 2 == 0 {
                Attention::Local
            } else {
                Attention::Lsh
            }
        })
        .collect();
    cfg.d_model = 128;
    cfg.d_ff = 256;
    cfg.n_heads = 2;
    cfg.d_head = 64;
    cfg.ff_chunk = 1024;
    cfg.loss_chunk = 1024;
    cfg.axial_shape = (64, 64);
    cfg.axial_dims = (32, 96);
    cfg
}

/// `(static bytes: parameters + gradients + moments, peak of one training step)`.
fn measure(n_layers: usize) -> (usize, usize) {
    let cfg = config(n_layers);
    let pool = MemoryPool::unlimited();
    let mut rng = Rng::new(5);
    let bytes = (0..=LEN).map(|_| rng.below(256) as u8).collect();
    let data = TextData::from_bytes(Path::new("random bytes"), bytes, 0.0, LEN).unwrap();
    let mut trainer = Trainer::new(
        &cfg,
        &pool,
        data,
        LEN,
        0,
        LrSchedule::default(),
        AdamConfig::default(),
    )
    .unwrap();
    let fixed = pool.live_bytes();
    pool.reset_peak();
    trainer.step().unwrap();
    (fixed, pool.peak_bytes())
}

#[test]
fn training_peak_grows_with_depth_only_by_parameters_and_optimizer_state() {
    let ((fixed2, peak2), (fixed6, peak6)) = rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build()
        .unwrap()
        .install(|| (measure(2), measure(6)));
    let d_peak = peak6 as f64 - peak2 as f64;
    let d_fixed = fixed6 as f64 - fixed2 as f64;
    let activation_growth = d_peak - d_fixed;
    eprintln!(
        "peak 2 layers {peak2} B, 6 layers {peak6} B: difference {d_peak} B; parameters + \
         gradients + Adam moments differ by {d_fixed} B; activations grew by {activation_growth} B \
         ({:+.3}% of the peak difference); one stream is {} B",
        100.0 * activation_growth / d_peak,
        LEN * 128 * 4
    );
    assert!(
        activation_growth.abs() <= TOLERANCE * d_peak,
        "activations grew by {activation_growth} B with depth (tolerance {}% of {d_peak} B)",
        100.0 * TOLERANCE
    );
    // The planner says the same, before running anything.
    let plan = |n| {
        MemoryPlan::plan(
            PlanKind::TrainingStep,
            &config(n),
            LEN,
            Device::Cpu,
            DType::F32,
            THREADS,
        )
        .unwrap()
    };
    let (p2, p6) = (plan(2), plan(6));
    assert_eq!(p2.activation_bytes(), p6.activation_bytes());
    assert_eq!(p6.static_bytes() - p2.static_bytes(), fixed6 - fixed2);
}
