#!/usr/bin/env bash
# Builds the binaries that scripts/gpu-proof.sh runs on the GPU machine (which has CUDA and
# python3 but no Rust toolchain and no network), copies them, stripped, into stage/, and checks
# what could break there before it costs device time. Carry stage/ along with the tree
# (it is in .gitignore: device call `carry: ["stage"]`) and run `bash scripts/gpu-proof.sh`.
#
# Usage: scripts/stage-gpu.sh [--out DIR] [--profile release|test]
#   --out      the stage folder (default <repo>/stage; rebuilt from scratch)
#   --profile  release (default), or test: stage the builds `cargo test --workspace` already
#              made (its test binaries, and its examples, which it builds with the test
#              profile: CI's dry run, no second build)
#
# What is staged is THE TABLE at the top of scripts/gpu-proof.sh (`gpu-proof.sh --list-staged`):
# one line per binary, its stage path, cargo package, target kind and name. Also written:
#   stage/manifest.txt   commit, profile, rustc, per binary: size and the newest GLIBC symbol
#                        version it needs (objdump -T); glibc_required: the newest of them all
#
# Checks (any failure stops with a non-zero exit):
#   - every binary in the table was built;
#   - their dynamic dependencies are only the C runtime (libc, libm, libgcc_s, ld-linux, ...):
#     the CUDA libraries are loaded at run time (dlopen), never linked;
#   - the glibc they need (objdump -T) is recorded; gpu-proof.sh compares it with the far
#     machine's before the first check;
#   - what travels — the tree (tracked and untracked, not ignored) plus stage/ — stays under
#     STAGE_MAX_MIB (default 60; the device call carries at most 64 MiB).
# Binaries are stripped of debug info (STAGE_KEEP_DEBUG=1 keeps it). Honours CARGO_TARGET_DIR.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
stage="$repo_root/stage"
profile=release
max_mib="${STAGE_MAX_MIB:-60}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) stage="$2"; shift ;;
        --profile) profile="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "stage-gpu: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$profile" in
    release) test_profile=(--release); build_profile=(--release) ;;
    test) test_profile=(); build_profile=(--profile test) ;;
    *) echo "stage-gpu: --profile release or test, not '$profile'" >&2; exit 2 ;;
esac

log() { echo "stage-gpu: $*" >&2; }
for tool in cargo python3 strip objdump readelf; do
    command -v "$tool" >/dev/null 2>&1 || { log "error: $tool not found"; exit 1; }
done

# THE TABLE: <stage path> <package> <test|example> <target>
table="$(bash scripts/gpu-proof.sh --list-staged)"
[[ -n "$table" ]] || { log "error: gpu-proof.sh --list-staged printed nothing"; exit 1; }

rm -rf "$stage"
mkdir -p "$stage"

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
    t = msg["target"]
    kind = "example" if "example" in t["kind"] else ("test" if msg["profile"]["test"] else t["kind"][0])
    print(kind, t["name"], msg["executable"])
'
}

messages="$(mktemp)"
trap 'rm -f "$messages"' EXIT
packages="$(awk '{print $2}' <<< "$table" | sort -u)"
for pkg in $packages; do
    tests=(); examples=()
    while read -r _path p kind name; do
        [[ "$p" == "$pkg" ]] || continue
        case "$kind" in
            test) tests+=(--test "$name") ;;
            example) examples+=(--example "$name") ;;
            *) log "error: unknown kind '$kind' in the table"; exit 1 ;;
        esac
    done <<< "$table"
    # The JSON goes to a file first, so that a build failure stops the script.
    if (( ${#tests[@]} > 0 )); then
        log "cargo test ${test_profile[*]} --no-run -p $pkg ${tests[*]}"
        cargo test "${test_profile[@]}" --no-run --message-format=json-render-diagnostics \
            -p "$pkg" "${tests[@]}" >> "$messages"
    fi
    if (( ${#examples[@]} > 0 )); then
        log "cargo build ${build_profile[*]} -p $pkg ${examples[*]}"
        cargo build "${build_profile[@]}" --message-format=json-render-diagnostics \
            -p "$pkg" "${examples[@]}" >> "$messages"
    fi
done

built="$(artifacts < "$messages")"
glibc_all=""
{
    echo "staged: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
    echo "profile: $profile"
    echo "rustc: $(rustc --version)"
} > "$stage/manifest.txt"
allowed_needed='^(libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|ld-linux-x86-64\.so\.2|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1)$'
while read -r path _pkg kind name; do
    src="$(awk -v k="$kind" -v n="$name" '$1 == k && $2 == n { print $3 }' <<< "$built" | tail -n1)"
    if [[ -z "$src" || ! -x "$src" ]]; then
        log "error: $kind $name was not built"
        exit 1
    fi
    mkdir -p "$stage/$(dirname "$path")"
    cp "$src" "$stage/$path"
    if [[ "${STAGE_KEEP_DEBUG:-0}" != 1 ]]; then
        strip --strip-debug "$stage/$path" 2>/dev/null || log "warning: could not strip $path"
    fi
    needed="$(readelf -d "$stage/$path" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')"
    bad="$(grep -Ev "$allowed_needed" <<< "$needed" || true)"
    if [[ -n "$bad" ]]; then
        log "error: $path links $(tr '\n' ' ' <<< "$bad")— the CUDA libraries must be loaded at run time"
        exit 1
    fi
    glibc="$(objdump -T "$stage/$path" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)"
    glibc_all="$(printf '%s\n%s\n' "$glibc_all" "$glibc" | sed '/^$/d' | sort -V | tail -n1)"
    echo "binary: $path $(stat -c %s "$stage/$path") bytes, needs glibc $glibc, links $(tr '\n' ' ' <<< "$needed")" >> "$stage/manifest.txt"
    log "staged $path ($(( $(stat -c %s "$stage/$path") / 1024 )) KiB, glibc $glibc)"
done <<< "$table"
echo "glibc_required: $glibc_all" >> "$stage/manifest.txt"
echo "glibc_here: $(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')" >> "$stage/manifest.txt"

# What travels: the tree (tracked and untracked, not ignored) and stage/.
tree_bytes="$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -n1 | cut -f1)"
stage_bytes="$(du -sb "$stage" | cut -f1)"
total_mib=$(( (tree_bytes + stage_bytes) / 1048576 ))
echo "travels: tree ${tree_bytes} bytes + stage ${stage_bytes} bytes = ${total_mib} MiB" >> "$stage/manifest.txt"
log "done: glibc $glibc_all needed; tree $((tree_bytes / 1048576)) MiB + stage $((stage_bytes / 1048576)) MiB = ${total_mib} MiB travels (limit $max_mib)"
if (( total_mib > max_mib )); then
    log "error: ${total_mib} MiB would travel, over the ${max_mib} MiB limit (a device call carries 64 MiB)"
    exit 1
fi
