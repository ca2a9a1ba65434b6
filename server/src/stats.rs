//! Per-shard counters and the one-line stats report built from their
//! snapshots. Shards never share counters: each sends a copy of its own, by
//! message, and the reporter sums them.

use std::fmt::Write as _;

use crate::hist::Hist;

/// Cumulative totals of one shard (or of the sum of all shards).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub accepted: u64,
    pub upgraded: u64,
    /// Frames received from devices (heartbeats and data alike).
    pub frames: u64,
    /// Silent past the timeout and deleted.
    pub expired: u64,
    /// Ended by a Close frame from the device.
    pub client_close: u64,
    /// Ended by EOF or reset without a Close frame.
    pub peer_gone: u64,
    /// Ended by a protocol violation (1002/1007/1009).
    pub protocol_error: u64,
    /// No complete upgrade within the handshake timeout.
    pub handshake_timeout: u64,
    /// A frame begun but not completed within the frame timeout.
    pub frame_timeout: u64,
    /// Upgrade refused with an HTTP error (4xx, 503).
    pub rejected: u64,
    /// Closed because the device did not read its pending output.
    pub slow_reader: u64,
    /// Closed by server shutdown (drain timeout or still handshaking).
    pub shutdown: u64,
    /// Accept failed for lack of descriptors or memory.
    pub accept_exhausted: u64,
    /// Connections closed because handling them hit a bug (a panic, contained).
    pub internal_error: u64,
    /// Closed with 4000 because a newer connection took the device's id.
    pub replaced: u64,
    /// Closed with 4001 by an operator (DELETE /devices/<id>).
    pub kicked: u64,
    /// Refused 401 (also counted in `rejected`): no token, a bad one, an expired one.
    pub auth_missing: u64,
    pub auth_bad: u64,
    pub auth_expired: u64,
    /// --proxy-protocol: closed for a malformed PROXY header, or for none
    /// within the handshake timeout.
    pub proxy_bad: u64,
    pub proxy_missing: u64,
    /// TLS (--tls-cert): the handshake or a record failed (a bad record,
    /// an alert such as the device rejecting our certificate).
    pub tls_failed: u64,
    /// TLS port: the first bytes were not a TLS handshake (plaintext HTTP?).
    pub plain_on_tls: u64,
    /// Plaintext port: the first bytes were a TLS handshake record.
    pub tls_on_plain: u64,
    /// TLS handshakes completed (not a close reason), and of them resumed
    /// with a session ticket.
    pub tls_handshakes: u64,
    pub tls_resumed: u64,
    /// io_uring: waits that found completions held back by a full CQ.
    pub io_cq_overflows: u64,
    /// io_uring: cancel requests submitted (the design submits none).
    pub io_cancels: u64,
    /// Lifecycle events (--nats) dropped because the publisher's queue was
    /// full (the broker down or slow): the shard never waits for it.
    pub events_dropped: u64,
    /// --udp-heartbeat: datagrams that refreshed a connection; that were
    /// not a valid ticket of this shard (wrong length, shard or MAC); that
    /// named no live connection (closed, slot reused, replaced).
    pub udp_heartbeats: u64,
    pub udp_bad: u64,
    pub udp_stale: u64,
    /// --max-upgrades-per-sec: connections answered 503 (a reset on a TLS
    /// port) at accept, over the budget (not in `accepted` or `rejected`:
    /// no work was done for them); and times accepting paused (`defer`).
    pub admission_refused: u64,
    pub admission_paused: u64,
    /// `rejected`, by HTTP status, in the order of [`REJECT_STATUSES`].
    pub rejected_by_status: [u64; REJECT_STATUSES.len()],
    /// How late after their deadline silent devices were deleted.
    pub expiry_lag: Hist,
    /// Time between reads of frames from one device.
    pub heartbeat_interval: Hist,
}

/// Every status an upgrade can be refused with.
pub const REJECT_STATUSES: [u16; 7] = [400, 401, 404, 405, 426, 431, 503];

