// Stable sort of positions by bucket, per segment (segment = head * n_rounds + round): the order
// by the key bucket * n + position. Output perm[seg, slot] = position.
//
// It is a counting sort: histogram, exclusive scan, stable scatter. The bucket count can reach
// the tens of thousands at 2^19 tokens (b ~ 2n/m), too many counters to keep per tile, so the
// counting sort runs on 8-bit digits of the bucket, least significant first (an LSD radix sort:
// one pass when b <= 256, two when b <= 65536). Each pass is itself a stable counting sort, and
// the first pass reads positions in increasing order, so equal buckets keep position order.
//
// One pass over `n` keys per segment (keys_in = the buckets on the first pass, the previous
// pass's keys_out after; vals_in = null on the first pass, meaning "the position itself"):
//   1. bucket_sort_histogram  per (tile of BS_TILE keys, segment): digit counts
//                             -> hist[seg, digit, tile]   (digit-major)
//   2. bucket_sort_scan       per segment, in place: exclusive scan of hist[seg] in
//                             (digit, tile) order -> where each (digit, tile) run starts
//   3. bucket_sort_scatter    per (tile, segment): every key goes to
//                             start(digit, tile) + (number of equal digits before it in the tile)
// Counts use shared-memory integer atomics only; the result does not depend on scheduling.
//
// Launch (all passes): tiles = ceil(n / BS_TILE); histogram and scatter with grid (tiles, segs)
// and BS_THREADS 1-D threads; scan with grid (segs) and BS_SCAN_THREADS 1-D threads.
// hist holds segs * 256 * tiles unsigned ints.

#define BS_RADIX 256
#define BS_THREADS 256
#define BS_WARPS (BS_THREADS / 32)
#define BS_TILE 2048
#define BS_SCAN_THREADS 1024

__device__ __forceinline__ unsigned digit_of(unsigned key, int shift) {
    return (key >> shift) & (BS_RADIX - 1);
}

extern "C" __global__ void bucket_sort_histogram(const unsigned* keys_in, unsigned* hist, int n,
                                                 int shift) {
    __shared__ unsigned counts[BS_RADIX];
    const int tile = blockIdx.x;
    const int tiles = gridDim.x;
    const long long seg = blockIdx.y;
    for (int i = threadIdx.x; i < BS_RADIX; i += blockDim.x) {
        counts[i] = 0u;
    }
    __syncthreads();
    const unsigned* keys = keys_in + seg * n;
    const int begin = tile * BS_TILE;
    const int end = min(n, begin + BS_TILE);
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        atomicAdd(&counts[digit_of(keys[i], shift)], 1u);
    }
    __syncthreads();
    unsigned* out = hist + seg * BS_RADIX * tiles;
    for (int dg = threadIdx.x; dg < BS_RADIX; dg += blockDim.x) {
        out[(long long)dg * tiles + tile] = counts[dg];
    }
}

// In-place exclusive scan of hist[seg, 0 .. len), len = 256 * tiles, in chunks of the block
// size with a running carry. Launch: grid (segs), BS_SCAN_THREADS threads.
extern "C" __global__ void bucket_sort_scan(unsigned* hist, int len) {
    __shared__ unsigned warp_totals[32];
    __shared__ unsigned carry;
    unsigned* h = hist + (long long)blockIdx.x * len;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    if (threadIdx.x == 0) {
        carry = 0u;
    }
    __syncthreads();
    for (int base = 0; base < len; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const unsigned x = i < len ? h[i] : 0u;
        // inclusive scan inside the warp
        unsigned inc = x;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned y = __shfl_up_sync(FULL_MASK, inc, o);
            if (lane >= o) {
                inc += y;
            }
        }
        if (lane == 31) {
            warp_totals[warp] = inc;
        }
        __syncthreads();
        if (warp == 0) {
            unsigned t = lane < n_warps ? warp_totals[lane] : 0u;
            unsigned tinc = t;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned y = __shfl_up_sync(FULL_MASK, tinc, o);
                if (lane >= o) {
                    tinc += y;
                }
            }
            if (lane < n_warps) {
                warp_totals[lane] = tinc - t;  // exclusive prefix of the warp totals
            }
        }
        __syncthreads();
        const unsigned c = carry;
        if (i < len) {
            h[i] = c + warp_totals[warp] + inc - x;
        }
        __syncthreads();
        if (threadIdx.x == blockDim.x - 1) {
            carry = c + warp_totals[warp] + inc;
        }
        __syncthreads();
    }
}

