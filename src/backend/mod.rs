//! What a backend must provide to run the model: buffers, row copies, dense products, the
//! position-wise ops and the three attention kinds. The model ([`crate::model::ReformerLm`])
//! is written once against [`Backend`]; three backends implement it:
//!
//! * [`CpuBackend`] (`cpu.rs`): host memory, rayon and `gemm`, the attention of
//!   `reformer-lsh` — the path every machine trains on, and each op the CPU twin of the CUDA
//!   kernel of its name;
//! * [`CudaBackend`] (`cuda.rs`): the hand-written kernels of `reformer-kernels` and cuBLAS, on
//!   a GPU, every buffer in the budgeted device pool;
//! * [`PlanBackend`] (`plan.rs`): no memory and no arithmetic, every buffer a counted token;
//!   the model run on it is the memory plan ([`MemoryPlan`]).
//!
//! [`select`] turns a command line's `--device` into one of them.
//!
//! Buffers are flat `f32` arrays. A call may use a prefix of a longer buffer (chunk scratch is
//! sized for the largest chunk), never more; 2-D views are `(offset, ld)` pairs ([`Strided`]).
//! Every "accumulate" gradient op adds into its output.
//!
//! Head-layout activations — the attention's inputs (`qk`, `v`, or `q`, `k`, `v`), its output
//! and the output's gradient — are [`Backend::Act`] buffers, stored in the backend's
//! [`Backend::act_dtype`]: f32, or bf16 to halve them. The attention ops read them widened to
//! f32 and accumulate in f32; what they return for the backward (gradients, logsumexps) is f32.
//! The reversible streams, parameters, gradients and optimizer state are always f32: the
//! backward reconstructs each layer's input from its output, which bf16 streams could not.

pub mod cpu;
pub mod cuda;
pub mod plan;
pub mod select;

pub use cpu::CpuBackend;
pub use cuda::{ActBuf, CudaBackend};
pub use plan::{human_bytes, DecodePlan, MemoryPlan, PlanBackend, PlanTarget};
pub use select::{select, DeviceRequest, Runner};

use reformer_lsh::{CachedAttention, Rotations};
use reformer_reversible::Dropout;

use crate::error::{ReformerError, Result};

pub use reformer_engine::DType;

/// Checks that activations can be stored in `dtype`: f32 or bf16 (the kernels widen bf16 on
/// load; f16 has no kernels).
pub fn check_act_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 => Ok(()),
        other => Err(ReformerError::InvalidArgument(format!(
            "activations can be stored in f32 or bf16, not {other:?}"
        ))),
    }
}

pub use reformer_kernels::gpu::ops::rows::Strided;

/// `[heads, len, d]` of one attention call (heads of a group, batch folded in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadShape {
    pub heads: usize,
    pub len: usize,
    pub d: usize,
}

impl HeadShape {
    pub fn numel(&self) -> usize {
        self.heads * self.len * self.d
    }
    pub fn dims(&self) -> [usize; 3] {
        [self.heads, self.len, self.d]
    }
}

/// Axial position tables: `e1` `[a1, d1]`, `e2` `[a2, d2]`, position `p` gets
/// `concat(e1[p / a2], e2[p % a2])`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AxialTables {
    pub a1: usize,
    pub a2: usize,
    pub d1: usize,
    pub d2: usize,
}

/// One Adam update (clipping already folded into `clip`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamHp {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1-based update count.
    pub step: u64,
    /// Factor applied to the gradient first (global-norm clipping; 1 for none).
    pub clip: f32,
}

/// What every attention call of a head group shares: the head layout (`heads` folds the
/// batch in: head-row `s·heads_per_group + j`), the chunk length (local and LSH), causality and
/// the key mask of padded sequences (`None`: every key is real).
#[derive(Debug)]
pub struct AttnCall<'a, M> {
    pub shape: HeadShape,
    pub chunk: usize,
    pub causal: bool,
    pub mask: Option<&'a M>,
}

/// An LSH forward's inputs, output and saved state, as its backward reads them.
pub struct LshForward<'a, B: Backend + ?Sized> {
    pub qk: &'a B::Act,
    pub v: &'a B::Act,
    pub out: &'a B::Act,
    pub saved: &'a B::LshSaved,
}

/// A local forward's inputs, output and logsumexps.
pub struct LocalForward<'a, B: Backend + ?Sized> {
    pub q: &'a B::Act,
    pub k: &'a B::Act,
    pub v: &'a B::Act,
    pub out: &'a B::Act,
    pub lse: &'a B::Buf,
}

/// An exact forward's inputs, output and logsumexps.
pub struct ExactForward<'a, B: Backend + ?Sized> {
    pub qk: &'a B::Act,
    pub v: &'a B::Act,
    pub out: &'a B::Act,
    pub lse: &'a B::Buf,
}

