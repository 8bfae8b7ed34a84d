//! LSH attention against exact attention, on this machine's CPU or on a CUDA GPU: for
//! N = 2^10 … 2^19, forward and forward+backward time per token, peak bytes, and the
//! exact/LSH ratio, for 2 heads × d_k 64, chunk 64, LSH rounds 1, 2 and 4, chunked local
//! attention, and blockwise exact attention (O(N) memory — the strongest exact baseline this
//! engine has), which runs while its predicted time stays within `--exact-budget` seconds.
//! Writes a CSV, a JSON file and an SVG chart (rewritten after every length, so a run that is
//! stopped keeps what it measured).
//!
//! ```text
//! cargo run --release --example bench_attention -- --out bench/out                # auto device
//! bench_attention --device cuda --exact-budget 120 --also torch/attention.json    # GPU + torch rows
//! bench_attention --device cuda --dtype bf16 --out bench/out/bf16                  # bf16 storage
//! ```
//!
//! `--device auto` (the default) uses the GPU when `reformer_kernels::probe` finds one usable
//! and otherwise says why on one line and runs on the CPU; `--device cuda` without a usable GPU
//! is an error. On the GPU the stream is synchronised before and after every timed region, the
//! peak is the context's device pool's (reset before each case) and the driver's
//! `cuMemGetInfo` reading is recorded beside it. Times are medians.
//!
//! `--dtype bf16` (GPU only; default f32) measures the attention as the model's CUDA backend
//! runs it with bf16 activations (`--dtype bf16` of `long_context` and `train_text`): the inputs
//! (qk, v, local's k and the upstream gradient) are uploaded as bf16 (each host value rounded
//! with `bf16::from_f32`), the kernels read them directly, local and exact attention store
//! their output in bf16 themselves while every timed LSH pass converts its forward's f32 output
//! (its rounds fold in f32) to bf16 and frees the f32 one (as the backend's `store_out` does),
//! the backward then reading bf16 qk, v, output and upstream gradient; gradients, log-sum-exps and the LSH saved
//! state stay f32. Its rows carry dtype `bf16`. The CPU attention runs f32 only: `--device cpu
//! --dtype bf16` is an error, and `--device auto` falling back to the CPU says so and runs f32
//! (rows with dtype `f32`).
//!
//! `--also FILE` (repeatable) reads rows in this program's JSON schema — e.g. from
//! `scripts/bench_torch_attention.py` — and puts them in the chart and the comparison, so one
//! chart holds our kernels and PyTorch's.
//!
//! Row schema (CSV columns in this order; JSON objects with the same keys, `null` for empty):
//! `kind, device, dtype, len, heads, d_k, chunk, reps, fwd_s, fwd_bwd_s, fwd_us_per_token,
//! fwd_bwd_us_per_token, peak_fwd_bytes, peak_fwd_bwd_bytes, driver_fwd_bytes,
//! driver_fwd_bwd_bytes, status`. Peaks include the inputs. `driver_*` (GPU only): the driver's
//! used bytes right after the pass (outputs still live) less its reading before the length's
//! inputs were uploaded. `status`: `ok`, or what went wrong (the kind then stops).

use std::collections::HashSet;
use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use reformer::chart::{loglog_svg, Axes, Series};
use reformer::cli::{self, CliError, Interval};
use reformer_engine::{MemoryPool, Rng, Tensor};
use reformer_kernels::gpu::attention::{
    self as gpu_attn, AttnDims, GpuLocalConfig, GpuLshConfig, LshBuckets,
};
use reformer_kernels::gpu::ops::elementwise::f32_to_bf16;
use reformer_kernels::gpu::{bf16, ActElem, DeviceBuffer, GpuContext};
use reformer_lsh::{
    exact_attention_backward, exact_attention_forward, local_attention_backward,
    local_attention_forward, lsh_attention_backward, lsh_attention_forward, shared_qk_grad,
    shared_qk_rule, unit_keys, Buckets, LocalConfig, LshConfig, Rotations,
};
use serde_json::{json, Value};

type BoxError = Box<dyn Error>;

/// A report line on stdout; a closed stdout is ignored (the files are still written).
macro_rules! outln {
    ($($t:tt)*) => {
        cli::outln(format_args!($($t)*))
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// The CPU.
    Cpu,
    /// The GPU (an error without a usable one).
    #[value(alias = "gpu")]
    Cuda,
    /// The GPU when one is usable, else the CPU.
    Auto,
}

/// How the GPU path stores activations (the CPU path runs f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
}

impl DtypeArg {
    fn name(self) -> &'static str {
        match self {
            DtypeArg::F32 => "f32",
            DtypeArg::Bf16 => "bf16",
        }
    }
}

const CPU_BF16: &str = "the CPU attention runs f32; bf16 storage is measured with --device cuda";