impl Counters {
    /// Counts one refusal with `status`.
    pub fn reject(&mut self, status: u16) {
        self.rejected += 1;
        if let Some(i) = REJECT_STATUSES.iter().position(|&s| s == status) {
            self.rejected_by_status[i] += 1;
        }
    }
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.accepted += o.accepted;
        self.upgraded += o.upgraded;
        self.frames += o.frames;
        self.expired += o.expired;
        self.client_close += o.client_close;
        self.peer_gone += o.peer_gone;
        self.protocol_error += o.protocol_error;
        self.handshake_timeout += o.handshake_timeout;
        self.frame_timeout += o.frame_timeout;
        self.rejected += o.rejected;
        self.slow_reader += o.slow_reader;
        self.shutdown += o.shutdown;
        self.accept_exhausted += o.accept_exhausted;
        self.internal_error += o.internal_error;
        self.replaced += o.replaced;
        self.kicked += o.kicked;
        self.auth_missing += o.auth_missing;
        self.auth_bad += o.auth_bad;
        self.auth_expired += o.auth_expired;
        self.proxy_bad += o.proxy_bad;
        self.proxy_missing += o.proxy_missing;
        self.tls_failed += o.tls_failed;
        self.plain_on_tls += o.plain_on_tls;
        self.tls_on_plain += o.tls_on_plain;
        self.tls_handshakes += o.tls_handshakes;
        self.tls_resumed += o.tls_resumed;
        self.io_cq_overflows += o.io_cq_overflows;
        self.io_cancels += o.io_cancels;
        for (a, b) in self.rejected_by_status.iter_mut().zip(o.rejected_by_status) {
            *a += b;
        }
        self.expiry_lag.add(&o.expiry_lag);
        self.heartbeat_interval.add(&o.heartbeat_interval);
        self.events_dropped += o.events_dropped;
        self.udp_heartbeats += o.udp_heartbeats;
        self.udp_bad += o.udp_bad;
        self.udp_stale += o.udp_stale;
        self.admission_refused += o.admission_refused;
        self.admission_paused += o.admission_paused;
    }

    /// Every connection that ended, for any reason.
    pub fn closed(&self) -> u64 {
        self.expired
            + self.client_close
            + self.peer_gone
            + self.protocol_error
            + self.handshake_timeout
            + self.frame_timeout
            + self.rejected
            + self.slow_reader
            + self.shutdown
            + self.internal_error
            + self.replaced
            + self.kicked
            + self.proxy_bad
            + self.proxy_missing
            + self.tls_failed
            + self.plain_on_tls
            + self.tls_on_plain
    }
}

/// What a shard sends the reporter: its counters and what it holds now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub shard: usize,
    /// Upgraded connections held.
    pub open: u64,
    /// Sockets held, upgraded or not (those still in their handshake too).
    pub sockets: u64,
    pub totals: Counters,
}

/// Formats one stats line: rates over `secs` from `prev` to `now`, then totals.
/// `t=` is seconds since start; every key appears once (rates end in `/s`,
/// totals follow `|`), stable for grep and awk.
pub fn line(t: f64, shards: &[Snapshot], prev: &Counters, now: &Counters, secs: f64) -> String {
    grouped_line("shards", t, shards, prev, now, secs)
}

/// [`line`] with the per-group list named `group` (`workers` for a
/// `--procs` parent, whose snapshots are its workers').
pub fn grouped_line(
    group: &str,
    t: f64,
    shards: &[Snapshot],
    prev: &Counters,
    now: &Counters,
    secs: f64,
) -> String {
    let rate = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / secs.max(1e-9);
    let open: u64 = shards.iter().map(|s| s.open).sum();
    let sockets: u64 = shards.iter().map(|s| s.sockets).sum();
    let mut s = String::with_capacity(400);
    let _ = write!(s, "t={t:.1} conns={open} sockets={sockets} {group}=[");
    for (i, sh) in shards.iter().enumerate() {
        let _ = write!(s, "{}{}", if i > 0 { "," } else { "" }, sh.open);
    }
    let _ = write!(
        s,
        "] accepted/s={:.0} upgraded/s={:.0} frames/s={:.0} expired/s={:.0} client_close/s={:.0} peer_gone/s={:.0} protocol_error/s={:.0} handshake_timeout/s={:.0} frame_timeout/s={:.0} rejected/s={:.0} slow_reader/s={:.0}",
        rate(now.accepted, prev.accepted),
        rate(now.upgraded, prev.upgraded),
        rate(now.frames, prev.frames),
        rate(now.expired, prev.expired),
        rate(now.client_close, prev.client_close),
        rate(now.peer_gone, prev.peer_gone),
        rate(now.protocol_error, prev.protocol_error),
        rate(now.handshake_timeout, prev.handshake_timeout),
        rate(now.frame_timeout, prev.frame_timeout),
        rate(now.rejected, prev.rejected),
        rate(now.slow_reader, prev.slow_reader),
    );
    let _ = write!(s, " | {}", totals(now));
    s
}

