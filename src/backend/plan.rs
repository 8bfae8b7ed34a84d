//! The model's memory plan by dry run: [`PlanBackend`] implements [`Backend`] with no memory
//! and no arithmetic — every buffer is a counted token — and accounts, op by op, for the
//! scratch of the backend it plans ([`PlanTarget`]):
//!
//! * [`PlanTarget::Cuda`]: what the CUDA kernels' launch wrappers allocate from the device
//!   pool (bucket-sort histograms and radix passes, layer-norm and column-sum partials,
//!   uploaded indices and rotations, logsumexps, deltas), activations in their stored dtype;
//! * [`PlanTarget::Cpu`]: what [`super::CpuBackend`] and the `reformer-lsh` functions it calls
//!   draw from the engine pool — every tensor at 4 bytes per element (bf16 activations are
//!   f32 tensors of rounded values there), the attention's outputs, logsumexps, buckets,
//!   per-head sort buffers and sorted-order gradients, the banded passes' geometry and deltas,
//!   the exact path's unit keys, the logsumexp copies the backend returns, and the per-task
//!   tiles of the rayon loops: one per running task, so `min(threads, tasks)` at once (LSH
//!   heads run one after another, so its tasks are one head's chunks; the banded passes run
//!   every head's blocks at once, so theirs are `heads × blocks`). Its other ops allocate
//!   nothing from the pool.
//!
//! Running [`ReformerLm`] on it replays the exact allocation sequence of a step in
//! milliseconds, so its peak is the pool's peak, byte for byte, with the live buffers at that
//! moment and the phase of the step where it happens. On several CPU threads that holds when
//! a task runs on every thread at the peak, as in loops of many tasks of some length; a loop of
//! a few tiny tasks may be done before a second thread joins it, and the pool then peaks below
//! the plan (never above it, nor below the one-thread plan).
//!
//! Outside the pool, and so outside the plan: on CUDA the context, the loaded modules and
//! cuBLAS's workspace (the driver's reading includes them); on the CPU the program, the thread
//! stacks, `gemm`'s packing buffers, small per-call host vectors (hashing projections, the
//! layer-norm backward's f64 sums) and the allocator's slack.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

use reformer_kernels::geometry::{bucket_sort_passes, BS_RADIX, BS_TILE};
use reformer_kernels::gpu::ops::layer_norm::param_parts;
use reformer_kernels::gpu::ops::reduce_adam::MAX_PARTIALS;
use reformer_kernels::gpu::ops::rows::column_sum_parts;
use reformer_lsh::exact_attention::EXACT_BLOCK;
use reformer_lsh::{CachedAttention, Rotations};
use reformer_reversible::Dropout;

use super::{
    check_act_dtype, AdamHp, AttnCall, AxialTables, Backend, DType, ExactForward, HeadShape,
    LocalForward, LshForward, Strided,
};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::ReformerLm;

#[derive(Debug, Default)]
struct Registry {
    next: u64,
    live: usize,
    peak: usize,
    live_bufs: BTreeMap<u64, (String, usize)>,
    phase: String,
    peak_phase: String,
    peak_set: Vec<(u64, String, usize)>,
}

impl Registry {
    fn add(&mut self, label: String, bytes: usize) -> u64 {
        let id = self.next;
        self.next += 1;
        self.live += bytes;
        self.live_bufs.insert(id, (label, bytes));
        if self.live > self.peak {
            self.peak = self.live;
            self.peak_phase = self.phase.clone();
            self.peak_set = self.snapshot();
        }
        id
    }

    fn snapshot(&self) -> Vec<(u64, String, usize)> {
        self.live_bufs
            .iter()
            .map(|(&id, (l, b))| (id, l.clone(), *b))
            .collect()
    }

    fn remove(&mut self, id: u64) {
        if let Some((_, bytes)) = self.live_bufs.remove(&id) {
            self.live -= bytes;
        }
    }
}

/// A counted token standing for a device buffer.
pub struct PlanBuf {
    id: u64,
    len: usize,
    reg: Rc<RefCell<Registry>>,
}

impl Drop for PlanBuf {
    fn drop(&mut self) {
        self.reg.borrow_mut().remove(self.id);
    }
}

/// What the LSH forward keeps: buckets and logsumexps `[heads, rounds, len]`.
pub struct PlanLshSaved {
    _buckets: PlanBuf,
    _lse: PlanBuf,
    rounds: usize,
    n_buckets: usize,
}

/// Which backend's allocations a plan replays: the ops allocate alike on every backend
/// (the model decides what is live), but each backend's kernels draw their own scratch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlanTarget {
    /// [`super::CudaBackend`]: the launch wrappers' scratch (sort passes, partial sums,
    /// uploaded indices, deltas).
    #[default]
    Cuda,
    /// [`super::CpuBackend`] with `threads` rayon threads (the attention's per-task tiles).
    Cpu { threads: usize },
}

