//! The headline figures of a run, from its counters, histograms, timeline
//! and CPU/memory marks: `summary.json` and the human table `summary.md`.

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::progress::thousands;
use crate::run::Outcome;

fn ms(h: &Histogram<u64>, q: f64) -> Value {
    if h.is_empty() {
        Value::Null
    } else {
        json!((h.value_at_quantile(q) as f64 / 1e3 * 1000.0).round() / 1000.0)
    }
}

fn max_ms(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        Value::Null
    } else {
        json!(h.max() as f64 / 1e3)
    }
}

fn ratio(num: f64, den: f64) -> Value {
    if den > 0.0 && num.is_finite() {
        json!((num / den * 100.0).round() / 100.0)
    } else {
        Value::Null
    }
}

/// Median of the per-second connection rate over the seconds that lay
/// wholly within the ramp; None when the ramp was shorter than two of them.
pub fn median_conn_rate(o: &Outcome) -> Option<f64> {
    let end = o.ramp_s?.floor();
    let mut v: Vec<u64> = o
        .rows
        .iter()
        .filter(|r| r.t_s > 0.0 && r.t_s <= end)
        .map(|r| r.connects_per_s)
        .collect();
    if v.len() < 2 {
        return None;
    }
    v.sort_unstable();
    Some(v[v.len() / 2] as f64)
}

