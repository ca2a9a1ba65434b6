//! Latency histograms on disk, in HdrHistogram's own formats so its tools
//! read them: the `.hgrm` percentile text (what Java's
//! `outputPercentileDistribution` and HistogramLogProcessor print, and what
//! the online HdrHistogram plotter accepts) for people, and the V2 binary
//! form for merging runs and workers without losing resolution.
//!
//! Histograms hold microseconds; the `.hgrm` text shows milliseconds.

use std::io::{self, Write};

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;

/// Longest value tracked: one hour, in microseconds.
const HIGHEST_US: u64 = 3_600_000_000;
/// Microseconds per millisecond: the `.hgrm` output value unit scaling ratio.
const US_PER_MS: f64 = 1000.0;
/// Percentile ticks per half distance to 100%, as HdrHistogram's tools use.
const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// A histogram for latencies in microseconds, 1 µs to one hour, with 3
/// significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // Cannot fail: the bounds are constants that satisfy every check
    // (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("constant histogram bounds are valid")
}

/// Records `us`, clamped into the histogram's range (a value past an hour
/// counts as an hour; 0 counts as 1).
pub fn record(h: &mut Histogram<u64>, us: u64) {
    // Clamped here because 0 would otherwise land below the 1 µs floor;
    // past the top, saturating_record would clamp too. Either way one absurd
    // sample (a clock jump) cannot abort a run.
    h.saturating_record(us.clamp(1, h.high()));
}

/// HdrHistogram's percentile-distribution text (the .hgrm format
/// HdrHistogram's online plotter and Java's HistogramLogProcessor print),
/// values in milliseconds (output value unit scaling ratio 1000), 5
/// percentile ticks per half distance.
pub fn write_percentiles(mut out: impl Write, h: &Histogram<u64>) -> io::Result<()> {
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    for (value_us, percentile, count) in java_percentile_ticks(h, TICKS_PER_HALF_DISTANCE) {
        let value = java_fixed(value_us as f64 / US_PER_MS, 3);
        let q = percentile / 100.0;
        if percentile < 100.0 {
            let inverse = java_fixed(1.0 / (1.0 - q), 2);
            writeln!(
                out,
                "{value:>12} {} {count:10} {inverse:>14}",
                java_fixed(q, 12)
            )?;
        } else {
            writeln!(out, "{value:>12} {} {count:10}", java_fixed(q, 12))?;
        }
    }
    writeln!(
        out,
        "#[Mean    = {:>12}, StdDeviation   = {:>12}]",
        java_fixed(h.mean() / US_PER_MS, 3),
        java_fixed(h.stdev() / US_PER_MS, 3)
    )?;
    writeln!(
        out,
        "#[Max     = {:>12}, Total count    = {:12}]",
        java_fixed(h.max() as f64 / US_PER_MS, 3),
        h.len()
    )?;
    writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_bucket_count(h)
    )?;
    out.flush()
}

/// The rows of Java's `PercentileIterator`: (value, percentile in percent,
/// running total count).
///
/// This is a port rather than `Histogram::iter_quantiles` because the Rust
/// iterator steps in quantiles (0.1 + 0.1 + 0.1 > 0.3) where Java steps in
/// percent (10 + 10 + 10 == 30), so at exact tick boundaries it lands one
/// bucket later than Java and the rows differ from what Java prints for the
/// same histogram.
fn java_percentile_ticks(h: &Histogram<u64>, ticks_per_half_distance: u32) -> Vec<(u64, f64, u64)> {
    let total = h.len();
    let mut rows = Vec::new();
    let mut level = 0.0_f64; // percent to iterate to
    let mut running = 0u64;
    let mut value = 0u64;
    for v in h.iter_recorded() {
        running += v.count_at_value();
        value = v.value_iterated_to();
        let current = 100.0 * running as f64 / total as f64;
        while current >= level {
            rows.push((value, level, running));
            // Java's iterator ends once the running total reaches the
            // total count, before stepping the level again.
            if running >= total {
                break;
            }
            // Fixed-size ticks within each half distance to 100%; Java
            // computes log2 as ln(x) / ln(2), so do the same.
            let halvings = ((100.0 / (100.0 - level)).ln() / 2f64.ln()) as u32;
            let ticks = u64::from(ticks_per_half_distance) << (halvings + 1).min(62);
            let next = level + 100.0 / ticks as f64;
            if next <= level {
                break; // ticks below f64 resolution: stop rather than loop forever
            }
            level = next;
        }
    }
    if total > 0 {
        rows.push((value, 100.0, total));
    }
    rows
}

