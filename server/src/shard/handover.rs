//! Hot upgrade, the shard's side (issue 22, docs/upgrade.md).
//!
//! The old process's shard hands its listener over at once, then its
//! connections in budgets of [`BUDGET`] per loop turn (so that it keeps
//! serving the rest): each stops being read ([`Driver::release`]) before it
//! is offered, leaves the slab without an event or a registry release (the
//! new process re-claims its entry), and goes to the handover thread as a
//! [`Moved`]. Ended connections are not offered: this shard flushes and
//! closes them. TLS connections stay (their TLS state does not move):
//! served until the drain after the handover closes them with 1001 and
//! the reconnect hint, spread over `--upgrade-tls-window`.
//!
//! The new process's shard takes [`Moved`]s into its slab, driver and
//! wheel: their output first, their silence carried over (the last-heard
//! time is CLOCK_MONOTONIC, one clock for both processes).
//!
//! Off (no upgrade under way) this costs the loop one branch per turn.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::mpsc::Sender;
use std::time::Duration;

use socket2::Socket;

use c1m_io::{Close, Driver, Token};
use c1m_proto::conn::Conn;
use c1m_proto::device_id::DeviceId;
use c1m_proto::handover::{self, ConnRecord};
use c1m_proto::table::Claim;
use c1m_proto::ticket;
use c1m_proto::wheel::Entry;

use super::{Slot, State};
use crate::directory::mailbox::{Answer, Ask, Reply};
use crate::ended::Ended;

/// Connections a shard starts to hand over per turn of its loop.
pub const BUDGET: usize = 4096;
/// How long the releases under way may all wait without any of them
/// making progress (io_uring: a send in flight to a device that does not
/// read) before those left are given up: reset here and counted as lost,
/// so one device cannot hold the upgrade. Not a bound on each release: a
/// shard short of CPU (1M devices on 2 cores) sees its cancels complete
/// late, and must not lose the devices they were for.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the releases under way are looked at without news from the
/// driver (for those overdue, or ended meanwhile).
const RELEASE_SWEEP: Duration = Duration::from_millis(100);
/// And only after this many turns without progress: a shard that did not
/// run for seconds (60 workers on 2 cores) first gets to collect the
/// completions that came meanwhile (io_uring with DEFER_TASKRUN posts them
/// only in a wait that asks for events).
const RELEASE_STILL_TURNS: u32 = 8;

/// What the handover thread tells a shard.
pub enum Order {
    /// Old: stop accepting and hand the listener back.
    GiveListener(Sender<Out>),
    /// Old: the handover failed: listen on this (our own listener) again.
    Listen(Socket),
    /// Old: hand every connection over, a budget per turn.
    MoveConns(Sender<Out>),
    /// Old: the handover failed: start no more releases (those under way
    /// finish and are sent, then End).
    StopMoving,
    /// New: take these; the count taken goes back on the sender.
    Take(Vec<Moved>, Sender<u32>),
    /// New: the handover has ended (every connection taken, or the old
    /// process gone): asks still waiting for their device are answered
    /// "not connected".
    Taken,
}

impl std::fmt::Debug for Order {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Order::GiveListener(_) => "GiveListener",
            Order::Listen(_) => "Listen",
            Order::MoveConns(_) => "MoveConns",
            Order::StopMoving => "StopMoving",
            Order::Take(..) => "Take",
            Order::Taken => "Taken",
        })
    }
}

/// The new process's shard, while it takes connections over: asks (a
/// push, a lookup, a kick) for a device it does not hold, which may be on
/// its way from the old process (or not moved yet). Each waits for its
/// device to arrive, then is answered as if it came then; those left at
/// the handover's end ([`Order::Taken`]) are answered "not connected".
/// Without this, a push to a device in transit was answered "not
/// connected" while the device was connected. At most [`MAX_WAITING`]
/// per shard; past it, an ask is answered at once, as before.
///
/// And `--udp-heartbeat`'s datagrams: once the old process's connections
/// start to move, only this process reads the UDP sockets, so a datagram
/// whose ticket names no connection here yet (its device still on its
/// way) is held, the latest per ticket with the tick it came, and counts
/// as that device's heartbeat when it arrives; at most
/// [`MAX_HELD_DATAGRAMS`] (about 48 bytes each, only while a handover
/// runs), past it and at the end counted `udp_stale`.
#[derive(Default)]
pub(super) struct Waiting {
    asks: HashMap<DeviceId, Vec<(Ask, Reply)>>,
    count: usize,
    datagrams: HashMap<u64, (u64, [u8; ticket::LEN])>,
}

