//! The shard: one per core, the decisions around the sans-IO core. It owns
//! its I/O driver (and through it its listener and sockets), its slab of
//! connections, its timing wheel and its counters; nothing is shared with
//! other shards.
//!
//! One loop runs the shard: take the driver's events (accepts, bytes,
//! hang-ups, flushed output, the shutdown wake-up), expire a bounded batch
//! of due wheel entries, report stats, and wait in the driver until events
//! come or the next deadline is due: the wheel's next occupied slot, the
//! next report, the accept backoff or the drain ([`Shard::next_deadline`]).
//! It never yields to glommio ([`c1m_io::epoll::Epoll::wait`] says why).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use slab::Slab;
use socket2::Socket;

use c1m_io::epoll::EpollDriver;
use c1m_io::tls::{ServerSession, TlsError, HANDSHAKE_RECORD};
use c1m_io::uring::UringDriver;
use c1m_io::{Backend, Close, Driver, DriverConfig, Event, Handle, IoStats, Sent, Token};
use c1m_proto::conn::{Conn, End, Limits, Phase};
use c1m_proto::device_id::DeviceId;
use c1m_proto::frame::{self, code, Opcode};
use c1m_proto::handshake::{Reject, Upgrade};
use c1m_proto::table::{Claim, Location};
use c1m_proto::wheel::{Entry, Wheel, MAX_HORIZON};

use crate::admission::{Bucket, Budget, Excess, REFUSAL};
use crate::directory::mailbox::{Answer, Ask, DeviceInfo, Inbox, Mail, Peers, Reply};
use crate::directory::registry::{Msg, Registry};
use crate::events::{Event as Lifecycle, EventTx, Kind, Reason};
use crate::hist::{EXPIRY_LAG_MS, HEARTBEAT_INTERVAL_MS};
use crate::stats::{Counters, Snapshot};

#[path = "shard_udp.rs"]
mod udp;
pub use udp::UdpHeartbeat;

#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub limits: Limits,
    /// Silence after which a device is deleted.
    pub timeout: Duration,
    /// Wheel resolution: deletion happens within `timeout + tick` of the last frame.
    pub tick: Duration,
    pub handshake_timeout: Duration,
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
    /// (shard_udp.rs). None: no UDP socket, no cost.
    pub udp: Option<UdpHeartbeat>,
    /// --max-upgrades-per-sec: new connections per second over the whole
    /// server (each shard its share) and what the excess gets
    /// (admission.rs). None: no budget, no cost but one branch per accept.
    pub admission: Option<Budget>,
}

/// A paced drain's Close reason: the device may reconnect at once (its
/// front sends it to another server: /healthz said 503 first).
pub const DRAIN_REASON: &[u8] = b"draining: reconnect";

/// A paced drain (--drain-rate) under way.
#[derive(Debug, Clone, Copy)]
struct Pacing {
    began: Instant,
    /// The next slab key to look at (no new connections come during a
    /// drain, so keys are not reused behind the cursor).
    next_key: usize,
    closed: u64,
}

impl Pacing {
    /// When the next Close is due at `rate` per second.
    fn next_due(&self, rate: f64) -> Instant {
        self.began + Duration::from_secs_f64(self.closed as f64 / rate.max(1e-9))
    }
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
        if self.max_conns == 0 || self.max_conns > u32::MAX as usize / 2 {
            return Err("--max-conns must be between 1 and 2^31".into());
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
/// Slots a presence walk looks at per turn of the loop: a walk of a
/// million devices is a thousand short turns between the shard's own work.
const WALK_SLOTS: usize = 1024;

fn ticks(d: Duration, tick: Duration) -> u64 {
    d.as_nanos().div_ceil(tick.as_nanos()) as u64
}

/// Wheel entries handled per loop iteration: a mass expiry is spread over
/// iterations so accepts and heartbeats keep flowing.
const EXPIRY_BATCH: usize = 256;
/// Connections a shard holds accepted over its budget (`defer`), waiting
/// for it to refill.
const DEFER_MAX: usize = 4096;
/// How long accepting pauses after EMFILE/ENFILE/ENOBUFS.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
            Shard::new(id, cfg, UringDriver::new(dcfg)?, listener, mail, report)?.run()
        }
    }
}

/// A peer's address for a log line.
fn show(peer: Option<std::net::SocketAddr>) -> String {
    peer.map_or_else(|| "a device".into(), |a| a.to_string())
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock for every shard and
/// process of a host, so upgrade times compare across them.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is valid for the call; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
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
    upgraded: bool,
    /// Its end is counted; it waits only for its output to flush.
    ended: bool,
    /// Tick of the last complete frame (or of the upgrade).
    last_seen: u64,
    /// Deadline of this connection's live wheel entry; entries with another
    /// deadline are stale duplicates.
    armed: u64,
    /// Tick by which the frame in progress must be complete; 0: none.
    frame_deadline: u64,
    conn: Conn,
    /// The device's id, from its upgrade request (empty before it).
    id: DeviceId,
    /// The device's address when it is not the socket peer's: from the
    /// PROXY header, or a trusted X-Forwarded-For. None: the socket peer.
    /// Boxed: 8 bytes in every slot, 32 only behind a front.
    remote: Option<Box<SocketAddr>>,
    /// Why it ended (what its disconnect event says), set with the counter.
    why: Reason,
    /// Its TLS session (--tls-cert); None on a plaintext port (8 bytes).
    tls: Option<Box<ServerSession>>,
}

/// How a connection ends, as the shard counts it: the protocol's ends, and
/// the TLS layer's.
#[derive(Debug)]
enum Ending {
    Conn(End),
    /// The TLS handshake or a record failed: why.
    TlsFailed(String),
    /// The first bytes on the TLS port were not a TLS handshake.
    PlainOnTls,
    /// The first bytes on the plaintext port were a TLS handshake.
    TlsOnPlain,
    /// TLS close_notify: the device is going away.
    PeerClosed,
}

/// What a plaintext request on the TLS port gets (as nginx answers it).
const PLAIN_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 44\r\nConnection: close\r\n\r\nthis port speaks TLS: connect with wss://.\r\n";

impl Slot {
    /// A frame (or TLS record) begun and not finished must end within the
    /// frame timeout; none pending clears the deadline.
    fn track_partial(
        &mut self,
        key: usize,
        partial: bool,
        now: u64,
        frame_ticks: u64,
        wheel: &mut Wheel,
    ) {
        if !partial {
            self.frame_deadline = 0;
        } else if self.frame_deadline == 0 {
            self.frame_deadline = now + frame_ticks + 1;
            self.bring_forward(key, self.frame_deadline, wheel);
        }
    }

