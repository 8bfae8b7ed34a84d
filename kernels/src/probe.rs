//! Whether a CUDA GPU is usable on this machine.

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
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_bytes: usize,
    pub free_bytes: usize,
}

/// Looks for a usable GPU. Stub until the CUDA backend lands: always answers "missing".
pub fn probe(_ordinal: usize) -> Result<GpuInfo, KernelsError> {
    Err(KernelsError::MissingLibrary(
        "libcuda.so (CUDA backend not built)".into(),
    ))
}
