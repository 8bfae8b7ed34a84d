//! Each kind of bad checkpoint gives its own typed error: missing, truncated (anywhere),
//! corrupt (header or data), from another config, or another format version.

use std::path::{Path, PathBuf};

use reformer::checkpoint::{self, CheckpointError};
use reformer::data::TextData;
use reformer::{AdamConfig, CpuBackend, LrSchedule, ModelConfig, ReformerError, Trainer};
use reformer_engine::MemoryPool;

fn saved_checkpoint(name: &str) -> (PathBuf, Vec<u8>) {
    let dir = std::env::temp_dir().join(format!("reformer-ckerr-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("good.safetensors");
    let cfg = ModelConfig::preset("tiny").unwrap();
    let text: Vec<u8> = b"to be or not to be, that is the question. ".repeat(20);
    let data = TextData::from_bytes(Path::new("generated"), text, 0.05, 32).unwrap();
    let pool = MemoryPool::unlimited();
    let mut t = Trainer::new(
        CpuBackend::new(&pool),
        &cfg,
        data,
        32,
        1,
        LrSchedule::default(),
        AdamConfig::default(),
    )
    .unwrap();
    t.step().unwrap();
    t.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    let p = path.with_file_name("bad.safetensors");
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn missing_and_truncated_checkpoints() {
    let (path, bytes) = saved_checkpoint("trunc");
    let err = checkpoint::load(&path.with_file_name("nope.safetensors")).unwrap_err();
    assert!(matches!(err, CheckpointError::Missing { .. }), "{err}");

    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Cut inside the length prefix, inside the header, inside the data, one byte short.
    for cut in [
        0,
        5,
        8 + header_len / 2,
        8 + header_len + 100,
        bytes.len() - 1,
    ] {
        let bad = write(&path, &bytes[..cut]);
        match checkpoint::load(&bad) {
            Err(CheckpointError::Truncated {
                expected, actual, ..
            }) => {
                assert_eq!(actual, cut as u64);
                assert!(expected > actual);
            }
            other => panic!("cut at {cut}: expected Truncated, got {other:?}"),
        }
    }
}

#[test]
fn corrupt_checkpoints() {
    let (path, bytes) = saved_checkpoint("corrupt");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;

    // A flipped bit in the tensor data: the checksum catches it.
    let mut flipped = bytes.clone();
    let i = 8 + header_len + (bytes.len() - 8 - header_len) / 2;
    flipped[i] ^= 0x10;
    let err = checkpoint::load(&write(&path, &flipped)).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::Corrupt { reason, .. } if reason.contains("checksum")),
        "{err}"
    );

    // A garbled header.
    let mut garbled = bytes.clone();
    garbled[8] = b'#';
    let err = checkpoint::load(&write(&path, &garbled)).unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");

    // Trailing garbage.
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"junk");
    let err = checkpoint::load(&write(&path, &longer)).unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");

    // Not a checkpoint at all.
    let err = checkpoint::load(&write(&path, b"hello, world, this is text")).unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
}

#[test]
fn wrong_config_and_wrong_version() {
    let (path, bytes) = saved_checkpoint("config");
    let ck = checkpoint::load(&path).unwrap();
    let mut other = ModelConfig::preset("tiny").unwrap();
    other.d_ff = 128;
    match ck.check_config(&other) {
        Err(CheckpointError::ConfigMismatch {
            field,
            checkpoint,
            current,
        }) => {
            assert_eq!(
                (field.as_str(), checkpoint.as_str(), current.as_str()),
                ("d_ff", "64", "128")
            );
        }
        other => panic!("expected ConfigMismatch, got {other:?}"),
    }
    // Through the crate's error type too.
    let err: ReformerError = ck.check_config(&other).unwrap_err().into();
    assert!(err.to_string().contains("d_ff"), "{err}");

    // Another format version (same length, so only the version differs).
    let needle = b"\"format_version\":\"1\"";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("version in header");
    let mut other_version = bytes.clone();
    other_version[at + needle.len() - 2] = b'9';
    let err = checkpoint::load(&write(&path, &other_version)).unwrap_err();
    assert!(matches!(err, CheckpointError::Version { .. }), "{err}");
}
