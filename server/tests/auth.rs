//! Device auth (--auth-secret-file): 401s by reason, tokens in the header
//! or the query, rotation, `c1m token`, unusable files, --procs workers.

mod c1m_bin;
mod support;

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use tungstenite::Message;

use support::*;

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
    let expiry = c1m_io::host::unix_secs().saturating_add_signed(ttl_s);
    keys.sign(id, expiry).to_string()
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
    let in_30d = c1m_io::host::unix_secs() + 30 * 86_400;
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

on_both_backends!(
    bad_missing_and_expired_tokens_get_401_counted_by_reason,
    good_tokens_upgrade_in_the_header_or_the_query,
    both_secrets_are_accepted_while_rotating,
    c1m_token_mints_a_token_the_server_accepts,
    an_unusable_secret_file_stops_the_server_with_one_clear_sentence,
    procs_workers_load_the_secret_file_themselves,
);
