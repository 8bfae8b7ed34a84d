//! CPU-vs-GPU parity of the non-attention kernels and of the device memory pool: element-wise
//! ops and the bf16 casts, layer norm, token and axial embeddings, cross-entropy, reductions
//! and Adam, LSH hashing, the bucket sort, and cuBLAS matrix products. References: the CPU ops
//! of `reformer-lsh` / `reformer-engine` where they exist (hashing, sort, gemm), otherwise a
//! small host implementation in f64 written here.
//!
//! Inputs are fresh random values (engine `Rng`); device outputs are NaN-poisoned before the
//! kernels run. Tolerance (f32): every element within `atol + 1e-4·|ref|`,
//! `atol = 2e-5·max(1, max|ref|)`; the casts and the sort are compared exactly.
//!
//! Without a GPU each test prints `SKIPPED: no GPU (<reason>)` and passes, unless
//! `REFORMER_REQUIRE_GPU=1`.

use std::io::Write;

use reformer_engine::matmul::{gemm as cpu_gemm, Par};
use reformer_engine::Rng;
use reformer_kernels::gpu::attention::{self as gpu_attn, AttnDims, GpuLshConfig, LshBuckets};
use reformer_kernels::gpu::ops::embedding::AxialShape;
use reformer_kernels::gpu::ops::layer_norm::LayerNormGrads;
use reformer_kernels::gpu::ops::reduce_adam::AdamStep;
use reformer_kernels::gpu::ops::{
    bucket_sort, elementwise as ew, embedding, layer_norm, matmul, reduce_adam, softmax_xent,
};
use reformer_kernels::gpu::testing::{check_close, context_for_test, gpu_required, Tolerance};
use reformer_kernels::gpu::{bf16, DeviceBuffer, GpuContext};
use reformer_kernels::KernelsError;
use reformer_lsh as cpu;

const RTOL: f32 = 1e-4;
const ATOL_FLOOR: f32 = 2e-5;

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let tol = Tolerance::scaled(RTOL, ATOL_FLOOR, want);
    if let Err(e) = check_close(what, got, want, tol) {
        panic!("{e}");
    }
}

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    let mut v = vec![0.0; n];
    rng.fill_normal(&mut v, std);
    v
}

fn up(ctx: &GpuContext, x: &[f32]) -> DeviceBuffer<f32> {
    ctx.upload(x).unwrap()
}

