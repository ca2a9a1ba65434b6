//! c1m behind a front: the PROXY protocol (v1, v2) and X-Forwarded-For
//! written by hand, then real HAProxy and nginx processes on loopback with
//! the configurations of deploy/ (TLS ended at the front, certificates made
//! here with rcgen), each in front of two c1m servers. Every test runs on
//! both I/O backends.
//!
//! HAProxy and nginx (with its stream module) come from Debian's packages
//! (`apt-get install -y nginx libnginx-mod-stream haproxy`; .ci/run does
//! it). A test that cannot find one fails saying so, unless
//! C1M_SKIP_FRONT=1, when it prints that it was skipped.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use c1m_proto::frame::{self, Opcode};
use c1m_proto::proxy;
use tungstenite::{Message, WebSocket};

use support::{field, free_socket_addr, io, make_certs};

/// A c1m server with an admin port.
struct Server {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    lines: Receiver<String>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let addr = free_socket_addr();
        let admin = free_socket_addr();
        let mut child = Command::new(env!("CARGO_BIN_EXE_server"))
            .args(["--io", io()])
            .args(["--listen", &addr.to_string()])
            .args(["--admin", &admin.to_string()])
            .args(["--stats-interval", "100ms", "--cores", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start server");
        let lines = support::lines_of(child.stdout.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(admin).is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        // --procs: the parent serves the admin port before its workers
        // listen; a probe of the device port is a connection they count.
        if extra.contains(&"--procs") {
            while TcpStream::connect(addr).is_err() {
                assert!(Instant::now() < deadline, "workers did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Server {
            child,
            addr,
            admin,
            lines,
        }
    }

    /// Waits for a stats line matching `pred`.
    fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(l) => last = l,
                Err(_) => panic!("no stats line with {what}; last: {last}"),
            }
        }
    }

    /// The latest stats line.
    fn latest(&self) -> String {
        let mut line = self.wait_line("any", |l| l.contains(" total "));
        while let Ok(l) = self.lines.try_recv() {
            if l.contains(" total ") {
                line = l;
            }
        }
        line
    }

    /// `remote` of GET /devices/<id>, if this server holds the device.
    fn remote_of(&self, id: &str) -> Option<String> {
        let mut s = TcpStream::connect(self.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /devices/{id} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        if !out.starts_with("HTTP/1.1 200") {
            return None;
        }
        let start = out.find("\"remote\":\"").expect("remote in the lookup") + 10;
        Some(out[start..].split('"').next().unwrap().to_string())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection to `to` from source address `from`.
fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(from, 0).into()).unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn upgrade_request(id: &str, extra: &str) -> Vec<u8> {
    format!("GET /ws?id={id} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n").into_bytes()
}

/// Writes `bytes` (one byte per write when `trickle`), then reads the
/// answer's head; true on 101.
fn upgrade_raw(s: &mut TcpStream, bytes: &[u8], trickle: bool) -> bool {
    if trickle {
        s.set_nodelay(true).unwrap();
        for b in bytes {
            s.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_micros(300));
        }
    } else {
        s.write_all(bytes).unwrap();
    }
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return false,
        }
    }
    head.starts_with(b"HTTP/1.1 101 ")
}

/// Sends a masked ping on a raw upgraded socket and reads its pong.
fn ping_raw(s: &mut TcpStream, payload: &[u8]) {
    let mut f = Vec::new();
    frame::write_masked_frame(&mut f, Opcode::Ping, true, payload, [1, 2, 3, 4]);
    s.write_all(&f).unwrap();
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[0], 0x8a, "a pong");
    let mut p = vec![0; (h[1] & 0x7f) as usize];
    s.read_exact(&mut p).unwrap();
    assert_eq!(p, payload);
}

/// True once the peer has closed or reset `s` (within its read timeout).
fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a Close frame, then the FIN
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

// ---- the PROXY protocol and X-Forwarded-For, written by hand ----

