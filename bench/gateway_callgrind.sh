#!/usr/bin/env bash
# Instructions per request of the gateway, counted by callgrind: deterministic where the
# wall-clock benchmark (bench/gateway_vs_nginx.sh) moves by +-10% from run to run, so it
# shows a change of a few percent in the gateway's own (user-space) work. The gateway runs
# under valgrind over the fake worker with auth, policy and the disk audit log on; wrk
# drives it at concurrency 16 for WARMUP seconds uninstrumented, then MEASURE seconds
# instrumented. Prints instructions per request: in all, in SHA-256 (valgrind's CPU has no
# SHA extensions, so the software fallback runs and is counted apart), in Ed25519
# signing (batched receipts: batch sizes under valgrind differ from native ones), and the
# rest; then the functions that allocate most often. Kernel time is not counted.
#
#   bash bench/gateway_callgrind.sh [GATEWAY_BINARY]   # default target/release/gateway
#
# Needs valgrind and wrk. The callgrind file stays in bench/out/<time>-callgrind/ for
# callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
WARMUP=${WARMUP:-5}
MEASURE=${MEASURE:-20}
for t in valgrind callgrind_control callgrind_annotate wrk; do
  command -v "$t" >/dev/null || { echo "needs $t (apt-get install valgrind wrk)" >&2; exit 1; }
done
if [ $# -ge 1 ]; then
  GW_BIN=$1
else
  cargo build --release -q -p worker -p gateway
  GW_BIN=./target/release/gateway
fi
D=$(mktemp -d /tmp/sov-callgrind.XXXXXX)
OUT=bench/out/$(date -u +%Y%m%dT%H%M%SZ)-callgrind
mkdir -p "$OUT"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_HTTP=$(port); UP_GRPC=$(port); GW=$(port)
AUDIT_LOG=$D/audit
. bench/gateway_setup.sh
SOV_LOG=warn valgrind --tool=callgrind --instr-atstart=no --separate-threads=no \
  --callgrind-out-file="$OUT/callgrind.out" "$GW_BIN" --config "$D/gateway.toml" \
  2>"$D/valgrind.log" &
VG=$!
pids+=($VG)
echo "starting the gateway under valgrind (the policy check takes a minute there)" >&2
for i in $(seq 1 600); do
  curl -s -o /dev/null "http://127.0.0.1:$GW/health" && break
  kill -0 $VG 2>/dev/null || { echo "the gateway exited; see $D/valgrind.log" >&2; cat "$D/valgrind.log" >&2; exit 1; }
  [ "$i" = 600 ] && { echo "the gateway did not start in 10 minutes" >&2; exit 1; }
  sleep 1
done
wrk -t1 -c16 -d"${WARMUP}s" -s "$D/post.lua" "http://127.0.0.1:$GW/v1/chat/completions" >/dev/null
callgrind_control -i on $VG >/dev/null
wrk -t1 -c16 -d"${MEASURE}s" -s "$D/post.lua" "http://127.0.0.1:$GW/v1/chat/completions" \
  > "$OUT/wrk.txt"
callgrind_control -i off $VG >/dev/null
callgrind_control -d $VG >/dev/null
n=$(awk '/requests in/{print $1}' "$OUT/wrk.txt")
f=$(ls "$OUT"/callgrind.out.* | head -1)
callgrind_annotate --inclusive=yes "$f" > "$OUT/inclusive.txt" 2>/dev/null
callgrind_annotate --tree=caller "$f" > "$OUT/callers.txt" 2>/dev/null
python3 - "$n" "$OUT/inclusive.txt" "$OUT/callers.txt" <<'PY'
import re, sys
n = int(sys.argv[1])
inc = {}
for line in open(sys.argv[2]):
    m = re.match(r'\s*([\d,]+) \([\s\d.]+%\)\s+(.*)', line)
    if m:
        fn = re.sub(r' \[.*\]$', '', m.group(2).split(':', 1)[-1])
        inc[fn] = max(inc.get(fn, 0), int(m.group(1).replace(',', '')))
total = inc.get('PROGRAM TOTALS', 0)
def biggest(suffix):
    return max((v for k, v in inc.items() if k.endswith(suffix)), default=0)
sha = biggest('sha2::sha256::compress256')
ed = biggest('ed25519::Signature>>::try_sign')
print(f"requests {n}; instructions per request: {total / n:,.0f} in all, "
      f"{sha / n:,.0f} SHA-256 (software), {ed / n:,.0f} Ed25519 signing, "
      f"{(total - sha - ed) / n:,.0f} the rest")
# Who calls the allocator, per request.
lines = open(sys.argv[3]).read().split('\n')
at = next((i for i, l in enumerate(lines) if re.search(r'\*\s.*__rust_alloc \[', l)), None)
if at is not None:
    rows = []
    i = at - 1
    while i >= 0 and lines[i].strip():
        m = re.search(r'<\s(.*)\(([\d,]+)x\)', lines[i])
        if m:
            rows.append((int(m.group(2).replace(',', '')), m.group(1).strip()))
        i -= 1
    print(f"allocations per request: {sum(c for c, _ in rows) / n:.1f}; most frequent callers:")
    for c, who in sorted(rows, reverse=True)[:12]:
        who = re.sub(r'^.*?:(?=[^/]*$)', '', who)
        print(f"  {c / n:6.2f}  {who[:120]}")
PY