fn down(ctx: &GpuContext, b: &DeviceBuffer<f32>) -> Vec<f32> {
    ctx.download(b).unwrap()
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

// ----- element-wise ---------------------------------------------------------------------------

#[test]
fn elementwise_ops_match_the_host() {
    let Some(ctx) = context_for_test("elementwise_ops_match_the_host") else {
        return;
    };
    let mut rng = Rng::new(1);
    let n = 10_007;
    let (x, y) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
    let (xd, yd) = (up(&ctx, &x), up(&ctx, &y));
    let mut out = ctx.alloc::<f32>(n).unwrap();

    ew::fill(&ctx, &mut out, 2.5).unwrap();
    assert!(down(&ctx, &out).iter().all(|&v| v == 2.5));

    ew::scale(&ctx, &xd, -0.5, &mut out).unwrap();
    assert_close(
        "scale",
        &down(&ctx, &out),
        &x.iter().map(|a| -0.5 * a).collect::<Vec<_>>(),
    );
    let mut inplace = up(&ctx, &x);
    ew::scale_in_place(&ctx, &mut inplace, 3.0).unwrap();
    assert_close(
        "scale in place",
        &down(&ctx, &inplace),
        &x.iter().map(|a| 3.0 * a).collect::<Vec<_>>(),
    );

    let mut sum = ctx.alloc::<f32>(n).unwrap();
    ew::add(&ctx, &xd, &yd, &mut sum).unwrap();
    assert_close(
        "add",
        &down(&ctx, &sum),
        &x.iter().zip(&y).map(|(a, b)| a + b).collect::<Vec<_>>(),
    );

    let mut acc = up(&ctx, &y);
    ew::axpy(&ctx, 0.25, &xd, &mut acc).unwrap();
    assert_close(
        "axpy",
        &down(&ctx, &acc),
        &x.iter()
            .zip(&y)
            .map(|(a, b)| b + 0.25 * a)
            .collect::<Vec<_>>(),
    );

    let mut relu = ctx.alloc::<f32>(n).unwrap();
    ew::relu_forward(&ctx, &xd, &mut relu).unwrap();
    assert_close(
        "relu",
        &down(&ctx, &relu),
        &x.iter().map(|a| a.max(0.0)).collect::<Vec<_>>(),
    );
    let mut dx = ctx.alloc::<f32>(n).unwrap();
    ew::relu_backward(&ctx, &xd, &yd, &mut dx, false).unwrap();
    let want: Vec<f32> = x
        .iter()
        .zip(&y)
        .map(|(a, g)| if *a > 0.0 { *g } else { 0.0 })
        .collect();
    assert_close("relu backward", &down(&ctx, &dx), &want);
    ew::relu_backward(&ctx, &xd, &yd, &mut dx, true).unwrap();
    assert_close(
        "relu backward (accumulate)",
        &down(&ctx, &dx),
        &want.iter().map(|a| 2.0 * a).collect::<Vec<_>>(),
    );

    let (rows, cols) = (97, 103);
    let (a, b) = (
        randn(&mut rng, rows * cols, 1.0),
        randn(&mut rng, rows * cols, 1.0),
    );
    let mut dots = ctx.alloc::<f32>(rows).unwrap();
    ew::row_dot(&ctx, &up(&ctx, &a), &up(&ctx, &b), &mut dots, rows, cols).unwrap();
    let want: Vec<f64> = (0..rows)
        .map(|r| {
            (0..cols)
                .map(|c| a[r * cols + c] as f64 * b[r * cols + c] as f64)
                .sum()
        })
        .collect();
    assert_close("row_dot", &down(&ctx, &dots), &to_f32(&want));

    // Mismatched lengths are refused before any launch.
    let mut short = ctx.alloc::<f32>(n - 1).unwrap();
    assert!(matches!(
        ew::add(&ctx, &xd, &yd, &mut short),
        Err(KernelsError::InvalidArgument { .. })
    ));
}

#[test]
fn bf16_casts_round_to_nearest_even_and_widen_exactly() {
    let Some(ctx) = context_for_test("bf16_casts_round_to_nearest_even_and_widen_exactly") else {
        return;
    };
    let mut rng = Rng::new(2);
    let mut x = randn(&mut rng, 5000, 10.0);
    // Halfway cases (ties to even), signed zeros, infinities, subnormals, NaN, large values.
    x.extend([
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -0.0,
        0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        -3e-39,
        f32::NAN,
        3.0e38,
        f32::MAX,
    ]);
    let xd = up(&ctx, &x);
    let mut h = ctx.alloc::<bf16>(x.len()).unwrap();
    ew::f32_to_bf16(&ctx, &xd, &mut h).unwrap();
    let got = ctx.download(&h).unwrap();
    for (i, (&g, &a)) in got.iter().zip(&x).enumerate() {
        let want = bf16::from_f32(a);
        if a.is_nan() {
            assert!(g.is_nan(), "[{i}] NaN must stay NaN");
        } else {
            assert_eq!(
                g.to_bits(),
                want.to_bits(),
                "[{i}] bf16({a}): {g} vs {want}"
            );
        }
    }
    let mut back = ctx.alloc::<f32>(x.len()).unwrap();
    ew::bf16_to_f32(&ctx, &h, &mut back).unwrap();
    for (i, (&w, &g)) in down(&ctx, &back).iter().zip(&got).enumerate() {
        let want = g.to_f32();
        assert!(
            w.to_bits() == want.to_bits() || (w.is_nan() && want.is_nan()),
            "[{i}] {w} vs {want}"
        );
    }
}

// ----- layer norm -----------------------------------------------------------------------------

#[test]
fn layer_norm_forward_and_backward_match_the_host() {
    let Some(ctx) = context_for_test("layer_norm_forward_and_backward_match_the_host") else {
        return;
    };
    let (rows, cols, eps) = (2000, 200, 1e-5f32);
    let mut rng = Rng::new(3);
    let x = randn(&mut rng, rows * cols, 2.0);
    let gamma: Vec<f32> = randn(&mut rng, cols, 0.5).iter().map(|g| 1.0 + g).collect();
    let beta = randn(&mut rng, cols, 0.5);
    let dy = randn(&mut rng, rows * cols, 1.0);
    let dx0 = randn(&mut rng, rows * cols, 1.0);

    // Host reference, f64.
    let (mut y, mut dx, mut dgamma, mut dbeta) = (
        vec![0.0f64; rows * cols],
        vec![0.0f64; rows * cols],
        vec![0.0f64; cols],
        vec![0.0f64; cols],
    );
    let (mut mean, mut rstd) = (vec![0.0f64; rows], vec![0.0f64; rows]);
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        let mu = xr.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = xr.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / cols as f64;
        let rs = 1.0 / (var + eps as f64).sqrt();
        (mean[r], rstd[r]) = (mu, rs);
        let xhat: Vec<f64> = xr.iter().map(|&v| (v as f64 - mu) * rs).collect();
        let g: Vec<f64> = (0..cols)
            .map(|c| dy[r * cols + c] as f64 * gamma[c] as f64)
            .collect();
        let a = g.iter().sum::<f64>() / cols as f64;
        let b = g.iter().zip(&xhat).map(|(g, h)| g * h).sum::<f64>() / cols as f64;
        for c in 0..cols {
            y[r * cols + c] = xhat[c] * gamma[c] as f64 + beta[c] as f64;
            dx[r * cols + c] = dx0[r * cols + c] as f64 + rs * (g[c] - a - xhat[c] * b);
            dgamma[c] += dy[r * cols + c] as f64 * xhat[c];
            dbeta[c] += dy[r * cols + c] as f64;
        }
    }

    let (xd, gd, bd, dyd) = (
        up(&ctx, &x),
        up(&ctx, &gamma),
        up(&ctx, &beta),
        up(&ctx, &dy),
    );
    let mut yd = ctx.alloc::<f32>(rows * cols).unwrap();
    let (mut md, mut rd) = (
        ctx.alloc::<f32>(rows).unwrap(),
        ctx.alloc::<f32>(rows).unwrap(),
    );
    layer_norm::forward(
        &ctx,
        &xd,
        &gd,
        &bd,
        &mut yd,
        Some((&mut md, &mut rd)),
        rows,
        cols,
        eps,
    )
    .unwrap();
    assert_close("layer norm y", &down(&ctx, &yd), &to_f32(&y));
    assert_close("layer norm mean", &down(&ctx, &md), &to_f32(&mean));
    assert_close("layer norm rstd", &down(&ctx, &rd), &to_f32(&rstd));

    let mut dxd = up(&ctx, &dx0);
    let (mut dgd, mut dbd) = (
        ctx.alloc::<f32>(cols).unwrap(),
        ctx.alloc::<f32>(cols).unwrap(),
    );
    let grads = LayerNormGrads {
        dx: &mut dxd,
        dgamma: &mut dgd,
        dbeta: &mut dbd,
        accumulate_dx: true,
        accumulate_params: false,
    };
    layer_norm::backward(&ctx, &xd, &gd, &md, &rd, &dyd, grads, rows, cols).unwrap();
    assert_close(
        "layer norm dx (accumulated)",
        &down(&ctx, &dxd),
        &to_f32(&dx),
    );
    assert_close("layer norm dgamma", &down(&ctx, &dgd), &to_f32(&dgamma));
    assert_close("layer norm dbeta", &down(&ctx, &dbd), &to_f32(&dbeta));

    // Inference: no statistics kept.
    let mut y2 = ctx.alloc::<f32>(rows * cols).unwrap();
    layer_norm::forward(&ctx, &xd, &gd, &bd, &mut y2, None, rows, cols, eps).unwrap();
    assert_close("layer norm y (no stats)", &down(&ctx, &y2), &to_f32(&y));
}

