#!/usr/bin/env python3
"""Median table of bench/core.sh runs (runs.jsonl -> markdown on stdout)."""
import json
import statistics
import sys
from collections import defaultdict

runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = defaultdict(list)
for r in runs:
    by[(r["impl"], r["conns"], r["ping_interval_s"])].append(r)

cols = [
    ("conn_per_s", "conn/s", "{:.0f}"),
    ("connect_p50_us", "connect p50 ms", "{:.1f}", 1e-3),
    ("connect_p99_us", "connect p99 ms", "{:.1f}", 1e-3),
    ("server_cpu_per_conn_us", "server CPU/conn us", "{:.1f}"),
    ("server_cpu_per_heartbeat_us", "server CPU/heartbeat us", "{:.1f}"),
    ("server_rss_per_conn_bytes", "server RSS/conn B", "{:.0f}"),
    ("host_slab_per_conn_bytes", "host slab/conn B", "{:.0f}"),
]
print(f"Medians of {len(runs)} runs ({max(r['round'] for r in runs)} rounds, interleaved).\n")
print("| server | conns | ping every | heartbeats/s | " + " | ".join(c[1] for c in cols) + " | failed | listen overflows+drops |")
print("|---" * (len(cols) + 6) + "|")
med = {}
order = {"uring2": 0, "epoll2": 1, "uring1": 2, "epoll1": 3, "uring2cpu": 3.1, "epoll2cpu": 3.2, "base": 4, "base2": 4.1, "tokio": 4.2, "threads": 5, "c1m": 6, "epoll": 7, "stock128": 8, "stock4096": 9}
for (impl, n, iv), rs in sorted(by.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1], -kv[0][2])):
    cells = []
    for c in cols:
        scale = c[3] if len(c) > 3 else 1
        vals = [r[c[0]] for r in rs if c[0] in r]
        if not vals:
            med[(impl, n, iv, c[0])] = None
            cells.append("n/a")
            continue
        m = statistics.median(vals) * scale
        med[(impl, n, iv, c[0])] = m
        cells.append(c[2].format(m))
    failed = sum(r["failed"] for r in rs)
    overflows = sum(r["listen_overflows_drops"] for r in rs)
    print(f"| {impl} | {n} | {iv:g}s | {n / iv:.0f} | " + " | ".join(cells) + f" | {failed} | {overflows} |")

# Growth: 15000 vs 2000 connections, at 1 ping/s each (the figure) and
# at the same 2,000 heartbeats/s (only the number of idle connections differs).
print("\nGrowth, median at 15,000 connections / median at 2,000 (1.00 = no growth):\n")
print("| server | CPU/conn | CPU/heartbeat, 1 ping/s each | CPU/heartbeat, same 2,000 heartbeats/s |")
print("|---|---|---|---|")
for impl in sorted({i for i, _, _ in by}, key=lambda i: order.get(i, 9)):
    def g(n, iv, k):
        return med.get((impl, n, iv, k))
    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "n/a"
    print(
        f"| {impl} | {ratio(g(15000, 1.0, 'server_cpu_per_conn_us'), g(2000, 1.0, 'server_cpu_per_conn_us'))}"
        f" | {ratio(g(15000, 1.0, 'server_cpu_per_heartbeat_us'), g(2000, 1.0, 'server_cpu_per_heartbeat_us'))}"
        f" | {ratio(g(15000, 7.5, 'server_cpu_per_heartbeat_us'), g(2000, 1.0, 'server_cpu_per_heartbeat_us'))} |"
    )

# Backends side by side, same run: uring / epoll at each shard count.
pairs = [("uring2", "epoll2"), ("uring1", "epoll1")]
if any((a, n, iv, "conn_per_s") in med and (b, n, iv, "conn_per_s") in med for a, b in pairs for (_, n, iv) in by):
    print("\nio_uring / epoll, medians of the same run (CPU: lower is better; conn/s: higher is better):\n")
    print("| shards | conns | heartbeats/s | CPU/conn | CPU/heartbeat | conn/s | connect p99 | RSS/conn | host slab/conn |")
    print("|---|---|---|---|---|---|---|---|---|")
    for a, b in pairs:
        for (n, iv) in sorted({(n, iv) for (_, n, iv) in by}, key=lambda k: (k[0], -k[1])):
            def r(k):
                x, y = med.get((a, n, iv, k)), med.get((b, n, iv, k))
                return f"{x / y:.2f}" if x and y else "n/a"
            if (a, n, iv, "conn_per_s") not in med or (b, n, iv, "conn_per_s") not in med:
                continue
            print(f"| {a[-1]} | {n} | {n / iv:.0f} | {r('server_cpu_per_conn_us')} | {r('server_cpu_per_heartbeat_us')} | {r('conn_per_s')} | {r('connect_p99_us')} | {r('server_rss_per_conn_bytes')} | {r('host_slab_per_conn_bytes')} |")
    print("\n2 shards / 1 shard, CPU per heartbeat (target: within 1.2):\n")
    print("| backend | conns | heartbeats/s | ratio |")
    print("|---|---|---|---|")
    for two, one in [("uring2", "uring1"), ("epoll2", "epoll1")]:
        for (n, iv) in sorted({(n, iv) for (_, n, iv) in by}, key=lambda k: (k[0], -k[1])):
            x, y = med.get((two, n, iv, "server_cpu_per_heartbeat_us")), med.get((one, n, iv, "server_cpu_per_heartbeat_us"))
            if x and y:
                print(f"| {two[:-1]} | {n} | {n / iv:.0f} | {x / y:.2f} |")

steer = [("uring2cpu", "uring2"), ("epoll2cpu", "epoll2")]
if any((a, n, iv, "conn_per_s") in med and (b, n, iv, "conn_per_s") in med for a, b in steer for (_, n, iv) in by):
    print("\n--reuseport-cpu / hash placement, same run (CPU: lower is better; conn/s: higher is better):\n")
    print("| backend | conns | heartbeats/s | CPU/conn | CPU/heartbeat | conn/s | connect p99 |")
    print("|---|---|---|---|---|---|---|")
    for a, b in steer:
        for (n, iv) in sorted({(n, iv) for (_, n, iv) in by}, key=lambda k: (k[0], -k[1])):
            def r(k):
                x, y = med.get((a, n, iv, k)), med.get((b, n, iv, k))
                return f"{x / y:.2f}" if x and y else "n/a"
            if (a, n, iv, "conn_per_s") in med and (b, n, iv, "conn_per_s") in med:
                print(f"| {a[:5]} | {n} | {n / iv:.0f} | {r('server_cpu_per_conn_us')} | {r('server_cpu_per_heartbeat_us')} | {r('conn_per_s')} | {r('connect_p99_us')} |")
