//! The LM head's loss in chunks equals the loss computed in one piece (value and every
//! gradient), and a chunked head never holds the whole sequence's logits.

use reformer::lm_head::LmHead;
use reformer::{HasParams, ModelConfig, ReformerLm, StepContext};
use reformer_engine::{MemoryPool, Rng, Tensor};

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
        let mut model = ReformerLm::new(&cfg, &pool).unwrap();
        model.set_loss_chunk(chunk);
        model.zero_grad();
        let loss = model.train_step_grads(&toks, &ctx).unwrap();
        let eval = model.eval_loss(&toks, &ctx).unwrap();
        let grads: Vec<Vec<f32>> = model.params().iter().map(|p| p.grad.to_vec()).collect();
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
    let (len, d, chunk) = (512, 32, 16);
    let pool = MemoryPool::unlimited();
    let mut rng = Rng::new(1);
    let mut head = LmHead::new(&pool, d, chunk, &mut rng).unwrap();
    let y1 = Tensor::randn(&pool, &[1, len, d], 1.0, &mut rng).unwrap();
    let y2 = Tensor::randn(&pool, &[1, len, d], 1.0, &mut rng).unwrap();
    let targets = bytes(len, 3);
    let all_logits = len * 256 * 4;
    let returned = 2 * len * d * 4; // dY1 and dY2

    pool.reset_peak();
    let before = pool.live_bytes();
    head.loss(&y1, &y2, &targets).unwrap();
    let extra = pool.peak_bytes() - before;
    assert!(extra < all_logits / 8, "forward held {extra} bytes");

    pool.reset_peak();
    let (_, dy1, dy2) = head.loss_and_backward(&y1, &y2, &targets, 1.0).unwrap();
    let extra = pool.peak_bytes() - before;
    assert!(
        extra < returned + all_logits / 8,
        "forward+backward held {extra} bytes (returned gradients: {returned})"
    );
    drop((dy1, dy2));
}
