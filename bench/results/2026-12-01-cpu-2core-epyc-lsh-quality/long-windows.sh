#!/usr/bin/env bash
# Item 2: cp6 on 4096-token windows, LSH against exact attention, the two arms side by side on
# one thread each (same seed, same data, same minutes; each fits its schedule to the budget).
# Usage: long-windows.sh [MINUTES]   (default 55)
set -euo pipefail
cd "$(dirname "$0")/../../.."
r=bench/results/2026-12-01-cpu-2core-epyc-lsh-quality
minutes="${1:-55}"
common=(--text ../shared/data/shakespeare.txt --preset cp6 --device cpu --seq-len 4096
        --batch 2 --warmup 30 --minutes "$minutes" --eval-every 10 --eval-windows 4
        --sample-tokens 0 --seed 0)
for arm in lsh exact; do
    RAYON_NUM_THREADS=1 nice -n 10 target/release/examples/train_text "${common[@]}" \
        --lsh-as "$arm" --out "$r/long-4096-$arm" --force >"$r/long-4096-$arm.log" 2>&1 &
done
wait
