//! How a connection ended: one value per way, carrying its counter (the
//! stats line's key, which is also its `reason` label of
//! `c1m_closed_total` in /metrics) and its disconnect event's reason
//! (docs/nats.md). The shard's one function that ends a connection
//! (`State::end`) takes one, counts it and keeps it in the slot for the
//! event; nothing else counts an end.
//!
//! Counting one is an add to one field, as the hand-written increments it
//! replaces were (the variant is a constant at every call site).

use crate::stats::Counters;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Silent past --timeout and deleted.
    Expired,
    /// The device sent a Close frame.
    ClientClose,
    /// The device answered the drain's Close 1001 (counted as a Close from
    /// the device; its event says the server was stopping).
    AnsweredDrain,
    /// EOF or a reset without a Close frame (or TLS close_notify).
    PeerGone,
    /// A protocol violation, with the Close code sent (1002, 1007, 1009).
    ProtocolError(u16),
    /// No complete upgrade within --handshake-timeout.
    HandshakeTimeout,
    /// A frame begun and not finished within --frame-timeout.
    FrameTimeout,
    /// The upgrade was refused with this HTTP status.
    Rejected(u16),
    /// It did not read its output.
    SlowReader,
    /// The server is stopping (the drain's deadline, a device still in its
    /// handshake, or one gone while its Close 1001 was out).
    Shutdown,
    /// Handling it hit a bug (a contained panic).
    InternalError,
    /// A newer connection took the id (Close 4000).
    Replaced,
    /// An operator kicked it (Close 4001).
    Kicked,
    /// --proxy-protocol: a malformed PROXY header, or none in time.
    ProxyBad,
    ProxyMissing,
    /// TLS: the handshake or a record failed.
    TlsFailed,
    /// The first bytes on the TLS port were not a TLS handshake.
    PlainOnTls,
    /// The first bytes on the plaintext port were a TLS handshake.
    TlsOnPlain,
}

impl Ended {
    /// Every way, for the tests that hold it to the counter table.
    pub const ALL: [Ended; 18] = [
        Ended::Expired,
        Ended::ClientClose,
        Ended::AnsweredDrain,
        Ended::PeerGone,
        Ended::ProtocolError(1002),
        Ended::HandshakeTimeout,
        Ended::FrameTimeout,
        Ended::Rejected(400),
        Ended::SlowReader,
        Ended::Shutdown,
        Ended::InternalError,
        Ended::Replaced,
        Ended::Kicked,
        Ended::ProxyBad,
        Ended::ProxyMissing,
        Ended::TlsFailed,
        Ended::PlainOnTls,
        Ended::TlsOnPlain,
    ];

    /// Its counter: the key in the stats line and the `reason` label of
    /// `c1m_closed_total`.
    pub fn counter(self) -> &'static str {
        match self {
            Ended::Expired => "expired",
            Ended::ClientClose | Ended::AnsweredDrain => "client_close",
            Ended::PeerGone => "peer_gone",
            Ended::ProtocolError(_) => "protocol_error",
            Ended::HandshakeTimeout => "handshake_timeout",
            Ended::FrameTimeout => "frame_timeout",
            Ended::Rejected(_) => "rejected",
            Ended::SlowReader => "slow_reader",
            Ended::Shutdown => "shutdown",
            Ended::InternalError => "internal_error",
            Ended::Replaced => "replaced",
            Ended::Kicked => "kicked",
            Ended::ProxyBad => "proxy_bad",
            Ended::ProxyMissing => "proxy_missing",
            Ended::TlsFailed => "tls_failed",
            Ended::PlainOnTls => "plain_on_tls",
            Ended::TlsOnPlain => "tls_on_plain",
        }
    }

    /// Its disconnect event's `reason` (docs/nats.md). Only upgraded
    /// connections have events; a TLS failure after the upgrade reads as
    /// `reset`, as the ways of a connection never upgraded would.
    pub fn event(self) -> &'static str {
        match self {
            Ended::Expired => "expired",
            Ended::ClientClose => "closed_by_device",
            Ended::AnsweredDrain | Ended::Shutdown => "shutdown",
            Ended::ProtocolError(_) => "protocol_error",
            Ended::FrameTimeout => "frame_timeout",
            Ended::SlowReader => "slow_reader",
            Ended::InternalError => "internal_error",
            Ended::Replaced => "replaced",
            Ended::Kicked => "kicked",
            Ended::PeerGone
            | Ended::HandshakeTimeout
            | Ended::Rejected(_)
            | Ended::ProxyBad
            | Ended::ProxyMissing
            | Ended::TlsFailed
            | Ended::PlainOnTls
            | Ended::TlsOnPlain => "reset",
        }
    }

    /// Adds one to its counter (and a refusal to its status's).
    #[inline]
    pub fn count(self, c: &mut Counters) {
        *match self {
            Ended::Expired => &mut c.expired,
            Ended::ClientClose | Ended::AnsweredDrain => &mut c.client_close,
            Ended::PeerGone => &mut c.peer_gone,
            Ended::ProtocolError(_) => &mut c.protocol_error,
            Ended::HandshakeTimeout => &mut c.handshake_timeout,
            Ended::FrameTimeout => &mut c.frame_timeout,
            Ended::Rejected(status) => return c.reject(status),
            Ended::SlowReader => &mut c.slow_reader,
            Ended::Shutdown => &mut c.shutdown,
            Ended::InternalError => &mut c.internal_error,
            Ended::Replaced => &mut c.replaced,
            Ended::Kicked => &mut c.kicked,
            Ended::ProxyBad => &mut c.proxy_bad,
            Ended::ProxyMissing => &mut c.proxy_missing,
            Ended::TlsFailed => &mut c.tls_failed,
            Ended::PlainOnTls => &mut c.plain_on_tls,
            Ended::TlsOnPlain => &mut c.tls_on_plain,
        } += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Prom, CLOSED};

    /// Each way adds one to the one field its counter names, a sample of
    /// `c1m_closed_total` labelled with that name; every such sample is
    /// some way's.
    #[test]
    fn each_way_counts_one_closed_sample_named_as_its_counter() {
        let closed: Vec<(usize, &str)> = Counters::FIELDS
            .iter()
            .enumerate()
            .filter_map(|(i, (key, stat))| match stat.1 {
                Prom::Reason(f, label) if f == CLOSED => {
                    assert_eq!(*key, label, "a closed sample labelled unlike its key");
                    Some((i, *key))
                }
                _ => None,
            })
            .collect();
        for why in Ended::ALL {
            let mut c = Counters::default();
            why.count(&mut c);
            assert_eq!(c.closed(), 1, "{why:?}");
            let (i, key) = closed
                .iter()
                .find(|(_, key)| *key == why.counter())
                .unwrap_or_else(|| panic!("{why:?}: no closed sample {}", why.counter()));
            assert_eq!(c.counts()[*i], 1, "{why:?} counted elsewhere than {key}");
        }
        for (_, key) in &closed {
            assert!(
                Ended::ALL.iter().any(|w| w.counter() == *key),
                "no way ends as {key}"
            );
        }
        let mut c = Counters::default();
        Ended::Rejected(401).count(&mut c);
        assert_eq!(c.rejected_by_status.0[1], 1);
    }
}