// ----- embeddings -----------------------------------------------------------------------------

#[test]
fn token_embedding_forward_and_backward_match_the_host() {
    let Some(ctx) = context_for_test("token_embedding_forward_and_backward_match_the_host") else {
        return;
    };
    let (vocab, dim, n) = (256, 96, 3000);
    let mut rng = Rng::new(4);
    let table = randn(&mut rng, vocab * dim, 1.0);
    let mut tokens: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    tokens[17] = 300; // out of range: a zero row, no gradient
    let dout = randn(&mut rng, n * dim, 1.0);
    let prev = randn(&mut rng, n * dim, 1.0);

    let mut out = vec![0.0f32; n * dim];
    let mut dtable = vec![0.0f64; vocab * dim];
    for (i, &t) in tokens.iter().enumerate() {
        for c in 0..dim {
            let v = if (t as usize) < vocab {
                table[t as usize * dim + c]
            } else {
                0.0
            };
            out[i * dim + c] = prev[i * dim + c] + v;
            if (t as usize) < vocab {
                dtable[t as usize * dim + c] += dout[i * dim + c] as f64;
            }
        }
    }
    let td = ctx.upload(&tokens).unwrap();
    let mut od = up(&ctx, &prev);
    embedding::forward(&ctx, &td, &up(&ctx, &table), &mut od, n, dim, vocab, true).unwrap();
    assert_close("embedding forward (accumulate)", &down(&ctx, &od), &out);
    let mut dtd = ctx.alloc::<f32>(vocab * dim).unwrap();
    embedding::backward(&ctx, &td, &up(&ctx, &dout), &mut dtd, n, dim, vocab, false).unwrap();
    assert_close("embedding backward", &down(&ctx, &dtd), &to_f32(&dtable));
}

