//! Fuzzing, proptest-driven so it runs in CI with the other tests: checkpoint loading and the
//! parsing of what a checkpoint or a command line carries (model config text, metadata, byte
//! sizes, numeric flags) never panic, whatever the bytes. Arbitrary bytes, arbitrary headers,
//! and valid checkpoints mutated at random (bit flips, overwritten, inserted and deleted bytes,
//! cuts; metadata values replaced) each give a checkpoint or a typed error; a mutated
//! checkpoint that still loads also restores (or fails with a typed error).
//!
//! Each property prints how many inputs it tried. `PROPTEST_CASES=N` sets the cases of every
//! property (e.g. 100000 for a longer campaign); the defaults keep the file to a few seconds.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use reformer::checkpoint::{self, CheckpointError};
use reformer::cli;
use reformer::data::TextData;
use reformer::{AdamConfig, CpuBackend, LrSchedule, ModelConfig, Trainer};
use reformer_engine::MemoryPool;

fn cases(default: u32) -> Config {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A valid `tiny` checkpoint after two steps (so Adam's moments are non-zero), as bytes.
fn valid_checkpoint() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("reformer-fuzz-ck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("valid.safetensors");
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
        t.step().unwrap();
        t.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // The header is sorted JSON: the same state gives the same bytes.
        t.save(&path).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "saving is deterministic"
        );
        let _ = std::fs::remove_dir_all(&dir);
        bytes
    })
}

/// The valid checkpoint's config, state and tensors.
fn original() -> &'static (ModelConfig, reformer::TrainState, reformer::Snapshot) {
    static ORIGINAL: OnceLock<(ModelConfig, reformer::TrainState, reformer::Snapshot)> =
        OnceLock::new();
    ORIGINAL.get_or_init(|| {
        let ck = checkpoint::from_bytes(Path::new("valid"), valid_checkpoint().to_vec()).unwrap();
        let snap = ck.restore().unwrap();
        (ck.config.clone(), ck.state.clone(), snap)
    })
}

