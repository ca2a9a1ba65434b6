//! Per-shard counters and the one-line stats report built from their
//! snapshots. Shards never share counters: each sends a copy of its own, by
//! message, and the reporter sums them.

use std::fmt::Write as _;

use crate::hist::{Hist, EXPIRY_LAG_MS, HEARTBEAT_INTERVAL_MS};

/// A Prometheus counter family of /metrics: its samples are the fields
/// that name it in [`Counters`]' table, in the table's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
}

const fn family(name: &'static str, help: &'static str) -> Family {
    Family { name, help }
}

pub const ACCEPTED: Family = family("c1m_accepted_total", "TCP connections accepted.");
pub const UPGRADED: Family = family(
    "c1m_upgraded_total",
    "Connections upgraded to WebSocket (101).",
);
pub const FRAMES: Family = family(
    "c1m_frames_received_total",
    "WebSocket frames received from devices (heartbeats and data).",
);
/// Its reasons are [`Counters::closed`].
pub const CLOSED: Family = family(
    "c1m_closed_total",
    "Connections ended, by reason; every accepted connection ends with exactly one.",
);
pub const TLS_HANDSHAKES: Family = family(
    "c1m_tls_handshakes_total",
    "TLS handshakes completed (--tls-cert), full or resumed with a session ticket.",
);
pub const AUTH_FAILURES: Family = family(
    "c1m_auth_failures_total",
    "Upgrades refused 401 (also closed with reason rejected), by reason.",
);
pub const UDP_HEARTBEATS: Family = family(
    "c1m_udp_heartbeats_total",
    "UDP heartbeat datagrams (--udp-heartbeat) that refreshed a connection.",
);
pub const UDP_DROPPED: Family = family(
    "c1m_udp_dropped_total",
    "UDP heartbeat datagrams dropped, by reason: bad (not a valid ticket of the shard that got it), stale (its connection is gone).",
);
pub const ACCEPT_EXHAUSTED: Family = family(
    "c1m_accept_exhausted_total",
    "Accepts that failed for lack of descriptors or memory.",
);
pub const ADMISSION_REFUSED: Family = family(
    "c1m_admission_refused_total",
    "Connections answered 503 (a reset on a TLS port) at accept, over --max-upgrades-per-sec.",
);
pub const ADMISSION_PAUSES: Family = family(
    "c1m_admission_pauses_total",
    "Times a shard stopped accepting for a moment: over --max-upgrades-per-sec (--upgrade-excess defer), or at its share of --max-handshakes.",
);
pub const IO_CQ_OVERFLOWS: Family = family(
    "c1m_io_cq_overflows_total",
    "io_uring waits that found completions held back by a full completion queue.",
);
pub const IO_SQ_FULL: Family = family(
    "c1m_io_sq_full_total",
    "io_uring submits tried because the submission queue was full, retries after EBUSY or EAGAIN included (past 1,000 for one request the shard stops, in one sentence).",
);
pub const ADMIT_DROPPED: Family = family(
    "c1m_admit_dropped_total",
    "Connections accepted and dropped before they were served: the driver could not watch them, TLS could not start, or shutdown had begun (not in accepted).",
);
pub const TLS_ABANDONED: Family = family(
    "c1m_tls_abandoned_total",
    "TLS connections closed in their handshake without reading their bytes: their device had already left (its reset or FIN had arrived); also in closed{reason=\"peer_gone\"}.",
);
pub const IO_CANCELS: Family = family(
    "c1m_io_cancels_total",
    "io_uring cancel requests submitted.",
);
pub const EVENTS_DROPPED: Family = family(
    "c1m_events_dropped_total",
    "Lifecycle events (--nats) dropped because the publisher's queue was full (the broker down or slow).",
);

pub const HANDED_OVER: Family = family(
    "c1m_handed_over_total",
    "Connections this process handed to a new binary in a hot upgrade.",
);

pub const TAKEN_OVER: Family = family(
    "c1m_taken_over_total",
    "Connections this process took from the old binary in a hot upgrade.",
);

