//! Generation speed against the context length: bytes per second of `--new` greedy bytes after
//! contexts of 2^k bytes, with the decoding caches (prefill once, then one step per byte) and
//! without them (one full forward per byte), beside the full forward pass over the same context.
//!
//! ```text
//! cargo run --release --example bench_generate -- --preset cp6 --min-log2 10 --max-log2 19 \
//!     --out bench/results/generate
//! ```
//!
//! Writes `generate.csv`, `generate.md` (the table) and `generate.svg` (bytes/s against the
//! context), rewritten after every length. The model is a checkpoint's (`--checkpoint`) or the
//! preset's random initialisation: speed does not depend on the weights. The context is the
//! bytes of `--text` (repeated as needed). At the largest lengths the context is shortened so
//! that it and the new bytes fit the model's positions (the table says so).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use reformer::backend::{
    select, Backend, CpuBackend, CudaBackend, DecodePlan, DeviceRequest, PlanTarget, Runner,
};
use reformer::chart::{loglog_svg, Axes, Series};
use reformer::generate::argmax_byte;
use reformer::{checkpoint, cli, ModelConfig, ReformerLm, StepContext};
use reformer_engine::MemoryPool;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

#[derive(Parser, Debug)]
#[command(about = "Bytes per second of generation with and without decoding caches")]
struct Args {
    /// Model preset (random weights) unless --checkpoint is given.
    #[arg(long, default_value = "cp6")]
    preset: String,
    /// A checkpoint to load instead of the preset.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Context bytes (repeated to the length needed).
    #[arg(long, default_value = "tests/fixtures/shakespeare-40k.txt")]
    text: PathBuf,
    #[arg(long, default_value_t = 10, value_parser = cli::int_parser(1usize, Some(24)))]
    min_log2: usize,
    #[arg(long, default_value_t = 19, value_parser = cli::int_parser(1usize, Some(24)))]
    max_log2: usize,
    /// New bytes per context with the caches.
    #[arg(long, default_value_t = 256, value_parser = cli::int_parser(2usize, None))]
    new: usize,
    /// New bytes per context without the caches (each one full forward).
    #[arg(long, default_value_t = 3, value_parser = cli::int_parser(0usize, None))]
    no_cache_new: usize,
    /// Measure the no-cache method up to contexts of 2^this.
    #[arg(long, default_value_t = 16, value_parser = cli::int_parser(0usize, Some(24)))]
    no_cache_max_log2: usize,
    /// Also compare greedy decoding with and without the caches over this many bytes after the
    /// smallest context (teacher-forced on the no-cache method's bytes): the agreement rate.
    #[arg(long, default_value_t = 0, value_parser = cli::int_parser(0usize, None))]
    agreement: usize,
    /// Skip the full forward beside each prefill (its column stays empty).
    #[arg(long)]
    no_forward: bool,
    /// LSH rounds (default: the model's eval rounds).
    #[arg(long, value_parser = cli::int_parser(1usize, Some(64)))]
    rounds: Option<usize>,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Folder for generate.csv, generate.md, generate.svg.
    #[arg(long, default_value = "bench/results/generate")]
    out: PathBuf,
}

/// One context length's measurements.
#[derive(Debug, Clone, Default)]
struct Row {
    context: usize,
    forward_s: f64,
    prefill_s: f64,
    steps: usize,
    /// Median seconds per step.
    step_median_s: f64,
    steps_s: f64,
    cache_device_bytes: usize,
    cache_index_bytes: usize,
    /// The decoding plan's peak and the pool's, from the caches' allocation to the last step.
    planned_peak: usize,
    pool_peak: usize,
    no_cache: Option<(usize, f64)>,
}

