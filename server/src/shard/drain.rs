//! Shutdown: Close 1001 to every device, at once or paced at the
//! shard's share of --drain-rate, then whatever is left at the deadline.

use std::time::{Duration, Instant};

use c1m_io::{Close, Driver};
use c1m_proto::conn::Phase;

use super::State;
use crate::ended::Ended;

/// A paced drain's Close reason: the device may reconnect at once (its
/// front sends it to another server: /healthz said 503 first).
pub const DRAIN_REASON: &[u8] = b"draining: reconnect";

/// Shutdown's state: none until it begins.
#[derive(Default)]
pub(super) struct Draining {
    /// When whatever is left is closed.
    pub(super) deadline: Option<Instant>,
    /// A paced drain under way: where it began, the next slab key to close
    /// and how many it has closed.
    pub(super) pacing: Option<Pacing>,
}

/// A paced drain (--drain-rate) under way.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pacing {
    began: Instant,
    /// The next slab key to look at (no new connections come during a
    /// drain, so keys are not reused behind the cursor).
    next_key: usize,
    closed: u64,
}

impl Pacing {
    /// When the next Close is due at `rate` per second.
    pub(super) fn next_due(&self, rate: f64) -> Instant {
        self.began + Duration::from_secs_f64(self.closed as f64 / rate.max(1e-9))
    }
}

impl State {
    /// Stops accepting and sends Close 1001 to every device: at once, or
    /// paced at this shard's share of --drain-rate ([`State::pace_drain`]).
    pub(super) fn begin_shutdown(&mut self, io: &mut impl Driver) {
        if self.drain.deadline.is_some() {
            return;
        }
        let now = self.clock.now.at;
        io.unlisten();
        self.accept.resume = None;
        // Closed unserved: counted as dropped in admission.
        self.counters.admit_dropped += self.accept.deferred.len() as u64;
        self.accept.deferred.clear();
        let rate = self.drain_rate();
        if rate > 0.0 {
            // The last Close goes out after held / rate; then the devices
            // have --drain-timeout to answer, as without pacing.
            let held = self.slab.len() as f64;
            let pacing = Duration::from_secs_f64(held / rate);
            self.drain.deadline = Some(now + pacing + self.cfg.drain_timeout);
            self.drain.pacing = Some(Pacing {
                began: now,
                next_key: 0,
                closed: 0,
            });
            return self.pace_drain(io, now);
        }
        self.drain.deadline = Some(now + self.cfg.drain_timeout);
        let keys: Vec<usize> = self.slab.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close_for_drain(io, key, b"");
        }
    }

    /// This shard's share of --drain-rate, devices per second.
    pub(super) fn drain_rate(&self) -> f64 {
        self.cfg.drain_rate / self.peers.len().max(1) as f64
    }

    /// Sends the Closes of a paced drain that are due by `now`: one at
    /// its start, then one every 1 / rate seconds.
    pub(super) fn pace_drain(&mut self, io: &mut impl Driver, now: Instant) {
        let Some(p) = self.drain.pacing else { return };
        let rate = self.drain_rate();
        let due = (now.duration_since(p.began).as_secs_f64() * rate) as u64 + 1;
        let (mut key, mut closed) = (p.next_key, p.closed);
        let end = self.slab.capacity();
        while closed < due && key < end {
            if self.slab.get(key).is_some_and(|s| s.ended.is_none()) {
                self.close_for_drain(io, key, DRAIN_REASON);
                closed += 1;
            }
            key += 1;
        }
        self.drain.pacing = (key < end).then_some(Pacing {
            next_key: key,
            closed,
            ..p
        });
    }

    /// Close 1001 (with `reason`) to the device in slot `key`, if it is not
    /// on its way out already; one still in its handshake just ends.
    pub(super) fn close_for_drain(&mut self, io: &mut impl Driver, key: usize, reason: &[u8]) {
        let slot = &mut self.slab[key];
        if slot.ended.is_some() {
            return;
        }
        self.out.clear();
        slot.conn.start_close_with(&mut self.out, reason);
        if slot.conn.phase() == Phase::Done {
            self.end(io, key, Ended::Shutdown, Close::Abortive);
        } else {
            // Not an end yet: it has --drain-timeout to answer (a send
            // that fails ends it, counted once: State::write).
            self.write(io, key);
        }
    }

    /// The drain timed out (or finished): close whatever is left.
    pub(super) fn close_all(&mut self, io: &mut impl Driver) {
        let keys: Vec<usize> = self.slab.iter().map(|(k, _)| k).collect();
        for key in keys {
            // Counted once: those ended already are only closed.
            self.end(io, key, Ended::Shutdown, Close::Abortive);
        }
    }
}
