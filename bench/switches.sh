#!/usr/bin/env bash
# Context switches per connection: how often the server's threads sleep
# (voluntary switches) and are preempted (involuntary) while 15,000
# devices connect, summed over its threads from /proc/<pid>/task/*/status
# before and after the client's ramp (no heartbeats). For c1m with each
# shard policy (--sched batch, the default, and --sched normal), both
# backends, and the tuned tokio-tungstenite peer (server/examples/tokio_peer.rs)
# on SCHED_OTHER and on SCHED_BATCH (chrt -b 0).
# ROUNDS rounds, interleaved; medians.
# Bounded: about 10 s per run; every process is stopped by its pid.
# Usage: bash bench/switches.sh   (ROUNDS=3 CONNS=15000)
# Writes: results/<UTC time>-switches/{summary.md,runs.txt,command.txt,git.txt}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-15000}
PORT=${PORT:-9404}
cargo build --release --quiet --bin server --bin client --example tokio_peer
out=$(new_results switches "ROUNDS=$ROUNDS CONNS=$CONNS bash bench/switches.sh")
raw=$(mktemp -d /tmp/switches.XXXXXX)
server=
trap '[ -z "$server" ] || kill -9 "$server" 2>/dev/null || true; rm -rf "$raw"' EXIT
switches() {
  local v=0 n=0 t
  for t in /proc/"$1"/task/*; do
    v=$((v + $(awk '/^voluntary_ctxt/{print $2}' "$t/status")))
    n=$((n + $(awk '/^nonvoluntary_ctxt/{print $2}' "$t/status")))
  done
  echo "$v $n"
}
cases=("uring-batch:--io uring --sched batch" "uring-normal:--io uring --sched normal"
       "epoll-batch:--io epoll --sched batch" "epoll-normal:--io epoll --sched normal" "tokio:" "tokio-batch:")
for round in $(seq "$ROUNDS"); do
  for c in "${cases[@]}"; do
    name=${c%%:*}; flags=${c#*:}
    if [ "$name" = tokio ]; then
      ./target/release/examples/tokio_peer --listen 127.0.0.1:$PORT --lifetime 60s >/dev/null 2>&1 &
    elif [ "$name" = tokio-batch ]; then
      # The same policy for the peer's threads (chrt(1): SCHED_BATCH, priority 0).
      chrt -b 0 ./target/release/examples/tokio_peer --listen 127.0.0.1:$PORT --lifetime 60s >/dev/null 2>&1 &
    else
      # shellcheck disable=SC2086
      ./target/release/server --listen 127.0.0.1:$PORT --cores 0-1 --stats-interval 0 $flags >/dev/null 2>&1 &
    fi
    server=$!
    wait_port $PORT
    sleep 1
    read -r v0 n0 <<< "$(switches $server)"
    timeout 60 ./target/release/client --server 127.0.0.1:$PORT --conns "$CONNS" --hold 1s --heartbeat 60s \
      --concurrency 512 --ips 127.0.0.2-127.0.0.11 --server-pid $server --quiet --out "$raw/run" >/dev/null 2>&1 || true
    read -r v1 n1 <<< "$(switches $server)"
    kill "$server"; wait "$server" 2>/dev/null || true; server=
    python3 - "$raw/run/summary.json" "$name" "$round" "$CONNS" $((v1 - v0)) $((n1 - n0)) >> "$out/runs.txt" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))["figures"]
name, rnd, conns, vol, inv = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
print(json.dumps({"case": name, "round": int(rnd), "established": f["established"],
                  "voluntary_per_conn": vol / conns, "involuntary_per_conn": inv / conns,
                  "server_cpu_per_conn_us": f["server_cpu_per_conn_us"], "conn_per_s": f["conn_per_s_mean"]}))
PY
    rm -rf "$raw/run"
    sleep 1
  done
done
python3 - "$out" <<'PY' > "$out/summary.md"
import json, statistics, sys
out = sys.argv[1]
runs = [json.loads(l) for l in open(f"{out}/runs.txt")]
print("# Context switches per connection\n\n`" + open(f"{out}/command.txt").read().strip() + "`\n")
print("The server's threads, summed, over a ramp of 15,000 devices (no heartbeats): medians of the rounds.\n")
print("| server | sleeps (voluntary) per connection | preempted per connection | server CPU per connection (us) | conn/s |")
print("|---|---|---|---|---|")
for case in dict.fromkeys(r["case"] for r in runs):
    rs = [r for r in runs if r["case"] == case]
    m = lambda k: statistics.median(r[k] for r in rs)
    print(f"| {case} | {m('voluntary_per_conn'):.3f} | {m('involuntary_per_conn'):.3f} | {m('server_cpu_per_conn_us'):.1f} | {m('conn_per_s'):,.0f} |")
print("\n`runs.txt`: every run.")
PY
cat "$out/summary.md"
echo "bench: wrote $out" >&2
