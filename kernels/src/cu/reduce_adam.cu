// Reductions (sum, sum of squares for the global gradient norm) and the Adam(W) update.
//
// Reductions are two-stage and deterministic for a fixed launch geometry: `*_partial` writes one
// partial per block (grid-stride, then a fixed tree inside the block), `reduce_partials` sums
// the partials in a single block. Summing several tensors (all parameter gradients) into one
// scalar: run `sum_squares_partial` + `reduce_partials(accumulate = 1)` per tensor.

// partials[blockIdx.x] = sum over this block's grid-stride elements of x^2.
// Launch: 1-D blocks of a multiple of 32 threads (<= 1024), any grid (the partials buffer holds
// gridDim.x floats).
extern "C" __global__ void sum_squares_partial(const float* x, long long n, float* partials) {
    __shared__ float scratch[32];
    float s = 0.0f;
    GRID_STRIDE_LOOP(i, n) {
        const float v = x[i];
        s += v * v;
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = s;
    }
}

// partials[blockIdx.x] = sum over this block's grid-stride elements of x. Launch as above.
extern "C" __global__ void sum_partial(const float* x, long long n, float* partials) {
    __shared__ float scratch[32];
    float s = 0.0f;
    GRID_STRIDE_LOOP(i, n) { s += x[i]; }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = s;
    }
}

// out[0] (+)= sum of partials[0 .. n_partials). Launch: one block, 1-D, multiple of 32 threads.
extern "C" __global__ void reduce_partials(const float* partials, int n_partials, float* out,
                                           int accumulate) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n_partials; i += blockDim.x) {
        s += partials[i];
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        out[0] = accumulate ? out[0] + s : s;
    }
}

// One Adam step (AdamW when weight_decay > 0: decoupled decay) on n parameters:
//   norm = sqrt(*grad_sumsq),  clip = norm > max_norm ? max_norm / norm : 1   (as the CPU)
//   g = clip * grad
//   m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2
//   param -= lr * ((m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)
//                  + weight_decay * param)
// `grad_sumsq` (device scalar, e.g. from sum_squares_partial + reduce_partials over every
// gradient) may be null: no clipping; max_norm <= 0 also disables clipping. step >= 1.
// Reading the norm on the device keeps the step free of host synchronisation.
// Launch: 1-D, grid-stride.
extern "C" __global__ void adam_update(float* param, const float* grad, float* m, float* v,
                                       long long n, float lr, float beta1, float beta2, float eps,
                                       float weight_decay, int step, const float* grad_sumsq,
                                       float max_norm) {
    float clip = 1.0f;
    if (grad_sumsq != nullptr && max_norm > 0.0f) {
        const float norm = sqrtf(*grad_sumsq);
        if (norm > max_norm) {
            clip = max_norm / norm;
        }
    }
    const float t = (float)(step < 1 ? 1 : step);
    const float bias1 = 1.0f - powf(beta1, t);
    const float bias2 = 1.0f - powf(beta2, t);
    GRID_STRIDE_LOOP(i, n) {
        const float g = clip * grad[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float update = (mi / bias1) / (sqrtf(vi / bias2) + eps);
        param[i] -= lr * (update + weight_decay * param[i]);
    }
}
