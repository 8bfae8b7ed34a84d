//! Layer norm of one row with a learned gain and bias: the row formulas every backend's layer
//! norm is checked against (the CPU backend calls them; the CUDA kernel `layer_norm.cu` is
//! their twin).

/// Added to the variance.
pub const LN_EPS: f32 = 1e-6;

/// Mean and `1/sqrt(var + eps)` of one row (two passes).
#[inline]
pub fn row_stats(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + LN_EPS).sqrt())
}

/// `y = (x − mean)·rstd·g + b` for one row.
#[inline]
pub fn normalize_row(x: &[f32], mean: f32, rstd: f32, g: &[f32], b: &[f32], y: &mut [f32]) {
    for j in 0..x.len() {
        y[j] = (x[j] - mean) * rstd * g[j] + b[j];
    }
}

/// Adds one row's input gradient to `dx`: with `dxhat = dy·g`,
/// `dx += rstd·(dxhat − mean(dxhat) − xhat·mean(dxhat·xhat))`.
#[inline]
pub fn backward_row_add(x: &[f32], dy: &[f32], g: &[f32], mean: f32, rstd: f32, dx: &mut [f32]) {
    let dim = x.len();
    let (mut s1, mut s2) = (0.0f32, 0.0f32);
    for j in 0..dim {
        let dxh = dy[j] * g[j];
        s1 += dxh;
        s2 += dxh * (x[j] - mean) * rstd;
    }
    let (m1, m2) = (s1 / dim as f32, s2 / dim as f32);
    for j in 0..dim {
        let xhat = (x[j] - mean) * rstd;
        dx[j] += rstd * (dy[j] * g[j] - m1 - xhat * m2);
    }
}