#[test]
fn axial_positions_forward_and_backward_match_the_host() {
    let Some(ctx) = context_for_test("axial_positions_forward_and_backward_match_the_host") else {
        return;
    };
    let shape = AxialShape {
        a1: 8,
        a2: 16,
        d1: 24,
        d2: 40,
    };
    let (n, dim) = (100, shape.dim());
    let mut rng = Rng::new(5);
    let e1 = randn(&mut rng, shape.a1 * shape.d1, 1.0);
    let e2 = randn(&mut rng, shape.a2 * shape.d2, 1.0);
    let dout = randn(&mut rng, n * dim, 1.0);
    let mut out = vec![0.0f32; n * dim];
    let (mut de1, mut de2) = (vec![0.0f64; e1.len()], vec![0.0f64; e2.len()]);
    for p in 0..n {
        let (i1, i2) = (p / shape.a2, p % shape.a2);
        for c in 0..dim {
            if c < shape.d1 {
                out[p * dim + c] = e1[i1 * shape.d1 + c];
                de1[i1 * shape.d1 + c] += dout[p * dim + c] as f64;
            } else {
                out[p * dim + c] = e2[i2 * shape.d2 + c - shape.d1];
                de2[i2 * shape.d2 + c - shape.d1] += dout[p * dim + c] as f64;
            }
        }
    }
    let mut od = ctx.alloc::<f32>(n * dim).unwrap();
    embedding::axial_forward(
        &ctx,
        &up(&ctx, &e1),
        &up(&ctx, &e2),
        &mut od,
        0,
        n,
        shape,
        false,
    )
    .unwrap();
    assert_close("axial forward", &down(&ctx, &od), &out);
    let (mut d1, mut d2) = (
        ctx.alloc::<f32>(e1.len()).unwrap(),
        ctx.alloc::<f32>(e2.len()).unwrap(),
    );
    embedding::axial_backward(&ctx, &up(&ctx, &dout), &mut d1, &mut d2, n, shape, false).unwrap();
    assert_close("axial backward e1", &down(&ctx, &d1), &to_f32(&de1));
    assert_close("axial backward e2", &down(&ctx, &d2), &to_f32(&de2));
    // More positions than the table holds is an error, not a launch.
    assert!(embedding::axial_forward(
        &ctx,
        &up(&ctx, &e1),
        &up(&ctx, &e2),
        &mut od,
        0,
        129,
        shape,
        false
    )
    .is_err());
}

// ----- cross-entropy --------------------------------------------------------------------------

