// The attention tile engine shared by lsh_attention.cu, local_attention.cu and
// exact_attention.cu (prepended as text after common.cuh). It is the flash-attention scheme:
// a block of query rows walks tiles of ATTN_TILE keys with an online softmax (forward), or
// recomputes probabilities from the stored logsumexp (backward); no score matrix is stored.
//
// Rows are addressed by *slot*; a slot maps to an original *position* through `perm` (LSH: the
// bucket-sorted order of one (head, round)) or is the position itself (perm == null). A slot
// >= n is padding (the last chunk of a length that is not a multiple of the chunk). Masks are
// decided by positions:
//   * key excluded: padding slot, or key_valid[pos] == 0 (padding token);
//   * causal: key position > query position excluded;
//   * self_penalty: key position == query position scores SELF_SCORE (finite: a token attends
//     to itself only when nothing else is allowed); its gradient to q and k is zero (the score
//     is a constant), its probability still weighs v.
// Scores: s = scale * (q . k), with k = key / sqrt(|key|^2 + KEY_NORM_EPS) when unit_keys
// (shared-QK attention: q is the raw qk row, k its unit vector; scale 1).
//
// Thread layout: block (32, ATTN_WARPS). In the forward and dq passes each warp owns
// ATTN_QPW_FWD / ATTN_QPW_BWD query rows, and within a key tile lane j scores key j (one full
// dot product per lane, conflict-free thanks to the padded row stride); probabilities are then
// broadcast with shuffles and lane l accumulates output dims l, l + 32, ... (ATTN_DPL of them).
// The dk/dv pass is the transpose: each warp owns ATTN_QPW_BWD key rows and lane i scores
// query i of a query tile.
//
// Storage: q, k, v and the backward's dout are f32 or bf16 rows (one flag, AttnProblem.act_bf16,
// for all four), widened to f32 as warp_load_row stages them in shared memory; everything after
// the load — scores, softmax, sums — is f32, and the outputs (lse, dq, dk, dv) are f32; the
// forward's out is f32 or, for local and exact attention, optionally bf16 (out_bf16: rounded
// once as it is stored, so the model needs no f32 copy of it).
// Rows are addressed by element index (act_offset scales by the element size).
//
// Head dimension d <= ATTN_MAX_D (the host checks; a larger d makes the kernels return at once).
// Shared memory is static and below 48 KiB for every pass.

#define ATTN_MAX_D 128
#define ATTN_DPL (ATTN_MAX_D / 32)
#define ATTN_WARPS 4
#define ATTN_TILE 32
#define ATTN_QPW_FWD 4
#define ATTN_QPW_BWD 2
#define ATTN_ROWS_FWD (ATTN_WARPS * ATTN_QPW_FWD)
#define ATTN_ROWS_BWD (ATTN_WARPS * ATTN_QPW_BWD)
#define SELF_SCORE (-1e5f)
#define KEY_NORM_EPS 1e-12f

// ---------------------------------------------------------------------------------------------
// Logsumexps by (round, position). Exact and local attention have one round; LSH attention runs
// one launch per hash round and keeps every round's z_r (layout [n_heads, n_rounds, n]: this
// head's round r of position p at lse[r * round_stride + p]).
//
// The rounds of LSH attention together form one softmax over every (round, key) pair a query
// saw, with total logsumexp Z = logsumexp_r z_r; round r's probabilities are
// p = w_r exp(s - z_r), w_r = exp(z_r - Z). Z itself is never formed: a query that sees only
// itself has z_r = -1e5 in every round, where f32 cannot hold the ln(n_rounds) that Z adds (the
// spacing of floats near 1e5 is 0.0078: up to 0.4% error in every weight). The weights are
// taken relative to the rounds' maximum instead, w_r = exp(z_r - m) / sum_r' exp(z_r' - m),
// m = max_r' z_r', which is accurate to a few ulps (the CPU reference does this in f64).
// ---------------------------------------------------------------------------------------------
struct RoundLse {
    const float* lse;        // this head's logsumexps (round 0)
    long long round_stride;  // distance between rounds (n for LSH; unused with one round)
    int n_rounds;
    int round;               // the round this launch handles
};

__device__ __forceinline__ RoundLse single_round_lse(const float* lse) {
    RoundLse L;
    L.lse = lse;
    L.round_stride = 0;
    L.n_rounds = 1;
    L.round = 0;
    return L;
}

