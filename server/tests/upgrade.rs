//! The upgrade and the WebSocket protocol against the real `server`
//! binary: pongs, HTTP refusals, protocol errors and their close codes, the
//! handshake and frame timeouts, devices that never read or vanish, a panic
//! contained to one device. Small scale, seconds; on both I/O backends.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use c1m_proto::frame::{self, Opcode};
use tungstenite::Message;

use support::*;

fn upgrade_with_id_then_ping_gets_pong_with_same_payload() {
    let server = Server::start(&["--cores", "0"]);
    let mut ws = server.ws("02:00:5e:00:00:01");
    ws.send(Message::Ping(b"hb-42".to_vec())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"hb-42".to_vec()));
    let l = server.wait_line("an upgraded connection", |l| field(l, "conns") == 1);
    assert_eq!(field(&l, "upgraded"), 1);
    ws.close(None).unwrap();
    server.wait_line("a client close", |l| field(l, "client_close") == 1);
}

fn bad_requests_get_their_http_status() {
    let server = Server::start(&["--cores", "0"]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (upgrade_request("/ws", ""), "HTTP/1.1 400 "),
        (upgrade_request("/ws?id=not/valid", ""), "HTTP/1.1 400 "),
        (upgrade_request("/nowhere?id=a", ""), "HTTP/1.1 404 "),
        (
            b"GET /ws?id=a HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "HTTP/1.1 426 ",
        ),
        (
            upgrade_request("/ws?id=a", &format!("X-Pad: {}\r\n", "p".repeat(9000))),
            "HTTP/1.1 431 ",
        ),
    ];
    for (req, status) in &cases {
        let resp = raw_request(server.addr, req);
        assert!(resp.starts_with(status), "expected {status}, got {resp:?}");
        let body = resp.split("\r\n\r\n").nth(1).unwrap();
        assert!(
            body.ends_with('\n') && body.trim_end().lines().count() == 1,
            "{body:?}"
        );
    }
    server.wait_line("the rejections", |l| {
        field(l, "rejected") == cases.len() as u64
    });
}

fn protocol_errors_close_with_1002_1007_1009() {
    let server = Server::start(&["--cores", "0", "--max-message", "1KiB"]);
    let mut cases: Vec<(Vec<u8>, u16)> = Vec::new();
    let mut unmasked = Vec::new();
    frame::write_frame(&mut unmasked, Opcode::Binary, b"no mask");
    cases.push((unmasked, 1002));
    let mut bad_utf8 = Vec::new();
    frame::write_masked_frame(
        &mut bad_utf8,
        Opcode::Text,
        true,
        &[0xc3, 0x28],
        [1, 2, 3, 4],
    );
    cases.push((bad_utf8, 1007));
    let mut big = Vec::new();
    frame::write_masked_frame(&mut big, Opcode::Binary, true, &[0; 2000], [1, 2, 3, 4]);
    cases.push((big, 1009));
    for (bytes, expected) in &cases {
        let mut s = raw_ws(server.addr);
        s.write_all(bytes).unwrap();
        let (op, payload) = read_frame(&mut s);
        assert_eq!(op, 8, "a Close frame");
        assert_eq!(close_code(&payload), *expected);
    }
    server.wait_line("the protocol errors", |l| field(l, "protocol_error") == 3);
}

fn handshake_timeout_closes_half_a_request() {
    let server = Server::start(&[
        "--cores",
        "0",
        "--handshake-timeout",
        "300ms",
        "--tick",
        "50ms",
    ]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /ws?id=slow HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let sent = Instant::now();
    let mut buf = [0u8; 16];
    let r = s.read(&mut buf);
    assert!(matches!(r, Ok(0)) || r.is_err(), "closed, got {r:?}");
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "closed early after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(2),
        "closed late after {waited:?}"
    );
    server.wait_line("the handshake timeout", |l| {
        field(l, "handshake_timeout") == 1
    });
}

