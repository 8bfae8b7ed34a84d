//! Incremental decoding: [`ReformerLm::start_decoding`] makes empty per-layer caches,
//! [`ReformerLm::prefill`] fills them with a context by one full forward, and
//! [`ReformerLm::decode`] feeds further bytes — one new byte (a step) or several, a block of
//! [`PREFILL_BLOCK`] positions at a time — returning the logits of the next byte. A step never
//! passes over the context: each layer takes one new position through both reversible streams
//! and attends to what its cache lists.
//!
//! # Semantics: which keys a query sees
//!
//! The prefilled context's positions have exactly a full forward's states over the context
//! (the prefill *is* the forward, with the decoder's rotations). Every position fed with
//! `decode` is computed once, when it is fed, from the layers' inputs at positions `0..=t` as
//! they were computed then; nothing earlier is recomputed. Per layer kind, a fed position `t`
//! sees:
//!
//! * **local**: the keys of `t`'s chunk and the previous one, `(t/m − 1)·m ..= t` — exactly a
//!   full forward's row `t`. The cache is a ring of the last `PREFILL_BLOCK + 2m` keys and
//!   values.
//! * **exact**: every key `0..=t`, as a full forward's row `t`. The cache holds every key and
//!   value.
//! * **LSH**: in each round, the keys the *last* query of a full forward over positions `0..=t`
//!   sees: the positions `0..=t` sorted by `(bucket, position)` and cut into chunks of `m`,
//!   `t`'s chunk and its look-back chunk (chunk 0 looks back at the last; one chunk has no
//!   look-back); rounds combine by logsumexp. The cache holds every unit key, value and bucket;
//!   a per-(head, round) [`BucketIndex`] finds the two chunks in `O(m + log b)` without sorting.
//!
//! So a model without LSH layers decodes exactly what a full forward over the prefix computes
//! (`ReformerLm::next_logits`), at every position, and `prefill` equals `decode` of the same
//! bytes. With LSH layers the first LSH layer's row `t` still equals the full forward's, but a
//! full forward re-sorts every position when the sequence grows — earlier rows' chunks move, so
//! in a full forward an earlier position's output depends on later tokens — while the decoder
//! keeps earlier positions' states as they were computed (as trax's predict mode and Hugging
//! Face's `past_buckets_states` do). Deeper layers therefore see slightly different inputs than
//! a full forward over the same prefix. `decode` of `c` bytes then `n` steps leaves exactly the
//! state of `decode` of the `c + n` bytes; `prefill` of `c` then `n` steps differs from it only
//! in the LSH states of the first `c` positions. `tests/model_decode.rs` checks the decoder
//! against a slow reference of exactly these semantics.
//!
//! The rotations are drawn once, for the decoder's capacity (a full forward over that many
//! positions would draw the same), with the evaluation step context `StepContext::eval(0)`, the
//! one generation always used; the rounds are the model's at [`ReformerLm::start_decoding`].
//! Feeding more positions than the capacity is [`ReformerError::DecodeCapacity`].

use reformer_lsh::{
    insert_all, insert_and_list, scaled_rule, shared_qk_rule, BucketIndex, CachedAttention,
    CachedKeys, Rotations,
};
use reformer_reversible::{layer_rotations, AttentionKind, StepContext};

use crate::backend::{Backend, Strided};
use crate::error::{ReformerError, Result};
use crate::layers::{blocks, rows_in, rows_out, AttnLayer, LnBlock, Seqs};
use crate::model::ReformerLm;

/// Positions the prefill feeds through the stack at a time.
pub const PREFILL_BLOCK: usize = 1024;

/// One layer's cache.
enum LayerCache<B: Backend> {
    /// Every position's unit key `qk/|qk|` and `v` rows (`[capacity, H·dh]`), the rotations,
    /// and per (head, round) the bucket index.
    Lsh {
        qk: B::Act,
        v: B::Act,
        rows: usize,
        rot: Rotations,
        index: Vec<BucketIndex>,
    },
    /// Every position's unit key and `v` rows.
    Exact { qk: B::Act, v: B::Act, rows: usize },
    /// A ring of the last `rows` positions' `k` and `v` rows.
    Local { k: B::Act, v: B::Act, rows: usize },
}

