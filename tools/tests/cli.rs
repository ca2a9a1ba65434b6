//! The `c1m` binary's subcommands: their names and flags, and a token that
//! the library's verifier accepts. (The NATS subcommands against a real
//! broker and servers are in server/tests/nats.rs, token against a real
//! server in server/tests/auth.rs.)

use std::process::Command;

const C1M: &str = env!("CARGO_BIN_EXE_c1m");

fn help(args: &[&str]) -> String {
    let out = Command::new(C1M).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_subcommands_are_listed_with_their_flags() {
    let top = help(&[]);
    for cmd in ["token", "push", "watch-events"] {
        assert!(top.contains(cmd), "{top}");
    }
    let token = help(&["token"]);
    for flag in ["--id", "--ttl", "--auth-secret-file"] {
        assert!(token.contains(flag), "{token}");
    }
    let push = help(&["push"]);
    for flag in [
        "--nats",
        "--nats-prefix",
        "--nats-creds",
        "--nats-user-file",
        "--nats-token-file",
        "--id",
        "--ids-file",
        "--text",
        "--binary-file",
        "--count",
        "--concurrency",
        "--wait",
        "--timeout",
    ] {
        assert!(push.contains(flag), "{push}");
    }
    let watch = help(&["watch-events"]);
    for flag in ["--nats", "--duration", "--every", "--print"] {
        assert!(watch.contains(flag), "{watch}");
    }
}

#[test]
fn a_token_is_printed_alone_and_verifies() {
    let path = std::env::temp_dir().join(format!("c1m-tools-{}.secret", std::process::id()));
    let secret = "tools-test-secret-0123456789";
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    let out = Command::new(C1M)
        .args([
            "token",
            "--id",
            "dev-t",
            "--ttl",
            "1h",
            "--auth-secret-file",
        ])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let keys = c1m_proto::auth::Keys::parse(secret.as_bytes(), "test").unwrap();
    let now = c1m_io::host::unix_secs();
    assert!(
        keys.verify("dev-t", Some(stdout.trim()), now).is_ok(),
        "{stdout}"
    );
    assert!(keys.verify("dev-u", Some(stdout.trim()), now).is_err());
    let (expiry, _) = stdout.trim().split_once('.').unwrap();
    let expiry: u64 = expiry.parse().unwrap();
    assert!(expiry.abs_diff(now + 3600) < 60, "{stdout}");
    let bad = Command::new(C1M)
        .args(["token", "--id", "not a device id", "--ttl", "1h"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