/// The counter families in the order /metrics lists them (then come the
/// fields with a family of their own, [`Prom::Own`], in the table's order).
pub const FAMILIES: [Family; 19] = [
    ACCEPTED,
    UPGRADED,
    FRAMES,
    CLOSED,
    TLS_HANDSHAKES,
    AUTH_FAILURES,
    UDP_HEARTBEATS,
    UDP_DROPPED,
    ADMISSION_REFUSED,
    ADMISSION_PAUSES,
    ACCEPT_EXHAUSTED,
    ADMIT_DROPPED,
    TLS_ABANDONED,
    IO_CQ_OVERFLOWS,
    IO_SQ_FULL,
    IO_CANCELS,
    EVENTS_DROPPED,
    HANDED_OVER,
    TAKEN_OVER,
];

/// Where a field is in the stats line: every field is in its totals (after
/// `|`), by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// Also a rate before `|` (`key/s=`); required to read a line back.
    Rate,
    /// Required to read a line back.
    Total,
    /// Read back as 0 (its default) from lines of servers that lacked it.
    Optional,
}

/// Where a field is in /metrics.
#[derive(Debug, Clone, Copy)]
pub enum Prom {
    /// The unlabelled sample of a counter family.
    Plain(Family),
    /// The sample `reason="..."` of a counter family.
    Reason(Family, &'static str),
    /// The sample `reason="..."` of a counter family, computed from the
    /// counters (rather than this field alone).
    ReasonOf(Family, &'static str, fn(&Counters) -> u64),
    /// A family of its own (HELP, TYPE and samples), written by the function.
    Own(fn(&Counters, &mut String)),
}

/// What [`Counters`]' table says of a field: its place in the stats line
/// and in /metrics.
#[derive(Debug, Clone, Copy)]
pub struct Stat(pub Line, pub Prom);

impl c1m_proto::counters::Meta for Stat {
    fn required(&self) -> bool {
        self.0 != Line::Optional
    }
}

impl Stat {
    /// The counter family it is a sample of, if any.
    pub fn family(&self) -> Option<Family> {
        match self.1 {
            Prom::Plain(f) | Prom::Reason(f, _) | Prom::ReasonOf(f, _, _) => Some(f),
            Prom::Own(_) => None,
        }
    }
}

use Line::{Optional, Rate, Total};
use Prom::{Own, Plain, Reason, ReasonOf};

c1m_proto::counter_table! {
    /// Cumulative totals of one shard (or of the sum of all shards).
    ///
    /// The table, field by field: its key in the stats line, then a [`Stat`]:
    /// its [`Line`] and its [`Prom`]. The line's totals list every field
    /// in this order.
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    pub struct Counters: Stat {
        accepted: u64 = "accepted", Stat(Rate, Plain(ACCEPTED));
        upgraded: u64 = "upgraded", Stat(Rate, Plain(UPGRADED));
        /// Frames received from devices (heartbeats and data alike).
        frames: u64 = "frames", Stat(Rate, Plain(FRAMES));
        /// Silent past the timeout and deleted.
        expired: u64 = "expired", Stat(Rate, Reason(CLOSED, "expired"));
        /// Ended by a Close frame from the device.
        client_close: u64 = "client_close", Stat(Rate, Reason(CLOSED, "client_close"));
        /// Ended by EOF or reset without a Close frame.
        peer_gone: u64 = "peer_gone", Stat(Rate, Reason(CLOSED, "peer_gone"));
        /// Ended by a protocol violation (1002/1007/1009).
        protocol_error: u64 = "protocol_error", Stat(Rate, Reason(CLOSED, "protocol_error"));
        /// No complete upgrade within the handshake timeout.
        handshake_timeout: u64 = "handshake_timeout", Stat(Rate, Reason(CLOSED, "handshake_timeout"));
        /// A frame begun but not completed within the frame timeout.
        frame_timeout: u64 = "frame_timeout", Stat(Rate, Reason(CLOSED, "frame_timeout"));
        /// Upgrade refused with an HTTP error (4xx, 503).
        rejected: u64 = "rejected", Stat(Rate, Reason(CLOSED, "rejected"));
        /// Closed because the device did not read its pending output.
        slow_reader: u64 = "slow_reader", Stat(Rate, Reason(CLOSED, "slow_reader"));
        /// Closed by server shutdown (drain timeout or still handshaking).
        shutdown: u64 = "shutdown", Stat(Total, Reason(CLOSED, "shutdown"));
        /// Accept failed for lack of descriptors or memory.
        accept_exhausted: u64 = "accept_exhausted", Stat(Total, Plain(ACCEPT_EXHAUSTED));
        /// Connections closed because handling them hit a bug (a panic, contained).
        internal_error: u64 = "internal_error", Stat(Total, Reason(CLOSED, "internal_error"));
        /// Closed with 4000 because a newer connection took the device's id.
        replaced: u64 = "replaced", Stat(Optional, Reason(CLOSED, "replaced"));
        /// Closed with 4001 by an operator (DELETE /devices/<id>).
        kicked: u64 = "kicked", Stat(Optional, Reason(CLOSED, "kicked"));
        /// Refused 401 (also counted in `rejected`): no token, a bad one, an expired one.
        auth_missing: u64 = "auth_missing", Stat(Optional, Reason(AUTH_FAILURES, "missing"));
        auth_bad: u64 = "auth_bad", Stat(Optional, Reason(AUTH_FAILURES, "bad"));
        auth_expired: u64 = "auth_expired", Stat(Optional, Reason(AUTH_FAILURES, "expired"));
        /// --proxy-protocol: closed for a malformed PROXY header, or for none
        /// within the handshake timeout.
        proxy_bad: u64 = "proxy_bad", Stat(Optional, Reason(CLOSED, "proxy_bad"));
        proxy_missing: u64 = "proxy_missing", Stat(Optional, Reason(CLOSED, "proxy_missing"));
        /// TLS (--tls-cert): the handshake or a record failed (a bad record,
        /// an alert such as the device rejecting our certificate).
        tls_failed: u64 = "tls_failed", Stat(Optional, Reason(CLOSED, "tls_failed"));
        /// TLS port: the first bytes were not a TLS handshake (plaintext HTTP?).
        plain_on_tls: u64 = "plain_on_tls", Stat(Optional, Reason(CLOSED, "plain_on_tls"));
        /// Plaintext port: the first bytes were a TLS handshake record.
        tls_on_plain: u64 = "tls_on_plain", Stat(Optional, Reason(CLOSED, "tls_on_plain"));
        /// TLS handshakes completed (not a close reason), and of them resumed
        /// with a session ticket.
        tls_handshakes: u64 = "tls_handshakes", Stat(Optional, ReasonOf(TLS_HANDSHAKES, "full",
            |c| c.tls_handshakes - c.tls_resumed.min(c.tls_handshakes)));
        tls_resumed: u64 = "tls_resumed", Stat(Optional, Reason(TLS_HANDSHAKES, "resumed"));
        /// TLS: closed in the handshake without reading the bytes that had
        /// come, their device gone already (also in `peer_gone`).
        tls_abandoned: u64 = "tls_abandoned", Stat(Optional, Plain(TLS_ABANDONED));
        /// io_uring: waits that found completions held back by a full CQ.
        io_cq_overflows: u64 = "cq_overflows", Stat(Optional, Plain(IO_CQ_OVERFLOWS));
        /// io_uring: cancel requests submitted (the design submits none).
        io_cancels: u64 = "cancels", Stat(Optional, Plain(IO_CANCELS));
        /// io_uring: submits of a full submission queue, retries included.
        io_sq_full: u64 = "sq_full", Stat(Optional, Plain(IO_SQ_FULL));
        /// Accepted sockets dropped in admission: the driver could not
        /// watch them, or TLS could not start (not counted in `accepted`).
        admit_dropped: u64 = "admit_dropped", Stat(Optional, Plain(ADMIT_DROPPED));
        /// `rejected`, by HTTP status, in the order of [`REJECT_STATUSES`].
        rejected_by_status: ByStatus = "rejected_by_status", Stat(Optional, Own(|c, out|
            c.rejected_by_status.render(out, "c1m_rejected_total",
                "Upgrades refused with an HTTP error, by status.")));
        /// How late after their deadline silent devices were deleted.
        expiry_lag: Hist = "expiry_lag_ms", Stat(Optional, Own(|c, out|
            c.expiry_lag.render(out, "c1m_expiry_lag_seconds",
                "How late silent devices were deleted after their deadline (last frame + timeout), measured from the start of the last frame's tick.",
                &EXPIRY_LAG_MS)));
        /// Time between reads of frames from one device.
        heartbeat_interval: Hist = "heartbeat_interval_ms", Stat(Optional, Own(|c, out|
            c.heartbeat_interval.render(out, "c1m_heartbeat_interval_seconds",
                "Time between reads of frames from one device, at the resolution of the tick.",
                &HEARTBEAT_INTERVAL_MS)));
        /// Lifecycle events (--nats) dropped because the publisher's queue was
        /// full (the broker down or slow): the shard never waits for it.
        events_dropped: u64 = "events_dropped", Stat(Optional, Plain(EVENTS_DROPPED));
        /// --udp-heartbeat: datagrams that refreshed a connection; that were
        /// not a valid ticket of this shard (wrong length, shard or MAC); that
        /// named no live connection (closed, slot reused, replaced).
        udp_heartbeats: u64 = "udp_heartbeats", Stat(Optional, Plain(UDP_HEARTBEATS));
        udp_bad: u64 = "udp_bad", Stat(Optional, Reason(UDP_DROPPED, "bad"));
        udp_stale: u64 = "udp_stale", Stat(Optional, Reason(UDP_DROPPED, "stale"));
        /// --max-upgrades-per-sec: connections answered 503 (a reset on a TLS
        /// port) at accept, over the budget (not in `accepted` or `rejected`:
        /// no work was done for them); and times accepting paused (`defer`).
        admission_refused: u64 = "admission_refused", Stat(Optional, Plain(ADMISSION_REFUSED));
        admission_paused: u64 = "admission_paused", Stat(Optional, Plain(ADMISSION_PAUSES));
        /// Hot upgrade: connections handed to the new binary (old), taken
        /// from the old one (new).
        handed_over: u64 = "handed_over", Stat(Optional, Plain(HANDED_OVER));
        taken_over: u64 = "taken_over", Stat(Optional, Plain(TAKEN_OVER));
    }
}

/// Every status an upgrade can be refused with.
pub const REJECT_STATUSES: [u16; 7] = [400, 401, 404, 405, 426, 431, 503];

/// Refusals by HTTP status, in the order of [`REJECT_STATUSES`]; in the
/// stats line `400:1,401:0,...`.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub struct ByStatus(pub [u64; REJECT_STATUSES.len()]);

impl std::fmt::Debug for ByStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl c1m_proto::counters::Field for ByStatus {
    fn merge(&mut self, o: &ByStatus, _: c1m_proto::counters::Merge) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a += b;
        }
    }