fn proxy_header_gives_the_devices_address() {
    let server = Server::start(&["--proxy-protocol"]);
    let dst = server.addr;
    let peer = "127.0.0.1".parse().unwrap();

    // v1, the header, the request and a ping in one write.
    let mut s = connect_from(peer, dst);
    let mut bytes = Vec::new();
    proxy::write_v1("192.0.2.7:51000".parse().unwrap(), dst, &mut bytes);
    bytes.extend(upgrade_request("pp-v1", ""));
    assert!(upgrade_raw(&mut s, &bytes, false));
    ping_raw(&mut s, b"v1");
    assert_eq!(
        server.remote_of("pp-v1").as_deref(),
        Some("192.0.2.7:51000")
    );

    // v2 with an IPv6 source and TLVs, one byte per read.
    let mut s2 = connect_from(peer, dst);
    let mut bytes = Vec::new();
    let tlvs = [0x01, 0, 2, b'h', b'2', 0x04, 0, 3, 0, 0, 0];
    proxy::write_v2(
        "[2001:db8::7]:443".parse().unwrap(),
        "[::1]:9000".parse().unwrap(),
        &tlvs,
        &mut bytes,
    );
    bytes.extend(upgrade_request("pp-v2", ""));
    assert!(upgrade_raw(&mut s2, &bytes, true));
    ping_raw(&mut s2, b"v2");
    assert_eq!(
        server.remote_of("pp-v2").as_deref(),
        Some("[2001:db8::7]:443")
    );

    // v2 LOCAL (a health check's): no address, the socket peer stands.
    let mut s3 = connect_from(peer, dst);
    let mut bytes = Vec::new();
    proxy::write_v2_local(&mut bytes);
    bytes.extend(upgrade_request("pp-local", ""));
    assert!(upgrade_raw(&mut s3, &bytes, false));
    let local = s3.local_addr().unwrap().to_string();
    assert_eq!(server.remote_of("pp-local"), Some(local));

    let line = server.wait_line("3 upgraded", |l| l.contains(" conns=3 "));
    assert_eq!(field(&line, "proxy_bad"), 0);
    assert_eq!(field(&line, "proxy_missing"), 0);
}

fn bad_and_missing_proxy_headers_are_closed_and_counted() {
    let server = Server::start(&[
        "--proxy-protocol",
        "--handshake-timeout",
        "300ms",
        "--tick",
        "100ms",
    ]);
    // A plain request where the header should be: closed, no answer.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(!upgrade_raw(&mut s, &upgrade_request("direct", ""), false));
    // A truncated v2 header and then garbage.
    let mut s2 = TcpStream::connect(server.addr).unwrap();
    s2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s2.write_all(&proxy::V2_SIG[..5]).unwrap();
    s2.write_all(b"garbage").unwrap();
    assert!(closed_by_peer(&mut s2));
    // Nothing at all: closed at the handshake timeout.
    let mut s3 = TcpStream::connect(server.addr).unwrap();
    s3.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    assert!(closed_by_peer(&mut s3));
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    // Half a header: the same.
    let mut s4 = TcpStream::connect(server.addr).unwrap();
    s4.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s4.write_all(b"PROXY TCP4 192.0.2.7 ").unwrap();
    assert!(closed_by_peer(&mut s4));
    let line = server.wait_line("the four counted", |l| {
        l.contains(" proxy_bad=2 ") && l.contains(" proxy_missing=2 ")
    });
    assert_eq!(field(&line, "upgraded"), 0);
    assert_eq!(field(&line, "accepted"), 4);
}

fn x_forwarded_for_is_believed_only_from_trusted_networks() {
    let server = Server::start(&["--trust-forwarded-from", "127.0.0.1/32"]);
    let xff = "X-Forwarded-For: 203.0.113.9, 192.0.2.7\r\n";
    // From 127.0.0.1, trusted: the rightmost entry.
    let mut s = connect_from("127.0.0.1".parse().unwrap(), server.addr);
    assert!(upgrade_raw(&mut s, &upgrade_request("xff-1", xff), false));
    assert_eq!(server.remote_of("xff-1").as_deref(), Some("192.0.2.7:0"));
    // From 127.0.0.2, not trusted: the socket peer.
    let mut s2 = connect_from("127.0.0.2".parse().unwrap(), server.addr);
    assert!(upgrade_raw(&mut s2, &upgrade_request("xff-2", xff), false));
    assert_eq!(
        server.remote_of("xff-2"),
        Some(s2.local_addr().unwrap().to_string())
    );
    // A server without the flag believes nobody.
    let plain = Server::start(&[]);
    let mut s3 = connect_from("127.0.0.1".parse().unwrap(), plain.addr);
    assert!(upgrade_raw(&mut s3, &upgrade_request("xff-3", xff), false));
    assert_eq!(
        plain.remote_of("xff-3"),
        Some(s3.local_addr().unwrap().to_string())
    );
    // PROXY then X-Forwarded-For: the header's source is the hop checked.
    let both = Server::start(&["--proxy-protocol", "--trust-forwarded-from", "10.0.0.0/8"]);
    let mut s4 = connect_from("127.0.0.1".parse().unwrap(), both.addr);
    let mut bytes = Vec::new();
    proxy::write_v1("10.1.2.3:4000".parse().unwrap(), both.addr, &mut bytes);
    bytes.extend(upgrade_request("xff-4", xff));
    assert!(upgrade_raw(&mut s4, &bytes, false));
    assert_eq!(both.remote_of("xff-4").as_deref(), Some("192.0.2.7:0"));
}

