#!/usr/bin/env bash
# Builds the CUDA benchmark binary here (no GPU needed) and stages it in .gpu-bin/ (ignored by
# git) with the launcher, ready to be carried to the GPU machine:
#     bash benches/gpu/build.sh           # with mistral.rs's CUDA build linked in (peer arm)
#     PEER=0 bash benches/gpu/build.sh    # without mistral.rs (a much shorter first build)
# Both binaries (dms-gpu, and the engine CLI dms) are stripped and xz-compressed (the peer build is ~125 MB, ~18 MB compressed; a
# device call carries at most 64 MiB); run.sh unpacks it on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
source ../shared/scripts/cuda-env.sh >/dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_CUDA:-$HOME/.cache/dms-rs-target-cuda}"
features=mistralrs-cuda
[ "${PEER:-1}" = 0 ] && features=cuda
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
echo "staged .gpu-bin/{dms-gpu,dms}.xz ($(du -ch .gpu-bin/*.xz | tail -1 | cut -f1), features $features); on the GPU machine run: bash benches/gpu/run.sh"
