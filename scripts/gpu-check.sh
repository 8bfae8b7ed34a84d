#!/usr/bin/env bash
# Runs the staged binaries and the PyTorch baselines on the GPU machine (CUDA driver,
# nvidia-smi, PyTorch; no Rust toolchain, no network), in phases that each fit in one
# 10-minute device call. Build and stage the binaries first, on a machine with Rust:
# scripts/stage-gpu.sh (then carry stage/ to the GPU machine).
#
# Usage: scripts/gpu-check.sh [PHASE...] [-- extra libtest args]
#
# Phases (default: all):
#   env       the device, driver, libraries and commit only (also recorded by every phase)
#   parity    every staged tests/test-gpu_parity_* binary (attention, ops, rows, model, ...),
#             the NVRTC compile test and the kernels crate's unit tests, with
#             REFORMER_REQUIRE_GPU=1 and REFORMER_REQUIRE_NVRTC=1 (a test that would skip without
#             a GPU fails); parity=PATTERN runs only the binaries whose name contains PATTERN
#             (e.g. parity=model), to split the phase over two calls
#   bench     scripts/bench_torch_attention.py (SDPA flash, bf16), then bench_attention
#             --device cuda with the torch rows merged into its chart (2^10 … 2^19)
#   bench16   bench_attention --device cuda --dtype bf16 (bf16 activation storage, as the
#             model's --dtype bf16) with the torch rows and our f32 rows (from bench, when
#             present) merged into its chart, in bench/bf16/
#   step      the whole-step comparison at 2^14, 2^15, 2^16: scripts/bench_torch_step.py (cp6,
#             wide20; plain and with checkpointing) and our long_context training steps of cp6
#             and wide20 at the same lengths
#   long      our long_context at 2^19 under --mem-budget 16GiB: deep20 and wide20, training
#             steps and a forward-only pass (wide20 once more with bf16 activations, and once in
#             full f32)
#   sweep     our wide20 training step at 2^14 … 2^19 (time and bytes per token against length)
#   all       env parity bench step long sweep (more than one device call's 10 minutes: run
#             the phases one call each)
#   cpu-tests every other staged test binary (CPU tests; staged only with STAGE_ALL=1)
#
# Every run is guarded by `timeout`; one that fails or times out is recorded and the rest go
# on. A deadline (GPU_CHECK_DEADLINE seconds after the start, default 560) skips runs that
# would start too late, so one invocation ends before a 10-minute device call does.
#
# Writes, under $OUT (default stage/gpu-check-out), appending when the files exist:
#   gpu-check.log         everything, run by run
#   gpu-check.runs.jsonl  one JSON object per run (phase, name, status, exit code, seconds,
#                         command, output file)
#   gpu-check.json        the device, driver, libraries, commit, and every run so far
#                         (rewritten after every run)
#   nvidia-smi.txt        nvidia-smi at the start of each invocation and after each phase
#   bench/                attention.{csv,json,svg} (ours, chart with torch), torch/attention.*,
#                         bf16/attention.{csv,json,svg} (ours in bf16, chart with torch and f32)
#   step/                 torch_step*.json, long_context-<preset>-<len>-<precision>.json
# Exit status: 0 when every run passed (skips by deadline count as failures), 2 when nothing
# was staged.
#
# Environment: STAGE (default <repo>/stage), PYTHON (default python3), GPU_CHECK_TIMEOUT
# (seconds per test binary, default 300), GPU_TEST_THREADS (libtest threads, default 1:
# memory-peak tests must not overlap), GPU_CHECK_DEADLINE (default 560), MEM_BUDGET (long and
# sweep phases, default 16GiB), GPU_CHECK_PRECISION (tf32, the default: long_context --tf32,
# dense products on tensor cores with f32 accumulation, the fair match for PyTorch's bf16; or
# f32). The long phase also runs wide20 at 2^19 once in full f32 when the precision is tf32.
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stage="${STAGE:-$repo_root/stage}"
out="${OUT:-$stage/gpu-check-out}"
python="${PYTHON:-python3}"
per_binary_timeout="${GPU_CHECK_TIMEOUT:-300}"
test_threads="${GPU_TEST_THREADS:-1}"
deadline="${GPU_CHECK_DEADLINE:-560}"
mem_budget="${MEM_BUDGET:-16GiB}"
precision="${GPU_CHECK_PRECISION:-tf32}"
start_epoch="$(date +%s)"

