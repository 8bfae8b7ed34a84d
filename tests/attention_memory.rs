//! The pool's peak bytes for LSH attention forward + backward grow linearly with length:
//! from 2^14 to 2^16 to 2^18 each 4× step in length multiplies the peak by 4 within 1.3×, and
//! the peak stays under a bound derived here from the algorithm's buffers.

use reformer_engine::{MemoryPool, Rng, Tensor};
use reformer_lsh::*;

const HEADS: usize = 2;
const D: usize = 64;
const CHUNK: usize = 64;
const ROUNDS: usize = 2;

/// The bound, in f32 words per position:
/// - the caller's tensors, per head: qk, v, out, d_out, d_qk, d_v   6·d
/// - saved state, per head: bucket and logsumexp per round           2·rounds
/// - the one head being worked on (heads run in turn): 5 sorted gradient buffers (d_q, and
///   own/look-back d_k and d_v; the forward needs only one sorted output buffer)    5·d
/// - that head's per-position scalars (logsumexps, deltas, permutations, masks)      10
///
/// Plus the per-chunk tiles (gathered rows and scores), O(chunk·(d + chunk)) per worker
/// thread (64 threads allowed for).
fn bound(len: usize) -> usize {
    let words = HEADS * len * (6 * D + 2 * ROUNDS) + len * (5 * D + 10);
    let tiles = 64 * 4 * (8 * CHUNK * D + 4 * CHUNK * CHUNK);
    4 * words + tiles
}

fn peak(len: usize) -> usize {
    let pool = MemoryPool::unlimited();
    let mut rng = Rng::new(len as u64);
    let qk = Tensor::randn(&pool, &[HEADS, len, D], 1.0, &mut rng).unwrap();
    let v = Tensor::randn(&pool, &[HEADS, len, D], 1.0, &mut rng).unwrap();
    let g = Tensor::randn(&pool, &[HEADS, len, D], 1.0, &mut rng).unwrap();
    let rot = Rotations::random(D, ROUNDS, Buckets::auto(len, CHUNK), &mut rng).unwrap();
    let cfg = LshConfig {
        chunk_len: CHUNK,
        causal: true,
    };
    let (out, saved) = lsh_attention_forward(&qk, &v, &rot, &cfg, None).unwrap();
    let grads = lsh_attention_backward(&qk, &v, &out, &g, &saved, &rot, &cfg, None).unwrap();
    drop(grads);
    pool.peak_bytes()
}

#[test]
fn lsh_peak_bytes_grow_linearly_with_length() {
    let lens = [1 << 14, 1 << 16, 1 << 18];
    let peaks: Vec<usize> = lens.iter().map(|&n| peak(n)).collect();
    for (&n, &p) in lens.iter().zip(&peaks) {
        eprintln!(
            "N = {n}: peak {p} bytes = {:.1} bytes/token (bound {:.1})",
            p as f64 / n as f64,
            bound(n) as f64 / n as f64
        );
        assert!(
            p <= bound(n),
            "peak {p} above the derived bound {}",
            bound(n)
        );
    }
    for w in peaks.windows(2) {
        let ratio = w[1] as f64 / w[0] as f64;
        assert!(
            (4.0 / 1.3..=4.0 * 1.3).contains(&ratio),
            "peak grew by {ratio:.2}× for 4× the length"
        );
    }
}