#[derive(Parser, Debug)]
#[command(about = "LSH attention against exact attention: time and memory by sequence length")]
struct Args {
    /// auto: the GPU when one is usable, else the CPU; cpu; cuda (an error without a usable
    /// GPU).
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Activation storage on the GPU: f32, or bf16 (inputs uploaded as bf16, the forward's
    /// output converted to bf16 inside the timed pass and read as bf16 by the backward, as
    /// the model's CUDA backend does; rows say bf16). The CPU attention runs f32: with
    /// --device cpu, bf16 is an error; when --device auto falls back to the CPU it says so
    /// and runs f32.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Shortest length, as a power of two (0..=30).
    #[arg(long, default_value_t = 10, allow_negative_numbers = true,
          value_parser = cli::int_parser(0u32, Some(30)))]
    min_log2: u32,
    /// Longest length, as a power of two (0..=30, at least --min-log2).
    #[arg(long, default_value_t = 19, allow_negative_numbers = true,
          value_parser = cli::int_parser(0u32, Some(30)))]
    max_log2: u32,
    /// Attention heads.
    #[arg(long, default_value_t = 2, allow_negative_numbers = true,
          value_parser = cli::int_parser(1usize, Some(1024)))]
    heads: usize,
    /// Head width d_k.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true,
          value_parser = cli::int_parser(1usize, Some(4096)))]
    d: usize,
    /// Chunk length of LSH and local attention.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true,
          value_parser = cli::int_parser(1usize, Some(1 << 20)))]
    chunk: usize,
    /// LSH hash rounds to measure, comma-separated (each 1..=64).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4],
          allow_negative_numbers = true, value_parser = cli::int_parser(1usize, Some(64)))]
    rounds: Vec<usize>,
    /// Leave out local attention.
    #[arg(long)]
    no_local: bool,
    /// Exact attention stops before a length whose predicted time (all its repetitions,
    /// forward and forward+backward) passes this many seconds; 0 skips it.
    #[arg(long, default_value_t = 300.0, allow_negative_numbers = true,
          value_parser = cli::float_parser(Interval::closed(0.0, 1e9)))]
    exact_budget: f64,
    /// Repetitions of every case [default: by length and device].
    #[arg(long, allow_negative_numbers = true,
          value_parser = cli::int_parser(1usize, Some(1_000_000)))]
    reps: Option<usize>,
    /// Rows of another harness in this schema (e.g. scripts/bench_torch_attention.py's
    /// attention.json), drawn in the chart and compared with our LSH; repeatable.
    #[arg(long, value_name = "ROWS.json")]
    also: Vec<PathBuf>,
    /// Folder for attention.csv, attention.json, attention.svg.
    #[arg(long, default_value = "target/bench_attention")]
    out: PathBuf,
}

impl Args {
    fn local(&self) -> bool {
        !self.no_local
    }
}

/// The checks that involve more than one flag.
fn check_args(a: &Args) -> Result<(), CliError> {
    if a.min_log2 > a.max_log2 {
        return Err(CliError::flag(
            "--min-log2",
            a.min_log2,
            format!("expected at most --max-log2 ({})", a.max_log2),
        ));
    }
    if a.dtype == DtypeArg::Bf16 && a.device == DeviceArg::Cpu {
        return Err(CliError::flag(
            "--dtype",
            "bf16",
            format!("not with --device cpu: {CPU_BF16}"),
        ));
    }
    Ok(())
}

/// One measured (or failed) case.
#[derive(Clone, Debug)]
struct Row {
    kind: String,
    device: String,
    dtype: String,
    len: usize,
    heads: usize,
    d_k: usize,
    chunk: Option<usize>,
    reps: usize,
    fwd_s: Option<f64>,
    fwd_bwd_s: Option<f64>,
    peak_fwd: Option<usize>,
    peak_fwd_bwd: Option<usize>,
    driver_fwd: Option<usize>,
    driver_fwd_bwd: Option<usize>,
    status: String,
}

impl Row {
    fn ok(&self) -> bool {
        self.status == "ok" && self.fwd_bwd_s.is_some()
    }

    /// Exact attention of any harness (ours, or an `--also` file's).
    fn is_exact(&self) -> bool {
        !self.kind.starts_with("lsh") && self.kind != "local"
    }

    /// The row as one line of JSON, keys in the schema's order.
    fn to_json(&self) -> String {
        let per_tok = |s: Option<f64>| s.map(|s| 1e6 * s / self.len as f64);
        let fields: [(&str, Value); 17] = [
            ("kind", json!(self.kind)),
            ("device", json!(self.device)),
            ("dtype", json!(self.dtype)),
            ("len", json!(self.len)),
            ("heads", json!(self.heads)),
            ("d_k", json!(self.d_k)),
            ("chunk", json!(self.chunk)),
            ("reps", json!(self.reps)),
            ("fwd_s", json!(self.fwd_s)),
            ("fwd_bwd_s", json!(self.fwd_bwd_s)),
            ("fwd_us_per_token", json!(per_tok(self.fwd_s))),
            ("fwd_bwd_us_per_token", json!(per_tok(self.fwd_bwd_s))),
            ("peak_fwd_bytes", json!(self.peak_fwd)),
            ("peak_fwd_bwd_bytes", json!(self.peak_fwd_bwd)),
            ("driver_fwd_bytes", json!(self.driver_fwd)),
            ("driver_fwd_bwd_bytes", json!(self.driver_fwd_bwd)),
            ("status", json!(self.status)),
        ];
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("\"{k}\": {v}"))
            .collect();
        format!("{{{}}}", body.join(", "))
    }

    fn from_json(v: &Value) -> Option<Row> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let u = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        Some(Row {
            kind: s("kind")?,
            device: s("device").unwrap_or_default(),
            dtype: s("dtype").unwrap_or_default(),
            len: u("len")?,
            heads: u("heads").unwrap_or(0),
            d_k: u("d_k").unwrap_or(0),
            chunk: u("chunk"),
            reps: u("reps").unwrap_or(0),
            fwd_s: f("fwd_s"),
            fwd_bwd_s: f("fwd_bwd_s"),
            peak_fwd: u("peak_fwd_bytes"),
            peak_fwd_bwd: u("peak_fwd_bwd_bytes"),
            driver_fwd: u("driver_fwd_bytes"),
            driver_fwd_bwd: u("driver_fwd_bwd_bytes"),
            status: s("status").unwrap_or_else(|| "ok".into()),
        })
    }
}

