//! NVRTC compilation of the kernel families, cached per (family, architecture) for the life of
//! the process (and, when `REFORMER_KERNEL_CACHE` names a folder, on disk across processes).
//!
//! A family is compiled for the device's real architecture (`sm_90`): NVRTC then returns both
//! the PTX and the CUBIN, the machine code for that architecture. The driver loads the CUBIN
//! ([`ImageKind::Cubin`], the default): no JIT at load time, and no dependence on the driver
//! knowing this NVRTC's PTX version (CUDA's minor-version compatibility covers machine code,
//! not PTX: PTX from NVRTC 13.1 does not load on a 13.0 driver). `REFORMER_KERNEL_IMAGE=ptx`
//! loads the PTX instead, and then the NVRTC's (major, minor) must not pass the driver's.
//!
//! Environment (all optional):
//! - `REFORMER_KERNEL_IMAGE`: `cubin` (default) or `ptx`, what the driver loads;
//! - `REFORMER_NVRTC_OPTIONS`: extra NVRTC options, separated by spaces (e.g. `--fmad=false`);
//! - `REFORMER_KERNEL_CACHE`: a folder where compiled images are kept between processes, keyed
//!   by a hash of the source, architecture, options and NVRTC version (off when unset; a file
//!   that cannot be read or written only costs a compilation).

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

use crate::error::KernelsError;
use crate::include_dir::find_cuda_include;
use crate::libs::{self, Library};
use crate::sources::{includes_cuda_headers, KernelFamily};

/// Selects what the driver loads: `cubin` (default) or `ptx`.
pub const IMAGE_ENV: &str = "REFORMER_KERNEL_IMAGE";
/// Extra NVRTC options, separated by spaces.
pub const OPTIONS_ENV: &str = "REFORMER_NVRTC_OPTIONS";
/// A folder for compiled images shared between processes.
pub const CACHE_ENV: &str = "REFORMER_KERNEL_CACHE";

/// The form of a compiled family the driver loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// Machine code for the device's architecture (no JIT; the default).
    Cubin,
    /// PTX, compiled by the driver's JIT at load time.
    Ptx,
}

impl ImageKind {
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Cubin => "CUBIN",
            ImageKind::Ptx => "PTX",
        }
    }

    /// Parses `cubin` / `ptx` (any case).
    pub fn parse(s: &str) -> Result<Self, KernelsError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cubin" => Ok(ImageKind::Cubin),
            "ptx" => Ok(ImageKind::Ptx),
            _ => Err(KernelsError::InvalidArgument {
                op: IMAGE_ENV,
                msg: format!("{s:?}: expected cubin or ptx"),
            }),
        }
    }
}

/// The image kind the environment asks for (`REFORMER_KERNEL_IMAGE`, default CUBIN).
pub fn image_kind() -> Result<ImageKind, KernelsError> {
    match std::env::var(IMAGE_ENV) {
        Ok(v) if !v.trim().is_empty() => ImageKind::parse(&v),
        _ => Ok(ImageKind::Cubin),
    }
}

/// The extra NVRTC options of `REFORMER_NVRTC_OPTIONS`.
pub fn extra_options() -> Vec<String> {
    std::env::var(OPTIONS_ENV)
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// One family compiled for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledFamily {
    pub family: KernelFamily,
    pub arch: String,
    /// The PTX text.
    pub ptx: String,
    /// The machine code for `arch` (an ELF image); `None` for a virtual architecture
    /// (`compute_XY`), which has PTX only.
    pub cubin: Option<Vec<u8>>,
    /// The NVRTC (major, minor) that compiled it.
    pub nvrtc_version: (i32, i32),
    /// Whether it came from the `REFORMER_KERNEL_CACHE` folder.
    pub from_disk_cache: bool,
}

