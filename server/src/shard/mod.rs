//! The shard: one per core, the decisions around the sans-IO core. It owns
//! its I/O driver (and through it its listener and sockets), its slab of
//! connections, its timing wheel and its counters; nothing is shared with
//! other shards.
//!
//! One loop runs the shard: take the driver's events (accepts, bytes,
//! hang-ups, flushed output, the shutdown wake-up), expire a bounded batch
//! of due wheel entries, report stats, and wait in the driver until events
//! come or the next deadline is due: the wheel's next occupied slot, the
//! next report, the accept backoff or the drain ([`State::next_deadline`]).
//! It never yields to glommio ([`c1m_io::epoll::Epoll::wait`] says why).
//!
//! A file per job: this one the loop (run, turn, pump, next deadline,
//! housekeeping) and what they all share (the slot, `end`, the one
//! function that ends a connection and counts it, close, warnings);
//! `accept` the accept policy (admission, backoff); `bytes` reads, frames,
//! writes and the upgrade answer; `expiry` the wheel; `directory` the
//! registry's claims and messages, operators' asks, the presence walk and
//! lifecycle events; `drain` shutdown; `udp` UDP heartbeats.
//!
//! Time is passed in: [`Shard::run`] reads the clocks once per turn into a
//! [`Now`] and the turn decides everything at it, so the tests drive the
//! shard on the scripted driver with plain times. Two reads remain: the
//! wait's length after the turn, and an upgrade's time (it orders claims
//! across shards, so it is read as its 101 goes out).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use slab::Slab;
use socket2::Socket;

// The same clock for every shard and process of a host: upgrade times
// compare across them (and cross a hot upgrade).
use c1m_io::epoll::EpollDriver;
use c1m_io::handover::monotonic_ns;
use c1m_io::tls::ServerSession;
use c1m_io::uring::UringDriver;
use c1m_io::{Backend, Close, Driver, DriverConfig, Event, Handle, IoStats, Token};
use c1m_proto::conn::{Conn, Limits};
use c1m_proto::device_id::DeviceId;
use c1m_proto::table::{self, Location};
use c1m_proto::wheel::{Wheel, MAX_HORIZON};

use crate::admission::{Bucket, Budget};
use crate::directory::mailbox::{Inbox, Peers};
use crate::directory::registry::Registry;
use crate::ended::Ended;
use crate::events::{EventTx, Kind};

use crate::stats::{Counters, Snapshot};

mod accept;
mod bytes;
mod directory;
mod drain;
mod expiry;
pub mod handover;
#[cfg(test)]
mod tests;
mod udp;

use accept::{Accepting, ACCEPT_BACKOFF};
use drain::Draining;
pub use drain::DRAIN_REASON;
pub use udp::UdpHeartbeat;

