//! Held-out evaluation (`reformer::evaluate`): the figure is the mean of the model's own losses
//! over windows placed as documented, the rounds are an option and are restored, and a file
//! that cannot hold a window is a typed error.

use std::path::{Path, PathBuf};

use reformer::data::{DataError, TextData};
use reformer::evaluate::{self, EvalOptions};
use reformer::{
    AdamConfig, CpuBackend, LrSchedule, ModelConfig, ReformerError, ReformerLm, StepContext,
    Trainer,
};
use reformer_engine::{MemoryPool, Rng};

fn cpu() -> CpuBackend {
    CpuBackend::new(&MemoryPool::unlimited())
}

fn tiny() -> ReformerLm<CpuBackend> {
    ReformerLm::new(cpu(), &ModelConfig::preset("tiny").unwrap()).unwrap()
}

fn text(n: usize) -> Vec<u8> {
    let mut rng = Rng::new(7);
    (0..n).map(|_| b"abcdefgh \n"[rng.below(10)]).collect()
}

/// A file in a fresh scratch folder.
fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("reformer-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

#[test]
fn a_file_scores_the_mean_of_eval_loss_over_its_windows() {
    let bytes = text(1000);
    let path = file("held.txt", &bytes);
    let (len, count) = (40usize, 7usize);
    // By hand: 7 windows of 41 bytes, the first at 0, the last ending at the file's end.
    let room = bytes.len() - (len + 1);
    let offsets: Vec<usize> = (0..count).map(|i| room * i / (count - 1)).collect();
    assert_eq!((offsets[0], offsets[count - 1]), (0, room));
    let mut lm = tiny();
    let ctx = StepContext::eval(0);
    for rounds in [1usize, 3] {
        lm.set_rounds(rounds).unwrap();
        // Windows of equal length: the mean of their means is the mean per byte.
        let means: Vec<f64> = offsets
            .iter()
            .map(|&o| lm.eval_loss(&bytes[o..o + len + 1], &ctx).unwrap() as f64)
            .collect();
        let want = means.iter().sum::<f64>() / count as f64;
        let n = count * len;
        lm.set_rounds(2).unwrap();
        let opts = EvalOptions {
            len,
            windows: Some(count),
            rounds: Some(rounds),
            batch: 1,
        };
        let e = evaluate::evaluate_file(&mut lm, &path, &opts).unwrap();
        assert!(
            rel(e.loss, want) <= 1e-6,
            "rounds {rounds}: {} vs {want}",
            e.loss
        );
        assert_eq!(
            (e.windows, e.len, e.tokens, e.rounds),
            (count, len, n, rounds)
        );
        assert!(rel(e.bits_per_byte(), e.loss / std::f64::consts::LN_2) <= 1e-12);
        assert_eq!(lm.rounds(), 2, "the model's rounds are restored");
        // Batched passes give the same figure (each window as if alone).
        let batched = evaluate::evaluate_file(&mut lm, &path, &EvalOptions { batch: 3, ..opts });
        assert!(rel(batched.unwrap().loss, want) <= 1e-5);
    }
}

#[test]
fn the_rounds_change_the_figure_of_an_lsh_model() {
    let bytes = text(600);
    let mut lm = tiny();
    let label = Path::new("text");
    let at = |lm: &mut ReformerLm<CpuBackend>, rounds| {
        let opts = EvalOptions {
            rounds: Some(rounds),
            ..EvalOptions::new(64)
        };
        evaluate::evaluate(lm, label, &bytes, &opts).unwrap().loss
    };
    let (one, four) = (at(&mut lm, 1), at(&mut lm, 4));
    assert_ne!(one, four);
    assert_eq!(at(&mut lm, 1), one, "deterministic");
}

#[test]
fn windows_are_spread_evenly_and_capped() {
    let bytes: Vec<u8> = (0..100u8).collect();
    let ws = evaluate::windows(&bytes, 9, 4);
    let starts: Vec<u8> = ws.iter().map(|w| w[0]).collect();
    assert_eq!(starts, [0, 30, 60, 90]);
    assert!(ws.iter().all(|w| w.len() == 10));
    assert_eq!(
        evaluate::windows(&bytes, 9, 50).len(),
        10,
        "at most those that fit"
    );
    assert_eq!(evaluate::windows(&bytes, 99, 3).len(), 1);
    assert!(evaluate::windows(&bytes, 100, 3).is_empty());
    assert_eq!(evaluate::default_windows(100_000, 512), 32);
    assert_eq!(evaluate::default_windows(100_000, 8192), 4);
    assert_eq!(evaluate::default_windows(2_000, 512), 3);
}

#[test]
fn files_that_hold_no_window_are_typed_errors() {
    let mut lm = tiny();
    let opts = EvalOptions::new(32);
    let empty = file("empty.txt", b"");
    match evaluate::evaluate_file(&mut lm, &empty, &opts) {
        Err(ReformerError::Data(DataError::Empty { path })) => assert_eq!(path, empty),
        other => panic!("expected DataError::Empty, got {other:?}"),
    }
    let short = file("short.txt", &text(32));
    match evaluate::evaluate_file(&mut lm, &short, &opts) {
        Err(ReformerError::Data(DataError::TooShort { len, need, .. })) => {
            assert_eq!((len, need), (32, 33))
        }
        other => panic!("expected DataError::TooShort, got {other:?}"),
    }
    let missing = empty.with_file_name("absent.txt");
    assert!(matches!(
        evaluate::evaluate_file(&mut lm, &missing, &opts),
        Err(ReformerError::Data(DataError::Missing { .. }))
    ));
    // Past the model's axial table (tiny serves 256 positions).
    let long = file("long.txt", &text(2000));
    assert!(matches!(
        evaluate::evaluate_file(&mut lm, &long, &EvalOptions::new(300)),
        Err(ReformerError::Length { .. })
    ));
    let none = EvalOptions {
        windows: Some(0),
        ..opts
    };
    assert!(matches!(
        evaluate::evaluate_file(&mut lm, &long, &none),
        Err(ReformerError::InvalidArgument(_))
    ));
}

#[test]
fn the_trainers_validation_is_the_same_evaluation() {
    let data = TextData::from_bytes(Path::new("t"), text(4000), 0.25, 32).unwrap();
    let valid = data.valid.clone();
    let mut t = Trainer::new(
        cpu(),
        &ModelConfig::preset("tiny").unwrap(),
        data,
        32,
        0,
        LrSchedule::default(),
        AdamConfig::default(),
    )
    .unwrap();
    let v = t.evaluate_len(48, 5, Some(3)).unwrap().unwrap();
    let opts = EvalOptions {
        len: 48,
        windows: Some(5),
        rounds: Some(3),
        batch: 1,
    };
    let e = evaluate::evaluate(&mut t.lm, Path::new("t"), &valid, &opts).unwrap();
    assert_eq!(v, e.loss as f32);
}