    /// Makes sure the connection's wheel entry comes due by `deadline`: a
    /// new entry if the live one is later (which then goes stale).
    fn bring_forward(&mut self, key: usize, deadline: u64, wheel: &mut Wheel) {
        if deadline < self.armed {
            self.armed = deadline;
            wheel.insert(Entry {
                key: key as u32,
                gen: self.gen,
                deadline,
            });
        }
    }
}

pub struct Shard<D: Driver> {
    io: D,
    st: State,
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
    start: Instant,
    timeout_ticks: u64,
    /// The tick in milliseconds, for the heartbeat-interval histogram.
    tick_ms: u64,
    handshake_ticks: u64,
    frame_ticks: u64,
    out: Vec<u8>,
    /// TLS: the plaintext of one read, and the records to send (handshake
    /// output, then `out` sealed). Per shard; empty when TLS is off.
    plain: Vec<u8>,
    sealed: Vec<u8>,
    drain_deadline: Option<Instant>,
    /// A paced drain under way: where it began, the next slab key to close
    /// and how many it has closed.
    pacing: Option<Pacing>,
    accept_resume: Option<Instant>,
    /// --max-upgrades-per-sec: this shard's budget.
    admission: Option<Bucket>,
    /// `defer`: connections accepted over the budget (io_uring's multishot
    /// accept takes a burst before its cancel lands), admitted first when
    /// the budget refills; at most [`DEFER_MAX`], 503 past it.
    deferred: std::collections::VecDeque<OwnedFd>,
    warned_at: Option<Instant>,
    report: Sender<Snapshot>,
    next_report: Instant,
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
        io.listen(listener)?;
        io.watch_wake(inbox.wake_fd()?)?;
        udp::watch(&cfg.udp, id, peers.base() + id, &mut io)?;
        let timeout_ticks = ticks(cfg.timeout, cfg.tick);
        let handshake_ticks = ticks(cfg.handshake_timeout, cfg.tick);
        let frame_ticks = ticks(cfg.frame_timeout, cfg.tick);
        let start = Instant::now();
        Ok(Shard {
            io,
            st: State {
                id,
                slab: Slab::new(),
                wheel: Wheel::new(timeout_ticks.max(handshake_ticks).max(frame_ticks) + 1, 0),
                // Seeded from the clock, so that a restarted --procs worker
                // does not reuse its predecessor's (slot, generation) pairs,
                // which other workers may still name for a moment.
                next_gen: (monotonic_ns() as u32) | 1,
                open: 0,
                counters: Counters::default(),
                start,
                timeout_ticks,
                tick_ms: cfg.tick.as_millis() as u64,
                handshake_ticks,
                frame_ticks,
                out: Vec::with_capacity(4096),
                plain: Vec::new(),
                sealed: Vec::new(),
                drain_deadline: None,
                pacing: None,
                accept_resume: None,
                admission: cfg
                    .admission
                    .map(|b| Bucket::new(b.per_sec / peers.len().max(1) as f64, b.excess, start)),
                deferred: Default::default(),
                warned_at: None,
                report,
                next_report: start + cfg.stats_interval,
                finished: false,
                inbox,
                peers,
                forwarded: None,
                walk: None,
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
            match self.turn() {
                Some(next) => wait = next,
                None => return Ok(self.st.counters),
            }
        }
    }

    /// One turn of the loop after a wait: the ready events, one batch of
    /// due expiries, stats, the drain. Returns how long the driver may wait
    /// for events before the next turn, or None once shutdown has drained.
    fn turn(&mut self) -> Option<Duration> {
        self.pump();
        let now = Instant::now();
        let busy = self.st.expire_due(&mut self.io, self.st.tick_at(now));
        self.st.housekeeping(&mut self.io, now);
        let walk = self.st.walk_presence();
        self.st.peers.flush();
        if self.st.finished {
            return None;
        }
        let wait = if busy {
            Duration::ZERO
        } else {
            self.st.next_deadline(now).saturating_duration_since(now)
        };
        Some(walk.map_or(wait, |w| w.min(wait)))
    }

    /// Acts on every event the driver has ready.
    fn pump(&mut self) {
        let Shard { io, st } = self;
        while let Some(ev) = io.next() {
            match ev {
                Event::Accepted(fd) => st.admit(io, fd),
                Event::AcceptFailed(err) => st.accept_failed(err),
                Event::Data(token, bytes) => {
                    let Some(key) = st.live(token) else { continue };
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
                        if slot.ended || slot.conn.phase() == Phase::Done {
                            st.close(io, key, Close::Graceful);
                        }
                    }
                }
                // A shard connects to nothing.
                Event::Connected(_) => {}
                Event::Wake => st.read_mail(io),
                Event::Datagram(bytes) => st.on_datagram(bytes),
            }
        }
    }

    /// The driver's counters (for tests and the stats line).
    pub fn io_stats(&self) -> IoStats {
        self.io.stats()
    }
}

impl State {
    fn tick_at(&self, t: Instant) -> u64 {
        (t.duration_since(self.start).as_nanos() / self.cfg.tick.as_nanos()) as u64
    }

    fn now_tick(&self) -> u64 {
        self.tick_at(Instant::now())
    }

    /// The instant tick `t` begins.
    fn instant_of(&self, t: u64) -> Instant {
        self.start + Duration::from_nanos((self.cfg.tick.as_nanos() * t as u128) as u64)
    }

    /// When the shard next has something to do without any event (as
    /// quinn-proto's `poll_timeout`): the wheel's next occupied slot, the
    /// next report, the end of the accept backoff, the drain's deadline.
    /// An idle shard sleeps until then, not every tick.
    fn next_deadline(&self, now: Instant) -> Instant {
        let wheel = self
            .wheel
            .next_due()
            .map(|t| self.instant_of(t.max(self.tick_at(now) + 1)));
        [
            wheel,
            Some(self.next_report),
            self.drain_deadline,
            self.accept_resume,
            self.pacing.as_ref().map(|p| p.next_due(self.drain_rate())),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.next_report)
    }

