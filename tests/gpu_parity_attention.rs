//! CPU-vs-GPU parity of every attention kind, forward and backward: shared-QK LSH attention
//! (given the CPU's buckets, and end to end with hashing on the device), chunked local
//! attention, exact attention (scaled and shared-QK), LSH = exact with one bucket on the GPU,
//! and the kernels reading bf16-stored activations (LSH, local and shared-QK exact attention,
//! forward and backward; hashing and the row dot). The CPU functions of `reformer-lsh` are the
//! reference.
//!
//! Inputs are fresh random tensors (engine `Rng`); every device output is NaN-poisoned before
//! the kernels run, so an element a kernel never wrote fails the comparison.
//!
//! Tolerance (f32): every element within `atol + 1e-4·|cpu|`, `atol = 2e-5·max(1, max|cpu|)`
//! over the tensor (the floor scales with the tensor's largest entry). The bf16 runs meet the
//! same tolerance against the CPU on the same bf16 values; one also states the looser bf16
//! tolerance against the CPU on the unrounded f32 inputs.
//!
//! Without a GPU each test prints `SKIPPED: no GPU (<reason>)` and passes, unless
//! `REFORMER_REQUIRE_GPU=1`.

use reformer_engine::{MemoryPool, Rng, Tensor};
use reformer_kernels::gpu::attention::{self as gpu_attn, AttnDims, ExactRule, GpuLocalConfig};
use reformer_kernels::gpu::attention::{GpuLshConfig, LshBuckets};
use reformer_kernels::gpu::ops::elementwise;
use reformer_kernels::gpu::ops::lsh_attention::{self as lsh_ops, LshInputs, LshLaunch};
use reformer_kernels::gpu::testing::{check_close, context_for_test, Tolerance};
use reformer_kernels::gpu::{bf16, DeviceBuffer, GpuContext};
use reformer_lsh as cpu;

const RTOL: f32 = 1e-4;
const ATOL_FLOOR: f32 = 2e-5;

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let tol = Tolerance::scaled(RTOL, ATOL_FLOOR, want);
    match check_close(what, got, want, tol) {
        Ok(r) => eprintln!("{what}: worst {:.3} of tolerance", r.worst_ratio),
        Err(e) => panic!("{e}"),
    }
}

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    let mut v = vec![0.0; n];
    rng.fill_normal(&mut v, std);
    v
}

fn tensor(pool: &MemoryPool, dims: AttnDims, data: &[f32]) -> Tensor {
    Tensor::from_vec(pool, &[dims.heads, dims.len, dims.d], data.to_vec()).unwrap()
}

fn down(ctx: &GpuContext, b: &DeviceBuffer<f32>) -> Vec<f32> {
    ctx.download(b).unwrap()
}

#[derive(Debug, Clone, Copy)]
enum Mask {
    None,
    Shared,
    PerHead,
}

fn make_mask(kind: Mask, dims: AttnDims, rng: &mut Rng) -> Option<Vec<bool>> {
    let n = match kind {
        Mask::None => return None,
        Mask::Shared => dims.len,
        Mask::PerHead => dims.rows(),
    };
    Some((0..n).map(|_| rng.uniform() > 0.15).collect())
}

fn cpu_buckets(b: LshBuckets) -> cpu::Buckets {
    if b.b2 == 1 {
        cpu::Buckets::Single(b.b1)
    } else {
        cpu::Buckets::Factorised(b.b1, b.b2)
    }
}

// ----- LSH attention --------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct LshCase {
    heads: usize,
    len: usize,
    d: usize,
    rounds: usize,
    buckets: LshBuckets,
    chunk: usize,
    causal: bool,
    mask: Mask,
}

const LSH_CASES: &[LshCase] = &[
    LshCase {
        heads: 2,
        len: 256,
        d: 64,
        rounds: 1,
        buckets: LshBuckets { b1: 8, b2: 1 },
        chunk: 32,
        causal: true,
        mask: Mask::None,
    },
    // length not a multiple of the chunk; non-causal; two rounds
    LshCase {
        heads: 2,
        len: 300,
        d: 64,
        rounds: 2,
        buckets: LshBuckets { b1: 16, b2: 1 },
        chunk: 32,
        causal: false,
        mask: Mask::None,
    },
    // factorised buckets, four rounds, a shared padding mask
    LshCase {
        heads: 3,
        len: 200,
        d: 32,
        rounds: 4,
        buckets: LshBuckets { b1: 4, b2: 4 },
        chunk: 64,
        causal: true,
        mask: Mask::Shared,
    },
    // the largest head size, a per-head mask, 300 buckets (> 256: two radix passes)
    LshCase {
        heads: 2,
        len: 257,
        d: 128,
        rounds: 2,
        buckets: LshBuckets { b1: 20, b2: 16 },
        chunk: 64,
        causal: true,
        mask: Mask::PerHead,
    },
    // one chunk longer than the sequence (no look-back), odd head size
    LshCase {
        heads: 1,
        len: 100,
        d: 20,
        rounds: 3,
        buckets: LshBuckets { b1: 2, b2: 1 },
        chunk: 128,
        causal: true,
        mask: Mask::None,
    },
    // one bucket over several chunks: the look-back wraps from chunk 0 to the last chunk
    LshCase {
        heads: 2,
        len: 128,
        d: 64,
        rounds: 2,
        buckets: LshBuckets { b1: 1, b2: 1 },
        chunk: 32,
        causal: false,
        mask: Mask::None,
    },
];

