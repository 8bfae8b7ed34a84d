//! `cached_attention.cu`: attention of new queries against cached keys and values (decoding),
//! each query with its own keys. The CPU twin is `reformer_lsh::cached_attention`.

use cudarc::driver::PushKernelArg;

use crate::error::KernelsError;
use crate::gpu::launch::{grid, invalid, mul, need, to_i32, to_i64};
use crate::gpu::ops::launch_error;
use crate::gpu::{ActElem, DeviceBuffer, GpuContext};
use crate::sources::{names::cached_attention as k, KernelFamily};

const FAMILY: KernelFamily = KernelFamily::CachedAttention;

/// Warps per block (`CA_WARPS`) and the largest head size (`CA_MAX_D`) of the kernel.
pub const CA_WARPS: u32 = 4;
pub const CA_MAX_D: usize = 128;

/// The geometry of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedDims {
    pub queries: usize,
    pub heads: usize,
    pub d: usize,
    /// Rows of each cache: position `p` is row `p % cache_rows`.
    pub cache_rows: usize,
    /// Rounds of the key lists (1 with ranges).
    pub rounds: usize,
    /// Width of each key list (0 with ranges).
    pub width: usize,
}

/// How scores are formed (`reformer_lsh::ScoreRule`); the keys are used as cached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CachedRule {
    pub scale: f32,
    pub causal: bool,
    pub self_penalty: bool,
}

/// Which keys each query sees: lists `[heads, rounds, queries, width]` of positions
/// (`u32::MAX`: none), or ranges `[queries, 2]` (start, end).
pub enum CachedKeysGpu<'a> {
    Lists(&'a DeviceBuffer<u32>),
    Ranges(&'a DeviceBuffer<u32>),
}

/// `out[i, h] = Σ_r w_r softmax_r(q_i,h · keys) values` over the keys each query sees.
#[allow(clippy::too_many_arguments)]
pub fn attend<T: ActElem>(
    ctx: &GpuContext,
    q: &DeviceBuffer<T>,
    k_cache: &DeviceBuffer<T>,
    v_cache: &DeviceBuffer<T>,
    q_pos: &DeviceBuffer<u32>,
    keys: CachedKeysGpu<'_>,
    dims: CachedDims,
    rule: CachedRule,
    out: &mut DeviceBuffer<f32>,
) -> Result<(), KernelsError> {
    const OP: &str = "cached_attention";
    let CachedDims {
        queries,
        heads,
        d,
        cache_rows,
        rounds,
        width,
    } = dims;
    if heads == 0 || d == 0 || d > CA_MAX_D || cache_rows == 0 || rounds == 0 {
        return Err(invalid(
            OP,
            format!("{dims:?} (head size at most {CA_MAX_D})"),
        ));
    }
    if queries == 0 {
        return Ok(());
    }
    let w = mul(OP, heads, d)?;
    need(OP, "q", q.len(), mul(OP, queries, w)?)?;
    need(OP, "out", out.len(), mul(OP, queries, w)?)?;
    need(OP, "keys", k_cache.len(), mul(OP, cache_rows, w)?)?;
    need(OP, "values", v_cache.len(), mul(OP, cache_rows, w)?)?;
    need(OP, "q_pos", q_pos.len(), queries)?;
    let (lists, ranges, use_lists) = match keys {
        CachedKeysGpu::Lists(l) => {
            need(
                OP,
                "lists",
                l.len(),
                mul(OP, mul(OP, heads * rounds, queries)?, width)?,
            )?;
            (l, l, 1i32)
        }
        CachedKeysGpu::Ranges(r) => {
            need(OP, "ranges", r.len(), mul(OP, queries, 2)?)?;
            if rounds != 1 {
                return Err(invalid(OP, "ranges serve one round"));
            }
            (r, r, 0i32)
        }
    };
    let cfg = grid(OP, queries as u64, heads as u64, (32 * CA_WARPS, 1, 1))?;
    let (nq, nh, nd) = (
        to_i32(OP, "queries", queries)?,
        to_i32(OP, "heads", heads)?,
        to_i32(OP, "d", d)?,
    );
    let rows = to_i64(OP, "cache_rows", cache_rows)?;
    let (nr, nw) = (to_i32(OP, "rounds", rounds)?, to_i32(OP, "width", width)?);
    let bf16 = i32::from(T::IS_BF16);
    let (causal, self_penalty) = (i32::from(rule.causal), i32::from(rule.self_penalty));
    let f = ctx.function(FAMILY, k::ATTEND)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(q.cu()).arg(k_cache.cu()).arg(v_cache.cu()).arg(&bf16);
    b.arg(q_pos.cu())
        .arg(lists.cu())
        .arg(ranges.cu())
        .arg(&use_lists);
    b.arg(&nq).arg(&nh).arg(&nd).arg(&rows).arg(&nr).arg(&nw);
    b.arg(&rule.scale)
        .arg(&causal)
        .arg(&self_penalty)
        .arg(out.cu_mut());
    // SAFETY: cached_attention(q, k, v, int bf16, q_pos, lists, ranges, int use_lists, int
    // queries, int heads, int d, long long cache_rows, int rounds, int width, float scale, int
    // causal, int self_penalty, float* out), grid (queries, heads): every buffer
    // holds what the checks above ask for; keys are read at rows p % cache_rows only.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::ATTEND, e))?;
    Ok(())
}