#[test]
fn cross_entropy_forward_and_backward_match_the_host() {
    let Some(ctx) = context_for_test("cross_entropy_forward_and_backward_match_the_host") else {
        return;
    };
    let (rows, vocab) = (50, 256);
    let mut rng = Rng::new(6);
    let logits = randn(&mut rng, rows * vocab, 3.0);
    let mut targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
    targets[3] = softmax_xent::IGNORE;
    targets[40] = softmax_xent::IGNORE;
    let scale = 1.0 / 48.0;
    let (mut loss, mut lse, mut dl) = (
        vec![0.0f64; rows],
        vec![0.0f64; rows],
        vec![0.0f64; rows * vocab],
    );
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let z = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        lse[r] = z;
        let t = targets[r] as usize;
        if t < vocab {
            loss[r] = z - row[t] as f64;
            for c in 0..vocab {
                dl[r * vocab + c] =
                    scale as f64 * ((row[c] as f64 - z).exp() - if c == t { 1.0 } else { 0.0 });
            }
        }
    }
    let (ld, td) = (up(&ctx, &logits), ctx.upload(&targets).unwrap());
    let (mut lossd, mut lsed) = (
        ctx.alloc::<f32>(rows).unwrap(),
        ctx.alloc::<f32>(rows).unwrap(),
    );
    softmax_xent::forward(&ctx, &ld, &td, &mut lossd, &mut lsed, rows, vocab).unwrap();
    assert_close("xent loss", &down(&ctx, &lossd), &to_f32(&loss));
    assert_close("xent lse", &down(&ctx, &lsed), &to_f32(&lse));
    let mut dd = ctx.alloc::<f32>(rows * vocab).unwrap();
    softmax_xent::backward(&ctx, &ld, &td, &lsed, &mut dd, rows, vocab, scale).unwrap();
    assert_close("xent dlogits", &down(&ctx, &dd), &to_f32(&dl));
    let mut inplace = up(&ctx, &logits);
    softmax_xent::backward_in_place(&ctx, &mut inplace, &td, &lsed, rows, vocab, scale).unwrap();
    assert_close(
        "xent dlogits (in place)",
        &down(&ctx, &inplace),
        &to_f32(&dl),
    );
}

// ----- reductions and Adam --------------------------------------------------------------------