/// `x` with `decimals` places the way Java's `%.Nf` writes it: Java rounds
/// the shortest decimal that reads back as `x` half-up, where Rust rounds
/// the exact binary value (0.9997802734375 is 0.999780273438 in Java but
/// ...437 in Rust). Only non-negative values need this; others fall back
/// to Rust's rounding.
fn java_fixed(x: f64, decimals: usize) -> String {
    let shortest = x.to_string(); // Rust's Display never uses exponent form
    let (int, frac) = shortest.split_once('.').unwrap_or((&shortest, ""));
    if frac.len() <= decimals || !x.is_finite() || x < 0.0 {
        // Short enough to need no rounding (or a value Java never sees here).
        return format!("{x:.decimals$}");
    }
    let mut digits: Vec<u8> = int.bytes().chain(frac.bytes().take(decimals)).collect();
    if frac.as_bytes()[decimals] >= b'5' {
        let mut i = digits.len();
        loop {
            if i == 0 {
                digits.insert(0, b'1');
                break;
            }
            i -= 1;
            if digits[i] == b'9' {
                digits[i] = b'0';
            } else {
                digits[i] += 1;
                break;
            }
        }
    }
    let point = digits.len() - decimals;
    let (int, frac) = digits.split_at(point);
    let int = String::from_utf8_lossy(int);
    let frac = String::from_utf8_lossy(frac);
    if decimals == 0 {
        int.into_owned()
    } else {
        format!("{int}.{frac}")
    }
}

/// Java prints `subBucketCount`, which the Rust crate keeps private. The
/// counts array holds `(buckets + 1) * subBucketCount / 2` slots, so it
/// follows from the public read-outs exactly.
fn sub_bucket_count(h: &Histogram<u64>) -> usize {
    2 * h.distinct_values() / (usize::from(h.buckets()) + 1)
}

/// The histogram in HdrHistogram's V2 serialized form (uncompressed
/// V2Serializer), for merging runs and workers.
pub fn write_v2(mut out: impl Write, h: &Histogram<u64>) -> Result<(), String> {
    V2Serializer::new()
        .serialize(h, &mut out)
        .map_err(|e| format!("histogram V2 serialize: {e}"))?;
    out.flush()
        .map_err(|e| format!("histogram V2 serialize: {e}"))
}

/// Reads what [`write_v2`] wrote (any V2 histogram, compressed or not).
pub fn read_v2(mut input: impl io::Read) -> Result<Histogram<u64>, String> {
    Deserializer::new()
        .deserialize(&mut input)
        .map_err(|e| format!("histogram V2 deserialize: {e}"))
}

/// One `.hgrm` row: (value in ms, percentile as a fraction, running total count).
pub type PercentileRow = (f64, f64, u64);