impl CompiledFamily {
    /// The image the driver should load for `kind` on a driver supporting CUDA
    /// `driver_version`, and what it is (`"CUBIN"` or `"PTX"`). The CUBIN when asked for and
    /// present; otherwise the PTX, which needs a driver at least as new as the NVRTC
    /// (major and minor): else `DriverTooOld`.
    pub fn module_image(
        &self,
        kind: ImageKind,
        driver_version: (i32, i32),
    ) -> Result<(Ptx, ImageKind), KernelsError> {
        if kind == ImageKind::Cubin {
            if let Some(cubin) = &self.cubin {
                return Ok((Ptx::from_binary(cubin.clone()), ImageKind::Cubin));
            }
        }
        check_ptx_loadable(self.nvrtc_version, driver_version)?;
        Ok((Ptx::from_src(self.ptx.clone()), ImageKind::Ptx))
    }
}

/// PTX from NVRTC `nvrtc` loads only on a driver supporting at least that CUDA version.
pub fn check_ptx_loadable(nvrtc: (i32, i32), driver: (i32, i32)) -> Result<(), KernelsError> {
    if driver < nvrtc {
        return Err(KernelsError::DriverTooOld {
            driver: format!("{}.{}", driver.0, driver.1),
            nvrtc: format!("{}.{}", nvrtc.0, nvrtc.1),
        });
    }
    Ok(())
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

/// Whether `arch` is a real architecture (`sm_XY`), for which NVRTC produces a CUBIN.
pub fn is_real_arch(arch: &str) -> bool {
    arch.starts_with("sm_")
}

/// The NVRTC options for a program on `arch`: the architecture, C++17, line info, the CUDA
/// include folder when the program includes CUDA headers, then `REFORMER_NVRTC_OPTIONS`.
fn options(arch: &str, needs_headers: bool) -> Result<Vec<String>, KernelsError> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-lineinfo".to_string(),
    ];
    if needs_headers {
        let dir = find_cuda_include()?;
        opts.push(format!("--include-path={}", dir.display()));
    }
    opts.extend(extra_options());
    Ok(opts)
}

/// What one NVRTC compilation returns.
struct Output {
    ptx: String,
    cubin: Option<Vec<u8>>,
}

/// Compiles `source` (named `name`) with `opts`; the CUBIN too when `want_cubin`.
fn nvrtc_compile(
    name: &'static str,
    source: &str,
    arch: &str,
    opts: &[String],
    want_cubin: bool,
) -> Result<Output, KernelsError> {
    let src = CString::new(source)
        .map_err(|_| KernelsError::Nvrtc(format!("{name}: the source holds a NUL byte")))?;
    let c_name = CString::new(name)
        .map_err(|_| KernelsError::Nvrtc(format!("{name:?}: the name holds a NUL byte")))?;
    let nv = |what: &str, e: nvrtc::NvrtcError| {
        KernelsError::Nvrtc(format!("{name}.cu for {arch}: {what}: {e:?}"))
    };
    let prog = nvrtc::create_program(&src, Some(&c_name)).map_err(|e| nv("create", e))?;
    // The program is destroyed on every path out (the guard's drop).
    struct Program(nvrtc_sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: the program was created above and is destroyed once, here.
            let _ = unsafe { nvrtc::destroy_program(self.0) };
        }
    }
    let prog = Program(prog);
    // SAFETY: `prog` is a live program (created above, destroyed only by the guard).
    let compiled = unsafe { nvrtc::compile_program(prog.0, opts) };
    if let Err(e) = compiled {
        // SAFETY: as above.
        let log = unsafe { nvrtc::get_program_log(prog.0) }
            .map(|raw| c_text(&raw))
            .unwrap_or_else(|le| format!("(no log: {le:?})"));
        return Err(match e.0 {
            nvrtc_sys::nvrtcResult::NVRTC_ERROR_COMPILATION => KernelsError::Compile {
                family: name,
                arch: arch.to_string(),
                log,
            },
            _ => KernelsError::Nvrtc(format!(
                "{name}.cu for {arch}: compile: {e:?} (options {opts:?}): {log}"
            )),
        });
    }
    // SAFETY: as above; the program compiled.
    let ptx_raw = unsafe { nvrtc::get_ptx(prog.0) }.map_err(|e| nv("nvrtcGetPTX", e))?;
    let ptx = c_text(&ptx_raw);
    if ptx.is_empty() {
        return Err(KernelsError::Nvrtc(format!(
            "{name}.cu for {arch}: NVRTC returned no PTX"
        )));
    }
    let cubin = if want_cubin {
        let mut size = 0usize;
        // SAFETY: as above; `size` is valid for writes.
        unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) }
            .result()
            .map_err(|e| nv("nvrtcGetCUBINSize", e))?;
        if size == 0 {
            return Err(KernelsError::Nvrtc(format!(
                "{name}.cu for {arch}: NVRTC returned an empty CUBIN"
            )));
        }
        let mut bytes = vec![0u8; size];
        // SAFETY: as above; `bytes` holds the `size` bytes NVRTC writes.
        unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, bytes.as_mut_ptr().cast::<c_char>()) }
            .result()
            .map_err(|e| nv("nvrtcGetCUBIN", e))?;
        if !is_elf(&bytes) {
            return Err(KernelsError::Nvrtc(format!(
                "{name}.cu for {arch}: the CUBIN is not an ELF image"
            )));
        }
        Some(bytes)
    } else {
        None
    };
    Ok(Output { ptx, cubin })
}

