//! The memory planner: predicts, before anything runs, the memory pool's peak bytes of one
//! training step (forward, backward, Adam update: what [`crate::Trainer::step`] does) and of
//! one forward-only inference pass ([`crate::ReformerLm::eval_loss`]), with a breakdown into
//! parameters, gradients, optimizer state, the activations stored across the stack, and the
//! largest transient working set together with where it arises.
//!
//! The plan is not a formula fitted to measurements: it replays, symbolically, the sequence
//! of pool allocations and releases that the code makes (embedding, every layer's attention
//! and feed-forward, per head group, per head and per hash round, the chunked LM head and loss, the reversible
//! backward in reverse layer order), with the byte size of each buffer, and takes the maximum
//! of the running total. Each function below names the code it mirrors; a change to the
//! allocation structure of those functions must be mirrored here (`tests/planner_accuracy.rs`
//! checks the plan against the pool byte for byte on one worker thread).
//!
//! The one input that is not a function of the config is the number of worker threads:
//! chunk-level tasks of the attention ops each hold a tile of scratch while they run, so up to
//! `threads` tiles are live at once. The plan counts `min(threads, tasks)` tiles, which is an
//! upper bound (with several threads the scheduler may not run them all at the peak moment).

use std::fmt;

use reformer_engine::{DType, Device};
use reformer_reversible::{AttentionKind, LayerConfig};

use crate::config::{ModelConfig, VOCAB};
use crate::error::{ReformerError, Result};

/// What is planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanKind {
    /// One [`crate::Trainer::step`]: forward, loss and backward, Adam update.
    TrainingStep,
    /// One forward-only pass with the loss ([`crate::ReformerLm::eval_loss`]), with the
    /// config's evaluation rounds, on a model without optimizer state.
    Inference,
}

/// Which part of the breakdown a buffer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    Parameters,
    Gradients,
    Optimizer,
    /// Lives across the whole stack: the two streams (and, in the backward, their gradients).
    Stored,
    /// Lives inside one layer, one head or one chunk.
    Transient,
}

/// One buffer of the working set at the peak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedBuffer {
    pub label: String,
    pub bytes: usize,
    pub category: Category,
}

/// The predicted peak of the memory pool and its breakdown. See the module docs.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub kind: PlanKind,
    /// Positions per sequence (a training step reads `len + 1` bytes).
    pub len: usize,
    pub n_layers: usize,
    /// LSH hash rounds used (training: `n_rounds`; inference: `eval_rounds`).
    pub rounds: usize,
    pub device: Device,
    /// Storage type of activations (parameters, gradients and moments stay f32).
    pub dtype: DType,
    /// Worker threads assumed to hold attention tiles at once.
    pub threads: usize,
    /// Scalar parameters.
    pub num_params: usize,
    pub parameters: usize,
    pub gradients: usize,
    pub optimizer: usize,
    /// Stored activations live at the peak (the streams and their gradients).
    pub stored: usize,
    pub stored_what: String,
    /// Everything else live at the peak: the largest transient working set.
    pub transient: usize,
    /// Where the peak is first reached.
    pub peak_at: String,
    /// The buffers live at the peak, largest first.
    pub working_set: Vec<PlannedBuffer>,
    /// Peak of each phase (embedding, forward, loss, backward), in order.
    pub phases: Vec<(String, usize)>,
    /// The predicted pool peak: the sum of the five parts.
    pub total: usize,
    pub notes: Vec<String>,
}

impl MemoryPlan {
    /// The peak of one training step of `cfg` over sequences of `len` positions, with as many
    /// tile-holding workers as the current rayon pool has threads.
    pub fn for_training_step(
        cfg: &ModelConfig,
        len: usize,
        device: Device,
        dtype: DType,
    ) -> Result<MemoryPlan> {
        Self::plan(
            PlanKind::TrainingStep,
            cfg,
            len,
            device,
            dtype,
            rayon::current_num_threads(),
        )
    }

    /// The peak of one forward-only pass with the loss (evaluation rounds, no optimizer).
    pub fn for_inference(
        cfg: &ModelConfig,
        len: usize,
        device: Device,
        dtype: DType,
    ) -> Result<MemoryPlan> {
        Self::plan(
            PlanKind::Inference,
            cfg,
            len,
            device,
            dtype,
            rayon::current_num_threads(),
        )
    }

