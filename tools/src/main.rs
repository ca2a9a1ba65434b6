//! `c1m`: the operators' tools beside the server.
//!
//! - `c1m token`: a device token for a server's --auth-secret-file.
//! - `c1m push`: a message to a device (or a load of them) through NATS.
//! - `c1m watch-events`: counts the fleet's lifecycle events on NATS.
//! - `c1m upgrade`: asks a server for a hot upgrade (`POST /upgrade` on its
//!   admin port; the same as SIGUSR2).

mod events;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use argh::FromArgs;
use c1m::events::publisher;
use c1m_io::host::parse_duration;
use c1m_proto::auth::{self, Keys};
use c1m_proto::handshake;

/// c1m's operator tools: device tokens, pushes to devices and the fleet's
/// lifecycle events, for a c1m server (`server`).
#[derive(FromArgs)]
struct Cli {
    #[argh(subcommand)]
    command: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Token(TokenArgs),
    Push(PushArgs),
    WatchEvents(WatchArgs),
    Upgrade(UpgradeArgs),
}

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    let result = match cli.command {
        Command::Token(a) => token(a),
        Command::Push(a) => push(a),
        Command::WatchEvents(a) => watch_events(a),
        Command::Upgrade(a) => upgrade(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("c1m: {e}");
            ExitCode::FAILURE
        }
    }
}

/// asks a running server for a hot upgrade: it starts the binary now at
/// its path with the same arguments and hands it every connection
/// (docs/upgrade.md). The server's log says how it went.
#[derive(FromArgs)]
#[argh(subcommand, name = "upgrade")]
struct UpgradeArgs {
    /// the server's admin address (its --admin), e.g. 127.0.0.1:9100
    #[argh(option)]
    admin: std::net::SocketAddr,
    /// a file holding the admin port's bearer token, if it wants one
    #[argh(option)]
    admin_token_file: Option<PathBuf>,
}

fn upgrade(a: UpgradeArgs) -> Result<(), String> {
    use std::io::{Read, Write};
    let auth = match &a.admin_token_file {
        Some(p) => {
            let t = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            format!(
                "Authorization: Bearer {}\r\n",
                t.lines().next().unwrap_or("").trim()
            )
        }
        None => String::new(),
    };
    let mut s = std::net::TcpStream::connect_timeout(&a.admin, Duration::from_secs(5))
        .map_err(|e| format!("cannot reach the admin port {}: {e}", a.admin))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "POST /upgrade HTTP/1.1\r\nHost: {}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n",
        a.admin
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("cannot ask {}: {e}", a.admin))?;
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let status = answer.split(' ').nth(1).unwrap_or("none");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    if status == "202" {
        println!("{body}");
        Ok(())
    } else {
        Err(format!("the server answered {status}: {body}"))
    }
}

/// prints a token for one device, to stdout, for a server
/// started with the same --auth-secret-file.
#[derive(FromArgs)]
#[argh(subcommand, name = "token")]
struct TokenArgs {
    /// the device's id
    #[argh(option)]
    id: String,
    /// how long the token is good for, e.g. 30d, 12h, 90m or 3600s
    #[argh(option)]
    ttl: String,
    /// the secrets file the server loads (the first secret signs)
    #[argh(option)]
    auth_secret_file: Option<PathBuf>,
}

/// counts lifecycle events from NATS, by kind and
/// reason, and prints one totals line per interval and a `final` one.
#[derive(FromArgs)]
#[argh(subcommand, name = "watch-events")]
struct WatchArgs {
    /// the NATS server, e.g. nats://127.0.0.1:4222
    #[argh(option)]
    nats: String,
    /// subject prefix the servers use (default c1m)
    #[argh(option, default = "\"c1m\".into()")]
    nats_prefix: String,
    /// NATS credentials file (.creds)
    #[argh(option)]
    nats_creds: Option<PathBuf>,
    /// file with the NATS user and password (two lines)
    #[argh(option)]
    nats_user_file: Option<PathBuf>,
    /// file with a NATS token
    #[argh(option)]
    nats_token_file: Option<PathBuf>,
    /// how long to watch (default 1h)
    #[argh(
        option,
        default = "Duration::from_secs(3600)",
        from_str_fn(parse_duration)
    )]
    duration: Duration,
    /// interval of the totals line (default 1s)
    #[argh(
        option,
        default = "Duration::from_secs(1)",
        from_str_fn(parse_duration)
    )]
    every: Duration,
    /// also print every event's JSON, one per line
    #[argh(switch)]
    print: bool,
}

