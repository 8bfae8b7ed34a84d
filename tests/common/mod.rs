//! Helpers shared by the integration tests: random tensors and central differences.
#![allow(dead_code)]

use reformer_engine::{MemoryPool, Rng, Tensor};

pub fn randn(pool: &MemoryPool, shape: &[usize], std: f32, rng: &mut Rng) -> Tensor {
    Tensor::randn(pool, shape, std, rng).expect("test tensor")
}

/// `Σ a·w` in f64: the scalar loss whose gradient with respect to `a` is `w`.
pub fn weighted_sum(a: &Tensor, w: &Tensor) -> f64 {
    a.data()
        .iter()
        .zip(w.data())
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum()
}

/// Relative error with a floor that keeps near-zero gradients from dominating.
pub fn rel_err(a: f64, b: f64, floor: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(floor)
}

/// Checks `analytic` (the gradient of `loss` with respect to `x`) by central differences on
/// every coordinate. `loss` returns `None` when the perturbed point is not comparable (e.g.
/// an LSH bucket changed); such coordinates are skipped and counted. Returns
/// `(max relative error, checked, skipped)`.
pub fn check_gradient(
    x: &mut Tensor,
    analytic: &Tensor,
    eps: f32,
    floor: f64,
    mut loss: impl FnMut(&Tensor) -> Option<f64>,
) -> (f64, usize, usize) {
    let (mut worst, mut checked, mut skipped) = (0.0f64, 0, 0);
    for i in 0..x.numel() {
        let orig = x.data()[i];
        x.data_mut()[i] = orig + eps;
        let plus = loss(x);
        x.data_mut()[i] = orig - eps;
        let minus = loss(x);
        x.data_mut()[i] = orig;
        let (Some(plus), Some(minus)) = (plus, minus) else {
            skipped += 1;
            continue;
        };
        let numeric = (plus - minus) / (2.0 * eps as f64);
        let e = rel_err(numeric, analytic.data()[i] as f64, floor);
        if e > worst {
            worst = e;
        }
        checked += 1;
    }
    (worst, checked, skipped)
}

pub fn max_rel_diff(a: &Tensor, b: &Tensor, floor: f32) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.data()
        .iter()
        .zip(b.data())
        .map(|(&x, &y)| (x - y).abs() / x.abs().max(y.abs()).max(floor))
        .fold(0.0, f32::max)
}

/// Largest `|a − b| / (atol + rtol·|b|)`: ≤ 1 means every entry is within `atol + rtol·|b|`
/// (numpy's `allclose` rule) of the reference `b`.
pub fn allclose_ratio(a: &Tensor, b: &Tensor, rtol: f32, atol: f32) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.data()
        .iter()
        .zip(b.data())
        .map(|(&x, &y)| (x - y).abs() / (atol + rtol * y.abs()))
        .fold(0.0, f32::max)
}
