//! [`ReformerLm`]: the byte-level Reformer language model, written once against the
//! [`Backend`] trait — embedding and axial positions, the reversible stack with its recomputing
//! backward ([`crate::layers`]), the chunked LM head and loss, and Adam with global-norm
//! clipping — so the same program trains on the CPU ([`crate::backend::CpuBackend`]), on a GPU
//! ([`crate::backend::CudaBackend`]) and plans memory ([`crate::backend::PlanBackend`]).
//!
//! Every buffer lives on the backend; the host sees the parameters only through
//! [`ReformerLm::snapshot`] (to checkpoint) and [`ReformerLm::from_snapshot`] (to resume).
//! `tests/reference/` holds a deliberately plain model (no reversibility, no chunking, every
//! activation stored) that this one is checked against on every backend.

use std::collections::HashMap;

use reformer_reversible::{AttentionKind, StepContext};

use crate::backend::{AdamHp, AxialTables, Backend, Strided};
use crate::checkpoint::{Checkpoint, Moments, Snapshot};
use crate::config::{ModelConfig, VOCAB};
use crate::error::{ReformerError, Result};
use crate::init::initial_values;
use crate::layers::{blocks, pair_mut, AttnLayer, FfLayer, Seqs};
use crate::optim::{AdamConfig, UpdateStats};

/// `(dY1, dY2)` from the head.
type StreamGrads<B> = (<B as Backend>::Buf, <B as Backend>::Buf);

/// Adam's moments on the backend.
struct AdamState<B: Backend> {
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
    step: u64,
}

/// The language model on a backend.
pub struct ReformerLm<B: Backend> {
    pub(crate) backend: B,
    pub(crate) cfg: ModelConfig,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    pub(crate) values: Vec<B::Buf>,
    grads: Vec<B::Buf>,
    adam: Option<AdamState<B>>,
    pub(crate) tokens: usize,
    pub(crate) axial: (usize, usize),
    pub(crate) tables: AxialTables,
    pub(crate) layers: Vec<(AttnLayer, FfLayer)>,
    head_ln: (usize, usize),
    head_w: usize,
    head_b: usize,
}

fn index(map: &HashMap<String, usize>, name: &str) -> Result<usize> {
    map.get(name)
        .copied()
        .ok_or_else(|| ReformerError::Config(format!("the model has no parameter `{name}`")))
}

/// Names and shapes of `cfg`'s parameters, the model's
/// order: embedding, axial tables, each layer's attention then feed-forward, the head.
pub fn param_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f, w) = (cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.d_head);
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("embed.tokens".into(), vec![VOCAB, d]),
        (
            "embed.axial.0".into(),
            vec![cfg.axial_shape.0, cfg.axial_dims.0],
        ),
        (
            "embed.axial.1".into(),
            vec![cfg.axial_shape.1, cfg.axial_dims.1],
        ),
    ];
    for (i, lc) in cfg.layer_configs().iter().enumerate() {
        let mut p = |name: &str, shape: Vec<usize>| v.push((format!("layers.{i}.{name}"), shape));
        p("ln_attn.gamma", vec![d]);
        p("ln_attn.beta", vec![d]);
        match lc.attention {
            AttentionKind::Lsh | AttentionKind::Exact => p("attn.w_qk", vec![d, w]),
            AttentionKind::Local => {
                p("attn.w_q", vec![d, w]);
                p("attn.w_k", vec![d, w]);
            }
        }
        p("attn.w_v", vec![d, w]);
        p("attn.w_o", vec![w, d]);
        p("ln_ff.gamma", vec![d]);
        p("ln_ff.beta", vec![d]);
        p("ff.w1", vec![d, f]);
        p("ff.b1", vec![f]);
        p("ff.w2", vec![f, d]);
        p("ff.b2", vec![d]);
    }
    v.push(("head.norm.gamma".into(), vec![2 * d]));
    v.push(("head.norm.beta".into(), vec![2 * d]));
    v.push(("head.weight".into(), vec![2 * d, VOCAB]));
    v.push(("head.bias".into(), vec![VOCAB]));
    v
}