fn a_proxied_silent_device_expires_like_a_direct_one() {
    let server = Server::start(&["--proxy-protocol", "--timeout", "1s", "--tick", "100ms"]);
    let mut s = connect_from("127.0.0.1".parse().unwrap(), server.addr);
    let mut bytes = Vec::new();
    proxy::write_v2("192.0.2.7:1".parse().unwrap(), server.addr, &[], &mut bytes);
    bytes.extend(upgrade_request("silent", ""));
    assert!(upgrade_raw(&mut s, &bytes, false));
    let t = Instant::now();
    assert!(closed_by_peer(&mut s));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    server.wait_line("expired=1", |l| l.contains(" expired=1 "));
}

/// `--procs` workers get the flag too, and the parent's stats line adds
/// up their proxy_bad.
fn procs_workers_expect_the_proxy_header_too() {
    let server = Server::start(&["--proxy-protocol", "--procs", "2"]);
    for i in 0..4 {
        let mut s = connect_from("127.0.0.1".parse().unwrap(), server.addr);
        let mut bytes = Vec::new();
        proxy::write_v1("192.0.2.7:51000".parse().unwrap(), server.addr, &mut bytes);
        bytes.extend(upgrade_request(&format!("procs-{i}"), ""));
        assert!(upgrade_raw(&mut s, &bytes, false));
        ping_raw(&mut s, b"p");
    }
    for _ in 0..3 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(!upgrade_raw(&mut s, &upgrade_request("direct", ""), false));
    }
    server.wait_line("4 upgraded and 3 bad, summed", |l| {
        l.contains(" upgraded=4 ") && l.contains(" proxy_bad=3 ")
    });
}

// ---- real fronts: HAProxy and nginx with deploy/'s configurations ----

/// The front's binary, or None when the test is to be skipped
/// (C1M_SKIP_FRONT=1); without it, a missing binary fails the test.
fn front_binary(name: &str, package: &str, test: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin".into(), "/usr/local/sbin".into()]);
    let found = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
    let module_missing = name == "nginx"
        && test.contains("stream")
        && !Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists();
    match found {
        Some(p) if !module_missing => Some(p),
        _ => {
            let why = format!(
                "{name} (with what {test} needs) is not installed: install the Debian package (apt-get install -y {package})"
            );
            if std::env::var_os("C1M_SKIP_FRONT").is_some_and(|v| v == "1") {
                // Straight to the descriptor: the harness captures eprintln!
                // of passing tests, and a skip must be seen.
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED {test}: {why} (C1M_SKIP_FRONT=1)"
                );
                None
            } else {
                panic!("{why}, or set C1M_SKIP_FRONT=1 to skip this test");
            }
        }
    }
}