const CSV_HEADER: &str = "kind,device,dtype,len,heads,d_k,chunk,reps,fwd_s,fwd_bwd_s,\
fwd_us_per_token,fwd_bwd_us_per_token,peak_fwd_bytes,peak_fwd_bwd_bytes,driver_fwd_bytes,\
driver_fwd_bwd_bytes,status";

/// A CSV field: commas and quotes replaced, so the columns stay put.
fn csv_text(s: &str) -> String {
    s.replace([',', '"', '\n'], " ")
}

fn opt<T: std::fmt::Display>(x: Option<T>) -> String {
    x.map(|x| x.to_string()).unwrap_or_default()
}

fn csv_line(r: &Row) -> String {
    let per_tok = |s: Option<f64>| s.map(|s| format!("{:.4}", 1e6 * s / r.len as f64));
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        csv_text(&r.kind),
        csv_text(&r.device),
        csv_text(&r.dtype),
        r.len,
        r.heads,
        r.d_k,
        opt(r.chunk),
        r.reps,
        opt(r.fwd_s.map(|s| format!("{s:.6}"))),
        opt(r.fwd_bwd_s.map(|s| format!("{s:.6}"))),
        opt(per_tok(r.fwd_s)),
        opt(per_tok(r.fwd_bwd_s)),
        opt(r.peak_fwd),
        opt(r.peak_fwd_bwd),
        opt(r.driver_fwd),
        opt(r.driver_fwd_bwd),
        csv_text(&r.status)
    )
}

/// One timed pass: seconds, and (GPU) the driver's used bytes right after it.
struct Sample {
    secs: f64,
    driver_used: Option<usize>,
}

/// What [`measure`] found for one case.
struct Measured {
    reps: usize,
    fwd_s: f64,
    fwd_bwd_s: f64,
    peak_fwd: usize,
    peak_fwd_bwd: usize,
    driver_fwd: Option<usize>,
    driver_fwd_bwd: Option<usize>,
}

/// The memory counters of the device a case runs on.
struct Counters<'a> {
    reset_peak: &'a dyn Fn(),
    peak: &'a dyn Fn() -> usize,
    /// The driver's used bytes before this length's inputs (GPU).
    driver_base: Option<usize>,
}

/// Medians of `reps` forward and `reps` forward+backward passes, with the peak of each
/// (reset before each), after `warmup` untimed forward+backward passes.
fn measure(
    reps: usize,
    warmup: usize,
    counters: &Counters,
    run: &mut dyn FnMut(bool) -> Result<Sample, BoxError>,
) -> Result<Measured, BoxError> {
    for _ in 0..warmup {
        run(true)?;
    }
    let mut timed = |backward: bool| -> Result<(f64, usize, Option<usize>), BoxError> {
        (counters.reset_peak)();
        let mut secs = Vec::with_capacity(reps);
        let mut driver: Option<usize> = None;
        for _ in 0..reps {
            let s = run(backward)?;
            secs.push(s.secs);
            if let (Some(used), Some(base)) = (s.driver_used, counters.driver_base) {
                let d = used.saturating_sub(base);
                driver = Some(driver.map_or(d, |x| x.max(d)));
            }
        }
        secs.sort_by(|a, b| a.total_cmp(b));
        Ok((secs[secs.len() / 2], (counters.peak)(), driver))
    };
    let (fwd_s, peak_fwd, driver_fwd) = timed(false)?;
    let (fwd_bwd_s, peak_fwd_bwd, driver_fwd_bwd) = timed(true)?;
    Ok(Measured {
        reps,
        fwd_s,
        fwd_bwd_s,
        peak_fwd,
        peak_fwd_bwd,
        driver_fwd,
        driver_fwd_bwd,
    })
}

/// Where the benchmark runs.
enum Backend {
    Cpu { name: String },
    Cuda { ctx: Box<GpuContext>, name: String },
}

impl Backend {
    fn name(&self) -> &str {
        match self {
            Backend::Cpu { name } | Backend::Cuda { name, .. } => name,
        }
    }

    fn is_gpu(&self) -> bool {
        matches!(self, Backend::Cuda { .. })
    }

    /// Repetitions of an LSH or local case of length `len`.
    fn reps(&self, len: usize) -> usize {
        match self {
            Backend::Cpu { .. } if len <= 1 << 14 => 5,
            Backend::Cpu { .. } if len <= 1 << 17 => 3,
            Backend::Cpu { .. } => 1,
            Backend::Cuda { .. } if len <= 1 << 14 => 10,
            Backend::Cuda { .. } if len <= 1 << 17 => 5,
            Backend::Cuda { .. } => 3,
        }
    }

