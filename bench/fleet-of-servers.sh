#!/usr/bin/env bash
# Past one server (issue 12's benchmark): a nats-server (with JetStream for
# presence) and c1m servers on loopback, `c1m watch-events` counting the
# lifecycle events.
#
# 1. One server, NATS off against on (and `down`: --nats to a port where
#    no broker listens, with --nats-queue 4096, so events are dropped),
#    interleaved ROUNDS times: CONNS devices, 10% silent (expired by the
#    server), the client's conn/s and the server's CPU per connection and
#    per heartbeat; with NATS on, the consumer's counts against the
#    server's (every connect, every expiry).
# 2. A fleet of two servers (--cores 0 and --cores 1, ports P1 and P2), the
#    client spread over both: PUSHES pushes to random connected devices
#    through NATS (`c1m push --wait`: delivered count, latency), then
#    the whole fleet falls silent at once (--go-silent) and both servers
#    delete it: the consumer's lag from each deletion to its event.
#
# Usage: bench/fleet-of-servers.sh  (about 5 minutes; ROUNDS (2), CONNS
#        (15000), HOLD (20s), PUSHES (10000), VARIANTS ("off on"; "off on
#        down" adds the broker-down case), FLEET (1; 0 skips part 2),
#        SILENT (0.1: the silent fraction in part 1), FLEET_FLAGS (more
#        flags for part 2's servers, e.g. --nats-exclusive); ROUNDS=0 runs
#        part 2 only)
# Writes: results/<UTC time>-fleet-of-servers/{summary.md,off-N/,on-N/,
#         on-N.events,<variant>-N.threads (CPU by thread, sampled),
#         <variant>-N.others (the broker's and the consumer's CPU),fleet/{client/,server-a.log,server-b.log,events.jsonl.gz,
#         push.txt},nats.log,command.txt}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-15000}
HOLD=${HOLD:-20s}
PUSHES=${PUSHES:-10000}
VARIANTS=${VARIANTS:-off on}
SILENT=${SILENT:-0.1}
FLEET=${FLEET:-1}
FLEET_FLAGS=${FLEET_FLAGS:-}
NPORT=${NPORT:-14300}
P1=${P1:-9420}
P2=${P2:-9421}
NATS_BIN=$(command -v nats-server || echo /usr/sbin/nats-server)
if [ ! -x "$NATS_BIN" ]; then
  echo "fleet-of-servers: nats-server is not installed: apt-get install -y nats-server" >&2
  exit 1
fi
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --bin server --bin client --bin c1m
out=$(new_results fleet-of-servers "ROUNDS=$ROUNDS CONNS=$CONNS HOLD=$HOLD PUSHES=$PUSHES VARIANTS=\"$VARIANTS\" FLEET=$FLEET${FLEET_FLAGS:+ FLEET_FLAGS=\"$FLEET_FLAGS\"} SILENT=$SILENT bash bench/fleet-of-servers.sh")
URL="nats://127.0.0.1:$NPORT"
store=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$store"
}
trap cleanup EXIT

start_nats "$NATS_BIN" "$NPORT" "$store" "$out/nats.log"
broker=$!
pids+=($broker)

# 1. NATS off against on, one server (2 shards), interleaved.
for round in $(seq "$ROUNDS"); do
  for variant in $VARIANTS; do
    nflags=""
    watcher=""
    if [ $variant = down ]; then
      # Nothing listens on NPORT+1: the broker is away the whole run.
      nflags="--nats nats://127.0.0.1:$((NPORT + 1)) --nats-queue 4096"
    fi
    if [ $variant = on ]; then
      nflags="--nats $URL"
      timeout 300 ./target/release/c1m watch-events --nats "$URL" --every 1s --duration 280s \
        > "$out/on-$round.events" 2>&1 &
      watcher=$!
      pids+=($watcher)
      sleep 0.5
    fi
    sample_threads "release/server --listen 127.0.0.1:$P1" "$out/$variant-$round.threads" &
    sampler=$!
    broker_before=$(proc_ticks "$broker")
    timeout 300 ./target/release/client --out "$out/$variant-$round" --spawn-server \
      --server 127.0.0.1:$P1 --server-flags "--timeout 10s --tick 100ms --cores 0-1 $nflags" \
      --conns "$CONNS" --ips 127.0.0.2-127.0.0.11 --heartbeat 5s --silent "$SILENT" \
      --hold "$HOLD" --quiet > "$out/$variant-$round.stdout" 2>&1 \
      || echo "fleet-of-servers: $variant round $round exited $?" >&2
    wait "$sampler" || true
    consumer=0
    if [ -n "$watcher" ]; then
      sleep 2
      # (`timeout` runs the consumer as its child.)
      consumer=$(proc_ticks "$(pgrep -P "$watcher" | head -1)")
      kill "$watcher" 2>/dev/null || true
      wait "$watcher" 2>/dev/null || true
    fi
    # The other processes on the same 2 cores during the run (ms).
    echo "broker_ms=$(( ($(proc_ticks "$broker") - broker_before) * 10 )) consumer_ms=$((consumer * 10))" \
      > "$out/$variant-$round.others"
    sleep 2
  done
