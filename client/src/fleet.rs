//! One core's share of the fleet: its devices in a slab, their sockets in
//! the I/O driver the server's shards use ([`c1m_io`]: io_uring or epoll,
//! [`Driver`]), and every timer (connect deadlines, heartbeats) on one
//! hashed timing wheel. The driver makes the system calls; the fleet keeps
//! the decisions and the measurements.
//!
//! A device goes Connecting -> Upgrading -> Open. An Open heartbeating device
//! has exactly one wheel entry, its next heartbeat; a silent one has none and
//! waits for the server to expire it. Idle devices hold no buffers.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow::{self, Break, Continue};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use c1m_io::epoll::EpollDriver;
use c1m_io::socket;
use c1m_io::tls::ClientSession;
use c1m_io::uring::UringDriver;
use c1m_io::{Backend, Close, Driver, DriverConfig, Event, Handle, Sent, Token};
use c1m_proto::auth::Keys;
use c1m_proto::carry::Carry;
use c1m_proto::client_handshake::{self, key_for, Answer};
use c1m_proto::frame::{self, code, Opcode};
use c1m_proto::wheel::{self, Entry, Wheel};
use slab::Slab;

use crate::device::{self, Rng};
use crate::hgrm;
use crate::ips::route;
use crate::metrics::{Counters, Failure, Measured, Phase, Report};
use crate::rate::RateLimiter;
use crate::udp_beat::UdpBeats;

/// The wheel's tick: heartbeat jitter is +-10% of seconds, so 10 ms is fine
/// enough and keeps the wheel small.
pub const TICK: Duration = Duration::from_millis(10);
const TICK_US: u64 = 10_000;
/// Largest server frame a device accepts (servers send pongs, closes and,
/// with --echo, the device's own messages back).
const MAX_SERVER_FRAME: usize = 1 << 20;
/// Work done per phase of a step, so that no phase starves another.
const BUDGET: usize = 512;
/// Longest sleep, so that a stop request is seen quickly.
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// Timers are served in batches of one tick (10 ms). Longer batches were
/// measured (results/20261206T170643Z-client-ab, 50 ms at a 10 s interval):
/// the client's CPU per heartbeat fell to 0.56x, but the server's fell as
/// much (0.54x) and the RTT p50 tripled, because the heartbeats arrived in
/// bursts: a load unlike independent devices that flatters the server's
/// figure. So the heartbeats keep the spread of the 10 ms wheel.
const BATCH_TICKS: u64 = 1;
/// Output the driver holds for one device at most. A device sends a
/// 200-byte upgrade request, heartbeats of a few bytes and pongs: a server
/// that leaves this much of them unread is not reading.
const MAX_PENDING: usize = 64 * 1024;
/// How long a device's token is good for (--auth-secret-file): a day, as
/// a device would renew it, far longer than any run.
const TOKEN_TTL_S: u64 = 86_400;

/// What a device sends as its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatKind {
    /// A Ping; the Pong gives the round trip.
    Ping,
    /// A small Text message (round trip only if the server echoes).
    Text,
    /// A small Binary message (round trip only if the server echoes).
    Binary,
}

impl std::str::FromStr for HeartbeatKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ping" => Ok(HeartbeatKind::Ping),
            "text" => Ok(HeartbeatKind::Text),
            "binary" => Ok(HeartbeatKind::Binary),
            _ => Err(format!(
                "{s:?} is not a heartbeat kind: ping, text or binary"
            )),
        }
    }
}

/// What every core of one client process does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub servers: Vec<SocketAddr>,
    /// Source addresses; empty: the kernel picks.
    pub sources: Vec<IpAddr>,
    /// This process's devices are numbers first_device..first_device+devices.
    pub first_device: u64,
    pub devices: u64,
    pub cores: usize,
    /// Connections per second for each core; 0 = as fast as possible.
    pub rate_per_core: f64,
    /// Upgrades in flight per core.
    pub concurrency: usize,
    pub heartbeat: Duration,
    pub kind: HeartbeatKind,
    /// Heartbeats as the datagram of the 101's ticket (udp_beat.rs), and
    /// a WebSocket heartbeat too every this many (0: never).
    pub udp_heartbeat: bool,
    pub udp_heartbeat_every: u32,
    /// --udp-to: send the datagrams here instead of to the device's server
    /// (a bare receiver, for the floor of bench/udp-heartbeat.sh).
    pub udp_to: Option<SocketAddr>,
    pub silent: f64,
    pub server_timeout: Duration,
    pub hold: Duration,
    /// How long past `server_timeout` a silent device may wait to be expired.
    pub expiry_window: Duration,
    pub connect_timeout: Duration,
    /// After the hold, every device sends one last heartbeat and stops, so
    /// that the server deletes the whole fleet.
    pub go_silent: bool,
    /// A Close from the server is neither answered nor acted on: the
    /// device keeps its connection (and its heartbeats) until the server
    /// ends it, as a peer that ignores Close 1001 would, so a draining
    /// server runs to its --drain-timeout (bench/faults.sh).
    pub ignore_close: bool,
    /// The silent fraction heartbeats until this long into the hold, then
    /// stops (each after its last beat); None: silent from its upgrade.
    pub silent_after: Option<Duration>,
    /// This fraction of the heartbeating devices opens a second connection
    /// with its own id as soon as its first is up, while the first is still
    /// open: the server must close the first with 4000 "replaced".
    pub reconnect: f64,
    /// --reconnect-storm: this long into the hold, every open device resets
    /// its connection (SO_LINGER 0) at once and reconnects as firmware
    /// would: after a wait of exponential backoff with full jitter
    /// ([`device::backoff`]: `backoff_base`, doubling per failed attempt,
    /// at most `backoff_cap`), retrying after each failure (refused, 503,
    /// reset, timeout) the same way. None: no storm.
    pub reconnect_storm: Option<Duration>,
    /// A Close 1001 from the server (a drain, a hot upgrade's wss close)
    /// makes a heartbeating device reconnect, after the same backoff as a
    /// storm's, instead of ending: as device firmware does.
    pub redial_on_close: bool,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub id_prefix: String,
    /// Tag in every device id, unique per run.
    pub run_tag: u16,
    /// Time zero of the run, shared by every core.
    pub origin: Instant,
    /// The I/O driver each core runs (one that [`Backend::usable`] allowed).
    pub io: Backend,
    /// --auth-secret-file: each device signs its own token (valid one day).
    pub auth: Option<Arc<Keys>>,
    /// --tls: the process's client configs (a device's first connection,
    /// and its reconnects: their ticket pool lets reconnects resume) and
    /// the server's name; None: plaintext.
    pub tls: Option<(
        c1m_io::tls::FleetConfigs,
        rustls_pki_types::ServerName<'static>,
    )>,
}

/// Where a device is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// --reconnect-storm or --redial-on-close: waiting out its backoff,
    /// without a socket.
    Backoff,
    Connecting,
    Upgrading,
    Open,
}