#[test]
fn reductions_and_adam_match_the_host() {
    let Some(ctx) = context_for_test("reductions_and_adam_match_the_host") else {
        return;
    };
    let mut rng = Rng::new(7);
    let parts: Vec<Vec<f32>> = [1usize, 1000, 300_001]
        .iter()
        .map(|&n| randn(&mut rng, n, 1.0))
        .collect();
    let dev: Vec<DeviceBuffer<f32>> = parts.iter().map(|p| up(&ctx, p)).collect();
    let refs: Vec<&DeviceBuffer<f32>> = dev.iter().collect();
    let mut s = ctx.alloc::<f32>(1).unwrap();
    reduce_adam::sum_squares(&ctx, &refs, &mut s).unwrap();
    let sumsq: f64 = parts.iter().flatten().map(|&v| v as f64 * v as f64).sum();
    assert_close("sum of squares", &down(&ctx, &s), &[sumsq as f32]);
    let mut total = ctx.alloc::<f32>(1).unwrap();
    reduce_adam::sum(&ctx, &dev[2], &mut total).unwrap();
    let want: f64 = parts[2].iter().map(|&v| v as f64).sum();
    // A sum of 3e5 signed terms: judged against the sum of magnitudes.
    let mag: f64 = parts[2].iter().map(|&v| v.abs() as f64).sum();
    let got = down(&ctx, &total)[0] as f64;
    assert!((got - want).abs() <= 1e-5 * mag, "sum {got} vs {want}");

    // Adam: clipping active (norm > max_norm), weight decay, step 3; then without clipping.
    let n = 5000;
    let (p0, g) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
    let m0 = randn(&mut rng, n, 0.1);
    let v0: Vec<f32> = randn(&mut rng, n, 0.1).iter().map(|x| x * x).collect();
    for (max_norm, with_norm) in [(1.0f32, true), (0.0, false)] {
        let hp = AdamStep {
            lr: 1e-2,
            beta1: 0.86,
            beta2: 0.92,
            eps: 1e-9,
            weight_decay: 0.01,
            max_norm,
            step: 3,
        };
        let gd = up(&ctx, &g);
        let mut sq = ctx.alloc::<f32>(1).unwrap();
        reduce_adam::sum_squares(&ctx, &[&gd], &mut sq).unwrap();
        let norm = g.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        let clip = if with_norm && norm > max_norm as f64 {
            max_norm as f64 / norm
        } else {
            1.0
        };
        let (c1, c2) = (1.0 - (0.86f64).powi(3), 1.0 - (0.92f64).powi(3));
        let (mut pw, mut mw, mut vw) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        for i in 0..n {
            let gi = clip * g[i] as f64;
            let mi = 0.86 * m0[i] as f64 + 0.14 * gi;
            let vi = 0.92 * v0[i] as f64 + 0.08 * gi * gi;
            let upd = (mi / c1) / ((vi / c2).sqrt() + 1e-9);
            (mw[i], vw[i]) = (mi, vi);
            pw[i] = p0[i] as f64 - 1e-2 * (upd + 0.01 * p0[i] as f64);
        }
        let (mut pd, mut md, mut vd) = (up(&ctx, &p0), up(&ctx, &m0), up(&ctx, &v0));
        let norm_arg = if with_norm { Some(&sq) } else { None };
        reduce_adam::adam_update(&ctx, &mut pd, &gd, &mut md, &mut vd, &hp, norm_arg).unwrap();
        assert_close("adam m", &down(&ctx, &md), &to_f32(&mw));
        assert_close("adam v", &down(&ctx, &vd), &to_f32(&vw));
        assert_close("adam param", &down(&ctx, &pd), &to_f32(&pw));
    }
}

// ----- hashing and sorting --------------------------------------------------------------------

#[test]
fn lsh_hashing_matches_the_cpu_except_at_near_ties() {
    let Some(ctx) = context_for_test("lsh_hashing_matches_the_cpu_except_at_near_ties") else {
        return;
    };
    for (i, buckets) in [
        LshBuckets::single(32),
        LshBuckets::factorised(8, 16),
        LshBuckets::single(2),
    ]
    .into_iter()
    .enumerate()
    {
        let dims = AttnDims::new(2, 500, 64);
        let rounds = 3;
        let mut rng = Rng::new(10 + i as u64);
        let qk = randn(&mut rng, dims.numel(), 1.0);
        let cpu_b = if buckets.b2 == 1 {
            cpu::Buckets::Single(buckets.b1)
        } else {
            cpu::Buckets::Factorised(buckets.b1, buckets.b2)
        };
        let rot = cpu::Rotations::random(dims.d, rounds, cpu_b, &mut rng).unwrap();
        let cfg = GpuLshConfig {
            buckets,
            n_rounds: rounds,
            chunk_len: 64,
            causal: true,
        };
        let got = ctx
            .download(&gpu_attn::lsh_hash(&ctx, &up(&ctx, &qk), dims, &rot.data, &cfg).unwrap())
            .unwrap();
        let (mut mismatches, mut proj) = (0, Vec::new());
        let cols = rot.buckets.rotation_cols();
        for h in 0..dims.heads {
            let x = &qk[h * dims.len * dims.d..(h + 1) * dims.len * dims.d];
            for r in 0..rounds {
                let mut want = vec![0u32; dims.len];
                rot.hash_round(x, r, &mut want, &mut proj);
                for p in 0..dims.len {
                    let g = got[(h * rounds + r) * dims.len + p];
                    assert!((g as usize) < buckets.total(), "bucket {g} out of range");
                    if g == want[p] {
                        continue;
                    }
                    // Allowed only where the f64 top-two gap of some factor is tiny.
                    let row = &x[p * dims.d..(p + 1) * dims.d];
                    let round = &rot.data[r * dims.d * cols..(r + 1) * dims.d * cols];
                    let pr: Vec<f64> = (0..cols)
                        .map(|c| {
                            (0..dims.d)
                                .map(|t| row[t] as f64 * round[t * cols + c] as f64)
                                .sum()
                        })
                        .collect();
                    let mut offset = 0;
                    let mut margin = f64::INFINITY;
                    for b in rot.buckets.factors() {
                        let mut v: Vec<f64> = pr[offset..offset + b / 2]
                            .iter()
                            .flat_map(|&q| [q, -q])
                            .collect();
                        v.sort_by(|a, b| b.total_cmp(a));
                        if v.len() >= 2 {
                            margin = margin.min(v[0] - v[1]);
                        }
                        offset += b / 2;
                    }
                    assert!(
                        margin < 1e-4,
                        "head {h} round {r} pos {p}: {g} vs {} (gap {margin})",
                        want[p]
                    );
                    mismatches += 1;
                }
            }
        }
        assert!(mismatches <= 3, "{mismatches} near-tie mismatches");
    }
}

