//! `bucket_sort.cu`: the stable sort of positions by bucket, per segment (segment =
//! `head · n_rounds + round`): an LSD radix sort on 8-bit digits (one pass per byte the largest
//! key needs), each pass a stable counting sort (histogram, exclusive scan, scatter).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::error::KernelsError;
use crate::geometry::{bucket_sort_passes, BS_RADIX, BS_SCAN_THREADS, BS_THREADS, BS_TILE};
use crate::gpu::launch::{exactly, grid, grid_stride, invalid, mul, need, to_i32, to_i64};
use crate::gpu::ops::launch_error;
use crate::gpu::{DeviceBuffer, GpuContext};
use crate::sources::{names::bucket_sort as k, KernelFamily};

const FAMILY: KernelFamily = KernelFamily::BucketSort;

/// The passes and buffers of one sort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortPlan {
    pub segs: usize,
    pub len: usize,
    /// Tiles of `BS_TILE` keys per segment.
    pub tiles: usize,
    /// 8-bit radix passes.
    pub passes: u32,
    /// Counters of the histogram, `segs · 256 · tiles`.
    pub hist_len: usize,
}

/// Plans a sort of `segs` segments of `len` keys, every key `< key_bound`.
pub fn plan(segs: usize, len: usize, key_bound: usize) -> Result<SortPlan, KernelsError> {
    const OP: &str = "bucket_sort";
    if segs == 0 || len == 0 {
        return Err(invalid(OP, format!("empty sort: {segs} segments of {len}")));
    }
    if key_bound == 0 || key_bound > u32::MAX as usize {
        return Err(invalid(
            OP,
            format!("key bound {key_bound} outside [1, 2^32)"),
        ));
    }
    if segs as u64 > crate::gpu::launch::MAX_GRID_YZ {
        return Err(invalid(
            OP,
            format!("{segs} segments exceed the grid's 65535"),
        ));
    }
    to_i32(OP, "len", len)?;
    let tiles = len.div_ceil(BS_TILE);
    let hist_len = mul(OP, mul(OP, segs, BS_RADIX)?, tiles)?;
    to_i32(OP, "256 · tiles", BS_RADIX * tiles)?;
    to_i64(OP, "segs · len", mul(OP, segs, len)?)?;
    Ok(SortPlan {
        segs,
        len,
        tiles,
        passes: bucket_sort_passes(key_bound),
        hist_len,
    })
}

