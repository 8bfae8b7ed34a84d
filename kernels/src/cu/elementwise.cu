// Element-wise kernels over flat f32 buffers of `n` elements, and the f32 <-> bf16 casts.
// Launch: 1-D grid, any block size (a multiple of 32); every kernel is grid-stride, so any grid
// covers any `n`. Outputs may alias inputs where a comment says so.
//
// bf16 is handled as its bits (an unsigned short, the upper half of an f32) with common.cuh's
// conversions, so this family needs no CUDA header (cuda_bf16.h) and its casts round exactly
// as the kernels' own bf16 stores and the host's `half::bf16::from_f32` do.

// x[i] = value
extern "C" __global__ void ew_fill(float* x, float value, long long n) {
    GRID_STRIDE_LOOP(i, n) { x[i] = value; }
}

// y[i] = alpha * x[i]   (y may be x)
extern "C" __global__ void ew_scale(const float* x, float alpha, float* y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = alpha * x[i]; }
}

// y[i] = a[i] + b[i]   (y may be a or b)
extern "C" __global__ void ew_add(const float* a, const float* b, float* y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = a[i] + b[i]; }
}

// y[i] += alpha * x[i]   (x and y must not overlap unless equal)
extern "C" __global__ void ew_axpy(float alpha, const float* x, float* y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] += alpha * x[i]; }
}

// y[i] = max(x[i], 0)   (y may be x)
extern "C" __global__ void ew_relu_fwd(const float* x, float* y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = fmaxf(x[i], 0.0f); }
}

// dx[i] (+)= x[i] > 0 ? dy[i] : 0, where x is the relu's input; `accumulate` != 0 adds to dx.
// (dx may be dy when not accumulating.)
extern "C" __global__ void ew_relu_bwd(const float* x, const float* dy, float* dx, long long n,
                                       int accumulate) {
    GRID_STRIDE_LOOP(i, n) {
        const float g = x[i] > 0.0f ? dy[i] : 0.0f;
        dx[i] = accumulate ? dx[i] + g : g;
    }
}

// y[i] = bf16(x[i]), rounding to nearest even (NaN stays NaN, quiet).
extern "C" __global__ void ew_f32_to_bf16(const float* x, unsigned short* y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = float_to_bf16_bits(x[i]); }
}

// y[i] = f32(x[i]) (exact).
extern "C" __global__ void ew_bf16_to_f32(const unsigned short* x, float* y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = bf16_bits_to_float(x[i]); }
}

// x[r, :] = x[r, :] / sqrt(|x[r, :]|^2 + 1e-12) in place (unit keys, as the attention kernels
// form them), f32. One warp per row: block (32, W), grid ceil(rows / W).
extern "C" __global__ void ew_unit_rows(float* x, long long rows, int cols) {
    const long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= rows) {
        return;
    }
    float* xr = x + r * cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += 32) {
        s += xr[c] * xr[c];
    }
    const float inv = 1.0f / sqrtf(warp_sum(s) + 1e-12f);
    for (int c = threadIdx.x; c < cols; c += 32) {
        xr[c] *= inv;
    }
}

// out[r] = sum_c a[r, c] * b[r, c] for `rows` rows of `cols` (the `delta = dO . O` of the
// attention backward passes). a and b are bf16 when act_bf16 != 0, else f32; the products and
// the sum are f32 either way, out is f32. One warp per row: block (32, W), grid ceil(rows / W).
extern "C" __global__ void ew_row_dot(const void* a, const void* b, float* out, long long rows,
                                      int cols, int act_bf16) {
    const long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= rows) {
        return;
    }
    const void* ar = act_offset(a, r * cols, act_bf16);
    const void* br = act_offset(b, r * cols, act_bf16);
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += 32) {
        s += load_act(ar, c, act_bf16) * load_act(br, c, act_bf16);
    }
    s = warp_sum(s);
    if (threadIdx.x == 0) {
        out[r] = s;
    }
}
