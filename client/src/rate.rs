//! A token bucket for the connection rate (sans-IO: time is passed in).

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RateLimiter {
    /// Connections per second; 0 = unlimited.
    rate: f64,
    /// Tokens saved up while idle, so a short stall does not lower the mean
    /// rate, yet a long one does not release a burst.
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(rate: f64, now: Instant) -> RateLimiter {
        // A tenth of a second's worth (at least one), so the loop that
        // wakes every few milliseconds keeps up with any rate.
        let burst = (rate / 10.0).max(1.0);
        RateLimiter {
            rate,
            burst,
            tokens: burst.min(1.0),
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next token is due (`now` when unlimited or one is there).
    pub fn next_token(&self, now: Instant) -> Instant {
        if self.rate <= 0.0 || self.tokens >= 1.0 {
            return now;
        }
        self.last + Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts tokens taken over `secs` simulated seconds polled every `step`.
    fn taken(rate: f64, secs: f64, step: Duration) -> u64 {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(rate, t0);
        let (mut n, mut t) = (0, t0);
        while t < t0 + Duration::from_secs_f64(secs) {
            while r.try_take(t) {
                n += 1;
                assert!(n < 10_000_000, "unbounded");
            }
            assert!(r.next_token(t) >= t);
            t += step;
        }
        n
    }

    #[test]
    fn holds_the_rate_whatever_the_polling_step() {
        for (rate, step_ms) in [
            (1000.0, 1),
            (1000.0, 7),
            (50_000.0, 3),
            (10.0, 50),
            (1.0, 100),
        ] {
            let n = taken(rate, 10.0, Duration::from_millis(step_ms)) as f64;
            let want = rate * 10.0;
            assert!(
                (n - want).abs() <= want * 0.01 + 2.0,
                "rate {rate} step {step_ms}: {n}"
            );
        }
    }

    #[test]
    fn a_stall_does_not_release_more_than_the_burst() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1000.0, t0);
        let later = t0 + Duration::from_secs(60);
        let mut n = 0;
        while r.try_take(later) {
            n += 1;
        }
        assert_eq!(n, 100);
    }

    #[test]
    fn zero_is_unlimited() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(0.0, t0);
        assert!((0..1000).all(|_| r.try_take(t0)));
        assert_eq!(r.next_token(t0), t0);
    }
}