phases=()
libtest_args=()
parity_pattern=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --) shift; libtest_args=("$@"); break ;;
        -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        env|parity|bench|bench16|step|long|sweep|cpu-tests) phases+=("$1") ;;
        parity=*) phases+=(parity); parity_pattern="${1#parity=}" ;;
        all) phases+=(env parity bench bench16 step long sweep) ;;
        *) echo "gpu-check: unknown phase '$1' (env parity bench bench16 step long sweep all cpu-tests)" >&2
           exit 2 ;;
    esac
    shift
done
[[ ${#phases[@]} -gt 0 ]] || phases=(env parity bench bench16 step long sweep)

mkdir -p "$out"
log_file="$out/gpu-check.log"
runs_file="$out/gpu-check.runs.jsonl"
json_file="$out/gpu-check.json"
smi_file="$out/nvidia-smi.txt"
touch "$log_file" "$runs_file"

say() { echo "$*" | tee -a "$log_file" >&2; }

json_escape() {
    local s="$1"
    s="${s//\\/\\\\}"
    s="${s//\"/\\\"}"
    s="${s//$'\n'/ }"
    s="${s//$'\r'/ }"
    s="${s//$'\t'/ }"
    printf '%s' "$s"
}

say ""
say "===== gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ): phases ${phases[*]} ====="

# --- the commit -----------------------------------------------------------------------------
commit="unknown"
if git -C "$repo_root" rev-parse HEAD >/dev/null 2>&1; then
    commit="$(git -C "$repo_root" rev-parse HEAD)"
    git -C "$repo_root" diff --quiet HEAD 2>/dev/null || commit="$commit (dirty)"
fi
staged_commit=""
if [[ -f "$stage/manifest.txt" ]]; then
    staged_commit="$(sed -n 's/^commit: //p' "$stage/manifest.txt" | head -n1)"
fi
say "commit: $commit; binaries staged from: ${staged_commit:-NOT STAGED}"

# --- the device -----------------------------------------------------------------------------
device="unknown"
driver="unknown"
driver_cuda=""
driver_cuda_major=0
smi_snapshot() {
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    { echo "----- $(date -u +%Y-%m-%dT%H:%M:%SZ) $1"; nvidia-smi 2>&1; } >> "$smi_file"
}
if command -v nvidia-smi >/dev/null 2>&1; then
    device="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
    driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)"
    cuda_line="$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: *[0-9.]*' | head -n1)"
    driver_cuda="${cuda_line##* }"
    driver_cuda_major="${driver_cuda%%.*}"
    [[ "$driver_cuda_major" =~ ^[0-9]+$ ]] || driver_cuda_major=0
    nvidia-smi >> "$log_file" 2>&1
    smi_snapshot "start: phases ${phases[*]}"
else
    say "warning: nvidia-smi not found (no NVIDIA driver on this machine?)"
fi
say "device: ${device:-unknown}, driver $driver (CUDA ${driver_cuda:-?})"

# --- libraries ------------------------------------------------------------------------------
python_sites() {
    local py
    for py in "$python" python3 python; do
        if command -v "$py" >/dev/null 2>&1; then
            "$py" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null
            return
        fi
    done
}

lib_dirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
for d in /usr/local/cuda-*/lib64 /usr/local/cuda-*/targets/x86_64-linux/lib; do
    [[ -d "$d" ]] && lib_dirs+=("$d")
done
lib_dirs+=(/usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64 /usr/lib/wsl/lib)
while read -r site; do
    [[ -n "$site" && -d "$site/nvidia" ]] || continue
    for sub in cu13/lib cu12/lib cuda_nvrtc/lib cublas/lib cuda_runtime/lib; do
        [[ -d "$site/nvidia/$sub" ]] && lib_dirs+=("$site/nvidia/$sub")
    done
done < <(python_sites)
# Folders ldconfig knows, last.
while read -r d; do
    [[ -n "$d" ]] && lib_dirs+=("$d")
done < <(ldconfig -p 2>/dev/null | grep -E 'lib(cuda|nvrtc|cublas)\.so' | sed 's/.*=> //; s|/[^/]*$||' | sort -u)

libcuda_dir=""
for d in "${lib_dirs[@]}"; do
    if [[ -e "$d/libcuda.so.1" || -e "$d/libcuda.so" ]]; then
        libcuda_dir="$d"
        break
    fi
done

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

# cuBLAS (and cuBLASLt, which it loads): the major version of the NVRTC when there is one, else
# the newest the driver can run. cudarc loads libcublas.so.<major>.
cublas_dir=""
cublas_major=0
for d in "${lib_dirs[@]}"; do
    for f in "$d"/libcublas.so.[0-9]*; do
        [[ -e "$f" ]] || continue
        major="${f##*/libcublas.so.}"
        major="${major%%.*}"
        [[ "$major" =~ ^[0-9]+$ ]] || continue
        (( driver_cuda_major > 0 && major > driver_cuda_major )) && continue
        (( cublas_major == nvrtc_major && nvrtc_major > 0 )) && continue  # already the match
        if (( major == nvrtc_major || major > cublas_major )); then
            cublas_major="$major"
            cublas_dir="$d"
        fi
    done
done
cublaslt_dir=""
for d in "$cublas_dir" "${lib_dirs[@]}"; do
    if [[ -n "$d" && -e "$d/libcublasLt.so.$cublas_major" ]]; then
        cublaslt_dir="$d"
        break
    fi
done

# Headers: next to the chosen NVRTC (toolkit, cu13 wheel), the runtime wheel, or stage/.
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
for d in "$nvrtc_dir" "$cublas_dir" "$cublaslt_dir" "$libcuda_dir"; do
    [[ -n "$d" && ":$ld_path:" != *":$d:"* ]] && ld_path="${ld_path:+$ld_path:}$d"
done
export LD_LIBRARY_PATH="$ld_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[[ -n "$include_dir" ]] && export REFORMER_CUDA_INCLUDE="$include_dir"
export REFORMER_REQUIRE_GPU=1
export REFORMER_REQUIRE_NVRTC=1

torch_version="$("$python" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>/dev/null || echo "not importable")"

say "libcuda:   ${libcuda_dir:-NOT FOUND}"
say "libnvrtc:  ${nvrtc_dir:-NOT FOUND} (major $nvrtc_major)"
say "libcublas: ${cublas_dir:-NOT FOUND} (major $cublas_major; cublasLt: ${cublaslt_dir:-NOT FOUND})"
say "headers:   ${include_dir:-NOT FOUND}"
say "torch:     $torch_version ($python)"
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# --- recording ------------------------------------------------------------------------------
n_pass=0
n_fail=0

write_json() {
    {
        echo "{"
        echo "  \"device\": \"$(json_escape "$device")\","
        echo "  \"driver\": \"$(json_escape "$driver")\","
        echo "  \"driver_cuda\": \"$(json_escape "$driver_cuda")\","
        echo "  \"commit\": \"$(json_escape "$commit")\","
        echo "  \"staged_commit\": \"$(json_escape "$staged_commit")\","
        echo "  \"libcuda_dir\": \"$(json_escape "$libcuda_dir")\","
        echo "  \"nvrtc_dir\": \"$(json_escape "$nvrtc_dir")\","
        echo "  \"cublas_dir\": \"$(json_escape "$cublas_dir")\","
        echo "  \"cuda_include\": \"$(json_escape "$include_dir")\","
        echo "  \"torch\": \"$(json_escape "$torch_version")\","
        echo "  \"updated\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
        echo "  \"runs\": ["
        local first=1 line
        while IFS= read -r line; do
            [[ -n "$line" ]] || continue
            [[ $first -eq 1 ]] || echo ","
            printf '    %s' "$line"
            first=0
        done < "$runs_file"
        [[ $first -eq 1 ]] || echo
        echo "  ]"
        echo "}"
    } > "$json_file.tmp" && mv "$json_file.tmp" "$json_file"
}

record() {
    # record PHASE NAME STATUS EXIT SECONDS COMMAND OUTPUT
    printf '{"phase": "%s", "name": "%s", "status": "%s", "exit_code": %s, "seconds": %s, "started": "%s", "command": "%s", "output": "%s"}\n' \
        "$(json_escape "$1")" "$(json_escape "$2")" "$3" "$4" "$5" "$(date -u -d "@$(( $(date +%s) - $5 ))" +%Y-%m-%dT%H:%M:%SZ 2>/dev/null)" \
        "$(json_escape "$6")" "$(json_escape "$7")" >> "$runs_file"
    if [[ "$3" == "pass" ]]; then
        n_pass=$((n_pass + 1))
    else
        n_fail=$((n_fail + 1))
    fi
    write_json
}

# run PHASE NAME TIMEOUT OUTPUT-FILE COMMAND...: runs COMMAND in the repository root under
# `timeout`, cut to the deadline; logs its output; records the result.
run_one() {
    local phase="$1" name="$2" limit="$3" output="$4"
    shift 4
    local now left started rc status secs
    now="$(date +%s)"
    left=$(( deadline - (now - start_epoch) ))
    if (( left < 15 )); then
        say "===== $phase/$name: skipped (deadline of $deadline s reached)"
        record "$phase" "$name" "skipped-deadline" -1 0 "$*" "$output"
        return
    fi
    (( limit > left )) && limit="$left"
    say ""
    say "===== $phase/$name (timeout ${limit} s): $*"
    command -v nvidia-smi >/dev/null 2>&1 && \
        nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv,noheader >> "$log_file" 2>&1
    started="$(date +%s)"
    (cd "$repo_root" && timeout --kill-after=10 "$limit" "$@") >> "$log_file" 2>&1
    rc=$?
    secs=$(( $(date +%s) - started ))
    case $rc in
        0) status="pass" ;;
        124|137) status="timeout" ;;
        *) status="fail" ;;
    esac
    say "===== $phase/$name: $status (exit $rc, $secs s)"
    record "$phase" "$name" "$status" "$rc" "$secs" "$*" "$output"
}

