#!/usr/bin/env bash
# Adds or removes a load machine's source addresses, so that one client can
# open more connections than one IP's ephemeral ports allow (64,512 per
# destination IP:port with ip_local_port_range 1024-65535).
#
#   kernel-tuning/ip-aliases.sh add IFACE 10.0.0.2-10.0.0.21 [PREFIXLEN]
#   kernel-tuning/ip-aliases.sh del IFACE 10.0.0.2-10.0.0.21 [PREFIXLEN]
#   kernel-tuning/ip-aliases.sh list IFACE
#
# On loopback none are needed: every 127.x.y.z is already local
# (client --ips 127.0.0.2-127.0.0.41).
set -euo pipefail
cmd=${1:?"usage: ip-aliases.sh add|del|list IFACE [FIRST-LAST [PREFIXLEN]]"}
iface=${2:?"ip-aliases.sh: name the interface, e.g. eth0"}
if [ "$cmd" = list ]; then ip -4 -o addr show dev "$iface" | awk '{print $4}'; exit 0; fi
range=${3:?"ip-aliases.sh: give the range, e.g. 10.0.0.2-10.0.0.21"}
prefix=${4:-24}
first=${range%-*}; last=${range#*-}
to_int() { local IFS=.; read -r a b c d <<< "$1"; echo $(((a << 24) | (b << 16) | (c << 8) | d)); }
to_ip() { echo "$(($1 >> 24 & 255)).$(($1 >> 16 & 255)).$(($1 >> 8 & 255)).$(($1 & 255))"; }
lo=$(to_int "$first"); hi=$(to_int "$last")
[ "$lo" -le "$hi" ] || { echo "ip-aliases.sh: empty range $range" >&2; exit 1; }
[ $((hi - lo)) -lt 4096 ] || { echo "ip-aliases.sh: $range is over 4096 addresses; split it" >&2; exit 1; }
case $cmd in
  add|del) ;;
  *) echo "ip-aliases.sh: unknown command $cmd (add, del, list)" >&2; exit 1 ;;
esac
n=0
for ((i = lo; i <= hi; i++)); do
  ip addr "$cmd" "$(to_ip $i)/$prefix" dev "$iface" 2>/dev/null && n=$((n + 1))
done
echo "ip-aliases.sh: ${cmd} $n of $((hi - lo + 1)) addresses on $iface"