impl<B: Backend> ReformerLm<B> {
    /// A freshly initialised model of `cfg` (deterministic in `cfg.seed`, the same values on
    /// every backend; see [`crate::init`]).
    pub fn new(backend: B, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let specs = param_specs(cfg);
        let init = initial_values(cfg);
        let values = specs
            .iter()
            .zip(&init)
            .map(|((_, shape), v)| backend.upload(shape, v))
            .collect::<Result<Vec<_>>>()?;
        drop(init);
        let (names, shapes) = specs.into_iter().unzip();
        Self::build(backend, cfg, names, shapes, values)
    }

    /// The model and optimizer state of a host snapshot (a checkpoint's contents), uploaded.
    pub fn from_snapshot(backend: B, snap: &Snapshot) -> Result<Self> {
        snap.config.validate()?;
        let specs = param_specs(&snap.config);
        let (names, shapes): (Vec<String>, Vec<Vec<usize>>) = specs.into_iter().unzip();
        if names != snap.names || shapes != snap.shapes || snap.values.len() != names.len() {
            return Err(ReformerError::Config(
                "the snapshot's parameters are not those of its config".into(),
            ));
        }
        let up = |vs: &[Vec<f32>]| -> Result<Vec<B::Buf>> {
            vs.iter()
                .zip(&shapes)
                .map(|(v, s)| backend.upload(s, v))
                .collect()
        };
        let values = up(&snap.values)?;
        let adam = match &snap.moments {
            Some(mo) if mo.step > 0 => {
                if mo.m.len() != names.len() || mo.v.len() != names.len() {
                    return Err(ReformerError::Config(format!(
                        "optimizer state for {} parameters, the model has {}",
                        mo.m.len(),
                        names.len()
                    )));
                }
                Some(AdamState {
                    m: up(&mo.m)?,
                    v: up(&mo.v)?,
                    step: mo.step,
                })
            }
            _ => None,
        };
        let mut lm = Self::build(backend, &snap.config, names, shapes, values)?;
        lm.adam = adam;
        Ok(lm)
    }

    /// The model and optimizer state stored in a checkpoint.
    pub fn from_checkpoint(backend: B, ck: &Checkpoint) -> Result<Self> {
        Self::from_snapshot(backend, &ck.restore()?)
    }

    /// The parameters and Adam's moments, downloaded (what a checkpoint holds).
    pub fn snapshot(&self) -> Result<Snapshot> {
        let down = |bs: &[B::Buf]| -> Result<Vec<Vec<f32>>> {
            bs.iter().map(|b| self.backend.download(b)).collect()
        };
        Ok(Snapshot {
            config: self.cfg.clone(),
            names: self.names.clone(),
            shapes: self.shapes.clone(),
            values: down(&self.values)?,
            moments: match &self.adam {
                None => None,
                Some(st) => Some(Moments {
                    m: down(&st.m)?,
                    v: down(&st.v)?,
                    step: st.step,
                }),
            },
        })
    }

    /// A model of `cfg` whose parameters are allocated but not initialised: for planning (see
    /// [`crate::backend::MemoryPlan`]) and for loading values afterwards.
    pub fn for_config(backend: B, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let specs = param_specs(cfg);
        let values = specs
            .iter()
            .map(|(_, shape)| backend.alloc(shape))
            .collect::<Result<Vec<_>>>()?;
        let (names, shapes) = specs.into_iter().unzip();
        Self::build(backend, cfg, names, shapes, values)
    }