struct LshRun {
    out: Vec<f32>,
    lse: Vec<f32>,
    buckets: Vec<u32>,
    d_qk: Vec<f32>,
    d_v: Vec<f32>,
}

/// The CPU reference for one case: forward and backward, with its buckets.
fn cpu_lsh(
    c: &LshCase,
    qk: &[f32],
    v: &[f32],
    d_out: &[f32],
    rot: &cpu::Rotations,
    mask: Option<&[bool]>,
) -> LshRun {
    let pool = MemoryPool::unlimited();
    let dims = AttnDims::new(c.heads, c.len, c.d);
    let (qk_t, v_t, g_t) = (
        tensor(&pool, dims, qk),
        tensor(&pool, dims, v),
        tensor(&pool, dims, d_out),
    );
    let cfg = cpu::LshConfig {
        chunk_len: c.chunk,
        causal: c.causal,
    };
    let (out, saved) = cpu::lsh_attention_forward(&qk_t, &v_t, rot, &cfg, mask).unwrap();
    let (d_qk, d_v) =
        cpu::lsh_attention_backward(&qk_t, &v_t, &out, &g_t, &saved, rot, &cfg, mask).unwrap();
    LshRun {
        out: out.to_vec(),
        lse: saved.lse.to_vec(),
        buckets: saved.buckets.to_vec(),
        d_qk: d_qk.to_vec(),
        d_v: d_v.to_vec(),
    }
}

/// The GPU for one case; hashes on the device unless `buckets` is given.
#[allow(clippy::too_many_arguments)]
fn gpu_lsh(
    ctx: &GpuContext,
    c: &LshCase,
    qk: &[f32],
    v: &[f32],
    d_out: &[f32],
    rot: &cpu::Rotations,
    mask: Option<&[bool]>,
    buckets: Option<&[u32]>,
) -> LshRun {
    let dims = AttnDims::new(c.heads, c.len, c.d);
    let cfg = GpuLshConfig {
        buckets: c.buckets,
        n_rounds: c.rounds,
        chunk_len: c.chunk,
        causal: c.causal,
    };
    let (qk_d, v_d, g_d) = (
        ctx.upload(qk).unwrap(),
        ctx.upload(v).unwrap(),
        ctx.upload(d_out).unwrap(),
    );
    let mask_d = mask.map(|m| ctx.upload_mask(m).unwrap());
    let (out, saved) = match buckets {
        Some(b) => gpu_attn::lsh_attention_forward_with_buckets(
            ctx,
            &qk_d,
            &v_d,
            dims,
            ctx.upload(b).unwrap(),
            &cfg,
            mask_d.as_ref(),
        ),
        None => gpu_attn::lsh_attention_forward(
            ctx,
            &qk_d,
            &v_d,
            dims,
            &rot.data,
            &cfg,
            mask_d.as_ref(),
        ),
    }
    .unwrap();
    let (d_qk, d_v) = gpu_attn::lsh_attention_backward(
        ctx,
        &qk_d,
        &v_d,
        &out,
        &g_d,
        &saved,
        &cfg,
        mask_d.as_ref(),
    )
    .unwrap();
    LshRun {
        out: down(ctx, &out),
        lse: down(ctx, &saved.lse),
        buckets: ctx.download(&saved.buckets).unwrap(),
        d_qk: down(ctx, &d_qk),
        d_v: down(ctx, &d_v),
    }
}

fn compare_lsh(name: &str, got: &LshRun, want: &LshRun) {
    assert_close(&format!("{name} out"), &got.out, &want.out);
    assert_close(&format!("{name} lse"), &got.lse, &want.lse);
    assert_close(&format!("{name} d_qk"), &got.d_qk, &want.d_qk);
    assert_close(&format!("{name} d_v"), &got.d_v, &want.d_v);
}

#[test]
fn lsh_attention_matches_the_cpu_given_its_buckets() {
    let Some(ctx) = context_for_test("lsh_attention_matches_the_cpu_given_its_buckets") else {
        return;
    };
    for (i, c) in LSH_CASES.iter().enumerate() {
        let mut rng = Rng::new(100 + i as u64);
        let dims = AttnDims::new(c.heads, c.len, c.d);
        let qk = randn(&mut rng, dims.numel(), 1.0);
        let v = randn(&mut rng, dims.numel(), 1.0);
        let d_out = randn(&mut rng, dims.numel(), 1.0);
        let rot = cpu::Rotations::random(c.d, c.rounds, cpu_buckets(c.buckets), &mut rng).unwrap();
        let mask = make_mask(c.mask, dims, &mut rng);
        let want = cpu_lsh(c, &qk, &v, &d_out, &rot, mask.as_deref());
        let got = gpu_lsh(
            &ctx,
            c,
            &qk,
            &v,
            &d_out,
            &rot,
            mask.as_deref(),
            Some(&want.buckets),
        );
        assert_eq!(
            got.buckets, want.buckets,
            "case {i}: the saved buckets are the given ones"
        );
        compare_lsh(&format!("lsh case {i} {c:?}"), &got, &want);
    }
}

