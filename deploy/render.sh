#!/usr/bin/env bash
# Fills the @NAME@ placeholders of a deploy/ template from the environment;
# the defaults are the values for 1,000,000 devices on one box (see the
# comments in each file for the arithmetic).
#
#   SERVERS=127.0.0.1:9001,127.0.0.1:9002 LISTEN_WSS=0.0.0.0:443 \
#   CERT=/etc/ssl/c1m.crt KEY=/etc/ssl/c1m.key PEM=/etc/ssl/c1m.pem \
#     deploy/render.sh deploy/haproxy.cfg > /etc/haproxy/c1m.cfg
set -euo pipefail
template=${1:?usage: render.sh TEMPLATE > OUT}

: "${SERVERS:=127.0.0.1:9000}"
: "${LISTEN_WS:=0.0.0.0:80}"
: "${LISTEN_WSS:=0.0.0.0:443}"
: "${CERT:=/etc/ssl/certs/c1m.crt}"
: "${KEY:=/etc/ssl/private/c1m.key}"
: "${PEM:=/etc/ssl/private/c1m.pem}"
: "${PREFIX:=/run/c1m-front}"
: "${MODULES:=/usr/lib/nginx/modules}"
# 1M devices over 8 workers: 125,000 each, 2 connections per device, +10%.
: "${WORKERS:=8}"
: "${WORKER_CONNECTIONS:=275000}"
: "${NOFILE:=300000}"
: "${MAXCONN:=1050000}"
# TLS session caches sized for one session per device.
: "${SSL_CACHE:=1000000}"
: "${SSL_CACHE_MB:=256}"

upstreams=""
haproxy_servers=""
i=0
IFS=, read -ra list <<< "$SERVERS"
for s in "${list[@]}"; do
  i=$((i + 1))
  upstreams+="server $s;"$'\n        '
  haproxy_servers+="server c1m-$i $s"$'\n    '
done

sub() { local v=$2; v=${v//\\/\\\\}; v=${v//&/\\&}; v=${v//|/\\|}; printf 's|@%s@|%s|g;' "$1" "$v"; }
script=""
for name in LISTEN_WS LISTEN_WSS CERT KEY PEM PREFIX MODULES WORKERS WORKER_CONNECTIONS NOFILE MAXCONN SSL_CACHE SSL_CACHE_MB; do
  script+=$(sub "$name" "${!name}")
done
# Multi-line values go in with awk (sed's replacement cannot hold newlines portably).
sed "$script" "$template" |
  awk -v up="$upstreams" -v hs="$haproxy_servers" '{
    gsub(/@UPSTREAM_SERVERS@/, up); gsub(/@HAPROXY_SERVERS@/, hs); print }'
