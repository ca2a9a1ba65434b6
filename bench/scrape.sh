#!/usr/bin/env bash
# What /metrics costs the shards (issue 11: scraped once a second, under 1%
# of their CPU). A server with --admin holds 15,000 heartbeating devices;
# while they heartbeat, the script reads each server thread's CPU time
# (/proc/PID/task/TID/stat) over alternating 20 s phases: no scrapes, then
# SCRAPE_HZ scrapes a second (10 by default, to make a scrape's cost
# measurable), ROUNDS times, in ABBA order. Reports per phase the shards' CPU per second,
# and the admin and main threads' CPU per scrape; from them, what one
# scrape a second costs against the shards' own CPU.
# Usage: bench/scrape.sh   (about 4 minutes; ROUNDS (4), CONNS (15000), SCRAPE_HZ (10))
# Writes: results/<UTC time>-scrape/{summary.md,phases.jsonl,client/,command.txt}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
ROUNDS=${ROUNDS:-4}
CONNS=${CONNS:-15000}
SCRAPE_HZ=${SCRAPE_HZ:-10}
PORT=${PORT:-9422}
ADMIN=${ADMIN:-9423}
PHASE=20
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --bin server --bin client
out=$(new_results scrape "ROUNDS=$ROUNDS CONNS=$CONNS SCRAPE_HZ=$SCRAPE_HZ bash bench/scrape.sh")

./target/release/server --listen 127.0.0.1:$PORT --cores 0-1 --timeout 60s \
  --admin 127.0.0.1:$ADMIN --stats-interval 0 > "$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
wait_port $PORT
hold=$(( ROUNDS * 2 * PHASE + 30 ))
timeout $(( hold + 120 )) ./target/release/client --out "$out/client" --server 127.0.0.1:$PORT \
  --server-pid $server --conns "$CONNS" --ips 127.0.0.2-127.0.0.11 --heartbeat 10s \
  --hold "${hold}s" --quiet > "$out/client.stdout" 2>&1 &
client=$!
# Until the fleet is up (the admin's gauge says so), at most 2 minutes.
python3 - "$ADMIN" "$CONNS" <<'PY'
import sys, time, urllib.request
admin, conns = sys.argv[1], int(sys.argv[2])
end = time.time() + 120
while time.time() < end:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=1).read().decode()
        held = sum(float(l.split()[-1]) for l in body.splitlines() if l.startswith("c1m_connections{"))
        if held >= conns:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit("scrape: the fleet did not come up in 2 minutes")
PY
sleep 5 # past the connect storm

python3 - "$out" "$server" "$ADMIN" "$ROUNDS" "$SCRAPE_HZ" "$PHASE" <<'PY' | tee "$out/summary.md"
import json, os, statistics, sys, time, urllib.request
out, pid, admin, rounds, hz, phase = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
tick = os.sysconf("SC_CLK_TCK")

def threads():
    cpu = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        group = "shards" if name.startswith("shard") else "admin" if name.startswith("admin") or name.startswith("tiny") else "other"
        cpu[group] = cpu.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return cpu

def run(scraping):
    before, t0, scrapes = threads(), time.time(), 0
    while time.time() - t0 < phase:
        if scraping:
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2).read()
            scrapes += 1
            time.sleep(max(0.0, t0 + scrapes / hz - time.time()))
        else:
            time.sleep(0.1)
    after, secs = threads(), time.time() - t0
    d = {g: after.get(g, 0.0) - before.get(g, 0.0) for g in after}
    return {"scraping": scraping, "secs": secs, "scrapes": scrapes, **{f"{g}_cpu_s": v for g, v in d.items()}}

phases = []
with open(f"{out}/phases.jsonl", "w") as f:
    for r in range(rounds):
        # ABBA: the order alternates, so a drift over the run cancels.
        for scraping in ((False, True) if r % 2 == 0 else (True, False)):
            p = run(scraping)
            p["round"] = r + 1
            phases.append(p)
            f.write(json.dumps(p) + "\n")

quiet = [p for p in phases if not p["scraping"]]
busy = [p for p in phases if p["scraping"]]
shard_quiet = statistics.median(p["shards_cpu_s"] / p["secs"] for p in quiet)
shard_busy = statistics.median(p["shards_cpu_s"] / p["secs"] for p in busy)
# Everything but the shards (the admin thread, tiny_http's, the main
# thread's once-a-second publishing): its rate while quiet is the baseline.
def rest(p):
    return sum(v for k, v in p.items() if k.endswith("_cpu_s") and k != "shards_cpu_s")
rest_quiet = statistics.median(rest(p) / p["secs"] for p in quiet)
per_scrape = statistics.median(max(0.0, rest(p) - rest_quiet * p["secs"]) / p["scrapes"] for p in busy)
print(f"15,000-class fleet, heartbeats every 10 s; {rounds} rounds of {phase:.0f} s without scrapes, then {phase:.0f} s at {hz:g} scrapes/s (medians; thread CPU from /proc, 10 ms resolution).\n")
print("| phase | shard CPU (ms/s) | other threads' CPU (ms/s) | scrapes |")
print("|---|---|---|---|")
for p in phases:
    print(f"| round {p['round']}, {'scraping' if p['scraping'] else 'quiet'} | {1000 * p['shards_cpu_s'] / p['secs']:.1f} | {1000 * rest(p) / p['secs']:.1f} | {p['scrapes']} |")
print()
print(f"- Shards: {1000 * shard_quiet:.1f} ms/s without scrapes, {1000 * shard_busy:.1f} ms/s at {hz:g} scrapes/s (ratio {shard_busy / shard_quiet:.3f}).")
print(f"- Outside the shards (admin and main threads, above their quiet rate): {1000 * per_scrape:.2f} ms of CPU per scrape; one scrape a second is {100 * per_scrape / shard_quiet:.2f}% of the shards' own CPU, and the shards do no work per scrape (they send the same snapshot once a second whether or not anyone scrapes).")
PY
wait $client || echo "scrape: the client exited $?" >&2
echo "scrape: wrote $out" >&2
