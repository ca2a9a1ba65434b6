#!/usr/bin/env bash
# What an idle 2-shard server costs, with and without glommio around the
# shards: RSS and CPU over IDLE seconds with no device connected, for the
# server (glommio executors, each with its own rings, plus the shard's own
# io_uring or epoll set) and for the same shard loop on plain pinned threads
# (examples/epoll_baseline). The difference is glommio's: its rings, its
# executor threads' memory.
# Usage: bench/idle.sh   (about 1 minute; IDLE overrides the seconds)
# Writes: results/<UTC time>-idle/{summary.md,command.txt}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
IDLE=${IDLE:-10}
PORT=${PORT:-9408}
cargo build --release --quiet --bin server --example epoll_baseline
out=$(new_results idle "IDLE=$IDLE bench/idle.sh")
pid=""
trap '[ -n "$pid" ] && kill -9 $pid 2>/dev/null || true' EXIT

cpu_ns() { # all threads of $1, from schedstat
  cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s+=$1} END{print s+0}'
}
{
  echo "Idle 2-shard server (CPUs 0-1), no device, ${IDLE} s: RSS and CPU."
  echo
  echo "| loop | io | RSS MiB | threads | CPU over ${IDLE} s, ms |"
  echo "|---|---|---|---|---|"
} > "$out/summary.md"
for io in uring epoll; do
  for host in glommio threads; do
    if [ $host = glommio ]; then
      ./target/release/server --io $io --listen 127.0.0.1:$PORT --cores 0-1 --stats-interval 0 >/dev/null 2>>"$out/server.err" &
    else
      ./target/release/examples/epoll_baseline --io $io --listen 127.0.0.1:$PORT --cores 0-1 --lifetime 120s >/dev/null 2>>"$out/server.err" &
    fi
    pid=$!
    wait_port $PORT
    sleep 2
    c0=$(cpu_ns $pid)
    sleep "$IDLE"
    c1=$(cpu_ns $pid)
    rss=$(awk '/VmRSS/{print $2}' /proc/$pid/status)
    threads=$(ls /proc/$pid/task | wc -l)
    kill -TERM $pid; wait $pid 2>/dev/null || true
    pid=""
    awk -v h=$host -v io=$io -v rss="$rss" -v t="$threads" -v c0="$c0" -v c1="$c1" \
      'BEGIN { printf "| %s | %s | %.1f | %s | %.1f |\n", h, io, rss / 1024, t, (c1 - c0) / 1e6 }' >> "$out/summary.md"
    sleep 1
  done
done
cat "$out/summary.md"
echo "bench: wrote $out" >&2
