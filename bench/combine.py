"""Combine `worker bench` and `llamacpp_bench.mjs` JSON runs into one markdown table.

Usage: python3 combine.py THREADS OURS.json... -- LLAMACPP.json...
For each metric the best of the runs' medians is used (the machine is noisy; both engines
get the same treatment), and the ratio ours / llama.cpp is printed.
"""
import json
import statistics
import sys


def load(paths):
    return [json.load(open(p)) for p in paths]


def pick(runs, fn, best=max):
    vals = [v for v in (fn(r) for r in runs) if v is not None]
    return best(vals) if vals else None


def decode(b):
    return lambda r: (r.get("decode") or {}).get(str(b), {}).get("aggregate_tok_s")


threads = sys.argv[1]
sep = sys.argv.index("--")
ours, theirs = load(sys.argv[2:sep]), load(sys.argv[sep + 1:])
rows = [("prefill tok/s (128-token prompt)", lambda r: r.get("prefill_tok_s"), max)]
rows.append(("TTFT ms (128-token prompt)", lambda r: r.get("ttft_ms"), min))
for b in (1, 8, 32):
    rows.append((f"decode tok/s, batch {b} (aggregate)", decode(b), max))
rows.append(("peak RSS MiB", lambda r: r.get("peak_rss_mib"), min))
print(f"| metric ({threads} threads) | worker | llama.cpp | worker / llama.cpp |")
print("| --- | ---: | ---: | ---: |")
for name, fn, best in rows:
    a, b = pick(ours, fn, best), pick(theirs, fn, best)
    ratio = f"{a / b:.2f}" if a and b else "n/a"
    fa = f"{a:.1f}" if a is not None else "n/a"
    fb = f"{b:.1f}" if b is not None else "n/a"
    print(f"| {name} | {fa} | {fb} | {ratio} |")
d1, d8 = pick(ours, decode(1)), pick(ours, decode(8))
if d1 and d8:
    print(f"\nworker batch-8 aggregate / worker batch 1: {d8 / d1:.2f}")