/// The dry-run backend.
#[derive(Clone, Default)]
pub struct PlanBackend {
    reg: Rc<RefCell<Registry>>,
    act: DType,
    target: PlanTarget,
}

impl fmt::Debug for PlanBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.reg.borrow();
        f.debug_struct("PlanBackend")
            .field("live", &r.live)
            .field("peak", &r.peak)
            .finish()
    }
}

impl PlanBackend {
    /// A plan of the CUDA backend's allocations.
    pub fn new() -> Self {
        Self::default()
    }

    /// A plan of `target`'s allocations.
    pub fn for_target(target: PlanTarget) -> Self {
        Self {
            target,
            ..Self::default()
        }
    }

    pub fn target(&self) -> PlanTarget {
        self.target
    }

    /// Plans activations stored in `dtype` (f32 or bf16).
    pub fn with_act_dtype(mut self, dtype: DType) -> Result<Self> {
        check_act_dtype(dtype)?;
        self.act = dtype;
        Ok(self)
    }

    /// An activation buffer of `len` elements: in the activation dtype on CUDA; an f32 tensor
    /// (of rounded values) on the CPU.
    fn act_token(&self, label: String, len: usize) -> PlanBuf {
        match (self.act, self.target) {
            (DType::F32, _) => self.token(label, len, 4),
            (act, PlanTarget::Cuda) => {
                self.token(format!("{label} bf16"), len, act.size_in_bytes())
            }
            (_, PlanTarget::Cpu { .. }) => self.token(format!("{label} bf16-rounded"), len, 4),
        }
    }

    /// A head-layout activation of shape `s`.
    fn act_heads(&self, what: &str, s: HeadShape) -> PlanBuf {
        self.act_token(
            format!("{what} [{}, {}, {}]", s.heads, s.len, s.d),
            s.numel(),
        )
    }

    /// What the LSH forward does with its f32 output (its rounds fold in f32): returns it as the
    /// activation, or, with bf16 activations, converts it into a new bf16 buffer and frees it.
    fn store_out(&self, out: PlanBuf, s: HeadShape) -> PlanBuf {
        if self.act == DType::F32 {
            return out;
        }
        let stored = self.act_heads("attention out", s);
        drop(out);
        stored
    }

    /// A local or exact forward: its output, stored in the activation dtype by the kernel
    /// itself, and the logsumexps.
    fn single_pass_out(&self, s: HeadShape) -> (PlanBuf, PlanBuf) {
        let out = self.act_heads("attention out", s);
        let lse = self.f32s("logsumexp", s.heads * s.len);
        (out, lse)
    }

    fn token(&self, label: String, len: usize, elem: usize) -> PlanBuf {
        let id = self.reg.borrow_mut().add(label, len * elem);
        PlanBuf {
            id,
            len,
            reg: Rc::clone(&self.reg),
        }
    }

    fn f32s(&self, label: impl Into<String>, len: usize) -> PlanBuf {
        self.token(label.into(), len, 4)
    }

    fn u32s(&self, label: impl Into<String>, len: usize) -> PlanBuf {
        self.token(label.into(), len, 4)
    }

    /// `bucket_sort::sort` of `segs × len` keys below `key_bound`: the histogram, then per
    /// radix pass a new key/value pair allocated while the previous pair lives. Returns the
    /// permutation.
    fn sort(&self, segs: usize, len: usize, key_bound: usize) -> PlanBuf {
        let total = segs * len;
        let tiles = len.div_ceil(BS_TILE);
        let hist = self.u32s("sort histogram", segs * BS_RADIX * tiles);
        let mut prev: Option<(PlanBuf, PlanBuf)> = None;
        for _ in 0..bucket_sort_passes(key_bound).max(1) {
            let k = self.u32s(format!("sort keys [{segs}, {len}] u32"), total);
            let v = self.u32s(format!("sort permutation [{segs}, {len}] u32"), total);
            prev = Some((k, v));
        }
        drop(hist);
        let (_, perm) = prev.expect("at least one pass");
        perm
    }

    /// `lsh_sort`: with a key mask, the masked keys first (a new key buffer), then the sort
    /// over one more key value.
    fn lsh_sort(&self, segs: usize, len: usize, n_buckets: usize, masked: bool) -> PlanBuf {
        if !masked {
            return self.sort(segs, len, n_buckets);
        }
        let _keys = self.u32s(format!("masked keys [{segs}, {len}] u32"), segs * len);
        self.sort(segs, len, n_buckets + 1)
    }

    fn heads(&self, what: &str, s: HeadShape) -> PlanBuf {
        self.f32s(
            format!("{what} [{}, {}, {}]", s.heads, s.len, s.d),
            s.numel(),
        )
    }

