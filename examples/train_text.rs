//! Trains a byte-level Reformer on a text file (by default the Shakespeare corpus that
//! `scripts/fetch-shakespeare.sh` fetches into `data/shakespeare.txt`).
//!
//! ```text
//! scripts/fetch-shakespeare.sh
//! cargo run --release --example train_text -- --minutes 10
//! cargo run --release --example train_text -- --resume            # continues OUT/checkpoint.safetensors
//! ```
//!
//! Writes `OUT/metrics.csv` (one row per step, validation columns filled at evaluations) and
//! `OUT/checkpoint.safetensors` (atomically, every `--save-every` steps and at the end), and
//! prints a generated sample at the end.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use reformer::backend::{select, Backend, CpuBackend, CudaBackend, DeviceRequest, Runner};
use reformer::checkpoint;
use reformer::checkpoint::Checkpoint;
use reformer::config::Attention;
use reformer::data::{TextData, DEFAULT_VALID_FRACTION};
use reformer::train::bits;
use reformer::{
    generate, param_specs, AdamConfig, LrSchedule, ModelConfig, SampleOptions, Trainer,
};
use reformer_engine::{DType, MemoryPool};

const DEFAULT_TEXT: &str = "data/shakespeare.txt";
const DEFAULT_STEPS: u64 = 2000;
/// Steps timed before a --minutes budget sets the schedule's length.
const SCHEDULE_FIT_STEPS: u64 = 10;
/// Validation tokens per evaluation unless --eval-windows says otherwise.
const EVAL_TOKENS: usize = 16384;

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

