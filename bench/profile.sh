#!/usr/bin/env bash
# Where the server's CPU goes during a heartbeat hold: perf record -g on the
# server while N devices (the client's) ping once a second (default 2,000
# devices, 8 s).
# Writes results/<UTC time>-profile/{report.txt,command.txt}. Needs perf.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-2000}
PORT=${PORT:-9401}
command -v perf >/dev/null || { echo "profile: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
cargo build --release --quiet --bin server --bin client
out=$(new_results profile "CONNS=$CONNS bench/profile.sh")
raw=$(mktemp -d /tmp/profile-client.XXXXXX)
./target/release/server --listen 127.0.0.1:$PORT --cores 0-1 --stats-interval 0 2>/dev/null &
server=$!
trap 'kill -9 $server 2>/dev/null || true; rm -rf "$raw"' EXIT
wait_port $PORT
sleep 1
timeout 60 ./target/release/client --server 127.0.0.1:$PORT --conns "$CONNS" --hold 8s --heartbeat 1s \
  --concurrency 512 --ips 127.0.0.2-127.0.0.11 --server-pid $server --quiet --out "$raw/run" \
  >/dev/null 2>>"$out/client.err" &
client=$!
sleep 3 # ramp and settle, then profile the middle of the hold
perf record -F 2000 -g -p $server -o "$out/perf.data" -- sleep 4 >/dev/null 2>&1
wait $client || true
python3 bench/client_json.py "$raw/run" > "$out/client.json"
{
  echo "# perf report --children (share of server CPU including callees), hold phase"
  perf report -i "$out/perf.data" --children --sort sym --percent-limit 3 --stdio -g none 2>/dev/null | grep -E '^ +[0-9]'
} > "$out/report.txt"
rm -f "$out/perf.data"
cat "$out/report.txt"
echo "profile: wrote $out" >&2