impl Row {
    fn decode_rate(&self) -> f64 {
        self.steps as f64 / self.steps_s
    }
    fn no_cache_rate(&self) -> Option<f64> {
        self.no_cache.map(|(n, s)| n as f64 / s)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cli::errln(format_args!("error: {e}"));
            ExitCode::from(cli::exit_code(e.as_ref()))
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let req = match args.device {
        DeviceArg::Cpu => DeviceRequest::Cpu,
        DeviceArg::Cuda => DeviceRequest::Cuda,
        DeviceArg::Auto => DeviceRequest::Auto,
    };
    match select(req)? {
        r @ Runner::Cuda(ordinal) => bench(CudaBackend::new(ordinal, None)?, r, args),
        r @ Runner::Cpu => bench(CpuBackend::new(&MemoryPool::unlimited()), r, args),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn bench<B: Backend>(
    backend: B,
    runner: Runner,
    args: &Args,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut model = match &args.checkpoint {
        Some(p) => ReformerLm::from_checkpoint(backend, &checkpoint::load(p)?)?,
        None => ReformerLm::new(backend, &ModelConfig::preset(&args.preset)?)?,
    };
    model.drop_optimizer_state();
    let rounds = args.rounds.unwrap_or(model.config().eval_rounds);
    model.set_rounds(rounds)?;
    let device = model.backend().describe();
    let max_len = model.config().max_len();
    let source = std::fs::read(&args.text)?;
    if source.is_empty() {
        return Err(format!("{}: no bytes", args.text.display()).into());
    }
    std::fs::create_dir_all(&args.out)?;
    cli::errln(format_args!(
        "{device}; {} layers, {rounds} rounds; {} new bytes per context",
        model.config().n_layers,
        args.new
    ));
    let ctx = StepContext::eval(0);
    let mut rows: Vec<Row> = Vec::new();
    for k in args.min_log2..=args.max_log2 {
        let context = (1usize << k).min(max_len + 1 - args.new);
        let text: Vec<u8> = source.iter().copied().cycle().take(context).collect();
        let mut row = Row {
            context,
            ..Row::default()
        };
        // The full forward over the context (the work a prefill does).
        let t = Instant::now();
        let want = match args.no_forward {
            true => None,
            false => Some(model.next_logits(&text, &ctx)?),
        };
        model.backend().synchronize()?;
        row.forward_s = if args.no_forward {
            f64::NAN
        } else {
            t.elapsed().as_secs_f64()
        };
        // Prefill, then steps.
        let target = match runner {
            Runner::Cuda(_) => PlanTarget::Cuda,
            Runner::Cpu => PlanTarget::Cpu {
                threads: rayon::current_num_threads(),
            },
        };
        let capacity = context + args.new - 1;
        row.planned_peak = DecodePlan::new(
            model.config(),
            context,
            capacity,
            target,
            model.backend().act_dtype(),
        )?
        .peak;
        model.backend().reset_peak();
        let mut st = model.start_decoding(capacity)?;
        let t = Instant::now();
        let mut logits = model.prefill(&mut st, &text)?;
        model.backend().synchronize()?;
        row.prefill_s = t.elapsed().as_secs_f64();
        if want
            .as_ref()
            .is_some_and(|w| argmax_byte(&logits) != argmax_byte(w))
        {
            cli::errln(format_args!(
                "note: at context {context} the prefill's greedy byte differs from the full \
                 forward's (their rotations differ where the bucket count follows the length)"
            ));
        }
        let (mut times, t_all) = (Vec::with_capacity(args.new), Instant::now());
        for _ in 1..args.new {
            let b = argmax_byte(&logits);
            let t = Instant::now();
            logits = model.decode(&mut st, &[b])?;
            times.push(t.elapsed().as_secs_f64());
        }
        model.backend().synchronize()?;
        row.steps_s = t_all.elapsed().as_secs_f64();
        row.steps = times.len();
        row.step_median_s = median(times);
        row.pool_peak = model.backend().peak_bytes();
        row.cache_device_bytes = st.device_bytes();
        row.cache_index_bytes = st.index_bytes();
        drop(st);
        if k <= args.no_cache_max_log2 && args.no_cache_new > 0 {
            let mut t_text = text.clone();
            let t = Instant::now();
            for _ in 0..args.no_cache_new {
                let l = model.next_logits(&t_text, &ctx)?;
                t_text.push(argmax_byte(&l));
            }
            model.backend().synchronize()?;
            row.no_cache = Some((args.no_cache_new, t.elapsed().as_secs_f64()));
        }
        cli::errln(format_args!(
            "context {context}: {}prefill {:.3} s, decode {:.0} bytes/s (median step {:.2} \
             ms), no cache {}",
            if row.forward_s.is_nan() {
                String::new()
            } else {
                format!(
                    "forward {:.3} s ({:.0}% of its rate in the prefill), ",
                    row.forward_s,
                    100.0 * row.forward_s / row.prefill_s
                )
            },
            row.prefill_s,
            row.decode_rate(),
            1e3 * row.step_median_s,
            row.no_cache_rate()
                .map_or("not measured".into(), |r| format!("{r:.3} bytes/s"))
        ));
        rows.push(row);
        write_outputs(args, &rows, &device, rounds)?;
    }
    cli::outln(format_args!("{}", table(&rows, &device, rounds, args.new)));
    if args.agreement > 0 {
        let context = (1usize << args.min_log2).min(max_len + 1 - args.agreement);
        let prompt: Vec<u8> = source.iter().copied().cycle().take(context).collect();
        let (same, n) = agreement(&model, &prompt, args.agreement)?;
        let line = format!(
            "greedy agreement with the no-cache method after {context} bytes: {same}/{n} = \
             {:.3}",
            same as f64 / n as f64
        );
        cli::outln(format_args!("{line}"));
        std::fs::write(args.out.join("agreement.txt"), format!("{line}\n"))?;
    }
    Ok(())
}

/// Greedy bytes of the no-cache method after `prompt`, and how many of them the cached decoder,
/// fed the same bytes, also picks.
fn agreement<B: Backend>(
    model: &ReformerLm<B>,
    prompt: &[u8],
    n: usize,
) -> Result<(usize, usize), Box<dyn std::error::Error>> {
    let ctx = StepContext::eval(0);
    let mut text = prompt.to_vec();
    let mut picks = Vec::with_capacity(n);
    for _ in 0..n {
        let b = argmax_byte(&model.next_logits(&text, &ctx)?);
        picks.push(b);
        text.push(b);
    }
    let mut st = model.start_decoding(prompt.len() + n - 1)?;
    let mut logits = model.prefill(&mut st, prompt)?;
    let mut same = 0;
    for (i, &b) in picks.iter().enumerate() {
        same += usize::from(argmax_byte(&logits) == b);
        if i + 1 < n {
            logits = model.decode(&mut st, &[b])?;
        }
    }
    Ok((same, n))
}

fn table(rows: &[Row], device: &str, rounds: usize, new: usize) -> String {
    let mut s = format!(
        "Generation on {device}, {rounds} LSH rounds, {new} new bytes per context (greedy).\n\n\
         | context | forward s | prefill s | prefill / forward rate | decode bytes/s | median step ms | no-cache bytes/s | caches | bucket index (host) | planned peak | pool peak |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.3} | {:.2} | {:.0} | {:.2} | {} | {} | {} | {} | {} |",
            r.context,
            r.forward_s,
            r.prefill_s,
            r.forward_s / r.prefill_s,
            r.decode_rate(),
            1e3 * r.step_median_s,
            r.no_cache_rate().map_or("—".into(), |v| format!("{v:.3}")),
            reformer::backend::human_bytes(r.cache_device_bytes),
            reformer::backend::human_bytes(r.cache_index_bytes),
            reformer::backend::human_bytes(r.planned_peak),
            reformer::backend::human_bytes(r.pool_peak),
        );
    }
    s
}

fn write_outputs(
    args: &Args,
    rows: &[Row],
    device: &str,
    rounds: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut csv = String::from(
        "context,forward_s,prefill_s,steps,steps_s,decode_bytes_per_s,step_median_s,\
         no_cache_bytes,no_cache_s,cache_device_bytes,cache_index_bytes,planned_peak,pool_peak\n",
    );
    for r in rows {
        let (nb, ns) = r.no_cache.map_or((String::new(), String::new()), |(n, s)| {
            (n.to_string(), format!("{s:.6}"))
        });
        let _ = writeln!(
            csv,
            "{},{:.6},{:.6},{},{:.6},{:.3},{:.6},{nb},{ns},{},{},{},{}",
            r.context,
            r.forward_s,
            r.prefill_s,
            r.steps,
            r.steps_s,
            r.decode_rate(),
            r.step_median_s,
            r.cache_device_bytes,
            r.cache_index_bytes,
            r.planned_peak,
            r.pool_peak
        );
    }
    std::fs::write(args.out.join("generate.csv"), csv)?;
    std::fs::write(
        args.out.join("generate.md"),
        table(rows, device, rounds, args.new),
    )?;
    let series = vec![
        Series {
            label: "decode, with caches".into(),
            points: rows
                .iter()
                .map(|r| (r.context as f64, r.decode_rate()))
                .collect(),
        },
        Series {
            label: "no cache (forward per byte)".into(),
            points: rows
                .iter()
                .filter_map(|r| r.no_cache_rate().map(|v| (r.context as f64, v)))
                .collect(),
        },
        Series {
            label: "prefill".into(),
            points: rows
                .iter()
                .map(|r| (r.context as f64, r.context as f64 / r.prefill_s))
                .collect(),
        },
        Series {
            label: "full forward".into(),
            points: rows
                .iter()
                .map(|r| (r.context as f64, r.context as f64 / r.forward_s))
                .collect(),
        },
    ];
    let title = format!("Generation bytes/s against the context ({device})");
    let axes = Axes {
        title: &title,
        x: "context length (bytes)",
        y: "bytes per second",
        y_unit: "B/s",
    };
    std::fs::write(args.out.join("generate.svg"), loglog_svg(&series, &axes))?;
    Ok(())
}
