#!/usr/bin/env bash
# What a front costs: the load client through nginx (stream + PROXY v1),
# nginx (http + X-Forwarded-For), HAProxy (tcp + PROXY v2), and direct to
# c1m, in ws:// and wss:// (TLS ended at the front, or in c1m for
# wss-direct), one run each, the same fleet, behind the same two c1m
# servers (one shard each, CPUs 0 and 1). The whole server side (the front's
# processes and both c1m servers) runs under one parent whose pid goes to
# the client as --server-pid, so the client's server CPU and RSS figures
# cover all of it (host.rs counts descendants).
#
# Figures per case: conn/s, connect p99 (with the TLS handshakes), heartbeat
# RTT p99, server-side CPU per connection and per heartbeat, server-side RSS
# per connection, host slab and MemAvailable per connection (both ends of
# every socket on the host: the client's too), and the front's share of the
# server side's CPU.
#
# The device count: every process here is capped at 20,000 descriptors and
# a proxy holds 2 per device, so each front runs 2 event loops in 2
# processes (nginx: 2 workers with `reuseport`; HAProxy: 2 processes on
# the same port, SO_REUSEPORT being its default), each with ~7,500 devices
# (15,000 descriptors) of CONNS=15000.
#
# wss cases need `client --tls --tls-ca PEM` and, for wss-direct, `server
# --tls-cert/--tls-key` (native TLS, another branch): a case whose flags
# the binaries lack is skipped with a line saying so. wss-nginx-relay and
# wss-haproxy-relay measure TLS at the front without them: a client-side
# relay (start_relay) makes each device's connection a TLS one.
#
# Installs nginx, libnginx-mod-stream and haproxy from Debian's packages
# where missing (their services are not used: each front runs as this
# script's own process, config, pid file and logs in a temp dir).
#
# Usage: bench/front.sh   (about 6 minutes, 2 of them the ws cases; CONNS
#   (15000), HOLD (20s), HEARTBEAT (5s), CASES (all), WARMUP (1),
#   CONNECT_TIMEOUT (30s), DEPLOY (deploy: where the templates come from))
# Writes: results/<UTC time>-front/{summary.md,<case>/,<case>.*.log,command.txt}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-15000}
HOLD=${HOLD:-20s}
HEARTBEAT=${HEARTBEAT:-5s}
WARMUP=${WARMUP:-1}
CASES=${CASES:-"ws-direct ws-nginx ws-nginx-http ws-haproxy wss-direct wss-nginx wss-haproxy wss-nginx-relay wss-haproxy-relay"}
P1=${P1:-9511}
P2=${P2:-9512}
FRONT_WS=${FRONT_WS:-9520}
FRONT_WSS=${FRONT_WSS:-9521}
DIRECT_WSS=${DIRECT_WSS:-9522}
RELAY=${RELAY:-9523}
# Full TLS handshakes on 2 shared cores queue for seconds during the ramp:
# a device gives up after this (the client's --connect-timeout).
CONNECT_TIMEOUT=${CONNECT_TIMEOUT:-30s}
# Where the front templates come from (to try a variant of deploy/).
DEPLOY=${DEPLOY:-deploy}

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if ! have nginx || ! have haproxy || [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "front: installing nginx, libnginx-mod-stream and haproxy (Debian packages)" >&2
  $sudo apt-get install -y -qq nginx libnginx-mod-stream haproxy >&2
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --bin server --bin client
out=$(new_results front "DEPLOY=$DEPLOY CONNS=$CONNS HOLD=$HOLD HEARTBEAT=$HEARTBEAT WARMUP=$WARMUP CONNECT_TIMEOUT=$CONNECT_TIMEOUT CASES=\"$CASES\" bash bench/front.sh")
tmp=$(mktemp -d)
side=""
stop_side() {
  [ -n "$side" ] || return 0
  kill -TERM "$side" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$side" 2>/dev/null || break; sleep 0.1; done
  # Whatever is left of the group this script made for the server side.
  kill -KILL -- "-$side" 2>/dev/null || true
  wait "$side" 2>/dev/null || true
  side=""
}
trap 'stop_relay; stop_side; rm -rf "$tmp"' EXIT

# Test certificates, made now, never kept: a CA and a leaf for
# localhost/127.0.0.1 (a self-signed leaf marked CA is refused by webpki).
ext="subjectAltName=DNS:localhost,IP:127.0.0.1
basicConstraints=CA:FALSE
keyUsage=digitalSignature
extendedKeyUsage=serverAuth"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=c1m-bench-CA -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj /CN=localhost -keyout "$tmp/key.pem" -out "$tmp/leaf.csr" 2>/dev/null
openssl x509 -req -in "$tmp/leaf.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
  -days 1 -out "$tmp/cert.pem" -extfile <(echo "$ext") 2>/dev/null
cat "$tmp/cert.pem" "$tmp/key.pem" > "$tmp/front.pem"

client_tls=0; server_tls=0
./target/release/client --help 2>&1 | grep -q -- '--tls-ca' && client_tls=1
./target/release/server --help 2>&1 | grep -q -- '--tls-cert' && server_tls=1

# render TEMPLATE PREFIX WORKERS MAXCONN: a deploy/ template for this box.
render() {
  mkdir -p "$2"
  SERVERS=127.0.0.1:$P1,127.0.0.1:$P2 LISTEN_WS=127.0.0.1:$FRONT_WS LISTEN_WSS=127.0.0.1:$FRONT_WSS \
    CERT=$tmp/cert.pem KEY=$tmp/key.pem PEM=$tmp/front.pem PREFIX=$2 \
    WORKERS=$3 WORKER_CONNECTIONS=17000 NOFILE=19500 MAXCONN=$4 SSL_CACHE=20000 SSL_CACHE_MB=8 \
    bash deploy/render.sh "$DEPLOY/$1" > "$2/$1"
}

# start_side CASE: both c1m servers and the case's front under one parent
# (in a process group of its own); sets $side and $target.
start_side() {
  # A -relay case is its wss case behind the client's TLS relay.
  local name=$1 case=${1%-relay} flags="--timeout 30s --stats-interval 5s --drain-timeout 1s" front="" tls=""
  case $case in
    *-nginx-http) flags="$flags --trust-forwarded-from 127.0.0.1/32" ;;
    *-nginx|*-haproxy) flags="$flags --proxy-protocol" ;;
  esac
  case $case in
    ws-direct) target=127.0.0.1:$P1,127.0.0.1:$P2 ;;
    wss-direct) target=127.0.0.1:$DIRECT_WSS
      tls="--tls-cert $tmp/cert.pem --tls-key $tmp/key.pem" ;;
    ws-*) target=127.0.0.1:$FRONT_WS ;;
    wss-*) target=127.0.0.1:$FRONT_WSS ;;
  esac
  case $case in
    *-nginx) render nginx-stream.conf "$tmp/$name" 2 0
      front="$NGINX -p $tmp/$name -c $tmp/$name/nginx-stream.conf -g 'daemon off;'" ;;
    *-nginx-http) render nginx-http.conf "$tmp/$name" 2 0
      front="$NGINX -p $tmp/$name -c $tmp/$name/nginx-http.conf -g 'daemon off;'" ;;
    *-haproxy) render haproxy.cfg "$tmp/$name/a" 1 9000; render haproxy.cfg "$tmp/$name/b" 1 9000
      front="$HAPROXY -f $tmp/$name/a/haproxy.cfg -db & $HAPROXY -f $tmp/$name/b/haproxy.cfg -db" ;;
  esac
  local servers="./target/release/server --listen 127.0.0.1:$P1 --cores 0 $flags > $out/$name.c1m-1.log 2>&1 &
    ./target/release/server --listen 127.0.0.1:$P2 --cores 1 $flags > $out/$name.c1m-2.log 2>&1 &"
  if [ "$case" = wss-direct ]; then
    # c1m ends TLS itself: both servers on one TLS port (one SO_REUSEPORT group).
    servers="./target/release/server --listen 127.0.0.1:$DIRECT_WSS --cores 0 $flags $tls > $out/$name.c1m-1.log 2>&1 &
    ./target/release/server --listen 127.0.0.1:$DIRECT_WSS --join --cores 1 $flags $tls > $out/$name.c1m-2.log 2>&1 &"
  fi
  setsid bash -c "
    trap 'kill -TERM \$(jobs -p) 2>/dev/null; wait' TERM INT
    $servers
    ${front:+$front > $out/$name.front.log 2>&1 &}
    wait" &
  side=$!
  sleep 0.5
  wait_port "${target##*:}"
  [ "$case" = ws-direct ] && wait_port "$P2"
  sleep 0.5
}

