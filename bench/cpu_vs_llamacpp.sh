#!/usr/bin/env bash
# Side-by-side CPU benchmark of the worker and llama.cpp (node-llama-cpp's prebuilt CPU
# build) on the same GGUF with the same thread count. Runs each engine twice, alternating,
# and prints a markdown table of medians and ratios; the raw JSON goes to bench/out/.
#
#   bash bench/cpu_vs_llamacpp.sh            # THREADS=2 by default
#   THREADS=4 bash bench/cpu_vs_llamacpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
REPS=${REPS:-3}
mkdir -p bench/out
cargo build --release -q -p worker
MODEL=$(./target/release/worker fetch-model smollm2)
if [ ! -d tests/reference/node_modules/node-llama-cpp ]; then
  (cd tests/reference && npm install --omit=optional --no-audit --no-fund --ignore-scripts)
fi
stamp=$(date -u +%Y%m%dT%H%M%SZ)
for round in 1 2; do
  echo "round $round: worker" >&2
  ./target/release/worker bench --model "$MODEL" --threads "$THREADS" --reps "$REPS" \
    > "bench/out/$stamp-worker-$round.json" 2>/dev/null
  echo "round $round: llama.cpp" >&2
  node tests/reference/llamacpp_bench.mjs "$THREADS" --model "$MODEL" --reps "$REPS" \
    > "bench/out/$stamp-llamacpp-$round.json" 2>/dev/null
done
python3 bench/combine.py "$THREADS" bench/out/"$stamp"-worker-*.json -- bench/out/"$stamp"-llamacpp-*.json
