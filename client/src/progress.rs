//! The progress line on stderr: rewritten in place on a terminal, one plain
//! line per second otherwise (logs, CI).

use std::io::Write;

use crate::metrics::{Counters, Phase};
use crate::timeline::Row;

/// 1234567 -> "1,234,567".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One progress line.
pub fn line(row: &Row, sum: &Counters, target: u64, phase: Phase, eta_s: Option<f64>) -> String {
    let phase = match phase {
        Phase::Ramp => "connecting",
        Phase::Ramped => "waiting for the other cores' ramps",
        Phase::Hold => "holding",
        Phase::Expiry => "awaiting expiries",
        Phase::Done => "done",
    };
    let mut s = format!(
        "[{:>4.0}s] {phase}: established {}/{} ({}/s) failures {} heartbeats {}/s expired {}",
        row.t_s,
        thousands(row.established),
        thousands(target),
        thousands(row.connects_per_s),
        thousands(sum.failed),
        thousands(row.heartbeats_per_s),
        thousands(sum.expired),
    );
    if sum.false_expiries > 0 {
        s.push_str(&format!(
            " FALSE EXPIRIES {}",
            thousands(sum.false_expiries)
        ));
    }
    if let Some(eta) = eta_s {
        s.push_str(&format!(" ETA {eta:.0}s"));
    }
    s
}

pub struct Progress {
    tty: bool,
}

impl Progress {
    pub fn new() -> Progress {
        // SAFETY: isatty only inspects the descriptor.
        Progress {
            tty: unsafe { libc::isatty(2) } == 1,
        }
    }

    pub fn show(&self, line: &str) {
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r\x1b[K{line}")
        } else {
            writeln!(err, "{line}")
        };
    }

    /// Ends the in-place line before other output.
    pub fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_get_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(thousands(12_345_678), "12,345,678");
    }

    #[test]
    fn the_line_says_where_the_run_is_and_shouts_false_expiries() {
        let row = Row {
            t_s: 3.0,
            established: 8123,
            connects_per_s: 4012,
            heartbeats_per_s: 10,
            ..Row::default()
        };
        let mut sum = Counters {
            expired: 5,
            ..Counters::default()
        };
        let l = line(&row, &sum, 10_000, Phase::Ramp, Some(1.0));
        assert!(
            l.contains("connecting: established 8,123/10,000 (4,012/s)"),
            "{l}"
        );
        assert!(l.ends_with("expired 5 ETA 1s"), "{l}");
        sum.false_expiries = 2;
        assert!(line(&row, &sum, 10_000, Phase::Hold, None).contains("FALSE EXPIRIES 2"));
    }
}
