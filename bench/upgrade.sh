#!/usr/bin/env bash
# Hot upgrade under load (issue 22, docs/upgrade.md): a 2-core server on
# loopback holds CONNS devices (default 15,000) heartbeating every 2 s, and
# halfway through the hold `POST /upgrade` on its admin port hands every
# connection to a new process of the same binary. Records the handover
# time (the old process's and the new one's), the longest heartbeat round
# trip any device saw (a ping sent as the handover begins is answered by
# the new process), p99, the client's disconnects (false_expiries: a
# heartbeating device the server closed), the RSS of both processes, and
# the server's counters. Bounded: about a minute.
# PROCS=N: the server runs --procs N, and the trigger goes to its
# supervisor, which hands each worker over to a new process in turn; the
# figures are then per worker and summed (rss.txt: the supervisor and all
# its workers, old and new). The client runs as enough processes for
# RLIMIT_NOFILE (CLIENT_PROCS, one per 15,000 devices by default).
# At scale (e.g. CONNS=1000000 PROCS=60 HEARTBEAT=30 TIMEOUT=90): IPS
# (the client's source aliases; 40 past 250,000 devices), HEARTBEAT and
# TIMEOUT (seconds), RATE (the client's connects per second, 0 = as fast
# as it can), CONCURRENCY (its connects in flight per core; 64 past
# 250,000), SERVER_FLAGS (e.g. "--upgrade-parallel 8"); past 100,000
# devices kernel-tuning/ is applied with a backup and restored at the end
# (root). CLIENT_NICE=N runs the client at that nice level: on this box the
# load generator shares the 2 cores with the server, which a real server
# of 1M devices does not; niced, the client yields the CPU to the server.
# TLS=1 runs a wss fleet (its devices reconnect when the old process
# closes them; see below); SERVER=path runs another build (a base).
# Writes results/<UTC time>-upgrade/: summary.md, summary.json (the
# client's), server.log (both processes' stderr), rss.txt, cpu.txt (the
# box's CPU every 2 s, the trigger marked), command.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-15000}
PORT=${PORT:-9430}
APORT=${APORT:-9431}
IO=${IO:-epoll}
HOLD=${HOLD:-40}
PROCS=${PROCS:-0}
CLIENT_PROCS=${CLIENT_PROCS:-$(( (CONNS + 14999) / 15000 ))}
HEARTBEAT=${HEARTBEAT:-2}
TIMEOUT=${TIMEOUT:-20}
RATE=${RATE:-0}
SERVER_FLAGS=${SERVER_FLAGS:-}
# CLIENT_FLAGS: more client flags, e.g. with SERVER_FLAGS=--udp-heartbeat:
# CLIENT_FLAGS="--udp-heartbeat --udp-heartbeat-every 10" (UDP datagrams,
# a WebSocket ping every 10th heartbeat; the summary adds the servers' UDP
# counters: a datagram read by the process not holding its connection at
# that moment is udp_stale).
CLIENT_FLAGS=${CLIENT_FLAGS:-}
# TLS=1: wss (a certificate for localhost from a CA made here); the old
# process closes its wss devices with 1001 over --upgrade-tls-window and
# the client's devices reconnect (--redial-on-close, the storm's backoff):
# the summary says how many came back, how long they were away, and how
# many of the new process's handshakes resumed a session.
TLS=${TLS:-0}
# SERVER: the binary to run (and upgrade to: the file at that path), e.g.
# a base build to compare against in one sitting.
SERVER=${SERVER:-./target/release/server}
CLIENT_NICE=${CLIENT_NICE:-0}
if [ "$CONNS" -gt 250000 ]; then IPS=${IPS:-127.0.0.2-127.0.0.41}; CONCURRENCY=${CONCURRENCY:-64}; else IPS=${IPS:-127.0.0.2-127.0.0.11}; fi
CONCURRENCY=${CONCURRENCY:-256}
TUNE=0
[ "$CONNS" -gt 100000 ] && TUNE=1
# UPGRADE=0: the same run without the upgrade (the control).
UPGRADE=${UPGRADE:-1}
cargo build --release --quiet --bin server --bin client
name=upgrade
[ "$PROCS" = 0 ] || name=upgrade-procs$PROCS
[ "$UPGRADE" = 1 ] || name=$name-control
case " $SERVER_FLAGS " in *" --udp-heartbeat "*) name=$name-udp ;; esac
[ "$TLS" = 1 ] && name=$name-tls
out=$(new_results "$name" "CONNS=$CONNS IO=$IO HOLD=$HOLD UPGRADE=$UPGRADE PROCS=$PROCS CLIENT_PROCS=$CLIENT_PROCS HEARTBEAT=$HEARTBEAT TIMEOUT=$TIMEOUT RATE=$RATE CONCURRENCY=$CONCURRENCY CLIENT_NICE=$CLIENT_NICE IPS=$IPS SERVER_FLAGS='$SERVER_FLAGS'${CLIENT_FLAGS:+ CLIENT_FLAGS='$CLIENT_FLAGS'}$( [ "$TLS" = 1 ] && echo ' TLS=1')$( [ "$SERVER" = ./target/release/server ] || echo " SERVER=$SERVER") bash $0 $*")
procs_flag=()
[ "$PROCS" = 0 ] || procs_flag=(--procs "$PROCS")
read -r -a server_flags <<< "$SERVER_FLAGS"
read -r -a client_flags <<< "$CLIENT_FLAGS"
work=$(mktemp -d)
if [ "$TLS" = 1 ]; then
  mkdir -p "$work/pki" && make_test_pki "$work/pki"
  server_flags+=(--tls-cert "$work/pki/cert.pem" --tls-key "$work/pki/key.pem")
  client_flags+=(--tls --tls-ca "$work/pki/ca.pem" --redial-on-close)