fn a_device_that_never_reads_is_closed_not_buffered() {
    let server = Server::start(&["--cores", "0", "--max-message", "64KiB"]);
    let mut s = raw_ws(server.addr);
    // Pings with 125-byte payloads, never reading a pong: the socket buffers
    // fill, then the server's bounded pending output, then it closes us.
    let mut ping = Vec::new();
    frame::write_masked_frame(&mut ping, Opcode::Ping, true, &[7; 125], [1, 2, 3, 4]);
    let burst = ping.repeat(1000);
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.write_all(&burst).is_ok() {
        assert!(Instant::now() < deadline, "never closed");
    }
    server.wait_line("the slow reader", |l| field(l, "slow_reader") == 1);
}

fn a_killed_client_process_leaves_nothing_behind() {
    let server = Server::start(&["--cores", "0-1"]);
    // A separate process holds 300 upgraded devices, then dies by SIGKILL.
    let script = r#"
import socket, sys, time
port = int(sys.argv[1])
socks = []
for i in range(300):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(("GET /ws?id=k%d HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % i).encode())
    assert s.recv(4096).startswith(b"HTTP/1.1 101")
    socks.append(s)
print("ready", flush=True)
time.sleep(60)
"#;
    let mut client = Command::new("python3")
        .args(["-c", script, &server.addr.port().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut ready = String::new();
    BufReader::new(client.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    server.wait_line("300 devices", |l| field(l, "conns") == 300);
    client.kill().unwrap();
    client.wait().unwrap();
    // The kernel closes the dead process's sockets; the server frees them all.
    let l = server.wait_line("all freed", |l| field(l, "conns") == 0);
    // Everything accepted (the 300, and Server::start's probe) is gone.
    assert_eq!(field(&l, "upgraded"), 300, "{l}");
    assert_eq!(field(&l, "peer_gone"), field(&l, "accepted"), "{l}");
}

fn a_frame_trickled_too_slowly_is_closed_by_the_frame_timeout() {
    let server = Server::start(&["--cores", "0", "--frame-timeout", "300ms", "--tick", "50ms"]);
    let mut s = raw_ws(server.addr);
    // Half a frame header, then nothing: well within --timeout (90 s), but
    // the frame must be complete within --frame-timeout.
    s.write_all(&[0x89]).unwrap();
    let began = Instant::now();
    let mut buf = [0u8; 8];
    let r = s.read(&mut buf);
    let waited = began.elapsed();
    assert!(r.is_err() || matches!(r, Ok(0)), "closed, got {r:?}");
    assert!(
        waited >= Duration::from_millis(300),
        "closed early after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "closed late after {waited:?}"
    );
    server.wait_line("the frame timeout", |l| field(l, "frame_timeout") == 1);
}

fn a_panic_while_handling_one_device_closes_only_that_device() {
    let server = Server::start_with(&["--cores", "0"], None, &[("C1M_INJECT_PANIC", "1")]);
    let mut others: Vec<_> = (0..3).map(|i| server.ws(&format!("ok{i}"))).collect();
    let mut victim = raw_ws(server.addr);
    // A text frame masked with a zero key: the marker travels in the clear.
    let mut frame = Vec::new();
    frame::write_masked_frame(
        &mut frame,
        Opcode::Text,
        true,
        c1m::shard::INJECT_PANIC,
        [0; 4],
    );
    victim.write_all(&frame).unwrap();
    let mut rest = Vec::new();
    // Closed (reset or end of stream), not answered.
    let _ = victim.read_to_end(&mut rest);
    let line = server.wait_line("the internal error", |l| field(l, "internal_error") == 1);
    assert_eq!(field(&line, "conns"), 3, "{line}");
    // The shard goes on: every other device still gets its pong.
    for ws in &mut others {
        ws.send(Message::Ping(b"still".to_vec())).unwrap();
        assert_eq!(ws.read().unwrap(), Message::Pong(b"still".to_vec()));
    }
}

on_both_backends!(
    upgrade_with_id_then_ping_gets_pong_with_same_payload,
    bad_requests_get_their_http_status,
    protocol_errors_close_with_1002_1007_1009,
    handshake_timeout_closes_half_a_request,
    a_device_that_never_reads_is_closed_not_buffered,
    a_killed_client_process_leaves_nothing_behind,
    a_frame_trickled_too_slowly_is_closed_by_the_frame_timeout,
    a_panic_while_handling_one_device_closes_only_that_device,
);