    /// Exact attention's repetitions: one run once a length takes (tens of) seconds.
    fn exact_reps(&self, len: usize) -> usize {
        match self {
            Backend::Cpu { .. } if len >= 1 << 15 => 1,
            Backend::Cuda { .. } if len >= 1 << 17 => 1,
            Backend::Cuda { .. } if len >= 1 << 15 => 3,
            _ => self.reps(len),
        }
    }
}

fn cpu_name(threads: usize) -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown model".into());
    format!("cpu {model} ({threads} threads)")
}

fn open_backend(device: DeviceArg, threads: usize) -> Result<Backend, String> {
    let cpu = || Backend::Cpu {
        name: cpu_name(threads),
    };
    if device == DeviceArg::Cpu {
        return Ok(cpu());
    }
    let opened = reformer_kernels::probe(0).and_then(|info| {
        let ctx = GpuContext::new(info.ordinal)?;
        ctx.pool().set_poison(false);
        Ok(ctx)
    });
    match (opened, device) {
        (Ok(ctx), _) => {
            let name = ctx.info().name.clone();
            Ok(Backend::Cuda {
                ctx: Box::new(ctx),
                name,
            })
        }
        (Err(e), DeviceArg::Cuda) => Err(format!("--device cuda: no usable GPU: {e}")),
        (Err(e), _) => {
            outln!("bench_attention: no usable GPU ({e}); running on the CPU");
            Ok(cpu())
        }
    }
}

/// What one length runs.
struct LengthPlan<'a> {
    len: usize,
    exact: bool,
    /// Kinds that failed at a shorter length (skipped from then on).
    dead: &'a HashSet<String>,
    /// Kinds measured at no length yet (the GPU warms them up first).
    warmed: &'a HashSet<String>,
}

fn lsh_kind(rounds: usize) -> String {
    format!("lsh r={rounds}")
}

/// A row of `kind` at `len` before measuring; `dtype`: how its activations are stored.
fn base_row(args: &Args, backend: &Backend, dtype: &str, kind: &str, len: usize) -> Row {
    Row {
        kind: kind.to_string(),
        device: backend.name().to_string(),
        dtype: dtype.to_string(),
        len,
        heads: args.heads,
        d_k: args.d,
        chunk: (kind != "exact").then_some(args.chunk),
        reps: 0,
        fwd_s: None,
        fwd_bwd_s: None,
        peak_fwd: None,
        peak_fwd_bwd: None,
        driver_fwd: None,
        driver_fwd_bwd: None,
        status: "ok".into(),
    }
}

fn finish_row(mut row: Row, m: Result<Measured, BoxError>) -> Row {
    match m {
        Ok(m) => {
            row.reps = m.reps;
            row.fwd_s = Some(m.fwd_s);
            row.fwd_bwd_s = Some(m.fwd_bwd_s);
            row.peak_fwd = Some(m.peak_fwd);
            row.peak_fwd_bwd = Some(m.peak_fwd_bwd);
            row.driver_fwd = m.driver_fwd;
            row.driver_fwd_bwd = m.driver_fwd_bwd;
        }
        Err(e) => {
            let msg = e.to_string().replace('\n', " ");
            outln!("({} at N = {}: {msg}; it stops here)", row.kind, row.len);
            row.status = format!("failed: {msg}");
        }
    }
    row
}

