// Shared helpers, prepended (as text, with a #line marker) to every kernel family before NVRTC
// compiles it. Only device code; no kernels here.
//
// Conventions of every family:
//   * f32 tensors, row-major; element counts are `long long`, dimensions `int`. Activations a
//     kernel reads may instead be stored as bf16 where its comment says so (an `act_bf16` flag
//     beside `const void*` pointers): they are widened to f32 on load (exact) and every sum is
//     formed in f32; outputs stay f32 unless a kernel's comment says otherwise.
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

// ---------------------------------------------------------------------------------------------
// Activation storage: f32, or bf16 (the upper 16 bits of an f32). Plain bit manipulation, so no
// family needs cuda_bf16.h for it.
// ---------------------------------------------------------------------------------------------

// bf16 -> f32, exact.
__device__ __forceinline__ float bf16_bits_to_float(unsigned short bits) {
    return __uint_as_float((unsigned)bits << 16);
}

// f32 -> bf16, round to nearest even, exactly as the host's `half::bf16::from_f32`: a NaN keeps
// its upper bits with the quiet bit set; otherwise the upper half is rounded up when the round
// bit is set and the value is not a tie with an even upper half (inf stays inf, a finite value
// past the largest bf16 rounds to inf).
__device__ __forceinline__ unsigned short float_to_bf16_bits(float f) {
    const unsigned x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((x >> 16) | 0x0040u);
    }
    const unsigned round_bit = 0x8000u;
    if ((x & round_bit) != 0u && (x & (3u * round_bit - 1u)) != 0u) {
        return (unsigned short)((x >> 16) + 1u);
    }
    return (unsigned short)(x >> 16);
}

// Bytes of one activation element.
__device__ __forceinline__ long long act_size(int bf16) {
    return bf16 ? 2 : 4;
}

// The address of element i of an activation buffer (f32 or bf16).
__device__ __forceinline__ const void* act_offset(const void* base, long long i, int bf16) {
    return (const void*)((const char*)base + i * act_size(bf16));
}

__device__ __forceinline__ void* act_offset_mut(void* base, long long i, int bf16) {
    return (void*)((char*)base + i * act_size(bf16));
}

// Element i of an activation buffer, widened to f32.
__device__ __forceinline__ float load_act(const void* base, long long i, int bf16) {
    return bf16 ? bf16_bits_to_float(((const unsigned short*)base)[i]) : ((const float*)base)[i];
}

// Stores v at element i of an activation buffer (rounded to nearest even when bf16).
__device__ __forceinline__ void store_act(void* base, long long i, int bf16, float v) {
    if (bf16) {
        ((unsigned short*)base)[i] = float_to_bf16_bits(v);
    } else {
        ((float*)base)[i] = v;
    }
}
