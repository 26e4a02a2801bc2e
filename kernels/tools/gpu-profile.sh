#!/usr/bin/env bash
# Per-kernel GPU time of the worker's decode steps, with Nsight Compute (ncu), on a GPU
# machine that has it: a random-weight model of SHAPE (default eurollm-1.7b) decodes a
# few tokens at batch 1 under ncu, which records every kernel's duration. Writes
# $OUT/ncu-SHAPE.csv and prints the wall time a token (without ncu) and a per-kernel
# summary of one decode step.
#
#   OUT=DIR bash kernels/tools/gpu-profile.sh [SHAPE]
# Needs what kernels/gpu-check.sh needs (it sets up the library paths the same way).
set -uo pipefail
cd "$(dirname "$0")/../.."
SHAPE=${1:-eurollm-1.7b}
BIN=./gpu-bundle
[ -x "$BIN/worker" ] || BIN=./target/release
OUT=${OUT:-$(mktemp -d)}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for lib in libcuda.so.1 libnvrtc.so.13 libcublas.so.13; do
  ldconfig -p 2>/dev/null | grep -q "	$lib " && continue
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64; do
    [ -e "$d/$lib" ] && { export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; break; }
  done
done
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "gpu-profile: no ncu" >&2; exit 2; }
python3 kernels/tools/make_random_model.py --shape "$SHAPE" --out "$TMP/m" > /dev/null || exit 2
export SOV_KERNEL_CACHE="$TMP/kc"
# Wall time per token without ncu, to set against the GPU time of a step below (the gap
# is host work between steps).
"$BIN/worker" bench --model "$TMP/m" --device cuda:0 --kv-cache-mb 4096 --batches 1 --reps 3 \
  --prompt-tokens 16 --decode-tokens 64 2> /dev/null > "$TMP/wall.json" \
  && python3 -c "import json,sys; t=json.load(open(sys.argv[1]))['decode']['1']['aggregate_tok_s']; print(f'batch-1 decode without ncu: {t:.0f} tok/s = {1e6 / t:.1f} us a token')" "$TMP/wall.json"
timeout 200 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
  --launch-count 6000 "$BIN/worker" bench --model "$TMP/m" --device cuda:0 --kv-cache-mb 4096 \
  --batches 1 --reps 1 --prompt-tokens 16 --decode-tokens 16 > "$TMP/ncu.out" 2> "$TMP/ncu.err"
echo "gpu-profile: ncu exit $?" >&2
tail -3 "$TMP/ncu.err" >&2
grep '^"' "$TMP/ncu.out" > "$OUT/ncu-$SHAPE.csv"
python3 - "$OUT/ncu-$SHAPE.csv" <<'PY'
import csv, sys, collections
rows = list(csv.DictReader(open(sys.argv[1])))
ks = [(r["Kernel Name"].split("(")[0][:60] + " " + r["Grid Size"], float(r["Metric Value"].replace(",", "")))
      for r in rows if r.get("Metric Name") == "gpu__time_duration.sum"]
# A step starts with the embedding lookup; the last steps are batch-1 decode steps.
starts = [i for i, (n, _) in enumerate(ks) if n.startswith("embed_rows")]
print(f"{len(ks)} kernels, {len(starts)} steps")
if len(starts) >= 3:
    a, b = starts[-3], starts[-2]
    step = ks[a:b]
    total = sum(t for _, t in step)
    print(f"one decode step: {len(step)} kernels, {total / 1e3:.1f} us of GPU time")
    by = collections.defaultdict(lambda: [0, 0.0])
    for n, t in step:
        by[n][0] += 1
        by[n][1] += t
    for n, (c, t) in sorted(by.items(), key=lambda x: -x[1][1]):
        print(f"{t / total * 100:5.1f}%  {c:4d} x {t / c / 1e3:8.2f} us  {n}")
PY
