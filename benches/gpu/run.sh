#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .gpu-bin/ staged by benches/gpu/build.sh:
#   check   GPU kernels and bookkeeping vs the CPU implementation and NVIDIA's DMS fixture
#           (always first; nothing is timed unless it passes)
#   tune    decode kernels (tiled, warps) x grid sizes at the memory limit, Llama-3.1-8B 32K
#   prefill real prompts through the masked one-pass prefill, then decode (batch 1)
#   peer    ours vs mistral.rs (CUDA, normal cache) on the same random bf16 weights, batch 1
#   engine  `dms run` with the KV cache on the GPU == the host engine (NVIDIA's DMS fixture)
#   grid    the decode benchmark grid (extra arguments go to `dms-gpu bench`)
# STEPS picks and orders the steps after check (default "engine tune prefill peer"; then a second call
# with STEPS=grid). Each step has a time cap so that a call stays inside 10 device minutes.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# Unpacks .gpu-bin/NAME.xz (staged by build.sh) to /tmp/dms-gpu-bin/NAME.
unpack() {
  mkdir -p /tmp/dms-gpu-bin
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    ".gpu-bin/$1.xz" "/tmp/dms-gpu-bin/$1" || { echo "cannot unpack .gpu-bin/$1.xz"; exit 1; }
  chmod +x "/tmp/dms-gpu-bin/$1"
}
unpack dms-gpu
BIN=/tmp/dms-gpu-bin/dms-gpu
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if ! timeout 150 bash .gpu-bin/gpu-run.sh "$BIN" check 2>&1 | tee "$OUT/check.log"; then
  echo "CHECK FAILED"; exit 1
fi
grep -q "GPU CHECKS PASSED" "$OUT/check.log" || { echo "CHECK FAILED"; exit 1; }
for step in ${STEPS:-engine tune prefill peer}; do
  case $step in
    engine)
      unpack dms
      args=(run --config configs/dms-fixture-tiny.toml --prompt-ids 37,235,396,72,255 --max-tokens 40)
      host=$(timeout 60 bash .gpu-bin/gpu-run.sh /tmp/dms-gpu-bin/dms "${args[@]}" 2>/dev/null | grep -E '^[0-9]+(,[0-9]+)+$' | head -1)
      timeout 60 bash .gpu-bin/gpu-run.sh /tmp/dms-gpu-bin/dms "${args[@]}" --device cuda:0 >"$OUT/engine.log" 2>&1
      dev=$(grep -E '^[0-9]+(,[0-9]+)+$' "$OUT/engine.log" | head -1)
      tail -3 "$OUT/engine.log"
      if [ -n "$host" ] && [ "$host" = "$dev" ]; then echo "ENGINE: device cache == host engine (40 greedy tokens)"; else echo "ENGINE MISMATCH: host $host device $dev"; fi ;;
    tune) timeout 90 bash .gpu-bin/gpu-run.sh "$BIN" tune --out "$OUT/gpu-tune.json" 2>"$OUT/tune.err" | tee "$OUT/tune.log"; tail -3 "$OUT/tune.err" ;;
    prefill) timeout 90 bash .gpu-bin/gpu-run.sh "$BIN" prefill --out "$OUT/gpu-prefill.json" 2>"$OUT/prefill.err" | tee "$OUT/prefill.log"; tail -3 "$OUT/prefill.err" ;;
    peer) timeout 150 bash .gpu-bin/gpu-run.sh "$BIN" peer --out "$OUT/gpu-peer.json" 2>"$OUT/peer.err" | tee "$OUT/peer.log"; tail -3 "$OUT/peer.err" ;;
    grid) timeout 290 bash .gpu-bin/gpu-run.sh "$BIN" bench --out "$OUT/gpu-bench.json" "$@" 2>"$OUT/bench.err" | tee "$OUT/bench.log"; tail -5 "$OUT/bench.err" ;;
    *) echo "unknown step $step (engine, tune, prefill, peer, grid)"; exit 2 ;;
  esac
done