#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub limits: Limits,
    /// Silence after which a device is deleted.
    pub timeout: Duration,
    /// Wheel resolution: deletion happens within `timeout + tick` of the last frame.
    pub tick: Duration,
    pub handshake_timeout: Duration,
    /// --max-handshakes: connections in their handshake over the whole
    /// server (each shard its share); past a shard's share it stops
    /// accepting until half of them are done; 0: no bound.
    pub max_handshakes: u32,
    /// --io-batch-wait: io_uring gathers completions this long once one has
    /// come ([`c1m_io::Driver::set_batch_wait`]); zero: off.
    pub batch_wait: Duration,
    /// Time an upgraded device has to finish a frame it began (a device that
    /// trickles a frame header holds a buffer, so it gets less than --timeout).
    pub frame_timeout: Duration,
    /// Upgraded connections this shard holds at most (more get 503).
    pub max_conns: usize,
    /// Send Close 1001 to expired devices instead of resetting them.
    pub graceful_expiry: bool,
    pub drain_timeout: Duration,
    /// --drain-rate: devices the whole server closes per second on
    /// shutdown (each shard its share), so that a rolling restart does not
    /// send a whole fleet to reconnect at once. 0: all at once.
    pub drain_rate: f64,
    pub stats_interval: Duration,
    /// Test hook (C1M_INJECT_PANIC=1 in the server's environment): bytes
    /// holding [`INJECT_PANIC`] in the clear make the shard panic while
    /// handling them, as a bug would. Only a frame masked with a zero key
    /// carries them in the clear; off in production.
    pub inject_panic: bool,
    /// Device auth (--auth-secret-file): upgrades need a token these keys
    /// verify, else 401. None: no auth.
    pub auth: Option<std::sync::Arc<c1m_proto::auth::Keys>>,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from
    /// a front (--proxy-protocol); its source address is the device's. A
    /// connection without a valid one is closed (counted `proxy_bad`, or
    /// `proxy_missing` at the handshake timeout).
    pub proxy_protocol: bool,
    /// --trust-forwarded-from: when the connection's previous hop (the
    /// PROXY header's source, else the socket peer) is inside one of these
    /// networks, the upgrade's X-Forwarded-For (its rightmost address)
    /// becomes the device's address. Empty: X-Forwarded-For is ignored.
    pub trust_forwarded: Vec<crate::config::Cidr>,
    /// Lifecycle events (--nats): each upgrade and each end of an upgraded
    /// connection is offered to the publisher's queue, never waited on; a
    /// full queue counts `events_dropped`. None: no events, no cost.
    pub events: Option<EventTx>,
    /// --tls-cert/--tls-key: every connection speaks TLS (wss). Built once
    /// per process, shared by the shards. None: plaintext.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// The device registry, shared by every shard of the server (all
    /// `--procs` workers map the same table): an upgrade claims its id
    /// here before its 101 goes out, and an end releases it.
    pub registry: Registry,
    /// --udp-heartbeat: tickets in the 101s, datagrams as heartbeats
    /// (shard/udp.rs). None: no UDP socket, no cost.
    pub udp: Option<UdpHeartbeat>,
    /// --max-upgrades-per-sec: new connections per second over the whole
    /// server (each shard its share) and what the excess gets
    /// (admission.rs). None: no budget, no cost but one branch per accept.
    pub admission: Option<Budget>,
    /// Started by a hot upgrade (docs/upgrade.md): connections handed over
    /// come with last-heard times from before this process started, so the
    /// wheel's tick 0 is put a horizon earlier to hold them.
    pub takeover: bool,
}

/// See [`ShardConfig::inject_panic`].
pub const INJECT_PANIC: &[u8] = b"c1m-inject-panic";

impl ShardConfig {
    /// Checks what the wheel needs; the error is one sentence for the operator.
    pub fn validate(&self) -> Result<(), String> {
        if self.tick.is_zero() {
            return Err("--tick must be more than 0".into());
        }
        for (name, d) in [
            ("--timeout", self.timeout),
            ("--handshake-timeout", self.handshake_timeout),
            ("--frame-timeout", self.frame_timeout),
        ] {
            if d < self.tick {
                return Err(format!(
                    "{name} ({d:?}) must be at least --tick ({:?})",
                    self.tick
                ));
            }
            if ticks(d, self.tick) + 1 > MAX_HORIZON {
                return Err(format!(
                    "{name} ({d:?}) is over {MAX_HORIZON} ticks of {:?}: raise --tick",
                    self.tick
                ));
            }
        }
        // Slab keys stay below the registry entry's 2^24 (a slot ending
        // while new ones open makes the slab briefly hold more).
        if self.max_conns == 0 || self.max_conns > table::MAX_KEYS / 2 {
            return Err(format!(
                "--max-conns must be between 1 and {} per shard (the registry names a slot in 24 bits): run more shards for more",
                table::MAX_KEYS / 2
            ));
        }
        // The PROXY header comes in plaintext before the TLS handshake; it
        // is parsed by the connection's core, which sees only what TLS
        // decrypts. Until it is parsed on the raw bytes, say so.
        if self.proxy_protocol && self.tls.is_some() {
            return Err("--proxy-protocol with --tls-cert is not supported yet (a front passing TLS through with a PROXY header): terminate TLS at the front (deploy/) and keep --proxy-protocol, or serve wss here without a front".into());
        }
        Ok(())
    }
}

