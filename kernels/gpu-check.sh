#!/usr/bin/env bash
# GPU proof of the CUDA kernels and backend, on a machine with an NVIDIA GPU, CUDA 13 and
# the stripped release binaries from kernels/gpu-bundle.sh in ./gpu-bundle (no Rust
# needed here; falls back to target/release):
#   1. every kernel against its CPU reference over a shape grid (gpu-check);
#   2. decode attention GB/s against the device-to-device copy bandwidth;
#   3. prefill attention TFLOP/s of every design (basic, pipelined, wgmma);
#   4. end-to-end `worker bench --device cuda:0` on random-weight models shaped like
#      SmolLM2-135M and EuroLLM-1.7B, against the bandwidth limit (copy bandwidth over
#      the bytes a decode step reads: weights, less an untied embedding table, and K/V);
#      on the EuroLLM shape also sampled decoding (temperature 1 drawn on the GPU and,
#      SOV_DEVICE_SAMPLING=0, on the host; top-k 50 + top-p 0.95) beside greedy;
#   5. the same attention shapes through PyTorch's scaled_dot_product_attention;
#   6. `worker check-backend`: the CUDA backend's logits against the CPU backend's over
#      prefill and decode steps (batch 3, 2, 1) on both model shapes, with each prefill
#      design and the FP8 KV cache (on the SmolLM2 shape also with per-head scales from
#      `worker calibrate-kv`);
#   7. the experimental designs listed in OPT_IN (`gpu-check --opt-in NAME`, one process
#      each), reported apart from the defaults (`kernels_opt_in`), and the decode-path
#      experiments in VARIANTS through the backend (check-backend on both shapes, batch-1
#      bench on the EuroLLM one);
#   8. where Nsight Compute is installed, one launch of the wgmma prefill under ncu
#      (throughput, warp stall reasons, the top stall locations), into
#      $OUT/parts/ncu-*.txt.
# Prints one JSON summary (and writes it to $OUT/gpu-check.json when OUT is set).
#
#   bash kernels/gpu-check.sh [--quick] [--no-experiments]
#   bash kernels/gpu-check.sh --summarize DIR   (the summary of a cut-off run's $OUT/parts)
#   GPU_CHECK_OPT_IN="pdl prefill_attention_wgmma_tma" GPU_CHECK_VARIANTS="pdl:SOV_PDL=1" \
#     bash kernels/gpu-check.sh   (only these experiments; empty strings: none)
# `--no-experiments`: steps 1-6 only (the defaults: what the issue's targets are about).
# Exit status: gpu-check's (1 = a correctness check failed, 2 = no usable GPU), or 1 when
# a backend check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
# The experimental designs gpu-check runs one process each (see below).
# `gemv_norm_late`: the normalising GEMVs with the norm applied after the sum (no
# prologue before the weight loads; worker: SOV_GEMV_NORM=late). `gemv_norm_rope`: the
# q|k|v GEMV with RoPE and the KV write in its epilogue (worker: SOV_GEMV_ROPE=1).
# `gemv_norm_late_rope`: both (worker: SOV_GEMV_ROPE=1 SOV_GEMV_NORM=late).
# `prefill_attention_wgmma_ov`: the wgmma prefill with S of the next tile computing during
# the softmax (worker: SOV_PREFILL_KERNEL=wgmma_ov). `prefill_attention_wgmma_ws`: the
# warp-specialised wgmma prefill, a producer warpgroup feeding two consumer warpgroups
# through mbarriers (worker: SOV_PREFILL_KERNEL=wgmma_ws). `prefill_attention_wgmma_pp`:
# that design with the consumers' MMA issue alternating (ping-pong; wgmma_pp).
# `prefill_attention_wgmma_pp128`: ping-pong with 128-key tiles (wgmma_pp128).
# `prefill_attention_wgmma_tma`: that with TMA copies into swizzled tiles (wgmma_tma).
# `pdl`: the decode path's kernels as their programmatic-dependent-launch builds, launched
# with the attribute (worker: SOV_PDL=1), and the GEMV chain of a decode step timed with
# them (`gemv_chain`, beside the default run's). PDL asks for the most shared memory for
# the decode path's kernels (SOV_SMEM_CARVEOUT); the `pdldrv` variant leaves the carveout
# to the driver, to measure what that setting does. `gemv_regs`: the decode GEMVs'
# register design of run 8 and before (worker: SOV_GEMV_STAGE=regs), its checks, GEMV
# timings and chain beside the default shared-memory design's (and the `regs` variant:
# batch-1 decode with it).
# GPU_CHECK_OPT_IN (and GPU_CHECK_VARIANTS below), when set, replace the lists: a second
# run in the same GPU session can measure only the designs the first one left open.
OPT_IN=${GPU_CHECK_OPT_IN-"pdl gemv_regs gemv_norm_late gemv_norm_rope gemv_norm_late_rope prefill_attention_wgmma_ov prefill_attention_wgmma_ws prefill_attention_wgmma_pp prefill_attention_wgmma_pp128 prefill_attention_wgmma_tma"}
# The decode-path experiments through the backend, NAME:ENV (comma-separated variables).
# (The pairs laterope:SOV_GEMV_ROPE=1,SOV_GEMV_NORM=late and pdlrope:SOV_PDL=1,SOV_GEMV_ROPE=1
# are known to the summary too; left out by default to keep the run within its time.)
VARIANTS=${GPU_CHECK_VARIANTS-"late:SOV_GEMV_NORM=late rope:SOV_GEMV_ROPE=1 pdl:SOV_PDL=1 pdllaterope:SOV_PDL=1,SOV_GEMV_ROPE=1,SOV_GEMV_NORM=late pdldrv:SOV_PDL=1,SOV_SMEM_CARVEOUT=-1 regs:SOV_GEMV_STAGE=regs"}
# The experimental prefill designs among OPT_IN, by the worker's SOV_PREFILL_KERNEL names.
PREFILL_EXPERIMENTS=""
for d in $OPT_IN; do
  case $d in prefill_attention_*) PREFILL_EXPERIMENTS="$PREFILL_EXPERIMENTS ${d#prefill_attention_}" ;; esac