/// The key mask of a batch's head-layout rows (see [`Backend::key_mask`]): `[lens.len() ·
/// heads, len]`, true where a key is real. Every backend builds its mask from it (the CPU keeps
/// it on the host, outside the pool; CUDA uploads it).
pub fn key_mask_rows(lens: &[usize], heads: usize, len: usize) -> Vec<bool> {
    lens.iter()
        .flat_map(|&l| (0..heads).flat_map(move |_| (0..len).map(move |p| p < l)))
        .collect()
}

/// The device operations the model is written against.
pub trait Backend {
    /// A flat `f32` buffer on the device.
    type Buf;
    /// A flat head-layout activation buffer in [`Backend::act_dtype`].
    type Act;
    /// What the LSH forward keeps for its backward (buckets and per-round logsumexps).
    type LshSaved;
    /// Which keys are real (see [`Backend::key_mask`]).
    type Mask;

    /// One line naming the device.
    fn describe(&self) -> String;

    /// A buffer of `shape` (its product elements), contents unspecified (NaN in tests).
    fn alloc(&self, shape: &[usize]) -> Result<Self::Buf>;
    fn zeros(&self, shape: &[usize]) -> Result<Self::Buf>;
    fn upload(&self, shape: &[usize], host: &[f32]) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn fill(&self, buf: &mut Self::Buf, value: f32) -> Result<()>;
    /// Bytes the device's pool holds now and at its peak.
    fn live_bytes(&self) -> usize;
    fn peak_bytes(&self) -> usize;
    /// Starts a new peak at the live bytes.
    fn reset_peak(&self);
    /// Bytes in use on the device by the driver's reading (every allocator and context), where
    /// there is a driver to ask.
    fn driver_used_bytes(&self) -> Option<usize>;

