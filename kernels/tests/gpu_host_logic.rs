//! Host-side logic of the CUDA backend, checked without a GPU: opening a context never panics,
//! the row-major → column-major cuBLAS mapping, the memory budget accounting, launch geometry,
//! and the argument checks every launch wrapper runs before it launches.

use std::sync::Arc;

use reformer_kernels::geometry::{ATTN_MAX_D, ATTN_ROWS_BWD, ATTN_ROWS_FWD};
use reformer_kernels::gpu::attention::{GpuLshConfig, LshBuckets};
use reformer_kernels::gpu::launch::{chunked_attention_grid, exact_attention_grid, grid_stride};
use reformer_kernels::gpu::ops::bucket_sort::{mask_layout, plan};
use reformer_kernels::gpu::ops::embedding::AxialShape;
use reformer_kernels::gpu::ops::lsh_attention::LshLaunch;
use reformer_kernels::gpu::ops::lsh_hash::{check_buckets, HashDims};
use reformer_kernels::gpu::ops::matmul::{column_major_gemm, ColumnMajorGemm};
use reformer_kernels::gpu::ops::reduce_adam::{partial_config, AdamStep, MAX_PARTIALS};
use reformer_kernels::gpu::ops::{layer_norm, softmax_xent, AttnDims};
use reformer_kernels::gpu::{GpuContext, MemoryAccount};
use reformer_kernels::KernelsError;

// ----- context ------------------------------------------------------------------------------

#[test]
fn opening_a_gpu_never_panics() {
    match GpuContext::new(0) {
        Ok(ctx) => {
            assert!(ctx.arch().starts_with("sm_"));
            assert!(ctx.pool().budget() > 0);
        }
        Err(e) => {
            eprintln!("GpuContext::new(0): {e}");
            assert!(!e.to_string().is_empty());
        }
    }
    // A device that cannot exist is an error, never a panic.
    assert!(GpuContext::new(4096).is_err());
}

#[test]
fn contexts_and_buffers_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<GpuContext>();
    send_sync::<reformer_kernels::DeviceBuffer<f32>>();
    send_sync::<reformer_kernels::gpu::DevicePool>();
}

// ----- cuBLAS mapping -----------------------------------------------------------------------

/// Element (i, j) of a column-major matrix with leading dimension `ld`, optionally transposed.
fn col_major_at(buf: &[f32], ld: i32, trans: bool, i: usize, j: usize) -> f32 {
    let (r, c) = if trans { (j, i) } else { (i, j) };
    buf[c * ld as usize + r]
}

/// What cuBLAS sgemm computes for `p`: `C = alpha·op(A)·op(B) + beta·C`, column-major, with A
/// the row-major `b` buffer and B the row-major `a` buffer (the operand swap of the mapping).
fn run_column_major(p: &ColumnMajorGemm, a: &[f32], b: &[f32], c: &mut [f32], beta: f32) {
    let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
    for j in 0..n {
        for i in 0..m {
            let mut s = 0.0f64;
            for l in 0..k {
                s += col_major_at(b, p.lda, p.trans_first, i, l) as f64
                    * col_major_at(a, p.ldb, p.trans_second, l, j) as f64;
            }
            let at = j * p.ldc as usize + i;
            // cuBLAS does not read C when beta is 0 (a NaN there is overwritten).
            let prev = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * c[at] as f64
            };
            c[at] = (s + prev) as f32;
        }
    }
}

/// The row-major reference (`reformer_engine::matmul::gemm` semantics).
#[allow(clippy::too_many_arguments)]
fn row_major(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for l in 0..k {
                let x = if ta { a[l * m + i] } else { a[i * k + l] };
                let y = if tb { b[j * k + l] } else { b[l * n + j] };
                s += x as f64 * y as f64;
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

#[test]
fn column_major_mapping_computes_the_row_major_product() {
    for &(m, k, n) in &[(1, 1, 1), (2, 3, 4), (5, 7, 3), (17, 8, 33), (64, 1, 9)] {
        for ta in [false, true] {
            for tb in [false, true] {
                let a = pseudo_random(m * k, (m * 31 + k) as u32);
                let b = pseudo_random(k * n, (k * 17 + n) as u32);
                let want = row_major(&a, &b, m, k, n, ta, tb);
                let p = column_major_gemm(m, k, n, ta, tb).unwrap().unwrap();
                assert_eq!((p.m, p.n, p.k), (n as i32, m as i32, k as i32));
                // Leading dimensions are at least the rows of what cuBLAS reads.
                assert!(p.lda >= if tb { k } else { n } as i32);
                assert!(p.ldb >= if ta { m } else { k } as i32);
                let mut c = vec![f32::NAN; m * n];
                run_column_major(&p, &a, &b, &mut c, 0.0);
                for (x, y) in c.iter().zip(&want) {
                    assert!(
                        (x - y).abs() <= 1e-5,
                        "{m}x{k}x{n} ta={ta} tb={tb}: {x} vs {y}"
                    );
                }
                // accumulate (beta = 1) adds the product once more
                run_column_major(&p, &a, &b, &mut c, 1.0);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - 2.0 * y).abs() <= 2e-5);
                }
            }
        }
    }
}

