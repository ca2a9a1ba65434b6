//! TLS (wss://, --tls-cert/--tls-key): upgrade, heartbeat and expiry,
//! TLS 1.2 and 1.3 with resumption, plaintext/TLS mismatches and rejected
//! certificates as counted, logged closes, a trickled record, unusable files.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use c1m_proto::frame::{self, Opcode};
use tungstenite::{Message, WebSocket};

use support::*;

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
        make_certs(&dir);
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

/// A hot upgrade's new process, named in the old one's last line ("...
/// (pid N) ..."): not our child, so killed by pid when the test ends.
struct NewServer(i32);

impl NewServer {
    fn named_in(line: &str) -> NewServer {
        let at = line.find("(pid ").expect("a pid in the line") + 5;
        let pid = line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a pid in the line");
        NewServer(pid)
    }
}

impl Drop for NewServer {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the server this test started (by its upgrade).
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// A hot upgrade (docs/upgrade.md) moves no TLS state: a wss device gets
/// Close 1001 with the reconnect hint, counted in the old process's
/// summary, and reconnects to the new process at once.
fn tls_a_hot_upgrade_closes_wss_devices_with_1001_and_they_reconnect() {
    let certs = Certs::new("upgrade");
    let flags = certs.flags();
    let mut args = vec!["--cores", "0"];
    args.extend(flags.iter().map(String::as_str));
    let server = Server::start(&args);
    let config = certs.client(&[&rustls::version::TLS13]);
    let mut ws = wss(server.addr, &config, "wss-upgrade");
    server.signal(libc::SIGUSR2);
    match ws.read() {
        Ok(Message::Close(Some(f))) => {
            assert_eq!(u16::from(f.code), 1001);
            assert_eq!(f.reason, "draining: reconnect");
        }
        other => panic!("expected Close 1001, got {other:?}"),
    }
    let line = server.wait_error("this process exits");
    let _new = NewServer::named_in(&line);
    assert!(
        line.contains("1 TLS connections closed with 1001"),
        "{line}"
    );
    let mut again = wss(server.addr, &config, "wss-upgrade");
    // The new process was given the old one's ticket keys: the device
    // resumes its session rather than paying a full handshake.
    assert_eq!(
        again.get_ref().conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    again.send(Message::Ping(b"back".to_vec())).unwrap();
    assert_eq!(again.read().unwrap(), Message::Pong(b"back".to_vec()));
}

/// Under --procs every worker seals and opens session tickets with the
/// parent's keys, so a reconnect resumes on whichever worker the kernel
/// hands it to (with a key per worker, each reconnect would resume only
/// when it landed where the last one did: half the time with two), a
/// restarted worker included.
fn tls_a_reconnect_resumes_on_any_procs_worker_a_restarted_one_too() {
    let certs = Certs::new("procs-resume");
    let flags = certs.flags();
    let mut args = vec!["--procs", "2", "--cores", "0-1"];
    args.extend(flags.iter().map(String::as_str));
    let server = Server::start(&args);
    let workers = workers_of(&server, 2);
    let reconnects = |config: &std::sync::Arc<rustls::ClientConfig>, tag: &str| {
        (0..12)
            .map(|round| {
                let mut ws = wss(server.addr, config, &format!("{tag}-{round}"));
                let kind = ws.get_ref().conn.handshake_kind().unwrap();
                ws.send(Message::Ping(b"x".to_vec())).unwrap();
                assert_eq!(ws.read().unwrap(), Message::Pong(b"x".to_vec()));
                let _ = ws.close(None);
                let _ = ws.flush();
                kind
            })
            .collect::<Vec<_>>()
    };
    let resumed = |kinds: &[rustls::HandshakeKind]| {
        kinds
            .iter()
            .filter(|&&k| k == rustls::HandshakeKind::Resumed)
            .count()
    };
    for (version, tag) in [
        (&rustls::version::TLS13, "v13"),
        (&rustls::version::TLS12, "v12"),
    ] {
        let config = certs.client(&[version]);
        let kinds = reconnects(&config, tag);
        assert_eq!(kinds[0], rustls::HandshakeKind::Full, "{tag}: {kinds:?}");
        assert_eq!(resumed(&kinds), 11, "{tag}: {kinds:?}");
    }
    // A worker that dies is restarted with the keys of the moment.
    let config = certs.client(&[&rustls::version::TLS13]);
    reconnects(&config, "before");
    // SAFETY: kill on a grandchild this test started.
    unsafe { libc::kill(workers[0] as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = children(server.child.id());
        if now.len() == 2 && !now.contains(&workers[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "worker not restarted: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.wait_line("the restarted worker's stats", |l| {
        l.contains("workers=[0,")
    });
    let kinds = reconnects(&config, "after");
    assert_eq!(resumed(&kinds), 12, "{kinds:?}");
}

/// With `--upgrade-tls-window`, a hot upgrade's Closes to its wss devices
/// are spread over the window (not all at once, so that they do not all
/// reconnect to the new process together), and a device is served by the
/// old process until its Close comes: its ping is answered.
fn tls_a_hot_upgrade_spreads_its_closes_over_the_window() {
    let certs = Certs::new("upgrade-window");
    let flags = certs.flags();
    let mut args = vec!["--cores", "0", "--upgrade-tls-window", "1s"];
    args.extend(flags.iter().map(String::as_str));
    let server = Server::start(&args);
    let config = certs.client(&[&rustls::version::TLS13]);
    let devices: Vec<_> = (0..8)
        .map(|i| wss(server.addr, &config, &format!("wss-w{i}")))
        .collect();
    let began = std::time::Instant::now();
    server.signal(libc::SIGUSR2);
    let line = server.wait_error("this process exits");
    let _new = NewServer::named_in(&line);
    assert!(
        line.contains("8 TLS connections closed with 1001 over 1s"),
        "{line}"
    );
    let readers: Vec<_> = devices
        .into_iter()
        .map(|mut ws| {
            std::thread::spawn(move || {
                // Served until its Close: a ping answered (or the Close
                // came first).
                ws.send(Message::Ping(b"still".to_vec())).unwrap();
                loop {
                    match ws.read() {
                        Ok(Message::Pong(p)) => assert_eq!(p, b"still".to_vec()),
                        Ok(Message::Close(Some(f))) => {
                            assert_eq!(u16::from(f.code), 1001);
                            assert_eq!(f.reason, "draining: reconnect");
                            return std::time::Instant::now();
                        }
                        other => panic!("expected a Pong or Close 1001, got {other:?}"),
                    }
                }
            })
        })
        .collect();
    let mut at: Vec<_> = readers
        .into_iter()
        .map(|r| r.join().unwrap().duration_since(began))
        .collect();
    at.sort();
    let spread = at[7] - at[0];
    assert!(
        spread >= std::time::Duration::from_millis(600),
        "the Closes came within {spread:?}: {at:?}"
    );
    assert!(
        at[7] <= std::time::Duration::from_secs(4),
        "the last Close came late: {at:?}"
    );
}

/// A device that sent its ClientHello and left (its reset or FIN arrived)
/// before the shard read it costs no handshake: the shard closes it unread
/// (`tls_abandoned`, and `peer_gone`), as a storm's timed-out attempts.
/// The server is stopped while they come and go, so that each device has
/// left before the shard can read its bytes; one that stays is served.
fn tls_a_device_gone_before_its_hello_is_read_costs_no_handshake() {
    let certs = Certs::new("abandoned");
    let flags = certs.flags();
    let mut args = vec!["--cores", "0"];
    args.extend(flags.iter().map(String::as_str));
    let server = Server::start(&args);
    let config = certs.client(&[&rustls::version::TLS13]);
    server.signal(libc::SIGSTOP);
    for reset in [true, true, true, false, false, false] {
        let mut tcp = TcpStream::connect(server.addr).unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
        while conn.wants_write() {
            conn.write_tls(&mut tcp).unwrap();
        }
        if reset {
            socket2::SockRef::from(&tcp)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        drop(tcp);
    }
    // Their reset or FIN lands while the server cannot read.
    std::thread::sleep(Duration::from_millis(100));
    server.signal(libc::SIGCONT);
    let l = server.wait_line("the six abandoned", |l| field(l, "tls_abandoned") == 6);
    assert_eq!(field(&l, "tls_handshakes"), 0, "{l}");
    assert_eq!(field(&l, "tls_failed"), 0, "{l}");
    // (and the start's probe of the port)
    assert!(field(&l, "peer_gone") >= 6, "{l}");
    let mut ws = wss(server.addr, &config, "stays");
    ws.send(Message::Ping(b"x".to_vec())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"x".to_vec()));
    let l = server.wait_line("the one served", |l| field(l, "tls_handshakes") == 1);
    assert_eq!(field(&l, "tls_abandoned"), 6, "{l}");
}

on_both_backends!(
    tls_a_device_gone_before_its_hello_is_read_costs_no_handshake,
    tls_a_reconnect_resumes_on_any_procs_worker_a_restarted_one_too,
    tls_a_hot_upgrade_spreads_its_closes_over_the_window,
    tls_a_hot_upgrade_closes_wss_devices_with_1001_and_they_reconnect,
    tls_device_upgrades_heartbeats_and_is_expired_like_a_ws_one,
    tls_1_2_and_1_3_both_negotiate_and_a_reconnect_resumes,
    tls_plaintext_request_on_the_tls_port_is_one_counted_logged_close,
    tls_hello_on_the_plaintext_port_is_one_counted_logged_close,
    tls_a_device_that_rejects_the_certificate_is_one_counted_logged_close,
    tls_unusable_certificate_files_stop_the_server_with_one_clear_sentence,
    tls_a_record_trickled_too_slowly_is_closed_by_the_frame_timeout,
);
