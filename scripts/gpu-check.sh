#!/usr/bin/env bash
# Runs the staged test binaries on the GPU machine (CUDA, nvidia-smi, PyTorch; no Rust toolchain,
# no network). Build and stage them first, on a machine with Rust: scripts/stage-gpu.sh.
#
# Usage: scripts/gpu-check.sh [extra libtest args, e.g. --test-threads=4]
#
# Finds libcuda and an NVRTC no newer than the driver (CUDA toolkit, system libraries, or the
# nvidia-* Python wheels PyTorch brings), sets LD_LIBRARY_PATH and REFORMER_CUDA_INCLUDE, runs
# every binary in stage/tests with REFORMER_REQUIRE_GPU=1 and REFORMER_REQUIRE_NVRTC=1 (so a
# test that would skip without a GPU fails instead), then any example listed in
# stage/examples/run.txt (one "name args..." per line).
#
# Writes:
#   $OUT/gpu-check.log    everything, binary by binary
#   $OUT/gpu-check.json   device, driver, libraries found, and pass/fail per binary
# ($OUT defaults to stage/gpu-check-out.) Exit status: 0 when every binary passed.
#
# Environment: STAGE (default: <repo>/stage), GPU_CHECK_TIMEOUT (seconds per binary, default
# 300), GPU_TEST_THREADS (libtest threads, default 1: memory-peak tests must not overlap).
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stage="${STAGE:-$repo_root/stage}"
out="${OUT:-$stage/gpu-check-out}"
per_binary_timeout="${GPU_CHECK_TIMEOUT:-300}"
test_threads="${GPU_TEST_THREADS:-1}"
mkdir -p "$out"
log_file="$out/gpu-check.log"
json_file="$out/gpu-check.json"
: > "$log_file"

say() { echo "$*" | tee -a "$log_file" >&2; }

json_escape() {
    local s="$1"
    s="${s//\\/\\\\}"
    s="${s//\"/\\\"}"
    s="${s//$'\n'/ }"
    s="${s//$'\t'/ }"
    printf '%s' "$s"
}

if [[ ! -d "$stage/tests" ]]; then
    say "error: no staged binaries in $stage/tests; run scripts/stage-gpu.sh on a machine with Rust"
    exit 2
fi

# --- the device -----------------------------------------------------------------------------
device="unknown"
driver="unknown"
driver_cuda_major=0
if command -v nvidia-smi >/dev/null 2>&1; then
    device="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
    driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)"
    cuda_line="$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: *[0-9.]*' | head -n1)"
    driver_cuda="${cuda_line##* }"
    driver_cuda_major="${driver_cuda%%.*}"
    [[ "$driver_cuda_major" =~ ^[0-9]+$ ]] || driver_cuda_major=0
    nvidia-smi >> "$log_file" 2>&1
else
    say "warning: nvidia-smi not found"
fi
say "device: $device, driver $driver (CUDA ${driver_cuda:-?})"

# --- libraries ------------------------------------------------------------------------------
python_sites() {
    local py
    for py in python3 python; do
        if command -v "$py" >/dev/null 2>&1; then
            "$py" -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null
            return
        fi
    done
}

lib_dirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
for d in /usr/local/cuda-*/lib64; do [[ -d "$d" ]] && lib_dirs+=("$d"); done
lib_dirs+=(/usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64 /usr/lib/wsl/lib)
while read -r site; do
    [[ -n "$site" ]] || continue
    for sub in nvidia/cu13/lib nvidia/cuda_nvrtc/lib; do
        [[ -d "$site/$sub" ]] && lib_dirs+=("$site/$sub")
    done
done < <(python_sites)

libcuda_dir=""
for d in "${lib_dirs[@]}"; do
    if [[ -e "$d/libcuda.so.1" || -e "$d/libcuda.so" ]]; then
        libcuda_dir="$d"
        break
    fi
done
if [[ -z "$libcuda_dir" ]]; then
    libcuda_dir="$(ldconfig -p 2>/dev/null | grep -m1 'libcuda.so.1 ' | sed 's/.*=> //; s|/[^/]*$||')"
fi

