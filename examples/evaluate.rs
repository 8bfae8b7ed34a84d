//! Bits per byte of a checkpoint on any file: held-out evaluation on evenly spaced windows of a
//! stated length (default: the checkpoint's training length), the hash rounds as an option.
//!
//! ```text
//! cargo run --release --example evaluate -- --checkpoint runs/train_text/checkpoint.safetensors \
//!     --text held-out.txt --len 512 --rounds 4
//! ```
//!
//! Prints one line on stdout: `bits_per_byte nats windows len tokens rounds` (tab-separated),
//! and a readable summary on stderr. The library call is `reformer::evaluate::evaluate_file`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use reformer::backend::{select, Backend, CpuBackend, CudaBackend, DeviceRequest, Runner};
use reformer::checkpoint::Checkpoint;
use reformer::cli::{self, CliError};
use reformer::evaluate::{self, EvalOptions};
use reformer::ReformerLm;
use reformer_engine::MemoryPool;

macro_rules! say {
    ($($t:tt)*) => {
        cli::errln(format_args!($($t)*))
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

#[derive(Parser, Debug)]
#[command(about = "Bits per byte of a byte-level Reformer checkpoint on a text file")]
struct Args {
    /// Checkpoint written by train_text.
    #[arg(long, default_value = cli::DEFAULT_CHECKPOINT)]
    checkpoint: PathBuf,
    /// File to evaluate on (any bytes; all of it is held out).
    #[arg(long)]
    text: PathBuf,
    /// Tokens per window [default: the checkpoint's training length]; the file must hold one
    /// window of len + 1 bytes. Figures compare only at equal lengths.
    #[arg(long, allow_negative_numbers = true, value_parser = cli::int_parser(1usize, None))]
    len: Option<usize>,
    /// Windows, evenly spaced over the file [default: 16384 tokens' worth, at least 4; at most
    /// those that fit].
    #[arg(long, allow_negative_numbers = true, value_parser = cli::int_parser(1usize, None))]
    windows: Option<usize>,
    /// LSH hash rounds, 1..=64 [default: the model's eval rounds].
    #[arg(long, allow_negative_numbers = true, value_parser = cli::int_parser(1usize, Some(64)))]
    rounds: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true,
          value_parser = cli::int_parser(1usize, Some(65536)))]
    batch: usize,
    /// Where to run: cpu, cuda, or auto.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
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
    cli::check_input_file("--text", &args.text)?;
    let ck = cli::load_checkpoint(&args.checkpoint)?;
    let len = args.len.unwrap_or(ck.state.seq_len);
    let max = ck.config.max_len();
    if len > max {
        return Err(CliError::flag(
            "--len",
            len,
            format!("expected a whole number in 1..={max}, the checkpoint's capacity"),
        )
        .into());
    }
    if len > ck.state.seq_len {
        say!(
            "notice: --len {len} is longer than the checkpoint's training windows ({}): \
             positions past them keep their untrained embeddings",
            ck.state.seq_len
        );
    }
    let opts = EvalOptions {
        len,
        windows: args.windows,
        rounds: args.rounds,
        batch: args.batch,
    };
    let req = match args.device {
        DeviceArg::Cpu => DeviceRequest::Cpu,
        DeviceArg::Cuda => DeviceRequest::Cuda,
        DeviceArg::Auto => DeviceRequest::Auto,
    };
    match select(req)? {
        Runner::Cpu => measure(CpuBackend::new(&MemoryPool::unlimited()), &ck, args, &opts),
        Runner::Cuda(ordinal) => measure(CudaBackend::new(ordinal, None)?, &ck, args, &opts),
    }
}

fn measure<B: Backend>(b: B, ck: &Checkpoint, args: &Args, opts: &EvalOptions) -> AnyResult<()> {
    let mut lm = ReformerLm::from_checkpoint(b, ck)?;
    lm.drop_optimizer_state();
    let e = evaluate::evaluate_file(&mut lm, &args.text, opts)?;
    say!(
        "{} (step {}) on {}: {:.4} bits/byte ({:.4} nats) over {} windows of {} tokens, {} hash \
         rounds",
        args.checkpoint.display(),
        ck.state.step,
        args.text.display(),
        e.bits_per_byte(),
        e.loss,
        e.windows,
        e.len,
        e.rounds
    );
    cli::outln(format_args!(
        "{:.6}\t{:.6}\t{}\t{}\t{}\t{}",
        e.bits_per_byte(),
        e.loss,
        e.windows,
        e.len,
        e.tokens,
        e.rounds
    ));
    Ok(())
}
