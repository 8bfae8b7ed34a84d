//! Angular LSH: random rotations and `h(x) = argmax([xR ; −xR])`, with factorised buckets
//! `h = h1 + b1·h2` when the bucket count is split into two factors.

use reformer_engine::{matmul, Rng};

use crate::error::{AttentionError, Result};

/// How many buckets a round hashes into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Buckets {
    /// `b` buckets from one rotation of `b/2` columns.
    Single(usize),
    /// `b1·b2` buckets from two rotations of `b1/2` and `b2/2` columns: `h = h1 + b1·h2`.
    Factorised(usize, usize),
}

impl Buckets {
    /// The default for length `n` and chunk length `m`: the power of two nearest `2n/m`
    /// (at least 2), factorised into two near-equal powers of two above 128 buckets.
    pub fn auto(n: usize, m: usize) -> Buckets {
        let target = (2.0 * n as f64 / m.max(1) as f64).max(2.0);
        let exp = target.log2().round().max(1.0) as u32;
        let b = 1usize << exp;
        if b > 128 {
            let b1 = 1usize << (exp / 2);
            Buckets::Factorised(b1, b / b1)
        } else {
            Buckets::Single(b)
        }
    }

    pub fn total(&self) -> usize {
        match *self {
            Buckets::Single(b) => b,
            Buckets::Factorised(b1, b2) => b1 * b2,
        }
    }

    /// Bucket counts of the factors.
    pub fn factors(&self) -> Vec<usize> {
        match *self {
            Buckets::Single(b) => vec![b],
            Buckets::Factorised(b1, b2) => vec![b1, b2],
        }
    }

    /// Rotation columns per round: the sum of `b_f / 2` over the factors.
    pub fn rotation_cols(&self) -> usize {
        self.factors().iter().map(|b| b / 2).sum()
    }

    pub fn validate(&self) -> Result<()> {
        let f = self.factors();
        if f.iter().any(|&b| b < 1 || (b > 1 && b % 2 != 0)) {
            return Err(AttentionError::Config(format!(
                "bucket counts must be 1 or even per factor, got {self:?}"
            )));
        }
        let total = f.iter().try_fold(1usize, |t, &b| t.checked_mul(b));
        if total.is_none_or(|t| t > u32::MAX as usize / 2) {
            return Err(AttentionError::Config(format!(
                "too many buckets: {self:?}"
            )));
        }
        Ok(())
    }
}

/// The rotations of every round: per round, a `d × rotation_cols` matrix whose first `b1/2`
/// columns serve factor 1 and the next `b2/2` factor 2.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotations {
    pub d: usize,
    pub n_rounds: usize,
    pub buckets: Buckets,
    /// `[n_rounds, d, rotation_cols]`, row-major.
    pub data: Vec<f32>,
}

impl Rotations {
    /// Standard-normal rotations drawn from `rng`.
    pub fn random(d: usize, n_rounds: usize, buckets: Buckets, rng: &mut Rng) -> Result<Self> {
        buckets.validate()?;
        let mut data = vec![0.0; n_rounds * d * buckets.rotation_cols()];
        rng.fill_normal(&mut data, 1.0);
        Ok(Self {
            d,
            n_rounds,
            buckets,
            data,
        })
    }

    /// Rotations given explicitly, `[n_rounds, d, rotation_cols]`.
    pub fn explicit(d: usize, n_rounds: usize, buckets: Buckets, data: Vec<f32>) -> Result<Self> {
        buckets.validate()?;
        let want = n_rounds * d * buckets.rotation_cols();
        if data.len() != want {
            return Err(AttentionError::Shape {
                op: "Rotations::explicit",
                got: vec![data.len()],
                expected: vec![n_rounds, d, buckets.rotation_cols()],
            });
        }
        Ok(Self {
            d,
            n_rounds,
            buckets,
            data,
        })
    }

    fn round(&self, r: usize) -> &[f32] {
        let size = self.d * self.buckets.rotation_cols();
        &self.data[r * size..(r + 1) * size]
    }

    /// Buckets of `rows` vectors `x` (`rows × d`) for round `r`, written to `out`.
    /// `proj` is scratch of at least `rows × rotation_cols`.
    pub fn hash_round(&self, x: &[f32], r: usize, out: &mut [u32], proj: &mut Vec<f32>) {
        let rows = out.len();
        let cols = self.buckets.rotation_cols();
        proj.resize(rows * cols, 0.0);
        matmul::gemm(
            proj,
            x,
            self.round(r),
            rows,
            self.d,
            cols,
            false,
            false,
            false,
            matmul::Par::Serial,
        )
        .expect("hash buffers are sized here");
        let factors = self.buckets.factors();
        for (i, h) in out.iter_mut().enumerate() {
            let row = &proj[i * cols..(i + 1) * cols];
            let (mut offset, mut stride, mut bucket) = (0, 1u32, 0u32);
            for &b in &factors {
                let half = b / 2;
                bucket += stride * argmax_signed(&row[offset..offset + half]);
                offset += half;
                stride *= b.max(1) as u32;
            }
            *h = bucket;
        }
    }
}

impl Rotations {
    /// Buckets of `rows` rows in model layout (`[rows, heads·d]`), every head and round:
    /// `[heads, rounds, rows]`.
    pub fn hash_heads(&self, x: &[f32], rows: usize, heads: usize) -> Result<Vec<u32>> {
        let d = self.d;
        if x.len() < rows * heads * d {
            return Err(AttentionError::Shape {
                op: "Rotations::hash_heads",
                got: vec![x.len()],
                expected: vec![rows, heads, d],
            });
        }
        let mut out = vec![0u32; heads * self.n_rounds * rows];
        let (mut head_rows, mut proj) = (vec![0.0f32; rows * d], Vec::new());
        for h in 0..heads {
            for (i, row) in head_rows.chunks_exact_mut(d).enumerate() {
                let at = (i * heads + h) * d;
                row.copy_from_slice(&x[at..at + d]);
            }
            for r in 0..self.n_rounds {
                let at = (h * self.n_rounds + r) * rows;
                self.hash_round(&head_rows, r, &mut out[at..at + rows], &mut proj);
            }
        }
        Ok(out)
    }
}

/// `argmax([p ; −p])`: index in `[0, 2·len)`, the first on ties; 0 for an empty `p`.
pub fn argmax_signed(p: &[f32]) -> u32 {
    let (mut best, mut arg) = (f32::NEG_INFINITY, 0u32);
    for (i, &x) in p.iter().enumerate() {
        if x > best {
            best = x;
            arg = i as u32;
        }
    }
    for (i, &x) in p.iter().enumerate() {
        if -x > best {
            best = -x;
            arg = (p.len() + i) as u32;
        }
    }
    arg
}