/// Asks a shard holds for devices in transit, at most.
pub const MAX_WAITING: usize = 4096;
/// Datagrams a shard holds for devices in transit, at most.
pub const MAX_HELD_DATAGRAMS: usize = 1 << 18;

impl Waiting {
    pub(super) fn has_room(&self) -> bool {
        self.count < MAX_WAITING
    }

    pub(super) fn park(&mut self, id: DeviceId, ask: Ask, reply: Reply) {
        self.count += 1;
        self.asks.entry(id).or_default().push((ask, reply));
    }

    /// The asks waiting for `id`, if any (one lookup while none wait).
    fn take(&mut self, id: &DeviceId) -> Option<Vec<(Ask, Reply)>> {
        if self.count == 0 {
            return None;
        }
        let asks = self.asks.remove(id)?;
        self.count -= asks.len();
        Some(asks)
    }

    /// Holds the datagram `bytes` (a ticket) that came at `tick` for the
    /// connection (`key`, `gen`) on its way here; false when full.
    pub(super) fn hold_datagram(&mut self, key: u32, gen: u32, tick: u64, bytes: &[u8]) -> bool {
        let Ok(b) = <[u8; ticket::LEN]>::try_from(bytes) else {
            return false;
        };
        let id = super::udp::ticket_id(key, gen);
        if self.datagrams.len() >= MAX_HELD_DATAGRAMS && !self.datagrams.contains_key(&id) {
            return false;
        }
        self.datagrams.insert(id, (tick, b));
        true
    }

    /// The datagram held for the connection (`key`, `gen`), if any.
    pub(super) fn take_datagram(&mut self, key: u32, gen: u32) -> Option<(u64, [u8; ticket::LEN])> {
        if self.datagrams.is_empty() {
            return None;
        }
        self.datagrams.remove(&super::udp::ticket_id(key, gen))
    }

    fn into_replies(self) -> impl Iterator<Item = Reply> {
        self.asks.into_values().flatten().map(|(_, reply)| reply)
    }
}

/// What an old shard hands the handover thread.
pub enum Out {
    Listener {
        shard: usize,
        sock: Option<Socket>,
    },
    Conns(Vec<Moved>),
    /// Every connection was offered: `moved` of them; `tls_closed` got
    /// Close 1001 instead; `lost` could not be released (closed).
    End {
        shard: usize,
        moved: u32,
        tls_closed: u32,
        lost: u32,
    },
}

/// One connection on its way: its socket and everything its slot held.
pub struct Moved {
    pub fd: OwnedFd,
    pub state: MovedState,
}

/// A connection's slot as plain owned data (what a [`ConnRecord`] borrows).
pub struct MovedState {
    pub shard: u32,
    pub key: u32,
    pub gen: u32,
    pub ticket_key: u32,
    pub since_ns: u64,
    pub last_heard_ns: u64,
    pub deadline_ns: u64,
    pub frame_deadline_ns: u64,
    pub upgraded: bool,
    pub registered: bool,
    pub id: DeviceId,
    pub remote: Option<SocketAddr>,
    pub conn: Conn,
    pub output: Vec<u8>,
}

impl MovedState {
    /// The record of the handover format.
    pub fn record(&self) -> ConnRecord<'_> {
        ConnRecord {
            shard: self.shard,
            key: self.key,
            gen: self.gen,
            ticket_key: self.ticket_key,
            since_ns: self.since_ns,
            last_heard_ns: self.last_heard_ns,
            deadline_ns: self.deadline_ns,
            frame_deadline_ns: self.frame_deadline_ns,
            upgraded: self.upgraded,
            registered: self.registered,
            id: self.id.as_str(),
            remote: self.remote,
            state: self.conn.export(),
            output: &self.output,
        }
    }

    /// Back from a record (checked as `Conn::import` checks it).
    pub fn from_record(r: &ConnRecord<'_>) -> Result<MovedState, handover::Error> {
        // The new slot keeps it (what the UDP ticket and registry name).
        if r.gen == 0 || r.gen >= 1 << c1m_proto::table::GEN_BITS {
            return Err(handover::Error::Invalid("a generation out of range"));
        }
        Ok(MovedState {
            shard: r.shard,
            key: r.key,
            gen: r.gen,
            ticket_key: r.ticket_key,
            since_ns: r.since_ns,
            last_heard_ns: r.last_heard_ns,
            deadline_ns: r.deadline_ns,
            frame_deadline_ns: r.frame_deadline_ns,
            upgraded: r.upgraded,
            registered: r.registered,
            id: DeviceId::new(r.id),
            remote: r.remote,
            conn: Conn::import(&r.state, r.upgraded)?,
            output: r.output.to_vec(),
        })
    }
}