    /// The general form: `threads` workers hold attention tiles at once.
    pub fn plan(
        kind: PlanKind,
        cfg: &ModelConfig,
        len: usize,
        device: Device,
        dtype: DType,
        threads: usize,
    ) -> Result<MemoryPlan> {
        cfg.validate()?;
        if len == 0 || len > cfg.max_len() {
            return Err(ReformerError::Length {
                len,
                max_len: cfg.max_len(),
            });
        }
        let threads = threads.max(1);
        let rounds = match kind {
            PlanKind::TrainingStep => cfg.n_rounds,
            PlanKind::Inference => cfg.eval_rounds,
        };
        let num_params = num_params(cfg);
        let mut sim = Sim::new(dtype, threads);
        let param_bytes = 4 * num_params;
        sim.alloc("parameters", param_bytes, Category::Parameters);
        sim.alloc("gradients", param_bytes, Category::Gradients);
        if kind == PlanKind::TrainingStep {
            sim.alloc("Adam moments m, v", 2 * param_bytes, Category::Optimizer);
        }
        let layers: Vec<LayerConfig> = cfg
            .layer_configs()
            .into_iter()
            .map(|mut l| {
                l.n_rounds = rounds;
                l
            })
            .collect();
        let train = kind == PlanKind::TrainingStep;
        let stream = |name: &str| format!("{name} [{len}, {}]", cfg.d_model);

        // ReformerLm::embed: X1, and X2 = X1.try_clone().
        sim.phase("embedding");
        sim.at("embedding".into());
        let x1 = sim.alloc(
            stream("X1/Y1"),
            sim.stream(len * cfg.d_model),
            Category::Stored,
        );
        let x2 = sim.alloc(
            stream("X2/Y2"),
            sim.stream(len * cfg.d_model),
            Category::Stored,
        );

        // ReversibleStack::forward: block.forward = attention forward_add, then feed-forward.
        sim.phase("forward");
        for (i, l) in layers.iter().enumerate() {
            let g = Geometry::new(l, len);
            let what = format!("layer {i} forward: {}", kind_name(l.attention));
            attention_forward(&mut sim, &g, &what);
            sim.at(format!("layer {i} forward: feed-forward"));
            ff_forward(&mut sim, &g, train && l.dropout > 0.0);
        }

        let c = cfg.loss_chunk.min(len);
        let w2 = 2 * cfg.d_model;
        let mut dy = Vec::new();
        if train {
            // LmHead::loss_and_backward: dY1, dY2, then per-call chunk scratch.
            sim.phase("loss");
            sim.at(format!(
                "LM head: chunked loss and its backward ({c} positions per chunk)"
            ));
            dy.push(sim.alloc(
                stream("dY1"),
                sim.stream(len * cfg.d_model),
                Category::Stored,
            ));
            dy.push(sim.alloc(
                stream("dY2"),
                sim.stream(len * cfg.d_model),
                Category::Stored,
            ));
            let s = [
                sim.talloc(format!("head concat [{c}, {w2}]"), sim.act(c * w2)),
                sim.talloc(format!("head LN [{c}, {w2}]"), sim.act(c * w2)),
                sim.talloc(format!("head logits [{c}, {VOCAB}]"), sim.act(c * VOCAB)),
                sim.talloc(format!("head d LN [{c}, {w2}]"), sim.act(c * w2)),
                sim.talloc(format!("head d concat [{c}, {w2}]"), sim.act(c * w2)),
            ];
            ln_backward(&mut sim, c, w2);
            sim.free_all(&s);

            // ReversibleStack::backward_full: layers in reverse; block.backward = feed-forward
            // backward (rebuilding X2), then attention backward (rebuilding X1).
            sim.phase("backward");
            for (i, l) in layers.iter().enumerate().rev() {
                let g = Geometry::new(l, len);
                sim.at(format!("layer {i} backward: feed-forward backward"));
                ff_backward(&mut sim, &g);
                let what = format!("layer {i} backward: {} backward", kind_name(l.attention));
                attention_backward(&mut sim, &g, &what);
            }
        } else {
            // LmHead::loss: per-call chunk scratch.
            sim.phase("loss");
            sim.at(format!("LM head: chunked loss ({c} positions per chunk)"));
            let s = [
                sim.talloc(format!("head concat [{c}, {w2}]"), sim.act(c * w2)),
                sim.talloc(format!("head LN [{c}, {w2}]"), sim.act(c * w2)),
                sim.talloc(format!("head logits [{c}, {VOCAB}]"), sim.act(c * VOCAB)),
            ];
            sim.free_all(&s);
        }
        sim.free_all(&dy);
        sim.free_all(&[x1, x2]);
        // Adam::update allocates nothing from the pool.

        let peak = sim.peak.clone();
        let part = |cat: Category| -> usize {
            peak.bufs
                .iter()
                .filter(|b| b.category == cat)
                .map(|b| b.bytes)
                .sum()
        };
        let stored_bufs: Vec<&str> = peak
            .bufs
            .iter()
            .filter(|b| b.category == Category::Stored)
            .map(|b| b.label.as_str())
            .collect();
        let mut working_set: Vec<PlannedBuffer> = peak
            .bufs
            .iter()
            .filter(|b| b.category == Category::Transient)
            .cloned()
            .collect();
        working_set.sort_by_key(|b| std::cmp::Reverse(b.bytes));
        let mut notes = Vec::new();
        if device.is_cuda() {
            notes.push(
                "CUDA: these are the reference (CPU) model's figures. The GPU runs the device \
                 model (src/device/), whose own plan is `DevicePlan` (a dry run of its \
                 allocations, kernel scratch included; `long_context --device cuda --plan` \
                 prints both). The CUDA context and cuBLAS workspace (outside the pool) are \
                 not included."
                    .to_string(),
            );
        }
        if dtype != DType::F32 {
            notes.push(format!(
                "{dtype:?} activation storage: head-layout tensors, sorted buffers and chunk \
                 scratch are halved; the reversible streams and their gradients, parameters, \
                 gradients, Adam moments, per-position statistics, indices and attention tiles \
                 stay f32. An estimate: the CPU engine stores f32. The device model stores \
                 bf16 activations for real (`--device cuda|twin --dtype bf16`) and plans them \
                 exactly (`DevicePlan`)."
            ));
        }
        notes.push(format!(
            "attention tiles: up to {threads} worker(s) hold one each at a time (an upper \
             bound with several threads)."
        ));
        let plan = MemoryPlan {
            kind,
            len,
            n_layers: cfg.n_layers,
            rounds,
            device,
            dtype,
            threads,
            num_params,
            parameters: part(Category::Parameters),
            gradients: part(Category::Gradients),
            optimizer: part(Category::Optimizer),
            stored: part(Category::Stored),
            stored_what: stored_bufs.join(", "),
            transient: part(Category::Transient),
            peak_at: peak.at,
            working_set,
            phases: sim.phases,
            total: peak.bytes,
            notes,
        };
        debug_assert_eq!(
            plan.total,
            plan.parameters + plan.gradients + plan.optimizer + plan.stored + plan.transient
        );
        Ok(plan)
    }