    fn build(
        backend: B,
        cfg: &ModelConfig,
        names: Vec<String>,
        shapes: Vec<Vec<usize>>,
        values: Vec<B::Buf>,
    ) -> Result<Self> {
        let grads = shapes
            .iter()
            .map(|s| backend.zeros(s))
            .collect::<Result<Vec<_>>>()?;
        let map: HashMap<String, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        let cfg = cfg.clone();
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for (i, lc) in cfg.layer_configs().into_iter().enumerate() {
            let p = |s: &str| index(&map, &format!("layers.{i}.{s}"));
            let proj = match lc.attention {
                AttentionKind::Lsh | AttentionKind::Exact => vec![p("attn.w_qk")?, p("attn.w_v")?],
                AttentionKind::Local => vec![p("attn.w_q")?, p("attn.w_k")?, p("attn.w_v")?],
            };
            let attn = AttnLayer {
                cfg: lc.clone(),
                layer: i,
                ln_g: p("ln_attn.gamma")?,
                ln_b: p("ln_attn.beta")?,
                proj,
                w_o: p("attn.w_o")?,
            };
            let ff = FfLayer {
                cfg: lc,
                layer: i,
                ln_g: p("ln_ff.gamma")?,
                ln_b: p("ln_ff.beta")?,
                w1: p("ff.w1")?,
                b1: p("ff.b1")?,
                w2: p("ff.w2")?,
                b2: p("ff.b2")?,
            };
            layers.push((attn, ff));
        }
        let tables = AxialTables {
            a1: cfg.axial_shape.0,
            a2: cfg.axial_shape.1,
            d1: cfg.axial_dims.0,
            d2: cfg.axial_dims.1,
        };
        Ok(Self {
            tokens: index(&map, "embed.tokens")?,
            axial: (index(&map, "embed.axial.0")?, index(&map, "embed.axial.1")?),
            tables,
            layers,
            head_ln: (
                index(&map, "head.norm.gamma")?,
                index(&map, "head.norm.beta")?,
            ),
            head_w: index(&map, "head.weight")?,
            head_b: index(&map, "head.bias")?,
            backend,
            cfg,
            names,
            shapes,
            values,
            grads,
            adam: None,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Parameter names, in the model's order (see [`param_specs`]).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Hash rounds of the LSH layers.
    pub fn rounds(&self) -> usize {
        self.layers
            .first()
            .map_or(self.cfg.n_rounds, |(a, _)| a.cfg.n_rounds)
    }

    /// Hash rounds of the LSH layers from now on.
    pub fn set_rounds(&mut self, n_rounds: usize) -> Result<()> {
        if n_rounds == 0 {
            return Err(ReformerError::InvalidArgument(
                "LSH attention needs at least one hash round".into(),
            ));
        }
        for (a, f) in &mut self.layers {
            a.cfg.n_rounds = n_rounds;
            f.cfg.n_rounds = n_rounds;
        }
        Ok(())
    }

    /// Frees Adam's moments (e.g. before inference-only passes); the next update starts
    /// them from zero.
    pub fn drop_optimizer_state(&mut self) {
        self.adam = None;
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) -> Result<()> {
        for g in &mut self.grads {
            self.backend.fill(g, 0.0)?;
        }
        Ok(())
    }

    /// The parameters' values, downloaded, in the model's order.
    pub fn download_values(&self) -> Result<Vec<Vec<f32>>> {
        self.values
            .iter()
            .map(|v| self.backend.download(v))
            .collect()
    }

    /// Replaces parameter `i`'s values (e.g. for a central-difference check).
    pub fn set_value(&mut self, i: usize, values: &[f32]) -> Result<()> {
        let shape = self.shapes.get(i).ok_or_else(|| {
            ReformerError::InvalidArgument(format!(
                "parameter {i} of a model with {}",
                self.shapes.len()
            ))
        })?;
        if shape.iter().product::<usize>() != values.len() {
            return Err(ReformerError::InvalidArgument(format!(
                "{} values for parameter `{}` of shape {shape:?}",
                values.len(),
                self.names[i]
            )));
        }
        self.values[i] = self.backend.upload(shape, values)?;
        Ok(())
    }

    /// Dropout rate of every layer from now on (0 turns it off).
    pub fn set_dropout(&mut self, rate: f32) {
        self.cfg.dropout = rate;
        for (a, f) in &mut self.layers {
            a.cfg.dropout = rate;
            f.cfg.dropout = rate;
        }
    }

    /// Positions per chunk of the LM head (the loss) from now on.
    pub fn set_loss_chunk(&mut self, chunk: usize) {
        self.cfg.loss_chunk = chunk.max(1);
    }

    /// The parameters' gradients, downloaded, in the model's order.
    pub fn download_grads(&self) -> Result<Vec<Vec<f32>>> {
        self.grads
            .iter()
            .map(|v| self.backend.download(v))
            .collect()
    }

    pub(crate) fn check_len(&self, len: usize) -> Result<()> {
        if len == 0 || len > self.cfg.max_len() {
            return Err(ReformerError::Length {
                len,
                max_len: self.cfg.max_len(),
            });
        }
        Ok(())
    }

    /// The batch's geometry and its inputs, padded with byte 0 to `pad_to` (default: the
    /// longest); each sequence holds its inputs and their next-byte targets (`len + 1` bytes).
    fn prepare(&self, batch: &[&[u8]], pad_to: Option<usize>) -> Result<(Seqs, Vec<u8>)> {
        if batch.is_empty() {
            return Err(ReformerError::InvalidArgument(
                "a batch needs at least one sequence".into(),
            ));
        }
        let mut lens = Vec::with_capacity(batch.len());
        for seq in batch {
            if seq.len() < 2 {
                return Err(ReformerError::InvalidArgument(format!(
                    "a sequence needs at least 2 tokens (inputs + next-byte targets), got {}",
                    seq.len()
                )));
            }
            lens.push(seq.len() - 1);
        }
        let longest = lens.iter().copied().max().unwrap_or(0);
        let len = pad_to.unwrap_or(longest);
        if len < longest {
            return Err(ReformerError::InvalidArgument(format!(
                "a batch padded to {len} positions holds a sequence of {longest}"
            )));
        }
        self.check_len(len)?;
        let mut inputs = Vec::with_capacity(batch.len() * len);
        for (seq, &l) in batch.iter().zip(&lens) {
            inputs.extend_from_slice(&seq[..l]);
            inputs.resize(inputs.len() + len - l, 0);
        }
        Ok((Seqs { len, lens }, inputs))
    }

    /// `(X1, X2)`: token embedding plus axial positions (each sequence from position 0),
    /// duplicated.
    pub(crate) fn embed(&self, inputs: &[u8], seqs: &Seqs) -> Result<(B::Buf, B::Buf)> {
        let (b, d) = (&self.backend, self.cfg.d_model);
        let (rows, len) = (seqs.rows(), seqs.len);
        let mut x = b.alloc(&[rows, d])?;
        b.embed(inputs, &self.values[self.tokens], &mut x, d)?;
        let (e1, e2) = (&self.values[self.axial.0], &self.values[self.axial.1]);
        if seqs.count() == 1 {
            b.axial_forward_add(e1, e2, &mut x, 0, len, self.tables)?;
        } else {
            let mut pos = b.zeros(&[len, d])?;
            b.axial_forward_add(e1, e2, &mut pos, 0, len, self.tables)?;
            for s in 0..seqs.count() {
                let at = Strided::new(s * len * d, len * d);
                b.copy2d(
                    &pos,
                    Strided::new(0, len * d),
                    &mut x,
                    at,
                    1,
                    len * d,
                    1.0,
                    true,
                )?;
            }
        }
        let mut x2 = b.alloc(&[rows, d])?;
        let whole = Strided::new(0, rows * d);
        b.copy2d(&x, whole, &mut x2, whole, 1, rows * d, 1.0, false)?;
        Ok((x, x2))
    }

    /// Embedding and the stack: `(Y1, Y2)`.
    fn forward_stack(
        &self,
        inputs: &[u8],
        seqs: &Seqs,
        ctx: &StepContext,
    ) -> Result<(B::Buf, B::Buf)> {
        self.backend.mark("embedding");
        let (mut y1, mut y2) = self.embed(inputs, seqs)?;
        let (b, vals) = (&self.backend, &self.values[..]);
        for (i, (attn, ff)) in self.layers.iter().enumerate() {
            b.mark(&format!(
                "layer {i} forward: {:?} attention",
                attn.cfg.attention
            ));
            attn.forward_add(b, vals, &y2, &mut y1, 1.0, seqs, ctx)?;
            b.mark(&format!("layer {i} forward: feed-forward"));
            ff.forward_add(b, vals, &y1, &mut y2, 1.0, seqs.rows(), ctx)?;
        }
        Ok((y1, y2))
    }

    /// The head over each sequence's real rows from position `loss_from` on of `(Y1, Y2)`, a
    /// chunk at a time: each sequence's summed loss, and with `grad_scale` the gradients
    /// `(dY1, dY2)` of `grad_scale ·` the batch's summed loss (head gradients accumulate;
    /// padded rows and rows before `loss_from` get 0).
    fn head(
        &mut self,
        y1: &B::Buf,
        y2: &B::Buf,
        seqs: &Seqs,
        batch: &[&[u8]],
        loss_from: usize,
        grad_scale: Option<f32>,
    ) -> Result<(Vec<f64>, Option<StreamGrads<B>>)> {
        let b = &self.backend;
        b.mark("LM head and loss");
        let (d, len) = (self.cfg.d_model, seqs.len);
        let w = 2 * d;
        let chunk = self.cfg.loss_chunk.max(1);
        let longest = seqs.lens.iter().copied().max().unwrap_or(0);
        let rows_max = chunk.min(longest.max(1));
        let mut dys = match grad_scale {
            Some(_) => Some((b.zeros(&[seqs.rows(), d])?, b.zeros(&[seqs.rows(), d])?)),
            None => None,
        };
        let mut hs = HeadRows::new(b, rows_max, w)?;
        let mut back = match grad_scale {
            Some(_) => Some((b.alloc(&[rows_max, w])?, b.alloc(&[rows_max, w])?)),
            None => None,
        };
        let (g, beta) = self.head_ln;
        let mut sums = vec![0.0f64; seqs.count()];
        for (s, seq) in batch.iter().enumerate() {
            let targets = &seq[1..];
            let from = loss_from.min(seqs.lens[s]);
            for (q0, rows) in blocks(seqs.lens[s] - from, chunk) {
                let p0 = from + q0;
                let start = s * len + p0;
                self.head_forward(&mut hs, y1, y2, start, rows)?;
                let vals = &self.values;
                let HeadRows {
                    h,
                    hn,
                    mean,
                    rstd,
                    logits,
                } = &mut hs;
                let losses = b.cross_entropy(logits, &targets[p0..p0 + rows], VOCAB, grad_scale)?;
                sums[s] += losses.iter().map(|&l| l as f64).sum::<f64>();
                if let (Some((dhn, dh)), Some((dy1, dy2))) = (back.as_mut(), dys.as_mut()) {
                    let grads = &mut self.grads;
                    b.gemm(
                        &mut grads[self.head_w],
                        hn,
                        logits,
                        w,
                        rows,
                        VOCAB,
                        true,
                        false,
                        true,
                    )?;
                    b.column_sums_acc(logits, &mut grads[self.head_b], rows, VOCAB)?;
                    b.gemm(
                        dhn,
                        logits,
                        &vals[self.head_w],
                        rows,
                        VOCAB,
                        w,
                        false,
                        true,
                        false,
                    )?;
                    let (dg, db) = pair_mut(grads, g, beta)?;
                    b.layer_norm_backward(h, &vals[g], mean, rstd, dhn, dh, dg, db, rows, w)?;
                    for (dy, col) in [(dy1, 0), (dy2, d)] {
                        b.copy2d(
                            dh,
                            Strided::new(col, w),
                            dy,
                            Strided::new(start * d, d),
                            rows,
                            d,
                            1.0,
                            false,
                        )?;
                    }
                }
            }
        }
        Ok((sums, dys))
    }

    /// The head's forward over rows `start..start + rows` of `(Y1, Y2)`: `hs.logits` holds
    /// their logits (before the loss).
    fn head_forward(
        &self,
        hs: &mut HeadRows<B>,
        y1: &B::Buf,
        y2: &B::Buf,
        start: usize,
        rows: usize,
    ) -> Result<()> {
        let (b, vals, d) = (&self.backend, &self.values, self.cfg.d_model);
        let w = 2 * d;
        for (y, col) in [(y1, 0), (y2, d)] {
            b.copy2d(
                y,
                Strided::new(start * d, d),
                &mut hs.h,
                Strided::new(col, w),
                rows,
                d,
                1.0,
                false,
            )?;
        }
        let (g, beta) = self.head_ln;
        b.layer_norm_forward(
            &hs.h,
            &vals[g],
            &vals[beta],
            &mut hs.hn,
            &mut hs.mean,
            &mut hs.rstd,
            rows,
            w,
        )?;
        b.gemm(
            &mut hs.logits,
            &hs.hn,
            &vals[self.head_w],
            rows,
            w,
            VOCAB,
            false,
            false,
            false,
        )?;
        b.add_bias(&mut hs.logits, &vals[self.head_b], rows, VOCAB)
    }

    /// The 256 logits predicting the byte after `context` (a full forward over it).
    pub fn next_logits(&self, context: &[u8], ctx: &StepContext) -> Result<Vec<f32>> {
        self.check_len(context.len())?;
        let seqs = Seqs::one(context.len());
        let (y1, y2) = self.forward_stack(context, &seqs, ctx)?;
        self.logits_at(&y1, &y2, context.len() - 1)
    }

    /// The 256 logits of row `row` of `(Y1, Y2)`, downloaded.
    pub(crate) fn logits_at(&self, y1: &B::Buf, y2: &B::Buf, row: usize) -> Result<Vec<f32>> {
        let mut hs = HeadRows::new(&self.backend, 1, 2 * self.cfg.d_model)?;
        self.head_forward(&mut hs, y1, y2, row, 1)?;
        let mut logits = self.backend.download(&hs.logits)?;
        logits.truncate(VOCAB);
        Ok(logits)
    }

    /// Forward and backward of one sequence of `len + 1` bytes (position `p` predicts byte
    /// `p + 1`): returns the mean loss in nats and **adds** the gradients of the mean loss to
    /// the model's gradients (call [`ReformerLm::zero_grad`] first).
    pub fn train_step_grads(&mut self, tokens: &[u8], ctx: &StepContext) -> Result<f32> {
        Ok(self.train_batch_grads(&[tokens], None, ctx)?.mean() as f32)
    }

    /// Forward and backward of a batch: each sequence holds `len_s + 1` bytes (its inputs and
    /// next-byte targets), every sequence is padded to `pad_to` positions (default: the
    /// longest), padded positions are masked as keys in every attention kind and left out of
    /// the loss. One step context serves the batch: its LSH rotations (drawn for the padded
    /// length) are shared by every sequence, and dropout masks are drawn per row of the batch.
    /// **Adds** the gradients of the batch's mean loss per position to the model's gradients
    /// and returns each sequence's summed loss.
    ///
    /// A sequence's result equals that of the sequence alone padded to the same length;
    /// without LSH layers, that of the sequence alone at its own length (causal attention
    /// never reaches the padding).
    pub fn train_batch_grads(
        &mut self,
        batch: &[&[u8]],
        pad_to: Option<usize>,
        ctx: &StepContext,
    ) -> Result<BatchLoss> {
        self.train_batch_grads_from(batch, pad_to, 0, ctx)
    }

    /// [`ReformerLm::train_batch_grads`] with the loss counted only at positions `loss_from`
    /// and later of each sequence (e.g. the second half of a copy task): the earlier positions
    /// are inputs only. Returns each sequence's summed loss over its counted positions; an
    /// error if no position of the batch is counted.
    pub fn train_batch_grads_from(
        &mut self,
        batch: &[&[u8]],
        pad_to: Option<usize>,
        loss_from: usize,
        ctx: &StepContext,
    ) -> Result<BatchLoss> {
        let (seqs, inputs) = self.prepare(batch, pad_to)?;
        let counts = counted(&seqs.lens, loss_from)?;
        let tokens: usize = counts.iter().sum();
        let (y1, y2) = self.forward_stack(&inputs, &seqs, ctx)?;
        let scale = Some(1.0 / tokens as f32);
        let (sums, dys) = self.head(&y1, &y2, &seqs, batch, loss_from, scale)?;
        let loss = BatchLoss { sums, counts };
        let mean = loss.mean() as f32;
        if !mean.is_finite() {
            return Err(ReformerError::NonFinite {
                what: "loss",
                value: mean,
                step: ctx.step,
            });
        }
        let (mut dx1, mut dx2) =
            dys.ok_or_else(|| ReformerError::Config("the head returned no gradients".into()))?;
        let (mut x1, mut x2) = (y1, y2);
        let b = &self.backend;
        for (i, (attn, ff)) in self.layers.iter().enumerate().rev() {
            b.mark(&format!("layer {i} backward: feed-forward"));
            // Y2 = X2 + FF(Y1): dY1 += FF'ᵀ dY2, X2 = Y2 − FF(Y1).
            ff.backward(
                b,
                &self.values,
                &mut self.grads,
                &x1,
                &dx2,
                &mut dx1,
                Some(&mut x2),
                seqs.rows(),
                ctx,
            )?;
            b.mark(&format!(
                "layer {i} backward: {:?} attention",
                attn.cfg.attention
            ));
            // Y1 = X1 + Attn(X2): dX2 = dY2 + Attn'ᵀ dY1, X1 = Y1 − Attn(X2).
            attn.backward(
                b,
                &self.values,
                &mut self.grads,
                &x2,
                &dx1,
                &mut dx2,
                Some(&mut x1),
                &seqs,
                ctx,
            )?;
        }
        drop((x1, x2));
        b.mark("embedding backward");
        // X1 and X2 are the same embedding: its gradient is the sum.
        let (d, rows, len) = (self.cfg.d_model, seqs.rows(), seqs.len);
        let whole = Strided::new(0, rows * d);
        b.copy2d(&dx2, whole, &mut dx1, whole, 1, rows * d, 1.0, true)?;
        drop(dx2);
        let (e1, e2) = pair_mut(&mut self.grads, self.axial.0, self.axial.1)?;
        if seqs.count() == 1 {
            b.axial_backward(&dx1, e1, e2, len, self.tables)?;
        } else {
            // Every sequence's positions start at 0: their gradients meet in one table.
            let mut dpos = b.zeros(&[len, d])?;
            for s in 0..seqs.count() {
                let at = Strided::new(s * len * d, len * d);
                b.copy2d(
                    &dx1,
                    at,
                    &mut dpos,
                    Strided::new(0, len * d),
                    1,
                    len * d,
                    1.0,
                    true,
                )?;
            }
            b.axial_backward(&dpos, e1, e2, len, self.tables)?;
        }
        b.embed_backward(&inputs, &dx1, &mut self.grads[self.tokens], d)?;
        Ok(loss)
    }

    /// Each sequence's summed loss (nats) over its positions, without gradients; the batch
    /// as in [`ReformerLm::train_batch_grads`].
    pub fn eval_batch_loss(
        &mut self,
        batch: &[&[u8]],
        pad_to: Option<usize>,
        ctx: &StepContext,
    ) -> Result<BatchLoss> {
        self.eval_batch_loss_from(batch, pad_to, 0, ctx)
    }

    /// [`ReformerLm::eval_batch_loss`] counting only positions `loss_from` and later of each
    /// sequence (as [`ReformerLm::train_batch_grads_from`]).
    pub fn eval_batch_loss_from(
        &mut self,
        batch: &[&[u8]],
        pad_to: Option<usize>,
        loss_from: usize,
        ctx: &StepContext,
    ) -> Result<BatchLoss> {
        let (seqs, inputs) = self.prepare(batch, pad_to)?;
        let counts = counted(&seqs.lens, loss_from)?;
        let (y1, y2) = self.forward_stack(&inputs, &seqs, ctx)?;
        let (sums, _) = self.head(&y1, &y2, &seqs, batch, loss_from, None)?;
        Ok(BatchLoss { sums, counts })
    }

    /// The most likely next byte at every position of each sequence of a batch (the argmax of
    /// its logits, the lowest byte on a tie), without gradients; the batch as in
    /// [`ReformerLm::eval_batch_loss`]. Sequence `s` gives `len_s` predictions: prediction
    /// `p` is for its byte `p + 1`.
    pub fn eval_batch_argmax(
        &mut self,
        batch: &[&[u8]],
        pad_to: Option<usize>,
        ctx: &StepContext,
    ) -> Result<Vec<Vec<u8>>> {
        let (seqs, inputs) = self.prepare(batch, pad_to)?;
        let (y1, y2) = self.forward_stack(&inputs, &seqs, ctx)?;
        let chunk = self.cfg.loss_chunk.max(1);
        let longest = seqs.lens.iter().copied().max().unwrap_or(1);
        let mut hs = HeadRows::new(&self.backend, chunk.min(longest), 2 * self.cfg.d_model)?;
        let mut out = Vec::with_capacity(seqs.count());
        for (s, &n) in seqs.lens.iter().enumerate() {
            let mut preds = Vec::with_capacity(n);
            for (p0, rows) in blocks(n, chunk) {
                self.head_forward(&mut hs, &y1, &y2, s * seqs.len + p0, rows)?;
                let logits = self.backend.download(&hs.logits)?;
                preds.extend(
                    logits
                        .chunks(VOCAB)
                        .take(rows)
                        .map(crate::generate::argmax_byte),
                );
            }
            out.push(preds);
        }
        Ok(out)
    }

    /// The summed loss (nats) over the `len` positions of `tokens` (`len + 1` bytes).
    pub fn eval_loss_sum(&mut self, tokens: &[u8], ctx: &StepContext) -> Result<f64> {
        Ok(self.eval_batch_loss(&[tokens], None, ctx)?.sums[0])
    }

    /// Mean loss (nats) of `tokens` without gradients.
    pub fn eval_loss(&mut self, tokens: &[u8], ctx: &StepContext) -> Result<f32> {
        Ok(self.eval_batch_loss(&[tokens], None, ctx)?.mean() as f32)
    }

    /// One Adam step from the accumulated gradients (moments allocated at the first call), with
    /// global-norm clipping (`cfg.clip_norm`).
    pub fn adam_update(&mut self, cfg: AdamConfig, lr: f32) -> Result<UpdateStats> {
        self.adam_update_scaled(cfg, lr, 1.0)
    }

    /// [`ReformerLm::adam_update`] from the accumulated gradients times `grad_scale` (e.g.
    /// `1/windows` after accumulating several windows), without a pass over the gradients:
    /// the scale is folded into the norm and the clipping factor.
    pub fn adam_update_scaled(
        &mut self,
        cfg: AdamConfig,
        lr: f32,
        grad_scale: f32,
    ) -> Result<UpdateStats> {
        let b = &self.backend;
        b.mark("optimizer");
        if self.adam.is_none() {
            let zeros =
                |_| -> Result<Vec<B::Buf>> { self.shapes.iter().map(|s| b.zeros(s)).collect() };
            self.adam = Some(AdamState {
                m: zeros(0)?,
                v: zeros(1)?,
                step: 0,
            });
        }
        let adam = self
            .adam
            .as_mut()
            .ok_or_else(|| ReformerError::Config("optimizer state missing".into()))?;
        let grads: Vec<&B::Buf> = self.grads.iter().collect();
        let grad_norm = (b.sum_squares(&grads)?.sqrt() * grad_scale as f64) as f32;
        if !grad_norm.is_finite() {
            return Err(ReformerError::NonFinite {
                what: "gradient norm",
                value: grad_norm,
                step: adam.step,
            });
        }
        let clip = grad_scale
            * match cfg.clip_norm {
                Some(max) if grad_norm > max => max / grad_norm,
                _ => 1.0,
            };
        adam.step += 1;
        let hp = AdamHp {
            lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            step: adam.step,
            clip,
        };
        for (((p, g), m), v) in self
            .values
            .iter_mut()
            .zip(&mut self.grads)
            .zip(&mut adam.m)
            .zip(&mut adam.v)
        {
            b.adam_update(p, g, m, v, &hp)?;
        }
        Ok(UpdateStats { lr, grad_norm })
    }
}

/// Scratch of the head over a block of rows: `concat(Y1, Y2)`, its layer norm and statistics,
/// the logits.
struct HeadRows<B: Backend> {
    h: B::Buf,
    hn: B::Buf,
    mean: B::Buf,
    rstd: B::Buf,
    logits: B::Buf,
}

/// Each sequence's positions from `loss_from` on; an error if that leaves none in the batch.
fn counted(lens: &[usize], loss_from: usize) -> Result<Vec<usize>> {
    let counts: Vec<usize> = lens.iter().map(|&l| l.saturating_sub(loss_from)).collect();
    if counts.iter().all(|&c| c == 0) {
        return Err(ReformerError::InvalidArgument(format!(
            "the loss counts positions from {loss_from} on, and no sequence of the batch \
             (longest: {} positions) reaches it",
            lens.iter().copied().max().unwrap_or(0)
        )));
    }
    Ok(counts)
}

impl<B: Backend> HeadRows<B> {
    fn new(b: &B, rows: usize, width: usize) -> Result<Self> {
        Ok(Self {
            h: b.alloc(&[rows, width])?,
            hn: b.alloc(&[rows, width])?,
            mean: b.alloc(&[rows])?,
            rstd: b.alloc(&[rows])?,
            logits: b.alloc(&[rows, VOCAB])?,
        })
    }
}

/// The losses of a batch: each sequence's summed loss (nats) and its positions.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLoss {
    pub sums: Vec<f64>,
    pub counts: Vec<usize>,
}

impl BatchLoss {
    /// The mean loss per position over the batch.
    pub fn mean(&self) -> f64 {
        self.sums.iter().sum::<f64>() / self.counts.iter().sum::<usize>().max(1) as f64
    }
}
