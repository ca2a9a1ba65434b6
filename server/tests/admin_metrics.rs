//! --admin: device lookup, push and kick; /metrics and /healthz (read by
//! an independent parser of the exposition format), freshness without the
//! stats line, the refusal on the device port, and what /metrics counts.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::sync::mpsc::{self};
use std::time::{Duration, Instant};

use tungstenite::Message;

use support::*;

/// Histogram `name`'s cumulative count at bucket `le` (+Inf: f64::INFINITY).
fn bucket(s: &prometheus_parse::Scrape, name: &str, le: f64) -> f64 {
    let sample = s.samples.iter().find(|x| x.metric == name).expect(name);
    match &sample.value {
        prometheus_parse::Value::Histogram(hs) => hs
            .iter()
            .find(|h| h.less_than == le)
            .map(|h| h.count)
            .expect("that bucket"),
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

/// The operator's device endpoints: look a device up, push it a text and a
/// binary message (a real WebSocket client receives them), kick it (4001),
/// and the answers for absent devices, bad ids and oversized bodies.
fn admin_looks_up_pushes_to_and_kicks_a_device() {
    let admin = free_addr();
    let server = Server::start(&["--admin", &admin, "--max-message", "1KiB"]);
    let mut ws = server.ws("02:00:5e:00:00:0a");
    let local = ws.get_ref().local_addr().unwrap();
    let (status, body) = http(&admin, "GET", "/devices/02:00:5e:00:00:0a");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"id\":\"02:00:5e:00:00:0a\""), "{body}");
    assert!(body.contains(&format!("\"remote\":\"{local}\"")), "{body}");
    let (status, body) = http_with(
        &admin,
        "POST",
        "/devices/02:00:5e:00:00:0a/messages",
        "text/plain",
        b"reboot",
    );
    assert_eq!((status, body.as_str()), (200, "delivered\n"));
    assert_eq!(ws.read().unwrap(), Message::Text("reboot".into()));
    let (status, _) = http_with(
        &admin,
        "POST",
        "/devices/02:00:5e:00:00:0a/messages",
        "application/octet-stream",
        &[1, 2, 3],
    );
    assert_eq!(status, 200);
    assert_eq!(ws.read().unwrap(), Message::Binary(vec![1, 2, 3]));
    let big = vec![b'x'; 2048];
    let (status, _) = http_with(
        &admin,
        "POST",
        "/devices/02:00:5e:00:00:0a/messages",
        "text/plain",
        &big,
    );
    assert_eq!(status, 413);
    assert_eq!(http(&admin, "GET", "/devices/nobody").0, 404);
    assert_eq!(
        http_with(
            &admin,
            "POST",
            "/devices/nobody/messages",
            "text/plain",
            b"x"
        )
        .0,
        404
    );
    assert_eq!(http(&admin, "GET", "/devices/not%20an%20id").0, 400);
    let (status, body) = http(&admin, "DELETE", "/devices/02:00:5e:00:00:0a");
    assert_eq!((status, body.as_str()), (200, "kicked\n"));
    match ws.read() {
        Ok(Message::Close(Some(f))) => {
            assert_eq!((u16::from(f.code), f.reason.as_ref()), (4001, "kicked"))
        }
        other => panic!("expected Close 4001, got {other:?}"),
    }
    server.wait_line("the kick", |l| field(l, "kicked") == 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while http(&admin, "GET", "/devices/02:00:5e:00:00:0a").0 != 404 {
        assert!(Instant::now() < deadline, "a kicked device is still found");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn admin_serves_metrics_healthz_and_nothing_else() {
    let admin = free_addr();
    let server = Server::start(&["--admin", &admin, "--drain-timeout", "3s"]);
    let mut held: Vec<_> = (0..3).map(|i| server.ws(&format!("adm{i}"))).collect();
    let mut gone = held.pop().unwrap();
    gone.close(None).unwrap();
    while gone.read().is_ok() {} // until the server's Close and EOF
    let s = scrape_until(&admin, "2 held, 1 closed by the client", |s| {
        metric(s, "c1m_connections", &[]) == 2.0
            && metric(s, "c1m_closed_total", &[("reason", "client_close")]) == 1.0
    });
    // One gauge sample per shard, labelled by shard.
    let shards: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric == "c1m_connections")
        .map(|x| x.labels.get("shard").expect("shard label").to_string())
        .collect();
    assert!(!shards.is_empty(), "{shards:?}");
    assert!(metric(&s, "c1m_accepted_total", &[]) >= 3.0);
    assert_eq!(metric(&s, "c1m_upgraded_total", &[]), 3.0);
    assert_eq!(metric(&s, "c1m_sockets", &[]), 2.0);
    // Every accepted socket is held or closed, for one reason (the start-up
    // probe's connection too, as peer_gone).
    assert_eq!(
        metric(&s, "c1m_closed_total", &[]) + 2.0,
        metric(&s, "c1m_accepted_total", &[])
    );
    assert_eq!(http(&admin, "GET", "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http(&admin, "GET", "/nowhere").0, 404);
    assert_eq!(http(&admin, "POST", "/metrics").0, 405);
    assert_eq!(http(&admin, "DELETE", "/healthz").0, 405);
    // Garbage never takes the admin thread down.
    for junk in [
        &b"\x00\x01\x02 nonsense\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n",
    ] {
        let mut s = TcpStream::connect(&admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(junk);
        let _ = s.read(&mut [0u8; 256]);
    }
    assert_eq!(http(&admin, "GET", "/healthz").0, 200);
    // The device port knows nothing of /metrics.
    let (upgraded, _) = try_upgrade(server.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!upgraded);
    // Draining (the held devices never read their Close): /healthz says so.
    server.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while http(&admin, "GET", "/healthz") != (503, "stopping\n".to_string()) {
        assert!(Instant::now() < deadline, "/healthz never said stopping");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(held);
}

fn admin_metrics_stay_fresh_with_the_stats_line_off() {
    let admin = free_addr();
    let listen = free_addr();
    let child = server_command()
        .args([
            "--listen",
            &listen,
            "--admin",
            &admin,
            "--stats-interval",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (_tx, lines) = mpsc::channel();
    let (_etx, errors) = mpsc::channel();
    let server = Server {
        child,
        addr: listen.parse().unwrap(),
        lines,
        errors,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(server.addr).is_err() {
        assert!(Instant::now() < deadline, "server did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _held = server.ws("fresh");
    // Within seconds, not the hour the shards report in without --admin.
    scrape_until(&admin, "the device", |s| {
        metric(s, "c1m_connections", &[]) == 1.0
    });
}

fn admin_on_the_device_port_is_refused_in_one_sentence() {
    let listen = free_addr();
    let out = server_command()
        .args(["--listen", &listen, "--admin", &listen])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--admin") && err.contains("device port"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// /metrics counts a known sequence of events: refusals by HTTP status,
/// one silent device's deletion in the expiry-lag histogram, a device's
/// heartbeats in the interval histogram; in one process and, from the
/// workers' lines, in a --procs parent.
fn metrics_count_refusals_by_status_and_histogram_lag_and_heartbeats() {
    for procs in ["1", "2"] {
        let admin = free_addr();
        let server = Server::start(&[
            "--admin",
            &admin,
            "--procs",
            procs,
            "--timeout",
            "1s",
            "--tick",
            "100ms",
        ]);
        let refusals = [
            (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "404"),
            (b"GET /ws?id=a HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "426"),
            (upgrade_request("/ws?id=not%20an%20id", ""), "400"),
        ];
        for (request, status) in &refusals {
            let answer = raw_request(server.addr, request);
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "{answer}"
            );
        }
        let mut beating = server.ws("beats");
        let _silent = server.ws("silent");
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(300));
            beating.send(Message::Ping(vec![])).unwrap();
            assert_eq!(beating.read().unwrap(), Message::Pong(vec![]));
        }
        let s = scrape_until(&admin, "the silent device deleted", |s| {
            metric(s, "c1m_closed_total", &[("reason", "expired")]) == 1.0
                && metric(s, "c1m_heartbeat_interval_seconds_count", &[]) >= 3.0
        });
        for (_, status) in &refusals {
            assert_eq!(
                metric(&s, "c1m_rejected_total", &[("status", status)]),
                1.0,
                "{procs} procs, {status}"
            );
        }
        assert_eq!(metric(&s, "c1m_rejected_total", &[]), 3.0);
        assert_eq!(metric(&s, "c1m_expiry_lag_seconds_count", &[]), 1.0);
        assert_eq!(bucket(&s, "c1m_expiry_lag_seconds", f64::INFINITY), 1.0);
        // The wheel deletes within a tick or two of the deadline (the
        // bound is loose for a loaded machine, not a benchmark).
        let lag = metric(&s, "c1m_expiry_lag_seconds_sum", &[]);
        assert!((0.0..2.0).contains(&lag), "{procs} procs: lag {lag}");
        // Heartbeats 300 ms apart: every interval is under a second.
        let beats = metric(&s, "c1m_heartbeat_interval_seconds_count", &[]);
        assert_eq!(bucket(&s, "c1m_heartbeat_interval_seconds", 1.0), beats);
    }
}

on_both_backends!(
    admin_looks_up_pushes_to_and_kicks_a_device,
    admin_serves_metrics_healthz_and_nothing_else,
    admin_metrics_stay_fresh_with_the_stats_line_off,
    admin_on_the_device_port_is_refused_in_one_sentence,
    metrics_count_refusals_by_status_and_histogram_lag_and_heartbeats,
);