/// The text of a NUL-terminated buffer NVRTC filled.
fn c_text(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).trim_end().to_string()
}

fn is_elf(bytes: &[u8]) -> bool {
    bytes.len() > 4 && &bytes[..4] == b"\x7fELF"
}

/// Compiles CUDA source `source` (named `name` in messages) for `arch` and returns its PTX.
/// Not cached: the kernel families go through [`compile`]; this serves tests and one-off
/// programs.
pub fn compile_source(
    name: &'static str,
    source: &str,
    arch: &str,
) -> Result<String, KernelsError> {
    Ok(compile_source_images(name, source, arch)?.0)
}

/// As [`compile_source`], returning the PTX and, for a real architecture (`sm_XY`), the CUBIN.
pub fn compile_source_images(
    name: &'static str,
    source: &str,
    arch: &str,
) -> Result<(String, Option<Vec<u8>>), KernelsError> {
    validate_arch(arch)?;
    libs::ensure(Library::Nvrtc)?;
    let opts = options(arch, includes_cuda_headers(source))?;
    let out = libs::guarded("libnvrtc", || {
        nvrtc_compile(name, source, arch, &opts, is_real_arch(arch))
    })?;
    Ok((out.ptx, out.cubin))
}

/// Compiles `family` for `arch` (e.g. `sm_90`), or returns the cached result (this process's,
/// or the `REFORMER_KERNEL_CACHE` folder's).
pub fn compile(family: KernelFamily, arch: &str) -> Result<Arc<CompiledFamily>, KernelsError> {
    validate_arch(arch)?;
    let key = (family, arch.to_string());
    if let Some(hit) = lock(cache()).get(&key) {
        return Ok(Arc::clone(hit));
    }
    libs::ensure(Library::Nvrtc)?;
    let nvrtc_version = libs::nvrtc_version()?;
    let source = family.program_source();
    let opts = options(arch, includes_cuda_headers(&source))?;
    let want_cubin = is_real_arch(arch);
    let disk = disk_cache_dir().map(|dir| {
        let stem = format!(
            "{}-{arch}-{:016x}",
            family.name(),
            cache_key(&source, arch, &opts, nvrtc_version)
        );
        dir.join(stem)
    });
    let from_disk = disk
        .as_deref()
        .and_then(|stem| read_cached(stem, want_cubin))
        .map(|(ptx, cubin)| CompiledFamily {
            family,
            arch: arch.to_string(),
            ptx,
            cubin,
            nvrtc_version,
            from_disk_cache: true,
        });
    let compiled = match from_disk {
        Some(c) => c,
        None => {
            // Compiling outside the lock lets families compile in parallel; two threads racing
            // on the same key both compile and the first insert wins, which is harmless.
            let out = libs::guarded("libnvrtc", || {
                nvrtc_compile(family.name(), &source, arch, &opts, want_cubin)
            })?;
            if let Some(stem) = &disk {
                write_cached(stem, &out.ptx, out.cubin.as_deref());
            }
            CompiledFamily {
                family,
                arch: arch.to_string(),
                ptx: out.ptx,
                cubin: out.cubin,
                nvrtc_version,
                from_disk_cache: false,
            }
        }
    };
    Ok(Arc::clone(
        lock(cache()).entry(key).or_insert(Arc::new(compiled)),
    ))
}

