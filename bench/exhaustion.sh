#!/usr/bin/env bash
# The server out of file descriptors: RLIMIT_NOFILE 64, one device held, then
# 200 plain TCP connections. Measures the server's CPU while accept fails with
# EMFILE (it must back off, not spin), that the held device still gets its
# pong, and how fast it accepts again once the flood goes away.
# Usage: bench/exhaustion.sh   (about 10 s). Writes results/<UTC time>-exhaustion/.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
PORT=${PORT:-9407}
cargo build --release --quiet --bin server
out=$(new_results exhaustion "bench/exhaustion.sh")
prlimit --nofile=64:64 ./target/release/server --listen 127.0.0.1:$PORT --cores 0 --max-conns 1000 \
  --stats-interval 1s > "$out/server-stats.txt" 2> "$out/server.err" &
server=$!
trap 'kill -9 $server 2>/dev/null || true' EXIT
wait_port $PORT
sleep 0.5
python3 - "$PORT" "$server" <<'PY' | tee "$out/summary.md"
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
hz = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / hz
def upgrade(id):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(f"GET /ws?id={id} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
    assert s.recv(4096).startswith(b"HTTP/1.1 101"), "upgrade failed"
    return s
def ping(s):
    s.sendall(bytes([0x89, 0x84, 1, 2, 3, 4]) + bytes(b ^ m for b, m in zip(b"ping", [1, 2, 3, 4])))
    return s.recv(64) == bytes([0x8a, 4]) + b"ping"
held = upgrade("held")
flood = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(200)]
time.sleep(0.5)
c0, t0 = cpu(), time.time()
time.sleep(3)
c1, t1 = cpu(), time.time()
alive = ping(held)
for s in flood:
    s.close()
t2 = time.time()
while True:
    try:
        again = upgrade("after")
        break
    except (AssertionError, OSError):
        time.sleep(0.01)
recovered = time.time() - t2
print("# Out of descriptors (RLIMIT_NOFILE 64, 200 extra connections)\n")
print("| figure | value |\n|---|---|")
print(f"| server CPU while accept fails with EMFILE | {100 * (c1 - c0) / (t1 - t0):.1f}% of a core over {t1 - t0:.1f} s |")
print(f"| held device answered during exhaustion | {'yes' if alive else 'NO'} |")
print(f"| time to upgrade a new device after the flood closed | {recovered * 1000:.0f} ms |")
PY
kill -TERM $server; wait $server || true
trap - EXIT
grep -c "accept failed" "$out/server.err" | xargs -I{} echo "| accept-failure log lines over the run | {} |" | tee -a "$out/summary.md"
echo "bench: wrote $out" >&2
