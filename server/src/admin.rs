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
//! HTTP here is tiny_http's: a small, long-maintained, blocking HTTP/1.1
//! server with its own threads and no async runtime. This port sees a
//! scrape a second, not a million devices, so it needs no part of the
//! shards' machinery, and a crate that parses requests for us is less code
//! to get wrong than another hand-written parser. The exposition format is
//! a few lines of text, written here ([`render`]): the `prometheus` crate
//! would bring its own registry and atomics, while the numbers already
//! exist, as the snapshots the shards send by message.
//!
//! Shards never touch this module. The thread that collects their snapshots
//! (the main thread, or the `--procs` parent) [`Admin::publish`]es copies
//! into a mutex only it and the admin threads share.

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::hist::{EXPIRY_LAG_MS, HEARTBEAT_INTERVAL_MS};
use crate::mailbox::{Answer, Ask, DeviceInfo, Mail, Peer, Reply};
use crate::procs::switch::Switch;
use crate::proto::device_id::DeviceId;
use crate::proto::handshake::valid_id;
use crate::registry;
use crate::stats::REJECT_STATUSES;

use crate::stats::{Counters, Snapshot};

/// The Content-Type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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

/// The running admin listener; dropping it stops serving.
pub struct Admin {
    view: Arc<Mutex<View>>,
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
}

impl Admin {
    /// Binds `addr` and serves it from a thread of its own. `group` names
    /// the gauges' label: `shard`, or `worker` in a `--procs` parent (which
    /// sees only its workers' sums).
    pub fn start(
        addr: SocketAddr,
        group: &'static str,
        devices: Option<Devices>,
    ) -> Result<Admin, String> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| format!("cannot serve --admin on {addr}: {e}"))?;
        let addr = server.server_addr().to_ip().unwrap_or(addr);
        let server = Arc::new(server);
        let view = Arc::new(Mutex::new(View::default()));
        let (s, v) = (server.clone(), view.clone());
        std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || serve(&s, &v, group, devices.as_ref()))
            .map_err(|e| format!("cannot start the admin thread: {e}"))?;
        Ok(Admin { view, server, addr })
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
        self.server.unblock();
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

