//! The host twins of the `rows` kernels (`reformer_kernels::gpu::ops::rows::host`), which the
//! CPU backend calls, against plain references: the dropout twin replays
//! `reformer_reversible::Dropout::apply` bit for bit (random sizes, rates, layers, sites, steps
//! and first rows); bias and ReLU equal plain loops bit for bit; copy2d against a naive loop
//! (exact); column sums against a naive f64 sum (within `1e-6 · (Σ|x| + |out|)` per column:
//! both round an f64 sum once, in different orders). Needs no GPU.

use proptest::prelude::*;
use reformer_engine::Rng;
use reformer_kernels::gpu::ops::rows::{column_sum_parts, host, Strided};
use reformer_reversible::{Dropout, Site, StepContext};

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    rng.fill_normal(&mut v, 1.0);
    // Some exact zeros and negative zeros: the ReLU and its mask must treat them alike.
    for (i, x) in v.iter_mut().enumerate() {
        match i % 17 {
            3 => *x = 0.0,
            5 => *x = -0.0,
            _ => {}
        }
    }
    v
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

const SITES: [Site; 3] = [
    Site::AttentionOutput,
    Site::FeedForwardHidden,
    Site::FeedForwardOutput,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn dropout_twin_replays_the_cpu_masks_bit_for_bit(
        seed in any::<u64>(),
        step in 0u64..1_000_000,
        layer in 0usize..64,
        site in 0usize..3,
        rows in 0usize..24,
        cols in 0usize..300,
        first_row in 0usize..1_000_000,
        rate in prop_oneof![Just(0.1f32), Just(0.5f32), 0.001f32..0.999],
    ) {
        let d = Dropout::new(rate, seed, &StepContext::train(step), layer, SITES[site])
            .expect("training with rate > 0 has a mask");
        let mut rng = Rng::new(seed ^ 0x5eed);
        let x = random(&mut rng, rows * cols);
        let mut want = x.clone();
        d.apply(&mut want, cols, first_row);
        let st = d.base_state();
        // A longer buffer: the twin touches rows·cols elements only.
        let mut got = x.clone();
        got.extend([7.0f32; 5]);
        host::dropout_rows(&mut got, rows, cols, first_row as u64, rate, st[0], st[3]);
        prop_assert_eq!(bits(&got[..rows * cols]), bits(&want));
        prop_assert!(got[rows * cols..].iter().all(|&v| v == 7.0));
    }

    #[test]
    fn copy2d_twin_matches_a_naive_loop(
        rows in 0usize..12,
        cols in 0usize..40,
        s_pad in 0usize..9,
        d_pad in 0usize..9,
        s_off in 0usize..20,
        d_off in 0usize..20,
        alpha in prop_oneof![Just(1.0f32), Just(-1.0f32), -3.0f32..3.0],
        accumulate in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let (s_ld, d_ld) = (cols + s_pad, cols + d_pad);
        let mut rng = Rng::new(seed);
        let src = random(&mut rng, s_off + rows * s_ld + 3);
        let dst0 = random(&mut rng, d_off + rows * d_ld + 3);
        let mut want = dst0.clone();
        for r in 0..rows {
            for c in 0..cols {
                let v = alpha * src[s_off + r * s_ld + c];
                let o = &mut want[d_off + r * d_ld + c];
                *o = if accumulate { *o + v } else { v };
            }
        }
        let mut got = dst0.clone();
        host::copy2d(
            &src,
            Strided::new(s_off, s_ld),
            &mut got,
            Strided::new(d_off, d_ld),
            rows,
            cols,
            alpha,
            accumulate,
        );
        prop_assert_eq!(bits(&got), bits(&want));
    }

    #[test]
    fn column_sums_twin_matches_a_naive_f64_sum(
        rows in prop_oneof![0usize..70, 500usize..2000],
        cols in 1usize..24,
        accumulate in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let x = random(&mut rng, rows * cols);
        let out0 = random(&mut rng, cols + 2);
        let mut got = out0.clone();
        host::column_sums(&x, &mut got, rows, cols, accumulate);
        prop_assert_eq!(bits(&got[cols..]), bits(&out0[cols..]));
        for c in 0..cols {
            let sum: f64 = (0..rows).map(|r| x[r * cols + c] as f64).sum();
            let abs: f64 = (0..rows).map(|r| x[r * cols + c].abs() as f64).sum();
            let want = if accumulate { out0[c] + sum as f32 } else { sum as f32 };
            let tol = 1e-6 * (abs + out0[c].abs() as f64) + 1e-30;
            prop_assert!(
                (got[c] as f64 - want as f64).abs() <= tol,
                "column {}: got {}, want {}", c, got[c], want
            );
        }
    }

    #[test]
    fn bias_and_relu_twins_equal_plain_loops(
        rows in 0usize..20,
        cols in 1usize..50,
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let n = rows * cols;
        let x = random(&mut rng, n + 4);
        let bias = random(&mut rng, cols + 1);
        let h = random(&mut rng, n + 4);

        let mut want = x[..n].to_vec();
        for row in want.chunks_mut(cols) {
            for (y, b) in row.iter_mut().zip(&bias[..cols]) {
                *y += b;
            }
        }
        let mut got = x.clone();
        host::add_bias(&mut got, &bias, rows, cols);
        prop_assert_eq!(bits(&got[..n]), bits(&want));
        prop_assert_eq!(bits(&got[n..]), bits(&x[n..]));

        // ReLU: value-equal to `max(x, 0)` (which may keep −0), +0 where the input is ≤ 0.
        let want: Vec<f32> = x[..n].iter().map(|v| v.max(0.0)).collect();
        let mut got = x.clone();
        host::relu_in_place(&mut got, n);
        for i in 0..n {
            prop_assert!(got[i] == want[i]);
            let naive = if x[i] > 0.0 { x[i] } else { 0.0 };
            prop_assert_eq!(got[i].to_bits(), naive.to_bits());
        }
        prop_assert_eq!(bits(&got[n..]), bits(&x[n..]));

        // The mask: exactly "0 where h ≤ 0" on finite inputs.
        let want: Vec<f32> = x[..n]
            .iter()
            .zip(&h[..n])
            .map(|(&g, &h)| if h <= 0.0 { 0.0 } else { g })
            .collect();
        let mut got = x.clone();
        host::relu_mask_in_place(&h, &mut got, n);
        prop_assert_eq!(bits(&got[..n]), bits(&want));
        prop_assert_eq!(bits(&got[n..]), bits(&x[n..]));
    }
}