    /// Whether the predicted peak fits in `budget` bytes.
    pub fn fits(&self, budget: usize) -> bool {
        self.total <= budget
    }

    /// Parameters + gradients + optimizer state: what does not depend on the length.
    pub fn static_bytes(&self) -> usize {
        self.parameters + self.gradients + self.optimizer
    }

    /// Stored + transient: what depends on the length.
    pub fn activation_bytes(&self) -> usize {
        self.stored + self.transient
    }
}

/// Scalar parameters of `cfg`: embedding, axial tables, every layer, the LM head.
pub fn num_params(cfg: &ModelConfig) -> usize {
    let d = cfg.d_model;
    let width = cfg.n_heads * cfg.d_head;
    let embed = VOCAB * d;
    let axial = cfg.axial_shape.0 * cfg.axial_dims.0 + cfg.axial_shape.1 * cfg.axial_dims.1;
    let layers: usize = cfg
        .attention
        .iter()
        .map(|a| {
            let projections = match a {
                crate::config::Attention::Local => 3,
                _ => 2,
            };
            // attention: LN (2d), projections, W_o; feed-forward: LN, W1, b1, W2, b2
            let attn = 2 * d + projections * d * width + width * d;
            let ff = 2 * d + d * cfg.d_ff + cfg.d_ff + cfg.d_ff * d + d;
            attn + ff
        })
        .sum();
    let head = 2 * (2 * d) + 2 * d * VOCAB + VOCAB;
    embed + axial + layers + head
}

fn kind_name(k: AttentionKind) -> &'static str {
    match k {
        AttentionKind::Lsh => "LSH attention",
        AttentionKind::Local => "local attention",
        AttentionKind::Exact => "exact attention",
    }
}

/// A live buffer of the simulation.
#[derive(Debug, Clone)]
struct Live {
    id: usize,
    buf: PlannedBuffer,
}