/// `GET`, `POST .../messages` or `DELETE` on `/devices/<id>`:
/// (status, body).
fn device_request(
    devices: Option<&Devices>,
    req: &mut tiny_http::Request,
    rest: &str,
) -> (u16, String) {
    let Some(devices) = devices else {
        return (501, "device endpoints are not served here\n".into());
    };
    let method = req.method().clone();
    let (id, messages) = match rest.strip_suffix("/messages") {
        Some(id) => (id, true),
        None => (rest, false),
    };
    if !valid_id(id) {
        return (400, "invalid device id\n".into());
    }
    let ask = match (&method, messages) {
        (tiny_http::Method::Get, false) => Ask::Lookup,
        (tiny_http::Method::Delete, false) => Ask::Kick,
        (tiny_http::Method::Post, true) => {
            let text = req
                .headers()
                .iter()
                .any(|h| h.field.equiv("Content-Type") && h.value.as_str().starts_with("text/"));
            let mut payload = Vec::new();
            let limit = devices.max_message as u64 + 1;
            if req
                .as_reader()
                .take(limit)
                .read_to_end(&mut payload)
                .is_err()
            {
                return (400, "could not read the body\n".into());
            }
            if payload.len() > devices.max_message {
                return (
                    413,
                    format!("over --max-message ({} bytes)\n", devices.max_message),
                );
            }
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

fn serve(
    server: &tiny_http::Server,
    view: &Mutex<View>,
    group: &'static str,
    devices: Option<&Devices>,
) {
    // Ends when the Admin is dropped (unblock).
    for mut req in server.incoming_requests() {
        let url = req.url().split('?').next().unwrap_or("").to_string();
        let (status, ctype, body) = if let Some(rest) = url.strip_prefix("/devices/") {
            let (status, body) = device_request(devices, &mut req, rest);
            let ctype = if status == 200 && body.starts_with('{') {
                "application/json"
            } else {
                "text/plain"
            };
            (status, ctype, body)
        } else {
            let path = url.as_str();
            let get = *req.method() == tiny_http::Method::Get;
            match path {
                "/metrics" | "/healthz" if !get => (405, "text/plain", "GET only\n".into()),
                "/metrics" => {
                    let v = lock(view).clone();
                    (200, CONTENT_TYPE, render(group, &v.snaps, &v.totals))
                }
                "/healthz" if lock(view).stopping => (503, "text/plain", "stopping\n".into()),
                "/healthz" => (200, "text/plain", "ok\n".to_string()),
                _ if !get => (405, "text/plain", "GET only\n".into()),
                _ => (404, "text/plain", "not found\n".into()),
            }
        };
        let mut resp = tiny_http::Response::from_string(body).with_status_code(status);
        if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes()) {
            resp.add_header(h);
        }
        if status == 405 && !url.starts_with("/devices/") {
            if let Ok(h) = tiny_http::Header::from_bytes(&b"Allow"[..], &b"GET"[..]) {
                resp.add_header(h);
            }
        }
        // A client that went away is no concern of the server's.
        let _ = req.respond(resp);
    }
}

/// The counters, as (name, help, [(reason label, value)]): a reason of
/// None is an unlabelled sample.
type Family = (&'static str, &'static str, Vec<(Option<&'static str>, u64)>);

fn counter_families(c: &Counters) -> Vec<Family> {
    vec![
        (
            "c1m_accepted_total",
            "TCP connections accepted.",
            vec![(None, c.accepted)],
        ),
        (
            "c1m_upgraded_total",
            "Connections upgraded to WebSocket (101).",
            vec![(None, c.upgraded)],
        ),
        (
            "c1m_frames_received_total",
            "WebSocket frames received from devices (heartbeats and data).",
            vec![(None, c.frames)],
        ),
        (
            "c1m_closed_total",
            "Connections ended, by reason; every accepted connection ends with exactly one.",
            vec![
                (Some("expired"), c.expired),
                (Some("client_close"), c.client_close),
                (Some("peer_gone"), c.peer_gone),
                (Some("protocol_error"), c.protocol_error),
                (Some("handshake_timeout"), c.handshake_timeout),
                (Some("frame_timeout"), c.frame_timeout),
                (Some("rejected"), c.rejected),
                (Some("slow_reader"), c.slow_reader),
                (Some("shutdown"), c.shutdown),
                (Some("internal_error"), c.internal_error),
                (Some("replaced"), c.replaced),
                (Some("kicked"), c.kicked),
                (Some("proxy_bad"), c.proxy_bad),
                (Some("proxy_missing"), c.proxy_missing),
                (Some("tls_failed"), c.tls_failed),
                (Some("plain_on_tls"), c.plain_on_tls),
                (Some("tls_on_plain"), c.tls_on_plain),
            ],
        ),
        (
            "c1m_tls_handshakes_total",
            "TLS handshakes completed (--tls-cert), full or resumed with a session ticket.",
            vec![
                (
                    Some("full"),
                    c.tls_handshakes - c.tls_resumed.min(c.tls_handshakes),
                ),
                (Some("resumed"), c.tls_resumed),
            ],
        ),
        (
            "c1m_auth_failures_total",
            "Upgrades refused 401 (also closed with reason rejected), by reason.",
            vec![
                (Some("missing"), c.auth_missing),
                (Some("bad"), c.auth_bad),
                (Some("expired"), c.auth_expired),
            ],
        ),
        (
            "c1m_udp_heartbeats_total",
            "UDP heartbeat datagrams (--udp-heartbeat) that refreshed a connection.",
            vec![(None, c.udp_heartbeats)],
        ),
        (
            "c1m_udp_dropped_total",
            "UDP heartbeat datagrams dropped, by reason: bad (not a valid ticket of the shard that got it), stale (its connection is gone).",
            vec![(Some("bad"), c.udp_bad), (Some("stale"), c.udp_stale)],
        ),
        (
            "c1m_accept_exhausted_total",
            "Accepts that failed for lack of descriptors or memory.",
            vec![(None, c.accept_exhausted)],
        ),
        (
            "c1m_io_cq_overflows_total",
            "io_uring waits that found completions held back by a full completion queue.",
            vec![(None, c.io_cq_overflows)],
        ),
        (
            "c1m_io_cancels_total",
            "io_uring cancel requests submitted.",
            vec![(None, c.io_cancels)],
        ),
        (
            "c1m_events_dropped_total",
            "Lifecycle events (--nats) dropped because the publisher's queue was full (the broker down or slow).",
            vec![(None, c.events_dropped)],
        ),
    ]
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
    let name = "c1m_rejected_total";
    let _ = writeln!(
        s,
        "# HELP {name} Upgrades refused with an HTTP error, by status."
    );
    let _ = writeln!(s, "# TYPE {name} counter");
    for (status, n) in REJECT_STATUSES.iter().zip(totals.rejected_by_status) {
        let _ = writeln!(s, "{name}{{status=\"{status}\"}} {n}");
    }
    totals.expiry_lag.render(
        &mut s,
        "c1m_expiry_lag_seconds",
        "How late silent devices were deleted after their deadline (last frame + timeout), measured from the start of the last frame's tick.",
        &EXPIRY_LAG_MS,
    );
    totals.heartbeat_interval.render(
        &mut s,
        "c1m_heartbeat_interval_seconds",
        "Time between reads of frames from one device, at the resolution of the tick.",
        &HEARTBEAT_INTERVAL_MS,
    );
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
    fn the_device_port_is_not_an_admin_port() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(clashes(a("127.0.0.1:9000"), a("127.0.0.1:9000")));
        assert!(clashes(a("0.0.0.0:9000"), a("127.0.0.1:9000")));
        assert!(clashes(a("127.0.0.1:9000"), a("0.0.0.0:9000")));
        assert!(!clashes(a("127.0.0.1:9100"), a("127.0.0.1:9000")));
        assert!(!clashes(a("127.0.0.2:9000"), a("127.0.0.1:9000")));
    }
}
