#!/usr/bin/env bash
# Server-core benchmark (issue: server core). A burst of N connections on
# loopback against 2 shards, then a hold in which every device pings once per
# interval. Cases (N:interval): 2000:1s and 15000:1s as the issue asks, and
# 15000:7500ms, which keeps the heartbeat rate of the 2,000 case (2,000/s)
# with 13,000 more idle connections: the clean test of whether a heartbeat
# costs more when more connections sit idle. Measures, per run: upgraded
# connections/s, listen overflows, server CPU per connection and per
# heartbeat (schedstat ns, all threads), server RSS per idle connection, and
# the host's kernel slab per connection (both loopback ends plus what the
# server's I/O arms in the kernel: compare rows, the client is the same).
# The load is the client (target/release/client, one pinned executor per
# CPU, 512 upgrades in flight each); bench/client_json.py turns its
# summary.json into the runs.jsonl line. Runs before results/20261206T222326Z
# were measured with server/examples/loadgen.rs, which read the server's CPU
# some 10-20% lower (docs/benchmarks.md compares the two).
# Servers: tokio (examples/tokio_peer.rs: tuned tokio-tungstenite, the
# budget's peer), uring2/epoll2 (c1m on 2 shards, CPUs 0-1, with --io uring or
# --io epoll), uring1/epoll1 (1 shard on CPU 0), uring2cpu/epoll2cpu (2
# shards with --reuseport-cpu; the client's executor i runs on CPU i, so
# each one's connections are received on its own CPU), threads (the shard loop on
# plain threads, no glommio, epoll), stock128/stock4096 (a glommio TcpStream
# task per connection, ring depth 128 / 4096). Rounds are interleaved so
# machine noise hits every variant alike; the summary quotes medians. To
# measure a change before and after in one run, build the old server, copy
# it aside and add `base` (it runs with the same flags as uring2 less --io):
#   BASE_SERVER=/tmp/old/server IMPLS="uring2 base" bash bench/core.sh
#
# Usage: bench/core.sh      (about 6 minutes; ROUNDS, HOLD, CASES, IMPLS override)
# Writes: results/<UTC time>-core/{runs.jsonl,summary.md,machine.txt,command.txt}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

ROUNDS=${ROUNDS:-3}
HOLD=${HOLD:-5s}
CASES=${CASES:-"2000:1s 15000:1s 15000:7500ms"}
IMPLS=${IMPLS:-"uring2 epoll2 uring1 epoll1"}
PORT=${PORT:-9400}
IPS=${IPS:-127.0.0.2-127.0.0.11}
CLIENT_FLAGS=${CLIENT_FLAGS:-}  # more client flags, e.g. --io uring

[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --bin server --bin client --examples
BASE_SERVER=${BASE_SERVER:-}
BASE_FLAGS=${BASE_FLAGS:-}  # extra flags for the base server, e.g. --io epoll
# A second old build in the same run (impl base2, the same BASE_FLAGS):
# the previous landing and the budget's reference side by side.
BASE2_SERVER=${BASE2_SERVER:-}
case " $IMPLS " in
  *" base "*) [ -x "$BASE_SERVER" ] || { echo "bench: IMPLS has base but BASE_SERVER ('$BASE_SERVER') is not an executable server" >&2; exit 2; } ;;
esac
case " $IMPLS " in
  *" base2 "*) [ -x "$BASE2_SERVER" ] || { echo "bench: IMPLS has base2 but BASE2_SERVER ('$BASE2_SERVER') is not an executable server" >&2; exit 2; } ;;
esac
out=$(new_results core "ROUNDS=$ROUNDS HOLD=$HOLD CASES='$CASES' IMPLS='$IMPLS'${CLIENT_FLAGS:+ CLIENT_FLAGS='$CLIENT_FLAGS'}${BASE_SERVER:+ BASE_SERVER=$BASE_SERVER}${BASE_FLAGS:+ BASE_FLAGS='$BASE_FLAGS'}${BASE2_SERVER:+ BASE2_SERVER=$BASE2_SERVER} bench/core.sh")
{
  echo "date: $(date -u +%FT%TZ)"
  echo "kernel: $(uname -r)"
  echo "cpus: $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
  echo "memory: $(free -g | awk '/Mem:/{print $2}') GiB"
  echo "RLIMIT_NOFILE: $(ulimit -n)"
  echo "net.core.somaxconn: $(cat /proc/sys/net/core/somaxconn)"
  echo "net.ipv4.ip_local_port_range: $(cat /proc/sys/net/ipv4/ip_local_port_range)"
  echo "load: target/release/client $CLIENT_FLAGS"
} > "$out/machine.txt"
# Each client run's own results directory (histograms, plots): read, then dropped.
raw=$(mktemp -d /tmp/core-client.XXXXXX)

