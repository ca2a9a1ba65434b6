//! The real `server` binary on 127.0.0.1, driven by real sockets and
//! tungstenite's client. Small scale, seconds.

mod c1m_bin;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use c1m_proto::frame::{self, Opcode};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

// Every test runs on both I/O backends: one parameter, set per test thread
// by the wrappers at the end of this file and passed as --io.
thread_local! {
    static IO: std::cell::Cell<&'static str> = const { std::cell::Cell::new("uring") };
}

fn with_io(io: &'static str, test: fn()) {
    IO.with(|c| c.set(io));
    test();
}

/// The server binary with this test's --io.
fn server_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_server"));
    c.args(["--io", IO.with(|c| c.get())]);
    c
}

struct Server {
    child: Child,
    addr: SocketAddr,
    lines: Receiver<String>,
    /// Its stderr (warnings), line by line.
    errors: Receiver<String>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_with_fd_limit(extra, None)
    }

    fn start_with_fd_limit(extra: &[&str], fd_limit: Option<u64>) -> Server {
        Server::start_with(extra, fd_limit, &[])
    }

    /// Starts the server; `fd_limit` caps its RLIMIT_NOFILE (soft and hard).
    fn start_with(extra: &[&str], fd_limit: Option<u64>, env: &[(&str, &str)]) -> Server {
        // Find a free port; the server binds it with SO_REUSEADDR.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut command = server_command();
        command.envs(env.iter().copied());
        if let Some(limit) = fd_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; it runs in the child
            // between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command
            .arg("--listen")
            .arg(addr.to_string())
            .args(["--stats-interval", "100ms"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start server");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().unwrap();
        let (tx, errors) = mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end even when nobody listens, so the server never
            // blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "server did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server {
            child,
            addr,
            lines,
            errors,
        }
    }

    /// Waits for a line on stderr containing `what`; returns it.
    fn wait_error(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.errors.recv_timeout(left) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(_) => panic!("no line on stderr with {what:?}"),
            }
        }
    }

    fn ws(&self, id: &str) -> WebSocket<TcpStream> {
        let stream = TcpStream::connect(self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let url = format!("ws://{}/ws?id={id}", self.addr);
        let (ws, resp) = tungstenite::client(url, stream).expect("upgrade");
        assert_eq!(resp.status(), 101);
        ws
    }

    /// Waits for a stats line matching `pred`; returns it.
    fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => {}
                Err(_) => panic!("no stats line with {what}"),
            }
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=` in a stats line.
fn field(line: &str, key: &str) -> u64 {
    let pat = format!(" {key}=");
    let start = line.find(&pat).unwrap_or_else(|| panic!("{key} in {line}")) + pat.len();
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    String::from_utf8_lossy(&resp).into_owned()
}

fn upgrade_request(target: &str, extra: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n").into_bytes()
}

/// A raw upgraded socket, for frames tungstenite's client refuses to send.
/// An upgraded raw socket, with an id of its own (one live connection per
/// id: a shared id would replace the earlier devices).
fn raw_ws(addr: SocketAddr) -> TcpStream {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&upgrade_request(&format!("/ws?id=raw-{n}"), ""))
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "));
    s
}

/// Reads one server frame: (opcode bits, payload).
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[1] & 0x80, 0, "server frames are unmasked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0; len];
    s.read_exact(&mut payload).unwrap();
    (h[0] & 0x0f, payload)
}

fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

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

fn full_shard_answers_503() {
    let server = Server::start(&["--cores", "0", "--max-conns", "1"]);
    let _held = server.ws("first");
    let resp = raw_request(server.addr, &upgrade_request("/ws?id=second", ""));
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp:?}");
}

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

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; this pins only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
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

/// Whether this host has the 2 CPUs the placement tests pin threads to.
fn two_cpus() -> bool {
    let ok = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    if !ok {
        eprintln!("skipped: needs 2 CPUs");
    }
    ok
}

/// Devices `ids` opened from a thread pinned to `cpu` (on loopback the
/// server receives them on that CPU).
fn open_pinned(addr: SocketAddr, cpu: usize, ids: Vec<String>) -> Vec<WebSocket<TcpStream>> {
    std::thread::spawn(move || {
        pin(cpu);
        ids.iter()
            .map(|id| {
                let s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                tungstenite::client(format!("ws://{addr}/ws?id={id}"), s)
                    .unwrap()
                    .0
            })
            .collect()
    })
    .join()
    .unwrap()
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

/// One live connection per device id: a second upgrade with the same id
/// closes the first with 4000 "replaced", on the same shard and across
/// shards (placed by --reuseport-cpu and pinned threads), and the newer one
/// is served. A close followed by a reconnect replaces nothing.
fn a_second_connection_with_the_same_id_replaces_the_first() {
    if !two_cpus() {
        return;
    }
    let server = Server::start(&["--cores", "0-1", "--reuseport-cpu"]);
    let open_on = |cpu: usize, id: &str| {
        open_pinned(server.addr, cpu, vec![id.to_string()])
            .pop()
            .unwrap()
    };
    for (replaced, (first_cpu, second_cpu, id)) in (1..).zip([
        (0, 0, "same-shard"),
        (0, 1, "cross-0-1"),
        (1, 0, "cross-1-0"),
    ]) {
        let mut old = open_on(first_cpu, id);
        let mut new = open_on(second_cpu, id);
        match old.read() {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 4000, "{id}");
                assert_eq!(frame.reason, "replaced", "{id}");
            }
            other => panic!("{id}: expected Close 4000, got {other:?}"),
        }
        server.wait_line("the takeover", |l| field(l, "replaced") == replaced);
        new.send(Message::Ping(b"still".to_vec())).unwrap();
        assert_eq!(
            new.read().unwrap(),
            Message::Pong(b"still".to_vec()),
            "{id}"
        );
        // Close, then reconnect at once: nothing to replace.
        new.close(None).unwrap();
        let _ = new.read();
        let mut again = open_on(second_cpu, id);
        again.send(Message::Ping(b"x".to_vec())).unwrap();
        assert_eq!(again.read().unwrap(), Message::Pong(b"x".to_vec()), "{id}");
        again.close(None).unwrap();
        let _ = again.read();
    }
    let l = server.wait_line("every device closed", |l| field(l, "conns") == 0);
    assert_eq!(field(&l, "replaced"), 3, "{l}");
}

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

/// The children of `pid` (its worker processes).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(kids.split_whitespace().map(|k| k.parse::<u32>().unwrap()));
    }
    out
}

/// The `n` worker processes of a `--procs n` server. The port accepts once
/// the first worker listens; on a loaded machine the others may still be
/// starting, so this waits (10 s at most) until all `n` are there.
fn workers_of(server: &Server, n: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let workers = children(server.child.id());
        if workers.len() == n || Instant::now() > deadline {
            assert_eq!(workers.len(), n, "{workers:?}");
            return workers;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn procs_workers_add_up_restart_and_stop_together() {
    let server = Server::start(&["--procs", "3", "--drain-timeout", "1s"]);
    let workers = workers_of(&server, 3);
    let _held: Vec<_> = (0..30).map(|i| server.ws(&format!("p{i}"))).collect();
    // One line for the whole server: its conns are the sum of the workers'.
    let line = server.wait_line("30 conns", |l| l.contains(" conns=30 "));
    let list = line
        .split("workers=[")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    let per: Vec<u64> = list.split(',').map(|n| n.parse().unwrap()).collect();
    assert_eq!((per.len(), per.iter().sum::<u64>()), (3, 30), "{line}");
    assert_eq!(field(&line, "upgraded"), 30);

    // A worker that dies is replaced; its devices are gone, its counts stay.
    // SAFETY: kill on a grandchild this test started.
    unsafe { libc::kill(workers[0] as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let replaced = loop {
        let now = children(server.child.id());
        if now.len() == 3 && !now.contains(&workers[0]) {
            break now;
        }
        assert!(Instant::now() < deadline, "worker not restarted: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let line = server.wait_line("after the restart", |l| l.contains("workers=[0,"));
    assert_eq!(field(&line, "upgraded"), 30, "{line}");

    // SIGTERM reaches every worker; all exit, then the parent, with 0.
    server.signal(libc::SIGTERM);
    let fin = server.wait_line("the final line", |l| l.starts_with("final "));
    assert_eq!(field(&fin, "upgraded"), 30, "{fin}");
    let mut server = server;
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status}");
    for pid in workers.iter().chain(&replaced) {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker {pid} outlived the server"
        );
    }
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

// Device auth (--auth-secret-file): tokens minted with the library's own
// signer, or with `c1m token`.

const SECRET_A: &str = "first-test-secret-0123456789";
const SECRET_B: &str = "second-test-secret-abcdefghij";

/// A secrets file of these lines, unique to this test and backend; removed
/// on drop.
struct SecretFile(std::path::PathBuf);

impl SecretFile {
    fn new(name: &str, lines: &[&str]) -> SecretFile {
        let path = std::env::temp_dir().join(format!(
            "c1m-test-{}-{name}-{}.secret",
            std::process::id(),
            IO.with(|c| c.get())
        ));
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        SecretFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A token for `id` signed with `secret`, good for `ttl_s` seconds (negative: expired).
fn token(secret: &str, id: &str, ttl_s: i64) -> String {
    let keys = c1m_proto::auth::Keys::parse(secret.as_bytes(), "test").unwrap();
    let expiry = c1m_proto::auth::unix_now().saturating_add_signed(ttl_s);
    keys.sign(id, expiry).to_string()
}

/// Sends an upgrade request and reads the answer's head (and, if the
/// server closes, its body): whether it was 101, and the text.
fn try_upgrade(addr: SocketAddr, request: &[u8]) -> (bool, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    let upgraded = head.starts_with(b"HTTP/1.1 101 ");
    if !upgraded {
        let _ = s.read_to_end(&mut head);
    }
    (upgraded, String::from_utf8_lossy(&head).into_owned())
}

fn bad_missing_and_expired_tokens_get_401_counted_by_reason() {
    let file = SecretFile::new("401", &[SECRET_A]);
    let server = Server::start(&["--cores", "0", "--auth-secret-file", file.path()]);
    let other_id = token(SECRET_A, "dev-other", 3600);
    let other_secret = token(SECRET_B, "dev-a", 3600);
    let expired = token(SECRET_A, "dev-a", -10);
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (upgrade_request("/ws?id=dev-a", ""), "missing", ""),
        (
            upgrade_request(
                "/ws?id=dev-a",
                &format!("Authorization: Bearer {other_id}\r\n"),
            ),
            "bad",
            &other_id,
        ),
        (
            upgrade_request(&format!("/ws?id=dev-a&token={other_secret}"), ""),
            "bad",
            &other_secret,
        ),
        (
            upgrade_request("/ws?id=dev-a&token=12.garbage", ""),
            "bad",
            "12.garbage",
        ),
        (
            upgrade_request(
                "/ws?id=dev-a",
                &format!("Authorization: Bearer {expired}\r\n"),
            ),
            "expired",
            &expired,
        ),
    ];
    for (req, reason, tok) in &cases {
        let (upgraded, resp) = try_upgrade(server.addr, req);
        assert!(!upgraded && resp.starts_with("HTTP/1.1 401 "), "{resp:?}");
        let body = resp.split("\r\n\r\n").nth(1).unwrap();
        assert!(body.starts_with(reason), "{reason}: {body:?}");
        assert_eq!(body.trim_end().lines().count(), 1, "{body:?}");
        assert!(
            tok.is_empty() || !resp.contains(tok),
            "the token echoed: {resp:?}"
        );
    }
    let l = server.wait_line("the auth failures", |l| field(l, "rejected") == 5);
    assert_eq!(
        [
            field(&l, "auth_missing"),
            field(&l, "auth_bad"),
            field(&l, "auth_expired"),
            field(&l, "upgraded"),
        ],
        [1, 3, 1, 0],
        "{l}"
    );
}

fn good_tokens_upgrade_in_the_header_or_the_query() {
    use tungstenite::client::IntoClientRequest;
    let file = SecretFile::new("101", &[SECRET_A]);
    let server = Server::start(&["--cores", "0", "--auth-secret-file", file.path()]);
    // Header form, through a real client.
    let mut req = format!("ws://{}/ws?id=dev-h", server.addr)
        .into_client_request()
        .unwrap();
    let bearer = format!("Bearer {}", token(SECRET_A, "dev-h", 3600));
    req.headers_mut()
        .insert("Authorization", bearer.parse().unwrap());
    let stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (mut ws, resp) = tungstenite::client(req, stream).expect("upgrade with Bearer");
    assert_eq!(resp.status(), 101);
    ws.send(Message::Ping(b"a".to_vec())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"a".to_vec()));
    // Query form.
    let q = server.ws(&format!("dev-q&token={}", token(SECRET_A, "dev-q", 3600)));
    let l = server.wait_line("two upgrades", |l| field(l, "conns") == 2);
    assert_eq!(field(&l, "rejected"), 0, "{l}");
    assert_eq!(field(&l, "auth_bad"), 0, "{l}");
    drop((ws, q));
}

fn both_secrets_are_accepted_while_rotating() {
    let file = SecretFile::new("rotate", &[SECRET_A, "", SECRET_B]);
    let server = Server::start(&["--cores", "0", "--auth-secret-file", file.path()]);
    for (secret, id) in [(SECRET_A, "dev-new"), (SECRET_B, "dev-old")] {
        let t = token(secret, id, 60);
        let (upgraded, resp) = try_upgrade(
            server.addr,
            &upgrade_request(
                &format!("/ws?id={id}"),
                &format!("Authorization: Bearer {t}\r\n"),
            ),
        );
        assert!(upgraded, "{id}: {resp:?}");
    }
    let stranger = token("third-test-secret-zzzzzzzzzz", "dev-x", 60);
    let (upgraded, resp) = try_upgrade(
        server.addr,
        &upgrade_request(&format!("/ws?id=dev-x&token={stranger}"), ""),
    );
    assert!(!upgraded && resp.starts_with("HTTP/1.1 401 "), "{resp:?}");
    server.wait_line("one bad token", |l| field(l, "auth_bad") == 1);
}

fn c1m_token_mints_a_token_the_server_accepts() {
    let file = SecretFile::new("mint", &[SECRET_A]);
    let out = Command::new(c1m_bin::c1m_bin())
        .args([
            "token",
            "--id",
            "dev-m",
            "--ttl",
            "30d",
            "--auth-secret-file",
        ])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let minted = String::from_utf8(out.stdout).unwrap();
    let minted = minted.trim();
    let (expiry, mac) = minted.split_once('.').unwrap();
    let expiry: u64 = expiry.parse().unwrap();
    let in_30d = c1m_proto::auth::unix_now() + 30 * 86_400;
    assert!(expiry.abs_diff(in_30d) < 60, "{minted}");
    assert_eq!(mac.len(), 43, "{minted}");
    let server = Server::start(&["--cores", "0", "--auth-secret-file", file.path()]);
    let (upgraded, resp) = try_upgrade(
        server.addr,
        &upgrade_request(
            "/ws?id=dev-m",
            &format!("Authorization: Bearer {minted}\r\n"),
        ),
    );
    assert!(upgraded, "{resp:?}");
    // For another id it is a bad token.
    let (upgraded, resp) = try_upgrade(
        server.addr,
        &upgrade_request(
            "/ws?id=dev-n",
            &format!("Authorization: Bearer {minted}\r\n"),
        ),
    );
    assert!(!upgraded && resp.contains("bad token"), "{resp:?}");
    // Without a secrets file it says what it needs.
    let out = Command::new(c1m_bin::c1m_bin())
        .args(["token", "--id", "dev-m", "--ttl", "30d"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--auth-secret-file"));
}

fn an_unusable_secret_file_stops_the_server_with_one_clear_sentence() {
    let empty = SecretFile::new("empty", &[""]);
    let short = SecretFile::new("short", &["hunter2"]);
    for (path, says) in [
        (
            "/nonexistent/c1m.secret",
            "cannot read the auth secret file",
        ),
        (empty.path(), "holds no secret"),
        (short.path(), "shorter than"),
    ] {
        let out = server_command()
            .args(["--listen", "127.0.0.1:0", "--auth-secret-file", path])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}

fn procs_workers_load_the_secret_file_themselves() {
    let file = SecretFile::new("procs", &[SECRET_A]);
    let server = Server::start(&["--procs", "2", "--auth-secret-file", file.path()]);
    // The workers got the path from the parent's arguments, not the secret.
    for w in children(server.child.id()) {
        let cmdline = std::fs::read(format!("/proc/{w}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(cmdline.contains(file.path()), "{cmdline}");
        assert!(!cmdline.contains(SECRET_A), "{cmdline}");
    }
    let _held: Vec<_> = (0..10)
        .map(|i| {
            let id = format!("pa{i}");
            server.ws(&format!("{id}&token={}", token(SECRET_A, &id, 60)))
        })
        .collect();
    for i in 0..10 {
        let (upgraded, _) =
            try_upgrade(server.addr, &upgrade_request(&format!("/ws?id=pm{i}"), ""));
        assert!(!upgraded);
    }
    // The parent's line adds up its workers' auth counters.
    let l = server.wait_line("10 conns, 10 refused", |l| {
        l.contains(" conns=10 ") && field(l, "auth_missing") == 10
    });
    assert_eq!(field(&l, "rejected"), 10, "{l}");
}

// ---- --admin: /metrics, /healthz ----

fn free_addr() -> String {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// One HTTP/1.1 request to the admin port: (status, body).
fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    http_with(addr, method, path, "", b"")
}

/// An HTTP request with a body of `content_type` (none when empty).
fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ctype = if content_type.is_empty() {
        String::new()
    } else {
        format!("Content-Type: {content_type}\r\n")
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{ctype}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {out:?}"));
    (status, body.to_string())
}

/// /metrics, read by an independent parser of the exposition format, with
/// a few rules of the format checked beside it: every sample's family has
/// HELP and TYPE first, counters end in `_total`.
fn scrape(admin: &str) -> prometheus_parse::Scrape {
    let (status, body) = http(admin, "GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    let mut typed: Vec<(String, String)> = Vec::new();
    let mut helped: Vec<String> = Vec::new();
    let mut buckets = 0;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(matches!(kind, "counter" | "gauge" | "histogram"), "{line}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            if kind == "histogram" {
                assert!(name.ends_with("_seconds"), "{line}: base units");
            }
            typed.push((name.into(), kind.into()));
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.push(rest.split(' ').next().unwrap().into());
        } else {
            let sampled = line.split(['{', ' ']).next().unwrap();
            // A histogram's samples are its name with _bucket, _sum, _count.
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    let base = sampled.strip_suffix(suffix)?;
                    typed
                        .iter()
                        .any(|(n, k)| n == base && k == "histogram")
                        .then_some(base)
                })
                .unwrap_or(sampled);
            if sampled.ends_with("_bucket") && name != sampled {
                buckets += 1;
            }
            assert!(
                typed.iter().any(|(n, _)| n == name) && helped.iter().any(|n| n == name),
                "{name} sampled before its HELP and TYPE"
            );
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let histograms = typed.iter().filter(|(_, k)| k == "histogram").count();
    assert_eq!(
        scrape.samples.len(),
        body.lines().filter(|l| !l.starts_with('#')).count() - buckets + histograms
    );
    scrape
}

/// The sum of `name`'s samples whose labels include `labels`.
fn metric(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a number"),
        })
        .sum()
}

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

/// Scrapes until `pred` holds (the shards report on their own clock).
fn scrape_until(
    admin: &str,
    what: &str,
    pred: impl Fn(&prometheus_parse::Scrape) -> bool,
) -> prometheus_parse::Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(admin);
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "/metrics never showed {what}");
        std::thread::sleep(Duration::from_millis(50));
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

fn procs_admin_is_served_once_by_the_parent_for_all_workers() {
    let admin = free_addr();
    let server = Server::start(&["--procs", "2", "--admin", &admin]);
    // Workers never open the admin port: the parent strips the flag.
    let workers = workers_of(&server, 2);
    for w in &workers {
        let cmdline = std::fs::read(format!("/proc/{w}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(!cmdline.contains("--admin"), "{cmdline}");
    }
    let _held: Vec<_> = (0..8).map(|i| server.ws(&format!("pw{i}"))).collect();
    let line = server.wait_line("8 conns", |l| l.contains(" conns=8 "));
    let s = scrape_until(&admin, "8 devices", |s| {
        metric(s, "c1m_connections", &[]) == 8.0
    });
    let per: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric == "c1m_connections")
        .map(|x| x.labels.get("worker").expect("worker label").to_string())
        .collect();
    assert_eq!(per.len(), 2, "{per:?}");
    assert!(metric(&s, "c1m_accepted_total", &[]) >= 8.0);
    assert_eq!(
        metric(&s, "c1m_upgraded_total", &[]),
        field(&line, "upgraded") as f64
    );
    assert_eq!(http(&admin, "GET", "/healthz").0, 200);
}

/// The worker holding device `id`, as the parent's admin says (None: 404).
fn held_by(admin: &str, id: &str) -> Option<u64> {
    let (status, body) = http(admin, "GET", &format!("/devices/{id}"));
    match status {
        200 => {
            let at = body.find("\"worker\":").expect("a worker field") + 9;
            let digits: String = body[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            Some(digits.parse().expect("a worker number"))
        }
        404 => None,
        _ => panic!("GET /devices/{id}: {status} {body}"),
    }
}

/// With --procs the registry spans the worker processes: a second
/// connection with an id replaces the first whichever workers the two land
/// on (the kernel's hash of their ports places them), and the parent's
/// admin finds, pushes to and kicks devices on every worker.
fn procs_one_connection_per_id_across_workers() {
    let admin = free_addr();
    let server = Server::start(&["--procs", "2", "--admin", &admin]);
    let mut seen = std::collections::BTreeSet::new();
    let mut kept = Vec::new();
    for i in 0..16 {
        let id = format!("xp{i}");
        let mut old = server.ws(&id);
        let mut new = server.ws(&id);
        match old.read() {
            Ok(Message::Close(Some(f))) => {
                assert_eq!(
                    (u16::from(f.code), f.reason.as_ref()),
                    (4000, "replaced"),
                    "{id}"
                )
            }
            other => panic!(
                "{id}: expected Close 4000, got {other:?}; old {:?}, new {:?}, the admin says {:?}",
                old.get_ref().local_addr(),
                new.get_ref().local_addr(),
                http(&admin, "GET", &format!("/devices/{id}"))
            ),
        }
        new.send(Message::Ping(b"p".to_vec())).unwrap();
        assert_eq!(new.read().unwrap(), Message::Pong(b"p".to_vec()), "{id}");
        let local = new.get_ref().local_addr().unwrap();
        let (status, body) = http(&admin, "GET", &format!("/devices/{id}"));
        assert_eq!(status, 200, "{id}: {body}");
        assert!(
            body.contains(&format!("\"remote\":\"{local}\"")),
            "{id}: {body}"
        );
        seen.insert(held_by(&admin, &id).unwrap());
        kept.push((id, new));
    }
    assert_eq!(seen.len(), 2, "16 devices all on one worker: {seen:?}");
    server.wait_line("16 takeovers", |l| field(l, "replaced") == 16);
    for (id, ws) in &mut kept {
        let path = format!("/devices/{id}/messages");
        let (status, body) = http_with(&admin, "POST", &path, "text/plain", b"hi");
        assert_eq!((status, body.as_str()), (200, "delivered\n"), "{id}");
        assert_eq!(ws.read().unwrap(), Message::Text("hi".into()), "{id}");
    }
    for (id, ws) in &mut kept {
        let (status, _) = http(&admin, "DELETE", &format!("/devices/{id}"));
        assert_eq!(status, 200, "{id}");
        match ws.read() {
            Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 4001, "{id}"),
            other => panic!("{id}: expected Close 4001, got {other:?}"),
        }
    }
    server.wait_line("16 kicks", |l| field(l, "kicked") == 16);
}

/// A worker killed (SIGKILL) and restarted by the parent: the devices it
/// held are swept from the shared registry, and every device on the other
/// worker is still found (its entries never depended on the dead one).
fn procs_a_restarted_worker_is_resynced() {
    let admin = free_addr();
    let server = Server::start(&["--procs", "2", "--admin", &admin]);
    let held: Vec<_> = (0..24).map(|i| server.ws(&format!("rs{i}"))).collect();
    let mut on = [Vec::new(), Vec::new()];
    for i in 0..24 {
        let id = format!("rs{i}");
        on[held_by(&admin, &id).unwrap() as usize].push(id);
    }
    assert!(!on[0].is_empty() && !on[1].is_empty(), "{on:?}");
    let pids = workers_of(&server, 2);
    let victim = pids
        .iter()
        .copied()
        .find(|p| {
            let env = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
            String::from_utf8_lossy(&env).contains("C1M_LINK=3,1,2")
        })
        .expect("worker 1");
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = children(server.child.id());
        if now.len() == 2 && !now.contains(&victim) {
            break;
        }
        assert!(Instant::now() < deadline, "worker 1 was not restarted");
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let survivors_found = on[0].iter().all(|id| held_by(&admin, id) == Some(0));
        let dead_gone = on[1].iter().all(|id| held_by(&admin, id).is_none());
        if survivors_found && dead_gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the restart: survivors found {survivors_found}, the dead worker's devices gone {dead_gone}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(held);
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

// ---- TLS (wss://): --tls-cert/--tls-key ----

/// A CA and a "localhost" certificate it signed, made at test time, as PEM
/// files in a directory of their own (removed on drop).
struct Certs {
    dir: std::path::PathBuf,
}

impl Certs {
    fn new(tag: &str) -> Certs {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("c1m-tls-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("c1m test CA {tag}"));
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// The server flags that serve this certificate.
    fn flags(&self) -> [String; 4] {
        [
            "--tls-cert".into(),
            self.path("cert.pem"),
            "--tls-key".into(),
            self.path("key.pem"),
        ]
    }

    /// A rustls client config that trusts this CA, with these versions.
    fn client(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> std::sync::Arc<rustls::ClientConfig> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(self.path("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut c = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        std::sync::Arc::new(c)
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to `addr` (handshake done), or rustls' error.
fn tls_connect(
    addr: SocketAddr,
    config: &std::sync::Arc<rustls::ClientConfig>,
) -> Result<Tls, std::io::Error> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// A wss device upgraded with id `id` over its own TLS connection.
fn wss(
    addr: SocketAddr,
    config: &std::sync::Arc<rustls::ClientConfig>,
    id: &str,
) -> WebSocket<Tls> {
    let tls = tls_connect(addr, config).expect("TLS handshake");
    let (ws, resp) =
        tungstenite::client(format!("wss://localhost/ws?id={id}"), tls).expect("upgrade over TLS");
    assert_eq!(resp.status(), 101);
    ws
}

fn tls_device_upgrades_heartbeats_and_is_expired_like_a_ws_one() {
    let certs = Certs::new("expiry");
    let mut args = vec!["--cores", "0", "--timeout", "500ms", "--tick", "50ms"];
    let flags = certs.flags();
    args.extend(flags.iter().map(String::as_str));
    let server = Server::start(&args);
    let config = certs.client(&[&rustls::version::TLS13]);
    let mut ws = wss(server.addr, &config, "02:00:5e:00:00:aa");
    assert_eq!(ws.get_ref().conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    // Heartbeats past the timeout keep it: Ping (answered), Text, Binary.
    let until = Instant::now() + Duration::from_millis(1000);
    while Instant::now() < until {
        ws.send(Message::Ping(b"hb".to_vec())).unwrap();
        assert_eq!(ws.read().unwrap(), Message::Pong(b"hb".to_vec()));
        ws.send(Message::Text("hb".into())).unwrap();
        ws.send(Message::Binary(vec![1])).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    // The last frame, then silence: deleted (a reset) within timeout + tick.
    ws.send(Message::Ping(b"last".to_vec())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"last".to_vec()));
    let last = Instant::now();
    let r = ws.read();
    let silent = last.elapsed();
    assert!(r.is_err(), "expected the connection to end, got {r:?}");
    assert!(
        silent >= Duration::from_millis(500),
        "deleted early after {silent:?}"
    );
    assert!(
        silent <= Duration::from_millis(900),
        "deleted late after {silent:?}"
    );
    let l = server.wait_line("the expiry", |l| field(l, "expired") == 1);
    assert_eq!(field(&l, "tls_handshakes"), 1, "{l}");
    assert!(field(&l, "frames") >= 30, "{l}");
    assert_eq!(field(&l, "tls_failed"), 0, "{l}");
}

fn tls_1_2_and_1_3_both_negotiate_and_a_reconnect_resumes() {
    let certs = Certs::new("versions");
    let mut args = vec!["--cores", "0-1"];
    let flags = certs.flags();
    args.extend(flags.iter().map(String::as_str));
    let server = Server::start(&args);
    for (i, (version, want)) in [
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
    ]
    .into_iter()
    .enumerate()
    {
        let config = certs.client(&[version]);
        for round in 0..2 {
            let mut ws = wss(server.addr, &config, &format!("dev-{i}-{round}"));
            let tls = &ws.get_ref().conn;
            assert_eq!(tls.protocol_version(), Some(want));
            let kind = tls.handshake_kind();
            ws.send(Message::Ping(b"x".to_vec())).unwrap();
            assert_eq!(ws.read().unwrap(), Message::Pong(b"x".to_vec()));
            // The first connection is a full handshake; the reconnect
            // (the same client config: its ticket) resumes, on either shard.
            let expect = if round == 0 {
                rustls::HandshakeKind::Full
            } else {
                rustls::HandshakeKind::Resumed
            };
            assert_eq!(kind, Some(expect), "{want:?} round {round}");
            let _ = ws.close(None);
            let _ = ws.flush();
        }
    }
    let l = server.wait_line("4 handshakes", |l| field(l, "tls_handshakes") == 4);
    assert_eq!(field(&l, "tls_resumed"), 2, "{l}");
}

fn tls_plaintext_request_on_the_tls_port_is_one_counted_logged_close() {
    let certs = Certs::new("plain");
    let mut args = vec!["--cores", "0"];
    let flags = certs.flags();
    args.extend(flags.iter().map(String::as_str));
    let server = Server::start(&args);
    let config = certs.client(&[&rustls::version::TLS13]);
    let mut good = wss(server.addr, &config, "good");
    let resp = raw_request(server.addr, &upgrade_request("/ws?id=plain", ""));
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    assert!(resp.contains("wss://"), "{resp}");
    // Whatever follows the first bytes is never parsed: a request after
    // garbage is not upgraded in plaintext, nor counted again.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"x").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let _ = s.write_all(&upgrade_request("/ws?id=sneaky", ""));
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp);
    assert!(
        resp.starts_with("HTTP/1.1 400 ") && !resp.contains(" 101 "),
        "{resp}"
    );
    let warned = server.wait_error("plain_on_tls");
    assert!(
        warned.contains("sent plaintext to the TLS port"),
        "{warned}"
    );
    let l = server.wait_line("the closes", |l| field(l, "plain_on_tls") == 2);
    assert_eq!(field(&l, "conns"), 1, "{l}");
    assert_eq!(field(&l, "upgraded"), 1, "{l}");
    // The other device goes on.
    good.send(Message::Ping(b"still".to_vec())).unwrap();
    assert_eq!(good.read().unwrap(), Message::Pong(b"still".to_vec()));
    let l = server.wait_line("a fresh line", |_| true);
    assert_eq!(field(&l, "plain_on_tls"), 2, "counted once each: {l}");
    assert_eq!(field(&l, "rejected"), 0, "{l}");
    // peer_gone: at most the start-up probe's connection.
    assert_eq!(field(&l, "tls_failed"), 0, "{l}");
    assert!(field(&l, "peer_gone") <= 1, "{l}");
}

fn tls_hello_on_the_plaintext_port_is_one_counted_logged_close() {
    let certs = Certs::new("hello");
    let server = Server::start(&["--cores", "0"]);
    let mut good = server.ws("good");
    let r = tls_connect(server.addr, &certs.client(&[&rustls::version::TLS13]));
    assert!(r.is_err(), "a TLS handshake with a plaintext port");
    let warned = server.wait_error("tls_on_plain");
    assert!(
        warned.contains("sent a TLS handshake to this plaintext port"),
        "{warned}"
    );
    good.send(Message::Ping(b"still".to_vec())).unwrap();
    assert_eq!(good.read().unwrap(), Message::Pong(b"still".to_vec()));
    let l = server.wait_line("the close", |l| field(l, "tls_on_plain") == 1);
    assert_eq!(field(&l, "conns"), 1, "{l}");
    assert_eq!(field(&l, "rejected"), 0, "counted once: {l}");
    assert!(field(&l, "peer_gone") <= 1, "only the start-up probe: {l}");
}

fn tls_a_device_that_rejects_the_certificate_is_one_counted_logged_close() {
    let certs = Certs::new("served");
    let other = Certs::new("other");
    let mut args = vec!["--cores", "0"];
    let flags = certs.flags();
    args.extend(flags.iter().map(String::as_str));
    let server = Server::start(&args);
    let mut good = wss(
        server.addr,
        &certs.client(&[&rustls::version::TLS13]),
        "good",
    );
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let r = tls_connect(server.addr, &other.client(&[version]));
        let Err(e) = r else {
            panic!("the device must reject a certificate of another CA")
        };
        assert!(e.to_string().contains("invalid peer certificate"), "{e}");
    }
    let warned = server.wait_error("tls_failed");
    assert!(warned.contains("TLS with 127.0.0.1:"), "{warned}");
    assert!(warned.contains("received fatal alert"), "{warned}");
    good.send(Message::Ping(b"still".to_vec())).unwrap();
    assert_eq!(good.read().unwrap(), Message::Pong(b"still".to_vec()));
    let l = server.wait_line("both closes", |l| field(l, "tls_failed") == 2);
    assert_eq!(field(&l, "conns"), 1, "{l}");
    assert!(field(&l, "peer_gone") <= 1, "only the start-up probe: {l}");
}

/// A wss device that begins a TLS record and never ends it is closed by
/// the frame timeout (it holds a buffer), as a plaintext one that trickles
/// a frame is; the device beside it is not.
fn tls_a_record_trickled_too_slowly_is_closed_by_the_frame_timeout() {
    let certs = Certs::new("trickle");
    let mut args = vec![
        "--cores",
        "0",
        "--timeout",
        "30s",
        "--tick",
        "50ms",
        "--frame-timeout",
        "300ms",
    ];
    let flags = certs.flags();
    args.extend(flags.iter().map(String::as_str));
    let server = Server::start(&args);
    let config = certs.client(&[&rustls::version::TLS13]);
    let mut good = wss(server.addr, &config, "good");
    let mut ws = wss(server.addr, &config, "slow");
    let tls = ws.get_mut();
    // A Ping, encrypted, of which the device sends all but the last byte.
    let mut ping = Vec::new();
    frame::write_masked_frame(&mut ping, Opcode::Ping, true, b"x", [1, 2, 3, 4]);
    tls.conn.writer().write_all(&ping).unwrap();
    let mut record = Vec::new();
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut record).unwrap();
    }
    tls.sock.write_all(&record[..record.len() - 1]).unwrap();
    let begun = Instant::now();
    let mut buf = [0u8; 64];
    let r = tls.sock.read(&mut buf); // blocks until the server closes it
    let waited = begun.elapsed();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(
        waited >= Duration::from_millis(300),
        "closed early after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "closed after {waited:?}, not by the frame timeout"
    );
    let l = server.wait_line("the close", |l| field(l, "frame_timeout") == 1);
    assert_eq!(field(&l, "expired"), 0, "{l}");
    good.send(Message::Ping(b"still".to_vec())).unwrap();
    assert_eq!(good.read().unwrap(), Message::Pong(b"still".to_vec()));
}

fn tls_unusable_certificate_files_stop_the_server_with_one_clear_sentence() {
    let certs = Certs::new("files");
    let other = Certs::new("files-other");
    let (cert, key) = (certs.path("cert.pem"), certs.path("key.pem"));
    let other_key = other.path("key.pem");
    for (flags, says) in [
        (
            vec!["--tls-cert", "/nonexistent/c.pem", "--tls-key", &key],
            "cannot read --tls-cert /nonexistent/c.pem",
        ),
        (
            vec!["--tls-cert", &key, "--tls-key", &key],
            "holds no PEM certificate",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &cert],
            "holds no PEM private key",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &other_key],
            "does not fit --tls-cert",
        ),
        (vec!["--tls-cert", &cert], "--tls-cert needs --tls-key"),
    ] {
        let out = server_command()
            .args(["--listen", "127.0.0.1:0"])
            .args(&flags)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}

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

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            $( #[test] fn $name() { super::with_io("epoll", super::$name) } )*
        }
        mod uring {
            $( #[test] fn $name() { super::with_io("uring", super::$name) } )*
        }
    };
}

on_both_backends!(
    admission_503_refuses_the_excess_and_connected_devices_keep_their_pongs,
    admission_defer_queues_the_excess_and_upgrades_it_later,
    admin_looks_up_pushes_to_and_kicks_a_device,
    a_second_connection_with_the_same_id_replaces_the_first,
    reuseport_cpu_steers_each_connection_to_the_receiving_cpus_shard,
    upgrade_with_id_then_ping_gets_pong_with_same_payload,
    bad_requests_get_their_http_status,
    full_shard_answers_503,
    silent_device_is_deleted_within_timeout_plus_tick,
    heartbeating_device_is_never_expired,
    protocol_errors_close_with_1002_1007_1009,
    both_shards_take_connections,
    sigterm_sends_1001_and_exits_zero,
    a_paced_drain_says_503_first_then_spreads_its_closes,
    handshake_timeout_closes_half_a_request,
    a_second_server_on_the_same_port_is_refused,
    join_shares_the_port_on_purpose,
    graceful_expiry_sends_1001_then_fin,
    drain_ends_at_the_timeout_when_devices_never_answer,
    out_of_descriptors_the_server_backs_off_keeps_serving_and_recovers,
    a_device_that_never_reads_is_closed_not_buffered,
    a_killed_client_process_leaves_nothing_behind,
    a_frame_trickled_too_slowly_is_closed_by_the_frame_timeout,
    procs_workers_add_up_restart_and_stop_together,
    a_panic_while_handling_one_device_closes_only_that_device,
    bad_missing_and_expired_tokens_get_401_counted_by_reason,
    good_tokens_upgrade_in_the_header_or_the_query,
    both_secrets_are_accepted_while_rotating,
    c1m_token_mints_a_token_the_server_accepts,
    an_unusable_secret_file_stops_the_server_with_one_clear_sentence,
    procs_workers_load_the_secret_file_themselves,
    admin_serves_metrics_healthz_and_nothing_else,
    admin_metrics_stay_fresh_with_the_stats_line_off,
    admin_on_the_device_port_is_refused_in_one_sentence,
    procs_admin_is_served_once_by_the_parent_for_all_workers,
    procs_one_connection_per_id_across_workers,
    procs_a_restarted_worker_is_resynced,
    metrics_count_refusals_by_status_and_histogram_lag_and_heartbeats,
    tls_device_upgrades_heartbeats_and_is_expired_like_a_ws_one,
    tls_1_2_and_1_3_both_negotiate_and_a_reconnect_resumes,
    tls_plaintext_request_on_the_tls_port_is_one_counted_logged_close,
    tls_hello_on_the_plaintext_port_is_one_counted_logged_close,
    tls_a_device_that_rejects_the_certificate_is_one_counted_logged_close,
    tls_unusable_certificate_files_stop_the_server_with_one_clear_sentence,
    tls_a_record_trickled_too_slowly_is_closed_by_the_frame_timeout,
);
