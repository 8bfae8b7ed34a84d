//! The incremental decoder (`src/decode.rs`) against what it must equal: a full forward over
//! the prefix for local and exact layers (and for the first LSH layer), the plain reference
//! model run with the decoder's stated LSH semantics for every layer kind, and itself fed in
//! other block sizes (prefill then steps = one longer prefill). f32 on the CPU, tolerance
//! 1e-5 relative to the largest logit.

mod model_common;
mod reference;

use model_common::{assert_tensor_close, tokens};
use reference::RefModel;
use reformer::generate::argmax_byte;
use reformer::{
    Attention, CpuBackend, DecodeState, ModelConfig, ReformerError, ReformerLm, StepContext,
};
use reformer_engine::MemoryPool;
use reformer_lsh::Buckets;

const TOL: f32 = 1e-5;

fn config(kinds: &[Attention], rounds: usize, seed: u64) -> ModelConfig {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.n_layers = kinds.len();
    cfg.attention = kinds.to_vec();
    // Few buckets, so every chunk mixes several and the sorted order moves as positions come.
    cfg.buckets = Some(Buckets::Single(4));
    cfg.n_rounds = rounds;
    cfg.eval_rounds = rounds;
    cfg.seed = seed;
    cfg
}

fn model(cfg: &ModelConfig) -> ReformerLm<CpuBackend> {
    let pool = MemoryPool::unlimited();
    ReformerLm::new(CpuBackend::poisoned(&pool), cfg).unwrap()
}

/// Logits after each position `first - 1 ..` of `text`: a prefill of `first` bytes, then one
/// step per byte.
fn decoded(
    m: &ReformerLm<CpuBackend>,
    st: &mut DecodeState<CpuBackend>,
    text: &[u8],
    first: usize,
) -> Vec<Vec<f32>> {
    let mut out = vec![m.decode(st, &text[..first]).unwrap()];
    for t in first..text.len() {
        out.push(m.decode(st, &text[t..t + 1]).unwrap());
    }
    out
}

#[test]
fn local_and_exact_layers_decode_what_a_full_forward_computes() {
    use Attention::{Exact, Local};
    for (kinds, seed) in [(vec![Local, Exact], 3), (vec![Exact, Local, Local], 4)] {
        let cfg = config(&kinds, 1, seed);
        let m = model(&cfg);
        let text = tokens(120, seed);
        let mut st = m.start_decoding(text.len()).unwrap();
        let got = decoded(&m, &mut st, &text, 13);
        for (i, logits) in got.iter().enumerate() {
            let t = 12 + i;
            let want = m.next_logits(&text[..=t], &StepContext::eval(0)).unwrap();
            assert_tensor_close(&format!("{kinds:?} position {t}"), logits, &want, TOL, 1.0);
        }
    }
}

#[test]
fn the_first_lsh_layer_decodes_what_a_full_forward_computes() {
    use Attention::{Local, Lsh};
    for rounds in [1, 3] {
        let cfg = config(&[Local, Lsh], rounds, 5);
        let m = model(&cfg);
        let text = tokens(100, 6);
        let mut st = m.start_decoding(text.len()).unwrap();
        let got = decoded(&m, &mut st, &text, 16);
        // From 16 positions on, a full forward hashes into the same 4 buckets with the same
        // rotations (below, the automatic count for its length is smaller).
        for (i, logits) in got.iter().enumerate() {
            let t = 15 + i;
            let want = m.next_logits(&text[..=t], &StepContext::eval(0)).unwrap();
            assert_tensor_close(
                &format!("rounds {rounds}, position {t}"),
                logits,
                &want,
                TOL,
                1.0,
            );
        }
    }
}

