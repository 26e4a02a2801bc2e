#!/usr/bin/env bash
# GPU proof of the CUDA kernels and backend, on a machine with an NVIDIA GPU, CUDA 13 and
# the stripped release binaries from kernels/gpu-bundle.sh in ./gpu-bundle (no Rust
# needed here; falls back to target/release):
#   1. every kernel against its CPU reference over a shape grid (gpu-check),
#   2. decode attention GB/s against the device-to-device copy bandwidth,
#   3. prefill attention TFLOP/s,
#   4. end-to-end `worker bench --device cuda:0` on random-weight models shaped like
#      SmolLM2-135M and EuroLLM-1.7B, against the weight-bandwidth limit,
#   5. the same attention shapes through PyTorch's scaled_dot_product_attention.
# Prints one JSON summary (and writes it to $OUT/gpu-check.json when OUT is set).
#
#   bash kernels/gpu-check.sh [--quick]
# Exit status: gpu-check's (1 = a correctness check failed, 2 = no usable GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=""
for d in ./gpu-bundle ./target/release; do
  [ -x "$d/gpu-check" ] && [ -x "$d/worker" ] && { BIN=$d; break; }
done
[ -n "$BIN" ] || { echo '{"error": "gpu-check and worker binaries not found (run kernels/gpu-bundle.sh)"}'; exit 2; }
# libnvrtc.so.13: the CUDA toolkit's, or NVIDIA's pip wheel.
for d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(b, "cu13", "lib") for b in nvidia.__path__))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export SOV_KERNEL_CACHE="$TMP/kernel-cache"
echo "gpu-check: kernels (correctness, bandwidth, TFLOP/s)" >&2
timeout 300 "$BIN/gpu-check" "$@" --out "$TMP/kernels.json" > /dev/null
status=$?
# End to end: random-weight models of real shapes (real weights do not travel here).
for shape in smollm2-135m eurollm-1.7b; do
  echo "gpu-check: worker bench on a random $shape" >&2
  python3 kernels/tools/make_random_model.py --shape "$shape" --out "$TMP/$shape" > "$TMP/$shape.model.json" 2>&1 \
    && RUST_BACKTRACE=0 timeout 150 "$BIN/worker" bench --model "$TMP/$shape" --device cuda:0 --kv-cache-mb 8192 \
         --batches 1,8,32 --reps 3 --prompt-tokens 128 --decode-tokens 64 > "$TMP/$shape.bench.json" 2> "$TMP/$shape.err" \
    || echo "{\"error\": \"$(tail -3 "$TMP/$shape.err" 2>/dev/null | tr -d '"\n')\"}" > "$TMP/$shape.bench.json"
  rm -rf "${TMP:?}/$shape"
done
echo "gpu-check: PyTorch SDPA" >&2
timeout 120 python3 kernels/tools/torch_sdpa.py > "$TMP/torch.json" 2> "$TMP/torch.err" \
  || echo "{\"error\": \"torch comparison failed: $(tail -1 "$TMP/torch.err" | tr -d '"')\"}" > "$TMP/torch.json"
python3 - "$TMP" "$status" <<'PY'
import json, os, sys
tmp, status = sys.argv[1], int(sys.argv[2])
def load(name):
    try:
        with open(os.path.join(tmp, name)) as f:
            return json.loads(f.read().strip().splitlines()[-1]) if name.endswith(".model.json") else json.load(f)
    except Exception as e:
        return {"error": f"{name}: {e}"}
k, t = load("kernels.json"), load("torch.json")
summary = {"gpu_check_exit": status, "kernels": k, "torch_sdpa": t, "end_to_end": {}}
copy = k.get("copy_bandwidth_gb_per_s")
for shape in ["smollm2-135m", "eurollm-1.7b"]:
    m, b = load(f"{shape}.model.json"), load(f"{shape}.bench.json")
    e = {"model": m, "bench": b}
    try:
        b1 = b["decode"]["1"]["aggregate_tok_s"]
        limit = copy * 1e9 / m["weight_bytes"]
        e["batch1_tok_s"], e["bandwidth_limit_tok_s"], e["fraction_of_limit"] = b1, limit, b1 / limit
    except Exception as ex:
        e["note"] = f"no ratio: {ex}"
    summary["end_to_end"][shape] = e
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
