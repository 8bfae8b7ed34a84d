//! A deliberately plain reference model: the oracle the real model (reversible, chunked, on a
//! backend) is checked against — its loss, every gradient, and Adam's update.
//!
//! Written in the style of llm.c's `train_gpt2.c`, for reading, not for speed:
//!
//! * everything in `f64`, with plain loops over whole matrices;
//! * the whole sequence at once: no row blocks, no head groups, no loss chunks;
//! * no reversibility: the forward pass stores every activation (each layer's `X1`, `X2`,
//!   `Y1`, `Y2` and every sublayer's intermediates) and the backward pass reads them;
//! * attention as an explicit `len × len` matrix per head. Every kind is "softmax over the
//!   keys a query may see", and the kinds differ only in which keys those are (the
//!   *pattern*): exact attention sees every earlier key; local attention the keys of its own
//!   chunk and the previous one; LSH attention, per hash round, the keys of its sorted chunk
//!   and the previous sorted chunk. Rounds combine by logsumexp, which is the same as one
//!   softmax in which a key counts once per round that shows it to the query, so the LSH
//!   pattern holds a count per (query, key).
//!
//! Shared with the real model on purpose, so both see the same randomness: the per-layer
//! configs ([`ModelConfig::layer_configs`]: seeds, buckets), the LSH rotations
//! ([`layer_rotations`]) and the dropout masks ([`Dropout`]). Hashing, sorting, chunking,
//! attention, layer norm, the feed-forward, the head, the loss and Adam are written here
//! again.

#![allow(dead_code)]

use std::collections::HashMap;

use reformer::config::{ModelConfig, VOCAB};
use reformer::{AdamConfig, StepContext};
use reformer_lsh::Rotations;
use reformer_reversible::{layer_rotations, AttentionKind, Dropout, LayerConfig, Site};

/// Added to the variance in every layer norm (`reformer_reversible::layer_norm::LN_EPS`).
pub const LN_EPS: f64 = 1e-6;
/// Score of a key at the query's own position in shared-QK attention (docs/design.md).
pub const SELF_SCORE: f64 = -1e5;
/// Unit keys are `qk / sqrt(|qk|² + KEY_NORM_EPS)` (`reformer_lsh::keys::KEY_NORM_EPS`).
pub const KEY_NORM_EPS: f64 = 1e-12;

// ---------------------------------------------------------------------------------------------
// Dense matrix helpers (row-major `f64`).

/// `a · b` for `a` `[n, k]`, `b` `[k, m]`.
fn matmul(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for p in 0..k {
            let a_ip = a[i * k + p];
            for j in 0..m {
                out[i * m + j] += a_ip * b[p * m + j];
            }
        }
    }
    out
}

/// `aᵀ · b` for `a` `[n, k]`, `b` `[n, m]`: `[k, m]` (a weight's gradient).
fn matmul_tn(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
    let mut out = vec![0.0; k * m];
    for i in 0..n {
        for p in 0..k {
            let a_ip = a[i * k + p];
            for j in 0..m {
                out[p * m + j] += a_ip * b[i * m + j];
            }
        }
    }
    out
}

/// `a · bᵀ` for `a` `[n, m]`, `b` `[k, m]`: `[n, k]` (an input's gradient).
fn matmul_nt(a: &[f64], b: &[f64], n: usize, m: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * k];
    for i in 0..n {
        for p in 0..k {
            out[i * k + p] = (0..m).map(|j| a[i * m + j] * b[p * m + j]).sum();
        }
    }
    out
}

