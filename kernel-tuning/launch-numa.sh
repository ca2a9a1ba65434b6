#!/usr/bin/env bash
# Starts one pinned c1m server per NUMA node of this host, in the foreground;
# Ctrl-C (or SIGTERM) stops them all with their drain.
#
#   kernel-tuning/launch-numa.sh [--same-port] HOST:PORT [server flags...]
#
# One port per node (default): node N listens on PORT+N. Each server's
# memory and CPUs stay on its node, and the front (nginx, DNS, devices)
# chooses the node. --same-port: every node listens on PORT with --join, in
# one SO_REUSEPORT group; the kernel hashes each new connection to a listener
# on any node, so a connection's packets may arrive on one node and be served
# on another: simpler for devices, less local.
set -euo pipefail
same_port=0
if [ "${1:-}" = "--same-port" ]; then same_port=1; shift; fi
addr=${1:?"usage: launch-numa.sh [--same-port] HOST:PORT [server flags...]"}; shift
host=${addr%:*}; port=${addr##*:}
server=${C1M_SERVER:-$(dirname "$0")/../target/release/server}
[ -x "$server" ] || { echo "launch-numa: no server binary at $server (cargo build --release, or set C1M_SERVER)" >&2; exit 1; }

nodes=$(ls -d /sys/devices/system/node/node[0-9]* 2>/dev/null | sed 's/.*node//' | sort -n)
[ -n "$nodes" ] || nodes=0
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' INT TERM
for n in $nodes; do
  cpus=$(cat /sys/devices/system/node/node$n/cpulist 2>/dev/null || echo "0-$(($(nproc) - 1))")
  if [ $same_port -eq 1 ]; then listen="$host:$port"; join=(--join); else listen="$host:$((port + n))"; join=(); fi
  if command -v numactl >/dev/null; then
    pin=(numactl --cpunodebind="$n" --membind="$n")
  else
    echo "launch-numa: numactl not found: pinning CPUs with taskset only (memory not bound)" >&2
    pin=(taskset -c "$cpus")
  fi
  echo "launch-numa: node $n (CPUs $cpus) on $listen" >&2
  "${pin[@]}" "$server" --listen "$listen" "${join[@]}" "$@" &
  pids+=($!)
  [ $same_port -eq 1 ] && sleep 0.5 # the first server owns the group; the others join it
done
wait