/// Every headline figure of the run, as JSON.
pub fn figures(o: &Outcome, target: u64, server_measured: bool) -> Value {
    let c = &o.counters;
    let m = &o.measured;
    let mut f = Map::new();
    f.insert("target_connections".into(), json!(target));
    for (k, v) in c.fields() {
        f.insert(k.into(), json!(v));
    }
    f.insert(
        "time_to_fleet_s".into(),
        json!(o.ramp_s.map(|s| (s * 1000.0).round() / 1000.0)),
    );
    f.insert(
        "conn_per_s_mean".into(),
        o.ramp_s
            .map_or(Value::Null, |s| ratio(c.established as f64, s)),
    );
    f.insert("conn_per_s_median".into(), json!(median_conn_rate(o)));
    f.insert("connect_p50_ms".into(), ms(&m.connect, 0.5));
    f.insert("connect_p90_ms".into(), ms(&m.connect, 0.9));
    f.insert("connect_p99_ms".into(), ms(&m.connect, 0.99));
    f.insert("connect_p999_ms".into(), ms(&m.connect, 0.999));
    f.insert("connect_max_ms".into(), max_ms(&m.connect));
    f.insert("heartbeat_rtt_p50_ms".into(), ms(&m.heartbeat_rtt, 0.5));
    f.insert("heartbeat_rtt_p99_ms".into(), ms(&m.heartbeat_rtt, 0.99));
    f.insert("heartbeat_rtt_max_ms".into(), max_ms(&m.heartbeat_rtt));
    f.insert(
        "heartbeat_rtt_hold_p50_ms".into(),
        ms(&m.heartbeat_rtt_hold, 0.5),
    );
    f.insert(
        "heartbeat_rtt_hold_p99_ms".into(),
        ms(&m.heartbeat_rtt_hold, 0.99),
    );
    // A drain (bench/drain.sh): the server's first and last close of a
    // heartbeating device, seconds since the run began (to 0.1%).
    if !m.server_closes.is_empty() {
        let s = |us: u64| json!((us as f64 / 1e3).round() / 1e3);
        f.insert("server_closes".into(), json!(m.server_closes.len()));
        f.insert("server_close_first_s".into(), s(m.server_closes.min()));
        f.insert("server_close_last_s".into(), s(m.server_closes.max()));
    }
    f.insert("expiry_lag_p50_ms".into(), ms(&m.expiry_lag, 0.5));
    f.insert("expiry_lag_p99_ms".into(), ms(&m.expiry_lag, 0.99));
    f.insert("expiry_lag_max_ms".into(), max_ms(&m.expiry_lag));
    let peak = o.rows.iter().map(|r| r.expiries_per_s).max().unwrap_or(0);
    f.insert("expired_per_s_peak".into(), json!(peak));
    // The --go-silent storm: deletions after the hold, by the timeline.
    if !m.storm_lag.is_empty() {
        f.insert("storm_deleted".into(), json!(m.storm_lag.len()));
        f.insert("storm_lag_p50_ms".into(), ms(&m.storm_lag, 0.5));
        f.insert("storm_lag_p99_ms".into(), ms(&m.storm_lag, 0.99));
        f.insert("storm_lag_max_ms".into(), max_ms(&m.storm_lag));
        let after = o.hold_end.map_or(0.0, |h| h.t_s);
        let storm: Vec<_> = o
            .rows
            .iter()
            .filter(|r| r.t_s > after && r.expiries_per_s > 0)
            .collect();
        if let (Some(first), Some(last)) = (storm.first(), storm.last()) {
            // Rows close whole seconds: the first one's second began 1 s earlier.
            let secs = last.t_s - first.t_s + 1.0;
            let deleted: u64 = storm.iter().map(|r| r.expiries_per_s).sum();
            f.insert(
                "storm_duration_s".into(),
                json!((secs * 10.0).round() / 10.0),
            );
            f.insert(
                "storm_deleted_per_s_mean".into(),
                ratio(deleted as f64, secs),
            );
            let peak = storm.iter().map(|r| r.expiries_per_s).max().unwrap_or(0);
            f.insert("storm_deleted_per_s_peak".into(), json!(peak));
        }
    }
    // The --reconnect-storm: how long until the fleet was back.
    if c.storm_devices > 0 {
        let back = &m.reconnect_back;
        let secs = |us: u64| json!((us as f64 / 1e3).round() / 1e3);
        let at = |q: f64| {
            if back.is_empty() {
                Value::Null
            } else {
                secs(back.value_at_quantile(q))
            }
        };
        // 99% of the devices reset: a time only if that many came back.
        let enough = c.storm_back * 100 >= c.storm_devices * 99;
        f.insert(
            "storm_time_to_99pct_s".into(),
            if enough {
                let q = (c.storm_devices as f64 * 0.99).ceil() / c.storm_back as f64;
                at(q.min(1.0))
            } else {
                Value::Null
            },
        );
        f.insert(
            "storm_time_to_100pct_s".into(),
            if c.storm_unrecovered == 0 && !back.is_empty() {
                secs(back.max())
            } else {
                Value::Null
            },
        );
        f.insert("storm_back_p50_s".into(), at(0.5));
        f.insert("storm_connect_p50_ms".into(), ms(&m.reconnect_connect, 0.5));
        f.insert(
            "storm_connect_p99_ms".into(),
            ms(&m.reconnect_connect, 0.99),
        );
        f.insert("storm_connect_max_ms".into(), max_ms(&m.reconnect_connect));
        f.insert(
            "storm_failed_per_device".into(),
            ratio(
                (c.storm_attempts.saturating_sub(c.storm_back)) as f64,
                c.storm_devices as f64,
            ),
        );
    }
    // --redial-on-close: how long the devices the server closed with 1001
    // were away.
    if c.drain_closes > 0 {
        f.insert("drain_away_p50_ms".into(), ms(&m.drain_back, 0.5));
        f.insert("drain_away_p99_ms".into(), ms(&m.drain_back, 0.99));
        f.insert("drain_away_max_ms".into(), max_ms(&m.drain_back));
    }
    if let Some(r) = &o.ramp_end {
        let est = r.counters.established as f64;
        f.insert(
            "client_rss_per_conn_bytes".into(),
            ratio(r.client_rss as f64 - o.start.client_rss as f64, est),
        );
        let ramp_cpu_us = r.client_cpu_ns.saturating_sub(o.start.client_cpu_ns) as f64 / 1e3;
        f.insert(
            "client_cpu_per_conn_us".into(),
            ratio(ramp_cpu_us, r.counters.attempted as f64),
        );
        // The client's own: a spawned server (its child) is not counted in
        // it since 2026-12-06; builds before counted both ends here.
        f.insert("client_cpu_excludes_server".into(), json!(true));
        if let Some(h) = &o.hold_end {
            // The ramp's CPU also pays for the heartbeats of the devices
            // already up (at 1M, several per device): priced at the hold's
            // CPU per heartbeat, what is left is the connections' own.
            let beats = h.counters.heartbeats.saturating_sub(r.counters.heartbeats);
            let hold_cpu_us = h.client_cpu_ns.saturating_sub(r.client_cpu_ns) as f64 / 1e3;
            if beats > 0 {
                let per_beat = hold_cpu_us / beats as f64;
                f.insert(
                    "client_cpu_per_heartbeat_us".into(),
                    ratio(hold_cpu_us, beats as f64),
                );
                f.insert(
                    "client_cpu_per_conn_net_us".into(),
                    ratio(
                        ramp_cpu_us - per_beat * r.counters.heartbeats as f64,
                        r.counters.attempted as f64,
                    ),
                );
            }
        }
        // Host-wide, so both ends when client and server share the host.
        f.insert(
            "kernel_slab_per_conn_bytes".into(),
            ratio(r.slab as f64 - o.start.slab as f64, est),
        );
        f.insert(
            "host_memory_per_conn_bytes".into(),
            ratio(o.start.mem_available as f64 - r.mem_available as f64, est),
        );
        f.insert("tcp_sockets_at_fleet".into(), json!(r.tcp_inuse));
        f.insert(
            "tcp_buffer_pages_per_conn".into(),
            ratio(r.tcp_mem_pages as f64 - o.start.tcp_mem_pages as f64, est),
        );
        if server_measured {
            f.insert(
                "server_rss_per_conn_bytes".into(),
                ratio(r.server_rss as f64 - o.start.server_rss as f64, est),
            );
            f.insert(
                "server_cpu_per_conn_us".into(),
                ratio(
                    (r.server_cpu_ns.saturating_sub(o.start.server_cpu_ns)) as f64 / 1e3,
                    est,
                ),
            );
            if let Some(h) = &o.hold_end {
                let beats = h.counters.heartbeats.saturating_sub(r.counters.heartbeats);
                let hold_us = h.server_cpu_ns.saturating_sub(r.server_cpu_ns) as f64 / 1e3;
                f.insert(
                    "server_cpu_per_heartbeat_us".into(),
                    ratio(hold_us, beats as f64),
                );
                // As the client's own: the ramp's server CPU less the
                // heartbeats of the devices already up, priced at the
                // hold's CPU per heartbeat (bench/core.sh's per-connection
                // figure; loadgen, before it, sent none during its ramp).
                if beats > 0 {
                    let ramp_us =
                        r.server_cpu_ns.saturating_sub(o.start.server_cpu_ns) as f64 / 1e3;
                    f.insert(
                        "server_cpu_per_conn_net_us".into(),
                        ratio(
                            ramp_us - hold_us / beats as f64 * r.counters.heartbeats as f64,
                            est,
                        ),
                    );
                }
                f.insert(
                    "hold_measured_s".into(),
                    json!(((h.t_s - r.t_s) * 1000.0).round() / 1000.0),
                );
            }
        }
    }
    f.insert(
        "elapsed_s".into(),
        json!((o.elapsed_s * 1000.0).round() / 1000.0),
    );
    f.insert("interrupted".into(), json!(o.interrupted));
    f.insert("errors".into(), json!(o.errors));
    Value::Object(f)
}

