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
