//! The CUDA backend: every [`Backend`] op is one of the hand-written kernels of
//! `reformer-kernels` (or a cuBLAS product), on buffers from the context's budgeted pool.

use reformer_kernels::gpu::attention::{
    exact_shared_qk_backward, exact_shared_qk_forward_as, local_attention_backward,
    local_attention_forward_as, lsh_attention_backward, lsh_attention_forward, AttnDims,
    GpuLocalConfig, GpuLshConfig, GpuLshSaved, LshBuckets,
};
use reformer_kernels::gpu::ops::cached_attention::{self, CachedDims, CachedKeysGpu, CachedRule};
use reformer_kernels::gpu::ops::embedding::{self, AxialShape};
use reformer_kernels::gpu::ops::layer_norm::{self, LayerNormGrads};
use reformer_kernels::gpu::ops::reduce_adam::{self, AdamStep};
use reformer_kernels::gpu::ops::rows;
use reformer_kernels::gpu::ops::{elementwise, matmul, softmax_xent};
use reformer_kernels::gpu::{bf16, ActElem, DeviceBuffer, GpuContext};
use reformer_lsh::{Buckets, CachedAttention, CachedKeys, Rotations};
use reformer_reversible::layer_norm::LN_EPS;
use reformer_reversible::Dropout;

use super::{
    check_act_dtype, AdamHp, AttnCall, AxialTables, Backend, DType, ExactForward, HeadShape,
    LocalForward, LshForward, Strided,
};
use crate::error::{ReformerError, Result};

type Buf = DeviceBuffer<f32>;

/// A head-layout activation on the GPU, stored in the backend's activation dtype.
#[derive(Debug)]
pub enum ActBuf {
    F32(DeviceBuffer<f32>),
    Bf16(DeviceBuffer<bf16>),
}

/// An element type an [`ActBuf`] holds.
trait StoredAct: ActElem {
    fn wrap(buf: DeviceBuffer<Self>) -> ActBuf;
}

impl StoredAct for f32 {
    fn wrap(buf: DeviceBuffer<f32>) -> ActBuf {
        ActBuf::F32(buf)
    }
}

impl StoredAct for bf16 {
    fn wrap(buf: DeviceBuffer<bf16>) -> ActBuf {
        ActBuf::Bf16(buf)
    }
}

/// `out` as an activation of the same dtype as the inputs `like` (ties the kernel's output type
/// to its input type).
fn same_as<T: StoredAct>(_like: &DeviceBuffer<T>, out: DeviceBuffer<T>) -> ActBuf {
    T::wrap(out)
}

/// Binds each named [`ActBuf`] to its inner buffer and runs `$body` — once typed for f32 and
/// once for bf16 (the kernel wrappers are generic over the element) — or returns an error when
/// the activations are of different dtypes.
macro_rules! with_acts {
    (($($x:ident),+) => $body:expr) => {
        if let ($(ActBuf::F32($x)),+) = ($($x),+) {
            $body
        } else if let ($(ActBuf::Bf16($x)),+) = ($($x),+) {
            $body
        } else {
            return Err(ReformerError::InvalidArgument(
                "attention: activation buffers of different dtypes".into(),
            ));
        }
    };
}

/// The GPU behind a [`GpuContext`].
pub struct CudaBackend {
    ctx: GpuContext,
    act: DType,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.describe())
            .finish()
    }
}

impl CudaBackend {
    /// Device `ordinal` with a pool budget of `budget` bytes (`None`: no budget beyond the
    /// card's memory). Fails with a typed error, never a panic, where there is no GPU.
    pub fn new(ordinal: usize, budget: Option<usize>) -> Result<Self> {
        let ctx = match budget {
            Some(b) => GpuContext::with_budget(ordinal, b)?,
            None => GpuContext::new(ordinal)?,
        };
        Ok(Self {
            ctx,
            act: DType::F32,
        })
    }

    pub fn from_context(ctx: GpuContext) -> Self {
        Self {
            ctx,
            act: DType::F32,
        }
    }

    /// Activations stored in `dtype` (f32 or bf16).
    pub fn with_act_dtype(mut self, dtype: DType) -> Result<Self> {
        check_act_dtype(dtype)?;
        self.act = dtype;
        Ok(self)
    }