/// Every case of one length on the CPU.
fn bench_length_cpu(
    args: &Args,
    backend: &Backend,
    plan: &LengthPlan,
    rng: &mut Rng,
) -> Result<Vec<Row>, BoxError> {
    let len = plan.len;
    let pool = MemoryPool::unlimited();
    let shape = [args.heads, len, args.d];
    let qk = Tensor::randn(&pool, &shape, 1.0, rng)?;
    let v = Tensor::randn(&pool, &shape, 1.0, rng)?;
    let g = Tensor::randn(&pool, &shape, 1.0, rng)?;
    let counters = Counters {
        reset_peak: &|| pool.reset_peak(),
        peak: &|| pool.peak_bytes(),
        driver_base: None,
    };
    let reps = |exact: bool| {
        args.reps.unwrap_or(if exact {
            backend.exact_reps(len)
        } else {
            backend.reps(len)
        })
    };
    let timed = |f: &dyn Fn(bool) -> Result<(), BoxError>, backward: bool| {
        let t = Instant::now();
        f(backward)?;
        Ok::<_, BoxError>(Sample {
            secs: t.elapsed().as_secs_f64(),
            driver_used: None,
        })
    };
    let mut rows = Vec::new();
    if plan.exact && !plan.dead.contains("exact") {
        let rule = shared_qk_rule(true);
        let run = |backward: bool| -> Result<(), BoxError> {
            let k = unit_keys(&qk)?;
            let (o, lse) = exact_attention_forward(&qk, &k, &v, rule, None)?;
            if backward {
                let (dq, dk, dv) = exact_attention_backward(&qk, &k, &v, &o, &lse, &g, rule, None)?;
                drop((shared_qk_grad(&qk, dq, &dk), dv));
            }
            Ok(())
        };
        let m = measure(reps(true), 0, &counters, &mut |b| timed(&run, b));
        rows.push(finish_row(base_row(args, backend, "f32", "exact", len), m));
    }
    for &rounds in &args.rounds {
        let kind = lsh_kind(rounds);
        if plan.dead.contains(&kind) {
            continue;
        }
        let rot = Rotations::random(args.d, rounds, Buckets::auto(len, args.chunk), rng)?;
        let cfg = LshConfig {
            chunk_len: args.chunk,
            causal: true,
        };
        let run = |backward: bool| -> Result<(), BoxError> {
            let (o, saved) = lsh_attention_forward(&qk, &v, &rot, &cfg, None)?;
            if backward {
                drop(lsh_attention_backward(
                    &qk, &v, &o, &g, &saved, &rot, &cfg, None,
                )?);
            }
            Ok(())
        };
        let m = measure(reps(false), 0, &counters, &mut |b| timed(&run, b));
        rows.push(finish_row(base_row(args, backend, "f32", &kind, len), m));
    }
    if args.local() && !plan.dead.contains("local") {
        // Local attention has separate keys: they count in its peak only.
        let k = Tensor::randn(&pool, &shape, 1.0, rng)?;
        let cfg = LocalConfig {
            chunk_len: args.chunk,
            causal: true,
        };
        let run = |backward: bool| -> Result<(), BoxError> {
            let (o, lse) = local_attention_forward(&qk, &k, &v, &cfg, None)?;
            if backward {
                drop(local_attention_backward(
                    &qk, &k, &v, &o, &lse, &g, &cfg, None,
                )?);
            }
            Ok(())
        };
        let m = measure(reps(false), 0, &counters, &mut |b| timed(&run, b));
        rows.push(finish_row(base_row(args, backend, "f32", "local", len), m));
    }
    Ok(rows)
}

fn gpu_buckets(b: &Buckets) -> LshBuckets {
    match *b {
        Buckets::Single(b) => LshBuckets::single(b),
        Buckets::Factorised(b1, b2) => LshBuckets::factorised(b1, b2),
    }
}

/// How an activation is stored on the GPU: f32, or bf16 as the model's CUDA backend stores
/// it with `--dtype bf16`.
trait BenchElem: ActElem {
    /// The rows' `dtype`.
    const NAME: &'static str;

    /// The LSH forward's f32 output as a stored activation, as the backend's `store_out` does
    /// it: itself, or converted (round to nearest even) into a new bf16 buffer, the f32 one
    /// freed.
    fn store_out(ctx: &GpuContext, out: DeviceBuffer<f32>) -> Result<DeviceBuffer<Self>, BoxError>;
}

impl BenchElem for f32 {
    const NAME: &'static str = "f32";

    fn store_out(_: &GpuContext, out: DeviceBuffer<f32>) -> Result<DeviceBuffer<f32>, BoxError> {
        Ok(out)
    }
}

impl BenchElem for bf16 {
    const NAME: &'static str = "bf16";

    fn store_out(ctx: &GpuContext, out: DeviceBuffer<f32>) -> Result<DeviceBuffer<bf16>, BoxError> {
        let mut h = ctx.alloc::<bf16>(out.len())?;
        f32_to_bf16(ctx, &out, &mut h)?;
        drop(out);
        Ok(h)
    }
}

