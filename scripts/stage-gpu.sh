#!/usr/bin/env bash
# Builds (release) the test binaries and examples that scripts/gpu-check.sh runs, and copies
# them, stripped, into stage/ — for the GPU machine, which has CUDA but no Rust toolchain and
# no network. Carry stage/ there (it is in .gitignore) and run scripts/gpu-check.sh PHASE.
#
# Usage: scripts/stage-gpu.sh [cargo package selection, default --workspace]
#   e.g. scripts/stage-gpu.sh -p reformer -p reformer-kernels
#
# What is staged (stage/ is rebuilt from scratch each run):
#   stage/tests/<kind>-<target>   the GPU test binaries: test-gpu_parity_* (every
#                                 tests/gpu_parity_*.rs, whoever added it), test-nvrtc_compile,
#                                 lib-reformer_kernels; with STAGE_ALL=1 every test binary
#                                 (gpu-check.sh cpu-tests runs the others)
#   stage/examples/<example>      bench_attention, long_context (STAGE_ALL=1: every example)
#   stage/cuda-include/           the CUDA headers of the NVRTC wheel (fallback for NVRTC on the
#                                 GPU machine when its CUDA install has no cuda_bf16.h)
#   stage/manifest.txt            what was staged, from which commit, sizes
#   stage/gpu-check.sh            a copy of the runner
#
# Size: the tool that carries stage/ caps it at 64 MiB, so binaries are stripped of debug
# info (profile release.debug = 1 makes each ~20 MiB; stripped ~2–5 MiB) and the script fails
# when stage/ passes STAGE_MAX_MIB (default 64). STAGE_KEEP_DEBUG=1 keeps debug info.
# Honours CARGO_TARGET_DIR.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
stage="$repo_root/stage"
max_mib="${STAGE_MAX_MIB:-64}"
stage_all="${STAGE_ALL:-0}"

if [[ $# -eq 0 ]]; then
    set -- --workspace
fi

log() { echo "stage-gpu: $*" >&2; }

for tool in cargo python3 strip; do
    command -v "$tool" >/dev/null 2>&1 || { log "error: $tool not found"; exit 1; }
done

rm -rf "$stage"
mkdir -p "$stage/tests" "$stage/examples"

# Prints "kind name path" for every executable artifact in cargo's JSON messages on stdin.
artifacts() {
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    target = msg["target"]
    kind = target["kind"][0]
    if msg["profile"]["test"]:
        kind = {"lib": "lib", "rlib": "lib", "proc-macro": "lib"}.get(kind, kind)
    elif kind != "example":
        continue
    print(kind, target["name"], msg["executable"])
'
}

wanted_test() {
    [[ "$stage_all" == "1" ]] && return 0
    case "$1" in
        test-gpu_parity_*|test-nvrtc_compile|lib-reformer_kernels) return 0 ;;
        *) return 1 ;;
    esac
}

wanted_example() {
    [[ "$stage_all" == "1" ]] && return 0
    case "$1" in
        bench_attention|long_context) return 0 ;;
        *) return 1 ;;
    esac
}

copy_artifact() {
    local dest="$1" src="$2"
    cp "$src" "$dest"
    if [[ "${STAGE_KEEP_DEBUG:-0}" != "1" ]]; then
        strip --strip-debug "$dest" 2>/dev/null || log "warning: could not strip $dest"
    fi
}

# Test binaries. The JSON goes to a file first so that a build failure stops the script
# (a pipeline would hide cargo's exit status from `set -e` only in part).
messages="$(mktemp)"
trap 'rm -f "$messages"' EXIT
log "building test binaries: cargo test --release --no-run $*"
cargo test --release --no-run --message-format=json-render-diagnostics "$@" > "$messages"
while read -r kind name path; do
    [[ "$kind" == "example" ]] && continue
    if wanted_test "$kind-$name"; then
        copy_artifact "$stage/tests/$kind-$name" "$path"
        log "staged tests/$kind-$name"
    fi
done < <(artifacts < "$messages")

log "building examples: cargo build --release --examples $*"
cargo build --release --examples --message-format=json-render-diagnostics "$@" > "$messages"
while read -r kind name path; do
    if [[ "$kind" == "example" ]] && wanted_example "$name"; then
        copy_artifact "$stage/examples/$name" "$path"
        log "staged examples/$name"
    fi
done < <(artifacts < "$messages")

for needed in examples/bench_attention examples/long_context; do
    [[ "$stage_all" == "1" || -x "$stage/$needed" ]] || log "warning: $needed was not built"
done
if ! compgen -G "$stage/tests/test-gpu_parity_*" >/dev/null; then
    log "warning: no gpu_parity test binary was built"
fi

# CUDA headers for NVRTC, from the wheel scripts/install-nvrtc.sh installs (small: ~4 MiB).
if env_lines="$(scripts/install-nvrtc.sh 2>/dev/null)"; then
    include_dir="$(eval "$env_lines"; echo "${REFORMER_CUDA_INCLUDE:-}")"
    if [[ -n "$include_dir" && -f "$include_dir/cuda_bf16.h" ]]; then
        cp -r "$include_dir" "$stage/cuda-include"
        log "staged cuda-include/ from $include_dir"
    fi
else
    log "warning: could not install the NVRTC wheels; no cuda-include/ staged"
fi

cp scripts/gpu-check.sh "$stage/gpu-check.sh"

{
    echo "staged: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
    echo "selection: $* (STAGE_ALL=$stage_all)"
    echo "rustc: $(rustc --version)"
    (cd "$stage" && find tests examples -type f -exec du -k {} + | sort -k2)
} > "$stage/manifest.txt"

total_kib="$(du -sk "$stage" | cut -f1)"
log "done: $(find "$stage/tests" -type f | wc -l) test binaries, $(find "$stage/examples" -type f | wc -l) examples, $((total_kib / 1024)) MiB in $stage"
if (( total_kib > max_mib * 1024 )); then
    log "error: stage/ is $((total_kib / 1024)) MiB, over the $max_mib MiB a device call carries"
    exit 1
fi
