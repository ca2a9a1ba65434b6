#!/usr/bin/env bash
# RFC 6455 conformance: the Autobahn fuzzing client against `server --echo`.
# Usage: conformance/autobahn.sh [CASES]   (default 1.*-7.*,10.*: about a minute)
# Needs ../shared/tools/autobahn (its setup.sh installs the suite on Python 3).
# Keeps index.json and the summary in results/<UTC time>-autobahn/; exits 1
# on any FAILED case.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CASES=${1:-"1.*,2.*,3.*,4.*,5.*,6.*,7.*,10.*"}
PORT=${PORT:-9402}
AB=${AB:-../shared/tools/autobahn}
[ -f "$AB/run.sh" ] || { echo "autobahn: $AB/run.sh not found; set AB= to the shared autobahn tools" >&2; exit 1; }
cargo build --release --quiet --bin server
out=$(new_results autobahn "CASES='$CASES' conformance/autobahn.sh")
# Cases 9.* send messages up to 16 MiB in up to 65,536 fragments.
./target/release/server --listen 127.0.0.1:$PORT --echo --max-message 16MiB --stats-interval 0 2>"$out/server.err" &
server=$!
trap 'kill -9 $server 2>/dev/null || true' EXIT
wait_port $PORT
work=$(mktemp -d)
set +e
bash "$AB/run.sh" "ws://127.0.0.1:$PORT/ws?id=autobahn" "$work" "$CASES" | tee "$out/summary.txt"
rc=${PIPESTATUS[0]}
set -e
cp "$work/index.json" "$out/" 2>/dev/null || true
python3 - "$work/index.json" >> "$out/summary.txt" <<'PY' || true
import json, sys
for agent, cases in json.load(open(sys.argv[1])).items():
    for case, r in sorted(cases.items()):
        if r["behavior"] != "OK" or r.get("behaviorClose") not in ("OK", "INFORMATIONAL"):
            print(f"{case}: {r['behavior']} (close: {r.get('behaviorClose')})")
PY
rm -rf "$work"
echo "autobahn: wrote $out" >&2
exit "$rc"
