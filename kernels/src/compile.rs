//! NVRTC compilation of the kernel families to PTX, cached per (family, architecture) for the
//! life of the process.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};

use crate::error::KernelsError;
use crate::include_dir::find_cuda_include;
use crate::libs::{self, Library};
use crate::sources::{includes_cuda_headers, KernelFamily};

/// One family compiled for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledFamily {
    pub family: KernelFamily,
    pub arch: String,
    /// The PTX text (what `CudaContext::load_module` loads).
    pub ptx: String,
}

impl CompiledFamily {
    /// The PTX in the form cudarc loads.
    pub fn to_ptx(&self) -> Ptx {
        Ptx::from_src(self.ptx.clone())
    }
}

type Cache = Mutex<HashMap<(KernelFamily, String), Arc<CompiledFamily>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Checks an NVRTC architecture name: `sm_XY` or `compute_XY`, optionally with a suffix letter
/// (`sm_90a`).
pub fn validate_arch(arch: &str) -> Result<(), KernelsError> {
    let digits = arch
        .strip_prefix("sm_")
        .or_else(|| arch.strip_prefix("compute_"))
        .map(|rest| rest.trim_end_matches(|c: char| c.is_ascii_lowercase()))
        .unwrap_or("");
    if digits.len() >= 2 && digits.chars().all(|c| c.is_ascii_digit()) {
        Ok(())
    } else {
        Err(KernelsError::InvalidArch(arch.to_string()))
    }
}

/// The NVRTC options for program `name` on `arch`: the architecture, C++17, line info, and
/// the CUDA include folder when the program includes CUDA headers.
fn options(name: &str, arch: &str, needs_headers: bool) -> Result<CompileOptions, KernelsError> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-lineinfo".to_string(),
    ];
    if needs_headers {
        let dir = find_cuda_include()?;
        opts.push(format!("--include-path={}", dir.display()));
    }
    Ok(CompileOptions {
        options: opts,
        name: Some(name.to_string()),
        ..Default::default()
    })
}

/// Compiles CUDA source `source` (named `name` in messages) for `arch` and returns its PTX.
/// Not cached: the kernel families go through [`compile`]; this serves tests and one-off
/// programs.
pub fn compile_source(
    name: &'static str,
    source: &str,
    arch: &str,
) -> Result<String, KernelsError> {
    validate_arch(arch)?;
    libs::ensure(Library::Nvrtc)?;
    let opts = options(name, arch, includes_cuda_headers(source))?;
    let ptx = libs::guarded("libnvrtc", || {
        compile_ptx_with_opts(source, opts).map_err(|e| compile_error(name, arch, e))
    })?;
    ptx_text(&ptx, name)
}

/// Compiles `family` for `arch` (e.g. `sm_90`), or returns the cached result.
pub fn compile(family: KernelFamily, arch: &str) -> Result<Arc<CompiledFamily>, KernelsError> {
    validate_arch(arch)?;
    let key = (family, arch.to_string());
    if let Some(hit) = lock(cache()).get(&key) {
        return Ok(Arc::clone(hit));
    }
    // Compiling outside the lock lets families compile in parallel; two threads racing on the
    // same key both compile and the first insert wins, which is harmless.
    let ptx = compile_source(family.name(), &family.program_source(), arch)?;
    let compiled = Arc::new(CompiledFamily {
        family,
        arch: arch.to_string(),
        ptx,
    });
    Ok(Arc::clone(lock(cache()).entry(key).or_insert(compiled)))
}

/// Compiles every family for `arch`; returns (family name, PTX length in bytes) per family.
/// Every family is tried; all failures are reported together, each with its NVRTC log.
pub fn compile_all(arch: &str) -> Result<Vec<(&'static str, usize)>, KernelsError> {
    validate_arch(arch)?;
    libs::ensure(Library::Nvrtc)?;
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for family in KernelFamily::ALL {
        match compile(family, arch) {
            Ok(c) => done.push((family.name(), c.ptx.len())),
            Err(e) => failed.push(e),
        }
    }
    match failed.len() {
        0 => Ok(done),
        1 => Err(failed.remove(0)),
        _ => Err(KernelsError::CompileFailures(failed)),
    }
}

fn lock(
    cache: &Cache,
) -> std::sync::MutexGuard<'_, HashMap<(KernelFamily, String), Arc<CompiledFamily>>> {
    // A panic while holding the lock cannot leave the map half-updated (single insert), so a
    // poisoned lock is still usable.
    cache.lock().unwrap_or_else(PoisonError::into_inner)
}

fn compile_error(name: &'static str, arch: &str, e: CompileError) -> KernelsError {
    match e {
        CompileError::CompileError { log, .. } => KernelsError::Compile {
            family: name,
            arch: arch.to_string(),
            log: log_text(log),
        },
        other => KernelsError::Nvrtc(format!("{name}.cu for {arch}: {other:?}")),
    }
}

fn log_text(log: CString) -> String {
    log.to_string_lossy().trim_end().to_string()
}

/// The PTX text of a compiled image (NUL-terminated ASCII).
fn ptx_text(ptx: &Ptx, name: &str) -> Result<String, KernelsError> {
    let bytes = ptx
        .as_bytes()
        .ok_or_else(|| KernelsError::Nvrtc(format!("{name}: NVRTC returned no PTX image")))?;
    let bytes = bytes.split(|&b| b == 0).next().unwrap_or(&[]);
    String::from_utf8(bytes.to_vec())
        .map_err(|_| KernelsError::Nvrtc(format!("{name}: PTX is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_are_checked() {
        for ok in ["sm_80", "sm_90", "sm_90a", "compute_80", "sm_100"] {
            assert!(validate_arch(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "sm_",
            "sm_8",
            "80",
            "sm80",
            "sm_8x",
            "--gpu-architecture=sm_80",
        ] {
            assert_eq!(
                validate_arch(bad),
                Err(KernelsError::InvalidArch(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn options_name_arch_standard_and_line_info() {
        let opts = options("lsh_attention.cu", "sm_80", false).unwrap();
        assert!(opts
            .options
            .contains(&"--gpu-architecture=sm_80".to_string()));
        assert!(opts.options.contains(&"--std=c++17".to_string()));
        assert!(opts.options.contains(&"-lineinfo".to_string()));
        assert_eq!(opts.name.as_deref(), Some("lsh_attention.cu"));
    }

    #[test]
    fn a_bad_arch_fails_before_nvrtc() {
        assert_eq!(
            compile(KernelFamily::Elementwise, "sm8"),
            Err(KernelsError::InvalidArch("sm8".into()))
        );
    }
}