fn add_bias(x: &mut [f64], bias: &[f64]) {
    for row in x.chunks_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

fn column_sums(x: &[f64], width: usize) -> Vec<f64> {
    let mut out = vec![0.0; width];
    for row in x.chunks(width) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
    out
}

fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

fn hadamard(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x * y).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Columns `c0..c0 + cols` of the `[n, width]` matrix `x`: `[n, cols]`.
fn columns(x: &[f64], width: usize, c0: usize, cols: usize) -> Vec<f64> {
    x.chunks(width)
        .flat_map(|row| row[c0..c0 + cols].iter().copied())
        .collect()
}

/// Writes `src` (`[n, cols]`) into columns `c0..` of the `[n, width]` matrix `dst`.
fn set_columns(dst: &mut [f64], width: usize, c0: usize, src: &[f64]) {
    let cols = src.len() / (dst.len() / width);
    for (d, s) in dst.chunks_mut(width).zip(src.chunks(cols)) {
        d[c0..c0 + cols].copy_from_slice(s);
    }
}

// ---------------------------------------------------------------------------------------------
// Layer norm.

/// What the layer norm's backward needs: the normalised input and each row's `1/σ`.
struct LnActs {
    xhat: Vec<f64>,
    rstd: Vec<f64>,
}

/// `y = (x − mean) / sqrt(var + eps) · g + b` per row of width `g.len()` (population variance).
fn layer_norm(x: &[f64], g: &[f64], b: &[f64]) -> (Vec<f64>, LnActs) {
    let dim = g.len();
    let (mut y, mut xhat, mut rstd) = (Vec::new(), Vec::new(), Vec::new());
    for row in x.chunks(dim) {
        let mean = row.iter().sum::<f64>() / dim as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / dim as f64;
        let r = 1.0 / (var + LN_EPS).sqrt();
        for j in 0..dim {
            let xh = (row[j] - mean) * r;
            xhat.push(xh);
            y.push(xh * g[j] + b[j]);
        }
        rstd.push(r);
    }
    (y, LnActs { xhat, rstd })
}

/// `(dx, dg, db)` of [`layer_norm`] for output gradient `dy`.
fn layer_norm_backward(dy: &[f64], a: &LnActs, g: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let dim = g.len();
    let (mut dx, mut dg, mut db) = (vec![0.0; dy.len()], vec![0.0; dim], vec![0.0; dim]);
    for (r, (dy, xhat)) in dy.chunks(dim).zip(a.xhat.chunks(dim)).enumerate() {
        let dxhat: Vec<f64> = (0..dim).map(|j| dy[j] * g[j]).collect();
        let mean_dxhat = dxhat.iter().sum::<f64>() / dim as f64;
        let mean_dxhat_xhat = dot(&dxhat, xhat) / dim as f64;
        for j in 0..dim {
            dx[r * dim + j] = a.rstd[r] * (dxhat[j] - mean_dxhat - xhat[j] * mean_dxhat_xhat);
            dg[j] += dy[j] * xhat[j];
            db[j] += dy[j];
        }
    }
    (dx, dg, db)
}

// ---------------------------------------------------------------------------------------------
// Attention, one head at a time, as an explicit `len × len` matrix.

/// Which keys each query sees, and how many times: `count[i·len + j]` (0: not at all).
type Pattern = Vec<f64>;

/// Exact attention: every key (every earlier key and the query's own when causal).
fn exact_pattern(len: usize, causal: bool) -> Pattern {
    let mut p = vec![0.0; len * len];
    for i in 0..len {
        for j in 0..len {
            if !causal || j <= i {
                p[i * len + j] = 1.0;
            }
        }
    }
    p
}

/// Local attention in original order: the keys of the query's chunk and of the chunk before
/// it (chunk 0 has none before it).
fn local_pattern(len: usize, chunk: usize, causal: bool) -> Pattern {
    let mut p = vec![0.0; len * len];
    for i in 0..len {
        for j in 0..len {
            let (ci, cj) = (i / chunk, j / chunk);
            let near = cj == ci || cj + 1 == ci;
            if near && (!causal || j <= i) {
                p[i * len + j] = 1.0;
            }
        }
    }
    p
}

/// `argmax([p ; −p])`, the first index on ties.
fn argmax_signed(p: &[f64]) -> usize {
    let signed: Vec<f64> = p.iter().copied().chain(p.iter().map(|x| -x)).collect();
    let mut best = 0;
    for (i, &x) in signed.iter().enumerate() {
        if x > signed[best] {
            best = i;
        }
    }
    best
}

/// The bucket of every position in round `r`: the raw `qk` rows (`[len, dh]`) rotated by the
/// round's rotation, `h = argmax([xR ; −xR])`; factorised buckets `h = h1 + b1·h2`, each
/// factor from its own columns of the rotation.
fn lsh_buckets(qk: &[f64], dh: usize, rot: &Rotations, r: usize) -> Vec<usize> {
    let cols = rot.buckets.rotation_cols();
    let rot_r = &rot.data[r * dh * cols..(r + 1) * dh * cols];
    let rot_r: Vec<f64> = rot_r.iter().map(|&x| x as f64).collect();
    let len = qk.len() / dh;
    let proj = matmul(qk, &rot_r, len, dh, cols);
    (0..len)
        .map(|i| {
            let row = &proj[i * cols..(i + 1) * cols];
            let (mut offset, mut stride, mut bucket) = (0, 1, 0);
            for b in rot.buckets.factors() {
                bucket += stride * argmax_signed(&row[offset..offset + b / 2]);
                offset += b / 2;
                stride *= b;
            }
            bucket
        })
        .collect()
}

/// Shared-QK LSH attention's pattern: per round, positions sorted (stably) by bucket, the
/// sorted sequence cut into chunks of `chunk` (the last one may be short); a query sees the
/// keys of its own chunk and of the chunk before it, the first chunk looking back at the last
/// one (with a single chunk, no look-back). Summed over rounds.
fn lsh_pattern(qk: &[f64], dh: usize, rot: &Rotations, chunk: usize, causal: bool) -> Pattern {
    let len = qk.len() / dh;
    let n_chunks = len.div_ceil(chunk);
    let mut p = vec![0.0; len * len];
    for r in 0..rot.n_rounds {
        let buckets = lsh_buckets(qk, dh, rot, r);
        let mut order: Vec<usize> = (0..len).collect();
        order.sort_by_key(|&pos| (buckets[pos], pos));
        let mut chunk_of = vec![0; len];
        for (slot, &pos) in order.iter().enumerate() {
            chunk_of[pos] = slot / chunk;
        }
        for i in 0..len {
            let own = chunk_of[i];
            let back = (own + n_chunks - 1) % n_chunks;
            for j in 0..len {
                let seen = chunk_of[j] == own || (n_chunks > 1 && chunk_of[j] == back);
                if seen && (!causal || j <= i) {
                    p[i * len + j] += 1.0;
                }
            }
        }
    }
    p
}

/// The decoder's LSH pattern (`src/decode.rs`): rows below `prefilled` are those of a full
/// forward over `0..prefilled` (the prefill); every later row `i` is the last row of
/// [`lsh_pattern`] over the prefix `0..=i` alone — what a query sees when it is decoded after
/// positions `0..i`.
fn lsh_prefix_pattern(
    qk: &[f64],
    dh: usize,
    rot: &Rotations,
    chunk: usize,
    prefilled: usize,
) -> Pattern {
    let len = qk.len() / dh;
    let mut p = vec![0.0; len * len];
    let f = prefilled.min(len);
    if f > 0 {
        let full = lsh_pattern(&qk[..f * dh], dh, rot, chunk, true);
        for i in 0..f {
            p[i * len..i * len + f].copy_from_slice(&full[i * f..(i + 1) * f]);
        }
    }
    for i in f..len {
        let n = i + 1;
        let prefix = lsh_pattern(&qk[..n * dh], dh, rot, chunk, true);
        p[i * len..i * len + n].copy_from_slice(&prefix[i * n..(i + 1) * n]);
    }
    p
}

/// How scores are formed.
#[derive(Debug, Clone, Copy)]
struct Scores {
    /// Multiplies `q · k`.
    scale: f64,
    /// The key at the query's own position scores [`SELF_SCORE`].
    self_penalty: bool,
}

/// One head's attention: inputs, the probabilities `[len, len]` and the output `[len, dh]`.
struct HeadActs {
    len: usize,
    dh: usize,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    probs: Vec<f64>,
    out: Vec<f64>,
}

/// `out_i = Σ_j P_ij v_j` with `P_ij ∝ count_ij · exp(s_ij)`, `s_ij = scale · q_i·k_j`.
fn attend(
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    dh: usize,
    count: &Pattern,
    s: Scores,
) -> HeadActs {
    let len = q.len() / dh;
    let mut probs = vec![0.0; len * len];
    let mut out = vec![0.0; len * dh];
    for i in 0..len {
        let score = |j: usize| {
            if s.self_penalty && i == j {
                SELF_SCORE
            } else {
                s.scale * dot(&q[i * dh..(i + 1) * dh], &k[j * dh..(j + 1) * dh])
            }
        };
        let seen: Vec<usize> = (0..len).filter(|&j| count[i * len + j] > 0.0).collect();
        let max = seen.iter().map(|&j| score(j)).fold(f64::MIN, f64::max);
        let mut z = 0.0;
        for &j in &seen {
            probs[i * len + j] = count[i * len + j] * (score(j) - max).exp();
            z += probs[i * len + j];
        }
        for &j in &seen {
            probs[i * len + j] /= z;
            for x in 0..dh {
                out[i * dh + x] += probs[i * len + j] * v[j * dh + x];
            }
        }
    }
    HeadActs {
        len,
        dh,
        q,
        k,
        v,
        probs,
        out,
    }
}

/// `(dq, dk, dv)` of [`attend`] for output gradient `d_out` (`[len, dh]`).
fn attend_backward(a: &HeadActs, d_out: &[f64], s: Scores) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (len, dh) = (a.len, a.dh);
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; len * dh],
        vec![0.0; len * dh],
        vec![0.0; len * dh],
    );
    for i in 0..len {
        let g = &d_out[i * dh..(i + 1) * dh];
        let p = &a.probs[i * len..(i + 1) * len];
        // dP_ij = g_i · v_j; through the softmax: ds_ij = P_ij (dP_ij − Σ_j' P_ij' dP_ij').
        let dp: Vec<f64> = (0..len)
            .map(|j| dot(g, &a.v[j * dh..(j + 1) * dh]))
            .collect();
        let mean = dot(p, &dp);
        for j in 0..len {
            for x in 0..dh {
                dv[j * dh + x] += p[j] * g[x];
            }
            if s.self_penalty && i == j {
                continue; // a constant score
            }
            let ds = p[j] * (dp[j] - mean) * s.scale;
            for x in 0..dh {
                dq[i * dh + x] += ds * a.k[j * dh + x];
                dk[j * dh + x] += ds * a.q[i * dh + x];
            }
        }
    }
    (dq, dk, dv)
}

