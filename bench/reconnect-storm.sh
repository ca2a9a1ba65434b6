#!/usr/bin/env bash
# The reconnect storm (issue 20): SIZE devices are connected and
# heartbeating when, STORM_AT into the hold, every one of them resets its
# connection at once (SO_LINGER 0) and reconnects as firmware would
# (exponential backoff with full jitter: client --backoff-base 100ms,
# --backoff-cap 30s; a refused, 503, reset or timed-out attempt backs off
# and retries). A second, undisturbed fleet of PROBE devices heartbeats
# every second across the storm: its heartbeat RTT is what the storm does
# to the devices already connected.
#
# Each case of CASES runs on each server backend of IOS, one after the other:
#   off          no admission control (the default server)
#   503:N        --max-upgrades-per-sec N --upgrade-excess 503
#   defer:N      --max-upgrades-per-sec N --upgrade-excess defer
# The server: 2 shards (all CPUs), --timeout 30s --tick 100ms. Both clients
# ramp at RATE/s (below the budgets, so that the ramp is never refused).
#
# Default SIZE 15,000 (this 2-core box holds it in one process per side:
# RLIMIT_NOFILE is 20,000). Larger sizes run both sides with --procs
# (PROCS, default one process per 15,000 devices), as one-million.sh does;
# past about 100,000 apply kernel-tuning/ first (as root: one-million.sh
# shows how).
#
# Records per case: the storm client's results (time to 99% and 100% back,
# the reconnects' connect latency, failed attempts by cause), the probe's,
# the server's log (admission_refused, admission_paused), nstat
# TcpExtListenOverflows and TcpExtListenDrops before and after (host-wide),
# false expiries of both fleets (must be 0).
# Bounded: about 50 s per case and backend (SIZE 15,000); every process is
# stopped by its pid.
# SERVERS="this=./target/release/server base=/path/to/server" runs every case
# on each binary in turn (a change against its base, in one sitting).
# Usage: bash bench/reconnect-storm.sh
# Writes: results/<UTC time>-reconnect-storm/{summary.md,command.txt,<io>-<case>/{storm/,probe/,server.log,nstat-*.txt}}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
SIZE=${SIZE:-15000}
PROBE=${PROBE:-1000}
CASES=${CASES:-"off 503:5000 defer:5000"}
IOS=${IOS:-"epoll uring"}
RATE=${RATE:-3000}
STORM_AT=${STORM_AT:-8}   # seconds into the storm fleet's hold
HOLD=${HOLD:-30}          # the storm fleet's hold, seconds
PORT=${PORT:-9710}
HEARTBEAT=${HEARTBEAT:-10}  # the storm fleet's heartbeat, seconds (30 at 1M: see one-million.sh)
TIMEOUT=${TIMEOUT:-30}      # the server's --timeout, seconds (more than HEARTBEAT + 10%)
PROCS=${PROCS:-$(( (SIZE + 14999) / 15000 ))}
# The clients' backend. epoll: an io_uring client finishes its closes
# asynchronously (a Close SQE after the last completion of the socket's
# receive), so during the storm it holds the old socket and the new one
# and 15,000 devices pass RLIMIT_NOFILE (counted as failed "other",
# EMFILE); and its resets reach the server late (the server then sees
# each reconnect displace the old connection: replaced, not peer_gone).
CLIENT_IO=${CLIENT_IO:-epoll}
SERVER_FLAGS=${SERVER_FLAGS:-}  # more server flags for every case, e.g. '--backlog 512'
IPS=${IPS:-127.0.0.2-127.0.0.21}  # the storm fleet's source addresses (1M: 127.0.0.2-127.0.0.41)
# TLS=1: wss (a P-256 certificate for localhost from a CA made here with
# openssl); both fleets resume with the tickets their process was given
# (TLS_CLIENT_FLAGS='--tls-no-resume' makes every reconnect a full handshake).
TLS=${TLS:-0}
TLS_CLIENT_FLAGS=${TLS_CLIENT_FLAGS:-}
# SERVERS='this=./target/release/server base=/path/to/server': each case on
# each of these servers, in turn, in one sitting (a change against its base).
SERVERS=${SERVERS:-this=./target/release/server}

