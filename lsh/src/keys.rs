//! Unit-length keys for shared-QK attention: `k = qk / sqrt(|qk|² + eps)`, and its backward.

use reformer_engine::ops::dot;

/// Keeps the normalisation smooth (and finite) at `qk = 0`.
pub const KEY_NORM_EPS: f32 = 1e-12;

/// Writes the unit keys of the rows of `qk` (`rows × d`) into `k`; returns nothing else.
pub fn normalize_rows(qk: &[f32], k: &mut [f32], d: usize) {
    for (x, y) in qk.chunks_exact(d).zip(k.chunks_exact_mut(d)) {
        let inv = 1.0 / (dot(x, x) + KEY_NORM_EPS).sqrt();
        for (a, b) in x.iter().zip(y.iter_mut()) {
            *b = a * inv;
        }
    }
}

/// Replaces the rows of `x` (`rows × d`) by their unit keys.
pub fn normalize_rows_in_place(x: &mut [f32], d: usize) {
    for row in x.chunks_exact_mut(d) {
        let inv = 1.0 / (dot(row, row) + KEY_NORM_EPS).sqrt();
        for a in row {
            *a *= inv;
        }
    }
}

/// Adds to `dqk` the gradient that flows through the normalisation from `dk`, for the rows
/// of `qk`: `dqk += (dk − k (k·dk)) / n` with `n = sqrt(|qk|² + eps)`, `k = qk / n`.
pub fn normalize_rows_backward(qk: &[f32], dk: &[f32], dqk: &mut [f32], d: usize) {
    for ((x, g), out) in qk
        .chunks_exact(d)
        .zip(dk.chunks_exact(d))
        .zip(dqk.chunks_exact_mut(d))
    {
        let n = (dot(x, x) + KEY_NORM_EPS).sqrt();
        let inv = 1.0 / n;
        let kg = dot(x, g) * inv;
        for i in 0..d {
            out[i] += (g[i] - x[i] * inv * kg) * inv;
        }
    }
}

/// Unit keys of a `[.., d]` tensor of shared query-keys.
pub fn unit_keys(qk: &reformer_engine::Tensor) -> reformer_engine::Result<reformer_engine::Tensor> {
    let d = *qk.shape().last().unwrap_or(&1);
    let mut k = qk.zeros_like()?;
    normalize_rows(qk.data(), k.data_mut(), d.max(1));
    Ok(k)
}

/// Gradient of shared query-keys when queries are `qk` and keys are [`unit_keys`]`(qk)`:
/// `d_qk = d_q + (normalisation backward of d_k)`.
pub fn shared_qk_grad(
    qk: &reformer_engine::Tensor,
    d_q: reformer_engine::Tensor,
    d_k: &reformer_engine::Tensor,
) -> reformer_engine::Tensor {
    let d = *qk.shape().last().unwrap_or(&1);
    let mut d_qk = d_q;
    normalize_rows_backward(qk.data(), d_k.data(), d_qk.data_mut(), d.max(1));
    d_qk
}
