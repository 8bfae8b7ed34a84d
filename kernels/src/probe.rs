//! Whether a CUDA GPU is usable on this machine: the driver and NVRTC load, the device exists,
//! a context opens, and the driver is new enough to load what this NVRTC compiles (the same
//! major version for CUBIN, the default; major and minor for PTX).

use cudarc::driver::sys::CUresult;
use cudarc::driver::{CudaContext, DriverError};

use crate::compile::{check_ptx_loadable, image_kind, ImageKind};
pub use crate::error::KernelsError;
use crate::libs::{self, Library};

/// What the probe found.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_bytes: usize,
    pub free_bytes: usize,
    /// Compute capability (major, minor), e.g. (9, 0) for an H100.
    pub compute_capability: (i32, i32),
    /// CUDA version the driver supports, e.g. (13, 0).
    pub driver_version: (i32, i32),
    /// Version of the NVRTC that compiles the kernels.
    pub nvrtc_version: (i32, i32),
}

impl GpuInfo {
    /// The NVRTC architecture of this device, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
}

/// Looks for a usable GPU at `ordinal`. Never panics: a missing library, a missing device or a
/// driver error is an `Err` that says what is wrong.
pub fn probe(ordinal: usize) -> Result<GpuInfo, KernelsError> {
    libs::ensure(Library::Driver)?;
    libs::ensure(Library::Nvrtc)?;
    let nvrtc_version = libs::nvrtc_version()?;
    let driver_version = libs::driver_version()?;
    check_versions(nvrtc_version, driver_version, image_kind()?)?;
    libs::guarded("libcuda", || {
        let count = CudaContext::device_count().map_err(|e| driver_err(e, ordinal))?;
        if ordinal >= usize::try_from(count).unwrap_or(0) {
            return Err(KernelsError::NoDevice(ordinal));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err(e, ordinal))?;
        let name = ctx.name().map_err(|e| driver_err(e, ordinal))?;
        let (free_bytes, total_bytes) = ctx.mem_get_info().map_err(|e| driver_err(e, ordinal))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| driver_err(e, ordinal))?;
        Ok(GpuInfo {
            ordinal,
            name,
            total_bytes,
            free_bytes,
            compute_capability,
            driver_version,
            nvrtc_version,
        })
    })
}

/// Whether a driver supporting CUDA `driver` can load what NVRTC `nvrtc` builds as `kind`:
/// machine code (CUBIN) needs the same major version (CUDA's minor-version compatibility); PTX
/// needs a driver at least as new in major and minor (a 13.0 driver cannot JIT 13.1's PTX).
pub fn check_versions(
    nvrtc: (i32, i32),
    driver: (i32, i32),
    kind: ImageKind,
) -> Result<(), KernelsError> {
    let too_old = || KernelsError::DriverTooOld {
        driver: format!("{}.{}", driver.0, driver.1),
        nvrtc: format!("{}.{}", nvrtc.0, nvrtc.1),
    };
    match kind {
        ImageKind::Cubin if driver.0 < nvrtc.0 => Err(too_old()),
        ImageKind::Cubin => Ok(()),
        ImageKind::Ptx => check_ptx_loadable(nvrtc, driver),
    }
}

fn driver_err(e: DriverError, ordinal: usize) -> KernelsError {
    match e.0 {
        CUresult::CUDA_ERROR_NO_DEVICE | CUresult::CUDA_ERROR_INVALID_DEVICE => {
            KernelsError::NoDevice(ordinal)
        }
        _ => KernelsError::Cuda(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics() {
        // On a machine without a GPU this is an error naming the missing piece; with one, an
        // answer. Either way no panic.
        match probe(0) {
            Ok(info) => {
                assert!(info.total_bytes > 0);
                assert!(info.arch().starts_with("sm_"));
            }
            Err(e) => {
                eprintln!("probe(0): {e}");
                assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn a_newer_minor_nvrtc_is_fine_for_cubin_but_not_for_ptx() {
        assert!(check_versions((13, 1), (13, 0), ImageKind::Cubin).is_ok());
        assert!(check_versions((13, 0), (13, 0), ImageKind::Ptx).is_ok());
        assert!(matches!(
            check_versions((13, 1), (13, 0), ImageKind::Ptx),
            Err(KernelsError::DriverTooOld { .. })
        ));
        assert!(matches!(
            check_versions((13, 0), (12, 8), ImageKind::Cubin),
            Err(KernelsError::DriverTooOld { .. })
        ));
    }

    #[test]
    fn arch_formats_compute_capability() {
        let info = GpuInfo {
            ordinal: 0,
            name: "test".into(),
            total_bytes: 1,
            free_bytes: 1,
            compute_capability: (8, 6),
            driver_version: (13, 0),
            nvrtc_version: (13, 0),
        };
        assert_eq!(info.arch(), "sm_86");
    }
}
