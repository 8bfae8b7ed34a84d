//! Dense matrix products on the CPU through the `gemm` crate (row-major, transposes free).

use crate::error::{EngineError, Result};

/// Whether a product may spread over rayon's threads. Inside an already parallel loop (per
/// head, round or chunk) use `Serial`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Par {
    Serial,
    Rayon,
}

/// `c[m×n] = (accumulate ? c : 0) + op(a)[m×k] · op(b)[k×n]`, all row-major.
/// `op(a)` is `a` stored `[m, k]`, or with `ta` its transpose stored `[k, m]`; likewise `b`
/// (`[k, n]`, or `[n, k]` with `tb`).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    if a.len() < m * k || b.len() < k * n || c.len() < m * n {
        return Err(EngineError::InvalidArgument(format!(
            "gemm {m}x{k}x{n}: buffers too small (a {}, b {}, c {})",
            a.len(),
            b.len(),
            c.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return Ok(());
    }
    if m <= SMALL_M && !ta {
        small_m(c, a, b, m, k, n, tb, accumulate);
        return Ok(());
    }
    // Row-major strides: element (i, j) of a [rows, cols] matrix is at i*cols + j.
    let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
    let parallelism = match par {
        Par::Serial => gemm::Parallelism::None,
        Par::Rayon => gemm::Parallelism::Rayon(0),
    };
    // SAFETY: the bounds above guarantee every (row, col) the strides reach lies inside the
    // slices; `c` is borrowed mutably and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let x = if ta { a[p * m + i] } else { a[i * k + p] };
                    let y = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += x as f64 * y as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn matches_naive_for_all_transposes() {
        let mut rng = Rng::new(3);
        // m ≤ 4 without `ta` takes the row-by-row path.
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 300, 65),
            (4, 40, 9),
            (5, 7, 3),
            (33, 64, 17),
            (64, 128, 64),
        ] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let mut a = vec![0.0; m * k];
                    let mut b = vec![0.0; k * n];
                    rng.fill_normal(&mut a, 1.0);
                    rng.fill_normal(&mut b, 1.0);
                    let want = naive(&a, &b, m, k, n, ta, tb);
                    let mut c = vec![1.0; m * n];
                    gemm(&mut c, &a, &b, m, k, n, ta, tb, false, Par::Serial).unwrap();
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
                    }
                    // accumulate adds the product once more
                    gemm(&mut c, &a, &b, m, k, n, ta, tb, true, Par::Rayon).unwrap();
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - 2.0 * y).abs() <= 2e-4 * (1.0 + y.abs()));
                    }
                }
            }
        }
    }
}

/// Rows of `a` up to which [`gemm`] multiplies row by row, reading `b` once per row: a decoding
/// step's products (one position) would spend more time packing `b` than multiplying.
const SMALL_M: usize = 4;

/// `c[i, :] (+)= a[i, :] · op(b)` one row at a time: rows of `b` scaled and added (`b` as
/// stored), or dot products with its rows (`b` transposed). On one thread: a decoding step's
/// products are bound by reading `b`, and splitting them over two cores measured slower
/// (`bench/results/2026-12-01-cpu-2core-epyc-generate/threads.log`).
#[allow(clippy::too_many_arguments)]
fn small_m(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    tb: bool,
    accumulate: bool,
) {
    for i in 0..m {
        let (a_row, c_row) = (&a[i * k..(i + 1) * k], &mut c[i * n..(i + 1) * n]);
        if tb {
            for (j, y) in c_row.iter_mut().enumerate() {
                let v = crate::ops::dot(a_row, &b[j * k..(j + 1) * k]);
                *y = if accumulate { *y + v } else { v };
            }
        } else {
            if !accumulate {
                c_row.fill(0.0);
            }
            for (l, &x) in a_row.iter().enumerate() {
                for (y, &w) in c_row.iter_mut().zip(&b[l * n..(l + 1) * n]) {
                    *y += x * w;
                }
            }
        }
    }
}
