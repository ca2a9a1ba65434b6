#!/usr/bin/env bash
# The quick-start run: the client spawns a 2-shard server on loopback and
# 10,000 devices connect from 10 source aliases, heartbeat every 5 s (+-10%);
# 10% go silent and the server (timeout 10 s, tick 100 ms) deletes them.
# Prints the summary table; writes results/<UTC time>-10000/. About 35 s.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-10000}
PORT=${PORT:-9000}
cargo build --release --quiet --bin server --bin client
out=$(new_results "${CONNS}" "bash $0 $*")
exec timeout 300 ./target/release/client --out "$out" --spawn-server --server 127.0.0.1:$PORT \
  --server-flags "--timeout 10s --tick 100ms" \
  --conns "$CONNS" --ips 127.0.0.2-127.0.0.11 --heartbeat 5s --silent 0.1 --hold 30s "$@"