fi
restore() {
  [ "$TUNE" = 1 ] || return 0
  bash kernel-tuning/apply.sh --restore "$PWD/$out/sysctl-backup.conf" >> "$out/kernel-apply.txt" 2>&1
}
trap 'rm -rf "$work"; [ -z "${new:-}" ] || kill "$new" 2>/dev/null || true; [ -z "${old:-}" ] || kill "$old" 2>/dev/null || true; [ -z "${client:-}" ] || kill "$client" 2>/dev/null || true; restore' EXIT
if [ "$TUNE" = 1 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "upgrade: $CONNS devices need kernel-tuning/ applied, which needs root" >&2; exit 1; }
  C1M_BACKUP="$PWD/$out/sysctl-backup.conf" bash kernel-tuning/apply.sh 2> "$out/kernel-apply.txt"
fi

"$SERVER" --listen 127.0.0.1:$PORT --admin 127.0.0.1:$APORT \
  --io "$IO" --cores 0-1 "${procs_flag[@]}" --timeout "${TIMEOUT}s" --tick 100ms --stats-interval 1s \
  "${server_flags[@]}" > "$work/stats.txt" 2> "$out/server.log" &
old=$!
wait_port $PORT
nice -n "$CLIENT_NICE" ./target/release/client --server 127.0.0.1:$PORT --ips "$IPS" --rate "$RATE" --concurrency "$CONCURRENCY" \
  --conns "$CONNS" --heartbeat "${HEARTBEAT}s" --hold "${HOLD}s" --server-timeout "${TIMEOUT}s" \
  --cores 0-1 --procs "$CLIENT_PROCS" --out "$work/client" "${client_flags[@]}" > "$work/client.txt" 2>&1 &
client=$!

