//! Heartbeats and expiry: a silent device is deleted within timeout +
//! tick (gracefully, 1001 then FIN), a heartbeating one never is, and
//! io_uring's expiry wave submits no cancel.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use c1m_proto::frame::{self, Opcode};
use tungstenite::Message;

use support::*;

fn silent_device_is_deleted_within_timeout_plus_tick() {
    let timeout = Duration::from_millis(500);
    let tick = Duration::from_millis(50);
    let server = Server::start(&["--cores", "0", "--timeout", "500ms", "--tick", "50ms"]);
    let mut s = raw_ws(server.addr);
    // The last frame: a ping, answered.
    let mut ping = Vec::new();
    frame::write_masked_frame(&mut ping, Opcode::Ping, true, b"x", [1, 2, 3, 4]);
    s.write_all(&ping).unwrap();
    assert_eq!(read_frame(&mut s), (10, b"x".to_vec()));
    let last = Instant::now();
    let mut buf = [0u8; 16];
    let r = s.read(&mut buf); // blocks until the server deletes us
    let silent = last.elapsed();
    // Abortive by default: a reset, not a FIN.
    assert!(
        r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected a reset, got {r:?}"
    );
    let slack = Duration::from_millis(300); // scheduling noise on a busy CI machine
    assert!(silent >= timeout, "deleted early after {silent:?}");
    assert!(
        silent <= timeout + tick + slack,
        "deleted late after {silent:?}"
    );
    server.wait_line("the expiry", |l| field(l, "expired") == 1);
}

fn heartbeating_device_is_never_expired() {
    let server = Server::start(&["--cores", "0", "--timeout", "300ms", "--tick", "50ms"]);
    let mut ws = server.ws("busy");
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        ws.send(Message::Text("hb".into())).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    ws.send(Message::Ping(b"still here".to_vec())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"still here".to_vec()));
    let l = server.wait_line("a fresh line", |_| true);
    assert_eq!(field(&l, "expired"), 0, "{l}");
}

fn graceful_expiry_sends_1001_then_fin() {
    let server = Server::start(&[
        "--cores",
        "0",
        "--timeout",
        "300ms",
        "--tick",
        "50ms",
        "--graceful-expiry",
    ]);
    let mut s = raw_ws(server.addr);
    let (op, payload) = read_frame(&mut s);
    assert_eq!((op, close_code(&payload)), (8, 1001));
    let mut rest = [0u8; 8];
    assert_eq!(s.read(&mut rest).unwrap(), 0, "then a FIN");
    server.wait_line("the expiry", |l| field(l, "expired") == 1);
}

/// The deletion path of io_uring ends each connection's multishot recv by
/// shutdown(2), never by a cancel: the driver counts every cancel SQE it
/// queues (every SQE passes one function), and a wave of 5,000 expiries
/// queues none.
#[test]
fn a_uring_expiry_wave_of_5000_submits_no_cancel() {
    IO.with(|c| c.set("uring"));
    let mut server = Server::start(&["--cores", "0", "--timeout", "1s", "--tick", "50ms"]);
    let devices: Vec<TcpStream> = (0..5000).map(|_| raw_ws(server.addr)).collect();
    let line = server.wait_line("5,000 expiries", |l| field(l, "expired") == 5000);
    assert_eq!(field(&line, "conns"), 0, "{line}");
    server.signal(libc::SIGTERM);
    let fin = server.wait_line("the final line", |l| l.starts_with("final "));
    assert_eq!(field(&fin, "expired"), 5000, "{fin}");
    assert_eq!(field(&fin, "cancels"), 0, "{fin}");
    let _ = server.child.wait();
    drop(devices);
}

on_both_backends!(
    silent_device_is_deleted_within_timeout_plus_tick,
    heartbeating_device_is_never_expired,
    graceful_expiry_sends_1001_then_fin,
);
