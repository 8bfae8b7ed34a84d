//! The byte-level data pipeline: any file as bytes, a train/validation split (the last part is
//! held out), a seeded random training window per step, fixed validation windows.
//!
//! A step's window depends only on `(seed, step)`, so resuming at step `k` sees the same data as
//! an uninterrupted run, with no sampler state to save beyond the seed.

use std::path::{Path, PathBuf};

use reformer_engine::Rng;
use thiserror::Error;

/// Errors of the data pipeline; each names the file and the lengths involved.
#[derive(Debug, Error)]
pub enum DataError {
    #[error("text file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("text file {path} is empty")]
    Empty { path: PathBuf },
    #[error(
        "text file {path} is too short: {part} has {len} bytes, but {need} are needed \
         (a sequence of {seq_len} tokens + 1 target)"
    )]
    TooShort {
        path: PathBuf,
        part: &'static str,
        len: usize,
        need: usize,
        seq_len: usize,
    },
    #[error("invalid data settings: {0}")]
    Invalid(String),
}

/// Default fraction of the file (its end) held out for validation.
pub const DEFAULT_VALID_FRACTION: f64 = 0.05;

/// A text split into a training part and a held-out validation part (the file's end).
#[derive(Debug, Clone)]
pub struct TextData {
    pub path: PathBuf,
    pub train: Vec<u8>,
    pub valid: Vec<u8>,
}

impl TextData {
    /// Reads `path` and splits it; the training part must hold a sequence of `seq_len` + 1.
    pub fn load(path: &Path, valid_fraction: f64, seq_len: usize) -> Result<TextData, DataError> {
        Self::from_bytes(path, read_bytes(path)?, valid_fraction, seq_len)
    }

    /// Splits `bytes` (read from `label`, used in errors).
    pub fn from_bytes(
        label: &Path,
        bytes: Vec<u8>,
        valid_fraction: f64,
        seq_len: usize,
    ) -> Result<TextData, DataError> {
        let path = label.to_path_buf();
        if !(0.0..1.0).contains(&valid_fraction) {
            return Err(DataError::Invalid(format!(
                "validation fraction {valid_fraction} must lie in [0, 1)"
            )));
        }
        if seq_len == 0 {
            return Err(DataError::Invalid(
                "sequence length must be positive".into(),
            ));
        }
        if bytes.is_empty() {
            return Err(DataError::Empty { path });
        }
        let need = seq_len + 1;
        let n_valid = (bytes.len() as f64 * valid_fraction).round() as usize;
        let n_train = bytes.len() - n_valid;
        if n_train < need {
            return Err(DataError::TooShort {
                path,
                part: if n_valid == 0 {
                    "the whole file"
                } else {
                    "its training part"
                },
                len: n_train,
                need,
                seq_len,
            });
        }
        if valid_fraction > 0.0 && n_valid < 2 {
            return Err(DataError::TooShort {
                path,
                part: "its validation part",
                len: n_valid,
                need: 2,
                seq_len: 1,
            });
        }
        let mut train = bytes;
        let valid = train.split_off(n_train);
        Ok(TextData { path, train, valid })
    }

    /// The training window of `seq_len + 1` bytes for `step`: a uniformly random offset drawn
    /// from `(seed, step)` alone.
    pub fn train_window(&self, seed: u64, step: u64, seq_len: usize) -> Result<&[u8], DataError> {
        let need = seq_len + 1;
        if self.train.len() < need || seq_len == 0 {
            return Err(DataError::TooShort {
                path: self.path.clone(),
                part: "its training part",
                len: self.train.len(),
                need,
                seq_len,
            });
        }
        let offset = Rng::new(seed).fork(step).below(self.train.len() - need + 1);
        Ok(&self.train[offset..offset + need])
    }

    /// Up to `max_windows` validation windows of `min(seq_len, valid.len() − 1) + 1` bytes,
    /// evenly spaced over the validation part (the same windows every time).
    pub fn valid_windows(&self, seq_len: usize, max_windows: usize) -> Vec<&[u8]> {
        let len = seq_len.min(self.valid.len().saturating_sub(1));
        crate::evaluate::windows(&self.valid, len, max_windows)
    }
}

/// The bytes of the file at `path` ([`DataError::Missing`] when there is none).
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}