/// Top-two gap of `argmax([p; −p])` over every factor of one row, in f64.
fn hash_margin(x: &[f64], rot: &cpu::Rotations, r: usize) -> f64 {
    let cols = rot.buckets.rotation_cols();
    let round = &rot.data[r * rot.d * cols..(r + 1) * rot.d * cols];
    let proj: Vec<f64> = (0..cols)
        .map(|c| (0..rot.d).map(|t| x[t] * round[t * cols + c] as f64).sum())
        .collect();
    let mut offset = 0;
    let mut margin = f64::INFINITY;
    for b in rot.buckets.factors() {
        let half = b / 2;
        let mut vals: Vec<f64> = proj[offset..offset + half]
            .iter()
            .flat_map(|&p| [p, -p])
            .collect();
        vals.sort_by(|a, b| b.total_cmp(a));
        if vals.len() >= 2 {
            margin = margin.min(vals[0] - vals[1]);
        }
        offset += half;
    }
    margin
}

#[test]
fn lsh_attention_end_to_end_hashes_like_the_cpu() {
    let Some(ctx) = context_for_test("lsh_attention_end_to_end_hashes_like_the_cpu") else {
        return;
    };
    let c = LshCase {
        heads: 2,
        len: 192,
        d: 64,
        rounds: 2,
        buckets: LshBuckets { b1: 16, b2: 1 },
        chunk: 32,
        causal: true,
        mask: Mask::Shared,
    };
    let dims = AttnDims::new(c.heads, c.len, c.d);
    // Inputs whose every hash has a clear winner (f64 top-two gap ≥ 1e-2), so that the two
    // backends' different summation orders cannot tip a near-tie.
    let (mut seed, mut tries) = (7u64, 0);
    let (qk, rot, mut rng) = loop {
        let mut rng = Rng::new(seed);
        let qk = randn(&mut rng, dims.numel(), 1.0);
        let rot = cpu::Rotations::random(c.d, c.rounds, cpu_buckets(c.buckets), &mut rng).unwrap();
        let clear = qk.chunks(c.d).all(|row| {
            let x: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            (0..c.rounds).all(|r| hash_margin(&x, &rot, r) >= 1e-2)
        });
        if clear {
            break (qk, rot, rng);
        }
        seed += 1;
        tries += 1;
        assert!(tries < 200, "no input without near-ties found");
    };
    let v = randn(&mut rng, dims.numel(), 1.0);
    let d_out = randn(&mut rng, dims.numel(), 1.0);
    let mask = make_mask(c.mask, dims, &mut rng);
    let want = cpu_lsh(&c, &qk, &v, &d_out, &rot, mask.as_deref());
    let got = gpu_lsh(&ctx, &c, &qk, &v, &d_out, &rot, mask.as_deref(), None);
    assert_eq!(
        got.buckets, want.buckets,
        "device hashing differs from the CPU's"
    );
    compare_lsh("lsh end to end", &got, &want);
}

#[test]
fn lsh_rounds_combine_exactly_for_a_query_that_sees_only_itself() {
    // Causal: position 0 sees only itself, with score −1e5, in every round. Its output must be
    // v[0] and each round's logsumexp exactly −1e5 — a total logsumexp formed in f32 would lose
    // ln(rounds) next to 1e5 and scale the output by ~0.998.
    let Some(ctx) =
        context_for_test("lsh_rounds_combine_exactly_for_a_query_that_sees_only_itself")
    else {
        return;
    };
    let dims = AttnDims::new(2, 64, 32);
    let rounds = 4;
    let mut rng = Rng::new(5);
    let qk = randn(&mut rng, dims.numel(), 1.0);
    let v = randn(&mut rng, dims.numel(), 1.0);
    let d_out = randn(&mut rng, dims.numel(), 1.0);
    let rot = cpu::Rotations::random(dims.d, rounds, cpu::Buckets::Single(4), &mut rng).unwrap();
    let c = LshCase {
        heads: dims.heads,
        len: dims.len,
        d: dims.d,
        rounds,
        buckets: LshBuckets::single(4),
        chunk: 16,
        causal: true,
        mask: Mask::None,
    };
    let want = cpu_lsh(&c, &qk, &v, &d_out, &rot, None);
    let got = gpu_lsh(&ctx, &c, &qk, &v, &d_out, &rot, None, Some(&want.buckets));
    for h in 0..dims.heads {
        let row = h * dims.len * dims.d;
        for t in 0..dims.d {
            let (o, x) = (got.out[row + t], v[row + t]);
            assert!(
                (o - x).abs() <= 1e-6 * x.abs().max(1.0),
                "head {h}: out {o} vs v {x}"
            );
        }
        for r in 0..rounds {
            assert_eq!(got.lse[(h * rounds + r) * dims.len], -1e5);
        }
    }
    compare_lsh("lsh self-only", &got, &want);
}