    fn write(&self, out: &mut String) {
        for (i, (s, n)) in REJECT_STATUSES.iter().zip(self.0).enumerate() {
            let _ = write!(out, "{}{s}:{n}", if i > 0 { "," } else { "" });
        }
    }

    /// Statuses in any order.
    fn read(text: &str) -> Option<ByStatus> {
        let mut out = ByStatus::default();
        for pair in text.split(',') {
            let (status, n) = pair.split_once(':')?;
            let status: u16 = status.parse().ok()?;
            let i = REJECT_STATUSES.iter().position(|&s| s == status)?;
            out.0[i] = n.parse().ok()?;
        }
        Some(out)
    }

    fn count(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl ByStatus {
    /// `name{status="..."}` of every status, as a counter family.
    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (status, n) in REJECT_STATUSES.iter().zip(self.0) {
            let _ = writeln!(out, "{name}{{status=\"{status}\"}} {n}");
        }
    }
}

/// In the stats line: [`Hist::to_field`].
impl c1m_proto::counters::Field for Hist {
    fn merge(&mut self, o: &Hist, _: c1m_proto::counters::Merge) {
        self.add(o);
    }

    fn write(&self, out: &mut String) {
        out.push_str(&self.to_field());
    }

    fn read(text: &str) -> Option<Hist> {
        Hist::from_field(text)
    }

