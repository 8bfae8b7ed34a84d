#!/usr/bin/env bash
# The duplication table (item 1): five 1-layer models trained one after another on one thread.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=bench/results/2026-12-01-cpu-2core-epyc-lsh-quality/duplication
RAYON_NUM_THREADS=1 nice -n 10 target/release/examples/duplication --out "$out" 2>&1 | tee "$out.log"