#[test]
fn lsh_fold_and_combine_paths_agree() {
    let Some(ctx) = context_for_test("lsh_fold_and_combine_paths_agree") else {
        return;
    };
    let dims = AttnDims::new(2, 150, 64);
    let l = LshLaunch {
        dims,
        n_rounds: 3,
        chunk: 32,
        causal: true,
    };
    let mut rng = Rng::new(9);
    let qk = ctx.upload(&randn(&mut rng, dims.numel(), 1.0)).unwrap();
    let v = ctx.upload(&randn(&mut rng, dims.numel(), 1.0)).unwrap();
    let buckets: Vec<u32> = (0..l.per_round_len())
        .map(|_| rng.below(8) as u32)
        .collect();
    let perm = gpu_attn::lsh_sort(&ctx, &ctx.upload(&buckets).unwrap(), dims, 3, 8, None).unwrap();
    let x = LshInputs {
        qk: &qk,
        v: &v,
        perm: &perm,
        key_valid: None,
    };
    let mut folded = ctx.alloc::<f32>(dims.numel()).unwrap();
    let mut lse_a = ctx.alloc::<f32>(l.per_round_len()).unwrap();
    let mut combined = ctx.alloc::<f32>(dims.numel()).unwrap();
    let mut round_out = ctx.alloc::<f32>(dims.numel()).unwrap();
    let mut lse_b = ctx.alloc::<f32>(l.per_round_len()).unwrap();
    for r in 0..3 {
        lsh_ops::forward_round(&ctx, x, &mut folded, &mut lse_a, &l, r, true).unwrap();
        lsh_ops::forward_round(&ctx, x, &mut round_out, &mut lse_b, &l, r, false).unwrap();
        lsh_ops::combine_round(&ctx, &mut combined, &round_out, &lse_b, &l, r).unwrap();
    }
    let tight = Tolerance {
        rtol: 1e-6,
        atol: 1e-7,
    };
    check_close(
        "combine vs fold",
        &down(&ctx, &combined),
        &down(&ctx, &folded),
        tight,
    )
    .unwrap();
    assert_eq!(
        down(&ctx, &lse_a),
        down(&ctx, &lse_b),
        "same per-round logsumexps"
    );
}

#[test]
fn lsh_with_one_bucket_and_one_chunk_equals_exact_on_the_gpu() {
    // Property 7 of `docs/design.md`, on the device: every round hashes alike, one chunk covers the
    // sequence, so LSH attention is exact causal shared-QK attention with the self penalty.
    let Some(ctx) = context_for_test("lsh_with_one_bucket_and_one_chunk_equals_exact_on_the_gpu")
    else {
        return;
    };
    let dims = AttnDims::new(2, 96, 64);
    let mut rng = Rng::new(11);
    let qk = ctx.upload(&randn(&mut rng, dims.numel(), 1.0)).unwrap();
    let v = ctx.upload(&randn(&mut rng, dims.numel(), 1.0)).unwrap();
    let d_out = ctx.upload(&randn(&mut rng, dims.numel(), 1.0)).unwrap();
    let cfg = GpuLshConfig {
        buckets: LshBuckets::single(1),
        n_rounds: 2,
        chunk_len: 128,
        causal: true,
    };
    let (out, saved) =
        gpu_attn::lsh_attention_forward(&ctx, &qk, &v, dims, &[], &cfg, None).unwrap();
    let (d_qk, d_v) =
        gpu_attn::lsh_attention_backward(&ctx, &qk, &v, &out, &d_out, &saved, &cfg, None).unwrap();
    let (e_out, e_lse) =
        gpu_attn::exact_shared_qk_forward(&ctx, &qk, &v, dims, true, None).unwrap();
    let (e_dqk, e_dv) =
        gpu_attn::exact_shared_qk_backward(&ctx, &qk, &v, &e_out, &e_lse, &d_out, dims, true, None)
            .unwrap();
    assert_close("one-bucket out", &down(&ctx, &out), &down(&ctx, &e_out));
    assert_close("one-bucket d_qk", &down(&ctx, &d_qk), &down(&ctx, &e_dqk));
    assert_close("one-bucket d_v", &down(&ctx, &d_v), &down(&ctx, &e_dv));
}

// ----- local attention ------------------------------------------------------------------------

#[test]
fn local_attention_matches_the_cpu() {
    let Some(ctx) = context_for_test("local_attention_matches_the_cpu") else {
        return;
    };
    let cases = [
        (2, 256, 64, 64, true, Mask::None),
        (3, 300, 32, 64, true, Mask::Shared),
        (2, 200, 128, 48, false, Mask::PerHead),
        (1, 50, 20, 64, true, Mask::None),
    ];
    for (i, &(heads, len, d, chunk, causal, mask_kind)) in cases.iter().enumerate() {
        let name = format!("local case {i}");
        let dims = AttnDims::new(heads, len, d);
        let mut rng = Rng::new(200 + i as u64);
        let [q, k, v, g] = [0; 4].map(|_| randn(&mut rng, dims.numel(), 1.0));
        let mask = make_mask(mask_kind, dims, &mut rng);
        let pool = MemoryPool::unlimited();
        let t = |x: &[f32]| tensor(&pool, dims, x);
        let cfg = cpu::LocalConfig {
            chunk_len: chunk,
            causal,
        };
        let (c_out, c_lse) =
            cpu::local_attention_forward(&t(&q), &t(&k), &t(&v), &cfg, mask.as_deref()).unwrap();
        let (c_dq, c_dk, c_dv) = cpu::local_attention_backward(
            &t(&q),
            &t(&k),
            &t(&v),
            &c_out,
            &c_lse,
            &t(&g),
            &cfg,
            mask.as_deref(),
        )
        .unwrap();

        let [qd, kd, vd, gd] = [&q, &k, &v, &g].map(|x| ctx.upload(x).unwrap());
        let mask_d = mask.as_deref().map(|m| ctx.upload_mask(m).unwrap());
        let gcfg = GpuLocalConfig {
            chunk_len: chunk,
            causal,
        };
        let (out, lse) =
            gpu_attn::local_attention_forward(&ctx, &qd, &kd, &vd, dims, &gcfg, mask_d.as_ref())
                .unwrap();
        let (dq, dk, dv) = gpu_attn::local_attention_backward(
            &ctx,
            &qd,
            &kd,
            &vd,
            &out,
            &lse,
            &gd,
            dims,
            &gcfg,
            mask_d.as_ref(),
        )
        .unwrap();
        assert_close(&format!("{name} out"), &down(&ctx, &out), c_out.data());
        assert_close(&format!("{name} lse"), &down(&ctx, &lse), &c_lse);
        assert_close(&format!("{name} dq"), &down(&ctx, &dq), c_dq.data());
        assert_close(&format!("{name} dk"), &down(&ctx, &dk), c_dk.data());
        assert_close(&format!("{name} dv"), &down(&ctx, &dv), c_dv.data());
    }
}