fn header_len(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// Loads `bytes`; where that succeeds, restores the tensors too. Panics only if the library
/// does (which is what the properties look for).
fn load_and_restore(bytes: Vec<u8>) -> Result<(), CheckpointError> {
    let ck = checkpoint::from_bytes(Path::new("fuzzed.safetensors"), bytes)?;
    let snap = ck.restore()?;
    assert_eq!(snap.values.len(), snap.shapes.len());
    for (v, s) in snap.values.iter().zip(&snap.shapes) {
        assert_eq!(v.len(), s.iter().product::<usize>());
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Cut(usize),
    /// Copies a run of bytes from one place over another.
    Splice(usize, usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Positions are drawn as fractions of the header (half the time) or of the whole file.
    let pos = (any::<bool>(), 0.0f64..1.0).prop_map(|(h, f)| encode(h, f));
    prop_oneof![
        (pos.clone(), 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
        (pos.clone(), any::<u8>()).prop_map(|(p, b)| Mutation::SetByte(p, b)),
        (pos.clone(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(p, v)| Mutation::Insert(p, v)),
        (pos.clone(), 1usize..64).prop_map(|(p, n)| Mutation::Delete(p, n)),
        pos.clone().prop_map(Mutation::Cut),
        (pos, any::<usize>(), 1usize..64).prop_map(|(p, f, n)| Mutation::Splice(p, f, n)),
    ]
}

/// A position as (header?, fraction) packed in a usize: the top bit says "in the header".
fn encode(in_header: bool, f: f64) -> usize {
    let frac = (f * (1u64 << 40) as f64) as usize;
    frac | if in_header { 1 << 62 } else { 0 }
}

fn decode(code: usize, len: usize, header_end: usize) -> usize {
    let in_header = code & (1 << 62) != 0;
    let frac = (code & ((1 << 62) - 1)) as f64 / (1u64 << 40) as f64;
    let span = if in_header { header_end.min(len) } else { len };
    ((span as f64 * frac) as usize).min(len.saturating_sub(1))
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let header_end = 8 + bytes.get(..8).map_or(0, |b| {
        u64::from_le_bytes(b.try_into().unwrap()).min(1 << 30) as usize
    });
    let len = bytes.len();
    match m {
        Mutation::FlipBit(p, bit) => bytes[decode(*p, len, header_end)] ^= 1 << bit,
        Mutation::SetByte(p, b) => bytes[decode(*p, len, header_end)] = *b,
        Mutation::Insert(p, ins) => {
            let at = decode(*p, len, header_end);
            bytes.splice(at..at, ins.iter().copied());
        }
        Mutation::Delete(p, n) => {
            let at = decode(*p, len, header_end);
            bytes.drain(at..(at + n).min(len));
        }
        Mutation::Cut(p) => bytes.truncate(decode(*p, len, header_end)),
        Mutation::Splice(p, from, n) => {
            let at = decode(*p, len, header_end);
            let from = from % len;
            let n = (*n).min(len - at).min(len - from);
            let chunk: Vec<u8> = bytes[from..from + n].to_vec();
            bytes[at..at + n].copy_from_slice(&chunk);
        }
    }
}

/// Values to put in metadata and config fields: numbers at and past the edges, signs, hex,
/// floats, empty, text.
fn edge_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("0".to_string()),
        Just("1".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551615".to_string()),
        Just("18446744073709551616".to_string()),
        Just("9223372036854775807".to_string()),
        Just("4294967296".to_string()),
        Just("0x7fc00000".to_string()),
        Just("0xffffffff".to_string()),
        Just("0x7f800000".to_string()),
        Just("none".to_string()),
        Just("nan".to_string()),
        Just("1x0".to_string()),
        Just("0+0".to_string()),
        Just("65536x65536".to_string()),
        Just("4294967296x4294967296".to_string()),
        Just("18446744073709551615+1".to_string()),
        Just("lsh,lsh,lsh".to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        (0u64..100_000).prop_map(|n| n.to_string()),
        (any::<u32>(), any::<u32>()).prop_map(|(a, b)| format!("{a}x{b}")),
        (any::<u32>(), any::<u32>()).prop_map(|(a, b)| format!("{a}+{b}")),
        any::<u32>().prop_map(|b| format!("{b:#010x}")),
        "[ -~]{0,24}",
    ]
}

/// The valid checkpoint with its header rebuilt from `edit` applied to the parsed header.
/// Without the metadata checksum (older checkpoints have none), so the edited values reach
/// the metadata and config parsers.
fn with_header(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
    let bytes = valid_checkpoint();
    let n = header_len(bytes);
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    if let Some(serde_json::Value::Object(meta)) = header.get_mut("__metadata__") {
        meta.remove("checksum.metadata");
    }
    edit(&mut header);
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

fn metadata_keys() -> Vec<String> {
    let bytes = valid_checkpoint();
    let n = header_len(bytes);
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut keys: Vec<String> = header["__metadata__"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

#[test]
fn the_valid_checkpoint_loads_and_unedited_headers_round_trip() {
    // The baselines the properties mutate.
    load_and_restore(valid_checkpoint().to_vec()).unwrap();
    load_and_restore(with_header(|_| {})).unwrap();
}

#[test]
fn a_safetensors_file_that_is_not_ours_is_named_so() {
    let data = [0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &data).unwrap();
    let foreign = safetensors::serialize([("weight", view)], None).unwrap();
    let err = checkpoint::from_bytes(Path::new("foreign.safetensors"), foreign).unwrap_err();
    assert!(
        matches!(err, CheckpointError::NotReformer { .. }),
        "expected NotReformer, got {err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("not a reformer checkpoint") && msg.contains("`weight`"),
        "{msg}"
    );
}

/// Runs `test` on `cases` inputs drawn from `strategy`, prints how many were tried, and fails
/// with the smallest failing input proptest finds.
fn fuzz<S: Strategy>(
    name: &str,
    default_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let tried = AtomicU64::new(0);
    let mut runner = TestRunner::new(cases(default_cases));
    let result = runner.run(&strategy, |v| {
        tried.fetch_add(1, Ordering::Relaxed);
        test(v)
    });
    eprintln!(
        "fuzz_checkpoint: {name}: {} inputs tried",
        tried.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    fuzz(
        "arbitrary bytes",
        10_000,
        proptest::collection::vec(any::<u8>(), 0..4096),
        |bytes| {
            // Random bytes are never a checkpoint.
            prop_assert!(load_and_restore(bytes).is_err());
            Ok(())
        },
    );
}

#[test]
fn arbitrary_headers_never_panic() {
    let header = prop_oneof![
        "[{}\\[\\]\":,0-9a-zA-Z_. +-]{0,300}",
        "\\{\"__metadata__\":\\{(\"[a-z_.]{1,12}\":\"[ -~]{0,12}\",?){0,6}\\}(,\"[a-z.0-9]{1,12}\":\\{\"dtype\":\"(F32|F16|BF16|I64|U8|BOOL|X)\",\"shape\":\\[[0-9]{0,6}(,[0-9]{0,6}){0,3}\\],\"data_offsets\":\\[[0-9]{1,6},[0-9]{1,6}\\]\\}){0,4}\\}",
    ];
    let strategy = (
        header,
        proptest::collection::vec(any::<u8>(), 0..512),
        any::<Option<u64>>(),
    );
    fuzz(
        "arbitrary headers",
        10_000,
        strategy,
        |(header, data, lie)| {
            let mut bytes = lie.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&data);
            let _ = load_and_restore(bytes);
            Ok(())
        },
    );
}

#[test]
fn mutated_checkpoints_never_panic() {
    let strategy = proptest::collection::vec(mutation(), 1..6);
    fuzz("mutated checkpoints", 5_000, strategy, |mutations| {
        let mut bytes = valid_checkpoint().to_vec();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        // Every change is caught (checksums over the data and the metadata, the structure
        // checks) or changes nothing that loads: what loads is the original, exactly.
        if let Ok(ck) = checkpoint::from_bytes(Path::new("fuzzed.safetensors"), bytes) {
            let (config, state, snap) = original();
            prop_assert_eq!(&ck.config, config);
            prop_assert_eq!(&ck.state, state);
            prop_assert_eq!(&ck.restore().unwrap(), snap);
        }
        Ok(())
    });
}

#[test]
fn edited_metadata_never_panics() {
    let keys = metadata_keys();
    let strategy = (proptest::sample::select(keys), edge_value(), any::<bool>());
    fuzz(
        "edited metadata",
        5_000,
        strategy,
        |(key, value, drop_key)| {
            let bytes = with_header(|h| {
                if let Some(serde_json::Value::Object(meta)) = h.get_mut("__metadata__") {
                    if drop_key {
                        meta.remove(&key);
                    } else {
                        meta.insert(key.clone(), value.clone().into());
                    }
                }
            });
            let _ = load_and_restore(bytes);
            Ok(())
        },
    );
}

#[test]
fn config_text_never_panics() {
    let fields: Vec<&'static str> = ModelConfig::preset("tiny")
        .unwrap()
        .to_pairs()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let strategy = (
        "[ -~]{0,200}",
        proptest::sample::select(fields),
        edge_value(),
    );
    fuzz("config texts", 5_000, strategy, |(raw, field, value)| {
        let _ = ModelConfig::from_text(&raw);
        // A valid config with one field replaced, parsed alone and inside a checkpoint.
        let text: Vec<String> = ModelConfig::preset("tiny")
            .unwrap()
            .to_pairs()
            .iter()
            .map(|(k, v)| {
                if *k == field {
                    format!("{k}={value}")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        let text = text.join(";");
        if let Ok(cfg) = ModelConfig::from_text(&text) {
            prop_assert!(cfg.validate().is_ok());
        }
        let bytes = with_header(|h| {
            if let Some(serde_json::Value::Object(meta)) = h.get_mut("__metadata__") {
                meta.insert("config".into(), text.clone().into());
            }
        });
        let _ = load_and_restore(bytes);
        Ok(())
    });
}

#[test]
fn flag_values_never_panic() {
    let strategy = prop_oneof![
        "[ -~]{0,24}",
        "-?[0-9]{0,30}(\\.[0-9]{0,5})?(e-?[0-9]{1,3})? ?(b|k|kib|MiB|g|GiB|TiB|x)?",
    ];
    fuzz("flag values", 10_000, strategy, |s| {
        if let Ok(n) = cli::parse_size(&s) {
            prop_assert!(n >= 1);
        }
        if let Ok(x) = cli::float_parser(cli::Interval::open_closed(0.0, 1.0))(&s) {
            prop_assert!(x > 0.0 && x <= 1.0);
        }
        if let Ok(x) = cli::f32_parser(cli::Interval::closed_open(0.0, 1.0))(&s) {
            prop_assert!((0.0..1.0).contains(&x));
        }
        if let Ok(x) = cli::int_parser(1usize, Some(64))(&s) {
            prop_assert!((1..=64).contains(&x));
        }
        let _ = cli::int_parser(0u64, None)(&s);
        Ok(())
    });
}

#[test]
fn metadata_edits_without_their_checksum_are_caught() {
    // With the metadata checksum kept, any edited value is refused as corrupt.
    let bytes = valid_checkpoint();
    let n = header_len(bytes);
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = header["__metadata__"].as_object_mut().unwrap();
    meta.insert("step".into(), "3".into());
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    let err = checkpoint::from_bytes(Path::new("edited.safetensors"), out).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::Corrupt { reason, .. } if reason.contains("metadata checksum")),
        "{err}"
    );
}
