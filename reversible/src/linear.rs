//! Dense helpers on row-major slices: `y = x·W`, its two backward products, bias and column
//! sums. Weights are stored `[in, out]`.

use reformer_engine::matmul::{gemm, Par};

use crate::error::Result;
use crate::par::for_rows;

/// `y[rows, n] (+)= x[rows, k] · w[k, n]`.
pub fn matmul(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) -> Result<()> {
    gemm(y, x, w, rows, k, n, false, false, accumulate, Par::Rayon)?;
    Ok(())
}

/// `dx[rows, k] (+)= dy[rows, n] · wᵀ` with `w` stored `[k, n]`.
pub fn matmul_wt(
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    rows: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) -> Result<()> {
    gemm(dx, dy, w, rows, n, k, false, true, accumulate, Par::Rayon)?;
    Ok(())
}

/// `dw[k, n] += xᵀ · dy` over `rows` rows.
pub fn acc_weight_grad(
    dw: &mut [f32],
    x: &[f32],
    dy: &[f32],
    rows: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    gemm(dw, x, dy, k, rows, n, true, false, true, Par::Rayon)?;
    Ok(())
}

/// Adds `b` to every row of `y` (`width = b.len()`).
pub fn add_bias(y: &mut [f32], b: &[f32]) {
    let n = y.len();
    for_rows(y, b.len(), n, |_, row| {
        for (y, b) in row.iter_mut().zip(b) {
            *y += b;
        }
    });
}

/// Columns handled by one task of the column reductions.
pub const COL_BLOCK: usize = 16;

/// `dst[j] += Σ_rows src[r, j]` (`width = dst.len()`), summed in f64, parallel over column
/// blocks (deterministic: each column's order of addition is fixed).
pub fn add_column_sums(dst: &mut [f32], src: &[f32]) {
    let width = dst.len();
    if width == 0 {
        return;
    }
    for_rows(dst, COL_BLOCK, src.len(), |cb, out| {
        let c0 = cb * COL_BLOCK;
        let mut acc = [0.0f64; COL_BLOCK];
        for row in src.chunks_exact(width) {
            for (a, &x) in acc.iter_mut().zip(&row[c0..c0 + out.len()]) {
                *a += x as f64;
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o += a as f32;
        }
    });
}

/// `y += sign · x`, elementwise (in parallel when large).
pub fn axpy_par(y: &mut [f32], sign: f32, x: &[f32]) {
    const BLOCK: usize = 1 << 14;
    let n = y.len();
    for_rows(y, BLOCK, n, |i, y| {
        reformer_engine::ops::axpy(y, sign, &x[i * BLOCK..i * BLOCK + y.len()])
    });
}

/// `y = max(y, 0)`, elementwise (in parallel when large).
pub fn relu(y: &mut [f32]) {
    const BLOCK: usize = 1 << 14;
    let n = y.len();
    for_rows(y, BLOCK, n, |_, y| {
        for v in y {
            *v = v.max(0.0);
        }
    });
}

/// `g = 0` where `h ≤ 0` (the ReLU's backward, given its output `h`).
pub fn relu_backward(g: &mut [f32], h: &[f32]) {
    const BLOCK: usize = 1 << 14;
    let n = g.len();
    for_rows(g, BLOCK, n, |i, g| {
        for (g, &h) in g.iter_mut().zip(&h[i * BLOCK..]) {
            if h <= 0.0 {
                *g = 0.0;
            }
        }
    });
}
