#!/usr/bin/env bash
# The paced drain (issue 20): SIZE devices connected and heartbeating,
# then SIGTERM with --drain-rate RATE --drain-health-delay DELAY. The
# figure is the time from the first Close 1001 a device gets to the last
# (the client's first and last close by the server of a heartbeating
# device, to 0.1%), against SIZE / RATE: the target is within 5%.
#
# Each backend of IOS, one after the other; the server: 2 shards (all
# CPUs), each closing at its half of RATE. The client ramps at 5,000/s
# from 4 source addresses and holds until well after the drain.
# Bounded: about SIZE / RATE + 20 s per backend; every process is stopped
# by its pid. Loopback only.
# PROCS=N runs the server as N worker processes (--procs N: each worker's
# shards close at their share of RATE); the client runs one process per
# 15,000 devices (RLIMIT_NOFILE is 20,000 here).
# At scale: CLIENT_RATE (the ramp, 0 = as fast as it goes), HEARTBEAT
# (seconds; the server's --timeout is 3x), IPS (source addresses, 25,000
# devices each at most); past 100,000 devices kernel-tuning/ is applied
# with a backup in the results directory and restored at the end (root).
# Usage: bash bench/drain.sh   (SIZE=10000 RATE=1000 DELAY=1s IOS="epoll uring" PROCS=1)
#   1M: SIZE=1000000 RATE=20000 PROCS=60 CLIENT_RATE=0 HEARTBEAT=30 IPS=127.0.0.2-127.0.0.41 IOS=uring bash bench/drain.sh
# Writes: results/<UTC time>-drain/{summary.md,command.txt,git.txt,machine.txt,
#         <io>-server.log (its stats lines), <io>-client.json (the client's figures)}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
SIZE=${SIZE:-10000}
RATE=${RATE:-1000}
DELAY=${DELAY:-1s}
IOS=${IOS:-"epoll uring"}
PORT=${PORT:-9730}
PROCS=${PROCS:-1}
CLIENT_RATE=${CLIENT_RATE:-5000}
HEARTBEAT=${HEARTBEAT:-10}
IPS=${IPS:-127.0.0.2-127.0.0.5}
TIMEOUT=$(( HEARTBEAT * 3 < 60 ? 60 : HEARTBEAT * 3 ))
TUNE=0
[ "$SIZE" -gt 100000 ] && TUNE=1
procs=(); [ "$PROCS" -gt 1 ] && procs=(--procs "$PROCS")
client_procs=$(( (SIZE + 14999) / 15000 ))

cargo build --release --quiet --bin server --bin client
top=$(new_results drain "SIZE=$SIZE RATE=$RATE DELAY=$DELAY IOS='$IOS' PROCS=$PROCS CLIENT_RATE=$CLIENT_RATE HEARTBEAT=$HEARTBEAT IPS=$IPS bash bench/drain.sh")
{ echo "loadavg at start: $(cat /proc/loadavg)"; nproc; uname -r; } > "$top/machine.txt"
tmp=$(mktemp -d)

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
  if [ "$TUNE" = 1 ] && [ -s "$top/sysctl-backup.conf" ]; then
    bash kernel-tuning/apply.sh --restore "$PWD/$top/sysctl-backup.conf" >> "$top/kernel-apply.txt" 2>&1
  fi
}
trap cleanup EXIT
if [ "$TUNE" = 1 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "drain: $SIZE devices need kernel-tuning/ applied, which needs root" >&2; exit 1; }
  C1M_BACKUP="$PWD/$top/sysctl-backup.conf" bash kernel-tuning/apply.sh 2> "$top/kernel-apply.txt"
fi

