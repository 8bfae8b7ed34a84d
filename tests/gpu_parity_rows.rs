//! CPU-vs-GPU parity of the `rows` kernel family (`reformer_kernels::gpu::ops::rows`): every
//! wrapper against its host twin (`rows::host`) on random inputs, with strided views
//! (offsets, `ld ≠ cols`), accumulate on and off, buffers longer than a call uses, and large
//! row counts (grid-stride in both dimensions; many column-sum parts).
//!
//! Tolerance: none — every result is compared **bit for bit** with the host twin (the kernels
//! use explicit round-to-nearest intrinsics and the twins' order of addition); copy2d also with
//! bf16 source and/or destination (widened on load, rounded to nearest even on store). Dropout is also
//! compared bit for bit with `reformer_reversible::Dropout::apply`, and the column sums with a
//! naive f64 sum within `1e-6 · (Σ|x| + |out|)`. Device outputs are NaN-poisoned (all bits set)
//! before the kernels run, and elements outside a call's extent must keep their poison or
//! their old value.
//!
//! Without a GPU each test prints `SKIPPED: no GPU (<reason>)` and passes, unless
//! `REFORMER_REQUIRE_GPU=1`.

use reformer_engine::Rng;
use reformer_kernels::gpu::ops::rows::{self, column_sum_parts, host, Strided};
use reformer_kernels::gpu::testing::context_for_test;
use reformer_kernels::gpu::{bf16, DeviceBuffer, GpuContext};
use reformer_kernels::KernelsError;
use reformer_reversible::{Dropout, Site, StepContext};

/// What a poisoned device buffer holds (all bytes 0xFF).
const POISON: u32 = 0xFFFF_FFFF;

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    rng.fill_normal(&mut v, 1.0);
    v
}

fn up(ctx: &GpuContext, x: &[f32]) -> DeviceBuffer<f32> {
    ctx.upload(x).unwrap()
}

fn down(ctx: &GpuContext, b: &DeviceBuffer<f32>) -> Vec<f32> {
    ctx.download(b).unwrap()
}

