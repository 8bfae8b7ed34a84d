//! Where the CUDA headers (`cuda_bf16.h` and what it includes) are, for NVRTC's `-I`.
//!
//! Order: `$REFORMER_CUDA_INCLUDE`; the toolkit of `$CUDA_HOME` / `$CUDA_PATH`; common toolkit
//! locations; the `nvidia-cuda-runtime` wheel installed by `scripts/install-nvrtc.sh` in the
//! repository's `.cuda-wheels/`; the wheel in an active virtualenv / conda env / user site.
//! A folder counts only if it holds `cuda_bf16.h`.

use std::env;
use std::path::{Path, PathBuf};

use crate::error::KernelsError;

/// The environment variable that names the include folder explicitly.
pub const INCLUDE_ENV: &str = "REFORMER_CUDA_INCLUDE";

/// The header whose presence marks a usable include folder.
const MARKER: &str = "cuda_bf16.h";

/// Wheel layouts under a `site-packages` folder: CUDA 13 wheels, then CUDA 12 ones.
const WHEEL_SUBDIRS: &[&str] = &["nvidia/cu13/include", "nvidia/cuda_runtime/include"];

/// The first candidate folder that holds the CUDA headers.
pub fn find_cuda_include() -> Result<PathBuf, KernelsError> {
    let searched = candidates();
    searched
        .iter()
        .find(|dir| dir.join(MARKER).is_file())
        .cloned()
        .ok_or(KernelsError::HeadersNotFound { searched })
}

/// Every folder looked at, in order.
pub fn candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = env::var_os(INCLUDE_ENV) {
        dirs.push(PathBuf::from(dir));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(root) = env::var_os(var) {
            dirs.push(Path::new(&root).join("include"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    dirs.extend(versioned_toolkits(Path::new("/usr/local")));
    dirs.push(PathBuf::from("/opt/cuda/include"));
    dirs.push(PathBuf::from("/usr/include"));
    // The repository's own wheel folder (scripts/install-nvrtc.sh), from this crate's manifest.
    let repo_wheels = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cuda-wheels");
    dirs.extend(WHEEL_SUBDIRS.iter().map(|sub| repo_wheels.join(sub)));
    for prefix in python_prefixes() {
        for site in site_packages(&prefix) {
            dirs.extend(WHEEL_SUBDIRS.iter().map(|sub| site.join(sub)));
        }
    }
    dirs
}

/// `/usr/local/cuda-13.0/include` and the like, newest name first.
fn versioned_toolkits(root: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = read_dir_names(root)
        .into_iter()
        .filter(|name| name.starts_with("cuda-"))
        .map(|name| root.join(name).join("include"))
        .collect();
    found.sort();
    found.reverse();
    found
}

/// Python installation prefixes whose `site-packages` may hold the NVIDIA wheels.
fn python_prefixes() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(|var| env::var_os(var).map(PathBuf::from))
        .collect();
    if let Some(home) = env::var_os("HOME") {
        prefixes.push(Path::new(&home).join(".local"));
    }
    prefixes.push(PathBuf::from("/usr/local"));
    prefixes.push(PathBuf::from("/usr"));
    prefixes
}

/// `<prefix>/lib/python3.*/{site,dist}-packages`.
fn site_packages(prefix: &Path) -> Vec<PathBuf> {
    let lib = prefix.join("lib");
    let mut found = Vec::new();
    for name in read_dir_names(&lib) {
        if name.starts_with("python3") {
            for kind in ["site-packages", "dist-packages"] {
                found.push(lib.join(&name).join(kind));
            }
        }
    }
    found.sort();
    found
}

fn read_dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_include_the_repository_wheels() {
        let dirs = candidates();
        assert!(dirs
            .iter()
            .any(|d| d.ends_with(".cuda-wheels/nvidia/cu13/include")));
    }

    #[test]
    fn a_missing_folder_is_a_typed_error_listing_the_search() {
        let err = KernelsError::HeadersNotFound {
            searched: vec![PathBuf::from("/nowhere")],
        };
        assert!(err.to_string().contains("/nowhere"));
        assert!(err.to_string().contains(INCLUDE_ENV));
    }
}
