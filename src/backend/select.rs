//! Choosing where a program runs, the one policy every example shares. `cpu` always works;
//! `cuda` asked for explicitly and not answered is an error that says why (a figure must never
//! silently come from the CPU); `auto` takes the GPU where one answers, else the CPU after one
//! line saying why. Nothing panics because a CUDA library is missing.

use crate::error::{ReformerError, Result};

/// What a command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The CPU backend.
    Cpu,
    /// The CUDA backend on GPU 0; an error where none answers.
    Cuda,
    /// `Cuda` where a GPU answers, else `Cpu` (one line says why).
    Auto,
}

/// Where the run goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    Cpu,
    Cuda(usize),
}

/// GPU 0, if it answers the probe (one line names it), or why not.
fn cuda() -> std::result::Result<Runner, String> {
    let info = reformer_kernels::probe(0).map_err(|e| e.to_string())?;
    eprintln!("using CUDA device 0: {}", info.name);
    Ok(Runner::Cuda(0))
}

/// Resolves `req`, probing for a GPU where it matters and printing one line about the outcome.
pub fn select(req: DeviceRequest) -> Result<Runner> {
    match req {
        DeviceRequest::Cpu => {
            eprintln!("device: cpu");
            Ok(Runner::Cpu)
        }
        DeviceRequest::Auto => Ok(cuda().unwrap_or_else(|e| {
            eprintln!("device: no usable GPU ({e}); running on the CPU");
            Runner::Cpu
        })),
        DeviceRequest::Cuda => cuda().map_err(|e| {
            ReformerError::InvalidArgument(format!(
                "--device cuda: no usable GPU ({e}); use --device cpu or --device auto to run on \
                 the CPU"
            ))
        }),
    }
}
