//! Errors of the kernels crate. Each names what is missing or what failed, and what to do.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum KernelsError {
    #[error(
        "CUDA library {0} not found; install the NVIDIA driver/CUDA 13 or set LD_LIBRARY_PATH"
    )]
    MissingLibrary(String),
    #[error("no CUDA device with ordinal {0}")]
    NoDevice(usize),
    #[error("CUDA error: {0}")]
    Cuda(String),
    #[error(
        "the NVIDIA driver supports CUDA {driver}, older than the NVRTC that compiles the kernels \
         (CUDA {nvrtc}): update the driver, or put an NVRTC no newer than the driver first on \
         LD_LIBRARY_PATH (PTX needs major and minor no newer; the default CUBIN images only the \
         same major: unset REFORMER_KERNEL_IMAGE=ptx)"
    )]
    DriverTooOld { driver: String, nvrtc: String },
    #[error(
        "CUDA headers (cuda_bf16.h) not found: set REFORMER_CUDA_INCLUDE to a CUDA include folder \
         (scripts/install-nvrtc.sh prints one); searched {searched:?}"
    )]
    HeadersNotFound { searched: Vec<PathBuf> },
    #[error("invalid GPU architecture {0:?}: expected sm_XY or compute_XY, e.g. sm_80")]
    InvalidArch(String),
    #[error("NVRTC failed to compile {family}.cu for {arch}:\n{log}")]
    Compile {
        family: &'static str,
        arch: String,
        log: String,
    },
    #[error("NVRTC error: {0}")]
    Nvrtc(String),
    #[error(
        "cudarc panicked inside {library}: {message} (a missing symbol means the library is \
         older than the CUDA 13 API this build expects)"
    )]
    LibraryPanic {
        library: &'static str,
        message: String,
    },
    #[error("{} kernel families failed to compile:\n{}", .0.len(), join_errors(.0))]
    CompileFailures(Vec<KernelsError>),
    #[error(
        "device memory budget exceeded: requested {requested} bytes with {live} bytes live, \
         budget {budget} bytes; lower the sequence length or batch, or raise the budget"
    )]
    OutOfMemory {
        requested: usize,
        live: usize,
        budget: usize,
    },
    #[error("shape mismatch in {op}: got {got:?}, expected {expected:?}")]
    Shape {
        op: &'static str,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("invalid argument to {op}: {msg}")]
    InvalidArgument { op: &'static str, msg: String },
    #[error("cuBLAS error in {op}: {status}")]
    Cublas { op: &'static str, status: String },
}

fn join_errors(errors: &[KernelsError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n\n")
}
