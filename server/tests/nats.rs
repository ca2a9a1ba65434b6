//! `--nats`: lifecycle events and pushes through a real nats-server that
//! each test starts on a free loopback port (with JetStream in a temporary
//! store where presence is needed). Run on both I/O backends.
//!
//! nats-server must be installed (Debian: `apt-get install nats-server`;
//! .ci/run does it); without it the tests fail saying so, unless
//! C1M_SKIP_NATS=1, when they print that they were skipped.

mod c1m_bin;

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

use support::{field, io};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where nats-server is, or None (and why) when it is not installed.
fn nats_server_bin() -> Option<PathBuf> {
    let fixed = PathBuf::from("/usr/sbin/nats-server");
    if fixed.exists() {
        return Some(fixed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nats-server"))
            .find(|p| p.exists())
    })
}

/// A nats-server of this test's own.
struct Nats {
    bin: PathBuf,
    port: u16,
    store: Option<PathBuf>,
    child: Option<Child>,
}

impl Nats {
    /// Starts nats-server (with JetStream when `js`); None when it is not
    /// installed and C1M_SKIP_NATS=1 (else the test fails, saying what to do).
    fn start(js: bool) -> Option<Nats> {
        let Some(bin) = nats_server_bin() else {
            if std::env::var_os("C1M_SKIP_NATS").is_some_and(|v| v == "1") {
                eprintln!("SKIPPED: nats-server is not installed (C1M_SKIP_NATS=1)");
                return None;
            }
            panic!(
                "nats-server is not installed (neither /usr/sbin/nats-server nor on PATH): install the Debian package nats-server (apt-get install -y nats-server), or set C1M_SKIP_NATS=1 to skip the NATS tests"
            );
        };
        let store = js.then(|| {
            let dir = std::env::temp_dir().join(format!(
                "c1m-nats-test-{}-{}",
                std::process::id(),
                free_port()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            dir
        });
        let mut n = Nats {
            bin,
            port: free_port(),
            store,
            child: None,
        };
        n.up();
        Some(n)
    }

    fn up(&mut self) {
        let mut c = Command::new(&self.bin);
        c.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(dir) = &self.store {
            c.arg("-js").arg("-sd").arg(dir);
        }
        let child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.store.is_some() {
            // JetStream answers a moment after the port opens.
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Kills it and throws its storage away: a broker back without its
    /// JetStream state (presence included).
    fn kill_and_wipe(&mut self) {
        self.kill();
        if let Some(dir) = &self.store {
            std::fs::remove_dir_all(dir).unwrap();
            std::fs::create_dir_all(dir).unwrap();
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.store {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A child process whose stdout lines arrive on a channel.
struct Proc {
    child: Child,
    lines: Receiver<String>,
}

impl Proc {
    fn spawn(mut c: Command) -> Proc {
        let mut child = c.stdout(Stdio::piped()).spawn().expect("spawn");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    fn wait_line(&self, what: &str, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => {}
                Err(_) => panic!("no line with {what} within {within:?}"),
            }
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Server {
    proc: Proc,
    addr: SocketAddr,
}

impl Server {
    fn start(nats: &Nats, extra: &[&str]) -> Server {
        Server::start_with_env(nats, extra, &[])
    }

    fn start_with_env(nats: &Nats, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_server"));
        c.envs(env.iter().copied());
        c.args(["--io", io()])
            .arg("--listen")
            .arg(addr.to_string())
            .args(["--stats-interval", "100ms", "--nats", &nats.url()])
            .args(extra)
            .stderr(Stdio::null());
        let proc = Proc::spawn(c);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "server did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { proc, addr }
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

    fn wait_stats(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.proc.wait_line(what, Duration::from_secs(15), |l| {
            l.contains(" total ") && pred(l)
        })
    }
}

/// `c1m watch-events --print` on this NATS: every event as JSON.
struct Watch {
    proc: Proc,
    seen: Vec<serde_json::Value>,
}

impl Watch {
    fn start(nats: &Nats) -> Watch {
        let mut c = Command::new(c1m_bin::c1m_bin());
        c.args([
            "watch-events",
            "--nats",
            &nats.url(),
            "--print",
            "--every",
            "100ms",
            "--duration",
            "120s",
        ])
        .stderr(Stdio::null());
        let proc = Proc::spawn(c);
        // Its first totals line comes after the subscription is confirmed.
        proc.wait_line("the watcher's first line", Duration::from_secs(10), |l| {
            l.starts_with("events ")
        });
        Watch {
            proc,
            seen: Vec::new(),
        }
    }

    /// Collects events until `done` holds for those seen so far.
    fn until(&mut self, what: &str, done: impl Fn(&[serde_json::Value]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.proc.lines.recv_timeout(left) {
                Ok(l) if l.starts_with('{') => {
                    self.seen
                        .push(serde_json::from_str(&l).expect("an event is JSON"));
                }
                Ok(_) => {}
                Err(_) => panic!("no events with {what}; seen: {:#?}", self.seen),
            }
        }
    }

    /// Each device's events in order: ("connected" | reason, server).
    fn by_device(&self) -> HashMap<String, Vec<String>> {
        let mut m: HashMap<String, Vec<String>> = HashMap::new();
        for e in &self.seen {
            let Some(id) = e["id"].as_str() else { continue };
            let what = match e["event"].as_str().unwrap() {
                "connected" => "connected".to_string(),
                _ => match e["code"].as_u64() {
                    Some(code) => format!("{}:{code}", e["reason"].as_str().unwrap()),
                    None => e["reason"].as_str().unwrap().to_string(),
                },
            };
            m.entry(id.to_string()).or_default().push(what);
        }
        m
    }

    fn count(&self, event: &str) -> usize {
        self.seen.iter().filter(|e| e["event"] == event).count()
    }
}

fn connects(seen: &[serde_json::Value]) -> usize {
    seen.iter().filter(|e| e["event"] == "connected").count()
}

fn disconnects(seen: &[serde_json::Value]) -> usize {
    seen.iter().filter(|e| e["event"] == "disconnected").count()
}

/// A request with an empty body on `subject`, straight through NATS: the answer.
fn raw_request(nats: &Nats, subject: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let answer = client
            .request(subject.to_string(), bytes::Bytes::new())
            .await
            .unwrap();
        String::from_utf8_lossy(&answer.payload).into_owned()
    })
}

/// `c1m push --wait`: the answer line.
fn push(nats: &Nats, id: &str, text: &str) -> String {
    let out = Command::new(c1m_bin::c1m_bin())
        .args([
            "push",
            "--nats",
            &nats.url(),
            "--id",
            id,
            "--text",
            text,
            "--wait",
        ])
        .output()
        .expect("run c1m push");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The processes a hot upgrade started, killed when dropped.
struct Upgraded(Vec<i32>);

impl Drop for Upgraded {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: kill(2) on the server this test started (by its upgrade).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// After `server`'s SIGUSR2: waits for the old process's last line (it
/// has handed everything over), then finds the new process, the one
/// other server on its address.
fn upgraded(server: &Server) -> Upgraded {
    server.proc.wait_line(
        "the old process's final line",
        Duration::from_secs(15),
        |l| l.starts_with("final "),
    );
    let listen = server.addr.to_string();
    let old = server.proc.child.id();
    let new: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid as u32 != old)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&listen))
        })
        .collect();
    assert_eq!(new.len(), 1, "one new process: {new:?}");
    Upgraded(new)
}

/// Connect, heartbeat, expire, replace, kick, a protocol error, a reset, a
/// device's own close and shutdown each give exactly the events expected,
/// in order per device, with every field.
fn nats_lifecycle_events_are_exact_and_in_order_per_device() {
    let Some(nats) = Nats::start(false) else {
        return;
    };
    let mut watch = Watch::start(&nats);
    let admin = format!("127.0.0.1:{}", free_port());
    let server = Server::start(
        &nats,
        &[
            "--timeout",
            "2s",
            "--tick",
            "100ms",
            "--server-id",
            "test-a",
            "--admin",
            &admin,
            "--drain-timeout",
            "1s",
        ],
    );
    let mut beating = server.ws("beating");
    let silent = server.ws("silent");
    let mut first = server.ws("twice");
    let mut kicked = server.ws("kicked");
    let mut bad = server.ws("bad");
    let reset = server.ws("reset");
    let mut stays = server.ws("stays");
    watch.until("7 connects", |s| connects(s) >= 7);
    // A replaced connection, a kick, a protocol error (an unmasked frame), a reset.
    let mut second = server.ws("twice");
    assert!(matches!(first.read(), Ok(Message::Close(Some(_)))));
    let mut s = TcpStream::connect(&admin).unwrap();
    std::io::Write::write_all(
        &mut s,
        format!("DELETE /devices/kicked HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut answer);
    assert!(answer.contains("kicked"), "{answer}");
    assert!(matches!(kicked.read(), Ok(Message::Close(Some(_)))));
    std::io::Write::write_all(bad.get_mut(), &[0x89, 0x00]).unwrap();
    let _ = bad.read();
    // SO_LINGER 0 then close: a reset, no Close frame.
    let sock = socket2::SockRef::from(reset.get_ref());
    sock.set_linger(Some(Duration::ZERO)).unwrap();
    drop(reset);
    // Heartbeats keep one device alive past the timeout; the silent one expires.
    let until = Instant::now() + Duration::from_millis(2600);
    while Instant::now() < until {
        beating.send(Message::Ping(b"hb".to_vec())).unwrap();
        assert_eq!(beating.read().unwrap(), Message::Pong(b"hb".to_vec()));
        stays.send(Message::Ping(b"hb".to_vec())).unwrap();
        assert_eq!(stays.read().unwrap(), Message::Pong(b"hb".to_vec()));
        second.send(Message::Ping(b"hb".to_vec())).unwrap();
        assert_eq!(second.read().unwrap(), Message::Pong(b"hb".to_vec()));
        std::thread::sleep(Duration::from_millis(200));
    }
    beating.close(None).unwrap();
    let _ = beating.read();
    server.proc.signal(libc::SIGTERM);
    watch.until("the shutdown's disconnects", |s| disconnects(s) >= 8);
    std::thread::sleep(Duration::from_millis(300));
    let _ = silent;
    while let Ok(l) = watch.proc.lines.try_recv() {
        if l.starts_with('{') {
            watch.seen.push(serde_json::from_str(&l).unwrap());
        }
    }
    let by = watch.by_device();
    let want = |id: &str, seq: &[&str]| {
        assert_eq!(
            by.get(id)
                .map(|v| v.iter().map(String::as_str).collect::<Vec<_>>()),
            Some(seq.to_vec()),
            "{id}: {:#?}",
            watch.seen
        );
    };
    want("beating", &["connected", "closed_by_device"]);
    want("silent", &["connected", "expired"]);
    want("twice", &["connected", "connected", "replaced", "shutdown"]);
    want("kicked", &["connected", "kicked"]);
    want("bad", &["connected", "protocol_error:1002"]);
    want("reset", &["connected", "reset"]);
    want("stays", &["connected", "shutdown"]);
    assert_eq!(watch.count("connected"), 8);
    assert_eq!(watch.count("disconnected"), 8);
    assert!(watch.count("snapshot") >= 1, "a snapshot marker at connect");
    for e in watch.seen.iter().filter(|e| e["id"].is_string()) {
        assert_eq!(e["server"], "test-a", "{e}");
        assert_eq!(e["worker"], 0, "{e}");
        assert!(e["shard"].is_u64() && e["time_ms"].is_u64(), "{e}");
        match e["remote"].as_str() {
            Some(r) => assert!(r.starts_with("127.0.0.1:"), "{e}"),
            // A socket the device reset no longer knows its peer.
            None => assert_eq!(e["reason"], "reset", "{e}"),
        }
        if e["event"] == "disconnected" {
            let (heard, at) = (
                e["last_heard_ms"].as_u64().unwrap(),
                e["time_ms"].as_u64().unwrap(),
            );
            assert!(heard <= at, "{e}");
            if e["reason"] == "expired" {
                assert!(at - heard >= 1900, "expired after 2 s of silence: {e}");
            }
        }
    }
}

/// A push reaches a device on the other server (whichever server takes it
/// from the queue group), and its reply says delivered; a push to an
/// absent id, and to a device whose server died, says not connected.
fn nats_push_reaches_a_device_on_either_server_and_absent_ids_are_not_connected() {
    let Some(nats) = Nats::start(true) else {
        return;
    };
    let mut watch = Watch::start(&nats);
    let a = Server::start(&nats, &["--server-id", "a", "--cores", "0"]);
    let b = Server::start(&nats, &["--server-id", "b", "--cores", "0"]);
    let mut on_a = a.ws("dev-on-a");
    let mut on_b = b.ws("dev.on:b");
    watch.until("2 connects", |s| connects(s) >= 2);
    for (ws, id) in [(&mut on_a, "dev-on-a"), (&mut on_b, "dev.on:b")] {
        // Presence is written just after the event: allow it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut answer = push(&nats, id, &format!("hello {id}"));
        while !answer.contains(" delivered") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            answer = push(&nats, id, &format!("hello {id}"));
        }
        assert!(answer.starts_with(&format!("{id} delivered")), "{answer}");
        assert_eq!(ws.read().unwrap(), Message::Text(format!("hello {id}")));
    }
    let answer = push(&nats, "nobody", "x");
    assert!(answer.starts_with("nobody not connected"), "{answer}");
    // Bad input straight on the subjects: an answer, no panic.
    for (subject, want) in [
        (
            format!("c1m.push.{}", "a".repeat(65)),
            "error: the subject does not end in a valid device id",
        ),
        ("c1m.deliver.a.0".to_string(), "error: no device id"),
    ] {
        assert_eq!(raw_request(&nats, &subject), want, "{subject}");
    }
    // Pushes over several routings: each is delivered once.
    for i in 0..6 {
        let answer = push(&nats, "dev.on:b", &format!("n{i}"));
        assert!(answer.contains(" delivered"), "{answer}");
        assert_eq!(on_b.read().unwrap(), Message::Text(format!("n{i}")));
    }
    // Its server dies without a word: presence is stale, nobody answers
    // its deliver subject, and the push says not connected.
    drop(b);
    let answer = push(&nats, "dev.on:b", "x");
    assert!(answer.starts_with("dev.on:b not connected"), "{answer}");
    // A device that left is removed from presence.
    on_a.close(None).unwrap();
    let _ = on_a.read();
    watch.until("dev-on-a's disconnect", |s| {
        s.iter()
            .any(|e| e["id"] == "dev-on-a" && e["event"] == "disconnected")
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut answer = push(&nats, "dev-on-a", "x");
    while !answer.contains("not connected") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        answer = push(&nats, "dev-on-a", "x");
    }
    assert!(answer.starts_with("dev-on-a not connected"), "{answer}");
    let l = a.wait_stats("pushes", |l| field(l, "pushes_delivered") >= 1);
    assert_eq!(field(&l, "events_dropped"), 0, "{l}");
}

/// nats-server killed and restarted during a run: heartbeats, accepts and
/// expiry go on unchanged, events past the queue are dropped and counted,
/// and publishing resumes with a snapshot marker.
fn nats_down_and_restarted_the_shards_keep_serving_and_publishing_resumes() {
    let Some(mut nats) = Nats::start(false) else {
        return;
    };
    let mut watch = Watch::start(&nats);
    let server = Server::start(
        &nats,
        &[
            "--timeout",
            "1s",
            "--tick",
            "100ms",
            "--nats-queue",
            "64",
            "--server-id",
            "test-down",
        ],
    );
    let mut beating = server.ws("beating");
    watch.until("the first connect", |s| {
        s.iter().any(|e| e["event"] == "connected")
    });
    nats.kill();
    // With the broker gone: 400 devices connect and fall silent, one
    // heartbeats throughout; none of it may stall.
    let started = Instant::now();
    let mut silent = Vec::new();
    let mut worst = Duration::ZERO;
    for i in 0..400 {
        silent.push(server.ws(&format!("s{i}")));
        if i % 20 == 0 {
            let t = Instant::now();
            beating.send(Message::Ping(b"hb".to_vec())).unwrap();
            assert_eq!(beating.read().unwrap(), Message::Pong(b"hb".to_vec()));
            worst = worst.max(t.elapsed());
        }
    }
    let connect_time = started.elapsed();
    let until = Instant::now() + Duration::from_millis(1800);
    while Instant::now() < until {
        let t = Instant::now();
        beating.send(Message::Ping(b"hb".to_vec())).unwrap();
        assert_eq!(beating.read().unwrap(), Message::Pong(b"hb".to_vec()));
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        worst < Duration::from_millis(300),
        "a heartbeat took {worst:?}"
    );
    assert!(
        connect_time < Duration::from_secs(10),
        "400 connects took {connect_time:?}"
    );
    let l = server.wait_stats("400 expiries", |l| field(l, "expired") == 400);
    assert_eq!(field(&l, "conns"), 1, "{l}");
    assert!(
        field(&l, "events_dropped") > 0,
        "past the queue: dropped, counted: {l}"
    );
    let dropped = field(&l, "events_dropped");
    // Back: the server reconnects by itself and says so with a snapshot.
    nats.up();
    watch.until("the snapshot after the reconnect", |s| {
        s.iter()
            .any(|e| e["event"] == "snapshot" && e["broker_connects"] == 2)
    });
    let snap = watch
        .seen
        .iter()
        .find(|e| e["event"] == "snapshot" && e["broker_connects"] == 2)
        .unwrap()
        .clone();
    assert_eq!(snap["server"], "test-down");
    assert_eq!(snap["connections"], 1, "{snap}");
    let _after = server.ws("after");
    watch.until("a connect after the restart", |s| {
        s.iter()
            .any(|e| e["id"] == "after" && e["event"] == "connected")
    });
    beating.send(Message::Ping(b"hb".to_vec())).unwrap();
    assert_eq!(beating.read().unwrap(), Message::Pong(b"hb".to_vec()));
    let l = server.wait_stats("the drop count", |l| field(l, "conns") == 2);
    assert_eq!(field(&l, "events_dropped"), dropped, "no drop after: {l}");
    let _ = silent;
}

/// The broker comes back without its storage: the bucket is made again
/// and every device held is written to presence again (the shards' walk),
/// so pushes reach devices that connected before the outage. (Without the
/// walk they would say not connected until each device reconnects.)
fn nats_presence_is_written_again_when_the_broker_comes_back_empty() {
    let Some(mut nats) = Nats::start(true) else {
        return;
    };
    let server = Server::start(&nats, &["--server-id", "test-walk"]);
    let ids: Vec<String> = (0..40).map(|i| format!("walk-{i}")).collect();
    let mut devices: Vec<_> = ids.iter().map(|id| server.ws(id)).collect();
    let delivered =
        |id: &str, text: &str| push(&nats, id, text).starts_with(&format!("{id} delivered"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !delivered(&ids[39], "before") {
        assert!(Instant::now() < deadline, "presence was never written");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(devices[39].read().unwrap(), Message::Text("before".into()));
    nats.kill_and_wipe();
    nats.up();
    server.wait_stats("the reconnect", |l| field(l, "broker_connects") == 2);
    for (i, id) in ids.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = format!("after {id}");
        loop {
            let answer = push(&nats, id, &text);
            if answer.starts_with(&format!("{id} delivered")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: its presence was not written again: {answer}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(devices[i].read().unwrap(), Message::Text(text));
    }
}

/// --nats-exclusive: a device that connects to another server is closed
/// on the first with 4000 "replaced", and its events say so, after its
/// new connection's; the newer connection stays. Without the flag, a
/// third server keeps its older connection.
fn nats_exclusive_closes_the_older_connection_on_another_server() {
    let Some(nats) = Nats::start(false) else {
        return;
    };
    let mut watch = Watch::start(&nats);
    let a = Server::start(&nats, &["--server-id", "ex-a", "--nats-exclusive"]);
    let b = Server::start(&nats, &["--server-id", "ex-b", "--nats-exclusive"]);
    let plain = Server::start(&nats, &["--server-id", "ex-plain"]);
    let mut on_a = a.ws("twin");
    watch.until("twin on a", |s| {
        s.iter()
            .any(|e| e["id"] == "twin" && e["server"] == "ex-a" && e["event"] == "connected")
    });
    let mut on_b = b.ws("twin");
    match on_a.read() {
        Ok(Message::Close(Some(f))) => {
            assert_eq!(u16::from(f.code), 4000, "{f:?}");
        }
        other => panic!("the older connection on a was not replaced: {other:?}"),
    }
    watch.until("twin replaced on a", |s| {
        s.iter()
            .any(|e| e["id"] == "twin" && e["server"] == "ex-a" && e["reason"] == "replaced")
    });
    let order: Vec<(String, String)> = watch
        .seen
        .iter()
        .filter(|e| e["id"] == "twin")
        .map(|e| {
            (
                e["server"].as_str().unwrap().to_string(),
                e["reason"].as_str().unwrap_or("connected").to_string(),
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("ex-a".to_string(), "connected".to_string()),
            ("ex-b".to_string(), "connected".to_string()),
            ("ex-a".to_string(), "replaced".to_string()),
        ]
    );
    on_b.send(Message::Ping(b"hb".to_vec())).unwrap();
    assert_eq!(on_b.read().unwrap(), Message::Pong(b"hb".to_vec()));
    // A server without the flag keeps what it holds.
    let mut on_plain = plain.ws("solo");
    watch.until("solo on plain", |s| s.iter().any(|e| e["id"] == "solo"));
    let _on_a = a.ws("solo");
    watch.until("solo on a", |s| {
        s.iter().any(|e| e["id"] == "solo" && e["server"] == "ex-a")
    });
    std::thread::sleep(Duration::from_millis(300));
    on_plain.send(Message::Ping(b"hb".to_vec())).unwrap();
    assert_eq!(on_plain.read().unwrap(), Message::Pong(b"hb".to_vec()));
    let l = a.wait_stats("a's replaced count", |l| field(l, "replaced") >= 1);
    assert_eq!(field(&l, "replaced"), 1, "{l}");
}

/// Publishes `payload` on `subject`, as any client of the broker could.
fn publish(nats: &Nats, subject: &str, payload: String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        client
            .publish(subject.to_string(), payload.into())
            .await
            .unwrap();
        client.flush().await.unwrap();
    })
}

/// --nats-exclusive obeys another server's connect event only when its
/// time is at most 30 s ahead of this server's clock: one from an hour
/// ahead (a wrong clock, or a forger on the events subject) is refused
/// and counted as connects_refused, and the device stays; one from now
/// replaces it with 4000.
fn nats_exclusive_refuses_connect_events_from_too_far_ahead() {
    let Some(nats) = Nats::start(false) else {
        return;
    };
    let a = Server::start(&nats, &["--server-id", "sk-a", "--nats-exclusive"]);
    let mut held = a.ws("skewed");
    let event = |ahead_ms: u64| {
        format!(
            r#"{{"event":"connected","id":"skewed","server":"elsewhere","worker":0,"time_ms":{}}}"#,
            c1m_io::host::unix_ms() + ahead_ms
        )
    };
    // Until the server's subscription is up and has refused one.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        publish(&nats, "c1m.events.connected", event(3_600_000));
        std::thread::sleep(Duration::from_millis(200));
        let l = a.wait_stats("a stats line", |_| true);
        if field(&l, "connects_refused") >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never refused: {l}");
    }
    held.send(Message::Ping(b"hb".to_vec())).unwrap();
    assert_eq!(held.read().unwrap(), Message::Pong(b"hb".to_vec()));
    let l = a.wait_stats("the counters", |_| true);
    assert_eq!(field(&l, "replaced"), 0, "{l}");
    // Within the bound, the event is obeyed.
    publish(&nats, "c1m.events.connected", event(1_000));
    match held.read() {
        Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 4000, "{f:?}"),
        other => panic!("a connect event from now did not replace it: {other:?}"),
    }
}

/// A hot upgrade (docs/upgrade.md) publishes neither a disconnect (old
/// process) nor a connect (new one) for the devices it moves, but one
/// `upgrade` event (both pids, the connections moved) from the new
/// process; a moved device's later end is published once, by the new
/// process.
fn nats_a_hot_upgrade_publishes_one_event_and_nothing_for_the_devices_it_moves() {
    let Some(nats) = Nats::start(false) else {
        return;
    };
    let mut watch = Watch::start(&nats);
    let server = Server::start(&nats, &["--server-id", "test-up", "--cores", "0"]);
    let mut leaves = server.ws("leaves");
    let mut stays = server.ws("stays");
    watch.until("2 connects", |s| connects(s) >= 2);
    server.proc.signal(libc::SIGUSR2);
    let old = server.proc.child.id();
    let new = upgraded(&server);
    let new_pid = new.0[0] as u64;
    for ws in [&mut leaves, &mut stays] {
        ws.send(Message::Ping(b"after".to_vec())).unwrap();
        assert_eq!(ws.read().unwrap(), Message::Pong(b"after".to_vec()));
    }
    leaves.close(None).unwrap();
    let _ = leaves.read();
    watch.until("the one disconnect and the upgrade event", |s| {
        disconnects(s) >= 1 && s.iter().any(|e| e["event"] == "upgrade")
    });
    // Anything else the old or the new process would publish comes within
    // this: collect it.
    let quiet = Instant::now() + Duration::from_millis(700);
    while let Some(left) = quiet.checked_duration_since(Instant::now()) {
        match watch.proc.lines.recv_timeout(left) {
            Ok(l) if l.starts_with('{') => watch.seen.push(serde_json::from_str(&l).unwrap()),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let up: Vec<_> = watch
        .seen
        .iter()
        .filter(|e| e["event"] == "upgrade")
        .collect();
    assert_eq!(up.len(), 1, "one upgrade event: {:#?}", watch.seen);
    assert_eq!(
        (
            up[0]["server"].as_str(),
            up[0]["old_pid"].as_u64(),
            up[0]["pid"].as_u64(),
            up[0]["connections"].as_u64(),
        ),
        (
            Some("test-up"),
            Some(u64::from(old)),
            Some(new_pid),
            Some(2)
        ),
        "{:#?}",
        up[0]
    );
    let by = watch.by_device();
    assert_eq!(by["stays"], ["connected"], "{by:?}");
    assert_eq!(by["leaves"].len(), 2, "{by:?}");
    assert_eq!(by["leaves"][0], "connected", "{by:?}");
    assert_eq!((connects(&watch.seen), disconnects(&watch.seen)), (2, 1));
}

/// Pushes through NATS while a hot upgrade moves the devices (the new
/// process taking each batch 150 ms late, test hook `slow`): the old and
/// the new process serve the same deliver subject for that while, and each
/// push must reach its device once, answered "delivered": not twice (the
/// old process delivering it and the new one, which holds asks for devices
/// on their way, again on arrival), nor "not connected" (the old process
/// answering for a device it has handed over).
fn nats_pushes_during_a_hot_upgrade_reach_each_device_once() {
    let Some(nats) = Nats::start(true) else {
        return;
    };
    let mut watch = Watch::start(&nats);
    let server = Server::start_with_env(
        &nats,
        &["--server-id", "test-push-up", "--cores", "0"],
        &[("C1M_TEST_HANDOVER_FAIL", "slow")],
    );
    const DEVICES: usize = 600;
    let mut devices: Vec<_> = (0..DEVICES)
        .map(|i| server.ws(&format!("up-{i}")))
        .collect();
    watch.until("every connect", |s| connects(s) >= DEVICES);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async_nats::connect(nats.url())).unwrap();
    let request = |id: &str, body: String| -> String {
        rt.block_on(async {
            match client.request(format!("c1m.push.{id}"), body.into()).await {
                Ok(answer) => String::from_utf8_lossy(&answer.payload).into_owned(),
                // No router subscribed yet (at start), or a timeout.
                Err(e) => format!("request failed: {e}"),
            }
        })
    };
    // Presence is written just after the events: the last device's first.
    let deadline = Instant::now() + Duration::from_secs(5);
    let last = format!("up-{}", DEVICES - 1);
    while request(&last, "warm".into()) != "delivered" {
        assert!(
            Instant::now() < deadline,
            "presence of {last} never written"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        devices[DEVICES - 1].read().unwrap(),
        Message::Binary(b"warm".to_vec())
    );
    server.proc.signal(libc::SIGUSR2);
    // One push to every fifth device, spread over the handover (3 batches,
    // each taken 150 ms late).
    let mut answers = Vec::new();
    let began = Instant::now();
    for i in (0..DEVICES).step_by(5) {
        answers.push((i, request(&format!("up-{i}"), format!("p{i}"))));
        std::thread::sleep(Duration::from_millis(5));
    }
    let pushed_for = began.elapsed();
    let _new = upgraded(&server);
    // And after it: presence still names each device's slot in the old
    // process (nothing was published for them), the new one finds it.
    for i in [1, DEVICES / 2 + 1, DEVICES - 2] {
        answers.push((i, request(&format!("up-{i}"), format!("p{i}"))));
    }
    let wrong: Vec<_> = answers.iter().filter(|(_, a)| a != "delivered").collect();
    assert!(
        wrong.is_empty(),
        "answers other than delivered (pushed over {pushed_for:?}): {wrong:?}"
    );
    // Each device: its push, then (a ping sent only now) the pong: any
    // second copy of the push would come between them.
    let mut twice = Vec::new();
    for (i, _) in &answers {
        let ws = &mut devices[*i];
        assert_eq!(
            ws.read().unwrap(),
            Message::Binary(format!("p{i}").into_bytes()),
            "up-{i}"
        );
        ws.send(Message::Ping(b"after".to_vec())).unwrap();
        loop {
            match ws.read().unwrap() {
                Message::Pong(_) => break,
                other => twice.push((*i, other)),
            }
        }
    }
    assert!(
        twice.is_empty(),
        "pushes delivered more than once: {twice:?}"
    );
}

on_both_backends!(
    nats_pushes_during_a_hot_upgrade_reach_each_device_once,
    nats_a_hot_upgrade_publishes_one_event_and_nothing_for_the_devices_it_moves,
    nats_lifecycle_events_are_exact_and_in_order_per_device,
    nats_push_reaches_a_device_on_either_server_and_absent_ids_are_not_connected,
    nats_down_and_restarted_the_shards_keep_serving_and_publishing_resumes,
    nats_presence_is_written_again_when_the_broker_comes_back_empty,
    nats_exclusive_closes_the_older_connection_on_another_server,
    nats_exclusive_refuses_connect_events_from_too_far_ahead,
);