// ----- exact attention ------------------------------------------------------------------------

#[test]
fn exact_attention_matches_the_cpu() {
    let Some(ctx) = context_for_test("exact_attention_matches_the_cpu") else {
        return;
    };
    for (i, &(heads, len, d, causal, mask_kind)) in [
        (2, 200, 64, true, Mask::None),
        (2, 130, 32, false, Mask::Shared),
        (1, 77, 128, true, Mask::PerHead),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("exact case {i}");
        let dims = AttnDims::new(heads, len, d);
        let mut rng = Rng::new(300 + i as u64);
        let [q, k, v, g] = [0; 4].map(|_| randn(&mut rng, dims.numel(), 1.0));
        let mask = make_mask(mask_kind, dims, &mut rng);
        let pool = MemoryPool::unlimited();
        let t = |x: &[f32]| tensor(&pool, dims, x);
        let rule = cpu::scaled_rule(d, causal);
        let (c_out, c_lse) =
            cpu::exact_attention_forward(&t(&q), &t(&k), &t(&v), rule, mask.as_deref()).unwrap();
        let (c_dq, c_dk, c_dv) = cpu::exact_attention_backward(
            &t(&q),
            &t(&k),
            &t(&v),
            &c_out,
            &c_lse,
            &t(&g),
            rule,
            mask.as_deref(),
        )
        .unwrap();

        let [qd, kd, vd, gd] = [&q, &k, &v, &g].map(|x| ctx.upload(x).unwrap());
        let mask_d = mask.as_deref().map(|m| ctx.upload_mask(m).unwrap());
        let grule = ExactRule::scaled(d, causal);
        let (out, lse) =
            gpu_attn::exact_attention_forward(&ctx, &qd, &kd, &vd, dims, grule, mask_d.as_ref())
                .unwrap();
        let (dq, dk, dv) = gpu_attn::exact_attention_backward(
            &ctx,
            &qd,
            &kd,
            &vd,
            &out,
            &lse,
            &gd,
            dims,
            grule,
            mask_d.as_ref(),
        )
        .unwrap();
        assert_close(&format!("{name} out"), &down(&ctx, &out), c_out.data());
        assert_close(&format!("{name} lse"), &down(&ctx, &lse), &c_lse);
        assert_close(&format!("{name} dq"), &down(&ctx, &dq), c_dq.data());
        assert_close(&format!("{name} dk"), &down(&ctx, &dk), c_dk.data());
        assert_close(&format!("{name} dv"), &down(&ctx, &dv), c_dv.data());
    }
}

#[test]
fn exact_shared_qk_attention_matches_the_cpu() {
    let Some(ctx) = context_for_test("exact_shared_qk_attention_matches_the_cpu") else {
        return;
    };
    for (i, &(causal, mask_kind)) in [(true, Mask::None), (false, Mask::Shared)]
        .iter()
        .enumerate()
    {
        let name = format!("shared-qk case {i}");
        let dims = AttnDims::new(2, 150, 64);
        let mut rng = Rng::new(400 + i as u64);
        let [qk, v, g] = [0; 3].map(|_| randn(&mut rng, dims.numel(), 1.0));
        let mask = make_mask(mask_kind, dims, &mut rng);
        let pool = MemoryPool::unlimited();
        let t = |x: &[f32]| tensor(&pool, dims, x);
        let qk_t = t(&qk);
        let keys = cpu::unit_keys(&qk_t).unwrap();
        let rule = cpu::shared_qk_rule(causal);
        let (c_out, c_lse) =
            cpu::exact_attention_forward(&qk_t, &keys, &t(&v), rule, mask.as_deref()).unwrap();
        let (c_dq, c_dk, c_dv) = cpu::exact_attention_backward(
            &qk_t,
            &keys,
            &t(&v),
            &c_out,
            &c_lse,
            &t(&g),
            rule,
            mask.as_deref(),
        )
        .unwrap();
        let c_dqk = cpu::shared_qk_grad(&qk_t, c_dq, &c_dk);

        let [qkd, vd, gd] = [&qk, &v, &g].map(|x| ctx.upload(x).unwrap());
        let mask_d = mask.as_deref().map(|m| ctx.upload_mask(m).unwrap());
        let (out, lse) =
            gpu_attn::exact_shared_qk_forward(&ctx, &qkd, &vd, dims, causal, mask_d.as_ref())
                .unwrap();
        let (dqk, dv) = gpu_attn::exact_shared_qk_backward(
            &ctx,
            &qkd,
            &vd,
            &out,
            &lse,
            &gd,
            dims,
            causal,
            mask_d.as_ref(),
        )
        .unwrap();
        assert_close(&format!("{name} out"), &down(&ctx, &out), c_out.data());
        assert_close(&format!("{name} lse"), &down(&ctx, &lse), &c_lse);
        assert_close(&format!("{name} d_qk"), &down(&ctx, &dqk), c_dqk.data());
        assert_close(&format!("{name} d_v"), &down(&ctx, &dv), c_dv.data());

        // The general entry point with unit keys: dq + dk (through the norm) is the same d_qk.
        let (dq, dk, _) = gpu_attn::exact_attention_backward(
            &ctx,
            &qkd,
            &qkd,
            &vd,
            &out,
            &lse,
            &gd,
            dims,
            ExactRule::shared_qk(causal),
            mask_d.as_ref(),
        )
        .unwrap();
        let sum: Vec<f32> = down(&ctx, &dq)
            .iter()
            .zip(down(&ctx, &dk))
            .map(|(a, b)| a + b)
            .collect();
        assert_close(&format!("{name} dq + dk"), &sum, c_dqk.data());
    }
}

