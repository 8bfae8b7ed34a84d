// Row-wise helpers of the device model: strided 2-D copies, bias, column sums, in-place ReLU and
// its mask, and inverted dropout that replays the CPU generator bit for bit.
//
// Every result is bit-identical to the host twins in `gpu/ops/rows.rs` (`host` module): products
// and sums use the explicit round-to-nearest intrinsics, so NVRTC cannot contract them into
// fused multiply-adds, and the column sums add in an order fixed by `(rows, cols)` alone.
//
// Launch of the 2-D kernels (copy2d, add_bias, the column sums): block (tx, ty), tx a multiple
// of 32 over columns, ty over rows (or parts); grid-stride in both dimensions, so any grid
// covers any extent. Element (r, c) of a contiguous `rows x cols` matrix is at `r * cols + c`.

// dst[d_off + r*d_ld + c] = (accumulate ? dst[..] + alpha*src[..] : alpha*src[..]) for
// r < rows, c < cols, src element at s_off + r*s_ld + c. src and dst must not overlap.
// src is bf16 when src_bf16 != 0, dst when dst_bf16 != 0 (else f32; offsets and leading
// dimensions are in elements either way). The arithmetic is f32 on widened values; a bf16 dst
// stores the f32 result rounded to nearest even (float_to_bf16_bits, as the host twin).
extern "C" __global__ void rows_copy2d(const void* src, long long s_off, long long s_ld,
                                       void* dst, long long d_off, long long d_ld,
                                       long long rows, long long cols, float alpha,
                                       int accumulate, int src_bf16, int dst_bf16) {
    for (long long r = (long long)blockIdx.y * blockDim.y + threadIdx.y; r < rows;
         r += (long long)blockDim.y * gridDim.y) {
        const void* s = act_offset(src, s_off + r * s_ld, src_bf16);
        void* d = act_offset_mut(dst, d_off + r * d_ld, dst_bf16);
        for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < cols;
             c += (long long)blockDim.x * gridDim.x) {
            const float v = __fmul_rn(alpha, load_act(s, c, src_bf16));
            store_act(d, c, dst_bf16, accumulate ? __fadd_rn(load_act(d, c, dst_bf16), v) : v);
        }
    }
}

// x[r*cols + c] += bias[c] for r < rows, c < cols.
extern "C" __global__ void rows_add_bias(float* x, const float* bias, long long rows,
                                         long long cols) {
    for (long long r = (long long)blockIdx.y * blockDim.y + threadIdx.y; r < rows;
         r += (long long)blockDim.y * gridDim.y) {
        float* xr = x + r * cols;
        for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < cols;
             c += (long long)blockDim.x * gridDim.x) {
            xr[c] = __fadd_rn(xr[c], bias[c]);
        }
    }
}

// Pass 1 of the column sums: parts[p*cols + c] = sum over r in [p*rows_per_part,
// min(rows, (p+1)*rows_per_part)) of x[r*cols + c], in f64, rows in increasing order, starting
// from 0. The y dimension walks the parts (n_parts = ceil(rows / rows_per_part)).
extern "C" __global__ void rows_column_sums_parts(const float* x, double* parts, long long rows,
                                                  long long cols, long long rows_per_part) {
    const long long n_parts = (rows + rows_per_part - 1) / rows_per_part;
    for (long long p = (long long)blockIdx.y * blockDim.y + threadIdx.y; p < n_parts;
         p += (long long)blockDim.y * gridDim.y) {
        const long long r0 = p * rows_per_part;
        const long long r1 = min(rows, r0 + rows_per_part);
        for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < cols;
             c += (long long)blockDim.x * gridDim.x) {
            double s = 0.0;
            for (long long r = r0; r < r1; ++r) {
                s = __dadd_rn(s, (double)x[r * cols + c]);
            }
            parts[p * cols + c] = s;
        }
    }
}

