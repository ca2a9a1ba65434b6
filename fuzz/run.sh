#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 30) with cargo fuzz on a
# nightly toolchain, and records the run counts in results/<UTC time>-fuzz/.
# Exits 1 if a target crashes (its input is kept in fuzz/artifacts/).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
SECONDS_EACH=${SECONDS:-30}
rustup toolchain list | grep -q '^nightly' || { echo "fuzz: needs a nightly toolchain (rustup toolchain install nightly)" >&2; exit 1; }
command -v cargo-fuzz >/dev/null || cargo install --quiet cargo-fuzz
out=$(new_results fuzz "SECONDS=$SECONDS_EACH fuzz/run.sh")
cd fuzz
rc=0
for target in $(cargo +nightly fuzz list); do
  if line=$(cargo +nightly fuzz run "$target" -- -max_total_time="$SECONDS_EACH" 2>&1 | grep -E '^Done [0-9]+ runs'); then
    echo "$target: $line, no crash" | tee -a "../$out/summary.txt"
  else
    echo "$target: CRASH (see fuzz/artifacts/$target/)" | tee -a "../$out/summary.txt"
    rc=1
  fi
done
exit $rc
