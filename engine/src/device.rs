//! Where tensors live and ops run.

use std::fmt;

/// A compute device. `Cpu` is always available and is the numerical reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    /// The first CUDA device if one answers the probe; otherwise the CPU, after printing one
    /// line that says why.
    pub fn cuda_if_available() -> Device {
        match reformer_kernels::probe(0) {
            Ok(info) => {
                eprintln!("using CUDA device 0: {}", info.name);
                Device::Cuda(0)
            }
            Err(e) => {
                eprintln!("no usable GPU ({e}); running on the CPU");
                Device::Cpu
            }
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}
