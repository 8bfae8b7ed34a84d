//! CUDA kernels (hand-written CUDA C, compiled with NVRTC at first use) and the probe that says
//! whether a GPU is usable. Nothing here panics when CUDA is missing: every entry point answers
//! with an error that says what is missing.
//!
//! - [`probe`]: is there a usable GPU (driver, NVRTC, device, context)?
//! - [`compile`] / [`compile_all`]: NVRTC compilation of the kernel families to PTX and CUBIN
//!   (what the driver loads), cached per (family, architecture).
//! - [`sources`]: the `.cu` files and the kernel names launch wrappers look up.
//! - [`geometry`]: the launch geometry the kernels are written for.
//! - [`gpu`]: the host side of the CUDA backend — device context, counted device memory, safe
//!   launch wrappers, cuBLAS matrix products, and the attention API mirroring `reformer-lsh`.

pub mod compile;
pub mod error;
pub mod geometry;
pub mod gpu;
pub mod include_dir;
pub mod libs;
pub mod probe;
pub mod sources;

pub use compile::{
    compile, compile_all, compile_source, compile_source_images, image_kind, CompiledFamily,
    ImageKind,
};
pub use error::KernelsError;
pub use gpu::{DeviceBuffer, GpuContext};
pub use libs::{cublas_version, loaded_path, nvrtc_version, Library};
pub use probe::{probe, GpuInfo};
pub use sources::{names, KernelFamily};
