//! Hashing and sorting: explicit rotations reproduce buckets computed by hand; the same seed
//! gives the same buckets; factorised buckets combine as h1 + b1·h2; the counting sort is a
//! stable permutation.

use proptest::prelude::*;
use reformer_engine::{MemoryPool, Rng, Tensor};
use reformer_lsh::hash::argmax_signed;
use reformer_lsh::sort::counting_sort;
use reformer_lsh::*;

/// Buckets of `x` (`rows × d`) for one rotation `r` (`d × cols`), by hand.
fn by_hand(x: &[f32], r: &[f32], d: usize, cols: usize) -> Vec<u32> {
    x.chunks(d)
        .map(|row| {
            let proj: Vec<f32> = (0..cols)
                .map(|c| (0..d).map(|i| row[i] * r[i * cols + c]).sum())
                .collect();
            let both: Vec<f32> = proj
                .iter()
                .copied()
                .chain(proj.iter().map(|p| -p))
                .collect();
            let mut best = 0;
            for (i, &v) in both.iter().enumerate() {
                if v > both[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

#[test]
fn explicit_rotations_reproduce_hand_computed_buckets() {
    // d = 2, 4 buckets: columns are the axes, so the bucket is the dominant signed axis.
    let rot = Rotations::explicit(2, 1, Buckets::Single(4), vec![1.0, 0.0, 0.0, 1.0]).unwrap();
    let x = [3.0, 1.0, 0.5, 2.0, -4.0, 1.0, 0.1, -0.3];
    let mut out = [0u32; 4];
    rot.hash_round(&x, 0, &mut out, &mut Vec::new());
    assert_eq!(out, [0, 1, 2, 3]);

    let mut rng = Rng::new(4);
    let (d, rows) = (6, 50);
    let mut x = vec![0.0; rows * d];
    rng.fill_normal(&mut x, 1.0);
    let rot = Rotations::random(d, 2, Buckets::Factorised(4, 6), &mut rng).unwrap();
    let cols = rot.buckets.rotation_cols();
    assert_eq!(cols, 5);
    for r in 0..2 {
        let mut got = vec![0u32; rows];
        rot.hash_round(&x, r, &mut got, &mut Vec::new());
        let rr = &rot.data[r * d * cols..(r + 1) * d * cols];
        // split the rotation into its two factors' columns
        let f1: Vec<f32> = (0..d)
            .flat_map(|i| rr[i * cols..i * cols + 2].to_vec())
            .collect();
        let f2: Vec<f32> = (0..d)
            .flat_map(|i| rr[i * cols + 2..i * cols + 5].to_vec())
            .collect();
        let h1 = by_hand(&x, &f1, d, 2);
        let h2 = by_hand(&x, &f2, d, 3);
        let want: Vec<u32> = h1.iter().zip(&h2).map(|(a, b)| a + 4 * b).collect();
        assert_eq!(got, want);
        assert!(got.iter().all(|&b| b < 24));
    }
}

#[test]
fn argmax_signed_takes_first_on_ties_and_negative_half() {
    assert_eq!(argmax_signed(&[1.0, 1.0]), 0);
    assert_eq!(argmax_signed(&[1.0, -3.0]), 3);
    assert_eq!(argmax_signed(&[]), 0);
}

#[test]
fn same_seed_same_buckets_and_other_seed_other_buckets() {
    let pool = MemoryPool::unlimited();
    let mut rng = Rng::new(1);
    let qk = Tensor::randn(&pool, &[2, 200, 16], 1.0, &mut rng).unwrap();
    let v = Tensor::randn(&pool, &[2, 200, 16], 1.0, &mut rng).unwrap();
    let cfg = LshConfig {
        chunk_len: 16,
        causal: true,
    };
    let run = |seed| {
        let rot = Rotations::random(16, 2, Buckets::auto(200, 16), &mut Rng::new(seed)).unwrap();
        lsh_attention_forward(&qk, &v, &rot, &cfg, None)
            .unwrap()
            .1
            .buckets
            .to_vec()
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
}

#[test]
fn auto_buckets_follow_the_design() {
    // nearest power of two to 2N/m, factorised above 128
    assert_eq!(Buckets::auto(1024, 64), Buckets::Single(32));
    assert_eq!(Buckets::auto(64, 64), Buckets::Single(2));
    assert_eq!(Buckets::auto(1 << 19, 64), Buckets::Factorised(128, 128));
    assert_eq!(Buckets::auto(1 << 18, 64), Buckets::Factorised(64, 128));
    // 256 buckets are above 128, so they are factorised
    assert_eq!(Buckets::auto(8192, 64), Buckets::Factorised(16, 16));
    assert_eq!(Buckets::auto(4096, 64), Buckets::Single(128));
}

proptest! {
    #[test]
    fn counting_sort_is_a_stable_permutation(buckets in prop::collection::vec(0u32..7, 0..300)) {
        let mut perm = vec![0u32; buckets.len()];
        counting_sort(&buckets, 7, &mut perm, &mut Vec::new());
        // a permutation
        let mut seen = vec![false; buckets.len()];
        for &p in &perm {
            prop_assert!(!seen[p as usize]);
            seen[p as usize] = true;
        }
        // sorted by the key bucket·N + position, i.e. by bucket and stably by position
        let keys: Vec<u64> = perm.iter().map(|&p| buckets[p as usize] as u64 * buckets.len() as u64 + p as u64).collect();
        prop_assert!(keys.windows(2).all(|w| w[0] < w[1]));
    }
}
