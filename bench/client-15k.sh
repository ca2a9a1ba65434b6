#!/usr/bin/env bash
# 15,000 devices against a 2-core server, the client on the same 2 cores:
# connect as fast as 256 upgrades in flight per core allow, heartbeat every
# 10 s, 10% silent (server timeout 20 s, tick 100 ms), hold 45 s.
# Writes results/<UTC time>-15000/. About a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
PORT=${PORT:-9410}
cargo build --release --quiet --bin server --bin client
out=$(new_results "15000" "bash $0 $*")
exec timeout 300 ./target/release/client --out "$out" --spawn-server --server 127.0.0.1:$PORT \
  --server-flags "--timeout 20s --tick 100ms --cores 0-1" \
  --conns 15000 --ips 127.0.0.2-127.0.0.11 --heartbeat 10s --silent 0.1 --hold 45s "$@"
