#!/usr/bin/env bash
# The headline run: 1,000,000 WebSocket devices held by one server on this
# host, the client on the same host (loopback, 40 source aliases), both past
# RLIMIT_NOFILE with --procs. Checks and applies kernel-tuning/ first (with a
# backup) and restores every sysctl at the end, whatever happens.
#
#   ramp: CONNS devices connect (RATE/s, 0 = as fast as they can)
#   hold: HOLD with a heartbeat every 30 s (+-10%); 60 s into it, 10% of
#         the devices stop heartbeating, so the server (timeout 90 s, tick
#         1 s) expires them during the hold (HOLD must exceed about 200 s)
#   storm: then every device sends a last heartbeat at once and falls
#         silent (--go-silent), and the server deletes the whole fleet
#         together 90 s later; meanwhile a second client connects PROBE new devices
#         to measure connect latency during the deletion storm
#
# UDP=1 adds --udp-heartbeat to the server and to the fleet client: every
# heartbeat is then the 101's ticket as a datagram (issue 19), the WebSocket
# stays open and silent; everything else is the same (the storm's last
# heartbeat is a datagram too). The directory name ends in -udp.
#
# Writes results/1m-<UTC time>/ (results/<UTC time>-scale-<CONNS>/ for other
# sizes): fleet/ (merged histograms, timeline, summary, plots, worker-N/,
# server.log), storm-probe/, kernel-*.txt, meminfo and sockstat snapshots.
# The storm probe starts 70 s after the fleet falls silent and connects
# PROBE devices at 400/s, across the deletion storm 75-100 s after it.
# Bounded: about ramp + HOLD + 3 minutes; every process is stopped by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-1000000}
PROCS=${PROCS:-60}     # worker processes per side: RLIMIT_NOFILE is 20,000 here
HOLD=${HOLD:-300}      # seconds
RATE=${RATE:-0}
PROBE=${PROBE:-10000}
PORT=${PORT:-9600}
TIMEOUT=${TIMEOUT:-90}  # the server's --timeout, seconds
SILENT_AFTER=${SILENT_AFTER:-60}
HEARTBEAT=${HEARTBEAT:-30}
IO=${IO:-uring}         # the I/O backend of the server and of the clients (the server's default)
UDP=${UDP:-0}           # 1: heartbeats as UDP datagrams (--udp-heartbeat)
# An older server build to run in the same sitting (issue 18: a slow day's
# time targets are read against it), e.g. SERVER_BIN=/work/builds/ba9adbc/server;
# it gets no --io (builds before the driver have none); the client is this one.
SERVER_BIN=${SERVER_BIN:-}
udp=()
[ "$UDP" = 1 ] && udp=(--udp-heartbeat)
server_bin=./target/release/server
server_io=(--io "$IO")
if [ -n "$SERVER_BIN" ]; then
  [ -x "$SERVER_BIN" ] || { echo "one-million: SERVER_BIN ('$SERVER_BIN') is not an executable server" >&2; exit 2; }
  [ "$UDP" = 1 ] && { echo "one-million: UDP=1 needs this build's server, not SERVER_BIN" >&2; exit 2; }
  server_bin=$SERVER_BIN
  server_io=()
fi
[ "$(id -u)" -eq 0 ] || { echo "one-million: needs root to apply (and restore) sysctls" >&2; exit 1; }

cargo build --release --quiet --bin server --bin client
stamp=$(date -u +%Y%m%dT%H%M%SZ)
if [ "$CONNS" = 1000000 ]; then name="1m-$stamp"; else name="$stamp-scale-$CONNS"; fi
[ "$UDP" = 1 ] && name="$name-udp"
[ -n "$SERVER_BIN" ] && name="$name-base"
out="results/$name"
mkdir -p "$out"
echo "${SERVER_BIN:+SERVER_BIN=$SERVER_BIN }IO=$IO UDP=$UDP CONNS=$CONNS PROCS=$PROCS HOLD=$HOLD RATE=$RATE PROBE=$PROBE HEARTBEAT=$HEARTBEAT TIMEOUT=$TIMEOUT SILENT_AFTER=$SILENT_AFTER bash $0 $*" > "$out/command.txt"
echo "$(git rev-parse --short HEAD)$(git diff --quiet || echo -dirty)" > "$out/git.txt"

if ! bash kernel-tuning/check.sh "$CONNS" "$PROCS" > "$out/kernel-check-before.txt"; then
  cat "$out/kernel-check-before.txt" >&2
  echo "one-million: a MUST in kernel-tuning/check.sh is unmet (above); see kernel-tuning/README.md" >&2
  exit 1