#[derive(Debug, Clone, Default)]
struct Peak {
    bytes: usize,
    at: String,
    bufs: Vec<PlannedBuffer>,
}

/// Replays allocations and releases, keeping the running total and the first moment it
/// reaches its maximum.
struct Sim {
    live: Vec<Live>,
    live_bytes: usize,
    next_id: usize,
    at: String,
    peak: Peak,
    phases: Vec<(String, usize)>,
    act_bytes: usize,
    threads: usize,
}

type Id = usize;

impl Sim {
    fn new(dtype: DType, threads: usize) -> Self {
        Self {
            live: Vec::new(),
            live_bytes: 0,
            next_id: 0,
            at: "model construction".into(),
            peak: Peak::default(),
            phases: Vec::new(),
            act_bytes: dtype.size_in_bytes(),
            threads,
        }
    }

    /// Bytes of `n` activation values (f32, or the activation storage type).
    fn act(&self, n: usize) -> usize {
        n * self.act_bytes
    }

    /// Bytes of `n` values of a reversible stream or its gradient: always f32 (the backward
    /// reconstructs each layer's input from its output, which a bf16 stream could not).
    fn stream(&self, n: usize) -> usize {
        n * 4
    }

    fn at(&mut self, at: String) {
        self.at = at;
    }

    fn phase(&mut self, name: &str) {
        self.phases.push((name.to_string(), self.live_bytes));
    }

    fn alloc(&mut self, label: impl Into<String>, bytes: usize, category: Category) -> Id {
        let id = self.next_id;
        self.next_id += 1;
        self.live.push(Live {
            id,
            buf: PlannedBuffer {
                label: label.into(),
                bytes,
                category,
            },
        });
        self.live_bytes += bytes;
        if let Some((_, p)) = self.phases.last_mut() {
            *p = (*p).max(self.live_bytes);
        }
        if self.live_bytes > self.peak.bytes {
            self.peak = Peak {
                bytes: self.live_bytes,
                at: self.at.clone(),
                bufs: self.live.iter().map(|l| l.buf.clone()).collect(),
            };
        }
        id
    }

    /// A transient buffer.
    fn talloc(&mut self, label: impl Into<String>, bytes: usize) -> Id {
        self.alloc(label, bytes, Category::Transient)
    }

    fn free(&mut self, id: Id) {
        let i = self
            .live
            .iter()
            .position(|l| l.id == id)
            .expect("planner: freeing a buffer twice");
        let l = self.live.remove(i);
        self.live_bytes -= l.buf.bytes;
    }

    fn free_all(&mut self, ids: &[Id]) {
        for &id in ids {
            self.free(id);
        }
    }

    /// `n` tile-holding tasks at once (at most one per worker thread).
    fn tiles(&mut self, what: &str, tasks: usize, bytes_each: usize) {
        let n = tasks.min(self.threads).max(1);
        let at = std::mem::take(&mut self.at);
        self.at = format!("{at}: {what} of {n} worker(s)");
        let t = self.talloc(format!("{what}: {n} × {bytes_each} B"), n * bytes_each);
        self.free(t);
        self.at = at;
    }
}

/// Sizes of one layer at one length. `heads` and `width` are those of one head group inside
/// the attention functions (see [`Geometry::groups`]).
#[derive(Debug, Clone)]
struct Geometry {
    kind: AttentionKind,
    len: usize,
    d: usize,
    f: usize,
    heads: usize,
    dh: usize,
    width: usize,
    /// `(first head, heads)` of each pass of the attention sublayer.
    head_groups: Vec<(usize, usize)>,
    /// Rows per chunk of the position-wise work (`ff_chunk`, at most `len`).
    c: usize,
    /// LSH / local chunk length.
    m: usize,
    rounds: usize,
    n_buckets: usize,
    rotation_cols: usize,
}

