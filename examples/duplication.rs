//! The Reformer paper's duplication task (Kitaev et al. 2020, §2, Table 2): a 1-layer model
//! (d_model = d_ff = 256, 4 heads) trained on `0 w 0 w` with full attention (exact shared-QK)
//! and with LSH at 1, 2 and 4 rounds, each evaluated with full attention and LSH-8/4/2/1,
//! printed beside the paper's figures; a local-attention model is the control that must fail
//! (its span, two chunks, cannot reach back `|w| + 1` positions).
//!
//! ```text
//! cargo run --release --example duplication                 # the scaled setting (CPU)
//! cargo run --release --example duplication -- --paper      # length 1024, 150K steps (GPU)
//! ```
//!
//! Writes `OUT/duplication.csv` (one row per trained model and evaluation), `OUT/train.csv`
//! (every training step's loss) and `OUT/duplication.svg` (ours beside the paper's).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use reformer::backend::{select, Backend, CpuBackend, CudaBackend, DeviceRequest, Runner};
use reformer::cli::{self, CliError};
use reformer::config::Attention;
use reformer::duplication::{with_attention, Duplication, Score};
use reformer::{AdamConfig, LrSchedule, ReformerLm};
use reformer_engine::MemoryPool;

macro_rules! say {
    ($($t:tt)*) => {
        cli::errln(format_args!($($t)*))
    };
}

/// The paper's Table 2: rows trained with full, LSH-4, LSH-2, LSH-1; columns evaluated with
/// full, LSH-8, LSH-4, LSH-2, LSH-1 (accuracy, %).
const PAPER: [(&str, [f64; 5]); 4] = [
    ("full", [100.0, 94.8, 92.5, 76.9, 52.5]),
    ("lsh4", [0.8, 100.0, 99.9, 99.4, 91.9]),
    ("lsh2", [0.8, 100.0, 99.9, 98.1, 86.8]),
    ("lsh1", [0.8, 99.9, 99.6, 94.8, 77.9]),
];
/// Evaluations: `None` is full attention, `Some(r)` LSH with `r` rounds.
const EVALS: [Option<usize>; 5] = [None, Some(8), Some(4), Some(2), Some(1)];
const MODELS: [&str; 5] = ["full", "lsh4", "lsh2", "lsh1", "local"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

#[derive(Parser, Debug)]
#[command(about = "The Reformer paper's duplication task (Table 2) at a scale the machine trains")]
struct Args {
    /// The paper's setting: |w| = 511 (length 1024), chunks of 64, 150000 steps (a GPU's work);
    /// the other flags still override it.
    #[arg(long)]
    paper: bool,
    /// Symbols per half |w| [default: 31, the paper's 511 with --paper].
    #[arg(long, value_parser = cli::int_parser(1usize, Some(1 << 18)))]
    n: Option<usize>,
    /// Positions per attention chunk [default: 4, 64 with --paper: 32 hash buckets, as the paper's
    /// 1024 positions in chunks of 64].
    #[arg(long, value_parser = cli::int_parser(1usize, Some(1 << 16)))]
    chunk: Option<usize>,
    /// Training steps per model [default: 800, 150000 with --paper].
    #[arg(long, value_parser = cli::int_parser(1u64, None))]
    steps: Option<u64>,
    /// Sequences per step.
    #[arg(long, default_value_t = 32, value_parser = cli::int_parser(1usize, Some(65536)))]
    batch: usize,
    /// Peak learning rate (linear warmup, cosine decay to a tenth).
    #[arg(long, default_value_t = 0.002, value_parser = cli::f32_parser(cli::Interval::open_closed(0.0, 1.0)))]
    lr: f32,
    /// Warmup steps.
    #[arg(long, default_value_t = 100, value_parser = cli::int_parser(0u64, None))]
    warmup: u64,
    /// Held-out sequences per evaluation.
    #[arg(long, default_value_t = 512, value_parser = cli::int_parser(1usize, None))]
    eval_seqs: usize,
    /// Models to train, comma-separated, of: full, lsh4, lsh2, lsh1, local.
    #[arg(long, default_value = "full,lsh4,lsh2,lsh1,local")]
    models: String,
    /// Where to train.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Output folder.
    #[arg(long, default_value = "runs/duplication")]
    out: PathBuf,
}

/// One trained model's results.
struct Trained {
    name: String,
    steps: u64,
    seconds: f64,
    final_loss: f64,
    scores: Vec<(String, Score)>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("error: {e}");
            ExitCode::from(cli::exit_code(e.as_ref()))
        }
    }
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn run(args: &Args) -> AnyResult<()> {
    let models: Vec<&str> = args.models.split(',').map(str::trim).collect();
    if let Some(bad) = models.iter().find(|m| !MODELS.contains(m)) {
        return Err(CliError::flag(
            "--models",
            bad,
            format!("expected some of {}", MODELS.join(", ")),
        )
        .into());
    }
    let req = match args.device {
        DeviceArg::Cpu => DeviceRequest::Cpu,
        DeviceArg::Cuda => DeviceRequest::Cuda,
        DeviceArg::Auto => DeviceRequest::Auto,
    };
    cli::prepare_out_dir("--out", &args.out)?;
    match select(req)? {
        Runner::Cpu => {
            let pool = MemoryPool::unlimited();
            experiment(args, &models, || Ok(CpuBackend::new(&pool)))
        }
        Runner::Cuda(ordinal) => experiment(args, &models, || CudaBackend::new(ordinal, None)),
    }
}

