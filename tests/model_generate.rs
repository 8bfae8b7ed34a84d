//! Sampling: greedy and top-k pick from the right bytes; generation is deterministic in its
//! seed, restores the model's training rounds, and refuses bad input with typed errors.

use reformer::generate::sample_byte;
use std::ops::ControlFlow;

use reformer::{generate, CpuBackend, ModelConfig, ReformerError, ReformerLm, SampleOptions};
use reformer_engine::{MemoryPool, Rng};

#[test]
fn greedy_and_top_k() {
    let mut logits = vec![0.0f32; 256];
    logits[b'a' as usize] = 5.0;
    logits[b'b' as usize] = 4.9;
    logits[b'c' as usize] = 4.8;
    let mut rng = Rng::new(0);
    assert_eq!(sample_byte(&logits, 0.0, 0, &mut rng).unwrap(), b'a');
    for _ in 0..200 {
        let b = sample_byte(&logits, 1.0, 2, &mut rng).unwrap();
        assert!(b == b'a' || b == b'b');
    }
    let mut seen = [false; 256];
    for _ in 0..5000 {
        seen[sample_byte(&logits, 5.0, 0, &mut rng).unwrap() as usize] = true;
    }
    assert!(
        seen.iter().filter(|&&s| s).count() > 100,
        "temperature spreads the choice"
    );
    assert!(matches!(
        sample_byte(&logits, -1.0, 0, &mut rng),
        Err(ReformerError::InvalidArgument(_))
    ));
    assert!(sample_byte(&logits[..10], 1.0, 0, &mut rng).is_err());
}

#[test]
fn generation_is_seeded_and_restores_rounds() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let pool = MemoryPool::unlimited();
    let mut model = ReformerLm::new(CpuBackend::new(&pool), &cfg).unwrap();
    model.set_rounds(1).unwrap();
    let opts = SampleOptions {
        temperature: 1.0,
        top_k: 0,
        rounds: Some(3),
        seed: 42,
    };
    let mut streamed = Vec::new();
    let a = generate(&mut model, b"the ", 20, &opts, |b| {
        streamed.push(b);
        ControlFlow::Continue(())
    })
    .unwrap();
    let b = generate(
        &mut model,
        b"the ",
        20,
        &opts,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(a.len(), 20);
    assert_eq!(a, b);
    assert_eq!(a, streamed);
    assert_eq!(model.rounds(), 1);
    assert!(matches!(
        generate(&mut model, b"", 5, &opts, |_| ControlFlow::Continue(())),
        Err(ReformerError::InvalidArgument(_))
    ));
    // A context longer than the axial capacity (256 for tiny) keeps its last 256 bytes.
    let long = vec![b'x'; 300];
    assert_eq!(
        generate(&mut model, &long, 2, &opts, |_| ControlFlow::Continue(()))
            .unwrap()
            .len(),
        2
    );
    assert!(matches!(
        model.eval_loss(&vec![b'x'; 258], &reformer::StepContext::eval(0)),
        Err(ReformerError::Length {
            len: 257,
            max_len: 256
        })
    ));
}
