//! Hot upgrade (issue 22, docs/upgrade.md), real processes: SIGUSR2 (or
//! `POST /upgrade`) starts the same binary, which takes the listeners and
//! every connection; devices see no close, their pings are answered, a
//! silent one still expires on time, the registry still knows them, and
//! new connections are accepted throughout. A new binary that fails its
//! hello (or exits) leaves the old one serving. Under --procs the
//! supervisor does the same worker by worker.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use c1m_proto::frame::{self, Opcode};
use c1m_proto::ticket;
use tungstenite::{Message, WebSocket};

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

/// After a handover: every device (those from before, those that came
/// during it) has its ping answered, the frame split across it is finished
/// and answered, and a new connection is served.
fn served_after(
    server: &Server,
    devices: &mut [WebSocket<TcpStream>],
    during: &mut [WebSocket<TcpStream>],
    split: &mut TcpStream,
    rest_of_split: &[u8],
) {
    for (i, ws) in devices.iter_mut().chain(during.iter_mut()).enumerate() {
        let p = format!("after{i}").into_bytes();
        ws.send(Message::Ping(p.clone())).unwrap();
        assert_eq!(ws.read().unwrap(), Message::Pong(p), "device {i}");
    }
    split.write_all(rest_of_split).unwrap();
    assert_eq!(read_frame(split), (10, b"split".to_vec()));
    let mut late = server.ws("late");
    late.send(Message::Ping(b"late".to_vec())).unwrap();
    assert_eq!(late.read().unwrap(), Message::Pong(b"late".to_vec()));
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

    // Every device: no close, its ping answered by the new process; the
    // split frame finished; new connections after it.
    served_after(&server, &mut devices, &mut during, &mut split, &half[4..]);
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

/// The worker of `--procs` that holds `id`, from the supervisor's admin.
fn held_by(admin: &str, id: &str) -> u64 {
    let (status, body) = http(admin, "GET", &format!("/devices/{id}"));
    assert_eq!(status, 200, "GET /devices/{id}: {body}");
    let at = body.find("\"worker\":").expect("a worker field") + 9;
    let digits: String = body[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect("a worker number")
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v
}

/// Under --procs the supervisor hands each worker over to a new process,
/// one after the other: devices on both workers keep their connections
/// (no close, pings answered), devices connecting during and after are
/// served, every worker's pid changes and the supervisor's does not, and
/// the registry still spans the workers (a second connection of an id
/// replaces the first across them).
fn procs_devices_keep_their_connections_across_sigusr2() {
    let admin = free_addr();
    let mut server = Server::start(&["--procs", "2", "--cores", "0", "--admin", &admin]);
    let before = sorted(workers_of(&server, 2));
    let mut devices: Vec<_> = (0..20).map(|i| server.ws(&format!("p{i}"))).collect();
    let on: std::collections::BTreeSet<u64> =
        (0..20).map(|i| held_by(&admin, &format!("p{i}"))).collect();
    assert_eq!(on.len(), 2, "20 devices all on one worker: {on:?}");
    // One frame split across the handover: its first bytes before.
    let mut split = raw_ws(server.addr);
    let mut half = Vec::new();
    frame::write_masked_frame(&mut half, Opcode::Ping, true, b"split", [1, 2, 3, 4]);
    split.write_all(&half[..4]).unwrap();
    // A worker signalled on its own refuses: its supervisor upgrades it.
    // SAFETY: kill(2) on a worker of the server this test started.
    unsafe { libc::kill(before[0] as i32, libc::SIGUSR2) };
    server.wait_error("upgraded by its supervisor only");

    server.signal(libc::SIGUSR2);
    let mut during = Vec::new();
    for i in 0..5 {
        during.push(server.ws(&format!("during{i}")));
        std::thread::sleep(Duration::from_millis(20));
    }
    let line = server.wait_error("workers handed over to new processes");
    assert!(line.contains("all 2 workers"), "{line}");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the supervisor runs on"
    );
    let after = sorted(workers_of(&server, 2));
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "every worker is a new process: {before:?} then {after:?}"
    );
    for pid in &before {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "old worker {pid} still runs"
        );
    }

    served_after(&server, &mut devices, &mut during, &mut split, &half[4..]);

    // One connection per id, across the new workers: a second connection
    // replaces the moved one (Close 4000), on whichever worker it lands.
    let mut crossed = 0;
    for (i, old) in devices.iter_mut().enumerate() {
        let id = format!("p{i}");
        let was = held_by(&admin, &id);
        let mut again = server.ws(&id);
        match old.read() {
            Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 4000, "{id}"),
            other => panic!("{id} was not replaced: {other:?}"),
        }
        again.send(Message::Ping(b"again".to_vec())).unwrap();
        assert_eq!(again.read().unwrap(), Message::Pong(b"again".to_vec()));
        if held_by(&admin, &id) != was {
            crossed += 1;
        }
    }
    assert!(
        crossed > 0,
        "no second connection landed on the other worker"
    );
    server.wait_line("the replacements", |l| field(l, "replaced") >= 20);
}

