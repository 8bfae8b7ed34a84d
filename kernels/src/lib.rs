//! CUDA kernels (compiled with NVRTC at first use) and the probe that says whether a GPU is
//! usable. Nothing here panics when CUDA is missing: the probe answers with an error that
//! says what is missing.

pub mod probe;

pub use probe::{probe, GpuInfo, KernelsError};
