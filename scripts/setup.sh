#!/usr/bin/env bash
# Fresh-machine setup: Fashion-MNIST from Debian (for the demo) and a release build of the `nasvit` binary.
# Needs a Rust toolchain (rustup) and, for the data set, apt (as root or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup first" >&2; exit 1; }
echo "building nasvit (release; about 10 minutes on 2 cores from a clean checkout)"
cargo build --release -p nasvit-cli
echo "done: ./target/release/nasvit demo"