/// The per-layer caches of one sequence being decoded, and how far it has got.
pub struct DecodeState<B: Backend> {
    capacity: usize,
    pos: usize,
    caches: Vec<LayerCache<B>>,
    device_bytes: usize,
    ctx: StepContext,
}

impl<B: Backend> DecodeState<B> {
    /// Positions fed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Positions the caches hold at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of the keys and values the caches hold on the backend, as its pool counted them
    /// when they were allocated (up front, for the whole capacity).
    pub fn device_bytes(&self) -> usize {
        self.device_bytes
    }

    /// What the caches hold, downloaded: per layer its keys' and values' rows of the positions
    /// fed so far (a ring: the rows it holds, in ring order), then for LSH layers each (head,
    /// round)'s sorted order of those positions (as f32). For tests of state equality.
    pub fn contents(&self, b: &B) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for cache in &self.caches {
            let (k, v, rows) = match cache {
                LayerCache::Lsh { qk, v, rows, .. } | LayerCache::Exact { qk, v, rows } => {
                    (qk, v, *rows)
                }
                LayerCache::Local { k, v, rows } => (k, v, *rows),
            };
            for buf in [k, v] {
                let all = b.download_act(buf)?;
                let width = all.len() / rows.max(1);
                out.push(all[..self.pos.min(rows) * width].to_vec());
            }
            if let LayerCache::Lsh { index, .. } = cache {
                for ix in index {
                    let mut order = Vec::new();
                    for c in 0..ix.len() {
                        ix.chunk_positions(c, 1, &mut order);
                    }
                    out.push(order.into_iter().map(|p| p as f32).collect());
                }
            }
        }
        Ok(out)
    }

    /// Bytes of the LSH layers' bucket indexes, on the host (they grow with the position).
    pub fn index_bytes(&self) -> usize {
        self.caches
            .iter()
            .map(|c| match c {
                LayerCache::Lsh { index, .. } => index.iter().map(BucketIndex::bytes).sum(),
                _ => 0,
            })
            .sum()
    }
}

/// Writes `rows` rows of `src` (`[rows, width]`, from row 0) into the cache rows of positions
/// `first..first + rows` (`p % cache_rows`, wrapping).
#[allow(clippy::too_many_arguments)]
fn write_rows<B: Backend>(
    b: &B,
    src: &B::Buf,
    dst: &mut B::Act,
    cache_rows: usize,
    first: usize,
    rows: usize,
    width: usize,
) -> Result<()> {
    let mut done = 0;
    while done < rows {
        let slot = (first + done) % cache_rows;
        let n = (cache_rows - slot).min(rows - done);
        b.copy_to_act(
            src,
            Strided::new(done * width, width),
            dst,
            Strided::new(slot * width, width),
            n,
            width,
        )?;
        done += n;
    }
    Ok(())
}

impl AttnLayer {
    fn empty_cache<B: Backend>(
        &self,
        b: &B,
        capacity: usize,
        ctx: &StepContext,
    ) -> Result<LayerCache<B>> {
        let w = self.width();
        Ok(match self.cfg.attention {
            AttentionKind::Lsh => {
                let rot = layer_rotations(&self.cfg, self.layer, capacity, ctx)?;
                let index = (0..self.cfg.n_heads * rot.n_rounds)
                    .map(|_| BucketIndex::new(rot.buckets.total()))
                    .collect();
                LayerCache::Lsh {
                    qk: b.alloc_act(&[capacity, w])?,
                    v: b.alloc_act(&[capacity, w])?,
                    rows: capacity,
                    rot,
                    index,
                }
            }
            AttentionKind::Exact => LayerCache::Exact {
                qk: b.alloc_act(&[capacity, w])?,
                v: b.alloc_act(&[capacity, w])?,
                rows: capacity,
            },
            AttentionKind::Local => {
                let rows = (PREFILL_BLOCK + 2 * self.cfg.chunk_len).min(capacity);
                LayerCache::Local {
                    k: b.alloc_act(&[rows, w])?,
                    v: b.alloc_act(&[rows, w])?,
                    rows,
                }
            }
        })
    }