/// A new binary that fails (its hello, or at start) under --procs: the
/// rollout stops at worker 0 in one sentence, and every worker serves on
/// as before, with its pid; the next trigger is taken again.
fn procs_a_new_binary_that_fails_leaves_every_worker_serving() {
    for (fail, said) in [("hello", "v999"), ("exit", "closed the handover socket")] {
        let admin = free_addr();
        let server = Server::start_with(
            &["--procs", "2", "--cores", "0", "--admin", &admin],
            None,
            &[("C1M_TEST_HANDOVER_FAIL", fail)],
        );
        let before = sorted(workers_of(&server, 2));
        let mut devices: Vec<_> = (0..8).map(|i| server.ws(&format!("f{i}"))).collect();
        for round in 0..2 {
            let (status, body) = http(&admin, "POST", "/upgrade");
            assert_eq!(status, 202, "{body}");
            // Both sentences: the old worker's (why) and the supervisor's.
            let (mut why, mut stopped) = (None, None);
            while why.is_none() || stopped.is_none() {
                let l = server.wait_error("upgrade");
                if l.contains("worker 0: upgrade refused") {
                    why = Some(l);
                } else if l.contains("upgrade stopped at worker") && l.contains("worker 0 of 2") {
                    // Both new workers start at once and fail: the
                    // sentence names them in the order they failed.
                    stopped = Some(l);
                }
            }
            let (why, stopped) = (why.unwrap(), stopped.unwrap());
            assert!(why.contains(said), "{fail}: {why}");
            assert!(why.contains("this process keeps serving"), "{why}");
            assert!(stopped.contains("serves as before"), "{stopped}");
            assert!(stopped.contains("no worker was upgraded"), "{stopped}");
            assert_eq!(sorted(workers_of(&server, 2)), before, "{fail} {round}");
            for (i, ws) in devices.iter_mut().enumerate() {
                ws.send(Message::Ping(b"still".to_vec())).unwrap();
                assert_eq!(
                    ws.read().unwrap(),
                    Message::Pong(b"still".to_vec()),
                    "{fail}: device {i}"
                );
            }
            let mut fresh = server.ws(&format!("fresh{round}"));
            fresh.send(Message::Ping(b"new".to_vec())).unwrap();
            assert_eq!(fresh.read().unwrap(), Message::Pong(b"new".to_vec()));
            assert_eq!(http(&admin, "GET", "/healthz").0, 200);
        }
        // The registry still routes across the workers: every device
        // replaced by a second connection.
        for (i, old) in devices.iter_mut().enumerate() {
            let _again = server.ws(&format!("f{i}"));
            match old.read() {
                Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 4000),
                other => panic!("f{i} was not replaced: {other:?}"),
            }
        }
    }
}