need_stage() {
    if [[ ! -d "$stage/tests" && ! -d "$stage/examples" ]]; then
        say "error: nothing staged in $stage; run scripts/stage-gpu.sh on a machine with Rust and carry stage/"
        return 1
    fi
}

example() {
    local e="$stage/examples/$1"
    if [[ -x "$e" ]]; then
        printf '%s' "$e"
    else
        printf '%s' "missing-example-$1"
    fi
}

# --- phases ---------------------------------------------------------------------------------
phase_env() {
    record env "probe" "$([[ -n "$libcuda_dir" && -n "$nvrtc_dir" && "$device" != unknown ]] && echo pass || echo fail)" \
        0 0 "library and device discovery" "$json_file"
}

phase_parity() {
    need_stage || { record parity "stage" "fail" 2 0 "no staged binaries" ""; return; }
    local bin found=0
    for bin in "$stage"/tests/test-gpu_parity_* "$stage"/tests/test-nvrtc_compile "$stage"/tests/lib-reformer_kernels; do
        [[ -f "$bin" && -x "$bin" ]] || continue
        # shellcheck disable=SC2053 # the pattern is a glob on purpose
        [[ -z "$parity_pattern" || "$(basename "$bin")" == *$parity_pattern* ]] || continue
        found=1
        run_one parity "$(basename "$bin")" "$per_binary_timeout" "" \
            "$bin" --test-threads="$test_threads" "${libtest_args[@]}"
    done
    if [[ $found -eq 0 ]]; then
        say "error: no parity test binaries in $stage/tests"
        record parity "binaries" "fail" 2 0 "no test-gpu_parity_* staged" ""
    fi
}

