#!/usr/bin/env bash
# The GPU proof in one command: on the GPU machine (CUDA driver, PyTorch, python3; no Rust, no
# network), from the repository root with stage/ carried along (built here by
# scripts/stage-gpu.sh), it checks what matters most in at most 8 minutes wall:
#
#   1. the environment: device, driver, CUDA / NVRTC / cuBLAS (which files were loaded), free
#      memory, commit; every kernel family compiled for the device and loaded (CUBIN);
#   2. the whole model on the GPU against the CPU (losses, every gradient, parameters after
#      Adam; f32 and bf16) and the attention kernels, REFORMER_REQUIRE_GPU=1, first pass with
#      CUDA_LAUNCH_BLOCKING=1;
#   3. wide20 at 2^19 under 16 GiB: two training steps and a forward pass (pool peak against the
#      device plan, the driver's reading, the steady step's seconds);
#   4. deep20 at 2^19 under 8 GiB: the same figures;
#   5. attention at 2^16 … 2^19: our LSH (1 and 2 rounds), local and exact against PyTorch's
#      SDPA flash (bf16), forward and forward+backward;
#   6. if time remains: the cp6 and wide20 training step at 2^14 and 2^16 against
#      scripts/bench_torch_step.py.
#
# Checks run in the order of THE TABLE below (evidence per minute first). A check starts only
# when its expected time still fits before the deadline (else it is recorded as skipped) and
# runs under `timeout`, cut to the time left. A GPU check passes only when its process printed
# that it is using the CUDA device (a run that lands on the CPU is a failure, `cpu-fallback`).
#
# Usage: bash scripts/gpu-proof.sh [options]
#   --dry-run        no GPU expected (CI, this machine): the staging, the deadline logic and the
#                    packing work; GPU checks that fail fast without a GPU run (and must report
#                    no-gpu), the others are recorded no-gpu unrun. Exit 0 when every GPU check
#                    reported no-gpu and the outputs were packed.
#   --deadline S     seconds for the whole run (default 470: 8 minutes less packing)
#   --only ID,...    run only these checks;  --skip ID,...  leave these out
#   --stage DIR      the staged binaries (default <repo>/stage)
#   --out DIR        where the results go (default $OUT, else <stage>/gpu-proof-out)
#   --time-scale F   multiply expected times and timeouts by F (tests of this script)
#   --list           print the plan (checks, timeouts, expected times) and exit
#   --list-staged    print the staged-binary table (scripts/stage-gpu.sh reads it) and exit
#
# Results: at most 4 files in the output folder: summary.md (one table: every check, pass /
# fail / skipped, figure, plan, ratio), summary.json, gpu-proof.log (everything, in order),
# gpu-proof.tar.gz (each check's log, JSON, CSV and SVG). Exit status 0 only when every check
# that ran passed (a skip by the deadline is not a failure; it is in the table).
#
# Environment: PYTHON (default python3), GPU_PROOF_LIB_DIRS (folders, ':'-separated, searched
# first for libcuda.so.1, libnvrtc.so.N and libcublas.so.N; then the CUDA toolkit, the driver's
# folders, python3's nvidia wheels, ldconfig's cache), GPU_PROOF_ASSUME_GPU=1 (treat the machine
# as having a GPU: tests of this script with stub binaries), MEM_BUDGET_WIDE (16GiB), MEM_BUDGET_DEEP
# (8GiB), GPU_PROOF_TF32 (1: dense products on tensor cores with f32 accumulation, the fair
# match for PyTorch's bf16; 0: full f32).
set -uo pipefail