/// An old shard's handover under way.
pub(super) struct Handing {
    tx: Sender<Out>,
    /// The next slab key to offer.
    cursor: usize,
    /// Released but not yet handed back by the driver (io_uring: the
    /// recv's last completion, a send in flight): key and generation.
    releasing: Vec<(usize, u32)>,
    /// The driver's [`Driver::release_progress`] at the last look at
    /// `releasing`, and when that was: it is looked at again only when
    /// the driver has news or every [`RELEASE_SWEEP`] (a look is one call
    /// per release under way: every turn, thousands).
    progress: u64,
    looked: std::time::Instant,
    /// When a release under way last made progress (or the first began),
    /// and the turns since.
    moving: std::time::Instant,
    still: u32,
    moved: u32,
    tls_closed: u32,
    lost: u32,
}

impl State {
    /// An order of the handover thread.
    pub(super) fn on_order(&mut self, io: &mut impl Driver, order: Order) {
        match order {
            Order::GiveListener(tx) => {
                let sock = io.take_listener();
                self.accept.resume = None;
                let _ = tx.send(Out::Listener {
                    shard: self.id,
                    sock,
                });
            }
            Order::Listen(sock) => {
                self.read_datagrams_again(io);
                if let Err(e) = io.listen(sock) {
                    crate::say!(
                        "shard {}: cannot listen again after the failed upgrade ({e}): this shard accepts nothing more",
                        self.id
                    );
                }
            }
            Order::MoveConns(tx) => {
                // --udp-heartbeat: the new process reads the same sockets
                // from here on (it reads them since the listeners' ack,
                // and holds what names a device still on its way);
                // a datagram read here for a device moved would be lost.
                // A TLS server keeps reading: its TLS devices stay here
                // for the window, and heartbeat here.
                if self.cfg.udp.is_some() && self.cfg.tls.is_none() {
                    io.stop_datagrams();
                }
                self.handing = Some(Box::new(Handing {
                    tx,
                    cursor: 0,
                    releasing: Vec::new(),
                    progress: io.release_progress(),
                    looked: self.clock.now.at,
                    moving: self.clock.now.at,
                    still: 0,
                    moved: 0,
                    tls_closed: 0,
                    lost: 0,
                }));
            }
            Order::StopMoving => {
                if let Some(h) = &mut self.handing {
                    h.cursor = usize::MAX;
                }
                self.read_datagrams_again(io);
            }
            Order::Take(conns, reply) => {
                let mut taken = 0;
                for m in conns {
                    let waited = self
                        .waiting
                        .as_mut()
                        .and_then(|w| w.take(&m.state.id))
                        .map(|asks| (m.state.id.clone(), asks));
                    taken += u32::from(self.take_over(io, m));
                    // Asked for while on its way: answered now that it is
                    // here (or "not connected" if it could not be taken).
                    if let Some((id, asks)) = waited {
                        for (ask, reply) in asks {
                            self.on_ask(io, id.clone(), ask, None, reply);
                        }
                    }
                }
                let _ = reply.send(taken);
            }
            Order::Taken => {
                if let Some(w) = self.waiting.take() {
                    // Their devices never came (closed on the way).
                    self.counters.udp_stale += w.datagrams.len() as u64;
                    for reply in w.into_replies() {
                        self.peers.reply(reply, Answer::NotConnected);
                    }
                }
            }
        }
    }

    /// The upgrade failed: this process reads its UDP socket again.
    fn read_datagrams_again(&mut self, io: &mut impl Driver) {
        if self.cfg.udp.is_none() {
            return;
        }
        if let Err(e) = io.resume_datagrams() {
            crate::say!(
                "shard {}: cannot read UDP heartbeats again after the failed upgrade ({e}): devices heartbeating by datagram only will expire; restart this server",
                self.id
            );
        }
    }

