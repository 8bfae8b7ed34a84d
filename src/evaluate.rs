//! Held-out evaluation: the mean loss (nats, and bits per byte) of a model on any bytes, on
//! evenly spaced windows of a stated length, with the hash rounds as an option. The trainer's
//! validation ([`crate::Trainer::evaluate_len`]) and the `evaluate` tool are this one code.
//!
//! A window of `len` tokens is `len + 1` bytes (inputs and next-byte targets); each window
//! starts at position 0 of the model, so figures compare only at equal lengths.

use std::path::Path;

use crate::backend::Backend;
use crate::data::{read_bytes, DataError};
use crate::error::{ReformerError, Result};
use crate::model::ReformerLm;
use crate::StepContext;

/// Validation tokens per evaluation unless a window count is given.
pub const DEFAULT_EVAL_TOKENS: usize = 16384;

/// How to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalOptions {
    /// Tokens per window.
    pub len: usize,
    /// Windows (`None`: [`default_windows`]); at most those that fit.
    pub windows: Option<usize>,
    /// Hash rounds of the LSH layers (`None`: the config's eval rounds).
    pub rounds: Option<usize>,
    /// Windows per forward pass (at least 1).
    pub batch: usize,
}

impl EvalOptions {
    /// Windows of `len` tokens, the default count and rounds, one window per pass.
    pub fn new(len: usize) -> Self {
        Self {
            len,
            windows: None,
            rounds: None,
            batch: 1,
        }
    }
}

/// The result of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean loss per predicted byte, nats.
    pub loss: f64,
    pub windows: usize,
    /// Tokens per window.
    pub len: usize,
    /// Predicted bytes in all.
    pub tokens: usize,
    /// Hash rounds of the LSH layers.
    pub rounds: usize,
}

impl Evaluation {
    pub fn bits_per_byte(&self) -> f64 {
        self.loss / std::f64::consts::LN_2
    }
}

/// Up to `max_windows` windows of `len + 1` bytes evenly spaced over `bytes` (the first at
/// the start, the last at the end; the same windows every time); none if `bytes` cannot hold
/// one.
pub fn windows(bytes: &[u8], len: usize, max_windows: usize) -> Vec<&[u8]> {
    let size = len.saturating_add(1);
    if len == 0 || max_windows == 0 || bytes.len() < size {
        return Vec::new();
    }
    let room = bytes.len() - size;
    let n = max_windows.min((bytes.len() / size).max(1));
    (0..n)
        .map(|i| {
            let offset = if n > 1 { room * i / (n - 1) } else { 0 };
            &bytes[offset..offset + size]
        })
        .collect()
}

/// Windows of `len` tokens that fit `available` bytes without overlapping (at least 1).
pub fn fitting_windows(available: usize, len: usize) -> usize {
    (available / len.saturating_add(1)).max(1)
}

/// The default window count: [`DEFAULT_EVAL_TOKENS`]' worth, at least 4, at most those that
/// fit `available` bytes.
pub fn default_windows(available: usize, len: usize) -> usize {
    (DEFAULT_EVAL_TOKENS / len.max(1))
        .max(4)
        .min(fitting_windows(available, len))
}

/// Checks that `bytes` (read from `label`) hold a window of `len` tokens.
pub fn check_len(label: &Path, bytes: &[u8], len: usize) -> std::result::Result<(), DataError> {
    if len == 0 {
        return Err(DataError::Invalid(
            "evaluation windows need at least 1 token".into(),
        ));
    }
    if bytes.is_empty() {
        return Err(DataError::Empty {
            path: label.to_path_buf(),
        });
    }
    if bytes.len() <= len {
        return Err(DataError::TooShort {
            path: label.to_path_buf(),
            part: "the whole file",
            len: bytes.len(),
            need: len + 1,
            seq_len: len,
        });
    }
    Ok(())
}

/// `lm`'s mean loss on `bytes` (read from `label`, named in errors) over `opts`' windows. The
/// model's rounds are restored afterwards. Errors: [`DataError::Empty`] and
/// [`DataError::TooShort`] when `bytes` hold no window, and the model's own (e.g. a length
/// past its axial table).
pub fn evaluate<B: Backend>(
    lm: &mut ReformerLm<B>,
    label: &Path,
    bytes: &[u8],
    opts: &EvalOptions,
) -> Result<Evaluation> {
    check_len(label, bytes, opts.len)?;
    let count = opts
        .windows
        .unwrap_or_else(|| default_windows(bytes.len(), opts.len));
    if count == 0 {
        return Err(ReformerError::InvalidArgument(
            "an evaluation needs at least one window".into(),
        ));
    }
    let ws = windows(bytes, opts.len, count);
    evaluate_windows(lm, &ws, opts.batch, opts.rounds)
}

/// [`evaluate`] on the bytes of the file at `path` ([`DataError::Missing`] and
/// [`DataError::Io`] when it cannot be read).
pub fn evaluate_file<B: Backend>(
    lm: &mut ReformerLm<B>,
    path: &Path,
    opts: &EvalOptions,
) -> Result<Evaluation> {
    let bytes = read_bytes(path)?;
    evaluate(lm, path, &bytes, opts)
}

/// `lm`'s mean loss over `windows` (each `len + 1` bytes; all of one length), `batch` windows
/// per forward pass, every pass with the evaluation context 0, with `rounds` hash rounds
/// (`None`: the config's eval rounds; the model's own are restored afterwards).
pub fn evaluate_windows<B: Backend>(
    lm: &mut ReformerLm<B>,
    windows: &[&[u8]],
    batch: usize,
    rounds: Option<usize>,
) -> Result<Evaluation> {
    let first = windows.first().ok_or_else(|| {
        ReformerError::InvalidArgument("an evaluation needs at least one window".into())
    })?;
    let before = lm.rounds();
    let rounds = rounds.unwrap_or(lm.config().eval_rounds);
    lm.set_rounds(rounds)?;
    let result = mean_loss(lm, windows, batch);
    lm.set_rounds(before)?;
    let (sum, tokens) = result?;
    Ok(Evaluation {
        loss: sum / tokens.max(1) as f64,
        windows: windows.len(),
        len: first.len().saturating_sub(1),
        tokens,
        rounds,
    })
}

/// The summed loss and the predicted bytes over `windows`, `batch` at a time.
fn mean_loss<B: Backend>(
    lm: &mut ReformerLm<B>,
    windows: &[&[u8]],
    batch: usize,
) -> Result<(f64, usize)> {
    let (mut sum, mut tokens) = (0.0f64, 0usize);
    for ws in windows.chunks(batch.max(1)) {
        let loss = lm.eval_batch_loss(ws, None, &StepContext::eval(0))?;
        sum += loss.sums.iter().sum::<f64>();
        tokens += loss.counts.iter().sum::<usize>();
    }
    Ok((sum, tokens))
}
