#!/usr/bin/env bash
# The whole test suite. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# NVRTC from NVIDIA's wheel (installed by .ci/run) on the loader path, so the kernels
# crate's tests compile every CUDA kernel to cubins through cudarc (no GPU needed).
if nv=$(python3 -c 'import nvidia, os; print(next(p for p in (os.path.join(b, "cu13", "lib") for b in nvidia.__path__) if os.path.exists(os.path.join(p, "libnvrtc.so.13"))))' 2>/dev/null); then
  export LD_LIBRARY_PATH="$nv${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
cargo test --workspace --release "$@" 2>&1 | tee "$log" || status=$?
# Machines with AVX-512 run the 16-lane kernels above; check the AVX2 kernels' batch
# invariance and conformance too, since other workers' CPUs may lack AVX-512.
if [ $# -eq 0 ] && grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  echo "== again with SOV_NO_AVX512=1 (AVX2 kernels) =="
  SOV_NO_AVX512=1 cargo test --release -p worker --lib --test engine --test conformance 2>&1 \
    | tee -a "$log" || status=$?
fi
# Every CUDA kernel compiles with NVRTC 13.0 for sm_80 and sm_90 without register
# spills (no GPU needed; the wheels come from .ci/run). Elsewhere it is skipped with a
# message, and under CI=true a missing toolchain is a failure.
if [ $# -eq 0 ]; then
  echo "== CUDA kernels: NVRTC compile + ptxas report =="
  if python3 -c 'import nvidia' 2>/dev/null; then
    python3 kernels/tools/nvrtc_check.py --json target/nvrtc-report.json | tee -a "$log" || status=$?
  elif [ "${CI:-}" = true ]; then
    echo "CUDA kernel check: NVIDIA's nvrtc/nvcc 13.0 wheels are missing (see .ci/run)"; status=1
  else
    echo "CUDA kernel check SKIPPED: pip install the wheels listed in .ci/run to run it"
  fi
  # Index and protocol models of the prefill kernels (kernels/tools, no GPU): fragment
  # and shared-memory layouts against the documented operand layouts; the
  # warp-specialised pipelines' barriers free of deadlock and stale reads.
  echo "== CUDA kernels: layout and pipeline models =="
  python3 kernels/tools/fragment_model.py | tail -3 || status=$?
  python3 kernels/tools/pipeline_model.py || status=$?
fi
# One closing line over every test binary (cargo prints one result line per binary).
passed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | paste -sd+ - | bc)
failed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | paste -sd+ - | bc)
echo "tests: ${passed:-0} passed, ${failed:-0} failed"
exit "$status"
