#!/usr/bin/env bash
# Where the CPU and the bytes per connection went between a base build
# (default ae7924c: the I/O driver landed, before the registry and the later
# capabilities) and this tree (issue 18, item 1). Deterministic measures, so
# the 2 shared cores' noise does not decide it:
#   - callgrind (instructions) on a one-shard server (--cores 0), both
#     backends, N connections: phases idle (start, stop), conn (N upgrades,
#     closed by the client with a reset, no heartbeats), hb (the same plus
#     HB_HOLD of pings every HB_INTERVAL), expiry (N silent devices deleted
#     by the wheel, --timeout 2s --tick 100ms), and on epoll at the first N
#     idle2/conn2 with 2 shards (half the registry messages cross shards
#     through the mailbox and its eventfd). Per connection =
#     (conn - idle) / N; per heartbeat = (hb - conn) / pings; per expiry =
#     (expiry - conn) / N (an expiry in place of a peer's close).
#   - dhat (heap bytes live at the peak, by allocation site) with 2 shards
#     (--cores 0-1, as bench/core.sh runs it; 1 shard on uring) at each N,
#     conn phase held 3 s.
#   - native RSS per connection from the client (2 shards, one run each).
# The load is the client (target/release/client, 512 upgrades in flight per
# core, a connect timeout of 600 s for valgrind's pace); phases without
# heartbeats give it --heartbeat 86400s (each device's first at a random
# point of the day: a handful in a run, counted in the pings column).
# Usage: bench/profile-budget.sh   (about 30-40 minutes on a busy 2-core box)
#   NS="2000 15000" IOS="epoll uring" BASE=ae7924c BASE_BIN=/work/builds/ae7924c
#   PHASES="idle conn hb expiry" (callgrind) DHAT=1 NATIVE=1 SKIP_BUILD=1
# Writes: results/<UTC time>-budget-profile/{summary.md,runs.tsv,command.txt,
#   cg-*.txt (callgrind_annotate inclusive top, self cost by file/function),
#   dhat-*.txt (live bytes by site), native-*.json}
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

BASE=${BASE:-ae7924c}
BASE_BIN=${BASE_BIN:-/work/builds/$BASE}
NS=${NS:-"2000 15000"}
IOS=${IOS:-"epoll uring"}
PHASES=${PHASES:-"idle conn hb expiry idle2 conn2"}
DUMP_BB=${DUMP_BB:-100000}
EXPIRY_NS=${EXPIRY_NS:-2000}
DHAT=${DHAT:-1}
NATIVE=${NATIVE:-1}
HB_HOLD=${HB_HOLD:-10s}
HB_INTERVAL=${HB_INTERVAL:-5s}
PORT=${PORT:-9450}
IPS=${IPS:-127.0.0.2-127.0.0.11}
command -v valgrind >/dev/null || { echo "profile-budget: valgrind is not installed" >&2; exit 1; }

