//! The directory, the shard's side: registry claims and releases'
//! messages (`Msg::Replaced`), operators' asks (lookup, push, kick,
//! supersede) from the admin port or the mailbox, the presence walk, and
//! lifecycle events.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use c1m_io::{Close, Driver};
use c1m_proto::conn::Phase;
use c1m_proto::device_id::DeviceId;
use c1m_proto::frame::{self, code, Opcode};
use c1m_proto::table::{Claim, Location};

use super::{Now, State};
use crate::directory::mailbox::{Answer, Ask, DeviceInfo, Mail, Reply};
use crate::directory::registry::Msg;
use crate::ended::Ended;
use crate::events::{Event as Lifecycle, Kind};

/// Slots a presence walk looks at per turn of the loop: a walk of a
/// million devices is a thousand short turns between the shard's own work.
pub(super) const WALK_SLOTS: usize = 1024;

impl State {
    /// Offers the publisher a presence record of up to [`WALK_SLOTS`]
    /// slots' devices, from where the walk stands. A full queue pauses the
    /// walk (the records are not dropped: the walk resumes there). Returns
    /// how soon the loop should come back: now while there is more, 1 ms
    /// while the queue is full, None once done (or with no walk).
    pub(super) fn walk_presence(&mut self) -> Option<Duration> {
        let from = self.walk?;
        let Some(events) = &self.cfg.events else {
            self.walk = None;
            return None;
        };
        let end = self.slab.capacity().min(from + WALK_SLOTS);
        let time_ms = self.clock.now.unix_ms;
        for key in from..end {
            let Some(slot) = self.slab.get(key) else {
                continue;
            };
            if !slot.upgraded || slot.ended.is_some() {
                continue;
            }
            let ev = Lifecycle {
                kind: Kind::Present,
                id: slot.id.clone(),
                at: self.place(key, slot.gen),
                remote: None,
                time_ms,
                last_heard_ms: 0,
            };
            if !events.offer(ev) {
                self.walk = Some(key);
                return Some(Duration::from_millis(1));
            }
        }
        if end >= self.slab.capacity() {
            self.walk = None;
            None
        } else {
            self.walk = Some(end);
            Some(Duration::ZERO)
        }
    }

    /// Offers a lifecycle event to the publisher (--nats); a full queue
    /// drops it, counted. Never waits.
    pub(super) fn event(
        &mut self,
        kind: Kind,
        id: &DeviceId,
        at: Location,
        remote: Option<std::net::SocketAddr>,
        last_seen: u64,
    ) {
        let Some(events) = &self.cfg.events else {
            return;
        };
        let time_ms = self.clock.now.unix_ms;
        let heard_ago = self
            .clock
            .now
            .at
            .saturating_duration_since(self.clock.instant_of(last_seen))
            .as_millis() as u64;
        let ev = Lifecycle {
            kind,
            id: id.clone(),
            at,
            remote,
            time_ms,
            last_heard_ms: time_ms.saturating_sub(heard_ago),
        };
        if !events.offer(ev) {
            self.counters.events_dropped += 1;
        }
    }

    /// Claims the device's id for this connection, which upgraded at
    /// `since`, in the shared registry; returns the connection it
    /// displaced, to be told [`Msg::Replaced`] once the 101 is out. The
    /// claim is made before the 101 is sent: a device that opens its next
    /// connection once it has the 101 is then sure to claim after this
    /// one, however late this thread runs after sending. No message, no
    /// wake-up: a claim is a probe of the id's stripe under its lock.
    pub(super) fn register(
        &mut self,
        io: &mut impl Driver,
        key: usize,
        since: u64,
    ) -> Option<(DeviceId, Location)> {
        self.slab[key].since = since;
        let slot = &self.slab[key];
        let at = self.place(key, slot.gen);
        if self.cfg.events.is_some() {
            let (id, last_seen) = (slot.id.clone(), slot.last_seen);
            let remote = self.device_addr(io, key);
            self.event(Kind::Connected, &id, at, remote, last_seen);
        }
        let slot = &self.slab[key];
        match self.cfg.registry.claim(&slot.id, at) {
            Claim::Fresh => None,
            Claim::Displaced(old) => Some((slot.id.clone(), old)),
            Claim::Full => {
                let held = self.open;
                self.warn(format_args!(
                    "the device registry is full (a stripe of its table), so a device connected without one-connection-per-id; the table was sized for fewer connections than the {held} this shard holds: set --max-conns to what the server should hold"
                ));
                None
            }
        }
    }

    /// Sends a registry message to shard `to`, or handles it here when
    /// that is this shard.
    pub(super) fn deliver(&mut self, io: &mut impl Driver, to: usize, msg: Msg) {
        if to == self.me() {
            self.on_registry(io, msg);
        } else {
            self.peers.send(to, Mail::Registry(msg));
        }
    }

    /// Everything other shards and threads sent since the last wake-up.
    pub(super) fn read_mail(&mut self, io: &mut impl Driver) {
        while let Some(mail) = self.inbox.next() {
            match mail {
                Mail::Registry(msg) => self.on_registry(io, msg),
                Mail::Shutdown => self.begin_shutdown(io),
                Mail::ShutdownOver(window) => self.begin_shutdown_over(io, window),
                Mail::Ask { id, ask, at, reply } => self.on_ask(io, id, ask, at, reply),
                // From the start again if a walk is under way: what it
                // wrote may have gone with the broker too.
                Mail::Handover(order) => self.on_order(io, order),
                Mail::Present => {
                    if self.cfg.events.is_some() {
                        self.walk = Some(0);
                    }
                }
            }
        }
    }

