//! Admission control (--max-upgrades-per-sec): 503 refuses the excess,
//! defer queues it, and connected devices keep their pongs either way.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

use support::*;

/// Opens `n` connections at once, each sending an upgrade request with an
/// id of its own, then reads each answer's head: (101s, 503s with
/// Retry-After). Any other answer fails the test.
fn upgrade_burst(addr: SocketAddr, tag: &str, n: usize) -> (usize, usize) {
    let socks: Vec<TcpStream> = (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&upgrade_request(&format!("/ws?id={tag}-{i}"), ""))
                .unwrap();
            s
        })
        .collect();
    let (mut upgraded, mut refused) = (0, 0);
    for mut s in socks {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).unwrap_or(0) == 0 {
                break;
            }
            head.push(b[0]);
        }
        let text = String::from_utf8_lossy(&head);
        if text.starts_with("HTTP/1.1 101 ") {
            upgraded += 1;
        } else if text.starts_with("HTTP/1.1 503 ") && text.contains("\r\nRetry-After: 1\r\n") {
            refused += 1;
        } else {
            panic!("neither a 101 nor a 503 with Retry-After: {text:?}");
        }
    }
    (upgraded, refused)
}

/// A device upgraded under admission control: tries again (as a device
/// would) while its attempts are refused for the budget.
fn ws_admitted(server: &Server, id: &str) -> WebSocket<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stream = TcpStream::connect(server.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let url = format!("ws://{}/ws?id={id}", server.addr);
        if let Ok((ws, _)) = tungstenite::client(url, stream) {
            return ws;
        }
        assert!(Instant::now() < deadline, "never admitted");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// --max-upgrades-per-sec with 503: a burst over the budget is answered
/// 503 with Retry-After at once (counted in the stats line and /metrics),
/// while the device already connected keeps getting its pongs.
fn admission_503_refuses_the_excess_and_connected_devices_keep_their_pongs() {
    let admin = free_addr();
    let server = Server::start(&[
        "--cores",
        "0",
        "--max-upgrades-per-sec",
        "2",
        "--upgrade-excess",
        "503",
        "--admin",
        &admin,
    ]);
    let mut device = ws_admitted(&server, "held");
    let mut refused = 0;
    for round in 0..3 {
        let (up, no) = upgrade_burst(server.addr, &format!("burst{round}"), 20);
        assert_eq!(up + no, 20);
        refused += no;
        device.send(Message::Ping(b"alive".to_vec())).unwrap();
        assert_eq!(device.read().unwrap(), Message::Pong(b"alive".to_vec()));
    }
    // 2 a second, 1 at once: nearly all of 60 in three bursts are refused.
    assert!(refused >= 30, "only {refused} of 60 refused");
    let l = server.wait_line("the refusals", |l| {
        field(l, "admission_refused") >= refused as u64
    });
    assert_eq!(field(&l, "admission_paused"), 0, "{l}");
    // Refused before any work: not accepted as connections, not rejected.
    assert_eq!(field(&l, "rejected"), 0, "{l}");
    scrape_until(&admin, "the refusals", |s| {
        metric(s, "c1m_admission_refused_total", &[]) >= refused as f64
    });
    device.send(Message::Ping(b"still".to_vec())).unwrap();
    assert_eq!(device.read().unwrap(), Message::Pong(b"still".to_vec()));
}

/// --max-upgrades-per-sec with defer: the shard stops accepting once its
/// budget is spent and the excess waits (in the accept queue, or, for
/// those io_uring's multishot accept took before its cancel landed, held
/// by the shard): every device of a burst is upgraded in the end, none
/// refused, and the device already connected keeps getting its pongs.
fn admission_defer_queues_the_excess_and_upgrades_it_later() {
    let server = Server::start(&[
        "--cores",
        "0",
        "--max-upgrades-per-sec",
        "20",
        "--upgrade-excess",
        "defer",
    ]);
    let mut device = ws_admitted(&server, "held");
    let (up, no) = upgrade_burst(server.addr, "burst", 30);
    assert_eq!(up + no, 30);
    assert_eq!((up, no), (30, 0), "every one waits, none is refused");
    device.send(Message::Ping(b"alive".to_vec())).unwrap();
    assert_eq!(device.read().unwrap(), Message::Pong(b"alive".to_vec()));
    let l = server.wait_line("pauses", |l| field(l, "admission_paused") > 0);
    assert_eq!(field(&l, "admission_refused"), no as u64, "{l}");
}

on_both_backends!(
    admission_503_refuses_the_excess_and_connected_devices_keep_their_pongs,
    admission_defer_queues_the_excess_and_upgrades_it_later,
);
