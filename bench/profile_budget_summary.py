#!/usr/bin/env python3
"""Summary of bench/profile-budget.sh's runs.tsv: instructions per
connection, heartbeat and expiry (callgrind), heap bytes per connection
(dhat) and RSS per connection (native), base against main."""
import csv
import sys
from collections import defaultdict

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
cg = {(r["build"], r["io"], int(r["n"]), r["phase"]): r for r in rows if r["tool"] == "callgrind"}
num = lambda r, k: float(r[k] or 0) if r else 0.0
ios = sorted({k[1] for k in cg}, key=lambda s: s != "epoll")
ns = sorted({k[2] for k in cg})
print("# Budget profile: base against main\n")
print("## Instructions (callgrind, one shard), thousands of Ir\n")
print("| io | N | figure | base | main | main/base |")
print("|---|---|---|---|---|---|")
for io in ios:
    for n in ns:
        vals = defaultdict(dict)
        for b in ("base", "main"):
            idle = cg.get((b, io, min(ns), "idle"))
            conn = cg.get((b, io, n, "conn"))
            hb = cg.get((b, io, n, "hb"))
            exp = cg.get((b, io, n, "expiry"))
            if conn and idle and num(conn, "established"):
                vals["per connection (accept, 101, reset by the client)"][b] = (num(conn, "total") - num(idle, "total")) / num(conn, "established")
            if conn and hb and num(hb, "pongs") - num(conn, "pongs") > 0:
                vals["per heartbeat (ping, pong)"][b] = (num(hb, "total") - num(conn, "total")) / (num(hb, "pongs") - num(conn, "pongs"))
            if conn and exp and num(exp, "closed_silent"):
                vals["per expiry (in place of a client's close)"][b] = (num(exp, "total") - num(conn, "total")) / num(exp, "closed_silent")
        for fig, v in vals.items():
            b, m = v.get("base"), v.get("main")
            ratio = f"{m / b:.2f}x" if b and m else "-"
            f = lambda x: f"{x / 1e3:,.1f}" if x is not None else "-"
            print(f"| {io} | {n:,} | {fig} | {f(b)} | {f(m)} | {ratio} |")
dh = {(r["build"], r["io"], int(r["n"])): num(r, "total") for r in rows if r["tool"] == "dhat"}
if dh:
    print("\n## Heap live at the peak (dhat, 2 shards), bytes per connection\n")
    print("| io | N | base | main | main - base |")
    print("|---|---|---|---|---|")
    dns = sorted({k[2] for k in dh})
    for io in ios or sorted({k[1] for k in dh}):
        for n in dns:
            b, m = dh.get(("base", io, n)), dh.get(("main", io, n))
            if b is None or m is None:
                continue
            print(f"| {io} | {n:,} | {b / n:,.0f} | {m / n:,.0f} | {(m - b) / n:+,.0f} |")
        if len(dns) >= 2:
            lo, hi = dns[0], dns[-1]
            per = {}
            for b in ("base", "main"):
                if (b, io, lo) in dh and (b, io, hi) in dh:
                    per[b] = (dh[(b, io, hi)] - dh[(b, io, lo)]) / (hi - lo)
            if len(per) == 2:
                print(f"| {io} | marginal {lo:,}->{hi:,} | {per['base']:,.0f} | {per['main']:,.0f} | {per['main'] - per['base']:+,.0f} |")
nat = [r for r in rows if r["tool"] == "native"]
if nat:
    print("\n## Native RSS per connection (loadgen, 2 shards, 15,000, one run each: noisy)\n")
    print("| io | build | RSS B/conn |")
    print("|---|---|---|")
    for r in nat:
        print(f"| {r['io']} | {r['build']} | {r['total']} |")