// Folding a new round into a running result: the running output is normalised over rounds
// [0, round) and the new round has logsumexp z. Returns the weights of the running output (*a)
// and of the new round's normalised output (*b); both 0 when no round allowed any key.
__device__ __forceinline__ void fold_weights(const float* lse, long long round_stride, int round,
                                             int pos, float z, float* a, float* b) {
    float m = z;
    for (int r = 0; r < round; ++r) {
        m = fmaxf(m, lse[(long long)r * round_stride + pos]);
    }
    float s_prev = 0.0f;
    float e = 0.0f;
    if (m != -INFINITY) {
        for (int r = 0; r < round; ++r) {
            const float zr = lse[(long long)r * round_stride + pos];
            s_prev += zr == -INFINITY ? 0.0f : expf(zr - m);
        }
        e = z == -INFINITY ? 0.0f : expf(z - m);
    }
    const float total = s_prev + e;
    *a = total > 0.0f ? s_prev / total : 0.0f;
    *b = total > 0.0f ? e / total : 0.0f;
}

// The logsumexp z of query `pos` in round L.round and the weight w of that round's
// probabilities (p = w exp(s - z)); w = 0 when the round allowed the query no key.
__device__ __forceinline__ void query_norm(const RoundLse& L, int pos, float* z, float* w) {
    const float zq = L.lse[(long long)L.round * L.round_stride + pos];
    *z = zq;
    if (zq == -INFINITY) {
        *w = 0.0f;
        return;
    }
    if (L.n_rounds <= 1) {
        *w = 1.0f;
        return;
    }
    float m = zq;
    for (int r = 0; r < L.n_rounds; ++r) {
        m = fmaxf(m, L.lse[(long long)r * L.round_stride + pos]);
    }
    float s = 0.0f;
    for (int r = 0; r < L.n_rounds; ++r) {
        const float zr = L.lse[(long long)r * L.round_stride + pos];
        s += zr == -INFINITY ? 0.0f : expf(zr - m);
    }
    *w = expf(zq - m) / s;
}

struct AttnProblem {
    const void* q;                 // [n, d] query rows by position (this head), f32 or bf16
    const void* k;                 // [n, d] key rows by position (raw; normalised on load)
    const void* v;                 // [n, d]
    bool act_bf16;                 // q, k, v (and the backward's dout) are bf16, else f32
    const unsigned* perm;          // [n] slot -> position, or null (identity)
    const unsigned char* key_valid;  // [n] 1 = may be attended to, or null (all)
    int n;
    int d;
    float scale;
    bool causal;
    bool self_penalty;
    bool unit_keys;
};

// Up to two half-open slot ranges (own chunk and look-back / look-ahead chunk).
struct SlotRanges {
    int count;
    long long begin[2];
    long long end[2];
};

__device__ __forceinline__ SlotRanges one_range(long long b, long long e) {
    SlotRanges r;
    r.count = 1;
    r.begin[0] = b;
    r.end[0] = e;
    r.begin[1] = 0;
    r.end[1] = 0;
    return r;
}

__device__ __forceinline__ SlotRanges two_ranges(long long b0, long long e0, long long b1,
                                                 long long e1) {
    SlotRanges r;
    r.count = 2;
    r.begin[0] = b0;
    r.end[0] = e0;
    r.begin[1] = b1;
    r.end[1] = e1;
    return r;
}

// Which rows a block of a chunked launch owns: grid (n_chunks * groups, n_heads), each chunk
// split into groups of `rows_per_block` slots.
struct ChunkBlock {
    int head;
    long long chunk;
    long long n_chunks;
    long long row_begin;  // first slot of this block
    int row_count;        // slots of this block (<= rows per block)
};

__device__ __forceinline__ ChunkBlock chunk_block(int n, int chunk, int rows_per_block) {
    ChunkBlock b;
    const long long groups = (chunk + rows_per_block - 1) / rows_per_block;
    b.head = blockIdx.y;
    b.chunk = blockIdx.x / groups;
    b.n_chunks = ((long long)n + chunk - 1) / chunk;
    const long long g = blockIdx.x - b.chunk * groups;
    b.row_begin = b.chunk * chunk + g * rows_per_block;
    b.row_count = (int)min((long long)rows_per_block, (long long)chunk - g * rows_per_block);
    return b;
}

