//! Shared helpers of the integration tests: random data, the test loss, and a
//! central-difference gradient checker.
#![allow(dead_code)]

use reformer_engine::{MemoryPool, Rng, Tensor};
use reformer_reversible::{AttentionKind, LayerConfig};

/// A small layer: batch·len = 32 positions, d_model 8, two heads of 4, d_ff 16, chunks of 4
/// for attention and 5 (dividing neither len nor batch·len) for the feed-forward.
pub fn small_cfg(attention: AttentionKind, seed: u64) -> LayerConfig {
    LayerConfig {
        d_model: 8,
        d_ff: 16,
        n_heads: 2,
        d_head: 4,
        attention,
        chunk_len: 4,
        n_buckets: None,
        n_rounds: 2,
        ff_chunk: 5,
        head_group: 0,
        causal: true,
        dropout: 0.0,
        seed,
    }
}

pub fn randn(pool: &MemoryPool, shape: &[usize], std: f32, seed: u64) -> Tensor {
    Tensor::randn(pool, shape, std, &mut Rng::new(seed)).unwrap()
}

/// `Σ y∘w` in f64.
pub fn dot64(y: &Tensor, w: &Tensor) -> f64 {
    y.data()
        .iter()
        .zip(w.data())
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum()
}

/// Settings of a finite-difference check.
///
/// For each coordinate the steps are tried largest first; the first step at which no
/// evaluation point is skipped (e.g. no LSH bucket moved, no ReLU switched) is used. The
/// derivative is the central difference `(L(+ε) − L(−ε)) / 2ε` (error O(ε²)) or, with
/// `fourth_order`, the five-point `(8(L(+ε) − L(−ε)) − (L(+2ε) − L(−2ε))) / 12ε` (O(ε⁴)).
/// The check is `|a − n| / max(|a|, |n|, floor) ≤ tol` with `floor = noise / (ε · tol)`:
/// `noise` bounds the f32 rounding noise of the loss, so the floor is where the difference
/// quotient stops resolving the derivative to `tol`.
#[derive(Debug, Clone, Copy)]
pub struct Fd {
    pub steps: &'static [f32],
    pub tol: f64,
    pub noise: f64,
    pub fourth_order: bool,
}

impl Fd {
    pub fn floor(&self, eps: f32) -> f64 {
        self.noise / (eps as f64 * self.tol)
    }
}

/// Module-level checks: five-point differences with steps 2e-2 (then 1e-2, 5e-3). The
/// loss's rounding noise measured on these problems is about 1.5e-6; `noise` is twice that,
/// giving a floor of 1.5e-2 at the first step.
pub const FD: Fd = Fd {
    steps: &[2e-2, 1e-2, 5e-3],
    tol: 1e-2,
    noise: 3e-6,
    fourth_order: true,
};

/// Outcome of checking one group of coordinates.
#[derive(Debug, Clone)]
pub struct GroupCheck {
    pub name: String,
    pub checked: usize,
    pub skipped: usize,
    /// Largest relative error and where: (index, analytic, numeric, step).
    pub max_rel: f64,
    pub worst: Option<(usize, f64, f64, f32)>,
}

/// Checks every coordinate of a group. `eval(j, v)` must set coordinate `j` to `v`, return
/// the loss (or `None` to skip the point, e.g. when a bucket moved), and restore it.
pub fn check_group(
    name: &str,
    base: &[f32],
    analytic: &[f32],
    fd: Fd,
    mut eval: impl FnMut(usize, f32) -> Option<f64>,
) -> GroupCheck {
    assert_eq!(base.len(), analytic.len(), "{name}: analytic gradient size");
    let mut out = GroupCheck {
        name: name.to_string(),
        checked: 0,
        skipped: 0,
        max_rel: 0.0,
        worst: None,
    };
    for j in 0..base.len() {
        // Differences at points actually represented in f32: (L(x+e) − L(x−e), 2e).
        let mut diff = |e: f32| -> Option<(f64, f64)> {
            let (xp, xm) = (base[j] + e, base[j] - e);
            Some((eval(j, xp)? - eval(j, xm)?, xp as f64 - xm as f64))
        };
        let mut found = None;
        for &eps in fd.steps {
            let numeric = if fd.fourth_order {
                diff(eps).and_then(|(d1, h1)| {
                    diff(2.0 * eps).map(|(d2, h2)| (8.0 * d1 - d2) / (3.0 * h1 + 1.5 * h2))
                })
            } else {
                diff(eps).map(|(d, h)| d / h)
            };
            if let Some(n) = numeric {
                found = Some((n, eps));
                break;
            }
        }
        let Some((numeric, eps)) = found else {
            out.skipped += 1;
            continue;
        };
        let a = analytic[j] as f64;
        let rel = (a - numeric).abs() / a.abs().max(numeric.abs()).max(fd.floor(eps));
        out.checked += 1;
        if rel > out.max_rel {
            out.max_rel = rel;
            out.worst = Some((j, a, numeric, eps));
        }
    }
    out
}

/// Asserts every group passed, at least `min_group` of each group's coordinates and
/// `min_total` of all coordinates were checked (not skipped).
pub fn assert_groups(groups: &[GroupCheck], fd: Fd, min_group: f64, min_total: f64) {
    for g in groups {
        eprintln!(
            "{:<28} checked {:>4} skipped {:>3} max rel {:.2e} worst {:?}",
            g.name, g.checked, g.skipped, g.max_rel, g.worst
        );
    }
    let checked: usize = groups.iter().map(|g| g.checked).sum();
    let total: usize = groups.iter().map(|g| g.checked + g.skipped).sum();
    eprintln!("checked {checked} of {total} coordinates");
    assert!(
        checked as f64 >= min_total * total as f64,
        "only {checked} of {total} coordinates checked"
    );
    for g in groups {
        let n = g.checked + g.skipped;
        assert!(
            g.checked >= 1 && g.checked as f64 >= min_group * n as f64,
            "{}: only {} of {} coordinates checked",
            g.name,
            g.checked,
            n
        );
        assert!(
            g.max_rel <= fd.tol,
            "{}: relative error {:.3e} > {:.1e} at {:?} (index, analytic, numeric, step)",
            g.name,
            g.max_rel,
            fd.tol,
            g.worst
        );
    }
}

/// Sets coordinate `j` of `t` to `v`, runs `f`, restores it.
pub fn with_coord<T>(t: &mut Tensor, j: usize, v: f32, f: impl FnOnce(&Tensor) -> T) -> T {
    let orig = t.data()[j];
    t.data_mut()[j] = v;
    let r = f(t);
    t.data_mut()[j] = orig;
    r
}

/// `n_layers` layers alternating local (even) and LSH (odd) attention, as in the presets, at a
/// small size: d_model 16, 2 heads of 8, d_ff 32, chunks of 8, feed-forward chunks of 12.
pub fn alternating(n_layers: usize, dropout: f32) -> Vec<LayerConfig> {
    (0..n_layers)
        .map(|i| LayerConfig {
            d_model: 16,
            d_ff: 32,
            n_heads: 2,
            d_head: 8,
            attention: if i % 2 == 0 {
                AttentionKind::Local
            } else {
                AttentionKind::Lsh
            },
            chunk_len: 8,
            n_buckets: None,
            n_rounds: 2,
            ff_chunk: 12,
            head_group: 0,
            causal: true,
            dropout,
            seed: 1000 + i as u64,
        })
        .collect()
}

/// Largest absolute entry.
pub fn max_abs(t: &Tensor) -> f32 {
    t.data().iter().fold(0.0, |m, x| m.max(x.abs()))
}
