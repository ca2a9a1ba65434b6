//! `--admin ADDR`: the operators' HTTP listener, on an address of its own
//! and never on the device port.
//!
//! - `GET /metrics`: Prometheus text exposition (format 0.0.4) of the
//!   counters and gauges in the shards' latest snapshots;
//! - `GET /healthz`: 200 `ok` while the server runs, 503 `stopping` once it
//!   drains;
//! - `GET /devices/<id>`: where the device is connected (JSON), or 404;
//!   `POST /devices/<id>/messages`: the body goes to the device as one
//!   message (text for a `text/*` Content-Type, else binary), 404 when it
//!   is not connected, 413 over `--max-message`; `DELETE /devices/<id>`:
//!   Close 4001 "kicked". These ask the id's owner shard by message and
//!   wait for its answer on a channel of their own (2 s at most): no shard
//!   ever waits on this thread;
//! - any other path 404, any other method 405.
//!
//! The port belongs to operators ([`Access`]):
//! - with `--admin-token-file`, every request but `/healthz` needs
//!   `Authorization: Bearer <token>` (compared in constant time), else 401;
//! - a request with an `Origin` header (a browser's, from whatever page
//!   the operator has open) or whose `Host` is not the admin address (DNS
//!   rebinding) gets 403 before anything else is looked at;
//! - each request has [`REQUEST_TIMEOUT`] to arrive whole (head and body)
//!   and [`HANDLERS`] are served at once, so a client that never sends its
//!   body costs one handler for a few seconds, never `/metrics` or
//!   `/healthz` for good. More than [`QUEUED`] waiting get 503 at once.
//!
//! HTTP here is a few dozen lines over httparse (the parser the device port
//! already uses), one request per connection (`Connection: close`): the
//! port sees a scrape a second, and tiny_http, used before, had no read
//! timeouts and served every request from one thread. The exposition
//! format is a few lines of text, written here ([`render`]): the
//! `prometheus` crate would bring its own registry and atomics, while the
//! numbers already exist, as the snapshots the shards send by message.
//!
//! Shards never touch this module. The thread that collects their snapshots
//! (the main thread, or the `--procs` parent) [`Admin::publish`]es copies
//! into a mutex only it and the admin threads share.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use c1m_proto::device_id::DeviceId;
use c1m_proto::handshake::{percent_decode, valid_id};

use crate::directory::mailbox::{Answer, Ask, DeviceInfo, Mail, Peer, Reply};
use crate::directory::registry;
use crate::directory::switch::Switch;
use crate::stats::{Counters, Prom, Snapshot, Stat, FAMILIES};

/// The Content-Type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Requests served at once (each on a thread of its own).
pub const HANDLERS: usize = 4;
/// Accepted connections waiting for a handler at most; past it, 503.
pub const QUEUED: usize = 64;
/// How long a request has to arrive whole, head and body.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;
/// How long sending an answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the admin threads serve: the latest published view.
#[derive(Debug, Default, Clone)]
struct View {
    /// Per-shard (or per-worker) snapshots: `open` and `sockets` are the
    /// gauges.
    snaps: Vec<Snapshot>,
    /// The counters over everything, dead `--procs` workers included.
    totals: Counters,
    stopping: bool,
}

/// The operator's bearer token (`--admin-token-file`), kept as its
/// SHA-256 digest: a presented token is hashed and the digests compared
/// in constant time, so neither the content nor the length of the token
/// shows in how long a refusal takes.
#[derive(Clone)]
pub struct Token([u8; 32]);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Tokens shorter than this are refused at start-up.
pub const MIN_TOKEN_LEN: usize = 16;

impl Token {
    /// The token on the first line of `path`. Errors name the file, never
    /// its content.
    pub fn load(path: &Path) -> Result<Token, String> {
        let text = std::fs::read(path)
            .map_err(|e| format!("cannot read --admin-token-file {}: {e}", path.display()))?;
        let line = text.split(|&b| b == b'\n').next().unwrap_or(&[]);
        Token::new(line.trim_ascii()).map_err(|why| {
            format!(
                "--admin-token-file {}: the token on its first line {why}",
                path.display()
            )
        })
    }

