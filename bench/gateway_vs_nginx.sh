#!/usr/bin/env bash
# Gateway overhead side by side with nginx. One fake worker (`worker fake`: answers at
# once with 16 fixed tokens) serves both: over gRPC to the gateway (with JWT auth and
# Cedar policy on) and over HTTP to nginx (a plain reverse proxy with upstream
# keepalive), and with the audit log's fsync'd decision record in the gateway's path.
# wrk measures, alternating the targets, for each of: the fake worker's
# HTTP directly (the floor), nginx, the gateway:
#   - latency at concurrency 1 (p50, p99),
#   - throughput at concurrency 64.
# Added latency = p50 through the proxy - p50 direct. Prints a markdown table; raw wrk
# output goes to bench/out/.
#
#   bash bench/gateway_vs_nginx.sh            # DURATION=10 ROUNDS=2 by default
# GW_THREADS (default 2): the gateway's front-end threads. AUDIT_DIR: the directory in
# which the audit log gets a fresh subdirectory (default: the bench's temp dir on the
# project disk); a tmpfs (AUDIT_DIR=/dev/shm) separates the fsync from the rest of the
# gateway's cost. The
# script also measures one plain fsync on the audit log's file system (`sovctl audit bench
# --plain-fsync`) in the same run: the issue's latency budget is nginx's + 50 us + one
# fsync. It reports the audit log's own durable append beside it (`--writers 1`).
# Needs nginx and wrk (Debian: apt-get install nginx-light wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-2}
for t in nginx wrk; do
  command -v "$t" >/dev/null || { echo "bench needs $t (apt-get install nginx-light wrk)" >&2; exit 1; }
done
cargo build --release -q -p worker -p gateway
# Write back the build's output now: dirty pages flushed during the run share the ext4
# journal with the audit log's fdatasync and put 20-80 ms stalls into its first round.
sync
D=$(mktemp -d /tmp/sov-bench.XXXXXX)
OUT=bench/out/$(date -u +%Y%m%dT%H%M%SZ)-gateway
mkdir -p "$OUT"
pids=()
cleanup() {
  local st=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${AUDIT:-}" ] && rm -rf "$AUDIT"
  # Keys, configs and logs of this run (results are in bench/out/); kept after a failure.
  if [ "$st" = 0 ]; then rm -rf "$D"; fi
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
AUDIT=$(mktemp -d "${AUDIT_DIR:-$D}/sov-bench-audit.XXXXXX")
UP_HTTP=$(port); UP_GRPC=$(port); NGINX=$(port); GW=$(port)

AUDIT_LOG=$AUDIT/log
. bench/gateway_setup.sh
SOV_LOG=warn ./target/release/gateway --config "$D/gateway.toml" 2>"$D/gateway.log" &
GW_PID=$!
pids+=($GW_PID)

cat > "$D/nginx.conf" <<NGINX
worker_processes 2;
error_log $D/nginx-error.log warn;
pid $D/nginx.pid;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $D/nginx-body;
  proxy_temp_path $D/nginx-proxy;
  upstream fake { server 127.0.0.1:$UP_HTTP; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX;
    location / {
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
NGINX
nginx -c "$D/nginx.conf" -p "$D" -g 'daemon off;' &
pids+=($!)


# Ready: each target answers 200.
for i in $(seq 1 100); do
  ok=0
  for p in $UP_HTTP $NGINX $GW; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$p/v1/chat/completions" \
      -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' -H 'x-data-classification: restricted' \
      -d '{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":16}' || true)
    [ "$code" = 200 ] && ok=$((ok+1))
  done
  [ $ok = 3 ] && break
  sleep 0.2
done
[ $ok = 3 ] || { echo "targets not ready; logs in $D" >&2; exit 1; }

# One plain fsync (append a record-sized line + fdatasync; the issue's "one fsync") and,
# for comparison, one durable append through the audit log itself (durability ring +
# writer thread hop), on the audit log's file system.
fsync_probe() {
  rm -rf "$AUDIT/fsync-probe" && mkdir -p "$AUDIT/fsync-probe"
  ./target/release/sovctl audit bench --dir "$AUDIT/fsync-probe" --plain-fsync --records 2000 2>/dev/null \
    | tail -1 > "$OUT/fsync-$1.json"
  ./target/release/sovctl audit bench --dir "$AUDIT/fsync-probe" --writers 1 --records 2000 2>/dev/null \
    | tail -1 > "$OUT/append-$1.json"
}
for round in $(seq 1 "$ROUNDS"); do
  for target in direct:$UP_HTTP nginx:$NGINX gateway:$GW; do
    name=${target%%:*}; p=${target##*:}
    echo "round $round: $name" >&2
    wrk -t1 -c1 -d"${DURATION}s" --latency -s "$D/post.lua" "http://127.0.0.1:$p/v1/chat/completions" \
      > "$OUT/$name-c1-$round.txt"
    # One fsync on the audit log's file system right after the gateway's c1 run (the
    # disk's latency drifts: 124-199 us p50 between runs of one evening).
    [ "$name" = gateway ] && fsync_probe "$round"
    # PERF_GATEWAY=1: profile the gateway during its concurrency-64 run (bench/out/…/gateway.perf).
    if [ "${PERF_GATEWAY:-}" = 1 ] && [ "$name" = gateway ]; then
      perf record -g -F 999 -p "$GW_PID" -o "$OUT/gateway.perf" -- sleep "$DURATION" 2>/dev/null &
    fi
    wrk -t2 -c64 -d"${DURATION}s" --latency -s "$D/post.lua" "http://127.0.0.1:$p/v1/chat/completions" \
      > "$OUT/$name-c64-$round.txt"
  done
done
# And once more at the end; the budget uses the median of the probes.
fsync_probe end
python3 bench/wrk_table.py "$OUT" "$ROUNDS"
