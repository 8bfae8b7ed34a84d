//! The CPU backend: every [`Backend`] op on host memory (rayon and `gemm`; the attention of
//! `reformer-lsh`), with the same formulas as the CUDA kernels — each op is the CPU twin of
//! the kernel of its name — so the one model trains on any machine and its GPU program is
//! tested on every machine.
//!
//! Buffers are engine [`Tensor`]s drawn from one [`MemoryPool`], so the pool's peak is the
//! peak of the program on the CPU, with its hard budget. Activations stored in bf16
//! ([`CpuBackend::with_act_dtype`]) are f32 tensors holding bf16-rounded values — the values
//! the GPU's bf16 buffers hold, rounded where the GPU rounds — so the CPU computes what the GPU
//! computes; their bytes are counted at 4 per element here.

use rayon::prelude::*;
use reformer_engine::matmul::{gemm, Par};
use reformer_engine::{DType, MemoryPool, Tensor};
use reformer_kernels::gpu::ops::rows::host as twins;
use reformer_lsh::keys::normalize_rows_in_place;
use reformer_lsh::{
    exact_attention_backward, exact_attention_forward, local_attention_backward,
    local_attention_forward, lsh_attention_backward, lsh_attention_forward, shared_qk_grad,
    shared_qk_rule, unit_keys, CachedAttention, LocalConfig, LshConfig, LshSaved, Rotations,
};
use reformer_reversible::layer_norm::{backward_row_add, normalize_row, row_stats};
use reformer_reversible::Dropout;

use super::{
    check_act_dtype, key_mask_rows, AdamHp, AttnCall, AxialTables, Backend, ExactForward,
    HeadShape, LocalForward, LshForward, Strided,
};
use crate::error::{ReformerError, Result};
use crate::optim::{AdamCoefficients, AdamConfig};

/// Elements per parallel task of the element-wise ops.
const BLOCK: usize = 1 << 14;

/// The CPU backend: buffers from `pool`.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    pool: MemoryPool,
    /// Fill new buffers with NaN (tests: a read of an unwritten element shows).
    poison: bool,
    /// How activations are stored (values rounded to it).
    act: DType,
}

impl CpuBackend {
    pub fn new(pool: &MemoryPool) -> Self {
        Self {
            pool: pool.clone(),
            poison: false,
            act: DType::F32,
        }
    }

    /// New buffers start as NaN.
    pub fn poisoned(pool: &MemoryPool) -> Self {
        Self {
            pool: pool.clone(),
            poison: true,
            act: DType::F32,
        }
    }

    /// Activations stored in `dtype` (f32 or bf16).
    pub fn with_act_dtype(mut self, dtype: DType) -> Result<Self> {
        check_act_dtype(dtype)?;
        self.act = dtype;
        Ok(self)
    }

    /// An attention forward's output stored as an activation: its values rounded to the
    /// storage dtype.
    fn store_out(&self, mut out: Tensor) -> Tensor {
        if self.act != DType::F32 {
            let act = self.act;
            out.data_mut()
                .par_iter_mut()
                .for_each(|x| *x = act.round_trip(*x));
        }
        out
    }

    /// A local or exact forward's results as the backend returns them: the stored output and
    /// the logsumexps as a buffer.
    fn single_pass_out(&self, out: Tensor, lse: &[f32]) -> Result<(Tensor, Tensor)> {
        let lse = Tensor::from_vec(&self.pool, &[lse.len()], lse.to_vec())?;
        Ok((self.store_out(out), lse))
    }

    pub fn pool(&self) -> &MemoryPool {
        &self.pool
    }
}

fn bad(msg: String) -> ReformerError {
    ReformerError::InvalidArgument(msg)
}

/// One past the last element of a `rows × cols` view (0 when empty).
fn view_end(v: Strided, rows: usize, cols: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        v.offset + (rows - 1) * v.ld + cols
    }
}

fn need(op: &str, what: &str, len: usize, needed: usize) -> Result<()> {
    if len < needed {
        return Err(bad(format!(
            "{op}: {what} holds {len} elements, the call needs {needed}"
        )));
    }
    Ok(())
}

/// `t`, checked to be a head-layout tensor of `shape` (the device model allocates them so).
fn shaped(t: &Tensor, shape: HeadShape) -> Result<&Tensor> {
    if t.shape() != shape.dims() {
        return Err(bad(format!(
            "attention: a buffer of shape {:?} where {:?} was expected",
            t.shape(),
            shape.dims()
        )));
    }
    Ok(t)
}

