// Angular LSH hashing: per round r, h_r(x) = argmax([x R_r ; -x R_r]) in [0, b).
// Factorised buckets b = b1 * b2 use two rotations of b1/2 and b2/2 columns: h = h1 + b1 * h2.
//
// Layouts:
//   x        [n_heads, n, d]            rows to hash (the shared qk vectors); bf16 when
//                                       x_bf16 != 0, else f32 (widened on load: the
//                                       projections are f32 sums either way)
//   rot      [n_rounds, d, cols] per head, cols = b1/2 + b2/2 (b2 = 1: one factor, cols = b1/2);
//            the first b1/2 columns serve factor 1, the next b2/2 factor 2. Head h reads
//            rot + h * rot_head_stride (0: every head shares the rotations).
//   buckets  [n_heads, n_rounds, n]     out, the segment layout bucket_sort.cu sorts.
//
// Ties resolve to the lowest index of [xR ; -xR] (the CPU's "first on ties"). Note the projections
// are summed in a different order than the CPU's gemm, so a near-tie may hash differently
// across backends; parity tests should pass rotations and compare buckets with that in mind.

#define LSH_NO_INDEX 0x7fffffff

// Keeps (best_v, best_i) the larger value, the lower index on equal values; NaN never wins.
__device__ __forceinline__ void argmax_keep(float& best_v, int& best_i, float v, int i) {
    if (v > best_v || (v == best_v && i < best_i)) {
        best_v = v;
        best_i = i;
    }
}

// argmax over [p ; -p] of one factor, p = x . rot[:, offset + c] for c < half, computed by one
// warp (xr: the row, bf16 when x_bf16). Returns an index in [0, 2 * half); 0 when half == 0.
__device__ int factor_argmax(const void* xr, int x_bf16, const float* rot, int d, int cols,
                             int offset, int half) {
    float best_v = -INFINITY;
    int best_i = LSH_NO_INDEX;
    for (int c = threadIdx.x; c < half; c += 32) {
        float p = 0.0f;
        for (int t = 0; t < d; ++t) {
            p += load_act(xr, t, x_bf16) * rot[(long long)t * cols + offset + c];
        }
        argmax_keep(best_v, best_i, p, c);
        argmax_keep(best_v, best_i, -p, half + c);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(FULL_MASK, best_v, o);
        const int i = __shfl_xor_sync(FULL_MASK, best_i, o);
        argmax_keep(best_v, best_i, v, i);
    }
    return best_i == LSH_NO_INDEX ? 0 : best_i;
}

// Launch: block (32, W): one warp per (head, position); grid (ceil(n / W), n_heads).
extern "C" __global__ void lsh_hash(const void* x, const float* rot, unsigned* buckets,
                                    int n_heads, int n, int d, int n_rounds, int b1, int b2,
                                    long long rot_head_stride, int x_bf16) {
    const int h = blockIdx.y;
    const long long pos = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (h >= n_heads || pos >= n) {
        return;
    }
    const int half1 = b1 / 2;
    const int half2 = b2 > 1 ? b2 / 2 : 0;
    const int cols = half1 + half2;
    const void* xr = act_offset(x, ((long long)h * n + pos) * d, x_bf16);
    const float* rot_h = rot + (long long)h * rot_head_stride;
    for (int r = 0; r < n_rounds; ++r) {
        const float* rot_r = rot_h + (long long)r * d * cols;
        const int h1 = factor_argmax(xr, x_bf16, rot_r, d, cols, 0, half1);
        const int h2 = factor_argmax(xr, x_bf16, rot_r, d, cols, half1, half2);
        if (threadIdx.x == 0) {
            buckets[((long long)h * n_rounds + r) * n + pos] = (unsigned)h1 + (unsigned)b1 * (unsigned)h2;
        }
    }
}
