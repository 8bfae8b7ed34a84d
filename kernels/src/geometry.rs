//! Launch geometry the kernels are written for. These mirror `#define`s in the `.cu` sources;
//! a unit test keeps the two in step.

/// Attention kernels (`attention.cuh`): block `(32, ATTN_WARPS)`.
pub const ATTN_WARPS: u32 = 4;
/// Largest head size the attention kernels serve.
pub const ATTN_MAX_D: usize = 128;
/// Query rows per block in the attention forward passes.
pub const ATTN_ROWS_FWD: usize = 16;
/// Query (dq pass) or key (dk/dv pass) rows per block in the attention backward passes.
pub const ATTN_ROWS_BWD: usize = 8;

/// Bucket sort (`bucket_sort.cu`): threads per block of the histogram and scatter kernels.
pub const BS_THREADS: u32 = 256;
/// Keys per tile (one block of the histogram and scatter kernels).
pub const BS_TILE: usize = 2048;
/// Threads of the scan kernel (one block per segment).
pub const BS_SCAN_THREADS: u32 = 1024;
/// Counters per tile: the sort runs on 8-bit digits.
pub const BS_RADIX: usize = 256;
/// Bits per radix pass.
pub const BS_DIGIT_BITS: u32 = 8;

/// Radix passes to sort bucket ids below `n_buckets`: at least one.
pub fn bucket_sort_passes(n_buckets: usize) -> u32 {
    let bits = usize::BITS - n_buckets.saturating_sub(1).leading_zeros();
    bits.div_ceil(BS_DIGIT_BITS).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::{KernelFamily, Prelude};

    /// The integer value of `#define name value` in `text`.
    fn define(text: &str, name: &str) -> Option<i64> {
        text.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "#define" || words.next()? != name {
                return None;
            }
            words.next()?.parse().ok()
        })
    }

    #[test]
    fn attention_constants_match_the_source() {
        let src = Prelude::Attention.source();
        let warps = define(src, "ATTN_WARPS").unwrap();
        let qpw_fwd = define(src, "ATTN_QPW_FWD").unwrap();
        let qpw_bwd = define(src, "ATTN_QPW_BWD").unwrap();
        assert_eq!(warps, ATTN_WARPS as i64);
        assert_eq!(define(src, "ATTN_MAX_D").unwrap(), ATTN_MAX_D as i64);
        assert_eq!(warps * qpw_fwd, ATTN_ROWS_FWD as i64);
        assert_eq!(warps * qpw_bwd, ATTN_ROWS_BWD as i64);
    }

    #[test]
    fn bucket_sort_constants_match_the_source() {
        let src = KernelFamily::BucketSort.source();
        assert_eq!(define(src, "BS_THREADS").unwrap(), BS_THREADS as i64);
        assert_eq!(define(src, "BS_TILE").unwrap(), BS_TILE as i64);
        assert_eq!(
            define(src, "BS_SCAN_THREADS").unwrap(),
            BS_SCAN_THREADS as i64
        );
        assert_eq!(define(src, "BS_RADIX").unwrap(), BS_RADIX as i64);
        assert_eq!(1usize << BS_DIGIT_BITS, BS_RADIX);
    }

    #[test]
    fn passes_cover_the_bucket_ids() {
        assert_eq!(bucket_sort_passes(0), 1);
        assert_eq!(bucket_sort_passes(1), 1);
        assert_eq!(bucket_sort_passes(256), 1);
        assert_eq!(bucket_sort_passes(257), 2);
        assert_eq!(bucket_sort_passes(65536), 2);
        assert_eq!(bucket_sort_passes(65537), 3);
    }
}