struct Device {
    /// Its socket, held by the driver.
    io: Handle,
    gen: u32,
    /// Device number (its id and handshake key derive from it).
    n: u64,
    stage: Stage,
    /// One of the `--silent` fraction.
    chosen: bool,
    /// Has stopped heartbeating: only the server ends it now.
    silent: bool,
    /// Tick of this device's live wheel entry; others are stale.
    due: u64,
    /// Microseconds since the origin: connect began, last message sent
    /// (upgrade request or heartbeat), unanswered ping sent (0: none).
    started_us: u64,
    last_sent_us: u64,
    ping_sent_us: u64,
    /// Bytes of an unfinished answer or frame (empty, unallocated, when idle).
    carry: Carry,
    /// The second connection of a `--reconnect-fraction` device.
    twin: bool,
    /// Its TLS session (--tls), from its connect on.
    tls: Option<Box<ClientSession>>,
    /// Without its connection and dialing again (and why), until it is
    /// back; its failed attempts so far (the backoff's exponent).
    redial: Option<Redial>,
    attempt: u16,
}

/// Why a device is dialing again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Redial {
    /// --reconnect-storm reset it.
    Storm,
    /// --redial-on-close: the server closed it with 1001 at this time
    /// (milliseconds since the origin: 4 bytes, so that a device takes 80
    /// bytes, not 88).
    Drained { at_ms: u32 },
}

pub enum Step {
    Busy,
    Idle(Instant),
    Finished,
}

/// Runs core `core`'s share of `plan` on the calling thread (a glommio
/// executor's) with the driver of `plan.io`, built here: an io_uring ring
/// belongs to the thread that creates it. Sends [`Report`]s to `reports`,
/// the last one [`Report::Done`]; an error means the core could not start.
pub fn run(
    core: usize,
    plan: Arc<Plan>,
    stop: Arc<AtomicBool>,
    go: Arc<AtomicBool>,
    reports: Sender<Report>,
) -> io::Result<()> {
    let cfg = DriverConfig {
        max_pending: MAX_PENDING,
    };
    match plan.io {
        Backend::Epoll => Fleet::new(core, plan, EpollDriver::new(cfg)?, stop, go, reports).run(),
        Backend::Uring => Fleet::new(core, plan, UringDriver::new(cfg)?, stop, go, reports).run(),
    }
    Ok(())
}

pub struct Fleet<D: Driver> {
    io: D,
    st: State,
}

/// Everything of a fleet but its driver, so that the bytes of an
/// [`Event::Data`] (which borrow the driver) can be handled while the rest
/// changes.
struct State {
    core: usize,
    plan: Arc<Plan>,
    hosts: Vec<String>,
    devices: Slab<Device>,
    wheel: Wheel,
    gen: u32,
    counters: Counters,
    measured: Box<Measured>,
    rng: Rng,
    limiter: RateLimiter,
    /// Devices of this core: numbers first_device + core + k * cores.
    next_k: u64,
    mine: u64,
    inflight: usize,
    /// Devices whose second connection (`--reconnect-fraction`) is to open.
    twins: Vec<u64>,
    phase: Phase,
    hold_end: Option<Instant>,
    /// When this core had tried every device and heard back from each.
    ramp_done_us: Option<u64>,
    /// With `go_silent`: when the fleet began falling silent.
    silence_us: Option<u64>,
    silent_open: u64,
    /// Chosen devices open and still heartbeating (before `mute_at`).
    chosen_beating: u64,
    /// With `silent_after`: when the chosen devices stop heartbeating.
    mute_at: Option<Instant>,
    /// --reconnect-storm: when this core's storm is due (from its hold's
    /// start), then when it happened (microseconds since the origin).
    storm_at: Option<Instant>,
    storm_us: u64,
    backoff_base_ticks: u64,
    backoff_cap_ticks: u64,
    last_silent_sent_us: u64,
    heartbeat_ticks: u64,
    connect_ticks: u64,
    /// Ticks per timer batch (see [`BATCH_TICKS`]).
    batch_ticks: u64,
    server_timeout_us: u64,
    stop: Arc<AtomicBool>,
    /// Set once every core of the whole client (every --procs worker's
    /// too) has finished its ramp: the holds begin together, so that the
    /// --go-silent and --reconnect-storm moments, which follow the hold's
    /// start, fall at one time for the whole fleet rather than spread over
    /// the cores' ramp ends (20 s apart at 1M over 60 processes).
    go: Arc<AtomicBool>,
    reports: Sender<Report>,
    next_progress: Instant,
    /// What a device sends next: an upgrade request, a heartbeat, or the
    /// pongs answering the pings of one read.
    out: Vec<u8>,
    /// --tls: the plaintext of one read, and the records to send (handshake
    /// output, then `out` sealed). Empty when TLS is off.
    plain: Vec<u8>,
    sealed: Vec<u8>,
    /// A failed TLS handshake was reported (once per core).
    tls_warned: bool,
    id: String,
    /// --udp-heartbeat: the fleet's tickets and datagram batch.
    udp: Option<UdpBeats>,
}