done
EXPERIMENTS=1
args=()
for a in "$@"; do
  if [ "$a" = --no-experiments ]; then EXPERIMENTS=0; else args+=("$a"); fi
done
set -- "${args[@]+"${args[@]}"}"
# summarize PARTS STATUS: the JSON summary of the stage results in PARTS.
summarize() {
python3 - "$1" "$2" "$OPT_IN" "$VARIANTS" <<'PY'
import json, os, sys
tmp, status, opt_names = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
variants = [v.split(":")[0] for v in sys.argv[4].split()]
# Each backend experiment's summary label and the opt-in kernel runs it relies on.
LABEL = {"late": "gemv_norm_late", "rope": "gemv_norm_rope", "laterope": "gemv_norm_late_rope",
         "pdl": "pdl", "pdlrope": "pdl_gemv_norm_rope", "pdllaterope": "pdl_gemv_norm_late_rope",
         "pdldrv": "pdl_carveout_driver", "regs": "gemv_regs"}
PARTS_OF = {"late": ["gemv_norm_late"], "rope": ["gemv_norm_rope"], "laterope": ["gemv_norm_late_rope"],
            "pdl": ["pdl"], "pdlrope": ["pdl", "gemv_norm_rope"], "pdllaterope": ["pdl", "gemv_norm_late_rope"],
            "pdldrv": ["pdl"], "regs": ["gemv_regs"]}
def load(name):
    try:
        with open(os.path.join(tmp, name)) as f:
            return json.loads(f.read().strip().splitlines()[-1]) if name.endswith(".model.json") else json.load(f)
    except Exception as e:
        return {"error": f"{name}: {e}"}
k, t = load("kernels.json"), load("torch.json")
# The opt-in runs, merged: their checks, prefill and GEMV timings, and each run's errors.
opt = {"checks": [], "prefill_attention": [], "gemv": [], "errors": {}, "runs": {}}
for name in opt_names:
    r = load(f"opt-{name}.json")
    if "error" in r:
        opt["errors"][name] = r["error"]
    mine = r.get("correctness", {}).get("checks", [])
    # A run is ok when it ran checks and every one passed.
    opt["runs"][name] = {"ok": "error" not in r and bool(mine) and all(c.get("ok") for c in mine),
                         "checks": len(mine), "failed": sorted({c.get("kernel", "?") for c in mine if not c.get("ok")})}
    opt["checks"] += [dict(c, run=name) for c in mine]
    opt["prefill_attention"] += r.get("prefill_attention", [])
    opt["gemv"] += [dict(g, run=name) for g in r.get("gemv", [])]
    if r.get("gemv_chain"):
        opt[f"gemv_chain_{name}"] = r["gemv_chain"]
failing = sorted({c.get("kernel", "?") for c in opt["checks"] if not c.get("ok")} | set(opt["errors"]))
opt["failing"] = failing
summary = {"gpu_check_exit": status, "kernels": k, "kernels_opt_in": opt, "torch_sdpa": t, "end_to_end": {}}
# Whether a PDL successor overlapped its predecessor at all (the probe of --opt-in pdl):
# without it the PDL late-write checks prove nothing and PDL cannot gain.
probe = next((c for c in opt["checks"] if c.get("kernel") == "pdl_probe"), None)
summary["pdl_overlap_observed"] = None if probe is None else probe.get("overlap")
# The decode step's GEMV chain, default vs PDL (two processes, same shapes).
try:
    d_gbs, p_gbs = k["gemv_chain"]["gb_per_s"], opt["gemv_chain_pdl"]["gb_per_s"]
    summary["gemv_chain_pdl_vs_default"] = p_gbs / d_gbs
except Exception:
    summary["gemv_chain_pdl_vs_default"] = None
# The same for the shared-memory GEMVs (the default) over the register design.
try:
    d_gbs, r_gbs = k["gemv_chain"]["gb_per_s"], opt["gemv_chain_gemv_regs"]["gb_per_s"]
    summary["gemv_chain_default_vs_regs"] = d_gbs / r_gbs
except Exception:
    summary["gemv_chain_default_vs_regs"] = None
copy = k.get("copy_bandwidth_gb_per_s")
def check(name):
    c = load(name)
    c.pop("per_row", None)
    return c
for shape in ["smollm2-135m", "eurollm-1.7b"]:
    m, b = load(f"{shape}.model.json"), load(f"{shape}.bench.json")
    e = {"model": m, "bench": b,
         "backend_check": check(f"{shape}.check.json"),
         "backend_check_prefill_pipelined": check(f"{shape}.check-pipelined.json"),
         "backend_check_prefill_basic": check(f"{shape}.check-basic.json"),
         "backend_check_prefill_wgmma_ov": check(f"{shape}.check-wgmma_ov.json"),
         "backend_check_prefill_wgmma_ws": check(f"{shape}.check-wgmma_ws.json"),
         "backend_check_prefill_wgmma_pp": check(f"{shape}.check-wgmma_pp.json"),
         "backend_check_prefill_wgmma_pp128": check(f"{shape}.check-wgmma_pp128.json"),
         "backend_check_prefill_wgmma_tma": check(f"{shape}.check-wgmma_tma.json"),
         "bench_kv_fp8": load(f"{shape}.fp8.json"), "backend_check_kv_fp8": check(f"{shape}.check-fp8.json")}
    # Sampled decoding against greedy, per batch size (same run, same model).
    for smp in ["t1", "topp", "t1host"]:
        if not os.path.exists(os.path.join(tmp, f"{shape}.sampled-{smp}.json")):
            continue
        sb = e[f"bench_sampled_{smp}"] = load(f"{shape}.sampled-{smp}.json")
        try:
            e[f"sampled_{smp}_vs_greedy"] = {n: sb["decode"][n]["aggregate_tok_s"] / b["decode"][n]["aggregate_tok_s"]
                                             for n in sb["decode"] if n in b.get("decode", {})}
        except Exception as ex:
            e[f"sampled_{smp}_note"] = f"no ratio: {ex}"
    # Drawing on the GPU over drawing on the host, the same temperature-1 requests.
    try:
        dv, hv = e["bench_sampled_t1"]["decode"], e["bench_sampled_t1host"]["decode"]
        e["sampled_t1_device_vs_host"] = {n: dv[n]["aggregate_tok_s"] / hv[n]["aggregate_tok_s"] for n in dv if n in hv}
    except Exception:
        pass
    if os.path.exists(os.path.join(tmp, f"{shape}.check-fp8-scales.json")):
        e["backend_check_kv_fp8_calibrated_scales"] = check(f"{shape}.check-fp8-scales.json")
    limit = None
    try:
        # The bandwidth limit of batch-1 decode: the copy bandwidth over the bytes a step
        # must read, which are the weights less an untied embedding table (one row of it a
        # token) and the K/V rows of the mean context of the timed steps (the bench's
        # sequences start from decode_prompt_tokens and attend to one token more a step).
        ctx = b.get("decode_prompt_tokens", 32) + (b["decode_tokens"] + 1) / 2
        step_bytes = m["decode_weight_bytes"] + m["kv_bytes_per_context_token"] * ctx
        e["bytes_per_decode_step"], e["mean_decode_context"] = step_bytes, ctx
        limit = copy * 1e9 / step_bytes
        e["bandwidth_limit_tok_s"] = limit
        b1 = b["decode"]["1"]["aggregate_tok_s"]
        e["batch1_tok_s"], e["fraction_of_limit"] = b1, b1 / limit
    except Exception as ex:
        e["note"] = f"no ratio: {ex}"
    # Each experiment's backend check and own ratio (absent when it did not run).
    for v in variants:
        name = LABEL.get(v, v)
        if os.path.exists(os.path.join(tmp, f"{shape}.check-{v}.json")):
            e[f"backend_check_{name}"] = check(f"{shape}.check-{v}.json")
        if not os.path.exists(os.path.join(tmp, f"{shape}.{v}.json")):
            continue
        bench = e[f"bench_{name}"] = load(f"{shape}.{v}.json")
        # The decode graph's programmatic (PDL) edges, from the worker's capture log line.
        try:
            import re
            with open(os.path.join(tmp, f"{shape}.{v}.err")) as f:
                found = re.findall(r"programmatic=(\d+)", re.sub(r"\x1b\[[0-9;]*m", "", f.read()))
            e[f"{name}_graph_programmatic_edges"] = int(found[-1]) if found else None
        except OSError:
            pass
        try:
            x = bench["decode"]["1"]["aggregate_tok_s"]
            e[f"{name}_batch1_tok_s"], e[f"{name}_fraction_of_limit"] = x, x / limit
        except Exception as ex:
            e[f"{name}_note"] = f"no ratio: {ex}"
    summary["end_to_end"][shape] = e
side = []
for ours in k.get("decode_attention", []):
    theirs = next((x for x in t.get("decode", []) if x.get("context") == ours.get("context")), None)
    if theirs and "gb_per_s" in ours and "gb_per_s" in theirs:
        side.append({"decode_context": ours["context"], "ours_gb_s": ours["gb_per_s"], "torch_gb_s": theirs["gb_per_s"],
                     "ratio": ours["gb_per_s"] / theirs["gb_per_s"]})
for ours in k.get("prefill_attention", []) + opt["prefill_attention"]:
    theirs = next((x for x in t.get("prefill", []) if x.get("tokens") == ours.get("tokens")), None)
    if theirs and "tflops" in ours and "tflops" in theirs:
        side.append({"prefill_tokens": ours["tokens"], "kernel": ours.get("kernel"), "ours_tflops": ours["tflops"], "torch_tflops": theirs["tflops"],
                     "ratio": ours["tflops"] / theirs["tflops"]})
summary["side_by_side"] = side
# The issue's targets, met or not (None: not measured in this run).
def frac_min(xs, key, pred=lambda x: True):
    v = [x[key] for x in xs if key in x and pred(x)]
    return min(v) if v else None
dec = frac_min(k.get("decode_attention", []), "fraction_of_copy", lambda x: x.get("context", 0) >= 4096)
# A prefill design counts only when every correctness check of it passed.
checks_all = k.get("correctness", {}).get("checks", []) + opt["checks"]
def design_ok(name):
    mine = [c for c in checks_all if c.get("kernel") == name]
    return bool(mine) and all(c.get("ok") for c in mine)
# The best correct design at its lower figure over the two shapes.
by_design = {}
for x in k.get("prefill_attention", []) + opt["prefill_attention"]:
    if "fraction_of_bf16_dense_peak" in x and design_ok(x.get("kernel", "prefill_attention")):
        d = x.get("kernel", "prefill_attention")
        by_design[d] = min(by_design.get(d, 1e9), x["fraction_of_bf16_dense_peak"])
pre_best = max(by_design.items(), key=lambda kv: kv[1]) if by_design else (None, None)
pre = pre_best[1]
eu = summary["end_to_end"].get("eurollm-1.7b", {})
# A decode-path experiment counts only where the opt-in kernel runs it relies on passed
# and its backend check passed on both shapes.
def experiment_ok(v):
    name = LABEL.get(v, v)
    return all(opt["runs"].get(p, {}).get("ok") for p in PARTS_OF.get(v, [v])) \
        and all(e.get(f"backend_check_{name}", {}).get("ok") is True for e in summary["end_to_end"].values())
e2e_candidates = [("default", eu.get("fraction_of_limit"))] + [
    (LABEL.get(v, v), eu.get(f"{LABEL.get(v, v)}_fraction_of_limit")) for v in variants if experiment_ok(v)]
e2e_best = max([c for c in e2e_candidates if c[1] is not None] or [(None, None)], key=lambda c: -1 if c[1] is None else c[1])
e2e = e2e_best[1]
# A check that printed an error ran and failed; one absent was not run.
checks = [c.get("ok", False) for c in (e.get("backend_check") for e in summary["end_to_end"].values()) if c is not None]
summary["targets"] = {
    "kernels_match_references": k.get("correctness", {}).get("ok"),
    "backend_matches_cpu": all(c is True for c in checks) if checks else None,
    "decode_attention_min_fraction_of_copy_4k_plus": dec, "decode_attention_target_met": None if dec is None else dec >= 0.8,
    "prefill_best_fraction_of_peak": pre, "prefill_best_design": pre_best[0],
    "prefill_target_met": None if pre is None else pre >= 0.4,
    "eurollm_batch1_best_fraction_of_limit": e2e, "eurollm_batch1_best_design": e2e_best[0],
    "eurollm_batch1_default_fraction_of_limit": eu.get("fraction_of_limit"),
    "eurollm_batch1_target_met": None if e2e is None else e2e >= 0.7,
}
text = json.dumps(summary, indent=1)
print(text)
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu-check.json"), "w") as f:
        f.write(text)
PY
}
# `--summarize DIR`: only rebuild the summary from a cut-off run's $OUT/parts.
if [ "${1:-}" = "--summarize" ]; then
  summarize "${2:?usage: gpu-check.sh --summarize PARTS_DIR}" 0
  exit 0
