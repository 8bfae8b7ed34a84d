// Attention of new queries against cached keys and values — the decoding step of every
// attention kind and its prefill, a block of queries at a time — each query with its own keys:
// per (head, round) a list of positions (LSH) or per query a range (local, exact). The CUDA
// twin of `reformer_lsh::cached_attention` (lsh/src/cached_attention.rs): the same scores
// (scale * q.k with the keys as cached — the decoder caches unit keys for shared-QK attention;
// the causal and self masks by position), one
// softmax per round, rounds combined by logsumexp (in double, as the CPU combines them).
//
// Layout: q [queries, heads*d] and the caches [cache_rows, heads*d] are f32 or bf16 rows (one
// flag, act_bf16, widened on load); position p lives in cache row p % cache_rows. lists:
// [heads, rounds, queries, width] positions, 0xffffffff where a list is shorter (use_lists = 1);
// otherwise ranges: [queries, 2] = (start, end), one round. out: [queries, heads*d], f32.
//
// Launch: grid (queries, heads), block (32 * CA_WARPS); d <= CA_MAX_D. Warp w scores keys
// w, w + CA_WARPS, ... (lane l holds dims l, l + 32, ...), each warp with its own online softmax;
// the warps' states are merged in shared memory at the end of a round.

#define CA_WARPS 4
#define CA_MAX_D 128
#define CA_DPL (CA_MAX_D / 32)
#define CA_SELF_SCORE (-1e5f)
#define CA_NO_KEY 0xffffffffu

__device__ __forceinline__ float ca_load(const void* p, long long i, int bf16) {
    return bf16 ? bf16_bits_to_float(((const unsigned short*)p)[i]) : ((const float*)p)[i];
}

extern "C" __global__ void cached_attention(const void* q, const void* k, const void* v,
                                            int act_bf16, const unsigned int* q_pos,
                                            const unsigned int* lists, const unsigned int* ranges,
                                            int use_lists, int queries, int heads, int d,
                                            long long cache_rows, int rounds, int width,
                                            float scale, int causal, int self_penalty,
                                            float* out) {
    const int i = blockIdx.x;
    const int h = blockIdx.y;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (i >= queries || h >= heads || d > CA_MAX_D) {
        return;
    }
    const long long w = (long long)heads * d;
    __shared__ float s_max[CA_WARPS];
    __shared__ float s_sum[CA_WARPS];
    __shared__ float s_acc[CA_WARPS][CA_MAX_D];
    __shared__ float s_out[CA_MAX_D];
    float qv[CA_DPL];
#pragma unroll
    for (int t = 0; t < CA_DPL; ++t) {
        const int c = lane + 32 * t;
        qv[t] = c < d ? ca_load(q, i * w + (long long)h * d + c, act_bf16) : 0.0f;
    }
    const unsigned int qp = q_pos[i];
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        s_out[c] = 0.0f;
    }
    double z_acc = -INFINITY;
    for (int r = 0; r < rounds; ++r) {
        const unsigned int* list = nullptr;
        unsigned int start = 0;
        int n;
        if (use_lists) {
            list = lists + (((long long)h * rounds + r) * queries + i) * width;
            n = width;
        } else {
            start = ranges[2 * i];
            n = (int)(ranges[2 * i + 1] - start);
        }
        float m = -INFINITY;
        float sum = 0.0f;
        float acc[CA_DPL];
#pragma unroll
        for (int t = 0; t < CA_DPL; ++t) {
            acc[t] = 0.0f;
        }
        // j is the same for every lane of a warp: the branches below are warp-uniform.
        for (int j = warp; j < n; j += CA_WARPS) {
            const unsigned int p = use_lists ? list[j] : start + (unsigned int)j;
            if (p == CA_NO_KEY || (causal && p > qp)) {
                continue;
            }
            const long long row = (long long)(p % (unsigned long long)cache_rows) * w +
                                  (long long)h * d;
            float score;
            if (self_penalty && p == qp) {
                score = CA_SELF_SCORE;
            } else {
                float dq = 0.0f;
#pragma unroll
                for (int t = 0; t < CA_DPL; ++t) {
                    const int c = lane + 32 * t;
                    if (c < d) {
                        dq += qv[t] * ca_load(k, row + c, act_bf16);
                    }
                }
                score = warp_sum(dq) * scale;
            }
            const float nm = fmaxf(m, score);
            const float corr = expf(m - nm);
            const float e = expf(score - nm);
            sum = sum * corr + e;
#pragma unroll
            for (int t = 0; t < CA_DPL; ++t) {
                const int c = lane + 32 * t;
                if (c < d) {
                    acc[t] = acc[t] * corr + e * ca_load(v, row + c, act_bf16);
                }
            }
            m = nm;
        }
        if (lane == 0) {
            s_max[warp] = m;
            s_sum[warp] = sum;
        }
#pragma unroll
        for (int t = 0; t < CA_DPL; ++t) {
            const int c = lane + 32 * t;
            if (c < d) {
                s_acc[warp][c] = acc[t];
            }
        }
        __syncthreads();
        float mx = -INFINITY;
        for (int u = 0; u < CA_WARPS; ++u) {
            mx = fmaxf(mx, s_max[u]);
        }
        if (mx != -INFINITY) {
            float total = 0.0f;
            for (int u = 0; u < CA_WARPS; ++u) {
                if (s_max[u] != -INFINITY) {
                    total += s_sum[u] * expf(s_max[u] - mx);
                }
            }
            const double z = (double)(mx + logf(total));
            const double top = fmax(z_acc, z);
            const double z_new = top + log(exp(z_acc - top) + exp(z - top));
            const float wa = (float)exp(z_acc - z_new);
            const float wb = (float)exp(z - z_new);
            for (int c = threadIdx.x; c < d; c += blockDim.x) {
                float o = 0.0f;
                for (int u = 0; u < CA_WARPS; ++u) {
                    if (s_max[u] != -INFINITY) {
                        o += s_acc[u][c] * expf(s_max[u] - mx);
                    }
                }
                s_out[c] = wa * s_out[c] + wb * (o / total);
            }
            z_acc = z_new;
        }
        __syncthreads();
    }
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        out[i * w + (long long)h * d + c] = s_out[c];
    }
}
