#!/usr/bin/env bash
# On the GPU machine, from the repository root: GPU correctness checks, then (only if they
# pass) the decode benchmark grid. Expects .gpu-bin/ staged by benches/gpu/build.sh.
set -uo pipefail
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if ! timeout 120 bash .gpu-bin/gpu-run.sh .gpu-bin/dms-gpu check 2>&1 | tee "$OUT/check.log"; then
  echo "CHECK FAILED"; exit 1
fi
grep -q "GPU CHECKS PASSED" "$OUT/check.log" || { echo "CHECK FAILED"; exit 1; }
timeout 380 bash .gpu-bin/gpu-run.sh .gpu-bin/dms-gpu bench --out "$OUT/gpu-bench.json" "$@" 2>"$OUT/bench.err" | tee "$OUT/bench.log"
tail -5 "$OUT/bench.err"