/// sends a message to a device through NATS, to whichever
/// server holds it; with --wait, prints the answer (delivered / not connected).
#[derive(FromArgs)]
#[argh(subcommand, name = "push")]
struct PushArgs {
    /// the NATS server, e.g. nats://127.0.0.1:4222
    #[argh(option)]
    nats: String,
    /// subject prefix the servers use (default c1m)
    #[argh(option, default = "\"c1m\".into()")]
    nats_prefix: String,
    /// NATS credentials file (.creds)
    #[argh(option)]
    nats_creds: Option<PathBuf>,
    /// file with the NATS user and password (two lines)
    #[argh(option)]
    nats_user_file: Option<PathBuf>,
    /// file with a NATS token
    #[argh(option)]
    nats_token_file: Option<PathBuf>,
    /// the device (repeat for several)
    #[argh(option)]
    id: Vec<String>,
    /// a file of device ids, one per line (pushes go to ids picked from it)
    #[argh(option)]
    ids_file: Option<PathBuf>,
    /// send this text (a text message)
    #[argh(option)]
    text: Option<String>,
    /// send this file's bytes (a binary message)
    #[argh(option)]
    binary_file: Option<PathBuf>,
    /// pushes to send in all, spread over the ids (default: one per id)
    #[argh(option)]
    count: Option<usize>,
    /// pushes in flight at once with --wait (default 256)
    #[argh(option, default = "256")]
    concurrency: usize,
    /// ask for a reply and print it (delivered / not connected)
    #[argh(switch)]
    wait: bool,
    /// how long to wait for each reply (default 3s)
    #[argh(
        option,
        default = "Duration::from_secs(3)",
        from_str_fn(parse_duration)
    )]
    timeout: Duration,
}

fn nats_auth(
    creds: Option<PathBuf>,
    user_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
) -> publisher::Auth {
    publisher::Auth {
        creds,
        user_file,
        token_file,
    }
}

fn watch_events(a: WatchArgs) -> Result<(), String> {
    let auth = nats_auth(a.nats_creds, a.nats_user_file, a.nats_token_file);
    events::watch(&a.nats, &auth, &a.nats_prefix, a.duration, a.every, a.print)
}

fn push(a: PushArgs) -> Result<(), String> {
    let auth = nats_auth(a.nats_creds, a.nats_user_file, a.nats_token_file);
    let mut ids = a.id;
    if let Some(path) = &a.ids_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --ids-file {}: {e}", path.display()))?;
        ids.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    let body = match (a.text, a.binary_file) {
        (Some(t), None) => events::Push {
            text: true,
            payload: t.into_bytes().into(),
        },
        (None, Some(path)) => events::Push {
            text: false,
            payload: std::fs::read(&path)
                .map_err(|e| format!("cannot read --binary-file {}: {e}", path.display()))?
                .into(),
        },
        _ => return Err("push needs exactly one of --text TEXT or --binary-file FILE".into()),
    };
    let count = a.count.unwrap_or(ids.len());
    events::push(
        &a.nats,
        &auth,
        &a.nats_prefix,
        &ids,
        count,
        a.concurrency,
        body,
        a.wait,
        a.timeout,
    )
}

/// Prints the token of `--id` for `--ttl` from now.
fn token(args: TokenArgs) -> Result<(), String> {
    let Some(path) = args.auth_secret_file else {
        return Err("c1m token needs --auth-secret-file PATH, the file the server loads".into());
    };
    if !handshake::valid_id(&args.id) {
        return Err(format!(
            "--id {:?} is not a device id: 1 to {} of [0-9A-Za-z:._-]",
            args.id,
            handshake::MAX_ID_LEN
        ));
    }
    let ttl = auth::parse_ttl(&args.ttl)?;
    let keys = Keys::load(&path)?;
    let expiry = c1m_io::host::unix_secs().saturating_add(ttl);
    // Only the token on stdout, for scripts; it is a credential: nothing
    // else prints it.
    println!("{}", keys.sign(&args.id, expiry));
    eprintln!(
        "c1m: token for {} valid until unix time {expiry} ({}s from now)",
        args.id, ttl
    );
    Ok(())
}
