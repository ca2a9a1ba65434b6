//! Issue 20, parts 2-4, against the real `server` binary on 127.0.0.1: the
//! admin port belongs to operators (token, Origin and Host, timeouts and
//! concurrency), a shard or a link that fails ends its process whole, and
//! the small start-up and protocol fixes. Small scale, seconds; every test
//! on both I/O backends.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

use support::free_addr;

struct Server {
    child: Child,
    addr: SocketAddr,
    /// Its stderr, line by line.
    errors: Receiver<String>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_with(extra, &[])
    }

    fn start_with(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let addr: SocketAddr = free_addr().parse().unwrap();
        let child = support::server_command()
            .envs(env.iter().copied())
            .arg("--listen")
            .arg(addr.to_string())
            .args(if extra.contains(&"--stats-interval") {
                &[][..]
            } else {
                &["--stats-interval", "100ms"][..]
            })
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start server");
        Server::attach(child, addr)
    }

    /// Reads `child`'s stderr and waits until it listens on `addr`.
    fn attach(mut child: Child, addr: SocketAddr) -> Server {
        let errors = support::lines_of(child.stderr.take().unwrap());
        support::wait_listening(addr);
        Server {
            child,
            addr,
            errors,
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

    /// Waits for a line on stderr containing every one of `what`.
    fn wait_error(&self, what: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.errors.recv_timeout(left) {
                Ok(l) if what.iter().all(|w| l.contains(w)) => return l,
                Ok(_) => {}
                Err(_) => panic!("no line on stderr with {what:?}"),
            }
        }
    }

    /// Waits up to `limit` for it to exit.
    fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the server with `args` and says what it printed on stderr and how
/// it exited, or None if it was still running after 5 s (then killed).
fn start_fails(args: &[&str]) -> Option<(ExitStatus, String)> {
    let mut child = support::server_command()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            return Some((status, err));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts the server refused to start with one sentence holding `says`.
fn refused_in_one_sentence(args: &[&str], says: &[&str]) -> String {
    let Some((status, err)) = start_fails(args) else {
        panic!("{args:?}: the server started");
    };
    assert!(!status.success(), "{args:?}: {err}");
    for s in says {
        assert!(err.contains(s), "{args:?}: {s:?} not in {err}");
    }
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

/// One HTTP request to the admin port with `headers` (each ending in
/// CRLF) and `body`: (status, head, body).
use support::http_raw as http;

/// A request as an operator's tool sends it: Host is the admin address.
fn get(admin: &str, path: &str, token: Option<&str>) -> u16 {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    http(admin, "GET", path, &format!("Host: {admin}\r\n{auth}"), b"").0
}

/// A file of its own, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(tag: &str, content: &str) -> TempFile {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("c1m-operator-{tag}-{}-{n}", std::process::id()));
        std::fs::write(&path, content).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const TOKEN: &str = "op3rator-t0ken-of-some-length";

// ---- 4. The admin port belongs to operators ----

/// With --admin-token-file every request but /healthz needs the bearer
/// token (401 with WWW-Authenticate without it or with another), in one
/// process and from the --procs parent's admin alike.
fn admin_token_is_required_for_everything_but_healthz() {
    let file = TempFile::new("token", &format!("{TOKEN}\n"));
    for procs in ["1", "2"] {
        let admin = free_addr();
        let server = Server::start(&[
            "--procs",
            procs,
            "--admin",
            &admin,
            "--admin-token-file",
            file.path(),
        ]);
        let mut ws = server.ws("02:00:5e:00:00:11");
        for path in ["/metrics", "/devices/02:00:5e:00:00:11", "/nowhere"] {
            let (status, head, _) = http(&admin, "GET", path, &format!("Host: {admin}\r\n"), b"");
            assert_eq!(status, 401, "{procs} procs, {path}");
            assert!(head.contains("WWW-Authenticate: Bearer"), "{head}");
            assert_eq!(
                get(&admin, path, Some("op3rator-t0ken-of-some-lengtx")),
                401
            );
            assert_eq!(get(&admin, path, Some(&TOKEN[..TOKEN.len() - 1])), 401);
        }
        // Another scheme is no token either.
        let (status, _, _) = http(
            &admin,
            "GET",
            "/metrics",
            &format!("Host: {admin}\r\nAuthorization: Basic {TOKEN}\r\n"),
            b"",
        );
        assert_eq!(status, 401);
        // A push without the token reaches no device.
        let (status, _, _) = http(
            &admin,
            "POST",
            "/devices/02:00:5e:00:00:11/messages",
            &format!("Host: {admin}\r\nContent-Type: text/plain\r\n"),
            b"reboot",
        );
        assert_eq!(status, 401);
        assert_eq!(get(&admin, "/healthz", None), 200, "{procs} procs");
        assert_eq!(get(&admin, "/metrics", Some(TOKEN)), 200);
        let deadline = Instant::now() + Duration::from_secs(10);
        while get(&admin, "/devices/02:00:5e:00:00:11", Some(TOKEN)) != 200 {
            assert!(Instant::now() < deadline, "the device was never found");
            std::thread::sleep(Duration::from_millis(50));
        }
        let (status, _, body) = http(
            &admin,
            "POST",
            "/devices/02:00:5e:00:00:11/messages",
            &format!(
                "Host: {admin}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: text/plain\r\n"
            ),
            b"hello",
        );
        assert_eq!((status, body.as_str()), (200, "delivered\n"));
        assert_eq!(ws.read().unwrap(), Message::Text("hello".into()));
        // The workers never see the token file: the parent serves the port.
        if procs == "2" {
            let mut workers = Vec::new();
            for task in std::fs::read_dir(format!("/proc/{}/task", server.child.id())).unwrap() {
                let task = task.unwrap().file_name();
                let kids = std::fs::read_to_string(format!(
                    "/proc/{}/task/{}/children",
                    server.child.id(),
                    task.to_string_lossy()
                ))
                .unwrap_or_default();
                workers.extend(kids.split_whitespace().map(String::from));
            }
            assert_eq!(workers.len(), 2, "{workers:?}");
            for w in workers {
                let cmdline = std::fs::read(format!("/proc/{w}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                assert!(!cmdline.contains("--admin"), "{cmdline}");
            }
        }
    }
}

/// An --admin address other than loopback without a token file, and an
/// unusable token file, stop the start in one sentence (the token never
/// printed).
fn admin_off_loopback_without_a_token_is_refused_in_one_sentence() {
    let port = free_addr().rsplit(':').next().unwrap().to_string();
    let open = format!("0.0.0.0:{port}");
    for procs in ["1", "2"] {
        refused_in_one_sentence(
            &["--listen", &free_addr(), "--procs", procs, "--admin", &open],
            &[
                "--admin 0.0.0.0:",
                "not a loopback address",
                "--admin-token-file",
            ],
        );
    }
    let short = TempFile::new("short", "hunter2hunter2\n");
    let spaced = TempFile::new("spaced", "a token with spaces in it\n");
    for (file, says) in [
        (short.path(), "shorter than 16 bytes"),
        (spaced.path(), "visible ASCII"),
        (
            "/nonexistent/token",
            "cannot read --admin-token-file /nonexistent/token",
        ),
    ] {
        let err = refused_in_one_sentence(
            &[
                "--listen",
                &free_addr(),
                "--admin",
                &open,
                "--admin-token-file",
                file,
            ],
            &[says],
        );
        assert!(
            !err.contains("hunter2") && !err.contains("with spaces"),
            "{err}"
        );
    }
    // With a token it serves there.
    let file = TempFile::new("open", TOKEN);
    let _server = Server::start(&["--admin", &open, "--admin-token-file", file.path()]);
    let local = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(&local).is_err() {
        assert!(Instant::now() < deadline, "the admin port never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(&local, "/metrics", Some(TOKEN)), 200);
    assert_eq!(get(&local, "/metrics", None), 401);
}

/// A browser's request (any Origin) and a request for another name (DNS
/// rebinding) get 403, /healthz too; the address itself, localhost on
/// loopback and names given with --admin-host are served. The cross-site
/// form POST of text/plain reaches no device.
fn admin_refuses_browsers_and_foreign_hosts_with_403() {
    let admin = free_addr();
    let port = admin.rsplit(':').next().unwrap().to_string();
    let server = Server::start(&["--admin", &admin, "--admin-host", "ops.example"]);
    let mut ws = server.ws("02:00:5e:00:00:12");
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for path in ["/healthz", "/metrics"] {
        for headers in [
            format!("Host: {admin}\r\nOrigin: http://evil.example\r\n"),
            format!("Host: {admin}\r\nOrigin: null\r\n"),
            format!("Host: evil.example:{port}\r\n"),
            format!("Host: {admin}0\r\n"),
            format!("Host: 127.0.0.1:{}\r\n", port.parse::<u16>().unwrap() ^ 1),
            "Host: 127.0.0.1\r\n".to_string(),
        ] {
            let (status, _, body) = http(&admin, "GET", path, &headers, b"");
            assert_eq!(status, 403, "{path} with {headers:?}: {body}");
        }
        for host in [
            admin.clone(),
            format!("localhost:{port}"),
            format!("LocalHost:{port}"),
            format!("ops.example:{port}"),
            format!("127.0.0.2:{port}"),
        ] {
            let (status, _, body) = http(&admin, "GET", path, &format!("Host: {host}\r\n"), b"");
            assert_eq!(status, 200, "{path} with Host {host}: {body}");
        }
    }
    // The form a page could POST at the port: refused, nothing delivered.
    let (status, _, _) = http(
        &admin,
        "POST",
        "/devices/02:00:5e:00:00:12/messages",
        &format!("Host: {admin}\r\nOrigin: https://any.page\r\nContent-Type: text/plain\r\n"),
        b"reboot",
    );
    assert_eq!(status, 403);
    assert!(ws.read().is_err(), "a cross-site push reached the device");
}

/// A POST whose body never comes, and clients that never finish their
/// head, cost a handler each for the request timeout, never /metrics or
/// /healthz: those are answered at once meanwhile, and the stalled
/// requests get 408. (The body is over 1 KiB: tiny_http, before, read
/// smaller ones on its connection thread, and larger ones on the one
/// thread that served every request.)
fn admin_a_stalled_request_does_not_starve_metrics_or_healthz() {
    let admin = free_addr();
    let _server = Server::start(&["--admin", &admin]);
    let started = Instant::now();
    let mut stalled = TcpStream::connect(&admin).unwrap();
    write!(
        stalled,
        "POST /devices/x/messages HTTP/1.1\r\nHost: {admin}\r\nContent-Type: text/plain\r\nContent-Length: 5000\r\n\r\nhalf"
    )
    .unwrap();
    let mut half_heads: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&admin).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: ").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(get(&admin, "/healthz", None), 200);
        assert_eq!(get(&admin, "/metrics", None), 200);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = stalled.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    for s in &mut half_heads {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }
}

// ---- 2. Fail whole, not half ----

/// A shard whose I/O loop fails, or that panics outside the contained
/// parser, ends the process with exit 1 and one sentence naming the shard
/// and the cause (not N-1 shards serving on).
fn a_shard_that_fails_ends_the_process_in_one_sentence() {
    for (kind, cause) in [
        ("error", "its I/O loop failed: injected driver failure"),
        ("panic", "it panicked: injected panic in the I/O loop"),
    ] {
        let mut server = Server::start_with(
            &["--cores", "0-1", "--drain-timeout", "1s"],
            &[("C1M_INJECT_SHARD_FAILURE", kind)],
        );
        let mut held: Vec<_> = (0..4).map(|i| server.ws(&format!("f{kind}{i}"))).collect();
        held[0].send(Message::Ping(vec![])).unwrap();
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(b"c1m-inject-shard-failure").unwrap();
        let line = server.wait_error(&["stopped:", cause]);
        assert!(line.starts_with("server: shard "), "{line}");
        assert!(line.contains("ending the whole process"), "{line}");
        let status = server
            .exit_within(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{kind}: the process lived on after {line}"));
        assert_eq!(status.code(), Some(1), "{kind}");
    }
}

/// Under --procs, a worker whose shard fails exits 1 and the parent
/// restarts it: the server serves on, with both workers.
fn procs_a_shard_that_fails_ends_its_worker_and_the_parent_restarts_it() {
    let server = Server::start_with(
        &["--procs", "2", "--drain-timeout", "1s"],
        &[("C1M_INJECT_SHARD_FAILURE", "error")],
    );
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"c1m-inject-shard-failure").unwrap();
    let line = server.wait_error(&["worker ", "injected driver failure"]);
    assert!(line.contains("shard "), "{line}");
    let restart = server.wait_error(&["exited (exit status: 1)", "restarting it"]);
    assert!(restart.starts_with("server: worker "), "{restart}");
    // Serving on, both workers (a new connection lands on either).
    for i in 0..6 {
        let mut ws = server.ws(&format!("after{i}"));
        ws.send(Message::Ping(b"p".to_vec())).unwrap();
        assert_eq!(ws.read().unwrap(), Message::Pong(b"p".to_vec()));
    }
}

/// A --procs worker whose link to the parent fails (a malformed frame, or
/// the parent's end closed) ends at once, non-zero, in one sentence, so
/// that the parent restarts it, rather than living on without the registry.
/// This test is the worker's parent: it holds the other end of the link.
fn a_worker_whose_link_fails_ends() {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;
    for (malformed, says) in [
        (true, "the --procs parent sent a malformed frame"),
        (false, "the --procs parent closed the link"),
    ] {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let fd = theirs.as_raw_fd();
        let addr: SocketAddr = free_addr().parse().unwrap();
        let mut cmd = support::server_command();
        cmd.args(["--listen", &addr.to_string(), "--cores", "0", "--join"])
            .env("C1M_LINK", "3,0,1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: dup2 in the child between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if fd == 3 {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut server = Server::attach(cmd.spawn().unwrap(), addr);
        drop(theirs);
        // Serving, with its link up.
        let mut ws = server.ws("linked");
        ws.send(Message::Ping(vec![])).unwrap();
        assert_eq!(ws.read().unwrap(), Message::Pong(vec![]));
        if malformed {
            // A frame length no frame has (the worker may be gone before
            // the rest is written).
            let mut bad = u32::MAX.to_le_bytes().to_vec();
            bad.extend_from_slice(&[0; 16]);
            let _ = ours.write_all(&bad);
        } else {
            drop(ours);
        }
        let line = server.wait_error(&[says]);
        assert!(line.contains("this worker ends"), "{line}");
        let status = server
            .exit_within(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("the worker lived on after: {line}"));
        assert_eq!(status.code(), Some(1));
    }
}

/// A --max-message a push could not carry between --procs workers (a link
/// frame holds 16 MiB) is refused at start, in one sentence.
fn max_message_over_a_link_frame_is_refused_in_one_sentence() {
    for procs in ["1", "2"] {
        refused_in_one_sentence(
            &[
                "--listen",
                &free_addr(),
                "--procs",
                procs,
                "--max-message",
                "17MiB",
            ],
            &["--max-message 17825792 bytes is over 16777216 bytes"],
        );
    }
    // The most it takes still starts (conformance/autobahn.sh uses it).
    let _ok = Server::start(&["--max-message", "16MiB"]);
}

// ---- 3. Small items ----

/// `id=aa%3Abb` (Python's urlencode) is the device aa:bb: upgraded, found
/// under its decoded id, and the admin's path may be encoded too.
fn a_percent_encoded_id_is_decoded() {
    let admin = free_addr();
    let server = Server::start(&["--admin", &admin]);
    let mut ws = server.ws("02%3A00%3a5e:00:00:13");
    ws.send(Message::Ping(b"x".to_vec())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"x".to_vec()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = http(
            &admin,
            "GET",
            "/devices/02:00:5e:00:00:13",
            &format!("Host: {admin}\r\n"),
            b"",
        );
        if status == 200 {
            assert!(body.contains("\"id\":\"02:00:5e:00:00:13\""), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "not found: {status} {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        get(&admin, "/devices/02%3A00%3A5e%3A00%3A00%3A13", None),
        200
    );
    assert_eq!(get(&admin, "/devices/02%2F00", None), 400);
}

/// --tick under 1 ms is refused in one sentence (the heartbeat-interval
/// histogram and the wheel count whole milliseconds).
fn a_tick_under_a_millisecond_is_refused_in_one_sentence() {
    for tick in ["500us", "0.9ms"] {
        refused_in_one_sentence(
            &["--listen", &free_addr(), "--tick", tick, "--timeout", "1s"],
            &["--tick", "under 1ms"],
        );
    }
    let _ok = Server::start(&["--tick", "1ms", "--timeout", "1s"]);
}

/// Warnings are rate-limited per second, whatever --stats-interval is:
/// with the stats line off, a second warning 1.5 s after the first is
/// printed (it was held back for an hour).
fn warnings_are_rate_limited_per_second_even_with_the_stats_line_off() {
    // One shard: the limit is per shard.
    let server = Server::start(&["--stats-interval", "0", "--cores", "0"]);
    let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00];
    for round in 0..2 {
        for _ in 0..3 {
            let mut s = TcpStream::connect(server.addr).unwrap();
            s.write_all(&hello).unwrap();
        }
        server.wait_error(&["TLS handshake to this plaintext port"]);
        if round == 0 {
            std::thread::sleep(Duration::from_millis(1500));
        }
    }
    // And within a second, one line for many.
    std::thread::sleep(Duration::from_millis(300));
    let extra: Vec<String> = server
        .errors
        .try_iter()
        .filter(|l| l.contains("TLS handshake"))
        .collect();
    assert!(extra.is_empty(), "{extra:?}");
}

on_both_backends!(
    admin_token_is_required_for_everything_but_healthz,
    admin_off_loopback_without_a_token_is_refused_in_one_sentence,
    admin_refuses_browsers_and_foreign_hosts_with_403,
    admin_a_stalled_request_does_not_starve_metrics_or_healthz,
    a_shard_that_fails_ends_the_process_in_one_sentence,
    procs_a_shard_that_fails_ends_its_worker_and_the_parent_restarts_it,
    a_worker_whose_link_fails_ends,
    max_message_over_a_link_frame_is_refused_in_one_sentence,
    a_percent_encoded_id_is_decoded,
    a_tick_under_a_millisecond_is_refused_in_one_sentence,
    warnings_are_rate_limited_per_second_even_with_the_stats_line_off,
);