/// A scratch directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("c1m-front-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// deploy/`name` with its placeholders filled for this test (the same
/// substitution as deploy/render.sh).
fn render(
    name: &str,
    dir: &Path,
    ws: SocketAddr,
    wss: SocketAddr,
    servers: &[SocketAddr],
) -> PathBuf {
    let template = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    let mut text = std::fs::read_to_string(&template)
        .unwrap_or_else(|e| panic!("{}: {e}", template.display()));
    let d = dir.display().to_string();
    let upstreams: String = servers
        .iter()
        .map(|s| format!("server {s};\n        "))
        .collect();
    let haproxy: String = servers
        .iter()
        .enumerate()
        .map(|(i, s)| format!("server c1m-{} {s}\n    ", i + 1))
        .collect();
    for (key, value) in [
        ("LISTEN_WS", ws.to_string()),
        ("LISTEN_WSS", wss.to_string()),
        ("CERT", format!("{d}/cert.pem")),
        ("KEY", format!("{d}/key.pem")),
        ("PEM", format!("{d}/front.pem")),
        ("PREFIX", d.clone()),
        ("MODULES", "/usr/lib/nginx/modules".into()),
        ("WORKERS", "1".into()),
        ("WORKER_CONNECTIONS", "1024".into()),
        ("NOFILE", "4096".into()),
        ("MAXCONN", "1000".into()),
        ("SSL_CACHE", "1000".into()),
        ("SSL_CACHE_MB", "1".into()),
        ("UPSTREAM_SERVERS", upstreams),
        ("HAPROXY_SERVERS", haproxy),
    ] {
        text = text.replace(&format!("@{key}@"), &value);
    }
    let left: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('@'))
        .collect();
    assert!(left.is_empty(), "placeholders left in {name}: {left:?}");
    let out = dir.join(name);
    std::fs::write(&out, text).unwrap();
    out
}

/// A front process in its own process group, stopped (the whole group)
/// when dropped.
struct Front {
    child: Child,
    log: PathBuf,
}

impl Front {
    fn start(mut cmd: Command, log: PathBuf, ws: SocketAddr) -> Front {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap());
        let mut child = cmd.spawn().expect("start the front");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the front exited ({status}): {}{}{}",
                    std::fs::read_to_string(log.with_extension("err")).unwrap_or_default(),
                    std::fs::read_to_string(log.with_extension("out")).unwrap_or_default(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if TcpStream::connect(ws).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the front did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Front { child, log }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: signals to the process group this test created.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; whatever is left of the group.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = &self.log;
    }
}

