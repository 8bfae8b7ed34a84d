//! Checkpoints: one safetensors file with every parameter and Adam's moments, plus metadata
//! (format version, the model config, the optimizer step, schedule and Adam settings, the data
//! seed and position, a checksum of the tensor bytes and one of the metadata).
//!
//! The container is the `safetensors` crate's: its header types ([`Metadata`],
//! [`TensorInfo`]) are built and validated by the crate and written as sorted JSON, so the same
//! state gives the same bytes; reading goes through [`SafeTensors`]. The bytes are streamed to
//! the file (no second copy of the model in memory).
//!
//! Saving is atomic: the file is written to `PATH.tmp`, synced, then renamed over `PATH` (and
//! the folder synced), so an interrupted save leaves the previous checkpoint intact. Loading
//! tells a truncated file, a corrupt one (bad header, bad checksum, missing or misshapen
//! tensors), a safetensors file that is not a reformer checkpoint and one from another model
//! config apart, each with its own error. Loading never panics, whatever the bytes.
//!
//! Tensor names: `param.NNNN.NAME`, `adam.m.NNNN.NAME`, `adam.v.NNNN.NAME` where `NNNN` is the
//! parameter's index in the model's order and `NAME` its name. Data are f32, little-endian.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use thiserror::Error;

use crate::config::ModelConfig;
use crate::model::param_specs;
use crate::optim::{AdamConfig, LrSchedule};

/// Version of the layout and metadata written here.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_NAME: &str = "reformer-checkpoint";
/// Headers longer than this are not ours (safetensors' own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;
/// The metadata key of the metadata checksum (absent from checkpoints written before it).
const META_CHECKSUM: &str = "checksum.metadata";

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("checkpoint {path} does not exist")]
    Missing { path: PathBuf },
    #[error("I/O error on checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path} is truncated: {actual} bytes, expected {expected}")]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} is a valid safetensors file but not a reformer checkpoint: {reason}")]
    NotReformer { path: PathBuf, reason: String },
    #[error("checkpoint {path} has format version {found}; this build reads version {supported}")]
    Version {
        path: PathBuf,
        found: String,
        supported: u32,
    },
    #[error(
        "checkpoint is from another model config: `{field}` is {checkpoint} in the checkpoint \
         but {current} here"
    )]
    ConfigMismatch {
        field: String,
        checkpoint: String,
        current: String,
    },
}

type CkResult<T> = std::result::Result<T, CheckpointError>;

/// Training state saved beside the tensors, enough to continue a run exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainState {
    /// Optimizer updates made (= the next step's index).
    pub step: u64,
    pub tokens_seen: u64,
    pub seq_len: usize,
    pub data_seed: u64,
    pub schedule: LrSchedule,
    pub adam: AdamConfig,
}

/// A model's parameters and optimizer state on the host, in the model's parameter order
/// ([`param_specs`]): what a checkpoint holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub config: ModelConfig,
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub values: Vec<Vec<f32>>,
    /// Adam's moments; `None` before the first update (saved as zeros).
    pub moments: Option<Moments>,
}

/// Adam's first and second moments per parameter, and the updates made.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub step: u64,
}

fn f32_bits(x: f32) -> String {
    format!("{:#010x}", x.to_bits())
}

fn parse_f32_bits(s: &str) -> Option<f32> {
    u32::from_str_radix(s.trim_start_matches("0x"), 16)
        .ok()
        .map(f32::from_bits)
}

impl TrainState {
    fn to_metadata(&self, out: &mut HashMap<String, String>) {
        let mut put = |k: &str, v: String| {
            out.insert(k.to_string(), v);
        };
        put("step", self.step.to_string());
        put("tokens_seen", self.tokens_seen.to_string());
        put("seq_len", self.seq_len.to_string());
        put("data_seed", self.data_seed.to_string());
        put("data_position", format!("step {}", self.step));
        put("schedule.lr", f32_bits(self.schedule.lr));
        put("schedule.warmup", self.schedule.warmup.to_string());
        put(
            "schedule.total_steps",
            self.schedule.total_steps.to_string(),
        );
        put(
            "schedule.final_fraction",
            f32_bits(self.schedule.final_fraction),
        );
        put("adam.beta1", f32_bits(self.adam.beta1));
        put("adam.beta2", f32_bits(self.adam.beta2));
        put("adam.eps", f32_bits(self.adam.eps));
        put(
            "adam.clip_norm",
            self.adam.clip_norm.map_or("none".into(), f32_bits),
        );
    }