    /// Stats, the end of the accept backoff, the end of the drain.
    fn housekeeping(&mut self, io: &mut impl Driver, now: Instant) {
        if now >= self.next_report {
            self.send_report(io.stats());
            self.next_report = now + self.cfg.stats_interval;
        }
        if self.accept_resume.is_some_and(|t| now >= t) {
            self.accept_resume = None;
            // `defer`: those held over the budget go first; if they spend
            // it, the pause goes on.
            self.admit_deferred(io, now);
            if self.accept_resume.is_none() {
                if let Err(err) = io.resume_accepting() {
                    // Not fatal: the devices held keep being served; try again.
                    self.accept_resume = Some(now + ACCEPT_BACKOFF);
                    self.warn(format_args!(
                        "cannot resume accepting ({err}): trying again in {ACCEPT_BACKOFF:?}; check fs.epoll.max_user_watches and memory (see kernel-tuning/)"
                    ));
                }
            }
        }
        if self.pacing.is_some() {
            self.pace_drain(io, now);
        }
        if let Some(deadline) = self.drain_deadline {
            if self.slab.is_empty() || now >= deadline {
                self.close_all(io);
                self.send_report(io.stats());
                self.finished = true;
            }
        }
    }

    /// `defer`: admits the connections held over the budget while it
    /// lasts; if some are left, accepting stays paused until it is full.
    fn admit_deferred(&mut self, io: &mut impl Driver, now: Instant) {
        while !self.deferred.is_empty() {
            let Some(budget) = &mut self.admission else {
                return;
            };
            if !budget.take(now) {
                self.accept_resume = Some(budget.full_at());
                return;
            }
            let fd = self.deferred.pop_front().expect("not empty");
            self.admit_now(io, fd);
        }
    }

    /// The slot a token names, if that connection still lives.
    fn live(&self, token: Token) -> Option<usize> {
        let key = (token.0 & 0xffff_ffff) as usize;
        let gen = (token.0 >> 32) as u32;
        self.slab.get(key).filter(|s| s.gen == gen).map(|_| key)
    }

    fn accept_failed(&mut self, err: io::Error) {
        self.counters.accept_exhausted += 1;
        self.accept_resume = Some(Instant::now() + ACCEPT_BACKOFF);
        let held = self.slab.len();
        self.warn(format_args!(
            "accept failed ({err}) while holding {held} sockets: pausing accepts for {ACCEPT_BACKOFF:?}; raise RLIMIT_NOFILE or lower the load (see kernel-tuning/)"
        ));
    }

    /// Logs a resource problem at most once a second: under load it
    /// repeats for every connection, and one line says it all (whatever
    /// --stats-interval is: with the stats line off it would be an hour).
    fn warn(&mut self, msg: std::fmt::Arguments) {
        let now = Instant::now();
        if self
            .warned_at
            .is_none_or(|t| now >= t + Duration::from_secs(1))
        {
            eprintln!("shard {}: {msg}", self.id);
            self.warned_at = Some(now);
        }
    }

    fn admit(&mut self, io: &mut impl Driver, fd: OwnedFd) {
        if self.drain_deadline.is_some() {
            return; // accepted as shutdown began: dropping it closes it
        }
        if let Some(budget) = &mut self.admission {
            // Before any work for it: no registration, TLS or parsing.
            let now = Instant::now();
            let admitted = budget.take(now);
            if budget.excess == Excess::Defer && budget.empty() && self.accept_resume.is_none() {
                // The rest wait in the accept queue until the bucket is full.
                self.counters.admission_paused += 1;
                self.accept_resume = Some(budget.full_at());
                io.pause_accepting();
            }
            if !admitted {
                if budget.excess == Excess::Defer && self.deferred.len() < DEFER_MAX {
                    self.deferred.push_back(fd);
                    return;
                }
                self.counters.admission_refused += 1;
                // On a TLS port a plaintext 503 means nothing: a reset.
                let answer = if self.cfg.tls.is_some() {
                    &[][..]
                } else {
                    REFUSAL
                };
                io.refuse(fd, answer);
                return;
            }
        }
        self.admit_now(io, fd);
    }

    /// Takes a new connection in: registered, TLS begun, its handshake
    /// deadline on the wheel.
    fn admit_now(&mut self, io: &mut impl Driver, fd: OwnedFd) {
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let key = self.slab.vacant_key();
        // The driver reads the request at once if it came with the
        // connection (under a burst, 9 accepts in 10 find it queued).
        let h = match io.register(fd, Token((gen as u64) << 32 | key as u64), false) {
            Ok(h) => h,
            Err(err) => {
                self.warn(format_args!(
                    "cannot watch a new connection ({err}): dropping new connections; check fs.epoll.max_user_watches and memory (see kernel-tuning/)"
                ));
                return;
            }
        };
        let tls = match &self.cfg.tls {
            None => None,
            Some(config) => match ServerSession::server(config) {
                Ok(s) => Some(Box::new(s)),
                Err(err) => {
                    io.close(h, Close::Abortive);
                    self.warn(format_args!(
                        "cannot start TLS on a new connection ({err}): dropped it"
                    ));
                    return;
                }
            },
        };
        let now = self.now_tick();
        let deadline = now + self.handshake_ticks + 1;
        self.slab.insert(Slot {
            io: h,
            gen,
            upgraded: false,
            ended: false,
            last_seen: now,
            armed: deadline,
            frame_deadline: 0,
            conn: if self.cfg.proxy_protocol {
                Conn::new_proxied()
            } else {
                Conn::new()
            },
            id: DeviceId::default(),
            remote: None,
            why: Reason::Reset,
            tls,
        });
        self.wheel.insert(Entry {
            key: key as u32,
            gen,
            deadline,
        });
        self.counters.accepted += 1;
    }

