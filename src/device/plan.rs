//! The device model's memory plan by dry run: [`PlanBackend`] implements [`Backend`] with no
//! memory and no arithmetic — every buffer is a counted token — and accounts, op by op, for
//! the scratch the CUDA kernels' launch wrappers allocate (bucket-sort histograms and radix
//! passes, layer-norm and column-sum partials, uploaded indices, logsumexps, deltas). Running
//! [`DeviceLm`] on it replays the exact allocation sequence of a step on the GPU in
//! milliseconds, so its peak is the device pool's peak, with the live buffers at that moment
//! and the phase of the step where it happens.
//!
//! Outside the pool, and so outside the plan: the CUDA context, the loaded modules and
//! cuBLAS's workspace (the driver's reading includes them).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

use reformer_kernels::geometry::{bucket_sort_passes, BS_RADIX, BS_TILE};
use reformer_kernels::gpu::ops::layer_norm::param_parts;
use reformer_kernels::gpu::ops::reduce_adam::MAX_PARTIALS;
use reformer_kernels::gpu::ops::rows::column_sum_parts;
use reformer_lsh::Rotations;
use reformer_reversible::Dropout;

use super::backend::{check_act_dtype, AdamHp, AxialTables, Backend, DType, HeadShape, Strided};
use super::model::DeviceLm;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::planner::human_bytes;

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

/// The dry-run backend.
#[derive(Clone, Default)]
pub struct PlanBackend {
    reg: Rc<RefCell<Registry>>,
    act: DType,
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
    pub fn new() -> Self {
        Self::default()
    }

    /// Plans activations stored in `dtype` (f32 or bf16).
    pub fn with_act_dtype(mut self, dtype: DType) -> Result<Self> {
        check_act_dtype(dtype)?;
        self.act = dtype;
        Ok(self)
    }