    fn from_metadata(meta: &HashMap<String, String>, path: &Path) -> CkResult<TrainState> {
        let corrupt = |k: &str| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("metadata `{k}` is missing or malformed"),
        };
        let get = |k: &str| meta.get(k).map(String::as_str).ok_or_else(|| corrupt(k));
        let int = |k: &str| get(k)?.parse::<u64>().map_err(|_| corrupt(k));
        let float = |k: &str| parse_f32_bits(get(k)?).ok_or_else(|| corrupt(k));
        let clip = match get("adam.clip_norm")? {
            "none" => None,
            s => Some(parse_f32_bits(s).ok_or_else(|| corrupt("adam.clip_norm"))?),
        };
        Ok(TrainState {
            step: int("step")?,
            tokens_seen: int("tokens_seen")?,
            seq_len: usize::try_from(int("seq_len")?).map_err(|_| corrupt("seq_len"))?,
            data_seed: int("data_seed")?,
            schedule: LrSchedule {
                lr: float("schedule.lr")?,
                warmup: int("schedule.warmup")?,
                total_steps: int("schedule.total_steps")?,
                final_fraction: float("schedule.final_fraction")?,
            },
            adam: AdamConfig {
                beta1: float("adam.beta1")?,
                beta2: float("adam.beta2")?,
                eps: float("adam.eps")?,
                clip_norm: clip,
            },
        })
    }

    /// Checks the values a trainer relies on: `Err(reason)` for the first one out of range.
    fn check(&self, cfg: &ModelConfig) -> Result<(), String> {
        let max_len = cfg.max_len();
        if self.seq_len == 0 || self.seq_len > max_len {
            return Err(format!(
                "metadata `seq_len` {} is outside 1..={max_len}, the model's capacity",
                self.seq_len
            ));
        }
        let finite = [
            ("schedule.lr", self.schedule.lr),
            ("schedule.final_fraction", self.schedule.final_fraction),
            ("adam.beta1", self.adam.beta1),
            ("adam.beta2", self.adam.beta2),
            ("adam.eps", self.adam.eps),
            ("adam.clip_norm", self.adam.clip_norm.unwrap_or(1.0)),
        ];
        if let Some((k, v)) = finite.iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("metadata `{k}` is {v}"));
        }
        Ok(())
    }
}

/// A 64-bit checksum (FNV-1a over 8-byte words, then the tail bytes).
#[derive(Debug, Clone, Copy)]
struct Checksum(u64);

impl Checksum {
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    fn new() -> Self {
        Checksum(0xCBF2_9CE4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            self.0 = (self.0 ^ u64::from_le_bytes(a)).wrapping_mul(Self::PRIME);
        }
        for &b in words.remainder() {
            self.0 = (self.0 ^ b as u64).wrapping_mul(Self::PRIME);
        }
    }
    fn hex(self) -> String {
        format!("{:016x}", self.0)
    }
}

/// The checksum of every metadata entry but its own, in key order (`key NUL value NUL`).
fn metadata_checksum(meta: &HashMap<String, String>) -> Checksum {
    let mut items: Vec<(&String, &String)> =
        meta.iter().filter(|(k, _)| *k != META_CHECKSUM).collect();
    items.sort();
    let mut sum = Checksum::new();
    for (k, v) in items {
        sum.update(k.as_bytes());
        sum.update(&[0]);
        sum.update(v.as_bytes());
        sum.update(&[0]);
    }
    sum
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The temporary path a save writes before its rename.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// `value` with its object keys sorted at every level, so the header's bytes do not depend on
/// a hash map's order.
fn sorted_json(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut items: Vec<(String, serde_json::Value)> = map.into_iter().collect();
            items.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(
                items
                    .into_iter()
                    .map(|(k, v)| (k, sorted_json(v)))
                    .collect(),
            )
        }
        other => other,
    }
}

