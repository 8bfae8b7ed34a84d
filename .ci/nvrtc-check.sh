#!/usr/bin/env bash
# CI gate for the CUDA kernels, on a machine without a GPU: installs NVRTC (pip wheels, CUDA 13)
# and compiles every kernel family for sm_80 and sm_90, to PTX and to CUBIN (what the driver
# loads), and keeps one in the on-disk kernel cache. Fails when a kernel does not compile or
# NVRTC cannot be installed or loaded (REFORMER_REQUIRE_NVRTC=1 turns the test's skip into a
# failure).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

env_lines="$(scripts/install-nvrtc.sh)"
echo "$env_lines"
eval "$env_lines"

REFORMER_REQUIRE_NVRTC=1 cargo test --release -p reformer-kernels --test nvrtc_compile --test kernel_cache
