//! The shard: one per core, the thin I/O shell around the sans-IO core. It
//! owns its listener, its epoll set, its slab of connections, its timing
//! wheel and its counters; nothing is shared with other shards.
//!
//! One task runs the shard's loop: take ready events from the epoll set
//! (accepts, reads, pending writes), expire a bounded batch of due wheel
//! entries, report stats, and when there is nothing to do, block in
//! epoll_wait until sockets are ready or the next tick is due
//! ([`crate::io::epoll::Epoll::wait`] says why not in glommio's park).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use slab::Slab;
use socket2::Socket;

use crate::io::epoll::{self, Epoll};
use crate::io::listener::{self, Accepted};
use crate::io::socket::{self, send};
use crate::proto::conn::{Conn, End, Limits, Phase};
use crate::proto::frame::{self, code};
use crate::proto::wheel::{Entry, Wheel, MAX_HORIZON};
use crate::stats::{Counters, Snapshot};

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
    pub stats_interval: Duration,
    /// Test hook (C1M_INJECT_PANIC=1 in the server's environment): bytes
    /// holding [`INJECT_PANIC`] in the clear make the shard panic while
    /// handling them, as a bug would. Only a frame masked with a zero key
    /// carries them in the clear; off in production.
    pub inject_panic: bool,
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
        Ok(())
    }
}

/// Whole ticks in `d`, rounded up.
fn ticks(d: Duration, tick: Duration) -> u64 {
    d.as_nanos().div_ceil(tick.as_nanos()) as u64
}

const LISTENER: u64 = u64::MAX;
const SHUTDOWN: u64 = u64::MAX - 1;
/// Events taken from epoll per call.
const EVENT_BATCH: usize = 256;
/// Connections accepted per listener event before other work runs.
const ACCEPT_BATCH: usize = 128;
/// Wheel entries handled per loop iteration: a mass expiry is spread over
/// iterations so accepts and heartbeats keep flowing.
const EXPIRY_BATCH: usize = 256;
/// Reads from one socket per event before others get their turn.
const READS_PER_EVENT: usize = 8;
const SCRATCH: usize = 64 * 1024;
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

/// What one pass of the loop left.
enum Step {
    /// More work is ready: run again soon.
    Busy,
    /// Nothing to do until the epoll set is readable or this instant.
    Idle(Instant),
    /// Shutdown has drained.
    Finished,
}

/// One connection as the shard holds it.
struct Slot {
    /// Owned, so that a shard that fails or panics still closes its sockets
    /// as it unwinds: its devices see the close and reconnect to the others.
    fd: OwnedFd,
    gen: u32,
    upgraded: bool,
    /// Tick of the last complete frame (or of the upgrade).
    last_seen: u64,
    /// Deadline of this connection's live wheel entry; entries with another
    /// deadline are stale duplicates.
    armed: u64,
    /// Tick by which the frame in progress must be complete; 0: none.
    frame_deadline: u64,
    conn: Conn,
    /// Output the socket did not take yet; empty (unallocated) when idle.
    pending: Vec<u8>,
}

impl Slot {
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

/// How a socket is closed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Close {
    /// FIN after whatever output was queued.
    Graceful,
    /// SO_LINGER 0: RST, the kernel frees the socket at once.
    Abortive,
}

pub struct Shard {
    id: usize,
    cfg: ShardConfig,
    epoll: Epoll,
    listener: Option<Socket>,
    shutdown: OwnedFd,
    slab: Slab<Slot>,
    wheel: Wheel,
    next_gen: u32,
    open: u64,
    counters: Counters,
    start: Instant,
    timeout_ticks: u64,
    handshake_ticks: u64,
    frame_ticks: u64,
    max_pending: usize,
    scratch: Box<[u8]>,
    out: Vec<u8>,
    events: Vec<libc::epoll_event>,
    /// Ready entries [`Epoll::wait`] left in `events` while the shard slept.
    fetched: Option<usize>,
    /// Sockets whose reads were cut short to be fair; read them again.
    again: Vec<u64>,
    drain_deadline: Option<Instant>,
    accept_resume: Option<Instant>,
    warned_at: Option<Instant>,
    report: Sender<Snapshot>,
    next_report: Instant,
}

