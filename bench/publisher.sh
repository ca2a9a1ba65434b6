#!/usr/bin/env bash
# The NATS publisher's own CPU, by phase: CONNS devices connect, hold HOLD
# (none silent, so no events), then the client closes them all (CONNS
# disconnect events). One server (2 shards) with --nats to a JetStream
# nats-server; perf samples the server at 4 kHz for its whole life, and
# the publisher thread's samples are counted in three windows, by time
# from the first sample of a shard:
#   connects: [0, 2 s); idle: [3 s, HOLD - 1 s), per second;
#   disconnects: from HOLD s to the end (the ramp takes under 1 s).
# Each IMPL runs ROUNDS times, interleaved: `new` is this tree's server,
# `base` is BASE_SERVER (an older build, to compare).
#
# Usage: bench/publisher.sh                      (about 1 minute)
#        BASE_SERVER=/tmp/server-old IMPLS="new base" ROUNDS=2 bash bench/publisher.sh
# Writes: results/<UTC time>-publisher/{summary.md,<impl>-<round>/,nats.log,command.txt}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-15000}
HOLD=${HOLD:-10}
IMPLS=${IMPLS:-new}
BASE_SERVER=${BASE_SERVER:-}
NPORT=${NPORT:-14310}
PORT=${PORT:-9440}
NATS_BIN=$(command -v nats-server || echo /usr/sbin/nats-server)
[ -x "$NATS_BIN" ] || { echo "publisher: nats-server is not installed: apt-get install -y nats-server" >&2; exit 1; }
command -v perf >/dev/null || { echo "publisher: perf is not installed" >&2; exit 1; }
case " $IMPLS " in
  *" base "*) [ -x "$BASE_SERVER" ] || { echo "publisher: IMPLS has base but BASE_SERVER ('$BASE_SERVER') is not an executable server" >&2; exit 2; } ;;
esac
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --bin server --bin client
out=$(new_results publisher "ROUNDS=$ROUNDS CONNS=$CONNS HOLD=$HOLD IMPLS='$IMPLS'${BASE_SERVER:+ BASE_SERVER=$BASE_SERVER} bash bench/publisher.sh")
store=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$store"
}
trap cleanup EXIT
start_nats "$NATS_BIN" "$NPORT" "$store" "$out/nats.log"
pids+=($!)

for round in $(seq "$ROUNDS"); do
  for impl in $IMPLS; do
    bin=./target/release/server
    [ "$impl" = base ] && bin=$BASE_SERVER
    dir="$out/$impl-$round"
    timeout 120 ./target/release/client --out "$dir" --spawn-server --server-bin "$bin" \
      --server 127.0.0.1:$PORT --server-flags "--cores 0-1 --nats nats://127.0.0.1:$NPORT" \
      --conns "$CONNS" --ips 127.0.0.2-127.0.0.11 --heartbeat 5s --hold "${HOLD}s" --quiet \
      > "$out/$impl-$round.stdout" 2>&1 &
    client=$!
    spid=""
    for _ in $(seq 200); do
      spid=$(pgrep -nf -- "--listen 127.0.0.1:$PORT" || true)
      [ -n "$spid" ] && break
      sleep 0.05
    done
    [ -n "$spid" ] || { echo "publisher: $impl round $round: the spawned server was not found" >&2; exit 1; }
    perf record -F 4000 -p "$spid" -o "$dir.perf" > /dev/null 2>&1 &
    perfpid=$!
    wait "$client" || echo "publisher: $impl round $round: the client exited $?" >&2
    sleep 0.5
    kill -INT "$perfpid" 2>/dev/null || true
    wait "$perfpid" 2>/dev/null || true
    perf script -i "$dir.perf" -F comm,time 2>/dev/null | tr -d ':' > "$dir.samples"
    rm -f "$dir.perf"
    gzip -f "$dir.samples"
    sleep 1
  done
done

python3 - "$out" "$ROUNDS" "$IMPLS" "$CONNS" "$HOLD" <<'PY' | tee "$out/summary.md"
import gzip, statistics, sys
out, rounds, impls, conns, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), int(sys.argv[4]), float(sys.argv[5])
MS = 1000 / 4000  # ms per sample at 4 kHz
print(f"## The publisher's CPU by phase ({conns:,} devices, hold {hold:.0f} s, perf at 4 kHz)\n")
print("| impl | round | connects: publisher ms | us per connect | idle: publisher ms per s | disconnects: publisher ms | us per disconnect | shards ms (whole run) |")
print("|---|---|---|---|---|---|---|---|")
per = {i: {"c": [], "i": [], "d": []} for i in impls}
for r in range(1, rounds + 1):
    for impl in impls:
        rows = [l.split() for l in gzip.open(f"{out}/{impl}-{r}.samples.gz", "rt") if l.strip()]
        rows = [(c, float(t)) for c, t in rows]
        shard_t = [t for c, t in rows if c.startswith("shard")]
        if not shard_t:
            print(f"| {impl} | {r} | no samples | | | | | |")
            continue
        t0 = min(shard_t)
        pub = [t - t0 for c, t in rows if c == "nats"]
        c_ms = sum(1 for t in pub if 0 <= t < 2) * MS
        i_ms = sum(1 for t in pub if 3 <= t < hold - 1) * MS / max(hold - 4, 1)
        d_ms = sum(1 for t in pub if t >= hold) * MS
        per[impl]["c"].append(c_ms * 1000 / conns)
        per[impl]["i"].append(i_ms)
        per[impl]["d"].append(d_ms * 1000 / conns)
        print(f"| {impl} | {r} | {c_ms:.1f} | {c_ms * 1000 / conns:.2f} | {i_ms:.2f} | {d_ms:.1f} | {d_ms * 1000 / conns:.2f} | {len(shard_t) * MS:.0f} |")
print("\nMedians: " + "; ".join(
    f"{i}: {statistics.median(p['c']):.2f} us per connect, {statistics.median(p['i']):.2f} ms/s idle, {statistics.median(p['d']):.2f} us per disconnect"
    for i, p in per.items() if p["c"]))
PY
echo "publisher: wrote $out" >&2