fn poisoned(ctx: &GpuContext, n: usize) -> DeviceBuffer<f32> {
    let b = ctx.alloc::<f32>(n).unwrap();
    assert!(
        down(ctx, &b).iter().all(|v| v.to_bits() == POISON),
        "the test context must poison new buffers"
    );
    b
}

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}[{i}]: got {g} ({:#010x}), host twin {w} ({:#010x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

fn is_invalid<T: std::fmt::Debug>(r: Result<T, KernelsError>) -> bool {
    matches!(r, Err(KernelsError::InvalidArgument { .. }))
}

#[test]
fn copy2d_matches_the_host_twin() {
    let Some(ctx) = context_for_test("copy2d_matches_the_host_twin") else {
        return;
    };
    let mut rng = Rng::new(21);
    // (rows, cols, src offset, src ld, dst offset, dst ld, alpha)
    let cases: &[(usize, usize, usize, usize, usize, usize, f32)] = &[
        (1, 1, 0, 1, 0, 1, 1.0),
        (7, 5, 3, 5, 0, 5, -2.5),
        (33, 64, 10, 100, 7, 64, 1.0),
        (100, 300, 0, 300, 301, 600, 0.5),
        (1, 40, 5, 0, 2, 0, 3.0),             // one row: ld may be anything
        (513, 17, 1, 19, 4, 23, -1.0),        // small cols: several rows per block
        (70_000, 300, 11, 301, 5, 300, 0.75), // rows > 65535 · 1: the y grid strides
    ];
    for &(rows, cols, so, sl, d_off, dl, alpha) in cases {
        let s = Strided::new(so, sl);
        let d = Strided::new(d_off, dl);
        let src_len = so + (rows - 1) * sl + cols + 13;
        let dst_len = d_off + (rows - 1) * dl + cols + 9;
        let src = randn(&mut rng, src_len);
        let srcd = up(&ctx, &src);
        for accumulate in [false, true] {
            let what = format!("copy2d {rows}x{cols} s{s:?} d{d:?} acc={accumulate}");
            // Not accumulating into a poisoned buffer; accumulating into random values.
            let (mut dstd, mut want) = if accumulate {
                let dst0 = randn(&mut rng, dst_len);
                (up(&ctx, &dst0), dst0)
            } else {
                (
                    poisoned(&ctx, dst_len),
                    vec![f32::from_bits(POISON); dst_len],
                )
            };
            rows::copy2d(&ctx, &srcd, s, &mut dstd, d, rows, cols, alpha, accumulate).unwrap();
            host::copy2d(&src, s, &mut want, d, rows, cols, alpha, accumulate);
            assert_bits(&what, &down(&ctx, &dstd), &want);
        }
    }
    // Argument errors, before any launch.
    let srcd = up(&ctx, &randn(&mut rng, 100));
    let mut dstd = ctx.alloc::<f32>(100).unwrap();
    let ok = Strided::new(0, 10);
    assert!(is_invalid(rows::copy2d(
        &ctx,
        &srcd,
        Strided::new(0, 9),
        &mut dstd,
        ok,
        2,
        10,
        1.0,
        false
    )));
    assert!(is_invalid(rows::copy2d(
        &ctx,
        &srcd,
        ok,
        &mut dstd,
        Strided::new(1, 10),
        10,
        10,
        1.0,
        false
    )));
    assert!(is_invalid(rows::copy2d(
        &ctx,
        &srcd,
        Strided::new(0, usize::MAX),
        &mut dstd,
        ok,
        3,
        10,
        1.0,
        false
    )));
    // Empty extents do nothing.
    rows::copy2d(&ctx, &srcd, ok, &mut dstd, ok, 0, 10, 1.0, false).unwrap();
    rows::copy2d(&ctx, &srcd, ok, &mut dstd, ok, 10, 0, 1.0, false).unwrap();
}

/// What a poisoned bf16 device buffer holds (all bytes 0xFF).
const POISON_BF16: u16 = 0xFFFF;

fn assert_bits16(what: &str, got: &[bf16], want: &[bf16]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}[{i}]: got {g} ({:#06x}), host twin {w} ({:#06x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

#[test]
fn copy2d_with_bf16_storage_matches_the_host_twins() {
    let Some(ctx) = context_for_test("copy2d_with_bf16_storage_matches_the_host_twins") else {
        return;
    };
    let mut rng = Rng::new(26);
    // (rows, cols, src offset, src ld, dst offset, dst ld, alpha)
    let cases: &[(usize, usize, usize, usize, usize, usize, f32)] = &[
        (1, 1, 0, 1, 0, 1, 1.0),
        (7, 5, 3, 5, 0, 5, -2.5),
        (33, 64, 10, 100, 7, 64, 1.0),
        (1, 40, 5, 0, 2, 0, 3.0),
        (513, 17, 1, 19, 4, 23, -1.0),
        (70_000, 300, 11, 301, 5, 300, 0.75),
    ];
    // Rounding edge cases, written into the first row of each source: ties to even both ways,
    // just past a tie, -0, a value that rounds to inf, a subnormal.
    let specials = [
        f32::from_bits(0x3F80_8000),
        f32::from_bits(0x3F81_8000),
        f32::from_bits(0x3F80_8001),
        -0.0,
        f32::MAX,
        f32::from_bits(0x0000_8001),
    ];
    for &(rows, cols, so, sl, d_off, dl, alpha) in cases {
        let s = Strided::new(so, sl);
        let d = Strided::new(d_off, dl);
        let src_len = so + (rows - 1) * sl + cols + 13;
        let dst_len = d_off + (rows - 1) * dl + cols + 9;
        let mut src = randn(&mut rng, src_len);
        for (j, &v) in specials.iter().take(cols).enumerate() {
            src[so + j] = v;
        }
        let src16 = to_bf16(&src);
        let (srcd, srcd16) = (up(&ctx, &src), ctx.upload(&src16).unwrap());
        for accumulate in [false, true] {
            let what = format!("{rows}x{cols} s{s:?} d{d:?} alpha {alpha} acc={accumulate}");
            // Not accumulating into poisoned buffers; accumulating into random values.
            let dst0 = randn(&mut rng, dst_len);
            let (mut dst16, mut dst32, mut want16, mut want32) = if accumulate {
                let h = to_bf16(&dst0);
                (ctx.upload(&h).unwrap(), up(&ctx, &dst0), h, dst0)
            } else {
                let p16 = ctx.alloc::<bf16>(dst_len).unwrap();
                assert!(
                    ctx.download(&p16)
                        .unwrap()
                        .iter()
                        .all(|v| v.to_bits() == POISON_BF16),
                    "the test context must poison new buffers"
                );
                (
                    p16,
                    poisoned(&ctx, dst_len),
                    vec![bf16::from_bits(POISON_BF16); dst_len],
                    vec![f32::from_bits(POISON); dst_len],
                )
            };
            let mut want16b = want16.clone();

            // f32 -> bf16.
            rows::copy2d(&ctx, &srcd, s, &mut dst16, d, rows, cols, alpha, accumulate).unwrap();
            host::copy2d(&src, s, &mut want16, d, rows, cols, alpha, accumulate);
            assert_bits16(
                &format!("copy2d f32->bf16 {what}"),
                &ctx.download(&dst16).unwrap(),
                &want16,
            );
            // bf16 -> f32.
            rows::copy2d(
                &ctx, &srcd16, s, &mut dst32, d, rows, cols, alpha, accumulate,
            )
            .unwrap();
            host::copy2d(&src16, s, &mut want32, d, rows, cols, alpha, accumulate);
            assert_bits(
                &format!("copy2d bf16->f32 {what}"),
                &down(&ctx, &dst32),
                &want32,
            );
            // bf16 -> bf16, into a fresh copy of the starting destination.
            let mut dst16b = if accumulate {
                ctx.upload(&want16b).unwrap()
            } else {
                ctx.alloc::<bf16>(dst_len).unwrap()
            };
            rows::copy2d(
                &ctx,
                &srcd16,
                s,
                &mut dst16b,
                d,
                rows,
                cols,
                alpha,
                accumulate,
            )
            .unwrap();
            host::copy2d(&src16, s, &mut want16b, d, rows, cols, alpha, accumulate);
            assert_bits16(
                &format!("copy2d bf16->bf16 {what}"),
                &ctx.download(&dst16b).unwrap(),
                &want16b,
            );
        }
    }
    // Argument errors, before any launch.
    let srcd = up(&ctx, &randn(&mut rng, 100));
    let mut dstd = ctx.alloc::<bf16>(50).unwrap();
    let ok = Strided::new(0, 10);
    assert!(is_invalid(rows::copy2d(
        &ctx, &srcd, ok, &mut dstd, ok, 10, 10, 1.0, false
    )));
}

#[test]
fn add_bias_matches_the_host_twin() {
    let Some(ctx) = context_for_test("add_bias_matches_the_host_twin") else {
        return;
    };
    let mut rng = Rng::new(22);
    for (rows, cols) in [(1, 1), (3, 31), (100, 257), (4096, 512), (70_000, 300)] {
        let n = rows * cols;
        let x = randn(&mut rng, n + 5);
        let bias = randn(&mut rng, cols + 3);
        let mut xd = up(&ctx, &x);
        rows::add_bias(&ctx, &mut xd, &up(&ctx, &bias), rows, cols).unwrap();
        let mut want = x.clone();
        host::add_bias(&mut want, &bias, rows, cols);
        assert_bits(&format!("add_bias {rows}x{cols}"), &down(&ctx, &xd), &want);
    }
    let mut xd = up(&ctx, &randn(&mut rng, 10));
    let bias = up(&ctx, &randn(&mut rng, 5));
    assert!(is_invalid(rows::add_bias(&ctx, &mut xd, &bias, 3, 4)));
    assert!(is_invalid(rows::add_bias(&ctx, &mut xd, &bias, 1, 6)));
}

#[test]
fn column_sums_match_the_host_twin_bit_for_bit() {
    let Some(ctx) = context_for_test("column_sums_match_the_host_twin_bit_for_bit") else {
        return;
    };
    let mut rng = Rng::new(23);
    for (rows, cols) in [
        (0, 5),
        (1, 1),
        (31, 7),
        (33, 100),
        (1000, 300),
        (8192, 4096),
        (100_000, 3),
        (1 << 19, 64),
    ] {
        let (parts, _) = column_sum_parts(rows);
        let x = randn(&mut rng, rows * cols + 7);
        let xd = up(&ctx, &x);
        for accumulate in [false, true] {
            let what = format!("column_sums {rows}x{cols} ({parts} parts) acc={accumulate}");
            let (mut outd, mut want) = if accumulate {
                let out0 = randn(&mut rng, cols + 2);
                (up(&ctx, &out0), out0)
            } else {
                (
                    poisoned(&ctx, cols + 2),
                    vec![f32::from_bits(POISON); cols + 2],
                )
            };
            let before = want.clone();
            rows::column_sums(&ctx, &xd, &mut outd, rows, cols, accumulate).unwrap();
            host::column_sums(&x, &mut want, rows, cols, accumulate);
            let got = down(&ctx, &outd);
            assert_bits(&what, &got, &want);
            // And against a naive f64 sum.
            for c in 0..cols {
                let (mut sum, mut abs) = (0.0f64, 0.0f64);
                for r in 0..rows {
                    sum += x[r * cols + c] as f64;
                    abs += x[r * cols + c].abs() as f64;
                }
                let naive = if accumulate {
                    before[c] + sum as f32
                } else {
                    sum as f32
                };
                let base = if accumulate { before[c].abs() } else { 0.0 };
                let tol = 1e-6 * (abs + base as f64) + 1e-30;
                assert!(
                    (got[c] as f64 - naive as f64).abs() <= tol,
                    "{what}: column {c}: {} vs naive {naive}",
                    got[c]
                );
            }
        }
    }
    let xd = up(&ctx, &randn(&mut rng, 12));
    let mut outd = ctx.alloc::<f32>(3).unwrap();
    assert!(is_invalid(rows::column_sums(
        &ctx, &xd, &mut outd, 3, 4, false
    )));
    assert!(is_invalid(rows::column_sums(
        &ctx, &xd, &mut outd, 4, 4, false
    )));
}

#[test]
fn relu_and_mask_match_the_host_twins() {
    let Some(ctx) = context_for_test("relu_and_mask_match_the_host_twins") else {
        return;
    };
    let mut rng = Rng::new(24);
    let n = 100_003;
    let specials = [
        0.0f32,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        -1e-40,
    ];
    let mut x = randn(&mut rng, n + 11);
    let mut h = randn(&mut rng, n + 11);
    for (i, v) in specials.iter().enumerate() {
        x[i * 1000] = *v;
        h[i * 1000 + 1] = *v;
        h[i * 1000] = *v;
    }
    let mut xd = up(&ctx, &x);
    rows::relu_in_place(&ctx, &mut xd, n).unwrap();
    let mut want = x.clone();
    host::relu_in_place(&mut want, n);
    assert_bits("relu", &down(&ctx, &xd), &want);

    let mut gd = up(&ctx, &x);
    rows::relu_mask_in_place(&ctx, &up(&ctx, &h), &mut gd, n).unwrap();
    let mut want = x.clone();
    host::relu_mask_in_place(&h, &mut want, n);
    assert_bits("relu mask", &down(&ctx, &gd), &want);

    assert!(is_invalid(rows::relu_in_place(&ctx, &mut xd, n + 12)));
    let short = up(&ctx, &h[..n - 1]);
    assert!(is_invalid(rows::relu_mask_in_place(
        &ctx, &short, &mut gd, n
    )));
}

#[test]
fn dropout_replays_the_cpu_masks_bit_for_bit() {
    let Some(ctx) = context_for_test("dropout_replays_the_cpu_masks_bit_for_bit") else {
        return;
    };
    let mut rng = Rng::new(25);
    // (rows, cols, first_row, rate)
    let cases: &[(usize, usize, usize, f32)] = &[
        (1, 1, 0, 0.5),
        (5, 7, 3, 0.1),
        (32, 32, 0, 0.25),
        (33, 33, 1_000_000, 0.9),
        (100, 500, 77, 0.1),
        (8192, 1024, 8192 * 5, 0.1),
        (3, 4096, 2, 0.999),
    ];
    for (k, &(rows, cols, first_row, rate)) in cases.iter().enumerate() {
        let d = Dropout::new(
            rate,
            1000 + k as u64,
            &StepContext::train(k as u64 * 7),
            k,
            Site::FeedForwardHidden,
        )
        .unwrap();
        let st = d.base_state();
        let x = randn(&mut rng, rows * cols + 6);
        let mut xd = up(&ctx, &x);
        rows::dropout_rows(
            &ctx,
            &mut xd,
            rows,
            cols,
            first_row as u64,
            rate,
            st[0],
            st[3],
        )
        .unwrap();
        let got = down(&ctx, &xd);
        let what = format!("dropout {rows}x{cols} from row {first_row}, rate {rate}");
        let mut twin = x.clone();
        host::dropout_rows(&mut twin, rows, cols, first_row as u64, rate, st[0], st[3]);
        assert_bits(&what, &got, &twin);
        let mut cpu = x[..rows * cols].to_vec();
        d.apply(&mut cpu, cols, first_row);
        assert_bits(
            &format!("{what} vs Dropout::apply"),
            &got[..rows * cols],
            &cpu,
        );
    }
    let mut xd = up(&ctx, &randn(&mut rng, 10));
    assert!(is_invalid(rows::dropout_rows(
        &ctx, &mut xd, 3, 4, 0, 0.1, 1, 2
    )));
}