    /// How [`Backend::Act`] buffers are stored: [`DType::F32`] or [`DType::BF16`].
    fn act_dtype(&self) -> DType;
    /// An activation buffer of `shape`, contents unspecified (NaN in tests).
    fn alloc_act(&self, shape: &[usize]) -> Result<Self::Act>;
    /// The activation's values, widened to f32.
    fn download_act(&self, buf: &Self::Act) -> Result<Vec<f32>>;
    /// `dst(r, c) = src(r, c)` rounded to the activation dtype (to nearest, ties to even).
    #[allow(clippy::too_many_arguments)]
    fn copy_to_act(
        &self,
        src: &Self::Buf,
        s: Strided,
        dst: &mut Self::Act,
        d: Strided,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    /// `dst(r, c) = src(r, c)` (exact: widening).
    #[allow(clippy::too_many_arguments)]
    fn copy_from_act(
        &self,
        src: &Self::Act,
        s: Strided,
        dst: &mut Self::Buf,
        d: Strided,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    /// `dst(r, c) = (accumulate ? dst(r, c) : 0) + alpha · src(r, c)`.
    #[allow(clippy::too_many_arguments)]
    fn copy2d(
        &self,
        src: &Self::Buf,
        s: Strided,
        dst: &mut Self::Buf,
        d: Strided,
        rows: usize,
        cols: usize,
        alpha: f32,
        accumulate: bool,
    ) -> Result<()>;

    /// Row-major `c[m×n] = (accumulate ? c : 0) + op(a)[m×k] · op(b)[k×n]`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        c: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
        accumulate: bool,
    ) -> Result<()>;

    /// `y = LN(x)` over `rows × cols`, storing each row's mean and `1/sqrt(var + eps)`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_forward(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        y: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    /// `dx = LN'(x)ᵀ dy` (overwritten); `dgamma`, `dbeta` accumulate.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf, rows: usize, cols: usize)
        -> Result<()>;
    /// `out[c] += Σ_r x[r, c]`.
    fn column_sums_acc(
        &self,
        x: &Self::Buf,
        out: &mut Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    fn relu_in_place(&self, x: &mut Self::Buf, n: usize) -> Result<()>;
    /// `g = h > 0 ? g : 0`.
    fn relu_mask_in_place(&self, h: &Self::Buf, g: &mut Self::Buf, n: usize) -> Result<()>;
    /// The CPU's dropout mask for rows `first_row..` applied to `rows × cols` of `x`.
    fn dropout_rows(
        &self,
        x: &mut Self::Buf,
        rows: usize,
        cols: usize,
        first_row: usize,
        mask: &Dropout,
    ) -> Result<()>;

    /// `out[i, :] = table[tokens[i], :]`.
    fn embed(
        &self,
        tokens: &[u8],
        table: &Self::Buf,
        out: &mut Self::Buf,
        dim: usize,
    ) -> Result<()>;
    /// `dtable[v, :] += Σ_{tokens[i] = v} dout[i, :]`.
    fn embed_backward(
        &self,
        tokens: &[u8],
        dout: &Self::Buf,
        dtable: &mut Self::Buf,
        dim: usize,
    ) -> Result<()>;
    /// `out[i, :] += concat(e1[p / a2], e2[p % a2])`, `p = first + i`, for `i < n`.
    #[allow(clippy::too_many_arguments)]
    fn axial_forward_add(
        &self,
        e1: &Self::Buf,
        e2: &Self::Buf,
        out: &mut Self::Buf,
        first: usize,
        n: usize,
        t: AxialTables,
    ) -> Result<()>;
    /// The tables' gradients, accumulated.
    fn axial_backward(
        &self,
        dout: &Self::Buf,
        de1: &mut Self::Buf,
        de2: &mut Self::Buf,
        n: usize,
        t: AxialTables,
    ) -> Result<()>;

    /// Cross-entropy of `targets.len()` rows of `vocab`-wide logits against `targets`:
    /// returns each row's loss; with `grad_scale`, replaces the logits by
    /// `grad_scale · (softmax − onehot)`.
    fn cross_entropy(
        &self,
        logits: &mut Self::Buf,
        targets: &[u8],
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<Vec<f32>>;

    /// `Σ_i x_i²` over every buffer.
    fn sum_squares(&self, bufs: &[&Self::Buf]) -> Result<f64>;
    fn adam_update(
        &self,
        param: &mut Self::Buf,
        grad: &mut Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        hp: &AdamHp,
    ) -> Result<()>;

    /// Which keys of a batch's head-layout rows are real: head-row `s·heads + j` (head `j` of
    /// sequence `s`) has its positions `p < lens[s]` valid, the rest padding, over `len`
    /// positions. The attention ops exclude padded keys (and sort them last in LSH).
    fn key_mask(&self, lens: &[usize], heads: usize, len: usize) -> Result<Self::Mask>;

    /// Shared-QK LSH attention on head-layout `qk`, `v`: `(out, saved)`. The attention ops'
    /// outputs are activations (rounded once, at the end, when stored in bf16); their
    /// gradients are f32.
    fn lsh_forward(
        &self,
        qk: &Self::Act,
        v: &Self::Act,
        rot: &Rotations,
        call: &AttnCall<'_, Self::Mask>,
    ) -> Result<(Self::Act, Self::LshSaved)>;
    /// `(d_qk, d_v)` from the forward's inputs, output and `saved`.
    fn lsh_backward(
        &self,
        fwd: LshForward<'_, Self>,
        d_out: &Self::Act,
        rot: &Rotations,
        call: &AttnCall<'_, Self::Mask>,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// Chunked local attention: `(out, lse)`.
    fn local_forward(
        &self,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        call: &AttnCall<'_, Self::Mask>,
    ) -> Result<(Self::Act, Self::Buf)>;
    /// `(d_q, d_k, d_v)`.
    fn local_backward(
        &self,
        fwd: LocalForward<'_, Self>,
        d_out: &Self::Act,
        call: &AttnCall<'_, Self::Mask>,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// Exact shared-QK attention (unit keys, self penalty): `(out, lse)`.
    fn exact_forward(
        &self,
        qk: &Self::Act,
        v: &Self::Act,
        call: &AttnCall<'_, Self::Mask>,
    ) -> Result<(Self::Act, Self::Buf)>;
    /// `(d_qk, d_v)`.
    fn exact_backward(
        &self,
        fwd: ExactForward<'_, Self>,
        d_out: &Self::Act,
        call: &AttnCall<'_, Self::Mask>,
    ) -> Result<(Self::Buf, Self::Buf)>;

    /// Decoding: attention of `q_pos.len()` new queries `q` (`[queries, heads·d]`, model
    /// layout) against cached keys and values (`[cache_rows, heads·d]`; position `p` in row
    /// `p % cache_rows`), each query seeing the positions `a.keys` lists. Returns the output
    /// `[queries, heads·d]` in f32 (see `reformer_lsh::cached_attention`, the CPU twin).
    fn cached_attention(
        &self,
        q: &Self::Act,
        k_cache: &Self::Act,
        v_cache: &Self::Act,
        q_pos: &[u32],
        a: &CachedAttention<'_>,
    ) -> Result<Self::Buf>;

    /// Replaces each of `rows` rows of `cols` by its unit vector `x / sqrt(|x|² + 1e-12)` (the
    /// shared-QK keys, as the attention ops form them from `qk`).
    fn unit_rows(&self, x: &mut Self::Buf, rows: usize, cols: usize) -> Result<()>;

    /// Decoding: the LSH buckets of `rows` rows of `qk` (`[rows, heads·rot.d]`, model layout),
    /// every head and round, on the host: `[heads, rounds, rows]`.
    fn lsh_buckets(
        &self,
        qk: &Self::Act,
        rows: usize,
        heads: usize,
        rot: &Rotations,
    ) -> Result<Vec<u32>>;

    /// Names the phase of the step the next allocations belong to (the dry-run planner
    /// reports where the peak arises; the other backends ignore it).
    fn mark(&self, _phase: &str) {}

    /// Waits for queued work (a no-op on the CPU); for timing.
    fn synchronize(&self) -> Result<()>;
}
