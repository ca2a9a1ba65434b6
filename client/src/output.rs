//! The results directory of a run: histograms (.hgrm text and V2), the
//! timeline, the summary and the plots.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use serde_json::Value;

use crate::run::Outcome;
use crate::{hgrm, plots, summary, timeline};

/// `YYYYMMDDTHHMMSSZ` for a Unix time in seconds (UTC).
pub fn utc_stamp(secs: u64) -> String {
    let days = secs / 86_400;
    let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}{mo:02}{d:02}T{h:02}{m:02}{s:02}Z")
}

/// results/<UTC timestamp>-<conns>/ under the current directory.
pub fn default_dir(conns: u64) -> PathBuf {
    let now = c1m_io::host::unix_secs();
    PathBuf::from("results").join(format!("{}-{conns}", utc_stamp(now)))
}

fn create(path: &Path) -> Result<BufWriter<File>, String> {
    File::create(path)
        .map(BufWriter::new)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn write_histogram(dir: &Path, name: &str, h: &Histogram<u64>) -> Result<(), String> {
    let text = dir.join(format!("{name}.hgrm"));
    hgrm::write_percentiles(create(&text)?, h)
        .map_err(|e| format!("cannot write {}: {e}", text.display()))?;
    let v2 = dir.join(format!("{name}.v2.hdr"));
    hgrm::write_v2(create(&v2)?, h).map_err(|e| format!("cannot write {}: {e}", v2.display()))
}

/// Writes every file of the run into `dir` (which exists); returns the
/// figures and the markdown table.
pub fn write(
    dir: &Path,
    o: &Outcome,
    mut summary_json: serde_json::Map<String, Value>,
    command: &str,
    target: u64,
    server_measured: bool,
) -> Result<(Value, String), String> {
    write_histogram(dir, "connect", &o.measured.connect)?;
    write_histogram(dir, "heartbeat_rtt", &o.measured.heartbeat_rtt)?;
    write_histogram(dir, "heartbeat_rtt_hold", &o.measured.heartbeat_rtt_hold)?;
    write_histogram(dir, "expiry_lag", &o.measured.expiry_lag)?;
    write_histogram(dir, "storm_lag", &o.measured.storm_lag)?;
    write_histogram(dir, "reconnect_connect", &o.measured.reconnect_connect)?;
    write_histogram(dir, "reconnect_back", &o.measured.reconnect_back)?;
    write_histogram(dir, "drain_back", &o.measured.drain_back)?;
    write_histogram(dir, "server_closes", &o.measured.server_closes)?;
    let tl = dir.join("timeline.csv");
    timeline::write_csv(create(&tl)?, &o.rows)
        .map_err(|e| format!("cannot write {}: {e}", tl.display()))?;

    let figures = summary::figures(o, target, server_measured);
    summary_json.insert("figures".into(), figures.clone());
    let js = dir.join("summary.json");
    let text = serde_json::to_string_pretty(&Value::Object(summary_json))
        .map_err(|e| format!("cannot encode the summary: {e}"))?;
    std::fs::write(&js, text + "\n").map_err(|e| format!("cannot write {}: {e}", js.display()))?;
    let md = summary::markdown(&figures, command, &dir.display().to_string());
    let mdp = dir.join("summary.md");
    std::fs::write(&mdp, &md).map_err(|e| format!("cannot write {}: {e}", mdp.display()))?;

    plots::connect_rate(&dir.join("connect_rate.svg"), &o.rows, target)?;
    plots::connect_latency(&dir.join("connect_latency.svg"), &o.measured.connect)?;
    plots::expiry(&dir.join("expiry.svg"), &o.rows, &o.measured.expiry_lag)?;
    Ok((figures, md))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps_are_civil_dates() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_795_671_234), "20261126T053354Z");
    }
}