impl Shard {
    /// A shard serving `listener`; it stops when `shutdown` (an eventfd) is
    /// written, and sends a [`Snapshot`] to `report` every stats interval.
    pub fn new(
        id: usize,
        cfg: ShardConfig,
        listener: Socket,
        shutdown: OwnedFd,
        report: Sender<Snapshot>,
    ) -> io::Result<Shard> {
        cfg.validate().map_err(io::Error::other)?;
        let epoll = Epoll::new()?;
        epoll.add(listener.as_raw_fd(), epoll::IN, LISTENER)?;
        epoll.add(shutdown.as_raw_fd(), epoll::IN, SHUTDOWN)?;
        let timeout_ticks = ticks(cfg.timeout, cfg.tick);
        let handshake_ticks = ticks(cfg.handshake_timeout, cfg.tick);
        let frame_ticks = ticks(cfg.frame_timeout, cfg.tick);
        let start = Instant::now();
        Ok(Shard {
            id,
            epoll,
            listener: Some(listener),
            shutdown,
            slab: Slab::new(),
            wheel: Wheel::new(timeout_ticks.max(handshake_ticks).max(frame_ticks) + 1, 0),
            next_gen: 1,
            open: 0,
            counters: Counters::default(),
            start,
            timeout_ticks,
            handshake_ticks,
            frame_ticks,
            max_pending: (2 * cfg.limits.max_message).max(64 * 1024),
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            out: Vec::with_capacity(4096),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENT_BATCH],
            fetched: None,
            again: Vec::new(),
            drain_deadline: None,
            accept_resume: None,
            warned_at: None,
            report,
            next_report: start + cfg.stats_interval,
            cfg,
        })
    }

    /// Runs until shutdown has drained every connection (or timed out), on
    /// the calling thread: a glommio executor's in the server, a plain
    /// thread in the benchmark's no-glommio baseline. It never yields to
    /// glommio ([`crate::io::epoll::Epoll::wait`] says why).
    pub fn run(mut self) -> io::Result<Counters> {
        loop {
            match self.step()? {
                Step::Busy => {}
                Step::Idle(wake) => {
                    let left = wake.saturating_duration_since(Instant::now());
                    self.fetched = Some(self.epoll.wait(&mut self.events, left)?);
                }
                Step::Finished => return Ok(self.counters),
            }
        }
    }

    /// One pass: ready I/O, one batch of due expiries, stats, shutdown.
    fn step(&mut self) -> io::Result<Step> {
        let mut busy = self.poll_io()?;
        let now = Instant::now();
        busy |= self.expire_due(self.tick_at(now));
        if now >= self.next_report {
            self.send_report();
            self.next_report = now + self.cfg.stats_interval;
        }
        if self.accept_resume.is_some_and(|t| now >= t) {
            self.accept_resume = None;
            if let Some(l) = &self.listener {
                self.epoll.add(l.as_raw_fd(), epoll::IN, LISTENER)?;
            }
        }
        if let Some(deadline) = self.drain_deadline {
            if self.slab.is_empty() || now >= deadline {
                self.close_all();
                self.send_report();
                return Ok(Step::Finished);
            }
        }
        if busy || !self.again.is_empty() {
            return Ok(Step::Busy);
        }
        let next_tick = self.start
            + Duration::from_nanos(
                (self.cfg.tick.as_nanos() * (self.tick_at(now) as u128 + 1)) as u64,
            );
        let wake = [
            Some(next_tick),
            Some(self.next_report),
            self.drain_deadline,
            self.accept_resume,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(next_tick);
        Ok(Step::Idle(wake))
    }

    fn tick_at(&self, t: Instant) -> u64 {
        (t.duration_since(self.start).as_nanos() / self.cfg.tick.as_nanos()) as u64
    }

    fn now_tick(&self) -> u64 {
        self.tick_at(Instant::now())
    }

    /// Handles ready events; true when the batch was full, so that more may
    /// be ready now. Otherwise the shard goes straight back to
    /// [`Epoll::wait`], which returns at once if anything became ready
    /// meanwhile: one system call per wake-up, not a second to find nothing.
    fn poll_io(&mut self) -> io::Result<bool> {
        for token in std::mem::take(&mut self.again) {
            self.on_readable(token);
        }
        // The events the blocking wait fetched, or what is ready now.
        let n = match self.fetched.take() {
            Some(n) => n,
            None => self.epoll.poll_now(&mut self.events)?,
        };
        for i in 0..n {
            let libc::epoll_event { events, u64: token } = self.events[i];
            match token {
                LISTENER => self.accept_batch(),
                SHUTDOWN => self.begin_shutdown(),
                _ => {
                    if events & epoll::OUT != 0 {
                        self.on_writable(token);
                    }
                    if events & !epoll::OUT != 0 {
                        self.on_readable(token);
                    }
                }
            }
        }
        Ok(n == self.events.len())
    }

    /// The slot a token names, if that connection still lives.
    fn live(&self, token: u64) -> Option<usize> {
        let key = (token & 0xffff_ffff) as usize;
        let gen = (token >> 32) as u32;
        self.slab.get(key).filter(|s| s.gen == gen).map(|_| key)
    }

    fn accept_batch(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener::accept(listener) {
                Accepted::Socket(fd) => self.admit(fd),
                Accepted::Empty => return,
                Accepted::Skipped => continue,
                Accepted::Exhausted(err) => {
                    self.counters.accept_exhausted += 1;
                    let _ = self.epoll.delete(listener.as_raw_fd());
                    self.accept_resume = Some(Instant::now() + ACCEPT_BACKOFF);
                    let held = self.slab.len();
                    self.warn(format_args!(
                        "accept failed ({err}) while holding {held} sockets: pausing accepts for {ACCEPT_BACKOFF:?}; raise RLIMIT_NOFILE or lower the load (see kernel-tuning/)"
                    ));
                    return;
                }
            }
        }
    }

    /// Logs a resource problem at most once per stats interval: under load
    /// it repeats for every connection, and one line says it all.
    fn warn(&mut self, msg: std::fmt::Arguments) {
        let now = Instant::now();
        if self
            .warned_at
            .is_none_or(|t| now >= t + self.cfg.stats_interval)
        {
            eprintln!("shard {}: {msg}", self.id);
            self.warned_at = Some(now);
        }
    }

    fn admit(&mut self, fd: RawFd) {
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let key = self.slab.vacant_key();
        let token = (gen as u64) << 32 | key as u64;
        if let Err(err) = self
            .epoll
            .add(fd, epoll::IN | epoll::RDHUP | epoll::ET, token)
        {
            self.warn(format_args!(
                "epoll_ctl(ADD) failed ({err}): dropping new connections; check fs.epoll.max_user_watches (see kernel-tuning/)"
            ));
            socket::close(fd, true);
            return;
        }
        let now = self.now_tick();
        let deadline = now + self.handshake_ticks + 1;
        self.slab.insert(Slot {
            // SAFETY: fd came from accept4 and nothing else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            gen,
            upgraded: false,
            last_seen: now,
            armed: deadline,
            frame_deadline: 0,
            conn: Conn::new(),
            pending: Vec::new(),
        });
        self.wheel.insert(Entry {
            key: key as u32,
            gen,
            deadline,
        });
        self.counters.accepted += 1;
        // The request usually arrives with the connection (under a burst, 9
        // accepts in 10 found it queued already): read it now rather than
        // after another trip through epoll.
        self.on_readable(token);
    }

    fn on_readable(&mut self, token: u64) {
        let Some(key) = self.live(token) else { return };
        for _ in 0..READS_PER_EVENT {
            let n = match socket::recv(self.slab[key].fd.as_raw_fd(), &mut self.scratch) {
                Ok(0) => return self.peer_gone(key),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.peer_gone(key),
            };
            // A bug that one device's bytes trigger costs that device its
            // connection, not the shard its devices.
            let open = match contain(|| {
                if self.cfg.inject_panic
                    && self.scratch[..n]
                        .windows(INJECT_PANIC.len())
                        .any(|w| w == INJECT_PANIC)
                {
                    panic!("injected fault (C1M_INJECT_PANIC)");
                }
                self.on_bytes(key, n)
            }) {
                Ok(open) => open,
                Err(cause) => {
                    self.internal_error(key, &cause);
                    false
                }
            };
            if !open || n < self.scratch.len() {
                // Closed, or the socket is drained: a short read means the
                // receive queue was empty, and edge-triggered epoll reports
                // any byte that arrives after it.
                return;
            }
        }
        self.again.push(token);
    }

    /// Feeds `n` bytes of scratch to the connection; false when it closed.
    fn on_bytes(&mut self, key: usize, n: usize) -> bool {
        let full = self.open >= self.cfg.max_conns as u64;
        let now = self.now_tick();
        let slot = &mut self.slab[key];
        self.out.clear();
        let r = slot.conn.receive(
            &mut self.scratch[..n],
            &self.cfg.limits,
            full,
            &mut self.out,
        );
        if r.frames > 0 || r.upgraded {
            slot.last_seen = now;
            self.counters.frames += r.frames as u64;
            if r.upgraded {
                slot.upgraded = true;
                self.open += 1;
                self.counters.upgraded += 1;
                // The handshake deadline may be later than the first expiry.
                slot.bring_forward(key, now + self.timeout_ticks + 1, &mut self.wheel);
            }
        }
        if !slot.conn.has_partial_frame() {
            slot.frame_deadline = 0;
        } else if slot.frame_deadline == 0 {
            // A frame has begun: it must end within the frame timeout.
            slot.frame_deadline = now + self.frame_ticks + 1;
            slot.bring_forward(key, slot.frame_deadline, &mut self.wheel);
        }
        if !self.out.is_empty() && !self.write(key) {
            return false;
        }
        match r.end {
            None => true,
            Some(end) => {
                match end {
                    End::ClientClose => self.counters.client_close += 1,
                    End::ProtocolError(_) => self.counters.protocol_error += 1,
                    End::Rejected(_) => self.counters.rejected += 1,
                }
                if self.slab[key].pending.is_empty() {
                    self.close(key, Close::Graceful);
                }
                // else: closed once the output is flushed (or when its wheel
                // entry comes due, if the peer never reads it).
                false
            }
        }
    }

    /// Sends `self.out` on the connection, queueing what the socket does not
    /// take. False when the connection had to be closed.
    fn write(&mut self, key: usize) -> bool {
        let slot = &mut self.slab[key];
        if !slot.pending.is_empty() {
            if slot.pending.len() + self.out.len() > self.max_pending {
                self.counters.slow_reader += 1;
                self.close(key, Close::Abortive);
                return false;
            }
            slot.pending.extend_from_slice(&self.out);
            return true;
        }
        match send(slot.fd.as_raw_fd(), &self.out) {
            Ok(n) if n == self.out.len() => true,
            Ok(n) => {
                slot.pending.extend_from_slice(&self.out[n..]);
                let token = (slot.gen as u64) << 32 | key as u64;
                let events = epoll::IN | epoll::OUT | epoll::RDHUP | epoll::ET;
                if self
                    .epoll
                    .modify(slot.fd.as_raw_fd(), events, token)
                    .is_err()
                {
                    self.peer_gone(key);
                    return false;
                }
                true
            }
            Err(_) => {
                self.peer_gone(key);
                false
            }
        }
    }

    fn on_writable(&mut self, token: u64) {
        let Some(key) = self.live(token) else { return };
        let slot = &mut self.slab[key];
        match send(slot.fd.as_raw_fd(), &slot.pending) {
            Ok(n) if n == slot.pending.len() => {
                slot.pending = Vec::new();
                if slot.conn.phase() == Phase::Done {
                    return self.close(key, Close::Graceful);
                }
                let events = epoll::IN | epoll::RDHUP | epoll::ET;
                if self
                    .epoll
                    .modify(slot.fd.as_raw_fd(), events, token)
                    .is_err()
                {
                    self.peer_gone(key);
                }
            }
            Ok(n) => {
                slot.pending.drain(..n);
            }
            Err(_) => self.peer_gone(key),
        }
    }

    /// A panic while handling one connection: log it, count it, drop that
    /// connection (its state may be half-updated); the shard goes on.
    fn internal_error(&mut self, key: usize, cause: &str) {
        self.counters.internal_error += 1;
        eprintln!(
            "shard {}: internal error on one connection ({cause}): closed it, the others are unaffected; please report this",
            self.id
        );
        if self.slab.contains(key) {
            self.close(key, Close::Abortive);
        }
    }

    /// EOF or a socket error: the device went away without a Close frame.
    fn peer_gone(&mut self, key: usize) {
        if self.slab[key].conn.phase() == Phase::Closing {
            self.counters.shutdown += 1;
        } else {
            self.counters.peer_gone += 1;
        }
        self.close(key, Close::Abortive);
    }

    /// Handles up to one batch of due wheel entries; true if more are due.
    fn expire_due(&mut self, now: u64) -> bool {
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
            match slot.conn.phase() {
                Phase::Handshake => {
                    self.counters.handshake_timeout += 1;
                    self.close(key, Close::Abortive);
                }
                Phase::Done => {
                    // Its final output was never read.
                    self.counters.slow_reader += 1;
                    self.close(key, Close::Abortive);
                }
                Phase::Open | Phase::Closing => {
                    let silent_due = slot.last_seen + self.timeout_ticks + 1;
                    let frame_due = match slot.frame_deadline {
                        0 => u64::MAX,
                        d => d,
                    };
                    if frame_due <= now {
                        self.counters.frame_timeout += 1;
                        self.close(key, Close::Abortive);
                    } else if silent_due <= now {
                        self.counters.expired += 1;
                        self.expire(key);
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
    /// void), or Close 1001 and FIN with `--graceful-expiry`.
    fn expire(&mut self, key: usize) {
        if self.cfg.graceful_expiry {
            let mut close = Vec::with_capacity(4);
            frame::write_close(&mut close, code::GOING_AWAY);
            let _ = send(self.slab[key].fd.as_raw_fd(), &close);
            self.close(key, Close::Graceful);
        } else {
            self.close(key, Close::Abortive);
        }
    }

    fn close(&mut self, key: usize, how: Close) {
        let slot = self.slab.remove(key);
        if slot.upgraded {
            self.open -= 1;
        }
        // Closing the fd also drops it from the epoll set.
        socket::close(slot.fd.into_raw_fd(), how == Close::Abortive);
    }

    /// Stops accepting and sends Close 1001 to every device.
    fn begin_shutdown(&mut self) {
        let mut buf = [0u8; 8];
        // SAFETY: eventfd reads are 8 bytes.
        unsafe { libc::read(self.shutdown.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        if self.drain_deadline.is_some() {
            return;
        }
        self.drain_deadline = Some(Instant::now() + self.cfg.drain_timeout);
        self.listener = None;
        self.accept_resume = None;
        let keys: Vec<usize> = self.slab.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.out.clear();
            let slot = &mut self.slab[key];
            slot.conn.start_close(&mut self.out);
            if slot.conn.phase() == Phase::Done {
                self.counters.shutdown += 1;
                self.close(key, Close::Abortive);
            } else {
                self.write(key);
            }
        }
    }

    /// The drain timed out (or finished): close whatever is left.
    fn close_all(&mut self) {
        let keys: Vec<usize> = self.slab.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.counters.shutdown += 1;
            self.close(key, Close::Abortive);
        }
    }

    fn send_report(&self) {
        let _ = self.report.send(Snapshot {
            shard: self.id,
            open: self.open,
            sockets: self.slab.len() as u64,
            totals: self.counters,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::contain;

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
}
