// Cross-entropy over rows of logits [rows, vocab], for the chunked LM loss: the host runs the LM
// head and these kernels over one chunk of positions at a time, so logits never exist for the
// whole sequence.
//
//   lse[r]  = log sum_c exp(logits[r, c])          (max-shifted: stable for any logits)
//   loss[r] = lse[r] - logits[r, target[r]]
//   dlogits[r, c] = scale * (exp(logits[r, c] - lse[r]) - [c == target[r]])
//
// A target >= vocab (e.g. 0xffffffff) marks an ignored row: loss 0, dlogits 0.

// Launch: block (32, W), grid ceil(rows / W): one warp per row.
extern "C" __global__ void xent_fwd(const float* logits, const unsigned* targets, float* loss,
                                    float* lse, long long rows, int vocab) {
    const long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= rows) {
        return;
    }
    const float* row = logits + r * vocab;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < vocab; c += 32) {
        m = fmaxf(m, row[c]);
    }
    m = warp_max(m);
    float s = 0.0f;
    for (int c = threadIdx.x; c < vocab; c += 32) {
        s += expf(row[c] - m);
    }
    s = warp_sum(s);
    if (threadIdx.x == 0) {
        const float z = m + logf(s);
        const unsigned t = targets[r];
        lse[r] = z;
        loss[r] = t < (unsigned)vocab ? z - row[t] : 0.0f;
    }
}

// `lse` from xent_fwd. dlogits may be logits (in place). Launch: 1-D, grid-stride over
// rows * vocab.
extern "C" __global__ void xent_bwd(const float* logits, const unsigned* targets, const float* lse,
                                    float* dlogits, long long rows, int vocab, float scale) {
    GRID_STRIDE_LOOP(idx, rows * vocab) {
        const long long r = idx / vocab;
        const unsigned c = (unsigned)(idx - r * vocab);
        const unsigned t = targets[r];
        float g = 0.0f;
        if (t < (unsigned)vocab) {
            g = expf(logits[idx] - lse[r]) - (c == t ? 1.0f : 0.0f);
        }
        dlogits[idx] = scale * g;
    }
}