impl<D: Driver> Fleet<D> {
    pub fn new(
        core: usize,
        plan: Arc<Plan>,
        io: D,
        stop: Arc<AtomicBool>,
        go: Arc<AtomicBool>,
        reports: Sender<Report>,
    ) -> Fleet<D> {
        let cores = plan.cores.max(1) as u64;
        let mine = plan.devices / cores + u64::from((core as u64) < plan.devices % cores);
        let heartbeat_ticks = (plan.heartbeat.as_micros() as u64 / TICK_US).max(1);
        let connect_ticks = (plan.connect_timeout.as_micros() as u64 / TICK_US).max(1);
        let backoff_cap_ticks = (plan.backoff_cap.as_micros() as u64 / TICK_US).max(1);
        let horizon = (heartbeat_ticks * 11 / 10 + 1)
            .max(connect_ticks + 1)
            .max(backoff_cap_ticks + 2)
            .min(wheel::MAX_HORIZON);
        let now = Instant::now();
        let seed = (plan.run_tag as u64) << 32 ^ core as u64 ^ now.elapsed().as_nanos() as u64;
        Fleet {
            io,
            st: State {
                core,
                hosts: plan.servers.iter().map(|s| s.to_string()).collect(),
                devices: Slab::with_capacity(mine.min(1 << 20) as usize),
                wheel: Wheel::new(horizon, tick_of(&plan, now)),
                gen: 0,
                counters: Counters::default(),
                measured: Box::default(),
                rng: Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15),
                limiter: RateLimiter::new(plan.rate_per_core, now),
                next_k: 0,
                mine,
                inflight: 0,
                twins: Vec::new(),
                phase: Phase::Ramp,
                hold_end: None,
                ramp_done_us: None,
                silence_us: None,
                silent_open: 0,
                chosen_beating: 0,
                mute_at: None,
                storm_at: None,
                storm_us: 0,
                backoff_base_ticks: plan.backoff_base.as_micros() as u64 / TICK_US,
                backoff_cap_ticks,
                last_silent_sent_us: 0,
                heartbeat_ticks,
                connect_ticks,
                batch_ticks: BATCH_TICKS,
                server_timeout_us: plan.server_timeout.as_micros() as u64,
                stop,
                go,
                reports,
                next_progress: plan.origin + Duration::from_secs(1),
                out: Vec::with_capacity(512),
                plain: Vec::new(),
                sealed: Vec::new(),
                tls_warned: false,
                id: String::with_capacity(64),
                udp: match plan.servers.first() {
                    Some(&s) if plan.udp_heartbeat => {
                        UdpBeats::new(s, plan.udp_heartbeat_every, core)
                    }
                    _ => None,
                },
                plan,
            },
        }
    }

    /// Runs to the end of the plan (or a stop request) on the calling
    /// thread, then sends the final [`Report::Done`]. Each pass is one
    /// [`Driver::wait`] (no wait when busy), the events it brought, then
    /// [`Fleet::step`]. It never yields to glommio
    /// ([`c1m_io::epoll::Epoll::wait`] says why).
    pub fn run(mut self) {
        let mut wait = Duration::ZERO;
        let error = loop {
            if let Err(e) = self.io.wait(wait) {
                break Some(format!("core {}: waiting for sockets: {e}", self.st.core));
            }
            match self.step() {
                Step::Busy => wait = Duration::ZERO,
                Step::Idle(wake) => wait = wake.saturating_duration_since(Instant::now()),
                Step::Finished => break None,
            }
        };
        let Fleet { mut io, mut st } = self;
        if st.phase != Phase::Done {
            st.finish(&mut io);
        }
        // Hand the driver's queued closes to the kernel (io_uring submits
        // them on a wait), then drop it, which resets whatever sockets it
        // still holds: the fleet is closed before its core reports done.
        let _ = io.wait(Duration::ZERO);
        drop(io);
        let _ = st.reports.send(Report::Done {
            core: st.core,
            counters: st.counters,
            measured: std::mem::take(&mut st.measured),
            ramp_done_us: st.ramp_done_us,
            error,
        });
    }

    /// One pass after a wait: the events it brought, due timers, new
    /// connections, phase changes; says when the next pass is due.
    pub fn step(&mut self) -> Step {
        let Fleet { io, st } = self;
        if st.stop.load(Relaxed) {
            st.finish(io);
            return Step::Finished;
        }
        st.pump(io);
        let mut busy = false;

        let now = Instant::now();
        let tick = tick_of(&st.plan, now);
        let mut budget = BUDGET;
        while budget > 0 {
            let Some(e) = st.wheel.pop_due(tick) else {
                break;
            };
            st.on_due(io, e);
            budget -= 1;
        }
        busy |= budget == 0;

        for n in std::mem::take(&mut st.twins) {
            st.connect(io, n, true);
        }
        if st.phase == Phase::Ramp {
            let mut started = 0;
            while st.next_k < st.mine
                && st.inflight < st.plan.concurrency
                && started < BUDGET
                && st.limiter.try_take(now)
            {
                st.connect_next(io);
                started += 1;
            }
            busy |= started == BUDGET;
        }

        st.advance(io, now);
        // This pass's heartbeat datagrams (--udp-heartbeat), in batches.
        if let Some(u) = &mut st.udp {
            u.flush();
        }
        if now >= st.next_progress {
            let _ = st.reports.send(Report::Progress {
                core: st.core,
                phase: st.phase,
                counters: st.counters,
            });
            while st.next_progress <= now {
                st.next_progress += Duration::from_secs(1);
            }
        }
        if st.phase == Phase::Done {
            return Step::Finished;
        }
        if busy {
            return Step::Busy;
        }
        let mut wake = (now + MAX_SLEEP).min(st.next_progress);
        if let Some(due) = st.wheel.next_due() {
            // The first occupied slot (not every tick: a fleet with few
            // devices sleeps through empty ones), rounded up to its batch.
            let due = due.max(tick + 1).next_multiple_of(st.batch_ticks);
            wake = wake.min(st.plan.origin + TICK * due as u32);
        }
        if st.phase == Phase::Ramp && st.next_k < st.mine && st.inflight < st.plan.concurrency {
            wake = wake.min(st.limiter.next_token(now));
        }
        if let Some(end) = st.hold_end {
            if st.phase == Phase::Hold {
                wake = wake.min(end);
            }
        }
        if let Some(storm) = st.storm_at {
            wake = wake.min(storm);
        }
        Step::Idle(wake)
    }
}

impl State {
    /// Acts on every event the driver has ready.
    fn pump(&mut self, io: &mut impl Driver) {
        while let Some(ev) = io.next() {
            match ev {
                Event::Connected(token) => {
                    if let Some(key) = self.live(token) {
                        self.connected(io, key);
                    }
                }
                Event::Data(token, bytes) => {
                    let Some(key) = self.live(token) else {
                        continue;
                    };
                    // The bytes are the driver's: what they call for (pongs
                    // in `out`, or the device's end) is done once they are
                    // handled.
                    let flow = if self.devices[key].tls.is_some() {
                        self.on_tls_bytes(key, bytes)
                    } else {
                        self.on_bytes(key, bytes)
                    };
                    match flow {
                        // A TLS alert for the server (the device refused its
                        // certificate, say): sent, then a FIN, so it arrives.
                        Break(gone) if !self.sealed.is_empty() => {
                            io.send(gone, &self.sealed);
                            self.sealed.clear();
                            io.close(gone, Close::Graceful);
                        }
                        Break(gone) => io.close(gone, Close::Abortive),
                        Continue(()) if !self.out.is_empty() || !self.sealed.is_empty() => {
                            self.send_out(io, key);
                        }
                        Continue(()) => {}
                    }
                }
                Event::Hangup(token) => {
                    if let Some(key) = self.live(token) {
                        let gone = self.server_closed(key);
                        io.close(gone, Close::Abortive);
                    }
                }
                // Only a listener accepts and only a watched eventfd wakes;
                // a device never waits for its output to flush.
                Event::Flushed(_)
                | Event::Accepted(_)
                | Event::AcceptFailed(_)
                | Event::Wake
                | Event::Datagram(_) => {}
            }
        }
    }

    /// The device a token names, if it still lives.
    fn live(&self, token: Token) -> Option<usize> {
        let (key, gen) = (token.key(), token.gen());
        self.devices.get(key).filter(|d| d.gen == gen).map(|_| key)
    }

    /// Ramp -> Hold once every device of this core was tried; Hold ->
    /// Expiry after --hold; Expiry -> Done once the server expired every
    /// silent device or the expiry window closed.
    fn advance(&mut self, io: &mut impl Driver, now: Instant) {
        if self.phase == Phase::Ramp && self.next_k == self.mine && self.inflight == 0 {
            self.phase = Phase::Ramped;
            self.ramp_done_us = Some(now_us(&self.plan, now));
        }
        // (A fleet waits here at most MAX_SLEEP past the word.)
        if self.phase == Phase::Ramped && self.go.load(Relaxed) {
            self.phase = Phase::Hold;
            self.hold_end = Some(now + self.plan.hold);
            self.mute_at = self.plan.silent_after.map(|d| now + d);
            self.storm_at = self.plan.reconnect_storm.map(|d| now + d);
        }
        if self.phase == Phase::Hold && self.storm_at.is_some_and(|t| now >= t) {
            self.storm_at = None;
            self.storm_all(io, now);
        }
        if self.phase == Phase::Hold && self.hold_end.is_some_and(|end| now >= end) {
            self.phase = Phase::Expiry;
            if self.plan.go_silent {
                self.silence_all(io, now);
            }
        }
        if let (Phase::Expiry, Some(silence)) = (self.phase, self.silence_us) {
            let window_end =
                silence + self.server_timeout_us + self.plan.expiry_window.as_micros() as u64;
            if self.counters.open == 0 || now_us(&self.plan, now) >= window_end {
                self.finish(io);
            }
        } else if self.phase == Phase::Expiry {
            // Chosen devices still beating fall silent within 1.1 beats.
            let mut last_silent = self.last_silent_sent_us;
            if let (Some(mute), true) = (self.mute_at, self.chosen_beating > 0) {
                let latest = mute.max(now) + self.plan.heartbeat.mul_f64(1.1);
                last_silent = last_silent.max(now_us(&self.plan, latest));
            }
            let window_end =
                last_silent + self.server_timeout_us + self.plan.expiry_window.as_micros() as u64;
            let all_gone = self.silent_open == 0 && self.chosen_beating == 0;
            if all_gone || now_us(&self.plan, now) >= window_end {
                self.finish(io);
            }
        }
    }

