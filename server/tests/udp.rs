//! `--udp-heartbeat` on the real `server` binary: tickets in the 101,
//! datagrams as heartbeats, steered by the kernel to the shard named in
//! the ticket. Small scale, seconds; every test on both I/O backends.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use c1m_proto::frame::{self, Opcode};
use c1m_proto::ticket;

use support::{field, io, still_open};

struct Server {
    child: Child,
    addr: SocketAddr,
    lines: Receiver<String>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        // A port free for TCP and UDP alike.
        let addr = loop {
            let a = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            if UdpSocket::bind(a).is_ok() {
                break a;
            }
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_server"))
            .args(["--io", io()])
            .arg("--listen")
            .arg(addr.to_string())
            .args(["--stats-interval", "100ms"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start server");
        let lines = support::lines_of(child.stdout.take().unwrap());
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("server: {line}");
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "server did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, addr, lines }
    }

    /// Waits for a stats line matching `pred`; returns it.
    fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains("total ") && pred(&l) => return l,
                Ok(l) => last = l,
                Err(_) => panic!("no stats line with {what}; last: {last}"),
            }
        }
    }

    /// An upgraded raw socket for device `id`, and the ticket of its 101
    /// (None when the 101 has none).
    fn device(&self, id: &str) -> (TcpStream, Option<[u8; ticket::LEN]>) {
        let (s, head) = support::raw_ws_head(self.addr, id);
        (s, support::ticket_of(&head))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `bytes` to `to` from a fresh socket (a fresh source port, as a
/// device behind a NAT may have).
fn send(to: SocketAddr, bytes: &[u8]) {
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(u.send_to(bytes, to).unwrap(), bytes.len());
}

/// Blocks until the server ends `s`; how long that took.
fn wait_closed(s: &mut TcpStream) -> Duration {
    let t = Instant::now();
    let mut b = [0u8; 64];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return t.elapsed(),
            Ok(_) => {}
        }
    }
}

