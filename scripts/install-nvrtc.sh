#!/usr/bin/env bash
# Installs NVIDIA's NVRTC and CUDA runtime-header wheels (CUDA 13.0) into a project-local folder,
# so that the CUDA kernels can be compiled with NVRTC on a machine without a CUDA toolkit or GPU.
#
# Usage:  eval "$(scripts/install-nvrtc.sh)"      # or: scripts/install-nvrtc.sh > env.sh
#
# Prints, on stdout and nothing else, shell lines to export:
#   LD_LIBRARY_PATH         the wheel folder holding libnvrtc.so.13 (cudarc loads it by that name)
#   REFORMER_CUDA_INCLUDE   the runtime wheel's include folder (cuda_bf16.h, cuda_runtime.h, ...)
# Progress goes to stderr. Idempotent: a second run with the wheels present installs nothing.
#
# Environment:
#   REFORMER_CUDA_WHEELS  install folder (default: <repo>/.cuda-wheels; keep it in .gitignore)
#   PYTHON                python interpreter with pip (default: python3)
set -euo pipefail

NVRTC_VERSION="13.0.88"
RUNTIME_VERSION="13.0.96"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${REFORMER_CUDA_WHEELS:-$repo_root/.cuda-wheels}"
python="${PYTHON:-python3}"

log() { echo "install-nvrtc: $*" >&2; }

if ! command -v "$python" >/dev/null 2>&1; then
    log "error: '$python' not found; set PYTHON to an interpreter with pip"
    exit 1
fi

stamp="$target/.installed-nvrtc-$NVRTC_VERSION-runtime-$RUNTIME_VERSION"
if [[ ! -f "$stamp" ]]; then
    log "installing nvidia-cuda-nvrtc==$NVRTC_VERSION nvidia-cuda-runtime==$RUNTIME_VERSION into $target"
    rm -rf "$target"
    mkdir -p "$target"
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$target" \
        "nvidia-cuda-nvrtc==$NVRTC_VERSION" \
        "nvidia-cuda-runtime==$RUNTIME_VERSION" >&2
    touch "$stamp"
else
    log "wheels already installed in $target"
fi

# The wheels' layout has moved between releases (nvidia/cuda_nvrtc/lib, nvidia/cu13/lib, ...):
# locate the files instead of hard-coding the folders.
nvrtc_lib="$(find "$target" -name 'libnvrtc.so.13*' -not -name '*builtins*' -print -quit)"
if [[ -z "$nvrtc_lib" ]]; then
    log "error: libnvrtc.so.13 not found under $target"
    exit 1
fi
lib_dir="$(dirname "$nvrtc_lib")"

bf16_header="$(find "$target" -name cuda_bf16.h -print -quit)"
if [[ -z "$bf16_header" ]]; then
    log "error: cuda_bf16.h not found under $target"
    exit 1
fi
include_dir="$(dirname "$bf16_header")"

# cudarc (feature cuda-13000) tries, among others, libnvrtc.so and libnvrtc.so.13; the wheel
# ships libnvrtc.so.13 only. Add the unversioned name too, so any loader that asks for it works.
if [[ ! -e "$lib_dir/libnvrtc.so.13" ]]; then
    ln -sf "$(basename "$nvrtc_lib")" "$lib_dir/libnvrtc.so.13"
fi
if [[ ! -e "$lib_dir/libnvrtc.so" ]]; then
    ln -sf libnvrtc.so.13 "$lib_dir/libnvrtc.so"
fi

log "libnvrtc: $lib_dir"
log "headers:  $include_dir"
echo "export LD_LIBRARY_PATH=\"$lib_dir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
echo "export REFORMER_CUDA_INCLUDE=\"$include_dir\""