# start_relay: until the client speaks TLS itself, a wss case can run with
# the client's ws connections turned into TLS ones by a relay: 2 HAProxy
# processes (2 descriptors per device), each connection one TLS client
# connection to the front with a full handshake (no-ssl-reuse), as a fleet
# of devices would make. The relay is outside the server side: not in
# --server-pid's tree, so not in its CPU or memory figures; it shares the
# cores with the client, so conn/s and latencies carry its cost too.
relay=""
start_relay() {
  local i
  for i in a b; do
    mkdir -p "$tmp/relay-$i"
    cat > "$tmp/relay-$i/relay.cfg" <<EOF
global
    maxconn 9000
    nbthread 1
    pidfile $tmp/relay-$i/haproxy.pid
defaults
    mode tcp
    timeout connect 5s
    timeout client 150s
    timeout server 150s
frontend relay
    bind 127.0.0.1:$RELAY
    default_backend front
backend front
    server front 127.0.0.1:$FRONT_WSS ssl verify required ca-file $tmp/ca.pem sni str(localhost) no-ssl-reuse
EOF
  done
  setsid bash -c "
    trap 'kill -TERM \$(jobs -p) 2>/dev/null; wait' TERM INT
    $HAPROXY -f $tmp/relay-a/relay.cfg -db > $out/relay-a.log 2>&1 &
    $HAPROXY -f $tmp/relay-b/relay.cfg -db > $out/relay-b.log 2>&1 &
    wait" &
  relay=$!
  wait_port "$RELAY"
  target=127.0.0.1:$RELAY
}
stop_relay() {
  [ -n "$relay" ] || return 0
  kill -TERM "$relay" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$relay" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$relay" 2>/dev/null || true
  wait "$relay" 2>/dev/null || true
  relay=""
}

