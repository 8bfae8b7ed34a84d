//! The long-context memory demonstration: plans, then runs, training steps and forward-only
//! passes of a preset over one long sequence (2^19 tokens by default) under a memory budget,
//! and reports time, tokens/s, the pool's peak against the plan, and the process's peak RSS.
//!
//! ```text
//! cargo run --release --example long_context -- --plan                     # deep20, 2^19: the plan only
//! cargo run --release --example long_context -- --preset cp6 --len 16384 --steps 2
//! cargo run --release --example long_context -- --len 65536 --layers 6 --json out.json
//! ```
//!
//! Tokens are random bytes unless `--text FILE` is given (memory and time do not depend on
//! the text). The pool refuses any allocation past `--mem-budget`: a step that would pass it
//! stops with the typed out-of-memory error, reported on one line.
//!
//! Every flag and path is checked before any work (a bad value exits 2 naming the flag, the
//! value and the range; `--json` and `--text` are opened first), and a closed stdout only
//! silences the report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use reformer::backend::{
    human_bytes, select, Backend, CpuBackend, CudaBackend, DeviceRequest, MemoryPlan, PlanTarget,
    Runner,
};
use reformer::cli::{self, CliError};
use reformer::config::Attention;
use reformer::data::TextData;
use reformer::{AdamConfig, LrSchedule, ModelConfig, ReformerError, ReformerLm, StepContext};
use reformer_engine::{DType, EngineError, MemoryPool, Rng};

/// A report line on stdout; a closed stdout is ignored.
macro_rules! outln {
    ($($t:tt)*) => {
        cli::outln(format_args!($($t)*))
    };
}

/// A status line on stderr; a closed stderr is ignored.
macro_rules! say {
    ($($t:tt)*) => {
        cli::errln(format_args!($($t)*))
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// The CPU backend.
    Cpu,
    /// The CUDA backend (hand-written kernels and cuBLAS) on GPU 0; an error without one.
    Cuda,
    /// `cuda` where a GPU answers, else `cpu` (one line says why).
    Auto,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DTypeArg {
    F32,
    Bf16,
}

#[derive(Parser, Debug)]
#[command(about = "Plan, train and run a Reformer over one long sequence under a memory budget")]
struct Args {
    /// Model preset: tiny, cp6, deep20, wide20.
    #[arg(long, default_value = "deep20")]
    preset: String,
    /// Tokens per sequence (at most the preset's axial capacity, 2^19 for the big presets).
    #[arg(long, default_value_t = 524_288, allow_negative_numbers = true,
          value_parser = cli::int_parser(1usize, None))]
    len: usize,
    /// Memory budget of the pool: bytes, or with a unit KiB, MiB, GiB, TiB (e.g. 16GiB,
    /// 1.5GiB).
    #[arg(long, default_value = "16GiB", allow_hyphen_values = true,
          value_parser = cli::size_parser())]
    mem_budget: usize,
    /// Where to run: cpu, cuda (GPU 0; an error where none answers; with --plan, the GPU's
    /// plan without a GPU), or auto (cuda where a GPU answers, else the CPU).
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// On the GPU, run the dense products in TF32 on tensor cores (f32 accumulation; about
    /// 1e-3 relative difference) instead of full f32.
    #[arg(long)]
    tf32: bool,
    /// Print the plan and exit.
    #[arg(long)]
    plan: bool,
    /// Activation storage: the head-layout activations (q, k, v, attention output and its
    /// gradient) in bf16, read as f32 by the kernels; the reversible streams, parameters and
    /// gradients stay f32. On the CPU the values are rounded as the GPU rounds them, held in f32.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// Training steps (forward, backward, Adam) to run.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true,
          value_parser = cli::int_parser(0usize, None))]
    steps: usize,
    /// Forward-only passes (with the loss, evaluation rounds) to run after training.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true,
          value_parser = cli::int_parser(0usize, None))]
    infer: usize,
    /// Override the number of layers, 1..=1024 (the preset's attention pattern repeats).
    #[arg(long, allow_negative_numbers = true, value_parser = cli::int_parser(1usize, Some(1024)))]
    layers: Option<usize>,
    /// Override the LSH hash rounds, 1..=64 (training and evaluation).
    #[arg(long, allow_negative_numbers = true, value_parser = cli::int_parser(1usize, Some(64)))]
    rounds: Option<usize>,
    /// Read tokens from this file instead of random bytes.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Write a one-line JSON summary here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seed of the random tokens and the data window.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = cli::int_parser(0u64, None))]
    seed: u64,
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let args = Args::parse();
    // The paths first: a --json that cannot be written fails now, not after the run.
    let checked = args
        .json
        .as_deref()
        .map_or(Ok(()), |p| cli::check_output_file("--json", p))
        .and_then(|_| {
            args.text
                .as_deref()
                .map_or(Ok(()), |p| cli::check_input_file("--text", p))
        });
    if let Err(e) = checked {
        say!("error: {e}");
        return ExitCode::from(e.exit_code());
    }
    let mut summary = serde_json::Map::new();
    let result = run(&args, &mut summary);
    if let Err(e) = &result {
        say!("error: {e}");
        summary.insert("error".into(), e.to_string().into());
    }
    if let Some(path) = &args.json {
        let line = serde_json::Value::Object(summary).to_string();
        if let Err(e) = std::fs::write(path, line + "\n") {
            say!(
                "error: {}",
                CliError::path("--json", path, format!("cannot be written: {e}"))
            );
            return ExitCode::FAILURE;
        }
    }
    match &result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => ExitCode::from(cli::exit_code(e.as_ref())),
    }
}

