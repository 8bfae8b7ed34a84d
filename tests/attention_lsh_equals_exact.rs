//! Property 7 of `docs/design.md`: with one bucket and one chunk covering the sequence (or rounds that
//! all hash alike), LSH attention equals exact causal shared-QK attention with the self
//! penalty — outputs and gradients. Also: blockwise exact equals the plain reference, and
//! local attention with one chunk equals exact scaled attention.

mod common;

use common::{allclose_ratio, randn};
use proptest::prelude::*;
use reformer_engine::{MemoryPool, Rng};
use reformer_lsh::*;

/// f32 against the f64 reference: every entry within `ATOL + RTOL·|reference|` (inputs are
/// O(1), so ATOL is f32 rounding over a few hundred terms).
const RTOL: f32 = 1e-4;
const ATOL: f32 = 2e-5;

fn close(a: &reformer_engine::Tensor, b: &reformer_engine::Tensor) -> f32 {
    allclose_ratio(a, b, RTOL, ATOL)
}

fn case(
    heads: usize,
    len: usize,
    d: usize,
    rounds: usize,
    chunk_extra: usize,
    causal: bool,
    seed: u64,
) {
    let pool = MemoryPool::unlimited();
    let mut rng = Rng::new(seed);
    let qk = randn(&pool, &[heads, len, d], 1.0, &mut rng);
    let v = randn(&pool, &[heads, len, d], 1.0, &mut rng);
    let d_out = randn(&pool, &[heads, len, d], 1.0, &mut rng);
    let rot = Rotations::random(d, rounds, Buckets::Single(1), &mut rng).unwrap();
    let cfg = LshConfig {
        chunk_len: len + chunk_extra,
        causal,
    };
    let (out, saved) = lsh_attention_forward(&qk, &v, &rot, &cfg, None).unwrap();
    let (d_qk, d_v) =
        lsh_attention_backward(&qk, &v, &out, &d_out, &saved, &rot, &cfg, None).unwrap();

    let k = unit_keys(&qk).unwrap();
    let rule = shared_qk_rule(causal);
    let want = exact_attention_reference(&qk, &k, &v, rule, None).unwrap();
    let (dq, dk, dv) = exact_attention_reference_backward(&qk, &k, &v, &d_out, rule, None).unwrap();
    let want_dqk = shared_qk_grad(&qk, dq, &dk);
    assert!(
        close(&out, &want) <= 1.0,
        "output differs: {}",
        close(&out, &want)
    );
    assert!(close(&d_v, &dv) <= 1.0, "d_v differs: {}", close(&d_v, &dv));
    assert!(
        close(&d_qk, &want_dqk) <= 1.0,
        "d_qk differs: {}",
        close(&d_qk, &want_dqk)
    );

    // The blockwise exact attention is the same function.
    let (blk, lse) = exact_attention_forward(&qk, &k, &v, rule, None).unwrap();
    let (bq, bk, bv) =
        exact_attention_backward(&qk, &k, &v, &blk, &lse, &d_out, rule, None).unwrap();
    let b_dqk = shared_qk_grad(&qk, bq, &bk);
    assert!(close(&blk, &want) <= 1.0);
    assert!(close(&bv, &dv) <= 1.0);
    assert!(close(&b_dqk, &want_dqk) <= 1.0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn lsh_with_one_bucket_and_one_chunk_is_exact_attention(
        heads in 1usize..4,
        len in 1usize..90,
        d in 1usize..20,
        rounds in 1usize..4,
        chunk_extra in 0usize..9,
        causal in any::<bool>(),
        seed in any::<u64>(),
    ) {
        case(heads, len, d, rounds, chunk_extra, causal, seed);
    }

    #[test]
    fn local_attention_with_one_chunk_is_exact_scaled_attention(
        heads in 1usize..4,
        len in 1usize..70,
        d in 1usize..20,
        seed in any::<u64>(),
    ) {
        let pool = MemoryPool::unlimited();
        let mut rng = Rng::new(seed);
        let q = randn(&pool, &[heads, len, d], 1.0, &mut rng);
        let k = randn(&pool, &[heads, len, d], 1.0, &mut rng);
        let v = randn(&pool, &[heads, len, d], 1.0, &mut rng);
        let g = randn(&pool, &[heads, len, d], 1.0, &mut rng);
        let cfg = LocalConfig { chunk_len: len, causal: true };
        let (out, lse) = local_attention_forward(&q, &k, &v, &cfg, None).unwrap();
        let (dq, dk, dv) = local_attention_backward(&q, &k, &v, &out, &lse, &g, &cfg, None).unwrap();
        let rule = scaled_rule(d, true);
        let want = exact_attention_reference(&q, &k, &v, rule, None).unwrap();
        let (wq, wk, wv) = exact_attention_reference_backward(&q, &k, &v, &g, rule, None).unwrap();
        prop_assert!(close(&out, &want) <= 1.0);
        prop_assert!(close(&dq, &wq) <= 1.0);
        prop_assert!(close(&dk, &wk) <= 1.0);
        prop_assert!(close(&dv, &wv) <= 1.0);
    }
}

#[test]
fn rounds_that_hash_alike_equal_one_round_at_realistic_size() {
    case(2, 256, 64, 4, 0, true, 11);
}
