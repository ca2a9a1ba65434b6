//! Bytes in and out: a connection's reads (TLS opened, the core fed), the
//! upgrade answer (ticket, claim, 101), its writes (TLS sealed), and how
//! it ends (counted, then closed once its output is out).

use std::net::{IpAddr, SocketAddr};

use c1m_io::tls::{TlsError, HANDSHAKE_RECORD};
use c1m_io::{Close, Driver, Sent};
use c1m_proto::conn::{End, Phase};
use c1m_proto::device_id::DeviceId;
use c1m_proto::handshake::{Reject, Upgrade};

use super::{monotonic_ns, show, Slot, State};
use crate::directory::registry::Msg;
use crate::ended::Ended;
use crate::hist::HEARTBEAT_INTERVAL_MS;

/// What a plaintext request on the TLS port gets (as nginx answers it).
pub(super) const PLAIN_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 44\r\nConnection: close\r\n\r\nthis port speaks TLS: connect with wss://.\r\n";

impl State {
    /// Feeds bytes to the connection; its answers are left in `self.out`.
    /// Returns when it upgraded (monotonic ns, read before its 101 is
    /// sent: see [`State::register`]), and how it ends, if it does.
    /// With TLS, the records to send first (handshake, alerts) are left in
    /// `self.sealed`, which [`State::write`] sends `self.out` after.
    pub(super) fn on_bytes(
        &mut self,
        key: usize,
        bytes: &mut [u8],
    ) -> (Option<u64>, Option<Ended>) {
        let full = self.open >= self.cfg.max_conns as u64;
        let now = self.clock.now_tick;
        let unix_s = self.clock.now.unix_ms / 1000;
        let slot = &mut self.slab[key];
        self.out.clear();
        // TLS off: one branch for an upgraded device, more before its
        // upgrade. A connection whose end the TLS layer counted (its
        // protocol core never saw its bytes) only waits for its output:
        // what else it sends is not parsed, so it is never counted twice,
        // nor upgraded after a plaintext request on the TLS port.
        let data: &mut [u8] = match &mut slot.tls {
            None => {
                if !slot.upgraded {
                    if slot.ended.is_some() {
                        return (None, None);
                    }
                    if bytes.first() == Some(&HANDSHAKE_RECORD) && slot.conn.buffered() == 0 {
                        return (None, Some(Ended::TlsOnPlain));
                    }
                }
                bytes
            }
            Some(_) if slot.ended.is_some() => return (None, None),
            Some(tls) => {
                self.plain.clear();
                self.sealed.clear();
                match tls.feed(bytes, &mut self.plain, &mut self.sealed) {
                    Ok(fed) if fed.peer_closed && self.plain.is_empty() => {
                        return (None, Some(slot.gone()));
                    }
                    Ok(_) => {}
                    Err(TlsError::NotTls) => {
                        // Answered in plaintext, as the device spoke.
                        slot.tls = None;
                        self.sealed.clear();
                        self.out.extend_from_slice(PLAIN_ON_TLS);
                        return (None, Some(Ended::PlainOnTls));
                    }
                    Err(err) => {
                        use std::fmt::Write as _;
                        self.detail.clear();
                        let _ = write!(self.detail, "{err}");
                        return (None, Some(Ended::TlsFailed));
                    }
                }
                if self.plain.is_empty() {
                    // Handshake progress, or part of a record: a record
                    // begun after the upgrade must end within the frame
                    // timeout, as a frame must (it holds a buffer).
                    let partial = slot.upgraded && tls.buffered() > 0;
                    slot.track_partial(key, partial, now, self.clock.frame_ticks, &mut self.wheel);
                    return (None, None);
                }
                &mut self.plain
            }
        };
        let mut id = None;
        self.forwarded = None;
        let trust = !self.cfg.trust_forwarded.is_empty();
        let forwarded = &mut self.forwarded;
        let r = slot.conn.receive(
            data,
            &self.cfg.limits,
            &mut |u: &Upgrade<'_>| {
                // Before fullness: a device without a good token learns nothing else.
                if let Some(keys) = &self.cfg.auth {
                    use c1m_proto::auth::Denied;
                    if let Err(why) = keys.verify(&u.id, u.token, unix_s) {
                        *match why {
                            Denied::Missing => &mut self.counters.auth_missing,
                            Denied::Bad => &mut self.counters.auth_bad,
                            Denied::Expired => &mut self.counters.auth_expired,
                        } += 1;
                        return Err(Reject::Unauthorized(why));
                    }
                }
                if full {
                    return Err(Reject::Full);
                }
                id = Some(DeviceId::new(&u.id));
                if trust {
                    *forwarded = u.forwarded_for;
                }
                Ok(())
            },
            &mut self.out,
        );
        if let Some(id) = id {
            slot.id = id;
        }
        if r.proxied {
            slot.remote = r.source.map(Box::new);
        }
        if r.frames > 0 || r.upgraded {
            if slot.upgraded {
                let ms = (now - slot.last_seen) * self.clock.tick_ms;
                self.counters
                    .heartbeat_interval
                    .record(&HEARTBEAT_INTERVAL_MS, ms);
            }
            slot.last_seen = now;
            self.counters.frames += r.frames as u64;
            if r.upgraded {
                slot.upgraded = true;
                self.open += 1;
                self.counters.upgraded += 1;
                if let Some(tls) = &slot.tls {
                    self.counters.tls_handshakes += 1;
                    if tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        self.counters.tls_resumed += 1;
                    }
                }
                // The handshake deadline may be later than the first expiry.
                slot.bring_forward(key, now + self.clock.timeout_ticks + 1, &mut self.wheel);
            }
        }
        let partial = slot.conn.has_partial_frame()
            || (slot.upgraded && slot.tls.as_ref().is_some_and(|t| t.buffered() > 0));
        slot.track_partial(key, partial, now, self.clock.frame_ticks, &mut self.wheel);
        // Read now, not the turn's time: a claim's time orders it against
        // the device's next connection, whose turn on another shard may
        // have begun before this 101 went out.
        let end = r.end.map(|end| match end {
            // It answered our Close 1001 (or closed on its own during the drain).
            End::ClientClose if self.drain.deadline.is_some() => Ended::AnsweredDrain,
            End::ClientClose => Ended::ClientClose,
            End::ProtocolError(code) => Ended::ProtocolError(code),
            End::Rejected(status) => Ended::Rejected(status),
            End::BadProxy(why) => {
                self.detail.clear();
                self.detail.push_str(why);
                Ended::ProxyBad
            }
        });
        (r.upgraded.then(monotonic_ns), end)
    }

    /// Sends what [`State::on_bytes`] left in `self.out`, registers the
    /// device if it just upgraded, and ends the connection if it ended.
    pub(super) fn answer(
        &mut self,
        io: &mut impl Driver,
        key: usize,
        upgraded: Option<u64>,
        end: Option<Ended>,
    ) {
        let forwarded = self.forwarded.take();
        if upgraded.is_some() {
            self.add_ticket(key);
        }
        // Claimed before the 101 goes out: see [`State::register`].
        let displaced = upgraded.and_then(|since| {
            if let Some(ip) = forwarded {
                self.trust_forwarded(io, key, ip);
            }
            self.register(io, key, since)
        });
        match end {
            None => {
                if !(self.out.is_empty() && self.sealed.is_empty()) {
                    self.write(io, key);
                }
            }
            Some(why) => {
                self.warn_end(io, key, why);
                // Gone: nothing to say to it.
                let how = match why {
                    Ended::PeerGone | Ended::Shutdown => Close::Abortive,
                    _ => Close::Graceful,
                };
                self.end(io, key, why, how);
            }
        }
        // After the 101 went out (closing the displaced one reuses
        // `self.out`), and even if it could not: the claim was made.
        if let Some((id, at)) = displaced {
            self.deliver(io, at.shard as usize, Msg::Replaced { id, at });
        }
    }

    /// The warning an end read in a connection's bytes deserves, if any
    /// (at most one a second: [`State::warn`]); `self.detail` says why.
    fn warn_end(&mut self, io: &impl Driver, key: usize, why: Ended) {
        let peer = || io.peer_addr(self.slab[key].io);
        // Taken for the warning and given back (its capacity kept).
        let detail = std::mem::take(&mut self.detail);
        match why {
            Ended::ProxyBad => {
                let peer = peer();
                self.warn(format_args!(
                    "closed a connection from {} without a valid PROXY protocol header ({}); --proxy-protocol is on: connect through a front that sends one (nginx proxy_protocol on, HAProxy send-proxy)",
                    peer.map_or("?".into(), |a| a.to_string()),
                    detail
                ));
            }
            Ended::TlsFailed => {
                let peer = peer();
                self.warn(format_args!(
                    "TLS with {} failed ({}): closed it, counted as tls_failed",
                    show(peer),
                    detail
                ));
            }
            Ended::PlainOnTls => {
                let peer = peer();
                self.warn(format_args!(
                    "{} sent plaintext to the TLS port: answered 400 and closed, counted as plain_on_tls (devices must use wss://)",
                    show(peer)
                ));
            }
            Ended::TlsOnPlain => {
                let peer = peer();
                self.warn(format_args!(
                    "{} sent a TLS handshake to this plaintext port: closed, counted as tls_on_plain (start the server with --tls-cert/--tls-key for wss://, or connect with ws://)",
                    show(peer)
                ));
            }
            _ => {}
        }
        self.detail = detail;
    }

    /// The upgrade in slot `key` carried X-Forwarded-For `ip`: it becomes
    /// the device's address when the previous hop (the PROXY header's
    /// source, else the socket peer) is in a trusted network. XFF has no
    /// port, so the address shows port 0.
    pub(super) fn trust_forwarded(&mut self, io: &impl Driver, key: usize, ip: IpAddr) {
        let slot = &mut self.slab[key];
        let Some(hop) = slot
            .remote
            .as_deref()
            .copied()
            .or_else(|| io.peer_addr(slot.io))
        else {
            return;
        };
        if self
            .cfg
            .trust_forwarded
            .iter()
            .any(|net| net.contains(hop.ip()))
        {
            slot.remote = Some(Box::new(SocketAddr::new(ip, 0)));
        }
    }

    /// Sends `self.out` on the connection. False when it could not, and
    /// the connection was ended for that ([`State::end`]: a slow reader, a
    /// peer gone, a TLS failure).
    pub(super) fn write(&mut self, io: &mut impl Driver, key: usize) -> bool {
        match self.send(io, key) {
            Ok(()) => true,
            Err(why) => {
                self.end(io, key, why, Close::Abortive);
                false
            }
        }
    }

    /// Sends `self.out`; with TLS, sealed after whatever `self.sealed`
    /// holds (handshake records from the same read). When it cannot, the
    /// end that means, for the caller to make ([`State::end`]).
    pub(super) fn send(&mut self, io: &mut impl Driver, key: usize) -> Result<(), Ended> {
        let slot = &mut self.slab[key];
        let bytes: &[u8] = match &mut slot.tls {
            None => &self.out,
            Some(tls) => {
                if let Err(err) = tls.seal(&self.out, &mut self.sealed) {
                    self.sealed.clear();
                    self.warn(format_args!(
                        "cannot encrypt for a device ({err}): closed it, counted as tls_failed unless it had ended"
                    ));
                    return Err(Ended::TlsFailed);
                }
                &self.sealed
            }
        };
        let sent = io.send(slot.io, bytes);
        self.sealed.clear();
        match sent {
            Sent::Done | Sent::Queued => Ok(()),
            Sent::Overflow => Err(Ended::SlowReader),
            Sent::Failed => Err(self.slab[key].gone()),
        }
    }

    /// A panic while handling one connection: log it, count it, drop that
    /// connection (its state may be half-updated); the shard goes on.
    pub(super) fn internal_error(&mut self, io: &mut impl Driver, key: usize, cause: &str) {
        crate::say!(
            "shard {}: internal error on one connection ({cause}): closed it, the others are unaffected; please report this",
            self.id
        );
        if self.slab.contains(key) {
            self.end(io, key, Ended::InternalError, Close::Abortive);
        }
    }

    /// Whether `key` is a TLS connection in its handshake (not upgraded,
    /// not ended): its next bytes are worth work only if its device is
    /// still there.
    pub(super) fn in_tls_handshake(&self, key: usize) -> bool {
        let s = &self.slab[key];
        s.tls.is_some() && !s.upgraded && s.ended.is_none()
    }

    /// Whether the bytes of `key` (in its TLS handshake) are for a device
    /// that has left so that nothing it sent is worth reading: a reset at
    /// any point, a FIN before its hello was read (after it, what it sent
    /// may be an alert worth counting: our certificate refused).
    pub(super) fn abandoned(&self, key: usize, left: Option<c1m_io::PeerLeft>) -> bool {
        let hello_read = self.slab[key]
            .tls
            .as_ref()
            .is_some_and(|t| t.protocol_version().is_some());
        match left {
            Some(c1m_io::PeerLeft::Reset) => true,
            Some(c1m_io::PeerLeft::Fin) => !hello_read,
            None => false,
        }
    }

    /// EOF or a socket error: the device went away without a Close frame
    /// (or, ended already, before its last words were out).
    pub(super) fn peer_gone(&mut self, io: &mut impl Driver, key: usize) {
        let why = self.slab[key].gone();
        self.end(io, key, why, Close::Abortive);
    }
}

impl Slot {
    /// How it ends when its peer is gone: with our Close 1001 out (a
    /// drain), the server was stopping; else it reset.
    pub(super) fn gone(&self) -> Ended {
        if self.conn.phase() == Phase::Closing {
            Ended::Shutdown
        } else {
            Ended::PeerGone
        }
    }
}
