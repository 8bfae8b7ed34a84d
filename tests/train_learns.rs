//! A few dozen training steps of the `tiny` model lower the validation loss, for real.
//!
//! Uses the Shakespeare corpus at `../shared/data/shakespeare.txt` (relative to the repository
//! root) when it is present; otherwise generated text, and says so loudly.

use std::path::Path;

use reformer::data::TextData;
use reformer::train::bits;
use reformer::{AdamConfig, CpuBackend, LrSchedule, ModelConfig, Trainer};
use reformer_engine::{MemoryPool, Rng};

const SEQ: usize = 64;
const STEPS: u64 = 40;

fn corpus() -> (String, Vec<u8>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/shakespeare.txt");
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() > 400_000 => {
            // The first 400 kB: plenty for 40 steps, and fast to split.
            (path.display().to_string(), bytes[..400_000].to_vec())
        }
        _ => {
            eprintln!(
                "\n!!! {} is not present: training on GENERATED text instead of the \
                 Shakespeare corpus !!!\n",
                path.display()
            );
            let words: [&[u8]; 12] = [
                b"the ", b"king ", b"and ", b"queen ", b"of ", b"love ", b"said ", b"my ",
                b"lord ", b"to ", b"thee ", b".\n",
            ];
            let mut rng = Rng::new(3);
            let text = (0..60_000)
                .flat_map(|_| words[rng.below(words.len())].to_vec())
                .collect();
            ("generated text".to_string(), text)
        }
    }
}

#[test]
fn a_few_dozen_steps_lower_the_validation_loss() {
    let (label, text) = corpus();
    let data = TextData::from_bytes(Path::new(&label), text, 0.05, SEQ).unwrap();
    let cfg = ModelConfig::preset("tiny").unwrap();
    let pool = MemoryPool::unlimited();
    let schedule = LrSchedule {
        lr: 0.01,
        warmup: 5,
        total_steps: STEPS,
        final_fraction: 0.1,
    };
    let mut t = Trainer::new(
        CpuBackend::new(&pool),
        &cfg,
        data,
        SEQ,
        0,
        schedule,
        AdamConfig::default(),
    )
    .unwrap();
    let before = t.evaluate(16, None).unwrap().unwrap();
    let mut last = 0.0;
    for _ in 0..STEPS {
        last = t.step().unwrap().loss;
    }
    let after = t.evaluate(16, None).unwrap().unwrap();
    eprintln!(
        "{label}: validation {before:.3} -> {after:.3} nats/byte ({:.2} -> {:.2} bits/byte), \
         last training loss {last:.3}",
        bits(before),
        bits(after)
    );
    assert!(
        after < before - 1.0,
        "validation loss fell only from {before} to {after}"
    );
    assert!(
        after < 3.5,
        "validation loss {after} nats/byte after {STEPS} steps"
    );
}
