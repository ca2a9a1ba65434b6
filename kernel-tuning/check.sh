#!/usr/bin/env bash
# Compares this host with kernel-tuning/sysctl.d/90-c1m.conf and the fd limit.
# Usage: kernel-tuning/check.sh [CONNECTIONS [PROCS]]   (default 1000000 1)
# PROCS: server worker processes (--procs), which share the connections, so
# each needs RLIMIT_NOFILE for its share only.
# Prints one line per setting (current, recommended, ok/MUST/should) and exits 1
# when a must is unmet: what the server needs to hold CONNECTIONS at all.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
conns=${1:-1000000}
procs=${2:-1}
fds=$((conns + conns / 20 + 1000))
per_proc=$(( (conns + procs - 1) / procs + (conns / procs) / 20 + 100 ))
fail=0

row() { printf '%-34s %-26s %-26s %s\n' "$1" "$2" "$3" "$4"; }
row setting current recommended verdict

# Musts, scaled to CONNECTIONS.
must_ge() {
  local name=$1 cur=$2 want=$3
  if [ -z "$cur" ]; then row "$name" "(unavailable)" ">= $want" "MUST"; fail=1
  elif [ "$cur" -ge "$want" ] 2>/dev/null; then row "$name" "$cur" ">= $want" "ok"
  else row "$name" "$cur" ">= $want" "MUST"; fail=1; fi
}
must_ge "RLIMIT_NOFILE (ulimit -Hn)" "$(ulimit -Hn | sed 's/unlimited/999999999999/')" "$per_proc"
must_ge fs.nr_open "$(cat /proc/sys/fs/nr_open 2>/dev/null)" "$per_proc"
must_ge fs.file-max "$(cat /proc/sys/fs/file-max 2>/dev/null)" "$fds"

# Shoulds: the values of the sysctl file.
while IFS='=' read -r key value; do
  key=$(echo "$key" | xargs); value=$(echo "$value" | xargs)
  case $key in ''|'#'*|fs.file-max|fs.nr_open) continue ;; esac
  path=/proc/sys/${key//.//}
  if [ ! -r "$path" ]; then row "$key" "(not present)" "$value" "skip"; continue; fi
  cur=$(tr -s '[:space:]' ' ' < "$path" | xargs)
  if [ "$cur" = "$value" ]; then verdict=ok
  else
    # Single numbers: larger than recommended is fine, except for timeouts.
    verdict=should
    if [[ $cur =~ ^[0-9]+$ && $value =~ ^[0-9]+$ ]]; then
      case $key in
        *timeout*) [ "$cur" -le "$value" ] && verdict=ok ;;
        *) [ "$cur" -ge "$value" ] && verdict=ok ;;
      esac
    fi
  fi
  row "$key" "$cur" "$value" "$verdict"
done < <(sed -e 's/#.*//' "$here/sysctl.d/90-c1m.conf" | grep =)

free_kb=$(awk '/MemAvailable/{print $2}' /proc/meminfo)
need_kb=$((conns * 5))   # ~5 KiB of kernel memory per idle server socket (measured on these machines: 3,903 B per connection, results/1m-20261206T174028Z)
if [ "$free_kb" -ge "$need_kb" ]; then v=ok; else v=should; fi
row "MemAvailable (KiB)" "$free_kb" ">= $need_kb" "$v"

if [ $fail -ne 0 ]; then
  echo "check: this host cannot hold $conns connections in one process: raise the MUST lines (kernel-tuning/apply.sh, limits.d), or run several worker processes" >&2
fi
exit $fail