server_pid=""
cleanup() { [ -n "$server_pid" ] && kill -9 "$server_pid" 2>/dev/null || true; rm -rf "$raw"; }
trap cleanup EXIT

start_server() {
  local impl=$1
  case $impl in
    uring2|epoll2|uring1|epoll1|uring2cpu|epoll2cpu)
      local io=${impl:0:5} cores=0-1 steer=()
      [ "${impl:5:1}" = 1 ] && cores=0
      [ "${impl: -3}" = cpu ] && steer=(--reuseport-cpu)
      ./target/release/server --io "$io" "${steer[@]}" --listen 127.0.0.1:$PORT --cores $cores --stats-interval 0 >/dev/null 2>>"$out/server.err" & ;;
    base2) "$BASE2_SERVER" $BASE_FLAGS --listen 127.0.0.1:$PORT --cores 0-1 --stats-interval 0 >/dev/null 2>>"$out/server.err" & ;;
    base) "$BASE_SERVER" $BASE_FLAGS --listen 127.0.0.1:$PORT --cores 0-1 --stats-interval 0 >/dev/null 2>>"$out/server.err" & ;;
    tokio) ./target/release/examples/tokio_peer --listen 127.0.0.1:$PORT --lifetime 120s >/dev/null 2>>"$out/server.err" & ;;
    threads) ./target/release/examples/epoll_baseline --listen 127.0.0.1:$PORT --lifetime 120s >/dev/null 2>>"$out/server.err" & ;;
    stock128) ./target/release/examples/stock_glommio --listen 127.0.0.1:$PORT --ring-depth 128 --lifetime 120s >/dev/null 2>>"$out/server.err" & ;;
    stock4096) ./target/release/examples/stock_glommio --listen 127.0.0.1:$PORT --ring-depth 4096 --lifetime 120s >/dev/null 2>>"$out/server.err" & ;;
    *) echo "unknown impl $impl" >&2; exit 2 ;;
  esac
  server_pid=$!
  wait_port $PORT || { echo "bench: $impl did not start" >&2; exit 1; }
}

stop_server() {
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

for round in $(seq "$ROUNDS"); do
  for case in $CASES; do
    n=${case%%:*}
    interval=${case#*:}
    for impl in $IMPLS; do
      start_server "$impl"
      sleep 1 # shards finish starting after the listeners are bound
      nstat -n >/dev/null 2>&1 || true
      run="$raw/$impl-$round-$n-$interval"
      rc=0
      timeout 180 ./target/release/client --concurrency 512 $CLIENT_FLAGS --server 127.0.0.1:$PORT --conns "$n" \
        --hold "$HOLD" --heartbeat "$interval" --ips "$IPS" --server-pid "$server_pid" --quiet --out "$run" \
        >/dev/null 2>>"$out/client.err" || rc=$?
      # 2: the run completed and the server closed heartbeating devices (counted in the figures).
      [ "$rc" = 0 ] || [ "$rc" = 2 ] || { echo "bench: the client failed (exit $rc) against $impl, $case: see $out/client.err" >&2; exit 1; }
      json=$(python3 bench/client_json.py "$run")
      overflows=$(nstat -z TcpExtListenOverflows TcpExtListenDrops 2>/dev/null | awk 'NR>1{s+=$2} END{print s+0}')
      stop_server
      line="{\"impl\":\"$impl\",\"round\":$round,\"listen_overflows_drops\":$overflows,${json#\{}"
      echo "$line" >> "$out/runs.jsonl"
      echo "round $round $impl $case: $(echo "$json" | cut -c1-160)..." >&2
      sleep 1
    done
  done
done

python3 bench/summarize_core.py "$out/runs.jsonl" > "$out/summary.md"
cat "$out/summary.md"
echo "bench: wrote $out" >&2
