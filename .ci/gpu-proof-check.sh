#!/usr/bin/env bash
# CI (no GPU, no extra build): keeps scripts/gpu-proof.sh working where it cannot be run for
# real.
#   1. A fake GPU: stub binaries and a stub PyTorch stand in for the staged ones. Checks the
#      deadline (later checks skipped and recorded), the statuses (pass, fail, cpu-fallback for
#      a run that never said it used the GPU, a peak off its plan), the failed-test reruns and
#      the --fmad=false hint for the bit-for-bit tests, the exit status, and the packing (at
#      most 4 files, named as documented).
#   2. The real dry run: the builds `cargo test --workspace` already made, staged with
#      `scripts/stage-gpu.sh --profile test` (no second build), then `gpu-proof.sh --dry-run`:
#      every GPU check must report no-gpu, within 2 minutes.
# Usage: .ci/gpu-proof-check.sh [stubs|dry-run] (default: both)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
what="${1:-all}"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/gpu-proof-check.XXXXXX")"
trap '[[ -n "${KEEP_TMP:-}" ]] || rm -rf "$tmp"' EXIT

fail() { echo "gpu-proof-check: FAILED: $*" >&2; exit 1; }
status_of() {  # status_of SUMMARY.json ID
    python3 -c 'import json, sys
s = json.load(open(sys.argv[1]))
print(next((c["final_status"] for c in s["checks"] if c["id"] == sys.argv[2]), "absent"))' "$1" "$2"
}
expect_status() {  # expect_status SUMMARY.json ID STATUS
    local got
    got="$(status_of "$1" "$2")"
    [[ "$got" == "$3" ]] || fail "$2: expected $3, got $got (see $(dirname "$1")/summary.md)"
}
check_outputs() {  # at most 4 files, the documented ones, none over 16 MiB
    local dir="$1" n
    n="$(find "$dir" -type f | wc -l)"
    (( n <= 4 )) || fail "$n files in $dir (at most 4)"
    for f in summary.md summary.json gpu-proof.log gpu-proof.tar.gz; do
        [[ -f "$dir/$f" ]] || fail "$dir/$f missing"
        (( $(stat -c %s "$dir/$f") < 16 * 1024 * 1024 )) || fail "$dir/$f is over 16 MiB"
    done
    tar -tzf "$dir/gpu-proof.tar.gz" > "$tmp/listing" || fail "$dir/gpu-proof.tar.gz is not a tarball"
    grep -q 'runs.jsonl' "$tmp/listing" || fail "runs.jsonl not packed"
}

# ----- 1. a fake GPU ------------------------------------------------------------------------
make_stubs() {
    local stage="$1"
    mkdir -p "$stage"
    cat > "$tmp/stub-bin" <<'STUB'
#!/usr/bin/env bash
# A staged binary's stand-in: prints what the real one prints on a GPU and writes its files.
me="$(basename "$0")"
# Half as long as the real one is expected to take (scaled).
sleep "${STUB_SLEEP:-$(awk -v e="${GPU_PROOF_EXPECTED_S:-1}" 'BEGIN { print 0.5 * e }')}"
json="" out="" preset="" len="" exact=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --json) json="$2"; shift ;;
        --out) out="$2"; shift ;;
        --preset) preset="$2"; shift ;;
        --len) len="$2"; shift ;;
        --exact) exact="$2"; shift ;;
    esac
    shift
done
case "$me" in
    gpu_env)
        echo "using CUDA device 0: Stub GPU (sm_90) [gpu_environment]"
        echo "gpu-env: using CUDA device 0: Stub GPU (sm_90), 80.00 GiB total, 79.00 GiB free"
        echo 'gpu-env: {"image": "CUBIN", "device": "Stub GPU", "arch": "sm_90", "nvrtc": "13.0", "cublas": "13.0.0", "free_bytes": 84825604096, "compile_s": 0.5, "load_s": 0.01}'
        echo "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"
        ;;
    gpu_parity_*)
        echo "using CUDA device 0: Stub GPU (sm_90) [a_test]"
        if [[ "$me" == gpu_parity_attention && -n "${STUB_FAIL_BITS:-}" ]]; then
            if [[ -n "$exact" ]]; then
                [[ "${REFORMER_NVRTC_OPTIONS:-}" == --fmad=false ]] && { echo "test result: ok. 1 passed; 0 failed"; exit 0; }
                echo "test result: FAILED. 0 passed; 1 failed"; exit 101
            fi
            printf 'failures:\n\n---- bf16_hash_and_row_dot_equal_their_f32_runs_bit_for_bit stdout ----\nbits differ\n\nfailures:\n    bf16_hash_and_row_dot_equal_their_f32_runs_bit_for_bit\n\ntest result: FAILED. 11 passed; 1 failed; 0 ignored\n'
            exit 101
        fi
        echo "test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"
        ;;
    long_context)
        plan=$(( len * 4096 ))
        peak=$plan
        [[ ",${STUB_OFFPLAN:-}," == *",$preset,"* ]] && peak=$(( plan * 12 / 10 ))
        runner="Cuda(0)"
        if [[ ",${STUB_CPU:-}," == *",$preset,"* ]]; then
            echo "--device cuda: no usable GPU (stub); running on the CPU" >&2
            runner="Reference"
        else
            echo "using CUDA device 0: Stub GPU" >&2
        fi
        printf '{"preset": "%s", "len": %s, "runner": "%s", "budget_bytes": 17179869184, "device_train_plan_bytes": %s, "device_infer_plan_bytes": %s, "train_peak_bytes": %s, "train_s_all": [2.5, 1.5], "train_s_median": 2.5, "train_driver_used_bytes": %s, "infer_peak_bytes": %s, "infer_s_all": [0.5]}\n' \
            "$preset" "$len" "$runner" "$plan" "$((plan / 2))" "$peak" "$((peak + 500000000))" "$((plan / 2))" > "$json"
        ;;
    bench_attention)
        echo "bench_attention: Stub GPU (sm_90), kernels compiled and loaded in 0.1 s"
        mkdir -p "$out"
        rows=""
        for n in 65536 524288; do
            for k in "lsh r=1:0.05" "lsh r=2:0.09" "local:0.04" "exact:2.0"; do
                rows="$rows{\"kind\": \"${k%%:*}\", \"len\": $n, \"status\": \"ok\", \"fwd_us_per_token\": 0.01, \"fwd_bwd_us_per_token\": ${k##*:}},"
            done
        done
        echo "[${rows%,}]" > "$out/attention.json"
        echo "<svg/>" > "$out/attention.svg"
        ;;
    *) echo "stub: unknown binary $me" >&2; exit 3 ;;
