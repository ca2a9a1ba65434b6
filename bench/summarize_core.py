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
]
print(f"Medians of {len(runs)} runs ({max(r['round'] for r in runs)} rounds, interleaved).\n")
print("| server | conns | ping every | heartbeats/s | " + " | ".join(c[1] for c in cols) + " | failed | listen overflows+drops |")
print("|---" * (len(cols) + 6) + "|")
med = {}
order = {"c1m": 0, "base": 1, "epoll": 2, "stock128": 3, "stock4096": 4}
for (impl, n, iv), rs in sorted(by.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1], -kv[0][2])):
    cells = []
    for c in cols:
        scale = c[3] if len(c) > 3 else 1
        m = statistics.median(r[c[0]] for r in rs) * scale
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