# ================================= THE TABLE ================================================
# Everything that names a binary or its arguments is here; update it when a target is renamed.
#
# 1. What scripts/stage-gpu.sh builds (release) and stages:
#    <path under stage/>   <cargo package>   <test|example>   <cargo target name>
STAGED='
tests/gpu_env                reformer-kernels  test     gpu_env
tests/gpu_parity_model       reformer          test     gpu_parity_model
tests/gpu_parity_attention   reformer          test     gpu_parity_attention
tests/gpu_parity_ops         reformer          test     gpu_parity_ops
tests/gpu_parity_rows        reformer          test     gpu_parity_rows
examples/long_context        reformer          example  long_context
examples/bench_attention     reformer          example  bench_attention
'
#
# 2. The checks, in the order they run: items 1 to 6 of the proof, then extras for a later
#    window (`--only parity-ops,parity-rows`, the bf16 runs, the rest of the wide20 length
#    sweep), which the deadline skips unless time remains. Columns (split on "|", trimmed):
#    id | kind | no-GPU | timeout s | expected s | marker | command
#    kind     how its figures are read (scripts/gpu_proof_summary.py): env, test, long, attn,
#             torch-attn, torch-step
#    no-GPU   what --dry-run does with it: "run" (it fails fast without a GPU: run it, it must
#             report no GPU), "skip" (it would fall back to the CPU: record no-gpu, do not run)
#    expected the estimated wall time on the H200 (an estimate until a run measures it); the
#             deadline logic starts a check only when this still fits
#    marker   an extended regex its output must match: the proof that it ran on the GPU
#    command  words; @S@ the stage folder, @O@ this check's output folder, @O:ID@ another
#             check's, @PY@ python; "[ ... ]" is kept only when its last word is an existing file
CHECKS='
env          | env        | run  |  60 |  15 | ^gpu-env: using CUDA device        | @S@/tests/gpu_env --test-threads=1 --nocapture
parity-model | test       | run  | 150 |  45 | ^using CUDA device                 | env CUDA_LAUNCH_BLOCKING=1 @S@/tests/gpu_parity_model --test-threads=1
parity-attn  | test       | run  |  90 |  25 | ^using CUDA device                 | env CUDA_LAUNCH_BLOCKING=1 @S@/tests/gpu_parity_attention --test-threads=1
wide20-2e19  | long       | skip | 180 |  60 | ^using CUDA device                 | @S@/examples/long_context --device cuda --preset wide20 --len 524288 --mem-budget @BW@ --steps 2 --infer 1 @TF32@ --json @O@/long_context.json
deep20-2e19  | long       | skip |  90 |  25 | ^using CUDA device                 | @S@/examples/long_context --device cuda --preset deep20 --len 524288 --mem-budget @BD@ --steps 2 --infer 0 @TF32@ --json @O@/long_context.json
torch-attn   | torch-attn | run  |  90 |  30 | ^torch .* on NVIDIA                | @PY@ scripts/bench_torch_attention.py --device cuda --min-log2 16 --max-log2 19 --budget 40 --out @O@
attn         | attn       | run  | 200 | 100 | kernels compiled and loaded        | @S@/examples/bench_attention --device cuda --min-log2 16 --max-log2 19 --rounds 1,2 --exact-budget 90 [ --also @O:torch-attn@/attention.json ] --out @O@
torch-step   | torch-step | run  | 120 |  40 | ^torch .* on NVIDIA                | @PY@ scripts/bench_torch_step.py --device cuda --presets cp6,wide20 --lens 14,16 --steps 3 --warmup 1 --budget 40 --deadline 90 --out @O@/torch_step.json
cp6-2e14     | long       | skip |  60 |  12 | ^using CUDA device                 | @S@/examples/long_context --device cuda --preset cp6 --len 16384 --mem-budget @BW@ --steps 3 --infer 0 @TF32@ --json @O@/long_context.json
cp6-2e16     | long       | skip |  60 |  12 | ^using CUDA device                 | @S@/examples/long_context --device cuda --preset cp6 --len 65536 --mem-budget @BW@ --steps 3 --infer 0 @TF32@ --json @O@/long_context.json
wide20-2e14  | long       | skip |  60 |  15 | ^using CUDA device                 | @S@/examples/long_context --device cuda --preset wide20 --len 16384 --mem-budget @BW@ --steps 3 --infer 0 @TF32@ --json @O@/long_context.json
wide20-2e16  | long       | skip |  90 |  20 | ^using CUDA device                 | @S@/examples/long_context --device cuda --preset wide20 --len 65536 --mem-budget @BW@ --steps 3 --infer 0 @TF32@ --json @O@/long_context.json
parity-ops   | test       | run  |  90 |  30 | ^using CUDA device                 | env CUDA_LAUNCH_BLOCKING=1 @S@/tests/gpu_parity_ops --test-threads=1
parity-rows  | test       | run  |  60 |  20 | ^using CUDA device                 | env CUDA_LAUNCH_BLOCKING=1 @S@/tests/gpu_parity_rows --test-threads=1
wide20-2e19-bf16 | long   | skip | 150 |  45 | ^using CUDA device                 | @S@/examples/long_context --device cuda --preset wide20 --len 524288 --mem-budget @BW@ --dtype bf16 --steps 2 --infer 0 @TF32@ --json @O@/long_context.json
attn-bf16    | attn       | run  | 200 | 100 | kernels compiled and loaded        | @S@/examples/bench_attention --device cuda --dtype bf16 --min-log2 16 --max-log2 19 --rounds 1,2 --exact-budget 90 [ --also @O:torch-attn@/attention.json ] [ --also @O:attn@/attention.json ] --out @O@
wide20-2e15  | long       | skip |  60 |  15 | ^using CUDA device                 | @S@/examples/long_context --device cuda --preset wide20 --len 32768 --mem-budget @BW@ --steps 2 --infer 0 @TF32@ --json @O@/long_context.json
wide20-2e17  | long       | skip |  90 |  30 | ^using CUDA device                 | @S@/examples/long_context --device cuda --preset wide20 --len 131072 --mem-budget @BW@ --steps 2 --infer 0 @TF32@ --json @O@/long_context.json
wide20-2e18  | long       | skip | 120 |  40 | ^using CUDA device                 | @S@/examples/long_context --device cuda --preset wide20 --len 262144 --mem-budget @BW@ --steps 2 --infer 0 @TF32@ --json @O@/long_context.json
'
# Libtest names of the attention tests that compare f32 and bf16 stores bit for bit: they rely
# on identical FMA contraction across the flags, so a failure is rerun with --fmad=false first.
BIT_FOR_BIT_TESTS='bf16_hash_and_row_dot_equal_their_f32_runs_bit_for_bit local_and_exact_forwards_store_bf16_outputs_as_the_conversion_would'
# ============================================================================================

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
start_epoch="$(date +%s)"
dry_run=0
deadline=470
only=""
skip=""
stage="${STAGE:-$repo_root/stage}"
out_dir=""
time_scale=1
python="${PYTHON:-python3}"