    /// One turn's share of the handover; how soon the loop should come
    /// back (None: done).
    pub(super) fn hand_over_some(&mut self, io: &mut impl Driver) -> Option<Duration> {
        let mut h = self.handing.take()?;
        if io.stopping_datagrams() {
            // Nothing moves before the datagrams read here are handled.
            self.handing = Some(h);
            return Some(Duration::from_millis(1));
        }
        let mut out = Vec::new();
        let now = self.clock.now.at;
        // Those whose release was under way, when there may be news.
        let progress = io.release_progress();
        if progress != h.progress || h.releasing.is_empty() {
            h.moving = now;
            h.still = 0;
        } else {
            h.still = h.still.saturating_add(1);
        }
        let overdue = now >= h.moving + RELEASE_TIMEOUT && h.still >= RELEASE_STILL_TURNS;
        let mut i = if progress != h.progress || overdue || now >= h.looked + RELEASE_SWEEP {
            h.progress = progress;
            h.looked = now;
            0
        } else {
            h.releasing.len()
        };
        while i < h.releasing.len() {
            let (key, gen) = h.releasing[i];
            match self.slab.get(key) {
                Some(s) if s.gen == gen && s.ended.is_some() => {
                    // It ended meanwhile (bytes that raced the release):
                    // its output goes out and it closes here.
                    self.close(io, key, Close::Graceful);
                    h.releasing.swap_remove(i);
                }
                Some(s) if s.gen == gen => match self.release(io, key, &mut out) {
                    Ok(true) => {
                        h.moved += 1;
                        h.releasing.swap_remove(i);
                    }
                    Ok(false) if overdue => {
                        self.warn(format_args!(
                            "a connection's release did not complete while no release made progress for {RELEASE_TIMEOUT:?} (a send to a device that does not read?): reset it, counted as lost by the upgrade"
                        ));
                        self.end(io, key, Ended::SlowReader, Close::Abortive);
                        h.lost += 1;
                        h.releasing.swap_remove(i);
                    }
                    Ok(false) => i += 1,
                    Err(()) => {
                        h.lost += 1;
                        h.releasing.swap_remove(i);
                    }
                },
                _ => {
                    h.releasing.swap_remove(i); // closed meanwhile
                }
            }
        }
        let end = self.slab.capacity();
        let mut started = 0;
        while h.cursor < end && started < BUDGET {
            let key = h.cursor;
            h.cursor += 1;
            let Some(slot) = self.slab.get(key) else {
                continue;
            };
            if slot.ended.is_some() {
                continue; // flushed and closed here
            }
            started += 1;
            if slot.tls.is_some() {
                // Its TLS state does not move: it stays, served, until the
                // drain after the handover closes it with 1001, paced
                // (`--upgrade-tls-window`, Mail::ShutdownOver).
                h.tls_closed += 1;
                continue;
            }
            let gen = slot.gen;
            match self.release(io, key, &mut out) {
                Ok(true) => h.moved += 1,
                Ok(false) => h.releasing.push((key, gen)),
                Err(()) => h.lost += 1,
            }
        }
        if !out.is_empty() {
            let _ = h.tx.send(Out::Conns(out));
        }
        if h.cursor >= end && h.releasing.is_empty() {
            let _ = h.tx.send(Out::End {
                shard: self.id,
                moved: h.moved,
                tls_closed: h.tls_closed,
                lost: h.lost,
            });
            self.counters.handed_over += u64::from(h.moved);
            return None;
        }
        let again = if h.cursor < end {
            Duration::ZERO
        } else {
            // Waiting for completions, which end the driver's wait anyway.
            Duration::from_millis(1)
        };
        self.handing = Some(h);
        Some(again)
    }

