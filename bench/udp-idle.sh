#!/usr/bin/env bash
# The server's fixed cost under bench/udp-heartbeat.sh's settings: the same
# 15,000 devices and server flags (--timeout 30s --tick 100ms --cores 0-1
# --udp-heartbeat), but no heartbeat at all during the hold (every 3600 s).
# Its CPU over the hold (the client's timeline, seconds 4 to the end of the
# hold) is what every heartbeat figure there carries on top of the
# heartbeats: divide it by the heartbeat rate. Both backends, ~35 s each.
# Writes results/<UTC time>-udp-idle/: a client results directory per
# backend, summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DEVICES=${DEVICES:-15000}
HOLD=${HOLD:-30}
cargo build --release --quiet --bin server --bin client
out=$(new_results "udp-idle" "DEVICES=$DEVICES HOLD=$HOLD bash $0 $*")
for io in epoll uring; do
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  timeout 300 ./target/release/client --out "$out/$io" --spawn-server --server "127.0.0.1:$port" \
    --server-flags "--timeout 30s --tick 100ms --cores 0-1 --io $io --udp-heartbeat" --conns "$DEVICES" \
    --ips 127.0.0.2-127.0.0.11 --heartbeat 3600s --hold "${HOLD}s" --io epoll --quiet --udp-heartbeat \
    > "$out/$io.log" 2>&1 || true
done
python3 - "$out" "$HOLD" <<'PY' | tee "$out/summary.md"
import csv, sys
out, hold = sys.argv[1], float(sys.argv[2])
print("Server CPU with 15,000 idle devices (no heartbeats), --tick 100ms, 2 shards, UDP on:\n")
print("| backend | server CPU (ms per s) | per heartbeat at 15,000/s | at 1,500/s |\n|---|---|---|---|")
for io in ("epoll", "uring"):
    rows = [r for r in csv.DictReader(open(f"{out}/{io}/timeline.csv")) if 4 <= float(r["t_s"]) <= hold]
    ms = sum(float(r["server_cpu_pct"]) for r in rows) / len(rows) * 10  # % of a CPU -> ms per s
    print(f"| {io} | {ms:.2f} | {ms * 1000 / 15000:.2f} us | {ms * 1000 / 1500:.2f} us |")
PY
echo "results: $out"
