#!/usr/bin/env bash
# System calls per heartbeat: a count that machine noise does not blur. For
# each case (N:interval) the server holds N devices pinging once per interval
# (the client, +-10% each) and `perf stat` counts the server's system calls over 4 s of the
# hold, in all and by kind. A heartbeat needs at least a recv and a send;
# the rest is waiting for sockets (epoll_wait, poll, io_uring_enter) and
# anything else. Each case runs the server with every backend in IOS
# (default "uring epoll"), interleaved. With io_uring, recv and send are
# SQEs: the one system call left is io_uring_enter.
# Set BASE_SERVER to an older server binary to count it too, interleaved.
#
# Usage: bench/syscalls.sh   (about 1 minute; CASES, BASE_SERVER override)
# Writes: results/<UTC time>-syscalls/{runs.csv,summary.md,command.txt}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CASES=${CASES:-"2000:1s 15000:1s 15000:7500ms"}
IOS=${IOS:-"uring epoll"}
BASE_SERVER=${BASE_SERVER:-}
PORT=${PORT:-9402}
command -v perf >/dev/null || { echo "syscalls: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
[ -z "$BASE_SERVER" ] || [ -x "$BASE_SERVER" ] || { echo "syscalls: BASE_SERVER ('$BASE_SERVER') is not an executable server" >&2; exit 2; }
cargo build --release --quiet --bin server --bin client
out=$(new_results syscalls "CASES='$CASES' IOS='$IOS'${BASE_SERVER:+ BASE_SERVER=$BASE_SERVER} bench/syscalls.sh")
raw=$(mktemp -d /tmp/syscalls-client.XXXXXX)
server_pid=""
trap '[ -n "$server_pid" ] && kill -9 $server_pid 2>/dev/null || true; rm -rf "$raw"' EXIT

echo "server,conns,interval,heartbeats_per_s,syscalls_per_s,syscalls_per_heartbeat,recv_per_heartbeat,send_per_heartbeat,wait_per_heartbeat,cpu_per_heartbeat_us" > "$out/runs.csv"
events=raw_syscalls:sys_enter,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_poll,syscalls:sys_enter_io_uring_enter
for case in $CASES; do
  n=${case%%:*}
  interval=${case#*:}
  for impl in $IOS ${BASE_SERVER:+base}; do
    bin=./target/release/server
    io=(--io "$impl")
    [ "$impl" = base ] && bin=$BASE_SERVER && io=()
    "$bin" "${io[@]}" --listen 127.0.0.1:$PORT --cores 0-1 --stats-interval 0 >/dev/null 2>>"$out/server.err" &
    server_pid=$!
    wait_port $PORT
    sleep 1
    rm -rf "$raw/run"
    timeout 60 ./target/release/client --server 127.0.0.1:$PORT --conns "$n" --hold 8s --heartbeat "$interval" \
      --concurrency 512 --ips 127.0.0.2-127.0.0.11 --server-pid $server_pid --quiet --out "$raw/run" \
      >/dev/null 2>>"$out/client.err" &
    client=$!
    sleep 3.5 # the ramp and the first pings; then count the middle of the hold
    perf stat -e $events -x, -o "$out/perf.txt" -p $server_pid -- sleep 4 >/dev/null 2>&1
    wait $client || true
    python3 bench/client_json.py "$raw/run" > "$out/client.json"
    kill -TERM $server_pid; wait $server_pid 2>/dev/null || true
    server_pid=""
    python3 - "$impl" "$n" "$interval" "$out" >> "$out/runs.csv" <<'PY'
import json, sys
impl, n, interval, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
secs = float(interval[:-2]) / 1000 if interval.endswith("ms") else float(interval[:-1])
counts = {}
for line in open(f"{out}/perf.txt"):
    f = line.strip().split(",")
    if len(f) > 2 and "sys_enter" in f[2]:
        counts[f[2]] = int(f[0]) if f[0].isdigit() else 0
lg = json.load(open(f"{out}/client.json"))
hb = n / secs * 4  # heartbeats in the 4 s counted
per = lambda *ks: sum(counts.get(k, 0) for k in ks) / hb
print(
    f"{impl},{n},{interval},{hb / 4:.0f},{counts['raw_syscalls:sys_enter'] / 4:.0f},"
    f"{per('raw_syscalls:sys_enter'):.2f},{per('syscalls:sys_enter_recvfrom'):.2f},"
    f"{per('syscalls:sys_enter_sendto'):.2f},"
    f"{per('syscalls:sys_enter_epoll_wait', 'syscalls:sys_enter_poll', 'syscalls:sys_enter_io_uring_enter'):.2f},"
    f"{lg['server_cpu_per_heartbeat_us']}"
)
PY
    sleep 1
  done
done
rm -f "$out/perf.txt" "$out/client.json"
{
  echo "Server system calls over 4 s of the hold (perf stat), per heartbeat:"
  echo "in all, recv, send, and waiting for sockets (epoll_wait + poll + io_uring_enter)."
  echo
  echo "| server | conns | ping every | heartbeats/s | syscalls/s | all | recv | send | wait | CPU/heartbeat us |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  tail -n +2 "$out/runs.csv" | awk -F, '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 }'
} > "$out/summary.md"
cat "$out/summary.md"
echo "syscalls: wrote $out" >&2