// Stable scatter. Each block walks its tile in rounds of BS_THREADS keys; inside a round, a key's
// rank among equal digits is (equal digits in earlier warps) + (equal digits in earlier lanes of
// its warp, from __match_any_sync). `run_start` carries each digit's next free slot across
// rounds. vals_in null: the value is the key's index (its position, on the first pass).
// Launch: grid (tiles, segs), BS_THREADS threads.
extern "C" __global__ void bucket_sort_scatter(const unsigned* keys_in, const unsigned* vals_in,
                                               unsigned* keys_out, unsigned* vals_out,
                                               const unsigned* offsets, int n, int shift) {
    __shared__ unsigned run_start[BS_RADIX];
    __shared__ unsigned warp_counts[BS_WARPS][BS_RADIX];
    const int tile = blockIdx.x;
    const int tiles = gridDim.x;
    const long long seg = blockIdx.y;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const unsigned* keys = keys_in + seg * n;
    const unsigned* vals = vals_in != nullptr ? vals_in + seg * n : nullptr;
    unsigned* kout = keys_out + seg * n;
    unsigned* vout = vals_out + seg * n;
    for (int dg = threadIdx.x; dg < BS_RADIX; dg += BS_THREADS) {
        run_start[dg] = offsets[seg * BS_RADIX * tiles + (long long)dg * tiles + tile];
    }
    const int begin = tile * BS_TILE;
    const int end = min(n, begin + BS_TILE);
    for (int base = begin; base < end; base += BS_THREADS) {
        for (int dg = threadIdx.x; dg < BS_RADIX; dg += BS_THREADS) {
#pragma unroll
            for (int w = 0; w < BS_WARPS; ++w) {
                warp_counts[w][dg] = 0u;
            }
        }
        __syncthreads();
        const int i = base + threadIdx.x;
        const bool valid = i < end;
        const unsigned key = valid ? keys[i] : 0u;
        // Invalid lanes get a digit outside [0, 256) so they never match a valid key.
        const unsigned dg = valid ? digit_of(key, shift) : (unsigned)BS_RADIX;
        const unsigned peers = __match_any_sync(FULL_MASK, dg);
        const unsigned lower = peers & ((1u << lane) - 1u);
        const unsigned rank_in_warp = __popc(lower);
        if (valid && lower == 0u) {
            warp_counts[warp][dg] = __popc(peers);
        }
        __syncthreads();
        if (valid) {
            unsigned slot = run_start[dg] + rank_in_warp;
            for (int w = 0; w < warp; ++w) {
                slot += warp_counts[w][dg];
            }
            kout[slot] = key;
            vout[slot] = vals != nullptr ? vals[i] : (unsigned)i;
        }
        __syncthreads();
        for (int d2 = threadIdx.x; d2 < BS_RADIX; d2 += BS_THREADS) {
            unsigned total = 0u;
#pragma unroll
            for (int w = 0; w < BS_WARPS; ++w) {
                total += warp_counts[w][d2];
            }
            run_start[d2] += total;
        }
        __syncthreads();
    }
}

// inv[seg, perm[seg, slot]] = slot: where each position went. Launch: 1-D, grid-stride over
// segs * n.
extern "C" __global__ void bucket_sort_invert(const unsigned* perm, unsigned* inv, int n,
                                              long long segs) {
    GRID_STRIDE_LOOP(idx, segs * n) {
        const long long seg = idx / n;
        const unsigned slot = (unsigned)(idx - seg * n);
        const unsigned pos = perm[idx];
        if (pos < (unsigned)n) {
            inv[seg * n + pos] = slot;
        }
    }
}

// keys[seg, p] = buckets[seg, p], or `masked_key` (= the bucket count) where key_valid marks
// position p as padding; seg = head * n_rounds + round. Sorting these keys puts padding
// positions after every real one, as the CPU reference does, so a padding position never moves
// a real one to another chunk. key_valid is [n] (valid_per_head = 0) or [n_heads, n]
// (valid_per_head = 1). Launch: 1-D, grid-stride over segs * n.
extern "C" __global__ void bucket_sort_mask_keys(const unsigned* buckets,
                                                 const unsigned char* key_valid,
                                                 int valid_per_head, unsigned* keys, int n,
                                                 int n_rounds, long long segs,
                                                 unsigned masked_key) {
    GRID_STRIDE_LOOP(idx, segs * n) {
        const long long seg = idx / n;
        const long long pos = idx - seg * n;
        const long long head = seg / n_rounds;
        const unsigned char valid = key_valid[(valid_per_head ? head * n : 0) + pos];
        keys[idx] = valid != 0 ? buckets[idx] : masked_key;
    }
}
