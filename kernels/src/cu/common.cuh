// Shared helpers, prepended (as text, with a #line marker) to every kernel family before NVRTC
// compiles it. Only device code; no kernels here.
//
// Conventions of every family:
//   * f32 tensors, row-major; element counts are `long long`, dimensions `int`.
//   * A kernel never reads or writes outside the extents it is given; the host launch wrappers
//     check shapes and launch geometry before launching.
//   * Reductions are written so that a given launch geometry always adds in the same order:
//     results are bit-for-bit reproducible run to run (no floating-point atomics unless a
//     kernel's comment says otherwise).

#define FULL_MASK 0xffffffffu

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// Grid-stride loop over [0, n).
#define GRID_STRIDE_LOOP(i, n)                                                       \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);    \
         i += (long long)blockDim.x * gridDim.x)

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        x += __shfl_xor_sync(FULL_MASK, x, offset);
    }
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, offset));
    }
    return x;
}

// Sum over a 1-D block of `blockDim.x` threads (a multiple of 32, at most 1024). Every thread
// gets the total. `scratch` holds at least 32 floats of shared memory; the function begins and
// ends with a barrier so it may be called repeatedly with the same scratch.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    x = warp_sum(x);
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = x;
    }
    __syncthreads();
    float total = lane < n_warps ? scratch[lane] : 0.0f;
    total = warp_sum(total);
    return total;
}

// log(exp(a) + exp(b)) with -inf handled (both -inf gives -inf).
__device__ __forceinline__ float log_add_exp(float a, float b) {
    const float m = fmaxf(a, b);
    if (m == -INFINITY) {
        return -INFINITY;
    }
    return m + logf(expf(a - m) + expf(b - m));
}