/// Compiles every family for `arch`, one thread per family (NVRTC compiles separate programs
/// concurrently); returns (family name, PTX length, CUBIN length) per family, in
/// [`KernelFamily::ALL`] order (CUBIN length 0 for a virtual architecture). Every family is
/// tried; all failures are reported together, each with its NVRTC log.
pub fn compile_all(arch: &str) -> Result<Vec<(&'static str, usize, usize)>, KernelsError> {
    validate_arch(arch)?;
    // NVRTC is loaded (once, for the process) before the threads start.
    libs::ensure(Library::Nvrtc)?;
    let results: Vec<Result<Arc<CompiledFamily>, KernelsError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = KernelFamily::ALL
            .iter()
            .map(|&family| scope.spawn(move || compile(family, arch)))
            .collect();
        handles
            .into_iter()
            .zip(KernelFamily::ALL)
            .map(|(h, family)| {
                h.join().unwrap_or_else(|_| {
                    Err(KernelsError::Nvrtc(format!(
                        "{}.cu for {arch}: the compiling thread panicked",
                        family.name()
                    )))
                })
            })
            .collect()
    });
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for (family, result) in KernelFamily::ALL.into_iter().zip(results) {
        match result {
            Ok(c) => done.push((
                family.name(),
                c.ptx.len(),
                c.cubin.as_ref().map_or(0, Vec::len),
            )),
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

// ----- the disk cache ---------------------------------------------------------------------

/// The `REFORMER_KERNEL_CACHE` folder, created if needed; `None` when unset or unusable.
fn disk_cache_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(CACHE_ENV)?);
    if dir.as_os_str().is_empty() {
        return None;
    }
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

/// FNV-1a (64 bits) over everything that decides the compiled image.
pub fn cache_key(source: &str, arch: &str, opts: &[String], nvrtc: (i32, i32)) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    eat(b"reformer-kernels image cache v1");
    eat(format!("nvrtc {}.{}", nvrtc.0, nvrtc.1).as_bytes());
    eat(arch.as_bytes());
    for o in opts {
        eat(o.as_bytes());
    }
    eat(source.as_bytes());
    h
}