drain_s=$(( (SIZE + RATE - 1) / RATE ))
for io in $IOS; do
  ./target/release/server --io "$io" --listen 127.0.0.1:$PORT "${procs[@]}" --timeout "${TIMEOUT}s" --tick 100ms \
    --stats-interval 1s --drain-rate "$RATE" --drain-health-delay "$DELAY" --drain-timeout 5s \
    > "$top/$io-server.log" 2>&1 &
  server=$!
  pids+=("$server")
  wait_port $PORT
  # The hold begins once the ramp ends: the wait below, the delay, the
  # drain and a margin. The ramp itself: SIZE / CLIENT_RATE, or up to
  # SIZE / 5,000 s as fast as it goes on this box.
  ramp_s=$(( CLIENT_RATE > 0 ? SIZE / CLIENT_RATE : SIZE / 5000 ))
  hold=$(( 8 + drain_s + 10 ))
  [ "$CLIENT_RATE" -gt 0 ] && hold=$(( hold + ramp_s ))
  timeout $(( ramp_s + hold + 60 )) ./target/release/client --io epoll --server 127.0.0.1:$PORT \
    --ips "$IPS" --procs "$client_procs" --conns "$SIZE" --rate "$CLIENT_RATE" --heartbeat "${HEARTBEAT}s" \
    --server-timeout "${TIMEOUT}s" --hold "${hold}s" --quiet --out "$tmp/$io" > "$tmp/$io-client.txt" 2>&1 &
  client=$!
  pids+=("$client")
  # Every device up (the stats line's conns), then SIGTERM.
  for _ in $(seq $(( 300 + ramp_s * 10 ))); do
    n=$( (grep -o ' conns=[0-9]*' "$top/$io-server.log" || true) | tail -1 | cut -d= -f2)
    [ "${n:-0}" -ge "$SIZE" ] && break
    sleep 0.1
  done
  sleep 1
  kill -TERM "$server"
  status=0
  wait "$server" || status=$?
  echo "server exit status $status" >> "$top/$io-server.log"
  wait "$client" || true
  python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["figures"], indent=1))' \
    "$tmp/$io/summary.json" > "$top/$io-client.json"
  sleep 2
done
trap - EXIT
cleanup

python3 - "$top" "$SIZE" "$RATE" "$DELAY" <<'PY' > "$top/summary.md"
import json, os, re, sys
top, size, rate, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cmd = open(f"{top}/command.txt").read().strip()
print(f"# Paced drain\n\n`{cmd}`\n")
print(open(f"{top}/machine.txt").read().splitlines()[0] + " (2 cores shared with other work)\n")
want = size / rate
print(f"{size:,} devices, `--drain-rate {rate} --drain-health-delay {delay}`: the closes should span "
      f"{size:,} / {rate:,} = {want:.1f} s (target: within 5%).\n")
print("| backend | devices closed (client) | first / last Close (s into the run) | span (s) | span / (N/R) | server: client_close, shutdown, peer_gone | exit |")
print("|---|---|---|---|---|---|---|")
for io in ("epoll", "uring"):
    p = f"{top}/{io}-client.json"
    if not os.path.exists(p):
        continue
    f = json.load(open(p))
    log = open(f"{top}/{io}-server.log").read()
    fin = log.split("final")[-1] if "final" in log else log
    g = lambda k: (re.findall(r"\b" + k + r"=(\d+)", fin) or ["-"])[-1]
    ex = (re.findall(r"server exit status (\d+)", log) or ["-"])[-1]
    first, last = f.get("server_close_first_s"), f.get("server_close_last_s")
    span = None if first is None else last - first
    ratio = "-" if span is None else f"{span / want:.3f}"
    print(f"| {io} | {f.get('server_closes', 0):,} of {f.get('established', size):,} | {first} / {last} "
          f"| {'-' if span is None else f'{span:.2f}'} | {ratio} | {g('client_close')}, {g('shutdown')}, {g('peer_gone')} | {ex} |")
print("\nThe span is the client's: its first and last close by the server of a heartbeating")
print("device (HdrHistogram, 3 significant digits: 0.1%). Each shard closes its devices at")
print("its share of the rate, so the span is that of the shard holding the most (SO_REUSEPORT")
print("splits them about evenly). `<io>-server.log`: the server's stats lines;")
print("`<io>-client.json`: the client's figures. The server's one peer_gone is bench/lib.sh's")
print("wait_port probe (a connection opened and closed before the devices).")
PY
cat "$top/summary.md"
echo "bench: wrote $top" >&2