trim() { local s="$1"; s="${s#"${s%%[![:space:]]*}"}"; printf '%s' "${s%"${s##*[![:space:]]}"}"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --deadline|--only|--skip|--stage|--out|--time-scale)
            [[ $# -ge 2 ]] || { echo "gpu-proof: $1 needs a value" >&2; exit 2; } ;;
    esac
    case "$1" in
        --dry-run) dry_run=1 ;;
        --deadline) deadline="$2"; shift ;;
        --only) only="$2"; shift ;;
        --skip) skip="$2"; shift ;;
        --stage) stage="$2"; shift ;;
        --out) out_dir="$2"; shift ;;
        --time-scale) time_scale="$2"; shift ;;
        --list-staged)
            while read -r line; do [[ -n "$line" ]] && echo "$line"; done <<< "$STAGED"
            exit 0 ;;
        --list)
            # The plan, with the estimates: which checks fit before the deadline if every
            # check takes its expected time.
            printf '%-17s %-10s %7s %8s %6s  %-8s %s\n' check kind timeout expected ends plan command
            total=0
            while IFS='|' read -r id kind _nogpu tmo exp _marker cmd; do
                id="$(trim "$id")"; [[ -n "$id" ]] || continue
                exp="$(trim "$exp")"
                if (( total + exp <= deadline )); then total=$((total + exp)); fits=runs
                else fits=skipped; fi
                printf '%-17s %-10s %6ss %7ss %5ss  %-8s %s\n' "$id" "$(trim "$kind")" \
                    "$(trim "$tmo")" "$exp" "$([[ $fits == runs ]] && echo "$total" || echo -)" \
                    "$fits" "$(trim "$cmd")"
            done <<< "$CHECKS"
            echo "with every check at its expected time (H200 estimates), the runs end at ${total} s; deadline ${deadline} s"
            exit 0 ;;
        -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu-proof: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$deadline" =~ ^[0-9]+$ ]] || { echo "gpu-proof: --deadline needs whole seconds" >&2; exit 2; }
[[ "$time_scale" =~ ^[0-9]*\.?[0-9]+$ ]] || { echo "gpu-proof: --time-scale needs a number" >&2; exit 2; }
stage="$(cd "$stage" 2>/dev/null && pwd || echo "$stage")"
out_dir="${out_dir:-${OUT:-$stage/gpu-proof-out}}"
mkdir -p "$out_dir" || { echo "gpu-proof: cannot create $out_dir" >&2; exit 2; }
out_dir="$(cd "$out_dir" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-proof.XXXXXX")"
log_file="$work/gpu-proof.log"
runs_file="$work/runs.jsonl"
: > "$runs_file"

say() { echo "$*" | tee -a "$log_file" >&2; }
elapsed() { echo $(( $(date +%s) - start_epoch )); }
scaled() { awk -v x="$1" -v f="$time_scale" 'BEGIN { v = int(x * f + 0.5); print (v < 1 ? 1 : v) }'; }
json_escape() {
    local s="$1"
    s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; s="${s//$'\n'/ }"; s="${s//$'\r'/ }"; s="${s//$'\t'/ }"
    printf '%s' "$s"
}
in_list() { [[ ",$2," == *",$1,"* ]]; }

say "===== gpu-proof $(date -u +%Y-%m-%dT%H:%M:%SZ): deadline ${deadline} s$([[ $dry_run == 1 ]] && echo ', dry run (no GPU expected)')"