/// The cumulative totals as `key=value` pairs.
pub fn totals(c: &Counters) -> String {
    format!(
        "total accepted={} upgraded={} frames={} expired={} client_close={} peer_gone={} protocol_error={} handshake_timeout={} frame_timeout={} rejected={} slow_reader={} shutdown={} accept_exhausted={} internal_error={} replaced={} kicked={} auth_missing={} auth_bad={} auth_expired={} proxy_bad={} proxy_missing={} tls_failed={} plain_on_tls={} tls_on_plain={} tls_handshakes={} tls_resumed={} cq_overflows={} cancels={} rejected_by_status={} expiry_lag_ms={} heartbeat_interval_ms={} events_dropped={} udp_heartbeats={} udp_bad={} udp_stale={} admission_refused={} admission_paused={}",
        c.accepted,
        c.upgraded,
        c.frames,
        c.expired,
        c.client_close,
        c.peer_gone,
        c.protocol_error,
        c.handshake_timeout,
        c.frame_timeout,
        c.rejected,
        c.slow_reader,
        c.shutdown,
        c.accept_exhausted,
        c.internal_error,
        c.replaced,
        c.kicked,
        c.auth_missing,
        c.auth_bad,
        c.auth_expired,
        c.proxy_bad,
        c.proxy_missing,
        c.tls_failed,
        c.plain_on_tls,
        c.tls_on_plain,
        c.tls_handshakes,
        c.tls_resumed,
        c.io_cq_overflows,
        c.io_cancels,
        REJECT_STATUSES
            .iter()
            .zip(c.rejected_by_status)
            .map(|(s, n)| format!("{s}:{n}"))
            .collect::<Vec<_>>()
            .join(","),
        c.expiry_lag.to_field(),
        c.heartbeat_interval.to_field(),
        c.events_dropped,
        c.udp_heartbeats,
        c.udp_bad,
        c.udp_stale,
        c.admission_refused,
        c.admission_paused,
    )
}

/// Reads `rejected_by_status=400:1,401:0,...` back (statuses in any order).
fn parse_statuses(text: &str) -> Option<[u64; REJECT_STATUSES.len()]> {
    let mut out = [0; REJECT_STATUSES.len()];
    for pair in text.split(',') {
        let (status, n) = pair.split_once(':')?;
        let status: u16 = status.parse().ok()?;
        let i = REJECT_STATUSES.iter().position(|&s| s == status)?;
        out[i] = n.parse().ok()?;
    }
    Some(out)
}