/// Whole ticks in `d`, rounded up.
fn ticks(d: Duration, tick: Duration) -> u64 {
    d.as_nanos().div_ceil(tick.as_nanos()) as u64
}

/// Runs `f`, turning a panic into its message.
fn contain<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|cause| {
        cause
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| cause.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into())
    })
}

/// Runs one shard on the calling thread with the driver of `backend` (built
/// here: an io_uring ring belongs to the thread that creates it) until
/// shutdown has drained; returns its totals.
pub fn run(
    backend: Backend,
    id: usize,
    cfg: ShardConfig,
    listener: Socket,
    mail: (Inbox, Peers),
    report: Sender<Snapshot>,
) -> io::Result<Counters> {
    let dcfg = DriverConfig {
        max_pending: max_pending(&cfg.limits),
    };
    match backend {
        Backend::Epoll => {
            Shard::new(id, cfg, EpollDriver::new(dcfg)?, listener, mail, report)?.run()
        }
        Backend::Uring => {
            let mut io = UringDriver::new(dcfg)?;
            // Without the kernel's min-wait (6.12+) the flag does nothing
            // (docs/operating.md says so; so it does on epoll).
            io.set_batch_wait(cfg.batch_wait);
            Shard::new(id, cfg, io, listener, mail, report)?.run()
        }
    }
}

/// A peer's address for a log line.
fn show(peer: Option<std::net::SocketAddr>) -> String {
    peer.map_or_else(|| "a device".into(), |a| a.to_string())
}

/// Output held for one connection at most: two largest messages (an echo
/// and its close), at least 64 KiB.
fn max_pending(limits: &Limits) -> usize {
    (2 * limits.max_message).max(64 * 1024)
}

/// One connection as the shard holds it (the socket is the driver's).
struct Slot {
    io: Handle,
    gen: u32,
    /// The slab key its UDP ticket names (with `gen`): its own, unless it
    /// came in a hot upgrade and keeps the ticket it had before (then
    /// [`udp::MovedTickets`] finds it by that one). In the slot's padding.
    ticket_key: u32,
    upgraded: bool,
    /// How it ended, once it has ([`State::end`] counted it; its
    /// disconnect event says it): it waits only for its output to flush.
    /// None while it lives.
    ended: Option<Ended>,
    /// Tick of the last complete frame (or of the upgrade).
    last_seen: u64,
    /// Deadline of this connection's live wheel entry; entries with another
    /// deadline are stale duplicates.
    armed: u64,
    /// Tick by which the frame in progress must be complete; 0: none.
    frame_deadline: u64,
    /// When it upgraded (CLOCK_MONOTONIC ns; 0 before): what lookups show
    /// and `--nats-exclusive` compares. Here, not in the registry's entry,
    /// which is shared and sized for every connection the server can hold.
    since: u64,
    conn: Conn,
    /// The device's id, from its upgrade request (empty before it).
    id: DeviceId,
    /// The device's address when it is not the socket peer's: from the
    /// PROXY header, or a trusted X-Forwarded-For. None: the socket peer.
    /// Boxed: 8 bytes in every slot, 32 only behind a front.
    remote: Option<Box<SocketAddr>>,
    /// Its TLS session (--tls-cert); None on a plaintext port (8 bytes).
    tls: Option<Box<ServerSession>>,
}

pub struct Shard<D: Driver> {
    io: D,
    st: State,
}

/// Where stats go, and when a warning may be logged again.
struct Reporting {
    tx: Sender<Snapshot>,
    next: Instant,
    warned_at: Option<Instant>,
}

