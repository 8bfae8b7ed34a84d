//! Masks: perturbing a key after the query (causal), or a padded key, leaves the query's
//! output unchanged — exactly, for every attention kind.

mod common;

use common::randn;
use reformer_engine::{MemoryPool, Rng, Tensor};
use reformer_lsh::*;

const HEADS: usize = 2;
const LEN: usize = 37;
const D: usize = 8;

fn perturb_row(t: &mut Tensor, pos: usize, rng: &mut Rng) {
    for h in 0..HEADS {
        for x in &mut t.data_mut()[(h * LEN + pos) * D..(h * LEN + pos + 1) * D] {
            *x += rng.normal();
        }
    }
}

fn rows_equal(a: &Tensor, b: &Tensor, upto: usize) -> bool {
    (0..HEADS).all(|h| {
        a.data()[h * LEN * D..(h * LEN + upto) * D] == b.data()[h * LEN * D..(h * LEN + upto) * D]
    })
}

fn rows_except_equal(a: &Tensor, b: &Tensor, skip: usize) -> bool {
    (0..HEADS).all(|h| {
        (0..LEN).filter(|&p| p != skip).all(|p| {
            let r = (h * LEN + p) * D..(h * LEN + p + 1) * D;
            a.data()[r.clone()] == b.data()[r]
        })
    })
}

#[test]
fn lsh_causal_mask_ignores_later_keys_and_values() {
    let pool = MemoryPool::unlimited();
    let mut rng = Rng::new(21);
    let qk = randn(&pool, &[HEADS, LEN, D], 1.0, &mut rng);
    let v = randn(&pool, &[HEADS, LEN, D], 1.0, &mut rng);
    let rot = Rotations::random(D, 2, Buckets::Single(4), &mut rng).unwrap();
    let cfg = LshConfig {
        chunk_len: 8,
        causal: true,
    };
    let (out, saved) = lsh_attention_forward(&qk, &v, &rot, &cfg, None).unwrap();
    let mut tried = 0;
    for pos in [30, 33, 36] {
        // Values: always unchanged for earlier queries.
        let mut v2 = v.try_clone().unwrap();
        perturb_row(&mut v2, pos, &mut rng);
        let (out2, _) = lsh_attention_forward(&qk, &v2, &rot, &cfg, None).unwrap();
        assert!(
            rows_equal(&out, &out2, pos),
            "value after query changed an output"
        );
        // Keys: a small change that keeps every bucket must leave earlier queries unchanged.
        let mut qk2 = qk.try_clone().unwrap();
        for h in 0..HEADS {
            for x in &mut qk2.data_mut()[(h * LEN + pos) * D..(h * LEN + pos + 1) * D] {
                *x *= 1.3;
            }
        }
        let (out2, saved2) = lsh_attention_forward(&qk2, &v, &rot, &cfg, None).unwrap();
        if saved2.buckets.to_vec() == saved.buckets.to_vec() {
            tried += 1;
            assert!(
                rows_equal(&out, &out2, pos),
                "key after query changed an output"
            );
        }
    }
    assert!(tried > 0, "no perturbation kept the buckets");
}

#[test]
fn padded_keys_are_ignored_by_every_kind() {
    let pool = MemoryPool::unlimited();
    let mut rng = Rng::new(22);
    let pad = 5;
    let mut mask = vec![true; LEN];
    mask[pad] = false;
    mask[LEN - 1] = false;
    let qk = randn(&pool, &[HEADS, LEN, D], 1.0, &mut rng);
    let v = randn(&pool, &[HEADS, LEN, D], 1.0, &mut rng);
    let mut qk2 = qk.try_clone().unwrap();
    let mut v2 = v.try_clone().unwrap();
    for p in [pad, LEN - 1] {
        perturb_row(&mut qk2, p, &mut rng);
        perturb_row(&mut v2, p, &mut rng);
    }
    let rot = Rotations::random(D, 3, Buckets::Factorised(2, 4), &mut rng).unwrap();
    for causal in [true, false] {
        let cfg = LshConfig {
            chunk_len: 8,
            causal,
        };
        let (a, _) = lsh_attention_forward(&qk, &v, &rot, &cfg, Some(&mask)).unwrap();
        let (b, _) = lsh_attention_forward(&qk2, &v2, &rot, &cfg, Some(&mask)).unwrap();
        for p in (0..LEN).filter(|&p| mask[p]) {
            for h in 0..HEADS {
                let r = (h * LEN + p) * D..(h * LEN + p + 1) * D;
                assert_eq!(
                    a.data()[r.clone()],
                    b.data()[r],
                    "lsh causal={causal}: padded key changed query {p}"
                );
            }
        }

        let lcfg = LocalConfig {
            chunk_len: 8,
            causal,
        };
        let (a, _) = local_attention_forward(&qk, &qk, &v, &lcfg, Some(&mask)).unwrap();
        let (b, _) = local_attention_forward(&qk, &qk2, &v2, &lcfg, Some(&mask)).unwrap();
        assert!(
            rows_except_equal(&a, &b, usize::MAX),
            "local: a padded key changed an output"
        );

        let rule = scaled_rule(D, causal);
        let (a, _) = exact_attention_forward(&qk, &qk, &v, rule, Some(&mask)).unwrap();
        let (b, _) = exact_attention_forward(&qk, &qk2, &v2, rule, Some(&mask)).unwrap();
        assert!(
            rows_except_equal(&a, &b, usize::MAX),
            "exact: a padded key changed an output"
        );
    }
}

#[test]
fn bad_inputs_are_typed_errors_not_panics() {
    let pool = MemoryPool::unlimited();
    let mut rng = Rng::new(23);
    let qk = randn(&pool, &[HEADS, LEN, D], 1.0, &mut rng);
    let v = randn(&pool, &[HEADS, LEN, D], 1.0, &mut rng);
    let short_v = randn(&pool, &[HEADS, LEN - 1, D], 1.0, &mut rng);
    let rot = Rotations::random(D, 1, Buckets::Single(4), &mut rng).unwrap();
    let zero_chunk = LshConfig {
        chunk_len: 0,
        causal: true,
    };
    assert!(matches!(
        lsh_attention_forward(&qk, &v, &rot, &zero_chunk, None),
        Err(AttentionError::Config(_))
    ));
    let cfg = LshConfig {
        chunk_len: 8,
        causal: true,
    };
    assert!(matches!(
        lsh_attention_forward(&qk, &short_v, &rot, &cfg, None),
        Err(AttentionError::Shape { .. })
    ));
    let wrong_mask = vec![true; LEN + 1];
    assert!(matches!(
        lsh_attention_forward(&qk, &v, &rot, &cfg, Some(&wrong_mask)),
        Err(AttentionError::Shape { .. })
    ));
    let rot_d = Rotations::random(D + 1, 1, Buckets::Single(4), &mut rng).unwrap();
    assert!(matches!(
        lsh_attention_forward(&qk, &v, &rot_d, &cfg, None),
        Err(AttentionError::Shape { .. })
    ));
    assert!(matches!(
        Rotations::random(D, 1, Buckets::Single(3), &mut rng),
        Err(AttentionError::Config(_))
    ));
    // A length that is not a multiple of the chunk is served (padded inside).
    assert!(lsh_attention_forward(
        &qk,
        &v,
        &rot,
        &LshConfig {
            chunk_len: 10,
            causal: true
        },
        None
    )
    .is_ok());
}