impl Backend for CpuBackend {
    type Buf = Tensor;
    type Act = Tensor;
    type LshSaved = LshSaved;
    type Mask = Vec<bool>;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn act_dtype(&self) -> DType {
        self.act
    }

    fn alloc_act(&self, shape: &[usize]) -> Result<Tensor> {
        self.alloc(shape)
    }

    fn download_act(&self, buf: &Tensor) -> Result<Vec<f32>> {
        Ok(buf.to_vec())
    }

    fn copy_to_act(
        &self,
        src: &Tensor,
        s: Strided,
        dst: &mut Tensor,
        d: Strided,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.copy2d(src, s, dst, d, rows, cols, 1.0, false)?;
        if self.act != DType::F32 {
            for r in 0..rows {
                for x in &mut dst.data_mut()[d.offset + r * d.ld..][..cols] {
                    *x = self.act.round_trip(*x);
                }
            }
        }
        Ok(())
    }

    fn copy_from_act(
        &self,
        src: &Tensor,
        s: Strided,
        dst: &mut Tensor,
        d: Strided,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.copy2d(src, s, dst, d, rows, cols, 1.0, false)
    }

    fn alloc(&self, shape: &[usize]) -> Result<Tensor> {
        let v = if self.poison { f32::NAN } else { 0.0 };
        Ok(Tensor::full(&self.pool, shape, v)?)
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::zeros(&self.pool, shape)?)
    }

    fn upload(&self, shape: &[usize], host: &[f32]) -> Result<Tensor> {
        Ok(Tensor::from_vec(&self.pool, shape, host.to_vec())?)
    }

    fn download(&self, buf: &Tensor) -> Result<Vec<f32>> {
        Ok(buf.to_vec())
    }

    fn fill(&self, buf: &mut Tensor, value: f32) -> Result<()> {
        buf.data_mut().fill(value);
        Ok(())
    }

    fn live_bytes(&self) -> usize {
        self.pool.live_bytes()
    }

    fn peak_bytes(&self) -> usize {
        self.pool.peak_bytes()
    }

    fn reset_peak(&self) {
        self.pool.reset_peak();
    }

    fn driver_used_bytes(&self) -> Option<usize> {
        None
    }

    fn copy2d(
        &self,
        src: &Tensor,
        s: Strided,
        dst: &mut Tensor,
        d: Strided,
        rows: usize,
        cols: usize,
        alpha: f32,
        accumulate: bool,
    ) -> Result<()> {
        need("copy2d", "src", src.numel(), view_end(s, rows, cols))?;
        need("copy2d", "dst", dst.numel(), view_end(d, rows, cols))?;
        if rows > 1 && (s.ld < cols || d.ld < cols) {
            return Err(bad(format!(
                "copy2d: leading dimensions {s:?}, {d:?} < {cols} columns"
            )));
        }
        twins::copy2d(
            src.data(),
            s,
            dst.data_mut(),
            d,
            rows,
            cols,
            alpha,
            accumulate,
        );
        Ok(())
    }

    fn gemm(
        &self,
        c: &mut Tensor,
        a: &Tensor,
        b: &Tensor,
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
        accumulate: bool,
    ) -> Result<()> {
        need("gemm", "a", a.numel(), m * k)?;
        need("gemm", "b", b.numel(), k * n)?;
        need("gemm", "c", c.numel(), m * n)?;
        gemm(
            &mut c.data_mut()[..m * n],
            &a.data()[..m * k],
            &b.data()[..k * n],
            m,
            k,
            n,
            ta,
            tb,
            accumulate,
            Par::Rayon,
        )?;
        Ok(())
    }

    fn layer_norm_forward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        y: &mut Tensor,
        mean: &mut Tensor,
        rstd: &mut Tensor,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let n = rows * cols;
        need("layer_norm", "x", x.numel(), n)?;
        need("layer_norm", "y", y.numel(), n)?;
        need("layer_norm", "gamma", gamma.numel(), cols)?;
        need("layer_norm", "stats", mean.numel().min(rstd.numel()), rows)?;
        let (x, g, b) = (x.data(), gamma.data(), beta.data());
        let (mean, rstd) = (mean.data_mut(), rstd.data_mut());
        y.data_mut()[..n]
            .par_chunks_mut(cols)
            .zip(mean[..rows].par_iter_mut().zip(rstd[..rows].par_iter_mut()))
            .enumerate()
            .for_each(|(r, (y, (m, s)))| {
                let x = &x[r * cols..(r + 1) * cols];
                (*m, *s) = row_stats(x);
                normalize_row(x, *m, *s, g, b, y);
            });
        Ok(())
    }

    fn layer_norm_backward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        dx: &mut Tensor,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let n = rows * cols;
        for (what, len) in [("x", x.numel()), ("dy", dy.numel()), ("dx", dx.numel())] {
            need("layer_norm_backward", what, len, n)?;
        }
        let (x, g, dy) = (x.data(), gamma.data(), dy.data());
        let (mean, rstd) = (&mean.data()[..rows], &rstd.data()[..rows]);
        dx.data_mut()[..n]
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, dx)| {
                dx.fill(0.0);
                let (x, dy) = (&x[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
                backward_row_add(x, dy, g, mean[r], rstd[r], dx);
            });
        // Gain and bias gradients, summed over rows in f64, row by row.
        let (mut ag, mut ab) = (vec![0.0f64; cols], vec![0.0f64; cols]);
        for r in 0..rows {
            let (xr, dyr) = (&x[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
            for j in 0..cols {
                ag[j] += (dyr[j] * (xr[j] - mean[r]) * rstd[r]) as f64;
                ab[j] += dyr[j] as f64;
            }
        }
        for ((dg, db), (a, b)) in dgamma
            .data_mut()
            .iter_mut()
            .zip(dbeta.data_mut())
            .zip(ag.iter().zip(&ab))
        {
            *dg += *a as f32;
            *db += *b as f32;
        }
        Ok(())
    }

    fn add_bias(&self, x: &mut Tensor, bias: &Tensor, rows: usize, cols: usize) -> Result<()> {
        need("add_bias", "x", x.numel(), rows * cols)?;
        need("add_bias", "bias", bias.numel(), cols)?;
        twins::add_bias(x.data_mut(), bias.data(), rows, cols);
        Ok(())
    }

    fn column_sums_acc(
        &self,
        x: &Tensor,
        out: &mut Tensor,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        need("column_sums", "x", x.numel(), rows * cols)?;
        need("column_sums", "out", out.numel(), cols)?;
        twins::column_sums(x.data(), out.data_mut(), rows, cols, true);
        Ok(())
    }

    fn relu_in_place(&self, x: &mut Tensor, n: usize) -> Result<()> {
        need("relu", "x", x.numel(), n)?;
        twins::relu_in_place(x.data_mut(), n);
        Ok(())
    }

    fn relu_mask_in_place(&self, h: &Tensor, g: &mut Tensor, n: usize) -> Result<()> {
        need("relu_mask", "h", h.numel(), n)?;
        need("relu_mask", "g", g.numel(), n)?;
        twins::relu_mask_in_place(h.data(), g.data_mut(), n);
        Ok(())
    }

    fn dropout_rows(
        &self,
        x: &mut Tensor,
        rows: usize,
        cols: usize,
        first_row: usize,
        mask: &Dropout,
    ) -> Result<()> {
        need("dropout", "x", x.numel(), rows * cols)?;
        mask.apply(&mut x.data_mut()[..rows * cols], cols, first_row);
        Ok(())
    }

    fn embed(&self, tokens: &[u8], table: &Tensor, out: &mut Tensor, dim: usize) -> Result<()> {
        need("embed", "out", out.numel(), tokens.len() * dim)?;
        need("embed", "table", table.numel(), 256 * dim)?;
        let t = table.data();
        for (row, &tok) in out.data_mut().chunks_mut(dim).zip(tokens) {
            let v = tok as usize;
            row.copy_from_slice(&t[v * dim..(v + 1) * dim]);
        }
        Ok(())
    }

    fn embed_backward(
        &self,
        tokens: &[u8],
        dout: &Tensor,
        dtable: &mut Tensor,
        dim: usize,
    ) -> Result<()> {
        need("embed_backward", "dout", dout.numel(), tokens.len() * dim)?;
        need("embed_backward", "dtable", dtable.numel(), 256 * dim)?;
        let dt = dtable.data_mut();
        for (row, &tok) in dout.data().chunks(dim).zip(tokens) {
            let v = tok as usize;
            for (g, &d) in dt[v * dim..(v + 1) * dim].iter_mut().zip(row) {
                *g += d;
            }
        }
        Ok(())
    }

    fn axial_forward_add(
        &self,
        e1: &Tensor,
        e2: &Tensor,
        out: &mut Tensor,
        first: usize,
        n: usize,
        t: AxialTables,
    ) -> Result<()> {
        let dim = t.d1 + t.d2;
        need("axial", "out", out.numel(), n * dim)?;
        if first + n > t.a1 * t.a2 {
            return Err(bad(format!(
                "axial: positions {first}..{}, capacity {}",
                first + n,
                t.a1 * t.a2
            )));
        }
        let (e1, e2) = (e1.data(), e2.data());
        for (i, row) in out.data_mut()[..n * dim].chunks_mut(dim).enumerate() {
            let p = first + i;
            let (i, j) = (p / t.a2, p % t.a2);
            for (y, &v) in row[..t.d1].iter_mut().zip(&e1[i * t.d1..(i + 1) * t.d1]) {
                *y += v;
            }
            for (y, &v) in row[t.d1..].iter_mut().zip(&e2[j * t.d2..(j + 1) * t.d2]) {
                *y += v;
            }
        }
        Ok(())
    }

    fn axial_backward(
        &self,
        dout: &Tensor,
        de1: &mut Tensor,
        de2: &mut Tensor,
        n: usize,
        t: AxialTables,
    ) -> Result<()> {
        let dim = t.d1 + t.d2;
        need("axial_backward", "dout", dout.numel(), n * dim)?;
        let (g1, g2) = (de1.data_mut(), de2.data_mut());
        for (p, row) in dout.data()[..n * dim].chunks(dim).enumerate() {
            let (i, j) = (p / t.a2, p % t.a2);
            for (g, &v) in g1[i * t.d1..(i + 1) * t.d1].iter_mut().zip(&row[..t.d1]) {
                *g += v;
            }
            for (g, &v) in g2[j * t.d2..(j + 1) * t.d2].iter_mut().zip(&row[t.d1..]) {
                *g += v;
            }
        }
        Ok(())
    }

    fn cross_entropy(
        &self,
        logits: &mut Tensor,
        targets: &[u8],
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<Vec<f32>> {
        let rows = targets.len();
        need("cross_entropy", "logits", logits.numel(), rows * vocab)?;
        Ok(logits.data_mut()[..rows * vocab]
            .par_chunks_mut(vocab)
            .zip(targets.par_iter())
            .map(|(row, &t)| match grad_scale {
                Some(scale) => cross_entropy_row(row, t as usize, scale),
                None => reformer_engine::ops::logsumexp(row) - row[t as usize],
            })
            .collect())
    }

    fn sum_squares(&self, bufs: &[&Tensor]) -> Result<f64> {
        // Fixed blocks summed in parallel, then in order: the same total on any thread count.
        Ok(bufs
            .iter()
            .map(|b| {
                let parts: Vec<f64> = b
                    .data()
                    .par_chunks(BLOCK)
                    .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>())
                    .collect();
                parts.iter().sum::<f64>()
            })
            .sum())
    }

    fn adam_update(
        &self,
        param: &mut Tensor,
        grad: &mut Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        hp: &AdamHp,
    ) -> Result<()> {
        let n = param.numel();
        for (what, len) in [("grad", grad.numel()), ("m", m.numel()), ("v", v.numel())] {
            if len != n {
                return Err(bad(format!("adam: {what} holds {len}, the parameter {n}")));
            }
        }
        let cfg = AdamConfig {
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            clip_norm: None,
        };
        let k = AdamCoefficients::new(&cfg, hp.lr, hp.step, hp.clip);
        param
            .data_mut()
            .par_chunks_mut(BLOCK)
            .zip(grad.data().par_chunks(BLOCK))
            .zip(m.data_mut().par_chunks_mut(BLOCK))
            .zip(v.data_mut().par_chunks_mut(BLOCK))
            .for_each(|(((w, g), m), v)| k.apply(w, g, m, v));
        Ok(())
    }

    fn key_mask(&self, lens: &[usize], heads: usize, len: usize) -> Result<Vec<bool>> {
        Ok(key_mask_rows(lens, heads, len))
    }

    fn lsh_forward(
        &self,
        qk: &Tensor,
        v: &Tensor,
        rot: &Rotations,
        call: &AttnCall<'_, Vec<bool>>,
    ) -> Result<(Tensor, LshSaved)> {
        let cfg = lsh_config(call);
        let (qk, v) = (shaped(qk, call.shape)?, shaped(v, call.shape)?);
        let (out, saved) = lsh_attention_forward(qk, v, rot, &cfg, mask(call))?;
        Ok((self.store_out(out), saved))
    }

    fn lsh_backward(
        &self,
        fwd: LshForward<'_, Self>,
        d_out: &Tensor,
        rot: &Rotations,
        call: &AttnCall<'_, Vec<bool>>,
    ) -> Result<(Tensor, Tensor)> {
        let cfg = lsh_config(call);
        let [qk, v, out, d_out] = [fwd.qk, fwd.v, fwd.out, d_out].map(|t| shaped(t, call.shape));
        Ok(lsh_attention_backward(
            qk?,
            v?,
            out?,
            d_out?,
            fwd.saved,
            rot,
            &cfg,
            mask(call),
        )?)
    }

    fn local_forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        call: &AttnCall<'_, Vec<bool>>,
    ) -> Result<(Tensor, Tensor)> {
        let cfg = local_config(call);
        let [q, k, v] = [q, k, v].map(|t| shaped(t, call.shape));
        let (out, lse) = local_attention_forward(q?, k?, v?, &cfg, mask(call))?;
        self.single_pass_out(out, &lse)
    }

    fn local_backward(
        &self,
        fwd: LocalForward<'_, Self>,
        d_out: &Tensor,
        call: &AttnCall<'_, Vec<bool>>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = local_config(call);
        let [q, k, v, out, d_out] =
            [fwd.q, fwd.k, fwd.v, fwd.out, d_out].map(|t| shaped(t, call.shape));
        Ok(local_attention_backward(
            q?,
            k?,
            v?,
            out?,
            fwd.lse.data(),
            d_out?,
            &cfg,
            mask(call),
        )?)
    }

    fn exact_forward(
        &self,
        qk: &Tensor,
        v: &Tensor,
        call: &AttnCall<'_, Vec<bool>>,
    ) -> Result<(Tensor, Tensor)> {
        let (qk, v) = (shaped(qk, call.shape)?, shaped(v, call.shape)?);
        let k = unit_keys(qk)?;
        let rule = shared_qk_rule(call.causal);
        let (out, lse) = exact_attention_forward(qk, &k, v, rule, mask(call))?;
        self.single_pass_out(out, &lse)
    }

    fn exact_backward(
        &self,
        fwd: ExactForward<'_, Self>,
        d_out: &Tensor,
        call: &AttnCall<'_, Vec<bool>>,
    ) -> Result<(Tensor, Tensor)> {
        let [qk, v, out, d_out] = [fwd.qk, fwd.v, fwd.out, d_out].map(|t| shaped(t, call.shape));
        let qk = qk?;
        let k = unit_keys(qk)?;
        let (d_q, d_k, d_v) = exact_attention_backward(
            qk,
            &k,
            v?,
            out?,
            fwd.lse.data(),
            d_out?,
            shared_qk_rule(call.causal),
            mask(call),
        )?;
        Ok((shared_qk_grad(qk, d_q, &d_k), d_v))
    }

    fn cached_attention(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        q_pos: &[u32],
        a: &CachedAttention<'_>,
    ) -> Result<Tensor> {
        let mut out = self.alloc(&[q_pos.len(), a.heads * a.d])?;
        reformer_lsh::cached_attention(
            q.data(),
            q_pos,
            k_cache.data(),
            v_cache.data(),
            a,
            out.data_mut(),
        )?;
        Ok(out)
    }

    fn unit_rows(&self, x: &mut Tensor, rows: usize, cols: usize) -> Result<()> {
        need("unit_rows", "x", x.numel(), rows * cols)?;
        x.data_mut()[..rows * cols]
            .par_chunks_mut(cols.max(1) * 64)
            .for_each(|block| normalize_rows_in_place(block, cols.max(1)));
        Ok(())
    }

    fn lsh_buckets(
        &self,
        qk: &Tensor,
        rows: usize,
        heads: usize,
        rot: &Rotations,
    ) -> Result<Vec<u32>> {
        Ok(rot.hash_heads(qk.data(), rows, heads)?)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

fn mask<'a>(call: &AttnCall<'a, Vec<bool>>) -> Option<&'a [bool]> {
    call.mask.map(|m| m.as_slice())
}

fn lsh_config(call: &AttnCall<'_, Vec<bool>>) -> LshConfig {
    LshConfig {
        chunk_len: call.chunk,
        causal: call.causal,
    }
}

fn local_config(call: &AttnCall<'_, Vec<bool>>) -> LocalConfig {
    LocalConfig {
        chunk_len: call.chunk,
        causal: call.causal,
    }
}

/// One row's cross-entropy `logsumexp(row) − row[target]`; the row becomes its gradient
/// `scale · (softmax(row) − onehot(target))` (the twin of `softmax_xent.cu`).
pub fn cross_entropy_row(row: &mut [f32], target: usize, scale: f32) -> f32 {
    let lse = reformer_engine::ops::logsumexp(row);
    let loss = lse - row[target];
    for v in row.iter_mut() {
        *v = (*v - lse).exp() * scale;
    }
    row[target] -= scale;
    loss
}
