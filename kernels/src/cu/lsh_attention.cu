// Shared-QK LSH attention, one hash round per launch (the tile engine is attention.cuh).
//
// Semantics (DESIGN.md): keys are the unit vectors of the qk rows, queries the raw qk rows,
// s = q . k (no scaling). Each round's sorted order (perm, from bucket_sort.cu) is cut into
// n_chunks = ceil(n / chunk) chunks; chunk c attends to the keys of chunk c and chunk c - 1 of
// the same round (chunk 0 looks back at the last chunk; a round that is a single chunk has no
// look-back). Masks: causal by original position, the query's own position scores -1e5, padding
// keys (key_valid == 0, or slots past n in a partial last chunk) are excluded. With a key mask,
// perm must sort padding positions after every real one (bucket_sort_mask_keys), as the CPU
// does, so that padding never moves a real position into another chunk.
//
// Layouts: qk, v, out, dout, dqk, dv [n_heads, n, d] by original position; lse
// [n_heads, n_rounds, n] (every round's logsumexp z_r, as the CPU reference keeps them); delta
// [n_heads, n]; perm [n_heads, n_rounds, n]; key_valid null, [n] (valid_per_head = 0) or
// [n_heads, n] (valid_per_head = 1). Storage: qk, v and dout are bf16 when act_bf16 != 0, else
// f32 (widened on load, attention.cuh); out, lse, delta, dqk, dv are always f32.
//
// Launch (every kernel but the combine): block (32, ATTN_WARPS);
// grid (n_chunks * ceil(chunk / ROWS), n_heads) with ROWS = ATTN_ROWS_FWD for the forward and
// ATTN_ROWS_BWD for the backward passes.
//
// Rounds. The forward of round r writes z_r at lse[h, r, i] and the round's output o_r: with
// fold = 1 it is folded straight into the running output `out` of rounds [0, r) (no per-round
// buffer; round 0 simply writes); with fold = 0 it overwrites `out` (a per-round buffer) and
// lsh_attn_combine folds it into the running result. Either way the result is
//   o(i) = sum_r w_r(i) o_r(i),  w_r = exp(z_r - logsumexp_r' z_r'),
// with the weights computed relative to the rounds' maximum z (attention.cuh, fold_weights):
// forming the total logsumexp in f32 would lose ln(n_rounds) for a query that sees only itself
// (z = -1e5 in every round). The rounds must run in order, on one stream.
//
// The backward reads every round's z: the rounds together are one softmax over every
// (round, key) pair a query saw, so round r's probabilities are w_r exp(s - z_r), and
// delta = dO . o (ew_row_dot) is shared by all rounds. The number of rounds may differ between
// training and evaluation.
//
// Backward (per round, all launches on one stream): lsh_attn_bwd_dq adds dq into dqk;
// lsh_attn_bwd_dkdv adds the key gradient (through the unit-norm) into dqk and dv. Key and value
// gradients use a deterministic second pass, not f32 atomics: the dkdv pass gives each key chunk
// to one block, which visits the queries that can see it (chunk c and chunk c + 1, the look-
// ahead mirror of the forward's look-back) in a fixed order. It recomputes the tile scores once
// more, and in exchange keeps runs bit-reproducible and avoids atomic contention on the rows of
// popular buckets. Nothing of size n x 2m (or n x n) is ever stored.

// The chunk itself and, when there is more than one chunk, the chunk at `offset` (-1: the
// forward's look-back, +1: the backward's look-ahead), wrapping around.
__device__ __forceinline__ SlotRanges lsh_chunk_ranges(const ChunkBlock& b, int chunk,
                                                       int offset) {
    const long long own = b.chunk * chunk;
    if (b.n_chunks <= 1) {
        return one_range(own, own + chunk);
    }
    const long long other = ((b.chunk + offset) % b.n_chunks + b.n_chunks) % b.n_chunks;
    return two_ranges(own, own + chunk, other * chunk, other * chunk + chunk);
}

__device__ __forceinline__ AttnProblem lsh_problem(const void* qk, const void* v, int act_bf16,
                                                   const unsigned* perm,
                                                   const unsigned char* key_valid,
                                                   int valid_per_head, int h, int n_rounds,
                                                   int round, int n, int d, int causal) {
    AttnProblem P;
    const long long rows = (long long)h * n * d;
    P.q = act_offset(qk, rows, act_bf16);
    P.k = P.q;
    P.v = act_offset(v, rows, act_bf16);
    P.act_bf16 = act_bf16 != 0;
    P.perm = perm + ((long long)h * n_rounds + round) * n;
    P.key_valid = key_valid == nullptr ? nullptr
                                       : key_valid + (valid_per_head ? (long long)h * n : 0);
    P.n = n;
    P.d = d;
    P.scale = 1.0f;
    P.causal = causal != 0;
    P.self_penalty = true;
    P.unit_keys = true;
    return P;
}

// Head h's per-round logsumexps, round `round` the one this launch handles.
__device__ __forceinline__ RoundLse lsh_round_lse(const float* lse, int h, int n_rounds,
                                                  int round, int n) {
    RoundLse L;
    L.lse = lse + (long long)h * n_rounds * n;
    L.round_stride = n;
    L.n_rounds = n_rounds;
    L.round = round;
    return L;
}