# cpu_of PATTERN: CPU seconds so far of the side's processes whose command
# line matches PATTERN.
cpu_of() {
  local total=0 p
  for p in $(pgrep -g "$side" -f "$1" || true); do
    total=$(awk -v t="$total" '{print t + ($14 + $15) / 100}' "/proc/$p/stat" 2>/dev/null || echo "$total")
  done
  echo "$total"
}

run_case() { # CASE DIR HOLD
  local case=$1 dir=$2 hold=$3 tls_flags=()
  case $case in
    *-relay) ;;
    # --tls-share-tickets: the ramp resumes with the process's tickets, as
    # this bench's runs before 2026-12-07 did (by default a device's first
    # connection has no ticket).
    wss-*) tls_flags=(--tls --tls-ca "$tmp/ca.pem" --tls-share-tickets) ;;
  esac
  start_side "$case"
  case $case in *-relay) start_relay ;; esac
  local c1m0 front0 c1m1 front1
  c1m0=$(cpu_of target/release/server); front0=$(cpu_of 'nginx|haproxy')
  timeout 180 ./target/release/client --server "$target" --server-pid "$side" \
    --ips 127.0.0.2-127.0.0.11 --conns "$CONNS" --heartbeat "$HEARTBEAT" --server-timeout 30s \
    --hold "$hold" --connect-timeout "$CONNECT_TIMEOUT" "${tls_flags[@]}" --out "$dir" --quiet > "$dir.stdout" 2>&1 \
    || echo "front: $case: the client exited $?" >&2
  c1m1=$(cpu_of target/release/server); front1=$(cpu_of 'nginx|haproxy')
  stop_relay
  echo "{\"c1m_cpu_s\": $(awk -v a="$c1m0" -v b="$c1m1" 'BEGIN{print b-a}'), \"front_cpu_s\": $(awk -v a="$front0" -v b="$front1" 'BEGIN{print b-a}')}" > "$dir.cpu.json"
  stop_side
  if [ -d "$tmp/$case" ]; then
    find "$tmp/$case" -name '*.log' | while read -r f; do
      cp "$f" "$out/$case.$(basename "$(dirname "$f")").$(basename "$f")"
    done
  fi
  sleep 2
}

if [ "$WARMUP" = 1 ]; then
  # The first run of a sitting pays for fresh kernel slabs: not reported.
  run_case ws-direct "$tmp/warmup" 5s
