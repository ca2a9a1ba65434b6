#!/usr/bin/env bash
# Proof by profile that the io_uring backend never cancels: perf record -g
# on a `--io uring` server (1) during a hold of CONNS devices pinging once
# a second and (2) during an expiry wave of CONNS silent devices, then the
# share of samples in the kernel's cancel paths (io_poll_find,
# io_async_cancel, io_try_cancel, io_poll_cancel, io_cancel_req_match).
# Stock glommio spent 28-46% of its CPU in io_poll_find (an early profile of
# 2026-11-24 whose run is not kept in results/; docs/ARCHITECTURE.md, "Readiness
# armed once per connection", says why: the kernel's cancel walks a bucket of
# the ring's poll hash table on every reactor loop); here each must be absent. Also prints the server's own cancel count.
# Usage: bench/uring-cancels.sh   (about 40 s; CONNS overrides 15000)
# Writes: results/<UTC time>-uring-cancels/{summary.md,hold.txt,wave.txt,command.txt}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-15000}
PORT=${PORT:-9409}
command -v perf >/dev/null || { echo "uring-cancels: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
cargo build --release --quiet --bin server --bin client
out=$(new_results uring-cancels "CONNS=$CONNS bench/uring-cancels.sh")
raw=$(mktemp -d /tmp/uring-cancels-client.XXXXXX)
server=""
trap '[ -n "$server" ] && kill -9 $server 2>/dev/null || true; rm -rf "$raw"' EXIT
# (io_poll_remove_entries is a request's own poll ending, not a cancel.)
syms='io_poll_find|io_async_cancel|io_try_cancel|io_poll_cancel|io_cancel_req_match|io_poll_remove\b'

profile() { # name, server flags, client flags, seconds before, seconds recorded
  local name=$1 sflags=$2 lflags=$3 before=$4 secs=$5
  ./target/release/server --io uring --listen 127.0.0.1:$PORT --cores 0-1 --stats-interval 1s $sflags \
    > "$out/$name-server.txt" 2>/dev/null &
  server=$!
  wait_port $PORT
  sleep 1
  timeout 60 ./target/release/client --server 127.0.0.1:$PORT --conns "$CONNS" --concurrency 512 \
    --ips 127.0.0.2-127.0.0.11 --server-pid $server $lflags --quiet --out "$raw/$name" >/dev/null 2>>"$out/client.err" &
  local lg=$!
  sleep "$before"
  perf record -F 2000 -g -p $server -o "$out/perf.data" -- sleep "$secs" >/dev/null 2>&1
  wait $lg || true
  python3 bench/client_json.py "$raw/$name" > "$out/$name-client.json"
  kill -TERM $server; wait $server 2>/dev/null || true
  server=""
  perf report -i "$out/perf.data" --children --sort sym --percent-limit 0 --stdio -g none 2>/dev/null \
    | grep -E '^ +[0-9]' > "$out/$name.txt" || true
  local samples
  samples=$(perf report -i "$out/perf.data" --stdio 2>/dev/null | awk '/^# Samples/{s=$3} END{print s}' || true)
  rm -f "$out/perf.data"
  local hits
  hits=$(grep -E "$syms" "$out/$name.txt" | awk '{print $NF" "$1}' | paste -sd, - || true)
  local cancels
  cancels=$(grep -o 'cancels=[0-9]*' "$out/$name-server.txt" | tail -1)
  echo "| $name | $samples | ${hits:-none} | ${cancels#cancels=} |" >> "$out/summary.md"
}

{
  echo "Kernel cancel paths in the profile of a --io uring server (perf record -F 2000 -g, --children)."
  echo
  echo "| phase | samples | cancel-path symbols (share incl. callees) | cancels counted by the driver |"
  echo "|---|---|---|---|"
} > "$out/summary.md"
profile hold "" "--hold 8s --heartbeat 1s" 3 4
profile wave "--timeout 3s --tick 100ms" "--silent 1 --hold 7s --server-timeout 3s" 2.5 4
cat "$out/summary.md"
echo "uring-cancels: wrote $out" >&2