/// A new binary that fails at the second worker (its Hello): the first
/// worker stays upgraded, the second serves as before with its pid, the
/// rollout stops in one sentence, and every device is served.
fn procs_a_failure_at_the_second_worker_leaves_the_first_upgraded() {
    let admin = free_addr();
    let server = Server::start_with(
        &["--procs", "2", "--cores", "0", "--admin", &admin],
        None,
        &[("C1M_TEST_HANDOVER_FAIL", "hello@1")],
    );
    let started = server.wait_error("started 2 worker processes");
    let pids: Vec<u32> = started
        .rsplit("pids ")
        .next()
        .unwrap()
        .split(',')
        .map(|p| p.trim().parse().unwrap())
        .collect();
    let mut devices: Vec<_> = (0..12).map(|i| server.ws(&format!("s{i}"))).collect();
    server.signal(libc::SIGUSR2);
    let first = server.wait_error("upgrade: worker 0 (1 of 2)");
    assert!(
        first.contains(&format!("pid {} handed over", pids[0])),
        "{first}"
    );
    let new0: u32 = first
        .split("handed over to pid ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no new pid in {first}"));
    let stopped = server.wait_error("upgrade stopped at worker 1 of 2");
    assert!(
        stopped.contains(&format!("worker 1 (pid {}) serves as before", pids[1])),
        "{stopped}"
    );
    assert!(
        stopped.contains(&format!("workers 0 run the new binary (pids {new0})")),
        "{stopped}"
    );
    assert_eq!(sorted(workers_of(&server, 2)), sorted(vec![new0, pids[1]]));
    for (i, ws) in devices.iter_mut().enumerate() {
        ws.send(Message::Ping(b"still".to_vec())).unwrap();
        assert_eq!(
            ws.read().unwrap(),
            Message::Pong(b"still".to_vec()),
            "device {i}"
        );
    }
    for (i, old) in devices.iter_mut().enumerate() {
        let mut again = server.ws(&format!("s{i}"));
        match old.read() {
            Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 4000),
            other => panic!("s{i} was not replaced: {other:?}"),
        }
        again.send(Message::Ping(b"again".to_vec())).unwrap();
        assert_eq!(again.read().unwrap(), Message::Pong(b"again".to_vec()));
    }
}