/// Everything of a shard but its driver: the decisions.
struct State {
    id: usize,
    cfg: ShardConfig,
    slab: Slab<Slot>,
    wheel: Wheel,
    next_gen: u32,
    open: u64,
    counters: Counters,
    /// The turn's time, and the tick arithmetic of the wheel.
    clock: Clock,
    out: Vec<u8>,
    /// TLS: the plaintext of one read, and the records to send (handshake
    /// output, then `out` sealed). Per shard; empty when TLS is off.
    plain: Vec<u8>,
    sealed: Vec<u8>,
    /// TLS: a handshake's bytes, copied out of the driver's buffer so that
    /// the driver can be asked whether their device is still there.
    held: Vec<u8>,
    /// Why the bytes just read ended their connection, for its warning
    /// (a TLS error, a bad PROXY header); written only then.
    detail: String,
    /// Accept policy: the backoff, the upgrade budget, the deferred.
    accept: Accepting,
    /// Shutdown, once begun.
    drain: Draining,
    /// Stats to the reporter, and the rate of warnings.
    report: Reporting,
    finished: bool,
    inbox: Inbox,
    /// Every shard (this one included), for registry messages.
    peers: Peers,
    /// The X-Forwarded-For address of the upgrade [`State::on_bytes`] just
    /// admitted, for [`State::answer`] to check against the trusted
    /// networks (only collected when there are some).
    forwarded: Option<IpAddr>,
    /// Where the walk that writes presence again (`Mail::Present`) goes on
    /// from: the next slab key. None: no walk.
    walk: Option<usize>,
    /// A hot upgrade handing this shard's connections over (None: off).
    handing: Option<Box<handover::Handing>>,
    /// A process started by a hot upgrade, until the handover ends: asks
    /// for devices that may be on their way here (None: off).
    waiting: Option<Box<handover::Waiting>>,
    /// `--udp-heartbeat`: the tickets of connections a hot upgrade moved
    /// here, to the slots that now hold them (empty otherwise).
    moved_tickets: udp::MovedTickets,
}

impl<D: Driver> Shard<D> {
    /// Shard `id` (its index among all shards, as in `mail`) serving
    /// `listener` through `io`. Other shards and threads reach it through
    /// `mail` (registry messages, shutdown); it sends a [`Snapshot`] to
    /// `report` every stats interval.
    pub fn new(
        id: usize,
        cfg: ShardConfig,
        mut io: D,
        listener: Socket,
        (inbox, peers): (Inbox, Peers),
        report: Sender<Snapshot>,
    ) -> io::Result<Shard<D>> {
        cfg.validate().map_err(io::Error::other)?;
        if peers.base() + id >= table::MAX_SHARDS {
            return Err(io::Error::other(format!(
                "shard {} is past the {} shards a server may have (the registry's entries name a shard in 12 bits): use fewer --cores or --procs",
                peers.base() + id,
                table::MAX_SHARDS
            )));
        }
        io.listen(listener)?;
        io.watch_wake(inbox.wake_fd()?)?;
        udp::watch(&cfg.udp, id, peers.base() + id, &mut io)?;
        let timeout_ticks = ticks(cfg.timeout, cfg.tick);
        let handshake_ticks = ticks(cfg.handshake_timeout, cfg.tick);
        let frame_ticks = ticks(cfg.frame_timeout, cfg.tick);
        let horizon = timeout_ticks.max(handshake_ticks).max(frame_ticks) + 1;
        let mut now = Now::read();
        let mut back = Duration::ZERO;
        if cfg.takeover {
            let want =
                Duration::from_nanos((cfg.tick.as_nanos() as u64).saturating_mul(horizon + 1));
            if let Some(at) = now.at.checked_sub(want) {
                (now.at, back) = (at, want);
            }
        }
        let mut clock = Clock::new(cfg.tick, [timeout_ticks, handshake_ticks, frame_ticks], now);
        clock.start_ns = clock.start_ns.saturating_sub(back.as_nanos() as u64);
        let start = clock.start;
        let takeover = cfg.takeover;
        Ok(Shard {
            io,
            st: State {
                id,
                slab: Slab::new(),
                wheel: Wheel::new(horizon, 0),
                // Seeded from the clock, so that a restarted --procs worker
                // does not reuse its predecessor's (slot, generation) pairs,
                // which other workers may still name for a moment.
                next_gen: table::next_gen(monotonic_ns() as u32),
                open: 0,
                counters: Counters::default(),
                clock,
                out: Vec::with_capacity(4096),
                plain: Vec::new(),
                sealed: Vec::new(),
                held: Vec::new(),
                detail: String::new(),
                drain: Draining::default(),
                accept: Accepting {
                    resume: None,
                    budget: cfg.admission.map(|b| {
                        Bucket::new(b.per_sec / peers.len().max(1) as f64, b.excess, start)
                    }),
                    deferred: Default::default(),
                    // The server's bound, split over every shard of every
                    // --procs worker (as the upgrade budget is).
                    max_handshakes: (cfg.max_handshakes as usize).div_ceil(peers.len().max(1)),
                    full: false,
                },
                report: Reporting {
                    tx: report,
                    next: start + cfg.stats_interval,
                    warned_at: None,
                },
                finished: false,
                inbox,
                peers,
                forwarded: None,
                walk: None,
                handing: None,
                waiting: takeover.then(Box::default),
                moved_tickets: udp::MovedTickets::default(),
                cfg,
            },
        })
    }

