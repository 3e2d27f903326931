#!/usr/bin/env bash
# Builds the CUDA benchmark binary here (no GPU needed) and stages it in .gpu-bin/ (ignored by
# git) with the launcher, ready to be carried to the GPU machine.
#     bash benches/gpu/build.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source ../shared/scripts/cuda-env.sh >/dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_CUDA:-$HOME/.cache/dms-rs-target-cuda}"
cargo build --release -p dms-integration --features cuda --bin dms-gpu
mkdir -p .gpu-bin
cp "$CARGO_TARGET_DIR/release/dms-gpu" .gpu-bin/
cp ../shared/scripts/gpu-run.sh .gpu-bin/
grep -qx '/.gpu-bin/' .git/info/exclude 2>/dev/null || echo '/.gpu-bin/' >> .git/info/exclude
echo "staged .gpu-bin/dms-gpu; on the GPU machine run: bash benches/gpu/run.sh"
