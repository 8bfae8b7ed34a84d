//! Checkpoints written before the one model (by the CPU reference model's trainer, format
//! version 1) load into the one model and continue: `tests/fixtures/` holds a `tiny`
//! checkpoint after 4 steps on the first 40 kB of the Shakespeare corpus (2 windows of 64
//! tokens per step, data seed 0), written by that trainer, and the figures it printed then:
//! validation 8.6011 bits/byte on 8 windows of 64, and training losses 6.05095 and 6.09734
//! nats at steps 5 and 6 after a resume (`--resume --steps 6`). The one model reproduces them
//! within f32 rounding of a different summation order.

use std::path::Path;

use reformer::data::{TextData, DEFAULT_VALID_FRACTION};
use reformer::train::bits;
use reformer::{checkpoint, CpuBackend, Trainer};
use reformer_engine::MemoryPool;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

#[test]
fn a_checkpoint_of_the_reference_trainer_loads_and_continues() {
    let dir = Path::new(FIXTURES);
    let ck = checkpoint::load(&dir.join("tiny-step4-before-one-model.safetensors")).unwrap();
    assert_eq!(ck.state.step, 4);
    assert_eq!(ck.state.seq_len, 64);
    let data = TextData::load(
        &dir.join("shakespeare-40k.txt"),
        DEFAULT_VALID_FRACTION,
        ck.state.seq_len,
    )
    .unwrap();
    let pool = MemoryPool::unlimited();
    // One window per forward pass: each window has its own step context, as the reference
    // trainer ran them (in one pass of two, the windows would share one).
    let mut t = Trainer::from_checkpoint(CpuBackend::new(&pool), &ck, data)
        .unwrap()
        .with_batch(2)
        .with_micro_batch(1)
        .unwrap();
    let val = bits(t.evaluate(8, None).unwrap().unwrap());
    assert!(
        (val - 8.6011).abs() <= 1e-4,
        "validation {val:.5} bits/byte; the reference trainer printed 8.6011"
    );
    t.state.schedule.total_steps = 6;
    for (step, want) in [(4, 6.05095f32), (5, 6.09734)] {
        let s = t.step().unwrap();
        assert_eq!(s.step, step);
        assert!(
            (s.loss - want).abs() <= 2e-5 * want,
            "step {step}: loss {} nats; the reference trainer's was {want}",
            s.loss
        );
    }
}