    /// Runs until shutdown has drained every connection (or timed out), on
    /// the calling thread: a glommio executor's in the server. It never
    /// yields to glommio ([`c1m_io::epoll::Epoll::wait`] says why).
    pub fn run(mut self) -> io::Result<Counters> {
        let mut wait = Duration::ZERO;
        loop {
            self.io.wait(wait)?;
            // The turn's one clock read (but an upgrade's time: see
            // [`State::on_bytes`]).
            match self.turn(Now::read()) {
                // Read again: the driver waits for a while, not until an
                // instant, and the turn took some of it.
                Some(next) => wait = next.saturating_duration_since(Instant::now()),
                None => return Ok(self.st.counters),
            }
        }
    }

    /// One turn of the loop after a wait: the ready events, one batch of
    /// due expiries, stats, the drain. Returns until when the driver may
    /// wait for events before the next turn, or None once shutdown has
    /// drained. Every decision of the turn is made at `now`: no clock is
    /// read in it (but an upgrade's time).
    fn turn(&mut self, now: Now) -> Option<Instant> {
        self.st.clock.set(now);
        let (now, tick) = (now.at, self.st.clock.now_tick);
        self.pump();
        let busy = self.st.expire_due(&mut self.io, tick);
        self.st.housekeeping(&mut self.io, now);
        let mut walk = self.st.walk_presence();
        if self.st.handing.is_some() {
            let again = self.st.hand_over_some(&mut self.io);
            walk = match (walk, again) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        self.st.peers.flush();
        if self.st.finished {
            return None;
        }
        let next = if busy {
            now
        } else {
            self.st.next_deadline(now)
        };
        Some(walk.map_or(next, |w| next.min(now + w)))
    }

    /// Acts on every event the driver has ready.
    fn pump(&mut self) {
        let Shard { io, st } = self;
        // An epoll driver reads as it goes: bytes read now may have come
        // after the turn's clock read, and a heartbeat stamped with that
        // earlier tick would be deleted before --timeout had passed since
        // it arrived (seen at 1M: 10 of 900,000 in a deletion storm, whose
        // turns run for seconds). So each read there takes the tick again
        // (a vDSO clock read, ~20 ns); io_uring's bytes all came before.
        let stamp_reads = io.reads_after_wait();
        while let Some(ev) = io.next() {
            match ev {
                Event::Accepted(fd) => st.admit(io, fd),
                Event::AcceptFailed(err) => st.accept_failed(err),
                Event::Data(token, bytes) => {
                    let Some(key) = st.live(token) else { continue };
                    if stamp_reads {
                        st.clock.catch_up(Instant::now());
                    }
                    // A TLS handshake's flights are most of what a wss
                    // connection costs the shard: none is spent on a device
                    // that has left (its reset or FIN queued behind these
                    // bytes), as a storm's attempts that timed out while they
                    // waited have. The bytes are copied out (a few hundred)
                    // so that the driver can be asked; plaintext skips this.
                    let mut held = Vec::new();
                    let bytes: &mut [u8] = if st.in_tls_handshake(key) {
                        held = std::mem::take(&mut st.held);
                        held.clear();
                        held.extend_from_slice(bytes);
                        if st.abandoned(key, io.peer_left(st.slab[key].io)) {
                            st.held = held;
                            st.counters.tls_abandoned += 1;
                            st.peer_gone(io, key);
                            continue;
                        }
                        &mut held
                    } else {
                        bytes
                    };
                    // A bug that one device's bytes trigger costs that device
                    // its connection, not the shard its devices.
                    let fed = contain(|| {
                        if st.cfg.inject_panic
                            && bytes.windows(INJECT_PANIC.len()).any(|w| w == INJECT_PANIC)
                        {
                            panic!("injected fault (C1M_INJECT_PANIC)");
                        }
                        st.on_bytes(key, bytes)
                    });
                    if held.capacity() > 0 {
                        st.held = held;
                    }
                    match fed {
                        Ok((upgraded, end)) => st.answer(io, key, upgraded, end),
                        Err(cause) => st.internal_error(io, key, &cause),
                    }
                }
                Event::Hangup(token) => {
                    if let Some(key) = st.live(token) {
                        st.peer_gone(io, key);
                    }
                }
                Event::Flushed(token) => {
                    if let Some(key) = st.live(token) {
                        let slot = &st.slab[key];
                        // Ended: its last words are out (a Done core has
                        // always ended: State::end).
                        if slot.ended.is_some() {
                            st.close(io, key, Close::Graceful);
                        }
                    }
                }
                // A shard connects to nothing.
                Event::Connected(_) => {}
                Event::Wake => st.read_mail(io),
                Event::Datagram(bytes) => {
                    if stamp_reads {
                        st.clock.catch_up(Instant::now());
                    }
                    st.on_datagram(bytes)
                }
            }
        }
    }

    /// The driver's counters (for tests and the stats line).
    pub fn io_stats(&self) -> IoStats {
        self.io.stats()
    }
}

/// The time a turn runs at: read once per turn by [`Shard::run`] (given
/// by a test), and used by every decision of the turn.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    /// Unix time in milliseconds: events, lookups, token expiry.
    pub unix_ms: u64,
}

