//! Launch geometry and argument checks shared by the wrappers in [`crate::gpu::ops`]. Pure
//! host logic: everything here is testable without a GPU.

use cudarc::driver::LaunchConfig;

use crate::error::KernelsError;
use crate::geometry::ATTN_WARPS;

/// Threads per block of the grid-stride kernels.
pub const GRID_STRIDE_THREADS: u32 = 256;
/// Most blocks a grid-stride launch uses (each thread then loops).
pub const GRID_STRIDE_MAX_BLOCKS: u32 = 65_535;
/// Warps per block (block `(32, ROW_WARPS)`) of the one-warp-per-row kernels.
pub const ROW_WARPS: u32 = 8;
/// Largest `gridDim.x`.
pub const MAX_GRID_X: u64 = (1 << 31) - 1;
/// Largest `gridDim.y` / `gridDim.z`.
pub const MAX_GRID_YZ: u64 = 65_535;

/// The value a null device pointer argument is pushed as.
pub(crate) static NULL_DEVICE_PTR: u64 = 0;

pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> KernelsError {
    KernelsError::InvalidArgument {
        op,
        msg: msg.into(),
    }
}

/// `a · b`, or an error naming the overflow.
pub fn mul(op: &'static str, a: usize, b: usize) -> Result<usize, KernelsError> {
    a.checked_mul(b)
        .ok_or_else(|| invalid(op, format!("{a} × {b} overflows")))
}

/// Checks that buffer `what` (holding `len` elements) holds at least `needed`.
pub fn need(op: &'static str, what: &str, len: usize, needed: usize) -> Result<(), KernelsError> {
    if len < needed {
        return Err(KernelsError::InvalidArgument {
            op,
            msg: format!("{what} holds {len} elements, the launch needs {needed}"),
        });
    }
    Ok(())
}

/// Checks that buffer `what` holds exactly `expected` elements.
pub fn exactly(
    op: &'static str,
    what: &str,
    len: usize,
    expected: usize,
) -> Result<(), KernelsError> {
    if len != expected {
        return Err(KernelsError::InvalidArgument {
            op,
            msg: format!("{what} holds {len} elements, expected {expected}"),
        });
    }
    Ok(())
}

/// `v` as a kernel `int`.
pub fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32, KernelsError> {
    i32::try_from(v).map_err(|_| invalid(op, format!("{what} = {v} exceeds a kernel int")))
}

/// `v` as a kernel `long long`.
pub fn to_i64(op: &'static str, what: &str, v: usize) -> Result<i64, KernelsError> {
    i64::try_from(v).map_err(|_| invalid(op, format!("{what} = {v} exceeds a kernel long long")))
}

/// A grid with the given dimensions, checked against the hardware limits.
pub fn grid(
    op: &'static str,
    x: u64,
    y: u64,
    block: (u32, u32, u32),
) -> Result<LaunchConfig, KernelsError> {
    if x == 0 || y == 0 {
        return Err(invalid(op, "empty grid"));
    }
    if x > MAX_GRID_X || y > MAX_GRID_YZ {
        return Err(invalid(
            op,
            format!("grid ({x}, {y}) exceeds the limits ({MAX_GRID_X}, {MAX_GRID_YZ})"),
        ));
    }
    Ok(LaunchConfig {
        grid_dim: (x as u32, y as u32, 1),
        block_dim: block,
        shared_mem_bytes: 0,
    })
}

/// A grid-stride launch over `n` elements; `None` when there is nothing to do.
pub fn grid_stride(n: usize) -> Option<LaunchConfig> {
    if n == 0 {
        return None;
    }
    let blocks = (n as u64)
        .div_ceil(GRID_STRIDE_THREADS as u64)
        .min(GRID_STRIDE_MAX_BLOCKS as u64) as u32;
    Some(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (GRID_STRIDE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One warp per row: block `(32, ROW_WARPS)`, grid `ceil(rows / ROW_WARPS)`; `None` for no rows.
pub fn warp_per_row(op: &'static str, rows: usize) -> Result<Option<LaunchConfig>, KernelsError> {
    if rows == 0 {
        return Ok(None);
    }
    let blocks = (rows as u64).div_ceil(ROW_WARPS as u64);
    grid(op, blocks, 1, (32, ROW_WARPS, 1)).map(Some)
}

/// A 1-D block of `threads` (a multiple of 32, ≤ 1024) wide enough for `cols` columns.
pub fn column_threads(cols: usize) -> u32 {
    (cols.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// The attention block `(32, ATTN_WARPS)`.
pub const ATTN_BLOCK: (u32, u32, u32) = (32, ATTN_WARPS, 1);

/// Grid of a chunked attention launch (LSH or local): `(n_chunks · ceil(chunk / rows), heads)`.
pub fn chunked_attention_grid(
    op: &'static str,
    len: usize,
    chunk: usize,
    heads: usize,
    rows_per_block: usize,
) -> Result<LaunchConfig, KernelsError> {
    if chunk == 0 {
        return Err(invalid(op, "chunk length 0"));
    }
    let n_chunks = len.div_ceil(chunk) as u64;
    let groups = chunk.div_ceil(rows_per_block) as u64;
    let x = n_chunks
        .checked_mul(groups)
        .ok_or_else(|| invalid(op, "grid overflows"))?;
    grid(op, x, heads as u64, ATTN_BLOCK)
}

/// Grid of an exact-attention launch: `(ceil(len / rows), heads)`.
pub fn exact_attention_grid(
    op: &'static str,
    len: usize,
    heads: usize,
    rows_per_block: usize,
) -> Result<LaunchConfig, KernelsError> {
    grid(
        op,
        len.div_ceil(rows_per_block) as u64,
        heads as u64,
        ATTN_BLOCK,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_stride_covers_and_caps() {
        assert!(grid_stride(0).is_none());
        assert_eq!(grid_stride(1).unwrap().grid_dim, (1, 1, 1));
        assert_eq!(grid_stride(257).unwrap().grid_dim, (2, 1, 1));
        assert_eq!(
            grid_stride(1 << 40).unwrap().grid_dim,
            (GRID_STRIDE_MAX_BLOCKS, 1, 1)
        );
    }

    #[test]
    fn grids_respect_hardware_limits() {
        assert!(grid("t", 1, 65_535, (32, 1, 1)).is_ok());
        assert!(grid("t", 1, 65_536, (32, 1, 1)).is_err());
        assert!(grid("t", 0, 1, (32, 1, 1)).is_err());
        assert!(grid("t", MAX_GRID_X + 1, 1, (32, 1, 1)).is_err());
    }

    #[test]
    fn chunked_grid_counts_groups_per_chunk() {
        // 100 positions in chunks of 40 -> 3 chunks; 40 rows in groups of 16 -> 3 groups.
        let cfg = chunked_attention_grid("t", 100, 40, 2, 16).unwrap();
        assert_eq!(cfg.grid_dim, (9, 2, 1));
        assert_eq!(cfg.block_dim, ATTN_BLOCK);
        assert!(chunked_attention_grid("t", 100, 0, 2, 16).is_err());
    }

    #[test]
    fn column_threads_are_whole_warps() {
        assert_eq!(column_threads(1), 32);
        assert_eq!(column_threads(33), 64);
        assert_eq!(column_threads(5000), 256);
    }
}