// Pass 2: out[c] = (accumulate ? out[c] + t : t), t = f32(sum over p < n_parts of
// parts[p*cols + c]) in f64, parts in increasing order, starting from 0. 1-D grid over columns.
// (n_parts may be 0: then parts is not read and t = 0.)
extern "C" __global__ void rows_column_sums_finish(const double* parts, float* out, int n_parts,
                                                   long long cols, int accumulate) {
    GRID_STRIDE_LOOP(c, cols) {
        double s = 0.0;
        for (int p = 0; p < n_parts; ++p) {
            s = __dadd_rn(s, parts[(long long)p * cols + c]);
        }
        const float t = (float)s;
        out[c] = accumulate ? __fadd_rn(out[c], t) : t;
    }
}

// x[i] = x[i] > 0 ? x[i] : 0 for i < n (NaN and -0 become +0).
extern "C" __global__ void rows_relu(float* x, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float v = x[i];
        x[i] = v > 0.0f ? v : 0.0f;
    }
}

// g[i] = h[i] > 0 ? g[i] : 0 for i < n (h and g must not overlap).
extern "C" __global__ void rows_relu_mask(const float* h, float* g, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        if (!(h[i] > 0.0f)) {
            g[i] = 0.0f;
        }
    }
}

// ----- dropout: the CPU generator (engine/src/rng.rs), replayed -------------------------------

__device__ __forceinline__ unsigned long long rows_splitmix64(unsigned long long* x) {
    *x += 0x9E3779B97F4A7C15ull;
    unsigned long long z = *x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ unsigned long long rows_rotl(unsigned long long x, int k) {
    return (x << k) | (x >> (64 - k));
}

// `Rng::next_u64`.
__device__ __forceinline__ unsigned long long rows_next_u64(unsigned long long s[4]) {
    const unsigned long long result = rows_rotl(s[0] + s[3], 23) + s[0];
    const unsigned long long t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rows_rotl(s[3], 45);
    return result;
}

// Inverted dropout of a contiguous `rows x cols` block, in place: row r draws from the generator
// `base.fork(first_row + r)` (base words s0, s3) one `uniform()` per column, in column order;
// x = u < rate ? 0 : x * scale, scale = 1 / (1 - rate) computed in f32 on the host.
//
// One warp per 32 rows: lane l generates row (32*w + l)'s draws for a tile of 32 columns and
// keeps the 32 decisions as bits; the warp then walks the tile's 32 rows, lane l handling
// column c0 + l, so loads and stores are coalesced. Launch: 1-D blocks of whole warps, grid
// covering ceil(rows / 32) warps. Every lane of a live warp reaches every shuffle.
extern "C" __global__ void rows_dropout(float* x, long long rows, long long cols,
                                        unsigned long long first_row, float rate, float scale,
                                        unsigned long long s0, unsigned long long s3) {
    const int lane = threadIdx.x & 31;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long row0 = warp * 32;
    if (row0 >= rows) {
        return;  // the whole warp leaves together
    }
    const long long my_row = row0 + lane;
    // fork(label): x = s0 ^ label * C ^ s3; Rng::new(splitmix64(&x)).
    unsigned long long seed_src =
        s0 ^ ((first_row + (unsigned long long)my_row) * 0xD1B54A32D192ED03ull) ^ s3;
    unsigned long long seed = rows_splitmix64(&seed_src);
    unsigned long long s[4];
    s[0] = rows_splitmix64(&seed);
    s[1] = rows_splitmix64(&seed);
    s[2] = rows_splitmix64(&seed);
    s[3] = rows_splitmix64(&seed);
    const int rows_here = (int)min(32LL, rows - row0);

    for (long long c0 = 0; c0 < cols; c0 += 32) {
        const int width = (int)min(32LL, cols - c0);
        unsigned int dropped = 0;
        for (int j = 0; j < width; ++j) {
            const float u = (float)(rows_next_u64(s) >> 40) * (1.0f / 16777216.0f);
            dropped |= (u < rate ? 1u : 0u) << j;
        }
        for (int j = 0; j < rows_here; ++j) {
            const unsigned int bits = __shfl_sync(FULL_MASK, dropped, j);
            if (lane < width) {
                float* p = x + (row0 + j) * cols + c0 + lane;
                *p = ((bits >> lane) & 1u) ? 0.0f : __fmul_rn(*p, scale);
            }
        }
    }
}