    /// Projects rows `x0..x0 + n` of `x` (positions `p0..p0 + n`), writes their keys and values
    /// into `cache` and, for LSH, their buckets into the index: returns the queries `[n, H·dh]`
    /// and, with `lists` (LSH), each new query's keys.
    #[allow(clippy::too_many_arguments)]
    fn append<B: Backend>(
        &self,
        b: &B,
        vals: &[B::Buf],
        x: &B::Buf,
        x0: usize,
        p0: usize,
        n: usize,
        cache: &mut LayerCache<B>,
        lists: bool,
    ) -> Result<(B::Act, Option<Vec<u32>>)> {
        let (d, w, dh, heads) = (
            self.cfg.d_model,
            self.width(),
            self.cfg.d_head,
            self.cfg.n_heads,
        );
        let chunk = self.cfg.ff_chunk.min(n).max(1);
        let shared_qk = !matches!(cache, LayerCache::Local { .. });
        // Projections, a block of rows at a time: the queries into `q`, keys and values into
        // the cache.
        let mut q = b.alloc_act(&[n, w])?;
        let mut ln = LnBlock::new(b, chunk, d)?;
        let mut p = b.alloc(&[chunk, w])?;
        for (r0, c) in blocks(n, self.cfg.ff_chunk) {
            ln.load(b, vals, (self.ln_g, self.ln_b), x, x0 + r0, c, d)?;
            for (i, &wi) in self.proj.iter().enumerate() {
                b.gemm(&mut p, &ln.ln, &vals[wi], c, d, w, false, false, false)?;
                let pos = p0 + r0;
                if i == 0 {
                    b.copy_to_act(
                        &p,
                        Strided::new(0, w),
                        &mut q,
                        Strided::new(r0 * w, w),
                        c,
                        w,
                    )?;
                    if shared_qk {
                        // The cache keeps unit keys: each is normalised once, not per query.
                        b.unit_rows(&mut p, c * heads, dh)?;
                    }
                }
                match (&mut *cache, i) {
                    (LayerCache::Lsh { qk, rows, .. } | LayerCache::Exact { qk, rows, .. }, 0) => {
                        write_rows(b, &p, qk, *rows, pos, c, w)?
                    }
                    (LayerCache::Lsh { v, rows, .. } | LayerCache::Exact { v, rows, .. }, 1) => {
                        write_rows(b, &p, v, *rows, pos, c, w)?
                    }
                    (LayerCache::Local { k, rows, .. }, 1) => {
                        write_rows(b, &p, k, *rows, pos, c, w)?
                    }
                    (LayerCache::Local { v, rows, .. }, 2) => {
                        write_rows(b, &p, v, *rows, pos, c, w)?
                    }
                    (LayerCache::Local { .. }, 0) => {}
                    _ => {
                        return Err(ReformerError::Config(
                            "a layer's cache is of another attention kind".into(),
                        ))
                    }
                }
            }
        }
        drop((ln, p));
        let keys = match cache {
            LayerCache::Lsh { rot, index, .. } => {
                let buckets = b.lsh_buckets(&q, n, heads, rot)?;
                if lists {
                    Some(insert_and_list(index, &buckets, n, self.cfg.chunk_len))
                } else {
                    insert_all(index, &buckets, n);
                    None
                }
            }
            _ => None,
        };
        Ok((q, keys))
    }