/// Pushes in flight across a handover reach their devices. The admin
/// port moves first, so a push for a device not moved yet (or on its way)
/// is asked of the new process's shard, which holds the ask until the
/// device arrives and then delivers it (200): none is answered "not
/// connected" while its device is connected. The new process takes each
/// batch 150 ms late here (test hook `slow`), so that the pushes land
/// while the devices move.
fn pushes_in_flight_reach_their_devices_across_the_handover() {
    let admin = free_addr();
    let server = Server::start_with(
        &["--cores", "0", "--admin", &admin],
        None,
        &[("C1M_TEST_HANDOVER_FAIL", "slow")],
    );
    let n = 600;
    let mut devices: Vec<_> = (0..n).map(|i| server.ws(&format!("q{i}"))).collect();
    server.signal(libc::SIGUSR2);
    // The new process has the admin port: the pushes go to it from here.
    server.wait_error("from the old process (pid");
    let pushers: Vec<_> = (0..4)
        .map(|t| {
            let admin = admin.clone();
            std::thread::spawn(move || {
                (0..n)
                    .skip(t * 10)
                    .step_by(40)
                    .map(|i| {
                        let path = format!("/devices/q{i}/messages");
                        let body = format!("push to q{i}");
                        // A 503 (the old process's admin thread, in the
                        // moment it hands the port over) asks for a retry.
                        let mut tries = 0;
                        loop {
                            let (status, said) =
                                http_with(&admin, "POST", &path, "text/plain", body.as_bytes());
                            tries += 1;
                            if status != 503 || tries == 5 {
                                break (i, status, said);
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let line = server.wait_error("this process exits");
    let _new = NewServer(new_pid(&line));
    let mut pushed = Vec::new();
    for p in pushers {
        pushed.extend(p.join().unwrap());
    }
    assert_eq!(pushed.len(), 60);
    for (i, status, said) in &pushed {
        assert_eq!(*status, 200, "the push to q{i} during the handover: {said}");
        assert_eq!(
            devices[*i].read().unwrap(),
            Message::Text(format!("push to q{i}")),
            "device q{i}"
        );
    }
    // Every device is still served.
    for (i, ws) in devices.iter_mut().enumerate().step_by(50) {
        ws.send(Message::Ping(b"p".to_vec())).unwrap();
        assert_eq!(ws.read().unwrap(), Message::Pong(b"p".to_vec()), "q{i}");
    }
}

/// An upgraded raw socket for device `id` and the UDP ticket of its 101.
fn device_with_ticket(addr: std::net::SocketAddr, id: &str) -> (TcpStream, [u8; ticket::LEN]) {
    let (s, head) = raw_ws_head(addr, id);
    let t = ticket_of(&head).unwrap_or_else(|| panic!("no ticket in {head}"));
    (s, t)
}

/// Waits until process `pid` (not our child) has exited.
fn gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            // Exited, not yet reaped by whoever adopted it.
            Ok(st)
                if st
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return
            }
            Ok(_) => {}
        }
        assert!(Instant::now() < deadline, "process {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends each ticket as a datagram to `to` every 100 ms until `stop`.
fn heartbeat_by_datagram(
    to: std::net::SocketAddr,
    tickets: Vec<[u8; ticket::LEN]>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for t in &tickets {
                u.send_to(t, to).unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// `--udp-heartbeat`: the tickets devices hold stay good across a hot
/// upgrade, twice. The new process takes the UDP sockets and the old
/// one's key, and each connection keeps the ticket it had even where the
/// new slab puts it at another key (here: the old slab had holes). Devices
/// that heartbeat by datagram only outlive several timeouts across both
/// handovers, not one datagram of theirs is refused as forged (`udp_bad`),
/// and a device that sends nothing still expires.
fn udp_tickets_stay_good_across_sigusr2() {
    let mut server = Server::start(&[
        "--cores",
        "0",
        "--timeout",
        "1500ms",
        "--tick",
        "50ms",
        "--udp-heartbeat",
    ]);
    let mut all: Vec<_> = (0..6)
        .map(|i| device_with_ticket(server.addr, &format!("u{i}")))
        .collect();
    // Holes in the old slab (keys 0 and 2): the new one packs the rest
    // at other keys than their tickets name.
    drop(all.remove(2));
    drop(all.remove(0));
    server.wait_line("the two closes", |l| field(l, "conns") == 4);
    let mut silent = all.pop().unwrap().0;
    let tickets: Vec<_> = all.iter().map(|(_, t)| *t).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beats = heartbeat_by_datagram(server.addr, tickets, stop.clone());

    server.signal(libc::SIGUSR2);
    let line = server.wait_error("this process exits");
    let first = NewServer(new_pid(&line));
    assert!(server.child.wait().unwrap().success());
    while server.lines.try_recv().is_ok() {}
    // The new process counts the datagrams as heartbeats, refuses none.
    let l = server.wait_line("the first new process's datagrams", |l| {
        field(l, "taken_over") == 4 && field(l, "udp_heartbeats") >= 30
    });
    assert_eq!(field(&l, "udp_bad"), 0, "{l}");

    // Again, from the new process: its connections (and one that came
    // after the first upgrade, at a key of its own) move on.
    let (late, late_ticket) = device_with_ticket(server.addr, "late");
    let stop_late = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let late_beats = heartbeat_by_datagram(server.addr, vec![late_ticket], stop_late.clone());
    // SAFETY: kill(2) on the server process this test started (via the upgrade).
    unsafe { libc::kill(first.0 as i32, libc::SIGUSR2) };
    let line = server.wait_error("this process exits");
    let _second = NewServer(new_pid(&line));
    assert_ne!(new_pid(&line), first.0);
    // Only the second new process's lines from here.
    gone(first.0);
    while server.lines.try_recv().is_ok() {}
    let l = server.wait_line("the second new process's datagrams", |l| {
        field(l, "taken_over") >= 3 && field(l, "udp_heartbeats") >= 60
    });
    assert_eq!(field(&l, "udp_bad"), 0, "{l}");
    std::thread::sleep(Duration::from_millis(1600));
    for (i, (s, _)) in all.iter_mut().enumerate() {
        assert!(still_open(s), "device {i} expired while its datagrams came");
    }
    let mut late = late;
    assert!(still_open(&mut late), "the late device expired");
    // The silent one expired: a reset (or a FIN), not a timeout.
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let r = silent.read(&mut [0u8; 16]);
    assert!(
        matches!(r, Ok(0))
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the silent device was not expired: {r:?}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    stop_late.store(true, std::sync::atomic::Ordering::Relaxed);
    beats.join().unwrap();
    late_beats.join().unwrap();
    let l = server.wait_line("no forged datagram", |l| field(l, "udp_heartbeats") > 0);
    assert_eq!(field(&l, "udp_bad"), 0, "{l}");
}

/// `--udp-heartbeat` through a slow handover (each batch of connections
/// taken 150 ms late, so that datagrams come while devices are in
/// transit): once connections move, only the new process reads the UDP
/// sockets, and it holds a datagram for a device still on its way until
/// the device arrives. Not one datagram is lost: `udp_stale` stays 0 in
/// both processes (before, the old one read datagrams for devices it had
/// handed over, and the new one for devices not yet there: each one a
/// lost heartbeat), and none is refused as forged.
fn udp_datagrams_for_devices_in_transit_are_not_lost() {
    let mut server = Server::start_with(
        &[
            "--cores",
            "0",
            "--timeout",
            "3s",
            "--tick",
            "50ms",
            "--udp-heartbeat",
        ],
        None,
        &[("C1M_TEST_HANDOVER_FAIL", "slow")],
    );
    // Two batches of descriptors (253 each): 300 ms in transit in all.
    const DEVICES: usize = 300;
    let mut all: Vec<_> = (0..DEVICES)
        .map(|i| device_with_ticket(server.addr, &format!("t{i}")))
        .collect();
    server.wait_line("every device", |l| field(l, "conns") == DEVICES as u64);
    let tickets: Vec<_> = all.iter().map(|(_, t)| *t).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beats = heartbeat_by_datagram(server.addr, tickets, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    server.signal(libc::SIGUSR2);
    let line = server.wait_error("this process exits");
    let _new = NewServer(new_pid(&line));
    assert!(server.child.wait().unwrap().success());
    // Every line of both processes, until the new one has held all for a
    // while and counted a second of datagrams after it took them.
    let mut checked = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = server
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("stats lines until the new process has the datagrams");
        if !l.contains("udp_stale=") {
            continue;
        }
        assert_eq!(field(&l, "udp_stale"), 0, "a datagram lost: {l}");
        assert_eq!(field(&l, "udp_bad"), 0, "{l}");
        checked += 1;
        if field(&l, "taken_over") == DEVICES as u64
            && field(&l, "udp_heartbeats") >= 4 * DEVICES as u64
        {
            break;
        }
    }
    assert!(checked > 5, "{checked} stats lines");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    beats.join().unwrap();
    for (i, (s, _)) in all.iter_mut().enumerate() {
        assert!(still_open(s), "device {i} closed");
    }
}

/// The same under --procs: the supervisor's new workers inherit the UDP
/// group as any worker does and take each old worker's ticket key.
fn procs_udp_tickets_stay_good_across_sigusr2() {
    let admin = free_addr();
    let server = Server::start(&[
        "--procs",
        "2",
        "--cores",
        "0",
        "--admin",
        &admin,
        "--timeout",
        "1500ms",
        "--tick",
        "50ms",
        "--udp-heartbeat",
    ]);
    let all: Vec<_> = (0..24)
        .map(|i| device_with_ticket(server.addr, &format!("pu{i}")))
        .collect();
    // Every other one goes: holes in both workers' slabs.
    let mut all: Vec<_> = all.into_iter().skip(1).step_by(2).collect();
    server.wait_line("the closes", |l| field(l, "conns") == 12);
    let on: std::collections::BTreeSet<u64> = (0..12)
        .map(|i| held_by(&admin, &format!("pu{}", 2 * i + 1)))
        .collect();
    assert_eq!(on.len(), 2, "12 devices all on one worker: {on:?}");
    let tickets: Vec<_> = all.iter().map(|(_, t)| *t).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beats = heartbeat_by_datagram(server.addr, tickets, stop.clone());
    let before = sorted(workers_of(&server, 2));
    server.signal(libc::SIGUSR2);
    let line = server.wait_error("workers handed over to new processes");
    assert!(line.contains("all 2 workers"), "{line}");
    let after = sorted(workers_of(&server, 2));
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} then {after:?}"
    );
    // Two timeouts on datagrams alone, on the new workers.
    std::thread::sleep(Duration::from_millis(3000));
    for (i, (s, _)) in all.iter_mut().enumerate() {
        assert!(still_open(s), "device {i} expired while its datagrams came");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    beats.join().unwrap();
    let l = server.wait_line("the datagrams", |l| field(l, "udp_heartbeats") >= 300);
    assert_eq!(field(&l, "udp_bad"), 0, "{l}");
    assert_eq!(field(&l, "expired"), 0, "{l}");
}

on_both_backends!(
    pushes_in_flight_reach_their_devices_across_the_handover,
    udp_tickets_stay_good_across_sigusr2,
    udp_datagrams_for_devices_in_transit_are_not_lost,
    procs_udp_tickets_stay_good_across_sigusr2,
    devices_keep_their_connections_across_sigusr2,
    a_new_binary_that_fails_leaves_the_old_serving,
    a_new_process_dying_mid_handover_leaves_the_old_listening,
    procs_devices_keep_their_connections_across_sigusr2,
    procs_a_new_binary_that_fails_leaves_every_worker_serving,
    procs_a_failure_at_the_second_worker_leaves_the_first_upgraded,
);
