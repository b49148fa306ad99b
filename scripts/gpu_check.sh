#!/usr/bin/env bash
# Issue 21's check on a machine with a GPU, as one call: build with the GPU backends, wgpu-vs-Flex parity on the
# GPU, then one official-space sandwich step (batch 64, 192 px input) timed on the GPU by nasvit and by the released
# PyTorch code on the same GPU. Results land in $OUT (default gpu-check/); paste them into docs/benchmarks.md.
#
#   NASVIT_REPO=/path/to/facebookresearch/NASViT OUT=gpu-check bash scripts/gpu_check.sh
#
# Needs: Rust + the cargo registry (or a vendored copy), a Vulkan driver for wgpu, torch with CUDA for the
# comparison. The cuda feature builds only with network access (cubecl-llvm downloads LLVM); without it the
# script says so and goes on with wgpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
STEPS=${STEPS:-5}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null || true

echo "== build (--features wgpu)"
cargo build --release -p nasvit-cli --features wgpu 2>&1 | tail -2
echo "== parity: the supernet and four training steps on wgpu against Flex"
NASVIT_TEST_DEVICE=${NASVIT_TEST_DEVICE:-wgpu} cargo test --release -p nasvit-model -p nasvit-train \
  --features nasvit-train/wgpu --test wgpu 2>&1 | tee "$OUT/parity.txt" | grep -E "^test |test result"

echo "== nasvit bench-train on wgpu"
./target/release/nasvit bench-train --space official --batch 64 --input 192 --steps "$STEPS" --device wgpu --json \
  | tee "$OUT/nasvit-wgpu.json"

echo "== nasvit bench-train on cuda (if the cuda feature builds here)"
if cargo build --release -p nasvit-cli --features cuda --target-dir target/cuda 2>"$OUT/cuda-build.txt"; then
  ./target/cuda/release/nasvit bench-train --space official --batch 64 --input 192 --steps "$STEPS" --device cuda \
    --json | tee "$OUT/nasvit-cuda.json"
else
  echo "the cuda feature did not build (see $OUT/cuda-build.txt)"
fi

echo "== the released PyTorch step on the same GPU (eager)"
if [ -n "${NASVIT_REPO:-}" ]; then
  python3 scripts/bench_released_step.py --repo "$NASVIT_REPO" --space official --batch 64 --input 192 \
    --steps "$STEPS" --device cuda --json | tee "$OUT/pytorch-cuda.json"
else
  echo "NASVIT_REPO is not set: no PyTorch comparison"
fi