done

# 2. Two servers on one NATS; pushes, then an expiry wave of the whole fleet.
if [ "$FLEET" = 1 ]; then
mkdir -p "$out/fleet"
timeout 300 ./target/release/c1m watch-events --nats "$URL" --every 1s --duration 280s --print \
  > "$out/fleet/events.jsonl" 2> "$out/fleet/watch.stderr" &
watcher=$!
pids+=($watcher)
sleep 0.5
for s in a b; do
  if [ $s = a ]; then port=$P1 cpu=0; else port=$P2 cpu=1; fi
  timeout 300 ./target/release/server --listen 127.0.0.1:$port --cores $cpu --timeout 5s --tick 100ms \
    --nats "$URL" --server-id "fleet-$s" --stats-interval 1s $FLEET_FLAGS > "$out/fleet/server-$s.log" 2>&1 &
  pids+=($!)
  eval "server_$s=$!"
  wait_port $port
  sample_threads "--listen 127.0.0.1:$port" "$out/fleet/server-$s.threads" &
done
timeout 300 ./target/release/client --out "$out/fleet/client" --server "127.0.0.1:$P1,127.0.0.1:$P2" \
  --conns "$CONNS" --ips 127.0.0.2-127.0.0.11 --heartbeat 2s --server-timeout 5s \
  --hold 40s --go-silent --quiet > "$out/fleet/client.stdout" 2>&1 &
client=$!
pids+=($client)
# Every device connected (as the consumer sees it), and presence written.
for _ in $(seq 120); do
  n=$(grep -c '"event":"connected"' "$out/fleet/events.jsonl" || true)
  [ "$n" -ge "$CONNS" ] && break
  sleep 0.5
done
sleep 3
grep '"event":"connected"' "$out/fleet/events.jsonl" \
  | python3 -c 'import sys,json; [print(json.loads(l)["id"]) for l in sys.stdin]' > "$out/fleet/ids.txt"
timeout 120 ./target/release/c1m push --nats "$URL" --ids-file "$out/fleet/ids.txt" \
  --count "$PUSHES" --concurrency 256 --wait --text push > "$out/fleet/push.txt" 2>&1 \
  || echo "fleet-of-servers: push exited $?" >&2
wait "$client" || echo "fleet-of-servers: the fleet's client exited $?" >&2
sleep 3
kill -TERM "$server_a" "$server_b" 2>/dev/null || true
wait "$server_a" "$server_b" 2>/dev/null || true
sleep 1
kill "$watcher" 2>/dev/null || true
wait "$watcher" 2>/dev/null || true
fi

python3 - "$out" "$ROUNDS" "$VARIANTS" <<'PY' | tee "$out/summary.md"
import json, re, statistics, sys
import os
out, rounds, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
if rounds == 0:
    variants = []  # part 2 only
def last_events(path):
    lines = [l for l in open(path) if l.startswith("events ") or l.startswith("final events ")]
    return dict(kv.split("=") for kv in lines[-1].split() if "=" in kv) if lines else {}
def final(log):
    m = [l for l in open(log) if l.startswith("final total")]
    return dict(kv.split("=") for kv in m[-1].split() if "=" in kv) if m else {}
cols = [("conn/s", "conn_per_s_mean"), ("server CPU/conn us", "server_cpu_per_conn_us"),
        ("server CPU/heartbeat us", "server_cpu_per_heartbeat_us"), ("established", "established"),
        ("expired (client)", "expired"), ("false expiries", "false_expiries")]
fig = lambda v, r: json.load(open(f"{out}/{v}-{r}/summary.json"))["figures"]
print(f"## 1. One server, NATS {' / '.join(variants)} ({rounds} interleaved rounds, medians)\n")
print("| NATS | " + " | ".join(c for c, _ in cols) + " | events_dropped (server) |")
print("|---" * (len(cols) + 2) + "|")
med = {}
for v in variants:
    rs = [fig(v, r) for r in range(1, rounds + 1)]
    med[v] = {k: statistics.median(float(x[k]) for x in rs) for _, k in cols}
    drops = [final(f"{out}/{v}-{r}/server.log").get("events_dropped", "0") for r in range(1, rounds + 1)]
    print(f"| {v} | " + " | ".join(f"{med[v][k]:,.1f}" for _, k in cols) + f" | {', '.join(drops)} |")
print("\nPer round (conn/s, CPU/conn us, CPU/heartbeat us):")
for v in variants:
    print(f"- {v}: " + "; ".join(
        f"{fig(v, r)['conn_per_s_mean']:,.0f}, {fig(v, r)['server_cpu_per_conn_us']}, {fig(v, r)['server_cpu_per_heartbeat_us']}" for r in range(1, rounds + 1)))
