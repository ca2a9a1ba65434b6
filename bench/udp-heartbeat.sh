#!/usr/bin/env bash
# UDP heartbeats (--udp-heartbeat) against WebSocket pings, the same client,
# devices and rate, one sitting, both server backends: 15,000 devices
# heartbeating every $HB (default 1s: 15,000/s), held $HOLD (default 20s),
# on a 2-core server (the client on the same 2 cores, its own fleets on
# epoll). Then the floor: a bare receiver thread (epoll + recvmmsg in
# batches of 64, pinned to CPU 0) fed by a paced sender on CPU 1 at the
# same datagram rate (server/examples/udp_floor.rs).
# Writes results/<UTC time>-udp/: one client results directory per run,
# runs.tsv (server CPU per heartbeat from each run's summary.json),
# floor.txt and summary.md. ROUNDS=n interleaves n rounds. A few minutes.
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
HB=${HB:-1s}
HOLD=${HOLD:-20s}
ROUNDS=${ROUNDS:-1}
DEVICES=${DEVICES:-15000}
cargo build --release --quiet --bin server --bin client --example udp_floor
out=$(new_results "udp" "HB=$HB HOLD=$HOLD ROUNDS=$ROUNDS DEVICES=$DEVICES bash $0 $*")
printf 'round\tio\theartbeat\theartbeats\tserver_cpu_per_heartbeat_us\tfalse_expiries\n' > "$out/runs.tsv"
for r in $(seq "$ROUNDS"); do
  for io in epoll uring; do
    for mode in ping udp; do
      sflags="--timeout 30s --tick 100ms --cores 0-1 --io $io"
      cflags=()
      if [ "$mode" = udp ]; then
        sflags="$sflags --udp-heartbeat"
        cflags=(--udp-heartbeat)
      fi
      run="$out/$io-$mode-$r"
      port=$(free_port)
      timeout 300 ./target/release/client --out "$run" --spawn-server --server "127.0.0.1:$port" \
        --server-flags "$sflags" --conns "$DEVICES" --ips 127.0.0.2-127.0.0.11 \
        --heartbeat "$HB" --hold "$HOLD" --io epoll --quiet "${cflags[@]}" > "$run.log" 2>&1
      python3 - "$run/summary.json" "$r" "$io" "$mode" >> "$out/runs.tsv" <<'PY'
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
                 str(find(s, "server_cpu_per_heartbeat_us")), str(find(s, "false_expiries"))]))
PY
      tail -1 "$out/runs.tsv"
      grep -q "cannot listen" "$run/server.log" 2>/dev/null && { echo "the spawned server did not start: $run/server.log" >&2; exit 1; }
    done
  done
done
rate=$(python3 -c "import sys; d=float('$HB'.rstrip('s')); print(int($DEVICES/d))")
for r in $(seq "$ROUNDS"); do
  ./target/release/examples/udp_floor "$rate" 10 0 1 | tee -a "$out/floor.txt"
done
python3 - "$out" <<'PY'
import csv, statistics, sys, re
out = sys.argv[1]
rows = list(csv.DictReader(open(f"{out}/runs.tsv"), delimiter="\t"))
floor = [float(re.search(r"rx_cpu_us_per_datagram=([0-9.]+)", l).group(1)) for l in open(f"{out}/floor.txt")]
f = statistics.median(floor)
lines = ["| backend | WebSocket ping (us/heartbeat) | UDP (us/heartbeat) | ping / UDP | UDP / bare receiver |", "|---|---|---|---|---|"]
for io in ("epoll", "uring"):
    med = lambda m: statistics.median(float(r["server_cpu_per_heartbeat_us"]) for r in rows if r["io"] == io and r["heartbeat"] == m)
    p, u = med("ping"), med("udp")
    lines.append(f"| {io} | {p:.2f} | {u:.2f} | {p/u:.1f}x | {u/f:.2f}x |")
lines.append(f"\nBare receiver (epoll + recvmmsg, CPU 0): {f:.2f} us per datagram (median of {len(floor)}).")
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "results: $out"
