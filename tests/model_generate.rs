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
        ..SampleOptions::default()
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
    // A context longer than the axial capacity (256 for tiny) is an error, unless the policy
    // says to keep its last bytes.
    let long = vec![b'x'; 300];
    assert!(matches!(
        generate(&mut model, &long, 2, &opts, |_| ControlFlow::Continue(())),
        Err(ReformerError::DecodeCapacity {
            needed: 301,
            capacity: 256,
            ..
        })
    ));
    for cache in [true, false] {
        let keep = SampleOptions {
            slide: true,
            cache,
            ..opts
        };
        assert_eq!(
            generate(&mut model, &long, 2, &keep, |_| ControlFlow::Continue(()))
                .unwrap()
                .len(),
            2
        );
    }
    assert!(matches!(
        model.eval_loss(&vec![b'x'; 258], &reformer::StepContext::eval(0)),
        Err(ReformerError::Length {
            len: 257,
            max_len: 256
        })
    ));
}

#[test]
fn a_sliding_window_goes_past_the_positions_and_says_so() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let pool = MemoryPool::unlimited();
    let mut model = ReformerLm::new(CpuBackend::new(&pool), &cfg).unwrap();
    let opts = SampleOptions {
        temperature: 0.0,
        ..SampleOptions::default()
    };
    // 250 + 20 positions do not fit tiny's 256.
    let prompt = vec![b'a'; 250];
    assert!(matches!(
        generate(
            &mut model,
            &prompt,
            20,
            &opts,
            |_| ControlFlow::Continue(())
        ),
        Err(ReformerError::DecodeCapacity { needed: 269, .. })
    ));
    for cache in [true, false] {
        let slide = SampleOptions {
            slide: true,
            cache,
            ..opts
        };
        let (out, stats) = reformer::generate_with_stats(&mut model, &prompt, 20, &slide, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(out.len(), 20);
        assert_eq!(stats.restarts, 1, "cache {cache}");
        assert_eq!(stats.prefill_bytes, 250);
        assert_eq!(stats.decode_bytes, 19);
    }
}