/// `perm[seg, slot] = position`: the stable order of each segment's positions by key (ties in
/// position order), for `keys` `[segs, len]`, every key `< key_bound` (larger keys would be
/// ordered by their low bytes only). Returns the permutation.
pub fn sort(
    ctx: &GpuContext,
    keys: &DeviceBuffer<u32>,
    segs: usize,
    len: usize,
    key_bound: usize,
) -> Result<DeviceBuffer<u32>, KernelsError> {
    const OP: &str = "bucket_sort";
    let p = plan(segs, len, key_bound)?;
    let total = segs * len;
    need(OP, "keys", keys.len(), total)?;
    let n = len as i32;
    let scan_len = (BS_RADIX * p.tiles) as i32;
    let tile_cfg = grid(OP, p.tiles as u64, segs as u64, (BS_THREADS, 1, 1))?;
    let scan_cfg = LaunchConfig {
        grid_dim: (segs as u32, 1, 1),
        block_dim: (BS_SCAN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut hist = ctx.alloc::<u32>(p.hist_len)?;
    let mut prev: Option<(DeviceBuffer<u32>, DeviceBuffer<u32>)> = None;
    for pass in 0..p.passes {
        let shift = (8 * pass) as i32;
        let keys_in = prev.as_ref().map_or(keys, |(k_out, _)| k_out);
        {
            let f = ctx.function(FAMILY, k::HISTOGRAM)?;
            let mut b = ctx.stream().launch_builder(&f);
            b.arg(keys_in.cu()).arg(hist.cu_mut()).arg(&n).arg(&shift);
            // SAFETY: bucket_sort_histogram(keys, hist, int n, int shift), grid (tiles, segs):
            // reads keys[seg, 0..n), writes hist[seg, 0..256, tile]; sizes from the plan.
            unsafe { b.launch(tile_cfg) }.map_err(|e| launch_error(k::HISTOGRAM, e))?;
        }
        {
            let f = ctx.function(FAMILY, k::SCAN)?;
            let mut b = ctx.stream().launch_builder(&f);
            b.arg(hist.cu_mut()).arg(&scan_len);
            // SAFETY: bucket_sort_scan(hist, int len), grid (segs): scans hist[seg, 0..256·tiles).
            unsafe { b.launch(scan_cfg) }.map_err(|e| launch_error(k::SCAN, e))?;
        }
        let mut keys_out = ctx.alloc::<u32>(total)?;
        let mut vals_out = ctx.alloc::<u32>(total)?;
        {
            let f = ctx.function(FAMILY, k::SCATTER)?;
            let mut b = ctx.stream().launch_builder(&f);
            b.arg(keys_in.cu());
            match &prev {
                Some((_, vals_in)) => b.arg(vals_in.cu()),
                None => b.arg(&crate::gpu::launch::NULL_DEVICE_PTR),
            };
            b.arg(keys_out.cu_mut())
                .arg(vals_out.cu_mut())
                .arg(hist.cu());
            b.arg(&n).arg(&shift);
            // SAFETY: bucket_sort_scatter(keys_in, vals_in|null, keys_out, vals_out, offsets,
            // int n, int shift): the scanned offsets place each of a segment's n keys in a
            // distinct slot of [seg·n, seg·n + n); all buffers hold segs·n (hist: the plan's).
            unsafe { b.launch(tile_cfg) }.map_err(|e| launch_error(k::SCATTER, e))?;
        }
        prev = Some((keys_out, vals_out));
    }
    let (_, perm) = prev.ok_or_else(|| invalid(OP, "no radix pass"))?;
    Ok(perm)
}

/// `inv[seg, perm[seg, slot]] = slot`.
pub fn invert(
    ctx: &GpuContext,
    perm: &DeviceBuffer<u32>,
    inv: &mut DeviceBuffer<u32>,
    segs: usize,
    len: usize,
) -> Result<(), KernelsError> {
    const OP: &str = "bucket_sort_invert";
    let total = mul(OP, segs, len)?;
    need(OP, "perm", perm.len(), total)?;
    need(OP, "inv", inv.len(), total)?;
    let Some(cfg) = grid_stride(total) else {
        return Ok(());
    };
    let n = to_i32(OP, "len", len)?;
    let segs = to_i64(OP, "segs", segs)?;
    let f = ctx.function(FAMILY, k::INVERT)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(perm.cu()).arg(inv.cu_mut()).arg(&n).arg(&segs);
    // SAFETY: bucket_sort_invert(perm, inv, int n, long long segs): reads perm[0..segs·n), writes
    // inv[seg·n + pos] only for pos < n.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::INVERT, e))?;
    Ok(())
}

/// Sort keys from buckets `[heads, n_rounds, len]`: the bucket, or `masked_key` (the bucket
/// count) where `key_valid` (`[len]` or `[heads, len]`, 1 = real token) marks padding, so padding
/// sorts after every real position of its round, as in the CPU reference.
#[allow(clippy::too_many_arguments)]
pub fn mask_keys(
    ctx: &GpuContext,
    buckets: &DeviceBuffer<u32>,
    key_valid: &DeviceBuffer<u8>,
    keys: &mut DeviceBuffer<u32>,
    heads: usize,
    n_rounds: usize,
    len: usize,
    masked_key: u32,
) -> Result<(), KernelsError> {
    const OP: &str = "bucket_sort_mask_keys";
    let segs = mul(OP, heads, n_rounds)?;
    let total = mul(OP, segs, len)?;
    need(OP, "buckets", buckets.len(), total)?;
    need(OP, "keys", keys.len(), total)?;
    let per_head = mask_layout(OP, key_valid.len(), heads, len)?;
    let Some(cfg) = grid_stride(total) else {
        return Ok(());
    };
    let (n, rounds) = (to_i32(OP, "len", len)?, to_i32(OP, "n_rounds", n_rounds)?);
    let segs = to_i64(OP, "segs", segs)?;
    let f = ctx.function(FAMILY, k::MASK_KEYS)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(buckets.cu())
        .arg(key_valid.cu())
        .arg(&per_head)
        .arg(keys.cu_mut());
    b.arg(&n).arg(&rounds).arg(&segs).arg(&masked_key);
    // SAFETY: bucket_sort_mask_keys(buckets, key_valid, int per_head, keys, int n, int rounds,
    // long long segs, unsigned masked): reads key_valid[(per_head ? h·n : 0) + p], p < n; the
    // mask holds len or heads·len bytes (checked), buckets and keys segs·n.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::MASK_KEYS, e))?;
    Ok(())
}

/// `valid_per_head` for a key mask of `mask_len` bytes over `heads × len`: 0 for `[len]`, 1 for
/// `[heads, len]`; any other length is an error.
pub fn mask_layout(
    op: &'static str,
    mask_len: usize,
    heads: usize,
    len: usize,
) -> Result<i32, KernelsError> {
    if mask_len == len {
        Ok(0)
    } else if Some(mask_len) == heads.checked_mul(len) {
        Ok(1)
    } else {
        Err(KernelsError::Shape {
            op,
            got: vec![mask_len],
            expected: vec![heads, len],
        })
    }
}

/// Checks a permutation buffer `[segs, len]` (exactly).
pub fn check_perm(
    op: &'static str,
    perm: usize,
    segs: usize,
    len: usize,
) -> Result<(), KernelsError> {
    exactly(op, "perm", perm, mul(op, segs, len)?)
}