impl Now {
    /// The clocks' time.
    pub fn read() -> Now {
        Now {
            at: Instant::now(),
            unix_ms: c1m_io::host::unix_ms(),
        }
    }
}

/// A shard's time: the turn's [`Now`] and its wheel tick, and the
/// durations the wheel counts in ticks.
struct Clock {
    /// Tick 0 begins here.
    start: Instant,
    /// CLOCK_MONOTONIC at `start`, in ns: upgrade times are on that clock
    /// ([`monotonic_ns`]); `Instant` is the same clock on Linux.
    start_ns: u64,
    tick: Duration,
    /// The tick in milliseconds, for the heartbeat-interval histogram.
    tick_ms: u64,
    timeout_ticks: u64,
    handshake_ticks: u64,
    frame_ticks: u64,
    /// The turn's time, and its tick.
    now: Now,
    now_tick: u64,
}

impl Clock {
    fn new(
        tick: Duration,
        [timeout_ticks, handshake_ticks, frame_ticks]: [u64; 3],
        now: Now,
    ) -> Clock {
        Clock {
            start: now.at,
            start_ns: monotonic_ns(),
            tick,
            tick_ms: tick.as_millis() as u64,
            timeout_ticks,
            handshake_ticks,
            frame_ticks,
            now,
            now_tick: 0,
        }
    }

