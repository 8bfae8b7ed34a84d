//! The LM head's loss in chunks equals the loss computed in one piece (value and every
//! gradient), and a chunked head never holds the whole sequence's logits.

use reformer::{CpuBackend, ModelConfig, ReformerLm, StepContext};
use reformer_engine::{MemoryPool, Rng};

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| b'a' + rng.below(20) as u8).collect()
}

fn rel(a: f32, b: f32) -> f32 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-6)
}

#[test]
fn chunked_loss_and_gradients_equal_unchunked() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let pool = MemoryPool::unlimited();
    let toks = bytes(41, 2); // 40 positions
    let ctx = StepContext::train(0);
    let mut results = Vec::new();
    for chunk in [40, 16, 7, 1] {
        let mut model = ReformerLm::new(CpuBackend::new(&pool), &cfg).unwrap();
        model.set_loss_chunk(chunk);
        model.zero_grad().unwrap();
        let loss = model.train_step_grads(&toks, &ctx).unwrap();
        let eval = model.eval_loss(&toks, &ctx).unwrap();
        let grads = model.download_grads().unwrap();
        results.push((chunk, loss, eval, grads));
    }
    let (_, loss0, eval0, grads0) = &results[0];
    assert!(rel(*loss0, *eval0) < 1e-6, "train {loss0} vs eval {eval0}");
    for (chunk, loss, eval, grads) in &results[1..] {
        assert!(
            rel(*loss, *loss0) < 1e-6,
            "chunk {chunk}: {loss} vs {loss0}"
        );
        assert!(
            rel(*eval, *eval0) < 1e-6,
            "chunk {chunk}: eval {eval} vs {eval0}"
        );
        for (g, g0) in grads.iter().zip(grads0) {
            let scale = g0.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
            let diff = g
                .iter()
                .zip(g0)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 1e-4 * scale,
                "chunk {chunk}: grad diff {diff} (scale {scale})"
            );
        }
    }
}

#[test]
fn chunked_head_never_holds_all_logits() {
    // The pool's peak of a training step and of an evaluation, with the loss over all 256
    // positions at once and in chunks of 16: the difference is the logits (and their head
    // rows) of the 240 positions the chunked head never holds.
    let cfg = ModelConfig::preset("tiny").unwrap();
    let len = cfg.max_len();
    let toks = bytes(len + 1, 3);
    let peak = |chunk: usize, train: bool| {
        let pool = MemoryPool::unlimited();
        let mut model = ReformerLm::new(CpuBackend::new(&pool), &cfg).unwrap();
        model.set_loss_chunk(chunk);
        model.zero_grad().unwrap();
        pool.reset_peak();
        if train {
            model
                .train_step_grads(&toks, &StepContext::train(0))
                .unwrap();
        } else {
            model.eval_loss(&toks, &StepContext::eval(0)).unwrap();
        }
        pool.peak_bytes()
    };
    let saved_logits = (len - 16) * 256 * 4;
    for train in [false, true] {
        let (whole, chunked) = (peak(len, train), peak(16, train));
        eprintln!(
            "training {train}: peak {whole} B with loss chunks of {len}, {chunked} B with 16"
        );
        // A chunked training step peaks in the stack's backward, beside the head's gradients:
        // there half the logits' bytes must still show.
        let saved = if train {
            saved_logits / 2
        } else {
            saved_logits
        };
        assert!(
            whole >= chunked + saved,
            "training {train}: peak {whole} with the whole sequence's logits, {chunked} in \
             chunks of 16 (the logits of 240 positions are {saved_logits} bytes)"
        );
    }
}
