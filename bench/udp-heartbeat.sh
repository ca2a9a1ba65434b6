#!/usr/bin/env bash
# UDP heartbeats (--udp-heartbeat) against WebSocket pings, the same client,
# devices and rate, one sitting, both server backends: 15,000 devices
# heartbeating every $HB (default 1s: 15,000/s), held $HOLD (default 20s,
# or 3 heartbeats when HB is longer), on a 2-core server (the client on the
# same 2 cores, its own fleets on epoll). Then the floor, two ways, each a
# bare receiver thread (epoll + recvmmsg in batches of 64, pinned to CPU 0;
# server/examples/udp_floor.rs):
#   floor  fed by the same client, devices and rate (the client's --udp-to
#          sends the datagrams to the receiver instead of the server, which
#          still hands out the tickets), measured over the hold;
#   paced  fed by a paced sender on CPU 1 at the same datagram rate.
# ROUNDS=n runs n rounds, each all six measurements in turn.
# BASE_SERVER=path (e.g. /work/builds/<hash>/server): each round also runs
# ping and UDP against that build (heartbeat "ping-base", "udp-base"), to
# price a change against the previous landing in one sitting; the summary
# then adds a this/base column. FLOOR=0 skips the floor runs.
# SYSCALLS=1 (default) adds one more pass: the same runs again, with
# `perf stat -e raw_syscalls:sys_enter,...` on the server process (every
# thread) or the floor's receiver thread for $WINDOW seconds of the hold;
# heartbeats in that window from the server's stats lines (the floor: its
# own count). Kept out of the CPU rounds, since counting syscalls costs CPU.
# Writes results/<UTC time>-udp/: one client results directory per run,
# runs.tsv, floor.txt, syscalls.tsv and summary.md. A few minutes a round.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
# A port free for TCP and UDP, fresh for each run (another sitting's
# server may hold a fixed one; io_uring's teardown may hold the last one).
free_port() {
  python3 -c '
import socket
while True:
    t = socket.socket(); t.bind(("127.0.0.1", 0)); p = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", p)); print(p); break
    except OSError:
        pass
'
}
secs_of() { python3 -c "import sys; s='$1'; print(float(s[:-2])/1000 if s.endswith('ms') else float(s.rstrip('s')))"; }
# The kernel's UDP counters (InDatagrams RcvbufErrors) so far.
udp_snmp() { awk '/^Udp:/ { n++; if (n == 2) print $2, $6 }' /proc/net/snmp; }
HB=${HB:-1s}
hb_s=$(secs_of "$HB")
HOLD=${HOLD:-$(python3 -c "print(f'{max(20, 3 * $hb_s):g}s')")}
hold_s=$(secs_of "$HOLD")
ROUNDS=${ROUNDS:-1}
DEVICES=${DEVICES:-15000}
SYSCALLS=${SYSCALLS:-1}
BASE_SERVER=${BASE_SERVER:-}
FLOOR=${FLOOR:-1}
MODES="ping udp"
if [ -n "$BASE_SERVER" ]; then
  [ -x "$BASE_SERVER" ] || { echo "udp-heartbeat: BASE_SERVER ('$BASE_SERVER') is not an executable server" >&2; exit 2; }
  MODES="ping udp ping-base udp-base"
fi
WINDOW=${WINDOW:-10}
SKIP=4   # seconds from the client's start to well inside the hold
[ "$(python3 -c "print(int($hold_s >= $SKIP + $WINDOW + 2))")" = 1 ] || { echo "udp-heartbeat: HOLD ($HOLD) must be at least $((SKIP + WINDOW + 2))s" >&2; exit 1; }
rate=$(python3 -c "print(int($DEVICES / $hb_s))")
cargo build --release --quiet --bin server --bin client --example udp_floor
out=$(new_results "udp" "${BASE_SERVER:+BASE_SERVER=$BASE_SERVER }FLOOR=$FLOOR HB=$HB HOLD=$HOLD ROUNDS=$ROUNDS DEVICES=$DEVICES SYSCALLS=$SYSCALLS WINDOW=$WINDOW bash $0 $*")
printf 'round\tio\theartbeat\theartbeats\tserver_cpu_per_heartbeat_us\tfalse_expiries\tudp_rcvbuf_errors\n' > "$out/runs.tsv"
: > "$out/floor.txt"
bg=()
trap 'for p in "${bg[@]}"; do kill -TERM "$p" 2>/dev/null || true; done' EXIT

