// Token embedding (gather forward, scatter-add backward) and axial position embedding
// (concatenated per-axis tables, two axes).
//
// Axial convention: position p of a table of shape a1 x a2 has coordinates
// (i1, i2) = (p / a2, p % a2); its embedding is concat(e1[i1, 0:d1], e2[i2, 0:d2]) with
// d1 + d2 = dim. Any length n <= a1 * a2 is served (the host checks it).
//
// The backward passes are deterministic (no floating-point atomics): each output row is summed
// by one block in position order.

// out[i, :] (+)= table[tokens[i], :]; a token >= vocab gives a zero row (the host validates
// tokens; this only keeps the kernel in bounds). Launch: 1-D, grid-stride over n_tokens * dim.
extern "C" __global__ void embedding_fwd(const unsigned* tokens, const float* table, float* out,
                                         long long n_tokens, int dim, int vocab, int accumulate) {
    GRID_STRIDE_LOOP(idx, n_tokens * dim) {
        const long long i = idx / dim;
        const int c = (int)(idx - i * dim);
        const unsigned t = tokens[i];
        const float v = t < (unsigned)vocab ? table[(long long)t * dim + c] : 0.0f;
        out[idx] = accumulate ? out[idx] + v : v;
    }
}

// dtable[v, c] (+)= sum over i with tokens[i] == v of dout[i, c], summed in order of i.
// Launch: grid (vocab, ceil(dim / blockDim.x)), 1-D blocks of a multiple of 32 threads (<= 1024).
// Every block scans all tokens (a ballot per warp finds the matches), so the cost is
// O(vocab * n_tokens / blockDim.x) token reads: right for the byte-level vocabulary (256); a
// large vocabulary wants a sort-based backward instead.
extern "C" __global__ void embedding_bwd(const unsigned* tokens, const float* dout, float* dtable,
                                         long long n_tokens, int dim, int accumulate) {
    __shared__ unsigned match_bits[32];
    const unsigned v = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    float acc = 0.0f;
    for (long long base = 0; base < n_tokens; base += blockDim.x) {
        const long long i = base + threadIdx.x;
        const bool hit = i < n_tokens && tokens[i] == v;
        const unsigned bits = __ballot_sync(FULL_MASK, hit);
        if (lane == 0) {
            match_bits[warp] = bits;
        }
        __syncthreads();
        if (c < dim) {
            for (int w = 0; w < n_warps; ++w) {
                unsigned b = match_bits[w];
                while (b != 0u) {
                    const int j = __ffs(b) - 1;
                    b &= b - 1u;
                    acc += dout[(base + w * 32 + j) * dim + c];
                }
            }
        }
        __syncthreads();
    }
    if (c < dim) {
        float* dst = dtable + (long long)v * dim + c;
        *dst = accumulate ? *dst + acc : acc;
    }
}

// out[i, :] (+)= concat(e1[p / a2, :], e2[p % a2, :]), p = first + i, for i < n.
// Launch: 1-D, grid-stride over n * (d1 + d2).
extern "C" __global__ void axial_pos_fwd(const float* e1, const float* e2, float* out,
                                         long long first, long long n, int a2, int d1, int d2,
                                         int accumulate) {
    const int dim = d1 + d2;
    GRID_STRIDE_LOOP(idx, n * dim) {
        const long long row = idx / dim;
        const int c = (int)(idx - row * dim);
        const long long p = first + row;
        const long long i1 = p / a2;
        const long long i2 = p - i1 * a2;
        const float v = c < d1 ? e1[i1 * d1 + c] : e2[i2 * d2 + (c - d1)];
        out[idx] = accumulate ? out[idx] + v : v;
    }
}

// de1[i1, c] (+)= sum_{i2} dout[i1 * a2 + i2, c] over positions < n.
// Launch: grid (a1, ceil(d1 / blockDim.x)), 1-D blocks.
extern "C" __global__ void axial_pos_bwd_first(const float* dout, float* de1, long long n, int a2,
                                               int d1, int d2, int accumulate) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= d1) {
        return;
    }
    const int dim = d1 + d2;
    const long long i1 = blockIdx.x;
    float s = 0.0f;
    for (long long i2 = 0; i2 < a2; ++i2) {
        const long long p = i1 * a2 + i2;
        if (p >= n) {
            break;
        }
        s += dout[p * dim + c];
    }
    float* dst = de1 + i1 * d1 + c;
    *dst = accumulate ? *dst + s : s;
}

// de2[i2, c] (+)= sum_{i1} dout[i1 * a2 + i2, d1 + c] over positions < n.
// Launch: grid (a2, ceil(d2 / blockDim.x)), 1-D blocks.
extern "C" __global__ void axial_pos_bwd_second(const float* dout, float* de2, long long n,
                                                int a1, int a2, int d1, int d2, int accumulate) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= d2) {
        return;
    }
    const int dim = d1 + d2;
    const long long i2 = blockIdx.x;
    float s = 0.0f;
    for (long long i1 = 0; i1 < a1; ++i1) {
        const long long p = i1 * a2 + i2;
        if (p >= n) {
            break;
        }
        s += dout[p * dim + d1 + c];
    }
    float* dst = de2 + i2 * d2 + c;
    *dst = accumulate ? *dst + s : s;
}