phase_cpu_tests() {
    need_stage || { record cpu-tests "stage" "fail" 2 0 "no staged binaries" ""; return; }
    local bin
    for bin in "$stage"/tests/*; do
        [[ -f "$bin" && -x "$bin" ]] || continue
        case "$(basename "$bin")" in
            test-gpu_parity_*|test-nvrtc_compile|lib-reformer_kernels) continue ;;
        esac
        run_one cpu-tests "$(basename "$bin")" "$per_binary_timeout" "" \
            "$bin" --test-threads="$test_threads" "${libtest_args[@]}"
    done
}

# bench: torch SDPA rows, then ours in f32 (torch rows in its chart). A run cut short keeps the
# lengths it finished (bench_attention rewrites its files after every length).
phase_bench() {
    local dir="$out/bench"
    mkdir -p "$dir/torch"
    run_one bench torch-sdpa-flash 150 "$dir/torch/attention.json" \
        "$python" scripts/bench_torch_attention.py --device cuda --backends flash,efficient \
        --budget 40 --out "$dir/torch"
    need_stage || { record bench "stage" "fail" 2 0 "no staged binaries" ""; return; }
    local also=()
    [[ -f "$dir/torch/attention.json" ]] && also=(--also "$dir/torch/attention.json")
    run_one bench bench_attention 330 "$dir/attention.json" \
        "$(example bench_attention)" --device cuda --exact-budget 100 --out "$dir" "${also[@]}"
}

# bench16: ours with bf16 activations; the torch rows and our f32 rows (from the bench phase,
# when present) in its chart.
phase_bench16() {
    local dir="$out/bench"
    mkdir -p "$dir/bf16"
    need_stage || { record bench16 "stage" "fail" 2 0 "no staged binaries" ""; return; }
    local also=()
    [[ -f "$dir/torch/attention.json" ]] && also+=(--also "$dir/torch/attention.json")
    [[ -f "$dir/attention.json" ]] && also+=(--also "$dir/attention.json")
    run_one bench16 bench_attention-bf16 330 "$dir/bf16/attention.json" \
        "$(example bench_attention)" --device cuda --dtype bf16 --exact-budget 100 \
        --out "$dir/bf16" "${also[@]}"
}

# long_context PHASE PRESET LEN TIMEOUT PRECISION EXTRA-ARGS...: PRECISION f32 (full f32
# dense products) or tf32 (--tf32: tensor cores, f32 accumulation), either with a -bf16 suffix
# for bf16 activation storage (--dtype bf16); the output file names it.
long_context() {
    local phase="$1" preset="$2" len="$3" limit="$4" precision="$5"
    shift 5
    local json="$out/step/long_context-$preset-$len-$precision.json"
    local flags=()
    [[ "$precision" == tf32* ]] && flags+=(--tf32)
    [[ "$precision" == *-bf16 ]] && flags+=(--dtype bf16)
    run_one "$phase" "long_context-$preset-$len-$precision" "$limit" "$json" \
        "$(example long_context)" --device cuda --preset "$preset" --len "$len" \
        --json "$json" "${flags[@]}" "$@"
}

phase_step() {
    mkdir -p "$out/step"
    run_one step torch-step 200 "$out/step/torch_step.json" \
        "$python" scripts/bench_torch_step.py --device cuda --presets cp6,wide20 --lens 14,15,16 \
        --steps 3 --warmup 1 --budget 60 --deadline 150 --out "$out/step/torch_step.json"
    run_one step torch-step-checkpoint 120 "$out/step/torch_step_checkpoint.json" \
        "$python" scripts/bench_torch_step.py --device cuda --presets wide20 --lens 14,15,16 \
        --checkpoint --steps 3 --warmup 1 --budget 40 --deadline 90 \
        --out "$out/step/torch_step_checkpoint.json"
    need_stage || { record step "stage" "fail" 2 0 "no staged binaries" ""; return; }
    local preset log2
    for preset in cp6 wide20; do
        for log2 in 14 15 16; do
            long_context step "$preset" $((1 << log2)) 150 "$precision" --steps 3 --infer 0
        done
    done
}

phase_long() {
    mkdir -p "$out/step"
    need_stage || { record long "stage" "fail" 2 0 "no staged binaries" ""; return; }
    long_context long deep20 524288 200 "$precision" --mem-budget "$mem_budget" --steps 2 --infer 1
    long_context long wide20 524288 300 "$precision" --mem-budget "$mem_budget" --steps 2 --infer 1
    # bf16 activation storage: the same step, head-layout activations halved.
    long_context long wide20 524288 200 "$precision-bf16" --mem-budget "$mem_budget" --steps 1 \
        --infer 0
    if [[ "$precision" != "f32" ]]; then
        # The same step with full-f32 dense products, once.
        long_context long wide20 524288 200 f32 --mem-budget "$mem_budget" --steps 1 --infer 0
    fi
}

phase_sweep() {
    mkdir -p "$out/step"
    need_stage || { record sweep "stage" "fail" 2 0 "no staged binaries" ""; return; }
    local log2
    for log2 in 14 15 16 17 18 19; do
        long_context sweep wide20 $((1 << log2)) 200 "$precision" --mem-budget "$mem_budget" \
            --steps 2 --infer 0
    done
}

for phase in "${phases[@]}"; do
    case "$phase" in
        env) phase_env ;;
        parity) phase_parity ;;
        bench) phase_bench ;;
        bench16) phase_bench16 ;;
        step) phase_step ;;
        long) phase_long ;;
        sweep) phase_sweep ;;
        cpu-tests) phase_cpu_tests ;;
    esac
    smi_snapshot "after phase $phase"
done
write_json

say ""
say "gpu-check (${phases[*]}): $n_pass passed, $n_fail failed or skipped in $(( $(date +%s) - start_epoch )) s; $json_file"
if [[ ! -d "$stage/tests" && ! -d "$stage/examples" ]]; then
    exit 2
fi
[[ $n_fail -eq 0 && $n_pass -gt 0 ]]