/// Every case of one length on the GPU, activations (inputs, the forward's stored output, the
/// upstream gradient) in `T`.
fn bench_length_gpu<T: BenchElem>(
    args: &Args,
    backend: &Backend,
    ctx: &GpuContext,
    plan: &LengthPlan,
    rng: &mut Rng,
) -> Result<Vec<Row>, BoxError> {
    let len = plan.len;
    let dims = AttnDims::new(args.heads, len, args.d);
    ctx.synchronize()?;
    let driver_base = ctx.memory_report()?.driver_used();
    // Drawn in f32 (the same values for both dtypes), then stored as `T`: bf16 rounds each
    // value to nearest even (`bf16::from_f32`).
    let randn = |rng: &mut Rng| -> Result<DeviceBuffer<T>, BoxError> {
        let mut host = vec![0.0f32; dims.numel()];
        rng.fill_normal(&mut host, 1.0);
        let stored: Vec<T> = host.into_iter().map(T::narrow).collect();
        Ok(ctx.upload(&stored)?)
    };
    let qk = randn(rng)?;
    let v = randn(rng)?;
    let g = randn(rng)?;
    let pool = ctx.pool();
    let counters = Counters {
        reset_peak: &|| pool.reset_peak(),
        peak: &|| pool.peak_bytes(),
        driver_base: Some(driver_base),
    };
    let reps = |exact: bool| {
        args.reps.unwrap_or(if exact {
            backend.exact_reps(len)
        } else {
            backend.reps(len)
        })
    };
    // One untimed pass for a kind's first length (kernel loading, allocator) and for short
    // lengths, where it costs nothing.
    let warmup = |kind: &str| usize::from(!plan.warmed.contains(kind) || len <= 1 << 14);
    // Synchronise, run, synchronise: the timed region holds exactly the pass (with bf16, the
    // conversion of the forward's output too); the driver is read while the pass's outputs are
    // still live.
    let timed = |f: &dyn Fn(bool) -> Result<Box<dyn std::any::Any>, BoxError>, backward: bool| {
        ctx.synchronize()?;
        let t = Instant::now();
        let outputs = f(backward)?;
        ctx.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        let used = ctx.memory_report()?.driver_used();
        drop(outputs);
        Ok::<_, BoxError>(Sample {
            secs,
            driver_used: Some(used),
        })
    };
    let mut rows = Vec::new();
    if plan.exact && !plan.dead.contains("exact") {
        let run = |backward: bool| -> Result<Box<dyn std::any::Any>, BoxError> {
            let (o, lse) =
                gpu_attn::exact_shared_qk_forward_as::<T, T>(ctx, &qk, &v, dims, true, None)?;
            if backward {
                let grads = gpu_attn::exact_shared_qk_backward(
                    ctx, &qk, &v, &o, &lse, &g, dims, true, None,
                )?;
                return Ok(Box::new((o, lse, grads)));
            }
            Ok(Box::new((o, lse)))
        };
        let m = measure(reps(true), warmup("exact"), &counters, &mut |b| {
            timed(&run, b)
        });
        rows.push(finish_row(
            base_row(args, backend, T::NAME, "exact", len),
            m,
        ));
    }
    for &rounds in &args.rounds {
        let kind = lsh_kind(rounds);
        if plan.dead.contains(&kind) {
            continue;
        }
        let buckets = Buckets::auto(len, args.chunk);
        let cfg = GpuLshConfig {
            buckets: gpu_buckets(&buckets),
            n_rounds: rounds,
            chunk_len: args.chunk,
            causal: true,
        };
        let rot = Rotations::random(args.d, rounds, buckets, rng)?;
        let run = |backward: bool| -> Result<Box<dyn std::any::Any>, BoxError> {
            let (o, saved) =
                gpu_attn::lsh_attention_forward(ctx, &qk, &v, dims, &rot.data, &cfg, None)?;
            let o = T::store_out(ctx, o)?;
            if backward {
                let grads =
                    gpu_attn::lsh_attention_backward(ctx, &qk, &v, &o, &g, &saved, &cfg, None)?;
                return Ok(Box::new((o, saved, grads)));
            }
            Ok(Box::new((o, saved)))
        };
        let m = measure(reps(false), warmup(&kind), &counters, &mut |b| {
            timed(&run, b)
        });
        rows.push(finish_row(base_row(args, backend, T::NAME, &kind, len), m));
    }
    if args.local() && !plan.dead.contains("local") {
        let k = randn(rng)?;
        let cfg = GpuLocalConfig {
            chunk_len: args.chunk,
            causal: true,
        };
        let run = |backward: bool| -> Result<Box<dyn std::any::Any>, BoxError> {
            let (o, lse) =
                gpu_attn::local_attention_forward_as::<T, T>(ctx, &qk, &k, &v, dims, &cfg, None)?;
            if backward {
                let grads = gpu_attn::local_attention_backward(
                    ctx, &qk, &k, &v, &o, &lse, &g, dims, &cfg, None,
                )?;
                return Ok(Box::new((o, lse, grads)));
            }
            Ok(Box::new((o, lse)))
        };
        let m = measure(reps(false), warmup("local"), &counters, &mut |b| {
            timed(&run, b)
        });
        rows.push(finish_row(
            base_row(args, backend, T::NAME, "local", len),
            m,
        ));
    }
    Ok(rows)
}

fn read_also(paths: &[PathBuf]) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for p in paths {
        let text =
            std::fs::read_to_string(p).map_err(|e| format!("--also {}: {e}", p.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| format!("--also {}: not JSON: {e}", p.display()))?;
        let arr = v
            .as_array()
            .ok_or_else(|| format!("--also {}: expected a JSON array of rows", p.display()))?;
        let before = rows.len();
        rows.extend(arr.iter().filter_map(Row::from_json));
        outln!(
            "bench_attention: {} rows from {}",
            rows.len() - before,
            p.display()
        );
    }
    Ok(rows)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cli::errln(format_args!("bench_attention: error: {e}"));
            ExitCode::from(cli::exit_code(e.as_ref()))
        }
    }
}

