"""Summarise bench/gateway_vs_nginx.sh's wrk outputs: best-of-rounds medians, added
latency over the direct upstream, throughput ratios. Prints markdown and JSON."""
import json
import re
import statistics
import sys
from pathlib import Path

UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def parse(path):
    text = Path(path).read_text()
    lat = {}
    for pct, val, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        lat[pct] = float(val) * UNITS[unit]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors:.*", text)
    return {"p50_us": lat.get("50"), "p99_us": lat.get("99"), "rps": rps,
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(0) if errors else None}


def main():
    out, rounds = Path(sys.argv[1]), int(sys.argv[2])
    res = {}
    for name in ["direct", "nginx", "gateway"]:
        c1 = [parse(out / f"{name}-c1-{r}.txt") for r in range(1, rounds + 1)]
        c64 = [parse(out / f"{name}-c64-{r}.txt") for r in range(1, rounds + 1)]
        res[name] = {
            "p50_us": statistics.median(x["p50_us"] for x in c1),
            "p99_us": statistics.median(x["p99_us"] for x in c1),
            "rps_c1": statistics.median(x["rps"] for x in c1),
            "rps_c64": statistics.median(x["rps"] for x in c64),
            "non2xx": sum(x["non2xx"] for x in c1 + c64),
        }
    for name in ["nginx", "gateway"]:
        res[name]["added_p50_us"] = res[name]["p50_us"] - res["direct"]["p50_us"]
    print("| metric | direct upstream | nginx | gateway | gateway vs nginx |")
    print("| --- | ---: | ---: | ---: | ---: |")
    d, n, g = res["direct"], res["nginx"], res["gateway"]
    print(f"| p50 latency, concurrency 1 (us) | {d['p50_us']:.0f} | {n['p50_us']:.0f} | {g['p50_us']:.0f} | {g['p50_us'] - n['p50_us']:+.0f} us |")
    print(f"| added p50 latency over direct (us) | - | {n['added_p50_us']:.0f} | {g['added_p50_us']:.0f} | {g['added_p50_us'] - n['added_p50_us']:+.0f} us |")
    print(f"| p99 latency, concurrency 1 (us) | {d['p99_us']:.0f} | {n['p99_us']:.0f} | {g['p99_us']:.0f} | |")
    # Three decimals: 0.497 must not read as the 0.5 target.
    print(f"| requests/s, concurrency 64 | {d['rps_c64']:.0f} | {n['rps_c64']:.0f} | {g['rps_c64']:.0f} | {g['rps_c64'] / n['rps_c64']:.3f}x |")
    # Each round runs direct, nginx, gateway back to back: its own ratio shows the spread.
    per_round = [
        parse(out / f"gateway-c64-{r}.txt")["rps"] / parse(out / f"nginx-c64-{r}.txt")["rps"]
        for r in range(1, rounds + 1)
    ]
    res["ratio_c64_per_round"] = per_round
    print(f"| gateway/nginx c64 ratio per round | | | | {' / '.join(f'{x:.3f}' for x in per_round)} |")
    print(f"| non-2xx responses | {d['non2xx']} | {n['non2xx']} | {g['non2xx']} | |")
    # fsync probes: one after each round's gateway c1 run and one at the end (older runs:
    # fsync.json only); the budget uses their median.
    def probe_files(pattern):
        texts = (p.read_text().strip() for p in sorted(out.glob(pattern)))
        return [json.loads(t) for t in texts if t]

    # Since the durability ring, fsync-*.json is a plain fsync (`--plain-fsync`) and
    # append-*.json the log's own durable append; before, fsync*.json was the latter.
    fsyncs = probe_files("fsync*.json")
    probes = [j["p50_ms"] * 1000.0 for j in fsyncs]
    plain = any(j.get("plain_fsync") for j in fsyncs)
    appends = [j["p50_ms"] * 1000.0 for j in probe_files("append-*.json")]
    if appends:
        a = statistics.median(appends)
        res["durable_append_p50_us"] = a
        each = " / ".join(f"{x:.0f}" for x in appends)
        print(f"| the audit log's durable append p50 (ring fsync + writer hop), 1 writer, median of {each} (us) | | | {a:.0f} | |")
    if probes:
        fsync_us = statistics.median(probes)
        budget = n["added_p50_us"] + 50.0 + fsync_us
        res["fsync_p50_us"] = fsync_us
        res["fsync_probes_us"] = probes
        res["latency_budget_us"] = budget
        each = " / ".join(f"{x:.0f}" for x in probes)
        what = "one plain fsync p50 (append + fdatasync)" if plain else "one durable audit append p50 (fsync + writer hop), 1 writer"
        print(f"| {what}, median of probes {each} (us) | | | {fsync_us:.0f} | |")
        print(f"| added p50 budget: nginx + 50 us + one fsync (us) | | | {budget:.0f} | gateway {g['added_p50_us'] - budget:+.0f} us |")
    print(json.dumps(res))


main()