extern "C" __global__ void lsh_attn_fwd(const void* qk, const void* v, const unsigned* perm,
                                        const unsigned char* key_valid, int valid_per_head,
                                        float* out, float* lse, int n_heads, int n_rounds,
                                        int round, int n, int d, int chunk, int causal, int fold,
                                        int act_bf16) {
    if (d > ATTN_MAX_D || chunk <= 0 || (int)blockIdx.y >= n_heads || round < 0 ||
        round >= n_rounds) {
        return;
    }
    const ChunkBlock b = chunk_block(n, chunk, ATTN_ROWS_FWD);
    if (b.row_begin >= n) {
        return;  // only padding slots (chunk > n)
    }
    const AttnProblem P =
        lsh_problem(qk, v, act_bf16, perm, key_valid, valid_per_head, b.head, n_rounds, round, n,
                    d, causal);
    attn_forward_rows(P, b.row_begin, b.row_count, lsh_chunk_ranges(b, chunk, -1),
                      out + (long long)b.head * n * d, false,
                      lse + (long long)b.head * n_rounds * n,
                      (long long)n, round, fold != 0);
}

// Folds round `round`'s output out_r (lsh_attn_fwd with fold = 0; its z_r already in lse) into
// the running output `out` of rounds [0, round), in place; round 0 copies. Weights as in
// lsh_attn_fwd's fold. rows = n_heads * n. Launch: block (32, W), grid ceil(rows / W): one warp
// per row.
extern "C" __global__ void lsh_attn_combine(float* out, const float* out_r, const float* lse,
                                            int n_heads, int n_rounds, int round, int n, int d) {
    const long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= (long long)n_heads * n || round < 0 || round >= n_rounds) {
        return;
    }
    const long long h = r / n;
    const int pos = (int)(r - h * n);
    const float* lse_h = lse + h * n_rounds * n;
    float* o = out + r * d;
    const float* o_r = out_r + r * d;
    if (round == 0) {
        for (int c = threadIdx.x; c < d; c += 32) {
            o[c] = o_r[c];
        }
        return;
    }
    float a;
    float b;
    fold_weights(lse_h, (long long)n, round, pos, lse_h[(long long)round * n + pos], &a, &b);
    for (int c = threadIdx.x; c < d; c += 32) {
        const float prev = a != 0.0f ? o[c] * a : 0.0f;
        const float cur = b != 0.0f ? o_r[c] * b : 0.0f;
        o[c] = prev + cur;
    }
}

extern "C" __global__ void lsh_attn_bwd_dq(const void* qk, const void* v, const unsigned* perm,
                                           const unsigned char* key_valid, int valid_per_head,
                                           const void* dout, const float* lse,
                                           const float* delta, float* dqk, int n_heads,
                                           int n_rounds, int round, int n, int d, int chunk,
                                           int causal, int act_bf16) {
    if (d > ATTN_MAX_D || chunk <= 0 || (int)blockIdx.y >= n_heads || round < 0 ||
        round >= n_rounds) {
        return;
    }
    const ChunkBlock b = chunk_block(n, chunk, ATTN_ROWS_BWD);
    if (b.row_begin >= n) {
        return;  // only padding slots (chunk > n)
    }
    const AttnProblem P =
        lsh_problem(qk, v, act_bf16, perm, key_valid, valid_per_head, b.head, n_rounds, round, n,
                    d, causal);
    const long long head_rows = (long long)b.head * n;
    attn_backward_dq_rows(P, b.row_begin, b.row_count, lsh_chunk_ranges(b, chunk, -1),
                          act_offset(dout, head_rows * d, act_bf16),
                          lsh_round_lse(lse, b.head, n_rounds, round, n),
                          delta + head_rows, dqk + head_rows * d);
}

extern "C" __global__ void lsh_attn_bwd_dkdv(const void* qk, const void* v,
                                             const unsigned* perm, const unsigned char* key_valid,
                                             int valid_per_head, const void* dout,
                                             const float* lse, const float* delta, float* dqk,
                                             float* dv, int n_heads, int n_rounds, int round,
                                             int n, int d, int chunk, int causal, int act_bf16) {
    if (d > ATTN_MAX_D || chunk <= 0 || (int)blockIdx.y >= n_heads || round < 0 ||
        round >= n_rounds) {
        return;
    }
    const ChunkBlock b = chunk_block(n, chunk, ATTN_ROWS_BWD);
    if (b.row_begin >= n) {
        return;  // only padding slots (chunk > n)
    }
    const AttnProblem P =
        lsh_problem(qk, v, act_bf16, perm, key_valid, valid_per_head, b.head, n_rounds, round, n,
                    d, causal);
    const long long head_rows = (long long)b.head * n;
    attn_backward_dkdv_rows(P, b.row_begin, b.row_count, lsh_chunk_ranges(b, chunk, +1),
                            act_offset(dout, head_rows * d, act_bf16),
                            lsh_round_lse(lse, b.head, n_rounds, round, n),
                            delta + head_rows, dqk + head_rows * d, dv + head_rows * d);
}
