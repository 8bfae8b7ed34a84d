//! Batches: `[batch, len]` sequences of different lengths, padded to the longest, give the
//! losses and gradients of their sequences one by one (≤ 1e-5 relative; the gradient of the
//! batch's mean loss per position is the count-weighted mean of the sequences' own). Padded
//! positions are masked as keys in every attention kind and left out of the loss. Without LSH
//! layers a sequence equals itself alone at its own length; with LSH (rotations drawn for the
//! padded length, pads sorted last) it equals itself alone padded to the batch's length, and
//! at its own length where the padding changes neither the chunks nor the bucket count — a
//! case that fails without the key mask.

use reformer::{Attention, CpuBackend, ModelConfig, ReformerError, ReformerLm, StepContext};
use reformer_engine::{MemoryPool, Rng};

const TOL: f64 = 1e-5;

fn tokens(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| b'a' + rng.below(13) as u8).collect()
}

fn config(kinds: &[Attention]) -> ModelConfig {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.n_layers = kinds.len();
    cfg.attention = kinds.to_vec();
    cfg.head_group = 1;
    cfg.ff_chunk = 12;
    cfg.loss_chunk = 7;
    cfg
}

fn model(cfg: &ModelConfig) -> ReformerLm<CpuBackend> {
    ReformerLm::new(CpuBackend::poisoned(&MemoryPool::unlimited()), cfg).unwrap()
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// The batch against each sequence alone (padded to `alone_pad` when given): per-sequence
/// loss sums, and the batch gradient against the count-weighted mean of the lone gradients.
fn check(cfg: &ModelConfig, seqs: &[Vec<u8>], alone_pad: Option<usize>, what: &str) {
    let ctx = StepContext::train(5);
    let batch: Vec<&[u8]> = seqs.iter().map(|s| &s[..]).collect();
    let mut m = model(cfg);
    m.zero_grad().unwrap();
    let loss = m.train_batch_grads(&batch, None, &ctx).unwrap();
    let got = m.download_grads().unwrap();
    let total: usize = loss.counts.iter().sum();
    assert_eq!(
        loss.counts,
        seqs.iter().map(|s| s.len() - 1).collect::<Vec<_>>(),
        "{what}: padded positions counted in the loss"
    );
    let mut want: Vec<Vec<f32>> = got.iter().map(|g| vec![0.0; g.len()]).collect();
    for (s, seq) in seqs.iter().enumerate() {
        let mut one = model(cfg);
        one.zero_grad().unwrap();
        let alone = one.train_batch_grads(&[seq], alone_pad, &ctx).unwrap();
        let rel = (alone.sums[0] - loss.sums[s]).abs() / alone.sums[0].abs();
        assert!(
            rel <= TOL,
            "{what}: sequence {s}'s loss {} in the batch, {} alone ({rel:.2e})",
            loss.sums[s],
            alone.sums[0]
        );
        let weight = (seq.len() - 1) as f32 / total as f32;
        for (w, g) in want.iter_mut().zip(one.download_grads().unwrap()) {
            w.iter_mut().zip(g).for_each(|(a, b)| *a += weight * b);
        }
    }
    let names = reformer::param_specs(cfg);
    let mut worst = 0.0f32;
    for ((g, w), (name, _)) in got.iter().zip(&want).zip(&names) {
        let scale = max_abs(w).max(1e-6);
        let diff = g
            .iter()
            .zip(w)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            (diff / scale) as f64 <= TOL,
            "{what}: gradient of {name} differs by {diff:e} of {scale:e}"
        );
        worst = worst.max(diff / scale);
    }
    eprintln!("{what}: worst gradient difference {worst:.2e}");
}

#[test]
fn an_equal_length_batch_is_its_sequences_one_by_one() {
    let cfg = config(&[Attention::Local, Attention::Lsh, Attention::Exact]);
    let seqs: Vec<Vec<u8>> = (0..3).map(|s| tokens(41, s)).collect();
    check(&cfg, &seqs, None, "every kind, 3 × 40");
}

#[test]
fn a_ragged_batch_without_lsh_is_its_sequences_alone_at_their_own_lengths() {
    let cfg = config(&[Attention::Local, Attention::Exact]);
    let seqs = vec![tokens(41, 1), tokens(18, 2), tokens(30, 3), tokens(2, 4)];
    check(&cfg, &seqs, None, "local + exact, lengths 40, 17, 29, 1");
}

