//! What the command-line tools (`examples/`) share, so that they lose nothing and never panic:
//!
//! * flag checks: value parsers for clap ([`float_parser`], [`f32_parser`], [`int_parser`],
//!   [`size_parser`]) and checks made after parsing ([`check_int`], [`CliError::flag`]), whose
//!   errors name the flag, the value and the valid range;
//! * output that a closed pipe does not turn into a panic ([`outln`], [`errln`]);
//! * run folders that are not overwritten unasked ([`prepare_out_dir`], [`run_files`]);
//! * `metrics.csv` that stays one row per step across resumes ([`Metrics`]);
//! * sampling that stops when its reader goes away or the user interrupts ([`sample_to`]).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

use crate::backend::Backend;
use crate::generate::{GenerateStats, SampleOptions};
use crate::model::ReformerLm;

/// The checkpoint file of a run folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The metrics file of a run folder.
pub const METRICS_FILE: &str = "metrics.csv";
/// The columns of `metrics.csv`.
pub const METRICS_HEADER: &str =
    "step,tokens,elapsed_s,train_loss_nats,train_bpb,lr,grad_norm,tokens_per_s,val_bpb";

/// Errors of the tools around a run: bad flags, paths, run folders, metrics files.
#[derive(Debug, Error)]
pub enum CliError {
    /// A flag's value is outside its range (or does not fit the other flags).
    #[error("invalid value `{value}` for {flag}: {expected}")]
    Flag {
        flag: String,
        value: String,
        expected: String,
    },
    /// A path given by a flag cannot be used.
    #[error("{flag} {}: {reason}", path.display())]
    Path {
        flag: String,
        path: PathBuf,
        reason: String,
    },
    /// A fresh run would overwrite a run folder's files.
    #[error(
        "--out {} already holds a run ({files}); nothing was changed. Continue it with \
         --resume, replace it with --force, or give another --out",
        dir.display()
    )]
    RunExists { dir: PathBuf, files: String },
    /// Resuming one checkpoint into a folder that holds another run.
    #[error(
        "--out {} already holds another run ({files}); resuming {} there would overwrite it. \
         Give another --out, or --force to replace it",
        dir.display(),
        from.display()
    )]
    OtherRun {
        dir: PathBuf,
        from: PathBuf,
        files: String,
    },
    /// A metrics file that cannot be continued.
    #[error("metrics file {}: {reason}", path.display())]
    Metrics { path: PathBuf, reason: String },
    /// The run stopped at a signal after checkpointing.
    #[error(
        "interrupted by {signal} after step {step}: checkpoint saved to {}; continue with \
         --resume",
        checkpoint.display()
    )]
    Interrupted {
        signal: &'static str,
        step: u64,
        checkpoint: PathBuf,
    },
}

