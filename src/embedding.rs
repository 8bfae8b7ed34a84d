//! The byte embedding: a `[256, d_model]` table, gathered forward, scatter-added backward.

use reformer_engine::{MemoryPool, Rng};

use crate::config::VOCAB;
use crate::error::Result;
use crate::param::{param_randn, HasParams, Param};

#[derive(Debug)]
pub struct TokenEmbedding {
    pub table: Param,
    d_model: usize,
}

impl TokenEmbedding {
    pub fn new(pool: &MemoryPool, d_model: usize, rng: &mut Rng) -> Result<Self> {
        Ok(Self {
            table: param_randn(pool, "embed.tokens", &[VOCAB, d_model], 1.0, rng)?,
            d_model,
        })
    }

    /// Writes the rows of `tokens` into `out` (`len × d_model`).
    pub fn forward(&self, tokens: &[u8], out: &mut [f32]) {
        let d = self.d_model;
        let table = self.table.value.data();
        for (row, &t) in out.chunks_mut(d).zip(tokens) {
            let t = t as usize;
            row.copy_from_slice(&table[t * d..(t + 1) * d]);
        }
    }

    /// Adds each row of `d_out` to its token's gradient row.
    pub fn backward(&mut self, tokens: &[u8], d_out: &[f32]) {
        let d = self.d_model;
        let grad = self.table.grad.data_mut();
        for (row, &t) in d_out.chunks(d).zip(tokens) {
            let t = t as usize;
            for (g, v) in grad[t * d..(t + 1) * d].iter_mut().zip(row) {
                *g += v;
            }
        }
    }
}

impl HasParams for TokenEmbedding {
    fn params(&self) -> Vec<&Param> {
        vec![&self.table]
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        vec![&mut self.table]
    }
}
