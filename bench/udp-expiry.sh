#!/usr/bin/env bash
# Expiry precision with UDP heartbeats against WebSocket pings (issue 19):
# 15,000 devices heartbeating every 1 s, server --timeout 10s --tick 100ms,
# both backends. 10% of the devices heartbeat for 5 s of the hold and then
# fall silent (--silent 0.1 --silent-after 5s), so their last heartbeat is
# a datagram in the UDP runs and a ping in the others; the client records
# when the server deletes each (expiry lag = deletion - last heartbeat -
# timeout; within one tick, 100 ms, is the target). With GO_SILENT=1
# (default) every device then sends one last heartbeat at once and falls
# silent (--go-silent): the deletion storm, its lag kept apart. The
# kernel's UDP receive-buffer drops (RcvbufErrors) are counted per run: a
# lost last datagram shows as an early expiry.
# Writes results/<UTC time>-udp-expiry/: one client results directory per
# run, summary.md. About 35 s a run.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DEVICES=${DEVICES:-15000}
IOS=${IOS:-"epoll uring"}
GO_SILENT=${GO_SILENT:-1}
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
udp_snmp() { awk '/^Udp:/ { n++; if (n == 2) print $2, $6 }' /proc/net/snmp; }
cargo build --release --quiet --bin server --bin client
out=$(new_results "udp-expiry" "DEVICES=$DEVICES IOS='$IOS' GO_SILENT=$GO_SILENT bash $0 $*")
printf 'io\theartbeat\tudp_rcvbuf_errors\n' > "$out/drops.tsv"
storm=()
[ "$GO_SILENT" = 1 ] && storm=(--go-silent)
for io in $IOS; do
  for mode in ping udp; do
    run="$out/$io-$mode"
    sflags="--timeout 10s --tick 100ms --cores 0-1 --io $io"
    cflags=()
    if [ "$mode" = udp ]; then
      sflags="$sflags --udp-heartbeat"
      cflags=(--udp-heartbeat)
    fi
    port=$(free_port)
    s0=$(udp_snmp)
    timeout 300 ./target/release/client --out "$run" --spawn-server --server "127.0.0.1:$port" \
      --server-flags "$sflags" --conns "$DEVICES" --ips 127.0.0.2-127.0.0.11 \
      --heartbeat 1s --silent 0.1 --silent-after 5s --server-timeout 10s --hold 20s \
      --io epoll --quiet "${storm[@]}" "${cflags[@]}" > "$run.log" 2>&1 || true
    s1=$(udp_snmp)
    printf '%s\t%s\t%s\n' "$io" "$mode" "$(( ${s1#* } - ${s0#* } ))" >> "$out/drops.tsv"
    echo "$io $mode: $(grep -E 'Expiry lag|False / early' "$run.log" | tr '\n' ' ')"
  done
done
python3 - "$out" <<'PY'
import csv, json, sys
out = sys.argv[1]
drops = {(r["io"], r["heartbeat"]): r["udp_rcvbuf_errors"] for r in csv.DictReader(open(f"{out}/drops.tsv"), delimiter="\t")}
L = ["Server --timeout 10s --tick 100ms; 15,000 devices heartbeating every 1 s; 10% silent 5 s into the hold.",
     "Expiry lag = deletion as the device sees it - its last heartbeat - 10 s (ms).", "",
     "| backend | heartbeat | silent devices expired | lag p50 / p99 / max | false / early / missed | storm: deleted, lag p50 / p99 / max | UDP rcvbuf drops |",
     "|---|---|---|---|---|---|---|"]
for (io, mode), d in drops.items():
    f = json.load(open(f"{out}/{io}-{mode}/summary.json"))["figures"]
    g = lambda k: f.get(k)
    storm = (f"{g('storm_deleted')}, {g('storm_lag_p50_ms')} / {g('storm_lag_p99_ms')} / {g('storm_lag_max_ms')}"
             if "storm_deleted" in f else "-")
    L.append(f"| {io} | {mode} | {g('expired')} | {g('expiry_lag_p50_ms')} / {g('expiry_lag_p99_ms')} / {g('expiry_lag_max_ms')} | "
             f"{g('false_expiries')} / {g('expired_early')} / {g('unexpired')} | {storm} | {d} |")
open(f"{out}/summary.md", "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
echo "results: $out"
