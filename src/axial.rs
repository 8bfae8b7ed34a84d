//! Axial position embeddings: positions are laid out on an `a1 × a2` grid (row-major), and
//! position `p = i·a2 + j` gets `concat(T1[i], T2[j])` with `T1: [a1, e1]`, `T2: [a2, e2]`,
//! `e1 + e2 = d_model`. Any length up to `a1·a2` is served; a shorter sequence uses the first
//! positions. Parameters: `(a1·e1 + a2·e2)` instead of `a1·a2·d_model`.

use reformer_engine::{MemoryPool, Rng};

use crate::error::{ReformerError, Result};
use crate::param::{param_randn, HasParams, Param};

#[derive(Debug)]
pub struct AxialPositions {
    pub rows: Param,
    pub cols: Param,
    shape: (usize, usize),
    dims: (usize, usize),
}

impl AxialPositions {
    pub fn new(
        pool: &MemoryPool,
        shape: (usize, usize),
        dims: (usize, usize),
        rng: &mut Rng,
    ) -> Result<Self> {
        Ok(Self {
            rows: param_randn(pool, "embed.axial.0", &[shape.0, dims.0], 1.0, rng)?,
            cols: param_randn(pool, "embed.axial.1", &[shape.1, dims.1], 1.0, rng)?,
            shape,
            dims,
        })
    }

    pub fn max_len(&self) -> usize {
        self.shape.0 * self.shape.1
    }

    fn check_len(&self, len: usize) -> Result<()> {
        if len == 0 || len > self.max_len() {
            return Err(ReformerError::Length {
                len,
                max_len: self.max_len(),
            });
        }
        Ok(())
    }

    /// Adds the embeddings of positions `0..len` to `x` (`len × d_model`).
    pub fn forward_add(&self, x: &mut [f32], len: usize) -> Result<()> {
        self.check_len(len)?;
        let (e1, e2) = self.dims;
        let a2 = self.shape.1;
        let (t1, t2) = (self.rows.value.data(), self.cols.value.data());
        for (p, row) in x.chunks_mut(e1 + e2).take(len).enumerate() {
            let (i, j) = (p / a2, p % a2);
            let (left, right) = row.split_at_mut(e1);
            for (v, t) in left.iter_mut().zip(&t1[i * e1..(i + 1) * e1]) {
                *v += t;
            }
            for (v, t) in right.iter_mut().zip(&t2[j * e2..(j + 1) * e2]) {
                *v += t;
            }
        }
        Ok(())
    }

    /// Accumulates the tables' gradients from `dx` (`len × d_model`).
    pub fn backward(&mut self, dx: &[f32], len: usize) -> Result<()> {
        self.check_len(len)?;
        let (e1, e2) = self.dims;
        let a2 = self.shape.1;
        let g1 = self.rows.grad.data_mut();
        let g2 = self.cols.grad.data_mut();
        for (p, row) in dx.chunks(e1 + e2).take(len).enumerate() {
            let (i, j) = (p / a2, p % a2);
            let (left, right) = row.split_at(e1);
            for (g, v) in g1[i * e1..(i + 1) * e1].iter_mut().zip(left) {
                *g += v;
            }
            for (g, v) in g2[j * e2..(j + 1) * e2].iter_mut().zip(right) {
                *g += v;
            }
        }
        Ok(())
    }
}

impl HasParams for AxialPositions {
    fn params(&self) -> Vec<&Param> {
        vec![&self.rows, &self.cols]
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        vec![&mut self.rows, &mut self.cols]
    }
}