fi
BIN=""
for d in ./gpu-bundle ./target/release; do
  [ -x "$d/gpu-check" ] && [ -x "$d/worker" ] && { BIN=$d; break; }
done
[ -n "$BIN" ] || { echo '{"error": "gpu-check and worker binaries not found (run kernels/gpu-bundle.sh)"}'; exit 2; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# Progress of every stage, also kept in $OUT/gpu-check.log when OUT is set.
LOG=${OUT:-$TMP}/gpu-check.log
: > "$LOG"
# Every stage's result, kept in $OUT/parts when OUT is set: if the run is cut off, the
# parts that finished come back and the summary below can be rebuilt from them.
PARTS=${OUT:-$TMP}/parts
mkdir -p "$PARTS"
say() { echo "gpu-check [${SECONDS}s]: $*" | tee -a "$LOG" >&2; }
# The libraries cudarc loads (the driver's libcuda, NVRTC 13, cuBLAS 13): where the
# loader does not know them, the CUDA toolkit's folders, the driver's, or NVIDIA's pip
# wheels (python3's `nvidia` package).
candidates() {
  echo /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64
  python3 -c 'import glob, nvidia, os; [print(d) for b in nvidia.__path__ for d in sorted(glob.glob(os.path.join(b, "*", "lib")))]' 2>/dev/null
}
for lib in libcuda.so.1 libnvrtc.so.13 libcublas.so.13; do
  if ldconfig -p 2>/dev/null | grep -q "	$lib "; then
    say "$lib: $(ldconfig -p | grep "	$lib " | head -1 | sed 's/.*=> //')"
    continue
  fi
  found=""
  for d in $(candidates); do
    if [ -e "$d/$lib" ]; then
      export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      found=$d
      break
    fi
  done
  say "$lib: ${found:-NOT FOUND}"
done
command -v nvidia-smi > /dev/null && say "$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1)"
export SOV_KERNEL_CACHE="$TMP/kernel-cache"
# Kernels compiled where the bundle was built (kernels/gpu-bundle.sh): loaded, not
# compiled again, where this machine's NVRTC has the same version (the cache key has it).
if [ -d "$BIN/kernel-cache" ]; then
  cp -r "$BIN/kernel-cache" "$SOV_KERNEL_CACHE"
  say "kernel cache: $(ls "$SOV_KERNEL_CACHE" | wc -l) cubins from the bundle"
fi
say "kernels (correctness, bandwidth, TFLOP/s)"
timeout 240 "$BIN/gpu-check" "$@" --out "$PARTS/kernels.json" > /dev/null 2> >(tee -a "$LOG" >&2)
status=$?
[ $status -eq 124 ] && say "gpu-check timed out"
# The opt-in designs, each in a process of its own: one that faults cannot take the
# others' (or the default run's) CUDA context with it.
# `pdl` runs with SOV_PDL=1 (the kernels' PDL builds, launched with the attribute),
# `gemv_regs` with SOV_GEMV_STAGE=regs.
for d in $OPT_IN; do
  [ "$EXPERIMENTS" = 1 ] || break
  say "opt-in design $d"
  opt_env=""
  [ "$d" = pdl ] && opt_env="SOV_PDL=1"
  [ "$d" = gemv_regs ] && opt_env="SOV_GEMV_STAGE=regs"
  # shellcheck disable=SC2086
  env $opt_env timeout 120 "$BIN/gpu-check" "$@" --opt-in "$d" --out "$PARTS/opt-$d.json" > /dev/null 2> >(tee -a "$LOG" >&2)
  [ -s "$PARTS/opt-$d.json" ] || echo "{\"error\": \"gpu-check --opt-in $d printed nothing (exit or timeout; see the log)\"}" > "$PARTS/opt-$d.json"
done
say "PyTorch SDPA"
timeout 90 python3 kernels/tools/torch_sdpa.py > "$PARTS/torch.json" 2> "$PARTS/torch.err" \
  || echo "{\"error\": \"torch comparison failed: $(tail -1 "$PARTS/torch.err" | tr -d '"')\"}" > "$PARTS/torch.json"
tail -5 "$PARTS/torch.err" >> "$LOG"
# End to end: random-weight models of real shapes (real weights do not travel here).
for shape in eurollm-1.7b smollm2-135m; do
  say "worker bench on a random $shape"
  if python3 kernels/tools/make_random_model.py --shape "$shape" --out "$TMP/$shape" > "$PARTS/$shape.model.json" 2>> "$LOG"; then
    RUST_BACKTRACE=0 timeout 120 "$BIN/worker" bench --model "$TMP/$shape" --device cuda:0 --kv-cache-mb 8192 \
      --batches 1,8,32 --reps 3 --prompt-tokens 128 --decode-tokens 64 > "$PARTS/$shape.bench.json" 2> "$PARTS/$shape.err"
    rc=$?
    tail -40 "$PARTS/$shape.err" >> "$LOG"
    # Sampled decoding (tokens drawn on the GPU: sample_rows, and topk_rows' candidates
    # for top-k / top-p) beside the greedy figures above: OpenAI's default (temperature
    # 1) and top-k 50 with a nucleus (top-p 0.95; with top-k the nucleus is always among
    # the candidates, whereas top-p alone over a random model's flat logits would send
    # most rows back to the host).
    # `t1host`: the same temperature-1 draws on the host sampler (SOV_DEVICE_SAMPLING=0,
    # the way before 2026-11-28): the side-by-side ratio of drawing on the GPU.
    if [ "$shape" = eurollm-1.7b ]; then
      for smp in "t1:--temperature 1" "topp:--temperature 1 --top-k 50 --top-p 0.95" "t1host:--temperature 1"; do
        name=${smp%%:*}
        say "$shape: sampled decoding $name (${smp#*:})"
        dev=1
        [ "$name" = t1host ] && dev=0
        # shellcheck disable=SC2086  # the options are words
        SOV_DEVICE_SAMPLING=$dev RUST_BACKTRACE=0 timeout 60 "$BIN/worker" bench --model "$TMP/$shape" --device cuda:0 \
          --kv-cache-mb 8192 --batches 1,32 --reps 2 --prompt-tokens 128 --decode-tokens 64 ${smp#*:} \
          > "$PARTS/$shape.sampled-$name.json" 2>> "$LOG" || echo '{"error": "failed (see the log)"}' > "$PARTS/$shape.sampled-$name.json"
      done
    fi
    # The CUDA backend's forward pass against the CPU backend's, step by step.
    RUST_BACKTRACE=0 timeout 180 "$BIN/worker" check-backend --model "$TMP/$shape" --device cuda:0 \
      > "$PARTS/$shape.check.json" 2>> "$LOG" || { echo "gpu-check: check-backend failed on $shape" | tee -a "$LOG" >&2; [ $status -eq 0 ] && status=1; }
    [ -s "$PARTS/$shape.check.json" ] || echo '{"error": "check-backend printed nothing (see the log)"}' > "$PARTS/$shape.check.json"
    # The decode-path experiments (VARIANTS): each checked against the CPU backend on
    # both shapes, timed at batch 1 on the EuroLLM one (the target's shape).
    for v in $VARIANTS; do
      [ "$EXPERIMENTS" = 1 ] || break
      name=${v%%:*}
      envs=$(echo "${v#*:}" | tr , ' ')
      say "$shape: experiment $name ($envs)"
      # shellcheck disable=SC2086  # envs is a list of NAME=VALUE words
      env $envs RUST_BACKTRACE=0 timeout 120 "$BIN/worker" check-backend --model "$TMP/$shape" \
        --device cuda:0 > "$PARTS/$shape.check-$name.json" 2>> "$LOG" || echo "gpu-check: check-backend with $envs failed on $shape" | tee -a "$LOG" >&2
      [ -s "$PARTS/$shape.check-$name.json" ] || echo '{"error": "check-backend printed nothing (see the log)"}' > "$PARTS/$shape.check-$name.json"
      [ "$shape" = eurollm-1.7b ] || continue
      # shellcheck disable=SC2086
      env $envs RUST_BACKTRACE=0 timeout 60 "$BIN/worker" bench --model "$TMP/$shape" --device cuda:0 \
        --kv-cache-mb 8192 --batches 1 --reps 3 --prompt-tokens 128 --decode-tokens 64 \
        > "$PARTS/$shape.$name.json" 2> "$PARTS/$shape.$name.err" || echo '{"error": "failed (see the log)"}' > "$PARTS/$shape.$name.json"
      cat "$PARTS/$shape.$name.err" >> "$LOG"
    done
    # The prefill designs other than the default inside the backend (its prefill steps):
    # the pipelined one (the default off Hopper), the basic one (the FP8 cache's) and, on
    # the EuroLLM shape (head_dim 128; their kernel checks cover 64 too), the experimental
    # wgmma ones (overlapping, warp-specialised, ping-pong, 128-key tiles, TMA).
    designs="pipelined basic"
    [ "$shape" = eurollm-1.7b ] && [ "$EXPERIMENTS" = 1 ] && designs="$designs$PREFILL_EXPERIMENTS"
    for p in $designs; do
      SOV_PREFILL_KERNEL=$p RUST_BACKTRACE=0 timeout 60 "$BIN/worker" check-backend --model "$TMP/$shape" \
        --device cuda:0 > "$PARTS/$shape.check-$p.json" 2>> "$LOG" || echo "gpu-check: check-backend with the $p prefill failed on $shape" | tee -a "$LOG" >&2
      [ -s "$PARTS/$shape.check-$p.json" ] || echo '{"error": "check-backend printed nothing (see the log)"}' > "$PARTS/$shape.check-$p.json"
    done
    say "$shape: FP8 KV cache"
    # The FP8 KV cache: the backend check with both backends rounding K/V to e4m3
    # (informational: the two round different inputs, bf16 vs f32 projections, so a value
    # may land one e4m3 step apart) and decode speed.
    RUST_BACKTRACE=0 timeout 180 "$BIN/worker" check-backend --model "$TMP/$shape" --device cuda:0 \
      --kv-cache-dtype fp8 > "$PARTS/$shape.check-fp8.json" 2>> "$LOG" || echo "gpu-check: fp8 check-backend differs on $shape" | tee -a "$LOG" >&2
    [ -s "$PARTS/$shape.check-fp8.json" ] || echo '{"error": "check-backend printed nothing (see the log)"}' > "$PARTS/$shape.check-fp8.json"
    # Calibrated per-(layer, KV head) scales (`worker calibrate-kv`, on the CPU): the same
    # check with them, so the CUDA backend's per-layer scale buffers are exercised with
    # scales that differ by layer and head. The small shape only (a CPU forward pass).
    if [ "$shape" = smollm2-135m ]; then
      RUST_BACKTRACE=0 timeout 60 "$BIN/worker" calibrate-kv --model "$TMP/$shape" --max-tokens 512 \
        --out "$PARTS/$shape.kv-scales.json" 2>> "$LOG" \
        && RUST_BACKTRACE=0 timeout 120 "$BIN/worker" check-backend --model "$TMP/$shape" --device cuda:0 \
          --kv-cache-dtype fp8 --kv-cache-scales "$PARTS/$shape.kv-scales.json" \
          > "$PARTS/$shape.check-fp8-scales.json" 2>> "$LOG" || echo "gpu-check: fp8 check-backend with calibrated scales differs on $shape" | tee -a "$LOG" >&2
      [ -s "$PARTS/$shape.check-fp8-scales.json" ] || echo '{"error": "calibrate-kv or check-backend printed nothing (see the log)"}' > "$PARTS/$shape.check-fp8-scales.json"
    fi
    RUST_BACKTRACE=0 timeout 90 "$BIN/worker" bench --model "$TMP/$shape" --device cuda:0 --kv-cache-mb 8192 \
      --kv-cache-dtype fp8 --batches 1,32 --reps 3 --prompt-tokens 128 --decode-tokens 64 \
      > "$PARTS/$shape.fp8.json" 2>> "$LOG" || echo '{"error": "failed (see the log)"}' > "$PARTS/$shape.fp8.json"
    [ $rc -eq 0 ] || echo "{\"error\": \"exit $rc: $( (grep -m1 panicked "$PARTS/$shape.err"; sed -n '/^Error:/,$p' "$PARTS/$shape.err") | tr -s ' \n' ' ' | tr -d '"\\' | cut -c1-600)\"}" > "$PARTS/$shape.bench.json"
  else
    echo '{"error": "make_random_model.py failed (see the log)"}' > "$PARTS/$shape.bench.json"
  fi
  rm -rf "${TMP:?}/$shape"
done
# One timed launch (4 x 2048 tokens) of the default wgmma prefill and of the two
# FlashAttention-3-like ones (128-key ping-pong, with and without TMA) under Nsight
# Compute: each process runs one design, whose 4 check launches and 1 warm-up launch are
# skipped.
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -1)
if [ "$EXPERIMENTS" != 1 ]; then
  say "--no-experiments: no profiles"
elif [ -n "$NCU" ]; then
  for d in prefill_attention_wgmma prefill_attention_wgmma_pp128 prefill_attention_wgmma_tma; do
    case " prefill_attention_wgmma $OPT_IN " in *" $d "*) ;; *) continue ;; esac
    say "ncu: $d"
    timeout 90 "$NCU" --kernel-name regex:prefill_attention_wgmma --launch-skip 5 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats \
      --section SourceCounters --section InstructionStats \
      "$BIN/gpu-check" --opt-in "$d" > "$PARTS/ncu-$d.txt" 2>&1 || say "ncu on $d: exit $?"
  done
else
  say "no ncu: skipping the profiles"
fi
say "summary"
summarize "$PARTS" "$status"
exit $status