cargo build --release --quiet --bin server --bin client
top=$(new_results reconnect-storm "SIZE=$SIZE PROBE=$PROBE CASES='$CASES' IOS='$IOS' CLIENT_IO=$CLIENT_IO RATE=$RATE STORM_AT=$STORM_AT HOLD=$HOLD HEARTBEAT=$HEARTBEAT TIMEOUT=$TIMEOUT IPS=$IPS${SERVER_FLAGS:+ SERVER_FLAGS='$SERVER_FLAGS'}$( [ "$SERVERS" = this=./target/release/server ] || echo " SERVERS='$SERVERS'")$( [ "$TLS" = 1 ] && echo ' TLS=1')${TLS_CLIENT_FLAGS:+ TLS_CLIENT_FLAGS='$TLS_CLIENT_FLAGS'} bash bench/reconnect-storm.sh")
{ echo "loadavg at start: $(cat /proc/loadavg)"; nproc; uname -r; } > "$top/machine.txt"

tls_server=(); tls_client=()
if [ "$TLS" = 1 ]; then
  pki=$(mktemp -d)
  make_test_pki "$pki"
  tls_server=(--tls-cert "$pki/cert.pem" --tls-key "$pki/key.pem")
  tls_client=(--tls --tls-ca "$pki/ca.pem" $TLS_CLIENT_FLAGS)
fi

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  [ -z "${pki:-}" ] || rm -rf "$pki"
}
trap cleanup EXIT

# The listen queue's counters, and what says how SYNs past it were met
# (cookies, drops) and how long handshakes stalled (retransmits).
listen_counters() {
  nstat -asz TcpExtListenOverflows TcpExtListenDrops TcpExtSyncookiesSent TcpExtSyncookiesRecv \
    TcpExtSyncookiesFailed TcpExtTCPReqQFullDoCookies TcpExtTCPReqQFullDrop TcpRetransSegs \
    TcpExtTCPTimeouts TcpExtTCPSynRetrans 2>/dev/null | awk 'NR>1 && NF>=2 {print $1, $2}'
}
procs=()
[ "$PROCS" -gt 1 ] && procs=(--procs "$PROCS")

for named in $SERVERS; do
server_bin=${named#*=}
for io in $IOS; do
for case in $CASES; do
  out=$top/$io-${case/:/-}
  [ "$SERVERS" = this=./target/release/server ] || out=$top/${named%%=*}-$io-${case/:/-}
  mkdir -p "$out"
  flags=()
  case $case in
    off) ;;
    503:*) flags=(--max-upgrades-per-sec "${case#*:}" --upgrade-excess 503) ;;
    defer:*) flags=(--max-upgrades-per-sec "${case#*:}" --upgrade-excess defer) ;;
    *) echo "reconnect-storm: unknown case $case (off, 503:N, defer:N)" >&2; exit 1 ;;
  esac
  "$server_bin" --io "$io" --listen 127.0.0.1:$PORT "${procs[@]}" --timeout "${TIMEOUT}s" --tick 100ms \
    --stats-interval 1s "${flags[@]}" "${tls_server[@]}" $SERVER_FLAGS > "$out/server.log" 2>&1 &
  server=$!
  pids+=("$server")
  wait_port $PORT
  sleep 1
  listen_counters > "$out/nstat-before.txt"
  cat /proc/loadavg > "$out/loadavg-before.txt"

  # The storm fleet: heartbeat 10 s, STORM_AT into its hold every device resets.
  timeout $((2 * SIZE / RATE + HOLD + 60)) ./target/release/client --io "$CLIENT_IO" --server 127.0.0.1:$PORT \
    --ips "$IPS" "${procs[@]}" --conns "$SIZE" --rate "$RATE" --heartbeat "${HEARTBEAT}s" \
    --server-timeout "${TIMEOUT}s" --hold "${HOLD}s" --reconnect-storm "${STORM_AT}s" \
    --server-pid "$server" "${tls_client[@]}" --quiet --out "$out/storm" > "$out/storm.txt" 2>&1 &
  storm=$!
  pids+=("$storm")
  # The probe fleet connects once the storm fleet is up and heartbeats every
  # second until well after the storm.
  sleep $((SIZE / RATE + 2))
  timeout $((HOLD + 60)) ./target/release/client --io "$CLIENT_IO" --server 127.0.0.1:$PORT \
    --ips 127.0.0.31-127.0.0.32 --conns "$PROBE" --rate 1000 --heartbeat 1s --id-prefix probe- \
    --server-timeout "${TIMEOUT}s" --hold "$((HOLD - 2))s" "${tls_client[@]}" --quiet --out "$out/probe" > "$out/probe.txt" 2>&1 &
  probe=$!
  pids+=("$probe")
  wait "$storm" || true
  wait "$probe" || true
  listen_counters > "$out/nstat-after.txt"
  kill -TERM "$server"; wait "$server" || true
  sleep 2