impl CliError {
    /// The process exit code for this error: 2 for a bad flag (as clap's own usage errors),
    /// 128 + the signal's number for an interrupt (130 for SIGINT, 143 for SIGTERM), else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Flag { .. } => 2,
            CliError::Interrupted { signal, .. } => match *signal {
                "SIGTERM" => 143,
                _ => 130,
            },
            _ => 1,
        }
    }

    /// A [`CliError::Flag`].
    pub fn flag(flag: &str, value: impl fmt::Display, expected: impl Into<String>) -> Self {
        CliError::Flag {
            flag: flag.to_string(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }

    /// A [`CliError::Path`].
    pub fn path(flag: &str, path: &Path, reason: impl fmt::Display) -> Self {
        CliError::Path {
            flag: flag.to_string(),
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

/// The exit code for any error a tool returns: [`CliError::exit_code`] for its own errors
/// (also inside a `ReformerError`), 1 otherwise.
pub fn exit_code(e: &(dyn std::error::Error + 'static)) -> u8 {
    e.downcast_ref::<CliError>().map_or(1, CliError::exit_code)
}

/// Where `train_text` writes its checkpoint by default: the tools that read one default to it.
pub const DEFAULT_CHECKPOINT: &str = "runs/train_text/checkpoint.safetensors";

/// Loads a checkpoint for a tool; a missing default one says how to make it.
pub fn load_checkpoint(path: &Path) -> Result<crate::Checkpoint, Box<dyn std::error::Error>> {
    crate::checkpoint::load(path).map_err(|e| match e {
        crate::CheckpointError::Missing { .. } if path == Path::new(DEFAULT_CHECKPOINT) => format!(
            "{e} (the default --checkpoint): train one with `cargo run --release --example \
             train_text`, or pass --checkpoint FILE"
        )
        .into(),
        e => e.into(),
    })
}

// ---------------------------------------------------------------------------------------------
// Ranges and value parsers

/// An interval of reals, either end open or closed, possibly unbounded above.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub lo: f64,
    pub lo_open: bool,
    pub hi: f64,
    pub hi_open: bool,
}

impl Interval {
    /// `[lo, hi]`.
    pub const fn closed(lo: f64, hi: f64) -> Self {
        Interval {
            lo,
            lo_open: false,
            hi,
            hi_open: false,
        }
    }
    /// `(lo, hi]`.
    pub const fn open_closed(lo: f64, hi: f64) -> Self {
        Interval {
            lo,
            lo_open: true,
            hi,
            hi_open: false,
        }
    }
    /// `[lo, hi)`.
    pub const fn closed_open(lo: f64, hi: f64) -> Self {
        Interval {
            lo,
            lo_open: false,
            hi,
            hi_open: true,
        }
    }
    /// `(lo, hi)`.
    pub const fn open(lo: f64, hi: f64) -> Self {
        Interval {
            lo,
            lo_open: true,
            hi,
            hi_open: true,
        }
    }

    /// Whether `x` lies in the interval (never for NaN or an infinity).
    pub fn contains(&self, x: f64) -> bool {
        x.is_finite()
            && if self.lo_open {
                x > self.lo
            } else {
                x >= self.lo
            }
            && if self.hi_open {
                x < self.hi
            } else {
                x <= self.hi
            }
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (l, r) = (
            if self.lo_open { '(' } else { '[' },
            if self.hi_open { ')' } else { ']' },
        );
        write!(f, "{l}{}, {}{r}", self.lo, self.hi)
    }
}

/// What a float flag expects, for its errors.
fn float_expectation(range: &Interval) -> String {
    format!("expected a finite number in {range}")
}

/// A clap value parser for an `f64` in `range`: NaN, infinities and values outside the range
/// are refused, and the message names the range.
pub fn float_parser(
    range: Interval,
) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let expected = float_expectation(&range);
        let x: f64 = s.trim().parse().map_err(|_| expected.clone())?;
        if range.contains(x) {
            Ok(x)
        } else {
            Err(expected)
        }
    }
}

/// [`float_parser`] for an `f32` (the range is checked on the `f32` value).
pub fn f32_parser(
    range: Interval,
) -> impl Fn(&str) -> Result<f32, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let expected = float_expectation(&range);
        let x: f32 = s.trim().parse().map_err(|_| expected.clone())?;
        if range.contains(x as f64) {
            Ok(x)
        } else {
            Err(expected)
        }
    }
}

/// What an integer flag expects, for its errors.
fn int_expectation<T: fmt::Display>(lo: T, hi: Option<T>) -> String {
    match hi {
        Some(hi) => format!("expected a whole number in {lo}..={hi}"),
        None => format!("expected a whole number ≥ {lo}"),
    }
}

/// A clap value parser for an integer in `lo..=hi` (`hi`: `None` for no upper bound).
pub fn int_parser<T>(
    lo: T,
    hi: Option<T>,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + fmt::Display + Copy + Send + Sync + 'static,
{
    move |s: &str| {
        let expected = int_expectation(lo, hi);
        let x: T = s.trim().parse().map_err(|_| expected.clone())?;
        if x < lo || hi.is_some_and(|hi| x > hi) {
            return Err(expected);
        }
        Ok(x)
    }
}

/// Checks an integer flag's value after parsing: `lo..=hi`.
pub fn check_int<T>(flag: &str, value: T, lo: T, hi: T) -> Result<T, CliError>
where
    T: PartialOrd + fmt::Display + Copy,
{
    if value < lo || value > hi {
        return Err(CliError::flag(flag, value, int_expectation(lo, Some(hi))));
    }
    Ok(value)
}

/// Parses a byte size: `16GiB`, `1.5 GiB`, `512MiB`, `4096KiB`, `1000000` (bytes); units
/// KiB, MiB, GiB, TiB (or K, M, G, T, B), case-insensitive. At least one byte.
pub fn parse_size(s: &str) -> Result<usize, String> {
    const EXPECTED: &str =
        "expected a positive size: bytes, or a number with KiB, MiB, GiB or TiB (e.g. 16GiB)";
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("{EXPECTED}; a size cannot be negative"));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| EXPECTED.to_string())?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        u => return Err(format!("{EXPECTED}; unknown unit `{u}`")),
    };
    let bytes = value * scale as f64;
    // Below 2^53 bytes (8 PiB), so the conversion is exact enough and never saturates.
    if !(bytes.is_finite() && (1.0..9.0e15).contains(&bytes)) {
        return Err(format!("{EXPECTED}, from 1 byte to 8 PiB"));
    }
    Ok(bytes as usize)
}