fn with_ext(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// The PTX (and CUBIN) kept under `stem`, when both are there and look whole.
fn read_cached(stem: &Path, want_cubin: bool) -> Option<(String, Option<Vec<u8>>)> {
    let ptx = std::fs::read_to_string(with_ext(stem, "ptx")).ok()?;
    if !ptx.contains(".entry") {
        return None;
    }
    let cubin = if want_cubin {
        let bytes = std::fs::read(with_ext(stem, "cubin")).ok()?;
        if !is_elf(&bytes) {
            return None;
        }
        Some(bytes)
    } else {
        None
    };
    Some((ptx, cubin))
}

/// Keeps the images under `stem` (each written to a temporary name, then renamed, so a reader
/// never sees half a file). Failures are ignored: the cache only saves time.
fn write_cached(stem: &Path, ptx: &str, cubin: Option<&[u8]>) {
    let put = |ext: &str, bytes: &[u8]| {
        let path = with_ext(stem, ext);
        let tmp = with_ext(stem, &format!("{ext}.tmp{}", std::process::id()));
        if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    };
    // The CUBIN first: a reader accepts an entry only once the PTX is there too.
    if let Some(c) = cubin {
        put("cubin", c);
    }
    put("ptx", ptx.as_bytes());
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
        let opts = options("sm_80", false).unwrap();
        assert!(opts.contains(&"--gpu-architecture=sm_80".to_string()));
        assert!(opts.contains(&"--std=c++17".to_string()));
        assert!(opts.contains(&"-lineinfo".to_string()));
    }

    #[test]
    fn a_bad_arch_fails_before_nvrtc() {
        assert_eq!(
            compile(KernelFamily::Elementwise, "sm8"),
            Err(KernelsError::InvalidArch("sm8".into()))
        );
    }

    #[test]
    fn only_real_architectures_have_cubins() {
        assert!(is_real_arch("sm_90"));
        assert!(is_real_arch("sm_90a"));
        assert!(!is_real_arch("compute_90"));
    }

    #[test]
    fn image_kinds_parse_and_reject_the_rest() {
        assert_eq!(ImageKind::parse("cubin"), Ok(ImageKind::Cubin));
        assert_eq!(ImageKind::parse(" PTX "), Ok(ImageKind::Ptx));
        assert!(matches!(
            ImageKind::parse("sass"),
            Err(KernelsError::InvalidArgument { op: IMAGE_ENV, .. })
        ));
    }

    #[test]
    fn ptx_needs_a_driver_as_new_as_nvrtc_in_major_and_minor() {
        assert!(check_ptx_loadable((13, 0), (13, 0)).is_ok());
        assert!(check_ptx_loadable((13, 0), (13, 1)).is_ok());
        assert!(check_ptx_loadable((12, 8), (13, 0)).is_ok());
        assert_eq!(
            check_ptx_loadable((13, 1), (13, 0)),
            Err(KernelsError::DriverTooOld {
                driver: "13.0".into(),
                nvrtc: "13.1".into()
            })
        );
    }

    fn family_with(cubin: Option<Vec<u8>>, nvrtc: (i32, i32)) -> CompiledFamily {
        CompiledFamily {
            family: KernelFamily::Elementwise,
            arch: "sm_90".into(),
            ptx: ".version 9.0\n.entry ew_fill(".into(),
            cubin,
            nvrtc_version: nvrtc,
            from_disk_cache: false,
        }
    }

    #[test]
    fn the_cubin_is_loaded_when_there_and_needs_no_minor_version_match() {
        let f = family_with(Some(b"\x7fELF....".to_vec()), (13, 1));
        let (_, kind) = f.module_image(ImageKind::Cubin, (13, 0)).unwrap();
        assert_eq!(kind, ImageKind::Cubin);
        // The same family as PTX on that driver is refused before the driver sees it.
        assert!(matches!(
            f.module_image(ImageKind::Ptx, (13, 0)),
            Err(KernelsError::DriverTooOld { .. })
        ));
        // No CUBIN (a virtual architecture): the PTX, when the driver can load it.
        let g = family_with(None, (13, 0));
        let (_, kind) = g.module_image(ImageKind::Cubin, (13, 0)).unwrap();
        assert_eq!(kind, ImageKind::Ptx);
    }

    #[test]
    fn the_cache_key_changes_with_every_input() {
        let opts = vec!["--gpu-architecture=sm_90".to_string()];
        let base = cache_key("src", "sm_90", &opts, (13, 0));
        assert_eq!(base, cache_key("src", "sm_90", &opts, (13, 0)));
        assert_ne!(base, cache_key("src2", "sm_90", &opts, (13, 0)));
        assert_ne!(base, cache_key("src", "sm_80", &opts, (13, 0)));
        assert_ne!(base, cache_key("src", "sm_90", &opts, (13, 1)));
        let more = vec![opts[0].clone(), "--fmad=false".to_string()];
        assert_ne!(base, cache_key("src", "sm_90", &more, (13, 0)));
    }

    #[test]
    fn the_disk_cache_round_trips_and_ignores_partial_entries() {
        let dir = std::env::temp_dir().join(format!("reformer-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stem = dir.join("elementwise-sm_90-0123");
        assert_eq!(read_cached(&stem, true), None);
        write_cached(&stem, ".entry ew_fill(", Some(b"\x7fELFxyz"));
        assert_eq!(
            read_cached(&stem, true),
            Some((".entry ew_fill(".to_string(), Some(b"\x7fELFxyz".to_vec())))
        );
        // A CUBIN that is not an ELF image is not used.
        std::fs::write(with_ext(&stem, "cubin"), b"garbage").unwrap();
        assert_eq!(read_cached(&stem, true), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
