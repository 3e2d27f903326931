#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .gpu-bin/ staged by benches/gpu/build.sh:
#   check   GPU kernels and bookkeeping vs the CPU implementation and NVIDIA's DMS fixture
#           (always first; nothing is timed unless it passes)
#   tune    decode kernels (tiled, warps) x grid sizes at the memory limit, Llama-3.1-8B 32K
#   prefill real prompts through the masked one-pass prefill, then decode (batch 1)
#   peer    ours vs mistral.rs (CUDA, normal cache) on the same random bf16 weights, batch 1
#   grid    the decode benchmark grid (extra arguments go to `dms-gpu bench`)
# STEPS picks and orders the steps after check (default "tune prefill peer"; then a second call
# with STEPS=grid). Each step has a time cap so that a call stays inside 10 device minutes.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
BIN=.gpu-bin/dms-gpu
if [ -f .gpu-bin/dms-gpu.xz ]; then
  BIN=/tmp/dms-gpu-bin/dms-gpu
  mkdir -p /tmp/dms-gpu-bin
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    .gpu-bin/dms-gpu.xz "$BIN" || { echo "cannot unpack .gpu-bin/dms-gpu.xz"; exit 1; }
  chmod +x "$BIN"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if ! timeout 150 bash .gpu-bin/gpu-run.sh "$BIN" check 2>&1 | tee "$OUT/check.log"; then
  echo "CHECK FAILED"; exit 1
fi
grep -q "GPU CHECKS PASSED" "$OUT/check.log" || { echo "CHECK FAILED"; exit 1; }
for step in ${STEPS:-tune prefill peer}; do
  case $step in
    tune) timeout 90 bash .gpu-bin/gpu-run.sh "$BIN" tune --out "$OUT/gpu-tune.json" 2>"$OUT/tune.err" | tee "$OUT/tune.log"; tail -3 "$OUT/tune.err" ;;
    prefill) timeout 90 bash .gpu-bin/gpu-run.sh "$BIN" prefill --out "$OUT/gpu-prefill.json" 2>"$OUT/prefill.err" | tee "$OUT/prefill.log"; tail -3 "$OUT/prefill.err" ;;
    peer) timeout 150 bash .gpu-bin/gpu-run.sh "$BIN" peer --out "$OUT/gpu-peer.json" 2>"$OUT/peer.err" | tee "$OUT/peer.log"; tail -3 "$OUT/peer.err" ;;
    grid) timeout 290 bash .gpu-bin/gpu-run.sh "$BIN" bench --out "$OUT/gpu-bench.json" "$@" 2>"$OUT/bench.err" | tee "$OUT/bench.log"; tail -5 "$OUT/bench.err" ;;
    *) echo "unknown step $step (tune, prefill, peer, grid)"; exit 2 ;;
  esac
done