    /// Makes `now` the turn's time.
    #[inline]
    fn set(&mut self, now: Now) {
        self.now = now;
        self.now_tick = self.tick_at(now.at);
    }

    /// Bytes read at `t`, later in the turn than its clock read, are
    /// stamped with `t`'s tick (see [`Shard::pump`]); the rest of the turn
    /// keeps its time.
    #[inline]
    fn catch_up(&mut self, t: Instant) {
        self.now_tick = self.now_tick.max(self.tick_at(t));
    }

    #[inline]
    fn tick_at(&self, t: Instant) -> u64 {
        // In u64 (584 years of nanoseconds): a u128 division per read
        // would cost more than the clock read.
        let ns = t.saturating_duration_since(self.start).as_nanos() as u64;
        ns / self.tick.as_nanos() as u64
    }

    /// The instant tick `t` begins.
    fn instant_of(&self, t: u64) -> Instant {
        self.start + Duration::from_nanos((self.tick.as_nanos() * t as u128) as u64)
    }

    /// The turn's time on CLOCK_MONOTONIC, in ns (as [`monotonic_ns`]).
    fn monotonic_ns(&self) -> u64 {
        self.start_ns + self.now.at.saturating_duration_since(self.start).as_nanos() as u64
    }
}

impl State {
    /// When the shard next has something to do without any event (as
    /// quinn-proto's `poll_timeout`): the wheel's next occupied slot, the
    /// next report, the end of the accept backoff, the drain's deadline.
    /// An idle shard sleeps until then, not every tick.
    fn next_deadline(&self, now: Instant) -> Instant {
        let wheel = self
            .wheel
            .next_due()
            .map(|t| self.clock.instant_of(t.max(self.clock.tick_at(now) + 1)));
        [
            wheel,
            Some(self.report.next),
            self.drain.deadline,
            self.accept.resume,
            self.drain.pacing.as_ref().map(|p| p.next_due()),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.report.next)
    }

    /// Stats, the end of the accept backoff, the end of the drain.
    fn housekeeping(&mut self, io: &mut impl Driver, now: Instant) {
        if now >= self.report.next {
            self.send_report(io.stats());
            self.report.next = now + self.cfg.stats_interval;
        }
        if self.accept.resume.is_some_and(|t| now >= t) {
            self.accept.resume = None;
            // `defer`: those held over the budget go first; if they spend
            // it, the pause goes on.
            self.admit_deferred(io, now);
            if self.accept.resume.is_none() && !self.accept.full {
                if let Err(err) = io.resume_accepting() {
                    // Not fatal: the devices held keep being served; try again.
                    self.accept.resume = Some(now + ACCEPT_BACKOFF);
                    self.warn(format_args!(
                        "cannot resume accepting ({err}): trying again in {ACCEPT_BACKOFF:?}; check fs.epoll.max_user_watches and memory (see kernel-tuning/)"
                    ));
                }
            }
        }
        self.resume_if_room(io);
        if self.drain.pacing.is_some() {
            self.pace_drain(io, now);
        }
        if let Some(deadline) = self.drain.deadline {
            // Done once every device is gone and the driver has closed
            // every socket (io_uring: a close waits for its recv to end;
            // leaving before would reset devices that just answered).
            if (self.slab.is_empty() && io.closing() == 0) || now >= deadline {
                self.close_all(io);
                self.send_report(io.stats());
                self.finished = true;
            }
        }
    }

    /// The slot a token names, if that connection still lives.
    fn live(&self, token: Token) -> Option<usize> {
        let (key, gen) = (token.key(), token.gen());
        self.slab.get(key).filter(|s| s.gen == gen).map(|_| key)
    }