#[test]
fn bucket_sort_matches_the_cpu_counting_sort() {
    let Some(ctx) = context_for_test("bucket_sort_matches_the_cpu_counting_sort") else {
        return;
    };
    // (heads, rounds, length, buckets, masked): one tile and one radix pass; several tiles and
    // two passes (1000 buckets; 256 buckets + the padding key).
    for (i, &(heads, rounds, len, n_buckets, masked)) in [
        (2, 1, 100, 64, false),
        (3, 1, 5000, 1000, false),
        (2, 2, 4500, 256, true),
        (1, 2, 2048, 8, true),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = Rng::new(20 + i as u64);
        let segs = heads * rounds;
        let buckets: Vec<u32> = (0..segs * len)
            .map(|_| rng.below(n_buckets) as u32)
            .collect();
        let mask: Vec<bool> = (0..heads * len).map(|_| rng.uniform() > 0.2).collect();
        let bd = ctx.upload(&buckets).unwrap();
        let dims = AttnDims::new(heads, len, 1);
        let mask_d = masked.then(|| ctx.upload_mask(&mask).unwrap());
        let perm = gpu_attn::lsh_sort(&ctx, &bd, dims, rounds, n_buckets, mask_d.as_ref()).unwrap();
        let got = ctx.download(&perm).unwrap();
        let mut inv = ctx.alloc::<u32>(segs * len).unwrap();
        bucket_sort::invert(&ctx, &perm, &mut inv, segs, len).unwrap();
        let inv = ctx.download(&inv).unwrap();
        for s in 0..segs {
            let h = s / rounds;
            let keys: Vec<u32> = (0..len)
                .map(|p| {
                    if masked && !mask[h * len + p] {
                        n_buckets as u32
                    } else {
                        buckets[s * len + p]
                    }
                })
                .collect();
            let mut want = vec![0u32; len];
            let mut counts = Vec::new();
            cpu::sort::counting_sort(&keys, n_buckets + 1, &mut want, &mut counts);
            assert_eq!(
                &got[s * len..(s + 1) * len],
                &want[..],
                "case {i} segment {s}"
            );
            for (slot, &p) in want.iter().enumerate() {
                assert_eq!(inv[s * len + p as usize] as usize, slot);
            }
        }
    }
}

// ----- cuBLAS ---------------------------------------------------------------------------------