/// Parses the text of write_percentiles back into (value_ms, percentile,
/// total_count) rows plus the footer's total count (used by tests and by
/// whoever checks results).
pub fn read_percentiles(text: &str) -> Result<(Vec<PercentileRow>, u64), String> {
    let mut rows = Vec::new();
    let mut total = None;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with("Value") {
            continue;
        }
        if let Some(footer) = trimmed.strip_prefix("#[") {
            if let Some((_, count)) = footer.split_once("Total count") {
                let count = count.trim_start_matches([' ', '=']).trim_end_matches(']');
                total = Some(count.trim().parse::<u64>().map_err(|_| {
                    format!("hgrm line {line_no}: total count {count:?} is not a count")
                })?);
            }
            continue;
        }
        let f: Vec<&str> = trimmed.split_whitespace().collect();
        if !(3..=4).contains(&f.len()) {
            return Err(format!(
                "hgrm line {line_no}: {} fields, expected 3 or 4",
                f.len()
            ));
        }
        let num = |j: usize| {
            f[j].parse::<f64>()
                .map_err(|_| format!("hgrm line {line_no}: field {} is not a number", j + 1))
        };
        let count = f[2]
            .parse::<u64>()
            .map_err(|_| format!("hgrm line {line_no}: field 3 is not a count"))?;
        rows.push((num(0)?, num(1)?, count));
    }
    let total = total.ok_or("hgrm: no \"Total count\" footer")?;
    Ok((rows, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1..=100 ms, one sample each.
    fn known() -> Histogram<u64> {
        let mut h = new_histogram();
        for ms in 1..=100 {
            record(&mut h, ms * 1000);
        }
        h
    }

    fn percentiles_text(h: &Histogram<u64>) -> String {
        let mut out = Vec::new();
        write_percentiles(&mut out, h).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn percentiles_parse_back_with_total_and_max() {
        let h = known();
        let text = percentiles_text(&h);
        let (rows, total) = read_percentiles(&text).unwrap();
        assert_eq!(total, 100);
        let &(max_ms, p, count) = rows.last().unwrap();
        assert_eq!(p, 1.0);
        assert_eq!(count, 100);
        assert!((max_ms - h.max() as f64 / 1000.0).abs() < 0.001);
        assert!((99.9..=100.1).contains(&max_ms));
        // Percentiles and running totals never go down.
        assert!(rows
            .windows(2)
            .all(|w| w[0].1 <= w[1].1 && w[0].2 <= w[1].2));
    }

    /// What Java HdrHistogram 2.2.2 prints for [`known`] with
    /// `outputPercentileDistribution(System.out, 5, 1000.0)`.
    // A raw string so the leading spaces of each line stay in the fixture.
    const JAVA_KNOWN: &str = r"       Value     Percentile TotalCount 1/(1-Percentile)

       1.000 0.000000000000          1           1.00
      10.007 0.100000000000         10           1.11
      20.015 0.200000000000         20           1.25
      30.015 0.300000000000         30           1.43
      40.031 0.400000000000         40           1.67
      50.015 0.500000000000         50           2.00
      55.007 0.550000000000         55           2.22
      60.031 0.600000000000         60           2.50
      65.023 0.650000000000         65           2.86
      70.015 0.700000000000         70           3.33
      75.007 0.750000000000         75           4.00
      78.015 0.775000000000         78           4.44
      80.063 0.800000000000         80           5.00
      83.007 0.825000000000         83           5.71
      85.055 0.850000000000         85           6.67
      88.063 0.875000000000         88           8.00
      89.023 0.887500000000         89           8.89
      90.047 0.900000000000         90          10.00
      92.031 0.912500000000         92          11.43
      93.055 0.925000000000         93          13.33
      94.015 0.937500000000         94          16.00
      95.039 0.943750000000         95          17.78
      95.039 0.950000000000         95          20.00
      96.063 0.956250000000         96          22.86
      97.023 0.962500000000         97          26.67
      97.023 0.968750000000         97          32.00
      98.047 0.971875000000         98          35.56
      98.047 0.975000000000         98          40.00
      98.047 0.978125000000         98          45.71
      99.007 0.981250000000         99          53.33
      99.007 0.984375000000         99          64.00
      99.007 0.985937500000         99          71.11
      99.007 0.987500000000         99          80.00
      99.007 0.989062500000         99          91.43
     100.031 0.990625000000        100         106.67
     100.031 1.000000000000        100
#[Mean    =       50.504, StdDeviation   =       28.866]
#[Max     =      100.031, Total count    =          100]
#[Buckets =           22, SubBuckets     =         2048]
";

    #[test]
    fn percentiles_match_java_byte_for_byte() {
        assert_eq!(percentiles_text(&known()), JAVA_KNOWN);
    }

    #[test]
    fn java_fixed_rounds_the_shortest_decimal_half_up() {
        assert_eq!(java_fixed(0.9997802734375, 12), "0.999780273438");
        assert_eq!(java_fixed(9.9996, 3), "10.000");
        assert_eq!(java_fixed(0.0, 3), "0.000");
        assert_eq!(java_fixed(1.25, 3), "1.250");
        assert_eq!(java_fixed(106.666_666_666, 2), "106.67");
    }

    #[test]
    fn v2_round_trip_equals_original() {
        let h = known();
        let mut bytes = Vec::new();
        write_v2(&mut bytes, &h).unwrap();
        let back = read_v2(bytes.as_slice()).unwrap();
        assert_eq!(back.len(), h.len());
        assert_eq!(back.max(), h.max());
        for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
            assert_eq!(back.value_at_quantile(q), h.value_at_quantile(q));
        }
        assert_eq!(back, h);
        assert!(read_v2(&b"junk"[..]).is_err());
    }

    #[test]
    fn record_clamps() {
        let mut h = new_histogram();
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
        assert_eq!(h.count_at(1), 1);
        assert_eq!(h.count_at(0), 0);
        assert!(h.equivalent(h.max(), HIGHEST_US));
    }

    #[test]
    fn empty_histogram_writes_header_and_zero_footer() {
        let h = new_histogram();
        let text = percentiles_text(&h);
        let (rows, total) = read_percentiles(&text).unwrap();
        assert!(rows.is_empty());
        assert_eq!(total, 0);
        assert!(text.contains("#[Mean    =        0.000, StdDeviation   =        0.000]"));
        assert!(text.contains("#[Max     =        0.000, Total count    =            0]"));
        let mut bytes = Vec::new();
        write_v2(&mut bytes, &h).unwrap();
        assert!(read_v2(bytes.as_slice()).unwrap().is_empty());
    }

    #[test]
    fn read_percentiles_rejects_garbage() {
        assert!(read_percentiles("").is_err());
        assert!(read_percentiles("1.0 x 3 4.0\n#[Max = 1, Total count = 1]\n").is_err());
    }
}
