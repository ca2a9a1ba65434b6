//! The client binary end to end against a real server (spawned by the client
//! itself), at small scale: expiry bounds, no false expiries, files that parse.
//! Every test runs on both I/O backends (`--io`, for the client and the
//! server alike): see [`on_both_backends`] at the end.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use c1m_client::{hgrm, timeline};
use serde_json::Value;

const CLIENT: &str = env!("CARGO_BIN_EXE_client");

/// The server binary beside the client's, built if this test run did not
/// build it (e.g. `cargo test -p c1m-client`).
fn server_bin() -> PathBuf {
    let bin = Path::new(CLIENT).with_file_name("server");
    if !bin.exists() {
        let release = Path::new(CLIENT)
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|p| p == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "c1m-server", "--bin", "server"]);
        if release {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().expect("cargo build").success(),
            "building the server failed"
        );
    }
    bin
}

/// A port per test (20 per test process: each test runs once per backend),
/// away from the server tests' ports.
fn port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    19_500 + (std::process::id() % 100) as u16 * 20 + NEXT.fetch_add(1, Ordering::Relaxed)
}

fn out_dir(name: &str, io: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("c1m-client-{name}-{io}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn summary(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary.json parses")
}

/// Sends `sig` to the child and waits (up to 20 s) for it to exit.
fn signal_and_wait(child: &mut std::process::Child, sig: i32) -> std::process::ExitStatus {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
    let stopped = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "signal {sig} ignored"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hist(dir: &Path, name: &str) -> hdrhistogram::Histogram<u64> {
    let f = std::fs::File::open(dir.join(format!("{name}.v2.hdr"))).expect("V2 histogram");
    hgrm::read_v2(f).expect("V2 histogram parses")
}

/// Runs the client against a server it spawns on `addr` with
/// `server_flags`, with the client flags `args` (split at spaces), both on
/// I/O backend `io`, writing to `dir`; returns its summary once it succeeded.
fn run_fleet(io: &str, addr: &str, server_flags: &str, args: &str, dir: &Path) -> Value {
    let out = Command::new(CLIENT)
        .args(["--spawn-server", "--server", addr, "--server-bin"])
        .arg(server_bin())
        .args([
            "--server-flags",
            &format!("--io {io} {server_flags}"),
            "--quiet",
        ])
        .args(["--io", io])
        .args(args.split_whitespace())
        .arg("--out")
        .arg(dir)
        .output()
        .expect("client runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    summary(dir)
}

/// `--reconnect-fraction`: a fifth of the devices open a second connection
/// with their own id while the first is open; the server closes every first
/// one with 4000, the client counts each takeover, and the server's
/// `replaced` equals the client's count. No false expiry.
fn reconnecting_devices_are_taken_over_and_counted_on_both_sides(io: &str) {
    let dir = out_dir("takeover", io);
    let addr = format!("127.0.0.1:{}", port());
    let s = run_fleet(
        io,
        &addr,
        "--timeout 5s --tick 100ms",
        "--conns 300 --heartbeat 1s --hold 2s --reconnect-fraction 0.2",
        &dir,
    );
    let f = &s["figures"];
    assert_eq!(f["established"], 300, "{f}");
    assert_eq!(f["reconnects"], 60, "{f}");
    assert_eq!(f["replaced"], 60, "{f}");
    assert_eq!(f["false_expiries"], 0, "{f}");
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap();
    let fin = log.lines().find(|l| l.starts_with("final ")).unwrap_or("");
    assert!(fin.contains(" replaced=60 "), "{fin}");
}

fn silent_devices_are_expired_in_bounds_and_heartbeating_ones_never(io: &str) {
    let dir = out_dir("expiry", io);
    let addr = format!("127.0.0.1:{}", port());
    let started = Instant::now();
    let out = Command::new(CLIENT)
        .args(["--spawn-server", "--server", &addr, "--server-bin"])
        .arg(server_bin())
        .args([
            "--server-flags",
            &format!("--io {io} --timeout 1s --tick 100ms --cores 0"),
        ])
        .args(["--io", io])
        .args(["--conns", "400", "--silent", "0.5", "--heartbeat", "250ms"])
        .args([
            "--hold",
            "3s",
            "--expiry-window",
            "3s",
            "--cores",
            "0-1",
            "--quiet",
        ])
        .args(["--ips", "127.0.0.2-127.0.0.5", "--id-prefix", "test-"])
        .arg("--out")
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .expect("client runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "client failed: {stdout}\n{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(stdout.contains("results: "), "{stdout}");

    let s = summary(&dir);
    let f = &s["figures"];
    let n = |k: &str| f[k].as_u64().unwrap_or_else(|| panic!("{k} in {f}"));
    assert_eq!(n("established"), 400, "{f}");
    assert_eq!(n("failed"), 0, "{f}");
    assert_eq!(n("expired"), 200, "every silent device expired: {f}");
    assert_eq!(n("false_expiries"), 0, "{f}");
    assert_eq!(n("expired_early"), 0, "{f}");
    assert_eq!(n("unexpired"), 0, "{f}");
    assert!(n("heartbeats") >= 200 * 8, "heartbeats went out: {f}");
    assert!(n("heartbeat_replies") * 10 >= n("heartbeats") * 9, "{f}");
    // Expired within the server's timeout + one tick + 2 s of slack.
    let max_lag_ms = f["expiry_lag_max_ms"].as_f64().unwrap();
    assert!(
        max_lag_ms <= 100.0 + 2000.0,
        "expiry lag {max_lag_ms} ms: {f}"
    );
    assert_eq!(s["config"]["server_timeout_s"].as_f64(), Some(1.0));
    // The backend asked for, or epoll where io_uring is unusable.
    let ran = s["config"]["io"].as_str();
    assert!(ran == Some(io) || ran == Some("epoll"), "{s}");
    assert!(s["machine"]["kernel"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));
    assert!(
        s["server"]["exit"]
            .as_str()
            .is_some_and(|e| e.contains("exit status: 0")),
        "{s}"
    );

    // Histogram counts are the connection counts.
    assert_eq!(hist(&dir, "connect").len(), 400);
    assert_eq!(hist(&dir, "expiry_lag").len(), 200);
    assert_eq!(hist(&dir, "heartbeat_rtt").len(), n("heartbeat_replies"));
    let text = std::fs::read_to_string(dir.join("connect.hgrm")).unwrap();
    let (rows, total) = hgrm::read_percentiles(&text).expect("connect.hgrm parses");
    assert_eq!(total, 400);
    assert_eq!(rows.last().map(|r| r.2), Some(400));

    // The timeline saw the fleet up and the expiries.
    let rows = timeline::read_csv(&std::fs::read_to_string(dir.join("timeline.csv")).unwrap())
        .expect("timeline.csv parses");
    assert!(rows.iter().any(|r| r.established == 400), "{rows:?}");
    assert_eq!(rows.iter().map(|r| r.connects_per_s).sum::<u64>(), 400);
    assert_eq!(rows.iter().map(|r| r.expiries_per_s).sum::<u64>(), 200);
    for svg in ["connect_rate.svg", "connect_latency.svg", "expiry.svg"] {
        let text = std::fs::read_to_string(dir.join(svg)).unwrap();
        assert!(text.starts_with("<svg"), "{svg}");
    }
    assert!(std::fs::read_to_string(dir.join("summary.md"))
        .unwrap()
        .contains("| Silent devices expired by the server | 200 |"));
    assert!(std::fs::read_to_string(dir.join("server.log"))
        .unwrap()
        .contains("final"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn sigint_closes_the_fleet_and_writes_what_it_has(io: &str) {
    let dir = out_dir("sigint", io);
    let addr = format!("127.0.0.1:{}", port());
    let mut child = Command::new(CLIENT)
        .args(["--spawn-server", "--server", &addr, "--server-bin"])
        .arg(server_bin())
        .args(["--server-flags", &format!("--io {io}"), "--io", io])
        .args([
            "--conns",
            "200",
            "--heartbeat",
            "1s",
            "--hold",
            "10m",
            "--quiet",
        ])
        .arg("--out")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("client starts");
    // The server starts and 200 devices connect well within this.
    std::thread::sleep(Duration::from_secs(3));
    let status = signal_and_wait(&mut child, libc::SIGINT);
    assert!(status.success(), "{status}");
    let s = summary(&dir);
    assert_eq!(s["figures"]["interrupted"], Value::Bool(true));
    assert_eq!(s["figures"]["established"].as_u64(), Some(200), "{s}");
    assert!(s["server"]["exit"]
        .as_str()
        .is_some_and(|e| e.contains("exit status: 0")));
    let _ = std::fs::remove_dir_all(&dir);
}

fn refuses_what_the_fd_limit_cannot_hold_in_one_sentence(io: &str) {
    let out = Command::new(CLIENT)
        .args(["--io", io])
        .args(["--conns", "5000000", "--server", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    // RLIMIT_NOFILE here; the port range on a host with the limit raised.
    let why = err.contains("RLIMIT_NOFILE") || err.contains("do not fit");
    assert!(why && err.lines().count() == 1, "{err}");
    let out = Command::new(CLIENT)
        .args(["--io", io])
        .args(["--ips", "127.0.0.9-127.0.0.2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
}

fn procs_workers_merge_into_one_run_and_stop_on_sigterm(io: &str) {
    let dir = out_dir("procs", io);
    let addr = format!("127.0.0.1:{}", port());
    let s = run_fleet(
        io,
        &addr,
        "--procs 3 --timeout 1s --tick 100ms",
        "--procs 3 --conns 600 --silent 0.5 --heartbeat 250ms --hold 2s",
        &dir,
    );
    let f = &s["figures"];
    let mut sum = [0u64; 4];
    for w in 0..3 {
        let wd = dir.join(format!("worker-{w}"));
        let ws = summary(&wd);
        for (i, k) in ["established", "expired", "heartbeats", "false_expiries"]
            .iter()
            .enumerate()
        {
            sum[i] += ws["figures"][k].as_u64().unwrap();
        }
        assert_eq!(ws["config"]["devices"].as_u64(), Some(200), "{ws}");
        assert_eq!(hist(&wd, "connect").len(), 200);
    }
    let n = |k: &str| f[k].as_u64().unwrap();
    assert_eq!(
        [
            n("established"),
            n("expired"),
            n("heartbeats"),
            n("false_expiries")
        ],
        sum
    );
    assert_eq!(
        (n("established"), n("expired"), n("false_expiries")),
        (600, 300, 0),
        "{f}"
    );
    assert_eq!(hist(&dir, "connect").len(), 600);
    assert_eq!(hist(&dir, "expiry_lag").len(), 300);
    // The server's workers, counted by its parent: every device upgraded.
    let fin = s["server"]["final"].as_str().unwrap().to_string();
    assert!(fin.contains("upgraded=600 "), "{fin}");

    // SIGTERM to a --procs client: every worker closes, writes, exits.
    let dir2 = out_dir("procs-term", io);
    let mut child = Command::new(CLIENT)
        .args(["--spawn-server", "--server", &addr, "--server-bin"])
        .arg(server_bin())
        .args(["--server-flags", &format!("--io {io}"), "--io", io])
        .args(["--procs", "3", "--conns", "300", "--hold", "10m", "--quiet"])
        .arg("--out")
        .arg(&dir2)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let workers = c1m_client::host::with_children(child.id());
    let status = signal_and_wait(&mut child, libc::SIGTERM);
    assert!(status.success(), "{status}");
    assert!(
        workers.len() >= 4,
        "parent, 3 workers and the server: {workers:?}"
    );
    for pid in &workers[1..] {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{pid} outlived the client"
        );
    }
    let s = summary(&dir2);
    assert_eq!(s["figures"]["interrupted"], Value::Bool(true));
    assert_eq!(s["figures"]["established"].as_u64(), Some(300), "{s}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

fn silent_after_lets_the_fraction_beat_first_then_expire(io: &str) {
    let dir = out_dir("silent-after", io);
    let addr = format!("127.0.0.1:{}", port());
    let s = run_fleet(
        io,
        &addr,
        "--timeout 1s --tick 100ms",
        "--conns 200 --silent 0.5 --silent-after 1500ms --heartbeat 250ms --hold 4s",
        &dir,
    );
    let f = &s["figures"];
    let n = |k: &str| f[k].as_u64().unwrap();
    assert_eq!(
        (n("established"), n("expired"), n("false_expiries")),
        (200, 100, 0),
        "{f}"
    );
    assert_eq!((n("expired_early"), n("unexpired")), (0, 0), "{f}");
    // The other half beats about 16 times each over the 4 s hold; the chosen
    // ones beat too, about 6 times each in the first 1.5 s.
    assert!(n("heartbeats") > 100 * 16 + 100 * 4, "{f}");
    // None expired before the hold's first 1.5 s + the 1 s timeout.
    let rows =
        timeline::read_csv(&std::fs::read_to_string(dir.join("timeline.csv")).unwrap()).unwrap();
    assert!(
        rows.iter()
            .filter(|r| r.t_s < 2.0)
            .all(|r| r.expiries_per_s == 0),
        "{rows:?}"
    );
    assert!(f["expiry_lag_max_ms"].as_f64().unwrap() <= 2100.0, "{f}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn ipv6_sources_and_echoed_text_heartbeats(io: &str) {
    // A host with IPv6 turned off cannot run this; say so rather than fail.
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this host has no IPv6 loopback (::1)");
        return;
    }
    let dir = out_dir("ipv6", io);
    let addr = format!("[::1]:{}", port());
    let s = run_fleet(
        io,
        &addr,
        "--echo --timeout 1s --tick 100ms",
        "--ips ::1 --conns 200 --silent 0.5 --heartbeat 250ms --heartbeat-kind text --hold 2s",
        &dir,
    );
    let f = &s["figures"];
    let n = |k: &str| f[k].as_u64().unwrap();
    assert_eq!(
        (n("established"), n("expired"), n("false_expiries")),
        (200, 100, 0),
        "{f}"
    );
    // With --echo every text heartbeat comes back and gives a round trip.
    assert!(n("heartbeats") >= 100 * 4, "{f}");
    assert!(n("heartbeat_replies") * 10 >= n("heartbeats") * 9, "{f}");
    assert_eq!(hist(&dir, "heartbeat_rtt").len(), n("heartbeat_replies"));
    let fin = s["server"]["final"].as_str().unwrap().to_string();
    assert!(fin.contains("upgraded=200 "), "{fin}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// --auth-secret-file on both sides: with the server's own file every
/// device signs a token the server accepts; with another secret every
/// attempt is answered 401 (and counted as bad tokens by the server).
fn signed_devices_connect_and_a_wrong_secret_gets_401(io: &str) {
    let secrets = out_dir("auth-secrets", io);
    std::fs::create_dir_all(&secrets).unwrap();
    let ours = secrets.join("ours");
    let theirs = secrets.join("theirs");
    std::fs::write(&ours, "client-test-secret-0123456789\n").unwrap();
    std::fs::write(&theirs, "another-test-secret-abcdefghij\n").unwrap();
    let (ours, theirs) = (ours.display(), theirs.display());

    let dir = out_dir("auth-same", io);
    let addr = format!("127.0.0.1:{}", port());
    let s = run_fleet(
        io,
        &addr,
        &format!("--timeout 5s --tick 100ms --auth-secret-file {ours}"),
        &format!("--conns 200 --heartbeat 250ms --hold 1s --auth-secret-file {ours}"),
        &dir,
    );
    let f = &s["figures"];
    assert_eq!(
        (f["established"].as_u64(), f["failed"].as_u64()),
        (Some(200), Some(0)),
        "{f}"
    );
    let fin = s["server"]["final"].as_str().unwrap().to_string();
    assert!(
        fin.contains("upgraded=200 ") && fin.contains("auth_bad=0 "),
        "{fin}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    let dir = out_dir("auth-other", io);
    let addr = format!("127.0.0.1:{}", port());
    let out = Command::new(CLIENT)
        .args(["--spawn-server", "--server", &addr, "--server-bin"])
        .arg(server_bin())
        .arg("--server-flags")
        .arg(format!(
            "--io {io} --timeout 5s --tick 100ms --auth-secret-file {theirs}"
        ))
        .args(["--io", io, "--quiet", "--conns", "50", "--hold", "1s"])
        .arg("--auth-secret-file")
        .arg(ours.to_string())
        .arg("--out")
        .arg(&dir)
        .output()
        .expect("client runs");
    assert_ne!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&dir);
    let f = &s["figures"];
    let n = |k: &str| f[k].as_u64().unwrap_or_else(|| panic!("{k} in {f}"));
    assert_eq!(n("established"), 0, "{f}");
    assert!(n("failed") >= 50, "{f}");
    assert_eq!(n("failed_http_status"), n("failed"), "{f}");
    assert_eq!(n("last_http_status"), 401, "{f}");
    let fin = s["server"]["final"].as_str().unwrap().to_string();
    assert!(fin.contains("upgraded=0 "), "{fin}");
    assert!(fin.contains(&format!("auth_bad={} ", n("failed"))), "{fin}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&secrets);
}

// ---- TLS: --tls/--tls-ca against a server with --tls-cert/--tls-key ----

/// A CA and a "localhost" certificate it signed, made at test time, in
/// `dir`: ca.pem, cert.pem, key.pem.
fn make_certs(dir: &Path, tag: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("c1m client test CA {tag}"),
    );
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

fn tls_server_flags(pki: &Path) -> String {
    format!(
        "--tls-cert {} --tls-key {}",
        pki.join("cert.pem").display(),
        pki.join("key.pem").display()
    )
}

/// wss devices upgrade, heartbeat and are expired exactly as ws ones;
/// first connections are full handshakes and second connections
/// (`--reconnect-fraction`) resume with a ticket, and with
/// `--tls-no-resume` none does.
fn tls_devices_upgrade_heartbeat_and_are_expired_like_ws_ones(io: &str) {
    let pki = out_dir("tls-pki", io);
    make_certs(&pki, "fleet");
    let ca = pki.join("ca.pem").display().to_string();
    let dir = out_dir("tls-fleet", io);
    let addr = format!("127.0.0.1:{}", port());
    let s = run_fleet(
        io,
        &addr,
        &format!("--timeout 1s --tick 100ms --cores 0 {}", tls_server_flags(&pki)),
        &format!("--conns 300 --silent 0.5 --heartbeat 250ms --hold 2s --expiry-window 3s --cores 0-1 --reconnect-fraction 0.2 --tls --tls-ca {ca}"),
        &dir,
    );
    let f = &s["figures"];
    let n = |k: &str| f[k].as_u64().unwrap_or_else(|| panic!("{k} in {f}"));
    assert_eq!((n("established"), n("failed")), (300, 0), "{f}");
    assert_eq!(n("expired"), 150, "every silent device expired: {f}");
    assert_eq!(
        (n("false_expiries"), n("expired_early"), n("unexpired")),
        (0, 0, 0),
        "{f}"
    );
    assert!(n("heartbeat_replies") * 10 >= n("heartbeats") * 9, "{f}");
    assert!(n("heartbeats") >= 150 * 6, "{f}");
    assert!(n("reconnects") > 0, "{f}");
    assert_eq!(n("replaced"), n("reconnects"), "{f}");
    assert_eq!(n("tls_handshakes"), 300 + n("reconnects"), "{f}");
    // A device's first connection has no ticket; its second resumes with
    // the one a first connection got (the pool's oldest).
    assert_eq!(n("tls_resumed"), n("reconnects"), "{f}");
    let fin = s["server"]["final"].as_str().unwrap().to_string();
    assert!(
        fin.contains(&format!(" tls_handshakes={} ", n("tls_handshakes"))),
        "{fin}"
    );
    assert!(
        fin.contains(&format!(" tls_resumed={} ", n("tls_resumed"))),
        "{fin}"
    );
    assert!(
        fin.contains(" tls_failed=0 ") && fin.contains(" expired=150 "),
        "{fin}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    let dir = out_dir("tls-noresume", io);
    let addr = format!("127.0.0.1:{}", port());
    let s = run_fleet(
        io,
        &addr,
        &format!("--timeout 5s --tick 100ms {}", tls_server_flags(&pki)),
        &format!("--conns 100 --heartbeat 250ms --hold 1s --reconnect-fraction 0.5 --tls --tls-ca {ca} --tls-no-resume"),
        &dir,
    );
    let f = &s["figures"];
    assert_eq!(f["established"], 100, "{f}");
    assert_eq!(f["tls_resumed"], 0, "{f}");
    assert_eq!(
        f["tls_handshakes"].as_u64(),
        Some(100 + f["reconnects"].as_u64().unwrap()),
        "{f}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&pki);
}

/// The client trusts another CA: every attempt fails its handshake,
/// counted as failed_tls by the client and tls_failed by the server (the
/// client's alert reaches it); a plaintext client on the TLS port gets 400
/// (plain_on_tls), a TLS client on a plaintext port fails (tls_on_plain).
fn tls_mismatches_fail_every_attempt_counted_on_both_sides(io: &str) {
    let pki = out_dir("tls-pki-mismatch", io);
    make_certs(&pki, "served");
    let other = pki.join("other");
    make_certs(&other, "other");
    let run = |name: &str, server_flags: String, client_flags: String| -> (Value, String) {
        let dir = out_dir(name, io);
        let addr = format!("127.0.0.1:{}", port());
        let out = Command::new(CLIENT)
            .args(["--spawn-server", "--server", &addr, "--server-bin"])
            .arg(server_bin())
            .arg("--server-flags")
            .arg(format!(
                "--io {io} --timeout 5s --tick 100ms {server_flags}"
            ))
            .args(["--io", io, "--quiet", "--conns", "50", "--hold", "500ms"])
            .args(client_flags.split_whitespace())
            .arg("--out")
            .arg(&dir)
            .output()
            .expect("client runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_ne!(out.status.code(), Some(1), "{stderr}");
        let s = summary(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        (s, stderr)
    };
    let ca = |d: &Path| d.join("ca.pem").display().to_string();

    let (s, stderr) = run(
        "tls-badca",
        tls_server_flags(&pki),
        format!("--tls --tls-ca {}", ca(&other)),
    );
    let f = &s["figures"];
    assert_eq!(
        (f["established"].as_u64(), f["failed_tls"].as_u64()),
        (Some(0), Some(50)),
        "{f}"
    );
    assert!(
        stderr.contains("a TLS handshake failed (invalid peer certificate"),
        "{stderr}"
    );
    let fin = s["server"]["final"].as_str().unwrap().to_string();
    assert!(
        fin.contains(" tls_failed=50 ") && fin.contains(" upgraded=0 "),
        "{fin}"
    );

    let (s, _) = run("tls-plain-client", tls_server_flags(&pki), String::new());
    let f = &s["figures"];
    assert_eq!(
        (
            f["failed_http_status"].as_u64(),
            f["last_http_status"].as_u64()
        ),
        (Some(50), Some(400)),
        "{f}"
    );
    let fin = s["server"]["final"].as_str().unwrap().to_string();
    assert!(fin.contains(" plain_on_tls=50 "), "{fin}");

    let (s, _) = run(
        "tls-plain-server",
        String::new(),
        format!("--tls --tls-ca {}", ca(&pki)),
    );
    let f = &s["figures"];
    assert_eq!(
        (f["established"].as_u64(), f["failed"].as_u64()),
        (Some(0), Some(50)),
        "{f}"
    );
    let fin = s["server"]["final"].as_str().unwrap().to_string();
    assert!(
        fin.contains(" tls_on_plain=50 ") && fin.contains(" rejected=0 "),
        "{fin}"
    );
    let _ = std::fs::remove_dir_all(&pki);
}

/// --tls without --tls-ca, or --tls-ca without --tls: one sentence, exit 1.
fn tls_flags_that_do_not_fit_are_one_sentence(io: &str) {
    for (flags, says) in [
        (vec!["--tls"], "--tls needs --tls-ca"),
        (
            vec!["--tls-ca", "/nonexistent/ca.pem"],
            "--tls-ca is for --tls",
        ),
        (
            vec!["--tls", "--tls-ca", "/nonexistent/ca.pem"],
            "cannot read --tls-ca /nonexistent/ca.pem",
        ),
    ] {
        let out = Command::new(CLIENT)
            .args([
                "--io",
                io,
                "--conns",
                "1",
                "--quiet",
                "--server",
                "127.0.0.1:1",
            ])
            .args(&flags)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}

/// Makes each test above, a function of the backend, a test per backend:
/// `epoll::name` and `uring::name`.
/// `--reconnect-storm`: every device resets its connection at once and
/// comes back; against a server whose admission budget (200/s, 503) is
/// far below the storm, attempts are refused and retried after backoff,
/// and every device is back before the hold ends. The client's 503s are
/// the server's refusals; no heartbeating device is closed by the server.
fn a_reconnect_storm_brings_every_device_back_with_backoff(io: &str) {
    let dir = out_dir("storm", io);
    let addr = format!("127.0.0.1:{}", port());
    let s = run_fleet(
        io,
        &addr,
        "--timeout 5s --tick 100ms --max-upgrades-per-sec 200 --upgrade-excess 503",
        "--conns 200 --rate 120 --heartbeat 1s --hold 5s --reconnect-storm 500ms \
         --backoff-base 50ms --backoff-cap 1s",
        &dir,
    );
    let f = &s["figures"];
    assert_eq!(
        f["established"], 200,
        "the ramp stays under the budget: {f}"
    );
    assert_eq!(f["failed"], 0, "{f}");
    assert_eq!(f["storm_devices"], 200, "{f}");
    assert_eq!(f["storm_back"], 200, "{f}");
    assert_eq!(f["storm_unrecovered"], 0, "{f}");
    let n = |k: &str| f[k].as_u64().unwrap_or_else(|| panic!("{k}: {f}"));
    // Refused attempts backed off and tried again.
    assert!(n("storm_failed_503") > 0, "{f}");
    let failed: u64 = ["503", "reset", "timeout", "refused", "other"]
        .iter()
        .map(|c| n(&format!("storm_failed_{c}")))
        .sum();
    assert_eq!(n("storm_attempts"), 200 + failed, "{f}");
    assert_eq!(f["false_expiries"], 0, "{f}");
    assert!(f["storm_time_to_100pct_s"].as_f64().is_some(), "{f}");
    assert!(f["storm_time_to_99pct_s"].as_f64() <= f["storm_time_to_100pct_s"].as_f64());
    assert_eq!(hist(&dir, "reconnect_back").len(), 200);
    assert_eq!(hist(&dir, "reconnect_connect").len(), 200);
    // The server's count of its refusals is the devices' count of 503s.
    let last = s["server"]["final"]
        .as_str()
        .expect("the server's final line");
    let refused: u64 = last
        .split_whitespace()
        .find_map(|w| w.strip_prefix("admission_refused="))
        .expect("admission_refused")
        .parse()
        .unwrap();
    assert_eq!(refused, n("storm_failed_503"), "{last}");
    let md = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    assert!(md.contains("time until 99% / 100% back"), "{md}");
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            $(#[test]
            fn $name() {
                super::$name("epoll")
            })*
        }
        mod uring {
            $(#[test]
            fn $name() {
                super::$name("uring")
            })*
        }
    };
}

on_both_backends!(
    a_reconnect_storm_brings_every_device_back_with_backoff,
    reconnecting_devices_are_taken_over_and_counted_on_both_sides,
    silent_devices_are_expired_in_bounds_and_heartbeating_ones_never,
    sigint_closes_the_fleet_and_writes_what_it_has,
    refuses_what_the_fd_limit_cannot_hold_in_one_sentence,
    procs_workers_merge_into_one_run_and_stop_on_sigterm,
    silent_after_lets_the_fraction_beat_first_then_expire,
    ipv6_sources_and_echoed_text_heartbeats,
    signed_devices_connect_and_a_wrong_secret_gets_401,
    tls_devices_upgrade_heartbeat_and_are_expired_like_ws_ones,
    tls_mismatches_fail_every_attempt_counted_on_both_sides,
    tls_flags_that_do_not_fit_are_one_sentence,
);