# RSS of both processes every 100 ms (kB; the new one's pid once known).
# Under --procs: the supervisor's, and its workers' together (old and new),
# in one awk per sample (every 0.5 s past 8 workers: forks cost CPU here).
every=0.1
[ "$PROCS" -gt 8 ] && every=0.5
(
  while [ "$PROCS" != 0 ] && kill -0 $client 2>/dev/null; do
    s=$(awk '/VmRSS/{print $2}' /proc/$old/status 2>/dev/null || echo 0)
    files=()
    for k in $(cat /proc/$old/task/*/children 2>/dev/null); do files+=("/proc/$k/status"); done
    w=0
    [ "${#files[@]}" = 0 ] || w=$(awk '/VmRSS/{s+=$2} END{print s+0}' "${files[@]}" 2>/dev/null || echo 0)
    echo "$(date +%s.%N | cut -c1-14) ${s:-0} ${w:-0}"
    sleep $every
  done
  while [ "$PROCS" = 0 ] && kill -0 $client 2>/dev/null; do
    n=$(grep -o 'new process (pid [0-9]*' "$out/server.log" 2>/dev/null | grep -o '[0-9]*$' | tail -1 || true)
    o=$(awk '/VmRSS/{print $2}' /proc/$old/status 2>/dev/null || echo 0)
    r=0
    [ -n "$n" ] && r=$(awk '/VmRSS/{print $2}' /proc/"$n"/status 2>/dev/null || echo 0)
    echo "$(date +%s.%N | cut -c1-14) ${o:-0} ${r:-0}"
    sleep 0.1
  done
) > "$out/rss.txt" &

# The box's CPU every 2 s (percent of all CPUs, from /proc/stat): how much
# of it the fleet's heartbeats leave for a handover.
echo "unix_s busy_pct user_pct system_pct softirq_pct" > "$out/cpu.txt"
(
  read -r -a a < /proc/stat
  while kill -0 $client 2>/dev/null; do
    sleep 2
    read -r -a b < /proc/stat
    t=0
    for k in 1 2 3 4 5 6 7 8; do t=$(( t + b[k] - a[k] )); done
    idle=$(( b[4] - a[4] + b[5] - a[5] ))
    [ "$t" -gt 0 ] && echo "$(date +%s) $(( 100 * (t - idle) / t )) $(( 100 * (b[1] - a[1]) / t )) $(( 100 * (b[3] - a[3]) / t )) $(( 100 * (b[7] - a[7]) / t ))"
    a=("${b[@]}")
  done
) >> "$out/cpu.txt" &

# Wait for the fleet's hold (the client says "holding" once every core has
# ramped; up to 60 s plus a second per 10,000 devices), then half the hold.
for _ in $(seq $(( 600 + CONNS / 1000 ))); do
  grep -q "holding" "$work/client.txt" 2>/dev/null && break
  kill -0 $client 2>/dev/null || break
  sleep 0.1
done
sleep $((HOLD / 2))
before=$(grep -o 'conns=[0-9]*' "$work/stats.txt" | tail -1)
t0=$(date +%s%N)
echo "$(date +%s) trigger" >> "$out/cpu.txt"
[ "$UPGRADE" = 1 ] && curl -s -X POST "http://127.0.0.1:$APORT/upgrade" > "$work/trigger.txt"
done_re='this process exits\|upgrade refused\|upgrade failed'
[ "$PROCS" = 0 ] || done_re='workers handed over to new processes\|upgrade stopped\|upgrade refused'
for _ in $(seq "$((UPGRADE * 6000))"); do
  grep -q "$done_re" "$out/server.log" && break
  sleep 0.01
done
t1=$(date +%s%N)
echo "$(date +%s) rollout-end" >> "$out/cpu.txt"
new=""
[ "$PROCS" != 0 ] || new=$(grep -o 'new process (pid [0-9]*' "$out/server.log" | grep -o '[0-9]*$' | tail -1 || true)
wait $client || true
[ "$UPGRADE" = 1 ] && [ "$PROCS" = 0 ] || kill -TERM $old
wait $old || true
old=""
sleep 1
if [ -n "$new" ]; then kill -TERM "$new" 2>/dev/null || true; sleep 2; fi
new=""
cp "$work/client/summary.json" "$out/summary.json" 2>/dev/null || true
cp "$work/client.txt" "$out/client.txt"
cp "$work/client/timeline.csv" "$out/timeline.csv" 2>/dev/null || true
grep '^final ' "$work/stats.txt" > "$out/server-final.txt" || true

handed=$(grep -o 'handed [0-9]* listeners and [0-9]* connections.* in [0-9]* ms' "$out/server.log" | paste -sd';' || true)
took=$(grep -o 'took over [0-9]* connections .* in [0-9]* ms' "$out/server.log" | paste -sd';' || true)
rollout=$(grep -o 'upgrade: worker [0-9]* .*handed over to pid [0-9]* in [0-9]* ms\|upgrade: all [0-9]* workers .*\|upgrade stopped.*' "$out/server.log" | paste -sd';' || true)
peak=$(awk '{s=$2+$3; if (s>m) m=s} END {print m/1024}' "$out/rss.txt")
python3 - "$out" "$CONNS" "$IO" "$(( (t1 - t0) / 1000000 ))" "$handed" "$took" "$peak" "$before" "$PROCS" "$rollout" "$HEARTBEAT" <<'EOF'
import json, re, sys
out, conns, io, wall, handed, took, peak, before, procs, rollout, heartbeat = sys.argv[1:]
procs = int(procs)
try:
    s = json.load(open(f"{out}/summary.json"))["figures"]
except Exception:
    s = {}
g = lambda k: s.get(k)
finals = open(f"{out}/server-final.txt").read().splitlines()
def count(line, key):
    m = re.search(rf" {key}=(\d+)", line)
    return m.group(1) if m else "?"
old_final = finals[0] if finals else ""
new_final = finals[1] if len(finals) > 1 else ""
def ms(text):
    return [int(m) for m in re.findall(r"in (\d+) ms", text)]
def conns_of(text, pat):
    return sum(int(m) for m in re.findall(pat, text))
if procs:
    steps = [s for s in rollout.split(";") if "handed over to pid" in s]
    per = [ms(s)[0] for s in steps if ms(s)]
    moved = conns_of(handed, r"and (\d+) connections")
    taken = conns_of(took, r"took over (\d+) connections")
    head = [
        f"# Hot upgrade under load: {conns} devices, io {io}, --procs {procs}",
        "",
        f"- fleet before the trigger: {before}",
        f"- trigger (POST /upgrade to the supervisor) to its last rollout line: {wall} ms",
        f"- supervisor: {rollout or 'no rollout line'}",
        f"- per worker, new process started to old exited (ms): {per}" + (f" (median {sorted(per)[len(per) // 2]}, max {max(per)})" if per else ""),
        f"- the whole handover per 100,000 connections: {int(wall) * 100000 // max(int(conns), 1)} ms",
        f"- old workers: {moved} connections handed over in all; per worker (ms): {ms(handed)}",
        f"- new workers: {taken} taken over in all; per worker (ms): {ms(took)}",
    ]
else:
    head = [
        f"# Hot upgrade under load: {conns} devices, io {io}",
        "",
        f"- fleet before the trigger: {before}",
        f"- trigger (POST /upgrade) to the old process's last line: {wall} ms",
        f"- old process: {handed or 'no handover line'}",
        f"- new process: {took or 'no takeover line'}",
    ]
lines = head + [
    f"- heartbeat round trip over the whole hold (pings every {heartbeat} s): p50 {g('heartbeat_rtt_p50_ms')} ms, p99 {g('heartbeat_rtt_p99_ms')} ms, max {g('heartbeat_rtt_max_ms')} ms (the longest gap any device saw)",
    f"- heartbeats {g('heartbeats')}, replies {g('heartbeat_replies')} (a device counts one reply per outstanding ping: a reply lost before its last ping would show on its next reply as a round trip over {0.9 * float(heartbeat):g} s, so a difference with max under that is pings of the hold's last moments, unanswered when the client closed)",
    f"- disconnects: false_expiries {g('false_expiries')} (heartbeating devices the server closed), expired_early {g('expired_early')}, bad_server_frames {g('bad_server_frames')}, replaced {g('replaced')}",
    f"- established {g('established')} of {g('target_connections')}, failed {g('failed')}",
    f"- peak RSS of both processes together: {float(peak):.1f} MiB (rss.txt: old, new, kB)" if not procs else
    f"- peak RSS of the supervisor and all its workers (old and new) together: {float(peak):.1f} MiB (rss.txt: supervisor, workers, kB)",
]
if procs:
    lines.append(f"- server final (every worker incarnation summed; after the client left): handed_over={count(old_final, 'handed_over')} taken_over={count(old_final, 'taken_over')} cancels={count(old_final, 'cancels')} expired={count(old_final, 'expired')}")
else:
    lines += [
        f"- old process final: handed_over={count(old_final, 'handed_over')} cancels={count(old_final, 'cancels')} expired={count(old_final, 'expired')}",
        f"- new process final (after the client left: its peer_gone are the fleet's end): taken_over={count(new_final, 'taken_over')} expired={count(new_final, 'expired')} cancels={count(new_final, 'cancels')}",
    ]
if g('drain_closes') is not None or "TLS=1" in open(f"{out}/command.txt").read():
    lines.append(f"- wss devices the server closed with 1001 (the client reconnects them, backoff with full jitter from 100 ms): {g('drain_closes')}, back {g('drain_back')}, not back by the hold's end {g('drain_unrecovered')}; attempts {g('drain_attempts')}, failed {g('drain_failed')}; away (Close to 101 again) p50 {g('drain_away_p50_ms')} ms, p99 {g('drain_away_p99_ms')} ms, max {g('drain_away_max_ms')} ms")
    lines.append(f"- TLS handshakes (client, ramp and reconnects): {g('tls_handshakes')}, resumed {g('tls_resumed')}" + ("" if procs else f"; the new process's (the reconnects'): {count(new_final, 'tls_handshakes')}, resumed {count(new_final, 'tls_resumed')}"))
if any(count(f, k) not in ("0", "?") for f in (old_final, new_final) for k in ("udp_heartbeats", "udp_stale", "udp_bad")):
    lines.append("- UDP heartbeats (old process, then new): " + "; ".join(
        " ".join(f"{k}={count(f, k)}" for k in ("udp_heartbeats", "udp_stale", "udp_bad"))
        for f in (old_final, new_final) if f))
def cpu_between(lo, hi):
    v = []
    for l in open(f"{out}/cpu.txt").read().splitlines()[1:]:
        f = l.split()
        if len(f) == 5 and lo < int(f[0]) <= hi:
            v.append(int(f[1]))
    return f"{sum(v) / len(v):.0f}%" if v else "-"
marks = {}
for l in open(f"{out}/cpu.txt").read().splitlines()[1:]:
    f = l.split()
    if len(f) == 2:
        marks[f[1]] = int(f[0])
if "trigger" in marks:
    end = marks.get("rollout-end", marks["trigger"])
    lines.append(f"- the box's CPU busy (cpu.txt, all CPUs): {cpu_between(marks['trigger'] - 20, marks['trigger'])} in the 20 s before the trigger, {cpu_between(marks['trigger'], end + 2)} during the rollout")
    if "TLS=1" in open(f"{out}/command.txt").read():
        lines.append(f"- the box's CPU busy in the 12 s after the trigger (the default 10 s window of wss closes, and their reconnects): {cpu_between(marks['trigger'], marks['trigger'] + 12)}")
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "results in $out"
exit 0