    /// `bytes` of pool memory counted outside a buffer (a `MemoryPool::hold`).
    fn hold(&self, label: impl Into<String>, bytes: usize) -> PlanBuf {
        self.token(label.into(), bytes, 1)
    }

    /// The per-task scratch of a rayon loop over `tasks` items, each holding `bytes` while it
    /// runs: one tile per running task, so `min(threads, tasks)` at once. The tasks hold
    /// nothing else and call no nested parallel loop while they hold it.
    fn tiles(&self, what: &str, tasks: usize, bytes: usize, threads: usize) -> Vec<PlanBuf> {
        let n = tasks.min(threads.max(1));
        (0..n)
            .map(|_| self.hold(format!("{what} ({bytes} B, one per running task)"), bytes))
            .collect()
    }

    /// `reformer_lsh::lsh_attention::sort_round` over one head's round of `len` positions in
    /// `padded` slots: the sort keys, the permutation and the counting sort's counts, then (the
    /// keys and counts freed) the inverse permutation and the sorted validity mask. Returns what
    /// the round keeps: permutation, inverse, mask.
    fn cpu_sort_round(&self, len: usize, padded: usize, n_buckets: usize) -> [PlanBuf; 3] {
        let keys = self.u32s(format!("sort keys [{padded}] u32"), padded);
        let perm = self.u32s(format!("sorted permutation [{padded}] u32"), padded);
        let counts = self.hold(
            format!("bucket counts [{}] u32", n_buckets + 2),
            4 * (n_buckets + 2),
        );
        drop((keys, counts));
        let inv = self.u32s(format!("inverse permutation [{len}] u32"), len);
        let valid = self.hold(format!("sorted validity [{padded}] bool"), padded);
        [perm, inv, valid]
    }

    /// `reformer_lsh::lsh_attention_forward` on the CPU: the output, buckets and logsumexps
    /// `[heads, rounds, len]`; per head (one after another) the running logsumexp (f64) and the
    /// round's sorted outputs and logsumexps; per round the sort and the chunk tiles (gathered
    /// query/key/value rows and the online-softmax state).
    fn cpu_lsh_forward(
        &self,
        s: HeadShape,
        rot: &Rotations,
        chunk: usize,
        threads: usize,
    ) -> (PlanBuf, PlanLshSaved) {
        let (r, n_buckets) = (rot.n_rounds, rot.buckets.total());
        let (len, d, m) = (s.len, s.d, chunk);
        let per_round = s.heads * r * len;
        let out = self.heads("attention out", s);
        let buckets = self.u32s(format!("buckets [{}, {r}, {len}] u32", s.heads), per_round);
        let lse = self.f32s(format!("logsumexps [{}, {r}, {len}]", s.heads), per_round);
        let chunks = len.div_ceil(m);
        let padded = chunks * m;
        let tile = 4 * (2 * m + m * d + m * m) + 20 * m * d;
        for _ in 0..s.heads {
            let z = self.token(format!("running logsumexp [{len}] f64"), len, 8);
            let os = self.f32s(format!("sorted outputs [{padded}, {d}]"), padded * d);
            let zs = self.f32s(format!("sorted logsumexps [{padded}]"), padded);
            for _ in 0..r {
                let sorted = self.cpu_sort_round(len, padded, n_buckets);
                drop(self.tiles("LSH chunk tiles", chunks, tile, threads));
                drop(sorted);
            }
            drop((z, os, zs));
        }
        let saved = PlanLshSaved {
            _buckets: buckets,
            _lse: lse,
            rounds: r,
            n_buckets,
        };
        (out, saved)
    }

    /// `reformer_lsh::lsh_attention_backward` on the CPU: the gradients; per head the logsumexp
    /// over rounds (f64), the deltas and five sorted-order gradients (`dq`, own and look-back
    /// `dk` and `dv`); per round the sort again and the chunk tiles.
    fn cpu_lsh_backward(
        &self,
        s: HeadShape,
        saved: &PlanLshSaved,
        chunk: usize,
        threads: usize,
    ) -> (PlanBuf, PlanBuf) {
        let (len, d, m) = (s.len, s.d, chunk);
        let d_qk = self.heads("d_qk", s);
        let d_v = self.heads("d_v", s);
        let chunks = len.div_ceil(m);
        let padded = chunks * m;
        let tile = 20 * m * d + 4 * (m * d + 2 * m + 2 * m * m);
        for _ in 0..s.heads {
            let z = self.token(format!("logsumexp over rounds [{len}] f64"), len, 8);
            let delta = self.f32s(format!("delta [{len}]"), len);
            let sorted_grads: Vec<PlanBuf> =
                ["dq", "dk own", "dk look-back", "dv own", "dv look-back"]
                    .iter()
                    .map(|n| self.f32s(format!("sorted {n} [{padded}, {d}]"), padded * d))
                    .collect();
            for _ in 0..saved.rounds {
                let sorted = self.cpu_sort_round(len, padded, saved.n_buckets);
                drop(self.tiles("LSH chunk tiles", chunks, tile, threads));
                drop(sorted);
            }
            drop((z, delta, sorted_grads));
        }
        (d_qk, d_v)
    }