/// Peak resident set size of this process (VmHWM), in bytes.
fn peak_rss() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn rss_text() -> String {
    peak_rss().map_or_else(|| "n/a".to_string(), human_bytes)
}

/// The config the arguments ask for.
fn model_config(args: &Args) -> AnyResult<ModelConfig> {
    let mut cfg = ModelConfig::preset(&args.preset)?;
    if let Some(l) = args.layers {
        let pattern = cfg.attention.clone();
        cfg.attention = (0..l).map(|i| pattern[i % pattern.len()]).collect();
        cfg.n_layers = l;
    }
    if let Some(r) = args.rounds {
        cfg.n_rounds = r;
        cfg.eval_rounds = r;
    }
    if args.len > cfg.max_len() {
        return Err(CliError::flag(
            "--len",
            args.len,
            format!(
                "expected a whole number in 1..={}, what the {} preset serves",
                cfg.max_len(),
                args.preset
            ),
        )
        .into());
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The engine's error inside the layers' wrappers, if that is what `e` is.
fn engine_error(e: &ReformerError) -> Option<&EngineError> {
    use reformer_lsh::AttentionError as A;
    use reformer_reversible::ReversibleError as R;
    match e {
        ReformerError::Engine(e)
        | ReformerError::Attention(A::Engine(e))
        | ReformerError::Reversible(R::Engine(e))
        | ReformerError::Reversible(R::Attention(A::Engine(e))) => Some(e),
        _ => None,
    }
}

/// One line for a step that the pool refused, or any other error.
fn describe(e: &ReformerError) -> String {
    match engine_error(e) {
        Some(EngineError::OutOfMemory {
            requested,
            live,
            budget,
        }) => format!(
            "memory budget exceeded (typed OutOfMemory error): an allocation of {} with {} live \
             would pass the budget of {}",
            human_bytes(*requested),
            human_bytes(*live),
            human_bytes(*budget)
        ),
        _ => e.to_string(),
    }
}

fn data(args: &Args) -> AnyResult<TextData> {
    match &args.text {
        Some(p) => Ok(TextData::load(p, 0.0, args.len)?),
        None => {
            let mut rng = Rng::new(args.seed);
            let bytes = (0..=args.len).map(|_| rng.below(256) as u8).collect();
            Ok(TextData::from_bytes(
                std::path::Path::new("random bytes"),
                bytes,
                0.0,
                args.len,
            )?)
        }
    }
}

fn run(args: &Args, summary: &mut serde_json::Map<String, serde_json::Value>) -> AnyResult<()> {
    let budget = args.mem_budget;
    let cfg = model_config(args)?;
    // The tokens before the plan: a --text too short for --len fails before any work.
    let data = data(args)?;
    let dtype = match args.dtype {
        DTypeArg::F32 => DType::F32,
        DTypeArg::Bf16 => DType::BF16,
    };
    // `--device cuda --plan` plans the GPU program without a GPU.
    let runner = if args.plan && args.device == DeviceArg::Cuda {
        Runner::Cuda(0)
    } else {
        select(args.device.into())?
    };
    if args.steps == 0 && args.infer == 0 && !args.plan {
        say!("notice: --steps 0 and --infer 0: only the plan is printed");
    }
    let len = args.len;
    let threads = rayon::current_num_threads();
    let target = match runner {
        Runner::Cuda(_) => PlanTarget::Cuda,
        Runner::Cpu => PlanTarget::Cpu { threads },
    };
    let put =
        |m: &mut serde_json::Map<String, serde_json::Value>, k: &str, v: serde_json::Value| {
            m.insert(k.to_string(), v);
        };
    put(summary, "preset", args.preset.clone().into());
    put(summary, "len", len.into());
    put(summary, "layers", cfg.n_layers.into());
    put(summary, "rounds", cfg.n_rounds.into());
    put(summary, "eval_rounds", cfg.eval_rounds.into());
    put(summary, "runner", format!("{runner:?}").into());
    put(summary, "budget_bytes", budget.into());
    put(summary, "threads", threads.into());
    put(summary, "act_dtype", format!("{dtype:?}").into());
    outln!(
        "{} preset: {} layers ({}), d_model {}, {} × {} heads, rounds {} (eval {}), {} tokens; \
         budget {}; {threads} threads",
        args.preset,
        cfg.n_layers,
        cfg.attention
            .iter()
            .map(|a: &Attention| a.name())
            .collect::<Vec<_>>()
            .join(","),
        cfg.d_model,
        cfg.n_heads,
        cfg.d_head,
        cfg.n_rounds,
        cfg.eval_rounds,
        len,
        human_bytes(budget)
    );
    let train_plan = MemoryPlan::new(&cfg, len, true, target, dtype)?;
    let infer_plan = MemoryPlan::new(&cfg, len, false, target, dtype)?;
    outln!("{train_plan}");
    outln!("{infer_plan}");
    put(summary, "train_plan_bytes", train_plan.peak.into());
    put(summary, "infer_plan_bytes", infer_plan.peak.into());
    for (name, p, n) in [
        ("training step", &train_plan, args.steps),
        ("inference pass", &infer_plan, args.infer),
    ] {
        if n > 0 && p.peak > budget {
            outln!(
                "the plan puts a {name} at {}, {} above the budget of {}{}",
                human_bytes(p.peak),
                human_bytes(p.peak - budget),
                human_bytes(budget),
                if args.plan {
                    ""
                } else {
                    "; running anyway: the pool will refuse the allocation that passes it"
                }
            );
        }
    }
    if args.plan {
        return Ok(());
    }
    let window = data.train_window(args.seed, 0, len)?.to_vec();
    let plans = (train_plan.peak, infer_plan.peak);
    match runner {
        Runner::Cuda(ordinal) => {
            let backend = CudaBackend::new(ordinal, Some(budget))
                .map_err(|e| describe(&e))?
                .with_act_dtype(dtype)?;
            backend.set_tf32(args.tf32)?;
            put(summary, "tf32", args.tf32.into());
            outln!(
                "device: {}; dense products in {}; activations in {dtype:?}",
                backend.describe(),
                if args.tf32 { "TF32" } else { "f32" }
            );
            run_model(backend, &cfg, args, &window, plans, summary)
        }
        Runner::Cpu => {
            let pool = MemoryPool::with_budget(budget);
            let backend = CpuBackend::new(&pool).with_act_dtype(dtype)?;
            outln!("device: {}; activations in {dtype:?}", backend.describe());
            run_model(backend, &cfg, args, &window, plans, summary)
        }
    }
}

/// Training steps and inference passes of the model on `backend`: times, the pool's peak
/// against the plan (and, on a GPU, the driver's reading), peak RSS.
fn run_model<B: Backend>(
    backend: B,
    cfg: &ModelConfig,
    args: &Args,
    window: &[u8],
    (train_plan, infer_plan): (usize, usize),
    summary: &mut serde_json::Map<String, serde_json::Value>,
) -> AnyResult<()> {
    let len = args.len;
    let put =
        |m: &mut serde_json::Map<String, serde_json::Value>, k: &str, v: serde_json::Value| {
            m.insert(k.to_string(), v);
        };
    put(summary, "backend", backend.describe().into());
    let mut lm = ReformerLm::new(backend, cfg).map_err(|e| describe(&e))?;
    let schedule = LrSchedule {
        warmup: 1,
        total_steps: args.steps as u64,
        ..LrSchedule::default()
    };
    let driver = |lm: &ReformerLm<B>| {
        lm.backend()
            .driver_used_bytes()
            .map(|b| format!("; driver reports {} in use", human_bytes(b)))
            .unwrap_or_default()
    };
    let phase = |name: &str,
                 n: usize,
                 plan: usize,
                 lm: &mut ReformerLm<B>,
                 summary: &mut serde_json::Map<String, serde_json::Value>,
                 train: bool|
     -> AnyResult<()> {
        let mut times = Vec::new();
        let mut peak_max = 0usize;
        let mut driver_max = 0usize;
        for i in 0..n {
            lm.backend().reset_peak();
            let t0 = Instant::now();
            let loss = if train {
                let step = i as u64;
                lm.zero_grad()?;
                let loss = lm
                    .train_step_grads(window, &StepContext::train(step))
                    .map_err(|e| format!("training step {i} stopped: {}", describe(&e)))?;
                lm.adam_update(AdamConfig::default(), schedule.lr_at(step))
                    .map_err(|e| format!("training step {i} stopped: {}", describe(&e)))?;
                loss
            } else {
                lm.eval_loss(window, &StepContext::eval(i as u64))
                    .map_err(|e| format!("inference pass {i} stopped: {}", describe(&e)))?
            };
            lm.backend().synchronize()?;
            let dt = t0.elapsed().as_secs_f64();
            times.push(dt);
            let peak = lm.backend().peak_bytes();
            peak_max = peak_max.max(peak);
            driver_max = driver_max.max(lm.backend().driver_used_bytes().unwrap_or(0));
            outln!(
                "{name} {i}: {dt:.3} s, {:.0} tokens/s, loss {loss:.3}; device pool peak {} \
                 (plan {}, measured/plan {:.4}){}; peak RSS {}",
                len as f64 / dt,
                human_bytes(peak),
                human_bytes(plan),
                peak as f64 / plan as f64,
                driver(lm),
                rss_text()
            );
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let key = if train { "train" } else { "infer" };
        put(summary, &format!("{key}_count"), n.into());
        put(summary, &format!("{key}_s_median"), median.into());
        put(summary, &format!("{key}_s_all"), times.clone().into());
        put(
            summary,
            &format!("{key}_tokens_per_s"),
            (len as f64 / median).into(),
        );
        put(summary, &format!("{key}_peak_bytes"), peak_max.into());
        put(
            summary,
            &format!("{key}_measured_over_plan"),
            (peak_max as f64 / plan as f64).into(),
        );
        if driver_max > 0 {
            put(
                summary,
                &format!("{key}_driver_used_bytes"),
                driver_max.into(),
            );
        }
        Ok(())
    };
    if args.steps > 0 {
        phase("train step", args.steps, train_plan, &mut lm, summary, true)?;
    }
    if args.infer > 0 {
        lm.drop_optimizer_state();
        lm.set_rounds(cfg.eval_rounds)?;
        phase(
            "inference pass",
            args.infer,
            infer_plan,
            &mut lm,
            summary,
            false,
        )?;
    }
    if let Some(rss) = peak_rss() {
        put(summary, "peak_rss_bytes", rss.into());
    }
    Ok(())
}