// Position of a slot, or -1 for padding (slot >= n, or a corrupt perm entry).
__device__ __forceinline__ int slot_position(const AttnProblem& P, long long slot) {
    if (slot < 0 || slot >= P.n) {
        return -1;
    }
    const unsigned pos = P.perm != nullptr ? P.perm[slot] : (unsigned)slot;
    return pos < (unsigned)P.n ? (int)pos : -1;
}

// Position of a slot as a key: -1 also when the key is masked out.
__device__ __forceinline__ int key_position(const AttnProblem& P, long long slot) {
    const int pos = slot_position(P, slot);
    if (pos >= 0 && P.key_valid != nullptr && P.key_valid[pos] == 0) {
        return -1;
    }
    return pos;
}

// Loads row `pos` of `src` ([n, d] rows, bf16 when `bf16`, else f32) into `dst` (d floats,
// widened) by one warp; zeros when pos < 0. With `unit`, scales the row to unit length and
// returns 1 / norm (1 otherwise).
__device__ __forceinline__ float warp_load_row(const void* src, bool bf16, int pos, int d,
                                               float* dst, bool unit) {
    const int lane = threadIdx.x;
    float vals[ATTN_DPL];
    float ss = 0.0f;
#pragma unroll
    for (int dd = 0; dd < ATTN_DPL; ++dd) {
        const int c = lane + 32 * dd;
        vals[dd] = (pos >= 0 && c < d) ? load_act(src, (long long)pos * d + c, bf16) : 0.0f;
        ss += vals[dd] * vals[dd];
    }
    float inv = 1.0f;
    if (unit) {
        inv = 1.0f / sqrtf(warp_sum(ss) + KEY_NORM_EPS);
    }
#pragma unroll
    for (int dd = 0; dd < ATTN_DPL; ++dd) {
        const int c = lane + 32 * dd;
        if (c < d) {
            dst[c] = vals[dd] * inv;
        }
    }
    return inv;
}

// Whether the (query at qp, key at kp) pair counts at all (kp < 0: padding or masked key).
__device__ __forceinline__ bool pair_allowed(const AttnProblem& P, int qp, int kp) {
    return qp >= 0 && kp >= 0 && !(P.causal && kp > qp);
}

// Whether the pair's score is the constant SELF_SCORE.
__device__ __forceinline__ bool pair_is_self(const AttnProblem& P, int qp, int kp) {
    return P.self_penalty && kp == qp;
}

__device__ __forceinline__ float dot_rows(const float* a, const float* b, int d) {
    float s = 0.0f;
    for (int t = 0; t < d; ++t) {
        s += a[t] * b[t];
    }
    return s;
}

