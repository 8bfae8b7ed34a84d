//! Central-difference gradient checks of every attention kind with respect to every input,
//! in f32: relative error ≤ 1e-2 (floor 1e-2 on the gradient's magnitude). Lengths are not
//! multiples of the chunk, so the padded last chunk is covered too.
//!
//! LSH hashing is piecewise constant: a perturbation that moves a position to another bucket
//! makes the loss jump. Such coordinates are detected (the buckets differ) and skipped; the
//! test requires that at least 90% of coordinates are checked.

mod common;

use common::{check_gradient, randn, weighted_sum};
use reformer_engine::{MemoryPool, Rng, Tensor};
use reformer_lsh::*;

const EPS: f32 = 1e-2;
const TOL: f64 = 1e-2;
const FLOOR: f64 = 1e-2;

fn assert_checked(name: &str, (worst, checked, skipped): (f64, usize, usize)) {
    eprintln!("{name}: max rel err {worst:.2e} over {checked} coordinates ({skipped} skipped)");
    assert!(worst <= TOL, "{name}: relative error {worst} > {TOL}");
    assert!(
        checked * 10 >= (checked + skipped) * 9,
        "{name}: too many coordinates skipped"
    );
}

fn lsh_case(rounds: usize, buckets: Buckets, causal: bool, seed: u64) {
    let pool = MemoryPool::unlimited();
    let mut rng = Rng::new(seed);
    let (heads, len, d) = (2, 13, 4);
    let mut qk = randn(&pool, &[heads, len, d], 1.0, &mut rng);
    let mut v = randn(&pool, &[heads, len, d], 1.0, &mut rng);
    let w = randn(&pool, &[heads, len, d], 1.0, &mut rng);
    let rot = Rotations::random(d, rounds, buckets, &mut rng).unwrap();
    let cfg = LshConfig {
        chunk_len: 4,
        causal,
    };
    let (out, saved) = lsh_attention_forward(&qk, &v, &rot, &cfg, None).unwrap();
    let (d_qk, d_v) = lsh_attention_backward(&qk, &v, &out, &w, &saved, &rot, &cfg, None).unwrap();
    let buckets0 = saved.buckets.to_vec();

    let loss = |qk: &Tensor, v: &Tensor| -> Option<f64> {
        let (o, s) = lsh_attention_forward(qk, v, &rot, &cfg, None).unwrap();
        (s.buckets.to_vec() == buckets0).then(|| weighted_sum(&o, &w))
    };
    let v_copy = v.try_clone().unwrap();
    let r = check_gradient(&mut qk, &d_qk, EPS, FLOOR, |qk| loss(qk, &v_copy));
    assert_checked(&format!("lsh r={rounds} d_qk"), r);
    let qk_copy = qk.try_clone().unwrap();
    let r = check_gradient(&mut v, &d_v, EPS, FLOOR, |v| loss(&qk_copy, v));
    assert_checked(&format!("lsh r={rounds} d_v"), r);
}

#[test]
fn lsh_one_round() {
    lsh_case(1, Buckets::Single(4), true, 1);
}

#[test]
fn lsh_two_rounds_factorised() {
    lsh_case(2, Buckets::Factorised(2, 4), true, 2);
}

#[test]
fn lsh_four_rounds_non_causal() {
    lsh_case(4, Buckets::Single(4), false, 3);
}

type Forward<'a> = dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor + 'a;
type Backward<'a> = dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> (Tensor, Tensor, Tensor) + 'a;

fn qkv_case(name: &str, fwd: &Forward<'_>, bwd: &Backward<'_>) {
    let pool = MemoryPool::unlimited();
    let mut rng = Rng::new(9);
    let (heads, len, d) = (2, 11, 3);
    let mut q = randn(&pool, &[heads, len, d], 1.0, &mut rng);
    let mut k = randn(&pool, &[heads, len, d], 1.0, &mut rng);
    let mut v = randn(&pool, &[heads, len, d], 1.0, &mut rng);
    let w = randn(&pool, &[heads, len, d], 1.0, &mut rng);
    let (dq, dk, dv) = bwd(&q, &k, &v, &w);
    let (k0, v0) = (k.try_clone().unwrap(), v.try_clone().unwrap());
    let r = check_gradient(&mut q, &dq, EPS, FLOOR, |q| {
        Some(weighted_sum(&fwd(q, &k0, &v0), &w))
    });
    assert_checked(&format!("{name} dq"), r);
    let q0 = q.try_clone().unwrap();
    let r = check_gradient(&mut k, &dk, EPS, FLOOR, |k| {
        Some(weighted_sum(&fwd(&q0, k, &v0), &w))
    });
    assert_checked(&format!("{name} dk"), r);
    let k0 = k.try_clone().unwrap();
    let r = check_gradient(&mut v, &dv, EPS, FLOOR, |v| {
        Some(weighted_sum(&fwd(&q0, &k0, v), &w))
    });
    assert_checked(&format!("{name} dv"), r);
}

#[test]
fn local_attention() {
    let cfg = LocalConfig {
        chunk_len: 4,
        causal: true,
    };
    qkv_case(
        "local",
        &move |q, k, v| local_attention_forward(q, k, v, &cfg, None).unwrap().0,
        &move |q, k, v, g| {
            let (o, lse) = local_attention_forward(q, k, v, &cfg, None).unwrap();
            local_attention_backward(q, k, v, &o, &lse, g, &cfg, None).unwrap()
        },
    );
}

#[test]
fn exact_attention_blockwise_scaled() {
    for causal in [true, false] {
        let rule = scaled_rule(3, causal);
        qkv_case(
            "exact",
            &move |q, k, v| exact_attention_forward(q, k, v, rule, None).unwrap().0,
            &move |q, k, v, g| {
                let (o, lse) = exact_attention_forward(q, k, v, rule, None).unwrap();
                exact_attention_backward(q, k, v, &o, &lse, g, rule, None).unwrap()
            },
        );
    }
}

#[test]
fn exact_attention_reference_shared_qk_rule() {
    let rule = shared_qk_rule(true);
    qkv_case(
        "exact reference",
        &move |q, k, v| exact_attention_reference(q, k, v, rule, None).unwrap(),
        &move |q, k, v, g| exact_attention_reference_backward(q, k, v, g, rule, None).unwrap(),
    );
}