    /// `out += Attn(x)` for the `n` new positions `p0..p0 + n` (rows of `x` and `out`), their
    /// keys and values appended to `cache` first.
    #[allow(clippy::too_many_arguments)]
    fn decode_add<B: Backend>(
        &self,
        b: &B,
        vals: &[B::Buf],
        x: &B::Buf,
        out: &mut B::Buf,
        p0: usize,
        n: usize,
        cache: &mut LayerCache<B>,
    ) -> Result<()> {
        let (d, w, dh, heads) = (
            self.cfg.d_model,
            self.width(),
            self.cfg.d_head,
            self.cfg.n_heads,
        );
        let (chunk, m) = (self.cfg.ff_chunk.min(n).max(1), self.cfg.chunk_len);
        let (q, lists) = self.append(b, vals, x, 0, p0, n, cache, true)?;
        let q_pos: Vec<u32> = (p0..p0 + n).map(|p| p as u32).collect();
        let o = match cache {
            LayerCache::Lsh {
                qk, v, rows, rot, ..
            } => {
                let lists = lists.ok_or_else(|| ReformerError::Config("no key lists".into()))?;
                let a = CachedAttention {
                    heads,
                    d: dh,
                    cache_rows: *rows,
                    rule: shared_qk_rule(true),
                    keys: CachedKeys::Lists {
                        pos: &lists,
                        rounds: rot.n_rounds,
                        width: 2 * m.max(1),
                    },
                };
                b.cached_attention(&q, qk, v, &q_pos, &a)?
            }
            LayerCache::Exact { qk, v, rows } => {
                let ranges: Vec<(u32, u32)> = q_pos.iter().map(|&p| (0, p + 1)).collect();
                let a = CachedAttention {
                    heads,
                    d: dh,
                    cache_rows: *rows,
                    rule: shared_qk_rule(true),
                    keys: CachedKeys::Ranges(&ranges),
                };
                b.cached_attention(&q, qk, v, &q_pos, &a)?
            }
            LayerCache::Local { k, v, rows } => {
                let m = m.max(1);
                let ranges: Vec<(u32, u32)> = q_pos
                    .iter()
                    .map(|&p| (((p as usize / m).saturating_sub(1) * m) as u32, p + 1))
                    .collect();
                let a = CachedAttention {
                    heads,
                    d: dh,
                    cache_rows: *rows,
                    rule: scaled_rule(dh, true),
                    keys: CachedKeys::Ranges(&ranges),
                };
                b.cached_attention(&q, k, v, &q_pos, &a)?
            }
        };
        drop(q);
        // Output projection, a block of rows at a time (no dropout: decoding is evaluation).
        let mut ob = b.alloc(&[chunk, w])?;
        let mut y = b.alloc(&[chunk, d])?;
        for (r0, c) in blocks(n, self.cfg.ff_chunk) {
            rows_in(b, &o, &mut ob, r0, c, w)?;
            b.gemm(&mut y, &ob, &vals[self.w_o], c, w, d, false, false, false)?;
            rows_out(b, &y, out, r0, c, d, 1.0, true)?;
        }
        Ok(())
    }
}

impl<B: Backend> ReformerLm<B> {
    /// Empty caches for decoding one sequence of up to `capacity` positions (at most the
    /// model's axial capacity, `config().max_len()`): the keys and values are allocated now,
    /// for the whole capacity. The LSH layers' rotations are drawn for `capacity` positions
    /// and the current rounds (see the module doc).
    pub fn start_decoding(&self, capacity: usize) -> Result<DecodeState<B>> {
        self.check_len(capacity)?;
        if self.layers.iter().any(|(a, _)| !a.cfg.causal) {
            return Err(ReformerError::Config(
                "decoding needs causal attention in every layer".into(),
            ));
        }
        let ctx = StepContext::eval(0);
        let b = &self.backend;
        b.mark("decoding caches");
        let before = b.live_bytes();
        let caches = self
            .layers
            .iter()
            .map(|(attn, _)| attn.empty_cache(b, capacity, &ctx))
            .collect::<Result<Vec<_>>>()?;
        let device_bytes = b.live_bytes() - before;
        Ok(DecodeState {
            capacity,
            pos: 0,
            caches,
            device_bytes,
            ctx,
        })
    }

    /// Feeds `bytes` at the state's next positions — a context (the prefill, in blocks of
    /// [`PREFILL_BLOCK`]) or one new byte (a step) — and returns the 256 logits predicting the
    /// byte after them.
    pub fn decode(&self, st: &mut DecodeState<B>, bytes: &[u8]) -> Result<Vec<f32>> {
        self.check_room(st, bytes.len())?;
        let mut last = None;
        for block in bytes.chunks(PREFILL_BLOCK) {
            // Only the last block's streams are kept (for the head).
            drop(last.take());
            last = Some((self.decode_block(st, block)?, block.len()));
        }
        let ((y1, y2), n) = last.ok_or_else(|| ReformerError::Config("no block fed".into()))?;
        let b = &self.backend;
        b.mark("decoding head");
        self.logits_at(&y1, &y2, n - 1)
    }