impl Geometry {
    fn new(l: &LayerConfig, len: usize) -> Self {
        let b = l.buckets_for(len);
        Self {
            kind: l.attention,
            len,
            d: l.d_model,
            f: l.d_ff,
            heads: l.n_heads,
            dh: l.d_head,
            width: l.n_heads * l.d_head,
            head_groups: l.head_groups().collect(),
            c: l.ff_chunk.min(len).max(1),
            m: l.chunk_len,
            rounds: l.n_rounds,
            n_buckets: b.total(),
            rotation_cols: b.rotation_cols(),
        }
    }
    /// Whether the sublayer runs in more than one pass (groups use copies of their weight
    /// columns).
    fn split(&self) -> bool {
        self.head_groups.len() > 1
    }
    /// Each head group's geometry (`heads`, `width` of the group) and a label suffix.
    fn groups(&self) -> Vec<(Geometry, String)> {
        self.head_groups
            .iter()
            .map(|&(h0, n)| {
                let g = Geometry {
                    heads: n,
                    width: n * self.dh,
                    ..self.clone()
                };
                let label = if self.split() {
                    format!(" (heads {h0}..{})", h0 + n)
                } else {
                    String::new()
                };
                (g, label)
            })
            .collect()
    }
    /// `AttentionLayer`'s copies of a split group's columns of `n` projection weights (or
    /// gradient sums of that shape): f32 `[d, width]` each; none with one group.
    fn column_copies(&self, sim: &mut Sim, n: usize, what: &str) -> Vec<Id> {
        if !self.split() {
            return Vec::new();
        }
        (0..n)
            .map(|_| {
                sim.talloc(
                    format!("{what} [{}, {}] f32", self.d, self.width),
                    4 * self.d * self.width,
                )
            })
            .collect()
    }
    /// One head-layout tensor `[heads, len, d_head]`, in values.
    fn lw(&self) -> usize {
        self.len * self.width
    }
    fn head_shape(&self) -> String {
        format!("[{}, {}, {}]", self.heads, self.len, self.dh)
    }
    /// LSH chunks of the sorted sequence.
    fn lsh_chunks(&self) -> usize {
        self.len.div_ceil(self.m)
    }
    fn padded(&self) -> usize {
        self.lsh_chunks() * self.m
    }
}

/// `reformer_lsh::lsh_attention::sort_round`: returns the sorted round's live buffers
/// (perm, inv, valid mask).
fn sort_round(sim: &mut Sim, g: &Geometry) -> [Id; 3] {
    let p = g.padded();
    let keys = sim.talloc(format!("sort keys [{p}] u32"), 4 * p);
    let perm = sim.talloc(format!("sorted permutation [{p}] u32"), 4 * p);
    let counts = sim.talloc(
        format!("bucket counts [{}] u32", g.n_buckets + 2),
        4 * (g.n_buckets + 2),
    );
    sim.free_all(&[keys, counts]);
    let inv = sim.talloc(format!("inverse permutation [{}] u32", g.len), 4 * g.len);
    let valid = sim.talloc(format!("sorted validity [{p}] bool"), p);
    [perm, inv, valid]
}

/// `AttentionLayer::project`: one group's head-layout projections, then per-call chunk
/// scratch (and a split group's weight columns).
fn project(sim: &mut Sim, g: &Geometry, names: &[&str]) -> Vec<Id> {
    let heads: Vec<Id> = names
        .iter()
        .map(|n| sim.talloc(format!("{n} {}", g.head_shape()), sim.act(g.lw())))
        .collect();
    let ln = sim.talloc(
        format!("projection chunk LN(x) [{}, {}]", g.c, g.d),
        sim.act(g.c * g.d),
    );
    let p = sim.talloc(
        format!("projection chunk [{}, {}]", g.c, g.width),
        sim.act(g.c * g.width),
    );
    let cols = g.column_copies(sim, names.len(), "group weight columns");
    sim.free_all(&[ln, p]);
    sim.free_all(&cols);
    heads
}

/// `AttentionLayer::call_rotations`: an LSH layer's rotations, held for the whole call.
fn call_rotations(sim: &mut Sim, g: &Geometry) -> Option<Id> {
    (g.kind == AttentionKind::Lsh)
        .then(|| sim.talloc("LSH rotations", 4 * g.rounds * g.dh * g.rotation_cols))
}

/// `reformer_lsh::banded::Banded::forward`: returns `(out, lse)`.
fn banded_forward(sim: &mut Sim, g: &Geometry, block: usize) -> [Id; 2] {
    let (len, dh) = (g.len, g.dh);
    let geometry = sim.talloc("banded geometry (positions, mask)", 5 * len);
    let out = sim.talloc(format!("attention out {}", g.head_shape()), sim.act(g.lw()));
    let lse = sim.talloc(format!("logsumexp [{}, {len}]", g.heads), 4 * g.heads * len);
    let nb = len.div_ceil(block);
    let tile = 4 * (2 * block + block * dh + block * block);
    sim.tiles("online-softmax tiles", g.heads * nb, tile);
    sim.free(geometry);
    [out, lse]
}