fn run(mut args: Args) -> Result<(), BoxError> {
    check_args(&args)?;
    let also = read_also(&args.also)?;
    cli::prepare_out_dir("--out", &args.out)?;
    let threads = rayon::current_num_threads();
    let backend = open_backend(args.device, threads)?;
    if args.dtype == DtypeArg::Bf16 && !backend.is_gpu() {
        outln!("bench_attention: --dtype bf16 ignored on the CPU ({CPU_BF16}): running f32");
        args.dtype = DtypeArg::F32;
    }
    if let Backend::Cuda { ctx, name } = &backend {
        // Compile every kernel family now, so no timed pass pays for NVRTC. A family that does
        // not compile is reported here; the attention families are compiled again (and any
        // error reported by the case that needs them) at first use.
        let t = Instant::now();
        if let Err(e) = ctx.load_all() {
            outln!("bench_attention: warning: compiling the kernels: {e}");
        }
        outln!(
            "bench_attention: {name} ({}), kernels compiled and loaded in {:.1} s; {}",
            ctx.arch(),
            t.elapsed().as_secs_f64(),
            ctx.memory_report()?
        );
    }
    let stored = match args.dtype {
        DtypeArg::F32 => "f32 activations",
        DtypeArg::Bf16 => {
            "bf16 activations (inputs, stored output, d_out; each pass converts the forward's \
             f32 output to bf16)"
        }
    };
    outln!(
        "bench_attention on {}: {stored}, {} heads × d_k {}, chunk {}, rounds {:?}; times are \
         medians; peaks include the inputs (qk, v, d_out; local adds k); exact/this: the fastest \
         exact attention at that length (ours or --also rows) over this row",
        backend.name(),
        args.heads,
        args.d,
        args.chunk,
        args.rounds
    );
    outln!(
        "{:>14} {:>8} {:>5} {:>12} {:>14} {:>12} {:>14} {:>10}",
        "kind",
        "N",
        "reps",
        "fwd µs/tok",
        "fwd+bwd µs/tok",
        "peak fwd B/tok",
        "peak f+b B/tok",
        "exact/this"
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut exact_alive = true;
    let mut dead: HashSet<String> = HashSet::new();
    let mut warmed: HashSet<String> = HashSet::new();
    for log2 in args.min_log2..=args.max_log2 {
        let len = 1usize << log2;
        let mut rng = Rng::new(log2 as u64);
        // Exact attention's cost grows ~4x per doubling: stop before a length would take longer
        // than the budget; a budget of 0 skips exact attention altogether.
        let exact_prev = rows
            .iter()
            .rev()
            .find(|r| r.kind == "exact" && r.ok())
            .map(|r| r.fwd_bwd_s.unwrap_or(0.0) + r.fwd_s.unwrap_or(0.0));
        let exact_reps = args.reps.unwrap_or(backend.exact_reps(len)) as f64;
        if exact_alive
            && (args.exact_budget <= 0.0
                || exact_prev.is_some_and(|t| 4.2 * t * exact_reps > args.exact_budget))
        {
            exact_alive = false;
            if args.exact_budget == 0.0 {
                outln!("(exact attention skipped: --exact-budget 0)");
            } else {
                outln!(
                    "(exact attention stops here: N = {len} would take over --exact-budget \
                     {} s)",
                    args.exact_budget
                );
            }
        }
        let plan = LengthPlan {
            len,
            exact: exact_alive,
            dead: &dead,
            warmed: &warmed,
        };
        let here = match &backend {
            Backend::Cpu { .. } => bench_length_cpu(&args, &backend, &plan, &mut rng),
            Backend::Cuda { ctx, .. } => match args.dtype {
                DtypeArg::F32 => bench_length_gpu::<f32>(&args, &backend, ctx, &plan, &mut rng),
                DtypeArg::Bf16 => bench_length_gpu::<bf16>(&args, &backend, ctx, &plan, &mut rng),
            },
        };
        let here = match here {
            Ok(h) => h,
            Err(e) => {
                // The inputs themselves did not fit (or the device failed): no longer length will.
                outln!("(N = {len}: {e}; stopping)");
                break;
            }
        };
        let exact_fb = here
            .iter()
            .chain(
                also.iter()
                    .filter(|r| r.len == len && r.heads == args.heads),
            )
            .filter(|r| r.is_exact() && r.ok())
            .filter_map(|r| r.fwd_bwd_s)
            .min_by(|a, b| a.total_cmp(b));
        for r in &here {
            warmed.insert(r.kind.clone());
            if !r.ok() {
                dead.insert(r.kind.clone());
                continue;
            }
            let n = r.len as f64;
            let per_tok = |s: Option<f64>| 1e6 * s.unwrap_or(f64::NAN) / n;
            let per_tok_b = |b: Option<usize>| b.map_or(f64::NAN, |b| b as f64 / n);
            let ratio = match (exact_fb, r.fwd_bwd_s) {
                (Some(e), Some(t)) => format!("{:.2}", e / t),
                _ => "-".into(),
            };
            outln!(
                "{:>14} {:>8} {:>5} {:>12.3} {:>14.3} {:>12.0} {:>14.0} {:>10}",
                r.kind,
                r.len,
                r.reps,
                per_tok(r.fwd_s),
                per_tok(r.fwd_bwd_s),
                per_tok_b(r.peak_fwd),
                per_tok_b(r.peak_fwd_bwd),
                ratio
            );
        }
        rows.extend(here);
        write_outputs(&args, &backend, &rows, &also)?;
    }
    if !also.is_empty() || rows.iter().any(|r| r.kind == "exact") {
        print_comparison(&rows, &also);
    }
    outln!(
        "wrote {0}/attention.csv, {0}/attention.json, {0}/attention.svg",
        args.out.display()
    );
    Ok(())
}

/// `[device]`, or `[device; dtype]` when the row says its dtype.
fn device_tag(device: &str, dtype: &str) -> String {
    if dtype.is_empty() {
        format!("[{device}]")
    } else {
        format!("[{device}; {dtype}]")
    }
}

/// For every exact kind (ours and `--also`, by device and dtype) against every LSH setting of
/// this run: the crossover (the shortest length from which LSH is faster at every length both
/// measured) and the ratio at 2^16 and 2^19, forward+backward.
fn print_comparison(rows: &[Row], also: &[Row]) {
    let all: Vec<&Row> = rows.iter().chain(also).filter(|r| r.ok()).collect();
    let mut exact_kinds: Vec<(String, String, String)> = all
        .iter()
        .filter(|r| r.is_exact())
        .map(|r| (r.kind.clone(), r.device.clone(), r.dtype.clone()))
        .collect();
    exact_kinds.sort();
    exact_kinds.dedup();
    let mut lsh_kinds: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r.kind.starts_with("lsh") && r.ok())
        .map(|r| (r.kind.clone(), r.dtype.clone()))
        .collect();
    lsh_kinds.sort();
    lsh_kinds.dedup();
    if exact_kinds.is_empty() || lsh_kinds.is_empty() {
        return;
    }
    outln!("\nforward+backward, exact time / LSH time (> 1: LSH faster):");
    for (ek, edev, edt) in &exact_kinds {
        for (lk, ldt) in &lsh_kinds {
            let mut pairs: Vec<(usize, f64)> = Vec::new();
            for e in all
                .iter()
                .filter(|r| &r.kind == ek && &r.device == edev && &r.dtype == edt)
            {
                if let Some(l) = rows
                    .iter()
                    .find(|r| &r.kind == lk && &r.dtype == ldt && r.len == e.len && r.ok())
                {
                    if let (Some(te), Some(tl)) = (e.fwd_bwd_s, l.fwd_bwd_s) {
                        pairs.push((e.len, te / tl));
                    }
                }
            }
            pairs.sort_by_key(|p| p.0);
            if pairs.is_empty() {
                continue;
            }
            let crossover = (0..pairs.len())
                .find(|&i| pairs[i..].iter().all(|p| p.1 > 1.0))
                .map(|i| format!("2^{}", pairs[i].0.trailing_zeros()))
                .unwrap_or_else(|| "none measured".into());
            let at = |log2: u32| {
                pairs
                    .iter()
                    .find(|p| p.0 == 1 << log2)
                    .map(|p| format!("{:.1}x", p.1))
                    .unwrap_or_else(|| "-".into())
            };
            let (last_len, last_ratio) = pairs[pairs.len() - 1];
            let lsh_tag = if ldt.is_empty() {
                String::new()
            } else {
                format!(" [{ldt}]")
            };
            outln!(
                "  {ek} {} vs {lk}{lsh_tag}: crossover {crossover}; at 2^16 {}; at 2^19 {}; \
                 longest common 2^{} {:.1}x",
                device_tag(edev, edt),
                at(16),
                at(19),
                last_len.trailing_zeros(),
                last_ratio
            );
        }
    }
}