    /// An activation buffer of `len` elements.
    fn act_token(&self, label: String, len: usize) -> PlanBuf {
        let label = match self.act {
            DType::F32 => label,
            _ => format!("{label} bf16"),
        };
        self.token(label, len, self.act.size_in_bytes())
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

    fn heads(&self, what: &str, s: HeadShape) -> PlanBuf {
        self.f32s(
            format!("{what} [{}, {}, {}]", s.heads, s.len, s.d),
            s.numel(),
        )
    }
}

fn shape_label(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl Backend for PlanBackend {
    type Buf = PlanBuf;
    type Act = PlanBuf;
    type LshSaved = PlanLshSaved;

    fn describe(&self) -> String {
        "plan (dry run of the CUDA backend's allocations)".into()
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
        let (parts, _) = param_parts(rows);
        let _g = self.f32s("layer-norm gain partials", parts * cols);
        let _b = self.f32s("layer-norm bias partials", parts * cols);
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
        let (parts, _) = column_sum_parts(rows);
        let _p = self.f32s("column-sum partials (f64)", (2 * parts * cols).max(1));
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
        let _ids = self.u32s("token ids", tokens.len());
        Ok(())
    }

    fn embed_backward(
        &self,
        tokens: &[u8],
        _dout: &PlanBuf,
        _dtable: &mut PlanBuf,
        _dim: usize,
    ) -> Result<()> {
        let _ids = self.u32s("token ids", tokens.len());
        Ok(())
    }

    fn axial_forward_add(
        &self,
        _e1: &PlanBuf,
        _e2: &PlanBuf,
        _out: &mut PlanBuf,
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
        let _t = self.u32s("targets", rows);
        let _l = self.f32s("per-row loss", rows);
        let _z = self.f32s("per-row logsumexp", rows);
        Ok(vec![0.0; rows])
    }

    fn sum_squares(&self, _bufs: &[&PlanBuf]) -> Result<f64> {
        let _out = self.f32s("squared norm", 1);
        let _p = self.f32s("reduction partials", MAX_PARTIALS);
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

    fn lsh_forward(
        &self,
        _qk: &PlanBuf,
        _v: &PlanBuf,
        s: HeadShape,
        rot: &Rotations,
        _chunk: usize,
        _causal: bool,
    ) -> Result<(PlanBuf, PlanLshSaved)> {
        let (r, n_buckets) = (rot.n_rounds, rot.buckets.total());
        let per_round = s.heads * r * s.len;
        let buckets = {
            let _rot = self.f32s("LSH rotations", rot.data.len());
            self.u32s(
                format!("buckets [{}, {r}, {}] u32", s.heads, s.len),
                per_round,
            )
        };
        let perm = self.sort(s.heads * r, s.len, n_buckets);
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
        _qk: &PlanBuf,
        _v: &PlanBuf,
        _out: &PlanBuf,
        _d_out: &PlanBuf,
        saved: &PlanLshSaved,
        s: HeadShape,
        _rot: &Rotations,
        _chunk: usize,
        _causal: bool,
    ) -> Result<(PlanBuf, PlanBuf)> {
        let _delta = self.f32s("delta", s.heads * s.len);
        let _perm = self.sort(s.heads * saved.rounds, s.len, saved.n_buckets);
        let d_qk = self.heads("d_qk", s);
        let d_v = self.heads("d_v", s);
        Ok((d_qk, d_v))
    }

    fn local_forward(
        &self,
        _q: &PlanBuf,
        _k: &PlanBuf,
        _v: &PlanBuf,
        s: HeadShape,
        _chunk: usize,
        _causal: bool,
    ) -> Result<(PlanBuf, PlanBuf)> {
        Ok(self.single_pass_out(s))
    }

    fn local_backward(
        &self,
        _q: &PlanBuf,
        _k: &PlanBuf,
        _v: &PlanBuf,
        _out: &PlanBuf,
        _lse: &PlanBuf,
        _d_out: &PlanBuf,
        s: HeadShape,
        _chunk: usize,
        _causal: bool,
    ) -> Result<(PlanBuf, PlanBuf, PlanBuf)> {
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
        s: HeadShape,
        _causal: bool,
    ) -> Result<(PlanBuf, PlanBuf)> {
        Ok(self.single_pass_out(s))
    }

    fn exact_backward(
        &self,
        _qk: &PlanBuf,
        _v: &PlanBuf,
        _out: &PlanBuf,
        _lse: &PlanBuf,
        _d_out: &PlanBuf,
        s: HeadShape,
        _causal: bool,
    ) -> Result<(PlanBuf, PlanBuf)> {
        let _delta = self.f32s("delta", s.heads * s.len);
        Ok((self.heads("d_qk", s), self.heads("d_v", s)))
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// A step's device-pool peak as the dry run found it.
#[derive(Debug, Clone)]
pub struct DevicePlan {
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

impl DevicePlan {
    /// One training step (forward, backward, Adam; the optimizer's moments exist, as from the
    /// second step on) or one forward pass with the loss, of `cfg` over `len` tokens, on the
    /// CUDA backend, with f32 activations.
    pub fn new(cfg: &ModelConfig, len: usize, training: bool) -> Result<Self> {
        Self::with_act_dtype(cfg, len, training, DType::F32)
    }

    /// As [`DevicePlan::new`], with activations stored in `act` (f32 or bf16).
    pub fn with_act_dtype(
        cfg: &ModelConfig,
        len: usize,
        training: bool,
        act: DType,
    ) -> Result<Self> {
        let backend = PlanBackend::new().with_act_dtype(act)?;
        let reg = Rc::clone(&backend.reg);
        let mut lm = DeviceLm::for_config(backend, cfg)?;
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

impl fmt::Display for DevicePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "device plan (CUDA backend, dry run): one {}, {} positions, {} activations",
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
        write!(
            f,
            "  outside the pool: the CUDA context, loaded modules and cuBLAS workspace"
        )
    }
}