    /// Releases slot `key` from the driver; once the driver hands the
    /// socket back, the slot leaves the slab (no event, no registry
    /// release) into `out`. Ok(false): under way; Err: lost (closed).
    fn release(
        &mut self,
        io: &mut impl Driver,
        key: usize,
        out: &mut Vec<Moved>,
    ) -> Result<bool, ()> {
        let (fd, output) = match io.release(self.slab[key].io) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => {
                self.warn(format_args!(
                    "cannot hand a connection over ({e}): closed it"
                ));
                self.end(io, key, Ended::PeerGone, Close::Abortive);
                return Err(());
            }
        };
        let slot = self.remove(key);
        if slot.upgraded {
            self.open -= 1;
        }
        out.push(Moved {
            fd,
            state: self.export(key, slot, output),
        });
        Ok(true)
    }

    /// A slot as [`MovedState`]: its ticks as CLOCK_MONOTONIC times.
    fn export(&self, key: usize, slot: Slot, output: Vec<u8>) -> MovedState {
        let c = &self.clock;
        let tick_ns = c.tick.as_nanos() as u64;
        let ns_of = |tick: u64| c.start_ns.saturating_add(tick.saturating_mul(tick_ns));
        let at = self.place(key, slot.gen);
        let held = slot
            .upgraded
            .then(|| self.cfg.registry.get(&slot.id))
            .flatten();
        let registered =
            held.is_some_and(|l| l.shard == at.shard && l.key == at.key && l.gen == at.gen);
        MovedState {
            shard: at.shard,
            key: at.key,
            gen: slot.gen,
            ticket_key: slot.ticket_key,
            since_ns: if slot.upgraded { slot.since } else { 0 },
            // The end of its tick: the new process never expires it early.
            last_heard_ns: ns_of(slot.last_seen + 1).saturating_sub(1),
            deadline_ns: match slot.armed {
                u64::MAX => ns_of(slot.last_seen + c.timeout_ticks + 1),
                t => ns_of(t),
            },
            frame_deadline_ns: match slot.frame_deadline {
                0 => 0,
                t => ns_of(t),
            },
            upgraded: slot.upgraded,
            registered,
            id: slot.id,
            remote: slot.remote.map(|r| *r),
            conn: slot.conn,
            output,
        }
    }

    /// The tick (of this shard's wheel) of CLOCK_MONOTONIC time `ns`.
    pub(super) fn tick_of_ns(&self, ns: u64) -> u64 {
        let c = &self.clock;
        let at = if ns >= c.start_ns {
            c.start.checked_add(Duration::from_nanos(ns - c.start_ns))
        } else {
            c.start.checked_sub(Duration::from_nanos(c.start_ns - ns))
        };
        at.map_or(0, |t| c.tick_at(t))
    }

    /// Takes a connection another process handed over; false if it could
    /// not (its socket is then closed).
    fn take_over(&mut self, io: &mut impl Driver, m: Moved) -> bool {
        let Moved { fd, state: s } = m;
        // Its generation comes along: with the slab key it keeps in
        // `ticket_key`, it is what the device's UDP ticket names.
        let gen = s.gen;
        let key = self.slab.vacant_key();
        let h = match io.adopt(fd, Token::pack(key, gen)) {
            Ok(h) => h,
            Err(err) => {
                self.warn(format_args!(
                    "cannot watch a connection handed over ({err}): it is closed; check fs.epoll.max_user_watches and memory"
                ));
                return false;
            }
        };
        // Silence carries over: its last frame's time, on this wheel (a
        // tick later at most: never early).
        let last_seen = self.tick_of_ns(s.last_heard_ns);
        let frame_deadline = match s.frame_deadline_ns {
            0 => 0,
            ns => self.tick_of_ns(ns) + 1,
        };
        let armed = if s.upgraded {
            let silent = last_seen + self.clock.timeout_ticks + 1;
            match frame_deadline {
                0 => silent,
                f => silent.min(f),
            }
        } else {
            self.tick_of_ns(s.deadline_ns) + 1
        };
        if s.ticket_key as usize != key && self.cfg.udp.is_some() {
            self.moved_tickets.insert(s.ticket_key, gen, key);
        }
        self.slab.insert(Slot {
            io: h,
            gen,
            ticket_key: s.ticket_key,
            upgraded: s.upgraded,
            ended: None,
            last_seen,
            armed,
            frame_deadline,
            since: if s.upgraded { s.since_ns } else { 0 },
            conn: s.conn,
            id: s.id,
            remote: s.remote.map(Box::new),
            tls: None,
        });
        self.wheel.insert(Entry {
            key: key as u32,
            gen,
            deadline: armed,
        });
        if s.upgraded {
            self.open += 1;
        }
        self.counters.taken_over += 1;
        if self.cfg.udp.is_some() {
            self.heard_on_the_way(key);
        }
        // What the old driver held goes out before anything else.
        if !s.output.is_empty() {
            self.out.clear();
            self.out.extend_from_slice(&s.output);
            if !self.write(io, key) {
                return true; // closed as any write failure is: counted
            }
        }
        if s.registered {
            let at = self.place(key, gen);
            let id = self.slab[key].id.clone();
            match self.cfg.registry.claim(&id, at) {
                Claim::Displaced(old)
                    if old.shard == s.shard && old.key == s.key && old.gen == s.gen => {}
                Claim::Displaced(other) => {
                    // The table held another connection of the device than
                    // the one moved: it claimed after it, so it is the newer
                    // and wins; the moved one is replaced.
                    self.cfg.registry.claim(&id, other);
                    self.replaced(io, id, at);
                }
                Claim::Fresh | Claim::Full => {}
            }
        }
        true
    }
}
