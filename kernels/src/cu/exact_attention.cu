// Blockwise exact attention (the tile engine is attention.cuh): every query against every key
// (or every earlier key when causal) with an online softmax, never an n x n matrix. It serves
// both as the baseline for LSH attention and as its reference:
//   * standard attention: separate q, k, v, scale = 1 / sqrt(d), self_penalty = unit_keys = 0;
//   * shared-QK attention (what LSH attention equals with one bucket): q = k = qk, scale = 1,
//     self_penalty = 1, unit_keys = 1, and dq = dk = dqk in the backward.
//
// Layouts: q, k, v, out, dout, dq, dk, dv [n_heads, n, d]; lse, delta [n_heads, n];
// key_valid null, [n] (valid_per_head = 0) or [n_heads, n] (valid_per_head = 1). Storage: q, k, v
// and dout are bf16 when act_bf16 != 0, else f32 (widened on load, attention.cuh); the
// forward's out is bf16 when out_bf16 != 0 (rounded to nearest even as it is stored), else f32;
// lse, delta, dq, dk, dv are always f32.
// Launch: block (32, ATTN_WARPS); grid (ceil(n / ROWS), n_heads), ROWS = ATTN_ROWS_FWD for the
// forward, ATTN_ROWS_BWD for both backward passes.
//
// Backward: delta = dO . O per row (ew_row_dot), then exact_attn_bwd_dq (adds into dq) and
// exact_attn_bwd_dkdv (adds into dk, dv). Key/value gradients come from a deterministic second
// pass (each key block owned by one block of threads, which visits every query that can see
// it), not from f32 atomics, for bit-reproducible runs. When dq and dk are the same buffer the
// two launches must run in order on one stream (they do when issued on one stream).

__device__ __forceinline__ AttnProblem exact_problem(const void* q, const void* k,
                                                     const void* v, int act_bf16,
                                                     const unsigned char* key_valid,
                                                     int valid_per_head, int h, int n, int d,
                                                     int causal, int self_penalty, int unit_keys,
                                                     float scale) {
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
    P.self_penalty = self_penalty != 0;
    P.unit_keys = unit_keys != 0;
    return P;
}

extern "C" __global__ void exact_attn_fwd(const void* q, const void* k, const void* v,
                                          const unsigned char* key_valid, int valid_per_head,
                                          void* out, float* lse, int n_heads, int n, int d,
                                          int causal, int self_penalty, int unit_keys,
                                          float scale, int act_bf16, int out_bf16) {
    const int h = blockIdx.y;
    if (d > ATTN_MAX_D || h >= n_heads) {
        return;
    }
    const AttnProblem P = exact_problem(q, k, v, act_bf16, key_valid, valid_per_head, h, n, d,
                                        causal, self_penalty, unit_keys, scale);
    const long long q_begin = (long long)blockIdx.x * ATTN_ROWS_FWD;
    if (q_begin >= n) {
        return;
    }
    const int q_count = (int)min((long long)ATTN_ROWS_FWD, (long long)n - q_begin);
    const long long k_end = causal ? min((long long)n, q_begin + q_count) : (long long)n;
    const long long head_rows = (long long)h * n;
    attn_forward_rows(P, q_begin, q_count, one_range(0, k_end),
                      act_offset_mut(out, head_rows * d, out_bf16), out_bf16 != 0,
                      lse + head_rows, 0, 0, false);
}

extern "C" __global__ void exact_attn_bwd_dq(const void* q, const void* k, const void* v,
                                             const unsigned char* key_valid, int valid_per_head,
                                             const void* dout, const float* lse,
                                             const float* delta, float* dq, int n_heads, int n,
                                             int d, int causal, int self_penalty, int unit_keys,
                                             float scale, int act_bf16) {
    const int h = blockIdx.y;
    if (d > ATTN_MAX_D || h >= n_heads) {
        return;
    }
    const AttnProblem P = exact_problem(q, k, v, act_bf16, key_valid, valid_per_head, h, n, d,
                                        causal, self_penalty, unit_keys, scale);
    const long long q_begin = (long long)blockIdx.x * ATTN_ROWS_BWD;
    if (q_begin >= n) {
        return;
    }
    const int q_count = (int)min((long long)ATTN_ROWS_BWD, (long long)n - q_begin);
    const long long k_end = causal ? min((long long)n, q_begin + q_count) : (long long)n;
    const long long head_rows = (long long)h * n;
    attn_backward_dq_rows(P, q_begin, q_count, one_range(0, k_end),
                          act_offset(dout, head_rows * d, act_bf16),
                          single_round_lse(lse + head_rows), delta + head_rows,
                          dq + head_rows * d);
}

extern "C" __global__ void exact_attn_bwd_dkdv(const void* q, const void* k, const void* v,
                                               const unsigned char* key_valid,
                                               int valid_per_head, const void* dout,
                                               const float* lse, const float* delta, float* dk,
                                               float* dv, int n_heads, int n, int d, int causal,
                                               int self_penalty, int unit_keys, float scale,
                                               int act_bf16) {
    const int h = blockIdx.y;
    if (d > ATTN_MAX_D || h >= n_heads) {
        return;
    }
    const AttnProblem P = exact_problem(q, k, v, act_bf16, key_valid, valid_per_head, h, n, d,
                                        causal, self_penalty, unit_keys, scale);
    const long long k_begin = (long long)blockIdx.x * ATTN_ROWS_BWD;
    if (k_begin >= n) {
        return;
    }
    const int k_count = (int)min((long long)ATTN_ROWS_BWD, (long long)n - k_begin);
    const long long q_first = causal ? k_begin : 0;
    const long long head_rows = (long long)h * n;
    attn_backward_dkdv_rows(P, k_begin, k_count, one_range(q_first, n),
                            act_offset(dout, head_rows * d, act_bf16),
                            single_round_lse(lse + head_rows), delta + head_rows,
                            dk + head_rows * d, dv + head_rows * d);
}
