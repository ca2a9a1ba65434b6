#!/usr/bin/env bash
# Interop with real WebSocket clients: Python `websockets` (PyPI), Node `ws`
# (npm) and `websocat` (crates.io). Each connects with an id, pings and gets
# its pong (websockets, ws), sends text and gets it echoed (server --echo),
# and closes cleanly with 1000. Installs the clients under target/interop/;
# a client whose registry cannot be reached is skipped with the reason.
# Usage: conformance/interop.sh   (SKIP_WEBSOCAT=1 skips its ~3 min build)
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
PORT=${PORT:-9409}
dir=target/interop
mkdir -p "$dir"
cargo build --release --quiet --bin server || exit 1
./target/release/server --listen 127.0.0.1:$PORT --echo --stats-interval 0 2>/dev/null &
server=$!
trap 'kill -9 $server 2>/dev/null' EXIT
wait_port $PORT
url="ws://127.0.0.1:$PORT/ws?id=interop"
results=$(new_results interop "conformance/interop.sh")
exec > >(tee "$results/summary.txt") 2>&1
pass=0 fail=0 skip=0
result() { # name status detail
  echo "interop: $1: $2${3:+ ($3)}"
  case $2 in PASS) pass=$((pass + 1)) ;; FAIL) fail=$((fail + 1)) ;; *) skip=$((skip + 1)) ;; esac
}

# Python websockets
if [ -d "$dir/py/websockets" ] || pip install -q --target "$dir/py" websockets >/dev/null 2>&1; then
  out=$(PYTHONPATH="$dir/py" timeout 20 python3 - "$url" <<'PY' 2>&1
import asyncio, sys
from websockets.asyncio.client import connect
async def main():
    async with connect(sys.argv[1]) as ws:
        pong = await ws.ping(b"py-ping")
        await asyncio.wait_for(pong, 5)
        await ws.send("hello from python")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello from python"
        await ws.close(1000)
        assert ws.close_code == 1000, ws.close_code
    print("ok")
asyncio.run(main())
PY
)
  [ "$out" = ok ] && result "python websockets" PASS || result "python websockets" FAIL "$out"
else
  result "python websockets" SKIP "pip install websockets failed: PyPI unreachable?"
fi

# Node ws
if [ -d "$dir/node/node_modules/ws" ] || npm install --silent --prefix "$dir/node" ws >/dev/null 2>&1; then
  out=$(NODE_PATH="$dir/node/node_modules" timeout 20 node - "$url" <<'JS' 2>&1
const WebSocket = require("ws");
const ws = new WebSocket(process.argv[2]);
ws.on("open", () => ws.ping(Buffer.from("node-ping")));
ws.on("pong", (data) => {
  if (data.toString() !== "node-ping") { console.log("bad pong " + data); process.exit(1); }
  ws.send("hello from node");
});
ws.on("message", (data) => {
  if (data.toString() !== "hello from node") { console.log("bad echo " + data); process.exit(1); }
  ws.close(1000);
});
ws.on("close", (code) => { console.log(code === 1000 ? "ok" : "close code " + code); });
ws.on("error", (e) => { console.log("error " + e.message); process.exit(1); });
JS
)
  [ "$out" = ok ] && result "node ws" PASS || result "node ws" FAIL "$out"
else
  result "node ws" SKIP "npm install ws failed: npm registry unreachable?"
fi

# websocat
if [ "${SKIP_WEBSOCAT:-0}" = 1 ]; then
  result websocat SKIP "SKIP_WEBSOCAT=1"
elif [ -x "$dir/websocat/bin/websocat" ] || cargo install --quiet --root "$dir/websocat" websocat >/dev/null 2>&1; then
  out=$(echo "hello from websocat" | timeout 20 "$dir/websocat/bin/websocat" -n1 "$url" 2>&1)
  [ "$out" = "hello from websocat" ] && result websocat PASS "text echoed, closed" || result websocat FAIL "$out"
else
  result websocat SKIP "cargo install websocat failed: crates.io unreachable?"
fi

echo "interop: $pass passed, $fail failed, $skip skipped"
echo "interop: wrote $results" >&2
[ $fail -eq 0 ]