# --- is there a GPU? ------------------------------------------------------------------------
gpu_present=0
if [[ $dry_run == 1 ]]; then
    export CUDA_VISIBLE_DEVICES=""   # never touch a GPU in a dry run, even where there is one
elif [[ "${GPU_PROOF_ASSUME_GPU:-0}" == 1 ]]; then
    gpu_present=1
elif command -v nvidia-smi >/dev/null 2>&1 && [[ "$(nvidia-smi -L 2>/dev/null)" == *"GPU "* ]]; then
    gpu_present=1
elif [[ -e /dev/nvidia0 ]]; then
    gpu_present=1
fi

# --- the commit and the stage ---------------------------------------------------------------
commit="unknown"
if git -C "$repo_root" rev-parse HEAD >/dev/null 2>&1; then
    commit="$(git -C "$repo_root" rev-parse HEAD)"
    git -C "$repo_root" diff --quiet HEAD 2>/dev/null || commit="$commit (dirty)"
fi
staged_commit="$(sed -n 's/^commit: //p' "$stage/manifest.txt" 2>/dev/null | head -n1)"
glibc_needed="$(sed -n 's/^glibc_required: //p' "$stage/manifest.txt" 2>/dev/null | head -n1)"
say "commit: $commit; staged from: ${staged_commit:-NOT STAGED} ($stage)"

# --- the device -----------------------------------------------------------------------------
device="none"; driver=""; driver_cuda=""; driver_cuda_major=0; free_mib=""; total_mib=""
if command -v nvidia-smi >/dev/null 2>&1; then
    q="$(nvidia-smi --query-gpu=name,driver_version,memory.free,memory.total --format=csv,noheader,nounits 2>/dev/null | head -n1)"
    if [[ -n "$q" ]]; then
        IFS=',' read -r device driver free_mib total_mib <<< "$q"
        device="$(trim "$device")"; driver="$(trim "$driver")"
        free_mib="$(trim "$free_mib")"; total_mib="$(trim "$total_mib")"
    fi
    cuda_line="$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: *[0-9.]*' | head -n1)"
    driver_cuda="${cuda_line##* }"
    driver_cuda_major="${driver_cuda%%.*}"
    [[ "$driver_cuda_major" =~ ^[0-9]+$ ]] || driver_cuda_major=0
    { echo "----- nvidia-smi at the start"; nvidia-smi 2>&1; } >> "$log_file"
fi
say "device: $device; driver ${driver:-none} (CUDA ${driver_cuda:-?}); memory free ${free_mib:-?} of ${total_mib:-?} MiB"

# --- the CUDA libraries: libcuda.so.1, NVRTC and cuBLAS (the machine's or PyTorch's wheels) --
python_sites() {
    command -v "$python" >/dev/null 2>&1 || return 0
    "$python" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null
}
lib_dirs=()
IFS=':' read -r -a extra_dirs <<< "${GPU_PROOF_LIB_DIRS:-}"
for d in "${extra_dirs[@]}" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64 \
         /usr/local/cuda-*/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/lib64 \
         /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/wsl/lib; do
    [[ -d "$d" ]] && lib_dirs+=("$d")
done
while read -r site; do
    [[ -n "$site" && -d "$site/nvidia" ]] || continue
    for sub in cu13/lib cu12/lib cuda_nvrtc/lib cublas/lib cuda_runtime/lib; do
        [[ -d "$site/nvidia/$sub" ]] && lib_dirs+=("$site/nvidia/$sub")
    done
done < <(python_sites)
[[ -d "$repo_root/.cuda-wheels/nvidia/cu13/lib" ]] && lib_dirs+=("$repo_root/.cuda-wheels/nvidia/cu13/lib")
while read -r d; do
    [[ -n "$d" ]] && lib_dirs+=("$d")
done < <(ldconfig -p 2>/dev/null | grep -E 'lib(cuda|nvrtc|cublas)\.so' | sed 's/.*=> //; s|/[^/]*$||' | sort -u)

libcuda_dir=""
for d in "${lib_dirs[@]}"; do
    if [[ -e "$d/libcuda.so.1" ]]; then libcuda_dir="$d"; break; fi
