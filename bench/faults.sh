#!/usr/bin/env bash
# Faults under load, with 10,000 devices held by the client (pinging once a
# second):
#  1. kill -9 of the client: how long until the server has freed every
#     connection (its stats lines, every 100 ms, show conns=0);
#  2. SIGTERM of the server under load: it drains (the client runs with
#     --ignore-close: its devices never answer Close 1001, so the drain runs
#     to --drain-timeout 2s) and must exit 0 with every connection accounted
#     for;
#  3. 10,000 connections that send nothing: the handshake timeout (2 s here)
#     must free every one of them.
# Usage: bench/faults.sh   (about 30 s). Writes results/<UTC time>-faults/.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-10000}
PORT=${PORT:-9408}
cargo build --release --quiet --bin server --bin client
out=$(new_results faults "CONNS=$CONNS bench/faults.sh")
# The client's own results directories (it is killed: little in them).
raw=$(mktemp -d /tmp/faults-client.XXXXXX)

start_server() { # $1: stats file
  ./target/release/server --listen 127.0.0.1:$PORT --stats-interval 100ms --drain-timeout 2s > "$1" 2>> "$out/server.err" &
  server=$!
  wait_port $PORT
}
hold_fleet() { # $1: stats file
  ./target/release/client --server 127.0.0.1:$PORT --conns "$CONNS" --hold 60s --heartbeat 1s \
    --concurrency 512 --ignore-close --ips 127.0.0.2-127.0.0.11 --quiet --out "$raw/${1##*/}" \
    > /dev/null 2>> "$out/client.err" &
  client=$!
  for _ in $(seq 300); do
    tail -n 1 "$1" | grep -q "conns=$CONNS " && return 0
    sleep 0.1
  done
  echo "faults: the fleet did not connect" >&2; exit 1
}
now_ms() { date +%s%3N; }
trap 'kill -9 ${server:-} ${client:-} 2>/dev/null || true; rm -rf "$raw"' EXIT

# 1. kill -9 of the client
start_server "$out/kill-client-stats.txt"
hold_fleet "$out/kill-client-stats.txt"
t0=$(now_ms)
kill -9 $client; wait $client 2>/dev/null || true
until tail -n 1 "$out/kill-client-stats.txt" | grep -q "conns=0 "; do sleep 0.02; done
t1=$(now_ms)
kill -TERM $server; wait $server || true
freed_line=$(grep "^final" "$out/kill-client-stats.txt")

# 2. SIGTERM of the server under load
start_server "$out/sigterm-stats.txt"
hold_fleet "$out/sigterm-stats.txt"
t2=$(now_ms)
kill -TERM $server
set +e; wait $server; rc=$?; set -e
t3=$(now_ms)
kill -9 $client 2>/dev/null || true
wait $client 2>/dev/null || true
trap 'rm -rf "$raw"' EXIT
final=$(grep "^final" "$out/sigterm-stats.txt")

# 3. connections that never send a request
./target/release/server --listen 127.0.0.1:$PORT --stats-interval 100ms --handshake-timeout 2s \
  > "$out/idle-stats.txt" 2>> "$out/server.err" &
server=$!
trap 'kill -9 ${server:-} ${idle:-} 2>/dev/null || true; rm -rf "$raw"' EXIT
wait_port $PORT
python3 -c '
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
print("open", flush=True)
time.sleep(30)
' $PORT "$CONNS" > "$out/idle-client.txt" &
idle=$!
until grep -q open "$out/idle-client.txt" 2>/dev/null; do sleep 0.05; done
t4=$(now_ms)
until tail -n 1 "$out/idle-stats.txt" | grep -q " handshake_timeout=$((CONNS)) "; do
  [ $(($(now_ms) - t4)) -lt 20000 ] || { echo "faults: idle connections not freed" >&2; break; }
  sleep 0.05
done
t5=$(now_ms)
kill -9 $idle 2>/dev/null || true
kill -TERM $server; wait $server || true
trap 'rm -rf "$raw"' EXIT
idle_final=$(grep "^final" "$out/idle-stats.txt")

{
  echo "# Faults under load ($CONNS devices)"
  echo
  echo "| figure | value |"
  echo "|---|---|"
  echo "| kill -9 of the client: all connections freed after | $((t1 - t0)) ms (stats every 100 ms) |"
  echo "| ... server totals then | \`${freed_line#final }\` |"
  echo "| SIGTERM under load: server exit code | $rc |"
  echo "| ... time to exit (drain timeout 2 s; the client's --ignore-close devices never answer Close) | $((t3 - t2)) ms |"
  echo "| ... server totals | \`${final#final }\` |"
  echo "| $CONNS connections that send nothing: all freed after (handshake timeout 2 s) | $((t5 - t4)) ms |"
  echo "| ... server totals | \`${idle_final#final }\` |"
  echo "| panics in server stderr | $(grep -c panick "$out/server.err" || true) |"
} | tee "$out/summary.md"
echo "bench: wrote $out" >&2
