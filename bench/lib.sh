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

# The server's own cgroup (issue 18: kernel and user bytes per connection
# of the server apart from the client's). cgroup_make NAME prints a
# directory to write the server's pid to (its workers inherit it at fork),
# or nothing where no memory controller is writable. cgroup v2 where it is
# mounted, else v1's memory hierarchy, under this shell's own cgroup.
cgroup_make() {
  local name=$1 base dir
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    base=/sys/fs/cgroup$(awk -F: '$1=="0"{print $3}' /proc/self/cgroup)
  else
    base=/sys/fs/cgroup/memory$(awk -F: '$2=="memory"{print $3}' /proc/self/cgroup)
  fi
  dir="$base/$name"
  mkdir "$dir" 2>/dev/null || return 0
  # v1 accounts TCP buffer memory only once a limit is written.
  [ -f "$dir/memory.kmem.tcp.limit_in_bytes" ] && echo $((1 << 40)) > "$dir/memory.kmem.tcp.limit_in_bytes" 2>/dev/null
  echo "$dir"
}

# cgroup_snapshot DIR FILE CONNS: the cgroup's memory figures, and per
# connection: total, kernel (v1 kmem; v2 slab + sock + kernel_stack +
# pagetables), sockets (v1 kmem.tcp; v2 sock), user (v1 rss + shmem; v2
# anon + shmem).
cgroup_snapshot() {
  local dir=$1 file=$2 conns=$3
  [ -n "$dir" ] && [ -d "$dir" ] || return 0
  {
    echo "cgroup: $dir"
    for f in memory.current memory.usage_in_bytes memory.kmem.usage_in_bytes memory.kmem.tcp.usage_in_bytes; do
      [ -f "$dir/$f" ] && echo "$f $(cat "$dir/$f")"
    done
    echo "--- memory.stat"
    cat "$dir/memory.stat"
  } > "$file"
  python3 - "$file" "$conns" >> "$file" <<'PY'
import sys
lines = open(sys.argv[1]).read().split("\n")
conns = int(sys.argv[2])
kv = {}
for l in lines:
    p = l.split()
    if len(p) == 2 and p[1].isdigit():
        kv.setdefault(p[0], int(p[1]))
if "memory.current" in kv:  # v2
    total = kv["memory.current"]
    kernel = sum(kv.get(k, 0) for k in ("slab", "sock", "kernel_stack", "pagetables"))
    sock = kv.get("sock", 0)
    user = kv.get("anon", 0) + kv.get("shmem", 0)
else:  # v1
    total = kv.get("memory.usage_in_bytes", 0)
    kernel = kv.get("memory.kmem.usage_in_bytes", 0)
    sock = kv.get("memory.kmem.tcp.usage_in_bytes", 0)
    user = kv.get("rss", 0) + kv.get("shmem", 0)
print("--- per connection (%d)" % conns)
for name, v in (("total", total), ("kernel", kernel), ("sockets", sock), ("user", user)):
    print("%s_bytes_per_conn %.0f" % (name, v / max(conns, 1)))
PY
}

# cgroup_remove DIR: once its processes have exited.
cgroup_remove() {
  [ -n "${1:-}" ] && [ -d "$1" ] && rmdir "$1" 2>/dev/null || true
}

# make_test_pki DIR: a CA and a certificate for localhost it signed, in DIR
# (ca.pem, cert.pem, key.pem): P-256, as a fleet would use (the cheapest
# signature for the server to make per full handshake). Needs openssl.
make_test_pki() {
  local pki=$1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$pki/ca.key" -out "$pki/ca.pem" -days 2 -subj "/CN=c1m bench CA" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$pki/key.pem" -out "$pki/req.csr" -subj /CN=localhost 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n' > "$pki/ext.cnf"
  openssl x509 -req -in "$pki/req.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" \
    -CAcreateserial -out "$pki/cert.pem" -days 2 -extfile "$pki/ext.cnf" 2>/dev/null
}
