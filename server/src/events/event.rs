//! Lifecycle events as values, and everything about them that is text:
//! their JSON, the subjects, the presence key and value. Sans-IO: no
//! broker here, only bytes (unit-tested below).
//!
//! An [`Event`] is what a shard hands the publisher: a fixed-size value
//! (the id inline for ids of up to 23 bytes, a MAC address is 17), so the
//! hand-off allocates nothing.

use std::net::SocketAddr;

use c1m_proto::device_id::DeviceId;
use c1m_proto::table::Location;

/// How a connection ended: its disconnect event's `reason` is
/// [`Ended::event`].
pub use crate::ended::Ended;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Connected,
    Disconnected(Ended),
    /// Not an event: a connection still held, offered when the publisher
    /// asks the shards to write presence again (after the broker came
    /// back). It only writes presence; no message of events carries it.
    Present,
}

/// One connect or disconnect, as a shard saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    pub id: DeviceId,
    /// The connection (its shard, slot and generation): what presence names.
    pub at: Location,
    pub remote: Option<SocketAddr>,
    /// Unix milliseconds when it happened.
    pub time_ms: u64,
    /// Unix milliseconds of the last frame heard (disconnects).
    pub last_heard_ms: u64,
}

/// Who publishes: in every event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub server: String,
    pub worker: u32,
    /// The number of this worker's shard 0 over the whole server (shards
    /// are numbered over all `--procs` workers; events name the shard
    /// within the worker, as `GET /devices` does).
    pub shard_base: u32,
}

/// The subjects of one `--nats-prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    pub connected: String,
    pub disconnected: String,
    pub snapshot: String,
    /// One per hot upgrade, from the new process: `<prefix>.events.upgrade`.
    pub upgrade: String,
    /// Pushes from backends: `<prefix>.push.<device id>`, subscribed as `<prefix>.push.>`.
    pub push_wildcard: String,
    push_head: String,
    deliver_head: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Subjects {
        Subjects {
            connected: format!("{prefix}.events.connected"),
            disconnected: format!("{prefix}.events.disconnected"),
            snapshot: format!("{prefix}.events.snapshot"),
            upgrade: format!("{prefix}.events.upgrade"),
            push_wildcard: format!("{prefix}.push.>"),
            push_head: format!("{prefix}.push."),
            deliver_head: format!("{prefix}.deliver."),
        }
    }

    /// The subject a backend publishes to, to reach device `id`.
    pub fn push(&self, id: &str) -> String {
        format!("{}{id}", self.push_head)
    }

    /// The device id a push subject names, if it is a valid id. Ids may
    /// hold dots, which NATS reads as token separators: the rest of the
    /// subject after `<prefix>.push.` is the id, dots and all.
    pub fn push_id<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let id = subject.strip_prefix(&self.push_head)?;
        c1m_proto::handshake::valid_id(id).then_some(id)
    }

    /// Where pushes for the devices of one worker of one server go.
    pub fn deliver(&self, server: &str, worker: u32) -> String {
        format!("{}{server}.{worker}", self.deliver_head)
    }
}

/// A `--nats-prefix` must be one or more NATS tokens without wildcards.
pub fn valid_prefix(p: &str) -> bool {
    !p.is_empty()
        && p.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

/// A server id is one subject token (it names a deliver subject) and a
/// JSON string that needs no escaping: `[0-9A-Za-z:_-]`, 1 to 64 bytes.
pub fn valid_server_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b':' || b == b'_' || b == b'-')
}

/// The default server id: `<hostname>:<port>`, dots and anything else a
/// server id may not hold turned into `-`.
pub fn default_server_id(hostname: &str, port: u16) -> String {
    let host: String = hostname
        .chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let host = if host.is_empty() { "c1m".into() } else { host };
    format!("{host}:{port}")
}

