// Shared-QK LSH attention, one hash round per launch (the tile engine is attention.cuh).
//
// Semantics (DESIGN.md): keys are the unit vectors of the qk rows, queries the raw qk rows,
// s = q . k (no scaling). Each round's sorted order (perm, from bucket_sort.cu) is cut into
// n_chunks = ceil(n / chunk) chunks; chunk c attends to the keys of chunk c and chunk c - 1 of
// the same round (chunk 0 looks back at the last chunk; a round that is a single chunk has no
// look-back). Masks: causal by original position, the query's own position scores -1e5, padding
// keys (key_valid == 0, or slots past n in a partial last chunk) are excluded.
//
// Layouts: qk, v, out, dout, dqk, dv [n_heads, n, d] by original position; lse, delta
// [n_heads, n]; perm [n_heads, n_rounds, n]; key_valid null, [n] (valid_per_head = 0) or
// [n_heads, n] (valid_per_head = 1).
//
// Launch (every kernel but the combine): block (32, ATTN_WARPS);
// grid (n_chunks * ceil(chunk / ROWS), n_heads) with ROWS = ATTN_ROWS_FWD for the forward and
// ATTN_ROWS_BWD for the backward passes.
//
// Rounds. The forward writes round r's o_r and z_r (logsumexp) at each query's position. With
// fold = 0 they overwrite (out, lse) (per-round buffers; lsh_attn_combine folds them into a
// running result); with fold = 1 they are folded straight into the running (out, lse), which
// needs no per-round buffer (round 0 then runs with fold = 0, or after out = 0 and
// lse = -inf). Either way the result is
//   o(i) = sum_r exp(z_r(i) - logsumexp_r z_r(i)) o_r(i),  lse(i) = logsumexp_r z_r(i).
// The backward uses that total lse: the rounds together are one softmax over every (round, key)
// pair a query saw, so p = exp(s - lse) and delta = dO . o (ew_row_dot) are shared by all
// rounds, and the number of rounds may differ between training and evaluation.
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

__device__ __forceinline__ AttnProblem lsh_problem(const float* qk, const float* v,
                                                   const unsigned* perm,
                                                   const unsigned char* key_valid,
                                                   int valid_per_head, int h, int n_rounds,
                                                   int round, int n, int d, int causal) {
    AttnProblem P;
    const long long rows = (long long)h * n * d;
    P.q = qk + rows;
    P.k = qk + rows;
    P.v = v + rows;
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

extern "C" __global__ void lsh_attn_fwd(const float* qk, const float* v, const unsigned* perm,
                                        const unsigned char* key_valid, int valid_per_head,
                                        float* out, float* lse, int n_heads, int n_rounds,
                                        int round, int n, int d, int chunk, int causal,
                                        int fold) {
    if (d > ATTN_MAX_D || chunk <= 0 || (int)blockIdx.y >= n_heads) {
        return;
    }
    const ChunkBlock b = chunk_block(n, chunk, ATTN_ROWS_FWD);
    if (b.row_begin >= n) {
        return;  // only padding slots (chunk > n)
    }
    const AttnProblem P =
        lsh_problem(qk, v, perm, key_valid, valid_per_head, b.head, n_rounds, round, n, d, causal);
    const long long head_rows = (long long)b.head * n;
    attn_forward_rows(P, b.row_begin, b.row_count, lsh_chunk_ranges(b, chunk, -1),
                      out + head_rows * d, lse + head_rows, fold != 0);
}

// Folds one round's (out_r, lse_r) into the running (out, lse), in place; first != 0 copies.
// rows = n_heads * n. Launch: block (32, W), grid ceil(rows / W): one warp per row.
extern "C" __global__ void lsh_attn_combine(float* out, float* lse, const float* out_r,
                                            const float* lse_r, long long rows, int d,
                                            int first) {
    const long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= rows) {
        return;
    }
    float* o = out + r * d;
    const float* o_r = out_r + r * d;
    const float z_r = lse_r[r];
    if (first) {
        for (int c = threadIdx.x; c < d; c += 32) {
            o[c] = o_r[c];
        }
        if (threadIdx.x == 0) {
            lse[r] = z_r;
        }
        return;
    }
    const float z_old = lse[r];
    __syncwarp();  // every lane has read lse before lane 0 overwrites it
    const float z_new = log_add_exp(z_old, z_r);
    const float w_old = z_new == -INFINITY ? 0.0f : expf(z_old - z_new);
    const float w_new = z_new == -INFINITY ? 0.0f : expf(z_r - z_new);
    for (int c = threadIdx.x; c < d; c += 32) {
        const float prev = w_old != 0.0f ? o[c] * w_old : 0.0f;
        const float cur = w_new != 0.0f ? o_r[c] * w_new : 0.0f;
        o[c] = prev + cur;
    }
    if (threadIdx.x == 0) {
        lse[r] = z_new;
    }
}

extern "C" __global__ void lsh_attn_bwd_dq(const float* qk, const float* v, const unsigned* perm,
                                           const unsigned char* key_valid, int valid_per_head,
                                           const float* dout, const float* lse,
                                           const float* delta, float* dqk, int n_heads,
                                           int n_rounds, int round, int n, int d, int chunk,
                                           int causal) {
    if (d > ATTN_MAX_D || chunk <= 0 || (int)blockIdx.y >= n_heads) {
        return;
    }
    const ChunkBlock b = chunk_block(n, chunk, ATTN_ROWS_BWD);
    if (b.row_begin >= n) {
        return;  // only padding slots (chunk > n)
    }
    const AttnProblem P =
        lsh_problem(qk, v, perm, key_valid, valid_per_head, b.head, n_rounds, round, n, d, causal);
    const long long head_rows = (long long)b.head * n;
    attn_backward_dq_rows(P, b.row_begin, b.row_count, lsh_chunk_ranges(b, chunk, -1),
                          dout + head_rows * d, lse + head_rows, delta + head_rows,
                          dqk + head_rows * d);
}

extern "C" __global__ void lsh_attn_bwd_dkdv(const float* qk, const float* v,
                                             const unsigned* perm, const unsigned char* key_valid,
                                             int valid_per_head, const float* dout,
                                             const float* lse, const float* delta, float* dqk,
                                             float* dv, int n_heads, int n_rounds, int round,
                                             int n, int d, int chunk, int causal) {
    if (d > ATTN_MAX_D || chunk <= 0 || (int)blockIdx.y >= n_heads) {
        return;
    }
    const ChunkBlock b = chunk_block(n, chunk, ATTN_ROWS_BWD);
    if (b.row_begin >= n) {
        return;  // only padding slots (chunk > n)
    }
    const AttnProblem P =
        lsh_problem(qk, v, perm, key_valid, valid_per_head, b.head, n_rounds, round, n, d, causal);
    const long long head_rows = (long long)b.head * n;
    attn_backward_dkdv_rows(P, b.row_begin, b.row_count, lsh_chunk_ranges(b, chunk, +1),
                            dout + head_rows * d, lse + head_rows, delta + head_rows,
                            dqk + head_rows * d, dv + head_rows * d);
}
