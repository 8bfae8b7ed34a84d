//! Activation memory does not grow with depth.
//!
//! For stacks of 2 and 8 layers (local and LSH alternating), the pool's peak during one
//! forward and backward is measured from `reset_peak()` taken after the parameters, their
//! gradients and the step's inputs (X1, X2, dY1, dY2) are allocated. The reversible stack keeps
//! no per-layer activation and each layer's work is freed before the next one starts, so the
//! bound is:
//!
//!   peak(8) − peak(2) ≤ (params+grads(8) − params+grads(2)) + 6 · C,   C = 0 bytes per layer,
//!
//! i.e. the transient peak above the live bytes at `reset_peak()` is the same at both depths.
//! This holds exactly on one rayon thread (the order of allocations is fixed). With several
//! threads, tasks of the attention ops hold per-head scratch concurrently in an order the
//! scheduler picks, so the transient peak may differ by at most the scratch of the extra
//! concurrent tasks; that jitter `J` does not depend on depth and is bounded below.
//! The storing path, for contrast, must grow by at least its 2 stored streams per extra layer.

mod common;

use common::*;
use reformer_engine::MemoryPool;
use reformer_reversible::{HasParams, ReversibleStack, StepContext};

const SHAPE: [usize; 3] = [2, 128, 16];

struct Peak {
    /// Bytes of parameters and gradients.
    params: usize,
    /// Pool peak during the step, absolute.
    peak: usize,
    /// Peak minus the bytes live at `reset_peak()`.
    transient: usize,
}

fn measure(n_layers: usize, storing: bool) -> Peak {
    let pool = MemoryPool::unlimited();
    let mut stack = ReversibleStack::new(&alternating(n_layers, 0.1), &pool).unwrap();
    let params = stack.param_bytes();
    assert_eq!(
        params,
        pool.live_bytes(),
        "parameters are all the pool holds"
    );
    let ctx = StepContext::train(1);
    let [x1, x2, g1, g2] = [1, 2, 3, 4].map(|s| randn(&pool, &SHAPE, 1.0, s));
    pool.reset_peak();
    let live = pool.live_bytes();
    let (dx1, dx2) = if storing {
        let (_, _, stored) = stack.forward_storing(x1, x2, &ctx).unwrap();
        stack.backward_storing(stored, g1, g2, &ctx).unwrap()
    } else {
        let (y1, y2) = stack.forward(x1, x2, &ctx).unwrap();
        stack.backward(y1, y2, g1, g2, &ctx).unwrap()
    };
    drop((dx1, dx2));
    assert_eq!(pool.live_bytes(), params, "the step leaked pool memory");
    Peak {
        params,
        peak: pool.peak_bytes(),
        transient: pool.peak_bytes() - live,
    }
}

fn on_threads<T: Send>(n: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
        .install(f)
}

/// One `[batch, len, d_model]` stream in bytes.
const STREAM: usize = SHAPE[0] * SHAPE[1] * SHAPE[2] * 4;

#[test]
fn reversible_peak_does_not_grow_with_depth_single_thread() {
    let (p2, p8) = on_threads(1, || (measure(2, false), measure(8, false)));
    eprintln!(
        "1 thread: params 2 layers {} B, 8 layers {} B; transient peak {} B vs {} B (a stream is {} B)",
        p2.params, p8.params, p2.transient, p8.transient, STREAM
    );
    let per_layer_constant = 0;
    assert!(
        p8.peak <= p2.peak + (p8.params - p2.params) + 6 * per_layer_constant,
        "peak(8) {} > peak(2) {} + params diff {}",
        p8.peak,
        p2.peak,
        p8.params - p2.params
    );
    assert_eq!(p8.transient, p2.transient);
}

#[test]
fn reversible_peak_does_not_grow_with_depth_multi_thread() {
    let threads = 4;
    let (p2, p8) = on_threads(threads, || (measure(2, false), measure(8, false)));
    eprintln!(
        "{threads} threads: transient peak 2 layers {} B, 8 layers {} B",
        p2.transient, p8.transient
    );
    // Jitter: the per-head scratch of LSH attention's backward (about 16 rows of len·d_head
    // floats per concurrent head task) for every thread beyond the first.
    let d_head = 8;
    let jitter = (threads - 1) * 16 * SHAPE[1] * d_head * 4;
    assert!(
        p8.peak <= p2.peak + (p8.params - p2.params) + jitter,
        "peak(8) {} > peak(2) {} + params diff {} + jitter {}",
        p8.peak,
        p2.peak,
        p8.params - p2.params,
        jitter
    );
    assert!(p8.transient.abs_diff(p2.transient) <= jitter);
}

#[test]
fn storing_peak_grows_with_depth() {
    let (p2, p8) = on_threads(1, || (measure(2, true), measure(8, true)));
    eprintln!(
        "storing: transient peak 2 layers {} B, 8 layers {} B",
        p2.transient, p8.transient
    );
    assert!(p8.transient >= p2.transient + 6 * 2 * STREAM);
}