    /// Feeds bytes to the connection; its answers are left in `self.out`.
    /// Returns when it upgraded (monotonic ns, read before its 101 is
    /// sent: see [`State::register`]), and how it ends, if it does.
    /// With TLS, the records to send first (handshake, alerts) are left in
    /// `self.sealed`, which [`State::write`] sends `self.out` after.
    fn on_bytes(&mut self, key: usize, bytes: &mut [u8]) -> (Option<u64>, Option<Ending>) {
        let full = self.open >= self.cfg.max_conns as u64;
        let now = self.now_tick();
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
                    if slot.ended {
                        return (None, None);
                    }
                    if bytes.first() == Some(&HANDSHAKE_RECORD) && slot.conn.buffered() == 0 {
                        return (None, Some(Ending::TlsOnPlain));
                    }
                }
                bytes
            }
            Some(_) if slot.ended => return (None, None),
            Some(tls) => {
                self.plain.clear();
                self.sealed.clear();
                match tls.feed(bytes, &mut self.plain, &mut self.sealed) {
                    Ok(fed) if fed.peer_closed && self.plain.is_empty() => {
                        return (None, Some(Ending::PeerClosed));
                    }
                    Ok(_) => {}
                    Err(TlsError::NotTls) => {
                        // Answered in plaintext, as the device spoke.
                        slot.tls = None;
                        self.sealed.clear();
                        self.out.extend_from_slice(PLAIN_ON_TLS);
                        return (None, Some(Ending::PlainOnTls));
                    }
                    Err(err) => return (None, Some(Ending::TlsFailed(err.to_string()))),
                }
                if self.plain.is_empty() {
                    // Handshake progress, or part of a record: a record
                    // begun after the upgrade must end within the frame
                    // timeout, as a frame must (it holds a buffer).
                    let partial = slot.upgraded && tls.buffered() > 0;
                    slot.track_partial(key, partial, now, self.frame_ticks, &mut self.wheel);
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
                    use c1m_proto::auth::{unix_now, Denied};
                    if let Err(why) = keys.verify(&u.id, u.token, unix_now()) {
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
                let ms = (now - slot.last_seen) * self.tick_ms;
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
                slot.bring_forward(key, now + self.timeout_ticks + 1, &mut self.wheel);
            }
        }
        let partial = slot.conn.has_partial_frame()
            || (slot.upgraded && slot.tls.as_ref().is_some_and(|t| t.buffered() > 0));
        slot.track_partial(key, partial, now, self.frame_ticks, &mut self.wheel);
        (r.upgraded.then(monotonic_ns), r.end.map(Ending::Conn))
    }

    /// Sends what [`State::on_bytes`] left in `self.out`, registers the
    /// device if it just upgraded, and ends the connection if it ended.
    fn answer(
        &mut self,
        io: &mut impl Driver,
        key: usize,
        upgraded: Option<u64>,
        end: Option<Ending>,
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
        let wrote = (self.out.is_empty() && self.sealed.is_empty()) || self.write(io, key);
        // After the 101 went out (closing the displaced one reuses
        // `self.out`), and even if it could not: the claim was made.
        if let Some((id, at)) = displaced {
            self.deliver(io, at.shard as usize, Msg::Replaced { id, at });
        }
        if !wrote {
            return;
        }
        let Some(end) = end else { return };
        self.slab[key].why = match end {
            Ending::Conn(End::ClientClose) => {
                self.counters.client_close += 1;
                if self.drain_deadline.is_some() {
                    Reason::Shutdown // it answered our Close 1001
                } else {
                    Reason::ClosedByDevice
                }
            }
            Ending::Conn(End::ProtocolError(code)) => {
                self.counters.protocol_error += 1;
                Reason::ProtocolError(code)
            }
            Ending::Conn(End::Rejected(status)) => {
                self.counters.reject(status);
                Reason::Reset // never upgraded: no event
            }
            Ending::Conn(End::BadProxy(why)) => {
                self.counters.proxy_bad += 1;
                let peer = io.peer_addr(self.slab[key].io);
                self.warn(format_args!(
                    "closed a connection from {} without a valid PROXY protocol header ({why}); --proxy-protocol is on: connect through a front that sends one (nginx proxy_protocol on, HAProxy send-proxy)",
                    peer.map_or("?".into(), |a| a.to_string())
                ));
                Reason::Reset // never upgraded: no event
            }
            Ending::PeerClosed => return self.peer_gone(io, key),
            Ending::TlsFailed(why) => {
                self.counters.tls_failed += 1;
                let peer = io.peer_addr(self.slab[key].io);
                self.warn(format_args!(
                    "TLS with {} failed ({why}): closed it, counted as tls_failed",
                    show(peer)
                ));
                Reason::Reset
            }
            Ending::PlainOnTls => {
                self.counters.plain_on_tls += 1;
                let peer = io.peer_addr(self.slab[key].io);
                self.warn(format_args!(
                    "{} sent plaintext to the TLS port: answered 400 and closed, counted as plain_on_tls (devices must use wss://)",
                    show(peer)
                ));
                Reason::Reset // never upgraded: no event
            }
            Ending::TlsOnPlain => {
                self.counters.tls_on_plain += 1;
                let peer = io.peer_addr(self.slab[key].io);
                self.warn(format_args!(
                    "{} sent a TLS handshake to this plaintext port: closed, counted as tls_on_plain (start the server with --tls-cert/--tls-key for wss://, or connect with ws://)",
                    show(peer)
                ));
                Reason::Reset // never upgraded: no event
            }
        };
        self.finish(io, key);
    }

    /// The upgrade in slot `key` carried X-Forwarded-For `ip`: it becomes
    /// the device's address when the previous hop (the PROXY header's
    /// source, else the socket peer) is in a trusted network. XFF has no
    /// port, so the address shows port 0.
    fn trust_forwarded(&mut self, io: &impl Driver, key: usize, ip: IpAddr) {
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

    /// The connection's end is counted: close it once its output is out.
    /// A peer that does not read it gets the frame timeout, then a reset.
    fn finish(&mut self, io: &mut impl Driver, key: usize) {
        let due = self.now_tick() + self.frame_ticks + 1;
        let slot = &mut self.slab[key];
        slot.ended = true;
        if io.is_flushed(slot.io) {
            self.close(io, key, Close::Graceful);
        } else {
            slot.bring_forward(key, due, &mut self.wheel);
        }
    }

    /// Sends `self.out` on the connection. False when it had to be closed.
    /// With TLS, `self.out` is sealed after whatever `self.sealed` holds
    /// (handshake records from the same read), and that is sent.
    fn write(&mut self, io: &mut impl Driver, key: usize) -> bool {
        let slot = &mut self.slab[key];
        let bytes: &[u8] = match &mut slot.tls {
            None => &self.out,
            Some(tls) => {
                if let Err(err) = tls.seal(&self.out, &mut self.sealed) {
                    self.sealed.clear();
                    if !slot.ended {
                        self.counters.tls_failed += 1; // else counted already
                    }
                    self.warn(format_args!(
                        "cannot encrypt for a device ({err}): closed it, counted as tls_failed"
                    ));
                    self.close(io, key, Close::Abortive);
                    return false;
                }
                &self.sealed
            }
        };
        let sent = io.send(slot.io, bytes);
        self.sealed.clear();
        match sent {
            Sent::Done | Sent::Queued => true,
            Sent::Overflow => {
                self.counters.slow_reader += 1;
                self.slab[key].why = Reason::SlowReader;
                self.close(io, key, Close::Abortive);
                false
            }
            Sent::Failed => {
                self.peer_gone(io, key);
                false
            }
        }
    }

    /// A panic while handling one connection: log it, count it, drop that
    /// connection (its state may be half-updated); the shard goes on.
    fn internal_error(&mut self, io: &mut impl Driver, key: usize, cause: &str) {
        self.counters.internal_error += 1;
        eprintln!(
            "shard {}: internal error on one connection ({cause}): closed it, the others are unaffected; please report this",
            self.id
        );
        if let Some(slot) = self.slab.get_mut(key) {
            slot.why = Reason::InternalError;
            self.close(io, key, Close::Abortive);
        }
    }

    /// EOF or a socket error: the device went away without a Close frame.
    fn peer_gone(&mut self, io: &mut impl Driver, key: usize) {
        let slot = &mut self.slab[key];
        if slot.ended {
            // Counted already; it only waited for its output.
        } else if slot.conn.phase() == Phase::Closing {
            self.counters.shutdown += 1;
            slot.why = Reason::Shutdown;
        } else {
            self.counters.peer_gone += 1;
            slot.why = Reason::Reset;
        }
        self.close(io, key, Close::Abortive);
    }

    /// Handles up to one batch of due wheel entries; true if more are due.
    fn expire_due(&mut self, io: &mut impl Driver, now: u64) -> bool {
        // Read once per batch, and only if a device expires.
        let mut clock: Option<Instant> = None;
        for _ in 0..EXPIRY_BATCH {
            let Some(e) = self.wheel.pop_due(now) else {
                return false;
            };
            let key = e.key as usize;
            let Some(slot) = self.slab.get_mut(key) else {
                continue;
            };
            if slot.gen != e.gen || slot.armed != e.deadline {
                continue; // closed and reused, or superseded by a later entry
            }
            // Its live entry is spent: whatever follows arms a new one.
            slot.armed = u64::MAX;
            if slot.ended {
                // Its final output was never read: counted already.
                self.close(io, key, Close::Abortive);
                continue;
            }
            match slot.conn.phase() {
                Phase::Proxy => {
                    self.counters.proxy_missing += 1;
                    let peer = io.peer_addr(slot.io);
                    self.close(io, key, Close::Abortive);
                    self.warn(format_args!(
                        "closed a connection from {} that sent no PROXY protocol header within --handshake-timeout; --proxy-protocol is on: connect through a front that sends one",
                        peer.map_or("?".into(), |a| a.to_string())
                    ));
                }
                Phase::Handshake => {
                    self.counters.handshake_timeout += 1;
                    self.close(io, key, Close::Abortive);
                }
                Phase::Done => {
                    // Not reached: a Done connection has ended (above).
                    self.counters.slow_reader += 1;
                    slot.why = Reason::SlowReader;
                    self.close(io, key, Close::Abortive);
                }
                Phase::Open | Phase::Closing => {
                    let silent_due = slot.last_seen + self.timeout_ticks + 1;
                    let frame_due = match slot.frame_deadline {
                        0 => u64::MAX,
                        d => d,
                    };
                    if frame_due <= now {
                        self.counters.frame_timeout += 1;
                        slot.why = Reason::FrameTimeout;
                        self.close(io, key, Close::Abortive);
                    } else if silent_due <= now {
                        self.counters.expired += 1;
                        slot.why = Reason::Expired;
                        // From the start of its last frame's tick: at most a
                        // tick above the true lag.
                        let last_seen = slot.last_seen;
                        let due = self.instant_of(last_seen) + self.cfg.timeout;
                        let lag = clock
                            .get_or_insert_with(Instant::now)
                            .saturating_duration_since(due);
                        self.counters
                            .expiry_lag
                            .record(&EXPIRY_LAG_MS, lag.as_millis() as u64);
                        self.expire(io, key);
                    } else {
                        let due = silent_due.min(frame_due);
                        slot.armed = due;
                        self.wheel.insert(Entry { deadline: due, ..e });
                    }
                }
            }
        }
        true
    }

    /// Deletes a silent device: a reset by default (the peer is presumed
    /// dead, so a FIN would only leave an orphan retransmitting into the
    /// void), or Close 1001 and FIN with `--graceful-expiry`. The Close goes
    /// out after any output still pending (which may hold part of a frame),
    /// never in the middle of it.
    fn expire(&mut self, io: &mut impl Driver, key: usize) {
        if !self.cfg.graceful_expiry {
            return self.close(io, key, Close::Abortive);
        }
        self.out.clear();
        self.slab[key].conn.expire(&mut self.out);
        if self.write(io, key) {
            self.finish(io, key);
        }
    }

    fn close(&mut self, io: &mut impl Driver, key: usize, how: Close) {
        let slot = self.slab.remove(key);
        if slot.upgraded && self.cfg.events.is_some() {
            // Before the close, while the socket still knows its peer (or
            // the address a front gave).
            let remote = slot
                .remote
                .as_deref()
                .copied()
                .or_else(|| io.peer_addr(slot.io));
            self.event(
                Kind::Disconnected(slot.why),
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

    /// Offers the publisher a presence record of up to [`WALK_SLOTS`]
    /// slots' devices, from where the walk stands. A full queue pauses the
    /// walk (the records are not dropped: the walk resumes there). Returns
    /// how soon the loop should come back: now while there is more, 1 ms
    /// while the queue is full, None once done (or with no walk).
    fn walk_presence(&mut self) -> Option<Duration> {
        let from = self.walk?;
        let Some(events) = &self.cfg.events else {
            self.walk = None;
            return None;
        };
        let end = self.slab.capacity().min(from + WALK_SLOTS);
        let time_ms = crate::events::event::unix_ms();
        for key in from..end {
            let Some(slot) = self.slab.get(key) else {
                continue;
            };
            if !slot.upgraded || slot.ended {
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

    /// This shard's number over the whole server (all `--procs` workers).
    fn me(&self) -> usize {
        self.peers.base() + self.id
    }

    fn place(&self, key: usize, gen: u32) -> Location {
        Location {
            shard: self.me() as u32,
            key: key as u32,
            gen,
            since: 0,
        }
    }

    /// Offers a lifecycle event to the publisher (--nats); a full queue
    /// drops it, counted. Never waits.
    fn event(
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
        let time_ms = crate::events::event::unix_ms();
        let heard_ago = Instant::now()
            .saturating_duration_since(self.instant_of(last_seen))
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
    fn register(
        &mut self,
        io: &mut impl Driver,
        key: usize,
        since: u64,
    ) -> Option<(DeviceId, Location)> {
        let slot = &self.slab[key];
        let at = Location {
            since,
            ..self.place(key, slot.gen)
        };
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
    fn deliver(&mut self, io: &mut impl Driver, to: usize, msg: Msg) {
        if to == self.me() {
            self.on_registry(io, msg);
        } else {
            self.peers.send(to, Mail::Registry(msg));
        }
    }

    /// Everything other shards and threads sent since the last wake-up.
    fn read_mail(&mut self, io: &mut impl Driver) {
        while let Some(mail) = self.inbox.next() {
            match mail {
                Mail::Registry(msg) => self.on_registry(io, msg),
                Mail::Shutdown => self.begin_shutdown(io),
                Mail::Ask { id, ask, at, reply } => self.on_ask(io, id, ask, at, reply),
                // From the start again if a walk is under way: what it
                // wrote may have gone with the broker too.
                Mail::Present => {
                    if self.cfg.events.is_some() {
                        self.walk = Some(0);
                    }
                }
            }
        }
    }

    fn on_registry(&mut self, io: &mut impl Driver, msg: Msg) {
        match msg {
            Msg::Replaced { id, at } => self.replaced(io, id, at),
        }
    }

    /// An operator's question about a device: the owner finds where it
    /// lives and forwards the question there; the holder acts and answers.
    fn on_ask(
        &mut self,
        io: &mut impl Driver,
        id: DeviceId,
        ask: Ask,
        at: Option<Location>,
        reply: Reply,
    ) {
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
            .is_some_and(|s| s.gen == at.gen && s.upgraded && !s.ended && s.id == id);
        let answer = if !held {
            Answer::NotConnected
        } else {
            match ask {
                Ask::Lookup => Answer::Found(self.info(io, key, at)),
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
                    if self.unix_ms_of(at.since) < unix_ms {
                        self.replaced(io, id, at);
                        Answer::Kicked
                    } else {
                        Answer::NotConnected
                    }
                }
                Ask::Kick => {
                    self.counters.kicked += 1;
                    self.slab[key].why = Reason::Kicked;
                    self.out.clear();
                    self.slab[key]
                        .conn
                        .end(&mut self.out, code::KICKED, b"kicked");
                    if self.write(io, key) {
                        self.finish(io, key);
                    }
                    Answer::Kicked
                }
            }
        };
        self.peers.reply(reply, answer);
    }

    /// The unix milliseconds of a monotonic time (an upgrade's `since`).
    fn unix_ms_of(&self, since: u64) -> u64 {
        let ago_ms = monotonic_ns().saturating_sub(since) / 1_000_000;
        crate::events::event::unix_ms().saturating_sub(ago_ms)
    }

    /// What `GET /devices/<id>` shows of the device in slot `key`.
    fn info(&self, io: &impl Driver, key: usize, at: Location) -> DeviceInfo {
        let slot = &self.slab[key];
        let now = Instant::now();
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let ago_ms = |then: Instant| now.saturating_duration_since(then).as_millis() as u64;
        let connected_ms_ago = monotonic_ns().saturating_sub(at.since) / 1_000_000;
        DeviceInfo {
            shard: self.me() as u32,
            connected_since_ms: unix_ms.saturating_sub(connected_ms_ago),
            last_heard_ms: unix_ms.saturating_sub(ago_ms(self.instant_of(slot.last_seen))),
            remote: self.device_addr(io, key),
        }
    }

    /// The device's address: from its PROXY header or a trusted
    /// X-Forwarded-For when there was one, else the socket peer's. What
    /// lookups, events and logs about the device show.
    fn device_addr(&self, io: &impl Driver, key: usize) -> Option<SocketAddr> {
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
    fn replaced(&mut self, io: &mut impl Driver, id: DeviceId, at: Location) {
        let key = at.key as usize;
        match self.slab.get_mut(key) {
            Some(slot) if slot.gen == at.gen && !slot.ended && slot.id == id => {
                self.counters.replaced += 1;
                slot.why = Reason::Replaced;
                self.out.clear();
                slot.conn.end(&mut self.out, code::REPLACED, b"replaced");
                if self.write(io, key) {
                    self.finish(io, key);
                }
            }
            _ => {} // it ended meanwhile
        }
    }

    /// Stops accepting and sends Close 1001 to every device: at once, or
    /// paced at this shard's share of --drain-rate ([`State::pace_drain`]).
    fn begin_shutdown(&mut self, io: &mut impl Driver) {
        if self.drain_deadline.is_some() {
            return;
        }
        let now = Instant::now();
        io.unlisten();
        self.accept_resume = None;
        self.deferred.clear(); // closed: they were never served
        let rate = self.drain_rate();
        if rate > 0.0 {
            // The last Close goes out after held / rate; then the devices
            // have --drain-timeout to answer, as without pacing.
            let held = self.slab.len() as f64;
            let pacing = Duration::from_secs_f64(held / rate);
            self.drain_deadline = Some(now + pacing + self.cfg.drain_timeout);
            self.pacing = Some(Pacing {
                began: now,
                next_key: 0,
                closed: 0,
            });
            return self.pace_drain(io, now);
        }
        self.drain_deadline = Some(now + self.cfg.drain_timeout);
        let keys: Vec<usize> = self.slab.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close_for_drain(io, key, b"");
        }
    }

    /// This shard's share of --drain-rate, devices per second.
    fn drain_rate(&self) -> f64 {
        self.cfg.drain_rate / self.peers.len().max(1) as f64
    }

    /// Sends the Closes of a paced drain that are due by `now`: one at
    /// its start, then one every 1 / rate seconds.
    fn pace_drain(&mut self, io: &mut impl Driver, now: Instant) {
        let Some(p) = self.pacing else { return };
        let rate = self.drain_rate();
        let due = (now.duration_since(p.began).as_secs_f64() * rate) as u64 + 1;
        let (mut key, mut closed) = (p.next_key, p.closed);
        let end = self.slab.capacity();
        while closed < due && key < end {
            if self.slab.get(key).is_some_and(|s| !s.ended) {
                self.close_for_drain(io, key, DRAIN_REASON);
                closed += 1;
            }
            key += 1;
        }
        self.pacing = (key < end).then_some(Pacing {
            next_key: key,
            closed,
            ..p
        });
    }

    /// Close 1001 (with `reason`) to the device in slot `key`, if it is not
    /// on its way out already; one still in its handshake just ends.
    fn close_for_drain(&mut self, io: &mut impl Driver, key: usize, reason: &[u8]) {
        let slot = &mut self.slab[key];
        if slot.ended {
            return;
        }
        self.out.clear();
        slot.conn.start_close_with(&mut self.out, reason);
        if slot.conn.phase() == Phase::Done {
            self.counters.shutdown += 1;
            slot.why = Reason::Shutdown;
            self.close(io, key, Close::Abortive);
        } else {
            self.write(io, key);
        }
    }

    /// The drain timed out (or finished): close whatever is left.
    fn close_all(&mut self, io: &mut impl Driver) {
        let keys: Vec<usize> = self.slab.iter().map(|(k, _)| k).collect();
        for key in keys {
            if !self.slab[key].ended {
                self.counters.shutdown += 1;
                self.slab[key].why = Reason::Shutdown;
            }
            self.close(io, key, Close::Abortive);
        }
    }

    fn send_report(&self, io: IoStats) {
        let mut totals = self.counters;
        totals.io_cq_overflows = io.cq_overflows;
        totals.io_cancels = io.cancels;
        let _ = self.report.send(Snapshot {
            shard: self.id,
            open: self.open,
            sockets: self.slab.len() as u64,
            totals,
        });
    }
}

#[cfg(test)]
mod tests {
    use c1m_io::script::{Fake, Script};

    use super::*;

    /// The slot is what every idle device costs in user space: what only
    /// some connections have (a TLS session, a front's address, a partial
    /// frame or message) sits behind optional pointers, 8 bytes each.
    /// The registry's entry is 32 bytes (crate::directory::registry's test).
    #[test]
    fn a_slot_stays_small() {
        let size = std::mem::size_of::<Slot>();
        // As slab stores it: `enum Entry<T> { Vacant(usize), Occupied(T) }`.
        #[allow(dead_code)]
        enum AsInSlab {
            Vacant(usize),
            Occupied(Slot),
        }
        let entry = std::mem::size_of::<AsInSlab>();
        println!("Slot: {size} bytes, {entry} in the slab");
        assert_eq!(std::mem::size_of::<Conn>(), 24);
        assert!(size <= 128, "Slot is {size} bytes");
        assert!(entry <= 128, "a slab entry is {entry} bytes");
    }

    #[test]
    fn a_panic_is_contained_with_its_message() {
        assert_eq!(contain(|| 7), Ok(7));
        assert_eq!(
            contain(|| -> u8 { panic!("bad bytes") }),
            Err("bad bytes".into())
        );
        let n = 3;
        assert_eq!(
            contain(|| -> u8 { panic!("frame {n}") }),
            Err("frame 3".into())
        );
    }

    fn shard(graceful_expiry: bool, script: Script) -> Shard<Script> {
        shard_and_peers(graceful_expiry, script).0
    }

    fn shard_and_peers(
        graceful_expiry: bool,
        script: Script,
    ) -> (Shard<Script>, Vec<crate::directory::mailbox::Peer>) {
        let cfg = ShardConfig {
            limits: Limits::default(),
            timeout: Duration::from_millis(40),
            tick: Duration::from_millis(10),
            handshake_timeout: Duration::from_millis(500),
            frame_timeout: Duration::from_millis(500),
            max_conns: 10,
            graceful_expiry,
            drain_timeout: Duration::from_secs(1),
            drain_rate: 0.0,
            stats_interval: Duration::from_secs(3600),
            inject_panic: false,
            auth: None,
            proxy_protocol: false,
            trust_forwarded: Vec::new(),
            events: None,
            tls: None,
            registry: Registry::create(64).unwrap(),
            udp: None,
            admission: None,
        };
        let listener = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let (mut mail, peers) = crate::directory::mailbox::wire(1).unwrap();
        let (tx, _) = std::sync::mpsc::channel();
        (
            Shard::new(0, cfg, script, listener, mail.remove(0), tx).unwrap(),
            peers,
        )
    }

    /// --nats-exclusive's question: a device that connected elsewhere
    /// before it connected here stays; one that connected elsewhere later
    /// is closed here with 4000 "replaced".
    #[test]
    fn a_device_is_superseded_only_by_a_later_connect_elsewhere() {
        let mut s = shard(
            false,
            Script {
                events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
                ..Script::default()
            },
        );
        s.turn();
        assert!(s.io.sent[0].starts_with(b"HTTP/1.1 101 "));
        let no_reply = || Reply::Remote {
            req: crate::directory::mailbox::NO_REPLY,
        };
        let earlier = crate::events::event::unix_ms() - 60_000;
        s.st.on_ask(
            &mut s.io,
            DeviceId::new("aa:bb"),
            Ask::Supersede { unix_ms: earlier },
            None,
            no_reply(),
        );
        assert_eq!(s.io.sent.len(), 1, "kept: it connected here later");
        assert_eq!(s.st.counters.replaced, 0);
        s.st.on_ask(
            &mut s.io,
            DeviceId::new("aa:bb"),
            Ask::Supersede {
                unix_ms: crate::events::event::unix_ms() + 1_000,
            },
            None,
            no_reply(),
        );
        assert_eq!(s.st.counters.replaced, 1);
        assert_eq!(&s.io.sent[1][..4], &[0x88, 10, 0x0f, 0xa0], "Close 4000");
        // Another id, or none held: nothing happens.
        s.st.on_ask(
            &mut s.io,
            DeviceId::new("cc:dd"),
            Ask::Supersede { unix_ms: u64::MAX },
            None,
            no_reply(),
        );
        assert_eq!(s.st.counters.replaced, 1);
    }

    /// A push to a device whose Close 1001 is out (a drain under way) is
    /// refused: no frame after our Close (RFC 6455 5.5.1).
    #[test]
    fn a_push_after_our_close_is_refused() {
        let mut s = shard(
            false,
            Script {
                events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
                ..Script::default()
            },
        );
        s.turn();
        s.st.begin_shutdown(&mut s.io);
        assert_eq!(&s.io.sent[1][..2], &[0x88, 2], "Close 1001");
        let (tx, rx) = std::sync::mpsc::channel();
        let push = Ask::Push {
            text: true,
            payload: b"late".to_vec(),
        };
        let id = DeviceId::new("aa:bb");
        s.st.on_ask(&mut s.io, id, push, None, Reply::Local(tx));
        assert_eq!(rx.recv().unwrap(), Answer::NotConnected);
        assert_eq!(s.io.sent.len(), 2, "a frame after our Close");
    }

    /// After the broker comes back, the shard offers a presence record of
    /// every device it holds; a full queue pauses the walk (the loop comes
    /// back within 1 ms) instead of dropping records, and it then goes on.
    #[test]
    fn a_presence_walk_pauses_on_a_full_queue_and_resumes() {
        let (mut s, peers) = shard_and_peers(
            false,
            Script {
                events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
                ..Script::default()
            },
        );
        let (tx, rx, _bell) = crate::events::queue::channel(1);
        s.st.cfg.events = Some(tx);
        s.turn();
        let connected = rx.try_recv().expect("the connect's event");
        assert_eq!(connected.kind, Kind::Connected);
        // The queue is full again (a stand-in event) when the walk starts.
        assert!(s.st.cfg.events.as_ref().unwrap().offer(connected.clone()));
        peers[0].send_now(Mail::Present);
        s.st.read_mail(&mut s.io);
        let wait = s.turn().unwrap();
        assert!(wait <= Duration::from_millis(1), "paused: {wait:?}");
        assert!(s.st.walk.is_some(), "paused, not given up");
        rx.try_recv().unwrap();
        let wait = s.turn().unwrap();
        assert!(s.st.walk.is_none(), "done");
        assert!(wait > Duration::from_millis(1), "{wait:?}");
        let present = rx.try_recv().expect("the device's presence record");
        assert_eq!(present.kind, Kind::Present);
        assert_eq!(present.id.as_str(), "aa:bb");
        assert_eq!(
            (present.at.shard, present.at.key, present.at.gen),
            (connected.at.shard, connected.at.key, connected.at.gen)
        );
        assert!(rx.try_recv().is_err(), "one record per device");
        assert_eq!(s.st.counters.events_dropped, 0);
    }

    /// A self-signed certificate for "localhost" and its key, as PEM files
    /// in a new directory (cert.pem, key.pem). Made at test time.
    fn make_cert(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("c1m-shard-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let paths = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&paths.0, cert.pem()).unwrap();
        std::fs::write(&paths.1, key.serialize_pem()).unwrap();
        paths
    }

    /// The PROXY header is parsed by the connection core, behind TLS: the
    /// two together are refused at start, in one sentence.
    #[test]
    fn proxy_protocol_with_tls_is_refused_in_one_sentence() {
        let (cert, key) = make_cert("proxy-with-tls");
        let mut cfg = shard(false, Script::default()).st.cfg.clone();
        cfg.proxy_protocol = true;
        assert!(cfg.validate().is_ok());
        cfg.tls = Some(c1m_io::tls::server_config(&cert, &key).unwrap());
        let _ = std::fs::remove_dir_all(cert.parent().unwrap());
        let err = cfg.validate().unwrap_err();
        assert!(
            err.contains("--proxy-protocol") && err.contains("--tls-cert"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        cfg.proxy_protocol = false;
        assert!(cfg.validate().is_ok());
    }

    const UPGRADE: &[u8] = b"GET /ws?id=aa:bb HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    /// Issue 10's read of the loop: `--graceful-expiry` sent its Close with
    /// a direct send while pending output might hold part of a frame, so
    /// the device could read the Close in the middle of a pong. Now the
    /// Close goes after whatever the driver holds, and the socket closes
    /// only once that is all out.
    #[test]
    fn graceful_expiry_queues_its_close_after_held_output_and_waits_for_it() {
        let mut ping = Vec::new();
        frame::write_masked_frame(&mut ping, Opcode::Ping, true, b"hb", [1, 2, 3, 4]);
        let mut s = shard(
            true,
            Script {
                events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
                ..Script::default()
            },
        );
        s.turn();
        assert!(s.io.sent[0].starts_with(b"HTTP/1.1 101 "));
        // The device stops reading: its pong is held by the driver.
        s.io.hold_output = true;
        s.io.events.push_back(Fake::Data(ping));
        s.turn();
        assert_eq!(s.io.sent[1], [0x8a, 2, b'h', b'b']);
        // Silent past the timeout: Close 1001 after the pong, no close yet.
        std::thread::sleep(Duration::from_millis(80));
        s.turn();
        assert_eq!(s.st.counters.expired, 1);
        assert_eq!(s.io.sent[2], [0x88, 2, 0x03, 0xe9]);
        assert!(s.io.closed.is_empty(), "closed before its output was out");
        // The output drains: now the FIN.
        s.io.events.push_back(Fake::Flushed);
        s.turn();
        assert_eq!(s.io.closed, [Close::Graceful]);
        assert_eq!(
            s.st.counters.closed(),
            1,
            "counted once: {:?}",
            s.st.counters
        );
    }

    /// A held Close that never drains is reset after the frame timeout, and
    /// the expiry is still counted once.
    #[test]
    fn an_expired_device_that_never_reads_its_close_is_reset_once() {
        let mut s = shard(
            true,
            Script {
                events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
                ..Script::default()
            },
        );
        s.turn();
        s.io.hold_output = true;
        std::thread::sleep(Duration::from_millis(80));
        s.turn();
        assert_eq!(s.st.counters.expired, 1);
        assert!(s.io.closed.is_empty());
        std::thread::sleep(Duration::from_millis(600));
        s.turn();
        assert_eq!(s.io.closed, [Close::Abortive]);
        assert_eq!(s.st.counters.closed(), 1, "{:?}", s.st.counters);
    }

    /// Issue 10's read of the loop: re-adding the listener after the accept
    /// backoff used `?`, so an ENOMEM there stopped the shard and dropped
    /// every device it held. Now the shard warns and tries again later.
    #[test]
    fn a_failed_accept_resume_is_retried_not_fatal() {
        let mut s = shard(
            false,
            Script {
                events: [Fake::AcceptFailed(libc::EMFILE)].into(),
                resume_failures: 1,
                ..Script::default()
            },
        );
        assert!(s.turn().is_some());
        assert_eq!(s.st.counters.accept_exhausted, 1);
        std::thread::sleep(ACCEPT_BACKOFF + Duration::from_millis(10));
        assert!(s.turn().is_some(), "the shard goes on");
        assert_eq!(s.io.resumes, 1);
        std::thread::sleep(ACCEPT_BACKOFF + Duration::from_millis(10));
        assert!(s.turn().is_some());
        assert_eq!(s.io.resumes, 2, "tried again");
        assert!(s.st.accept_resume.is_none(), "accepting again");
    }
}