    /// The LSH forward's f32 output (its rounds fold in f32) as an activation: itself, or
    /// converted (round to nearest even) into a new bf16 buffer, the f32 one freed.
    fn store_out(&self, out: Buf) -> Result<ActBuf> {
        if self.act == DType::F32 {
            return Ok(ActBuf::F32(out));
        }
        let mut h = self.ctx.alloc::<bf16>(out.len())?;
        elementwise::f32_to_bf16(&self.ctx, &out, &mut h)?;
        Ok(ActBuf::Bf16(h))
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Dense products in TF32 on tensor cores (`true`) or full f32 (`false`, the default): see
    /// [`matmul::set_tf32`].
    pub fn set_tf32(&self, on: bool) -> Result<()> {
        Ok(matmul::set_tf32(&self.ctx, on)?)
    }
}

fn dims(s: HeadShape) -> AttnDims {
    AttnDims::new(s.heads, s.len, s.d)
}

fn lsh_config(rot: &Rotations, chunk: usize, causal: bool) -> GpuLshConfig {
    let buckets = match rot.buckets {
        Buckets::Single(b) => LshBuckets::single(b),
        Buckets::Factorised(b1, b2) => LshBuckets::factorised(b1, b2),
    };
    GpuLshConfig {
        buckets,
        n_rounds: rot.n_rounds,
        chunk_len: chunk,
        causal,
    }
}

fn ids(tokens: &[u8]) -> Vec<u32> {
    tokens.iter().map(|&t| t as u32).collect()
}

impl Backend for CudaBackend {
    type Buf = Buf;
    type Act = ActBuf;
    type LshSaved = GpuLshSaved;
    type Mask = DeviceBuffer<u8>;

    fn describe(&self) -> String {
        let i = self.ctx.info();
        format!("cuda:{} {} ({})", i.ordinal, i.name, self.ctx.arch())
    }

    fn act_dtype(&self) -> DType {
        self.act
    }

    fn alloc_act(&self, shape: &[usize]) -> Result<ActBuf> {
        let n = shape.iter().product();
        Ok(match self.act {
            DType::BF16 => ActBuf::Bf16(self.ctx.alloc::<bf16>(n)?),
            _ => ActBuf::F32(self.ctx.alloc::<f32>(n)?),
        })
    }

    fn download_act(&self, buf: &ActBuf) -> Result<Vec<f32>> {
        Ok(match buf {
            ActBuf::F32(b) => self.ctx.download(b)?,
            ActBuf::Bf16(b) => self.ctx.download(b)?.iter().map(|x| x.to_f32()).collect(),
        })
    }

    fn copy_to_act(
        &self,
        src: &Buf,
        s: Strided,
        dst: &mut ActBuf,
        d: Strided,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        match dst {
            ActBuf::F32(t) => rows::copy2d(&self.ctx, src, s, t, d, rows, cols, 1.0, false)?,
            ActBuf::Bf16(t) => rows::copy2d(&self.ctx, src, s, t, d, rows, cols, 1.0, false)?,
        }
        Ok(())
    }

    fn copy_from_act(
        &self,
        src: &ActBuf,
        s: Strided,
        dst: &mut Buf,
        d: Strided,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        match src {
            ActBuf::F32(t) => rows::copy2d(&self.ctx, t, s, dst, d, rows, cols, 1.0, false)?,
            ActBuf::Bf16(t) => rows::copy2d(&self.ctx, t, s, dst, d, rows, cols, 1.0, false)?,
        }
        Ok(())
    }

    fn alloc(&self, shape: &[usize]) -> Result<Buf> {
        Ok(self.ctx.alloc::<f32>(shape.iter().product())?)
    }

    fn zeros(&self, shape: &[usize]) -> Result<Buf> {
        Ok(self.ctx.alloc_zeros::<f32>(shape.iter().product())?)
    }

    fn upload(&self, shape: &[usize], host: &[f32]) -> Result<Buf> {
        let n: usize = shape.iter().product();
        if n != host.len() {
            return Err(ReformerError::InvalidArgument(format!(
                "upload of {} values as shape {shape:?}",
                host.len()
            )));
        }
        Ok(self.ctx.upload(host)?)
    }

    fn download(&self, buf: &Buf) -> Result<Vec<f32>> {
        Ok(self.ctx.download(buf)?)
    }

    fn fill(&self, buf: &mut Buf, value: f32) -> Result<()> {
        Ok(elementwise::fill(&self.ctx, buf, value)?)
    }

