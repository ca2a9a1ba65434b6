//! Admission control (`--max-upgrades-per-sec`): a shard's budget of new
//! connections per second, so that a reconnect storm cannot starve the
//! heartbeats and expiries of the devices already connected. Sans-IO: a
//! token bucket the shard asks at each accept, before any work is done for
//! the connection (no registration, no TLS, no parsing).
//!
//! What happens to the excess ([`Excess`]):
//! - `503`: the connection is answered `503 Service Unavailable` with
//!   `Retry-After` at once (one send, one read of what it sent, a close;
//!   on a TLS port a reset, since a plaintext answer would mean nothing),
//!   so the device backs off and tries again.
//! - `defer`: the shard stops accepting until the bucket is full again;
//!   the connections wait in the kernel's accept queue (and past its
//!   length the kernel drops their SYNs, which they retransmit). Those
//!   accepted over the budget all the same (io_uring's multishot accept
//!   takes a whole burst before its cancel lands) are held by the shard,
//!   unread, and admitted first when the budget refills (4,096 at most,
//!   503 past that).

use std::time::{Duration, Instant};

/// What a shard does with connections over its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Excess {
    /// Answer 503 with Retry-After before any work.
    Refuse,
    /// Leave them in the accept queue: stop accepting until the bucket refills.
    Defer,
}

impl std::str::FromStr for Excess {
    type Err = String;
    fn from_str(s: &str) -> Result<Excess, String> {
        match s {
            "503" | "refuse" => Ok(Excess::Refuse),
            "defer" | "backlog" => Ok(Excess::Defer),
            _ => Err(format!(
                "{s:?} is not an answer to excess upgrades: 503 or defer"
            )),
        }
    }
}

/// The answer to a connection refused over the budget: no body, and a
/// Retry-After that a device honouring it spreads over its backoff anyway.
pub const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// The budget of the whole server, as configured; each shard gets its share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// New connections per second over the whole server (all shards, all
    /// `--procs` workers).
    pub per_sec: f64,
    pub excess: Excess,
}

/// How much of a second's budget may come at once: a tenth of a second's
/// worth (so at most ten pauses a second with `defer`), at least one.
const BURST: f64 = 0.1;

/// One shard's token bucket, kept in nanoseconds of credit (a token costs
/// `1 s / rate`) so that it admits exactly its rate, with no rounding drift.
#[derive(Debug, Clone)]
pub struct Bucket {
    /// What one connection costs.
    cost: u64,
    /// The most credit it keeps (the burst's worth).
    cap: u64,
    credit: u64,
    at: Instant,
    pub excess: Excess,
}

impl Bucket {
    /// A full bucket of `rate` connections per second.
    pub fn new(rate: f64, excess: Excess, now: Instant) -> Bucket {
        let rate = rate.max(1e-3);
        let cost = (1e9 / rate).round().max(1.0) as u64;
        let burst = (rate * BURST).max(1.0).floor() as u64;
        let cap = cost.saturating_mul(burst);
        Bucket {
            cost,
            cap,
            credit: cap,
            at: now,
            excess,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_nanos();
        let dt = u64::try_from(dt).unwrap_or(u64::MAX);
        self.credit = self.credit.saturating_add(dt).min(self.cap);
        self.at = now;
    }

    /// Takes one connection's token; false when the budget is spent.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.credit >= self.cost {
            self.credit -= self.cost;
            true
        } else {
            false
        }
    }

    /// True when the last token was just taken (`defer` pauses then).
    pub fn empty(&self) -> bool {
        self.credit < self.cost
    }

    /// When the bucket is full again (`defer` resumes accepting then: a
    /// pause per burst, not per token).
    pub fn full_at(&self) -> Instant {
        self.at + Duration::from_nanos(self.cap - self.credit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_admits_its_rate_and_its_burst_no_more() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100.0, Excess::Refuse, t0);
        // A burst of a tenth of a second's worth, then nothing.
        let first = (0..50).filter(|_| b.take(t0)).count();
        assert_eq!(first, 10);
        assert!(b.empty());
        assert_eq!(b.full_at(), t0 + Duration::from_millis(100));
        // Over one second: the rate (and the burst it started with).
        let mut admitted = first;
        for ms in 1..=1000 {
            let now = t0 + Duration::from_millis(ms);
            admitted += (0..5).filter(|_| b.take(now)).count();
        }
        // (Credit in whole nanoseconds: exactly the rate, no rounding drift.)
        assert_eq!(admitted, 110);
        // A tiny rate still admits one at a time.
        let mut b = Bucket::new(0.5, Excess::Defer, t0);
        assert!(b.take(t0));
        assert!(!b.take(t0 + Duration::from_secs(1)));
        assert!(b.take(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn excess_parses() {
        assert_eq!("503".parse(), Ok(Excess::Refuse));
        assert_eq!("defer".parse(), Ok(Excess::Defer));
        assert!("drop".parse::<Excess>().is_err());
    }
}