    /// Logs a resource problem at most once a second: under load it
    /// repeats for every connection, and one line says it all (whatever
    /// --stats-interval is: with the stats line off it would be an hour).
    fn warn(&mut self, msg: std::fmt::Arguments) {
        let now = self.clock.now.at;
        if self
            .report
            .warned_at
            .is_none_or(|t| now >= t + Duration::from_secs(1))
        {
            crate::say!("shard {}: {msg}", self.id);
            self.report.warned_at = Some(now);
        }
    }

    /// Ends the connection in slot `key` for `why`: the one place an end
    /// is counted and its reason set (its disconnect event says it), and
    /// for a connection already ended, nothing is counted again.
    ///
    /// Graceful: what `self.out` holds (its last words: a Close frame, an
    /// HTTP answer; may be empty) is sent, and the socket closes once all
    /// its output is out (a peer that does not read it gets the frame
    /// timeout, then a reset); last words that cannot be sent mean a reset
    /// at once, still counted as `why`. Abortive: a reset at once, also
    /// for one already ended (its peer is gone, or its time is up).
    pub(super) fn end(&mut self, io: &mut impl Driver, key: usize, why: Ended, how: Close) {
        let slot = &mut self.slab[key];
        if slot.ended.is_some() {
            if how == Close::Abortive {
                self.close(io, key, Close::Abortive);
            }
            return;
        }
        slot.ended = Some(why);
        why.count(&mut self.counters);
        if how == Close::Abortive
            || (!(self.out.is_empty() && self.sealed.is_empty()) && self.send(io, key).is_err())
        {
            return self.close(io, key, Close::Abortive);
        }
        let slot = &mut self.slab[key];
        if io.is_flushed(slot.io) {
            self.close(io, key, Close::Graceful);
        } else {
            let due = self.clock.now_tick + self.clock.frame_ticks + 1;
            slot.bring_forward(key, due, &mut self.wheel);
        }
    }

    /// Takes the socket away from slot `key` (a disconnect event for an
    /// upgraded device, its claim released). Only [`State::end`] and a
    /// connection it ended close one.
    fn close(&mut self, io: &mut impl Driver, key: usize, how: Close) {
        let slot = self.remove(key);
        if slot.upgraded && self.cfg.events.is_some() {
            // Before the close, while the socket still knows its peer (or
            // the address a front gave).
            let remote = slot
                .remote
                .as_deref()
                .copied()
                .or_else(|| io.peer_addr(slot.io));
            self.event(
                Kind::Disconnected(slot.ended.unwrap_or(Ended::PeerGone)),
                &slot.id,
                self.place(key, slot.gen),
                remote,
                slot.last_seen,
            );
        }
        io.close(slot.io, how);
        if slot.upgraded {
            self.open -= 1;
            // A release names the connection; its upgrade time is not
            // compared, so no clock read on this path.
            let at = self.place(key, slot.gen);
            self.cfg.registry.release(&slot.id, at);
        }
    }

    /// Slot `key` out of the slab, and its moved ticket (if any) with it.
    fn remove(&mut self, key: usize) -> Slot {
        let slot = self.slab.remove(key);
        if slot.ticket_key as usize != key {
            self.moved_tickets.forget(slot.ticket_key, slot.gen);
        }
        slot
    }

    /// This shard's number over the whole server (all `--procs` workers).
    fn me(&self) -> usize {
        self.peers.base() + self.id
    }

    fn place(&self, key: usize, gen: u32) -> Location {
        Location {
            shard: self.me() as u32,
            key: key as u32,
            gen,
        }
    }

    fn send_report(&self, io: IoStats) {
        let mut totals = self.counters;
        totals.io_cq_overflows = io.cq_overflows;
        totals.io_cancels = io.cancels;
        totals.io_sq_full = io.sq_full;
        let _ = self.report.tx.send(Snapshot {
            shard: self.id,
            open: self.open,
            sockets: self.slab.len() as u64,
            totals,
        });
    }
}
