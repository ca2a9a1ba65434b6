#!/usr/bin/env python3
"""One client run's figures as one JSON line, in the keys the bench scripts
have read since their load generator was server/examples/loadgen.rs (runs.jsonl,
runs.tsv and the summaries keep their shape).

Usage: bench/client_json.py RESULTS_DIR   (the client's --out; reads summary.json)

What differs from loadgen's figures:
- server_cpu_per_conn_us is the client's server_cpu_per_conn_net_us: the
  server's CPU from the start to the end of the ramp, less the heartbeats of
  the devices already up priced at the hold's CPU per heartbeat (loadgen sent
  none during its ramp); the gross figure is server_cpu_per_conn_gross_us.
- pings and pongs are the whole run's heartbeats and replies (loadgen's were
  the hold's only).
- host_slab_per_conn_bytes and server_rss_per_conn_bytes are read at the
  client's first 1 s mark after the ramp (loadgen's 1 s after the ramp).
"""
import json
import sys


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: bench/client_json.py RESULTS_DIR")
    path = f"{sys.argv[1]}/summary.json"
    try:
        doc = json.load(open(path))
    except (OSError, ValueError) as e:
        sys.exit(f"client_json: cannot read the client's summary {path}: {e}")
    cfg, f = doc["config"], doc["figures"]

    def num(key, scale=1):
        v = f.get(key)
        return 0 if v is None else v * scale

    net = f.get("server_cpu_per_conn_net_us")
    out = {
        "tool": "client",
        "conns": cfg["conns"],
        "ping_interval_s": cfg["heartbeat_s"],
        "established": num("established"),
        "failed": num("failed"),
        "ramp_s": num("time_to_fleet_s"),
        "conn_per_s": num("conn_per_s_mean"),
        "connect_p50_us": round(num("connect_p50_ms", 1e3)),
        "connect_p99_us": round(num("connect_p99_ms", 1e3)),
        "connect_max_us": round(num("connect_max_ms", 1e3)),
        "server_cpu_per_conn_us": net if net is not None else num("server_cpu_per_conn_us"),
        "server_cpu_per_conn_gross_us": num("server_cpu_per_conn_us"),
        "server_rss_per_conn_bytes": num("server_rss_per_conn_bytes"),
        "host_slab_per_conn_bytes": num("kernel_slab_per_conn_bytes"),
        "hold_s": num("hold_measured_s"),
        "pings": num("heartbeats"),
        "pongs": num("heartbeat_replies"),
        "server_cpu_per_heartbeat_us": num("server_cpu_per_heartbeat_us"),
        "heartbeat_rtt_p50_ms": num("heartbeat_rtt_p50_ms"),
        "heartbeat_rtt_p99_ms": num("heartbeat_rtt_p99_ms"),
        "silent_fraction": cfg["silent"],
        "server_closed_silent": num("expired"),
        "server_closed_heartbeating": num("false_expiries"),
        "expiry_lag_p50_ms": num("expiry_lag_p50_ms"),
        "expiry_lag_p99_ms": num("expiry_lag_p99_ms"),
        "expiry_lag_max_ms": num("expiry_lag_max_ms"),
        "expired_early": num("expired_early"),
        "client_cpu_per_conn_us": num("client_cpu_per_conn_us"),
        "client_cpu_per_heartbeat_us": num("client_cpu_per_heartbeat_us"),
    }
    print(json.dumps(out, separators=(",", ":")))


main()