fn write_outputs(
    args: &Args,
    backend: &Backend,
    rows: &[Row],
    also: &[Row],
) -> Result<(), BoxError> {
    let mut csv = String::from(CSV_HEADER);
    csv.push('\n');
    for r in rows {
        csv.push_str(&csv_line(r));
        csv.push('\n');
    }
    let lines: Vec<String> = rows.iter().map(|r| format!("  {}", r.to_json())).collect();
    let json = format!("[\n{}\n]", lines.join(",\n"));
    let write = |name: &str, text: &str| {
        let path = args.out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write("attention.csv", &csv)?;
    write("attention.json", &(json + "\n"))?;
    let chart: Vec<&Row> = rows.iter().chain(also).collect();
    let title = if backend.is_gpu() {
        format!("GPU: {}, {}", backend.name(), args.dtype.name())
    } else {
        "CPU".to_string()
    };
    write("attention.svg", &svg_chart(&chart, &title))?;
    Ok(())
}

/// A log–log chart of forward+backward time per token against length, one line per kind
/// (and device, and dtype, when the rows come from more than one).
fn svg_chart(rows: &[&Row], title: &str) -> String {
    let rows: Vec<&Row> = rows.iter().copied().filter(|r| r.ok()).collect();
    let distinct = |f: fn(&Row) -> &str| {
        let mut v: Vec<&str> = rows.iter().map(|r| f(r)).collect();
        v.sort();
        v.dedup();
        v.len()
    };
    let n_devices = distinct(|r| r.device.as_str());
    let n_dtypes = distinct(|r| r.dtype.as_str());
    let label = |r: &Row| {
        let mut tags: Vec<String> = Vec::new();
        if n_devices > 1 {
            tags.push(r.device.chars().take(24).collect());
        }
        if n_dtypes > 1 && !r.dtype.is_empty() {
            tags.push(r.dtype.clone());
        }
        if tags.is_empty() {
            r.kind.clone()
        } else {
            format!("{} [{}]", r.kind, tags.join(", "))
        }
    };
    let mut labels: Vec<String> = rows.iter().map(|r| label(r)).collect();
    labels.sort();
    labels.dedup();
    let series: Vec<Series> = labels
        .into_iter()
        .map(|name| Series {
            points: rows
                .iter()
                .filter(|r| label(r) == name)
                .filter_map(|r| r.fwd_bwd_s.map(|t| (r.len as f64, 1e6 * t / r.len as f64)))
                .collect(),
            label: name,
        })
        .collect();
    let title = format!("Attention forward+backward time per token ({title}, log–log)");
    let axes = Axes {
        title: &title,
        x: "sequence length N",
        y: "time per token",
        y_unit: "µs",
    };
    loglog_svg(&series, &axes)
}