# client_run DIR IO MODE [client flags...]: one client run against a server
# it spawns (mode ping, udp, or floor: udp heartbeats sent elsewhere).
client_cmd() {
  local run=$1 io=$2 mode=$3; shift 3
  local sflags="--timeout 30s --tick 100ms --cores 0-1 --io $io"
  local cflags=()
  case $mode in *-base) cflags=(--server-bin "$BASE_SERVER"); mode=${mode%-base} ;; esac
  if [ "$mode" != ping ]; then
    sflags="$sflags --udp-heartbeat"
    cflags+=(--udp-heartbeat)
  fi
  local port; port=$(free_port)
  echo timeout 300 ./target/release/client --out "$run" --spawn-server --server "127.0.0.1:$port" \
    --server-flags "'$sflags'" --conns "$DEVICES" --ips 127.0.0.2-127.0.0.11 \
    --heartbeat "$HB" --hold "$HOLD" --io epoll --quiet "${cflags[@]}" "$@"
}
summary_row() { # summary.json round io mode rcvbuf_errors
  python3 - "$@" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
def find(d, key):
    if isinstance(d, dict):
        for k, v in d.items():
            if k == key:
                return v
            f = find(v, key)
            if f is not None:
                return f
    return None
print("\t".join([sys.argv[2], sys.argv[3], sys.argv[4], str(find(s, "heartbeats")),
                 str(find(s, "server_cpu_per_heartbeat_us")), str(find(s, "false_expiries")), sys.argv[5]]))
PY
}
floor_run() { # DIR EXTRA_SECONDS_LOG: the client-fed floor; prints the floor's line
  local run=$1 fport; fport=$(free_port)
  ./target/release/examples/udp_floor --listen "127.0.0.1:$fport" "$SKIP" "$((${hold_s%.*} - SKIP - 1))" 0 > "$run.floor" &
  local f=$!; bg+=("$f")
  eval "$(client_cmd "$run" epoll floor --udp-to "127.0.0.1:$fport")" > "$run.log" 2>&1 || true
  wait "$f"
  sed 's/^udp_floor /udp_floor fed=client /' "$run.floor"
  rm -f "$run.floor"
}