#[test]
fn every_layer_kind_decodes_the_stated_semantics() {
    use Attention::{Exact, Local, Lsh};
    for (kinds, rounds, seed) in [
        (vec![Lsh, Local, Lsh], 2, 7),
        (vec![Local, Lsh, Exact, Lsh], 3, 8),
        (vec![Lsh, Lsh], 1, 9),
    ] {
        let cfg = config(&kinds, rounds, seed);
        let m = model(&cfg);
        let text = tokens(90, seed + 1);
        let capacity = 128;
        let mut st = m.start_decoding(capacity).unwrap();
        let got = decoded(&m, &mut st, &text, 1);
        let snap = m.snapshot().unwrap();
        let reference = RefModel::new(&cfg, snap.names, snap.shapes, snap.values);
        let want = reference.decoded_logits(&text, capacity);
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = format!("{kinds:?}, {rounds} rounds, position {t}");
            assert_tensor_close(&what, g, w, TOL, 1.0);
        }
    }
}

/// The fast prefill (one full forward) then steps, against the reference with the same
/// semantics: the context's positions with a full forward's states, later ones incremental.
#[test]
fn a_prefill_is_a_full_forward_and_steps_go_on_from_it() {
    use Attention::{Exact, Local, Lsh};
    for (kinds, rounds, seed) in [(vec![Lsh, Local, Lsh], 2, 17), (vec![Local, Lsh], 3, 18)] {
        let cfg = config(&kinds, rounds, seed);
        let m = model(&cfg);
        let text = tokens(90, seed + 1);
        let (capacity, c) = (128, 40);
        let mut st = m.start_decoding(capacity).unwrap();
        let mut got = vec![m.prefill(&mut st, &text[..c]).unwrap()];
        for t in c..text.len() {
            got.push(m.decode(&mut st, &text[t..t + 1]).unwrap());
        }
        // The prefill's logits are a full forward's (4 buckets at every length from 16 on).
        let full = m.next_logits(&text[..c], &StepContext::eval(0)).unwrap();
        assert_tensor_close("prefill vs full forward", &got[0], &full, TOL, 1.0);
        let snap = m.snapshot().unwrap();
        let reference = RefModel::new(&cfg, snap.names, snap.shapes, snap.values);
        let want = reference.prefilled_logits(&text, capacity, c);
        for (i, g) in got.iter().enumerate() {
            let t = c - 1 + i;
            let what = format!("{kinds:?}, {rounds} rounds, position {t}");
            assert_tensor_close(&what, g, &want[t], TOL, 1.0);
        }
    }
    // Without LSH layers the prefill leaves exactly the state of feeding the context.
    let mut cfg = config(&[Local, Exact, Local], 1, 19);
    // Past one prefill block, so the local rings wrap.
    cfg.axial_shape = (64, 64);
    let m = model(&cfg);
    let text = tokens(1500, 20);
    let (mut a, mut b) = (
        m.start_decoding(1600).unwrap(),
        m.start_decoding(1600).unwrap(),
    );
    let la = m.prefill(&mut a, &text).unwrap();
    let lb = m.decode(&mut b, &text).unwrap();
    assert_tensor_close("logits", &la, &lb, TOL, 1.0);
    for (i, (x, y)) in a
        .contents(m.backend())
        .unwrap()
        .iter()
        .zip(&b.contents(m.backend()).unwrap())
        .enumerate()
    {
        assert_tensor_close(&format!("cache {i}"), x, y, TOL, 1.0);
    }
    // A prefill starts a state.
    assert!(m.prefill(&mut a, b"x").is_err());
}

#[test]
fn prefill_then_steps_equals_one_longer_prefill() {
    use Attention::{Exact, Local, Lsh};
    let mut cfg = config(&[Local, Lsh, Exact], 2, 11);
    // Long enough for several prefill blocks and a wrapped local ring.
    cfg.axial_shape = (32, 64);
    let m = model(&cfg);
    let text = tokens(1100, 12);
    let (c, n) = (1030, 70);
    let mut a = m.start_decoding(1200).unwrap();
    let want = m.decode(&mut a, &text[..c + n]).unwrap();
    let mut b = m.start_decoding(1200).unwrap();
    m.decode(&mut b, &text[..c]).unwrap();
    let mut got = Vec::new();
    for t in c..c + n {
        got = m.decode(&mut b, &text[t..t + 1]).unwrap();
    }
    assert_eq!((a.position(), b.position()), (c + n, c + n));
    assert_tensor_close("logits", &got, &want, TOL, 1.0);
    let (sa, sb) = (
        a.contents(m.backend()).unwrap(),
        b.contents(m.backend()).unwrap(),
    );
    assert_eq!(sa.len(), sb.len());
    for (i, (x, y)) in sa.iter().zip(&sb).enumerate() {
        assert!(
            x.iter().all(|v| v.is_finite()),
            "cache {i} holds unwritten rows"
        );
        assert_tensor_close(&format!("cache {i}"), y, x, TOL, 1.0);
    }
}