esac
STUB
    chmod +x "$tmp/stub-bin"
    while read -r path _pkg _kind _name; do
        mkdir -p "$stage/$(dirname "$path")"
        cp "$tmp/stub-bin" "$stage/$path"
    done < <(bash scripts/gpu-proof.sh --list-staged)
    printf 'commit: stub\nglibc_required: 2.17\n' > "$stage/manifest.txt"
    # The libraries the preflight looks for (never loaded: the binaries are stubs).
    mkdir -p "$tmp/libs"
    touch "$tmp/libs/libcuda.so.1" "$tmp/libs/libnvrtc.so.13" "$tmp/libs/libcublas.so.13"
    export GPU_PROOF_LIB_DIRS="$tmp/libs"
    # PyTorch's stand-in: the two benchmark scripts are faked, everything else is python3.
    cat > "$tmp/stub-python" <<'STUB'
#!/usr/bin/env python3
import json, os, sys, time
args = sys.argv[1:]
script = os.path.basename(args[0]) if args else ""
def arg(flag):
    return args[args.index(flag) + 1]
if script == "bench_torch_attention.py":
    time.sleep(float(os.environ.get("STUB_SLEEP", 0.5 * float(os.environ.get("GPU_PROOF_EXPECTED_S", 1)))))
    print("torch 2.11.0 on NVIDIA Stub: SDPA flash")
    os.makedirs(arg("--out"), exist_ok=True)
    rows = [dict(kind="torch-sdpa-flash", dtype="bf16", len=n, status="ok", fwd_us_per_token=0.1,
                 fwd_bwd_us_per_token=0.3 * n / 65536) for n in (65536, 524288)]
    json.dump(rows, open(os.path.join(arg("--out"), "attention.json"), "w"))
elif script == "bench_torch_step.py":
    time.sleep(float(os.environ.get("STUB_SLEEP", 0.5 * float(os.environ.get("GPU_PROOF_EXPECTED_S", 1)))))
    print("torch 2.11.0 on NVIDIA Stub: pre-LN transformer")
    rows = [dict(kind="torch-step", preset=p, len=1 << l, status="ok", step_s=1.0, peak_bytes=1 << 30)
            for p in ("cp6", "wide20") for l in (14, 16)]
    json.dump(dict(meta={}, rows=rows), open(arg("--out"), "w"))
else:
    os.execvp("python3", ["python3"] + args)
STUB
    chmod +x "$tmp/stub-python"
}

