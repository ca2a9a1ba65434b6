#!/usr/bin/env bash
# Applies kernel-tuning/sysctl.d/90-c1m.conf at runtime, after saving the
# current values. Usage:
#   kernel-tuning/apply.sh                 apply; prints the backup file
#   kernel-tuning/apply.sh --restore FILE  put the saved values back
# Settings the kernel does not have (e.g. nf_conntrack not loaded) are skipped.
# RLIMIT_NOFILE is per process: install limits.d/90-c1m.conf (new logins) or
# use LimitNOFILE= in systemd (c1m-server@.service).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" -eq 0 ] || { echo "apply: run as root (sysctl -w)" >&2; exit 1; }

if [ "${1:-}" = "--restore" ]; then
  file=${2:?"apply: --restore needs the backup file apply.sh printed"}
  while IFS='=' read -r key value; do
    key=$(echo "$key" | xargs); value=$(echo "$value" | xargs)
    [ -n "$key" ] || continue
    sysctl -q -w "$key=$value" || echo "apply: could not restore $key" >&2
  done < "$file"
  echo "apply: restored $(grep -c = "$file") settings from $file"
  exit 0
fi

backup=${C1M_BACKUP:-/var/tmp/c1m-sysctl-backup-$(date -u +%Y%m%dT%H%M%SZ).conf}
: > "$backup"
applied=0
while IFS='=' read -r key value; do
  key=$(echo "$key" | xargs); value=$(echo "$value" | xargs)
  case $key in ''|'#'*) continue ;; esac
  path=/proc/sys/${key//.//}
  if [ ! -w "$path" ]; then echo "apply: skipping $key (not present on this kernel)" >&2; continue; fi
  cur=$(tr -s '[:space:]' ' ' < "$path" | xargs)
  # Never lower a single-number limit the host already has higher (timeouts aside).
  if [[ $cur =~ ^[0-9]+$ && $value =~ ^[0-9]+$ && $key != *timeout* ]] && [ "$cur" -ge "$value" ]; then
    echo "apply: keeping $key = $cur (>= $value)" >&2; continue
  fi
  echo "$key = $cur" >> "$backup"
  if sysctl -q -w "$key=$value"; then applied=$((applied + 1)); else echo "apply: could not set $key" >&2; fi
done < <(sed -e 's/#.*//' "$here/sysctl.d/90-c1m.conf" | grep =)
echo "apply: set $applied settings; to undo: $0 --restore $backup"