#[test]
fn matmul_matches_the_cpu_gemm() {
    let Some(ctx) = context_for_test("matmul_matches_the_cpu_gemm") else {
        return;
    };
    // cuBLAS is a separate library; without it (and without REFORMER_REQUIRE_GPU=1) say so.
    if let Err(e @ KernelsError::MissingLibrary(_)) = ctx.blas() {
        if gpu_required() {
            panic!("REFORMER_REQUIRE_GPU=1 but cuBLAS is missing: {e}");
        }
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: no cuBLAS ({e}) [matmul_matches_the_cpu_gemm]"
        );
        return;
    }
    let mut rng = Rng::new(30);
    for &(m, k, n) in &[(1, 1, 1), (37, 64, 19), (128, 256, 64), (5, 0, 3)] {
        for ta in [false, true] {
            for tb in [false, true] {
                let name = format!("gemm {m}x{k}x{n} ta={ta} tb={tb}");
                let (a, b) = (randn(&mut rng, m * k, 1.0), randn(&mut rng, k * n, 1.0));
                let c0 = randn(&mut rng, m * n, 1.0);
                for accumulate in [false, true] {
                    let mut want = c0.clone();
                    cpu_gemm(&mut want, &a, &b, m, k, n, ta, tb, accumulate, Par::Serial).unwrap();
                    // Not accumulating: start from poison, which must be overwritten.
                    let mut cd = if accumulate {
                        up(&ctx, &c0)
                    } else {
                        ctx.alloc::<f32>(m * n).unwrap()
                    };
                    matmul::gemm(
                        &ctx,
                        &mut cd,
                        &up(&ctx, &a),
                        &up(&ctx, &b),
                        m,
                        k,
                        n,
                        ta,
                        tb,
                        accumulate,
                    )
                    .unwrap();
                    assert_close(&format!("{name} acc={accumulate}"), &down(&ctx, &cd), &want);
                }
            }
        }
    }
    // Strided batch: three independent products in one call.
    let (batch, m, k, n) = (3, 33, 40, 17);
    let (a, b) = (
        randn(&mut rng, batch * m * k, 1.0),
        randn(&mut rng, batch * k * n, 1.0),
    );
    for (ta, tb) in [(false, false), (true, true), (false, true)] {
        let mut want = vec![0.0; batch * m * n];
        for i in 0..batch {
            cpu_gemm(
                &mut want[i * m * n..(i + 1) * m * n],
                &a[i * m * k..(i + 1) * m * k],
                &b[i * k * n..(i + 1) * k * n],
                m,
                k,
                n,
                ta,
                tb,
                false,
                Par::Serial,
            )
            .unwrap();
        }
        let mut cd = ctx.alloc::<f32>(batch * m * n).unwrap();
        matmul::gemm_strided_batched(
            &ctx,
            &mut cd,
            &up(&ctx, &a),
            &up(&ctx, &b),
            batch,
            m,
            k,
            n,
            ta,
            tb,
            false,
        )
        .unwrap();
        assert_close(
            &format!("batched gemm ta={ta} tb={tb}"),
            &down(&ctx, &cd),
            &want,
        );
    }
}

// ----- memory ---------------------------------------------------------------------------------

#[test]
fn device_memory_is_counted_poisoned_and_budgeted() {
    let Some(ctx) = context_for_test("device_memory_is_counted_poisoned_and_budgeted") else {
        return;
    };
    let pool = ctx.pool();
    let base = pool.live_bytes();
    pool.reset_peak();
    let a = ctx.alloc::<f32>(1000).unwrap();
    let b = ctx.alloc::<u32>(500).unwrap();
    assert_eq!(pool.live_bytes(), base + 6000);
    assert!(
        down(&ctx, &a).iter().all(|v| v.is_nan()),
        "f32 buffers are poisoned with NaN"
    );
    assert!(ctx.download(&b).unwrap().iter().all(|&v| v == u32::MAX));
    let z = ctx.alloc_zeros::<f32>(100).unwrap();
    assert!(down(&ctx, &z).iter().all(|&v| v == 0.0));
    drop(a);
    assert_eq!(pool.live_bytes(), base + 2400);
    assert_eq!(pool.peak_bytes(), base + 6400);

    let budget = pool.budget();
    pool.set_budget(pool.live_bytes() + 1000);
    let live = pool.live_bytes();
    match ctx.alloc::<f32>(251) {
        Err(KernelsError::OutOfMemory {
            requested,
            live: l,
            budget: bgt,
        }) => assert_eq!((requested, l, bgt), (1004, live, live + 1000)),
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    assert_eq!(
        pool.live_bytes(),
        live,
        "a refused allocation records nothing"
    );
    let ok = ctx.alloc::<f32>(250).unwrap();
    pool.set_budget(budget);
    drop((b, z, ok));
    assert_eq!(pool.live_bytes(), base);

    let report = ctx.memory_report().unwrap();
    assert!(report.driver_free <= report.driver_total && report.driver_total > 0);
    eprintln!("{report}");
}