/// `reformer_lsh::banded::Banded::backward`: returns `(dq, dk, dv)`.
fn banded_backward(sim: &mut Sim, g: &Geometry, block: usize) -> [Id; 3] {
    let len = g.len;
    let geometry = sim.talloc("banded geometry (positions, mask)", 5 * len);
    let delta = sim.talloc(format!("delta [{}, {len}]", g.heads), 4 * g.heads * len);
    let grads = ["dq", "dk", "dv"].map(|n| {
        let label = format!("{n} {}", g.head_shape());
        sim.talloc(label, sim.act(g.lw()))
    });
    let nb = len.div_ceil(block);
    let tile = 2 * 4 * block * block;
    let at = sim.at.clone();
    sim.at(format!("{at}, pass 1 (dq)"));
    sim.tiles("score tiles", g.heads * nb, tile);
    sim.at(format!("{at}, pass 2 (dk, dv)"));
    sim.tiles("score tiles", g.heads * nb, tile);
    sim.at(at);
    sim.free_all(&[geometry, delta]);
    grads
}

/// What `AttentionLayer::heads_forward` leaves live, by kind.
enum Acts {
    /// qk, v, out, buckets, lse.
    Lsh([Id; 5]),
    /// qk, k, v, out, lse.
    Exact([Id; 5]),
    /// q, k, v, out, lse.
    Local([Id; 5]),
}

impl Acts {
    fn all(&self) -> Vec<Id> {
        match self {
            Acts::Lsh(a) => a.to_vec(),
            Acts::Exact(a) | Acts::Local(a) => a.to_vec(),
        }
    }
}

/// `AttentionLayer::heads_forward`: one group's projections and the attention op.
fn heads_forward(sim: &mut Sim, g: &Geometry, what: &str) -> Acts {
    sim.at(format!("{what}: projections"));
    match g.kind {
        AttentionKind::Lsh => {
            let p = project(sim, g, &["qk", "v"]);
            let (len, h, r) = (g.len, g.heads, g.rounds);
            sim.at(format!("{what}: attention op"));
            // lsh_attention_forward
            let out = sim.talloc(format!("attention out {}", g.head_shape()), sim.act(g.lw()));
            let buckets = sim.talloc(format!("buckets [{h}, {r}, {len}] u32"), 4 * h * r * len);
            let lse = sim.talloc(format!("logsumexp [{h}, {r}, {len}]"), 4 * h * r * len);
            let (pad, dh) = (g.padded(), g.dh);
            let tile = 4 * (2 * g.m + g.m * dh + g.m * g.m) + 20 * g.m * dh;
            for head in 0..h {
                // forward_head
                let z = sim.talloc(format!("running logsumexp [{len}] f64"), 8 * len);
                let os = sim.talloc(format!("sorted outputs [{pad}, {dh}]"), sim.act(pad * dh));
                let zs = sim.talloc(format!("sorted logsumexps [{pad}]"), 4 * pad);
                for round in 0..r {
                    sim.at(format!("{what}, head {head}, round {round}"));
                    let sorted = sort_round(sim, g);
                    sim.tiles("chunk tiles", g.lsh_chunks(), tile);
                    sim.free_all(&sorted);
                }
                sim.free_all(&[z, os, zs]);
            }
            Acts::Lsh([p[0], p[1], out, buckets, lse])
        }
        AttentionKind::Exact => {
            let p = project(sim, g, &["qk", "v"]);
            sim.at(format!("{what}: attention op"));
            let k = sim.talloc(format!("unit keys {}", g.head_shape()), sim.act(g.lw()));
            let [out, lse] = banded_forward(sim, g, reformer_lsh::exact_attention::EXACT_BLOCK);
            Acts::Exact([p[0], k, p[1], out, lse])
        }
        AttentionKind::Local => {
            let p = project(sim, g, &["q", "k", "v"]);
            sim.at(format!("{what}: attention op"));
            let [out, lse] = banded_forward(sim, g, g.m);
            Acts::Local([p[0], p[1], p[2], out, lse])
        }
    }
}

/// `AttentionLayer::output_add`: per-call chunk scratch.
fn output_add(sim: &mut Sim, g: &Geometry) {
    let m = sim.talloc(
        format!("output chunk [{}, {}]", g.c, g.width),
        sim.act(g.c * g.width),
    );
    let y = sim.talloc(
        format!("output chunk [{}, {}]", g.c, g.d),
        sim.act(g.c * g.d),
    );
    sim.free_all(&[m, y]);
}