run_stubs() {
    local stage="$tmp/stub-stage" t0 t1 rc
    make_stubs "$stage"
    # A: everything passes; each stub takes half its check's expected time (scaled by 0.1 and
    # rounded to whole seconds: items 1-5 expect ~20 s and take ~10 s, the whole table expects
    # ~85 s), so the 24 s deadline runs items 1-5 and skips checks at the end. (At whole-second
    # granularity a tighter deadline makes which of the last checks still fit depend on the
    # machine's load; that they are skipped by the deadline, and only at the end, does not.)
    t0="$(date +%s)"
    rc=0
    GPU_PROOF_ASSUME_GPU=1 PYTHON="$tmp/stub-python" bash scripts/gpu-proof.sh --stage "$stage" \
        --out "$tmp/a" --deadline 24 --time-scale 0.1 > "$tmp/a.log" 2>&1 || rc=$?
    t1="$(date +%s)"
    [[ $rc == 0 ]] || { tail -n 40 "$tmp/a.log"; fail "A: exit $rc, expected 0"; }
    (( t1 - t0 <= 40 )) || fail "A: took $((t1 - t0)) s with a 24 s deadline"
    check_outputs "$tmp/a"
    for id in preflight env parity-model parity-attn wide20-2e19 deep20-2e19; do
        expect_status "$tmp/a/summary.json" "$id" pass
    done
    python3 - "$tmp/a/summary.json" <<'PY' || fail "A: the deadline skipped nothing, or not only at the end"
import json, sys
st = [c["final_status"] for c in json.load(open(sys.argv[1]))["checks"]]
first = st.index("skipped") if "skipped" in st else None
sys.exit(0 if first is not None and st[-1] == "skipped" and "fail" not in st else 1)
PY
    ! grep -q '"final_status": "timeout"' "$tmp/a/summary.json" || fail "A: a check timed out"
    grep -q '| wide20-2e19 | pass | train: peak' "$tmp/a/summary.md" || fail "A: no wide20 figure in summary.md"
    echo "gpu-proof-check: A (all pass, deadline skips, packing): ok in $((t1 - t0)) s"

    # B: a bit-for-bit test fails (rerun alone, then with --fmad=false), wide20's peak is off
    # its plan, deep20 lands on the CPU: exit 1, each named.
    rc=0
    GPU_PROOF_ASSUME_GPU=1 PYTHON="$tmp/stub-python" STUB_SLEEP=0 STUB_FAIL_BITS=1 \
        STUB_OFFPLAN=wide20 STUB_CPU=deep20 bash scripts/gpu-proof.sh --stage "$stage" \
        --out "$tmp/b" --deadline 120 --only env,parity-attn,wide20-2e19,deep20-2e19 \
        > "$tmp/b.log" 2>&1 || rc=$?
    [[ $rc == 1 ]] || { tail -n 40 "$tmp/b.log"; fail "B: exit $rc, expected 1"; }
    check_outputs "$tmp/b"
    expect_status "$tmp/b/summary.json" env pass
    expect_status "$tmp/b/summary.json" parity-attn fail
    expect_status "$tmp/b/summary.json" parity-attn/alone fail
    expect_status "$tmp/b/summary.json" parity-attn/fmad-off pass
    expect_status "$tmp/b/summary.json" wide20-2e19 fail
    expect_status "$tmp/b/summary.json" deep20-2e19 cpu-fallback
    expect_status "$tmp/b/summary.json" parity-model absent
    grep -q 'REFORMER_NVRTC_OPTIONS=--fmad=false before suspecting a kernel' "$tmp/b/summary.md" \
        || fail "B: no --fmad=false hint in summary.md"
    echo "gpu-proof-check: B (fail, cpu-fallback, off-plan, reruns, fmad hint, exit 1): ok"

    # C: without a GPU (no GPU_PROOF_ASSUME_GPU), a stub that exits 0 is a failure, not a pass.
    rc=0
    PYTHON="$tmp/stub-python" STUB_SLEEP=0 bash scripts/gpu-proof.sh --dry-run --stage "$stage" \
        --out "$tmp/c" --only env > "$tmp/c.log" 2>&1 || rc=$?
    [[ $rc != 0 ]] || fail "C: a dry run where a GPU check exits 0 must fail"
    expect_status "$tmp/c/summary.json" env fail
    echo "gpu-proof-check: C (exit 0 without a GPU is a failure): ok"
}

# ----- 2. the real dry run --------------------------------------------------------------------
run_dry() {
    local t0 t1 rc=0
    bash scripts/stage-gpu.sh --profile test --out "$tmp/stage" > "$tmp/stage.log" 2>&1 \
        || { tail -n 30 "$tmp/stage.log"; fail "staging the test-profile builds"; }
    grep -q '^glibc_required: [0-9]' "$tmp/stage/manifest.txt" || fail "no glibc_required in the manifest"
    t0="$(date +%s)"
    bash scripts/gpu-proof.sh --dry-run --stage "$tmp/stage" --out "$tmp/dry" > "$tmp/dry.log" 2>&1 || rc=$?
    t1="$(date +%s)"
    [[ $rc == 0 ]] || { tail -n 60 "$tmp/dry.log"; cat "$tmp/dry/summary.md" 2>/dev/null; fail "dry run: exit $rc"; }
    (( t1 - t0 <= 120 )) || fail "dry run took $((t1 - t0)) s (at most 120)"
    check_outputs "$tmp/dry"
    expect_status "$tmp/dry/summary.json" preflight pass
    expect_status "$tmp/dry/summary.json" env no-gpu
    expect_status "$tmp/dry/summary.json" parity-model no-gpu
    expect_status "$tmp/dry/summary.json" wide20-2e19 no-gpu
    expect_status "$tmp/dry/summary.json" attn no-gpu
    echo "gpu-proof-check: dry run with the staged test-profile builds: every GPU check no-gpu, ok in $((t1 - t0)) s"
}

case "$what" in
    stubs) run_stubs ;;
    dry-run) run_dry ;;
    all) run_stubs; run_dry ;;
    *) fail "unknown mode '$what' (stubs, dry-run)" ;;
esac
