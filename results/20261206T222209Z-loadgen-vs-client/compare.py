import json, statistics, sys
lg_dirs, cl_dirs = sys.argv[1].split(","), sys.argv[2].split(",")
def load(dirs):
    rs = []
    for d in dirs:
        rs += [json.loads(l) for l in open(f"{d}/runs.jsonl") if l.strip()]
    return rs
lg, cl = load(lg_dirs), load(cl_dirs)
keys = [("server_cpu_per_conn_us", "server CPU/conn us"), ("server_cpu_per_heartbeat_us", "server CPU/heartbeat us"),
        ("server_rss_per_conn_bytes", "server RSS/conn B"), ("host_slab_per_conn_bytes", "host slab/conn B"), ("conn_per_s", "conn/s")]
def med(rs, impl, k):
    v = [r[k] for r in rs if r["impl"] == impl and k in r]
    return statistics.median(v) if v else None
print("| server | figure | loadgen (median of %d) | client (median of %d) | client / loadgen |" % (
    sum(1 for r in lg if r["impl"] == "uring2"), sum(1 for r in cl if r["impl"] == "uring2")))
print("|---|---|---|---|---|")
for impl in ["uring2", "epoll2", "uring1", "epoll1"]:
    for k, name in keys:
        a, b = med(lg, impl, k), med(cl, impl, k)
        print(f"| {impl} | {name} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    a, b = med(lg, impl, "server_cpu_per_conn_us"), med(cl, impl, "server_cpu_per_conn_gross_us")
    print(f"| {impl} | server CPU/conn us, gross (ramp's heartbeats in) | {a:.1f} | {b:.1f} | {b / a:.2f} |")
print()
print("Spread (min-max of the runs), server CPU/conn and /heartbeat:\n")
for impl in ["uring2", "epoll2", "uring1", "epoll1"]:
    for tool, rs in (("loadgen", lg), ("client", cl)):
        c = sorted(r["server_cpu_per_conn_us"] for r in rs if r["impl"] == impl)
        h = sorted(r["server_cpu_per_heartbeat_us"] for r in rs if r["impl"] == impl)
        print(f"- {impl} {tool}: CPU/conn {c[0]:.1f}-{c[-1]:.1f} us, CPU/heartbeat {h[0]:.1f}-{h[-1]:.1f} us")
