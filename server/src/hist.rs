//! Fixed-bucket histograms the shards keep for `/metrics` (Prometheus
//! histograms): a handful of counters per histogram, so a sample costs a
//! few comparisons and an add, and shards and workers sum them like any
//! other counter.

use std::fmt::Write as _;

/// Upper bounds in milliseconds; the last bucket (+Inf) is implicit.
pub type Bounds = [u64; 11];

/// How late a silent device was deleted after its deadline (last frame +
/// timeout): the wheel's tick and the shard's load.
pub const EXPIRY_LAG_MS: Bounds = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

/// The time between two reads of frames from one device: the heartbeat
/// interval the fleet really keeps (at the resolution of the tick).
pub const HEARTBEAT_INTERVAL_MS: Bounds = [
    1000, 5000, 10000, 15000, 20000, 30000, 45000, 60000, 90000, 120000, 300000,
];

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Hist {
    /// Samples per bucket (not cumulative): `counts[i]` are those
    /// `<= bounds[i]` and above the bucket before; the last is the rest.
    pub counts: [u64; 12],
    pub sum_ms: u64,
}

impl Hist {
    pub fn record(&mut self, bounds: &Bounds, ms: u64) {
        // The first bound at or above `ms`: a binary search, 4 compares
        // (a heartbeat records one; a scan took up to 11).
        let i = bounds.partition_point(|&b| b < ms);
        self.counts[i] += 1;
        self.sum_ms += ms;
    }

    pub fn add(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(o.counts) {
            *a += b;
        }
        self.sum_ms += o.sum_ms;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The stats line's form: the 12 counts, then the sum, by commas.
    pub fn to_field(&self) -> String {
        let mut s = String::with_capacity(64);
        for c in self.counts {
            let _ = write!(s, "{c},");
        }
        let _ = write!(s, "{}", self.sum_ms);
        s
    }

    /// Reads [`Hist::to_field`] back.
    pub fn from_field(text: &str) -> Option<Hist> {
        let mut h = Hist::default();
        let mut parts = text.split(',');
        for c in &mut h.counts {
            *c = parts.next()?.parse().ok()?;
        }
        h.sum_ms = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some(h)
    }

    /// The Prometheus exposition of one histogram named `name` (in
    /// seconds, as the conventions want).
    pub fn render(&self, out: &mut String, name: &str, help: &str, bounds: &Bounds) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, &b) in bounds.iter().enumerate() {
            cumulative += self.counts[i];
            let le = b as f64 / 1000.0;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(out, "{name}_sum {}", self.sum_ms as f64 / 1000.0);
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_the_first_bucket_that_holds_them() {
        let mut h = Hist::default();
        for ms in [0, 5, 6, 10_000, 10_001] {
            h.record(&EXPIRY_LAG_MS, ms);
        }
        assert_eq!(h.counts[0], 2); // 0 and 5 (le 5ms)
        assert_eq!(h.counts[1], 1); // 6 (le 10ms)
        assert_eq!(h.counts[10], 1); // 10s
        assert_eq!(h.counts[11], 1); // over 10s
        assert_eq!((h.count(), h.sum_ms), (5, 20_012));
        assert_eq!(Hist::from_field(&h.to_field()), Some(h));
        assert_eq!(Hist::from_field("1,2"), None);
    }

    #[test]
    fn the_exposition_is_cumulative_and_in_seconds() {
        let mut h = Hist::default();
        h.record(&EXPIRY_LAG_MS, 7);
        h.record(&EXPIRY_LAG_MS, 20_000);
        let mut s = String::new();
        h.render(&mut s, "x_seconds", "help.", &EXPIRY_LAG_MS);
        assert!(s.contains("x_seconds_bucket{le=\"0.005\"} 0\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"0.01\"} 1\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"10\"} 1\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"+Inf\"} 2\n"), "{s}");
        assert!(s.contains("x_seconds_sum 20.007\n"), "{s}");
        assert!(s.contains("x_seconds_count 2\n"), "{s}");
    }
}
