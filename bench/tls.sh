#!/usr/bin/env bash
# TLS in the shard (--tls-cert/--tls-key) against plaintext, on loopback:
#  1. memory: N idle wss devices against N idle ws devices (server and client
#     both --procs PROCS, past the 20,000-descriptor cap): user-space RSS per
#     connection of the server (all its processes) and of the client;
#  2. handshake CPU: CPU_N devices against one server process (2 shards),
#     one client process, CONC upgrades in flight per core: server CPU per
#     connection for ws, wss with full handshakes only (--tls-no-resume) and
#     wss resuming with the tickets the client process keeps (one
#     ClientConfig per process; --tls-share-tickets: a first connection
#     resumes with another device's ticket, so that a ramp is of resumed
#     handshakes); the TLS share is the difference to ws;
#  3. heartbeat CPU: CPU_N devices heartbeating every second (a Ping, and
#     the server's Pong: one record each way) for HOLD, ws against wss:
#     server CPU per heartbeat over the hold.
# PARTS selects what runs (default "cpu mem hb").
# Runs alternate between the kinds, REPS times each, after one warm-up run
# (the first run of a sitting pays for fresh kernel slabs); medians reported.
# The test CA and key are made here with openssl in a temporary directory
# and removed at the end: never written to results/.
# Usage: bench/tls.sh   (N=100000 PROCS=6 REPS=3 CPU_N=10000 CONC=8 HOLD=20s; ~12 min)
# Writes: results/<UTC time>-tls/{summary.md,command.txt,git.txt,<run>/...}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
N=${N:-100000}
PROCS=${PROCS:-6}
REPS=${REPS:-3}
CPU_N=${CPU_N:-10000}
CONC=${CONC:-8}
# Away from the client tests' ports (19500-21499) and the ephemeral range.
PORT=${PORT:-17643}
IPS=${IPS:-127.0.0.2-127.0.0.41}
HOLD=${HOLD:-20s}
PARTS=${PARTS:-cpu mem hb}
# BASE_SERVER=path: the handshake CPU part also runs that server binary
# (a base build), interleaved, in the same sitting (rows "base ...").
BASE_SERVER=${BASE_SERVER:-}
# IO=epoll|uring: the servers' --io (default: the server's own default).
IO=${IO:-}
cargo build --release --quiet --bin server --bin client
out=$(new_results tls "N=$N PROCS=$PROCS REPS=$REPS CPU_N=$CPU_N CONC=$CONC HOLD=$HOLD PARTS='$PARTS'${BASE_SERVER:+ BASE_SERVER=$BASE_SERVER}${IO:+ IO=$IO} bench/tls.sh")
pki=$(mktemp -d)
trap 'rm -rf "$pki"' EXIT

make_test_pki "$pki"
TLS_SERVER="--tls-cert $pki/cert.pem --tls-key $pki/key.pem"
TLS_CLIENT="--tls --tls-ca $pki/ca.pem"

# run NAME SERVER_FLAGS CLIENT_FLAGS: one client run with its own server,
# idle devices (a heartbeat far longer than the run, unless RUN_HB says
# otherwise; RUN_HOLD the hold), bounded by timeout.
# Each run gets a port of its own: a SYN that meets the 4-tuple of a socket
# the previous run's server still holds waits out a 1 s retransmission
# (seen here: ramps stalled in whole seconds).
runs=0
run() {
  local name=$1 sflags=$2 cflags=$3
  runs=$((runs + 1))
  echo "bench: $name" >&2
  # shellcheck disable=SC2086
  timeout 600 ./target/release/client --spawn-server --server 127.0.0.1:$((PORT + runs)) \
    --server-flags "--timeout 600s --tick 1s${IO:+ --io $IO} $sflags" \
    --ips "$IPS" --heartbeat "${RUN_HB:-300s}" --hold "${RUN_HOLD:-5s}" --quiet $cflags \
    --out "$out/$name" > "$out/$name.log" 2>&1 || echo "bench: $name exited $?" >&2
  sleep 2 # the port and the sockets' memory settle
}

part() { [[ " $PARTS " == *" $1 "* ]]; }
run warmup "--cores 0-1" "--conns $CPU_N --concurrency $CONC"
part cpu && for rep in $(seq "$REPS"); do
  run "cpu-ws-$rep" "--cores 0-1" "--conns $CPU_N --concurrency $CONC"
  run "cpu-wss-full-$rep" "--cores 0-1 $TLS_SERVER" "--conns $CPU_N --concurrency $CONC $TLS_CLIENT --tls-no-resume"
  run "cpu-wss-resumed-$rep" "--cores 0-1 $TLS_SERVER" "--conns $CPU_N --concurrency $CONC $TLS_CLIENT --tls-share-tickets"
  if [ -n "$BASE_SERVER" ]; then
    run "cpu-base_wss-full-$rep" "--cores 0-1 $TLS_SERVER" "--server-bin $BASE_SERVER --conns $CPU_N --concurrency $CONC $TLS_CLIENT --tls-no-resume"
    run "cpu-base_wss-resumed-$rep" "--cores 0-1 $TLS_SERVER" "--server-bin $BASE_SERVER --conns $CPU_N --concurrency $CONC $TLS_CLIENT --tls-share-tickets"
  fi
