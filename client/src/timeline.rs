//! The per-second timeline of a run: one row per second, written as CSV.

use std::io::{self, Write};

/// One second of the run. Counts ending in `_per_s` happened during that
/// second; the others are levels at its end.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Row {
    /// Seconds since the run started (end of the interval).
    pub t_s: f64,
    /// Upgraded connections open at the end of the second.
    pub established: u64,
    pub connects_per_s: u64,
    pub failures_per_s: u64,
    pub heartbeats_per_s: u64,
    /// Silent connections the server closed (its expiries).
    pub expiries_per_s: u64,
    /// Heartbeating connections the server closed (must stay 0).
    pub false_expiries_per_s: u64,
    /// Client CPU over the second, percent of one core.
    pub client_cpu_pct: f64,
    pub client_rss_bytes: u64,
    /// The server's CPU and RSS when its pid is known (else 0).
    pub server_cpu_pct: f64,
    pub server_rss_bytes: u64,
}

pub const HEADER: &str = "t_s,established,connects_per_s,failures_per_s,heartbeats_per_s,expiries_per_s,false_expiries_per_s,client_cpu_pct,client_rss_bytes,server_cpu_pct,server_rss_bytes";

pub fn write_csv(mut out: impl Write, rows: &[Row]) -> io::Result<()> {
    writeln!(out, "{HEADER}")?;
    for r in rows {
        writeln!(
            out,
            "{:.3},{},{},{},{},{},{},{:.1},{},{:.1},{}",
            r.t_s,
            r.established,
            r.connects_per_s,
            r.failures_per_s,
            r.heartbeats_per_s,
            r.expiries_per_s,
            r.false_expiries_per_s,
            r.client_cpu_pct,
            r.client_rss_bytes,
            r.server_cpu_pct,
            r.server_rss_bytes
        )?;
    }
    out.flush()
}

/// Reads what [`write_csv`] wrote (to merge worker timelines and in tests).
pub fn read_csv(text: &str) -> Result<Vec<Row>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err("timeline: unexpected header".into());
    }
    lines
        .enumerate()
        .map(|(i, line)| {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() != 11 {
                return Err(format!(
                    "timeline line {}: {} fields, expected 11",
                    i + 2,
                    f.len()
                ));
            }
            let int = |j: usize| {
                f[j].parse::<u64>()
                    .map_err(|_| format!("timeline line {}: field {} is not a count", i + 2, j + 1))
            };
            let num = |j: usize| {
                f[j].parse::<f64>().map_err(|_| {
                    format!("timeline line {}: field {} is not a number", i + 2, j + 1)
                })
            };
            Ok(Row {
                t_s: num(0)?,
                established: int(1)?,
                connects_per_s: int(2)?,
                failures_per_s: int(3)?,
                heartbeats_per_s: int(4)?,
                expiries_per_s: int(5)?,
                false_expiries_per_s: int(6)?,
                client_cpu_pct: num(7)?,
                client_rss_bytes: int(8)?,
                server_cpu_pct: num(9)?,
                server_rss_bytes: int(10)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_csv() {
        let rows = vec![
            Row {
                t_s: 1.0,
                established: 10,
                connects_per_s: 10,
                client_cpu_pct: 12.5,
                client_rss_bytes: 4096,
                ..Row::default()
            },
            Row {
                t_s: 2.0,
                established: 7,
                expiries_per_s: 3,
                false_expiries_per_s: 1,
                heartbeats_per_s: 99,
                server_cpu_pct: 3.5,
                server_rss_bytes: 1 << 20,
                ..Row::default()
            },
        ];
        let mut out = Vec::new();
        write_csv(&mut out, &rows).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert_eq!(read_csv(&text).unwrap(), rows);
        assert!(read_csv("nope\n").is_err());
        assert!(read_csv(&format!("{HEADER}\n1,2,3\n")).is_err());
    }
}
