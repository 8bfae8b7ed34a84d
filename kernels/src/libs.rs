//! Loading the CUDA shared libraries without panicking.
//!
//! cudarc loads libcuda and libnvrtc lazily (feature `fallback-dynamic-loading`) and panics
//! when a library is missing. Every entry point of this crate first calls [`ensure`], which
//! asks cudarc whether one of its candidate names loads (`is_culib_present`) before the first
//! real load, and runs that load under `catch_unwind` as a second line of defence. The answer
//! is cached for the process.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use crate::error::KernelsError;

/// A CUDA library this crate loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// The driver API, `libcuda.so.1` (ships with the NVIDIA driver).
    Driver,
    /// The runtime compiler, `libnvrtc.so.13` (CUDA toolkit or the `nvidia-cuda-nvrtc` wheel).
    Nvrtc,
    /// Dense linear algebra, `libcublas.so.13` (CUDA toolkit or the `nvidia-cublas` wheel);
    /// loaded only when a matrix product first runs on the GPU.
    Cublas,
}

impl Library {
    /// What the error message names.
    fn describe(self) -> &'static str {
        match self {
            Library::Driver => "libcuda.so.1 (the NVIDIA driver; no GPU driver on this machine?)",
            Library::Nvrtc => {
                "libnvrtc.so.13 (NVRTC; scripts/install-nvrtc.sh installs it and prints the \
                 LD_LIBRARY_PATH to export)"
            }
            Library::Cublas => {
                "libcublas.so.13 (cuBLAS; install the CUDA 13 toolkit or the nvidia-cublas wheel \
                 and put its lib folder on LD_LIBRARY_PATH)"
            }
        }
    }

    fn present(self) -> bool {
        // SAFETY: `is_culib_present` dlopens each candidate name and drops the handle; the only
        // code it runs is the library's own initialisers, which are sound to run (and what any
        // later use runs anyway).
        unsafe {
            match self {
                Library::Driver => cudarc::driver::sys::is_culib_present(),
                Library::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Library::Cublas => cudarc::cublas::sys::is_culib_present(),
            }
        }
    }

    fn load(self) {
        // SAFETY: as above; `culib` keeps the handle in a process-wide static, so symbols
        // resolved from it stay valid for the life of the process.
        unsafe {
            match self {
                Library::Driver => {
                    cudarc::driver::sys::culib();
                }
                Library::Nvrtc => {
                    cudarc::nvrtc::sys::culib();
                }
                Library::Cublas => {
                    cudarc::cublas::sys::culib();
                }
            }
        }
    }

    fn check(self) -> Result<(), KernelsError> {
        if !self.present() {
            return Err(KernelsError::MissingLibrary(self.describe().to_string()));
        }
        guarded(self.name(), || {
            self.load();
            Ok(())
        })
        .map_err(|e| KernelsError::MissingLibrary(format!("{} ({e})", self.describe())))
    }

    /// The start of the library's file name (then `.so`), for messages and for
    /// [`loaded_path`].
    pub fn name(self) -> &'static str {
        match self {
            Library::Driver => "libcuda",
            Library::Nvrtc => "libnvrtc",
            Library::Cublas => "libcublas",
        }
    }
}

/// Ok when `lib` is loaded (or loads now); `MissingLibrary` otherwise. Never panics.
pub fn ensure(lib: Library) -> Result<(), KernelsError> {
    static DRIVER: OnceLock<Result<(), KernelsError>> = OnceLock::new();
    static NVRTC: OnceLock<Result<(), KernelsError>> = OnceLock::new();
    static CUBLAS: OnceLock<Result<(), KernelsError>> = OnceLock::new();
    let cell = match lib {
        Library::Driver => &DRIVER,
        Library::Nvrtc => &NVRTC,
        Library::Cublas => &CUBLAS,
    };
    cell.get_or_init(|| lib.check()).clone()
}

/// Runs `f`, turning a panic inside cudarc (a symbol missing from an older library, say) into
/// an error that names `library`.
pub fn guarded<T>(
    library: &'static str,
    f: impl FnOnce() -> Result<T, KernelsError>,
) -> Result<T, KernelsError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(KernelsError::LibraryPanic {
            library,
            message: msg.to_string(),
        })
    })
}