    fn new(token: &[u8]) -> Result<Token, String> {
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!("is shorter than {MIN_TOKEN_LEN} bytes"));
        }
        // What an Authorization header can carry (RFC 6750 b64token, and
        // more): visible ASCII, no spaces.
        if !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err("must be visible ASCII with no spaces".into());
        }
        Ok(Token(digest(token)))
    }

    /// Whether `presented` is the token, in time independent of both.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let d = digest(presented);
        let diff = self
            .0
            .iter()
            .zip(d.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        // black_box: the compiler must not turn the fold into an early exit.
        std::hint::black_box(diff) == 0
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// Who may use the admin port.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// `--admin-token-file`: None lets any local request in (loopback only:
    /// [`Access::check_bind`]).
    pub token: Option<Token>,
    /// `--admin-host`: names (besides the address itself) that a `Host`
    /// header may carry, e.g. the name Prometheus scrapes the host by.
    pub hosts: Vec<String>,
}

impl Access {
    /// Refuses, in one sentence, an admin address other than loopback
    /// without a token: anyone who could reach it could push to and kick
    /// any device.
    pub fn check_bind(&self, addr: SocketAddr) -> Result<(), String> {
        if self.token.is_none() && !addr.ip().is_loopback() {
            return Err(format!(
                "--admin {addr} is not a loopback address, so anyone who can reach it could push to and kick devices: give it --admin-token-file FILE (a bearer token of at least {MIN_TOKEN_LEN} bytes) or bind it to 127.0.0.1"
            ));
        }
        Ok(())
    }
}

/// Whether a request's `Host` value names the admin listener at `addr`:
/// its port, and its address, `localhost` (when it listens on loopback),
/// any address of this host's (when it listens on all of them) or a name
/// given with `--admin-host`. Anything else is a page that resolved its
/// own name to this address (DNS rebinding).
pub fn host_allowed(host: &str, addr: SocketAddr, names: &[String]) -> bool {
    let host = host.trim();
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, "")) => (ip, 80),
            Some((ip, port)) => match port.strip_prefix(':').and_then(|p| p.parse().ok()) {
                Some(port) => (ip, port),
                None => return false,
            },
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) => match port.parse::<u16>() {
                Ok(port) => (name, port),
                Err(_) => return false,
            },
            None => (host, 80),
        },
    };
    if port != addr.port() || name.is_empty() {
        return false;
    }
    let listening = addr.ip();
    match name.parse::<IpAddr>() {
        Ok(ip) => {
            ip == listening
                || listening.is_unspecified()
                || (listening.is_loopback() && ip.is_loopback())
        }
        Err(_) => {
            (name.eq_ignore_ascii_case("localhost")
                && (listening.is_loopback() || listening.is_unspecified()))
                || names.iter().any(|n| n.eq_ignore_ascii_case(name))
        }
    }
}

/// The running admin listener; dropping it stops serving.
pub struct Admin {
    view: Arc<Mutex<View>>,
    stop: Arc<AtomicBool>,
    /// Set while a hot upgrade's new process serves the port: this one
    /// accepts nothing more (the listening socket is one, shared).
    handed: Arc<AtomicBool>,
    addr: SocketAddr,
    /// A duplicate of the listener, for a hot upgrade to hand over.
    listener: TcpListener,
}

/// What every handler thread shares.
struct Ctx {
    view: Arc<Mutex<View>>,
    /// [`Admin::handed_switch`].
    handed: Arc<AtomicBool>,
    group: &'static str,
    devices: Option<Devices>,
    access: Access,
    addr: SocketAddr,
}

