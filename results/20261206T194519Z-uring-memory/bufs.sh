#!/usr/bin/env bash
# bufs.sh NB BUFLEN N INTERVAL PORT: one run of the debug server, prints rss, cpu, stats.
cd /work/wt-uringmem
nb=$1; bl=$2; n=$3; iv=$4; port=$5
C1M_DEBUG_STATS=1 C1M_BUFS=$nb C1M_BUF_LEN=$bl /tmp/uringmem/server-dbg2 --io uring --listen 127.0.0.1:$port --cores 0-1 --stats-interval 0 >/dev/null 2>/tmp/uringmem/dbg.err &
pid=$!; sleep 1.5
j=$(./target/release/examples/loadgen --server 127.0.0.1:$port --conns $n --hold 5s --ping-interval $iv --ips 127.0.0.2-127.0.0.11 --server-pid $pid 2>/dev/null)
kill -TERM $pid; wait $pid 2>/dev/null
echo "bufs=$nb len=$bl n=$n iv=$iv $(echo "$j" | grep -o '"established":[0-9]*\|"server_rss_per_conn_bytes":[0-9]*\|"server_cpu_per_conn_us":[0-9.]*\|"server_cpu_per_heartbeat_us":[0-9.]*\|"conn_per_s":[0-9]*' | tr '\n' ' ') $(grep -o 'recv_rearms: [0-9]*\|inc=[a-z]*\|cq_overflows: [0-9]*\|spare=[0-9]*\|sends_cap=[0-9]*' /tmp/uringmem/dbg.err | tr '\n' ' ')"