    /// `reformer_lsh::banded::Banded::forward` with blocks of `block` rows: the geometry
    /// (positions and a validity mask), the output and logsumexps, and the online-softmax
    /// tiles of every head's blocks. Returns `(out, lse)`.
    fn cpu_banded_forward(&self, s: HeadShape, block: usize, threads: usize) -> (PlanBuf, PlanBuf) {
        let geometry = self.hold(
            format!("banded geometry [{}] (positions, mask)", s.len),
            5 * s.len,
        );
        let out = self.heads("attention out", s);
        let lse = self.f32s(
            format!("logsumexp [{}, {}]", s.heads, s.len),
            s.heads * s.len,
        );
        let tasks = s.heads * s.len.div_ceil(block);
        let tile = 4 * (2 * block + block * s.d + block * block);
        drop(self.tiles("online-softmax tiles", tasks, tile, threads));
        drop(geometry);
        (out, lse)
    }

    /// `reformer_lsh::banded::Banded::backward`: the geometry, the deltas, the three
    /// gradients, and the score tiles of the `dq` pass and of the `dk`, `dv` pass.
    fn cpu_banded_backward(&self, s: HeadShape, block: usize, threads: usize) -> [PlanBuf; 3] {
        let geometry = self.hold(
            format!("banded geometry [{}] (positions, mask)", s.len),
            5 * s.len,
        );
        let delta = self.f32s(format!("delta [{}, {}]", s.heads, s.len), s.heads * s.len);
        let grads = ["d_q", "d_k", "d_v"].map(|n| self.heads(n, s));
        let tasks = s.heads * s.len.div_ceil(block);
        let tile = 2 * 4 * block * block;
        drop(self.tiles("score tiles (dq pass)", tasks, tile, threads));
        drop(self.tiles("score tiles (dk, dv pass)", tasks, tile, threads));
        drop((delta, geometry));
        grads
    }

    /// `CpuBackend::single_pass_out`: the logsumexps copied into a tensor while the attention
    /// function's buffer lives, which is freed on return.
    fn cpu_single_pass_out(&self, out: PlanBuf, lse: PlanBuf, s: HeadShape) -> (PlanBuf, PlanBuf) {
        let copy = self.f32s(
            format!("logsumexp [{}] (copy)", s.heads * s.len),
            s.heads * s.len,
        );
        drop(lse);
        (out, copy)
    }
}