# NVRTC: the newest major version the driver can run (PTX from a newer NVRTC does not load).
nvrtc_dir=""
nvrtc_major=0
for d in "${lib_dirs[@]}"; do
    for f in "$d"/libnvrtc.so.[0-9]*; do
        [[ -e "$f" ]] || continue
        major="${f##*/libnvrtc.so.}"
        major="${major%%.*}"
        [[ "$major" =~ ^[0-9]+$ ]] || continue
        if (( driver_cuda_major > 0 && major > driver_cuda_major )); then
            continue
        fi
        if (( major > nvrtc_major )); then
            nvrtc_major="$major"
            nvrtc_dir="$d"
        fi
    done
done

# Headers: next to the chosen NVRTC (toolkit, cu13 wheel), the CUDA 12 runtime wheel, or stage/.
include_dir="${REFORMER_CUDA_INCLUDE:-}"
if [[ -z "$include_dir" && -n "$nvrtc_dir" ]]; then
    for cand in "$nvrtc_dir/../include" "$nvrtc_dir/../../include" \
                "$nvrtc_dir/../../cuda_runtime/include"; do
        if [[ -f "$cand/cuda_bf16.h" ]]; then
            include_dir="$(cd "$cand" && pwd)"
            break
        fi
    done
fi
if [[ -z "$include_dir" && -f "$stage/cuda-include/cuda_bf16.h" ]]; then
    include_dir="$stage/cuda-include"
fi

ld_path=""
for d in "$nvrtc_dir" "$libcuda_dir"; do
    [[ -n "$d" ]] && ld_path="${ld_path:+$ld_path:}$d"
done
export LD_LIBRARY_PATH="$ld_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[[ -n "$include_dir" ]] && export REFORMER_CUDA_INCLUDE="$include_dir"
export REFORMER_REQUIRE_GPU=1
export REFORMER_REQUIRE_NVRTC=1

say "libcuda:  ${libcuda_dir:-NOT FOUND}"
say "libnvrtc: ${nvrtc_dir:-NOT FOUND} (major $nvrtc_major)"
say "headers:  ${include_dir:-NOT FOUND}"
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# --- run ------------------------------------------------------------------------------------
results=()
passed=0
failed=0

run_one() {
    local kind="$1" name="$2"
    shift 2
    local start end status rc
    say ""
    say "===== $kind $name $* ====="
    start="$(date +%s)"
    (cd "$repo_root" && timeout "$per_binary_timeout" "$@") >> "$log_file" 2>&1
    rc=$?
    end="$(date +%s)"
    if [[ $rc -eq 0 ]]; then
        status="pass"
        passed=$((passed + 1))
    else
        status="fail"
        failed=$((failed + 1))
        [[ $rc -eq 124 ]] && status="timeout"
    fi
    say "===== $name: $status (exit $rc, $((end - start)) s)"
    results+=("{\"binary\": \"$(json_escape "$name")\", \"kind\": \"$kind\", \"status\": \"$status\", \"exit_code\": $rc, \"seconds\": $((end - start))}")
}

for bin in "$stage"/tests/*; do
    [[ -f "$bin" && -x "$bin" ]] || continue
    run_one test "$(basename "$bin")" "$bin" --test-threads="$test_threads" "$@"
done

if [[ -f "$stage/examples/run.txt" ]]; then
    while read -r name args; do
        [[ -n "$name" && "$name" != \#* ]] || continue
        # shellcheck disable=SC2086 # args are split as written in run.txt
        run_one example "$name" "$stage/examples/$name" $args
    done < "$stage/examples/run.txt"
fi

# --- report ---------------------------------------------------------------------------------
{
    echo "{"
    echo "  \"device\": \"$(json_escape "$device")\","
    echo "  \"driver\": \"$(json_escape "$driver")\","
    echo "  \"driver_cuda\": \"$(json_escape "${driver_cuda:-}")\","
    echo "  \"libcuda_dir\": \"$(json_escape "$libcuda_dir")\","
    echo "  \"nvrtc_dir\": \"$(json_escape "$nvrtc_dir")\","
    echo "  \"cuda_include\": \"$(json_escape "$include_dir")\","
    echo "  \"passed\": $passed,"
    echo "  \"failed\": $failed,"
    echo "  \"results\": ["
    for i in "${!results[@]}"; do
        sep=","
        [[ $i -eq $((${#results[@]} - 1)) ]] && sep=""
        echo "    ${results[$i]}$sep"
    done
    echo "  ]"
    echo "}"
} > "$json_file"

say ""
say "gpu-check: $passed passed, $failed failed; $json_file"
[[ $failed -eq 0 && $passed -gt 0 ]]
