#!/usr/bin/env bash
# Generation speed against the context length, with and without the decoding caches (issue 12),
# on this project's 2-core CPU. The model: cp6 trained for 18 minutes here
# (`train_text --device cpu --minutes 18 --out /work/runs-cp6b`; speed does not depend on the
# weights, the greedy agreement does).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=bench/results/2026-12-01-cpu-2core-epyc-generate
cargo build --release --example bench_generate
./target/release/examples/bench_generate \
    --checkpoint "${CHECKPOINT:-/work/runs-cp6b/checkpoint.safetensors}" \
    --text data/shakespeare.txt \
    --min-log2 10 --max-log2 19 --new 256 \
    --no-cache-new 3 --no-cache-max-log2 16 \
    --agreement 200 \
    --out "$out" 2>&1 | tee "$out/run.log"
