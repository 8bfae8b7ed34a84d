//! Checkpoints: a round trip restores every parameter and moment exactly; resuming gives
//! bit-identical losses on the CPU; a save interrupted before its rename (a leftover `.tmp`)
//! leaves the previous checkpoint intact and loadable.

use std::path::{Path, PathBuf};

use reformer::checkpoint::{self, temp_path};
use reformer::data::TextData;
use reformer::{AdamConfig, CpuBackend, LrSchedule, ModelConfig, Trainer};
use reformer_engine::{MemoryPool, Rng};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("reformer-ck-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text() -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"the ", b"king ", b"and ", b"queen ", b"of ", b"love ", b"said ", b".\n",
    ];
    let mut rng = Rng::new(9);
    (0..600)
        .flat_map(|_| words[rng.below(words.len())].to_vec())
        .collect()
}

fn cfg() -> ModelConfig {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.dropout = 0.1; // dropout masks must replay identically after a resume too
    cfg
}

fn trainer(pool: &MemoryPool) -> Trainer<CpuBackend> {
    let data = TextData::from_bytes(Path::new("generated"), text(), 0.05, 32).unwrap();
    let schedule = LrSchedule {
        lr: 0.01,
        warmup: 3,
        total_steps: 20,
        final_fraction: 0.1,
    };
    Trainer::new(
        CpuBackend::new(pool),
        &cfg(),
        data,
        32,
        17,
        schedule,
        AdamConfig::default(),
    )
    .unwrap()
}

/// Every parameter and moment, bit for bit.
fn snapshot(t: &Trainer<CpuBackend>) -> Vec<Vec<u32>> {
    let snap = t.lm.snapshot().unwrap();
    let moments = snap.moments.expect("moments after a step");
    let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect();
    snap.values
        .iter()
        .chain(&moments.m)
        .chain(&moments.v)
        .map(bits)
        .collect()
}

#[test]
fn round_trip_restores_everything_exactly() {
    let dir = temp_dir("roundtrip");
    let path = dir.join("model.safetensors");
    let pool = MemoryPool::unlimited();
    let mut a = trainer(&pool);
    for _ in 0..2 {
        a.step().unwrap();
    }
    a.save(&path).unwrap();
    assert!(!temp_path(&path).exists(), "the .tmp file is renamed away");

    let ck = checkpoint::load(&path).unwrap();
    assert_eq!(ck.config, cfg());
    assert_eq!(ck.state, a.state);
    let data = a.data.clone();
    let b = Trainer::from_checkpoint(CpuBackend::new(&pool), &ck, data).unwrap();
    assert_eq!(b.lm.snapshot().unwrap().moments.unwrap().step, 2);
    assert_eq!(snapshot(&a), snapshot(&b));
}

#[test]
fn resume_gives_bit_identical_losses() {
    let dir = temp_dir("resume");
    let path = dir.join("step3.safetensors");
    let pool = MemoryPool::unlimited();

    let mut a = trainer(&pool);
    for _ in 0..3 {
        a.step().unwrap();
    }
    a.save(&path).unwrap();
    let straight: Vec<u32> = (0..4).map(|_| a.step().unwrap().loss.to_bits()).collect();
    let eval_a = a.evaluate(2, None).unwrap().unwrap();

    let ck = checkpoint::load(&path).unwrap();
    let mut b = Trainer::from_checkpoint(CpuBackend::new(&pool), &ck, a.data.clone()).unwrap();
    assert_eq!(b.state.step, 3);
    let resumed: Vec<u32> = (0..4).map(|_| b.step().unwrap().loss.to_bits()).collect();
    assert_eq!(straight, resumed, "losses after resume differ");
    assert_eq!(snapshot(&a), snapshot(&b), "parameters after resume differ");
    assert_eq!(
        eval_a.to_bits(),
        b.evaluate(2, None).unwrap().unwrap().to_bits()
    );
}

#[test]
fn leftover_tmp_from_an_interrupted_save_leaves_the_previous_checkpoint_intact() {
    let dir = temp_dir("interrupted");
    let path = dir.join("latest.safetensors");
    let pool = MemoryPool::unlimited();
    let mut a = trainer(&pool);
    a.step().unwrap();
    a.save(&path).unwrap();
    let saved = snapshot(&a);

    // A later save died after writing half its temporary file, before the rename.
    a.step().unwrap();
    let full = std::fs::read(&path).unwrap();
    std::fs::write(temp_path(&path), &full[..full.len() / 2]).unwrap();

    let ck = checkpoint::load(&path).unwrap();
    assert_eq!(ck.state.step, 1);
    let b = Trainer::from_checkpoint(CpuBackend::new(&pool), &ck, a.data.clone()).unwrap();
    assert_eq!(snapshot(&b), saved);

    // The next save replaces the stale temporary file and lands.
    a.save(&path).unwrap();
    assert!(!temp_path(&path).exists());
    assert_eq!(checkpoint::load(&path).unwrap().state.step, 2);
}