// ----- bf16 storage ---------------------------------------------------------------------------
//
// The attention kernels, the hash and the row dot read activations stored as bf16 directly
// (widening each element to f32 on load) and compute in f32. Against the CPU run on the same
// bf16 values the f32 tolerance holds: both compute in f32 on exactly the same numbers. For the
// backward, `out` is the device's own f32 output as the device stores it in bf16
// (ew_f32_to_bf16), and the CPU's backward gets those same values.

/// `x` rounded to bf16 (nearest even) and widened back: the values a bf16 buffer holds.
fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&a| bf16::from_f32(a).to_f32()).collect()
}

/// `x` stored as bf16 on the device (rounded on the host).
fn up_bf16(ctx: &GpuContext, x: &[f32]) -> DeviceBuffer<bf16> {
    let h: Vec<bf16> = x.iter().map(|&a| bf16::from_f32(a)).collect();
    ctx.upload(&h).unwrap()
}

/// A device f32 result stored as bf16 by the device, and the stored values widened on the host.
fn store_bf16(ctx: &GpuContext, x: &DeviceBuffer<f32>) -> (DeviceBuffer<bf16>, Vec<f32>) {
    let mut h = ctx.alloc::<bf16>(x.len()).unwrap();
    elementwise::f32_to_bf16(ctx, x, &mut h).unwrap();
    let vals = ctx
        .download(&h)
        .unwrap()
        .iter()
        .map(|b| b.to_f32())
        .collect();
    (h, vals)
}

#[test]
fn lsh_attention_reads_bf16_activations() {
    // qk, v, out and d_out in bf16, given the CPU's buckets; every LSH case.
    let Some(ctx) = context_for_test("lsh_attention_reads_bf16_activations") else {
        return;
    };
    for (i, c) in LSH_CASES.iter().enumerate() {
        let name = format!("bf16 lsh case {i} {c:?}");
        let mut rng = Rng::new(600 + i as u64);
        let dims = AttnDims::new(c.heads, c.len, c.d);
        let [qk, v, d_out] = [0; 3].map(|_| round_bf16(&randn(&mut rng, dims.numel(), 1.0)));
        let rot = cpu::Rotations::random(c.d, c.rounds, cpu_buckets(c.buckets), &mut rng).unwrap();
        let mask = make_mask(c.mask, dims, &mut rng);
        let pool = MemoryPool::unlimited();
        let t = |x: &[f32]| tensor(&pool, dims, x);
        let cfg = cpu::LshConfig {
            chunk_len: c.chunk,
            causal: c.causal,
        };
        let (c_out, saved) =
            cpu::lsh_attention_forward(&t(&qk), &t(&v), &rot, &cfg, mask.as_deref()).unwrap();
        let buckets = saved.buckets.to_vec();

        let gcfg = GpuLshConfig {
            buckets: c.buckets,
            n_rounds: c.rounds,
            chunk_len: c.chunk,
            causal: c.causal,
        };
        let [qkd, vd, gd] = [&qk, &v, &d_out].map(|x| up_bf16(&ctx, x));
        let mask_d = mask.as_deref().map(|m| ctx.upload_mask(m).unwrap());
        let (out, g_saved) = gpu_attn::lsh_attention_forward_with_buckets(
            &ctx,
            &qkd,
            &vd,
            dims,
            ctx.upload(&buckets).unwrap(),
            &gcfg,
            mask_d.as_ref(),
        )
        .unwrap();
        assert_close(&format!("{name} out"), &down(&ctx, &out), c_out.data());
        assert_close(
            &format!("{name} lse"),
            &down(&ctx, &g_saved.lse),
            &saved.lse,
        );

        let (out_h, out_vals) = store_bf16(&ctx, &out);
        let (c_dqk, c_dv) = cpu::lsh_attention_backward(
            &t(&qk),
            &t(&v),
            &t(&out_vals),
            &t(&d_out),
            &saved,
            &rot,
            &cfg,
            mask.as_deref(),
        )
        .unwrap();
        let (dqk, dv) = gpu_attn::lsh_attention_backward(
            &ctx,
            &qkd,
            &vd,
            &out_h,
            &gd,
            &g_saved,
            &gcfg,
            mask_d.as_ref(),
        )
        .unwrap();
        assert_close(&format!("{name} d_qk"), &down(&ctx, &dqk), c_dqk.data());
        assert_close(&format!("{name} d_v"), &down(&ctx, &dv), c_dv.data());
    }
}

