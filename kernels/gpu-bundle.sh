#!/usr/bin/env bash
# Build what kernels/gpu-check.sh needs on a GPU machine without Rust: stripped release
# binaries of gpu-check and worker in ./gpu-bundle (git-ignored; ~10 MB), to be carried
# there next to the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kernels -p worker --bin gpu-check --bin worker
mkdir -p gpu-bundle
strip -o gpu-bundle/gpu-check target/release/gpu-check
strip -o gpu-bundle/worker target/release/worker
ls -la gpu-bundle