done
part mem && for rep in $(seq "$REPS"); do
  run "mem-ws-$rep" "--procs $PROCS" "--conns $N --procs $PROCS"
  run "mem-wss-$rep" "--procs $PROCS $TLS_SERVER" "--conns $N --procs $PROCS $TLS_CLIENT"
done
part hb && for rep in $(seq "$REPS"); do
  RUN_HB=1s RUN_HOLD=$HOLD run "hb-ws-$rep" "--cores 0-1" "--conns $CPU_N"
  RUN_HB=1s RUN_HOLD=$HOLD run "hb-wss-$rep" "--cores 0-1 $TLS_SERVER" "--conns $CPU_N $TLS_CLIENT"
done

python3 - "$out" "$N" "$PROCS" "$CPU_N" "$CONC" > "$out/summary.md" <<'EOF'
import json, os, statistics, sys
out, n, procs, cpu_n, conc = sys.argv[1:]
def runs(prefix):
    rows = []
    for d in sorted(os.listdir(out)):
        p = os.path.join(out, d, "summary.json")
        if d.rsplit("-", 1)[0] == prefix and os.path.exists(p):
            rows.append(json.load(open(p))["figures"])
    return rows
def med(rows, key):
    if not rows:
        return float("nan")
    v = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(v) if v else float("nan")
def all_of(rows, key):
    return ", ".join(str(r.get(key)) for r in rows)
print(f"# TLS in the shard against plaintext (bench/tls.sh)\n")
print(f"## Memory: {int(n):,} idle devices, server and client --procs {procs}\n")
print("| kind | runs | established (each run) | failed | server RSS per conn, B (median; each run) | client RSS per conn, B (median) | server CPU per conn, us (median) | time to fleet, s (median) |")
print("|---|---|---|---|---|---|---|---|")
for kind in ["ws", "wss"]:
    r = runs(f"mem-{kind}")
    print(f"| {kind} | {len(r)} | {all_of(r, 'established')} | {all_of(r, 'failed')} | {med(r, 'server_rss_per_conn_bytes'):.0f} ({all_of(r, 'server_rss_per_conn_bytes')}) | {med(r, 'client_rss_per_conn_bytes'):.0f} | {med(r, 'server_cpu_per_conn_us'):.1f} | {med(r, 'time_to_fleet_s'):.1f} |")
print()
print(f"## Handshake CPU: {int(cpu_n):,} devices, one server process (2 shards), one client process, {conc} upgrades in flight per core\n")
print("| kind | runs | TLS handshakes / resumed (each run) | server CPU per conn, us (median; each run) | TLS share of it, us | client CPU per conn, us (median) | conn/s mean (median) |")
print("|---|---|---|---|---|---|---|")
ws = med(runs("cpu-ws"), "server_cpu_per_conn_us")
for kind, label in [("ws", "ws"), ("wss-full", "wss, full handshakes (--tls-no-resume)"), ("wss-resumed", "wss, resuming with the process's tickets"), ("base_wss-full", "base server: wss, full"), ("base_wss-resumed", "base server: wss, resumed")]:
    r = runs(f"cpu-{kind}")
    if not r and kind.startswith("base"):
        continue
    hs = ", ".join(f"{x.get('tls_handshakes')}/{x.get('tls_resumed')}" for x in r)
    m = med(r, "server_cpu_per_conn_us")
    share = "-" if kind == "ws" else f"{m - ws:.1f}"
    print(f"| {label} | {len(r)} | {hs} | {m:.1f} ({all_of(r, 'server_cpu_per_conn_us')}) | {share} | {med(r, 'client_cpu_per_conn_us'):.1f} | {med(r, 'conn_per_s_mean'):.0f} |")
print()
print(f"## Heartbeat CPU: {int(cpu_n):,} devices, a Ping every second each, one server process (2 shards)\n")
print("| kind | runs | heartbeats / replies (each run) | server CPU per heartbeat, us (median; each run) | TLS share, us | heartbeat RTT p50 / p99 ms (median) |")
print("|---|---|---|---|---|---|")
hb_ws = med(runs("hb-ws"), "server_cpu_per_heartbeat_us")
for kind in ["ws", "wss"]:
    r = runs(f"hb-{kind}")
    hb = ", ".join(f"{x.get('heartbeats')}/{x.get('heartbeat_replies')}" for x in r)
    m = med(r, "server_cpu_per_heartbeat_us")
    share = "-" if kind == "ws" else f"{m - hb_ws:.1f}"
    print(f"| {kind} | {len(r)} | {hb} | {m:.1f} ({all_of(r, 'server_cpu_per_heartbeat_us')}) | {share} | {med(r, 'heartbeat_rtt_p50_ms'):.3f} / {med(r, 'heartbeat_rtt_p99_ms'):.3f} |")
print()
print("RSS per connection: (RSS at the end of the ramp - RSS before it) / established, all the server's processes together; user space only (the kernel's socket memory is the same for ws and wss). CPU per connection: the server's CPU over the ramp / established (accept, TLS handshake, upgrade). Each run's files are in its own directory; its command in its summary.md.")
EOF
cat "$out/summary.md"
echo "bench: wrote $out" >&2
