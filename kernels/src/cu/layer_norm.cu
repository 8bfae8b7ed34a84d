// Layer norm over the last dimension of a [rows, cols] tensor:
//   y = (x - mean) * rstd * gamma + beta,   rstd = 1 / sqrt(var + eps)   (biased variance)
//
// Forward stores mean and rstd per row for the backward pass. The backward is split so that it
// is deterministic without atomics:
//   layer_norm_bwd_dx      dx per row (one warp per row),
//   layer_norm_bwd_params  per-part partial sums of dgamma = sum dy * xhat and dbeta = sum dy
//                          over a fixed range of rows (one thread per column),
//   layer_norm_reduce_parts  sums the parts in a fixed order into dgamma / dbeta.

// Launch: block (32, W), grid ceil(rows / W). mean and rstd may be null (inference).
extern "C" __global__ void layer_norm_fwd(const float* x, const float* gamma, const float* beta,
                                          float* y, float* mean, float* rstd, long long rows,
                                          int cols, float eps) {
    const long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= rows) {
        return;
    }
    const float* xr = x + r * cols;
    float* yr = y + r * cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += 32) {
        s += xr[c];
    }
    const float mu = warp_sum(s) / (float)cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += 32) {
        const float t = xr[c] - mu;
        ss += t * t;
    }
    const float var = warp_sum(ss) / (float)cols;
    const float rs = 1.0f / sqrtf(var + eps);
    for (int c = threadIdx.x; c < cols; c += 32) {
        yr[c] = (xr[c] - mu) * rs * gamma[c] + beta[c];
    }
    if (threadIdx.x == 0) {
        if (mean) {
            mean[r] = mu;
        }
        if (rstd) {
            rstd[r] = rs;
        }
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * gamma,  xhat = (x - mean) * rstd.
// `accumulate` != 0 adds to dx. Launch: block (32, W), grid ceil(rows / W).
extern "C" __global__ void layer_norm_bwd_dx(const float* x, const float* gamma,
                                             const float* mean, const float* rstd,
                                             const float* dy, float* dx, long long rows, int cols,
                                             int accumulate) {
    const long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= rows) {
        return;
    }
    const float* xr = x + r * cols;
    const float* dyr = dy + r * cols;
    float* dxr = dx + r * cols;
    const float mu = mean[r];
    const float rs = rstd[r];
    float sg = 0.0f;
    float sgx = 0.0f;
    for (int c = threadIdx.x; c < cols; c += 32) {
        const float g = dyr[c] * gamma[c];
        sg += g;
        sgx += g * (xr[c] - mu) * rs;
    }
    const float a = warp_sum(sg) / (float)cols;
    const float b = warp_sum(sgx) / (float)cols;
    for (int c = threadIdx.x; c < cols; c += 32) {
        const float g = dyr[c] * gamma[c];
        const float xhat = (xr[c] - mu) * rs;
        const float v = rs * (g - a - xhat * b);
        dxr[c] = accumulate ? dxr[c] + v : v;
    }
}

// Part p sums rows [p * rows_per_part, min(rows, (p + 1) * rows_per_part)):
//   dgamma_parts[p, c] = sum dy * xhat,   dbeta_parts[p, c] = sum dy.
// Launch: 1-D blocks over columns, grid (ceil(cols / blockDim.x), n_parts).
extern "C" __global__ void layer_norm_bwd_params(const float* x, const float* mean,
                                                 const float* rstd, const float* dy,
                                                 float* dgamma_parts, float* dbeta_parts,
                                                 long long rows, int cols,
                                                 long long rows_per_part) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) {
        return;
    }
    const long long p = blockIdx.y;
    const long long r0 = p * rows_per_part;
    const long long r1 = min(rows, r0 + rows_per_part);
    float sg = 0.0f;
    float sb = 0.0f;
    for (long long r = r0; r < r1; ++r) {
        const float g = dy[r * cols + c];
        sg += g * (x[r * cols + c] - mean[r]) * rstd[r];
        sb += g;
    }
    dgamma_parts[p * cols + c] = sg;
    dbeta_parts[p * cols + c] = sb;
}

// out[c] (+)= sum_p parts[p, c], p in order. Launch: 1-D, grid ceil(cols / blockDim.x).
extern "C" __global__ void layer_norm_reduce_parts(const float* parts, float* out, int n_parts,
                                                   int cols, int accumulate) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) {
        return;
    }
    float s = 0.0f;
    for (int p = 0; p < n_parts; ++p) {
        s += parts[(long long)p * cols + c];
    }
    out[c] = accumulate ? out[c] + s : s;
}