fn trainer<B: Backend>(
    b: B,
    start: &Start,
    data: TextData,
    batch: usize,
) -> reformer::Result<Trainer<B>> {
    Ok(match start {
        Start::Fresh {
            cfg,
            seq_len,
            seed,
            schedule,
            adam,
        } => Trainer::new(b, cfg, data, *seq_len, *seed, *schedule, *adam)?,
        Start::Resume(ck) => Trainer::from_checkpoint(b, ck, data)?,
    }
    .with_batch(batch))
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
    #[arg(long, default_value = "cp6")]
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
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Windows of --seq-len tokens per optimizer step, each from its own random offset; their
    /// gradients are averaged (accumulated one window at a time, so memory is that of one
    /// window). The default, 8 windows of 512 tokens with --lr 0.002 and betas 0.9/0.99,
    /// learns far faster per token than one 4096-token window with lr 0.01 and betas
    /// 0.86/0.92 (measured on cp6: training loss 3.03 vs 3.64 bits/byte at 2.7 M tokens).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Total optimizer steps, the schedule's length [default: 2000, or the checkpoint's when
    /// resuming; a different value given with --resume stretches the schedule].
    #[arg(long)]
    steps: Option<u64>,
    /// Stop after this many minutes of training (checkpointing first). On a fresh run without
    /// --steps, the schedule is fitted to the budget: after 10, 20, 40, ... steps the cosine
    /// decay's length is set to the steps the remaining time allows at the pace so far (5%
    /// spare for evaluation), so the run ends at the end of its schedule, not partway down it.
    #[arg(long)]
    minutes: Option<f64>,
    /// Evaluate on the validation split every this many steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Tokens per validation window [default: --seq-len]. Validation bits/byte depend on the
    /// window length (context), so runs compare only on windows of equal length; and a
    /// window longer than the training windows reaches position embeddings that training
    /// never updated (they keep their random initialisation), so do not evaluate beyond
    /// --seq-len.
    #[arg(long)]
    eval_len: Option<usize>,
    /// Validation windows per evaluation [default: 16384 tokens' worth, at least 4].
    #[arg(long)]
    eval_windows: Option<usize>,
    /// Hash rounds for evaluation and the sample (default: the preset's eval rounds).
    #[arg(long)]
    eval_rounds: Option<usize>,
    /// Save a checkpoint every this many steps (default: at each evaluation and at the end).
    #[arg(long)]
    save_every: Option<u64>,
    /// Output folder: metrics.csv, checkpoint.safetensors.
    #[arg(long, default_value = "runs/train_text")]
    out: PathBuf,
    /// Continue from a checkpoint (default: OUT/checkpoint.safetensors). Model, optimizer,
    /// schedule, sequence length and data seed come from the checkpoint; --batch does not
    /// (give the run's own again to continue it exactly).
    #[arg(long, num_args = 0..=1, value_name = "CHECKPOINT")]
    resume: Option<Option<PathBuf>>,
    /// Peak learning rate. (0.01, the earlier default, lets the feed-forward weights grow
    /// until the X2 half of the residual stream is 100× the X1 half, which then barely
    /// reaches the LM head.)
    #[arg(long, default_value_t = 0.002)]
    lr: f32,
    /// Warmup steps.
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Seed of the data windows.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Attention kind that replaces the preset's LSH layers: `exact` trains the same model
    /// with exact shared-QK attention (the quality baseline), `local` with local attention.
    #[arg(long, value_name = "KIND")]
    lsh_as: Option<String>,
    /// Adam's β1 (first-moment decay).
    #[arg(long, default_value_t = 0.9)]
    beta1: f32,
    /// Adam's β2 (second-moment decay).
    #[arg(long, default_value_t = 0.99)]
    beta2: f32,
    /// Dropout rate instead of the preset's (attention output, feed-forward hidden and output).
    #[arg(long)]
    dropout: Option<f32>,
    /// Bytes to generate at the end (0: none).
    #[arg(long, default_value_t = 300)]
    sample_tokens: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn text_path(args: &Args) -> AnyResult<PathBuf> {
    match &args.text {
        Some(p) => Ok(p.clone()),
        None => {
            let p = PathBuf::from(DEFAULT_TEXT);
            if !p.exists() {
                return Err(format!(
                    "{DEFAULT_TEXT} is missing: run `scripts/fetch-shakespeare.sh` to fetch the \
                     Shakespeare corpus, or pass --text FILE"
                )
                .into());
            }
            Ok(p)
        }
    }
}

fn run(args: &Args) -> AnyResult<()> {
    if args.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    let path = text_path(args)?;
    std::fs::create_dir_all(&args.out)?;
    let ckpt_path = args.out.join("checkpoint.safetensors");

    let (start, data) = match &args.resume {
        Some(from) => {
            let from = from.clone().unwrap_or_else(|| ckpt_path.clone());
            let ck = checkpoint::load(&from)?;
            if ck.state.seq_len != args.seq_len {
                eprintln!(
                    "resuming with the checkpoint's sequence length {} (not --seq-len {})",
                    ck.state.seq_len, args.seq_len
                );
            }
            eprintln!("resuming {} at step {}", from.display(), ck.state.step);
            let data = TextData::load(&path, DEFAULT_VALID_FRACTION, ck.state.seq_len)?;
            (Start::Resume(Box::new(ck)), data)
        }
        None => {
            let mut cfg = ModelConfig::preset(&args.preset)?;
            if let Some(d) = args.dropout {
                cfg.dropout = d;
            }
            if let Some(kind) = &args.lsh_as {
                let kind = Attention::parse(kind)
                    .ok_or_else(|| format!("--lsh-as {kind}: expected lsh, local or exact"))?;
                for a in cfg.attention.iter_mut().filter(|a| **a == Attention::Lsh) {
                    *a = kind;
                }
            }
            if args.seq_len > cfg.max_len() {
                return Err(format!(
                    "--seq-len {} exceeds the {} preset's capacity {}",
                    args.seq_len,
                    args.preset,
                    cfg.max_len()
                )
                .into());
            }
            let data = TextData::load(&path, DEFAULT_VALID_FRACTION, args.seq_len)?;
            let schedule = LrSchedule {
                lr: args.lr,
                warmup: args.warmup,
                total_steps: args.steps.unwrap_or(DEFAULT_STEPS),
                final_fraction: 0.1,
            };
            let adam = AdamConfig {
                beta1: args.beta1,
                beta2: args.beta2,
                ..AdamConfig::default()
            };
            let start = Start::Fresh {
                cfg,
                seq_len: args.seq_len,
                seed: args.seed,
                schedule,
                adam,
            };
            (start, data)
        }
    };
    // The batch is not in the checkpoint: a resumed run continues exactly when --batch is the
    // one it was started with.
    let act = act_dtype(args);
    match select(args.device.into())? {
        Runner::Cuda(ordinal) => {
            let b = CudaBackend::new(ordinal, None)?.with_act_dtype(act)?;
            b.set_tf32(args.tf32)?;
            eprintln!(
                "device: {}; dense products in {}; activations in {act:?}",
                b.describe(),
                if args.tf32 { "TF32" } else { "f32" },
            );
            train(trainer(b, &start, data, args.batch)?, args, &path)
        }
        Runner::Cpu => {
            let b = CpuBackend::new(&MemoryPool::unlimited()).with_act_dtype(act)?;
            if act != DType::F32 {
                eprintln!("activations rounded to {act:?} as the GPU stores them");
            }
            train(trainer(b, &start, data, args.batch)?, args, &path)
        }
    }
}

/// The training loop, the same on every backend.
fn train<B: Backend>(mut trainer: Trainer<B>, args: &Args, path: &Path) -> AnyResult<()> {
    let ckpt_path = args.out.join("checkpoint.safetensors");
    if let Some(steps) = args
        .steps
        .filter(|&s| args.resume.is_some() && s != trainer.state.schedule.total_steps)
    {
        eprintln!(
            "schedule length changed from {} to {steps} steps (the learning rate from here on \
             differs from the original run's)",
            trainer.state.schedule.total_steps
        );
        trainer.state.schedule.total_steps = steps;
    }
    let cfg = trainer.lm.config().clone();
    let seq_len = trainer.state.seq_len;
    let eval_len = args.eval_len.unwrap_or(seq_len);
    let eval_windows = args
        .eval_windows
        .unwrap_or((EVAL_TOKENS / eval_len.max(1)).max(4));
    if eval_len == 0 || eval_len > cfg.max_len() {
        return Err(format!("--eval-len {eval_len} must lie in 1..={}", cfg.max_len()).into());
    }
    let mut total = trainer.state.schedule.total_steps;
    eprintln!(
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

    let metrics_path = args.out.join("metrics.csv");
    let fresh = args.resume.is_none() || !metrics_path.exists();
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(!fresh)
        .write(true)
        .truncate(fresh)
        .open(&metrics_path)?;
    if fresh {
        writeln!(
            metrics,
            "step,tokens,elapsed_s,train_loss_nats,train_bpb,lr,grad_norm,tokens_per_s,val_bpb"
        )?;
    }

    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )?
        .progress_chars("=> "),
    );
    pb.set_position(trainer.state.step);

    let start = Instant::now();
    let deadline = args.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    // The schedule follows the time budget on a fresh run that did not fix --steps.
    let fit_schedule = deadline.filter(|_| args.resume.is_none() && args.steps.is_none());
    let first_step = trainer.state.step;
    let mut next_fit = SCHEDULE_FIT_STEPS;
    let save_every = args.save_every.unwrap_or(args.eval_every);
    let mut smooth: Option<f32> = None;
    let mut run_tokens = 0u64;
    let mut stopped_early = false;
    while trainer.state.step < total {
        if deadline.is_some_and(|d| start.elapsed() >= d) {
            stopped_early = true;
            break;
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
            eprintln!("step {}/{total}: {msg}", trainer.state.step);
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
                let line = format!(
                    "--minutes {}: {per_step:.2} s/step over {} steps; the schedule now ends at \
                     step {fitted}",
                    args.minutes.unwrap_or(0.0),
                    step - first_step
                );
                if pb.is_hidden() {
                    eprintln!("{line}");
                } else {
                    pb.println(line);
                }
            }
        }
        let mut val = String::new();
        if args.eval_every > 0 && step.is_multiple_of(args.eval_every) {
            if let Some(v) = trainer.evaluate_len(eval_len, eval_windows, args.eval_rounds)? {
                let line = format!(
                    "step {step}: validation {:.4} bits/byte ({v:.4} nats), train {:.4} bits/byte",
                    bits(v),
                    bits(ema)
                );
                if pb.is_hidden() {
                    eprintln!("{line}");
                } else {
                    pb.println(line);
                }
                val = format!("{:.5}", bits(v));
            }
        }
        writeln!(
            metrics,
            "{step},{},{:.3},{:.5},{:.5},{:.6e},{:.4},{tps:.1},{val}",
            trainer.state.tokens_seen,
            start.elapsed().as_secs_f64(),
            s.loss,
            bits(s.loss),
            s.lr,
            s.grad_norm
        )?;
        if save_every > 0 && step.is_multiple_of(save_every) {
            trainer.save(&ckpt_path)?;
        }
    }
    pb.finish_and_clear();
    trainer.save(&ckpt_path)?;
    if stopped_early {
        eprintln!(
            "time budget reached at step {} of {total}; resume with --resume",
            trainer.state.step
        );
    }
    if let Some(v) = trainer.evaluate_len(eval_len, eval_windows, args.eval_rounds)? {
        eprintln!(
            "final validation: {:.4} bits/byte after {} steps ({} tokens); checkpoint {}",
            bits(v),
            trainer.state.step,
            trainer.state.tokens_seen,
            ckpt_path.display()
        );
    }

    if args.sample_tokens > 0 {
        let prompt = sample_prompt(&trainer.data.valid);
        let opts = SampleOptions {
            rounds: args.eval_rounds,
            ..SampleOptions::default()
        };
        eprintln!(
            "--- sample (temperature {}, top-k {}) ---",
            opts.temperature, opts.top_k
        );
        let mut out = std::io::stdout().lock();
        out.write_all(&prompt)?;
        out.flush()?;
        generate(&mut trainer.lm, &prompt, args.sample_tokens, &opts, |b| {
            let _ = out.write_all(&[b]);
            let _ = out.flush();
        })?;
        writeln!(out)?;
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
