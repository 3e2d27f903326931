#!/usr/bin/env bash
# On the GPU machine, from the repository root: GPU correctness checks, then (only if they
# pass) real prompts through the masked prefill and the decode benchmark grid. Expects
# .gpu-bin/ staged by benches/gpu/build.sh. Extra arguments go to `dms-gpu bench`.
# Set PREFILL=0 to skip the prefill step.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if ! timeout 120 bash .gpu-bin/gpu-run.sh .gpu-bin/dms-gpu check 2>&1 | tee "$OUT/check.log"; then
  echo "CHECK FAILED"; exit 1
fi
grep -q "GPU CHECKS PASSED" "$OUT/check.log" || { echo "CHECK FAILED"; exit 1; }
if [ "${PREFILL:-1}" != 0 ]; then
  timeout 100 bash .gpu-bin/gpu-run.sh .gpu-bin/dms-gpu prefill --out "$OUT/gpu-prefill.json" 2>"$OUT/prefill.err" | tee "$OUT/prefill.log"
  tail -3 "$OUT/prefill.err"
fi
timeout 340 bash .gpu-bin/gpu-run.sh .gpu-bin/dms-gpu bench --out "$OUT/gpu-bench.json" "$@" 2>"$OUT/bench.err" | tee "$OUT/bench.log"
tail -5 "$OUT/bench.err"
