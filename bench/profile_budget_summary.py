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
print("## Instructions (callgrind, one shard unless said), Ir each\n")
def pokes(r):
    """Connections opened only to wake a uring shard at the end (see the script)."""
    if not r or r["io"] != "uring":
        return 0.0
    return max(0.0, num(r, "accepted") - num(r, "established"))


def idle_n(b, io, n, phase="idle"):
    """The idle run of the same N (same sitting), else of the first N."""
    return cg.get((b, io, n, phase)) or cg.get((b, io, min(ns), phase))


poke_cost = {}
for b in ("base", "main"):
    for n in ns:
        idle, idlepoke = idle_n(b, "uring", n), idle_n(b, "uring", n, "idlepoke")
        if idle and idlepoke and pokes(idlepoke) != pokes(idle):
            poke_cost[(b, n)] = (num(idlepoke, "total") - num(idle, "total")) / (pokes(idlepoke) - pokes(idle))


def total(r):
    """Instructions of a run, less its wake-up connections."""
    n = int(r["n"])
    c = poke_cost.get((r["build"], n), poke_cost.get((r["build"], min(ns)), 0.0))
    return num(r, "total") - pokes(r) * c


for (b, n), c in sorted(poke_cost.items()):
    print(f"(uring, {b}, runs of {n:,}: a wake-up connection costs {c:,.0f} Ir, taken out of those runs by their count)\n")
print("| io | N | figure | base | main | main - base | main/base |")
print("|---|---|---|---|---|---|---|")
for io in ios:
    for n in ns:
        vals = defaultdict(dict)
        for b in ("base", "main"):
            idle = idle_n(b, io, n)
            conn = cg.get((b, io, n, "conn"))
            hb = cg.get((b, io, n, "hb"))
            exp = cg.get((b, io, n, "expiry"))
            if conn and idle and num(conn, "established"):
                vals["per connection (accept, 101, reset by the client)"][b] = (total(conn) - total(idle)) / num(conn, "established")
            idle2, conn2 = cg.get((b, io, n, "idle2")), cg.get((b, io, n, "conn2"))
            if idle2 and conn2 and num(conn2, "established"):
                vals["per connection, 2 shards (registry messages cross)"][b] = (total(conn2) - total(idle2)) / num(conn2, "established")
            if conn and hb and num(hb, "pongs") - num(conn, "pongs") > 0:
                vals["per heartbeat (ping, pong)"][b] = (total(hb) - total(conn)) / (num(hb, "pongs") - num(conn, "pongs"))
            if conn and exp and num(exp, "closed_silent"):
                vals["per expiry (in place of a client's close)"][b] = (total(exp) - total(conn)) / num(exp, "closed_silent")
        for fig, v in vals.items():
            b, m = v.get("base"), v.get("main")
            ratio = f"{m / b:.2f}x" if b and m and b > 0 and "expiry" not in fig else "-"
            f = lambda x: f"{x:,.0f}" if x is not None else "-"
            d = f"{m - b:+,.0f}" if b is not None and m is not None else "-"
            print(f"| {io} | {n:,} | {fig} | {f(b)} | {f(m)} | {d} | {ratio} |")
dh = {(r["build"], r["io"], int(r["n"])): num(r, "total") for r in rows if r["tool"] == "dhat"}
if dh:
    print("\n## Heap live at the peak (dhat; epoll 2 shards, uring 1 shard), bytes per connection\n")
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
    print("\n## Native RSS per connection (the client, 2 shards, 15,000, one run each: noisy)\n")
    print("| io | build | RSS B/conn |")
    print("|---|---|---|")
    for r in nat:
        print(f"| {r['io']} | {r['build']} | {r['total']} |")
