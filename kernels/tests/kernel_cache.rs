//! `REFORMER_KERNEL_CACHE`: a compiled family is kept on disk (its PTX and CUBIN) under a name
//! that holds the family, the architecture and the hash of everything that decides the image.
//! Its own test binary: it sets the variable for the whole process. Needs libnvrtc; skipped
//! loudly without it (a failure with `REFORMER_REQUIRE_NVRTC=1`).

use reformer_kernels::{compile, nvrtc_version, KernelFamily, KernelsError};

#[test]
fn a_compiled_family_is_written_to_the_cache_folder() {
    match nvrtc_version() {
        Ok(_) => {}
        Err(e @ KernelsError::MissingLibrary(_)) => {
            assert!(
                std::env::var("REFORMER_REQUIRE_NVRTC").map_or(true, |v| v != "1"),
                "REFORMER_REQUIRE_NVRTC=1 but NVRTC cannot be loaded: {e}"
            );
            eprintln!("SKIPPED: libnvrtc not found ({e})");
            return;
        }
        Err(e) => panic!("NVRTC loaded but does not answer: {e}"),
    }
    let dir = std::env::temp_dir().join(format!("reformer-kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::env::set_var("REFORMER_KERNEL_CACHE", &dir);
    let compiled = compile(KernelFamily::LshHash, "sm_90").unwrap_or_else(|e| panic!("{e}"));
    assert!(!compiled.from_disk_cache);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].starts_with("lsh_hash-sm_90-") && names[0].ends_with(".cubin"));
    assert!(names[1].starts_with("lsh_hash-sm_90-") && names[1].ends_with(".ptx"));
    let cubin = std::fs::read(dir.join(&names[0])).unwrap();
    assert_eq!(Some(cubin), compiled.cubin);
    let ptx = std::fs::read_to_string(dir.join(&names[1])).unwrap();
    assert_eq!(ptx, compiled.ptx);
    std::fs::remove_dir_all(&dir).unwrap();
}