impl Admin {
    /// Binds `addr` and serves it from threads of its own. `group` names
    /// the gauges' label: `shard`, or `worker` in a `--procs` parent (which
    /// sees only its workers' sums).
    pub fn start(
        addr: SocketAddr,
        group: &'static str,
        devices: Option<Devices>,
        access: Access,
    ) -> Result<Admin, String> {
        access.check_bind(addr)?;
        let listener =
            TcpListener::bind(addr).map_err(|e| format!("cannot serve --admin on {addr}: {e}"))?;
        Admin::start_on(listener, group, devices, access)
    }

    /// [`Admin::start`] on a listener already bound (a hot upgrade's, from
    /// the old process).
    pub fn start_on(
        listener: TcpListener,
        group: &'static str,
        devices: Option<Devices>,
        access: Access,
    ) -> Result<Admin, String> {
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot serve --admin: {e}"))?;
        let own = listener
            .try_clone()
            .map_err(|e| format!("cannot serve --admin on {addr}: {e}"))?;
        let view = Arc::new(Mutex::new(View::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let handed = Arc::new(AtomicBool::new(false));
        let ctx = Arc::new(Ctx {
            view: view.clone(),
            handed: handed.clone(),
            group,
            devices,
            access,
            addr,
        });
        let (tx, rx) = mpsc::sync_channel::<TcpStream>(QUEUED);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..HANDLERS {
            let (ctx, rx) = (ctx.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("admin-{i}"))
                .spawn(move || handle_all(&rx, &ctx))
                .map_err(|e| format!("cannot start an admin thread: {e}"))?;
        }
        let (s, h) = (stop.clone(), handed.clone());
        std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || accept_all(&listener, &tx, &s, &h))
            .map_err(|e| format!("cannot start the admin thread: {e}"))?;
        Ok(Admin {
            view,
            stop,
            handed,
            addr,
            listener: own,
        })
    }

    /// A duplicate of the listening socket (a hot upgrade hands it over).
    pub fn listener(&self) -> std::io::Result<TcpListener> {
        self.listener.try_clone()
    }

    /// The switch a hot upgrade sets once the new process serves the
    /// port (and clears if the handover fails): set, this process stops
    /// accepting on it within [`ACCEPT_POLL`], so that every request goes
    /// to the process that now holds the devices (asked here, a push to a
    /// device already moved would be answered "not connected").
    pub fn handed_switch(&self) -> Arc<AtomicBool> {
        self.handed.clone()
    }

    /// The address served (the port chosen, if `addr` asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the view: `snaps` for the gauges, `totals` the counters.
    pub fn publish(&self, snaps: &[Snapshot], totals: &Counters) {
        let mut v = lock(&self.view);
        v.snaps.clear();
        v.snaps.extend_from_slice(snaps);
        v.totals = *totals;
    }

    /// From now on /healthz answers 503: the server is draining.
    pub fn stopping(&self) {
        lock(&self.view).stopping = true;
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accepting thread: it sees the flag and ends, and the
        // handlers end when its sending end is gone.
        let ip = match self.addr.ip() {
            IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let _ = TcpStream::connect_timeout(
            &SocketAddr::new(ip, self.addr.port()),
            Duration::from_secs(1),
        );
    }
}

/// How long accepting pauses after a failure that is not one connection's
/// (out of descriptors or memory): never a tight loop, never the end.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How often the accepting thread looks at the handover switch.
pub const ACCEPT_POLL: Duration = Duration::from_millis(100);

fn accept_all(
    listener: &TcpListener,
    tx: &SyncSender<TcpStream>,
    stop: &AtomicBool,
    handed: &AtomicBool,
) {
    loop {
        // Wait for a connection a while at a time, so that a hot upgrade's
        // switch is seen (the socket's blocking mode is shared with the new
        // process, so it cannot be made non-blocking here).
        if handed.load(Ordering::SeqCst) {
            std::thread::sleep(ACCEPT_POLL);
            if stop.load(Ordering::SeqCst) {
                return;
            }
            continue;
        }
        if !readable(listener, ACCEPT_POLL) && !stop.load(Ordering::SeqCst) {
            continue;
        }
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) =>
            {
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
            Err(_) => continue,
        };
        match tx.try_send(stream) {
            Ok(()) => {}
            Err(TrySendError::Full(mut s)) => {
                // Every handler is busy and the queue is full: say so
                // without waiting on this client.
                let _ = s.set_nonblocking(true);
                let _ = s.write_all(&answer(
                    503,
                    "text/plain",
                    "busy: too many admin requests at once\n",
                    &[],
                ));
            }
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

/// The listener has a connection to accept within `wait` (or poll failed:
/// then the accept decides).
fn readable(listener: &TcpListener, wait: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack, for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, wait.as_millis() as libc::c_int) };
    n != 0
}

fn handle_all(rx: &Mutex<Receiver<TcpStream>>, ctx: &Ctx) {
    loop {
        // The lock is held only while waiting for the next connection.
        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(stream) = next else { return };
        serve_one(stream, ctx);
    }
}

/// The view, even if an admin thread panicked holding it (a copy of plain
/// numbers cannot be left half-made in a way that matters).
fn lock(view: &Mutex<View>) -> std::sync::MutexGuard<'_, View> {
    view.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the device endpoints need: a way to every shard, and the largest
/// message a device accepts.
pub struct Devices {
    pub route: Route,
    pub max_message: usize,
}

/// How the admin thread reaches the shards: in this process, or (in a
/// `--procs` parent) through the switch to the workers.
pub enum Route {
    Local(Vec<Peer>),
    Workers(Switch),
}

impl Devices {
    /// Asks the owner of `id`; None if no answer came in time.
    fn ask(&self, id: &str, ask: Ask) -> Option<Answer> {
        let id = DeviceId::new(id);
        match &self.route {
            Route::Local(peers) => {
                let (tx, rx) = std::sync::mpsc::channel();
                let owner = registry::owner(id.as_str(), peers.len());
                peers[owner].send_now(Mail::Ask {
                    id,
                    ask,
                    at: None,
                    reply: Reply::Local(tx),
                });
                rx.recv_timeout(ASK_TIMEOUT).ok()
            }
            Route::Workers(switch) => switch.ask(id, ask, ASK_TIMEOUT),
        }
    }

    /// (worker, shard within it) of a shard numbered over the server.
    fn place(&self, shard: u32) -> (usize, u32) {
        match &self.route {
            Route::Local(_) => (0, shard),
            Route::Workers(switch) => switch.place(shard).unwrap_or((0, shard)),
        }
    }
}

/// How long an operator's request waits for the shards' answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// One request as read: what the routes look at.
struct Request {
    method: String,
    path: String,
    text: bool,
    body: Vec<u8>,
}

/// An answer: status, Content-Type, body, extra headers.
type Out = (u16, &'static str, String, Vec<(&'static str, &'static str)>);

fn plain(status: u16, body: impl Into<String>) -> Out {
    (status, "text/plain", body.into(), Vec::new())
}

/// Reads one request from `s` (within [`REQUEST_TIMEOUT`]), checks who
/// sent it, answers it and closes.
fn serve_one(mut s: TcpStream, ctx: &Ctx) {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
    let (status, ctype, body, extra) = match read_request(&mut s, deadline, ctx) {
        // Accepted here in the moment a hot upgrade handed the port to
        // the new process: a clear answer, not one about devices that
        // have left this process.
        Ok(_) if ctx.handed.load(Ordering::SeqCst) => (
            503,
            "text/plain",
            "upgrading: this process has handed its admin port over; retry\n".to_string(),
            vec![("Retry-After", "1")],
        ),
        Ok(req) => route(req, ctx),
        Err(refusal) => refusal,
    };
    let _ = s.write_all(&answer(status, ctype, &body, &extra));
    // Whatever the client still sends (a body not read) is taken, briefly,
    // so that closing does not reset the connection before it reads the
    // answer.
    let _ = s.shutdown(std::net::Shutdown::Write);
    let until = Instant::now() + Duration::from_millis(200);
    let mut sink = [0u8; 4096];
    for _ in 0..64 {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Reads from `s` into `buf` until `deadline`: Ok(0) at EOF.
fn read_some(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<usize, Out> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(plain(408, "the request did not arrive in time\n"));
    }
    let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
    loop {
        match s.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(plain(408, "the request did not arrive in time\n"))
            }
            Err(_) => return Err(plain(400, "could not read the request\n")),
        }
    }
}

/// The request on `s`, or the refusal to send instead: 400/408/411/413/431
/// for what cannot be read, 403 for a browser's or a rebound name's, 401
/// without the token.
fn read_request(s: &mut TcpStream, deadline: Instant, ctx: &Ctx) -> Result<Request, Out> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // Bounded: each turn reads at least one byte or ends, and the head is
    // at most MAX_HEAD.
    let head_len = loop {
        let n = read_some(s, &mut chunk, deadline)?;
        if n == 0 {
            return Err(plain(400, "the request ended early\n"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => break n,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => continue,
            Ok(_) | Err(httparse::Error::TooManyHeaders) => {
                return Err(plain(431, "request head too large\n"))
            }
            Err(_) => return Err(plain(400, "not an HTTP request\n")),
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(&buf), Ok(httparse::Status::Complete(_))) {
        return Err(plain(400, "not an HTTP request\n"));
    }
    let method = req.method.unwrap_or("").to_string();
    let path = req.path.unwrap_or("");
    let path = path.split('?').next().unwrap_or("").to_string();
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if header("origin").is_some() {
        return Err(plain(
            403,
            "requests from web pages (with an Origin header) are refused: the admin port is for operators' tools\n",
        ));
    }
    if let Some(host) = header("host") {
        let host = std::str::from_utf8(host).unwrap_or("");
        if !host_allowed(host, ctx.addr, &ctx.access.hosts) {
            return Err(plain(
                403,
                "the Host header does not name this admin address (use its IP address, or a name given with --admin-host)\n",
            ));
        }
    }
    if let Some(token) = &ctx.access.token {
        if path != "/healthz" {
            let presented = header("authorization").and_then(bearer);
            if !presented.is_some_and(|t| token.matches(t)) {
                return Err((
                    401,
                    "text/plain",
                    "this admin port needs Authorization: Bearer <the token in --admin-token-file>\n"
                        .into(),
                    vec![("WWW-Authenticate", "Bearer realm=\"c1m admin\"")],
                ));
            }
        }
    }
    let text = header("content-type").is_some_and(|v| v.starts_with(b"text/"));
    if header("transfer-encoding").is_some() {
        return Err(plain(411, "send the body with a Content-Length\n"));
    }
    let length = match header("content-length") {
        None => 0,
        Some(v) => match std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            Some(n) => n,
            None => return Err(plain(400, "bad Content-Length\n")),
        },
    };
    // Only a push has a body worth reading; its size is checked before a
    // byte of it is.
    let wants_body =
        method == "POST" && path.starts_with("/devices/") && path.ends_with("/messages");
    let mut body = Vec::new();
    if wants_body && length > 0 {
        let max = ctx.devices.as_ref().map_or(0, |d| d.max_message);
        if length > max {
            return Err(plain(413, format!("over --max-message ({max} bytes)\n")));
        }
        body.extend_from_slice(&buf[head_len..buf.len().min(head_len + length)]);
        while body.len() < length {
            let want = (length - body.len()).min(chunk.len());
            let n = read_some(s, &mut chunk[..want], deadline)?;
            if n == 0 {
                return Err(plain(400, "the body ended early\n"));
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Ok(Request {
        method,
        path,
        text,
        body,
    })
}

/// The token of an `Authorization: Bearer <token>` value.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = (value.get(..7)?, &value[7..]);
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// The bytes of an HTTP/1.1 answer that closes the connection.
fn answer(status: u16, ctype: &str, body: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in extra {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

fn route(req: Request, ctx: &Ctx) -> Out {
    if let Some(rest) = req.path.strip_prefix("/devices/") {
        let (status, body) = device_request(
            ctx.devices.as_ref(),
            req.method.as_str(),
            rest,
            req.text,
            req.body,
        );
        let ctype = if status == 200 && body.starts_with('{') {
            "application/json"
        } else {
            "text/plain"
        };
        let extra = if status == 405 {
            vec![("Allow", "GET, POST, DELETE")]
        } else {
            Vec::new()
        };
        return (status, ctype, body, extra);
    }
    let get = req.method == "GET";
    let get_only = || {
        (
            405,
            "text/plain",
            "GET only\n".to_string(),
            vec![("Allow", "GET")],
        )
    };
    match req.path.as_str() {
        "/upgrade" if req.method == "POST" => {
            // The same path as SIGUSR2: the process's signal thread starts
            // it (or refuses, in one sentence in the server's log).
            // SAFETY: kill(2) on our own pid with a signal every thread blocks.
            unsafe { libc::kill(std::process::id() as libc::pid_t, libc::SIGUSR2) };
            plain(
                202,
                "upgrade requested: the server's log says how it went\n",
            )
        }
        "/upgrade" => (
            405,
            "text/plain",
            "POST only\n".to_string(),
            vec![("Allow", "POST")],
        ),
        "/metrics" | "/healthz" if !get => get_only(),
        "/metrics" => {
            let v = lock(&ctx.view).clone();
            (
                200,
                CONTENT_TYPE,
                render(ctx.group, &v.snaps, &v.totals),
                Vec::new(),
            )
        }
        "/healthz" if lock(&ctx.view).stopping => plain(503, "stopping\n"),
        "/healthz" => plain(200, "ok\n"),
        _ if !get => get_only(),
        _ => plain(404, "not found\n"),
    }
}

/// `GET`, `POST .../messages` or `DELETE` on `/devices/<id>`:
/// (status, body).
fn device_request(
    devices: Option<&Devices>,
    method: &str,
    rest: &str,
    text: bool,
    payload: Vec<u8>,
) -> (u16, String) {
    let Some(devices) = devices else {
        return (501, "device endpoints are not served here\n".into());
    };
    let (id, messages) = match rest.strip_suffix("/messages") {
        Some(id) => (id, true),
        None => (rest, false),
    };
    // `aa%3Abb` is `aa:bb`, as a client that encodes every `:` sends it.
    let id = percent_decode(id);
    let Some(id) = id.as_deref().filter(|id| valid_id(id)) else {
        return (400, "invalid device id\n".into());
    };
    let ask = match (method, messages) {
        ("GET", false) => Ask::Lookup,
        ("DELETE", false) => Ask::Kick,
        ("POST", true) => {
            if text && std::str::from_utf8(&payload).is_err() {
                return (400, "a text/* body must be UTF-8\n".into());
            }
            Ask::Push { text, payload }
        }
        _ => {
            return (
                405,
                "GET or DELETE /devices/<id>, POST /devices/<id>/messages\n".into(),
            )
        }
    };
    match devices.ask(id, ask) {
        Some(Answer::Found(info)) => (200, device_json(id, &info, devices.place(info.shard))),
        Some(Answer::Delivered) => (200, "delivered\n".into()),
        Some(Answer::Kicked) => (200, "kicked\n".into()),
        Some(Answer::NotConnected) => (404, "not connected\n".into()),
        None => (504, "the shards did not answer in time\n".into()),
    }
}

/// The JSON of `GET /devices/<id>` (ids are `[0-9A-Za-z:._-]`: nothing to escape).
fn device_json(id: &str, d: &DeviceInfo, (worker, shard): (usize, u32)) -> String {
    let remote = d.remote.map_or("null".to_string(), |a| format!("\"{a}\""));
    format!(
        "{{\"id\":\"{id}\",\"worker\":{worker},\"shard\":{shard},\"connected_since_unix_ms\":{},\"last_heard_unix_ms\":{},\"remote\":{remote}}}\n",
        d.connected_since_ms, d.last_heard_ms
    )
}

/// The counters, as (name, help, [(reason label, value)]): a reason of
/// None is an unlabelled sample. From [`Counters`]' table: the families of
/// [`FAMILIES`], each with its fields' samples in the table's order.
type Family = (&'static str, &'static str, Vec<(Option<&'static str>, u64)>);

fn counter_families(c: &Counters) -> Vec<Family> {
    let counts = c.counts();
    FAMILIES
        .iter()
        .map(|family| {
            let samples = Counters::FIELDS
                .iter()
                .zip(counts)
                .filter_map(|((_, Stat(_, prom)), n)| match *prom {
                    Prom::Plain(f) if f == *family => Some((None, n)),
                    Prom::Reason(f, r) if f == *family => Some((Some(r), n)),
                    Prom::ReasonOf(f, r, value) if f == *family => Some((Some(r), value(c))),
                    _ => None,
                })
                .collect();
            (family.name, family.help, samples)
        })
        .collect()
}

/// The Prometheus text exposition (0.0.4) of `snaps` (the gauges, one
/// sample per shard or worker, labelled `group`) and `totals` (the
/// counters, summed over the whole server).
pub fn render(group: &str, snaps: &[Snapshot], totals: &Counters) -> String {
    let mut s = String::with_capacity(4096);
    type Gauge = (&'static str, &'static str, fn(&Snapshot) -> u64);
    let gauges: [Gauge; 2] = [
        (
            "c1m_connections",
            "Upgraded WebSocket connections held",
            |x| x.open,
        ),
        (
            "c1m_sockets",
            "Sockets held, upgraded or still in their handshake",
            |x| x.sockets,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(s, "# HELP {name} {help}, per {group}.");
        let _ = writeln!(s, "# TYPE {name} gauge");
        for x in snaps {
            let _ = writeln!(s, "{name}{{{group}=\"{}\"}} {}", x.shard, value(x));
        }
    }
    for (name, help, samples) in counter_families(totals) {
        let _ = writeln!(s, "# HELP {name} {help}");
        let _ = writeln!(s, "# TYPE {name} counter");
        for (reason, v) in samples {
            match reason {
                Some(r) => {
                    let _ = writeln!(s, "{name}{{reason=\"{r}\"}} {v}");
                }
                None => {
                    let _ = writeln!(s, "{name} {v}");
                }
            }
        }
    }
    for (_, stat) in Counters::FIELDS {
        if let Stat(_, Prom::Own(render)) = stat {
            render(totals, &mut s);
        }
    }
    s
}

/// True if `admin` and `listen` would be the same socket: the same port on
/// the same address, or on the wildcard address (which takes them all).
pub fn clashes(admin: SocketAddr, listen: SocketAddr) -> bool {
    admin.port() == listen.port()
        && (admin.ip() == listen.ip()
            || admin.ip().is_unspecified()
            || listen.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_help_type_and_one_sample_per_shard() {
        let snaps = [
            Snapshot {
                shard: 0,
                open: 2,
                sockets: 3,
                totals: Counters::default(),
            },
            Snapshot {
                shard: 1,
                open: 5,
                sockets: 5,
                totals: Counters::default(),
            },
        ];
        let totals = Counters {
            accepted: 9,
            client_close: 1,
            auth_bad: 4,
            ..Counters::default()
        };
        let text = render("shard", &snaps, &totals);
        for want in [
            "# TYPE c1m_connections gauge\n",
            "c1m_connections{shard=\"0\"} 2\n",
            "c1m_connections{shard=\"1\"} 5\n",
            "c1m_sockets{shard=\"0\"} 3\n",
            "# TYPE c1m_accepted_total counter\nc1m_accepted_total 9\n",
            "c1m_closed_total{reason=\"client_close\"} 1\n",
            "c1m_auth_failures_total{reason=\"bad\"} 4\n",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        // Every family is declared once, before its samples.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!declared.contains(&name), "{name} declared twice");
                declared.push(name);
            } else if !line.starts_with('#') {
                let sampled = line.split(['{', ' ']).next().unwrap();
                // A histogram's samples add _bucket, _sum and _count.
                let name = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|x| sampled.strip_suffix(x))
                    .filter(|base| declared.last() == Some(base))
                    .unwrap_or(sampled);
                assert_eq!(declared.last(), Some(&name), "{line}");
            }
        }
        // The closed reasons are exactly Counters::closed().
        let all = Counters {
            expired: 1,
            client_close: 2,
            peer_gone: 3,
            protocol_error: 4,
            handshake_timeout: 5,
            frame_timeout: 6,
            rejected: 7,
            slow_reader: 8,
            shutdown: 9,
            internal_error: 10,
            replaced: 11,
            ..Counters::default()
        };
        let closed: u64 = counter_families(&all)
            .into_iter()
            .filter(|f| f.0 == "c1m_closed_total")
            .flat_map(|f| f.2)
            .map(|(_, v)| v)
            .sum();
        assert_eq!(closed, all.closed());
    }

    #[test]
    fn host_must_name_the_admin_address() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let names = vec!["ops.example".to_string()];
        let lo = a("127.0.0.1:9100");
        for ok in [
            "127.0.0.1:9100",
            "127.0.0.2:9100",
            "localhost:9100",
            "LOCALHOST:9100",
            "ops.example:9100",
            " 127.0.0.1:9100 ",
        ] {
            assert!(host_allowed(ok, lo, &names), "{ok}");
        }
        for bad in [
            "evil.example:9100",
            "127.0.0.1:9101",
            "127.0.0.1",
            "127.0.0.1:",
            ":9100",
            "[::1]:9100x",
            "10.0.0.1:9100",
            "",
            "localhost.evil.example:9100",
        ] {
            assert!(!host_allowed(bad, lo, &names), "{bad}");
        }
        let v6 = a("[::1]:9100");
        assert!(host_allowed("[::1]:9100", v6, &[]));
        assert!(host_allowed("localhost:9100", v6, &[]));
        assert!(!host_allowed("[::1]", v6, &[]));
        let any = a("0.0.0.0:9100");
        assert!(host_allowed("10.0.0.1:9100", any, &[]));
        assert!(!host_allowed("c1m.example:9100", any, &[]));
        let one = a("10.0.0.1:80");
        assert!(host_allowed("10.0.0.1", one, &[]));
        assert!(!host_allowed("10.0.0.2", one, &[]));
        assert!(!host_allowed("localhost", one, &[]));
    }

    #[test]
    fn the_token_matches_itself_only() {
        let t = Token::new(b"0123456789abcdef").unwrap();
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeF"));
        assert!(!t.matches(b"0123456789abcde"));
        assert!(!t.matches(b""));
        assert!(Token::new(b"short").is_err());
        assert!(Token::new(b"0123456789 abcdef").is_err());
        assert_eq!(bearer(b"Bearer abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(format!("{t:?}"), "Token(..)");
    }

    #[test]
    fn off_loopback_needs_a_token() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let open = Access::default();
        assert!(open.check_bind(a("127.0.0.1:1")).is_ok());
        assert!(open.check_bind(a("[::1]:1")).is_ok());
        let err = open.check_bind(a("0.0.0.0:1")).unwrap_err();
        assert!(err.contains("--admin-token-file"), "{err}");
        assert!(open.check_bind(a("10.0.0.1:1")).is_err());
        let locked = Access {
            token: Some(Token::new(b"0123456789abcdef").unwrap()),
            hosts: Vec::new(),
        };
        assert!(locked.check_bind(a("0.0.0.0:1")).is_ok());
    }

    #[test]
    fn the_device_port_is_not_an_admin_port() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(clashes(a("127.0.0.1:9000"), a("127.0.0.1:9000")));
        assert!(clashes(a("0.0.0.0:9000"), a("127.0.0.1:9000")));
        assert!(clashes(a("127.0.0.1:9000"), a("0.0.0.0:9000")));
        assert!(!clashes(a("127.0.0.1:9100"), a("127.0.0.1:9000")));
        assert!(!clashes(a("127.0.0.2:9000"), a("127.0.0.1:9000")));
    }
}