#[test]
fn a_ragged_batch_with_lsh_is_its_sequences_alone_padded_alike() {
    let cfg = config(&[Attention::Lsh, Attention::Local, Attention::Lsh]);
    let seqs = vec![tokens(41, 5), tokens(23, 6), tokens(9, 7)];
    check(&cfg, &seqs, Some(40), "lsh + local, lengths 40, 22, 8");
    // The padding matters for LSH (the bucket count and the chunks in sorted order follow
    // the padded length), so alone at its own length a short sequence hashes otherwise.
    let mut a = model(&cfg);
    let ctx = StepContext::eval(0);
    let own = a.eval_batch_loss(&[&seqs[1][..]], None, &ctx).unwrap().sums[0];
    let padded = a
        .eval_batch_loss(&[&seqs[1][..]], Some(40), &ctx)
        .unwrap()
        .sums[0];
    assert_ne!(own, padded);
}

/// Where the padding adds no chunk (the lengths round up to the same number of chunks) and
/// the bucket count does not follow the length, a padded LSH sequence equals itself alone at
/// its own length — only because its pads are masked: unmasked, they would be hashed into
/// the buckets and push real keys into other chunks.
#[test]
fn padded_keys_are_masked_in_lsh_attention() {
    let mut cfg = config(&[Attention::Lsh, Attention::Lsh]);
    cfg.buckets = Some(reformer_lsh::Buckets::Single(2));
    // Chunks of 8: 24 and 19 positions are both 3 chunks.
    let seqs = vec![tokens(25, 8), tokens(20, 9)];
    check(&cfg, &seqs, None, "lsh, 2 buckets, lengths 24 and 19");
}

#[test]
fn evaluation_of_a_batch_is_evaluation_one_by_one() {
    let cfg = config(&[Attention::Local, Attention::Lsh]);
    let seqs: Vec<Vec<u8>> = (0..4).map(|s| tokens(33, 10 + s)).collect();
    let batch: Vec<&[u8]> = seqs.iter().map(|s| &s[..]).collect();
    let mut m = model(&cfg);
    let ctx = StepContext::eval(2);
    let all = m.eval_batch_loss(&batch, None, &ctx).unwrap();
    for (s, seq) in seqs.iter().enumerate() {
        let one = m.eval_loss_sum(seq, &ctx).unwrap();
        assert!(
            (one - all.sums[s]).abs() <= TOL * one,
            "{s}: {one} vs {}",
            all.sums[s]
        );
    }
}

#[test]
fn dropout_draws_each_sequence_of_a_batch_its_own_masks() {
    let mut cfg = config(&[Attention::Local, Attention::Exact]);
    cfg.dropout = 0.2;
    let seq = tokens(33, 1);
    let mut m = model(&cfg);
    m.zero_grad().unwrap();
    let loss = m
        .train_batch_grads(&[&seq[..], &seq[..]], None, &StepContext::train(0))
        .unwrap();
    assert_ne!(
        loss.sums[0], loss.sums[1],
        "two rows of the batch had one mask"
    );
    // The first sequence of a batch has the masks of the sequence alone.
    m.zero_grad().unwrap();
    let alone = m.train_step_grads(&seq, &StepContext::train(0)).unwrap();
    assert!((alone as f64 - loss.sums[0] / 32.0).abs() <= TOL * alone as f64);
}

#[test]
fn bad_batches_are_typed_errors() {
    let cfg = config(&[Attention::Local]);
    let mut m = model(&cfg);
    let ctx = StepContext::train(0);
    let long = tokens(cfg.max_len() + 2, 1);
    let ok = tokens(10, 2);
    for (batch, pad) in [
        (vec![], None),
        (vec![&ok[..], &b"x"[..]], None),
        (vec![&ok[..]], Some(5)),
        (vec![&long[..]], None),
        (vec![&ok[..]], Some(cfg.max_len() + 1)),
    ] {
        let err = m.train_batch_grads(&batch, pad, &ctx).unwrap_err();
        assert!(
            matches!(
                err,
                ReformerError::InvalidArgument(_) | ReformerError::Length { .. }
            ),
            "{err}"
        );
    }
}