    pub(super) fn on_registry(&mut self, io: &mut impl Driver, msg: Msg) {
        match msg {
            Msg::Replaced { id, at } => self.replaced(io, id, at),
        }
    }

    /// An operator's question about a device: the owner finds where it
    /// lives and forwards the question there; the holder acts and answers.
    pub(super) fn on_ask(
        &mut self,
        io: &mut impl Driver,
        id: DeviceId,
        ask: Ask,
        at: Option<Location>,
        reply: Reply,
    ) {
        let given = at.is_some();
        let at = match at.or_else(|| self.cfg.registry.get(&id)) {
            Some(at) => at,
            None => return self.peers.reply(reply, Answer::NotConnected),
        };
        if at.shard as usize != self.me() {
            let mail = Mail::Ask {
                id,
                ask,
                at: Some(at),
                reply,
            };
            self.peers.send(at.shard as usize, mail);
            return;
        }
        let key = at.key as usize;
        let held = self
            .slab
            .get(key)
            .is_some_and(|s| s.gen == at.gen && s.upgraded && s.ended.is_none() && s.id == id);
        if !held && given {
            // A location from outside (NATS presence) is where the device
            // connected: a hot upgrade has since moved it into another
            // slot, which the registry names. Asked there (once: without a
            // location this does not come back here).
            if self.cfg.registry.get(&id).is_some_and(|now| now != at) {
                return self.on_ask(io, id, ask, None, reply);
            }
        }
        if !held && self.waiting.as_ref().is_some_and(|w| w.has_room()) {
            // Taking connections over from an old process: the device may
            // be on its way here. It is answered when it arrives, or at
            // the handover's end.
            if let Some(w) = self.waiting.as_mut() {
                w.park(id, ask, reply);
            }
            return;
        }
        let answer = if !held {
            Answer::NotConnected
        } else {
            match ask {
                Ask::Lookup => Answer::Found(self.info(io, key)),
                // Nothing after our Close (a drain's, or a kick's in
                // flight): RFC 6455 5.5.1.
                Ask::Push { .. } if self.slab[key].conn.phase() != Phase::Open => {
                    Answer::NotConnected
                }
                Ask::Push { text, payload } => {
                    self.out.clear();
                    let opcode = if text { Opcode::Text } else { Opcode::Binary };
                    frame::write_frame(&mut self.out, opcode, &payload);
                    if self.write(io, key) {
                        Answer::Delivered
                    } else {
                        Answer::NotConnected
                    }
                }
                Ask::Supersede { unix_ms } => {
                    if self.unix_ms_of(self.slab[key].since) < unix_ms {
                        self.replaced(io, id, at);
                        Answer::Kicked
                    } else {
                        Answer::NotConnected
                    }
                }
                Ask::Kick => {
                    self.out.clear();
                    self.slab[key]
                        .conn
                        .end(&mut self.out, code::KICKED, b"kicked");
                    self.end(io, key, Ended::Kicked, Close::Graceful);
                    Answer::Kicked
                }
            }
        };
        self.peers.reply(reply, answer);
    }

    /// The unix milliseconds of a monotonic time (an upgrade's `since`).
    pub(super) fn unix_ms_of(&self, since: u64) -> u64 {
        let ago_ms = self.clock.monotonic_ns().saturating_sub(since) / 1_000_000;
        self.clock.now.unix_ms.saturating_sub(ago_ms)
    }

    /// What `GET /devices/<id>` shows of the device in slot `key`.
    pub(super) fn info(&self, io: &impl Driver, key: usize) -> DeviceInfo {
        let slot = &self.slab[key];
        let Now { at: now, unix_ms } = self.clock.now;
        let ago_ms = |then: Instant| now.saturating_duration_since(then).as_millis() as u64;
        DeviceInfo {
            shard: self.me() as u32,
            connected_since_ms: self.unix_ms_of(slot.since),
            last_heard_ms: unix_ms.saturating_sub(ago_ms(self.clock.instant_of(slot.last_seen))),
            remote: self.device_addr(io, key),
        }
    }

    /// The device's address: from its PROXY header or a trusted
    /// X-Forwarded-For when there was one, else the socket peer's. What
    /// lookups, events and logs about the device show.
    pub(super) fn device_addr(&self, io: &impl Driver, key: usize) -> Option<SocketAddr> {
        let slot = &self.slab[key];
        slot.remote
            .as_deref()
            .copied()
            .or_else(|| io.peer_addr(slot.io))
    }

    /// A newer connection took this one's id: Close 4000 "replaced", then
    /// the socket closes once that is out (or at the frame timeout).
    /// (A slot holding another id means the owner's digests of the two
    /// collided: see crate::directory::registry. Nothing is closed then.)
    pub(super) fn replaced(&mut self, io: &mut impl Driver, id: DeviceId, at: Location) {
        let key = at.key as usize;
        match self.slab.get_mut(key) {
            Some(slot) if slot.gen == at.gen && slot.ended.is_none() && slot.id == id => {
                self.out.clear();
                slot.conn.end(&mut self.out, code::REPLACED, b"replaced");
                self.end(io, key, Ended::Replaced, Close::Graceful);
            }
            _ => {} // it ended meanwhile
        }
    }
}