done
# The newest major version of a library no newer than the driver's CUDA (any, without driver).
pick_lib() {
    local name="$1" best_dir="" best=0 d f major
    for d in "${lib_dirs[@]}"; do
        for f in "$d/$name".so.[0-9]*; do
            [[ -e "$f" ]] || continue
            major="${f##*/"$name".so.}"; major="${major%%.*}"
            [[ "$major" =~ ^[0-9]+$ ]] || continue
            (( driver_cuda_major > 0 && major > driver_cuda_major )) && continue
            if (( major > best )); then best="$major"; best_dir="$d"; fi
        done
    done
    printf '%s %s' "$best" "$best_dir"
}
read -r nvrtc_major nvrtc_dir <<< "$(pick_lib libnvrtc)"
read -r cublas_major cublas_dir <<< "$(pick_lib libcublas)"
ld_path=""
for d in "$nvrtc_dir" "$cublas_dir" "$libcuda_dir"; do
    [[ -n "$d" && ":$ld_path:${LD_LIBRARY_PATH:-}:" != *":$d:"* ]] && ld_path="${ld_path:+$ld_path:}$d"
done
export LD_LIBRARY_PATH="$ld_path${LD_LIBRARY_PATH:+${ld_path:+:}$LD_LIBRARY_PATH}"
export REFORMER_REQUIRE_GPU=1 REFORMER_REQUIRE_NVRTC=1
# Every process after the first loads the compiled kernels from here instead of compiling.
export REFORMER_KERNEL_CACHE="$work/kernel-cache"
torch_version="$("$python" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>/dev/null || echo "not importable")"
glibc_here="$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')"
say "libcuda.so.1: ${libcuda_dir:-NOT FOUND}"
say "libnvrtc:     ${nvrtc_dir:+$nvrtc_dir (.so.$nvrtc_major)}${nvrtc_dir:-NOT FOUND}"
say "libcublas:    ${cublas_dir:+$cublas_dir (.so.$cublas_major)}${cublas_dir:-NOT FOUND}"
say "torch:        $torch_version ($python)"
say "glibc:        ${glibc_here:-?} here; the staged binaries need ${glibc_needed:-?}"
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

cat > "$work/environment.json" <<EOF
{"device": "$(json_escape "$device")", "driver": "$(json_escape "$driver")", "driver_cuda": "$(json_escape "$driver_cuda")",
 "memory_free_mib": "$(json_escape "$free_mib")", "memory_total_mib": "$(json_escape "$total_mib")",
 "commit": "$(json_escape "$commit")", "staged_commit": "$(json_escape "$staged_commit")",
 "libcuda_dir": "$(json_escape "$libcuda_dir")", "nvrtc_dir": "$(json_escape "$nvrtc_dir")", "cublas_dir": "$(json_escape "$cublas_dir")",
 "torch": "$(json_escape "$torch_version")", "glibc": "$(json_escape "$glibc_here")", "glibc_required": "$(json_escape "$glibc_needed")",
 "gpu_present": $gpu_present, "dry_run": $dry_run, "deadline_s": $deadline, "time_scale": "$time_scale",
 "started": "$(date -u -d "@$start_epoch" +%Y-%m-%dT%H:%M:%SZ)"}
EOF

# --- recording ------------------------------------------------------------------------------
# record ID KIND STATUS RC SECONDS EXPECTED TIMEOUT COMMAND NOTE
record() {
    printf '{"id": "%s", "kind": "%s", "status": "%s", "rc": %s, "seconds": %s, "expected_s": %s, "timeout_s": %s, "at_s": %s, "command": "%s", "note": "%s"}\n' \
        "$(json_escape "$1")" "$2" "$3" "$4" "$5" "$6" "$7" "$(elapsed)" "$(json_escape "$8")" \
        "$(json_escape "$9")" >> "$runs_file"
}