fi
C1M_BACKUP="$PWD/$out/sysctl-backup.conf" bash kernel-tuning/apply.sh 2> "$out/kernel-apply.txt"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  cgroup_remove "${cg:-}"
  bash kernel-tuning/apply.sh --restore "$PWD/$out/sysctl-backup.conf" >> "$out/kernel-apply.txt" 2>&1
  bash kernel-tuning/check.sh "$CONNS" "$PROCS" > "$out/kernel-check-after.txt" || true
}
trap cleanup EXIT
bash kernel-tuning/check.sh "$CONNS" "$PROCS" > "$out/kernel-check-applied.txt" || true
cat /proc/meminfo > "$out/meminfo-before.txt"
cat /proc/net/sockstat > "$out/sockstat-before.txt"
cat /proc/net/snmp > "$out/snmp-before.txt"
# Where the kernel dropped packets, if it did (a loopback burst past
# net.core.netdev_max_backlog shows in softnet_stat's second column; TCP's
# own drops and retransmissions in TcpExt): before and after, absolute.
cat /proc/net/softnet_stat > "$out/softnet-before.txt"
nstat -az > "$out/nstat-before.txt" 2>/dev/null || true

# The server runs on its own (not --spawn-server), so that it outlives the
# fleet client for the storm probe; the client measures it by pid.
# In a cgroup of its own (where one can be made): its kernel and user bytes
# per connection apart from the client's (cgroup-server-fleet.txt).
cg=$(cgroup_make "c1m-server-$stamp")
C1M_CG="$cg" sh -c '[ -n "$C1M_CG" ] && echo $$ > "$C1M_CG/cgroup.procs"; exec "$@"' server \
  "$server_bin" "${server_io[@]}" --listen 127.0.0.1:$PORT --procs "$PROCS" --timeout "${TIMEOUT}s" --tick 1s \
  --stats-interval 5s "${udp[@]}" > "$out/server.log" 2>&1 &
server=$!
pids+=("$server")
wait_port "$PORT"
timeout $((HOLD + 1200)) ./target/release/client --io "$IO" --out "$out/fleet" \
  --server 127.0.0.1:$PORT --server-pid "$server" \
  --procs "$PROCS" --conns "$CONNS" --rate "$RATE" --concurrency 64 \
  --ips 127.0.0.2-127.0.0.41 --heartbeat "${HEARTBEAT}s" --silent 0.1 --silent-after "${SILENT_AFTER}s" --server-timeout "${TIMEOUT}s" \
  --hold "${HOLD}s" --go-silent --expiry-window 30s "${udp[@]}" \
  > "$out/fleet.stdout" 2> "$out/fleet.progress" &
client=$!
pids+=("$client")

# Snapshots once the whole fleet is up, then the storm probe: when the hold
# ends every device sends one last heartbeat at once and falls silent, so
# the server's deadlines for the whole fleet come due together 90-91 s later.
until grep -q "holding" "$out/fleet.progress" 2>/dev/null; do
  kill -0 "$client" 2>/dev/null || { echo "one-million: the client ended during the ramp" >&2; tail -5 "$out/fleet.progress" >&2; exit 1; }
  sleep 1
done
sleep 10
cat /proc/meminfo > "$out/meminfo-fleet.txt"
cgroup_snapshot "$cg" "$out/cgroup-server-fleet.txt" "$CONNS"
cat /proc/net/sockstat > "$out/sockstat-fleet.txt"
until grep -q "awaiting expiries" "$out/fleet.progress" 2>/dev/null; do
  kill -0 "$client" 2>/dev/null || break
  sleep 1
done
sleep $((TIMEOUT * 7 / 9))
timeout 300 ./target/release/client --io "$IO" --out "$out/storm-probe" --server 127.0.0.1:$PORT \
  --conns "$PROBE" --rate 400 --ips 127.0.1.2-127.0.1.5 --heartbeat "${HEARTBEAT}s" \
  --server-timeout "${TIMEOUT}s" --hold 5s --quiet --id-prefix probe- \
  > "$out/storm-probe.stdout" 2>&1 || echo "one-million: the storm probe failed (see storm-probe.stdout)" >&2
wait "$client" || echo "one-million: the client exited $?" >&2
kill -TERM "$server"
wait "$server" || echo "one-million: the server exited $?" >&2
pids=()
cat /proc/meminfo > "$out/meminfo-after.txt"
cat /proc/net/sockstat > "$out/sockstat-after.txt"
cat /proc/net/snmp > "$out/snmp-after.txt"
cat /proc/net/softnet_stat > "$out/softnet-after.txt"
nstat -az > "$out/nstat-after.txt" 2>/dev/null || true
cat "$out/fleet.stdout"
echo "storm probe:"; grep -E "Connect latency|established" "$out/storm-probe.stdout" || true
echo "results: $out"
