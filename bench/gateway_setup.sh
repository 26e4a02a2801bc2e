# Sourced by the gateway benchmarks: starts the fake worker and writes the gateway's
# config. Expects D (work dir), UP_HTTP, UP_GRPC, GW (ports), AUDIT_LOG (the audit log's
# directory) and a `pids` array; sets TOKEN and writes $D/gateway.toml and $D/post.lua.
# Every request's decision record is fsync'd (group commit) before the worker is called.
./target/release/worker fake --http-addr 127.0.0.1:$UP_HTTP --grpc-addr 127.0.0.1:$UP_GRPC \
  --model fake --pool de-fra-1 --country DE --tokens 16 --threads 1 2>"$D/fake.log" &
pids+=($!)
./target/release/sovctl keys generate --dir "$D/keys" --state DE --alg EdDSA > "$D/member_state.toml"
TOKEN=$(./target/release/sovctl token mint --keys "$D/keys" --state DE --ministry bench \
  --clearance restricted --ttl 2h)
./target/release/sovctl audit keygen --out "$D/audit-keys" --hmac-states DE >/dev/null
cat > "$D/pools.toml" <<TOML
[[pool]]
id = "de-fra-1"
country = "DE"
certifications = ["bsi-c5", "iso27001"]
models = ["fake"]
workers = ["127.0.0.1:$UP_GRPC"]
TOML
{
  echo "listen = \"127.0.0.1:$GW\""
  echo "policies = \"$PWD/policies\""
  echo "pools = \"$D/pools.toml\""
  echo "threads = ${GW_THREADS:-2}"
  grep -v '^#' "$D/member_state.toml"
  echo "[audit]"
  echo "dir = \"$AUDIT_LOG\""
  echo "signing_key = \"$D/audit-keys/audit-signing.key\""
  echo "[audit.hmac_keys]"
  echo "DE = \"$D/audit-keys/hmac-DE.key\""
} > "$D/gateway.toml"
cat > "$D/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"fake","messages":[{"role":"user","content":"Hello from the benchmark"}],"max_tokens":16}'
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer $TOKEN"
wrk.headers["x-data-classification"] = "restricted"
LUA