# --- packing (also on an interrupt: what was measured is kept) ------------------------------
packed=0
pack() {
    [[ $packed == 1 ]] && return
    packed=1
    say ""
    say "===== packing into $out_dir ($(elapsed) s)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        { echo "----- nvidia-smi at the end"; nvidia-smi 2>&1; } >> "$log_file"
    fi
    # Logs over 4 MiB keep their first and last 2 MiB (the results must come back whole).
    local f
    while IFS= read -r -d '' f; do
        if (( $(stat -c %s "$f") > 4 * 1024 * 1024 )); then
            { head -c $((2 * 1024 * 1024)) "$f"; printf '\n[... cut by gpu-proof ...]\n'; tail -c $((2 * 1024 * 1024)) "$f"; } > "$f.cut" && mv "$f.cut" "$f"
        fi
    done < <(find "$work" -path "$work/kernel-cache" -prune -o -type f -name '*.txt' -print0)
    "$python" "$repo_root/scripts/gpu_proof_summary.py" --work "$work" --out "$out_dir" \
        --bit-for-bit "$BIT_FOR_BIT_TESTS" >> "$log_file" 2>&1 \
        || say "warning: the summary script failed (see gpu-proof.log)"
    [[ -f "$out_dir/summary.md" ]] || printf '# GPU proof\n\nThe summary script failed: see gpu-proof.log.\n' > "$out_dir/summary.md"
    tar -C "$work" --exclude=kernel-cache --exclude=gpu-proof.log -czf "$out_dir/gpu-proof.tar.gz" . \
        2>>"$log_file" || say "warning: tar failed"
    local size
    size="$(stat -c %s "$out_dir/gpu-proof.tar.gz" 2>/dev/null || echo 0)"
    if (( size > 15 * 1024 * 1024 )); then
        say "warning: gpu-proof.tar.gz is $((size / 1048576)) MiB; packing the JSON and summaries only"
        tar -C "$work" --exclude=kernel-cache --exclude=gpu-proof.log --exclude='*.txt' \
            -czf "$out_dir/gpu-proof.tar.gz" . 2>>"$log_file"
    fi
    copy_log
}
# The whole log into the results; over 12 MiB, its first and last 6 MiB (a file over 16 MiB
# would not come back).
copy_log() {
    if (( $(stat -c %s "$log_file") > 12 * 1024 * 1024 )); then
        { head -c $((6 * 1024 * 1024)) "$log_file"; printf '\n[... cut by gpu-proof ...]\n'
          tail -c $((6 * 1024 * 1024)) "$log_file"; } > "$out_dir/gpu-proof.log"
    else
        cp "$log_file" "$out_dir/gpu-proof.log"
    fi
}
# shellcheck disable=SC2317  # called by the trap
on_signal() {
    say "gpu-proof: interrupted at $(elapsed) s; packing what was measured"
    pack
    exit 130
}
trap on_signal INT TERM

# --- preflight: what would break every check, before spending device time ------------------
preflight_note=""
preflight_status="pass"
fail_pre() { preflight_status="fail"; preflight_note="${preflight_note:+$preflight_note; }$1"; }
warn_pre() { preflight_note="${preflight_note:+$preflight_note; }$1"; }
missing_staged=()
while read -r path _pkg _kind _name; do
    [[ -n "$path" ]] || continue
    # A copy that lost its mode bits on the way is still the binary.
    [[ -f "$stage/$path" && ! -x "$stage/$path" ]] && chmod +x "$stage/$path" 2>/dev/null
    [[ -x "$stage/$path" ]] || missing_staged+=("$path")