/// What went wrong on the server's side, loudly: false, early or missed expiries.
pub fn faults(f: &Value) -> Vec<String> {
    let n = |k: &str| f[k].as_u64().unwrap_or(0);
    let mut out = Vec::new();
    if n("false_expiries") > 0 {
        out.push(format!(
            "FALSE EXPIRIES: the server closed {} heartbeating devices",
            n("false_expiries")
        ));
    }
    if n("expired_early") > 0 {
        out.push(format!(
            "EARLY EXPIRIES: {} silent devices were closed before --server-timeout had passed",
            n("expired_early")
        ));
    }
    if n("unexpired") > 0 {
        out.push(format!(
            "MISSED EXPIRIES: {} silent devices were still open at the end of the expiry window",
            n("unexpired")
        ));
    }
    out
}

/// The human table of a summary's figures.
pub fn markdown(f: &Value, command: &str, dir: &str) -> String {
    let num = |k: &str| match &f[k] {
        Value::Null => "-".to_string(),
        Value::Number(n) if n.is_u64() => thousands(n.as_u64().unwrap_or(0)),
        Value::Number(n) => format!("{}", n.as_f64().unwrap_or(0.0)),
        v => v.to_string(),
    };
    let failures = [
        ("refused", "failed_refused"),
        ("timeout", "failed_timeout"),
        ("reset", "failed_reset"),
        ("HTTP status", "failed_http_status"),
        ("EADDRNOTAVAIL", "failed_eaddrnotavail"),
        ("EMFILE", "failed_emfile"),
        ("other", "failed_other"),
    ]
    .iter()
    .filter(|(_, k)| f[*k].as_u64().unwrap_or(0) > 0)
    .map(|(name, k)| format!("{name} {}", num(k)))
    .collect::<Vec<_>>();
    let failures = if failures.is_empty() {
        String::new()
    } else {
        format!(" ({})", failures.join(", "))
    };
    let rows = [
        (
            "Connections established / target",
            format!("{} / {}", num("established"), num("target_connections")),
        ),
        ("Failed attempts", format!("{}{failures}", num("failed"))),
        ("Time to the whole fleet (s)", num("time_to_fleet_s")),
        (
            "Connections/s: mean, median of seconds",
            format!("{}, {}", num("conn_per_s_mean"), num("conn_per_s_median")),
        ),
        (
            "Connect latency p50 / p99 / max (ms)",
            format!(
                "{} / {} / {}",
                num("connect_p50_ms"),
                num("connect_p99_ms"),
                num("connect_max_ms")
            ),
        ),
        (
            "Heartbeats sent / replies",
            format!(
                "{} / {}{}",
                num("heartbeats"),
                num("heartbeat_replies"),
                match f["last_heartbeats"].as_u64() {
                    Some(n) if n > 0 =>
                        format!(" (and {} last ones at once, --go-silent)", thousands(n)),
                    _ => String::new(),
                }
            ),
        ),
        (
            "Heartbeat RTT p50 / p99 / max (ms)",
            format!(
                "{} / {} / {}",
                num("heartbeat_rtt_p50_ms"),
                num("heartbeat_rtt_p99_ms"),
                num("heartbeat_rtt_max_ms")
            ),
        ),
        (
            "Heartbeat RTT p50 / p99 (ms), the hold alone",
            format!(
                "{} / {}",
                num("heartbeat_rtt_hold_p50_ms"),
                num("heartbeat_rtt_hold_p99_ms")
            ),
        ),
        ("Silent devices expired by the server", num("expired")),
        (
            "Expiry lag p50 / p99 / max (ms), devices silent on their own",
            format!(
                "{} / {} / {}",
                num("expiry_lag_p50_ms"),
                num("expiry_lag_p99_ms"),
                num("expiry_lag_max_ms")
            ),
        ),
        ("Peak expiries/s", num("expired_per_s_peak")),
        (
            "Deletion storm (--go-silent): deleted, seconds, mean/s, peak/s",
            format!(
                "{}, {}, {}, {}",
                num("storm_deleted"),
                num("storm_duration_s"),
                num("storm_deleted_per_s_mean"),
                num("storm_deleted_per_s_peak")
            ),
        ),
        (
            "Storm lag p50 / p99 / max (ms)",
            format!(
                "{} / {} / {}",
                num("storm_lag_p50_ms"),
                num("storm_lag_p99_ms"),
                num("storm_lag_max_ms")
            ),
        ),
        (
            "Reconnect storm (--reconnect-storm): devices reset / back / not back",
            format!(
                "{} / {} / {}",
                num("storm_devices"),
                num("storm_back"),
                num("storm_unrecovered")
            ),
        ),
        (
            "Reconnect storm: time until 99% / 100% back (s), median device (s)",
            format!(
                "{} / {}, {}",
                num("storm_time_to_99pct_s"),
                num("storm_time_to_100pct_s"),
                num("storm_back_p50_s")
            ),
        ),
        (
            "Reconnect storm: connect latency p50 / p99 / max (ms)",
            format!(
                "{} / {} / {}",
                num("storm_connect_p50_ms"),
                num("storm_connect_p99_ms"),
                num("storm_connect_max_ms")
            ),
        ),
        (
            "Reconnect storm: attempts; failed: 503, reset, timeout, refused, other",
            format!(
                "{}; {}, {}, {}, {}, {}",
                num("storm_attempts"),
                num("storm_failed_503"),
                num("storm_failed_reset"),
                num("storm_failed_timeout"),
                num("storm_failed_refused"),
                num("storm_failed_other")
            ),
        ),
        (
            "Takeovers (--reconnect-fraction): second connections / 4000 replaced seen",
            format!("{} / {}", num("reconnects"), num("replaced")),
        ),
        (
            "TLS (--tls): handshakes / resumed / failed",
            format!(
                "{} / {} / {}",
                num("tls_handshakes"),
                num("tls_resumed"),
                num("failed_tls")
            ),
        ),
        (
            "False / early / missed expiries",
            format!(
                "{} / {} / {}",
                num("false_expiries"),
                num("expired_early"),
                num("unexpired")
            ),
        ),
        (
            "Client CPU per connection (us), RSS per connection (B)",
            format!(
                "{}, {}",
                num("client_cpu_per_conn_us"),
                num("client_rss_per_conn_bytes")
            ),
        ),
        (
            "Client CPU per heartbeat (us), per connection net of the ramp's heartbeats (us)",
            format!(
                "{}, {}",
                num("client_cpu_per_heartbeat_us"),
                num("client_cpu_per_conn_net_us")
            ),
        ),
        (
            "Server CPU per connection / per heartbeat (us)",
            format!(
                "{} / {}",
                num("server_cpu_per_conn_us"),
                num("server_cpu_per_heartbeat_us")
            ),
        ),
        (
            "Server CPU per connection net of the ramp's heartbeats (us)",
            num("server_cpu_per_conn_net_us"),
        ),
        (
            "Server RSS per connection (B)",
            num("server_rss_per_conn_bytes"),
        ),
        ("Elapsed (s)", num("elapsed_s")),
    ];
    let mut s = format!(
        "# c1m client run\n\n`{command}`\n\nResults: `{dir}`\n\n| Figure | Value |\n|---|---|\n"
    );
    // The storm rows only for a --go-silent run.
    let storm = !f["storm_deleted"].is_null();
    let reconnects = f["storm_devices"].as_u64().unwrap_or(0) > 0;
    for (k, v) in rows {
        if (reconnects || !k.starts_with("Reconnect storm"))
            && (storm || !(k.starts_with("Deletion storm") || k.starts_with("Storm lag")))
        {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
    }
    for fault in faults(f) {
        s.push_str(&format!("\n**{fault}**\n"));
    }
    if f["interrupted"].as_bool() == Some(true) {
        s.push_str("\nInterrupted by a signal: the figures cover the run until then.\n");
    }
    for e in f["errors"].as_array().into_iter().flatten() {
        s.push_str(&format!("\nError: {}\n", e.as_str().unwrap_or("")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Counters, Measured};
    use crate::run::Mark;

    #[test]
    fn server_cpu_per_connection_net_of_the_ramps_heartbeats() {
        // 1,000 connections at 20 us each; 500 heartbeats during the ramp
        // and 2,000 in the hold, 4 us each.
        let counters = |established, heartbeats| Counters {
            attempted: established,
            established,
            heartbeats,
            ..Counters::default()
        };
        let mark = |t_s, established, heartbeats, server_cpu_ns| Mark {
            t_s,
            counters: counters(established, heartbeats),
            server_cpu_ns,
            ..Mark::default()
        };
        let o = Outcome {
            counters: counters(1000, 2500),
            measured: Measured::new(),
            rows: Vec::new(),
            start: Mark::default(),
            ramp_end: Some(mark(2.0, 1000, 500, 22_000_000)),
            hold_end: Some(mark(7.0, 1000, 2500, 30_000_000)),
            ramp_s: Some(1.5),
            errors: Vec::new(),
            interrupted: false,
            elapsed_s: 7.5,
        };
        let f = figures(&o, 1000, true);
        assert_eq!(f["server_cpu_per_conn_us"], json!(22.0));
        assert_eq!(f["server_cpu_per_heartbeat_us"], json!(4.0));
        assert_eq!(f["server_cpu_per_conn_net_us"], json!(20.0));
        assert!(markdown(&f, "client", "dir").contains("| 20 |"));
        // Unmeasured server: no server figures at all.
        let f = figures(&o, 1000, false);
        assert!(f.get("server_cpu_per_conn_net_us").is_none());
    }
}