fn experiment<B: Backend>(
    args: &Args,
    models: &[&str],
    backend: impl Fn() -> reformer::Result<B>,
) -> AnyResult<()> {
    let n = args.n.unwrap_or(if args.paper { 511 } else { 31 });
    let chunk = args.chunk.unwrap_or(if args.paper { 64 } else { 4 });
    let steps = args.steps.unwrap_or(if args.paper { 150_000 } else { 800 });
    let task = Duplication::new(n)?;
    let schedule = LrSchedule {
        lr: args.lr,
        warmup: args.warmup.min(steps.saturating_sub(1)),
        total_steps: steps,
        final_fraction: 0.1,
    };
    let adam = AdamConfig {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-9,
        clip_norm: Some(1.0),
    };
    say!(
        "duplication: |w| = {n} (sequences of {} bytes, {} positions, loss on the last {}), \
         chunks of {chunk}, {steps} steps of {} sequences, lr {}, {} held-out sequences",
        task.seq_bytes(),
        task.positions(),
        task.positions() - task.loss_from(),
        args.batch,
        args.lr,
        args.eval_seqs
    );
    let mut log = String::from("model,step,loss_nats\n");
    let mut results = Vec::new();
    for &name in models {
        let (kind, rounds) = match name {
            "full" => (Attention::Exact, 1),
            "local" => (Attention::Local, 1),
            lsh => (Attention::Lsh, lsh[3..].parse()?),
        };
        let cfg = task.model(kind, chunk, rounds);
        let mut lm = ReformerLm::new(backend()?, &cfg)?;
        let t0 = Instant::now();
        let mut last = f64::NAN;
        let report = (steps / 10).max(1);
        let made = task.train(&mut lm, args.batch, 1, schedule, adam, |step, loss| {
            last = loss;
            let _ = writeln!(log, "{name},{step},{loss:.6}");
            if (step + 1) % report == 0 {
                say!(
                    "  {name}: step {}/{steps}: loss {loss:.4} nats ({:.0} s)",
                    step + 1,
                    t0.elapsed().as_secs_f64()
                );
            }
            true
        })?;
        let seconds = t0.elapsed().as_secs_f64();
        let mut scores = Vec::new();
        for eval in EVALS {
            let (label, mut m) = match (kind, eval) {
                (Attention::Local, None) => (
                    "local".to_string(),
                    with_attention(&lm, backend()?, kind, kind, 1)?,
                ),
                (Attention::Local, Some(_)) => continue,
                (_, None) => (
                    "full".to_string(),
                    with_attention(&lm, backend()?, kind, Attention::Exact, 1)?,
                ),
                (_, Some(r)) => (
                    format!("lsh{r}"),
                    with_attention(&lm, backend()?, kind, Attention::Lsh, r)?,
                ),
            };
            let s = task.score(&mut m, args.eval_seqs, args.batch, 2)?;
            say!(
                "  {name} evaluated with {label}: accuracy {:.2}%, loss {:.4}",
                100.0 * s.accuracy,
                s.loss
            );
            scores.push((label, s));
        }
        say!("{name}: {made} steps in {seconds:.0} s, last training loss {last:.4}");
        results.push(Trained {
            name: name.to_string(),
            steps: made,
            seconds,
            final_loss: last,
            scores,
        });
    }
    std::fs::write(args.out.join("train.csv"), log)?;
    std::fs::write(args.out.join("duplication.csv"), csv(&results))?;
    std::fs::write(args.out.join("duplication.svg"), svg(&results, n))?;
    print_table(&results, n);
    say!(
        "wrote {0}/duplication.csv, {0}/train.csv, {0}/duplication.svg",
        args.out.display()
    );
    Ok(())
}