    /// `--go-silent`: every heartbeating device sends one last heartbeat now
    /// and then nothing, so the server's deadlines for the whole fleet fall
    /// within the time this pass takes: its deletion storm. One pass over
    /// the slab, once per run; their wheel entries go stale.
    fn silence_all(&mut self, io: &mut impl Driver, now: Instant) {
        self.silence_us = Some(now_us(&self.plan, now));
        let keys: Vec<usize> = self
            .devices
            .iter()
            .filter(|(_, d)| d.stage == Stage::Open && !d.silent)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            if self.heartbeat(io, key) {
                self.counters.heartbeats -= 1;
                self.counters.last_beats += 1;
                // A reply to an earlier beat still counts; this one's doesn't.
                let d = &mut self.devices[key];
                if d.ping_sent_us == d.last_sent_us {
                    d.ping_sent_us = 0;
                }
                self.mute(key);
            }
        }
    }

    /// --reconnect-storm: every open device resets its connection now and
    /// reconnects after its backoff. One pass over the slab, once per run.
    fn storm_all(&mut self, io: &mut impl Driver, now: Instant) {
        self.storm_us = now_us(&self.plan, now);
        let keys: Vec<usize> = self
            .devices
            .iter()
            .filter(|(_, d)| d.stage == Stage::Open)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.forget_open(key);
            let d = &mut self.devices[key];
            io.close(d.io, Close::Abortive);
            d.redial = Some(Redial::Storm);
            d.attempt = 0;
            d.twin = false;
            d.silent = false; // a chosen device mutes again once back
            d.carry.clear();
            d.tls = None;
            d.ping_sent_us = 0;
            self.counters.storm_devices += 1;
            self.back_off(key, now);
        }
    }

    /// Storm device `key` (its socket closed by the caller) waits its
    /// backoff, without a socket, then [`State::redial`]s.
    fn back_off(&mut self, key: usize, now: Instant) {
        let d = &mut self.devices[key];
        let wait = device::backoff(
            &mut self.rng,
            u32::from(d.attempt),
            self.backoff_base_ticks,
            self.backoff_cap_ticks,
        );
        d.attempt = d.attempt.saturating_add(1);
        d.stage = Stage::Backoff;
        d.io = Handle::NONE;
        // Nothing of the failed attempt is read with the next one's answer
        // (a 503 split across two reads left its first part here, and the
        // next attempt's 101 was read as that 503 again).
        d.carry.clear();
        d.tls = None;
        // A new generation: nothing of the old socket is heard again.
        self.gen = self.gen.wrapping_add(1);
        d.gen = self.gen;
        d.due = tick_of(&self.plan, now) + wait + 1;
        self.wheel.insert(Entry {
            key: key as u32,
            gen: d.gen,
            deadline: d.due,
        });
    }

    /// A redialing device's backoff is over: a new socket, as
    /// [`State::connect`] opens one, in the device's own slot.
    fn redial(&mut self, io: &mut impl Driver, key: usize) {
        let now = Instant::now();
        let plan = &self.plan;
        let d = &self.devices[key];
        match d.redial {
            Some(Redial::Storm) => self.counters.storm_attempts += 1,
            _ => self.counters.drain_attempts += 1,
        }
        let (src, dst) = route(d.n, plan.sources.len(), plan.servers.len());
        let token = Token::pack(key, d.gen);
        let h = socket::connect_from(plan.servers[dst], plan.sources.get(src).copied())
            .and_then(|fd| io.register(fd, token, true));
        let h = match h {
            Ok(h) => h,
            Err(e) => {
                self.redial_failed(key, Failure::from_errno(e.raw_os_error()));
                return self.back_off(key, now);
            }
        };
        let due = tick_of(plan, now) + self.connect_ticks;
        let started_us = now_us(plan, now);
        let d = &mut self.devices[key];
        d.io = h;
        d.stage = Stage::Connecting;
        d.due = due;
        d.started_us = started_us;
        d.last_sent_us = 0;
        self.wheel.insert(Entry {
            key: key as u32,
            gen: d.gen,
            deadline: due,
        });
        self.inflight += 1;
    }

    /// Counts a redialing device's failed attempt: a storm's by its cause.
    fn redial_failed(&mut self, key: usize, why: Failure) {
        let c = &mut self.counters;
        if self.devices[key].redial != Some(Redial::Storm) {
            c.drain_failed += 1;
            return;
        }
        *match why {
            Failure::HttpStatus(503) => &mut c.storm_failed_503,
            Failure::Reset => &mut c.storm_failed_reset,
            Failure::Timeout => &mut c.storm_failed_timeout,
            Failure::Refused => &mut c.storm_failed_refused,
            _ => &mut c.storm_failed_other,
        } += 1;
    }

    /// Device `key` (open, heartbeating) stops: from now on only the server
    /// ends it, `--server-timeout` after its last message.
    fn mute(&mut self, key: usize) {
        let d = &mut self.devices[key];
        if d.chosen && !d.silent {
            self.chosen_beating -= 1;
        }
        d.silent = true;
        d.due = u64::MAX; // its wheel entry, if any, is stale now
        self.silent_open += 1;
        self.last_silent_sent_us = self.last_silent_sent_us.max(d.last_sent_us);
    }

    /// Forgets the counts of an open device about to be closed.
    fn forget_open(&mut self, key: usize) {
        let d = &self.devices[key];
        self.counters.open -= 1;
        if d.silent {
            self.silent_open -= 1;
        } else if d.chosen {
            self.chosen_beating -= 1;
        }
    }

    /// Closes every device (with a reset: no TIME_WAIT left behind).
    fn finish(&mut self, io: &mut impl Driver) {
        self.counters.unexpired = if self.silence_us.is_some() {
            self.counters.open
        } else {
            self.silent_open
        };
        for d in self.devices.drain() {
            match d.redial {
                Some(Redial::Storm) => self.counters.storm_unrecovered += 1,
                Some(Redial::Drained { .. }) => self.counters.drain_unrecovered += 1,
                None => {}
            }
            if d.io != Handle::NONE {
                io.close(d.io, Close::Abortive);
            }
        }
        self.phase = Phase::Done;
    }

    fn connect_next(&mut self, io: &mut impl Driver) {
        let plan = &self.plan;
        let n = plan.first_device + self.core as u64 + self.next_k * plan.cores.max(1) as u64;
        self.next_k += 1;
        self.counters.attempted += 1;
        self.connect(io, n, false);
    }

    /// Begins connecting device `n` (`twin`: its second connection).
    fn connect(&mut self, io: &mut impl Driver, n: u64, twin: bool) {
        let plan = &self.plan;
        let (src, dst) = route(n, plan.sources.len(), plan.servers.len());
        let fd = match socket::connect_from(plan.servers[dst], plan.sources.get(src).copied()) {
            Ok(fd) => fd,
            Err(e) => {
                self.counters.fail(Failure::from_errno(e.raw_os_error()));
                return;
            }
        };
        self.gen = self.gen.wrapping_add(1);
        let key = self.devices.vacant_key();
        let token = Token::pack(key, self.gen);
        let h = match io.register(fd, token, true) {
            Ok(h) => h,
            Err(e) => {
                self.counters.fail(Failure::from_errno(e.raw_os_error()));
                return;
            }
        };
        let now = Instant::now();
        let due = tick_of(plan, now) + self.connect_ticks;
        self.wheel.insert(Entry {
            key: key as u32,
            gen: self.gen,
            deadline: due,
        });
        self.devices.insert(Device {
            io: h,
            gen: self.gen,
            n,
            stage: Stage::Connecting,
            chosen: device::is_silent(n, plan.silent),
            silent: false,
            due,
            started_us: now_us(plan, now),
            last_sent_us: 0,
            ping_sent_us: 0,
            carry: Carry::default(),
            twin,
            tls: None,
            redial: None,
            attempt: 0,
        });
        self.inflight += 1;
    }

    /// Device `key`'s connect finished: send the upgrade request, or count
    /// the failure.
    fn connected(&mut self, io: &mut impl Driver, key: usize) {
        if let Err(why) = self.send_upgrade(io, key) {
            let gone = self.fail(key, why);
            io.close(gone, Close::Abortive);
        }
    }

    fn send_upgrade(&mut self, io: &mut impl Driver, key: usize) -> Result<(), Failure> {
        let d = &mut self.devices[key];
        let err = io.socket_error(d.io);
        if err != 0 {
            return Err(Failure::from_errno(Some(err)));
        }
        device::write_id(
            &mut self.id,
            &self.plan.id_prefix,
            self.plan.run_tag,
            d.n as u32,
        );
        self.out.clear();
        let (_, dst) = route(d.n, self.plan.sources.len(), self.plan.servers.len());
        // Signed inline (no allocation), at each attempt: a day from now.
        let token = self
            .plan
            .auth
            .as_ref()
            .map(|k| k.sign(&self.id, c1m_io::host::unix_secs() + TOKEN_TTL_S));
        client_handshake::write_request(
            &mut self.out,
            &self.hosts[dst],
            &self.id,
            &key_for(d.n, self.plan.run_tag as u64),
            token.as_ref().map(|t| t.as_str()),
        );
        if let Some((configs, name)) = &self.plan.tls {
            // A device that had a connection before has its ticket.
            let config = if d.redial.is_some() || d.twin {
                &configs.again
            } else {
                &configs.first
            };
            // The ClientHello goes first; the request waits in the session
            // until the handshake allows it (with the client's Finished).
            self.sealed.clear();
            match ClientSession::client(config, name.clone(), &mut self.sealed) {
                Ok(s) => d.tls = Some(Box::new(s)),
                Err(_) => return Err(Failure::Tls),
            }
        }
        // Read before the write: the server cannot hear the request sooner,
        // so a thread delayed after its write (a busy host) cannot make a
        // deletion look early.
        let sent_us = now_us(&self.plan, Instant::now());
        match self.transmit(io, key) {
            Sent::Done | Sent::Queued => {}
            // A fresh socket's output is empty: 200 bytes cannot overflow it.
            Sent::Overflow => return Err(Failure::Other),
            // The driver keeps no errno: a socket that fails as it opens was
            // reset (refusals show in its SO_ERROR above).
            Sent::Failed => return Err(Failure::Reset),
        }
        let d = &mut self.devices[key];
        d.stage = Stage::Upgrading;
        d.last_sent_us = sent_us;
        Ok(())
    }

    /// Sends `out` on device `key`: as it is, or with --tls sealed after
    /// the handshake records waiting in `sealed`.
    fn transmit(&mut self, io: &mut impl Driver, key: usize) -> Sent {
        let d = &mut self.devices[key];
        let Some(tls) = &mut d.tls else {
            return io.send(d.io, &self.out);
        };
        if tls.seal(&self.out, &mut self.sealed).is_err() {
            self.sealed.clear();
            return Sent::Failed;
        }
        let sent = if self.sealed.is_empty() {
            Sent::Done // held until the handshake allows it
        } else {
            io.send(d.io, &self.sealed)
        };
        self.sealed.clear();
        sent
    }

    /// Handles ciphertext from the server (--tls): handshake records to
    /// send are left in `sealed`, plaintext goes to [`State::on_bytes`].
    fn on_tls_bytes(&mut self, key: usize, bytes: &mut [u8]) -> ControlFlow<Handle> {
        self.out.clear();
        self.plain.clear();
        self.sealed.clear();
        let d = &mut self.devices[key];
        let Some(tls) = &mut d.tls else {
            return self.on_bytes(key, bytes);
        };
        match tls.feed(bytes, &mut self.plain, &mut self.sealed) {
            Ok(fed) if fed.peer_closed && self.plain.is_empty() => {
                return Break(self.server_closed(key));
            }
            Ok(_) => {}
            Err(_) if d.stage == Stage::Open => return Break(self.server_closed(key)),
            Err(e) => {
                if !self.tls_warned {
                    self.tls_warned = true;
                    eprintln!(
                        "client: core {}: a TLS handshake failed ({e}): counted as failed_tls (is --tls-ca the CA that signed the server's certificate, and --tls-server-name a name in it?)",
                        self.core
                    );
                }
                return Break(self.fail(key, Failure::Tls));
            }
        }
        if self.plain.is_empty() {
            return Continue(());
        }
        let mut plain = std::mem::take(&mut self.plain);
        let flow = self.on_bytes(key, &mut plain);
        self.plain = plain;
        flow
    }

    /// Handles bytes from the server, leaving what they call for in `out`
    /// (pongs); `Break(handle)` when the device ended: it is forgotten here
    /// and the caller closes its handle.
    fn on_bytes(&mut self, key: usize, data: &mut [u8]) -> ControlFlow<Handle> {
        self.out.clear();
        match self.devices[key].stage {
            // Cannot happen: the upgrade was sent first, and a device in
            // its backoff has no socket.
            Stage::Connecting | Stage::Backoff => Continue(()),
            Stage::Upgrading => self.on_answer(key, data),
            Stage::Open => self.on_frames(key, data),
        }
    }

    fn on_answer(&mut self, key: usize, data: &mut [u8]) -> ControlFlow<Handle> {
        let d = &mut self.devices[key];
        let k = key_for(d.n, self.plan.run_tag as u64);
        let answer = if d.carry.is_empty() {
            client_handshake::parse_answer(data, &k)
        } else {
            d.carry.push(data);
            client_handshake::parse_answer(d.carry.as_mut_slice(), &k)
        };
        match answer {
            Answer::Partial => {
                if d.carry.is_empty() {
                    d.carry.push(data);
                }
                Continue(())
            }
            Answer::Accepted { head_len } => {
                if let Some(u) = &mut self.udp {
                    let head = if d.carry.is_empty() {
                        &data[..head_len]
                    } else {
                        &d.carry.as_mut_slice()[..head_len]
                    };
                    u.learn(key, d.gen, head);
                }
                let mut rest = if d.carry.is_empty() {
                    data[head_len..].to_vec()
                } else {
                    d.carry.take().split_off(head_len)
                };
                self.on_open(key);
                // Frames may follow the head in the same read (rare).
                if rest.is_empty() {
                    Continue(())
                } else {
                    self.on_frames(key, &mut rest)
                }
            }
            Answer::Refused { status } => Break(self.fail(key, Failure::HttpStatus(status))),
            Answer::Invalid(_) => Break(self.fail(key, Failure::Other)),
        }
    }

    fn on_open(&mut self, key: usize) {
        let now = Instant::now();
        let at = now_us(&self.plan, now);
        let d = &mut self.devices[key];
        d.stage = Stage::Open;
        self.counters.open += 1;
        if let Some(tls) = &d.tls {
            self.counters.tls_handshakes += 1;
            if tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                self.counters.tls_resumed += 1;
            }
        }
        self.inflight -= 1;
        let redial = d.redial.take();
        if redial.is_some() {
            d.attempt = 0;
        }
        if let Some(Redial::Drained { at_ms }) = redial {
            let away = at.saturating_sub(u64::from(at_ms) * 1000);
            hgrm::record(&mut self.measured.drain_back, away);
            self.counters.drain_back += 1;
        } else if redial == Some(Redial::Storm) {
            hgrm::record(&mut self.measured.reconnect_connect, at - d.started_us);
            hgrm::record(
                &mut self.measured.reconnect_back,
                at.saturating_sub(self.storm_us),
            );
            self.counters.storm_back += 1;
        } else if d.twin {
            self.counters.reconnects += 1;
        } else {
            hgrm::record(&mut self.measured.connect, at - d.started_us);
            self.counters.established += 1;
            if !d.chosen && device::reconnects(d.n, self.plan.reconnect) {
                // Opened at the next step, where the driver is at hand.
                self.twins.push(d.n);
            }
        }
        if d.chosen && self.plan.silent_after.is_none() {
            self.chosen_beating += 1;
            self.mute(key); // silent from its upgrade: no wheel entry
        } else {
            if d.chosen {
                self.chosen_beating += 1;
            }
            // First heartbeat at a random phase, so the fleet's heartbeats
            // spread evenly over the interval.
            d.due = tick_of(&self.plan, now) + self.rng.between(1, self.heartbeat_ticks);
            self.wheel.insert(Entry {
                key: key as u32,
                gen: d.gen,
                deadline: d.due,
            });
        }
    }

    fn on_frames(&mut self, key: usize, data: &mut [u8]) -> ControlFlow<Handle> {
        let mut carry = std::mem::take(&mut self.devices[key].carry);
        // A device that ended is forgotten: nothing to carry back to it.
        let ran = carry.consume(data, |buf| match self.decode_frames(key, buf) {
            Continue(used) => Ok(used),
            Break(handle) => Err(handle),
        });
        if let Err(handle) = ran {
            return Break(handle);
        }
        self.devices[key].carry = carry;
        Continue(())
    }

    /// Handles the whole frames at the start of `bytes`: the bytes used, or
    /// `Break` if the device ended.
    fn decode_frames(&mut self, key: usize, bytes: &mut [u8]) -> ControlFlow<Handle, usize> {
        let mut pos = 0;
        while pos < bytes.len() {
            let f = match frame::decode_server(&mut bytes[pos..], MAX_SERVER_FRAME) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => {
                    self.counters.bad_frames += 1;
                    self.forget_open(key);
                    return Break(self.forget(key));
                }
            };
            let payload = &bytes[pos + f.payload_start..pos + f.len];
            self.on_frame(key, f.opcode, payload)?;
            pos += f.len;
        }
        Continue(pos)
    }

    fn on_frame(&mut self, key: usize, opcode: Opcode, payload: &[u8]) -> ControlFlow<Handle> {
        let now = now_us(&self.plan, Instant::now());
        let d = &mut self.devices[key];
        match opcode {
            Opcode::Pong | Opcode::Text | Opcode::Binary => {
                if d.ping_sent_us != 0 {
                    let rtt = now - d.ping_sent_us;
                    hgrm::record(&mut self.measured.heartbeat_rtt, rtt);
                    if self.phase == Phase::Hold {
                        hgrm::record(&mut self.measured.heartbeat_rtt_hold, rtt);
                    }
                    d.ping_sent_us = 0;
                    self.counters.replies += 1;
                }
                Continue(())
            }
            Opcode::Ping => {
                // Sent with the other pongs of this read once it is handled.
                let mask = (self.rng.next_u64() as u32).to_ne_bytes();
                frame::write_masked_frame(&mut self.out, Opcode::Pong, true, payload, mask);
                Continue(())
            }
            Opcode::Close if payload.starts_with(&code::REPLACED.to_be_bytes()) => {
                Break(self.replaced(key))
            }
            Opcode::Close if self.plan.ignore_close => Continue(()),
            Opcode::Close
                if self.plan.redial_on_close
                    && !d.silent
                    && d.stage == Stage::Open
                    && payload.starts_with(&code::GOING_AWAY.to_be_bytes()) =>
            {
                Break(self.drained(key))
            }
            Opcode::Close => Break(self.server_closed(key)),
            Opcode::Continuation => Continue(()),
        }
    }

    fn on_due(&mut self, io: &mut impl Driver, e: Entry) {
        let Some(d) = self.devices.get_mut(e.key as usize) else {
            return;
        };
        if d.gen != e.gen || d.due != e.deadline {
            return; // a stale entry of a closed or rescheduled device
        }
        let key = e.key as usize;
        match d.stage {
            Stage::Backoff => self.redial(io, key),
            Stage::Connecting | Stage::Upgrading => {
                let gone = self.fail(key, Failure::Timeout);
                io.close(gone, Close::Abortive);
            }
            Stage::Open if d.chosen && self.mute_at.is_some_and(|t| Instant::now() >= t) => {
                self.mute(key);
            }
            Stage::Open => {
                self.heartbeat(io, key);
            }
        }
    }

    /// Sends device `key`'s heartbeat and schedules the next; false if the
    /// device is gone (closed here).
    fn heartbeat(&mut self, io: &mut impl Driver, key: usize) -> bool {
        let now = Instant::now();
        let at = now_us(&self.plan, now);
        // --udp-heartbeat: the datagram, and a frame only every N of them.
        let frame_too = match &mut self.udp {
            Some(u) => {
                let d = &self.devices[key];
                let (_, dst) = route(d.n, self.plan.sources.len(), self.plan.servers.len());
                let to = self.plan.udp_to.unwrap_or(self.plan.servers[dst]);
                u.beat(key, d.gen, to).unwrap_or(true)
            }
            None => true,
        };
        let mask = (self.rng.next_u64() as u32).to_ne_bytes();
        self.out.clear();
        let (opcode, payload): (Opcode, &[u8]) = match self.plan.kind {
            HeartbeatKind::Ping => (Opcode::Ping, b""),
            HeartbeatKind::Text => (Opcode::Text, b"hb"),
            HeartbeatKind::Binary => (Opcode::Binary, &[1]),
        };
        frame::write_masked_frame(&mut self.out, opcode, true, payload, mask);
        if frame_too && !self.send_out(io, key) {
            return false;
        }
        self.counters.heartbeats += 1;
        let d = &mut self.devices[key];
        d.last_sent_us = at;
        if frame_too && d.ping_sent_us == 0 {
            d.ping_sent_us = at;
        }
        d.due = tick_of(&self.plan, now) + device::jittered(&mut self.rng, self.heartbeat_ticks);
        self.wheel.insert(Entry {
            key: key as u32,
            gen: d.gen,
            deadline: d.due,
        });
        true
    }

    /// Sends `out` on open device `key`; false when that ended the device
    /// (closed here).
    fn send_out(&mut self, io: &mut impl Driver, key: usize) -> bool {
        match self.transmit(io, key) {
            // Taken by the kernel, or held by the driver behind earlier output.
            Sent::Done | Sent::Queued => true,
            Sent::Overflow => {
                // The server stopped reading: as a frame cut short by a full
                // socket was, the device is counted and closed.
                self.counters.send_blocked += 1;
                self.counters.other += 1;
                self.forget_open(key);
                let gone = self.forget(key);
                io.close(gone, Close::Abortive);
                false
            }
            Sent::Failed => {
                let gone = self.server_closed(key);
                io.close(gone, Close::Abortive);
                false
            }
        }
    }

    /// The server ended the connection (EOF, reset or Close frame). Returns
    /// the device's handle for the caller to close.
    fn server_closed(&mut self, key: usize) -> Handle {
        let d = &self.devices[key];
        if d.stage != Stage::Open {
            return self.fail(key, Failure::Reset);
        }
        if d.silent {
            self.counters.expired += 1;
            let now = now_us(&self.plan, Instant::now());
            // Devices whose last message was --go-silent's burst are the
            // deletion storm's; their lag is kept apart.
            let storm = self.silence_us.is_some_and(|t| d.last_sent_us >= t);
            let lags = if storm {
                &mut self.measured.storm_lag
            } else {
                &mut self.measured.expiry_lag
            };
            match (now - d.last_sent_us).checked_sub(self.server_timeout_us) {
                Some(lag) => hgrm::record(lags, lag),
                None => self.counters.expired_early += 1,
            }
        } else {
            self.counters.false_expiries += 1;
            let now = now_us(&self.plan, Instant::now());
            hgrm::record(&mut self.measured.server_closes, now);
        }
        self.forget_open(key);
        self.forget(key)
    }

    /// --redial-on-close: the server closed heartbeating device `key` with
    /// 1001; it backs off and dials again. Returns the old connection's
    /// handle for the caller to close.
    fn drained(&mut self, key: usize) -> Handle {
        let at_ms = (now_us(&self.plan, Instant::now()) / 1000) as u32;
        self.forget_open(key);
        self.counters.drain_closes += 1;
        let d = &mut self.devices[key];
        let gone = d.io;
        d.redial = Some(Redial::Drained { at_ms });
        d.attempt = 0;
        d.twin = false;
        d.ping_sent_us = 0;
        self.back_off(key, Instant::now());
        gone
    }

    /// A newer connection with this device's id took over: the takeover
    /// the server must make, not an expiry. Returns the handle to close.
    fn replaced(&mut self, key: usize) -> Handle {
        self.counters.replaced += 1;
        self.forget_open(key);
        self.forget(key)
    }

    /// An attempt failed before the upgrade. Returns the device's handle for
    /// the caller to close.
    /// A storm device stays, and backs off to try again.
    fn fail(&mut self, key: usize, why: Failure) -> Handle {
        self.inflight -= 1;
        if self.devices[key].redial.is_some() {
            self.redial_failed(key, why);
            let gone = self.devices[key].io;
            self.back_off(key, Instant::now());
            return gone;
        }
        self.counters.fail(why);
        self.forget(key)
    }

    /// Drops device `key` and returns its handle, for the caller to close
    /// (with a reset) once it holds the driver.
    fn forget(&mut self, key: usize) -> Handle {
        self.devices.remove(key).io
    }
}