#[test]
fn local_attention_reads_bf16_activations() {
    // q, k, v, out and d_out in bf16. Case 0 also states the bf16 storage error against the CPU
    // on the original f32 inputs: rtol 5e-2 with an absolute floor of 2e-2·max(1, max|cpu|)
    // (bf16 keeps 8 significant bits: ~4e-3 relative per input).
    let Some(ctx) = context_for_test("local_attention_reads_bf16_activations") else {
        return;
    };
    let cases = [
        (2, 192, 64, 64, true, Mask::None),
        (3, 300, 32, 64, true, Mask::Shared),
        (2, 200, 128, 48, false, Mask::PerHead),
        (1, 50, 20, 64, true, Mask::None),
    ];
    for (i, &(heads, len, d, chunk, causal, mask_kind)) in cases.iter().enumerate() {
        let name = format!("bf16 local case {i}");
        let dims = AttnDims::new(heads, len, d);
        let mut rng = Rng::new(700 + i as u64);
        let raw = [0; 4].map(|_| randn(&mut rng, dims.numel(), 1.0));
        let [q, k, v, g] = [0, 1, 2, 3].map(|j| round_bf16(&raw[j]));
        let mask = make_mask(mask_kind, dims, &mut rng);
        let pool = MemoryPool::unlimited();
        let t = |x: &[f32]| tensor(&pool, dims, x);
        let cfg = cpu::LocalConfig {
            chunk_len: chunk,
            causal,
        };
        let (c_out, c_lse) =
            cpu::local_attention_forward(&t(&q), &t(&k), &t(&v), &cfg, mask.as_deref()).unwrap();

        let [qd, kd, vd, gd] = [&q, &k, &v, &g].map(|x| up_bf16(&ctx, x));
        let mask_d = mask.as_deref().map(|m| ctx.upload_mask(m).unwrap());
        let gcfg = GpuLocalConfig {
            chunk_len: chunk,
            causal,
        };
        let (out, lse) =
            gpu_attn::local_attention_forward(&ctx, &qd, &kd, &vd, dims, &gcfg, mask_d.as_ref())
                .unwrap();
        let out_f32 = down(&ctx, &out);
        assert_close(&format!("{name} out"), &out_f32, c_out.data());
        assert_close(&format!("{name} lse"), &down(&ctx, &lse), &c_lse);

        let (out_h, out_vals) = store_bf16(&ctx, &out);
        let (c_dq, c_dk, c_dv) = cpu::local_attention_backward(
            &t(&q),
            &t(&k),
            &t(&v),
            &t(&out_vals),
            &c_lse,
            &t(&g),
            &cfg,
            mask.as_deref(),
        )
        .unwrap();
        let (dq, dk, dv) = gpu_attn::local_attention_backward(
            &ctx,
            &qd,
            &kd,
            &vd,
            &out_h,
            &lse,
            &gd,
            dims,
            &gcfg,
            mask_d.as_ref(),
        )
        .unwrap();
        assert_close(&format!("{name} dq"), &down(&ctx, &dq), c_dq.data());
        assert_close(&format!("{name} dk"), &down(&ctx, &dk), c_dk.data());
        assert_close(&format!("{name} dv"), &down(&ctx, &dv), c_dv.data());

        if i == 0 {
            let (exact, _) = cpu::local_attention_forward(
                &t(&raw[0]),
                &t(&raw[1]),
                &t(&raw[2]),
                &cfg,
                mask.as_deref(),
            )
            .unwrap();
            let tol = Tolerance::scaled(5e-2, 2e-2, exact.data());
            let r = check_close("bf16 storage vs f32 cpu", &out_f32, exact.data(), tol)
                .unwrap_or_else(|e| panic!("{e}"));
            eprintln!(
                "bf16 storage: worst {:.3} of the bf16 tolerance",
                r.worst_ratio
            );
        }
    }
}

#[test]
fn exact_shared_qk_attention_reads_bf16_activations() {
    // qk, v, out and d_out in bf16.
    let Some(ctx) = context_for_test("exact_shared_qk_attention_reads_bf16_activations") else {
        return;
    };
    for (i, &(causal, mask_kind)) in [(true, Mask::None), (false, Mask::PerHead)]
        .iter()
        .enumerate()
    {
        let name = format!("bf16 shared-qk case {i}");
        let dims = AttnDims::new(2, 150, 64);
        let mut rng = Rng::new(800 + i as u64);
        let [qk, v, g] = [0; 3].map(|_| round_bf16(&randn(&mut rng, dims.numel(), 1.0)));
        let mask = make_mask(mask_kind, dims, &mut rng);
        let pool = MemoryPool::unlimited();
        let t = |x: &[f32]| tensor(&pool, dims, x);
        let qk_t = t(&qk);
        let keys = cpu::unit_keys(&qk_t).unwrap();
        let rule = cpu::shared_qk_rule(causal);
        let (c_out, c_lse) =
            cpu::exact_attention_forward(&qk_t, &keys, &t(&v), rule, mask.as_deref()).unwrap();

        let [qkd, vd, gd] = [&qk, &v, &g].map(|x| up_bf16(&ctx, x));
        let mask_d = mask.as_deref().map(|m| ctx.upload_mask(m).unwrap());
        let (out, lse) =
            gpu_attn::exact_shared_qk_forward(&ctx, &qkd, &vd, dims, causal, mask_d.as_ref())
                .unwrap();
        assert_close(&format!("{name} out"), &down(&ctx, &out), c_out.data());
        assert_close(&format!("{name} lse"), &down(&ctx, &lse), &c_lse);

        let (out_h, out_vals) = store_bf16(&ctx, &out);
        let (c_dq, c_dk, c_dv) = cpu::exact_attention_backward(
            &qk_t,
            &keys,
            &t(&v),
            &t(&out_vals),
            &c_lse,
            &t(&g),
            rule,
            mask.as_deref(),
        )
        .unwrap();
        let c_dqk = cpu::shared_qk_grad(&qk_t, c_dq, &c_dk);
        let (dqk, dv) = gpu_attn::exact_shared_qk_backward(
            &ctx,
            &qkd,
            &vd,
            &out_h,
            &lse,
            &gd,
            dims,
            causal,
            mask_d.as_ref(),
        )
        .unwrap();
        assert_close(&format!("{name} d_qk"), &down(&ctx, &dqk), c_dqk.data());
        assert_close(&format!("{name} d_v"), &down(&ctx, &dv), c_dv.data());
    }
}

