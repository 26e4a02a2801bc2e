#!/usr/bin/env bash
# Build what kernels/gpu-check.sh needs on a GPU machine without Rust: stripped release
# binaries of gpu-check and worker in ./gpu-bundle (git-ignored; ~16 MB), to be carried
# there next to the working tree, and (where NVIDIA's NVRTC 13 wheel is installed, as CI
# installs it) the kernels compiled for H100/H200 (sm_90, sm_90a, the PDL builds) in
# gpu-bundle/kernel-cache: the GPU run then loads them instead of compiling them in each
# of its processes (about 30 s of device time each run). The cache key includes the NVRTC
# version, so a machine with another NVRTC compiles afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kernels -p worker --bin gpu-check --bin worker
mkdir -p gpu-bundle
strip -o gpu-bundle/gpu-check target/release/gpu-check
strip -o gpu-bundle/worker target/release/worker
rm -rf gpu-bundle/kernel-cache
nv=$(python3 -c 'import nvidia, os; print(next(p for p in (os.path.join(b, "cu13", "lib") for b in nvidia.__path__) if os.path.exists(os.path.join(p, "libnvrtc.so.13"))))' 2> /dev/null || true)
if [ -n "$nv" ]; then
  LD_LIBRARY_PATH="$nv${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    gpu-bundle/gpu-check --precompile gpu-bundle/kernel-cache --arch sm_90 > /dev/null
else
  echo "gpu-bundle: no NVRTC 13 wheel here: the GPU run will compile its kernels" >&2
fi
ls -la gpu-bundle