#[test]
fn column_sums_of_no_rows_are_zero_or_unchanged() {
    let mut out = vec![3.0f32, -2.0, 9.0];
    host::column_sums(&[], &mut out, 0, 2, true);
    assert_eq!(out, [3.0, -2.0, 9.0]);
    host::column_sums(&[], &mut out, 0, 2, false);
    assert_eq!(out, [0.0, 0.0, 9.0]);
}

#[test]
fn column_sums_use_several_parts_for_many_rows() {
    // 8192 rows: 256 parts of 32 rows; every entry 1 sums exactly.
    let (rows, cols) = (8192, 3);
    assert_eq!(column_sum_parts(rows), (256, 32));
    let x = vec![1.0f32; rows * cols];
    let mut out = vec![0.5f32; cols];
    host::column_sums(&x, &mut out, rows, cols, true);
    assert_eq!(out, [8192.5; 3]);
}

#[test]
fn dropout_twin_drops_about_rate_and_scales_the_rest() {
    let d = Dropout::new(0.25, 11, &StepContext::train(3), 2, Site::FeedForwardHidden).unwrap();
    let st = d.base_state();
    let (rows, cols) = (64, 512);
    let mut x = vec![1.0f32; rows * cols];
    host::dropout_rows(&mut x, rows, cols, 100, 0.25, st[0], st[3]);
    let zeros = x.iter().filter(|&&v| v == 0.0).count() as f64 / x.len() as f64;
    assert!((zeros - 0.25).abs() < 0.02, "dropped fraction {zeros}");
    let scale = 1.0f32 / (1.0 - 0.25);
    assert!(x.iter().all(|&v| v == 0.0 || v == scale));
    // Row r of a block starting at 100 is row 100 + r of the whole: a block starting at 101
    // sees the same masks shifted by one row.
    let mut y = vec![1.0f32; (rows - 1) * cols];
    host::dropout_rows(&mut y, rows - 1, cols, 101, 0.25, st[0], st[3]);
    assert_eq!(bits(&y), bits(&x[cols..]));
}