/// Writes `snap` and `state` to `path` atomically.
pub fn save(path: &Path, snap: &Snapshot, state: &TrainState) -> CkResult<()> {
    let n = snap.values.len();
    let bad = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if snap.names.len() != n || snap.shapes.len() != n {
        return Err(bad(format!(
            "{} names and {} shapes for {n} parameters",
            snap.names.len(),
            snap.shapes.len()
        )));
    }
    let zeros: Vec<Vec<f32>>;
    let (m, v) = match &snap.moments {
        Some(mo) => (&mo.m, &mo.v),
        None => {
            zeros = snap.values.iter().map(|x| vec![0.0; x.len()]).collect();
            (&zeros, &zeros)
        }
    };
    if m.len() != n || v.len() != n {
        return Err(bad(format!(
            "optimizer state has {} moments for {n} parameters",
            m.len()
        )));
    }
    let mut tensors: Vec<(String, &[usize], &[f32])> = Vec::with_capacity(3 * n);
    for (i, name) in snap.names.iter().enumerate() {
        let shape = &snap.shapes[i][..];
        let numel: usize = shape.iter().product();
        for (what, data) in [
            ("param", &snap.values[i]),
            ("adam.m", &m[i]),
            ("adam.v", &v[i]),
        ] {
            if data.len() != numel {
                return Err(bad(format!(
                    "{what} `{name}` holds {} values for shape {shape:?}",
                    data.len()
                )));
            }
            tensors.push((format!("{what}.{i:04}.{name}"), shape, data));
        }
    }
    // The data in name order, as the header lists it (and as the checksum reads it).
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    if tensors.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(bad("two tensors share a name".into()));
    }
    let mut sum = Checksum::new();
    for (_, _, t) in &tensors {
        sum.update(bytemuck::cast_slice(t));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT_NAME.to_string());
    meta.insert("format_version".to_string(), FORMAT_VERSION.to_string());
    meta.insert("config".to_string(), snap.config.to_text());
    meta.insert("checksum".to_string(), sum.hex());
    meta.insert("n_params".to_string(), n.to_string());
    state.to_metadata(&mut meta);
    let meta_sum = metadata_checksum(&meta).hex();
    meta.insert(META_CHECKSUM.to_string(), meta_sum);

    // The header: the crate's own types (it checks the offsets), written as sorted JSON.
    let mut offset = 0usize;
    let infos: Vec<(String, TensorInfo)> = tensors
        .iter()
        .map(|(name, shape, t)| {
            let bytes = std::mem::size_of_val(*t);
            let info = TensorInfo {
                dtype: Dtype::F32,
                shape: shape.to_vec(),
                data_offsets: (offset, offset + bytes),
            };
            offset += bytes;
            (name.clone(), info)
        })
        .collect();
    let header = Metadata::new(Some(meta), infos).map_err(|e| bad(e.to_string()))?;
    let header = serde_json::to_value(&header).map_err(|e| bad(e.to_string()))?;
    let mut header = sorted_json(header).to_string().into_bytes();
    // Data aligned to 8 bytes, padded with spaces as the crate pads.
    header.resize(header.len().next_multiple_of(8), b' ');
    if header.len() as u64 > MAX_HEADER {
        return Err(bad(format!("header of {} bytes is too long", header.len())));
    }

    let tmp = temp_path(path);
    {
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io_err(&tmp))?;
        w.write_all(&header).map_err(io_err(&tmp))?;
        for (_, _, t) in &tensors {
            w.write_all(bytemuck::cast_slice(t)).map_err(io_err(&tmp))?;
        }
        w.flush().map_err(io_err(&tmp))?;
        drop(w);
        file.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        // Makes the rename durable; not every platform can open a folder, so best effort.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A checkpoint read and verified (structure, checksums, version, config, state); tensors are