/// [`parse_size`] as a clap value parser.
pub fn size_parser() -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    parse_size
}

// ---------------------------------------------------------------------------------------------
// Output that survives a closed pipe

/// Writes one line to standard output; a closed or failing stdout is ignored. Returns whether
/// the line was written.
pub fn outln(args: fmt::Arguments) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{args}").and_then(|_| out.flush()).is_ok()
}

/// Writes one line to standard error; a closed or failing stderr is ignored.
pub fn errln(args: fmt::Arguments) {
    let _ = writeln!(std::io::stderr().lock(), "{args}");
}

// ---------------------------------------------------------------------------------------------
// Paths and run folders

/// Checks that `path` (given as `flag`) is a readable regular file.
pub fn check_input_file(flag: &str, path: &Path) -> Result<(), CliError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(CliError::path(flag, path, "no such file"))
        }
        Err(e) => Err(CliError::path(flag, path, e)),
        Ok(m) if m.is_dir() => Err(CliError::path(flag, path, "is a folder, not a file")),
        Ok(_) => File::open(path)
            .map(drop)
            .map_err(|e| CliError::path(flag, path, format!("cannot be read: {e}"))),
    }
}

/// Checks that a file can be written at `path` (given as `flag`) by creating it (empty) now,
/// before any work.
pub fn check_output_file(flag: &str, path: &Path) -> Result<(), CliError> {
    if path.is_dir() {
        return Err(CliError::path(flag, path, "is a folder, not a file"));
    }
    File::create(path)
        .map(drop)
        .map_err(|e| CliError::path(flag, path, format!("cannot be written: {e}")))
}

