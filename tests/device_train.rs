//! The device trainer (on the kernels' CPU twins) against the CPU trainer: the same losses,
//! gradient norms and validation losses step by step, and checkpoints that move a run between
//! them in both directions. Tolerances: losses and norms within 1e-4 relative (f32, different
//! summation orders, compounded over steps).

use reformer::checkpoint;
use reformer::data::TextData;
use reformer::device::{DeviceTrainer, HostBackend};
use reformer::{AdamConfig, LrSchedule, ModelConfig, Trainer};
use reformer_engine::{MemoryPool, Rng};

const SEQ: usize = 48;

fn data() -> TextData {
    let words: [&[u8]; 8] = [
        b"the ", b"king ", b"and ", b"queen ", b"of ", b"love ", b"said ", b".\n",
    ];
    let mut rng = Rng::new(5);
    let text: Vec<u8> = (0..4000)
        .flat_map(|_| words[rng.below(words.len())].to_vec())
        .collect();
    TextData::from_bytes(std::path::Path::new("generated"), text, 0.1, SEQ).unwrap()
}

fn cfg() -> ModelConfig {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.dropout = 0.1;
    cfg
}

fn schedule() -> LrSchedule {
    LrSchedule {
        lr: 0.01,
        warmup: 2,
        total_steps: 20,
        final_fraction: 0.1,
    }
}

fn close(a: f32, b: f32, what: &str) {
    assert!(
        (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
        "{what}: device {a} vs cpu {b}"
    );
}

#[test]
fn device_and_cpu_trainers_agree_and_share_checkpoints() {
    let pool = MemoryPool::unlimited();
    let mut cpu = Trainer::new(
        &cfg(),
        &pool,
        data(),
        SEQ,
        9,
        schedule(),
        AdamConfig::default(),
    )
    .unwrap();
    let mut dev = DeviceTrainer::new(
        HostBackend::new(&MemoryPool::unlimited()),
        &cfg(),
        data(),
        SEQ,
        9,
        schedule(),
        AdamConfig::default(),
    )
    .unwrap();
    for _ in 0..4 {
        let (c, d) = (cpu.step().unwrap(), dev.step().unwrap());
        assert_eq!(c.step, d.step);
        close(d.loss, c.loss, &format!("loss at step {}", c.step));
        close(
            d.grad_norm,
            c.grad_norm,
            &format!("gradient norm at step {}", c.step),
        );
    }
    let (c, d) = (
        cpu.evaluate(4, None).unwrap().unwrap(),
        dev.evaluate(4, None).unwrap().unwrap(),
    );
    close(d, c, "validation loss");

    // Device → checkpoint → CPU, and CPU → checkpoint → device: both continue alike.
    let dir = std::env::temp_dir().join(format!("reformer-device-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (from_dev, from_cpu) = (dir.join("dev.safetensors"), dir.join("cpu.safetensors"));
    dev.save(&from_dev).unwrap();
    cpu.save(&from_cpu).unwrap();
    let mut cpu2 =
        Trainer::from_checkpoint(&checkpoint::load(&from_dev).unwrap(), &pool, data()).unwrap();
    let mut dev2 = DeviceTrainer::from_checkpoint(
        HostBackend::new(&MemoryPool::unlimited()),
        &checkpoint::load(&from_cpu).unwrap(),
        data(),
    )
    .unwrap();
    for _ in 0..2 {
        let want = cpu.step().unwrap();
        for (who, got) in [
            ("cpu from device", cpu2.step().unwrap()),
            ("device from cpu", dev2.step().unwrap()),
        ] {
            assert_eq!(got.step, want.step, "{who}");
            close(
                got.loss,
                want.loss,
                &format!("{who}: loss at step {}", want.step),
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn batches_of_windows_agree_with_the_cpu_trainer() {
    let pool = MemoryPool::unlimited();
    let mut cpu = Trainer::new(
        &cfg(),
        &pool,
        data(),
        SEQ,
        4,
        schedule(),
        AdamConfig::default(),
    )
    .unwrap()
    .with_batch(3);
    let mut dev = DeviceTrainer::new(
        HostBackend::new(&MemoryPool::unlimited()),
        &cfg(),
        data(),
        SEQ,
        4,
        schedule(),
        AdamConfig::default(),
    )
    .unwrap()
    .with_batch(3);
    for _ in 0..3 {
        let (c, d) = (cpu.step().unwrap(), dev.step().unwrap());
        assert_eq!((c.step, c.tokens), (d.step, d.tokens));
        close(d.loss, c.loss, &format!("loss at step {}", c.step));
        close(
            d.grad_norm,
            c.grad_norm,
            &format!("gradient norm at step {}", c.step),
        );
    }
}
