//! Every kernel family compiles with NVRTC for sm_80 and sm_90 to PTX and to the CUBIN the
//! driver loads (machine code for that architecture), and both export every kernel the launch
//! wrappers look up. No GPU is needed, only libnvrtc (no family needs the CUDA headers).
//!
//! Without a loadable libnvrtc the tests print a loud SKIPPED line and pass, unless
//! `REFORMER_REQUIRE_NVRTC=1`, which makes a missing NVRTC a failure (CI sets it; see
//! `.ci/nvrtc-check.sh`).

use std::io::Write;

use reformer_kernels::{
    compile, compile_all, compile_source, compile_source_images, loaded_path, nvrtc_version,
    KernelFamily, KernelsError, Library,
};

const ARCHES: [&str; 2] = ["sm_80", "sm_90"];
const REQUIRE_ENV: &str = "REFORMER_REQUIRE_NVRTC";

/// Whether NVRTC is loadable; panics when it is not but the environment requires it.
fn nvrtc_available() -> bool {
    match nvrtc_version() {
        Ok((major, minor)) => {
            let path = loaded_path(Library::Nvrtc);
            eprintln!("NVRTC {major}.{minor} from {path:?}");
            true
        }
        Err(e @ KernelsError::MissingLibrary(_)) => {
            if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
                panic!("{REQUIRE_ENV}=1 but NVRTC cannot be loaded: {e}");
            }
            // Written to the stderr handle, not with eprintln!: libtest captures the print
            // macros of passing tests, and this line must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "\n======================================================================\n\
                 SKIPPED: libnvrtc not found (set LD_LIBRARY_PATH, e.g. \
                 eval \"$(scripts/install-nvrtc.sh)\"; {REQUIRE_ENV}=1 makes this fail)\n\
                 {e}\n\
                 ======================================================================\n"
            );
            false
        }
        Err(e) => panic!("NVRTC loaded but does not answer: {e}"),
    }
}

#[test]
fn every_family_compiles_for_sm80_and_sm90() {
    if !nvrtc_available() {
        return;
    }
    for arch in ARCHES {
        let compiled = compile_all(arch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(compiled.len(), KernelFamily::ALL.len());
        for (name, ptx_len, cubin_len) in compiled {
            eprintln!("{arch} {name}.cu: {ptx_len} bytes of PTX, {cubin_len} bytes of CUBIN");
            assert!(ptx_len > 0, "{name}: empty PTX");
            assert!(cubin_len > 0, "{name}: no CUBIN for {arch}");
        }
    }
}

/// The architecture an NVIDIA CUBIN (ELF, machine EM_CUDA = 190) is built for: the low byte
/// of `e_flags` (ELF64 little-endian: offset 48) in the older layout, bits 8..16 in the newer
/// one (CUDA 12.8 and later); both are accepted.
fn cubin_sm(cubin: &[u8]) -> (u16, u32) {
    assert!(
        cubin.len() > 64 && &cubin[..4] == b"\x7fELF",
        "not an ELF image"
    );
    assert_eq!(cubin[4], 2, "not a 64-bit ELF");
    let machine = u16::from_le_bytes([cubin[18], cubin[19]]);
    let flags = u32::from_le_bytes([cubin[48], cubin[49], cubin[50], cubin[51]]);
    (machine, flags)
}

#[test]
fn cubin_is_machine_code_for_the_arch_and_exports_every_kernel() {
    if !nvrtc_available() {
        return;
    }
    for arch in ARCHES {
        let sm: u32 = arch.trim_start_matches("sm_").parse().unwrap();
        for family in KernelFamily::ALL {
            let compiled = compile(family, arch).unwrap_or_else(|e| panic!("{e}"));
            let cubin = compiled
                .cubin
                .as_deref()
                .unwrap_or_else(|| panic!("{}.cu for {arch}: no CUBIN", family.name()));
            let (machine, flags) = cubin_sm(cubin);
            assert_eq!(machine, 190, "{}.cu for {arch}: not EM_CUDA", family.name());
            assert!(
                flags & 0xff == sm || (flags >> 8) & 0xff == sm,
                "{}.cu for {arch}: CUBIN e_flags {flags:#x} name another architecture",
                family.name()
            );
            for kernel in family.kernels() {
                assert!(
                    cubin.windows(kernel.len() + 1).any(|w| {
                        &w[..kernel.len()] == kernel.as_bytes() && w[kernel.len()] == 0
                    }),
                    "{}.cu for {arch}: CUBIN lacks kernel {kernel}",
                    family.name()
                );
            }
        }
    }
}

#[test]
fn a_virtual_architecture_gives_ptx_and_no_cubin() {
    if !nvrtc_available() {
        return;
    }
    let src = "extern \"C\" __global__ void k(float* x) { x[0] = 1.0f; }";
    let (ptx, cubin) =
        compile_source_images("k", src, "compute_90").unwrap_or_else(|e| panic!("{e}"));
    assert!(ptx.contains(".entry k("));
    assert_eq!(cubin, None);
    let (_, cubin) = compile_source_images("k", src, "sm_90").unwrap_or_else(|e| panic!("{e}"));
    assert!(cubin.is_some_and(|c| c.starts_with(b"\x7fELF")));
}

#[test]
fn ptx_targets_the_arch_and_exports_every_kernel() {
    if !nvrtc_available() {
        return;
    }
    for arch in ARCHES {
        for family in KernelFamily::ALL {
            let compiled = compile(family, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                compiled.ptx.contains(&format!(".target {arch}")),
                "{}.cu for {arch}: PTX targets another architecture",
                family.name()
            );
            for kernel in family.kernels() {
                assert!(
                    compiled.ptx.contains(&format!(".entry {kernel}(")),
                    "{}.cu for {arch}: PTX lacks kernel {kernel}",
                    family.name()
                );
            }
        }
    }
}

#[test]
fn compiled_ptx_is_cached() {
    if !nvrtc_available() {
        return;
    }
    let a = compile(KernelFamily::Elementwise, "sm_80").unwrap_or_else(|e| panic!("{e}"));
    let b = compile(KernelFamily::Elementwise, "sm_80").unwrap_or_else(|e| panic!("{e}"));
    assert!(std::sync::Arc::ptr_eq(&a, &b));
}

#[test]
fn a_kernel_that_does_not_compile_reports_the_nvrtc_log() {
    if !nvrtc_available() {
        return;
    }
    let broken = "extern \"C\" __global__ void broken(float* x) { x[0] = no_such_function(); }";
    match compile_source("broken", broken, "sm_80") {
        Err(KernelsError::Compile { family, arch, log }) => {
            assert_eq!((family, arch.as_str()), ("broken", "sm_80"));
            assert!(log.contains("no_such_function"), "log: {log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}