fn now_us(plan: &Plan, now: Instant) -> u64 {
    now.saturating_duration_since(plan.origin).as_micros() as u64
}

fn tick_of(plan: &Plan, now: Instant) -> u64 {
    now_us(plan, now) / TICK_US
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::mpsc;

    use super::*;

    /// How the fake server treats each device.
    #[derive(Clone, Copy, PartialEq)]
    enum Serve {
        /// 101, then a pong for every ping.
        Pongs,
        /// 503 with Retry-After.
        Refuse503,
        /// 101, then Close 4000 "replaced" at the first ping.
        Replace,
        /// 101, then Close 1001 "going away" at the first ping; what the
        /// device sends after it is counted in `AFTER_CLOSE[i]`.
        GoingAway(usize),
    }

    /// Per `Serve::GoingAway` server: (pings after its Close, Close frames
    /// from the device, connections that ended without a Close reply).
    static AFTER_CLOSE: [[std::sync::atomic::AtomicU64; 3]; 3] = [
        [const { std::sync::atomic::AtomicU64::new(0) }; 3],
        [const { std::sync::atomic::AtomicU64::new(0) }; 3],
        [const { std::sync::atomic::AtomicU64::new(0) }; 3],
    ];

    /// A server on loopback that serves `how` until the test ends.
    fn fake_server(how: Serve) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                std::thread::spawn(move || serve(s, how));
            }
        });
        addr
    }

    fn serve(mut s: TcpStream, how: Serve) {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read_exact(&mut b).is_err() {
                return;
            }
            head.push(b[0]);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        assert!(text.starts_with("GET /ws?id="), "{text}");
        if how == Serve::Refuse503 {
            let _ = s.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        }
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("a key");
        let mut out = Vec::new();
        c1m_proto::handshake::write_accept(key.as_bytes().try_into().unwrap(), &mut out);
        if s.write_all(&out).is_err() {
            return;
        }
        // Client frames: masked, short (a heartbeat or a close).
        let mut closed = false;
        loop {
            let mut h = [0u8; 2];
            if s.read_exact(&mut h).is_err() {
                if let (Serve::GoingAway(i), true) = (how, closed) {
                    AFTER_CLOSE[i][2].fetch_add(1, Relaxed);
                }
                return;
            }
            assert_eq!(h[1] & 0x80, 0x80, "client frames are masked");
            let len = (h[1] & 0x7f) as usize;
            assert!(len < 126);
            let mut mask = [0u8; 4];
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut mask).is_err() || s.read_exact(&mut payload).is_err() {
                return;
            }
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
            if let (Serve::GoingAway(i), true) = (how, closed) {
                let what = if h[0] & 0x0f == 0x8 { 1 } else { 0 };
                AFTER_CLOSE[i][what].fetch_add(1, Relaxed);
                if what == 1 {
                    return;
                }
                continue;
            }
            let reply = match (h[0] & 0x0f, how) {
                (0x9, Serve::Pongs) => [&[0x8a, len as u8][..], &payload].concat(),
                (0x9, Serve::GoingAway(_)) => {
                    closed = true;
                    [&[0x88, 12, 0x03, 0xe9][..], b"going away"].concat()
                }
                (0x9, _) => [&[0x88, 10, 0x0f, 0xa0][..], b"replaced"].concat(),
                (0x8, _) => [&[0x88, 2][..], &payload[..2.min(len)]].concat(),
                _ => continue,
            };
            if s.write_all(&reply).is_err() {
                return;
            }
        }
    }

    fn plan(server: SocketAddr, devices: u64, io: Backend) -> Plan {
        Plan {
            servers: vec![server],
            sources: Vec::new(),
            first_device: 0,
            devices,
            cores: 1,
            rate_per_core: 0.0,
            concurrency: 64,
            heartbeat: Duration::from_millis(50),
            kind: HeartbeatKind::Ping,
            udp_heartbeat: false,
            udp_heartbeat_every: 0,
            udp_to: None,
            silent: 0.0,
            server_timeout: Duration::from_secs(1),
            hold: Duration::from_millis(400),
            expiry_window: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(2),
            go_silent: false,
            ignore_close: false,
            silent_after: None,
            reconnect: 0.0,
            reconnect_storm: None,
            redial_on_close: false,
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_millis(100),
            id_prefix: "fleet-test".into(),
            run_tag: 1,
            origin: Instant::now(),
            io,
            auth: None,
            tls: None,
        }
    }

    /// Runs the plan on one core of each usable backend: its final counters.
    fn run_plan(server: SocketAddr, devices: u64) -> Vec<Counters> {
        run_plan_with(server, devices, |_| {})
    }

    /// A fleet whose ramp is over waits for the word that every core of the
    /// client has ramped before its hold begins (and with it the hold's
    /// clock, --go-silent and --reconnect-storm): the holds of all the
    /// cores and --procs workers begin together.
    #[test]
    fn the_hold_begins_on_the_word_that_every_core_has_ramped() {
        let (tx, _rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let go = Arc::new(AtomicBool::new(false));
        let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let io = EpollDriver::new(DriverConfig { max_pending: 4096 }).unwrap();
        // No devices: this core's ramp is over at its first step.
        let mut f = Fleet::new(
            0,
            Arc::new(plan(unused, 0, Backend::Epoll)),
            io,
            stop,
            go.clone(),
            tx,
        );
        for _ in 0..3 {
            assert!(!matches!(f.step(), Step::Finished));
            assert_eq!(f.st.phase, Phase::Ramped);
            assert!(f.st.ramp_done_us.is_some(), "its own ramp's end is kept");
            assert_eq!(f.st.hold_end, None, "no hold before the word");
        }
        go.store(true, Relaxed);
        f.step();
        assert_eq!(f.st.phase, Phase::Hold);
        assert!(f.st.hold_end.is_some());
    }

    /// [`run_plan`] with the plan changed by `tweak` first.
    fn run_plan_with(server: SocketAddr, devices: u64, tweak: fn(&mut Plan)) -> Vec<Counters> {
        let mut backends = vec![Backend::Epoll];
        if Backend::usable(Backend::Uring).0 == Backend::Uring {
            backends.push(Backend::Uring);
        }
        backends
            .into_iter()
            .map(|io| {
                let (tx, rx) = mpsc::channel();
                let stop = Arc::new(AtomicBool::new(false));
                // One fleet alone: its hold begins with its ramp's end.
                let go = Arc::new(AtomicBool::new(true));
                let mut p = plan(server, devices, io);
                tweak(&mut p);
                run(0, Arc::new(p), stop, go, tx).unwrap();
                let done = rx.try_iter().find_map(|r| match r {
                    Report::Done {
                        counters, error, ..
                    } => Some((counters, error)),
                    Report::Progress { .. } => None,
                });
                let (counters, error) = done.expect("a Done report");
                assert_eq!(error, None);
                counters
            })
            .collect()
    }

    #[test]
    fn a_fleet_upgrades_every_device_and_counts_the_pongs_of_its_heartbeats() {
        let server = fake_server(Serve::Pongs);
        for c in run_plan(server, 5) {
            assert_eq!((c.attempted, c.established, c.failed), (5, 5, 0), "{c:?}");
            // 400 ms of hold at one beat per 50 ms each.
            assert!(c.heartbeats >= 5 * 4, "{c:?}");
            assert!(c.replies + 5 >= c.heartbeats, "{c:?}");
            assert!(c.replies > 0, "{c:?}");
            assert_eq!(
                (c.bad_frames, c.false_expiries, c.replaced),
                (0, 0, 0),
                "{c:?}"
            );
        }
    }

    #[test]
    fn a_fleet_with_no_server_counts_every_device_refused() {
        // A port nothing listens on.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        for c in run_plan(addr, 3) {
            assert_eq!((c.attempted, c.established), (3, 0), "{c:?}");
            assert_eq!((c.failed, c.refused), (3, 3), "{c:?}");
        }
    }

    #[test]
    fn a_503_is_a_failure_by_http_status_with_the_status_kept() {
        let server = fake_server(Serve::Refuse503);
        for c in run_plan(server, 4) {
            assert_eq!((c.established, c.failed, c.http_status), (0, 4, 4), "{c:?}");
            assert_eq!(c.last_http_status, 503, "{c:?}");
        }
    }

    #[test]
    fn a_close_4000_from_the_server_is_counted_as_replaced_not_expired() {
        let server = fake_server(Serve::Replace);
        for c in run_plan(server, 3) {
            assert_eq!(c.established, 3, "{c:?}");
            assert_eq!(c.replaced, 3, "{c:?}");
            assert_eq!((c.false_expiries, c.expired, c.open), (0, 0, 0), "{c:?}");
        }
    }

    #[test]
    fn ignore_close_keeps_the_connection_and_its_heartbeats_after_a_close() {
        // Acted on (the default): the device resets without a Close reply
        // and counts the server's close as a false expiry.
        let server = fake_server(Serve::GoingAway(0));
        let runs = run_plan(server, 3);
        for c in &runs {
            assert_eq!(
                (c.established, c.false_expiries, c.open),
                (3, 3, 0),
                "{c:?}"
            );
        }
        let tally = |i: usize| AFTER_CLOSE[i].each_ref().map(|a| a.load(Relaxed));
        let ends = 3 * runs.len() as u64;
        // The fake server's threads see the resets a little later.
        let waited = Instant::now();
        while tally(0)[2] < ends && waited.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(tally(0), [0, 0, ends]);

        // Ignored: no reply and no close; it goes on heartbeating (every
        // 50 ms for the 400 ms hold) until the run's end closes it.
        let server = fake_server(Serve::GoingAway(1));
        for c in run_plan_with(server, 3, |p| p.ignore_close = true) {
            assert_eq!((c.established, c.false_expiries), (3, 0), "{c:?}");
        }
        let [pings, closes, _] = tally(1);
        assert_eq!(closes, 0);
        assert!(pings >= ends * 3, "{pings} pings after the Close");
    }

    #[test]
    fn redial_on_close_brings_a_device_closed_with_1001_back() {
        // The server closes each connection with 1001 at its first ping:
        // every device comes back, again and again, never a false expiry.
        let server = fake_server(Serve::GoingAway(2));
        for c in run_plan_with(server, 3, |p| p.redial_on_close = true) {
            assert_eq!((c.established, c.false_expiries), (3, 0), "{c:?}");
            // 400 ms of hold, a ping 50 ms after each upgrade, backoff up
            // to 10 ms: several rounds each.
            assert!(c.drain_closes >= 3 * 2, "{c:?}");
            assert!(c.drain_back + 3 >= c.drain_closes, "{c:?}");
            assert!(c.drain_back >= 3, "{c:?}");
            // Each attempt came back, failed, or was under way at the end.
            assert!(c.drain_attempts >= c.drain_back, "{c:?}");
            assert!(
                c.drain_attempts <= c.drain_back + c.drain_failed + 3,
                "{c:?}"
            );
            assert_eq!(c.drain_failed, 0, "{c:?}");
            assert!(c.drain_unrecovered <= 3, "{c:?}");
        }
    }
}
