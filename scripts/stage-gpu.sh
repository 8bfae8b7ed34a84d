#!/usr/bin/env bash
# Builds the test binaries and examples here (release) and copies them into stage/, for
# scripts/gpu-check.sh on the GPU machine (which has CUDA but no Rust toolchain and no network).
#
# Usage: scripts/stage-gpu.sh [cargo package selection, default --workspace]
#   e.g. scripts/stage-gpu.sh -p reformer-kernels -p reformer-engine
#
# Layout written (stage/ is rebuilt from scratch each run; it is in .gitignore):
#   stage/tests/<kind>-<target>     libtest binaries (kind: lib, test, bin), run by gpu-check.sh
#   stage/examples/<example>        example binaries
#   stage/cuda-include/             the CUDA headers of the NVRTC wheel (fallback on the GPU
#                                   machine when its CUDA install has no cuda_bf16.h)
#   stage/manifest.txt              what was staged, from which commit
#   stage/gpu-check.sh              a copy of the runner
#
# Size: a tool that carries stage/ to another machine may cap it (e.g. 64 MiB), so the binaries
# are stripped of debug info (profile release.debug = 1 makes each ~20 MiB; stripped ~2 MiB);
# STAGE_KEEP_DEBUG=1 keeps it. `du -sh stage` is printed at the end.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
stage="$repo_root/stage"

if [[ $# -eq 0 ]]; then
    set -- --workspace
fi

log() { echo "stage-gpu: $*" >&2; }

for tool in cargo python3; do
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

copy_artifact() {
    local dest="$1" src="$2"
    cp "$src" "$dest"
    if [[ "${STAGE_KEEP_DEBUG:-0}" != "1" ]]; then
        strip --strip-debug "$dest" 2>/dev/null || log "warning: could not strip $dest"
    fi
}

log "building test binaries: cargo test --release --no-run $*"
cargo test --release --no-run --message-format=json-render-diagnostics "$@" \
    | artifacts \
    | while read -r kind name path; do
        if [[ "$kind" == "example" ]]; then
            continue
        fi
        copy_artifact "$stage/tests/$kind-$name" "$path"
        log "staged tests/$kind-$name"
    done

log "building examples: cargo build --release --examples $*"
cargo build --release --examples --message-format=json-render-diagnostics "$@" \
    | artifacts \
    | while read -r kind name path; do
        if [[ "$kind" == "example" ]]; then
            copy_artifact "$stage/examples/$name" "$path"
            log "staged examples/$name"
        fi
    done

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
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "selection: $*"
    echo "rustc: $(rustc --version)"
    (cd "$stage" && find tests examples -type f | sort)
} > "$stage/manifest.txt"

log "done: $(find "$stage/tests" -type f | wc -l) test binaries, $(find "$stage/examples" -type f | wc -l) examples"
du -sh "$stage" >&2