#[test]
fn contexts_beyond_the_capacity_are_typed_errors() {
    let cfg = config(&[Attention::Local, Attention::Lsh], 1, 13);
    let m = model(&cfg);
    let max = cfg.max_len();
    assert!(matches!(
        m.start_decoding(max + 1),
        Err(ReformerError::Length { .. })
    ));
    let mut st = m.start_decoding(10).unwrap();
    m.decode(&mut st, &tokens(8, 1)).unwrap();
    match m.decode(&mut st, &tokens(3, 2)) {
        Err(ReformerError::DecodeCapacity {
            needed, capacity, ..
        }) => assert_eq!((needed, capacity), (11, 10)),
        other => panic!("expected a capacity error, got {other:?}"),
    }
    // Nothing was fed: the state goes on where it was.
    assert_eq!(st.position(), 8);
    m.decode(&mut st, &tokens(2, 3)).unwrap();
    assert!(m.decode(&mut st, &[]).is_err());
}

#[test]
fn the_caches_are_buffers_of_the_pool() {
    let cfg = config(&[Attention::Local, Attention::Lsh, Attention::Exact], 2, 14);
    let pool = MemoryPool::unlimited();
    let m = ReformerLm::new(CpuBackend::new(&pool), &cfg).unwrap();
    let before = pool.live_bytes();
    let st = m.start_decoding(200).unwrap();
    let w = cfg.n_heads * cfg.d_head;
    // LSH and exact: keys and values of 200 positions; local: a ring of min(200, block + 2m).
    let want = 4 * w * (2 * 200 + 2 * 200 + 2 * 200.min(1024 + 2 * cfg.chunk_len));
    assert_eq!(st.device_bytes(), want);
    assert_eq!(pool.live_bytes() - before, want);
    drop(st);
    assert_eq!(pool.live_bytes(), before);
}

#[test]
fn the_decoding_plan_is_the_pools_peak() {
    use reformer::backend::{DecodePlan, PlanTarget};
    use reformer_engine::DType;
    let mut cfg = config(&[Attention::Local, Attention::Lsh, Attention::Exact], 2, 15);
    cfg.axial_shape = (64, 64);
    let threads = rayon::current_num_threads();
    let plan = DecodePlan::new(&cfg, 2058, 2100, PlanTarget::Cpu { threads }, DType::F32).unwrap();
    let pool = MemoryPool::unlimited();
    let m = ReformerLm::new(CpuBackend::new(&pool), &cfg).unwrap();
    assert_eq!(pool.live_bytes(), plan.model);
    let mut st = m.start_decoding(2100).unwrap();
    assert_eq!(st.device_bytes(), plan.caches);
    // A prefill of 2058 positions and steps; feeding blocks incrementally stays below it.
    m.prefill(&mut st, &tokens(2 * 1024 + 10, 16)).unwrap();
    m.decode(&mut st, b"x").unwrap();
    m.decode(&mut st, &tokens(20, 17)).unwrap();
    assert_eq!(pool.peak_bytes(), plan.peak, "{plan}");
}

