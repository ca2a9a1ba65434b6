//! The reporting thread, one for the single process and the `--procs`
//! parent: it takes SIGINT/SIGTERM, turns /healthz to 503 when stopping,
//! says when the drain is due (at the signal or after
//! `--drain-health-delay`), publishes snapshots to `--admin`, and times
//! the stats line. What is reported (shards' snapshots, workers' lines)
//! and how a drain is told (mail to the shards, SIGTERM to the workers)
//! stay with the caller.

use std::time::{Duration, Instant};

use c1m_io::host::signals::Signals;

use crate::admin::Admin;
use crate::stats::{Counters, Snapshot};

/// The hot upgrade's trigger, as [`Reporter::wait`] names it.
pub const UPGRADE_SIGNAL: &str = "SIGUSR2";

pub struct Reporter {
    signals: Signals,
    admin: Option<Admin>,
    /// `--stats-interval`; zero prints no stats lines.
    interval: Duration,
    /// `--drain-health-delay`: /healthz says 503 this long before the drain.
    drain_health_delay: Duration,
    /// The longest wait for a signal between looks at everything else.
    poll: Duration,
    /// Stats lines go on while stopping (the single process's drain), or
    /// end at the signal (the parent, whose workers then drain).
    lines_while_stopping: bool,
    start: Instant,
    next_line: Instant,
    prev: Counters,
    prev_at: Instant,
    stopping: bool,
    drain_at: Option<Instant>,
}

/// What one stats line covers: since the start, and since the previous line.
pub struct Window {
    /// Seconds since the start.
    pub elapsed: f64,
    /// The totals at the previous line.
    pub prev: Counters,
    /// Seconds since the previous line.
    pub secs: f64,
}

impl Reporter {
    pub fn new(
        signals: Signals,
        admin: Option<Admin>,
        stats_interval: Duration,
        drain_health_delay: Duration,
        poll: Duration,
        lines_while_stopping: bool,
    ) -> Reporter {
        let start = Instant::now();
        Reporter {
            signals,
            admin,
            interval: stats_interval,
            drain_health_delay,
            poll,
            lines_while_stopping,
            start,
            next_line: start + stats_interval,
            prev: Counters::default(),
            prev_at: start,
            stopping: false,
            drain_at: None,
        }
    }

    /// Waits for SIGINT or SIGTERM, at most `poll` and until the next
    /// stats line; its name if one came. SIGUSR2 ([`UPGRADE_SIGNAL`]) is
    /// only named: the caller starts the upgrade. Else the server is stopping:
    /// /healthz says 503 and the drain is due after --drain-health-delay.
    /// Once stopping, signals are left alone and this only sleeps.
    pub fn wait(&mut self) -> Option<&'static str> {
        let until_line = if self.interval.is_zero() || (self.stopping && !self.lines_while_stopping)
        {
            Duration::MAX
        } else {
            self.next_line.saturating_duration_since(Instant::now())
        };
        let wait = until_line.min(self.poll);
        if self.stopping {
            std::thread::sleep(wait.min(self.poll / 2));
            return None;
        }
        let signal = self.signals.wait(wait)?;
        if signal == UPGRADE_SIGNAL {
            return Some(signal); // the caller's to act on: nothing stops
        }
        self.stop();
        self.drain_at = Some(Instant::now() + self.drain_health_delay);
        Some(signal)
    }

    /// Stops without a signal (a shard died, a worker keeps dying):
    /// /healthz says 503. True if it was not stopping yet. No drain is
    /// scheduled: the caller drains at once.
    pub fn stop(&mut self) -> bool {
        if self.stopping {
            return false;
        }
        self.stopping = true;
        if let Some(a) = &self.admin {
            a.stopping();
        }
        true
    }

    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// True once, when the drain a signal scheduled is due.
    pub fn drain_due(&mut self) -> bool {
        if self.drain_at.is_some_and(|t| Instant::now() >= t) {
            self.drain_at = None;
            return true;
        }
        false
    }

    /// Whether `--admin` is served (and so wants [`Reporter::publish`]).
    pub fn admin(&self) -> bool {
        self.admin.is_some()
    }

    /// Hands `--admin` the latest snapshots and their sum.
    pub fn publish(&self, snaps: &[Snapshot], sum: &Counters) {
        if let Some(a) = &self.admin {
            a.publish(snaps, sum);
        }
    }

    /// Whether a stats line is due now.
    pub fn line_due(&self) -> bool {
        !self.interval.is_zero()
            && (self.lines_while_stopping || !self.stopping)
            && Instant::now() >= self.next_line
    }

    /// The window of the line being printed with totals `sum`, which the
    /// next line's rates are taken from.
    pub fn line(&mut self, sum: Counters) -> Window {
        let now = Instant::now();
        let window = Window {
            elapsed: now.duration_since(self.start).as_secs_f64(),
            prev: std::mem::replace(&mut self.prev, sum),
            secs: now.duration_since(self.prev_at).as_secs_f64(),
        };
        self.prev_at = now;
        self.next_line = now + self.interval;
        window
    }
}
