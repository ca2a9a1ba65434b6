# Shared by the bench/ and conformance/ scripts (sourced, not run).

# new_results NAME COMMAND: makes results/<UTC time>-NAME with the command
# that fills it and the git state; prints its path.
new_results() {
  local dir
  dir="results/$(date -u +%Y%m%dT%H%M%SZ)-$1"
  mkdir -p "$dir"
  echo "$2" > "$dir/command.txt"
  echo "$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo -dirty)" > "$dir/git.txt"
  echo "$dir"
}

# wait_port PORT: returns once something accepts on 127.0.0.1:PORT (fails after 5 s).
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on 127.0.0.1:$1 after 5 s" >&2
  return 1
}

# sample_threads PATTERN OUT: finds the newest process matching PATTERN
# (waits up to 10 s) and, every 0.5 s while it lives (at most 300 s),
# appends to OUT a line per thread: its id, name and CPU ticks so far
# (user + system, 1/100 s). A thread's figure is its largest (threads
# that end before the process are kept).
sample_threads() {
  local pid="" i t
  for i in $(seq 200); do
    pid=$(pgrep -nf -- "$1" || true)
    [ -n "$pid" ] && break
    sleep 0.05
  done
  [ -n "$pid" ] || return 0
  for i in $(seq 600); do
    [ -d /proc/"$pid" ] || break
    for t in /proc/"$pid"/task/*; do
      echo "${t##*/} $(cat "$t/comm" 2>/dev/null) $(awk '{print $14 + $15}' "$t/stat" 2>/dev/null)"
    done >> "$2" 2>/dev/null
    sleep 0.5
  done
}

# proc_ticks PID: the process's CPU ticks so far (user + system, 1/100 s;
# its ended threads included), or 0 when it is gone.
proc_ticks() {
  awk '{print $14 + $15}' /proc/"$1"/stat 2>/dev/null || echo 0
}

# start_nats BIN PORT STORE LOG: a nats-server with JetStream (storage in
# STORE) on 127.0.0.1:PORT, in the background ($! is its pid); returns
# once JetStream can answer.
start_nats() {
  "$1" -a 127.0.0.1 -p "$2" -js -sd "$3" > "$4" 2>&1 &
  wait_port "$2"
  sleep 0.5
}