fi
ran=()
for case in $CASES; do
  case $case in
    *-relay) ;;
    wss-*) if [ $client_tls = 0 ]; then
             echo "front: $case skipped: this client has no --tls/--tls-ca (native TLS is another branch)" | tee -a "$out/skipped.txt" >&2; continue
           fi ;;
  esac
  if [ "$case" = wss-direct ] && [ $server_tls = 0 ]; then
    echo "front: $case skipped: this server has no --tls-cert/--tls-key (native TLS is another branch)" | tee -a "$out/skipped.txt" >&2; continue
  fi
  echo "front: $case" >&2
  run_case "$case" "$out/$case" "$HOLD"
  ran+=("$case")
done

python3 - "$out" "$HEARTBEAT" "${ran[@]}" <<'PY' | tee "$out/summary.md"
import json, sys
out, heartbeat, cases = sys.argv[1], sys.argv[2], sys.argv[3:]
what = {"ws-direct": "ws, direct to c1m", "ws-nginx": "ws, nginx stream + PROXY v1",
        "ws-nginx-http": "ws, nginx http + X-Forwarded-For", "ws-haproxy": "ws, HAProxy tcp + PROXY v2",
        "wss-direct": "wss, TLS in c1m", "wss-nginx": "wss, TLS at nginx stream + PROXY v1",
        "wss-haproxy": "wss, TLS at HAProxy tcp + PROXY v2",
        "wss-nginx-relay": "wss (via a client-side TLS relay), TLS at nginx stream + PROXY v1",
        "wss-haproxy-relay": "wss (via a client-side TLS relay), TLS at HAProxy tcp + PROXY v2"}
rows = []
for c in cases:
    f = json.load(open(f"{out}/{c}/summary.json"))["figures"]
    cpu = json.load(open(f"{out}/{c}.cpu.json"))
    tot = cpu["c1m_cpu_s"] + cpu["front_cpu_s"]
    f["front_share"] = 100 * cpu["front_cpu_s"] / tot if tot else 0
    rows.append((c, f))
first = rows[0][1] if rows else {}
print(f"One run per case, {first.get('target_connections', 0):,} devices, a heartbeat every "
      f"{heartbeat} (+-10%); server side = the front's processes + two c1m servers (1 shard each).\n")
cols = [("established", "established", 0), ("failed", "failed", 0), ("conn/s", "conn_per_s_mean", 0),
        ("connect p99 ms", "connect_p99_ms", 1), ("heartbeat RTT p99 ms", "heartbeat_rtt_p99_ms", 2),
        ("server-side CPU/conn us", "server_cpu_per_conn_us", 1),
        ("server-side CPU/heartbeat us", "server_cpu_per_heartbeat_us", 1),
        ("front's share of that CPU %", "front_share", 0),
        ("server-side RSS/conn B", "server_rss_per_conn_bytes", 0),
        ("host slab/conn B", "kernel_slab_per_conn_bytes", 0),
        ("host MemAvailable used/conn B", "host_memory_per_conn_bytes", 0)]
print("| case | " + " | ".join(c for c, _, _ in cols) + " |")
print("|---" * (len(cols) + 1) + "|")
for c, f in rows:
    cells = []
    for _, k, d in cols:
        v = f.get(k)
        cells.append("n/a" if v is None else f"{v:,.{d}f}")
    print(f"| {what.get(c, c)} | " + " | ".join(cells) + " |")
base = dict(rows).get("ws-direct")
if base:
    print("\nAgainst ws direct (ratio, same run):\n")
    rc = [("CPU/conn", "server_cpu_per_conn_us"), ("CPU/heartbeat", "server_cpu_per_heartbeat_us"),
          ("RSS/conn", "server_rss_per_conn_bytes"), ("host slab/conn", "kernel_slab_per_conn_bytes"),
          ("conn/s", "conn_per_s_mean"), ("heartbeat RTT p99", "heartbeat_rtt_p99_ms")]
    print("| case | " + " | ".join(c for c, _ in rc) + " |")
    print("|---" * (len(rc) + 1) + "|")
    for c, f in rows:
        cells = [f"{f[k] / base[k]:.2f}" if base.get(k) and f.get(k) is not None else "n/a" for _, k in rc]
        print(f"| {what.get(c, c)} | " + " | ".join(cells) + " |")
PY
echo "front: wrote $out" >&2