/// Unit keys `qk / sqrt(|qk|² + eps)` of the rows of `qk` (`[len, dh]`).
fn unit_keys(qk: &[f64], dh: usize) -> Vec<f64> {
    qk.chunks(dh)
        .flat_map(|x| {
            let n = (dot(x, x) + KEY_NORM_EPS).sqrt();
            x.iter().map(move |v| v / n)
        })
        .collect()
}

/// The gradient of `qk` through [`unit_keys`] from the keys' gradient `dk`:
/// `(dk − k (k·dk)) / n`.
fn unit_keys_backward(qk: &[f64], dk: &[f64], dh: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(qk.len());
    for (x, g) in qk.chunks(dh).zip(dk.chunks(dh)) {
        let n = (dot(x, x) + KEY_NORM_EPS).sqrt();
        let k_dot_g = dot(x, g) / n;
        out.extend((0..dh).map(|i| (g[i] - x[i] / n * k_dot_g) / n));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Parameters by name.

/// Values (or gradients) of every parameter, looked up by name.
struct Tensors {
    index: HashMap<String, usize>,
    data: Vec<Vec<f64>>,
}

impl Tensors {
    fn get(&self, name: &str) -> &[f64] {
        let i = self
            .index
            .get(name)
            .unwrap_or_else(|| panic!("reference model: no parameter `{name}`"));
        &self.data[*i]
    }

    fn add(&mut self, name: &str, delta: &[f64]) {
        let i = self.index[name];
        assert_eq!(self.data[i].len(), delta.len(), "gradient of {name}");
        for (g, d) in self.data[i].iter_mut().zip(delta) {
            *g += d;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The model's activations, all of them.

/// The attention sublayer's activations: `Attn(x) = drop(merge(heads(LN(x))) · W_o)`.
struct AttnActs {
    ln: LnActs,
    /// `LN(x)` `[len, d]`.
    x_ln: Vec<f64>,
    /// `LN(x) · W` for each projection weight in [`projection_names`]' order: `[len, H·dh]`.
    proj: Vec<Vec<f64>>,
    heads: Vec<HeadActs>,
    /// The heads' outputs side by side, `[len, H·dh]`.
    merged: Vec<f64>,
    /// The dropout multipliers (0 or `1/(1−rate)`) at the output, `[len, d]`.
    drop: Option<Vec<f64>>,
}

/// The feed-forward sublayer's activations:
/// `FF(x) = drop_out(drop_hidden(ReLU(LN(x)·W1 + b1))·W2 + b2)`.
struct FfActs {
    ln: LnActs,
    x_ln: Vec<f64>,
    /// `LN(x)·W1 + b1`, `[len, d_ff]`.
    pre: Vec<f64>,
    /// `drop_hidden(ReLU(pre))`.
    hidden: Vec<f64>,
    drop_hidden: Option<Vec<f64>>,
    drop_out: Option<Vec<f64>>,
}

/// One layer: `Y1 = X1 + Attn(X2)`, `Y2 = X2 + FF(Y1)` (each sublayer normalises its input).
struct LayerActs {
    x1: Vec<f64>,
    x2: Vec<f64>,
    attn: AttnActs,
    y1: Vec<f64>,
    ff: FfActs,
    y2: Vec<f64>,
}

/// The whole forward pass.
struct Acts {
    inputs: Vec<u8>,
    layers: Vec<LayerActs>,
    /// The head's layer norm over `concat(Y1, Y2)`.
    head_ln: LnActs,
    /// `LN(concat(Y1, Y2))`, `[len, 2d]`.
    head_x: Vec<f64>,
    /// `[len, 256]`.
    logits: Vec<f64>,
}

/// The projection weights of an attention kind, in the order of the projections they make.
fn projection_names(kind: AttentionKind) -> &'static [&'static str] {
    match kind {
        AttentionKind::Lsh | AttentionKind::Exact => &["attn.w_qk", "attn.w_v"],
        AttentionKind::Local => &["attn.w_q", "attn.w_k", "attn.w_v"],
    }
}

/// The dropout multipliers of `site` for `rows × width` activations, as the real model draws
/// them: row `r` (the position) gets the mask of row `r`. `None` when dropout is off.
fn dropout_mask(
    lc: &LayerConfig,
    ctx: &StepContext,
    layer: usize,
    site: Site,
    rows: usize,
    width: usize,
) -> Option<Vec<f64>> {
    let dropout = Dropout::new(lc.dropout, lc.seed, ctx, layer, site)?;
    let mut ones = vec![1.0f32; rows * width];
    dropout.apply(&mut ones, width, 0);
    Some(ones.into_iter().map(f64::from).collect())
}

fn maybe_mask(x: &[f64], mask: &Option<Vec<f64>>) -> Vec<f64> {
    match mask {
        Some(m) => hadamard(x, m),
        None => x.to_vec(),
    }
}

/// The reference model: a configuration and parameter values (`f32`, as the real model holds
/// them; computed in `f64`). LSH layers hash with `cfg.n_rounds` rounds (what
/// [`ModelConfig::layer_configs`] gives); to evaluate with other rounds (`eval_rounds`), use a
/// config with `n_rounds` set to them.
#[derive(Clone)]
pub struct RefModel {
    pub cfg: ModelConfig,
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub values: Vec<Vec<f32>>,
    /// The decoder's semantics instead of a full forward's: LSH layers use
    /// [`lsh_prefix_pattern`] with rotations drawn for this many positions, after a prefill of
    /// this many.
    decoding: Option<(usize, usize)>,
}

impl RefModel {
    /// Parameters in the real model's order and naming (see `reformer::device::param_specs`:
    /// `embed.tokens`, `embed.axial.0`, `embed.axial.1`, `layers.{i}.ln_attn.gamma/beta`,
    /// `attn.w_qk` | `attn.w_q` + `attn.w_k`, `attn.w_v`, `attn.w_o`, `ln_ff.gamma/beta`,
    /// `ff.w1/b1/w2/b2`, `head.norm.gamma/beta`, `head.weight`, `head.bias`). Parameters are
    /// looked up by name, so the order only fixes the order of the gradients returned.
    pub fn new(
        cfg: &ModelConfig,
        names: Vec<String>,
        shapes: Vec<Vec<usize>>,
        values: Vec<Vec<f32>>,
    ) -> Self {
        assert_eq!(names.len(), shapes.len(), "names and shapes");
        assert_eq!(names.len(), values.len(), "names and values");
        for ((n, s), v) in names.iter().zip(&shapes).zip(&values) {
            assert_eq!(s.iter().product::<usize>(), v.len(), "{n}: shape {s:?}");
        }
        Self {
            cfg: cfg.clone(),
            names,
            shapes,
            values,
            decoding: None,
        }
    }

    /// Next-byte logits at every position of `inputs` as the incremental decoder computes
    /// them with caches for `capacity` positions (`src/decode.rs`: rotations for `capacity`
    /// positions, every position computed once from its prefix, `StepContext::eval(0)`).
    pub fn decoded_logits(&self, inputs: &[u8], capacity: usize) -> Vec<Vec<f32>> {
        self.prefilled_logits(inputs, capacity, 0)
    }

    /// As [`RefModel::decoded_logits`] after a prefill of the first `prefilled` positions (a
    /// full forward over them).
    pub fn prefilled_logits(
        &self,
        inputs: &[u8],
        capacity: usize,
        prefilled: usize,
    ) -> Vec<Vec<f32>> {
        let mut m = self.clone();
        m.decoding = Some((capacity, prefilled));
        m.logits(inputs, &StepContext::eval(0))
    }

    fn weights(&self) -> Tensors {
        Tensors {
            index: self.index(),
            data: self
                .values
                .iter()
                .map(|v| v.iter().map(|&x| x as f64).collect())
                .collect(),
        }
    }

    fn index(&self) -> HashMap<String, usize> {
        self.names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect()
    }

    /// Mean loss (nats) over the `len` positions of `tokens` (`len + 1` bytes: position `p`
    /// predicts byte `p + 1`), and the gradient of the mean loss for every parameter (same
    /// order as `names`).
    pub fn loss_and_grads(&self, tokens: &[u8], ctx: &StepContext) -> (f64, Vec<Vec<f32>>) {
        let (inputs, targets) = split(tokens);
        let w = self.weights();
        let acts = self.forward(&w, inputs, ctx);
        let loss = mean_cross_entropy(&acts.logits, targets);
        let mut grads = Tensors {
            index: self.index(),
            data: self.values.iter().map(|v| vec![0.0; v.len()]).collect(),
        };
        self.backward(&w, &acts, targets, &mut grads);
        let grads = grads
            .data
            .into_iter()
            .map(|g| g.into_iter().map(|x| x as f32).collect())
            .collect();
        (loss, grads)
    }

    /// Only the loss.
    pub fn loss(&self, tokens: &[u8], ctx: &StepContext) -> f64 {
        let (inputs, targets) = split(tokens);
        let acts = self.forward(&self.weights(), inputs, ctx);
        mean_cross_entropy(&acts.logits, targets)
    }

    /// Next-byte logits at every position of `inputs` (`len × 256`).
    pub fn logits(&self, inputs: &[u8], ctx: &StepContext) -> Vec<Vec<f32>> {
        let acts = self.forward(&self.weights(), inputs, ctx);
        acts.logits
            .chunks(VOCAB)
            .map(|row| row.iter().map(|&x| x as f32).collect())
            .collect()
    }

    // --- forward -------------------------------------------------------------------------

    fn forward(&self, w: &Tensors, inputs: &[u8], ctx: &StepContext) -> Acts {
        let cfg = &self.cfg;
        let (len, d) = (inputs.len(), cfg.d_model);
        assert!(
            len >= 1 && len <= cfg.max_len(),
            "length {len} outside 1..={}",
            cfg.max_len()
        );
        // Token embedding plus the axial position embedding concat(T1[p / a2], T2[p % a2]).
        let (tok, t1, t2) = (
            w.get("embed.tokens"),
            w.get("embed.axial.0"),
            w.get("embed.axial.1"),
        );
        let (e1, e2) = cfg.axial_dims;
        let a2 = cfg.axial_shape.1;
        let mut x = vec![0.0; len * d];
        for (p, &t) in inputs.iter().enumerate() {
            let t = t as usize;
            for j in 0..d {
                let pos = if j < e1 {
                    t1[(p / a2) * e1 + j]
                } else {
                    t2[(p % a2) * e2 + (j - e1)]
                };
                x[p * d + j] = tok[t * d + j] + pos;
            }
        }
        // The input, twice: (X1, X2).
        let (mut x1, mut x2) = (x.clone(), x);
        let mut layers = Vec::new();
        for (i, lc) in cfg.layer_configs().iter().enumerate() {
            let pre = format!("layers.{i}");
            let (attn, a) = self.attention_forward(w, &pre, lc, i, &x2, ctx);
            let y1 = add(&x1, &a);
            let (ff, f) = self.feed_forward_forward(w, &pre, lc, i, &y1, ctx);
            let y2 = add(&x2, &f);
            layers.push(LayerActs {
                x1,
                x2,
                attn,
                y1: y1.clone(),
                ff,
                y2: y2.clone(),
            });
            (x1, x2) = (y1, y2);
        }
        // The head: concat(Y1, Y2) → LN(2d) → · W + b.
        let mut h = Vec::with_capacity(len * 2 * d);
        for p in 0..len {
            h.extend_from_slice(&x1[p * d..(p + 1) * d]);
            h.extend_from_slice(&x2[p * d..(p + 1) * d]);
        }
        let (head_x, head_ln) = layer_norm(&h, w.get("head.norm.gamma"), w.get("head.norm.beta"));
        let mut logits = matmul(&head_x, w.get("head.weight"), len, 2 * d, VOCAB);
        add_bias(&mut logits, w.get("head.bias"));
        Acts {
            inputs: inputs.to_vec(),
            layers,
            head_ln,
            head_x,
            logits,
        }
    }

    fn attention_forward(
        &self,
        w: &Tensors,
        pre: &str,
        lc: &LayerConfig,
        layer: usize,
        x: &[f64],
        ctx: &StepContext,
    ) -> (AttnActs, Vec<f64>) {
        let (d, dh, n_heads) = (lc.d_model, lc.d_head, lc.n_heads);
        let (len, width) = (x.len() / d, n_heads * dh);
        let (x_ln, ln) = layer_norm(
            x,
            w.get(&format!("{pre}.ln_attn.gamma")),
            w.get(&format!("{pre}.ln_attn.beta")),
        );
        let proj: Vec<Vec<f64>> = projection_names(lc.attention)
            .iter()
            .map(|name| matmul(&x_ln, w.get(&format!("{pre}.{name}")), len, d, width))
            .collect();
        let rot_len = self.decoding.map_or(len, |d| d.0);
        let rot = (lc.attention == AttentionKind::Lsh)
            .then(|| layer_rotations(lc, layer, rot_len, ctx).expect("LSH rotations"));
        let mut heads = Vec::new();
        let mut merged = vec![0.0; len * width];
        for h in 0..n_heads {
            let head = |p: &Vec<f64>| columns(p, width, h * dh, dh);
            let acts = match lc.attention {
                AttentionKind::Lsh | AttentionKind::Exact => {
                    // Shared QK: queries are the raw qk, keys their unit vectors, scale 1.
                    let (qk, v) = (head(&proj[0]), head(&proj[1]));
                    let count = match (&rot, self.decoding) {
                        (Some(rot), Some((_, f))) => {
                            lsh_prefix_pattern(&qk, dh, rot, lc.chunk_len, f)
                        }
                        (Some(rot), None) => lsh_pattern(&qk, dh, rot, lc.chunk_len, lc.causal),
                        (None, _) => exact_pattern(len, lc.causal),
                    };
                    let k = unit_keys(&qk, dh);
                    attend(qk, k, v, dh, &count, shared_qk_scores())
                }
                AttentionKind::Local => {
                    let (q, k, v) = (head(&proj[0]), head(&proj[1]), head(&proj[2]));
                    let count = local_pattern(len, lc.chunk_len, lc.causal);
                    attend(q, k, v, dh, &count, local_scores(dh))
                }
            };
            set_columns(&mut merged, width, h * dh, &acts.out);
            heads.push(acts);
        }
        let out = matmul(&merged, w.get(&format!("{pre}.attn.w_o")), len, width, d);
        let drop = dropout_mask(lc, ctx, layer, Site::AttentionOutput, len, d);
        let out = maybe_mask(&out, &drop);
        let acts = AttnActs {
            ln,
            x_ln,
            proj,
            heads,
            merged,
            drop,
        };
        (acts, out)
    }

    fn feed_forward_forward(
        &self,
        w: &Tensors,
        pre: &str,
        lc: &LayerConfig,
        layer: usize,
        x: &[f64],
        ctx: &StepContext,
    ) -> (FfActs, Vec<f64>) {
        let (d, f) = (lc.d_model, lc.d_ff);
        let len = x.len() / d;
        let p = |name: &str| w.get(&format!("{pre}.{name}"));
        let (x_ln, ln) = layer_norm(x, p("ln_ff.gamma"), p("ln_ff.beta"));
        let mut pre_act = matmul(&x_ln, p("ff.w1"), len, d, f);
        add_bias(&mut pre_act, p("ff.b1"));
        let relu: Vec<f64> = pre_act.iter().map(|&v| v.max(0.0)).collect();
        let drop_hidden = dropout_mask(lc, ctx, layer, Site::FeedForwardHidden, len, f);
        let hidden = maybe_mask(&relu, &drop_hidden);
        let mut out = matmul(&hidden, p("ff.w2"), len, f, d);
        add_bias(&mut out, p("ff.b2"));
        let drop_out = dropout_mask(lc, ctx, layer, Site::FeedForwardOutput, len, d);
        let out = maybe_mask(&out, &drop_out);
        let acts = FfActs {
            ln,
            x_ln,
            pre: pre_act,
            hidden,
            drop_hidden,
            drop_out,
        };
        (acts, out)
    }

    // --- backward ------------------------------------------------------------------------

    fn backward(&self, w: &Tensors, acts: &Acts, targets: &[u8], g: &mut Tensors) {
        let cfg = &self.cfg;
        let d = cfg.d_model;
        let len = targets.len();
        // Mean cross-entropy: d logits = (softmax − onehot) / len.
        let mut dlogits = acts.logits.clone();
        for (row, &t) in dlogits.chunks_mut(VOCAB).zip(targets) {
            let max = row.iter().copied().fold(f64::MIN, f64::max);
            let z: f64 = row.iter().map(|v| (v - max).exp()).sum();
            for v in row.iter_mut() {
                *v = (*v - max).exp() / z / len as f64;
            }
            row[t as usize] -= 1.0 / len as f64;
        }
        g.add(
            "head.weight",
            &matmul_tn(&acts.head_x, &dlogits, len, 2 * d, VOCAB),
        );
        g.add("head.bias", &column_sums(&dlogits, VOCAB));
        let d_head_x = matmul_nt(&dlogits, w.get("head.weight"), len, VOCAB, 2 * d);
        let (dh, dgamma, dbeta) =
            layer_norm_backward(&d_head_x, &acts.head_ln, w.get("head.norm.gamma"));
        g.add("head.norm.gamma", &dgamma);
        g.add("head.norm.beta", &dbeta);
        let (mut dy1, mut dy2) = (Vec::new(), Vec::new());
        for row in dh.chunks(2 * d) {
            dy1.extend_from_slice(&row[..d]);
            dy2.extend_from_slice(&row[d..]);
        }
        // The layers, last first, from their stored activations (dropout masks and LSH
        // patterns included: nothing is drawn again).
        let lcs = cfg.layer_configs();
        for (i, (lc, la)) in lcs.iter().zip(&acts.layers).enumerate().rev() {
            let pre = format!("layers.{i}");
            // Y2 = X2 + FF(Y1).
            let d_y1_ff = self.feed_forward_backward(w, &pre, lc, &la.ff, &dy2, g);
            let dy1_total = add(&dy1, &d_y1_ff);
            // Y1 = X1 + Attn(X2).
            let d_x2_attn = self.attention_backward(w, &pre, lc, &la.attn, &dy1_total, g);
            (dy1, dy2) = (dy1_total, add(&dy2, &d_x2_attn));
        }
        // X1 and X2 are the same embedding.
        let dx = add(&dy1, &dy2);
        let (e1, e2) = cfg.axial_dims;
        let a2 = cfg.axial_shape.1;
        let mut d_tok = vec![0.0; VOCAB * d];
        let mut d_t1 = vec![0.0; cfg.axial_shape.0 * e1];
        let mut d_t2 = vec![0.0; a2 * e2];
        for (p, &t) in acts.inputs.iter().enumerate() {
            for j in 0..d {
                let v = dx[p * d + j];
                d_tok[t as usize * d + j] += v;
                if j < e1 {
                    d_t1[(p / a2) * e1 + j] += v;
                } else {
                    d_t2[(p % a2) * e2 + (j - e1)] += v;
                }
            }
        }
        g.add("embed.tokens", &d_tok);
        g.add("embed.axial.0", &d_t1);
        g.add("embed.axial.1", &d_t2);
    }

    /// Accumulates the feed-forward's parameter gradients; returns its input gradient.
    fn feed_forward_backward(
        &self,
        w: &Tensors,
        pre: &str,
        lc: &LayerConfig,
        a: &FfActs,
        d_out: &[f64],
        g: &mut Tensors,
    ) -> Vec<f64> {
        let (d, f) = (lc.d_model, lc.d_ff);
        let len = d_out.len() / d;
        let name = |n: &str| format!("{pre}.{n}");
        let d_f = maybe_mask(d_out, &a.drop_out);
        g.add(&name("ff.w2"), &matmul_tn(&a.hidden, &d_f, len, f, d));
        g.add(&name("ff.b2"), &column_sums(&d_f, d));
        let d_hidden = matmul_nt(&d_f, w.get(&name("ff.w2")), len, d, f);
        let d_relu = maybe_mask(&d_hidden, &a.drop_hidden);
        let d_pre: Vec<f64> = d_relu
            .iter()
            .zip(&a.pre)
            .map(|(&dr, &p)| if p > 0.0 { dr } else { 0.0 })
            .collect();
        g.add(&name("ff.w1"), &matmul_tn(&a.x_ln, &d_pre, len, d, f));
        g.add(&name("ff.b1"), &column_sums(&d_pre, f));
        let d_ln = matmul_nt(&d_pre, w.get(&name("ff.w1")), len, f, d);
        let (dx, dgamma, dbeta) = layer_norm_backward(&d_ln, &a.ln, w.get(&name("ln_ff.gamma")));
        g.add(&name("ln_ff.gamma"), &dgamma);
        g.add(&name("ln_ff.beta"), &dbeta);
        dx
    }

    /// Accumulates the attention sublayer's parameter gradients; returns its input gradient.
    fn attention_backward(
        &self,
        w: &Tensors,
        pre: &str,
        lc: &LayerConfig,
        a: &AttnActs,
        d_out: &[f64],
        g: &mut Tensors,
    ) -> Vec<f64> {
        let (d, dh, n_heads) = (lc.d_model, lc.d_head, lc.n_heads);
        let (len, width) = (d_out.len() / d, n_heads * dh);
        let name = |n: &str| format!("{pre}.{n}");
        let d_o = maybe_mask(d_out, &a.drop);
        g.add(
            &name("attn.w_o"),
            &matmul_tn(&a.merged, &d_o, len, width, d),
        );
        let d_merged = matmul_nt(&d_o, w.get(&name("attn.w_o")), len, d, width);
        let names = projection_names(lc.attention);
        let mut d_proj = vec![vec![0.0; len * width]; names.len()];
        for (h, head) in a.heads.iter().enumerate() {
            let d_out_h = columns(&d_merged, width, h * dh, dh);
            let grads = match lc.attention {
                AttentionKind::Lsh | AttentionKind::Exact => {
                    let (dq, dk, dv) = attend_backward(head, &d_out_h, shared_qk_scores());
                    // q is qk itself, k its unit vector.
                    let d_qk = add(&dq, &unit_keys_backward(&head.q, &dk, dh));
                    vec![d_qk, dv]
                }
                AttentionKind::Local => {
                    let (dq, dk, dv) = attend_backward(head, &d_out_h, local_scores(dh));
                    vec![dq, dk, dv]
                }
            };
            for (dp, gh) in d_proj.iter_mut().zip(&grads) {
                set_columns(dp, width, h * dh, gh);
            }
        }
        let mut d_ln = vec![0.0; len * d];
        for (n, dp) in names.iter().zip(&d_proj) {
            g.add(&name(n), &matmul_tn(&a.x_ln, dp, len, d, width));
            d_ln = add(&d_ln, &matmul_nt(dp, w.get(&name(n)), len, width, d));
        }
        let (dx, dgamma, dbeta) = layer_norm_backward(&d_ln, &a.ln, w.get(&name("ln_attn.gamma")));
        g.add(&name("ln_attn.gamma"), &dgamma);
        g.add(&name("ln_attn.beta"), &dbeta);
        dx
    }
}

fn shared_qk_scores() -> Scores {
    Scores {
        scale: 1.0,
        self_penalty: true,
    }
}

fn local_scores(dh: usize) -> Scores {
    Scores {
        scale: 1.0 / (dh as f64).sqrt(),
        self_penalty: false,
    }
}

/// `(inputs, targets)` of a sequence of `len + 1` bytes.
fn split(tokens: &[u8]) -> (&[u8], &[u8]) {
    assert!(tokens.len() >= 2, "a sequence needs inputs and targets");
    (&tokens[..tokens.len() - 1], &tokens[1..])
}

/// `mean_p (logsumexp(logits_p) − logits_p[target_p])`.
fn mean_cross_entropy(logits: &[f64], targets: &[u8]) -> f64 {
    let sum: f64 = logits
        .chunks(VOCAB)
        .zip(targets)
        .map(|(row, &t)| {
            let max = row.iter().copied().fold(f64::MIN, f64::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            lse - row[t as usize]
        })
        .sum();
    sum / targets.len() as f64
}

/// A plain Adam step with global-norm clipping, as `reformer::Adam::update`: the gradient
/// norm `‖g‖` over all tensors; with `clip_norm = Some(c)` and `‖g‖ > c`, every gradient is
/// scaled by `c/‖g‖`; then, for update number `step` (1 for the first),
/// `m = β1 m + (1−β1) g`, `v = β2 v + (1−β2) g²`,
/// `w −= lr/(1−β1^step) · m / (sqrt(v)/sqrt(1−β2^step) + eps)`.
/// Updates `values`, `m`, `v` in place; returns the gradient norm (before clipping).
pub fn adam_step(
    cfg: &AdamConfig,
    lr: f32,
    step: u64,
    values: &mut [Vec<f32>],
    grads: &[Vec<f32>],
    m: &mut [Vec<f32>],
    v: &mut [Vec<f32>],
) -> f32 {
    assert!(step >= 1, "Adam steps count from 1");
    let norm = grads
        .iter()
        .flatten()
        .map(|&g| g as f64 * g as f64)
        .sum::<f64>()
        .sqrt();
    let clip = match cfg.clip_norm {
        Some(c) if norm > c as f64 => c as f64 / norm,
        _ => 1.0,
    };
    let (b1, b2, eps) = (cfg.beta1 as f64, cfg.beta2 as f64, cfg.eps as f64);
    let c1 = 1.0 - b1.powi(step as i32);
    let c2 = 1.0 - b2.powi(step as i32);
    for (((w, g), m), v) in values.iter_mut().zip(grads).zip(m).zip(v) {
        for i in 0..w.len() {
            let g = g[i] as f64 * clip;
            let m_new = b1 * m[i] as f64 + (1.0 - b1) * g;
            let v_new = b2 * v[i] as f64 + (1.0 - b2) * g * g;
            let m_hat = m_new / c1;
            let v_hat = v_new / c2;
            w[i] = (w[i] as f64 - lr as f64 * m_hat / (v_hat.sqrt() + eps)) as f32;
            m[i] = m_new as f32;
            v[i] = v_new as f32;
        }
    }
    norm as f32
}