#[test]
fn bf16_hash_and_row_dot_equal_their_f32_runs_bit_for_bit() {
    // The same values stored as bf16 or as f32 give the same buckets and the same row dots, bit
    // for bit: the kernels widen on load and run the same f32 arithmetic in the same order.
    let Some(ctx) = context_for_test("bf16_hash_and_row_dot_equal_their_f32_runs_bit_for_bit")
    else {
        return;
    };
    let dims = AttnDims::new(3, 257, 64);
    let mut rng = Rng::new(900);
    let [x, y] = [0; 2].map(|_| round_bf16(&randn(&mut rng, dims.numel(), 1.0)));
    let cfg = GpuLshConfig {
        buckets: LshBuckets::factorised(8, 4),
        n_rounds: 3,
        chunk_len: 32,
        causal: true,
    };
    let rot = cpu::Rotations::random(dims.d, 3, cpu::Buckets::Factorised(8, 4), &mut rng).unwrap();
    let (x16, y16) = (up_bf16(&ctx, &x), up_bf16(&ctx, &y));
    let (x32, y32) = (ctx.upload(&x).unwrap(), ctx.upload(&y).unwrap());
    let b16 = gpu_attn::lsh_hash(&ctx, &x16, dims, &rot.data, &cfg).unwrap();
    let b32 = gpu_attn::lsh_hash(&ctx, &x32, dims, &rot.data, &cfg).unwrap();
    assert_eq!(
        ctx.download(&b16).unwrap(),
        ctx.download(&b32).unwrap(),
        "buckets of bf16 rows"
    );

    let mut d16 = ctx.alloc::<f32>(dims.rows()).unwrap();
    let mut d32 = ctx.alloc::<f32>(dims.rows()).unwrap();
    elementwise::row_dot(&ctx, &x16, &y16, &mut d16, dims.rows(), dims.d).unwrap();
    elementwise::row_dot(&ctx, &x32, &y32, &mut d32, dims.rows(), dims.d).unwrap();
    let bits = |v: Vec<f32>| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(down(&ctx, &d16)),
        bits(down(&ctx, &d32)),
        "row dots of bf16 rows"
    );
}

#[test]
fn local_and_exact_forwards_store_bf16_outputs_as_the_conversion_would() {
    // Local and exact attention write a bf16 output directly (the model's bf16 activations);
    // the kernel runs the same f32 arithmetic in the same order and rounds as it stores, so the
    // result equals the f32 output converted by ew_f32_to_bf16, bit for bit.
    let test = "local_and_exact_forwards_store_bf16_outputs_as_the_conversion_would";
    let Some(ctx) = context_for_test(test) else {
        return;
    };
    let dims = AttnDims::new(2, 301, 64);
    let mut rng = Rng::new(901);
    let [q, k, v] = [0; 3].map(|_| up_bf16(&ctx, &randn(&mut rng, dims.numel(), 1.0)));
    let bits = |h: &DeviceBuffer<bf16>| {
        ctx.download(h)
            .unwrap()
            .iter()
            .map(|b| b.to_bits())
            .collect::<Vec<_>>()
    };
    for causal in [true, false] {
        let cfg = GpuLocalConfig {
            chunk_len: 64,
            causal,
        };
        let (o32, lse32) =
            gpu_attn::local_attention_forward(&ctx, &q, &k, &v, dims, &cfg, None).unwrap();
        let (o16, lse16) =
            gpu_attn::local_attention_forward_as::<bf16, bf16>(&ctx, &q, &k, &v, dims, &cfg, None)
                .unwrap();
        let (want, _) = store_bf16(&ctx, &o32);
        assert_eq!(
            bits(&o16),
            bits(&want),
            "local attention output, causal {causal}"
        );
        assert_eq!(down(&ctx, &lse16), down(&ctx, &lse32), "local logsumexps");

        let (o32, _) = gpu_attn::exact_shared_qk_forward(&ctx, &q, &v, dims, causal, None).unwrap();
        let (o16, _) =
            gpu_attn::exact_shared_qk_forward_as::<bf16, bf16>(&ctx, &q, &v, dims, causal, None)
                .unwrap();
        let (want, _) = store_bf16(&ctx, &o32);
        assert_eq!(
            bits(&o16),
            bits(&want),
            "exact attention output, causal {causal}"
        );
    }
}