// ---------------------------------------------------------------------------------------------
// Forward: queries at slots [q_begin, q_begin + q_count) (q_count <= ATTN_ROWS_FWD) against the
// key slots of `keys`. Writes, at each query's position, the logsumexp z of its scores to
// lse[round * round_stride + pos] (-inf when no key is allowed) and its output row: the
// normalised output o (a zero row when no key is allowed), or, with `fold` and round > 0, the
// running output of rounds [0, round) (already in `out`) with this round folded in:
//   out' = a * out + b * o,  (a, b) from fold_weights (relative to the rounds' max logsumexp).
// `out` is f32, or bf16 with out_bf16 (each stored value rounded to nearest even once; a fold
// would round again per round, so the LSH forward, which folds, keeps f32 and converts after
// its last round).
// Each position is owned by exactly one block per launch, so no two blocks touch a row.
// ---------------------------------------------------------------------------------------------
__device__ void attn_forward_rows(const AttnProblem& P, long long q_begin, int q_count,
                                  const SlotRanges& keys, void* out, bool out_bf16, float* lse,
                                  long long round_stride, int round, bool fold) {
    if (blockDim.x != 32 || blockDim.y != ATTN_WARPS || blockDim.z != 1 || P.d > ATTN_MAX_D) {
        return;  // a launch this code was not written for (uniform over the block)
    }
    __shared__ float sq[ATTN_ROWS_FWD][ATTN_MAX_D];
    __shared__ float sk[ATTN_TILE][ATTN_MAX_D + 1];
    __shared__ float sv[ATTN_TILE][ATTN_MAX_D];
    __shared__ int sqpos[ATTN_ROWS_FWD];
    __shared__ int skpos[ATTN_TILE];

    const int lane = threadIdx.x;
    const int warp = threadIdx.y;
    const int d = P.d;

    for (int r = warp; r < ATTN_ROWS_FWD; r += ATTN_WARPS) {
        const int pos = r < q_count ? slot_position(P, q_begin + r) : -1;
        warp_load_row(P.q, P.act_bf16, pos, d, sq[r], false);
        if (lane == 0) {
            sqpos[r] = pos;
        }
    }
    __syncthreads();  // rows are loaded by one warp and used by another

    float m[ATTN_QPW_FWD];
    float l[ATTN_QPW_FWD];
    float acc[ATTN_QPW_FWD][ATTN_DPL];
#pragma unroll
    for (int qi = 0; qi < ATTN_QPW_FWD; ++qi) {
        m[qi] = -INFINITY;
        l[qi] = 0.0f;
#pragma unroll
        for (int dd = 0; dd < ATTN_DPL; ++dd) {
            acc[qi][dd] = 0.0f;
        }
    }

    for (int ri = 0; ri < keys.count; ++ri) {
        for (long long t0 = keys.begin[ri]; t0 < keys.end[ri]; t0 += ATTN_TILE) {
            const long long t_count = min((long long)ATTN_TILE, keys.end[ri] - t0);
            __syncthreads();  // the previous tile is consumed
            for (int j = warp; j < ATTN_TILE; j += ATTN_WARPS) {
                const int kp = j < t_count ? key_position(P, t0 + j) : -1;
                warp_load_row(P.k, P.act_bf16, kp, d, sk[j], P.unit_keys);
                warp_load_row(P.v, P.act_bf16, kp, d, sv[j], false);
                if (lane == 0) {
                    skpos[j] = kp;
                }
            }
            __syncthreads();

            const int kp = skpos[lane];
#pragma unroll
            for (int qi = 0; qi < ATTN_QPW_FWD; ++qi) {
                const int r = warp * ATTN_QPW_FWD + qi;
                const int qp = sqpos[r];
                if (qp < 0) {
                    continue;  // uniform over the warp
                }
                float s = -INFINITY;
                if (pair_allowed(P, qp, kp)) {
                    s = pair_is_self(P, qp, kp) ? SELF_SCORE : P.scale * dot_rows(sq[r], sk[lane], d);
                }
                const float new_m = fmaxf(m[qi], warp_max(s));
                if (new_m == -INFINITY) {
                    continue;  // nothing allowed yet (uniform)
                }
                const float corr = expf(m[qi] - new_m);  // 0 when m was -inf
                const float p = s == -INFINITY ? 0.0f : expf(s - new_m);
                l[qi] = l[qi] * corr + warp_sum(p);
#pragma unroll
                for (int dd = 0; dd < ATTN_DPL; ++dd) {
                    acc[qi][dd] *= corr;
                }
#pragma unroll 4
                for (int jj = 0; jj < ATTN_TILE; ++jj) {
                    const float pj = __shfl_sync(FULL_MASK, p, jj);
                    if (pj != 0.0f) {
#pragma unroll
                        for (int dd = 0; dd < ATTN_DPL; ++dd) {
                            const int c = lane + 32 * dd;
                            if (c < d) {
                                acc[qi][dd] += pj * sv[jj][c];
                            }
                        }
                    }
                }
                m[qi] = new_m;
            }
        }
    }

#pragma unroll
    for (int qi = 0; qi < ATTN_QPW_FWD; ++qi) {
        const int r = warp * ATTN_QPW_FWD + qi;
        const int qp = sqpos[r];
        if (qp < 0) {
            continue;
        }
        const bool any = l[qi] > 0.0f;
        const float z = any ? m[qi] + logf(l[qi]) : -INFINITY;
        const float inv = any ? 1.0f / l[qi] : 0.0f;
        void* orow = act_offset_mut(out, (long long)qp * d, out_bf16);
        if (!fold || round == 0) {
#pragma unroll
            for (int dd = 0; dd < ATTN_DPL; ++dd) {
                const int c = lane + 32 * dd;
                if (c < d) {
                    store_act(orow, c, out_bf16, acc[qi][dd] * inv);
                }
            }
        } else {
            // Earlier rounds' logsumexps were written by earlier launches; this launch writes
            // only this round's slot, so every lane may read them.
            float a;
            float b;
            fold_weights(lse, round_stride, round, qp, z, &a, &b);
#pragma unroll
            for (int dd = 0; dd < ATTN_DPL; ++dd) {
                const int c = lane + 32 * dd;
                if (c < d) {
                    const float prev = a != 0.0f ? load_act(orow, c, out_bf16) * a : 0.0f;
                    const float cur = b != 0.0f ? acc[qi][dd] * inv * b : 0.0f;
                    store_act(orow, c, out_bf16, prev + cur);
                }
            }
        }
        if (lane == 0) {
            lse[(long long)round * round_stride + qp] = z;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, dq pass: queries at slots [q_begin, q_begin + q_count) (<= ATTN_ROWS_BWD) against
// the key slots of `keys`. With p = w exp(s - z) (z, w from query_norm: the probability of the
// pair within the softmax over *every* (round, key) pair the query saw), delta = dO . O:
//   dq += sum_j p (dO . v_j - delta) * scale * k_j      (k_j unit when unit_keys)
// Added into dq at the query's position (each position owned by one block per launch). `dout`
// holds this head's [n, d] rows by position, stored as q, k, v are (P.act_bf16).
// ---------------------------------------------------------------------------------------------
__device__ void attn_backward_dq_rows(const AttnProblem& P, long long q_begin, int q_count,
                                      const SlotRanges& keys, const void* dout,
                                      const RoundLse& L, const float* delta, float* dq) {
    if (blockDim.x != 32 || blockDim.y != ATTN_WARPS || blockDim.z != 1 || P.d > ATTN_MAX_D) {
        return;  // a launch this code was not written for (uniform over the block)
    }
    __shared__ float sq[ATTN_ROWS_BWD][ATTN_MAX_D];
    __shared__ float sdo[ATTN_ROWS_BWD][ATTN_MAX_D];
    __shared__ float sk[ATTN_TILE][ATTN_MAX_D + 1];
    __shared__ float sv[ATTN_TILE][ATTN_MAX_D + 1];
    __shared__ int sqpos[ATTN_ROWS_BWD];
    __shared__ int skpos[ATTN_TILE];

    const int lane = threadIdx.x;
    const int warp = threadIdx.y;
    const int d = P.d;

    for (int r = warp; r < ATTN_ROWS_BWD; r += ATTN_WARPS) {
        const int pos = r < q_count ? slot_position(P, q_begin + r) : -1;
        warp_load_row(P.q, P.act_bf16, pos, d, sq[r], false);
        warp_load_row(dout, P.act_bf16, pos, d, sdo[r], false);
        if (lane == 0) {
            sqpos[r] = pos;
        }
    }
    __syncthreads();

    float z[ATTN_QPW_BWD];
    float w[ATTN_QPW_BWD];
    float dl[ATTN_QPW_BWD];
    float acc[ATTN_QPW_BWD][ATTN_DPL];
#pragma unroll
    for (int qi = 0; qi < ATTN_QPW_BWD; ++qi) {
        const int qp = sqpos[warp * ATTN_QPW_BWD + qi];
        z[qi] = -INFINITY;
        w[qi] = 0.0f;
        if (qp >= 0) {
            query_norm(L, qp, &z[qi], &w[qi]);
        }
        dl[qi] = qp >= 0 ? delta[qp] : 0.0f;
#pragma unroll
        for (int dd = 0; dd < ATTN_DPL; ++dd) {
            acc[qi][dd] = 0.0f;
        }
    }

    for (int ri = 0; ri < keys.count; ++ri) {
        for (long long t0 = keys.begin[ri]; t0 < keys.end[ri]; t0 += ATTN_TILE) {
            const long long t_count = min((long long)ATTN_TILE, keys.end[ri] - t0);
            __syncthreads();
            for (int j = warp; j < ATTN_TILE; j += ATTN_WARPS) {
                const int kp = j < t_count ? key_position(P, t0 + j) : -1;
                warp_load_row(P.k, P.act_bf16, kp, d, sk[j], P.unit_keys);
                warp_load_row(P.v, P.act_bf16, kp, d, sv[j], false);
                if (lane == 0) {
                    skpos[j] = kp;
                }
            }
            __syncthreads();

            const int kp = skpos[lane];
#pragma unroll
            for (int qi = 0; qi < ATTN_QPW_BWD; ++qi) {
                const int r = warp * ATTN_QPW_BWD + qi;
                const int qp = sqpos[r];
                if (qp < 0 || w[qi] == 0.0f) {
                    continue;  // uniform over the warp
                }
                float ds = 0.0f;
                if (pair_allowed(P, qp, kp) && !pair_is_self(P, qp, kp)) {
                    const float s = P.scale * dot_rows(sq[r], sk[lane], d);
                    const float p = w[qi] * expf(s - z[qi]);
                    if (p != 0.0f) {
                        const float dp = dot_rows(sdo[r], sv[lane], d);
                        ds = p * (dp - dl[qi]) * P.scale;
                    }
                }
#pragma unroll 4
                for (int jj = 0; jj < ATTN_TILE; ++jj) {
                    const float dsj = __shfl_sync(FULL_MASK, ds, jj);
                    if (dsj != 0.0f) {
#pragma unroll
                        for (int dd = 0; dd < ATTN_DPL; ++dd) {
                            const int c = lane + 32 * dd;
                            if (c < d) {
                                acc[qi][dd] += dsj * sk[jj][c];
                            }
                        }
                    }
                }
            }
        }
    }

#pragma unroll
    for (int qi = 0; qi < ATTN_QPW_BWD; ++qi) {
        const int qp = sqpos[warp * ATTN_QPW_BWD + qi];
        if (qp < 0) {
            continue;
        }
        float* row = dq + (long long)qp * d;
#pragma unroll
        for (int dd = 0; dd < ATTN_DPL; ++dd) {
            const int c = lane + 32 * dd;
            if (c < d) {
                row[c] += acc[qi][dd];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, dk/dv pass: keys at slots [k_begin, k_begin + k_count) (<= ATTN_ROWS_BWD) against
// the query slots of `queries` (every query that can see these keys), p = w exp(s - z) as in
// the dq pass:
//   dv_j += sum_i p_ij dO_i
//   dk_j += sum_i p_ij (dO_i . v_j - delta_i) * scale * q_i      (gradient w.r.t. the key used)
// With unit_keys, dk is taken back through the normalisation before it is added:
//   d(raw key) = (dk - k (k . dk)) / norm.
// `dout` is stored as in the dq pass (P.act_bf16).
// Deterministic: each key position is owned by one block per launch, which sums its queries in
// a fixed order. No floating-point atomics: the price is that the scores of a (query, key) tile
// are computed twice (here and in the dq pass) — cheaper than contended atomics on dk/dv and
// it keeps training runs bit-reproducible.
// ---------------------------------------------------------------------------------------------
__device__ void attn_backward_dkdv_rows(const AttnProblem& P, long long k_begin, int k_count,
                                        const SlotRanges& queries, const void* dout,
                                        const RoundLse& L, const float* delta, float* dk,
                                        float* dv) {
    if (blockDim.x != 32 || blockDim.y != ATTN_WARPS || blockDim.z != 1 || P.d > ATTN_MAX_D) {
        return;  // a launch this code was not written for (uniform over the block)
    }
    __shared__ float skey[ATTN_ROWS_BWD][ATTN_MAX_D];
    __shared__ float sval[ATTN_ROWS_BWD][ATTN_MAX_D];
    __shared__ float skinv[ATTN_ROWS_BWD];
    __shared__ int skpos[ATTN_ROWS_BWD];
    __shared__ float sq[ATTN_TILE][ATTN_MAX_D + 1];
    __shared__ float sdo[ATTN_TILE][ATTN_MAX_D + 1];
    __shared__ float sz[ATTN_TILE];
    __shared__ float sw[ATTN_TILE];
    __shared__ float sdl[ATTN_TILE];
    __shared__ int sqpos[ATTN_TILE];

    const int lane = threadIdx.x;
    const int warp = threadIdx.y;
    const int d = P.d;

    for (int r = warp; r < ATTN_ROWS_BWD; r += ATTN_WARPS) {
        const int kp = r < k_count ? key_position(P, k_begin + r) : -1;
        const float inv = warp_load_row(P.k, P.act_bf16, kp, d, skey[r], P.unit_keys);
        warp_load_row(P.v, P.act_bf16, kp, d, sval[r], false);
        if (lane == 0) {
            skpos[r] = kp;
            skinv[r] = inv;
        }
    }
    __syncthreads();  // rows are loaded by one warp and used by another

    float gk[ATTN_QPW_BWD][ATTN_DPL];
    float gv[ATTN_QPW_BWD][ATTN_DPL];
#pragma unroll
    for (int ki = 0; ki < ATTN_QPW_BWD; ++ki) {
#pragma unroll
        for (int dd = 0; dd < ATTN_DPL; ++dd) {
            gk[ki][dd] = 0.0f;
            gv[ki][dd] = 0.0f;
        }
    }

    for (int ri = 0; ri < queries.count; ++ri) {
        for (long long t0 = queries.begin[ri]; t0 < queries.end[ri]; t0 += ATTN_TILE) {
            const long long t_count = min((long long)ATTN_TILE, queries.end[ri] - t0);
            __syncthreads();  // the previous tile is consumed
            for (int i = warp; i < ATTN_TILE; i += ATTN_WARPS) {
                const int qp = i < t_count ? slot_position(P, t0 + i) : -1;
                warp_load_row(P.q, P.act_bf16, qp, d, sq[i], false);
                warp_load_row(dout, P.act_bf16, qp, d, sdo[i], false);
                if (lane == 0) {
                    float zq = -INFINITY;
                    float wq = 0.0f;
                    if (qp >= 0) {
                        query_norm(L, qp, &zq, &wq);
                    }
                    sqpos[i] = qp;
                    sz[i] = zq;
                    sw[i] = wq;
                    sdl[i] = qp >= 0 ? delta[qp] : 0.0f;
                }
            }
            __syncthreads();

            const int qp = sqpos[lane];
            const float zq = sz[lane];
            const float wq = sw[lane];
#pragma unroll
            for (int ki = 0; ki < ATTN_QPW_BWD; ++ki) {
                const int r = warp * ATTN_QPW_BWD + ki;
                const int kp = skpos[r];
                if (kp < 0) {
                    continue;  // uniform over the warp
                }
                float p = 0.0f;
                float ds = 0.0f;
                if (pair_allowed(P, qp, kp) && wq != 0.0f) {
                    const bool self = pair_is_self(P, qp, kp);
                    const float s = self ? SELF_SCORE : P.scale * dot_rows(sq[lane], skey[r], d);
                    p = wq * expf(s - zq);
                    if (p != 0.0f && !self) {
                        const float dp = dot_rows(sdo[lane], sval[r], d);
                        ds = p * (dp - sdl[lane]) * P.scale;
                    }
                }
#pragma unroll 4
                for (int ii = 0; ii < ATTN_TILE; ++ii) {
                    const float pi = __shfl_sync(FULL_MASK, p, ii);
                    const float dsi = __shfl_sync(FULL_MASK, ds, ii);
                    if (pi != 0.0f) {
#pragma unroll
                        for (int dd = 0; dd < ATTN_DPL; ++dd) {
                            const int c = lane + 32 * dd;
                            if (c < d) {
                                gv[ki][dd] += pi * sdo[ii][c];
                            }
                        }
                    }
                    if (dsi != 0.0f) {
#pragma unroll
                        for (int dd = 0; dd < ATTN_DPL; ++dd) {
                            const int c = lane + 32 * dd;
                            if (c < d) {
                                gk[ki][dd] += dsi * sq[ii][c];
                            }
                        }
                    }
                }
            }
        }
    }

#pragma unroll
    for (int ki = 0; ki < ATTN_QPW_BWD; ++ki) {
        const int r = warp * ATTN_QPW_BWD + ki;
        const int kp = skpos[r];
        if (kp < 0) {
            continue;
        }
        float* vrow = dv + (long long)kp * d;
        float* krow = dk + (long long)kp * d;
        float kdot = 0.0f;
        if (P.unit_keys) {
#pragma unroll
            for (int dd = 0; dd < ATTN_DPL; ++dd) {
                const int c = lane + 32 * dd;
                if (c < d) {
                    kdot += skey[r][c] * gk[ki][dd];
                }
            }
            kdot = warp_sum(kdot);
        }
#pragma unroll
        for (int dd = 0; dd < ATTN_DPL; ++dd) {
            const int c = lane + 32 * dd;
            if (c < d) {
                vrow[c] += gv[ki][dd];
                const float g = P.unit_keys ? (gk[ki][dd] - skey[r][c] * kdot) * skinv[r]
                                            : gk[ki][dd];
                krow[c] += g;
            }
        }
    }
}
