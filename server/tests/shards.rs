//! Shards and the port: both shards take connections (on SCHED_BATCH
//! unless --sched normal), --reuseport-cpu
//! steers by receiving CPU, a second server on the port is refused unless
//! --join, and a server without io_uring says so and runs on epoll.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use tungstenite::Message;

use support::*;

fn both_shards_take_connections() {
    let server = Server::start(&["--cores", "0-1"]);
    let sockets: Vec<_> = (0..64).map(|i| server.ws(&format!("dev{i}"))).collect();
    let l = server.wait_line("64 connections", |l| field(l, "conns") == 64);
    let shards = l
        .split("shards=[")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    let per: Vec<u64> = shards.split(',').map(|n| n.parse().unwrap()).collect();
    assert_eq!(per.len(), 2, "{l}");
    assert!(per.iter().all(|&n| n > 0), "SO_REUSEPORT spread: {l}");
    drop(sockets);
}

/// The shards' connection counts from a stats line's `shards=[a,b]`.
fn per_shard(line: &str) -> Vec<u64> {
    let list = line
        .split("shards=[")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    list.split(',').map(|n| n.parse().unwrap()).collect()
}

/// On loopback a connection is received on the CPU that opened it: with
/// --reuseport-cpu, devices opened from CPU 1 all land on shard 1, those
/// from CPU 0 on shard 0.
fn reuseport_cpu_steers_each_connection_to_the_receiving_cpus_shard() {
    if !two_cpus() {
        return;
    }
    let server = Server::start(&["--cores", "0-1", "--reuseport-cpu"]);
    let ids = |cpu: usize, n: usize| (0..n).map(|i| format!("c{cpu}-{i}")).collect();
    let on_1 = open_pinned(server.addr, 1, ids(1, 5));
    let l = server.wait_line("5 connections", |l| field(l, "conns") == 5);
    assert_eq!(per_shard(&l), [0, 5], "{l}");
    let on_0 = open_pinned(server.addr, 0, ids(0, 3));
    let l = server.wait_line("8 connections", |l| field(l, "conns") == 8);
    assert_eq!(per_shard(&l), [3, 5], "{l}");
    drop((on_0, on_1));
}

fn a_second_server_on_the_same_port_is_refused() {
    let first = Server::start(&["--cores", "0"]);
    let out = server_command()
        .args(["--cores", "0", "--listen", &first.addr.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen on") && err.contains("another server"),
        "{err}"
    );
    // The first one still serves.
    let _ = first.ws("still-served");
}

fn join_shares_the_port_on_purpose() {
    let first = Server::start(&["--cores", "0"]);
    let port = first.addr.to_string();
    let mut second = server_command()
        .args([
            "--cores",
            "0",
            "--join",
            "--listen",
            &port,
            "--stats-interval",
            "0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        second.try_wait().unwrap().is_none(),
        "the joining server runs"
    );
    let _ = first.ws("either-one");
    let _ = second.kill();
    let _ = second.wait();
}

/// io_uring refused (forced here; in the field: an old kernel, the
/// kernel.io_uring_disabled sysctl, a seccomp filter): the server says why
/// in one sentence and serves on epoll.
#[test]
fn without_io_uring_the_server_says_so_and_runs_on_epoll() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_server"))
        .args(["--io", "uring", "--cores", "0", "--stats-interval", "0"])
        .args(["--listen", &addr.to_string()])
        .env("C1M_IO_URING_PROBE_FAIL", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = err.next().unwrap().unwrap();
    assert!(
        first.contains("io_uring is not usable here")
            && first.ends_with("running on epoll instead"),
        "{first}"
    );
    let second = err.next().unwrap().unwrap();
    assert!(second.contains("(io epoll,"), "{second}");
    let stream = TcpStream::connect(addr).unwrap();
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/ws?id=on-epoll"), stream).unwrap();
    ws.send(Message::Ping(b"x".to_vec())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"x".to_vec()));
    let _ = child.kill();
    let _ = child.wait();
}

/// The scheduling policies (sched(7)) of the server's threads whose name
/// begins with "shard": field 41 of /proc/<pid>/task/<tid>/stat.
fn shard_thread_policies(pid: u32) -> Vec<u32> {
    let mut policies = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("shard") {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // After the ")" that ends the name come fields 3 onwards.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        policies.push(rest.split(' ').nth(41 - 3).unwrap().parse().unwrap());
    }
    policies
}

/// --sched batch (the default): each shard's loop runs on SCHED_BATCH
/// (3); --sched normal leaves every thread on SCHED_OTHER (0).
fn shard_threads_run_sched_batch_unless_told_normal() {
    const SCHED_BATCH: u32 = 3;
    for (flags, batch) in [(&[][..], 2), (&["--sched", "normal"][..], 0)] {
        let server = Server::start(&[&["--cores", "0-1"][..], flags].concat());
        // Both shards up: each took a connection.
        let sockets: Vec<_> = (0..16).map(|i| server.ws(&format!("sc{i}"))).collect();
        server.wait_line("16 connections", |l| field(l, "conns") == 16);
        let policies = shard_thread_policies(server.child.id());
        assert_eq!(
            policies.iter().filter(|&&p| p == SCHED_BATCH).count(),
            batch,
            "{flags:?}: shard threads' policies {policies:?}"
        );
        drop(sockets);
    }
}

on_both_backends!(
    shard_threads_run_sched_batch_unless_told_normal,
    reuseport_cpu_steers_each_connection_to_the_receiving_cpus_shard,
    both_shards_take_connections,
    a_second_server_on_the_same_port_is_refused,
    join_shares_the_port_on_purpose,
);