/// Greedy decoding of a briefly trained model with the caches against the no-cache method
/// (a full forward per byte), teacher-forced on the no-cache method's own 200 bytes: the
/// fraction of positions where both pick the same byte. Local layers are exact; LSH layers
/// differ only in the states earlier positions keep (the module doc of `src/decode.rs`).
#[test]
fn greedy_decoding_agrees_with_the_no_cache_method() {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.n_layers = 4;
    cfg.attention = vec![
        Attention::Local,
        Attention::Lsh,
        Attention::Local,
        Attention::Lsh,
    ];
    cfg.axial_shape = (32, 32);
    let mut m = model(&cfg);
    let text = std::fs::read("tests/fixtures/shakespeare-40k.txt").unwrap();
    let adam = reformer::AdamConfig::default();
    for step in 0..120u64 {
        let at = (step as usize * 997) % (text.len() - 300);
        m.zero_grad().unwrap();
        m.train_step_grads(&text[at..at + 257], &StepContext::train(step))
            .unwrap();
        m.adam_update(adam, 3e-3).unwrap();
    }
    let prompt = &text[1000..1300];
    let mut forced = prompt.to_vec();
    let mut no_cache = Vec::new();
    for _ in 0..200 {
        let l = m.next_logits(&forced, &StepContext::eval(0)).unwrap();
        no_cache.push(argmax_byte(&l));
        forced.push(*no_cache.last().unwrap());
    }
    let mut st = m.start_decoding(forced.len()).unwrap();
    let mut logits = m.prefill(&mut st, prompt).unwrap();
    let mut same = 0;
    for (i, &b) in no_cache.iter().enumerate() {
        same += usize::from(argmax_byte(&logits) == b);
        if i + 1 < no_cache.len() {
            logits = m.decode(&mut st, &[b]).unwrap();
        }
    }
    let rate = same as f64 / no_cache.len() as f64;
    let mut distinct = no_cache.clone();
    distinct.sort();
    distinct.dedup();
    eprintln!(
        "greedy agreement with the no-cache method: {same}/200 = {rate:.3} ({} distinct bytes: \
         {:?})",
        distinct.len(),
        String::from_utf8_lossy(&no_cache)
    );
    // A model that repeats one byte would agree trivially.
    assert!(
        distinct.len() >= 5,
        "the model is not trained enough to tell"
    );
    assert!(rate >= 0.8, "{same} of 200 greedy bytes agree");
}

/// bf16 caches and queries (the GPU's storage, rounded where it rounds) against f32: the
/// logits within 1e-2 of the largest, local and exact layers (LSH would hash the rounded
/// queries, moving positions near a bucket boundary, as another hash seed would).
#[test]
fn bf16_caches_stay_close_to_f32() {
    use reformer_engine::DType;
    let cfg = config(
        &[Attention::Local, Attention::Exact, Attention::Local],
        1,
        22,
    );
    let pool = MemoryPool::unlimited();
    let f32m = ReformerLm::new(CpuBackend::new(&pool), &cfg).unwrap();
    let bf16 = CpuBackend::new(&pool).with_act_dtype(DType::BF16).unwrap();
    let b16m = ReformerLm::new(bf16, &cfg).unwrap();
    let text = tokens(120, 23);
    let (mut a, mut b) = (
        f32m.start_decoding(120).unwrap(),
        b16m.start_decoding(120).unwrap(),
    );
    let (mut la, mut lb) = (
        f32m.prefill(&mut a, &text[..60]).unwrap(),
        b16m.prefill(&mut b, &text[..60]).unwrap(),
    );
    let mut worst = 0.0f32;
    for t in 60..120 {
        let scale = model_common::max_abs(&la).max(1.0);
        let err = la
            .iter()
            .zip(&lb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(err <= 1e-2 * scale, "position {t}: {err} of {scale}");
        worst = worst.max(err / scale);
        la = f32m.decode(&mut a, &text[t..t + 1]).unwrap();
        lb = b16m.decode(&mut b, &text[t..t + 1]).unwrap();
    }
    // The rounding is there: bf16 is not f32.
    assert!(worst > 1e-6, "bf16 gave f32's logits ({worst})");
    eprintln!("bf16 decoding: worst logit difference {worst:.2e} of the largest");
}
