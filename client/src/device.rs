//! Who each device is: its id, whether it stays silent, when it beats.

/// Writes device `n`'s id into `out`: `prefix` then a locally administered
/// MAC address (first octet 0x02) holding the run's 16-bit `run` tag and the
/// 24-bit device number, so ids are unique within a run of up to 16.7M
/// devices and differ between runs.
///
/// Written by hand, not with `write!`: core::fmt's hex formatting was about
/// 1,200 of the client's 9,100 user-space instructions per connection
/// (callgrind, results/20261207T*-client-cost).
pub fn write_id(out: &mut String, prefix: &str, run: u16, n: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.clear();
    out.push_str(prefix);
    let [r0, r1] = run.to_be_bytes();
    let [_, a, b, c] = n.to_be_bytes();
    let mut mac = *b"02:00:00:00:00:00";
    for (i, byte) in [r0, r1, a, b, c].into_iter().enumerate() {
        mac[3 + 3 * i] = HEX[usize::from(byte >> 4)];
        mac[4 + 3 * i] = HEX[usize::from(byte & 15)];
    }
    // ASCII digits and colons: always UTF-8.
    out.push_str(std::str::from_utf8(&mac).unwrap_or_default());
}

/// Most devices one run can name (24 bits of device number).
pub const MAX_DEVICES: u64 = 1 << 24;

/// Whether device `n` is one of the silent ones: exactly `fraction` of every
/// run of consecutive numbers, spread evenly.
pub fn is_silent(n: u64, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    ((n + 1) as f64 * fraction).floor() > (n as f64 * fraction).floor()
}

/// Whether device `n` is one of the `--reconnect-fraction` (evenly spread,
/// and chosen apart from the silent ones by a different stride).
pub fn reconnects(n: u64, fraction: f64) -> bool {
    is_silent(n.wrapping_mul(7).wrapping_add(3), fraction)
}

/// xorshift64*: cheap per-core randomness for jitter and masks.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [lo, hi] (inclusive), for `lo <= hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// The interval until a device's next heartbeat: `every` +-10%.
pub fn jittered(rng: &mut Rng, every_ticks: u64) -> u64 {
    let spread = every_ticks / 10;
    rng.between(every_ticks - spread, every_ticks + spread)
        .max(1)
}

/// The wait before reconnect attempt `attempt` (0 for the first), as
/// device firmware should back off: exponential with full jitter (AWS
/// Architecture Blog, "Exponential Backoff And Jitter"), uniform in
/// [0, min(cap, base * 2^attempt)], in the caller's units.
pub fn backoff(rng: &mut Rng, attempt: u32, base: u64, cap: u64) -> u64 {
    let ceiling = base.saturating_mul(1u64 << attempt.min(40)).min(cap);
    rng.between(0, ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_ceiling_and_the_cap() {
        let mut rng = Rng::new(7);
        for attempt in 0..64 {
            let ceiling = (10u64 << attempt.min(40)).min(3000);
            let waits: Vec<u64> = (0..2000)
                .map(|_| backoff(&mut rng, attempt, 10, 3000))
                .collect();
            assert!(waits.iter().all(|&w| w <= ceiling), "attempt {attempt}");
            // Full jitter: spread over the whole range, not bunched at its top.
            let low = waits.iter().filter(|&&w| w <= ceiling / 2).count();
            assert!((700..1300).contains(&low), "attempt {attempt}: {low}");
        }
    }

    #[test]
    fn ids_are_macs_unique_per_device_and_run() {
        let mut s = String::new();
        write_id(&mut s, "", 0xabcd, 0x01_02_03);
        assert_eq!(s, "02:ab:cd:01:02:03");
        write_id(&mut s, "lab-", 1, (MAX_DEVICES - 1) as u32);
        assert_eq!(s, "lab-02:00:01:ff:ff:ff");
        assert!(c1m_proto::handshake::valid_id(&s));
        let mut seen = std::collections::HashSet::new();
        for n in 0..10_000 {
            write_id(&mut s, "", 7, n);
            assert!(seen.insert(s.clone()));
        }
    }

    #[test]
    fn silent_fraction_is_exact_and_spread() {
        for f in [0.0, 0.1, 0.25, 0.5, 1.0 / 3.0, 1.0] {
            let n = (0..10_000).filter(|&n| is_silent(n, f)).count();
            assert!((n as f64 - 10_000.0 * f).abs() <= 1.0, "{f}: {n}");
            let first = (0..100).filter(|&n| is_silent(n, f)).count();
            assert!((first as f64 - 100.0 * f).abs() <= 1.0, "{f}: {first}");
        }
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_varies() {
        let mut rng = Rng::new(42);
        let v: Vec<u64> = (0..10_000).map(|_| jittered(&mut rng, 3000)).collect();
        assert!(v.iter().all(|&t| (2700..=3300).contains(&t)));
        assert!(*v.iter().min().unwrap() < 2720 && *v.iter().max().unwrap() > 3280);
        assert_eq!(jittered(&mut rng, 0), 1);
    }
}
