#!/usr/bin/env bash
# Devices as first-class, at 15,000 devices (issue 11's benchmark): the
# client with --reconnect-fraction 0.1 (takeovers counted by the client
# against the server's `replaced`), with device auth off and on, and with
# /metrics scraped once a second or not, interleaved, ROUNDS times. Reports
# conn/s, server CPU per connection and per heartbeat, and the takeover
# counts of both sides. The secret file is made for the run and removed.
# Usage: bench/devices.sh   (about 5 minutes; ROUNDS (2), CONNS (15000), HOLD (15s),
#   VARIANTS ("plain auth scraped"), SERVER_PROCS (1: with 2, the server runs two
#   worker processes and takeovers cross them through the registry's link))
# Writes: results/<UTC time>-devices/{summary.md,<variant>-<round>/,command.txt}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-15000}
HOLD=${HOLD:-15s}
VARIANTS=${VARIANTS:-plain auth scraped}
SERVER_PROCS=${SERVER_PROCS:-1}
PORT=${PORT:-9412}
ADMIN=${ADMIN:-9413}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --bin server --bin client
out=$(new_results devices "ROUNDS=$ROUNDS CONNS=$CONNS HOLD=$HOLD VARIANTS=\"$VARIANTS\" SERVER_PROCS=$SERVER_PROCS bash bench/devices.sh")
secret=$(mktemp)
trap 'rm -f "$secret"' EXIT
head -c 32 /dev/urandom | base64 > "$secret"

scrape() { # once a second until the flag file goes
  while [ -e "$1" ]; do
    python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$ADMIN/metrics', timeout=1).read()" 2>/dev/null \
      && echo . >> "$2" || true
    sleep 1
  done
}

for round in $(seq "$ROUNDS"); do
  for variant in $VARIANTS; do
    sflags="--timeout 20s --tick 100ms --cores 0-1 --admin 127.0.0.1:$ADMIN --procs $SERVER_PROCS"
    cflags=()
    if [ $variant = auth ]; then
      sflags="$sflags --auth-secret-file $secret"
      cflags=(--auth-secret-file "$secret")
    fi
    flag=$(mktemp)
    if [ $variant = scraped ]; then
      scrape "$flag" "$out/$variant-$round.scrapes" &
      scraper=$!
    else
      rm -f "$flag"
    fi
    timeout 300 ./target/release/client --out "$out/$variant-$round" --spawn-server \
      --server 127.0.0.1:$PORT --server-flags "$sflags" "${cflags[@]}" \
      --conns "$CONNS" --ips 127.0.0.2-127.0.0.11 --heartbeat 10s --reconnect-fraction 0.1 \
      --hold "$HOLD" --quiet > "$out/$variant-$round.stdout" 2>&1 \
      || echo "devices: $variant round $round exited $?" >&2
    rm -f "$flag"
    [ $variant = scraped ] && wait "$scraper" || true
    sleep 2
  done
done

python3 - "$out" "$ROUNDS" "$VARIANTS" "$SERVER_PROCS" <<'PY' | tee "$out/summary.md"
import json, os, re, statistics, sys
out, rounds, variants, procs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
def runs(v):
    for r in range(1, rounds + 1):
        d = f"{out}/{v}-{r}"
        s = json.load(open(f"{d}/summary.json"))["figures"]
        log = open(f"{d}/server.log").read()
        m = re.search(r"^final .* replaced=(\d+) ", log, re.M)
        s["server_replaced"] = int(m.group(1)) if m else -1
        sc = f"{out}/{v}-{r}.scrapes"
        s["scrapes"] = len(open(sc).read().split()) if os.path.exists(sc) else 0
        yield s
first = f"{out}/{variants[0]}-1/summary.json"
print(f"Medians of {rounds} interleaved runs each: {json.load(open(first))['figures']['target_connections']:,} devices, --reconnect-fraction 0.1, server --procs {procs}.\n")
cols = [("conn/s", "conn_per_s_mean"), ("server CPU/conn us", "server_cpu_per_conn_us"),
        ("server CPU/heartbeat us", "server_cpu_per_heartbeat_us"), ("server RSS/conn B", "server_rss_per_conn_bytes"),
        ("takeovers seen by the client", "replaced"), ("second connections", "reconnects"),
        ("server replaced", "server_replaced"), ("false expiries", "false_expiries"), ("failed", "failed"), ("/metrics scrapes", "scrapes")]
print("| variant | " + " | ".join(c for c, _ in cols) + " |")
print("|---" * (len(cols) + 1) + "|")
names = {"plain": "auth off", "auth": "auth on (HMAC tokens)", "scraped": "auth off, /metrics once a second"}
for v, what in ((v, names[v]) for v in variants):
    rs = list(runs(v))
    cells = [f"{statistics.median(r[k] for r in rs):,.1f}".rstrip("0").rstrip(".") for _, k in cols]
    print(f"| {what} | " + " | ".join(cells) + " |")
PY
echo "devices: wrote $out" >&2
