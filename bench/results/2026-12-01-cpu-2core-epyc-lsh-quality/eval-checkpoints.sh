#!/usr/bin/env bash
# The long-window pair's final checkpoints on the held-out split (the corpus's last 5%, as
# train_text holds it out), with the `evaluate` tool: 4 windows of 4096 (train_text's own
# validation windows: the LSH arm at 4 rounds repeats its final figure) and 16 windows at
# 1, 2, 4 and 8 rounds.
set -euo pipefail
cd "$(dirname "$0")/../../.."
r=bench/results/2026-12-01-cpu-2core-epyc-lsh-quality
text=../shared/data/shakespeare.txt
held=$(mktemp)
trap 'rm -f "$held"' EXIT
n=$(stat -c %s "$text")
tail -c $(( (n * 5 + 50) / 100 )) "$text" >"$held"   # round(5% of n), as TextData holds out
ev() { RAYON_NUM_THREADS=1 nice -n 10 target/release/examples/evaluate --text "$held" --len 4096 "$@"; }
{
    echo -e "arm\twindows_flag\trounds_flag\tbits_per_byte\tnats\twindows\tlen\ttokens\trounds"
    for arm in lsh exact; do
        ck="$r/long-4096-$arm/checkpoint.safetensors"
        echo -e "$arm\t4\tdefault\t$(ev --checkpoint "$ck" --windows 4)"
        rounds="1 2 4 8"; [[ $arm == exact ]] && rounds="1"
        for k in $rounds; do
            echo -e "$arm\t16\t$k\t$(ev --checkpoint "$ck" --windows 16 --rounds "$k")"
        done
    done
} | tee "$r/long-4096-evaluate.tsv"
