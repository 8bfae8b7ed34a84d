//! Checkpoints: one safetensors file with every parameter and Adam's moments, plus metadata
//! (format version, the model config, the optimizer step, schedule and Adam settings, the data
//! seed and position, a checksum of the tensor bytes).
//!
//! Saving is atomic: the file is written to `PATH.tmp`, synced, then renamed over `PATH` (and
//! the folder synced), so an interrupted save leaves the previous checkpoint intact. Loading
//! tells a truncated file, a corrupt one (bad header, bad checksum, missing or misshapen
//! tensors) and one from another model config apart, each with its own error.
//!
//! Tensor names: `param.NNNN.NAME`, `adam.m.NNNN.NAME`, `adam.v.NNNN.NAME` where `NNNN` is the
//! parameter's index in the model's order and `NAME` its name. Data are f32, little-endian.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use thiserror::Error;

use crate::config::ModelConfig;
use crate::model::param_specs;
use crate::optim::{AdamConfig, LrSchedule};

/// Version of the layout and metadata written here.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_NAME: &str = "reformer-checkpoint";
/// Headers longer than this are not ours (safetensors' own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

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
            seq_len: int("seq_len")? as usize,
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
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
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
    meta.insert("checksum".to_string(), format!("{:016x}", sum.0));
    meta.insert("n_params".to_string(), n.to_string());
    state.to_metadata(&mut meta);
    let mut meta_items: Vec<_> = meta.into_iter().collect();
    meta_items.sort();

    // The header, by hand: {"__metadata__": {...}, "NAME": {"dtype", "shape", "data_offsets"}}.
    let mut header = String::from("{\"__metadata__\":{");
    let items: Vec<String> = meta_items
        .iter()
        .map(|(k, v)| format!("{}:{}", json_string(k), json_string(v)))
        .collect();
    header.push_str(&items.join(","));
    header.push('}');
    let mut offset = 0usize;
    for (name, shape, t) in &tensors {
        let bytes = std::mem::size_of_val(*t);
        let shape: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            ",{}:{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            json_string(name),
            shape.join(","),
            offset,
            offset + bytes
        ));
        offset += bytes;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }

    let tmp = temp_path(path);
    {
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io_err(&tmp))?;
        w.write_all(header.as_bytes()).map_err(io_err(&tmp))?;
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

/// A checkpoint read and verified (structure, checksum, version); tensors are copied out by
/// [`Checkpoint::restore`].
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
    let bytes = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            CheckpointError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let actual = bytes.len() as u64;
    let truncated = |expected: u64| CheckpointError::Truncated {
        path: path.to_path_buf(),
        expected,
        actual,
    };
    if actual < 8 {
        return Err(truncated(8));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER {
        return Err(corrupt(path, format!("header length {n} is implausible")));
    }
    if actual < 8 + n {
        return Err(truncated(8 + n));
    }
    let header = std::str::from_utf8(&bytes[8..8 + n as usize])
        .map_err(|_| corrupt(path, "header is not UTF-8"))?;
    let json: serde_json::Value = serde_json::from_str(header)
        .map_err(|e| corrupt(path, format!("header is not valid JSON: {e}")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| corrupt(path, "header is not a JSON object"))?;
    let data_len = obj
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let expected = 8 + n + data_len;
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
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
    let meta = meta
        .metadata()
        .clone()
        .ok_or_else(|| corrupt(path, "no metadata"))?;
    if meta.get("format").map(String::as_str) != Some(FORMAT_NAME) {
        return Err(corrupt(path, "not a reformer checkpoint (no `format` tag)"));
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
    if want != format!("{:016x}", sum.0) {
        return Err(corrupt(
            path,
            format!("checksum mismatch (stored {want}, computed {:016x})", sum.0),
        ));
    }
    let config_text = meta
        .get("config")
        .ok_or_else(|| corrupt(path, "metadata lacks the model config"))?;
    let config = ModelConfig::from_text(config_text)
        .map_err(|e| corrupt(path, format!("model config: {e}")))?;
    let state = TrainState::from_metadata(&meta, path)?;
    drop(st);
    Ok(Checkpoint {
        path: path.to_path_buf(),
        config,
        state,
        bytes,
    })
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
            if view.dtype() != safetensors::Dtype::F32 || view.shape() != shape {
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
