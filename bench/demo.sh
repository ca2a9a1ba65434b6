#!/usr/bin/env bash
# The quick-start run: a 2-shard server and 10,000 devices on loopback.
# Every device pings once a second; 10% go silent and the server deletes
# them after its 5 s timeout. Prints the server's stats lines and the load
# generator's figures; stops by itself in about 30 seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-10000}
PORT=${PORT:-9000}

cargo build --release --quiet --bin server --example loadgen
./target/release/server --listen 127.0.0.1:$PORT --timeout 5s --tick 100ms --stats-interval 2s &
server=$!
trap 'kill -9 $server 2>/dev/null || true' EXIT
wait_port $PORT
sleep 1 # the listeners are bound before the shards finish starting: let RSS settle

echo "demo: $CONNS devices connect, ping every second, 10% go silent for 15 s" >&2
result=$(timeout 120 ./target/release/examples/loadgen --server 127.0.0.1:$PORT --conns "$CONNS" \
  --ips 127.0.0.2-127.0.0.11 --hold 15s --silent 0.1 --server-timeout 5s --server-pid $server)
kill -TERM $server
wait $server || true
trap - EXIT
echo
echo "load generator (JSON; cpu and rss are the server's):"
echo "$result" | python3 -c '
import json, sys
d = json.load(sys.stdin)
rows = [
    ("connections established", "{established} of {conns} ({failed} failed)"),
    ("connection rate", "{conn_per_s:.0f}/s, connect p50 {p50:.1f} ms, p99 {p99:.1f} ms"),
    ("server CPU per connection", "{server_cpu_per_conn_us:.1f} us"),
    ("server CPU per heartbeat", "{server_cpu_per_heartbeat_us:.1f} us over {pongs} pings"),
    ("server RSS per connection", "{server_rss_per_conn_bytes:.0f} B"),
    ("silent devices deleted", "{server_closed_silent} (heartbeating devices deleted: {server_closed_heartbeating})"),
    ("expiry lag after 5 s", "p50 {expiry_lag_p50_ms:.0f} ms, p99 {expiry_lag_p99_ms:.0f} ms, max {expiry_lag_max_ms:.0f} ms ({expired_early} early)"),
]
d["p50"], d["p99"] = d["connect_p50_us"] / 1000, d["connect_p99_us"] / 1000
for k, v in rows:
    print("  %-28s %s" % (k, v.format(**d)))
'
