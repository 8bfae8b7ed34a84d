//! Shared checks and helpers for `[heads, len, d]` attention inputs.

use reformer_engine::Tensor;

use crate::error::{shape_err, AttentionError, Result};

/// Dimensions of a `[heads, len, d]` attention input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub heads: usize,
    pub len: usize,
    pub d: usize,
}

impl Dims {
    pub fn of(op: &'static str, t: &Tensor) -> Result<Dims> {
        match *t.shape() {
            [heads, len, d] if len > 0 && d > 0 => Ok(Dims { heads, len, d }),
            _ => Err(shape_err(op, t.shape(), &[0, 0, 0])),
        }
    }

    pub fn expect(&self, op: &'static str, t: &Tensor) -> Result<()> {
        if t.shape() != [self.heads, self.len, self.d] {
            return Err(shape_err(op, t.shape(), &[self.heads, self.len, self.d]));
        }
        Ok(())
    }

    pub fn shape(&self) -> [usize; 3] {
        [self.heads, self.len, self.d]
    }
}

/// Which keys may be attended to: `None` (all), or a mask of `len` (shared by every head) or
/// `heads × len` entries, `false` for padding.
#[derive(Debug, Clone, Copy)]
pub struct KeyMask<'a> {
    mask: Option<&'a [bool]>,
    len: usize,
}

impl<'a> KeyMask<'a> {
    pub fn new(mask: Option<&'a [bool]>, dims: Dims) -> Result<Self> {
        if let Some(m) = mask {
            if m.len() != dims.len && m.len() != dims.len * dims.heads {
                return Err(shape_err(
                    "key padding mask",
                    &[m.len()],
                    &[dims.heads, dims.len],
                ));
            }
        }
        Ok(Self {
            mask,
            len: dims.len,
        })
    }

    /// Whether position `pos` of head `h` may be attended to (never for `pos ≥ len`).
    #[inline]
    pub fn valid(&self, h: usize, pos: usize) -> bool {
        if pos >= self.len {
            return false;
        }
        match self.mask {
            None => true,
            Some(m) if m.len() == self.len => m[pos],
            Some(m) => m[h * self.len + pos],
        }
    }
}

/// Checks a chunk length; any sequence length is served (the last chunk is padded and
/// masked inside).
pub fn check_chunk(chunk: usize, len: usize) -> Result<()> {
    if chunk == 0 {
        return Err(AttentionError::Config(format!(
            "chunk length must be positive (sequence length {len}); the presets use 64"
        )));
    }
    Ok(())
}

/// Copies rows `src[perm[i]]` (`d` wide) into `dst` row `i`; rows with `perm[i] ≥ n` are 0.
pub fn gather_rows(src: &[f32], perm: &[u32], n: usize, d: usize, dst: &mut [f32]) {
    for (row, &p) in dst.chunks_exact_mut(d).zip(perm) {
        let p = p as usize;
        if p < n {
            row.copy_from_slice(&src[p * d..(p + 1) * d]);
        } else {
            row.fill(0.0);
        }
    }
}
