#!/usr/bin/env bash
# Every benchmark of docs/benchmarks.md, one after the other, on 2 threads (release builds).
# Needs `pip install onnxruntime numpy` for the onnxruntime column.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS=2
cargo build -q --release -p nasvit-cli --example bench_runtimes
cargo build -q --release -p nasvit-infer --example bench_engine --example bench_kernels
cargo build -q --release -p nasvit-model --example bench_model
cargo build -q --release -p nasvit-cli
echo "## machine"; nproc; grep -m1 "model name" /proc/cpuinfo; uptime
echo "## inference, three runtimes (issue 6)"
./target/release/examples/bench_runtimes 2 100 7
RAYON_NUM_THREADS=1 ./target/release/examples/bench_runtimes 1 60 5
echo "## engine profile and kernels"
./target/release/examples/bench_engine --threads 2 --iters 300 --profile 1
./target/release/examples/bench_kernels
echo "## burn supernet, batch 8 (issue 3)"; ./target/release/examples/bench_model 5
echo "## sandwich training step: cpu engine (2 and 1 threads), burn engine (issues 4, 20)"
./target/release/nasvit bench-train --space tiny --batch 64 --input 28 --steps 5 --threads 2
./target/release/nasvit bench-train --space tiny --batch 64 --input 28 --steps 5 --threads 1
./target/release/nasvit bench-train --space tiny --batch 64 --input 28 --steps 2 --threads 2 --engine burn
./target/release/nasvit bench-train --space official --batch 8 --input 192 --steps 3 --threads 2
# The released PyTorch code on the same work (needs `pip install torch numpy` and a clone of
# facebookresearch/NASViT in NASVIT_RELEASED, see the script's docstring).
if [ -n "${NASVIT_RELEASED:-}" ]; then
  python3 scripts/bench_released_step.py --repo "$NASVIT_RELEASED" --batch 64 --input 28 --steps 5 --threads 2
  python3 scripts/bench_released_step.py --repo "$NASVIT_RELEASED" --space official --batch 8 --input 192 --steps 2 --threads 2
fi