fn shape_label(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl Backend for PlanBackend {
    type Buf = PlanBuf;
    type Act = PlanBuf;
    type LshSaved = PlanLshSaved;
    type Mask = PlanBuf;

    fn describe(&self) -> String {
        match self.target {
            PlanTarget::Cuda => "plan (dry run of the CUDA backend's allocations)".into(),
            PlanTarget::Cpu { threads } => {
                format!("plan (dry run of the CPU backend's allocations, {threads} threads)")
            }
        }
    }

    fn act_dtype(&self) -> DType {
        self.act
    }

    fn alloc_act(&self, shape: &[usize]) -> Result<PlanBuf> {
        Ok(self.act_token(shape_label(shape), shape.iter().product()))
    }

    fn download_act(&self, buf: &PlanBuf) -> Result<Vec<f32>> {
        Ok(vec![0.0; buf.len])
    }

    fn copy_to_act(
        &self,
        _src: &PlanBuf,
        _s: Strided,
        _dst: &mut PlanBuf,
        _d: Strided,
        _rows: usize,
        _cols: usize,
    ) -> Result<()> {
        Ok(())
    }

    fn copy_from_act(
        &self,
        _src: &PlanBuf,
        _s: Strided,
        _dst: &mut PlanBuf,
        _d: Strided,
        _rows: usize,
        _cols: usize,
    ) -> Result<()> {
        Ok(())
    }

    fn alloc(&self, shape: &[usize]) -> Result<PlanBuf> {
        Ok(self.f32s(shape_label(shape), shape.iter().product()))
    }

    fn zeros(&self, shape: &[usize]) -> Result<PlanBuf> {
        self.alloc(shape)
    }

    fn upload(&self, shape: &[usize], _host: &[f32]) -> Result<PlanBuf> {
        self.alloc(shape)
    }

    fn download(&self, buf: &PlanBuf) -> Result<Vec<f32>> {
        Ok(vec![0.0; buf.len])
    }

    fn fill(&self, _buf: &mut PlanBuf, _value: f32) -> Result<()> {
        Ok(())
    }

    fn live_bytes(&self) -> usize {
        self.reg.borrow().live
    }

    fn peak_bytes(&self) -> usize {
        self.reg.borrow().peak
    }

    fn reset_peak(&self) {
        let mut r = self.reg.borrow_mut();
        r.peak = r.live;
        r.peak_phase = r.phase.clone();
        r.peak_set = r.snapshot();
    }

    fn driver_used_bytes(&self) -> Option<usize> {
        None
    }

    fn mark(&self, phase: &str) {
        self.reg.borrow_mut().phase = phase.to_string();
    }

    fn copy2d(
        &self,
        _src: &PlanBuf,
        _s: Strided,
        _dst: &mut PlanBuf,
        _d: Strided,
        _rows: usize,
        _cols: usize,
        _alpha: f32,
        _accumulate: bool,
    ) -> Result<()> {
        Ok(())
    }

    fn gemm(
        &self,
        _c: &mut PlanBuf,
        _a: &PlanBuf,
        _b: &PlanBuf,
        _m: usize,
        _k: usize,
        _n: usize,
        _ta: bool,
        _tb: bool,
        _accumulate: bool,
    ) -> Result<()> {
        Ok(())
    }

    fn layer_norm_forward(
        &self,
        _x: &PlanBuf,
        _gamma: &PlanBuf,
        _beta: &PlanBuf,
        _y: &mut PlanBuf,
        _mean: &mut PlanBuf,
        _rstd: &mut PlanBuf,
        _rows: usize,
        _cols: usize,
    ) -> Result<()> {
        Ok(())
    }

    fn layer_norm_backward(
        &self,
        _x: &PlanBuf,
        _gamma: &PlanBuf,
        _mean: &PlanBuf,
        _rstd: &PlanBuf,
        _dy: &PlanBuf,
        _dx: &mut PlanBuf,
        _dgamma: &mut PlanBuf,
        _dbeta: &mut PlanBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        // The CPU sums the gain and bias gradients in host vectors, outside the pool.
        if self.target == PlanTarget::Cuda {
            let (parts, _) = param_parts(rows);
            let _g = self.f32s("layer-norm gain partials", parts * cols);
            let _b = self.f32s("layer-norm bias partials", parts * cols);
        }
        Ok(())
    }

    fn add_bias(&self, _x: &mut PlanBuf, _b: &PlanBuf, _rows: usize, _cols: usize) -> Result<()> {
        Ok(())
    }

    fn column_sums_acc(
        &self,
        _x: &PlanBuf,
        _out: &mut PlanBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        if self.target == PlanTarget::Cuda {
            let (parts, _) = column_sum_parts(rows);
            let _p = self.f32s("column-sum partials (f64)", (2 * parts * cols).max(1));
        }
        Ok(())
    }

    fn relu_in_place(&self, _x: &mut PlanBuf, _n: usize) -> Result<()> {
        Ok(())
    }

    fn relu_mask_in_place(&self, _h: &PlanBuf, _g: &mut PlanBuf, _n: usize) -> Result<()> {
        Ok(())
    }

    fn dropout_rows(
        &self,
        _x: &mut PlanBuf,
        _rows: usize,
        _cols: usize,
        _first_row: usize,
        _mask: &Dropout,
    ) -> Result<()> {
        Ok(())
    }

    fn embed(&self, tokens: &[u8], _t: &PlanBuf, _out: &mut PlanBuf, _dim: usize) -> Result<()> {
        // The CPU reads the ids from the host slice.
        if self.target == PlanTarget::Cuda {
            let _ids = self.u32s("token ids", tokens.len());
        }
        Ok(())
    }

    fn embed_backward(
        &self,
        tokens: &[u8],
        _dout: &PlanBuf,
        _dtable: &mut PlanBuf,
        _dim: usize,
    ) -> Result<()> {
        if self.target == PlanTarget::Cuda {
            let _ids = self.u32s("token ids", tokens.len());
        }
        Ok(())
    }

    fn axial_forward_add(
        &self,
        _e1: &PlanBuf,
        _e2: &PlanBuf,
        _out: &mut PlanBuf,
        _first: usize,
        _n: usize,
        _t: AxialTables,
    ) -> Result<()> {
        Ok(())
    }

    fn axial_backward(
        &self,
        _dout: &PlanBuf,
        _de1: &mut PlanBuf,
        _de2: &mut PlanBuf,
        _n: usize,
        _t: AxialTables,
    ) -> Result<()> {
        Ok(())
    }

    fn cross_entropy(
        &self,
        _logits: &mut PlanBuf,
        targets: &[u8],
        _vocab: usize,
        _grad_scale: Option<f32>,
    ) -> Result<Vec<f32>> {
        let rows = targets.len();
        // The CPU reads the targets from the host slice and returns the losses in a host vector.
        if self.target == PlanTarget::Cuda {
            let _t = self.u32s("targets", rows);
            let _l = self.f32s("per-row loss", rows);
            let _z = self.f32s("per-row logsumexp", rows);
        }
        Ok(vec![0.0; rows])
    }

    fn sum_squares(&self, _bufs: &[&PlanBuf]) -> Result<f64> {
        if self.target == PlanTarget::Cuda {
            let _out = self.f32s("squared norm", 1);
            let _p = self.f32s("reduction partials", MAX_PARTIALS);
        }
        Ok(0.0)
    }

    fn adam_update(
        &self,
        _param: &mut PlanBuf,
        _grad: &mut PlanBuf,
        _m: &mut PlanBuf,
        _v: &mut PlanBuf,
        _hp: &AdamHp,
    ) -> Result<()> {
        Ok(())
    }

    fn key_mask(&self, lens: &[usize], heads: usize, len: usize) -> Result<PlanBuf> {
        // Host memory on the CPU; an uploaded byte per key on the GPU.
        let bytes = match self.target {
            PlanTarget::Cuda => 1,
            PlanTarget::Cpu { .. } => 0,
        };
        Ok(self.token(
            format!("key mask [{}, {len}] u8", lens.len() * heads),
            lens.len() * heads * len,
            bytes,
        ))
    }

    fn lsh_forward(
        &self,
        _qk: &PlanBuf,
        _v: &PlanBuf,
        rot: &Rotations,
        call: &AttnCall<'_, PlanBuf>,
    ) -> Result<(PlanBuf, PlanLshSaved)> {
        let (s, chunk) = (call.shape, call.chunk);
        if let PlanTarget::Cpu { threads } = self.target {
            // `CpuBackend::store_out` rounds the output in place.
            return Ok(self.cpu_lsh_forward(s, rot, chunk, threads));
        }
        let (r, n_buckets) = (rot.n_rounds, rot.buckets.total());
        let per_round = s.heads * r * s.len;
        let buckets = {
            let _rot = self.f32s("LSH rotations", rot.data.len());
            self.u32s(
                format!("buckets [{}, {r}, {}] u32", s.heads, s.len),
                per_round,
            )
        };
        let perm = self.lsh_sort(s.heads * r, s.len, n_buckets, call.mask.is_some());
        let out = self.heads("attention out", s);
        let lse = self.f32s(
            format!("logsumexps [{}, {r}, {}]", s.heads, s.len),
            per_round,
        );
        drop(perm);
        Ok((
            self.store_out(out, s),
            PlanLshSaved {
                _buckets: buckets,
                _lse: lse,
                rounds: r,
                n_buckets,
            },
        ))
    }

    fn lsh_backward(
        &self,
        fwd: LshForward<'_, Self>,
        _d_out: &PlanBuf,
        _rot: &Rotations,
        call: &AttnCall<'_, PlanBuf>,
    ) -> Result<(PlanBuf, PlanBuf)> {
        let (s, chunk, saved) = (call.shape, call.chunk, fwd.saved);
        if let PlanTarget::Cpu { threads } = self.target {
            return Ok(self.cpu_lsh_backward(s, saved, chunk, threads));
        }
        let _delta = self.f32s("delta", s.heads * s.len);
        let masked = call.mask.is_some();
        let _perm = self.lsh_sort(s.heads * saved.rounds, s.len, saved.n_buckets, masked);
        let d_qk = self.heads("d_qk", s);
        let d_v = self.heads("d_v", s);
        Ok((d_qk, d_v))
    }

    fn local_forward(
        &self,
        _q: &PlanBuf,
        _k: &PlanBuf,
        _v: &PlanBuf,
        call: &AttnCall<'_, PlanBuf>,
    ) -> Result<(PlanBuf, PlanBuf)> {
        let (s, chunk) = (call.shape, call.chunk);
        if let PlanTarget::Cpu { threads } = self.target {
            let (out, lse) = self.cpu_banded_forward(s, chunk, threads);
            return Ok(self.cpu_single_pass_out(out, lse, s));
        }
        Ok(self.single_pass_out(s))
    }

    fn local_backward(
        &self,
        _fwd: LocalForward<'_, Self>,
        _d_out: &PlanBuf,
        call: &AttnCall<'_, PlanBuf>,
    ) -> Result<(PlanBuf, PlanBuf, PlanBuf)> {
        let (s, chunk) = (call.shape, call.chunk);
        if let PlanTarget::Cpu { threads } = self.target {
            let [d_q, d_k, d_v] = self.cpu_banded_backward(s, chunk, threads);
            return Ok((d_q, d_k, d_v));
        }
        let _delta = self.f32s("delta", s.heads * s.len);
        Ok((
            self.heads("d_q", s),
            self.heads("d_k", s),
            self.heads("d_v", s),
        ))
    }

    fn exact_forward(
        &self,
        _qk: &PlanBuf,
        _v: &PlanBuf,
        call: &AttnCall<'_, PlanBuf>,
    ) -> Result<(PlanBuf, PlanBuf)> {
        let s = call.shape;
        if let PlanTarget::Cpu { threads } = self.target {
            // `unit_keys`, live through the attention and the logsumexp copy.
            let k = self.heads("unit keys", s);
            let (out, lse) = self.cpu_banded_forward(s, EXACT_BLOCK, threads);
            let stored = self.cpu_single_pass_out(out, lse, s);
            drop(k);
            return Ok(stored);
        }
        Ok(self.single_pass_out(s))
    }

    fn exact_backward(
        &self,
        _fwd: ExactForward<'_, Self>,
        _d_out: &PlanBuf,
        call: &AttnCall<'_, PlanBuf>,
    ) -> Result<(PlanBuf, PlanBuf)> {
        let s = call.shape;
        if let PlanTarget::Cpu { threads } = self.target {
            // Unit keys again; `shared_qk_grad` folds `d_k` into `d_q` in place.
            let k = self.heads("unit keys", s);
            let [d_q, d_k, d_v] = self.cpu_banded_backward(s, EXACT_BLOCK, threads);
            drop((d_k, k));
            return Ok((d_q, d_v));
        }
        let _delta = self.f32s("delta", s.heads * s.len);
        Ok((self.heads("d_qk", s), self.heads("d_v", s)))
    }

    fn cached_attention(
        &self,
        _q: &PlanBuf,
        _k_cache: &PlanBuf,
        _v_cache: &PlanBuf,
        q_pos: &[u32],
        a: &CachedAttention<'_>,
    ) -> Result<PlanBuf> {
        // The kernel keeps its tiles in registers and shared memory (CUDA) or per-thread
        // scratch of a few KiB (CPU): the output is a buffer, and on CUDA the queries'
        // positions and keys, uploaded for the call.
        let out = self.alloc(&[q_pos.len(), a.heads * a.d])?;
        if self.target == PlanTarget::Cuda {
            let keys = match a.keys {
                reformer_lsh::CachedKeys::Lists { pos, .. } => pos.len(),
                reformer_lsh::CachedKeys::Ranges(r) => 2 * r.len(),
            };
            let uploads = (
                self.u32s("decoding: query positions", q_pos.len()),
                self.u32s("decoding: key lists", keys),
            );
            drop(uploads);
        }
        Ok(out)
    }

    fn unit_rows(&self, _x: &mut PlanBuf, _rows: usize, _cols: usize) -> Result<()> {
        Ok(())
    }

    fn lsh_buckets(
        &self,
        _qk: &PlanBuf,
        rows: usize,
        heads: usize,
        rot: &Rotations,
    ) -> Result<Vec<u32>> {
        Ok(vec![0; heads * rot.n_rounds * rows])
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// A step's pool peak as the dry run of the model on a [`PlanBackend`] found it.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub target: PlanTarget,
    pub training: bool,
    pub len: usize,
    /// How the activations are stored.
    pub act: DType,
    pub parameters: usize,
    pub gradients: usize,
    pub optimizer: usize,
    pub peak: usize,
    /// The phase of the step at the peak (the model's marks).
    pub peak_at: String,
    /// Buffers the step allocated that are live at the peak, largest first (parameters,
    /// gradients and moments, which live across steps, are counted above).
    pub working_set: Vec<(String, usize)>,
}

impl MemoryPlan {
    /// One training step (forward, backward, Adam; the optimizer's moments exist, as from the
    /// second step on) or one forward pass with the loss, of `cfg` over `len` tokens, on
    /// `target`, with activations stored in `act` (f32 or bf16). For [`PlanTarget::Cpu`], give
    /// the threads of the rayon pool the step runs on (`rayon::current_num_threads()` there).
    pub fn new(
        cfg: &ModelConfig,
        len: usize,
        training: bool,
        target: PlanTarget,
        act: DType,
    ) -> Result<Self> {
        let backend = PlanBackend::for_target(target).with_act_dtype(act)?;
        let reg = Rc::clone(&backend.reg);
        let mut lm = ReformerLm::for_config(backend, cfg)?;
        let params = reg.borrow().live;
        let first_step_id = std::cell::Cell::new(0u64);
        let tokens = vec![0u8; len + 1];
        if training {
            lm.set_rounds(cfg.n_rounds)?;
            // The first update allocates the moments; plan the steady state after it.
            lm.adam_update(crate::AdamConfig::default(), 0.0)?;
            lm.backend().reset_peak();
            first_step_id.set(reg.borrow().next);
            lm.zero_grad()?;
            lm.train_step_grads(&tokens, &reformer_reversible::StepContext::train(1))?;
            lm.adam_update(crate::AdamConfig::default(), 0.0)?;
        } else {
            lm.drop_optimizer_state();
            lm.set_rounds(cfg.eval_rounds)?;
            lm.backend().reset_peak();
            first_step_id.set(reg.borrow().next);
            lm.eval_loss_sum(&tokens, &reformer_reversible::StepContext::eval(0))?;
        }
        let r = reg.borrow();
        let mut working_set: Vec<(String, usize)> = r
            .peak_set
            .iter()
            .filter(|(id, _, _)| *id >= first_step_id.get())
            .map(|(_, l, b)| (l.clone(), *b))
            .collect();
        working_set.sort_by_key(|w| std::cmp::Reverse(w.1));
        Ok(Self {
            target,
            training,
            len,
            act,
            parameters: params / 2,
            gradients: params / 2,
            optimizer: if training { params } else { 0 },
            peak: r.peak,
            peak_at: r.peak_phase.clone(),
            working_set,
        })
    }
}

/// The memory of decoding one sequence of up to `capacity` positions (see [`crate::decode`]):
/// the model, the caches (allocated up front for the whole capacity) and the peak of a prefill
/// of `context` positions (one full forward) followed by steps. The bucket indexes of the LSH
/// layers live on the host and grow with the position (`DecodeState::index_bytes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodePlan {
    pub target: PlanTarget,
    pub context: usize,
    pub capacity: usize,
    pub act: DType,
    /// Parameters and their gradient buffers (the model allocates both).
    pub model: usize,
    pub caches: usize,
    pub peak: usize,
}

impl DecodePlan {
    pub fn new(
        cfg: &ModelConfig,
        context: usize,
        capacity: usize,
        target: PlanTarget,
        act: DType,
    ) -> Result<Self> {
        let backend = PlanBackend::for_target(target).with_act_dtype(act)?;
        let reg = Rc::clone(&backend.reg);
        let mut lm = ReformerLm::for_config(backend, cfg)?;
        lm.set_rounds(cfg.eval_rounds)?;
        let model = reg.borrow().live;
        lm.backend().reset_peak();
        let mut st = lm.start_decoding(capacity)?;
        let caches = reg.borrow().live - model;
        lm.prefill(&mut st, &vec![0u8; context.clamp(1, capacity)])?;
        if context < capacity {
            lm.decode(&mut st, &[0])?;
        }
        let peak = reg.borrow().peak;
        Ok(Self {
            target,
            context,
            capacity,
            act,
            model,
            caches,
            peak,
        })
    }
}

impl fmt::Display for DecodePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "decoding plan ({}, dry run): a prefill of {} positions, caches for {}, {} \
             activations: model {}, caches {}, peak {}",
            match self.target {
                PlanTarget::Cuda => "CUDA backend".to_string(),
                PlanTarget::Cpu { threads } => format!("CPU backend, {threads} threads"),
            },
            self.context,
            self.capacity,
            format!("{:?}", self.act).to_lowercase(),
            human_bytes(self.model),
            human_bytes(self.caches),
            human_bytes(self.peak)
        )
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "memory plan ({}, dry run): one {}, {} positions, {} activations",
            match self.target {
                PlanTarget::Cuda => "CUDA backend".to_string(),
                PlanTarget::Cpu { threads } => format!("CPU backend, {threads} threads"),
            },
            if self.training {
                "training step (forward, backward, Adam)"
            } else {
                "forward pass with the loss"
            },
            self.len,
            format!("{:?}", self.act).to_lowercase()
        )?;
        writeln!(
            f,
            "  parameters        {:>12}",
            human_bytes(self.parameters)
        )?;
        writeln!(f, "  gradients         {:>12}", human_bytes(self.gradients))?;
        writeln!(f, "  optimizer state   {:>12}", human_bytes(self.optimizer))?;
        writeln!(f, "  pool peak         {:>12}", human_bytes(self.peak))?;
        writeln!(f, "  peak at: {}", self.peak_at)?;
        writeln!(
            f,
            "  of which the step's own buffers, live at the peak (largest first):"
        )?;
        let mut merged: Vec<(String, usize, usize)> = Vec::new();
        for (label, bytes) in &self.working_set {
            match merged.iter_mut().find(|m| &m.0 == label && m.1 == *bytes) {
                Some(m) => m.2 += 1,
                None => merged.push((label.clone(), *bytes, 1)),
            }
        }
        for (label, bytes, count) in merged.iter().take(16) {
            let times = if *count > 1 {
                format!(" × {count}")
            } else {
                String::new()
            };
            writeln!(f, "    {:>12}  {label}{times}", human_bytes(*bytes))?;
        }
        if merged.len() > 16 {
            writeln!(f, "    … {} more kinds of buffer", merged.len() - 16)?;
        }
        match self.target {
            PlanTarget::Cuda => write!(
                f,
                "  outside the pool: the CUDA context, loaded modules and cuBLAS workspace"
            ),
            PlanTarget::Cpu { .. } => write!(
                f,
                "  outside the pool: the program, thread stacks and the allocator's slack"
            ),
        }
    }
}

/// `bytes` in B, KiB, MiB, GiB or TiB, two decimals.
pub fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