/// `AttentionLayer::forward_add`: per head group, the group's heads and its share of the
/// output projection.
fn attention_forward(sim: &mut Sim, g: &Geometry, what: &str) {
    sim.at(format!("{what}: projections"));
    let rot = call_rotations(sim, g);
    for (gg, label) in g.groups() {
        let what = format!("{what}{label}");
        let acts = heads_forward(sim, &gg, &what);
        sim.at(format!("{what}: output projection"));
        output_add(sim, &gg);
        sim.free_all(&acts.all());
    }
    sim.free_all(rot.as_slice());
}

/// `reversible::layer_norm::LayerNorm::backward_rows` over `rows` rows.
fn ln_backward(sim: &mut Sim, rows: usize, dim: usize) {
    let stats = sim.talloc(format!("LN row statistics [{rows}, 2]"), 4 * 2 * rows);
    let sums = sim.talloc("LN column sums", 4 * 2 * dim.div_ceil(16) * 16);
    sim.free_all(&[stats, sums]);
}

/// `AttentionLayer::backward`: per head group, recompute, rebuild X1 (the group's share),
/// through W_o, the attention op, the projections and the layer norm.
fn attention_backward(sim: &mut Sim, g: &Geometry, what: &str) {
    sim.at(format!("{what} (recomputed forward): projections"));
    let rot = call_rotations(sim, g);
    for (gg, label) in g.groups() {
        attention_backward_group(sim, &gg, &format!("{what}{label}"));
    }
    sim.free_all(rot.as_slice());
}

/// One head group of [`attention_backward`].
fn attention_backward_group(sim: &mut Sim, g: &Geometry, what: &str) {
    let acts = heads_forward(sim, g, &format!("{what} (recomputed forward)"));
    sim.at(format!("{what}: rebuilding X1"));
    output_add(sim, g);
    // output_backward
    sim.at(format!("{what}: output projection backward"));
    let m = sim.talloc(
        format!("output chunk [{}, {}]", g.c, g.width),
        sim.act(g.c * g.width),
    );
    let gc = sim.talloc(
        format!("output gradient chunk [{}, {}]", g.c, g.d),
        sim.act(g.c * g.d),
    );
    let d_heads = sim.talloc(
        format!("d attention out {}", g.head_shape()),
        sim.act(g.lw()),
    );
    sim.free_all(&[m, gc]);
    let grads: Vec<Id> = match acts {
        Acts::Lsh([qk, v, out, buckets, lse]) => {
            // lsh_attention_backward
            let (len, pad, dh) = (g.len, g.padded(), g.dh);
            let d_qk = sim.talloc(format!("d_qk {}", g.head_shape()), sim.act(g.lw()));
            let d_v = sim.talloc(format!("d_v {}", g.head_shape()), sim.act(g.lw()));
            let tile = 20 * g.m * dh + 4 * (g.m * dh + 2 * g.m + 2 * g.m * g.m);
            for head in 0..g.heads {
                sim.at(format!("{what}, head {head}"));
                let z = sim.talloc(format!("logsumexp over rounds [{len}] f64"), 8 * len);
                let delta = sim.talloc(format!("delta [{len}]"), 4 * len);
                let sorted_grads: Vec<Id> =
                    ["dq", "dk own", "dk look-back", "dv own", "dv look-back"]
                        .iter()
                        .map(|n| {
                            let label = format!("sorted {n} [{pad}, {dh}]");
                            sim.talloc(label, sim.act(pad * dh))
                        })
                        .collect();
                for round in 0..g.rounds {
                    sim.at(format!("{what}, head {head}, round {round}"));
                    let sorted = sort_round(sim, g);
                    sim.tiles("chunk tiles", g.lsh_chunks(), tile);
                    sim.free_all(&sorted);
                }
                sim.free_all(&sorted_grads);
                sim.free_all(&[z, delta]);
            }
            sim.free_all(&[qk, v, out, buckets, lse]);
            vec![d_qk, d_v]
        }
        Acts::Exact([qk, k, v, out, lse]) => {
            sim.at(format!("{what}: attention op"));
            let [dq, dk, dv] = banded_backward(sim, g, reformer_lsh::exact_attention::EXACT_BLOCK);
            sim.free_all(&[k, v, out, lse, qk, dk]);
            vec![dq, dv]
        }
        Acts::Local([q, k, v, out, lse]) => {
            sim.at(format!("{what}: attention op"));
            let [dq, dk, dv] = banded_backward(sim, g, g.m);
            sim.free_all(&[q, k, v, out, lse]);
            vec![dq, dk, dv]
        }
    };
    sim.free(d_heads);
    // projection_backward
    sim.at(format!("{what}: projection and layer-norm backward"));
    let ln = sim.talloc(
        format!("LN(x) chunk [{}, {}]", g.c, g.d),
        sim.act(g.c * g.d),
    );
    let d_ln = sim.talloc(
        format!("d LN(x) chunk [{}, {}]", g.c, g.d),
        sim.act(g.c * g.d),
    );
    let gr = sim.talloc(
        format!("projection gradient chunk [{}, {}]", g.c, g.width),
        sim.act(g.c * g.width),
    );
    let cols = g.column_copies(sim, grads.len(), "group weight columns");
    let dws = g.column_copies(sim, grads.len(), "group weight gradient sums");
    ln_backward(sim, g.c, g.d);
    sim.free_all(&[ln, d_ln, gr]);
    sim.free_all(&cols);
    sim.free_all(&dws);
    sim.free_all(&grads);
}

