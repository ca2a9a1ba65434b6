#!/usr/bin/env bash
# Where the server's CPU goes during a heartbeat hold: perf record -g on the
# server while N devices (the client's) ping once a second (default 2,000
# devices, 8 s).
# PHASE=connect: the ramp instead (CONNS default 15,000, no heartbeats:
# perf from the client's start for 1.5 s, the ramp of 15,000 takes ~0.6 s
# here, the teardown comes after the profile); IMPL=tokio profiles the
# tuned tokio-tungstenite peer (server/examples/tokio_peer.rs) the same
# way. The report adds the kernel's share and the top symbols by self time.
# Writes results/<UTC time>-profile/{report.txt,command.txt}. Needs perf.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
PHASE=${PHASE:-hold}
IMPL=${IMPL:-c1m}
if [ "$PHASE" = connect ]; then CONNS=${CONNS:-15000}; else CONNS=${CONNS:-2000}; fi
PORT=${PORT:-9401}
command -v perf >/dev/null || { echo "profile: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
cargo build --release --quiet --bin server --bin client --example tokio_peer
out=$(new_results profile "PHASE=$PHASE IMPL=$IMPL CONNS=$CONNS bench/profile.sh")
raw=$(mktemp -d /tmp/profile-client.XXXXXX)
if [ "$IMPL" = tokio ]; then
  ./target/release/examples/tokio_peer --listen 127.0.0.1:$PORT --lifetime 120s >/dev/null 2>&1 &
else
  ./target/release/server --listen 127.0.0.1:$PORT --cores 0-1 --stats-interval 0 2>/dev/null &
fi
server=$!
trap 'kill -9 $server 2>/dev/null || true; rm -rf "$raw"' EXIT
wait_port $PORT
sleep 1
if [ "$PHASE" = connect ]; then
  # No heartbeat within the run; the profile ends before the teardown.
  hold=6s; heartbeat=60s; settle=0; window=1.5
else
  hold=8s; heartbeat=1s; settle=3; window=4 # the middle of the hold
fi
timeout 60 ./target/release/client --server 127.0.0.1:$PORT --conns "$CONNS" --hold $hold --heartbeat $heartbeat \
  --concurrency 512 --ips 127.0.0.2-127.0.0.11 --server-pid $server --quiet --out "$raw/run" \
  >/dev/null 2>>"$out/client.err" &
client=$!
sleep $settle
perf record -F 2000 -g -p $server -o "$out/perf.data" -- sleep $window >/dev/null 2>&1
wait $client || true
python3 bench/client_json.py "$raw/run" > "$out/client.json"
{
  echo "# perf report --children (share of the server's CPU including callees), $PHASE phase, $IMPL"
  perf report -i "$out/perf.data" --children --sort sym --percent-limit 3 --stdio -g none 2>/dev/null | grep -E '^ +[0-9]'
  echo
  echo "# kernel and user: the share of samples by where they ran"
  perf report -i "$out/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -8
  echo
  echo "# self time, the top 30 symbols"
  perf report -i "$out/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -30
} > "$out/report.txt"
rm -f "$out/perf.data"
cat "$out/report.txt"
echo "profile: wrote $out" >&2
