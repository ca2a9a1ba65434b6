//! Limits: a full shard answers 503, and out of descriptors the server
//! backs off, keeps serving and recovers.

mod support;

use std::net::TcpStream;
use std::time::Duration;

use tungstenite::Message;

use support::*;

fn full_shard_answers_503() {
    let server = Server::start(&["--cores", "0", "--max-conns", "1"]);
    let _held = server.ws("first");
    let resp = raw_request(server.addr, &upgrade_request("/ws?id=second", ""));
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp:?}");
}

fn out_of_descriptors_the_server_backs_off_keeps_serving_and_recovers() {
    let server = Server::start_with_fd_limit(&["--cores", "0", "--max-conns", "1000"], Some(48));
    let mut device = server.ws("keeps-its-connection");
    // Flood with plain TCP connections until accept fails with EMFILE.
    let flood: Vec<TcpStream> = (0..80)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    let l = server.wait_line("exhaustion", |l| field(l, "accept_exhausted") > 0);
    let first = field(&l, "accept_exhausted");
    // The connection it has is still served.
    device.send(Message::Ping(b"alive".to_vec())).unwrap();
    assert_eq!(device.read().unwrap(), Message::Pong(b"alive".to_vec()));
    // No busy loop: one failed accept per 100 ms back-off, not thousands.
    std::thread::sleep(Duration::from_secs(1));
    let l = server.wait_line("a later line", |_| true);
    let per_second = field(&l, "accept_exhausted") - first;
    assert!(
        per_second <= 20,
        "{per_second} failed accepts in about a second: {l}"
    );
    // Free descriptors: the server accepts again.
    drop(flood);
    let mut again = server.ws("after-the-flood");
    again.send(Message::Ping(b"x".to_vec())).unwrap();
    assert_eq!(again.read().unwrap(), Message::Pong(b"x".to_vec()));
}

on_both_backends!(
    full_shard_answers_503,
    out_of_descriptors_the_server_backs_off_keeps_serving_and_recovers,
);