/// `FeedForward::scratch` for the forward (`g` only with dropout).
fn ff_scratch(sim: &mut Sim, g: &Geometry, with_g: bool) -> Vec<Id> {
    let (c, d, f) = (g.c, g.d, g.f);
    let mut s = vec![
        sim.talloc(format!("FF chunk LN(x) [{c}, {d}]"), sim.act(c * d)),
        sim.talloc(format!("FF chunk hidden [{c}, {f}]"), sim.act(c * f)),
    ];
    if with_g {
        s.push(sim.talloc(
            format!("FF chunk hidden gradient/dropped [{c}, {f}]"),
            sim.act(c * f),
        ));
    }
    s.push(sim.talloc(format!("FF chunk output [{c}, {d}]"), sim.act(c * d)));
    s
}

/// `FeedForward::forward_add`.
fn ff_forward(sim: &mut Sim, g: &Geometry, dropout: bool) {
    let s = ff_scratch(sim, g, dropout);
    sim.free_all(&s);
}

/// `FeedForward::backward`.
fn ff_backward(sim: &mut Sim, g: &Geometry) {
    let s = ff_scratch(sim, g, true);
    ln_backward(sim, g.c, g.d);
    sim.free_all(&s);
}

/// `1.5 GiB`-style sizes.
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

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            PlanKind::TrainingStep => "one training step (forward, backward, Adam)",
            PlanKind::Inference => "one forward-only pass with the loss",
        };
        writeln!(
            f,
            "memory plan: {what}, {} positions, {} layers, {} round(s), {}, {:?} activations",
            self.len, self.n_layers, self.rounds, self.device, self.dtype
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, bytes: usize, note: &str| {
            writeln!(
                f,
                "  {name:<22} {:>12} {:>16}  {note}",
                human_bytes(bytes),
                bytes
            )
        };
        row(
            f,
            "parameters",
            self.parameters,
            &format!("{} f32 values", self.num_params),
        )?;
        row(
            f,
            "gradients",
            self.gradients,
            "one per parameter (allocated with it)",
        )?;
        row(
            f,
            "optimizer state",
            self.optimizer,
            if self.optimizer > 0 {
                "Adam m and v"
            } else {
                "none (inference)"
            },
        )?;
        row(f, "stored activations", self.stored, &self.stored_what)?;
        row(f, "largest transient", self.transient, "(below)")?;
        writeln!(f, "  {:-<22} {:->12} {:->16}", "", "", "")?;
        row(f, "total (pool peak)", self.total, "")?;
        writeln!(f, "  peak at: {}", self.peak_at)?;
        writeln!(f, "  transient working set at the peak:")?;
        // Merge equal labels (e.g. one chunk buffer per projection).
        let mut merged: Vec<(String, usize, usize)> = Vec::new();
        for b in &self.working_set {
            match merged.iter_mut().find(|(l, _, _)| *l == b.label) {
                Some(m) => {
                    m.1 += b.bytes;
                    m.2 += 1;
                }
                None => merged.push((b.label.clone(), b.bytes, 1)),
            }
        }
        for (label, bytes, n) in merged {
            let label = if n > 1 {
                format!("{n} × {label}")
            } else {
                label
            };
            writeln!(f, "    {:>12}  {label}", human_bytes(bytes))?;
        }
        let phases: Vec<String> = self
            .phases
            .iter()
            .map(|(p, b)| format!("{p} {}", human_bytes(*b)))
            .collect();
        writeln!(f, "  phase peaks: {}", phases.join(", "))?;
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        Ok(())
    }
}
