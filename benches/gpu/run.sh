#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .gpu-bin/ staged by benches/gpu/build.sh:
#   check   GPU kernels and bookkeeping vs the CPU implementation and NVIDIA's DMS fixture
#           (always first; nothing is timed unless it passes)
#   tune    decode kernels (tiled, warps) x grid sizes at the memory limit, Llama-3.1-8B 32K
#   prefill real prompts through the masked one-pass prefill, then decode (batch 1)
#   grid    the decode benchmark grid (extra arguments go to `dms-gpu bench`)
# STEPS picks and orders the steps after check (default "tune prefill grid"); each has a time
# cap so that the whole run stays inside one 10-minute device call.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if ! timeout 120 bash .gpu-bin/gpu-run.sh .gpu-bin/dms-gpu check 2>&1 | tee "$OUT/check.log"; then
  echo "CHECK FAILED"; exit 1
fi
grep -q "GPU CHECKS PASSED" "$OUT/check.log" || { echo "CHECK FAILED"; exit 1; }
for step in ${STEPS:-tune prefill grid}; do
  case $step in
    tune) timeout 90 bash .gpu-bin/gpu-run.sh .gpu-bin/dms-gpu tune --out "$OUT/gpu-tune.json" 2>"$OUT/tune.err" | tee "$OUT/tune.log"; tail -3 "$OUT/tune.err" ;;
    prefill) timeout 90 bash .gpu-bin/gpu-run.sh .gpu-bin/dms-gpu prefill --out "$OUT/gpu-prefill.json" 2>"$OUT/prefill.err" | tee "$OUT/prefill.log"; tail -3 "$OUT/prefill.err" ;;
    grid) timeout 290 bash .gpu-bin/gpu-run.sh .gpu-bin/dms-gpu bench --out "$OUT/gpu-bench.json" "$@" 2>"$OUT/bench.err" | tee "$OUT/bench.log"; tail -5 "$OUT/bench.err" ;;
    *) echo "unknown step $step (tune, prefill, grid)"; exit 2 ;;
  esac
done
