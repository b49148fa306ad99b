#!/usr/bin/env bash
# Every benchmark of docs/benchmarks.md, one after the other, on 2 threads (release builds).
# Needs `pip install onnxruntime numpy` for the onnxruntime column.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS=2
cargo build -q --release -p nasvit-cli --example bench_runtimes
cargo build -q --release -p nasvit-infer --example bench_engine --example bench_kernels
cargo build -q --release -p nasvit-model --example bench_model
cargo build -q --release -p nasvit-train --example bench_step
echo "## machine"; nproc; grep -m1 "model name" /proc/cpuinfo; uptime
echo "## inference, three runtimes (issue 6)"
./target/release/examples/bench_runtimes 2 100 7
RAYON_NUM_THREADS=1 ./target/release/examples/bench_runtimes 1 60 5
echo "## engine profile and kernels"
./target/release/examples/bench_engine --threads 2 --iters 300 --profile 1
./target/release/examples/bench_kernels
echo "## burn supernet, batch 8 (issue 3)"; ./target/release/examples/bench_model 5
echo "## sandwich step (issue 4)"
./target/release/examples/bench_step tiny 64 28 5
./target/release/examples/bench_step official 8 192 2