/// Creates the folder `dir` (given as `flag`) if needed and checks that files can be written
/// in it.
pub fn prepare_out_dir(flag: &str, dir: &Path) -> Result<(), CliError> {
    if dir.exists() && !dir.is_dir() {
        return Err(CliError::path(flag, dir, "exists and is not a folder"));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::path(flag, dir, format!("cannot create the folder: {e}")))?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    File::create(&probe)
        .map_err(|e| CliError::path(flag, dir, format!("cannot write in the folder: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The run files (checkpoint, metrics) that `dir` already holds.
pub fn run_files(dir: &Path) -> Vec<&'static str> {
    [CHECKPOINT_FILE, METRICS_FILE]
        .into_iter()
        .filter(|f| dir.join(f).exists())
        .collect()
}

/// Whether `a` and `b` name the same file (both must exist to be the same).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// metrics.csv

/// One row of `metrics.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRow {
    /// Steps made (the row is written after the step).
    pub step: u64,
    pub tokens: u64,
    pub elapsed_s: f64,
    pub loss_nats: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens_per_s: f64,
    /// Validation bits per byte, where the step was evaluated.
    pub val_bpb: Option<f32>,
}

impl MetricsRow {
    fn line(&self) -> String {
        format!(
            "{},{},{:.3},{:.5},{:.5},{:.6e},{:.4},{:.1},{}",
            self.step,
            self.tokens,
            self.elapsed_s,
            self.loss_nats,
            crate::train::bits(self.loss_nats),
            self.lr,
            self.grad_norm,
            self.tokens_per_s,
            self.val_bpb.map_or(String::new(), |v| format!("{v:.5}"))
        )
    }
}

/// `metrics.csv` of a run: one row per step, appended as the run goes.
#[derive(Debug)]
pub struct Metrics {
    path: PathBuf,
    file: File,
}

/// What [`Metrics::resume`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsResume {
    /// Rows kept (steps up to the checkpoint's).
    pub kept: usize,
    /// Rows dropped: written after the checkpoint, so their steps are trained again.
    pub dropped: usize,
    /// The last kept row's `elapsed_s` (the resumed run's times continue from it).
    pub elapsed_s: f64,
}

impl Metrics {
    /// A new metrics file at `path` (header only), replacing any.
    pub fn create(path: &Path) -> Result<Metrics, CliError> {
        let err = |e: std::io::Error| CliError::Metrics {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut file = File::create(path).map_err(err)?;
        writeln!(file, "{METRICS_HEADER}").map_err(err)?;
        Ok(Metrics {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Continues the metrics file at `path` for a run resumed at `step`: rows past `step`
    /// (written after the checkpoint, before the run stopped) are dropped, so every step keeps
    /// one row. A missing file is created.
    pub fn resume(path: &Path, step: u64) -> Result<(Metrics, MetricsResume), CliError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let m = Metrics::create(path)?;
                let r = MetricsResume {
                    kept: 0,
                    dropped: 0,
                    elapsed_s: 0.0,
                };
                return Ok((m, r));
            }
            Err(e) => {
                return Err(CliError::Metrics {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
            }
        };
        let bad = |reason: String| CliError::Metrics {
            path: path.to_path_buf(),
            reason,
        };
        let mut lines = text.split_inclusive('\n');
        match lines.next() {
            Some(h) if h.trim_end() == METRICS_HEADER => {}
            _ => {
                return Err(bad(format!(
                    "its first line is not the header `{METRICS_HEADER}`; move the file away \
                     to continue the run"
                )))
            }
        }
        let (mut kept, mut dropped, mut elapsed_s) = (Vec::new(), 0usize, 0.0f64);
        for (i, line) in lines.enumerate() {
            // A last line without its newline was cut by a crash: it is dropped.
            if !line.ends_with('\n') {
                dropped += 1;
                continue;
            }
            let mut fields = line.trim_end().split(',');
            let row_step = fields.next().and_then(|s| s.parse::<u64>().ok());
            let Some(row_step) = row_step else {
                return Err(bad(format!(
                    "line {} is not a metrics row: `{}`",
                    i + 2,
                    line.trim_end()
                )));
            };
            if row_step > step {
                dropped += 1;
                continue;
            }
            elapsed_s = fields.nth(1).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            kept.push(line);
        }
        if dropped > 0 {
            // Rewritten atomically: an interruption leaves the old file.
            let tmp = crate::checkpoint::temp_path(path);
            let mut body = String::with_capacity(text.len());
            body.push_str(METRICS_HEADER);
            body.push('\n');
            kept.iter().for_each(|l| body.push_str(l));
            std::fs::write(&tmp, body)
                .and_then(|_| std::fs::rename(&tmp, path))
                .map_err(|e| bad(e.to_string()))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| bad(e.to_string()))?;
        let r = MetricsResume {
            kept: kept.len(),
            dropped,
            elapsed_s,
        };
        Ok((
            Metrics {
                path: path.to_path_buf(),
                file,
            },
            r,
        ))
    }

    /// Appends one row.
    pub fn write(&mut self, row: &MetricsRow) -> Result<(), CliError> {
        writeln!(self.file, "{}", row.line()).map_err(|e| CliError::Metrics {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling to a writer

/// How [`sample_to`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleEnd {
    /// Every byte asked for was written.
    Done,
    /// Writing failed (e.g. the reader of a pipe closed it) after this many bytes.
    WriterGone(usize),
    /// `stop` asked to end after this many bytes.
    Stopped(usize),
}

/// Samples `n_tokens` bytes after `prompt` as [`crate::generate()`] does (the same bytes for
/// the same options), writing and flushing each to `out` as it is chosen, and stops at once
/// when a write fails or `stop()` says so. The prompt itself is not written. The model's
/// rounds are restored afterwards.
pub fn sample_to<B: Backend>(
    model: &mut ReformerLm<B>,
    prompt: &[u8],
    n_tokens: usize,
    opts: &SampleOptions,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> crate::Result<(SampleEnd, GenerateStats)> {
    if stop() {
        return Ok((SampleEnd::Stopped(0), GenerateStats::default()));
    }
    let mut end = SampleEnd::Done;
    let mut written = 0;
    let (_, stats) = crate::generate_with_stats(model, prompt, n_tokens, opts, |b| {
        if out.write_all(&[b]).and_then(|_| out.flush()).is_err() {
            end = SampleEnd::WriterGone(written);
            return ControlFlow::Break(());
        }
        written += 1;
        if written < n_tokens && stop() {
            end = SampleEnd::Stopped(written);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    Ok((end, stats))
}
