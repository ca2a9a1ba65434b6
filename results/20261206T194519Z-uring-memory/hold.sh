#!/usr/bin/env bash
# hold.sh SERVER_BIN "FLAGS" N OUTDIR PORT: a server on 2 shards, N idle devices (pings every 1s) held,
# smaps before and while held.
set -eu
bin=$1; flags=$2; n=$3; out=$4; port=${5:-9470}
mkdir -p "$out"
cd /work/wt-uringmem
$bin $flags --listen 127.0.0.1:$port --cores 0-1 --stats-interval 0 >/dev/null 2>"$out/server.err" &
pid=$!
sleep 1.5
cat /proc/$pid/smaps > "$out/smaps.before"; grep -E 'VmRSS|RssAnon|RssFile|RssShmem' /proc/$pid/status > "$out/status.before"
./target/release/examples/loadgen --server 127.0.0.1:$port --conns $n --hold 8s --ping-interval 1s --ips 127.0.0.2-127.0.0.11 --server-pid $pid > "$out/loadgen.json" 2>/dev/null &
lg=$!
# wait for ramp + settle (1 s) then snapshot mid-hold
for i in $(seq 120); do sleep 0.5; e=$(ls /proc/$pid/fd | wc -l); [ "$e" -ge "$n" ] && break; done
sleep 3
cat /proc/$pid/smaps > "$out/smaps.held"; grep -E 'VmRSS|RssAnon|RssFile|RssShmem' /proc/$pid/status > "$out/status.held"
wait $lg || true
kill -TERM $pid; wait $pid 2>/dev/null || true
python3 /tmp/uringmem/smapsdiff.py "$out/smaps.before" "$out/smaps.held" $n > "$out/diff.txt"
cat "$out/diff.txt"; paste "$out/status.before" "$out/status.held"
grep -o '"server_rss_per_conn_bytes":[0-9]*\|"established":[0-9]*\|"server_cpu_per_conn_us":[0-9.]*\|"server_cpu_per_heartbeat_us":[0-9.]*' "$out/loadgen.json" | tr '\n' ' '; echo
