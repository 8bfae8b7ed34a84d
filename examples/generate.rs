//! Samples text from a trained checkpoint.
//!
//! ```text
//! cargo run --release --example generate -- --checkpoint runs/train_text/checkpoint.safetensors \
//!     --prompt "ROMEO." --tokens 400 --temperature 0.8 --top-k 40
//! ```
//!
//! The prompt (`--prompt`, or any bytes from `--prompt-file`) is prefilled once, then each
//! byte is one step of the incremental decoder with per-layer caches (`reformer::decode`);
//! `--no-cache` re-runs the full forward for every byte instead, for comparison. Bytes are
//! written as they are chosen; when the reader goes away (`generate ... | head -c 10`)
//! generation stops at once. Prefill and decode speeds are printed at the end (stderr). A
//! prompt longer than the model's positions is cut to its last bytes, and a generation longer
//! than they allow slides its window (`SampleOptions::slide`), each with a notice.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use reformer::cli::{self, CliError, Interval, SampleEnd};
use reformer::{CpuBackend, ReformerLm, SampleOptions};
use reformer_engine::MemoryPool;

/// A status line on stderr; a closed stderr is ignored.
macro_rules! say {
    ($($t:tt)*) => {
        cli::errln(format_args!($($t)*))
    };
}

#[derive(Parser, Debug)]
#[command(about = "Generate text with a trained byte-level Reformer checkpoint")]
struct Args {
    /// Checkpoint written by train_text.
    #[arg(long, default_value = cli::DEFAULT_CHECKPOINT)]
    checkpoint: PathBuf,
    /// Text to continue (escape sequences are not interpreted); at least one byte.
    #[arg(long, default_value = "\n", conflicts_with = "prompt_file")]
    prompt: String,
    /// Continue the bytes of this file instead (any bytes, not only UTF-8).
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Re-run the full forward over the whole text for every byte (no decoding caches).
    #[arg(long)]
    no_cache: bool,
    /// Bytes to generate.
    #[arg(long, default_value_t = 300, allow_negative_numbers = true,
          value_parser = cli::int_parser(0usize, None))]
    tokens: usize,
    /// Softmax temperature, in [0, 100] (0: always the most likely byte).
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true,
          value_parser = cli::f32_parser(Interval::closed(0.0, 100.0)))]
    temperature: f32,
    /// Sample among the k most likely bytes, 0..=256 (0: all 256).
    #[arg(long, default_value_t = 40, allow_negative_numbers = true,
          value_parser = cli::int_parser(0usize, Some(256)))]
    top_k: usize,
    /// LSH hash rounds, 1..=64 (default: the model's eval rounds).
    #[arg(long, allow_negative_numbers = true, value_parser = cli::int_parser(1usize, Some(64)))]
    rounds: Option<usize>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = cli::int_parser(0u64, None))]
    seed: u64,
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

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let prompt = match &args.prompt_file {
        Some(path) => std::fs::read(path).map_err(|e| {
            CliError::flag("--prompt-file", path.display().to_string(), e.to_string())
        })?,
        None => args.prompt.as_bytes().to_vec(),
    };
    if prompt.is_empty() {
        let flag = if args.prompt_file.is_some() {
            "--prompt-file"
        } else {
            "--prompt"
        };
        return Err(CliError::flag(flag, "", "expected at least one byte to continue").into());
    }
    let ck = cli::load_checkpoint(&args.checkpoint)?;
    let backend = CpuBackend::new(&MemoryPool::unlimited());
    let mut model = ReformerLm::from_checkpoint(backend, &ck)?;
    model.drop_optimizer_state();
    say!(
        "{}: step {}, {} layers, d_model {}",
        args.checkpoint.display(),
        ck.state.step,
        ck.config.n_layers,
        ck.config.d_model
    );
    let max_len = ck.config.max_len();
    if prompt.len() > max_len {
        say!(
            "notice: the prompt has {} bytes, more than the model's context of {max_len}: only \
             its last {max_len} bytes condition the sample",
            prompt.len()
        );
    }
    if (prompt.len().min(max_len) + args.tokens).saturating_sub(1) > max_len {
        say!(
            "notice: the window slides: whenever the model's {max_len} positions are full, \
             generation goes on from the last {} bytes",
            (max_len / 2).max(1)
        );
    }
    let opts = SampleOptions {
        temperature: args.temperature,
        top_k: args.top_k,
        rounds: args.rounds,
        seed: args.seed,
        cache: !args.no_cache,
        slide: true,
    };
    let mut out = std::io::stdout().lock();
    // A reader that went away (e.g. `| head -c 10`) ends the run quietly: nothing is lost.
    if out.write_all(&prompt).and_then(|_| out.flush()).is_err() {
        return Ok(());
    }
    let (end, stats) =
        cli::sample_to(&mut model, &prompt, args.tokens, &opts, &mut out, &|| false)?;
    if end == SampleEnd::Done {
        let _ = writeln!(out);
    }
    say!(
        "prefill: {} bytes in {:.3} s ({:.0} bytes/s); decode: {} bytes in {:.3} s ({:.1} \
         bytes/s){}",
        stats.prefill_bytes,
        stats.prefill_secs,
        stats.prefill_rate(),
        stats.decode_bytes,
        stats.decode_secs,
        stats.decode_rate(),
        if args.no_cache {
            ", without caches"
        } else {
            ""
        }
    );
    Ok(())
}
