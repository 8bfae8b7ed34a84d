#!/usr/bin/env bash
# Side by side on the 2-core EPYC: the CPU reference model before the one model (bin-before),
# the one model on the CPU backend, alternating, then HF's Reformer.
set -u
B=${BIN:?set BIN to a folder holding long_context (before) and long_context_new (after)}
for rep in 1 2; do
  for len in 16384 65536; do
    for who in old new; do
      bin=$B/long_context; [ $who = new ] && bin=$B/long_context_new
      $bin --preset cp6 --len $len --steps 4 --infer 3 --device cpu --json $who-$len-$rep.json > $who-$len-$rep.log 2>&1
      echo "$(date +%T) $who $len rep $rep done"
    done
  done
done
for log2 in 14 16; do
  python3 ../../../scripts/bench_hf_reformer_step.py --lens $log2 --steps 3 --threads 2 --out hf-$log2.json > hf-$log2.log 2>&1
  echo "$(date +%T) hf 2^$log2 done"
done
