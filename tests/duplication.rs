//! The duplication task: its sequences, the loss counted on a suffix, argmax predictions, and
//! that a small model learns the task with full attention while local attention cannot.

use reformer::config::Attention;
use reformer::duplication::{with_attention, Duplication, MAX_SYMBOL};
use reformer::{AdamConfig, CpuBackend, LrSchedule, ReformerError, ReformerLm, StepContext};
use reformer_engine::MemoryPool;

fn cpu() -> CpuBackend {
    CpuBackend::new(&MemoryPool::unlimited())
}

#[test]
fn sequences_are_zero_w_zero_w() {
    let task = Duplication::new(9).unwrap();
    let a = task.sequence(5, 3);
    assert_eq!(a.len(), 20);
    assert_eq!(task.positions(), 19);
    assert_eq!(task.loss_from(), 10);
    assert_eq!((a[0], a[10]), (0, 0));
    assert_eq!(a[1..10], a[11..20]);
    assert!(a[1..10].iter().all(|&s| (1..=MAX_SYMBOL).contains(&s)));
    assert_eq!(a, task.sequence(5, 3));
    assert_ne!(a, task.sequence(5, 4));
    assert_ne!(a, task.sequence(6, 3));
    assert!(matches!(
        Duplication::new(0),
        Err(ReformerError::InvalidArgument(_))
    ));
}

#[test]
fn the_loss_from_a_position_is_the_total_less_the_prefix() {
    // Exact attention is causal at any length: the prefix's loss is the sum over its positions.
    let task = Duplication::new(12).unwrap();
    let mut lm = ReformerLm::new(cpu(), &task.model(Attention::Exact, 8, 1)).unwrap();
    let ctx = StepContext::eval(0);
    let seqs = [task.sequence(1, 0), task.sequence(1, 1)];
    let refs: Vec<&[u8]> = seqs.iter().map(|s| s.as_slice()).collect();
    let from = task.loss_from();
    let all = lm.eval_batch_loss(&refs, None, &ctx).unwrap();
    let suffix = lm.eval_batch_loss_from(&refs, None, from, &ctx).unwrap();
    assert_eq!(suffix.counts, vec![task.positions() - from; 2]);
    for (s, seq) in seqs.iter().enumerate() {
        let prefix = lm.eval_loss_sum(&seq[..from + 1], &ctx).unwrap();
        let want = all.sums[s] - prefix;
        assert!(
            (suffix.sums[s] - want).abs() <= 1e-5 * want.abs(),
            "sequence {s}: {} vs {want}",
            suffix.sums[s]
        );
    }
    // Training counts the same positions.
    let trained = lm.train_batch_grads_from(&refs, None, from, &ctx).unwrap();
    for (a, b) in trained.sums.iter().zip(&suffix.sums) {
        assert!((a - b).abs() <= 1e-5 * b.abs());
    }
    let none = lm.eval_batch_loss_from(&refs, None, task.positions(), &ctx);
    assert!(matches!(none, Err(ReformerError::InvalidArgument(_))));
}

#[test]
fn argmax_predictions_agree_with_next_logits() {
    let task = Duplication::new(6).unwrap();
    let mut lm = ReformerLm::new(cpu(), &task.model(Attention::Exact, 4, 1)).unwrap();
    let ctx = StepContext::eval(0);
    let seq = task.sequence(0, 0);
    let preds = lm.eval_batch_argmax(&[&seq], None, &ctx).unwrap();
    assert_eq!(preds[0].len(), task.positions());
    for p in [0, 5, task.positions() - 1] {
        let logits = lm.next_logits(&seq[..p + 1], &ctx).unwrap();
        let best = logits
            .iter()
            .enumerate()
            .fold(0, |b, (i, &x)| if x > logits[b] { i } else { b });
        assert_eq!(preds[0][p] as usize, best, "position {p}");
    }
}

#[test]
fn lsh_and_exact_swap_but_local_does_not() {
    let task = Duplication::new(6).unwrap();
    let lm = ReformerLm::new(cpu(), &task.model(Attention::Lsh, 4, 2)).unwrap();
    let exact = with_attention(&lm, cpu(), Attention::Lsh, Attention::Exact, 1).unwrap();
    assert_eq!(exact.config().attention, vec![Attention::Exact]);
    assert_eq!(
        exact.download_values().unwrap(),
        lm.download_values().unwrap()
    );
    let lsh8 = with_attention(&exact, cpu(), Attention::Exact, Attention::Lsh, 8).unwrap();
    assert_eq!(lsh8.rounds(), 8);
    let local = ReformerLm::new(cpu(), &task.model(Attention::Local, 4, 1)).unwrap();
    let bad = with_attention(&local, cpu(), Attention::Local, Attention::Lsh, 1);
    assert!(matches!(bad, Err(ReformerError::InvalidArgument(_))));
}

/// Full attention learns to copy; local attention, whose span (two chunks of 2) cannot reach
/// `|w| + 1 = 5` positions back, stays near chance on the counted half.
#[test]
fn full_attention_learns_to_copy_and_local_attention_cannot() {
    let task = Duplication::new(4).unwrap();
    let schedule = LrSchedule {
        lr: 0.01,
        warmup: 20,
        total_steps: 200,
        final_fraction: 0.1,
    };
    let adam = AdamConfig {
        beta1: 0.9,
        beta2: 0.98,
        ..AdamConfig::default()
    };
    let mut acc = Vec::new();
    for kind in [Attention::Exact, Attention::Local] {
        // The paper's model narrowed to d_model = d_ff = 64, 2 heads of 32: seconds, not minutes.
        let mut cfg = task.model(kind, 2, 1);
        (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.d_head) = (64, 64, 2, 32);
        cfg.axial_dims = (16, 48);
        let mut lm = ReformerLm::new(cpu(), &cfg).unwrap();
        task.train(&mut lm, 8, 1, schedule, adam, |_, _| true)
            .unwrap();
        acc.push(task.score(&mut lm, 64, 64, 2).unwrap().accuracy);
    }
    assert!(acc[0] > 0.9, "full attention: accuracy {}", acc[0]);
    assert!(acc[1] < 0.3, "local attention: accuracy {}", acc[1]);
}