/// copied out by [`Checkpoint::restore`].
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub state: TrainState,
    bytes: Vec<u8>,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads and verifies the checkpoint at `path`.
pub fn load(path: &Path) -> CkResult<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CheckpointError::Missing {
            path: path.to_path_buf(),
        },
        _ => CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    from_bytes(path, bytes)
}

/// Verifies `bytes` as a checkpoint read from `path` (used in errors); what [`load`] does
/// after reading the file. Any bytes give a checkpoint or a typed error, never a panic.
pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> CkResult<Checkpoint> {
    let actual = bytes.len() as u64;
    let truncated = |expected: u64| CheckpointError::Truncated {
        path: path.to_path_buf(),
        expected,
        actual,
    };
    let Some(prefix) = bytes.first_chunk::<8>() else {
        return Err(truncated(8));
    };
    let n = u64::from_le_bytes(*prefix);
    if n > MAX_HEADER {
        return Err(corrupt(path, format!("header length {n} is implausible")));
    }
    let Some(header) = bytes.get(8..8 + n as usize) else {
        return Err(truncated(8 + n));
    };
    let header = std::str::from_utf8(header).map_err(|_| corrupt(path, "header is not UTF-8"))?;
    // The crate's header type checks every tensor's dtype, shape and offsets; the end of the
    // last tensor tells a truncated file from one with bytes to spare.
    let header: Metadata = serde_json::from_str(header)
        .map_err(|e| corrupt(path, format!("header is not a safetensors header: {e}")))?;
    let expected = (header.data_len() as u64)
        .checked_add(8 + n)
        .ok_or_else(|| corrupt(path, "tensor offsets overflow"))?;
    if actual < expected {
        return Err(truncated(expected));
    }
    if actual > expected {
        return Err(corrupt(
            path,
            format!("{} bytes after the last tensor", actual - expected),
        ));
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
    let not_ours = |what: &str| {
        let mut names = st.names();
        names.sort_unstable();
        let example = names
            .first()
            .map_or(String::new(), |n| format!(", e.g. `{}`", n));
        CheckpointError::NotReformer {
            path: path.to_path_buf(),
            reason: format!(
                "{what} (it holds {} tensors{example}); reformer checkpoints are written by \
                 train_text",
                names.len()
            ),
        }
    };
    let Some(meta) = header.metadata().clone() else {
        return Err(not_ours("it has no metadata"));
    };
    if meta.get("format").map(String::as_str) != Some(FORMAT_NAME) {
        return Err(not_ours(&format!(
            "its metadata has no `format` = `{FORMAT_NAME}`"
        )));
    }
    let version = meta.get("format_version").cloned().unwrap_or_default();
    if version != FORMAT_VERSION.to_string() {
        return Err(CheckpointError::Version {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    // Checksum over the tensors in name order, as written.
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    let mut sum = Checksum::new();
    for name in &names {
        let view = st.tensor(name).map_err(|e| corrupt(path, e.to_string()))?;
        sum.update(view.data());
    }
    let want = meta.get("checksum").cloned().unwrap_or_default();
    if want != sum.hex() {
        return Err(corrupt(
            path,
            format!("checksum mismatch (stored {want}, computed {})", sum.hex()),
        ));
    }
    // Checkpoints written before the metadata checksum existed have none.
    if let Some(want) = meta.get(META_CHECKSUM) {
        let got = metadata_checksum(&meta).hex();
        if *want != got {
            return Err(corrupt(
                path,
                format!("metadata checksum mismatch (stored {want}, computed {got})"),
            ));
        }
    }
    let config_text = meta
        .get("config")
        .ok_or_else(|| corrupt(path, "metadata lacks the model config"))?;
    let config = ModelConfig::from_text(config_text)
        .map_err(|e| corrupt(path, format!("model config: {e}")))?;
    check_tensors(&config, &st).map_err(|reason| corrupt(path, reason))?;
    let state = TrainState::from_metadata(&meta, path)?;
    state
        .check(&config)
        .map_err(|reason| corrupt(path, reason))?;
    drop(st);
    Ok(Checkpoint {
        path: path.to_path_buf(),
        config,
        state,
        bytes,
    })
}

/// Checks that the file holds exactly the tensors the config's model has (names, F32,
/// shapes; the config's sizes computed without overflow), so that a checkpoint that loads
/// restores, and a config read from a file never makes the model allocate what the file does
/// not hold.
fn check_tensors(cfg: &ModelConfig, st: &SafeTensors) -> Result<(), String> {
    let overflow = || format!("the model config's sizes overflow: {}", cfg.to_text());
    // The products `param_specs` forms itself.
    cfg.n_heads.checked_mul(cfg.d_head).ok_or_else(overflow)?;
    cfg.d_model.checked_mul(2).ok_or_else(overflow)?;
    let specs = param_specs(cfg);
    let expected = 3 * specs.len();
    if st.len() != expected {
        return Err(format!(
            "{} tensors stored, the model config's model has {expected} (parameters and \
             Adam's two moments)",
            st.len()
        ));
    }
    for (i, (name, shape)) in specs.iter().enumerate() {
        shape
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .ok_or_else(overflow)?;
        for what in ["param", "adam.m", "adam.v"] {
            let full = format!("{what}.{i:04}.{name}");
            let view = st
                .tensor(&full)
                .map_err(|_| format!("tensor `{full}` is missing"))?;
            if view.dtype() != Dtype::F32 || view.shape() != &shape[..] {
                return Err(format!(
                    "tensor `{full}` is {:?} {:?}, expected F32 {shape:?}",
                    view.dtype(),
                    view.shape(),
                ));
            }
        }
    }
    Ok(())
}

impl Checkpoint {
    /// `ConfigMismatch` naming the first differing field, if `cfg` is not this checkpoint's.
    pub fn check_config(&self, cfg: &ModelConfig) -> CkResult<()> {
        match self.config.first_difference(cfg) {
            None => Ok(()),
            Some((field, checkpoint, current)) => Err(CheckpointError::ConfigMismatch {
                field: field.to_string(),
                checkpoint,
                current,
            }),
        }
    }

    /// The parameters and (after the first update) Adam's moments stored here, in the
    /// order and shapes of the checkpoint's config.
    pub fn restore(&self) -> CkResult<Snapshot> {
        let path = &self.path;
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| corrupt(path, e.to_string()))?;
        let read = |name: &str, shape: &[usize]| -> CkResult<Vec<f32>> {
            let view = st
                .tensor(name)
                .map_err(|_| corrupt(path, format!("tensor `{name}` is missing")))?;
            if view.dtype() != Dtype::F32 || view.shape() != shape {
                return Err(corrupt(
                    path,
                    format!(
                        "tensor `{name}` is {:?} {:?}, expected F32 {shape:?}",
                        view.dtype(),
                        view.shape(),
                    ),
                ));
            }
            Ok(view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let specs = param_specs(&self.config);
        let expected = specs.len();
        let stored = st
            .names()
            .iter()
            .filter(|n| n.starts_with("param."))
            .count();
        if stored != expected {
            return Err(corrupt(
                path,
                format!("{stored} parameters stored, the model has {expected}"),
            ));
        }
        let (mut values, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (name, shape)) in specs.iter().enumerate() {
            values.push(read(&format!("param.{i:04}.{name}"), shape)?);
            m.push(read(&format!("adam.m.{i:04}.{name}"), shape)?);
            v.push(read(&format!("adam.v.{i:04}.{name}"), shape)?);
        }
        let (names, shapes) = specs.into_iter().unzip();
        Ok(Snapshot {
            config: self.config.clone(),
            names,
            shapes,
            values,
            moments: (self.state.step > 0).then_some(Moments {
                m,
                v,
                step: self.state.step,
            }),
        })
    }
}
