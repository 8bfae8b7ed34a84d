//! Choosing where a program runs, the one policy both examples share: the CPU reference, the
//! device model on a GPU, or the device model on the kernels' CPU twins. A GPU that is asked for
//! but does not answer is one line and the CPU, never a panic.

use reformer_engine::Device;

/// What a command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The reference CPU model.
    Cpu,
    /// The device model on the GPU; the CPU (one line says why) where none answers.
    Cuda,
    /// `Cuda` where a GPU answers, else `Cpu`.
    Auto,
    /// The device model on the kernels' CPU twins.
    Twin,
}

/// What runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    Reference,
    Cuda(usize),
    Twin,
}

impl Runner {
    /// The device the run's memory lives on.
    pub fn device(&self) -> Device {
        match self {
            Runner::Cuda(i) => Device::Cuda(*i),
            Runner::Reference | Runner::Twin => Device::Cpu,
        }
    }
}

/// Resolves `req`, probing for a GPU where it matters and printing one line about it.
pub fn select(req: DeviceRequest) -> Runner {
    match req {
        DeviceRequest::Cpu => Runner::Reference,
        DeviceRequest::Twin => Runner::Twin,
        DeviceRequest::Auto => match Device::cuda_if_available() {
            Device::Cuda(i) => Runner::Cuda(i),
            Device::Cpu => Runner::Reference,
        },
        DeviceRequest::Cuda => match reformer_kernels::probe(0) {
            Ok(info) => {
                eprintln!("using CUDA device 0: {}", info.name);
                Runner::Cuda(0)
            }
            Err(e) => {
                eprintln!("--device cuda: no usable GPU ({e}); running on the CPU");
                Runner::Reference
            }
        },
    }
}