/// The NVRTC version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), KernelsError> {
    ensure(Library::Nvrtc)?;
    guarded("libnvrtc", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: NVRTC is loaded (checked above); both pointers are valid for writes.
        let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        status
            .result()
            .map_err(|e| KernelsError::Nvrtc(format!("nvrtcVersion: {e:?}")))?;
        Ok((major, minor))
    })
}

/// The CUDA version the driver supports, as (major, minor).
pub fn driver_version() -> Result<(i32, i32), KernelsError> {
    ensure(Library::Driver)?;
    guarded("libcuda", || {
        let mut version = 0;
        // SAFETY: the driver library is loaded (checked above); the pointer is valid for writes.
        let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
        status
            .result()
            .map_err(|e| KernelsError::Cuda(format!("cuDriverGetVersion: {e}")))?;
        Ok((version / 1000, (version % 1000) / 10))
    })
}

/// The cuBLAS version as (major, minor, patch), loading libcublas if needed.
pub fn cublas_version() -> Result<(i32, i32, i32), KernelsError> {
    use cudarc::cublas::sys::{cublasGetProperty, cublasStatus_t, libraryPropertyType};
    ensure(Library::Cublas)?;
    guarded("libcublas", || {
        let get = |p: libraryPropertyType| {
            let mut v = 0;
            // SAFETY: cuBLAS is loaded (checked above); the pointer is valid for writes.
            let status = unsafe { cublasGetProperty(p, &mut v) };
            if status == cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                Ok(v)
            } else {
                Err(KernelsError::Cublas {
                    op: "cublasGetProperty",
                    status: format!("{status:?}"),
                })
            }
        };
        Ok((
            get(libraryPropertyType::MAJOR_VERSION)?,
            get(libraryPropertyType::MINOR_VERSION)?,
            get(libraryPropertyType::PATCH_LEVEL)?,
        ))
    })
}

/// The file this process mapped for `lib` (read from `/proc/self/maps`), once it is loaded:
/// which `libnvrtc`, `libcuda` or `libcublas` the loader found, and where. `None` before the
/// library is loaded, or where `/proc` is not there.
pub fn loaded_path(lib: Library) -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    mapped_library(&maps, lib.name())
}

/// The first path in `maps` (`/proc/self/maps` text) whose file name is `<prefix>.so...`.
fn mapped_library(maps: &str, prefix: &str) -> Option<std::path::PathBuf> {
    maps.lines()
        .filter_map(|line| line.find('/').map(|at| line[at..].trim_end()))
        .find(|path| {
            let file = path.rsplit('/').next().unwrap_or("");
            file.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with(".so"))
        })
        .map(std::path::PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error() {
        let r: Result<(), _> = guarded("libtest", || panic!("missing symbol cuFoo"));
        assert_eq!(
            r,
            Err(KernelsError::LibraryPanic {
                library: "libtest",
                message: "missing symbol cuFoo".into()
            })
        );
    }

    #[test]
    fn ensure_answers_without_panicking() {
        for lib in [Library::Driver, Library::Nvrtc, Library::Cublas] {
            match ensure(lib) {
                Ok(()) => {}
                Err(KernelsError::MissingLibrary(what)) => assert!(what.contains(lib.name())),
                Err(other) => panic!("unexpected {other}"),
            }
        }
    }

    #[test]
    fn mapped_libraries_are_found_by_file_name() {
        let maps = "7f00-7f01 r--p 00000000 08:01 1 /usr/lib/libnvrtc-builtins.so.13.0\n\
                    7f01-7f02 r-xp 00000000 08:01 2 /opt/x/nvidia/cu13/lib/libnvrtc.so.13\n\
                    7f02-7f03 r-xp 00000000 08:01 3 /usr/lib/libcublasLt.so.13\n\
                    7f03-7f04 r-xp 00000000 08:01 4 /usr/lib/libcublas.so.13.1.0.3\n\
                    7f04-7f05 rw-p 00000000 00:00 0 [heap]\n";
        assert_eq!(
            mapped_library(maps, "libnvrtc"),
            Some("/opt/x/nvidia/cu13/lib/libnvrtc.so.13".into())
        );
        assert_eq!(
            mapped_library(maps, "libcublas"),
            Some("/usr/lib/libcublas.so.13.1.0.3".into())
        );
        assert_eq!(mapped_library(maps, "libcuda"), None);
    }
}