/// Appends the event's JSON (one object, no newline) to `out`.
pub fn write_json(out: &mut Vec<u8>, ev: &Event, origin: &Origin) {
    use std::io::Write as _;
    // Writes into a Vec cannot fail.
    let kind = match ev.kind {
        Kind::Connected => "connected",
        Kind::Disconnected(_) => "disconnected",
        Kind::Present => "present",
    };
    let _ = write!(
        out,
        r#"{{"event":"{kind}","id":"{}","server":"{}","worker":{},"shard":{},"remote":"#,
        ev.id.as_str(),
        origin.server,
        origin.worker,
        ev.at.shard.saturating_sub(origin.shard_base)
    );
    match ev.remote {
        Some(a) => {
            let _ = write!(out, r#""{a}""#);
        }
        None => out.extend_from_slice(b"null"),
    }
    let _ = write!(out, r#","time_ms":{}"#, ev.time_ms);
    if let Kind::Disconnected(why) = ev.kind {
        let _ = write!(out, r#","reason":"{}""#, why.event());
        if let Ended::ProtocolError(code) = why {
            let _ = write!(out, r#","code":{code}"#);
        }
        let _ = write!(out, r#","last_heard_ms":{}"#, ev.last_heard_ms);
    }
    out.push(b'}');
}

/// Which subject a message of events goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Connected,
    Disconnected,
}

impl Topic {
    /// (A presence record is published with the connects, if ever.)
    pub fn of(kind: Kind) -> Topic {
        match kind {
            Kind::Connected | Kind::Present => Topic::Connected,
            Kind::Disconnected(_) => Topic::Disconnected,
        }
    }
}

/// Lifecycle events gathered into few NATS messages: one JSON object per
/// line, one topic per message, about `max` bytes each. A message ends
/// where the topic changes, so a consumer of both subjects still gets each
/// device's events in order; an expiry storm of 100,000 devices is a few
/// hundred messages, not 100,000.
#[derive(Debug)]
pub struct Batcher {
    body: Vec<u8>,
    topic: Topic,
    max: usize,
    events: usize,
}

impl Batcher {
    pub fn new(max: usize) -> Batcher {
        Batcher {
            body: Vec::with_capacity(max + 512),
            topic: Topic::Connected,
            max,
            events: 0,
        }
    }

    /// Adds `ev`; returns the message it closed, if any, to be published
    /// before this one's.
    pub fn add(&mut self, ev: &Event, origin: &Origin) -> Option<(Topic, bytes::Bytes, usize)> {
        let topic = Topic::of(ev.kind);
        let done = if !self.body.is_empty() && (topic != self.topic || self.body.len() >= self.max)
        {
            self.take()
        } else {
            None
        };
        if !self.body.is_empty() {
            self.body.push(b'\n');
        }
        self.topic = topic;
        write_json(&mut self.body, ev, origin);
        self.events += 1;
        done
    }

    /// The message being gathered, with its number of events, if any.
    pub fn take(&mut self) -> Option<(Topic, bytes::Bytes, usize)> {
        if self.body.is_empty() {
            return None;
        }
        let body = bytes::Bytes::copy_from_slice(&self.body);
        self.body.clear();
        Some((self.topic, body, std::mem::take(&mut self.events)))
    }
}

/// What --nats-exclusive reads of another server's connect event.
#[derive(Debug, PartialEq, Eq)]
pub struct Connect {
    pub id: String,
    pub server: String,
    pub time_ms: u64,
}

impl Connect {
    /// The fields of one `connected` event line; None for anything else
    /// (another kind, an invalid id, not JSON).
    pub fn parse(line: &[u8]) -> Option<Connect> {
        let v: serde_json::Value = serde_json::from_slice(line).ok()?;
        if v["event"] != "connected" {
            return None;
        }
        let id = v["id"].as_str()?;
        c1m_proto::handshake::valid_id(id).then_some(())?;
        Some(Connect {
            id: id.to_owned(),
            server: v["server"].as_str()?.to_owned(),
            time_ms: v["time_ms"].as_u64()?,
        })
    }
}

/// The snapshot marker, published on every (re)connection to the broker:
/// consumers that keep presence resync from here (events may have been
/// dropped while the broker was away).
pub fn snapshot_json(origin: &Origin, connections: u64, time_ms: u64, connects: u64) -> String {
    format!(
        r#"{{"event":"snapshot","server":"{}","worker":{},"connections":{connections},"time_ms":{time_ms},"broker_connects":{connects}}}"#,
        origin.server, origin.worker
    )
}

/// A hot upgrade, said by the new process once it holds every connection
/// the old one handed over (docs/upgrade.md). The devices it moved get no
/// event of their own: for a consumer of presence nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upgrade {
    pub old_pid: u32,
    pub pid: u32,
    /// Connections taken over.
    pub connections: u64,
    /// From the new process's start to the old one's Done.
    pub took_ms: u64,
    pub time_ms: u64,
}

pub fn upgrade_json(origin: &Origin, u: &Upgrade) -> String {
    format!(
        r#"{{"event":"upgrade","server":"{}","worker":{},"old_pid":{},"pid":{},"connections":{},"took_ms":{},"time_ms":{}}}"#,
        origin.server, origin.worker, u.old_pid, u.pid, u.connections, u.took_ms, u.time_ms
    )
}

/// The presence key of a device id in the KV bucket: its hex (the KV key
/// alphabet has no `:`, and ids may hold dots, which KV reads as token
/// separators; hex is unambiguous).
pub fn presence_key(id: &str) -> String {
    let mut k = String::with_capacity(id.len() * 2);
    push_presence_key(&mut k, id);
    k
}

/// Appends the presence key of `id` to `out`.
pub fn push_presence_key(out: &mut String, id: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in id.bytes() {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
}

/// Appends a presence value, `<server> <worker> <shard> <key> <gen>` (what
/// [`Presence::parse`] reads), to `out`.
pub fn write_presence_value(out: &mut String, server: &str, worker: u32, at: &Location) {
    use std::fmt::Write as _;
    // Writes into a String cannot fail.
    let _ = write!(out, "{server} {worker} {} {} {}", at.shard, at.key, at.gen);
}

/// Where a device is: the server, its worker and the connection there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub server: String,
    pub worker: u32,
    pub at: Location,
}

impl Presence {
    pub fn parse(v: &[u8]) -> Option<Presence> {
        let s = std::str::from_utf8(v).ok()?;
        let mut f = s.split(' ');
        let server = f.next()?;
        if !valid_server_id(server) {
            return None;
        }
        let worker = f.next()?.parse().ok()?;
        let shard = f.next()?.parse().ok()?;
        let key = f.next()?.parse().ok()?;
        let gen = f.next()?.parse().ok()?;
        if f.next().is_some() {
            return None;
        }
        Some(Presence {
            server: server.into(),
            worker,
            at: Location { shard, key, gen },
        })
    }
}

/// The connection a deliver message names, from its `C1m-At` header
/// (`<shard>.<key>.<gen>`).
pub fn at_header(at: &Location) -> String {
    format!("{}.{}.{}", at.shard, at.key, at.gen)
}

pub fn parse_at_header(s: &str) -> Option<Location> {
    let mut f = s.split('.');
    let at = Location {
        shard: f.next()?.parse().ok()?,
        key: f.next()?.parse().ok()?,
        gen: f.next()?.parse().ok()?,
    };
    f.next().is_none().then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> Location {
        Location {
            shard: 1,
            key: 7,
            gen: 3,
        }
    }

    fn origin() -> Origin {
        Origin {
            server: "host:9000".into(),
            worker: 2,
            shard_base: 0,
        }
    }

    fn json(ev: &Event) -> serde_json::Value {
        let mut out = Vec::new();
        write_json(&mut out, ev, &origin());
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn an_event_is_fixed_size_and_small() {
        // The shard-to-publisher queue preallocates its slots: keep it lean.
        assert!(
            std::mem::size_of::<Event>() <= 128,
            "{}",
            std::mem::size_of::<Event>()
        );
    }

    #[test]
    fn connected_json_has_every_field() {
        let ev = Event {
            kind: Kind::Connected,
            id: DeviceId::new("02:00:5e:00:00:01"),
            at: at(),
            remote: Some("127.0.0.2:40000".parse().unwrap()),
            time_ms: 1_700_000_000_123,
            last_heard_ms: 0,
        };
        let v = json(&ev);
        assert_eq!(v["event"], "connected");
        assert_eq!(v["id"], "02:00:5e:00:00:01");
        assert_eq!(v["server"], "host:9000");
        assert_eq!(v["worker"], 2);
        assert_eq!(v["shard"], 1);
        assert_eq!(v["remote"], "127.0.0.2:40000");
        assert_eq!(v["time_ms"], 1_700_000_000_123u64);
        assert!(v.get("reason").is_none());
    }

    #[test]
    fn disconnected_json_has_reason_code_and_last_heard() {
        let mut ev = Event {
            kind: Kind::Disconnected(Ended::ProtocolError(1007)),
            id: DeviceId::new("dev.1"),
            at: at(),
            remote: Some("[::1]:5".parse().unwrap()),
            time_ms: 10,
            last_heard_ms: 5,
        };
        let v = json(&ev);
        assert_eq!(v["event"], "disconnected");
        assert_eq!(v["reason"], "protocol_error");
        assert_eq!(v["code"], 1007);
        assert_eq!(v["last_heard_ms"], 5);
        assert_eq!(v["remote"], "[::1]:5");
        ev.kind = Kind::Disconnected(Ended::Expired);
        ev.remote = None;
        let v = json(&ev);
        assert_eq!(v["reason"], "expired");
        assert!(v.get("code").is_none());
        assert!(v["remote"].is_null());
        let s: serde_json::Value =
            serde_json::from_str(&snapshot_json(&origin(), 12, 34, 2)).unwrap();
        assert_eq!(s["event"], "snapshot");
        assert_eq!(s["connections"], 12);
    }

    fn event(n: u32, kind: Kind) -> Event {
        Event {
            kind,
            id: DeviceId::new(&format!("dev-{n}")),
            at: Location { key: n, ..at() },
            remote: None,
            time_ms: 1,
            last_heard_ms: 0,
        }
    }

    /// Every event comes out once, in order, one JSON object per line;
    /// messages stay near the size asked and hold one topic each.
    #[test]
    fn batches_keep_order_and_split_on_topic_and_size() {
        let mut b = Batcher::new(1000);
        let mut msgs = Vec::new();
        let mut sent = Vec::new();
        for n in 0..500u32 {
            // Runs of connects and disconnects of varying lengths.
            let kind = if (n / 7) % 3 == 2 {
                Kind::Disconnected(Ended::Expired)
            } else {
                Kind::Connected
            };
            sent.push((n, Topic::of(kind)));
            msgs.extend(b.add(&event(n, kind), &origin()));
        }
        msgs.extend(b.take());
        assert!(b.take().is_none(), "taken: empty");
        let mut got = Vec::new();
        for (topic, body, count) in &msgs {
            assert!(body.len() < 1000 + 300, "{}", body.len());
            let lines: Vec<&[u8]> = body.split(|&c| c == b'\n').collect();
            assert_eq!(lines.len(), *count);
            for l in lines {
                let v: serde_json::Value = serde_json::from_slice(l).unwrap();
                let want = match topic {
                    Topic::Connected => "connected",
                    Topic::Disconnected => "disconnected",
                };
                assert_eq!(v["event"], want);
                let id = v["id"].as_str().unwrap();
                got.push((id[4..].parse::<u32>().unwrap(), *topic));
            }
        }
        assert_eq!(got, sent);
        assert!(msgs.len() < 200, "{} messages for 500 events", msgs.len());
    }

    #[test]
    fn connect_events_are_read_back_and_nothing_else() {
        let ev = Event {
            kind: Kind::Connected,
            id: DeviceId::new("02:00:5e:00:00:01"),
            at: at(),
            remote: None,
            time_ms: 1_700_000_000_123,
            last_heard_ms: 0,
        };
        let mut line = Vec::new();
        write_json(&mut line, &ev, &origin());
        assert_eq!(
            Connect::parse(&line),
            Some(Connect {
                id: "02:00:5e:00:00:01".into(),
                server: "host:9000".into(),
                time_ms: 1_700_000_000_123
            })
        );
        line.clear();
        write_json(
            &mut line,
            &Event {
                kind: Kind::Disconnected(Ended::Expired),
                ..ev
            },
            &origin(),
        );
        assert_eq!(Connect::parse(&line), None);
        assert_eq!(Connect::parse(b"nonsense"), None);
        assert_eq!(
            Connect::parse(br#"{"event":"connected","id":"a b","server":"s","time_ms":1}"#),
            None,
            "an invalid id"
        );
    }

    #[test]
    fn push_subjects_carry_ids_with_dots_and_refuse_bad_ones() {
        let s = Subjects::new("c1m");
        assert_eq!(s.push("a.b:c"), "c1m.push.a.b:c");
        assert_eq!(s.push_id("c1m.push.a.b:c"), Some("a.b:c"));
        assert_eq!(
            s.push_id("c1m.push.02:00:5e:00:00:01"),
            Some("02:00:5e:00:00:01")
        );
        assert_eq!(s.push_id("c1m.push."), None);
        assert_eq!(s.push_id("c1m.push.a*b"), None);
        assert_eq!(s.push_id("other.push.a"), None);
        assert_eq!(s.deliver("h:9000", 3), "c1m.deliver.h:9000.3");
        assert_eq!(s.connected, "c1m.events.connected");
        assert!(valid_prefix("c1m") && valid_prefix("acme.c1m"));
        assert!(!valid_prefix("") && !valid_prefix("a.*") && !valid_prefix("a..b"));
    }

    #[test]
    fn server_ids_are_one_token() {
        assert_eq!(
            default_server_id("node-1.example.com", 9000),
            "node-1-example-com:9000"
        );
        assert_eq!(default_server_id("", 1), "c1m:1");
        assert!(valid_server_id("node-1-example-com:9000"));
        assert!(!valid_server_id("a.b") && !valid_server_id("") && !valid_server_id("a b"));
    }

    #[test]
    fn presence_round_trips_and_keys_are_hex() {
        assert_eq!(presence_key("a:."), "613a2e");
        let p = Presence {
            server: "h:1".into(),
            worker: 4,
            at: at(),
        };
        let mut v = String::new();
        write_presence_value(&mut v, &p.server, p.worker, &p.at);
        assert_eq!(Presence::parse(v.as_bytes()), Some(p));
        assert_eq!(Presence::parse(b"h:1 4 1 7"), None);
        assert_eq!(Presence::parse(b"h.1 4 1 7 3"), None);
        assert_eq!(Presence::parse(b"\xff"), None);
        assert_eq!(parse_at_header(&at_header(&at())), Some(at()));
        assert_eq!(parse_at_header("1.2"), None);
        assert_eq!(parse_at_header("1.2.x"), None);
    }
}