    fn live_bytes(&self) -> usize {
        self.ctx.pool().live_bytes()
    }

    fn peak_bytes(&self) -> usize {
        self.ctx.pool().peak_bytes()
    }

    fn reset_peak(&self) {
        self.ctx.pool().reset_peak();
    }

    fn driver_used_bytes(&self) -> Option<usize> {
        self.ctx.memory_report().ok().map(|r| r.driver_used())
    }

    fn copy2d(
        &self,
        src: &Buf,
        s: Strided,
        dst: &mut Buf,
        d: Strided,
        rows: usize,
        cols: usize,
        alpha: f32,
        accumulate: bool,
    ) -> Result<()> {
        Ok(rows::copy2d(
            &self.ctx, src, s, dst, d, rows, cols, alpha, accumulate,
        )?)
    }

    fn gemm(
        &self,
        c: &mut Buf,
        a: &Buf,
        b: &Buf,
        m: usize,
        kk: usize,
        n: usize,
        ta: bool,
        tb: bool,
        accumulate: bool,
    ) -> Result<()> {
        Ok(matmul::gemm(
            &self.ctx, c, a, b, m, kk, n, ta, tb, accumulate,
        )?)
    }

    fn layer_norm_forward(
        &self,
        x: &Buf,
        gamma: &Buf,
        beta: &Buf,
        y: &mut Buf,
        mean: &mut Buf,
        rstd: &mut Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        Ok(layer_norm::forward(
            &self.ctx,
            x,
            gamma,
            beta,
            y,
            Some((mean, rstd)),
            rows,
            cols,
            LN_EPS,
        )?)
    }

    fn layer_norm_backward(
        &self,
        x: &Buf,
        gamma: &Buf,
        mean: &Buf,
        rstd: &Buf,
        dy: &Buf,
        dx: &mut Buf,
        dgamma: &mut Buf,
        dbeta: &mut Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let grads = LayerNormGrads {
            dx,
            dgamma,
            dbeta,
            accumulate_dx: false,
            accumulate_params: true,
        };
        Ok(layer_norm::backward(
            &self.ctx, x, gamma, mean, rstd, dy, grads, rows, cols,
        )?)
    }

    fn add_bias(&self, x: &mut Buf, bias: &Buf, rows: usize, cols: usize) -> Result<()> {
        Ok(rows::add_bias(&self.ctx, x, bias, rows, cols)?)
    }

    fn column_sums_acc(&self, x: &Buf, out: &mut Buf, rows: usize, cols: usize) -> Result<()> {
        Ok(rows::column_sums(&self.ctx, x, out, rows, cols, true)?)
    }

    fn relu_in_place(&self, x: &mut Buf, n: usize) -> Result<()> {
        Ok(rows::relu_in_place(&self.ctx, x, n)?)
    }

    fn relu_mask_in_place(&self, h: &Buf, g: &mut Buf, n: usize) -> Result<()> {
        Ok(rows::relu_mask_in_place(&self.ctx, h, g, n)?)
    }

    fn dropout_rows(
        &self,
        x: &mut Buf,
        rows: usize,
        cols: usize,
        first_row: usize,
        mask: &Dropout,
    ) -> Result<()> {
        let s = mask.base_state();
        Ok(rows::dropout_rows(
            &self.ctx,
            x,
            rows,
            cols,
            first_row as u64,
            mask.rate(),
            s[0],
            s[3],
        )?)
    }

    fn embed(&self, tokens: &[u8], table: &Buf, out: &mut Buf, dim: usize) -> Result<()> {
        let t = self.ctx.upload(&ids(tokens))?;
        Ok(embedding::forward(
            &self.ctx,
            &t,
            table,
            out,
            tokens.len(),
            dim,
            crate::config::VOCAB,
            false,
        )?)
    }

    fn embed_backward(
        &self,
        tokens: &[u8],
        dout: &Buf,
        dtable: &mut Buf,
        dim: usize,
    ) -> Result<()> {
        let t = self.ctx.upload(&ids(tokens))?;
        Ok(embedding::backward(
            &self.ctx,
            &t,
            dout,
            dtable,
            tokens.len(),
            dim,
            crate::config::VOCAB,
            true,
        )?)
    }