for r in $(seq "$ROUNDS"); do
  for io in epoll uring; do
    for mode in $MODES; do
      run="$out/$io-$mode-$r"
      s0=$(udp_snmp)
      eval "$(client_cmd "$run" "$io" "$mode")" > "$run.log" 2>&1 || true
      s1=$(udp_snmp)
      errs=$(( ${s1#* } - ${s0#* } ))
      summary_row "$run/summary.json" "$r" "$io" "$mode" "$errs" >> "$out/runs.tsv"
      tail -1 "$out/runs.tsv"
      grep -q "cannot listen" "$run/server.log" 2>/dev/null && { echo "the spawned server did not start: $run/server.log" >&2; exit 1; }
    done
  done
  [ "$FLOOR" = 1 ] || continue
  floor_run "$out/floor-$r" | tee -a "$out/floor.txt"
  ./target/release/examples/udp_floor "$rate" 10 0 1 | sed 's/^udp_floor /udp_floor fed=paced /' | tee -a "$out/floor.txt"
done

if [ "$SYSCALLS" = 1 ]; then
  set +e  # a failed count must not lose the CPU rounds' summary
  command -v perf >/dev/null || { echo "udp-heartbeat: perf is not installed (SYSCALLS=0 skips the count)" >&2; exit 1; }
  events=raw_syscalls:sys_enter,syscalls:sys_enter_recvmmsg,syscalls:sys_enter_recvfrom,syscalls:sys_enter_recvmsg,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_write,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_io_uring_enter
  printf 'what\theartbeats_per_s\tsyscalls_per_s\tsyscalls_per_heartbeat\trecvmmsg\trecv\tsend\twait\n' > "$out/syscalls.tsv"
  # stats_total LOG: "t heartbeats" from the server's last stats line
  # (frames + udp_heartbeats so far).
  descendant() { # PID NAME: the processes named NAME below PID
    local k
    for k in $(pgrep -P "$1" || true); do
      [ "$(cat /proc/"$k"/comm 2>/dev/null)" = "$2" ] && echo "$k"
      descendant "$k" "$2"
    done
  }
  stats_total() {
    tail -n 3 "$1" | grep '^t=' | tail -1 | python3 -c '
import re, sys
l = sys.stdin.read()
g = lambda k: int((re.search(r" " + k + r"=(\d+)", l.split("|")[1]) or [0, 0])[1])
print(re.match(r"t=([\d.]+)", l).group(1), g("frames") + g("udp_heartbeats"))'
  }
  perf_row() { # WHAT PERF_FILE BEATS_PER_S
    python3 - "$@" "$WINDOW" <<'PY'
import sys
what, f, rate, w = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
c = {}
for line in open(f):
    p = line.strip().split(",")
    # plain: count,,event,...  per thread: thread,count,,event,...
    if len(p) > 3 and not p[0].replace("<", "").isdigit() and p[1].isdigit():
        p = p[1:]
    if len(p) > 2 and "sys_enter" in p[2] and p[0].isdigit():
        c[p[2]] = c.get(p[2], 0) + int(p[0])
hb = rate * w
per = lambda *ks: sum(c.get(k, 0) for k in ks) / hb
s = lambda k: "syscalls:sys_enter_" + k
print("\t".join([what, f"{rate:.0f}", f"{c.get('raw_syscalls:sys_enter', 0) / w:.0f}",
                 f"{per('raw_syscalls:sys_enter'):.3f}", f"{per(s('recvmmsg')):.3f}",
                 f"{per(s('recvfrom'), s('recvmsg')):.3f}", f"{per(s('sendto'), s('sendmsg'), s('write')):.3f}",
                 f"{per(s('epoll_wait'), s('epoll_pwait'), s('io_uring_enter')):.3f}"]))
PY
  }
  for io in epoll uring; do
    for mode in ping udp; do
      run="$out/syscalls-$io-$mode"
      eval "$(client_cmd "$run" "$io" "$mode")" > "$run.log" 2>&1 &
      c=$!; bg+=("$c")
      sleep "$SKIP"
      spid=$(descendant "$c" server | head -1)
      [ -n "$spid" ] || { echo "udp-heartbeat: no spawned server found for $run" >&2; wait "$c" || true; continue; }
      a=$(stats_total "$run/server.log")
      perf stat -e "$events" -x, -o "$run.perf" -p "$spid" -- sleep "$WINDOW" > /dev/null 2>&1
      b=$(stats_total "$run/server.log")
      wait "$c" || true
      beats=$(python3 -c "a='$a'.split(); b='$b'.split(); print((int(b[1]) - int(a[1])) / (float(b[0]) - float(a[0])))")
      perf_row "server-$io-$mode" "$run.perf" "$beats" | tee -a "$out/syscalls.tsv"
    done
  done
  run="$out/syscalls-floor"
  fport=$(free_port)
  ./target/release/examples/udp_floor --listen "127.0.0.1:$fport" "$SKIP" "$WINDOW" 0 > "$run.floor" &
  f=$!; bg+=("$f")
  eval "$(client_cmd "$run" epoll floor --udp-to "127.0.0.1:$fport")" > "$run.log" 2>&1 &
  c=$!; bg+=("$c")
  sleep "$SKIP"
  rx=$(ls /proc/"$f"/task | while read -r t; do [ "$(cat /proc/"$f"/task/"$t"/comm)" = floor-rx ] && echo "$t"; done)
  perf stat -e "$events" -x, -o "$run.perf" -t "$rx" -- sleep "$WINDOW" > /dev/null 2>&1
  wait "$f"; wait "$c" || true
  sed 's/^udp_floor /udp_floor fed=client perf-window /' "$run.floor" | tee -a "$out/floor.txt"
  got=$(sed -n 's/.* received=\([0-9]*\) .*/\1/p' "$run.floor")
  perf_row "floor (bare receiver)" "$run.perf" "$(python3 -c "print($got / $WINDOW)")" | tee -a "$out/syscalls.tsv"
  rm -f "$run.floor"
  set -e
fi

python3 - "$out" "$HB" "$HOLD" "$DEVICES" <<'PY'
import csv, os, statistics, sys, re
out, hb, hold, devices = sys.argv[1:5]
rows = list(csv.DictReader(open(f"{out}/runs.tsv"), delimiter="\t"))
fl = open(f"{out}/floor.txt").read().splitlines()
pick = lambda fed: [float(re.search(r"rx_cpu_us_per_datagram=([0-9.]+)", l).group(1))
                    for l in fl if f"fed={fed} " in l and "perf-window" not in l]
fc, fp = pick("client"), pick("paced")
med = statistics.median
lines = [f"{devices} devices, heartbeat every {hb}, hold {hold}, {len(set(r['round'] for r in rows))} round(s); "
         "server CPU per heartbeat over the hold (us), medians, per-round values in brackets.", "",
         "| backend | WebSocket ping | UDP | ping / UDP | UDP / floor (client-fed) | UDP / floor (paced) |",
         "|---|---|---|---|---|---|"]
for io in ("epoll", "uring"):
    v = lambda m: [float(r["server_cpu_per_heartbeat_us"]) for r in rows if r["io"] == io and r["heartbeat"] == m]
    p, u = v("ping"), v("udp")
    if not p or not u:
        continue
    fmt = lambda xs: f"{med(xs):.2f} [{', '.join(f'{x:.2f}' for x in xs)}]"
    lines.append(f"| {io} | {fmt(p)} | {fmt(u)} | {med(p)/med(u):.1f}x | "
                 f"{med(u)/med(fc):.2f}x | {med(u)/med(fp):.2f}x |" if fc and fp else f"| {io} | {fmt(p)} | {fmt(u)} | {med(p)/med(u):.1f}x | - | - |")
if fc:
    lines.append(f"\nFloor fed by the same client (bare epoll + recvmmsg receiver on CPU 0, over the hold): "
                 f"{med(fc):.2f} us per datagram (median of {len(fc)}: {', '.join(f'{x:.2f}' for x in fc)}).")
if fp:
    lines.append(f"Floor fed by a paced sender at the same rate: {med(fp):.2f} us per datagram "
                 f"(median of {len(fp)}: {', '.join(f'{x:.2f}' for x in fp)}).")
base = [(io, m) for io in ("epoll", "uring") for m in ("ping", "udp")
        if any(r["io"] == io and r["heartbeat"] == m + "-base" for r in rows)]
if base:
    lines += ["", "Against BASE_SERVER in the same rounds (server CPU per heartbeat, us, medians):", "",
              "| backend | heartbeat | this build | base | this / base |", "|---|---|---|---|---|"]
    for io, m in base:
        v = lambda m: [float(r["server_cpu_per_heartbeat_us"]) for r in rows if r["io"] == io and r["heartbeat"] == m]
        t, b = v(m), v(m + "-base")
        if t and b:
            lines.append(f"| {io} | {m} | {med(t):.2f} [{', '.join(f'{x:.2f}' for x in t)}] | "
                         f"{med(b):.2f} [{', '.join(f'{x:.2f}' for x in b)}] | {med(t)/med(b):.2f}x |")
errs = [int(r["udp_rcvbuf_errors"]) for r in rows if r["heartbeat"].startswith("udp")]
lines.append(f"UDP receive-buffer drops (kernel RcvbufErrors) during the UDP runs: {errs}; false expiries: "
             f"{sorted(set(r['false_expiries'] for r in rows))}.")
if os.path.exists(f"{out}/syscalls.tsv"):
    srows = list(csv.DictReader(open(f"{out}/syscalls.tsv"), delimiter="\t"))
    lines += ["", "System calls per heartbeat (perf stat, raw_syscalls:sys_enter and by kind, over 10 s of the hold;",
              "the server: every thread; the floor: its receiver thread):", "",
              "| what | heartbeats/s | syscalls/s | per heartbeat | recvmmsg | recv | send | wait |", "|---|---|---|---|---|---|---|---|"]
    for r in srows:
        lines.append("| " + " | ".join(r[k] for k in ("what", "heartbeats_per_s", "syscalls_per_s", "syscalls_per_heartbeat", "recvmmsg", "recv", "send", "wait")) + " |")
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "results: $out"
