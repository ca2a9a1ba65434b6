//! Shutdown and drain: SIGTERM's 1001 and exit 0, the paced drain
//! (/healthz 503 first, closes spread at --drain-rate, also from a --procs
//! parent), and the drain's timeout.

mod support;

use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

use support::*;

fn sigterm_sends_1001_and_exits_zero() {
    let mut server = Server::start(&["--cores", "0", "--drain-timeout", "2s"]);
    let mut ws = server.ws("stay");
    server.wait_line("the connection", |l| field(l, "conns") == 1);
    server.signal(libc::SIGTERM);
    match ws.read().unwrap() {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected Close 1001, got {other:?}"),
    }
    // tungstenite answers the Close; the server then finishes.
    let _ = ws.flush();
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let final_line = server.wait_line("the final totals", |l| l.starts_with("final "));
    assert_eq!(field(&final_line, "client_close"), 1, "{final_line}");
}

/// A rolling restart's drain: on SIGTERM /healthz says 503 for
/// --drain-health-delay while devices are still served, then the devices
/// get Close 1001 "draining: reconnect" at --drain-rate per second over the
/// server (2 shards, each its half), not all at once; then it exits 0.
/// The same from a --procs parent (its /healthz, its workers paced).
fn a_paced_drain_says_503_first_then_spreads_its_closes() {
    for procs in ["1", "2"] {
        paced_drain(procs);
    }
}

fn paced_drain(procs: &str) {
    let admin = free_addr();
    let mut server = Server::start(&[
        "--admin",
        &admin,
        "--procs",
        procs,
        "--drain-rate",
        "20",
        "--drain-health-delay",
        "1s",
        "--drain-timeout",
        "2s",
    ]);
    let mut devices: Vec<_> = (0..20).map(|i| server.ws(&format!("dr{i}"))).collect();
    server.wait_line("20 devices", |l| field(l, "conns") == 20);
    assert_eq!(http(&admin, "GET", "/healthz").0, 200);
    server.signal(libc::SIGTERM);
    let signalled = Instant::now();
    // Within the delay: 503 for the front (once the signal is taken: the
    // main thread looks every 200 ms at most), and the devices still served.
    while http(&admin, "GET", "/healthz").0 != 503 {
        assert!(
            signalled.elapsed() < Duration::from_millis(600),
            "no 503 on /healthz"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    devices[0].send(Message::Ping(b"still".to_vec())).unwrap();
    assert_eq!(devices[0].read().unwrap(), Message::Pong(b"still".to_vec()));
    assert!(
        signalled.elapsed() < Duration::from_millis(900),
        "too slow to check the delay"
    );
    // Then the Closes, each timed where it arrives.
    let readers: Vec<_> = devices
        .into_iter()
        .map(|mut ws| {
            std::thread::spawn(move || loop {
                match ws.read() {
                    Ok(Message::Close(Some(f))) => {
                        let at = signalled.elapsed();
                        let _ = ws.flush();
                        return (u16::from(f.code), f.reason.to_string(), at);
                    }
                    Ok(_) => continue,
                    Err(e) => panic!("expected Close 1001, got {e}"),
                }
            })
        })
        .collect();
    let mut at: Vec<Duration> = Vec::new();
    for r in readers {
        let (code, reason, when) = r.join().unwrap();
        assert_eq!((code, reason.as_str()), (1001, "draining: reconnect"));
        at.push(when);
    }
    at.sort();
    // 20 at 20/s: the first at the end of the 1 s delay, the last about
    // 0.45 s later per shard (10 each at 10/s); all at once would be ~0.
    assert!(
        at[0] >= Duration::from_millis(900),
        "first Close at {:?}, before the delay ended",
        at[0]
    );
    let spread = at[19] - at[0];
    assert!(
        spread >= Duration::from_millis(300),
        "20 Closes within {spread:?}: not paced"
    );
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

fn drain_ends_at_the_timeout_when_devices_never_answer() {
    let mut server = Server::start(&["--cores", "0", "--drain-timeout", "500ms"]);
    let mut s = raw_ws(server.addr);
    server.wait_line("the connection", |l| field(l, "conns") == 1);
    let sent = Instant::now();
    server.signal(libc::SIGTERM);
    let (op, payload) = read_frame(&mut s);
    assert_eq!((op, close_code(&payload)), (8, 1001));
    // We never answer the Close: the server waits out the drain, then exits 0.
    let status = server.child.wait().unwrap();
    let waited = sent.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        waited >= Duration::from_millis(500),
        "exited after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "exited after {waited:?}");
    let final_line = server.wait_line("the final totals", |l| l.starts_with("final "));
    assert_eq!(field(&final_line, "shutdown"), 1, "{final_line}");
}

/// Devices that answer the drain's Close 1001 get an orderly close: the
/// server's FIN after its Close (a read returns 0), not a reset, even when
/// their answer is the last the shard waits for (it then exits at once).
fn devices_that_answer_the_drain_get_a_fin_not_a_reset() {
    use std::io::{Read, Write};
    let mut server = Server::start(&["--cores", "0", "--drain-timeout", "5s"]);
    let mut devices: Vec<_> = (0..8).map(|_| raw_ws(server.addr)).collect();
    server.wait_line("8 devices", |l| field(l, "conns") == 8);
    server.signal(libc::SIGTERM);
    for s in &mut devices {
        let (op, payload) = read_frame(s);
        assert_eq!((op, close_code(&payload)), (8, 1001));
    }
    // Each answers (the last answer ends the drain), then reads to the end.
    for s in &mut devices {
        s.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe9]).unwrap(); // Close 1001, masked
    }
    for (i, s) in devices.iter_mut().enumerate() {
        let mut rest = [0u8; 64];
        match s.read(&mut rest) {
            Ok(0) => {}
            Ok(n) => panic!("device {i}: {n} bytes after the Close"),
            Err(e) => panic!("device {i}: {e} instead of the server's FIN"),
        }
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let final_line = server.wait_line("the final totals", |l| l.starts_with("final "));
    assert_eq!(field(&final_line, "client_close"), 8, "{final_line}");
}

on_both_backends!(
    devices_that_answer_the_drain_get_a_fin_not_a_reset,
    sigterm_sends_1001_and_exits_zero,
    a_paced_drain_says_503_first_then_spreads_its_closes,
    drain_ends_at_the_timeout_when_devices_never_answer,
);
