#!/usr/bin/env bash
# GPU proof of the CUDA kernels, on a machine with an NVIDIA GPU, CUDA 13 and the release
# binaries built elsewhere (no Rust needed here):
#   1. every kernel against its CPU reference over a shape grid (gpu-check),
#   2. decode attention GB/s against the device-to-device copy bandwidth,
#   3. prefill attention TFLOP/s,
#   4. (end-to-end decode: pending the CUDA worker backend; gpu-check says so),
#   5. the same attention shapes through PyTorch's scaled_dot_product_attention.
# Prints one JSON summary (and writes it to $OUT/gpu-check.json when OUT is set).
#
#   bash kernels/gpu-check.sh [path/to/gpu-check] [--quick]
# Exit status: gpu-check's (1 = a correctness check failed, 2 = no usable GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-}
[ -n "$BIN" ] && [ "${BIN#--}" = "$BIN" ] && shift || BIN=""
for c in "$BIN" ./target/release/gpu-check ./bin/gpu-check; do
  [ -n "$c" ] && [ -x "$c" ] && { BIN=$c; break; }
done
[ -x "${BIN:-}" ] || { echo '{"error": "gpu-check binary not found (build: cargo build --release -p kernels)"}'; exit 2; }
# libnvrtc.so.13: the CUDA toolkit's, or NVIDIA's pip wheel.
for d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 \
  $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(b, "cu13", "lib") for b in nvidia.__path__))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
timeout 420 "$BIN" "$@" --out "$TMP/kernels.json" > /dev/null
status=$?
timeout 120 python3 kernels/tools/torch_sdpa.py > "$TMP/torch.json" 2> "$TMP/torch.err" \
  || echo "{\"error\": \"torch comparison failed: $(tail -1 "$TMP/torch.err" | tr -d '"')\"}" > "$TMP/torch.json"
python3 - "$TMP" "$status" <<'PY'
import json, os, sys
tmp, status = sys.argv[1], int(sys.argv[2])
def load(name):
    try:
        with open(os.path.join(tmp, name)) as f:
            return json.load(f)
    except Exception as e:
        return {"error": f"{name}: {e}"}
k, t = load("kernels.json"), load("torch.json")
summary = {"gpu_check_exit": status, "kernels": k, "torch_sdpa": t}
# Side by side: our decode / prefill numbers next to torch's for the same shapes.
side = []
for ours in k.get("decode_attention", []):
    theirs = next((x for x in t.get("decode", []) if x["context"] == ours["context"]), None)
    if theirs:
        side.append({"decode_context": ours["context"], "ours_gb_s": ours["gb_per_s"], "torch_gb_s": theirs["gb_per_s"],
                     "ratio": ours["gb_per_s"] / theirs["gb_per_s"]})
for ours in k.get("prefill_attention", []):
    theirs = next((x for x in t.get("prefill", []) if x["tokens"] == ours["tokens"]), None)
    if theirs:
        side.append({"prefill_tokens": ours["tokens"], "ours_tflops": ours["tflops"], "torch_tflops": theirs["tflops"],
                     "ratio": ours["tflops"] / theirs["tflops"]})
summary["side_by_side"] = side
text = json.dumps(summary, indent=1)
print(text)
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu-check.json"), "w") as f:
        f.write(text)
PY
exit $status