    /// Fills an empty state with `context` by one full forward over it (the attention of
    /// every layer as in training and evaluation, at the forward's speed), writing each layer's
    /// keys, values and buckets into the caches on the way; returns the logits after it — a
    /// full forward's, [`ReformerLm::next_logits`], with the decoder's rotations. The context's
    /// positions get a full forward's states (with LSH, each position's chunks among all of
    /// the context's positions, later ones included); bytes fed afterwards with
    /// [`ReformerLm::decode`] get the incremental semantics (module doc). Local and exact
    /// layers give exactly what `decode(context)` gives.
    pub fn prefill(&self, st: &mut DecodeState<B>, context: &[u8]) -> Result<Vec<f32>> {
        if st.pos != 0 {
            return Err(ReformerError::InvalidArgument(format!(
                "prefill starts a decoding state, this one is at position {}: feed later bytes \
                 with decode",
                st.pos
            )));
        }
        self.check_room(st, context.len())?;
        let n = context.len();
        let b = &self.backend;
        let seqs = Seqs::one(n);
        b.mark("prefill: embedding");
        let (mut y1, mut y2) = self.embed(context, &seqs)?;
        let vals = &self.values[..];
        for ((attn, ff), cache) in self.layers.iter().zip(&mut st.caches) {
            b.mark(&format!("prefill: layer {} attention", attn.layer));
            let rot = match cache {
                LayerCache::Lsh { rot, .. } => Some(rot.clone()),
                _ => None,
            };
            attn.forward_add_with(b, vals, &y2, &mut y1, 1.0, &seqs, &st.ctx, rot.as_ref())?;
            b.mark(&format!("prefill: layer {} caches", attn.layer));
            for (r0, c) in blocks(n, PREFILL_BLOCK) {
                attn.append(b, vals, &y2, r0, r0, c, cache, false)?;
            }
            b.mark(&format!("prefill: layer {} feed-forward", attn.layer));
            ff.forward_add(b, vals, &y1, &mut y2, 1.0, n, &st.ctx)?;
        }
        st.pos = n;
        b.mark("prefill: head");
        self.logits_at(&y1, &y2, n - 1)
    }

    /// Whether `n ≥ 1` more positions fit the state's caches.
    fn check_room(&self, st: &DecodeState<B>, n: usize) -> Result<()> {
        if n == 0 {
            return Err(ReformerError::InvalidArgument(
                "decoding needs at least one byte to feed".into(),
            ));
        }
        if st.pos + n > st.capacity {
            return Err(ReformerError::DecodeCapacity {
                needed: st.pos + n,
                capacity: st.capacity,
                max_len: self.cfg.max_len(),
            });
        }
        Ok(())
    }

    /// One block of new positions through the stack: `(Y1, Y2)` of the block's rows.
    fn decode_block(&self, st: &mut DecodeState<B>, bytes: &[u8]) -> Result<(B::Buf, B::Buf)> {
        let (b, d, n) = (&self.backend, self.cfg.d_model, bytes.len());
        b.mark("decoding: a block of positions");
        let mut x1 = b.alloc(&[n, d])?;
        b.embed(bytes, &self.values[self.tokens], &mut x1, d)?;
        let (e1, e2) = (&self.values[self.axial.0], &self.values[self.axial.1]);
        b.axial_forward_add(e1, e2, &mut x1, st.pos, n, self.tables)?;
        let mut x2 = b.alloc(&[n, d])?;
        let whole = Strided::new(0, n * d);
        b.copy2d(&x1, whole, &mut x2, whole, 1, n * d, 1.0, false)?;
        let vals = &self.values[..];
        for ((attn, ff), cache) in self.layers.iter().zip(&mut st.caches) {
            attn.decode_add(b, vals, &x2, &mut x1, st.pos, n, cache)?;
            ff.forward_add(b, vals, &x1, &mut x2, 1.0, n, &st.ctx)?;
        }
        st.pos += n;
        Ok((x1, x2))
    }
}
