//! Hot upgrade (issue 22, docs/upgrade.md), real processes: SIGUSR2 (or
//! `POST /upgrade`) starts the same binary, which takes the listeners and
//! every connection; devices see no close, their pings are answered, a
//! silent one still expires on time, the registry still knows them, and
//! new connections are accepted throughout. A new binary that fails its
//! hello (or exits) leaves the old one serving.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use c1m_proto::frame::{self, Opcode};
use tungstenite::Message;

use support::*;

/// The new process: not our child's child we can wait for, so killed by
/// pid at the end of the test.
struct NewServer(u32);

impl Drop for NewServer {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the server process this test started (via the upgrade).
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

/// The pid in "... the new process (pid N) ...".
fn new_pid(line: &str) -> u32 {
    let at = line
        .find("(pid ")
        .unwrap_or_else(|| panic!("no pid in {line}"))
        + 5;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn ping(s: &mut TcpStream, payload: &[u8]) {
    let mut f = Vec::new();
    frame::write_masked_frame(&mut f, Opcode::Ping, true, payload, [9, 8, 7, 6]);
    s.write_all(&f).unwrap();
}

fn devices_keep_their_connections_across_sigusr2() {
    let timeout = Duration::from_millis(1500);
    let tick = Duration::from_millis(50);
    let mut server = Server::start(&["--cores", "0", "--timeout", "1500ms", "--tick", "50ms"]);
    let mut devices: Vec<_> = (0..20).map(|i| server.ws(&format!("d{i}"))).collect();
    // One frame split across the handover: its first bytes before.
    let mut split = raw_ws(server.addr);
    let mut half = Vec::new();
    frame::write_masked_frame(&mut half, Opcode::Ping, true, b"split", [1, 2, 3, 4]);
    split.write_all(&half[..4]).unwrap();
    // A silent device: its last frame now.
    let mut silent = raw_ws(server.addr);
    ping(&mut silent, b"last");
    assert_eq!(read_frame(&mut silent), (10, b"last".to_vec()));
    let last = Instant::now();

    server.signal(libc::SIGUSR2);
    // New connections during the handover land somewhere that answers.
    let mut during = Vec::new();
    for i in 0..5 {
        during.push(server.ws(&format!("during{i}")));
    }
    let line = server.wait_error("this process exits");
    let _new = NewServer(new_pid(&line));
    assert!(line.contains("connections to the new process"), "{line}");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "the old process exits 0: {status:?}");

    // Every device: no close, its ping answered by the new process.
    for (i, ws) in devices.iter_mut().chain(during.iter_mut()).enumerate() {
        let p = format!("after{i}").into_bytes();
        ws.send(Message::Ping(p.clone())).unwrap();
        assert_eq!(ws.read().unwrap(), Message::Pong(p), "device {i}");
    }
    split.write_all(&half[4..]).unwrap();
    assert_eq!(read_frame(&mut split), (10, b"split".to_vec()));
    // New connections after it.
    let mut late = server.ws("late");
    late.send(Message::Ping(b"late".to_vec())).unwrap();
    assert_eq!(late.read().unwrap(), Message::Pong(b"late".to_vec()));
    // The registry came along: a second connection of d0 replaces the
    // moved one (Close 4000).
    let _again = server.ws("d0");
    match devices[0].read() {
        Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 4000),
        other => panic!("d0 was not replaced: {other:?}"),
    }
    // The silent device expires on time: silence carried over.
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    let r = silent.read(&mut buf);
    let quiet = last.elapsed();
    assert!(
        r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected a reset at expiry, got {r:?}"
    );
    assert!(quiet >= timeout, "expired early, after {quiet:?}");
    // A tick of the wheel, one more for the handover's rounding, and
    // scheduling noise.
    assert!(
        quiet <= timeout + 2 * tick + Duration::from_millis(400),
        "expired late, after {quiet:?}"
    );
    // The new process's stats line says what it took, and the expiry
    // (the others, silent since their pings above, follow it).
    let l = server.wait_line("the new process's line", |l| {
        l.contains("taken_over=") && field(l, "expired") >= 1
    });
    assert!(field(&l, "taken_over") >= 22, "{l}");
}

/// Both test-only failures of the new binary: the old one refuses in one
/// sentence, reaps it and keeps serving (the trigger here: POST /upgrade).
fn a_new_binary_that_fails_leaves_the_old_serving() {
    for (fail, said) in [("hello", "v999"), ("exit", "closed the handover socket")] {
        let admin = free_addr();
        let server = Server::start_with(
            &["--cores", "0", "--admin", &admin],
            None,
            &[("C1M_TEST_HANDOVER_FAIL", fail)],
        );
        let mut ws = server.ws("stays");
        let (status, body) = http(&admin, "POST", "/upgrade");
        assert_eq!(status, 202, "{body}");
        let line = server.wait_error("upgrade refused");
        assert!(line.contains(said), "{fail}: {line}");
        assert!(line.contains("this process keeps serving"), "{line}");
        ws.send(Message::Ping(b"still".to_vec())).unwrap();
        assert_eq!(ws.read().unwrap(), Message::Pong(b"still".to_vec()));
        let mut fresh = server.ws("fresh");
        fresh.send(Message::Ping(b"new".to_vec())).unwrap();
        assert_eq!(fresh.read().unwrap(), Message::Pong(b"new".to_vec()));
        assert_eq!(http(&admin, "GET", "/healthz").0, 200);
    }
}

/// A new process that dies with the connections' first batch unacked:
/// those connections are lost (counted in the sentence), and the old
/// process listens again and serves new devices.
fn a_new_process_dying_mid_handover_leaves_the_old_listening() {
    let server = Server::start_with(
        &["--cores", "0"],
        None,
        &[("C1M_TEST_HANDOVER_FAIL", "conns")],
    );
    let mut lost: Vec<_> = (0..3).map(|i| server.ws(&format!("lost{i}"))).collect();
    server.signal(libc::SIGUSR2);
    let line = server.wait_error("upgrade failed after");
    assert!(
        line.contains("0 connections went to the new process"),
        "{line}"
    );
    assert!(line.contains("they and 3 more are lost"), "{line}");
    assert!(line.contains("listens again"), "{line}");
    for ws in &mut lost {
        assert!(ws.read().is_err(), "a lost connection ends");
    }
    let mut fresh = server.ws("after-failure");
    fresh.send(Message::Ping(b"here".to_vec())).unwrap();
    assert_eq!(fresh.read().unwrap(), Message::Pong(b"here".to_vec()));
}

/// Under --procs v1 refuses the trigger, in one sentence.
#[test]
fn an_upgrade_under_procs_is_refused_in_one_sentence() {
    IO.with(|c| c.set("epoll"));
    let server = Server::start(&["--procs", "2", "--cores", "0"]);
    server.signal(libc::SIGUSR2);
    let line = server.wait_error("upgrade refused");
    assert!(line.contains("not supported yet"), "{line}");
}

on_both_backends!(
    devices_keep_their_connections_across_sigusr2,
    a_new_binary_that_fails_leaves_the_old_serving,
    a_new_process_dying_mid_handover_leaves_the_old_listening,
);