/// A silent WebSocket is kept alive by its datagrams alone, past several
/// timeouts; when they stop it expires within timeout + tick. A server
/// without the flag offers no ticket.
fn datagrams_keep_a_silent_websocket_alive_and_their_stop_expires_it() {
    let off = Server::start(&["--cores", "0"]);
    assert_eq!(off.device("plain").1, None, "no ticket when off");
    drop(off);

    let server = Server::start(&[
        "--cores",
        "0",
        "--timeout",
        "400ms",
        "--tick",
        "50ms",
        "--udp-heartbeat",
    ]);
    let (mut s, t) = server.device("dev-1");
    let t = t.expect("a ticket in the 101");
    let until = Instant::now() + Duration::from_millis(1500);
    let mut sent = 0;
    while Instant::now() < until {
        send(server.addr, &t);
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(still_open(&mut s), "expired while its datagrams came");
    let l = server.wait_line("the datagrams", |l| field(l, "udp_heartbeats") >= sent);
    assert_eq!(field(&l, "expired"), 0, "{l}");
    assert_eq!(field(&l, "frames"), 0, "not one WebSocket frame: {l}");
    // The WebSocket still works.
    let mut ping = Vec::new();
    frame::write_masked_frame(&mut ping, Opcode::Ping, true, b"p", [1, 2, 3, 4]);
    s.write_all(&ping).unwrap();
    let mut pong = [0u8; 3];
    s.read_exact(&mut pong).unwrap();
    assert_eq!(pong, [0x8a, 1, b'p']);
    // The ping was its last heartbeat: silence from here.
    let silent = wait_closed(&mut s);
    assert!(silent >= Duration::from_millis(400), "early: {silent:?}");
    assert!(
        silent <= Duration::from_millis(400 + 50 + 300),
        "late: {silent:?}"
    );
    let l = server.wait_line("the expiry", |l| field(l, "expired") == 1);
    assert_eq!(
        (field(&l, "udp_bad"), field(&l, "udp_stale")),
        (0, 0),
        "{l}"
    );
}

/// Forged, stale, truncated and random datagrams are counted by reason,
/// and keep nothing alive: the silent device they aim at expires on time.
fn bad_datagrams_are_counted_and_change_nothing() {
    let server = Server::start(&[
        "--cores",
        "0",
        "--timeout",
        "600ms",
        "--tick",
        "50ms",
        "--udp-heartbeat",
    ]);
    // A stale ticket: its connection closed, its slot taken by another.
    let (mut gone, old) = server.device("gone");
    let old = old.unwrap();
    gone.write_all(&[0x88, 0x80, 0, 0, 0, 0]).unwrap(); // Close, masked, empty
    wait_closed(&mut gone);
    server.wait_line("the close", |l| field(l, "conns") == 0);
    let (mut target, t) = server.device("target");
    let t = t.unwrap();
    assert_eq!(&t[..6], &old[..6], "the same shard and slot");
    assert_ne!(&t[6..10], &old[6..10], "another generation");
    let mut forged = t;
    forged[ticket::LEN - 1] ^= 1;
    let mut other_slot = t;
    other_slot[5] ^= 1; // a slot no connection holds
    let mut other_shard = t;
    other_shard[1] = 7; // past the group: the kernel's hash picks a socket
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut random = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let start = Instant::now();
    let (mut bad, mut stale) = (0, 0);
    while start.elapsed() < Duration::from_millis(500) {
        send(server.addr, &forged);
        send(server.addr, &t[..ticket::LEN - 1]);
        send(server.addr, &[t.as_slice(), b"x"].concat());
        send(server.addr, &other_shard);
        send(server.addr, &[]);
        let junk: Vec<u8> = (0..40).map(|_| random() as u8).collect();
        send(server.addr, &junk);
        bad += 6;
        send(server.addr, &old);
        send(server.addr, &other_slot);
        stale += 2;
        std::thread::sleep(Duration::from_millis(50));
    }
    let silent = wait_closed(&mut target);
    let lived = start.elapsed();
    assert!(silent > Duration::ZERO);
    assert!(
        lived <= Duration::from_millis(600 + 50 + 300),
        "kept alive by bad datagrams: {lived:?}"
    );
    let l = server.wait_line("the expiry", |l| field(l, "expired") == 1);
    let l = if field(&l, "udp_bad") == bad {
        l
    } else {
        server.wait_line("every bad datagram", |l| field(l, "udp_bad") == bad)
    };
    assert_eq!(field(&l, "udp_stale"), stale, "{l}");
    assert_eq!(field(&l, "udp_heartbeats"), 0, "{l}");
}

/// Devices spread over the shards by the TCP hash; each one's datagrams,
/// from fresh source ports, reach the shard named in its ticket (a
/// datagram on any other shard would count as bad).
fn every_datagram_lands_on_the_shard_its_ticket_names(extra: &[&str]) {
    let mut args = vec!["--cores", "0-1", "--udp-heartbeat"];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    let devices: Vec<_> = (0..24)
        .map(|i| server.device(&format!("steer-{i}")))
        .collect();
    let tickets: Vec<_> = devices.iter().map(|(_, t)| t.unwrap()).collect();
    let mut shards: Vec<u16> = tickets
        .iter()
        .map(|t| u16::from_be_bytes([t[0], t[1]]))
        .collect();
    shards.sort_unstable();
    shards.dedup();
    assert_eq!(shards, [0, 1], "devices on both shards");
    let rounds = 5;
    for _ in 0..rounds {
        for t in &tickets {
            send(server.addr, t);
        }
    }
    let n = (rounds * tickets.len()) as u64;
    let l = server.wait_line("every datagram", |l| {
        field(l, "udp_heartbeats") + field(l, "udp_bad") + field(l, "udp_stale") >= n
    });
    assert_eq!(field(&l, "udp_heartbeats"), n, "{l}");
    assert_eq!(
        (field(&l, "udp_bad"), field(&l, "udp_stale")),
        (0, 0),
        "{l}"
    );
}

fn every_datagram_lands_on_its_shard() {
    every_datagram_lands_on_the_shard_its_ticket_names(&[]);
}

fn every_datagram_lands_on_its_shard_under_procs_2() {
    every_datagram_lands_on_the_shard_its_ticket_names(&["--procs", "2"]);
}

/// The same id connects again: the old connection gets Close 4000, and its
/// ticket no longer keeps anything alive; the new one's does.
fn a_replaced_device_cannot_be_kept_alive_by_its_old_ticket() {
    let server = Server::start(&[
        "--cores",
        "0",
        "--timeout",
        "500ms",
        "--tick",
        "50ms",
        "--udp-heartbeat",
    ]);
    let (mut first, old) = server.device("same");
    let (mut second, new) = server.device("same");
    let mut close = [0u8; 4];
    first.read_exact(&mut close).unwrap();
    assert_eq!(close, [0x88, 10, 0x0f, 0xa0], "Close 4000");
    let (old, new) = (old.unwrap(), new.unwrap());
    assert_ne!(old, new);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1200) {
        send(server.addr, &old);
        send(server.addr, &new);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(still_open(&mut second), "the new connection is kept alive");
    let l = server.wait_line("the datagrams", |l| {
        field(l, "udp_heartbeats") + field(l, "udp_stale") >= 24
    });
    assert_eq!(field(&l, "udp_bad"), 0, "{l}");
    assert!(field(&l, "udp_stale") >= 12, "{l}");
    assert_eq!(field(&l, "replaced"), 1, "{l}");
    assert_eq!(field(&l, "expired"), 0, "{l}");
    // Only the old ticket from here: the new connection expires.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(900) && still_open(&mut second) {
        send(server.addr, &old);
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_closed(&mut second);
    server.wait_line("the expiry", |l| field(l, "expired") == 1);
}

on_both_backends!(
    datagrams_keep_a_silent_websocket_alive_and_their_stop_expires_it,
    bad_datagrams_are_counted_and_change_nothing,
    every_datagram_lands_on_its_shard,
    every_datagram_lands_on_its_shard_under_procs_2,
    a_replaced_device_cannot_be_kept_alive_by_its_old_ticket,
);