#[test]
fn empty_and_oversized_products_are_handled_before_cublas() {
    assert_eq!(column_major_gemm(0, 3, 4, false, false).unwrap(), None);
    assert_eq!(column_major_gemm(3, 0, 4, true, false).unwrap(), None);
    assert_eq!(column_major_gemm(3, 4, 0, false, true).unwrap(), None);
    assert!(matches!(
        column_major_gemm(1 << 31, 1, 1, false, false),
        Err(KernelsError::InvalidArgument { .. })
    ));
}

// ----- memory accounting --------------------------------------------------------------------

#[test]
fn the_budget_is_hard_and_the_error_names_the_numbers() {
    let acct = MemoryAccount::new(1 << 20);
    acct.reserve(700_000).unwrap();
    let err = acct.reserve(400_000).unwrap_err();
    assert_eq!(
        err,
        KernelsError::OutOfMemory {
            requested: 400_000,
            live: 700_000,
            budget: 1 << 20
        }
    );
    let text = err.to_string();
    assert!(text.contains("400000") && text.contains("700000") && text.contains("1048576"));
    acct.set_budget(usize::MAX);
    acct.reserve(400_000).unwrap();
    assert_eq!(acct.peak_bytes(), 1_100_000);
}

#[test]
fn concurrent_accounting_never_passes_the_budget_and_balances() {
    let acct = Arc::new(MemoryAccount::new(10_000));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let acct = Arc::clone(&acct);
            std::thread::spawn(move || {
                for i in 0..2000 {
                    let bytes = 100 + (i * 7 + t * 13) % 900;
                    if acct.reserve(bytes).is_ok() {
                        assert!(acct.live_bytes() <= 10_000);
                        acct.release(bytes);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(acct.live_bytes(), 0);
    assert!(acct.peak_bytes() <= 10_000);
}

// ----- geometry -----------------------------------------------------------------------------

#[test]
fn launch_geometry() {
    assert!(grid_stride(0).is_none());
    let fwd = chunked_attention_grid("t", 1 << 19, 64, 8, ATTN_ROWS_FWD).unwrap();
    assert_eq!(
        fwd.grid_dim,
        ((1 << 19) / 64 * (64 / ATTN_ROWS_FWD) as u32, 8, 1)
    );
    let bwd = chunked_attention_grid("t", 100, 1000, 1, ATTN_ROWS_BWD).unwrap();
    assert_eq!(bwd.grid_dim.0, 1000u32.div_ceil(ATTN_ROWS_BWD as u32));
    let ex = exact_attention_grid("t", 33, 2, ATTN_ROWS_FWD).unwrap();
    assert_eq!(ex.grid_dim, (3, 2, 1));
    assert!(exact_attention_grid("t", 33, 70_000, ATTN_ROWS_FWD).is_err());
    assert_eq!(partial_config(0).grid_dim.0, 1);
    assert_eq!(
        partial_config(usize::MAX / 2).grid_dim.0 as usize,
        MAX_PARTIALS
    );
}

#[test]
fn sort_plans_count_radix_passes_and_tiles() {
    let p = plan(4, 5000, 64).unwrap();
    assert_eq!((p.tiles, p.passes, p.hist_len), (3, 1, 4 * 256 * 3));
    assert_eq!(plan(1, 10, 257).unwrap().passes, 2);
    // With a key mask the padding key is the bucket count: 256 buckets need two passes.
    assert_eq!(plan(1, 10, 256 + 1).unwrap().passes, 2);
    assert_eq!(plan(1, 10, 256).unwrap().passes, 1);
    assert!(plan(0, 10, 4).is_err());
    assert!(plan(70_000, 10, 4).is_err());
    assert!(plan(1, 10, 0).is_err());
}

// ----- argument checks ----------------------------------------------------------------------

#[test]
fn attention_dims_are_checked() {
    assert!(AttnDims::new(2, 100, 64).check("t").is_ok());
    assert!(AttnDims::new(2, 100, ATTN_MAX_D).check("t").is_ok());
    for bad in [
        AttnDims::new(2, 100, ATTN_MAX_D + 1),
        AttnDims::new(0, 100, 64),
        AttnDims::new(2, 0, 64),
        AttnDims::new(2, 100, 0),
        AttnDims::new(70_000, 100, 64),
        AttnDims::new(1, 1 << 31, 1),
    ] {
        assert!(
            matches!(bad.check("t"), Err(KernelsError::InvalidArgument { .. })),
            "{bad:?}"
        );
    }
    let dims = AttnDims::new(2, 10, 4);
    assert!(dims.check_tensor("t", "q", 80).is_ok());
    assert!(dims.check_tensor("t", "q", 79).is_err());
    assert!(dims.check_rows("t", "lse", 19).is_err());
}

#[test]
fn key_masks_are_shared_or_per_head() {
    assert_eq!(mask_layout("t", 10, 3, 10).unwrap(), 0);
    assert_eq!(mask_layout("t", 30, 3, 10).unwrap(), 1);
    assert_eq!(
        mask_layout("t", 20, 3, 10),
        Err(KernelsError::Shape {
            op: "t",
            got: vec![20],
            expected: vec![3, 10]
        })
    );
    let dims = AttnDims::new(3, 10, 4);
    assert_eq!(dims.mask_layout("t", None).unwrap(), 0);
    assert!(dims.mask_layout("t", Some(11)).is_err());
}

#[test]
fn lsh_configuration_is_checked() {
    let dims = AttnDims::new(2, 100, 64);
    let ok = LshLaunch {
        dims,
        n_rounds: 2,
        chunk: 32,
        causal: true,
    };
    assert!(ok.check("t").is_ok());
    assert_eq!(ok.per_round_len(), 400);
    assert!(LshLaunch { n_rounds: 0, ..ok }.check("t").is_err());
    assert!(LshLaunch { chunk: 0, ..ok }.check("t").is_err());
    // A chunk longer than the sequence is the sequence (one chunk, no look-back).
    let long = LshLaunch {
        chunk: 1 << 40,
        ..ok
    };
    assert!(long.check("t").is_ok());
    assert_eq!((ok.effective_chunk(), long.effective_chunk()), (32, 100));

    let cfg = GpuLshConfig {
        buckets: LshBuckets::factorised(8, 16),
        n_rounds: 3,
        chunk_len: 32,
        causal: false,
    };
    assert!(cfg.check("t", dims).is_ok());
    assert_eq!(cfg.buckets.total(), 128);
    assert_eq!(cfg.rotations_len(64), 3 * 64 * (4 + 8));
    assert_eq!(LshBuckets::single(1).rotation_cols(), 0);
    assert_eq!(LshBuckets::single(64).rotation_cols(), 32);
    let odd = GpuLshConfig {
        buckets: LshBuckets::single(7),
        ..cfg
    };
    assert!(odd.check("t", dims).is_err());
}

#[test]
fn hashing_is_checked() {
    assert!(check_buckets("t", 64, 1).is_ok());
    assert!(check_buckets("t", 1, 1).is_ok());
    assert!(check_buckets("t", 3, 1).is_err());
    assert!(check_buckets("t", 0, 2).is_err());
    assert!(check_buckets("t", 1 << 16, 1 << 16).is_err());
    let dims = HashDims {
        heads: 2,
        len: 10,
        d: 4,
        n_rounds: 3,
        b1: 8,
        b2: 4,
        rot_head_stride: 0,
    };
    assert_eq!(dims.rotation_cols(), 6);
    assert_eq!(dims.n_buckets(), 32);
    assert_eq!(dims.rotations_len().unwrap(), 3 * 4 * 6);
    assert!(dims.check(80, 72, 60).is_ok());
    assert!(dims.check(79, 72, 60).is_err());
    assert!(dims.check(80, 71, 60).is_err());
    assert!(dims.check(80, 72, 59).is_err());
    let per_head = HashDims {
        rot_head_stride: 100,
        ..dims
    };
    assert_eq!(per_head.rotations_len().unwrap(), 100 + 72);
}

#[test]
fn dense_op_arguments_are_checked() {
    // layer norm: x, y rows·cols; gamma cols; stats rows
    assert!(layer_norm::check("t", 4, 8, 32, 8, 32, &[("mean", 4)]).is_ok());
    assert!(layer_norm::check("t", 4, 8, 31, 8, 32, &[]).is_err());
    assert!(layer_norm::check("t", 4, 8, 32, 7, 32, &[]).is_err());
    assert!(layer_norm::check("t", 4, 8, 32, 8, 32, &[("rstd", 3)]).is_err());
    assert!(layer_norm::check("t", 4, 0, 0, 0, 0, &[]).is_err());
    let (parts, per) = layer_norm::param_parts(1 << 19);
    assert!(parts <= layer_norm::MAX_PARTS && parts * per >= 1 << 19);

    // cross-entropy
    assert!(softmax_xent::check("t", 3, 256, 768, 3, &[("loss", 3)]).is_ok());
    assert!(softmax_xent::check("t", 3, 256, 767, 3, &[]).is_err());
    assert!(softmax_xent::check("t", 3, 256, 768, 2, &[]).is_err());
    assert!(softmax_xent::check("t", 3, 0, 0, 3, &[]).is_err());

    // axial positions
    let shape = AxialShape {
        a1: 4,
        a2: 8,
        d1: 3,
        d2: 5,
    };
    assert!(shape.check("t", 32, 12, 40, 32 * 8).is_ok());
    assert!(shape.check("t", 20, 12, 40, 20 * 8).is_ok());
    assert!(
        shape.check("t", 33, 12, 40, 33 * 8).is_err(),
        "beyond the table"
    );
    assert!(shape.check("t", 32, 11, 40, 32 * 8).is_err());

    // Adam
    let hp = AdamStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        max_norm: 1.0,
        step: 1,
    };
    assert!(hp.check().is_ok());
    assert!(AdamStep { step: 0, ..hp }.check().is_err());
    assert!(AdamStep { beta2: 1.0, ..hp }.check().is_err());
    assert!(AdamStep { lr: f32::NAN, ..hp }.check().is_err());
}