/// Reads a stats line or a `final` line back: (conns, sockets, totals);
/// conns and sockets are 0 in a `final` line. None if it is neither.
pub fn parse<'a>(line: &'a str) -> Option<(u64, u64, Counters)> {
    let (head, totals) = line.split_once("total ")?;
    let field = |text: &str, key: &str| -> Option<u64> {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    };
    let t = |key: &str| field(totals, key);
    let text = |text: &'a str, key: &str| -> Option<&'a str> {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    };
    let c = Counters {
        accepted: t("accepted")?,
        upgraded: t("upgraded")?,
        frames: t("frames")?,
        expired: t("expired")?,
        client_close: t("client_close")?,
        peer_gone: t("peer_gone")?,
        protocol_error: t("protocol_error")?,
        handshake_timeout: t("handshake_timeout")?,
        frame_timeout: t("frame_timeout")?,
        rejected: t("rejected")?,
        slow_reader: t("slow_reader")?,
        shutdown: t("shutdown")?,
        accept_exhausted: t("accept_exhausted")?,
        internal_error: t("internal_error")?,
        replaced: t("replaced").unwrap_or(0),
        kicked: t("kicked").unwrap_or(0),
        // Optional: lines of servers from before auth lack them.
        auth_missing: t("auth_missing").unwrap_or(0),
        auth_bad: t("auth_bad").unwrap_or(0),
        auth_expired: t("auth_expired").unwrap_or(0),
        proxy_bad: t("proxy_bad").unwrap_or(0),
        proxy_missing: t("proxy_missing").unwrap_or(0),
        tls_failed: t("tls_failed").unwrap_or(0),
        plain_on_tls: t("plain_on_tls").unwrap_or(0),
        tls_on_plain: t("tls_on_plain").unwrap_or(0),
        tls_handshakes: t("tls_handshakes").unwrap_or(0),
        tls_resumed: t("tls_resumed").unwrap_or(0),
        io_cq_overflows: t("cq_overflows").unwrap_or(0),
        io_cancels: t("cancels").unwrap_or(0),
        rejected_by_status: text(totals, "rejected_by_status")
            .and_then(parse_statuses)
            .unwrap_or_default(),
        expiry_lag: text(totals, "expiry_lag_ms")
            .and_then(Hist::from_field)
            .unwrap_or_default(),
        heartbeat_interval: text(totals, "heartbeat_interval_ms")
            .and_then(Hist::from_field)
            .unwrap_or_default(),
        events_dropped: t("events_dropped").unwrap_or(0),
        udp_heartbeats: t("udp_heartbeats").unwrap_or(0),
        udp_bad: t("udp_bad").unwrap_or(0),
        udp_stale: t("udp_stale").unwrap_or(0),
        admission_refused: t("admission_refused").unwrap_or(0),
        admission_paused: t("admission_paused").unwrap_or(0),
    };
    Some((
        field(head, "conns").unwrap_or(0),
        field(head, "sockets").unwrap_or(0),
        c,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_reports_rates_per_shard_and_totals() {
        let a = Counters {
            accepted: 10,
            upgraded: 10,
            expired: 4,
            ..Counters::default()
        };
        let shards = [
            Snapshot {
                shard: 0,
                open: 3,
                sockets: 3,
                totals: a,
            },
            Snapshot {
                shard: 1,
                open: 3,
                sockets: 3,
                totals: a,
            },
        ];
        let mut sum = Counters::default();
        sum.add(&a);
        sum.add(&a);
        let l = line(2.0, &shards, &Counters::default(), &sum, 2.0);
        assert!(
            l.starts_with("t=2.0 conns=6 sockets=6 shards=[3,3] accepted/s=10 upgraded/s=10"),
            "{l}"
        );
        assert!(l.contains("expired/s=4 "), "{l}");
        assert!(
            l.contains("total accepted=20 upgraded=20 frames=0 expired=8"),
            "{l}"
        );
        assert_eq!(sum.closed(), 8);
        assert_eq!(parse(&l), Some((6, 6, sum)));
        let all = Counters {
            accepted: 1,
            upgraded: 2,
            frames: 3,
            expired: 4,
            client_close: 5,
            peer_gone: 6,
            protocol_error: 7,
            handshake_timeout: 8,
            frame_timeout: 9,
            rejected: 10,
            slow_reader: 11,
            shutdown: 12,
            accept_exhausted: 13,
            internal_error: 14,
            replaced: 17,
            kicked: 21,
            auth_missing: 18,
            auth_bad: 19,
            auth_expired: 20,
            proxy_bad: 22,
            proxy_missing: 23,
            tls_failed: 27,
            plain_on_tls: 28,
            tls_on_plain: 29,
            tls_handshakes: 30,
            tls_resumed: 31,
            io_cq_overflows: 15,
            io_cancels: 16,
            rejected_by_status: [1, 2, 3, 0, 0, 0, 4],
            expiry_lag: Hist {
                counts: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
                sum_ms: 99,
            },
            heartbeat_interval: Hist {
                counts: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                sum_ms: 300_001,
            },
            events_dropped: 24,
            udp_heartbeats: 32,
            udp_bad: 33,
            udp_stale: 34,
            admission_refused: 35,
            admission_paused: 36,
        };
        assert_eq!(parse(&format!("final {}", totals(&all))), Some((0, 0, all)));
        assert_eq!(parse("server: listening"), None);
        assert_eq!(parse("final total accepted=1"), None);
        // A line without the optional keys still parses, with them at 0.
        let old = "final total accepted=1 upgraded=1 frames=0 expired=0 client_close=0 peer_gone=0 protocol_error=0 handshake_timeout=0 frame_timeout=0 rejected=0 slow_reader=0 shutdown=0 accept_exhausted=0 internal_error=0";
        let (_, _, c) = parse(old).unwrap();
        assert_eq!(
            (c.replaced, c.auth_missing, c.auth_bad, c.auth_expired),
            (0, 0, 0, 0)
        );
    }
}
