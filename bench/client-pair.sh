#!/usr/bin/env bash
# Two clients against the same server binary, interleaved: each client's
# own CPU per connection with the server kept out of it the same way for
# both (started here, apart, named by --server-pid; bench/client-ab.sh
# instead runs each build's own server as the client's child and takes
# the old builds' server CPU out by subtraction). 15,000 devices from 10
# source addresses, heartbeat 10 s, no silent devices, hold HOLD; a fresh
# server (SERVER_BIN, SERVER_IO, 2 shards) for every run.
# Usage: bench/client-pair.sh   (about 15 s per run)
#   BASE_CLIENT=/work/builds/ba9adbc/client NEW_CLIENT=./target/release/client
#   SERVER_BIN=./target/release/server SERVER_IO=epoll ROUNDS=5 HOLD=3s CONNS=15000
# Writes: results/<UTC time>-client-pair/{summary.md,command.txt,base-N/,new-N/}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BASE_CLIENT=${BASE_CLIENT:-/work/builds/ba9adbc/client}
NEW_CLIENT=${NEW_CLIENT:-./target/release/client}
SERVER_BIN=${SERVER_BIN:-./target/release/server}
SERVER_IO=${SERVER_IO:-epoll}
ROUNDS=${ROUNDS:-5}
HOLD=${HOLD:-3s}
CONNS=${CONNS:-15000}
PORT=${PORT:-9600}
for b in "$BASE_CLIENT" "$NEW_CLIENT" "$SERVER_BIN"; do
  [ -x "$b" ] || { echo "client-pair: $b is not executable" >&2; exit 2; }
done
out=$(new_results client-pair "BASE_CLIENT=$BASE_CLIENT NEW_CLIENT=$NEW_CLIENT SERVER_BIN=$SERVER_BIN SERVER_IO=$SERVER_IO ROUNDS=$ROUNDS HOLD=$HOLD CONNS=$CONNS bash bench/client-pair.sh")

server_pid=""
cleanup() { [ -n "$server_pid" ] && kill -9 "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT

for round in $(seq "$ROUNDS"); do
  for which in base new; do
    bin=$NEW_CLIENT
    [ $which = base ] && bin=$BASE_CLIENT
    PORT=$((PORT + 1))
    "$SERVER_BIN" --io "$SERVER_IO" --listen 127.0.0.1:$PORT --cores 0-1 --stats-interval 0 \
      --timeout 20s --tick 100ms > "$out/$which-$round.server.log" 2>&1 &
    server_pid=$!
    wait_port $PORT
    timeout 120 "$bin" --out "$out/$which-$round" --server 127.0.0.1:$PORT --server-pid "$server_pid" \
      --conns "$CONNS" --ips 127.0.0.2-127.0.0.11 --heartbeat 10s --silent 0 --hold "$HOLD" --quiet \
      > "$out/$which-$round.stdout" 2>&1 || echo "client-pair: $which round $round exited $?" >&2
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
    rm -f "$out/$which-$round.server.log" "$out/$which-$round"/*.svg "$out/$which-$round"/*.v2.hdr
    sleep 1
  done
done

python3 - "$out" "$ROUNDS" <<'PY' | tee "$out/summary.md"
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
keys = [
    ("client CPU/conn us (its own)", "client_cpu_per_conn_us"),
    ("client RSS/conn B (its own)", "client_rss_per_conn_bytes"),
    ("server CPU/conn us", "server_cpu_per_conn_us"),
    ("conn/s (mean)", "conn_per_s_mean"),
    ("connect p99 ms", "connect_p99_ms"),
]
runs = {w: [json.load(open(f"{out}/{w}-{r}/summary.json"))["figures"] for r in range(1, rounds + 1)]
        for w in ("base", "new")}
print(f"{rounds} interleaved rounds; the same server binary for both clients, started apart (--server-pid).\n")
print("| figure | base (median) | new (median) | new / base | base per round | new per round |")
print("|---|---|---|---|---|---|")
for name, key in keys:
    b = [f[key] for f in runs["base"]]
    n = [f[key] for f in runs["new"]]
    mb, mn = statistics.median(b), statistics.median(n)
    fmt = lambda v: " / ".join(f"{x:.3g}" for x in v)
    print(f"| {name} | {mb:.3g} | {mn:.3g} | {mn / mb:.2f} | {fmt(b)} | {fmt(n)} |")
pairs = [n["client_cpu_per_conn_us"] / b["client_cpu_per_conn_us"] for b, n in zip(runs["base"], runs["new"])]
print(f"\nClient CPU per connection, new / base by round: {' '.join(f'{p:.2f}' for p in pairs)}")
PY
echo "client-pair: wrote $out" >&2