fn paper(model: &str, eval: &str) -> Option<f64> {
    let col = EVALS.iter().position(|e| match e {
        None => eval == "full",
        Some(r) => eval == format!("lsh{r}"),
    })?;
    PAPER.iter().find(|(m, _)| *m == model).map(|(_, v)| v[col])
}

fn eval_label(e: Option<usize>) -> String {
    e.map_or("full".into(), |r| format!("lsh{r}"))
}

fn print_table(results: &[Trained], n: usize) {
    let mut s = format!(
        "\naccuracy on the second half, |w| = {n} — ours (paper's, |w| = 511)\n\n| trained \\ evaluated | full | LSH-8 | LSH-4 | LSH-2 | LSH-1 | steps | train s |\n|---|---|---|---|---|---|---|---|\n"
    );
    for t in results {
        let _ = write!(s, "| {} |", t.name);
        for e in EVALS {
            let label = eval_label(e);
            let ours = t
                .scores
                .iter()
                .find(|(l, _)| *l == label || (t.name == "local" && e.is_none()));
            match (ours, paper(&t.name, &label)) {
                (Some((_, sc)), Some(p)) => {
                    let _ = write!(s, " {:.1}% ({p}%) |", 100.0 * sc.accuracy);
                }
                (Some((_, sc)), None) => {
                    let _ = write!(s, " {:.1}% |", 100.0 * sc.accuracy);
                }
                (None, _) => s.push_str(" — |"),
            }
        }
        let _ = writeln!(s, " {} | {:.0} |", t.steps, t.seconds);
    }
    cli::outln(format_args!("{s}"));
}

fn csv(results: &[Trained]) -> String {
    let mut s = String::from("trained,evaluated,accuracy,loss_nats,positions,paper_accuracy,steps,train_seconds,final_train_loss\n");
    for t in results {
        for (label, sc) in &t.scores {
            let p = paper(&t.name, label).map_or(String::new(), |p| format!("{:.4}", p / 100.0));
            let _ = writeln!(
                s,
                "{},{label},{:.6},{:.6},{},{p},{},{:.1},{:.6}",
                t.name, sc.accuracy, sc.loss, sc.positions, t.steps, t.seconds, t.final_loss
            );
        }
    }
    s
}

/// Grouped bars: per trained model, one bar per evaluation (ours), the paper's as a black tick.
fn svg(results: &[Trained], n: usize) -> String {
    let (w, h, left, top, bottom) = (900.0, 420.0, 60.0, 50.0, 70.0);
    let group = (w - left - 20.0) / results.len().max(1) as f64;
    let bar = group / 6.5;
    let py = |acc: f64| top + (1.0 - acc) * (h - top - bottom);
    let colors = ["#444", "#1f77b4", "#2ca02c", "#ff7f0e", "#d62728"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">Duplication task, |w| = {n}: accuracy on the second half (bars: ours; black ticks: the paper's, |w| = 511)</text>\n",
        w / 2.0
    );
    for k in 0..=4 {
        let acc = k as f64 / 4.0;
        let y = py(acc);
        let _ = writeln!(s, "<line x1=\"{left}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}%</text>", w - 20.0, left - 6.0, y + 4.0, k * 25);
    }
    for (g, t) in results.iter().enumerate() {
        let x0 = left + g as f64 * group + bar * 0.5;
        for (i, e) in EVALS.iter().enumerate() {
            let label = eval_label(*e);
            let x = x0 + i as f64 * bar;
            let ours = t
                .scores
                .iter()
                .find(|(l, _)| *l == label || (t.name == "local" && e.is_none()));
            if let Some((_, sc)) = ours {
                let y = py(sc.accuracy);
                let _ = writeln!(s, "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>", bar * 0.9, h - bottom - y, colors[i]);
            }
            if let Some(p) = paper(&t.name, &label) {
                let y = py(p / 100.0);
                let _ = writeln!(s, "<line x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"black\" stroke-width=\"3\"/>", x + bar * 0.9);
            }
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">trained: {}</text>",
            x0 + 2.5 * bar,
            h - bottom + 18.0,
            t.name
        );
    }
    for (i, e) in EVALS.iter().enumerate() {
        let x = left + i as f64 * 140.0;
        let _ = writeln!(s, "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">evaluated: {}</text>", h - 28.0, colors[i], x + 16.0, h - 18.0, eval_label(*e));
    }
    s.push_str("</svg>\n");
    s
}
