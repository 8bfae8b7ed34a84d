//! The model on a device. [`DeviceLm`] runs the same computation as [`crate::ReformerLm`]
//! (forward, recomputing reversible backward, chunked loss, Adam) against the [`Backend`]
//! trait, whose implementations are
//!
//! * [`CudaBackend`]: the hand-written kernels of `reformer-kernels` and cuBLAS, on a GPU;
//! * [`HostBackend`]: the kernels' CPU twins, so that the device model's orchestration (row
//!   blocks, head groups, reconstruction, gradient flow) is tested against the reference model
//!   on every machine, GPU or not.
//!
//! The CPU reference (`reformer-reversible` and [`crate::ReformerLm`]) stays the numerical
//! ground truth: `tests/device_model_host.rs` compares the host backend with it, and
//! `tests/gpu_parity_model.rs` the CUDA backend with it on a GPU.
//!
//! Activation storage is a backend choice (`with_act_dtype`): f32, or bf16 for the head-layout
//! activations ([`Backend::Act`]: q, k, v, the attention output and its gradient), which the
//! kernels widen to f32 as they load them. `tests/device_bf16_host.rs` states how far bf16 may
//! move the losses and gradients from f32; [`DevicePlan::with_act_dtype`] plans either.

pub mod backend;
pub mod cuda;
pub mod host;
mod layers;
pub mod model;
pub mod plan;
pub mod select;
pub mod train;

pub use backend::{AdamHp, AxialTables, Backend, DType, HeadShape, Strided};
pub use cuda::{ActBuf, CudaBackend};
pub use host::HostBackend;
pub use model::{param_specs, DeviceLm};
pub use plan::{DevicePlan, PlanBackend};
pub use select::{select, DeviceRequest, Runner};
pub use train::DeviceTrainer;
