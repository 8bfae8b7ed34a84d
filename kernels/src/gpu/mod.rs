//! The host side of the CUDA backend: a device context ([`GpuContext`]), counted device memory
//! ([`DeviceBuffer`], [`DevicePool`]), safe launch wrappers for every kernel family ([`ops`]),
//! dense matrix products through cuBLAS ([`ops::matmul`]) and the attention API that mirrors the
//! CPU one in `reformer-lsh` ([`attention`]).
//!
//! Everything here compiles and links on a machine without CUDA (the libraries are loaded at
//! run time) and never panics there: [`GpuContext::new`] answers with an error that names
//! what is missing. Each wrapper checks buffer sizes and launch limits on the host before it
//! launches, so a kernel never sees extents its buffers do not have.

pub mod attention;
pub mod context;
pub mod launch;
pub mod memory;
pub mod ops;
pub mod testing;

pub use context::GpuContext;
pub use half::bf16;
pub use memory::{ActElem, DeviceBuffer, DeviceElem, DevicePool, MemoryAccount, MemoryReport};

use cudarc::driver::DriverError;

use crate::error::KernelsError;

/// A driver error, with the operation it came from.
pub(crate) fn driver_error(op: &str, e: DriverError) -> KernelsError {
    KernelsError::Cuda(format!("{op}: {e}"))
}