[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --bin server --bin client
if [ ! -x "$BASE_BIN/server" ]; then
  src="target/profile-base-$BASE"
  [ -d "$src" ] || git worktree add --detach "$src" "$BASE"
  (cd "$src" && cargo build --release --quiet --bin server)
  mkdir -p "$BASE_BIN" && cp "$src/target/release/server" "$BASE_BIN/server"
fi
MAIN_BIN=./target/release/server
CLIENT=./target/release/client
out=$(new_results budget-profile "BASE=$BASE BASE_BIN=$BASE_BIN NS='$NS' IOS='$IOS' PHASES='$PHASES' EXPIRY_NS='$EXPIRY_NS' DHAT=$DHAT NATIVE=$NATIVE HB_HOLD=$HB_HOLD HB_INTERVAL=$HB_INTERVAL bench/profile-budget.sh")
echo "main: $(git rev-parse --short HEAD); base: $BASE ($BASE_BIN/server)" >> "$out/command.txt"
raw=$(mktemp -d /tmp/profile-budget.XXXXXX)
echo "raw callgrind/dhat files: $raw (not kept in results/)" >> "$out/command.txt"
printf "tool\tbuild\tio\tn\tphase\testablished\tpings\tpongs\tclosed_silent\taccepted\ttotal\n" > "$out/runs.tsv"

server_pid=""
cleanup() { [ -n "$server_pid" ] && kill -9 "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT

# jfield FILE KEY: a number from bench/client_json.py's one-line JSON (0 when absent).
jfield() { grep -o "\"$2\":[0-9.]*" "$1" 2>/dev/null | head -1 | cut -d: -f2 || true; }

# poke PORT MAX [always]: up to MAX connections opened and closed at once,
# while the server lives (all MAX with "always").
poke() {
  local i
  for i in $(seq "$2"); do
    [ -n "${3:-}" ] || kill -0 "$server_pid" 2>/dev/null || break
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null || break
  done
}

# settle PID: returns once PID's CPU time has not moved for 2 s (at most 120 s).
settle() {
  local last=-1 now same=0
  for _ in $(seq 240); do
    now=$(proc_ticks "$1")
    if [ "$now" = "$last" ]; then same=$((same + 1)); [ $same -ge 4 ] && return 0; else same=0; fi
    last=$now
    sleep 0.5
  done
}

# run TOOL BUILD IO N PHASE
run() {
  local tool=$1 build=$2 io=$3 n=$4 phase=$5 bin port tag cores=0 sflags=() pre=() lg=()
  [ "$build" = main ] && bin=$MAIN_BIN || bin=$BASE_BIN/server
  PORT=$((PORT + 1)); port=$PORT
  tag="$tool-$build-$io-$n-$phase"
  # dhat: 2 shards as bench/core.sh runs them, but 1 on uring (under
  # valgrind a blocked uring shard starves the other: 20 conn/s).
  [ "$tool" = native ] && cores=0-1
  [ "$tool" = dhat ] && [ "$io" = epoll ] && cores=0-1
  case $phase in idle2|conn2) cores=0-1 ;; esac
  [ "$phase" = expiry ] && sflags=(--timeout 2s --tick 100ms)
  case $tool in
    callgrind) pre=(valgrind -q --tool=callgrind --dump-instr=no --callgrind-out-file="$raw/$tag.cg")
      # uring: see stop below; parts every DUMP_BB basic blocks, summed.
      [ "$io" = uring ] && pre+=(--dump-every-bb="$DUMP_BB") ;;
    dhat) pre=(valgrind -q --tool=dhat --dhat-out-file="$raw/$tag.json") ;;
    native) pre=() ;;
  esac
  "${pre[@]}" "$bin" --io "$io" --listen 127.0.0.1:$port --cores $cores --stats-interval 0 "${sflags[@]}" \
    >"$raw/$tag.out" 2>"$raw/$tag.err" &
  server_pid=$!
  for _ in $(seq 1200); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  sleep 1
  case $phase in
    idle|idlepoke|idle2) lg=() ;;
    conn|conn2) lg=(--conns "$n" --hold 1s --heartbeat 86400s) ;;
    mem) lg=(--conns "$n" --hold 3s --heartbeat 86400s) ;;
    hb) lg=(--conns "$n" --hold "$HB_HOLD" --heartbeat "$HB_INTERVAL") ;;
    expiry) lg=(--conns "$n" --hold 6s --heartbeat 86400s --silent 1 --server-timeout 2s) ;;
    native) lg=(--conns "$n" --hold 3s --heartbeat 1s --server-pid "$server_pid") ;;
  esac
  : > "$raw/$tag.lg.json"
  if [ ${#lg[@]} -gt 0 ]; then
    local rc=0
    timeout 900 "$CLIENT" --server 127.0.0.1:$port --ips "$IPS" --concurrency 512 --connect-timeout 600s \
      --quiet --out "$raw/$tag.client" "${lg[@]}" > /dev/null 2>> "$raw/$tag.client.err" || rc=$?
    # 2: completed, with false, early or missed expiries (in the figures).
    if [ "$rc" = 0 ] || [ "$rc" = 2 ]; then
      python3 bench/client_json.py "$raw/$tag.client" > "$raw/$tag.lg.json"
    else
      echo "profile-budget: the client failed (exit $rc) in $tag: see $raw/$tag.client.err" >&2
    fi
  fi
  if [ "$phase" = idlepoke ]; then poke $port 2000 always; fi
  # valgrind 3.19 holds its thread lock through io_uring_enter (not marked
  # as blocking): an idle uring shard starves the thread that takes
  # SIGTERM. callgrind on uring: the profile is dumped in parts every
  # DUMP_BB basic blocks; once the server's CPU time stands still it is
  # killed, and the parts are summed (what ran after the last part, less
  # than DUMP_BB blocks, is lost). dhat (one file, at exit): SIGTERM, then
  # short connections wake the shard until the signal is seen.
  if [ "$tool" = callgrind ] && [ "$io" = uring ]; then
    settle "$server_pid"
    kill -9 "$server_pid" 2>/dev/null || true
  else
    kill -TERM "$server_pid" 2>/dev/null || true
    if [ "$tool" != native ] && [ "$io" = uring ]; then poke $port 30000; fi
  fi
  for _ in $(seq 1800); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
  local total=0
  case $tool in
    callgrind) total=$(cat "$raw/$tag".cg* 2>/dev/null | awk '/^totals:/{s+=$2} END{print s+0}') ;;
    dhat) total=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sum(p.get("gb",0) for p in d["pps"]))' "$raw/$tag.json") ;;
    native) cp "$raw/$tag.lg.json" "$out/$tag.json"; total=$(jfield "$raw/$tag.lg.json" server_rss_per_conn_bytes) ;;
  esac
  local f="$raw/$tag.lg.json"
  local accepted
  accepted=$(cat "$raw/$tag.out" "$raw/$tag.err" | grep -o "^final total accepted=[0-9]*" | tail -1 | cut -d= -f2 || true)
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$tool" "$build" "$io" "$n" "$phase" \
    "$(jfield "$f" established)" "$(jfield "$f" pings)" "$(jfield "$f" pongs)" "$(jfield "$f" server_closed_silent)" "${accepted:-0}" "${total:-0}" >> "$out/runs.tsv"
  echo "profile-budget: $tag total ${total:-0} accepted ${accepted:-0} established $(jfield "$f" established) pings $(jfield "$f" pings)" >&2
  if [ "$tool" = callgrind ] && [ "$phase" != idle ] && [ "$phase" != idle2 ] && [ "$phase" != idlepoke ]; then
    local div=$n
    {
      if [ -s "$raw/$tag.cg" ]; then
        echo "# callgrind_annotate --inclusive=yes (top rows), $tag"
        callgrind_annotate --inclusive=yes "$raw/$tag.cg" 2>/dev/null | sed -n '1,45p' | cut -c1-160
        echo
      fi
      python3 bench/callgrind_self.py "$(ls "$raw/$tag".cg* | paste -sd,)" "$div" 30 | cut -c1-160
    } > "$out/cg-$tag.txt"
  fi
  if [ "$tool" = dhat ] && [ -s "$raw/$tag.json" ]; then
    python3 bench/dhat_sites.py "$raw/$tag.json" "$n" 30 | cut -c1-260 > "$out/dhat-$tag.txt"
  fi
  sleep 1
}