    fn axial_forward_add(
        &self,
        e1: &Buf,
        e2: &Buf,
        out: &mut Buf,
        first: usize,
        n: usize,
        t: AxialTables,
    ) -> Result<()> {
        let shape = AxialShape {
            a1: t.a1,
            a2: t.a2,
            d1: t.d1,
            d2: t.d2,
        };
        Ok(embedding::axial_forward(
            &self.ctx, e1, e2, out, first, n, shape, true,
        )?)
    }

    fn axial_backward(
        &self,
        dout: &Buf,
        de1: &mut Buf,
        de2: &mut Buf,
        n: usize,
        t: AxialTables,
    ) -> Result<()> {
        let shape = AxialShape {
            a1: t.a1,
            a2: t.a2,
            d1: t.d1,
            d2: t.d2,
        };
        Ok(embedding::axial_backward(
            &self.ctx, dout, de1, de2, n, shape, true,
        )?)
    }

    fn cross_entropy(
        &self,
        logits: &mut Buf,
        targets: &[u8],
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<Vec<f32>> {
        let rows = targets.len();
        let t = self.ctx.upload(&ids(targets))?;
        let mut loss = self.ctx.alloc::<f32>(rows)?;
        let mut lse = self.ctx.alloc::<f32>(rows)?;
        softmax_xent::forward(&self.ctx, logits, &t, &mut loss, &mut lse, rows, vocab)?;
        if let Some(scale) = grad_scale {
            softmax_xent::backward_in_place(&self.ctx, logits, &t, &lse, rows, vocab, scale)?;
        }
        Ok(self.ctx.download(&loss)?)
    }

    fn sum_squares(&self, bufs: &[&Buf]) -> Result<f64> {
        let mut out = self.ctx.alloc::<f32>(1)?;
        reduce_adam::sum_squares(&self.ctx, bufs, &mut out)?;
        let v = self.ctx.download(&out)?;
        Ok(v.first().copied().unwrap_or(f32::NAN) as f64)
    }

    fn adam_update(
        &self,
        param: &mut Buf,
        grad: &mut Buf,
        m: &mut Buf,
        v: &mut Buf,
        hp: &AdamHp,
    ) -> Result<()> {
        if hp.clip != 1.0 {
            elementwise::scale_in_place(&self.ctx, grad, hp.clip)?;
        }
        let step = AdamStep {
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay: 0.0,
            max_norm: 0.0,
            step: u32::try_from(hp.step).unwrap_or(u32::MAX),
        };
        Ok(reduce_adam::adam_update(
            &self.ctx, param, grad, m, v, &step, None,
        )?)
    }

    fn key_mask(&self, lens: &[usize], heads: usize, len: usize) -> Result<DeviceBuffer<u8>> {
        Ok(self
            .ctx
            .upload_mask(&super::key_mask_rows(lens, heads, len))?)
    }

    fn lsh_forward(
        &self,
        qk: &ActBuf,
        v: &ActBuf,
        rot: &Rotations,
        call: &AttnCall<'_, DeviceBuffer<u8>>,
    ) -> Result<(ActBuf, GpuLshSaved)> {
        let cfg = lsh_config(rot, call.chunk, call.causal);
        let (out, saved) = with_acts!((qk, v) => lsh_attention_forward(
            &self.ctx,
            qk,
            v,
            dims(call.shape),
            &rot.data,
            &cfg,
            call.mask,
        )?);
        Ok((self.store_out(out)?, saved))
    }

    fn lsh_backward(
        &self,
        fwd: LshForward<'_, Self>,
        d_out: &ActBuf,
        rot: &Rotations,
        call: &AttnCall<'_, DeviceBuffer<u8>>,
    ) -> Result<(Buf, Buf)> {
        let cfg = lsh_config(rot, call.chunk, call.causal);
        let LshForward { qk, v, out, saved } = fwd;
        Ok(with_acts!((qk, v, out, d_out) => lsh_attention_backward(
            &self.ctx, qk, v, out, d_out, saved, &cfg, call.mask,
        )?))
    }

    fn local_forward(
        &self,
        q: &ActBuf,
        kk: &ActBuf,
        v: &ActBuf,
        call: &AttnCall<'_, DeviceBuffer<u8>>,
    ) -> Result<(ActBuf, Buf)> {
        let cfg = local_config(call);
        let d = dims(call.shape);
        // The kernel stores the output in the activations' dtype itself (no f32 copy).
        Ok(with_acts!((q, kk, v) => {
            let (out, lse) = local_attention_forward_as(&self.ctx, q, kk, v, d, &cfg, call.mask)?;
            (same_as(q, out), lse)
        }))
    }

    fn local_backward(
        &self,
        fwd: LocalForward<'_, Self>,
        d_out: &ActBuf,
        call: &AttnCall<'_, DeviceBuffer<u8>>,
    ) -> Result<(Buf, Buf, Buf)> {
        let cfg = local_config(call);
        let LocalForward {
            q,
            k: kk,
            v,
            out,
            lse,
        } = fwd;
        Ok(
            with_acts!((q, kk, v, out, d_out) => local_attention_backward(
            &self.ctx,
            q,
            kk,
            v,
            out,
            lse,
            d_out,
            dims(call.shape),
            &cfg,
            call.mask,
        )?),
        )
    }

    fn exact_forward(
        &self,
        qk: &ActBuf,
        v: &ActBuf,
        call: &AttnCall<'_, DeviceBuffer<u8>>,
    ) -> Result<(ActBuf, Buf)> {
        let d = dims(call.shape);
        // The kernel stores the output in the activations' dtype itself (no f32 copy).
        Ok(with_acts!((qk, v) => {
            let (out, lse) =
                exact_shared_qk_forward_as(&self.ctx, qk, v, d, call.causal, call.mask)?;
            (same_as(qk, out), lse)
        }))
    }

    fn exact_backward(
        &self,
        fwd: ExactForward<'_, Self>,
        d_out: &ActBuf,
        call: &AttnCall<'_, DeviceBuffer<u8>>,
    ) -> Result<(Buf, Buf)> {
        let ExactForward { qk, v, out, lse } = fwd;
        Ok(with_acts!((qk, v, out, d_out) => exact_shared_qk_backward(
            &self.ctx,
            qk,
            v,
            out,
            lse,
            d_out,
            dims(call.shape),
            call.causal,
            call.mask,
        )?))
    }

    fn cached_attention(
        &self,
        q: &ActBuf,
        k_cache: &ActBuf,
        v_cache: &ActBuf,
        q_pos: &[u32],
        a: &CachedAttention<'_>,
    ) -> Result<Buf> {
        let queries = q_pos.len();
        let mut out = self.ctx.alloc::<f32>(queries * a.heads * a.d)?;
        let pos = self.ctx.upload(q_pos)?;
        let (keys, rounds, width) = match a.keys {
            CachedKeys::Lists { pos, rounds, width } => (self.ctx.upload(pos)?, rounds, width),
            CachedKeys::Ranges(r) => {
                let flat: Vec<u32> = r.iter().flat_map(|&(s, e)| [s, e]).collect();
                (self.ctx.upload(&flat)?, 1, 0)
            }
        };
        let gpu_keys = match a.keys {
            CachedKeys::Lists { .. } => CachedKeysGpu::Lists(&keys),
            CachedKeys::Ranges(_) => CachedKeysGpu::Ranges(&keys),
        };
        let dims = CachedDims {
            queries,
            heads: a.heads,
            d: a.d,
            cache_rows: a.cache_rows,
            rounds,
            width,
        };
        let rule = CachedRule {
            scale: a.rule.scale,
            causal: a.rule.causal,
            self_penalty: a.rule.self_penalty,
        };
        with_acts!((q, k_cache, v_cache) => cached_attention::attend(
            &self.ctx, q, k_cache, v_cache, &pos, gpu_keys, dims, rule, &mut out,
        )?);
        Ok(out)
    }

    fn unit_rows(&self, x: &mut Buf, rows: usize, cols: usize) -> Result<()> {
        Ok(elementwise::unit_rows(&self.ctx, x, rows, cols)?)
    }

    fn lsh_buckets(
        &self,
        qk: &ActBuf,
        rows: usize,
        heads: usize,
        rot: &Rotations,
    ) -> Result<Vec<u32>> {
        // The new rows are few per step (a prefill block at most): hashed on the host.
        let host = self.download_act(qk)?;
        Ok(rot.hash_heads(&host, rows, heads)?)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(self.ctx.synchronize()?)
    }
}

fn local_config(call: &AttnCall<'_, DeviceBuffer<u8>>) -> GpuLocalConfig {
    GpuLocalConfig {
        chunk_len: call.chunk,
        causal: call.causal,
    }
}