/// A rustls client stream to `to` from `from`, trusting only `ca`.
fn tls_stream(
    from: IpAddr,
    to: SocketAddr,
    ca: &[u8],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(ca.to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(conn, connect_from(from, to))
}

/// Upgrades over `stream` (plain or TLS) and checks a ping's pong.
fn ws_over<S: Read + Write>(stream: S, id: &str) -> WebSocket<S> {
    let url = format!("ws://localhost/ws?id={id}");
    let (mut ws, resp) = tungstenite::client(url, stream).expect("upgrade through the front");
    assert_eq!(resp.status(), 101);
    heartbeat(&mut ws);
    ws
}

fn heartbeat<S: Read + Write>(ws: &mut WebSocket<S>) {
    ws.send(Message::Ping(b"hb".to_vec())).unwrap();
    match ws.read().expect("a pong") {
        Message::Pong(p) => assert_eq!(&p[..], b"hb"),
        other => panic!("expected a pong, got {other:?}"),
    }
}

/// True once the front closed the device (after c1m expired it).
fn ws_closed<S: Read + Write>(ws: &mut WebSocket<S>) -> bool {
    loop {
        match ws.read() {
            Ok(Message::Close(_)) | Ok(Message::Pong(_)) | Ok(Message::Ping(_)) => continue,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    HaproxyTcp,
    NginxStream,
    NginxHttp,
}

/// Two c1m servers behind the front `kind` with its deploy/ file: plain
/// and TLS devices upgrade and heartbeat through it, GET /devices/<id>
/// shows their own address (not the front's), and a silent one is expired
/// (and its front connection closed) like a direct one.
fn through_the_front(kind: Kind, test: &str) {
    let (bin, package) = match kind {
        Kind::HaproxyTcp => ("haproxy", "haproxy"),
        Kind::NginxStream => ("nginx", "nginx libnginx-mod-stream"),
        Kind::NginxHttp => ("nginx", "nginx"),
    };
    let Some(bin) = front_binary(bin, package, test) else {
        return;
    };
    let flags: &[&str] = if kind == Kind::NginxHttp {
        &["--trust-forwarded-from", "127.0.0.1/32"]
    } else {
        &["--proxy-protocol"]
    };
    let timing = ["--timeout", "2s", "--tick", "100ms"];
    let servers = [
        Server::start(&[flags, &timing].concat()),
        Server::start(&[flags, &timing].concat()),
    ];
    let dir = TempDir::new(test);
    let ca = make_certs(&dir.0);
    let (ws_addr, wss_addr) = (free_socket_addr(), free_socket_addr());
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let _front = match kind {
        Kind::HaproxyTcp => {
            let cfg = render("haproxy.cfg", &dir.0, ws_addr, wss_addr, &addrs);
            let mut cmd = Command::new(bin);
            cmd.arg("-f").arg(&cfg).arg("-db");
            Front::start(cmd, dir.0.join("haproxy.log"), ws_addr)
        }
        Kind::NginxStream | Kind::NginxHttp => {
            let name = if kind == Kind::NginxHttp {
                "nginx-http.conf"
            } else {
                "nginx-stream.conf"
            };
            let cfg = render(name, &dir.0, ws_addr, wss_addr, &addrs);
            let mut cmd = Command::new(bin);
            cmd.arg("-p")
                .arg(&dir.0)
                .arg("-c")
                .arg(&cfg)
                .args(["-g", "daemon off;"]);
            Front::start(cmd, dir.0.join("error.log"), ws_addr)
        }
    };

    let find = |id: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(r) = servers.iter().find_map(|s| s.remote_of(id)) {
                return r;
            }
            assert!(Instant::now() < deadline, "{id} on neither server");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The device's own address as c1m should show it: X-Forwarded-For
    // carries no port.
    let expect = |local: SocketAddr| -> String {
        if kind == Kind::NginxHttp {
            format!("{}:0", local.ip())
        } else {
            local.to_string()
        }
    };

    let from = |n: u8| IpAddr::from([127, 0, 0, n]);
    let mut plain = Vec::new();
    let mut tls = Vec::new();
    for i in 0..3u8 {
        let s = connect_from(from(5 + i), ws_addr);
        let local = s.local_addr().unwrap();
        let id = format!("{test}-ws-{i}");
        plain.push(ws_over(s, &id));
        assert_eq!(find(&id), expect(local), "{id}");

        let t = tls_stream(from(15 + i), wss_addr, &ca);
        let local = t.sock.local_addr().unwrap();
        let id = format!("{test}-wss-{i}");
        tls.push(ws_over(t, &id));
        assert_eq!(find(&id), expect(local), "{id}");
    }
    // Both servers took devices.
    for s in &servers {
        let line = s.wait_line("devices", |l| {
            l.contains(" total ") && !l.contains(" conns=0 ")
        });
        assert!(field(&line, "conns") > 0, "{line}");
    }

    // Devices 0 heartbeat, devices 1 and 2 fall silent: past --timeout
    // (2s) c1m expires them and the front closes them.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(3500) {
        heartbeat(&mut plain[0]);
        heartbeat(&mut tls[0]);
        std::thread::sleep(Duration::from_millis(250));
    }
    for ws in plain[1..].iter_mut() {
        assert!(ws_closed(ws), "a silent ws device was not closed");
    }
    for ws in tls[1..].iter_mut() {
        assert!(ws_closed(ws), "a silent wss device was not closed");
    }
    heartbeat(&mut plain[0]);
    heartbeat(&mut tls[0]);
    let lines: Vec<String> = servers.iter().map(|s| s.latest()).collect();
    let sum = |key: &str| lines.iter().map(|l| field(l, key)).sum::<u64>();
    assert_eq!(sum("expired"), 4, "{lines:?}");
    assert_eq!(sum("conns"), 2, "{lines:?}");
    assert_eq!(sum("proxy_bad"), 0, "{lines:?}");
}

fn through_haproxy_tcp_with_proxy_v2() {
    through_the_front(Kind::HaproxyTcp, "haproxy-tcp");
}

fn through_nginx_stream_with_proxy_v1() {
    through_the_front(Kind::NginxStream, "nginx-stream");
}

fn through_nginx_http_with_x_forwarded_for() {
    through_the_front(Kind::NginxHttp, "nginx-http");
}

on_both_backends!(
    proxy_header_gives_the_devices_address,
    bad_and_missing_proxy_headers_are_closed_and_counted,
    x_forwarded_for_is_believed_only_from_trusted_networks,
    a_proxied_silent_device_expires_like_a_direct_one,
    procs_workers_expect_the_proxy_header_too,
    through_haproxy_tcp_with_proxy_v2,
    through_nginx_stream_with_proxy_v1,
    through_nginx_http_with_x_forwarded_for,
);
