#!/usr/bin/env bash
# Expiry at (this machine's) scale: 15,000 devices connect and all go silent;
# the server (timeout 5 s, tick 100 ms) deletes them in one wave while new
# devices connect. Measures: expiry lag (deleted after last frame, minus the
# timeout) p50/p99/max as the devices see it, early deletions (must be 0),
# the deletion rate from the server's 100 ms stats lines, and connect
# latency of 3,000 new devices during the wave against the same with no wave.
# The wave runs once per backend in IOS (default "uring epoll"), one after
# the other in the same run, each in its own subdirectory. The devices are
# the client's (target/release/client); bench/client_json.py turns each of
# its runs into the JSON files below.
# Usage: bench/expiry.sh   (about 30 s per backend; CONNS and IOS override)
# Writes: results/<UTC time>-expiry/{summary.md,<io>/{summary.md,fleet.json,connect-*.json,server-stats.txt,client.err},command.txt}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-15000}
IOS=${IOS:-"uring epoll"}
PORT=${PORT:-9406}
cargo build --release --quiet --bin server --bin client
top=$(new_results expiry "CONNS=$CONNS IOS='$IOS' bench/expiry.sh")
# The client's own results directories (histograms, plots): read, then dropped.
raw=$(mktemp -d /tmp/expiry-client.XXXXXX)
trap 'rm -rf "$raw"' EXIT
: > "$top/summary.md"
for io in $IOS; do
out=$top/$io
mkdir -p "$out"
./target/release/server --io "$io" --listen 127.0.0.1:$PORT --timeout 5s --tick 100ms --stats-interval 100ms \
  > "$out/server-stats.txt" 2> "$out/server.err" &
server=$!
trap 'kill -9 $server 2>/dev/null || true; rm -rf "$raw"' EXIT
wait_port $PORT
sleep 1

probe() { # NAME: 3,000 connects at a gentle pace (4 in flight, one core), then close
  timeout 60 ./target/release/client --server 127.0.0.1:$PORT --conns 3000 --concurrency 4 \
    --cores 0 --hold 0s --ips 127.0.0.31-127.0.0.40 --quiet --out "$raw/$io-$1" >/dev/null 2>>"$out/client.err" || true
  python3 bench/client_json.py "$raw/$io-$1" > "$out/$1.json"
}
probe connect-quiet
sleep 1

# The silent fleet, as fast as 2 cores with 512 upgrades in flight each allow.
# (Exit status 2 would be false, early or missed expiries: in the summary.)
timeout 120 ./target/release/client --server 127.0.0.1:$PORT --conns "$CONNS" --silent 1 --concurrency 512 \
  --hold 10s --server-timeout 5s --ips 127.0.0.2-127.0.0.21 --server-pid $server --quiet --out "$raw/$io-fleet" \
  >/dev/null 2>>"$out/client.err" &
fleet=$!
# The fleet opens over about a second; each device is deleted 5.0-5.1 s after
# it opened. Probe while the wave runs.
sleep 5.2
probe connect-during-expiry
wait $fleet || true
python3 bench/client_json.py "$raw/$io-fleet" > "$out/fleet.json"
kill -TERM $server; wait $server || true
trap 'rm -rf "$raw"' EXIT

python3 - "$out" <<'PY' > "$out/summary.md"
import json, sys, re
out = sys.argv[1]
fleet = json.load(open(f"{out}/fleet.json"))
quiet = json.load(open(f"{out}/connect-quiet.json"))
wave = json.load(open(f"{out}/connect-during-expiry.json"))
rows = []
for line in open(f"{out}/server-stats.txt"):
    m = re.match(r"t=([\d.]+) .* expired/s=(\d+) ", line)
    if m:
        rows.append((float(m.group(1)), int(m.group(2))))
active = [(t, r) for t, r in rows if r > 0]
total = int(re.search(r"expired=(\d+)", open(f"{out}/server-stats.txt").read().split("final")[-1]).group(1))
span = (active[-1][0] - active[0][0] + 0.1) if active else 0
print(f"# Expiry wave ({out.rsplit('/', 1)[-1]}): {fleet['established']} silent devices, server --timeout 5s --tick 100ms\n")
print("| figure | value |\n|---|---|")
print(f"| devices deleted (server) | {total} |")
print(f"| deleted before the timeout (devices' view) | {fleet['expired_early']} |")
print(f"| expiry lag p50 / p99 / max (after 5 s of silence) | {fleet['expiry_lag_p50_ms']:.0f} / {fleet['expiry_lag_p99_ms']:.0f} / {fleet['expiry_lag_max_ms']:.0f} ms |")
print(f"| wave: first to last 100 ms window with deletions | {span:.1f} s |")
print(f"| deletion rate, peak 100 ms window | {max((r for _, r in rows), default=0):,} /s |")
print(f"| connect p50 / p99, 3,000 new devices, quiet | {quiet['connect_p50_us']/1000:.2f} / {quiet['connect_p99_us']/1000:.2f} ms |")
print(f"| connect p50 / p99, 3,000 new devices, during the wave | {wave['connect_p50_us']/1000:.2f} / {wave['connect_p99_us']/1000:.2f} ms |")
print(f"| connect failures quiet / during | {quiet['failed']} / {wave['failed']} |")
fin = open(f"{out}/server-stats.txt").read().split("final")[-1]
for key, what in (("cancels", "cancel SQEs submitted (io_uring; 0 by design)"), ("cq_overflows", "waits that found the CQ overflowed")):
    m = re.search(key + r"=(\d+)", fin)
    print(f"| {what} | {m.group(1) if m else 'n/a'} |")
print("\nThe deletion rate here is bounded by how fast the fleet connected (its devices")
print("fall silent in the order they opened), not by the server: see the wave span.\n")
PY
cat "$out/summary.md" >> "$top/summary.md"
sleep 2
done
echo "bench: wrote $top" >&2