done
done
done
trap - EXIT
[ -z "${pki:-}" ] || rm -rf "$pki"

python3 - "$top" <<'PY' > "$top/summary.md"
import json, os, re, sys
top = sys.argv[1]
def fig(path):
    try:
        return json.load(open(path))["figures"]
    except Exception:
        return {}
def nstat(path):
    d = {}
    for line in open(path):
        k, v = line.split()[:2]
        d[k] = int(v)
    return d
def v(x, fmt="{:,}"):
    return "-" if x is None else (fmt.format(x) if isinstance(x, (int, float)) else str(x))
cmd = open(f"{top}/command.txt").read().strip()
print(f"# Reconnect storm\n\n`{cmd}`\n")
print(open(f"{top}/machine.txt").read().splitlines()[0] + " (2 cores shared with other work: figures move with it)\n")
tls = "TLS=1" in cmd
print("| backend, case | reset / back / not back | 99% / 100% back (s) | reconnect connect p50 / p99 / max (ms) | attempts; failed: 503, reset, timeout, refused, other | 503s / pauses (server) | ListenOverflows / ListenDrops | probe RTT p50 / p99 / max (ms) | false expiries (storm, probe) |" + (" TLS handshakes; resumed (server) |" if tls else ""))
print("|---|---|---|---|---|---|---|---|---|" + ("---|" if tls else ""))
for d in sorted(os.listdir(top)):
    p = f"{top}/{d}"
    if not os.path.isdir(p) or not os.path.exists(f"{p}/server.log"):
        continue
    s, q = fig(f"{p}/storm/summary.json"), fig(f"{p}/probe/summary.json")
    log = open(f"{p}/server.log").read()
    fin = log.split("final")[-1] if "final" in log else log
    g = lambda k: (re.findall(k + r"=(\d+)", fin) or ["-"])[-1]
    b, a = nstat(f"{p}/nstat-before.txt"), nstat(f"{p}/nstat-after.txt")
    dl = lambda k: a.get(k, 0) - b.get(k, 0)
    print(f"| {d} | {v(s.get('storm_devices'))} / {v(s.get('storm_back'))} / {v(s.get('storm_unrecovered'))} "
          f"| {v(s.get('storm_time_to_99pct_s'), '{}')} / {v(s.get('storm_time_to_100pct_s'), '{}')} "
          f"| {v(s.get('storm_connect_p50_ms'), '{}')} / {v(s.get('storm_connect_p99_ms'), '{}')} / {v(s.get('storm_connect_max_ms'), '{}')} "
          f"| {v(s.get('storm_attempts'))}; {v(s.get('storm_failed_503'))}, {v(s.get('storm_failed_reset'))}, {v(s.get('storm_failed_timeout'))}, {v(s.get('storm_failed_refused'))}, {v(s.get('storm_failed_other'))} "
          f"| {g('admission_refused')} / {g('admission_paused')} "
          f"| {dl('TcpExtListenOverflows'):,} / {dl('TcpExtListenDrops'):,} "
          f"| {v(q.get('heartbeat_rtt_p50_ms'), '{}')} / {v(q.get('heartbeat_rtt_p99_ms'), '{}')} / {v(q.get('heartbeat_rtt_max_ms'), '{}')} "
          f"| {v(s.get('false_expiries'))}, {v(q.get('false_expiries'))} |"
          + (f" {g('tls_handshakes')}; {g('tls_resumed')} |" if tls else ""))
print("\nPer case: `storm/` (the storm fleet: summary.md/json, connect, heartbeat_rtt,")
print("reconnect_connect and reconnect_back histograms, timeline), `probe/` (the undisturbed")
print("fleet, 1 s heartbeats across the storm), `server.log` (stats line each second),")
print("`nstat-*.txt` (host-wide listen-queue counters before and after).")
PY
cat "$top/summary.md"
echo "bench: wrote $top" >&2
