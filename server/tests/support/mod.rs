//! What the integration tests of the `server` binary share: the backend
//! each test runs on (`with_io`, `on_both_backends!`), free loopback
//! addresses, a server started on one (`Server`), the stats line's
//! `field`, raw and tungstenite WebSocket clients, the admin port's HTTP
//! and /metrics, CPU placement, `--procs` workers, and test certificates.
//! Each test file takes it with `mod support;`; a file uses only part of
//! it, hence the `dead_code` allowance.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use tungstenite::WebSocket;

// Every test runs on both I/O backends: one parameter, set per test thread
// by the wrappers `on_both_backends!` makes and passed as --io.
thread_local! {
    pub static IO: std::cell::Cell<&'static str> = const { std::cell::Cell::new("uring") };
}

pub fn with_io(io: &'static str, test: fn()) {
    IO.with(|c| c.set(io));
    test();
}

/// This test's --io.
pub fn io() -> &'static str {
    IO.with(|c| c.get())
}

/// `#[test]` wrappers running each named function once per backend, in
/// modules `epoll` and `uring` (so `epoll::name` and `uring::name`).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            $( #[test] fn $name() { $crate::support::with_io("epoll", super::$name) } )*
        }
        mod uring {
            $( #[test] fn $name() { $crate::support::with_io("uring", super::$name) } )*
        }
    };
}

/// A free loopback port (the server binds it with SO_REUSEADDR).
pub fn free_socket_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// [`free_socket_addr`] as text, for a flag.
pub fn free_addr() -> String {
    free_socket_addr().to_string()
}

/// The server binary with this test's --io.
pub fn server_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_server"));
    c.args(["--io", IO.with(|c| c.get())]);
    c
}

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub lines: Receiver<String>,
    /// Its stderr (warnings), line by line.
    pub errors: Receiver<String>,
}

impl Server {
    pub fn start(extra: &[&str]) -> Server {
        Server::start_with_fd_limit(extra, None)
    }

    pub fn start_with_fd_limit(extra: &[&str], fd_limit: Option<u64>) -> Server {
        Server::start_with(extra, fd_limit, &[])
    }

    /// Starts the server; `fd_limit` caps its RLIMIT_NOFILE (soft and hard).
    pub fn start_with(extra: &[&str], fd_limit: Option<u64>, env: &[(&str, &str)]) -> Server {
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
        let lines = lines_of(child.stdout.take().unwrap());
        let errors = lines_of(child.stderr.take().unwrap());
        wait_listening(addr);
        Server {
            child,
            addr,
            lines,
            errors,
        }
    }

    /// Waits for a line on stderr containing `what`; returns it.
    pub fn wait_error(&self, what: &str) -> String {
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

    pub fn ws(&self, id: &str) -> WebSocket<TcpStream> {
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
    pub fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
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

    pub fn signal(&self, sig: i32) {
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
pub fn field(line: &str, key: &str) -> u64 {
    let pat = format!(" {key}=");
    let start = line.find(&pat).unwrap_or_else(|| panic!("{key} in {line}")) + pat.len();
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

pub fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    String::from_utf8_lossy(&resp).into_owned()
}

pub fn upgrade_request(target: &str, extra: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n").into_bytes()
}

/// A raw upgraded socket, for frames tungstenite's client refuses to send.
/// An upgraded raw socket, with an id of its own (one live connection per
/// id: a shared id would replace the earlier devices).
pub fn raw_ws(addr: SocketAddr) -> TcpStream {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    raw_ws_head(addr, &format!("raw-{n}")).0
}

/// An upgraded raw socket for device `id`, and the head of its 101.
pub fn raw_ws_head(addr: SocketAddr, id: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&upgrade_request(&format!("/ws?id={id}"), ""))
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    let text = String::from_utf8(head).unwrap();
    assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
    (s, text)
}

/// The UDP heartbeat ticket a 101 head offers (`--udp-heartbeat`).
pub fn ticket_of(head: &str) -> Option<[u8; c1m_proto::ticket::LEN]> {
    head.lines()
        .find_map(|l| l.strip_prefix("C1M-Heartbeat-Ticket: "))
        .map(|v| c1m_proto::ticket::from_text(v.as_bytes()).expect("a well-formed ticket"))
}

/// The connection is still open: nothing to read, no reset or FIN.
pub fn still_open(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 16];
    let open = matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

/// Reads one server frame: (opcode bits, payload).
pub fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
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

pub fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) {
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

/// Whether this host has the 2 CPUs the placement tests pin threads to.
pub fn two_cpus() -> bool {
    let ok = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    if !ok {
        eprintln!("skipped: needs 2 CPUs");
    }
    ok
}

/// Devices `ids` opened from a thread pinned to `cpu` (on loopback the
/// server receives them on that CPU).
pub fn open_pinned(addr: SocketAddr, cpu: usize, ids: Vec<String>) -> Vec<WebSocket<TcpStream>> {
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

/// The children of `pid` (its worker processes).
pub fn children(pid: u32) -> Vec<u32> {
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
pub fn workers_of(server: &Server, n: usize) -> Vec<u32> {
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

/// Sends an upgrade request and reads the answer's head (and, if the
/// server closes, its body): whether it was 101, and the text.
pub fn try_upgrade(addr: SocketAddr, request: &[u8]) -> (bool, String) {
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

/// One HTTP/1.1 request to the admin port: (status, body).
pub fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    http_with(addr, method, path, "", b"")
}

/// An HTTP request with a body of `content_type` (none when empty).
pub fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let ctype = if content_type.is_empty() {
        String::new()
    } else {
        format!("Content-Type: {content_type}\r\n")
    };
    let (status, _, body) = http_raw(
        addr,
        method,
        path,
        &format!("Host: {addr}\r\n{ctype}"),
        body,
    );
    (status, body)
}

/// An HTTP/1.1 request with the header lines `headers` (each ending in
/// CRLF): (status, head, body).
pub fn http_raw(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\n{headers}Connection: close\r\nContent-Length: {}\r\n\r\n",
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
    (status, head.to_string(), body.to_string())
}

/// /metrics, read by an independent parser of the exposition format, with
/// a few rules of the format checked beside it: every sample's family has
/// HELP and TYPE first, counters end in `_total`.
pub fn scrape(admin: &str) -> prometheus_parse::Scrape {
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
pub fn metric(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
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

/// Scrapes until `pred` holds (the shards report on their own clock).
pub fn scrape_until(
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

/// A test CA and a certificate for localhost / 127.0.0.1 it signed, written
/// to `dir` (ca.pem, cert.pem, key.pem, and the last two in front.pem for
/// HAProxy); returns the CA's DER for a client's roots. Made now, never
/// committed.
pub fn make_certs(dir: &Path) -> Vec<u8> {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "c1m test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(
        dir.join("front.pem"),
        format!("{}{}", leaf.pem(), key.serialize_pem()),
    )
    .unwrap();
    ca.der().to_vec()
}

/// The lines `from` (a child's stdout or stderr) writes, read on a thread of
/// their own to the end, so the child never blocks on a full pipe.
pub fn lines_of(from: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits up to 10 s until something accepts on `addr`.
pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "server did not start listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
