//! Samples text from a trained checkpoint.
//!
//! ```text
//! cargo run --release --example generate -- --checkpoint runs/train_text/checkpoint.safetensors \
//!     --prompt "ROMEO." --tokens 400 --temperature 0.8 --top-k 40
//! ```
//!
//! Each byte re-runs the forward pass over the growing context (see `reformer::generate`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use reformer::{checkpoint, generate, CpuBackend, ReformerLm, SampleOptions};
use reformer_engine::MemoryPool;

#[derive(Parser, Debug)]
#[command(about = "Generate text with a trained byte-level Reformer checkpoint")]
struct Args {
    /// Checkpoint written by train_text.
    #[arg(long, default_value = "runs/train_text/checkpoint.safetensors")]
    checkpoint: PathBuf,
    /// Text to continue (escape sequences are not interpreted).
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// Bytes to generate.
    #[arg(long, default_value_t = 300)]
    tokens: usize,
    /// Softmax temperature (0: always the most likely byte).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the k most likely bytes (0: all 256).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// LSH hash rounds (default: the model's eval rounds).
    #[arg(long)]
    rounds: Option<usize>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
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

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let ck = checkpoint::load(&args.checkpoint)?;
    let backend = CpuBackend::new(&MemoryPool::unlimited());
    let mut model = ReformerLm::from_checkpoint(backend, &ck)?;
    model.drop_optimizer_state();
    eprintln!(
        "{}: step {}, {} layers, d_model {}",
        args.checkpoint.display(),
        ck.state.step,
        ck.config.n_layers,
        ck.config.d_model
    );
    let opts = SampleOptions {
        temperature: args.temperature,
        top_k: args.top_k,
        rounds: args.rounds,
        seed: args.seed,
    };
    let prompt = args.prompt.as_bytes();
    let mut out = std::io::stdout().lock();
    out.write_all(prompt)?;
    out.flush()?;
    generate(&mut model, prompt, args.tokens, &opts, |b| {
        let _ = out.write_all(&[b]);
        let _ = out.flush();
    })?;
    writeln!(out)?;
    Ok(())
}