    fn count(&self) -> u64 {
        Hist::count(self)
    }
}

impl Counters {
    /// Counts one refusal with `status`.
    pub fn reject(&mut self, status: u16) {
        self.rejected += 1;
        if let Some(i) = REJECT_STATUSES.iter().position(|&s| s == status) {
            self.rejected_by_status.0[i] += 1;
        }
    }

    /// Every connection that ended, for any reason: the samples of
    /// [`CLOSED`].
    pub fn closed(&self) -> u64 {
        Counters::FIELDS
            .iter()
            .zip(self.counts())
            .filter(|((_, stat), _)| stat.family() == Some(CLOSED))
            .map(|(_, n)| n)
            .sum()
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
    s.push(']');
    let (now_n, prev_n) = (now.counts(), prev.counts());
    for (i, (key, stat)) in Counters::FIELDS.iter().enumerate() {
        if stat.0 == Line::Rate {
            let _ = write!(s, " {key}/s={:.0}", rate(now_n[i], prev_n[i]));
        }
    }
    let _ = write!(s, " | {}", totals(now));
    s
}

/// The cumulative totals as `key=value` pairs, after `total`.
pub fn totals(c: &Counters) -> String {
    let mut s = String::with_capacity(700);
    s.push_str("total ");
    c.write_words(&mut s);
    s
}

/// Reads a stats line or a `final` line back: (conns, sockets, totals);
/// conns and sockets are 0 in a `final` line. None if it is neither.
pub fn parse(line: &str) -> Option<(u64, u64, Counters)> {
    let (head, totals) = line.split_once("total ")?;
    let c = Counters::read_words(totals)?;
    let field = |key| c1m_proto::counters::find(head, key).unwrap_or(0);
    Some((field("conns"), field("sockets"), c))
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
            tls_abandoned: 39,
            io_cq_overflows: 15,
            io_cancels: 16,
            io_sq_full: 37,
            admit_dropped: 38,
            rejected_by_status: ByStatus([1, 2, 3, 0, 0, 0, 4]),
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
            handed_over: 37,
            taken_over: 38,
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

    /// [`Counters`] with every field non-zero and no two u64 fields equal.
    fn every_field_set() -> Counters {
        let mut c = Counters {
            rejected_by_status: ByStatus([1, 2, 3, 4, 5, 6, 7]),
            expiry_lag: Hist {
                counts: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
                sum_ms: 99,
            },
            heartbeat_interval: Hist {
                counts: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                sum_ms: 300_001,
            },
            ..Counters::default()
        };
        for (i, (key, _)) in Counters::FIELDS.iter().enumerate() {
            c.set_word(key, &(1000 + i).to_string());
        }
        for (n, (key, _)) in c.counts().iter().zip(Counters::FIELDS) {
            assert_ne!(*n, 0, "{key} is not set here: a new kind of field?");
        }
        c
    }

    #[test]
    fn every_field_of_the_table_is_in_the_stats_line_once_and_reads_back() {
        let all = every_field_set();
        let snap = Snapshot {
            shard: 0,
            open: 7,
            sockets: 9,
            totals: all,
        };
        let l = line(1.0, &[snap], &Counters::default(), &all, 1.0);
        let (head, tail) = l.split_once(" | total ").unwrap();
        assert_eq!(tail.split(' ').count(), Counters::LEN, "{tail}");
        let mut keys = Vec::new();
        for (i, (key, stat)) in Counters::FIELDS.iter().enumerate() {
            assert!(!keys.contains(key), "{key} twice in the table");
            keys.push(*key);
            let once = |text: &str, prefix: &str| {
                text.split(' ').filter(|w| w.starts_with(prefix)).count()
            };
            assert_eq!(once(tail, &format!("{key}=")), 1, "{key} in {tail}");
            let rated = usize::from(stat.0 == Line::Rate);
            assert_eq!(once(head, &format!("{key}/s=")), rated, "{key} in {head}");
            // Without its word, a line reads as None or with the field at 0.
            let cut = l.replace(&format!(" {key}="), " gone=");
            match stat.0 {
                Line::Rate | Line::Total => assert_eq!(parse(&cut), None, "{key}"),
                Line::Optional => {
                    let (_, _, c) = parse(&cut).unwrap();
                    assert_eq!(c.counts()[i], 0, "{key}");
                    let mut others = (c.counts(), all.counts());
                    (others.0[i], others.1[i]) = (0, 0);
                    assert_eq!(others.0, others.1, "{key}");
                }
            }
        }
        assert_eq!(parse(&l), Some((7, 9, all)));
        assert_eq!(parse(&format!("final {}", totals(&all))), Some((0, 0, all)));
        let mut twice = all;
        twice.add(&all);
        let doubled = all.counts().map(|n| 2 * n);
        assert_eq!(twice.counts(), doubled);
    }

    #[test]
    fn every_field_of_the_table_is_in_metrics_once_and_reads_back() {
        use prometheus_parse::{Scrape, Value};
        let all = every_field_set();
        let text = crate::admin::render("shard", &[], &all);
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let declared = |name: &str| {
            let kind = |k| format!("# TYPE {name} {k}");
            text.lines()
                .filter(|l| ["counter", "histogram"].iter().any(|&k| *l == kind(k)))
                .count()
        };
        for (i, family) in FAMILIES.iter().enumerate() {
            assert!(!FAMILIES[..i].contains(family), "{} twice", family.name);
            assert_eq!(declared(family.name), 1, "{}", family.name);
        }
        let (mut samples, mut own_lines) = (0, 0);
        for ((key, stat), n) in Counters::FIELDS.iter().zip(all.counts()) {
            let (family, reason, value) = match stat.1 {
                Prom::Plain(f) => (f, None, n),
                Prom::Reason(f, r) => (f, Some(r), n),
                Prom::ReasonOf(f, r, value) => (f, Some(r), value(&all)),
                Prom::Own(render) => {
                    let mut own = String::new();
                    render(&all, &mut own);
                    assert_eq!(text.matches(&own).count(), 1, "{key}: {own}");
                    let name = own.lines().find_map(|l| l.strip_prefix("# TYPE ")).unwrap();
                    let name = name.split(' ').next().unwrap();
                    assert_eq!(declared(name), 1, "{key}: {name}");
                    own_lines += own.lines().filter(|l| !l.starts_with('#')).count();
                    continue;
                }
            };
            assert!(
                FAMILIES.contains(&family),
                "{key}: {} unlisted",
                family.name
            );
            let found: Vec<f64> = scrape
                .samples
                .iter()
                .filter(|s| s.metric == family.name && s.labels.get("reason") == reason)
                .map(|s| match s.value {
                    Value::Counter(v) => v,
                    ref other => panic!("{key}: {other:?}"),
                })
                .collect();
            assert_eq!(found, [value as f64], "{key}: {} {reason:?}", family.name);
            samples += 1;
        }
        // Nothing else: every sample line is a field's.
        let lines = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(lines, samples + own_lines);
        // A family's samples read back in the table's order.
        let closed: Vec<(&str, u64)> = Counters::FIELDS
            .iter()
            .zip(all.counts())
            .filter_map(|((_, stat), n)| match stat.1 {
                Prom::Reason(f, r) if f == CLOSED => Some((r, n)),
                _ => None,
            })
            .collect();
        let sampled: Vec<(&str, u64)> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == CLOSED.name)
            .map(|s| match s.value {
                Value::Counter(v) => (s.labels.get("reason").unwrap(), v as u64),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(sampled, closed);
        assert_eq!(all.closed(), closed.iter().map(|(_, n)| n).sum::<u64>());
    }
}
