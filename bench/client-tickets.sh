#!/usr/bin/env bash
# What the load client's TLS ticket pool costs it: N idle wss devices (one
# client process, one server process with 2 shards), ramped with the
# default (each device's ticket kept, one per device: what its reconnects
# resume with) and with --tls-no-resume (none kept); the client's RSS per
# connection of each, REPS runs each, alternating. Bounded: about 30 s a run.
# Usage: bash bench/client-tickets.sh   (N=10000 REPS=2)
# Writes: results/<UTC time>-client-tickets/{summary.md,command.txt,git.txt,<run>/...}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
N=${N:-10000}
REPS=${REPS:-2}
PORT=${PORT:-17999}
cargo build --release --quiet --bin server --bin client
out=$(new_results client-tickets "N=$N REPS=$REPS bash bench/client-tickets.sh")
pki=$(mktemp -d)
trap 'rm -rf "$pki"' EXIT
make_test_pki "$pki"
runs=0
for rep in $(seq "$REPS"); do
  for mode in pool noresume; do
    runs=$((runs + 1))
    flag=()
    [ "$mode" = noresume ] && flag=(--tls-no-resume)
    timeout 300 ./target/release/client --spawn-server --server 127.0.0.1:$((PORT + runs)) \
      --server-flags "--timeout 600s --tick 1s --cores 0-1 --tls-cert $pki/cert.pem --tls-key $pki/key.pem" \
      --ips 127.0.0.2-127.0.0.11 --heartbeat 300s --hold 3s --quiet --conns "$N" --concurrency 8 \
      --tls --tls-ca "$pki/ca.pem" "${flag[@]}" --out "$out/$mode-$rep" > "$out/$mode-$rep.log" 2>&1 \
      || echo "bench: $mode-$rep exited $?" >&2
  done
done
python3 - "$out" "$N" > "$out/summary.md" <<'EOF'
import json, os, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
def rss(mode):
    v = []
    for d in sorted(os.listdir(out)):
        p = os.path.join(out, d, "summary.json")
        if d.rsplit("-", 1)[0] == mode and os.path.exists(p):
            v.append(json.load(open(p))["figures"].get("client_rss_per_conn_bytes"))
    return [x for x in v if isinstance(x, (int, float))]
print(f"# The load client's ticket pool: its memory per wss device\n")
print(f"{n:,} idle wss devices, one client process, one server process (2 shards).\n")
print("| client | runs | client RSS per connection, B (median; each run) |")
print("|---|---|---|")
med = {}
for mode, label in [("pool", "default: each device's ticket kept"), ("noresume", "--tls-no-resume: none kept")]:
    v = rss(mode)
    med[mode] = statistics.median(v) if v else float("nan")
    print(f"| {label} | {len(v)} | {med[mode]:.0f} ({', '.join(f'{x:.0f}' for x in v)}) |")
print(f"\nThe pool's cost: {med['pool'] - med['noresume']:.0f} B per device (a TLS 1.3 ticket with the server's certificate chain it carries).")
EOF
cat "$out/summary.md"
echo "bench: wrote $out" >&2
