#!/usr/bin/env bash
# The client's own cost per connection, in measures that the 2 shared
# cores' noise cannot move (issue 18, item 5): each client build connects
# N_LO and then N_HI devices (no heartbeats: --heartbeat 86400s, hold 1s)
# to one release server started natively for each run (the same server
# binary for every client, SERVER_BIN), and the cost per connection is
# (hi - lo) / (N_HI - N_LO), so what a run costs once (start, stop, the
# 1 s of hold) cancels out.
#   - callgrind: user-space instructions of the client, by thread
#     (--separate-threads): the fleet's executor thread(s), and the main
#     thread (timeline, progress, summary) apart.
#   - strace -c -f: system calls of the whole client, natively.
# The client runs one fleet core (--cores 0), CONCURRENCY upgrades in
# flight, a connect timeout of 600 s for valgrind's pace.
# Usage: bench/client-cost.sh   (about 5-10 minutes)
#   CLIENTS="base=/work/builds/ba9adbc/client new=./target/release/client"
#   IOS="epoll uring" (a client whose --help has no --io runs epoll only)
#   N_LO=500 N_HI=2500 SERVER_BIN=./target/release/server TOOLS="callgrind strace"
# Writes: results/<UTC time>-client-cost/{summary.md,runs.tsv,command.txt,
#   cg-<client>-<io>.txt (self cost per connection by function, hi - lo)}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

CLIENTS=${CLIENTS:-"base=/work/builds/ba9adbc/client new=./target/release/client"}
IOS=${IOS:-"epoll uring"}
N_LO=${N_LO:-500}
N_HI=${N_HI:-2500}
SERVER_BIN=${SERVER_BIN:-./target/release/server}
TOOLS=${TOOLS:-"callgrind strace"}
CONCURRENCY=${CONCURRENCY:-256}
PORT=${PORT:-9470}
IPS=${IPS:-127.0.0.2-127.0.0.11}
[ -x "$SERVER_BIN" ] || { echo "client-cost: no server at $SERVER_BIN" >&2; exit 2; }
out=$(new_results client-cost "CLIENTS='$CLIENTS' IOS='$IOS' N_LO=$N_LO N_HI=$N_HI SERVER_BIN=$SERVER_BIN TOOLS='$TOOLS' CONCURRENCY=$CONCURRENCY bash bench/client-cost.sh")
raw=$(mktemp -d /tmp/client-cost.XXXXXX)
echo "client-cost: raw files in $raw (not kept)" >&2
printf "tool\tclient\tio\tn\testablished\tfleet_ir\tmain_ir\tsyscalls\n" > "$out/runs.tsv"

server_pid=""
cleanup() { [ -n "$server_pid" ] && kill -9 "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT

# run TOOL NAME BIN IO N
run() {
  local tool=$1 name=$2 bin=$3 io=$4 n=$5 tag iof=() pre=() est fleet=0 main=0 calls=0
  tag="$tool-$name-$io-$n"
  PORT=$((PORT + 1))
  "$SERVER_BIN" --io epoll --listen 127.0.0.1:$PORT --cores 0-1 --stats-interval 0 \
    >"$raw/$tag.server.out" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  "$bin" --help 2>&1 | grep -q -- '--io ' && iof=(--io "$io")
  case $tool in
    callgrind) pre=(valgrind -q --tool=callgrind --separate-threads=yes --dump-instr=no
      --callgrind-out-file="$raw/$tag.cg") ;;
    strace) pre=(strace -f -c -o "$raw/$tag.strace") ;;
  esac
  timeout 900 "${pre[@]}" "$bin" --server 127.0.0.1:$PORT --ips "$IPS" --cores 0 "${iof[@]}" \
    --conns "$n" --concurrency "$CONCURRENCY" --connect-timeout 600s --hold 1s --heartbeat 86400s \
    --quiet --out "$raw/$tag.client" >"$raw/$tag.stdout" 2>&1 || echo "client-cost: $tag exited $?" >&2
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
  est=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["figures"]["established"])' \
    "$raw/$tag.client/summary.json" 2>/dev/null || echo 0)
  case $tool in
    callgrind)
      # Thread 1 is main; the others are the fleet's executor (and any
      # helper glommio starts).
      for f in "$raw/$tag.cg"-*; do
        t=$(awk '/^totals:/{print $2}' "$f")
        case $f in *-01) main=$t ;; *) fleet=$((fleet + t)) ;; esac
      done ;;
    strace) calls=$(awk '$NF=="total"{print $4}' "$raw/$tag.strace") ;;
  esac
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$tool" "$name" "$io" "$n" "$est" "$fleet" "$main" "$calls" >> "$out/runs.tsv"
  echo "client-cost: $tag established $est fleet_ir $fleet main_ir $main syscalls $calls" >&2
}

for tool in $TOOLS; do
  for io in $IOS; do
    for c in $CLIENTS; do
      name=${c%%=*} bin=${c#*=}
      if [ "$io" != epoll ] && ! "$bin" --help 2>&1 | grep -q -- '--io '; then continue; fi
      for n in "$N_LO" "$N_HI"; do run "$tool" "$name" "$bin" "$io" "$n"; done
      if [ "$tool" = callgrind ]; then
        lo=$(ls "$raw/callgrind-$name-$io-$N_LO.cg"-* | grep -v -- '-01$' | paste -sd,)
        hi=$(ls "$raw/callgrind-$name-$io-$N_HI.cg"-* | grep -v -- '-01$' | paste -sd,)
        python3 bench/callgrind_diff.py "$lo" $((N_HI - N_LO)) "$hi" $((N_HI - N_LO)) 40 2>/dev/null | cut -c1-200 > "$out/cg-$name-$io-diff-raw.txt" || true
      fi
      if [ "$tool" = strace ]; then
        for n in "$N_LO" "$N_HI"; do cp "$raw/strace-$name-$io-$n.strace" "$out/strace-$name-$io-$n.txt"; done
      fi
    done
  done
done

python3 - "$out/runs.tsv" "$N_LO" "$N_HI" <<'PY' | tee "$out/summary.md"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
lo, hi = sys.argv[2], sys.argv[3]
by = {(r["tool"], r["client"], r["io"], r["n"]): r for r in rows}
print(f"Per connection = (run of {hi} devices - run of {lo}) / its extra established devices; one fleet core.")
print("The main thread's work is once a second (timeline, progress): it follows the runs' length, not their connections.\n")
print("| client | io | fleet thread Ir/conn | main thread Ir/conn | syscalls/conn |")
print("|---|---|---|---|---|")
keys = sorted({(r["client"], r["io"]) for r in rows}, key=lambda k: (k[1], k[0]))
for c, io in keys:
    cells = []
    for tool, col in (("callgrind", "fleet_ir"), ("callgrind", "main_ir"), ("strace", "syscalls")):
        a, b = by.get((tool, c, io, lo)), by.get((tool, c, io, hi))
        try:
            dn = int(b["established"]) - int(a["established"])
            cells.append(f"{(int(b[col]) - int(a[col])) / dn:,.1f}")
        except (TypeError, ValueError, ZeroDivisionError, KeyError):
            cells.append("-")
    print(f"| {c} | {io} | " + " | ".join(cells) + " |")
PY
echo "client-cost: wrote $out" >&2
