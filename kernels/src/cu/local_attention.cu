// Chunked local attention (the tile engine is attention.cuh): separate q, k, v, scores
// s = scale * q . k (the host passes scale = 1 / sqrt(d)). The sequence is cut, in original
// order, into n_chunks = ceil(n / chunk) chunks; chunk c attends to chunk c and chunk c - 1
// (chunk 0 has no previous chunk: no wrap-around here), with the causal mask when `causal`
// and padding keys (key_valid == 0, positions past n) excluded. No self penalty.
//
// Layouts: q, k, v, out, dout, dq, dk, dv [n_heads, n, d]; lse, delta [n_heads, n];
// key_valid null, [n] (valid_per_head = 0) or [n_heads, n] (valid_per_head = 1). Storage: q, k, v
// and dout are bf16 when act_bf16 != 0, else f32 (widened on load, attention.cuh); the
// forward's out is bf16 when out_bf16 != 0 (rounded to nearest even as it is stored), else f32;
// lse, delta, dq, dk, dv are always f32.
// Launch: block (32, ATTN_WARPS); grid (n_chunks * ceil(chunk / ROWS), n_heads) with
// ROWS = ATTN_ROWS_FWD for the forward, ATTN_ROWS_BWD for both backward passes.
//
// Backward: delta = dO . O per row (ew_row_dot), then local_attn_bwd_dq (adds into dq) and
// local_attn_bwd_dkdv (adds into dk, dv). Key/value gradients come from a deterministic second
// pass (each key chunk owned by one block, visiting the queries of chunks c and c + 1), not
// from f32 atomics, for bit-reproducible runs.

// The chunk itself and the chunk at `offset` (-1 or +1) when that chunk exists.
__device__ __forceinline__ SlotRanges local_chunk_ranges(const ChunkBlock& b, int chunk,
                                                         int offset) {
    const long long own = b.chunk * chunk;
    const long long other = b.chunk + offset;
    if (other < 0 || other >= b.n_chunks) {
        return one_range(own, own + chunk);
    }
    return two_ranges(own, own + chunk, other * chunk, other * chunk + chunk);
}

__device__ __forceinline__ AttnProblem local_problem(const void* q, const void* k,
                                                     const void* v, int act_bf16,
                                                     const unsigned char* key_valid,
                                                     int valid_per_head, int h, int n, int d,
                                                     int causal, float scale) {
    AttnProblem P;
    const long long rows = (long long)h * n * d;
    P.q = act_offset(q, rows, act_bf16);
    P.k = act_offset(k, rows, act_bf16);
    P.v = act_offset(v, rows, act_bf16);
    P.act_bf16 = act_bf16 != 0;
    P.perm = nullptr;
    P.key_valid = key_valid == nullptr ? nullptr
                                       : key_valid + (valid_per_head ? (long long)h * n : 0);
    P.n = n;
    P.d = d;
    P.scale = scale;
    P.causal = causal != 0;
    P.self_penalty = false;
    P.unit_keys = false;
    return P;
}

extern "C" __global__ void local_attn_fwd(const void* q, const void* k, const void* v,
                                          const unsigned char* key_valid, int valid_per_head,
                                          void* out, float* lse, int n_heads, int n, int d,
                                          int chunk, int causal, float scale, int act_bf16,
                                          int out_bf16) {
    if (d > ATTN_MAX_D || chunk <= 0 || (int)blockIdx.y >= n_heads) {
        return;
    }
    const ChunkBlock b = chunk_block(n, chunk, ATTN_ROWS_FWD);
    if (b.row_begin >= n) {
        return;  // only padding slots (chunk > n)
    }
    const AttnProblem P =
        local_problem(q, k, v, act_bf16, key_valid, valid_per_head, b.head, n, d, causal, scale);
    const long long head_rows = (long long)b.head * n;
    attn_forward_rows(P, b.row_begin, b.row_count, local_chunk_ranges(b, chunk, -1),
                      act_offset_mut(out, head_rows * d, out_bf16), out_bf16 != 0,
                      lse + head_rows, 0, 0, false);
}

extern "C" __global__ void local_attn_bwd_dq(const void* q, const void* k, const void* v,
                                             const unsigned char* key_valid, int valid_per_head,
                                             const void* dout, const float* lse,
                                             const float* delta, float* dq, int n_heads, int n,
                                             int d, int chunk, int causal, float scale,
                                             int act_bf16) {
    if (d > ATTN_MAX_D || chunk <= 0 || (int)blockIdx.y >= n_heads) {
        return;
    }
    const ChunkBlock b = chunk_block(n, chunk, ATTN_ROWS_BWD);
    if (b.row_begin >= n) {
        return;  // only padding slots (chunk > n)
    }
    const AttnProblem P =
        local_problem(q, k, v, act_bf16, key_valid, valid_per_head, b.head, n, d, causal, scale);
    const long long head_rows = (long long)b.head * n;
    attn_backward_dq_rows(P, b.row_begin, b.row_count, local_chunk_ranges(b, chunk, -1),
                          act_offset(dout, head_rows * d, act_bf16),
                          single_round_lse(lse + head_rows),
                          delta + head_rows, dq + head_rows * d);
}

extern "C" __global__ void local_attn_bwd_dkdv(const void* q, const void* k, const void* v,
                                               const unsigned char* key_valid,
                                               int valid_per_head, const void* dout,
                                               const float* lse, const float* delta, float* dk,
                                               float* dv, int n_heads, int n, int d, int chunk,
                                               int causal, float scale, int act_bf16) {
    if (d > ATTN_MAX_D || chunk <= 0 || (int)blockIdx.y >= n_heads) {
        return;
    }
    const ChunkBlock b = chunk_block(n, chunk, ATTN_ROWS_BWD);
    if (b.row_begin >= n) {
        return;  // only padding slots (chunk > n)
    }
    const AttnProblem P =
        local_problem(q, k, v, act_bf16, key_valid, valid_per_head, b.head, n, d, causal, scale);
    const long long head_rows = (long long)b.head * n;
    attn_backward_dkdv_rows(P, b.row_begin, b.row_count, local_chunk_ranges(b, chunk, +1),
                            act_offset(dout, head_rows * d, act_bf16),
                            single_round_lse(lse + head_rows),
                            delta + head_rows, dk + head_rows * d, dv + head_rows * d);
}
