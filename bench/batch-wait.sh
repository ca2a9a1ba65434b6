#!/usr/bin/env bash
# What a heartbeat costs the server when many worker processes share few
# cores (the 1M shape: 60 workers on 2 cores), and what --io-batch-wait buys
# back. N devices heartbeat every HB seconds against `server --procs P
# --io uring`; over a MEASURE-second window of the hold the script reads
# every server thread's CPU time and context switches (/proc/*/task/*), so
# a figure is per heartbeat: server CPU, user CPU, voluntary and involuntary
# context switches; the client gives the heartbeat RTT it saw (the price).
# Each window of WAITS runs once per round, interleaved, ROUNDS rounds.
# Defaults: P=30, N=30000, HB=2 (15,000 heartbeats a second, 500 per
# worker: each heartbeat is about one wake-up of its worker).
# Bounded: about (N/10000 + HOLD + 10) s per run; every process is stopped
# by its pid.
# Usage: bash bench/batch-wait.sh
# Writes: results/<UTC time>-batch-wait/{summary.md,runs.tsv,command.txt}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
P=${P:-30}
N=${N:-30000}
HB=${HB:-2}
HOLD=${HOLD:-20}
MEASURE=${MEASURE:-10}
WAITS=${WAITS:-"0 2ms 5ms 10ms"}
ROUNDS=${ROUNDS:-2}
PORT=${PORT:-9736}
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --quiet --bin server --bin client
top=$(new_results batch-wait "P=$P N=$N HB=$HB HOLD=$HOLD MEASURE=$MEASURE WAITS='$WAITS' ROUNDS=$ROUNDS bash bench/batch-wait.sh")
{ echo "loadavg at start: $(cat /proc/loadavg)"; nproc; uname -r; } > "$top/machine.txt"

pids=()
cleanup() { for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Sums over every thread of the server and its workers: CPU ticks (user,
# system) and context switches (voluntary, involuntary).
snapshot() {
  local u=0 s=0 v=0 n=0 p t
  for p in "$@"; do
    for t in /proc/"$p"/task/*; do
      [ -r "$t/stat" ] || continue
      read -r uu ss < <(awk '{print $14, $15}' "$t/stat" 2>/dev/null || echo "0 0")
      u=$((u + uu)); s=$((s + ss))
      v=$((v + $(awk '/^voluntary_ctxt/ {print $2}' "$t/status" 2>/dev/null || echo 0)))
      n=$((n + $(awk '/^nonvoluntary_ctxt/ {print $2}' "$t/status" 2>/dev/null || echo 0)))
    done
  done
  echo "$u $s $v $n"
}

printf 'round\twait\tseconds\theartbeats_per_s\tserver_us_per_hb\tuser_us_per_hb\tvol_switches_per_hb\tinvol_switches_per_hb\trtt_p50_ms\trtt_p99_ms\n' > "$top/runs.tsv"
for round in $(seq "$ROUNDS"); do
for w in $WAITS; do
  out=$top/r$round-$w
  mkdir -p "$out"
  ./target/release/server --io uring --listen 127.0.0.1:$PORT --procs "$P" --stats-interval 0 \
    --io-batch-wait "$w" > "$out/server.log" 2>&1 &
  srv=$!; pids+=("$srv")
  wait_port $PORT
  timeout $((N / 10000 + HOLD + 60)) ./target/release/client --server 127.0.0.1:$PORT --ips 127.0.0.2-127.0.0.5 \
    --procs 2 --conns "$N" --rate 10000 --heartbeat "${HB}s" --hold "${HOLD}s" --quiet \
    --out "$out/client" > "$out/client.txt" 2>&1 &
  cli=$!; pids+=("$cli")
  # Into the hold: the fleet is up and every device has beaten once.
  sleep $((N / 10000 + HB + 4))
  procs=("$srv" $(pgrep -P "$srv" | tr '\n' ' '))
  read -r u0 s0 v0 n0 < <(snapshot "${procs[@]}"); t0=$(date +%s.%N)
  sleep "$MEASURE"
  read -r u1 s1 v1 n1 < <(snapshot "${procs[@]}"); t1=$(date +%s.%N)
  wait "$cli" || true
  kill -TERM "$srv"; wait "$srv" || true
  python3 - "$round" "$w" "$t0" "$t1" "$N" "$HB" "$u0" "$s0" "$v0" "$n0" "$u1" "$s1" "$v1" "$n1" "$out/client/summary.json" >> "$top/runs.tsv" <<'PY'
import json, sys
r, w = sys.argv[1], sys.argv[2]
t0, t1, n, hb = map(float, sys.argv[3:7])
u0, s0, v0, n0, u1, s1, v1, n1 = map(int, sys.argv[7:15])
dt = t1 - t0
beats = n / hb * dt
hz = 100.0  # clock ticks per second (USER_HZ)
try:
    f = json.load(open(sys.argv[15]))["figures"]
    p50, p99 = f.get("heartbeat_rtt_p50_ms"), f.get("heartbeat_rtt_p99_ms")
except Exception:
    p50 = p99 = None
cell = lambda x: "-" if x is None else f"{x:.3f}"
print("\t".join([r, w, f"{dt:.2f}", f"{n / hb:.0f}",
                 f"{(u1 - u0 + s1 - s0) / hz * 1e6 / beats:.2f}",
                 f"{(u1 - u0) / hz * 1e6 / beats:.2f}",
                 f"{(v1 - v0) / beats:.3f}", f"{(n1 - n0) / beats:.3f}", cell(p50), cell(p99)]))
PY
  rm -rf "$out/client/"*.v2.hdr "$out/client/worker-"* 2>/dev/null || true
  sleep 1
done
done
trap - EXIT

python3 - "$top" <<'PY' > "$top/summary.md"
import csv, os, statistics, sys
top = sys.argv[1]
rows = list(csv.DictReader(open(os.path.join(top, "runs.tsv")), delimiter="\t"))
cmd = open(os.path.join(top, "command.txt")).read().strip()
print("# Heartbeats under many worker processes: --io-batch-wait\n")
print(f"`{cmd}`\n")
print(open(os.path.join(top, "machine.txt")).read().splitlines()[0], "\n")
print("Medians over rounds; per heartbeat, every server thread summed.\n")
print("| --io-batch-wait | server CPU us/hb | user us/hb | voluntary switches/hb | involuntary/hb | RTT p50 / p99 (ms) | runs |")
print("|---|---|---|---|---|---|---|")
waits = []
for r in rows:
    if r["wait"] not in waits:
        waits.append(r["wait"])
base = None
for w in waits:
    rs = [r for r in rows if r["wait"] == w]
    med = lambda k: statistics.median(float(r[k]) for r in rs)
    medo = lambda k: statistics.median(float(r[k]) for r in rs if r[k] != "-") if any(r[k] != "-" for r in rs) else float("nan")
    cpu = med("server_us_per_hb")
    base = base or cpu
    print(f"| {w} | {cpu:.2f} ({cpu / base:.2f}x) | {med('user_us_per_hb'):.2f} | {med('vol_switches_per_hb'):.3f} | {med('invol_switches_per_hb'):.3f} | {medo('rtt_p50_ms'):.2f} / {medo('rtt_p99_ms'):.2f} | {len(rs)} |")
PY
cat "$top/summary.md"
echo "bench: wrote $top"
