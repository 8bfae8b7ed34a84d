//! Moving between the model layout `[batch, len, heads·d_head]` (rows = positions) and the
//! attention layout `[batch·heads, len, d_head]` that the attention ops take, a block of rows
//! at a time, so the full-width model-layout copy never has to exist.

use reformer_engine::Tensor;

use crate::error::{shape_err, Result};
use crate::par::for_rows;

/// Sizes of a head split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadDims {
    pub batch: usize,
    pub len: usize,
    pub heads: usize,
    pub d_head: usize,
}

impl HeadDims {
    /// `[batch, len, heads·d_head]`.
    pub fn model_shape(&self) -> [usize; 3] {
        [self.batch, self.len, self.width()]
    }
    /// `[batch·heads, len, d_head]`.
    pub fn head_shape(&self) -> [usize; 3] {
        [self.batch * self.heads, self.len, self.d_head]
    }
    /// `heads·d_head`.
    pub fn width(&self) -> usize {
        self.heads * self.d_head
    }
    /// Positions over the batch: `batch·len`.
    pub fn rows(&self) -> usize {
        self.batch * self.len
    }

    fn check(
        &self,
        op: &'static str,
        t: &Tensor,
        r0: usize,
        rows: usize,
        block: usize,
    ) -> Result<()> {
        t.expect_shape(op, &self.head_shape())?;
        if r0 + rows > self.rows() || block != rows * self.width() {
            return Err(shape_err(
                op,
                &[r0 + rows, block],
                &[self.rows(), rows * self.width()],
            ));
        }
        Ok(())
    }
}

/// Writes the model-layout rows `r0..r0+rows` (`src`, `rows × heads·d_head`) into the head
/// layout `dst`.
pub fn scatter_rows(
    dst: &mut Tensor,
    src: &[f32],
    r0: usize,
    rows: usize,
    hd: HeadDims,
) -> Result<()> {
    hd.check("scatter_rows", dst, r0, rows, src.len())?;
    let HeadDims {
        len, heads, d_head, ..
    } = hd;
    let width = hd.width();
    for_rows(dst.data_mut(), len * d_head, src.len(), |bh, dst_h| {
        let (b, h) = (bh / heads, bh % heads);
        // Rows of batch element b inside r0..r0+rows.
        let lo = r0.max(b * len);
        let hi = (r0 + rows).min((b + 1) * len);
        for r in lo..hi {
            let i = r - b * len;
            let s = (r - r0) * width + h * d_head;
            dst_h[i * d_head..(i + 1) * d_head].copy_from_slice(&src[s..s + d_head]);
        }
    });
    Ok(())
}

/// Reads the model-layout rows `r0..r0+rows` of the head-layout `src` into `dst`
/// (`rows × heads·d_head`).
pub fn gather_rows(
    src: &Tensor,
    dst: &mut [f32],
    r0: usize,
    rows: usize,
    hd: HeadDims,
) -> Result<()> {
    hd.check("gather_rows", src, r0, rows, dst.len())?;
    let HeadDims {
        len, heads, d_head, ..
    } = hd;
    let data = src.data();
    let work = dst.len();
    for_rows(dst, hd.width(), work, |k, row| {
        let r = r0 + k;
        let (b, i) = (r / len, r % len);
        for (h, out) in row.chunks_exact_mut(d_head).enumerate() {
            let s = ((b * heads + h) * len + i) * d_head;
            out.copy_from_slice(&data[s..s + d_head]);
        }
    });
    Ok(())
}

/// Copies columns `c0..c0+cols` of the row-major `[rows, width]` matrix `src` into `dst`
/// (`[rows, cols]`): one head group's columns of a `[d_model, heads·d_head]` weight.
pub fn copy_columns(src: &[f32], width: usize, c0: usize, dst: &mut [f32]) -> Result<()> {
    let cols = check_columns("copy_columns", src.len(), width, c0, dst.len())?;
    for (s, d) in src.chunks_exact(width).zip(dst.chunks_exact_mut(cols)) {
        d.copy_from_slice(&s[c0..c0 + cols]);
    }
    Ok(())
}

/// Adds `src` (`[rows, cols]`) into columns `c0..c0+cols` of the row-major `[rows, width]`
/// matrix `dst`.
pub fn add_columns(dst: &mut [f32], width: usize, c0: usize, src: &[f32]) -> Result<()> {
    let cols = check_columns("add_columns", dst.len(), width, c0, src.len())?;
    for (d, s) in dst.chunks_exact_mut(width).zip(src.chunks_exact(cols)) {
        for (a, b) in d[c0..c0 + cols].iter_mut().zip(s) {
            *a += b;
        }
    }
    Ok(())
}

/// The number of columns of the narrow matrix (`narrow` values) taken from a `[rows, width]`
/// matrix (`wide` values) at column `c0`.
fn check_columns(
    op: &'static str,
    wide: usize,
    width: usize,
    c0: usize,
    narrow: usize,
) -> Result<usize> {
    let rows = wide.checked_div(width).unwrap_or(0);
    let cols = narrow.checked_div(rows).unwrap_or(0);
    if width == 0 || wide != rows * width || narrow != rows * cols || c0 + cols > width {
        return Err(shape_err(op, &[rows, c0 + cols], &[rows, width]));
    }
    Ok(cols)
}