for v in variants:
    if v != "off" and "off" in med:
        print(f"\nRatios {v}/off: " + ", ".join(
            f"{c} {med[v][k] / med['off'][k]:.3f}" for c, k in cols[:3] if med['off'][k]))
def threads(path):
    top = {}
    try:
        for l in open(path):
            f = l.split()
            if len(f) == 3 and f[2].isdigit():
                top[(f[0], f[1])] = max(top.get((f[0], f[1]), 0), int(f[2]))
    except FileNotFoundError:
        pass
    t = {}
    for (_, name), ticks in top.items():
        group = "shards" if name.startswith("shard") else name
        t[group] = t.get(group, 0) + ticks
    return t
print("\nCPU over each whole run (ramp, hold, the fleet's teardown and its events; 10 ms ticks): the server by thread (sampled every 0.5 s until it exits), and the broker and the consumer on the same cores:")
for v in variants:
    rows = []
    for r in range(1, rounds + 1):
        t = threads(f"{out}/{v}-{r}.threads")
        share = f", publisher/shards {100 * t['nats'] / t['shards']:.1f}%" if t.get("nats") and t.get("shards") else ""
        try:
            others = dict(kv.split("=") for kv in open(f"{out}/{v}-{r}.others").read().split())
        except FileNotFoundError:
            others = {}
        rows.append(f"shards {t.get('shards', 0) * 10} ms, publisher {t.get('nats', 0) * 10} ms{share}, broker {others.get('broker_ms', '?')} ms, consumer {others.get('consumer_ms', '?')} ms")
    print(f"- {v}: " + "; ".join(rows))
if "on" in variants:
  print("\n| round | server upgraded | consumer connected | server expired | consumer expired | events_dropped | consumer disconnected by reason |")
  print("|---|---|---|---|---|---|---|")
for r in range(1, rounds + 1) if "on" in variants else []:
    f = final(f"{out}/on-{r}/server.log")
    e = last_events(f"{out}/on-{r}.events")
    reasons = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("connected", "disconnected", "snapshot", "unreadable") and not k.startswith("lag"))
    print(f"| {r} | {f.get('upgraded')} | {e.get('connected')} | {f.get('expired')} | {e.get('expired', 0)} | {f.get('events_dropped')} | {reasons} |")
if not os.path.isdir(f"{out}/fleet"):
    sys.exit(0)
print("\n## 2. Two servers on one NATS\n")
ev = [json.loads(l) for l in open(f"{out}/fleet/events.jsonl") if l.startswith("{")]
by_server = {}
for x in ev:
    if x.get("event") == "connected":
        by_server[x["server"]] = by_server.get(x["server"], 0) + 1
e = last_events(f"{out}/fleet/events.jsonl")
fa, fb = final(f"{out}/fleet/server-a.log"), final(f"{out}/fleet/server-b.log")
print(f"- connected events by server: {by_server}; servers' upgraded: a={fa.get('upgraded')} b={fb.get('upgraded')}")
print(f"- consumer: connected={e.get('connected')} disconnected={e.get('disconnected')} expired={e.get('expired', 0)}; servers' expired: a={fa.get('expired')} b={fb.get('expired')}; events_dropped: a={fa.get('events_dropped')} b={fb.get('events_dropped')}")
print(f"- deletion to event at the consumer (every disconnect, the wave included): p50 {e.get('lag_ms_p50')} ms, p99 {e.get('lag_ms_p99')} ms, max {e.get('lag_ms_max')} ms")
push = [l.strip() for l in open(f"{out}/fleet/push.txt") if l.startswith("pushes ")]
print(f"- pushes: {push[-1] if push else 'none (see push.txt)'}")
print(f"- pushes delivered by the servers: a={fa.get('pushes_delivered')} b={fb.get('pushes_delivered')}; routed: a={fa.get('pushes_routed')} b={fb.get('pushes_routed')}")
ta, tb = threads(f"{out}/fleet/server-a.threads"), threads(f"{out}/fleet/server-b.threads")
print(f"- CPU by thread over the run: a: shards {ta.get('shards', 0) * 10} ms, publisher {ta.get('nats', 0) * 10} ms; b: shards {tb.get('shards', 0) * 10} ms, publisher {tb.get('nats', 0) * 10} ms")
c = json.load(open(f"{out}/fleet/client/summary.json"))["figures"]
print(f"- the fleet's client: established={c.get('established')} storm: {c.get('storm_deleted', c.get('storm_expired', 'n/a'))} deleted, false expiries {c.get('false_expiries')}")
PY
[ -f "$out/fleet/events.jsonl" ] && gzip "$out/fleet/events.jsonl" "$out/fleet/ids.txt"
echo "fleet-of-servers: wrote $out" >&2