for io in $IOS; do
  for n in $NS; do
    for phase in $PHASES; do
      [ "$phase" = idle ] && [ "$n" != "${NS%% *}" ] && continue
      [ "$phase" = idlepoke ] && { [ "$io" != uring ] || [ "$n" != "${NS%% *}" ]; } && continue
      # Two shards (registry messages cross between them): epoll only, since
      # under valgrind a blocked uring shard starves the other.
      case $phase in idle2|conn2) { [ "$io" = epoll ] && [ "$n" = "${NS%% *}" ]; } || continue ;; esac
      [ "$phase" = expiry ] && [[ " $EXPIRY_NS " != *" $n "* ]] && continue
      for build in base main; do run callgrind "$build" "$io" "$n" "$phase"; done
    done
    if [ "$DHAT" = 1 ]; then
      for build in base main; do run dhat "$build" "$io" "$n" mem; done
    fi
  done
  if [ "$NATIVE" = 1 ]; then
    for build in base main; do run native "$build" "$io" 15000 native; done
  fi
done

# Base against main by file and function: per connection, per heartbeat.
for io in $IOS; do
  for n in $NS; do
    c="$raw/callgrind-%s-$io-$n-%s.cg"
    parts() { ls "$(printf "$c" "$1" "$2")"* 2>/dev/null | paste -sd,; }
    # shellcheck disable=SC2059
    if [ -n "$(parts base conn)" ] && [ -n "$(parts main conn)" ]; then
      python3 bench/callgrind_diff.py "$(parts base conn)" "$n" "$(parts main conn)" "$n" 35 | cut -c1-200 > "$out/diff-conn-$io-$n.txt"
    fi
    # shellcheck disable=SC2059
    if [ -n "$(parts base hb)" ] && [ -n "$(parts main hb)" ]; then
      python3 bench/callgrind_phase_diff.py "$(parts base conn)" "$(parts base hb)" "$(parts main conn)" "$(parts main hb)" \
        "$(awk -F'\t' -v io="$io" -v n="$n" '$1=="callgrind"&&$2=="base"&&$3==io&&$4==n&&$5=="hb"{print $8}' "$out/runs.tsv")" \
        "$(awk -F'\t' -v io="$io" -v n="$n" '$1=="callgrind"&&$2=="main"&&$3==io&&$4==n&&$5=="hb"{print $8}' "$out/runs.tsv")" 30 | cut -c1-200 > "$out/diff-hb-$io-$n.txt"
    fi
  done
done
python3 bench/profile_budget_summary.py "$out/runs.tsv" > "$out/summary.md" || true
cat "$out/summary.md"
echo "profile-budget: wrote $out" >&2
