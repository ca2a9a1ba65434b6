//! Shutdown: Close 1001 to every device, at once or paced so that the
//! whole server's closes run at --drain-rate, then whatever is left at
//! the deadline.

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
    /// This shard's Closes per second ([`shard_pace`]).
    rate: f64,
}

impl Pacing {
    /// When the next Close is due.
    pub(super) fn next_due(&self) -> Instant {
        self.began + Duration::from_secs_f64(self.closed as f64 / self.rate.max(1e-9))
    }
}

/// A shard's pace in a drain of the whole server at `rate` per second:
/// its `held` devices spread over the drain's length, every device the
/// server holds (`total`, the registry's count) over `rate`, so that all
/// shards end together however SO_REUSEPORT split the devices (at 1M over
/// 60 workers the fullest held 1.04x the mean, and a drain paced at an
/// even share of the rate took 1.06-1.08x its length). With no count
/// (`total` 0: nothing registered yet), its even share of `shards`.
pub(super) fn shard_pace(held: usize, total: usize, rate: f64, shards: usize) -> f64 {
    if total == 0 || held == 0 {
        return rate / shards.max(1) as f64;
    }
    // A shard holding more than the registry counts (connections still in
    // their handshake) goes no faster than the whole server may.
    (rate * held as f64 / total as f64).min(rate)
}

impl State {
    /// Stops accepting and sends Close 1001 to every device: at once, or
    /// paced ([`shard_pace`], [`State::pace_drain`]).
    pub(super) fn begin_shutdown(&mut self, io: &mut impl Driver) {
        if self.drain.deadline.is_some() {
            return;
        }
        self.stop_accepting(io);
        if self.cfg.drain_rate > 0.0 {
            // The last Close goes out after held / rate; then the devices
            // have --drain-timeout to answer, as without pacing. The
            // registry's count walks its stripes once, here only.
            let rate = shard_pace(
                self.slab.len(),
                self.cfg.registry.len(),
                self.cfg.drain_rate,
                self.peers.len(),
            );
            return self.begin_paced(io, rate);
        }
        self.close_everyone(io, b"");
    }

    /// After a hot upgrade: what the handover left here (TLS devices)
    /// closed over `window`, each shard spreading its own so that all end
    /// together (`--upgrade-tls-window`; zero: at once).
    pub(super) fn begin_shutdown_over(&mut self, io: &mut impl Driver, window: Duration) {
        if self.drain.deadline.is_some() {
            return;
        }
        self.stop_accepting(io);
        let held = self.slab.len();
        if window.is_zero() || held == 0 {
            return self.close_everyone(io, DRAIN_REASON);
        }
        self.begin_paced(io, held as f64 / window.as_secs_f64());
    }

    fn stop_accepting(&mut self, io: &mut impl Driver) {
        io.unlisten();
        self.accept.resume = None;
        // Closed unserved: counted as dropped in admission.
        self.counters.admit_dropped += self.accept.deferred.len() as u64;
        self.accept.deferred.clear();
    }

    /// A drain at `rate` Closes per second for this shard.
    fn begin_paced(&mut self, io: &mut impl Driver, rate: f64) {
        let now = self.clock.now.at;
        let pacing = Duration::from_secs_f64(self.slab.len() as f64 / rate);
        self.drain.deadline = Some(now + pacing + self.cfg.drain_timeout);
        self.drain.pacing = Some(Pacing {
            began: now,
            next_key: 0,
            closed: 0,
            rate,
        });
        self.pace_drain(io, now)
    }

    /// Close 1001 to every device at once; --drain-timeout for answers.
    fn close_everyone(&mut self, io: &mut impl Driver, reason: &[u8]) {
        let now = self.clock.now.at;
        self.drain.deadline = Some(now + self.cfg.drain_timeout);
        let keys: Vec<usize> = self.slab.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close_for_drain(io, key, reason);
        }
    }

    /// Sends the Closes of a paced drain that are due by `now`: one at
    /// its start, then one every 1 / rate seconds.
    pub(super) fn pace_drain(&mut self, io: &mut impl Driver, now: Instant) {
        let Some(p) = self.drain.pacing else { return };
        let due = (now.duration_since(p.began).as_secs_f64() * p.rate) as u64 + 1;
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

#[cfg(test)]
mod tests {
    use super::shard_pace;

    /// Every shard of a server ends its paced drain at total / rate,
    /// whatever it holds; the shards' paces add up to the rate.
    #[test]
    fn shards_holding_more_go_faster_and_all_end_together() {
        let (rate, total) = (10_000.0, 1_000_000);
        let held = [17_374, 16_666, 14_850];
        let rest = total - held.iter().sum::<usize>();
        let mut sum = 0.0;
        for h in held.into_iter().chain([rest]) {
            let pace = shard_pace(h, total, rate, 60);
            let ends = h as f64 / pace;
            assert!((ends - 100.0).abs() < 1e-9, "{h} held: ends at {ends} s");
            sum += pace;
        }
        assert!((sum - rate).abs() < 1e-6, "{sum}");
        // An even split is the even share, as before.
        assert_eq!(shard_pace(250, 1_000, 100.0, 4), 25.0);
    }

    #[test]
    fn with_no_count_a_shard_takes_its_even_share_and_never_more_than_the_rate() {
        assert_eq!(shard_pace(500, 0, 100.0, 4), 25.0);
        assert_eq!(shard_pace(0, 1_000, 100.0, 4), 25.0);
        // More held than registered (handshakes): the whole rate at most.
        assert_eq!(shard_pace(50, 10, 100.0, 4), 100.0);
    }
}
