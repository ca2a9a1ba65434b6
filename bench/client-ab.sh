#!/usr/bin/env bash
# Before and after, interleaved: the client-15k run (15,000 devices, 10
# source addresses, heartbeat 10 s, 10% silent, server --timeout 20s --tick
# 100ms) with an older build's client and server (BASE_DIR/client and
# BASE_DIR/server) and with this tree's, ROUNDS times each, alternating.
# Build the old one aside first, e.g.
#   git worktree add /tmp/old <commit> && (cd /tmp/old && cargo build --release --bin server --bin client)
#   BASE_DIR=/tmp/old/target/release bash bench/client-ab.sh
# Usage: bench/client-ab.sh   (about 1 minute per run; ROUNDS (2), HOLD (20s),
# NEW_DIR (./target/release, built here; another build's directory instead))
# Writes: results/<UTC time>-client-ab/{summary.md,base-N/,new-N/,command.txt}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BASE_DIR=${BASE_DIR:?set BASE_DIR to a directory with an older client and server}
NEW_DIR=${NEW_DIR:-./target/release}  # or another build's client and server
ROUNDS=${ROUNDS:-2}
HOLD=${HOLD:-20s}
PORT=${PORT:-9410}
[ -x "$BASE_DIR/client" ] && [ -x "$BASE_DIR/server" ] || { echo "client-ab: $BASE_DIR has no client and server" >&2; exit 2; }
[ -n "${SKIP_BUILD:-}" ] || [ "$NEW_DIR" != ./target/release ] || cargo build --release --quiet --bin server --bin client
out=$(new_results client-ab "BASE_DIR=$BASE_DIR NEW_DIR=$NEW_DIR ROUNDS=$ROUNDS HOLD=$HOLD bash bench/client-ab.sh")
for round in $(seq "$ROUNDS"); do
  for which in base new; do
    dir=$NEW_DIR
    [ $which = base ] && dir=$BASE_DIR
    timeout 300 "$dir/client" --out "$out/$which-$round" --spawn-server --server-bin "$dir/server" \
      --server 127.0.0.1:$PORT --server-flags "--timeout 20s --tick 100ms --cores 0-1" \
      --conns 15000 --ips 127.0.0.2-127.0.0.11 --heartbeat 10s --silent 0.1 --hold "$HOLD" --quiet \
      > "$out/$which-$round.stdout" 2>&1 || echo "client-ab: $which round $round exited $?" >&2
    sleep 2
  done
done
python3 - "$out" "$ROUNDS" "$HOLD" <<'PY' | tee "$out/summary.md"
import csv, json, re, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
m = re.fullmatch(r"(\d+)s", sys.argv[3])
hold_s = int(m.group(1)) if m else 20
keys = [
    ("conn/s (mean)", "conn_per_s_mean"),
    ("connect p99 ms", "connect_p99_ms"),
    ("heartbeat RTT p50 ms", "heartbeat_rtt_p50_ms"),
    ("heartbeat RTT p99 ms", "heartbeat_rtt_p99_ms"),
    ("client CPU/conn us (its own)", "client_own_cpu_per_conn_us"),
    ("client + server CPU/conn us", "pair_cpu_per_conn_us"),
    ("client CPU/heartbeat us (its own, hold)", "client_own_cpu_per_heartbeat_us"),
    ("client RSS/conn B (its own)", "client_own_rss_per_conn_bytes"),
    ("server CPU/conn us", "server_cpu_per_conn_us"),
    ("server CPU/heartbeat us", "server_cpu_per_heartbeat_us"),
    ("server RSS/conn B", "server_rss_per_conn_bytes"),
    ("false expiries", "false_expiries"),
]
def load(which):
    runs = []
    for r in range(1, rounds + 1):
        s = json.load(open(f"{out}/{which}-{r}/summary.json"))
        s["rows"] = list(csv.DictReader(open(f"{out}/{which}-{r}/timeline.csv")))
        runs.append(s)
    return runs
runs = {w: load(w) for w in ("base", "new")}
# The spawned server is the client's child: builds before the client said
# so (client_cpu_excludes_server) counted its CPU in the client's. The
# client's own and the pair's figures, the same way for every build:
for s in runs["base"] + runs["new"]:
    f = s["figures"]
    try:
        server = f["server_cpu_per_conn_us"] * f["established"] / f["attempted"]
        mine = f["client_cpu_per_conn_us"]
        if not f.get("client_cpu_excludes_server"):
            mine -= server
        f["client_own_cpu_per_conn_us"] = mine
        f["pair_cpu_per_conn_us"] = mine + server
        rss = f["client_rss_per_conn_bytes"]
        if not f.get("client_cpu_excludes_server"):
            rss -= f["server_rss_per_conn_bytes"]
        f["client_own_rss_per_conn_bytes"] = rss
        # The hold from the timeline (whole seconds 3 s after the fleet is
        # up to 1 s before the hold ends): the client's own CPU per heartbeat.
        t0 = f["time_to_fleet_s"]
        hold = [r for r in s["rows"] if t0 + 3 <= float(r["t_s"]) <= t0 + hold_s - 1]
        beats = sum(float(r["heartbeats_per_s"]) for r in hold)
        cpu = sum(float(r["client_cpu_pct"]) for r in hold)
        if not f.get("client_cpu_excludes_server"):
            cpu -= sum(float(r["server_cpu_pct"]) for r in hold)
        f["client_own_cpu_per_heartbeat_us"] = cpu / 100 / beats * 1e6
    except (KeyError, TypeError, ZeroDivisionError, ValueError):
        pass
print(f"Medians of {rounds} interleaved runs each (15,000 devices).\n")
print("| figure | base | new | new / base |\n|---|---|---|---|")
for name, key in keys:
    try:
        b = statistics.median(s["figures"][key] for s in runs["base"])
        n = statistics.median(s["figures"][key] for s in runs["new"])
    except (KeyError, TypeError) as e:
        print(f"| {name} | n/a | n/a | ({e}) |")
        continue
    print(f"| {name} | {b:.3g} | {n:.3g} | {n / b:.2f} |" if b else f"| {name} | {b} | {n} | - |")
PY
echo "client-ab: wrote $out" >&2