done <<< "$STAGED"
(( ${#missing_staged[@]} == 0 )) || fail_pre "not staged: ${missing_staged[*]} (run scripts/stage-gpu.sh and carry stage/)"
if [[ -n "$glibc_needed" && -n "$glibc_here" ]]; then
    if [[ "$(printf '%s\n%s\n' "$glibc_needed" "$glibc_here" | sort -V | tail -n1)" != "$glibc_here" ]]; then
        fail_pre "glibc $glibc_here is older than the $glibc_needed the staged binaries need"
    fi
fi
if [[ -n "$staged_commit" && "$commit" != unknown && "${staged_commit%% *}" != "${commit%% *}" ]]; then
    warn_pre "staged from ${staged_commit:0:12}, tree at ${commit:0:12}"
fi
for lib in "libcuda.so.1:$libcuda_dir" "libnvrtc:$nvrtc_dir" "libcublas:$cublas_dir"; do
    if [[ -z "${lib#*:}" ]]; then
        if [[ $gpu_present == 1 ]]; then fail_pre "${lib%%:*} not found"; else warn_pre "${lib%%:*} not found"; fi
    fi
done
command -v timeout >/dev/null 2>&1 || fail_pre "no timeout command"
command -v "$python" >/dev/null 2>&1 || fail_pre "no $python"
say "preflight: $preflight_status${preflight_note:+ ($preflight_note)}"
record preflight preflight "$preflight_status" 0 0 1 0 "staged binaries, glibc, CUDA libraries" "$preflight_note"

# --- the checks -----------------------------------------------------------------------------
tf32_flag=""
[[ "${GPU_PROOF_TF32:-1}" == 1 ]] && tf32_flag="--tf32"

# Expands one command line of the table into the array `cmd`.
expand_command() {
    local id="$1" line="$2" w target group=() in_group=0
    cmd=()
    line="${line//@S@/$stage}"
    line="${line//@O@/$work/$id}"
    line="${line//@PY@/$python}"
    line="${line//@BW@/${MEM_BUDGET_WIDE:-16GiB}}"
    line="${line//@BD@/${MEM_BUDGET_DEEP:-8GiB}}"
    line="${line//@TF32@/$tf32_flag}"
    local -
    set -f  # the words are not globs
    while [[ "$line" =~ @O:([A-Za-z0-9_-]+)@ ]]; do
        target="${BASH_REMATCH[1]}"
        line="${line//@O:$target@/$work/$target}"
    done
    for w in $line; do
        if [[ "$w" == "[" ]]; then in_group=1; group=(); continue; fi
        if [[ "$w" == "]" ]]; then
            in_group=0
            (( ${#group[@]} > 0 )) && [[ -f "${group[-1]}" ]] && cmd+=("${group[@]}")
            continue
        fi
        if [[ $in_group == 1 ]]; then group+=("$w"); else cmd+=("$w"); fi
    done
}

# Libtest's failed test names in a log (the list after "failures:").
failed_tests() {
    awk '/^failures:$/ { n++; next } n == 2 && /^    [A-Za-z0-9_:]+$/ { print $1 } /^test result:/ { n = 0 }' "$1" | sort -u
}

# run_check ID KIND NOGPU TIMEOUT EXPECTED MARKER COMMAND-LINE
run_check() {
    local id="$1" kind="$2" nogpu="$3" tmo="$4" exp="$5" marker="$6" line="$7"
    local dir="$work/$id" left limit rc status note="" secs started
    mkdir -p "$dir"
    expand_command "$id" "$line"
    local shown="${cmd[*]}"
    left=$(( deadline - $(elapsed) ))
    if (( exp > left )); then
        say "===== $id: skipped (expected ${exp} s, ${left} s left before the deadline)"
        record "$id" "$kind" skipped -1 0 "$exp" "$tmo" "$shown" "expected ${exp} s > ${left} s left"
        return
    fi
    if [[ $gpu_present == 0 && "$nogpu" == skip ]]; then
        say "===== $id: no-gpu (not run: it would fall back to the CPU)"
        record "$id" "$kind" no-gpu -1 0 "$exp" "$tmo" "$shown" "no GPU on this machine: not run"
        return
    fi
    local prog="${cmd[0]}" w
    if [[ "$prog" == env ]]; then
        for w in "${cmd[@]:1}"; do [[ "$w" == *=* ]] || { prog="$w"; break; }; done
    fi
    if [[ ! -x "$prog" ]] && ! command -v "$prog" >/dev/null 2>&1; then
        say "===== $id: not staged ($prog)"
        record "$id" "$kind" not-staged -1 0 "$exp" "$tmo" "$shown" "missing $prog"
        return
    fi
    limit=$tmo
    (( limit > left )) && limit=$left
    say ""
    say "===== $id (timeout ${limit} s, expected ${exp} s, at $(elapsed) s): $shown"
    started="$(date +%s)"
    (cd "$repo_root" && export GPU_PROOF_CHECK="$id" GPU_PROOF_EXPECTED_S="$exp" \
        && timeout --kill-after=5 "$limit" "${cmd[@]}") > "$dir/log.txt" 2>&1
    rc=$?
    secs=$(( $(date +%s) - started ))
    cat "$dir/log.txt" >> "$log_file"
    local marked=0
    grep -Eq -- "$marker" "$dir/log.txt" && marked=1
    if [[ $rc == 124 || $rc == 137 ]]; then
        status=timeout; note="stopped after ${limit} s"
    elif [[ $gpu_present == 0 ]]; then
        if [[ $rc == 0 ]]; then status=fail; note="exit 0 without a GPU: a skip or a CPU fallback passed as a result"
        else status=no-gpu; note="failed without a GPU, as it must (exit $rc)"; fi
    elif [[ $rc != 0 ]]; then
        status=fail; note="exit $rc"
    elif [[ $marked == 0 ]]; then
        status=cpu-fallback; note="exit 0 but it never printed that it used the CUDA device (/$marker/)"
    else
        status=pass
    fi
    if [[ "$kind" == test && $gpu_present == 1 ]] && grep -q 'SKIPPED: no GPU' "$dir/log.txt"; then
        status=fail; note="${note:+$note; }a test skipped for want of a GPU"
    fi
    say "===== $id: $status (exit $rc, $secs s)${note:+: $note}"
    record "$id" "$kind" "$status" "$rc" "$secs" "$exp" "$tmo" "$shown" "$note"
    if [[ "$kind" == test && "$status" == fail && $gpu_present == 1 ]]; then
        follow_up "$id" "$dir" "${cmd[@]}"
    fi
}

# After a failed test binary: each failed test alone (a CUDA error poisons the process's context,
# so the tests after it fail too), and the bit-for-bit ones with --fmad=false.
follow_up() {
    local id="$1" dir="$2"
    shift 2
    local base=("$@") names name left rc bits=() n_ok=0 n_bad=0 bad="" t0
    names="$(failed_tests "$dir/log.txt")"
    [[ -n "$names" ]] || return
    t0="$(date +%s)"
    for name in $names; do
        left=$(( deadline - $(elapsed) ))
        (( left > 40 )) || { say "  (no time left to rerun $name alone)"; break; }
        (( $(date +%s) - t0 < 90 )) || { say "  (reruns of $id stop after 90 s)"; break; }
        timeout --kill-after=5 $(( left < 60 ? left - 10 : 60 )) "${base[@]}" --exact "$name" \
            > "$dir/alone-$name.txt" 2>&1
        rc=$?
        if [[ $rc == 0 ]]; then n_ok=$((n_ok + 1)); else n_bad=$((n_bad + 1)); bad="$bad $name"; fi
        in_list "$name" "${BIT_FOR_BIT_TESTS// /,}" && [[ $rc != 0 ]] && bits+=("$name")
    done
    say "  $id: failed tests rerun alone: $n_ok pass, $n_bad fail${bad:+ ($bad )}"
    record "$id/alone" test "$([[ $n_bad == 0 ]] && echo pass || echo fail)" "$n_bad" \
        $(( $(date +%s) - t0 )) 0 60 \
        "each failed test alone" "$n_ok pass, $n_bad fail${bad:+:$bad}"
    if (( ${#bits[@]} > 0 )); then
        say "  $id: a bit-for-bit f32/bf16 test failed: it depends on identical FMA contraction;" \
            "rerunning it with REFORMER_NVRTC_OPTIONS=--fmad=false before suspecting a kernel"
        n_ok=0; n_bad=0; bad=""
        for name in "${bits[@]}"; do
            left=$(( deadline - $(elapsed) ))
            (( left > 40 )) || break
            if REFORMER_NVRTC_OPTIONS=--fmad=false timeout --kill-after=5 60 "${base[@]}" \
                --exact "$name" > "$dir/fmad-off-$name.txt" 2>&1; then
                n_ok=$((n_ok + 1))
            else
                n_bad=$((n_bad + 1)); bad="$bad $name"
            fi
        done
        record "$id/fmad-off" test "$([[ $n_bad == 0 && $n_ok -gt 0 ]] && echo pass || echo fail)" \
            "$n_bad" 0 0 60 "REFORMER_NVRTC_OPTIONS=--fmad=false, the bit-for-bit tests" \
            "$n_ok pass, $n_bad fail${bad:+:$bad}; pass here means FMA contraction, not a kernel"
    fi
}

while IFS='|' read -r id kind nogpu tmo exp marker line; do
    id="$(trim "$id")"
    [[ -n "$id" ]] || continue
    if [[ -n "$only" ]] && ! in_list "$id" "$only"; then continue; fi
    if [[ -n "$skip" ]] && in_list "$id" "$skip"; then continue; fi
    run_check "$id" "$(trim "$kind")" "$(trim "$nogpu")" "$(scaled "$(trim "$tmo")")" \
        "$(scaled "$(trim "$exp")")" "$(trim "$marker")" "$(trim "$line")"
done <<< "$CHECKS"

pack

# --- the verdict ----------------------------------------------------------------------------
# The summary script's (it also judges the figures: the plan ratio, the runner); the records'
# statuses alone where it could not run.
ok="" dry_ok=""
if [[ -f "$work/verdict" ]]; then
    read -r ok dry_ok < "$work/verdict"
    ok="${ok#ok=}"; dry_ok="${dry_ok#dry_run_ok=}"
else
    ok=1; dry_ok=1
    while IFS= read -r rec; do
        st="$(sed -n 's/.*"status": "\([^"]*\)".*/\1/p' <<< "$rec")"
        id="$(sed -n 's/^{"id": "\([^"]*\)".*/\1/p' <<< "$rec")"
        [[ "$st" == pass || "$st" == skipped ]] || ok=0
        if [[ "$id" == preflight ]]; then [[ "$st" == pass ]] || dry_ok=0
        else [[ "$st" == no-gpu || "$st" == skipped ]] || dry_ok=0; fi
    done < "$runs_file"
fi
say "gpu-proof: done in $(elapsed) s; $([[ $ok == 1 ]] && echo 'every check that ran passed' || echo 'NOT every check that ran passed'); results in $out_dir"
status=$([[ $ok == 1 ]] && echo 0 || echo 1)
if [[ $dry_run == 1 ]]; then
    # The plumbing works when every GPU check reported no-gpu and the files are there.
    [[ $dry_ok == 1 && -f "$out_dir/summary.md" && -f "$out_dir/gpu-proof.tar.gz" ]]
    status=$?
    say "dry run: $([[ $status == 0 ]] && echo 'the plumbing works' || echo 'BROKEN') (every GPU check must report no-gpu)"
fi
copy_log
rm -rf "$work"
exit "$status"
