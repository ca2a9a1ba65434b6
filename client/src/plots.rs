//! SVG plots of a run, drawn with plotters' SVG backend so the report needs
//! no image tools and no font files (the backend writes `<text>` elements and
//! the viewer renders them).
//!
//! Percentile curves use HdrHistogram's log-percentile x axis: x is
//! log10(1/(1-p)), so 90%, 99%, 99.9% ... are evenly spaced and the tail,
//! where the interesting latencies live, gets most of the width.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::coord::Shift;
use plotters::drawing::{DrawingArea, DrawingAreaErrorKind, IntoDrawingArea};
use plotters::element::PathElement;
use plotters::prelude::{ChartBuilder, LineSeries, SVGBackend};
use plotters::style::{Color, RGBColor, BLACK, BLUE, RED, WHITE};

use crate::timeline::Row;

const SIZE: (u32, u32) = (900, 500);
const EXPIRY_SIZE: (u32, u32) = (900, 800);
const GREEN: RGBColor = RGBColor(0, 140, 60);
const GRAY: RGBColor = RGBColor(150, 150, 150);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// Established connections and connections/s over time (two series;
/// established on the left axis, conn/s on a right secondary axis).
pub fn connect_rate(path: &Path, rows: &[Row], target: u64) -> Result<(), String> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    draw_connect_rate(&root, rows, target)
        .and_then(|()| root.present())
        .map_err(|e| failed(path, e))
}

fn draw_connect_rate(root: &Area, rows: &[Row], target: u64) -> DrawResult {
    root.fill(&WHITE)?;
    let t_end = time_end(rows);
    let established_max = rows.iter().map(|r| r.established).max().unwrap_or(0);
    let rate_max = rows.iter().map(|r| r.connects_per_s).max().unwrap_or(0);
    let caption = if rows.is_empty() {
        "Connections: no data".to_string()
    } else {
        format!("Connections: {established_max} of {target} established, peak {rate_max} conn/s")
    };
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d(0.0..t_end, 0.0..headroom(established_max.max(target)))?
        .set_secondary_coord(0.0..t_end, 0.0..headroom(rate_max));
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("established")
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("connections/s")
        .draw()?;

    if target > 0 {
        chart
            .draw_series(LineSeries::new(
                [(0.0, target as f64), (t_end, target as f64)],
                GRAY,
            ))?
            .label("target")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GRAY));
    }
    chart
        .draw_series(LineSeries::new(
            rows.iter().map(|r| (r.t_s, r.established as f64)),
            BLUE.stroke_width(2),
        ))?
        .label("established (left)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    chart
        .draw_secondary_series(LineSeries::new(
            rows.iter().map(|r| (r.t_s, r.connects_per_s as f64)),
            GREEN,
        ))?
        .label("connections/s (right)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
}

/// Connect latency percentile curve: x = percentile on HdrHistogram's log
/// scale (plot against log10(1/(1-p)) with tick labels like 0%, 90%, 99%,
/// 99.9%, 99.99%), y = latency in ms. Title includes p50/p99/max.
pub fn connect_latency(path: &Path, connect: &Histogram<u64>) -> Result<(), String> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)
        .and_then(|()| percentile_curve(&root, "Connect latency", "latency (ms)", connect))
        .and_then(|()| root.present())
        .map_err(|e| failed(path, e))
}

/// Two panels stacked in one SVG: top = expiries/s (and false expiries/s in
/// red if any) over time; bottom = expiry-lag percentile curve (ms, same
/// log-percentile x axis; lag values are microseconds in the histogram).
pub fn expiry(path: &Path, rows: &[Row], lag: &Histogram<u64>) -> Result<(), String> {
    let root = SVGBackend::new(path, EXPIRY_SIZE).into_drawing_area();
    let (top, bottom) = root.split_vertically(EXPIRY_SIZE.1 / 2);
    root.fill(&WHITE)
        .and_then(|()| draw_expiry_rate(&top, rows))
        .and_then(|()| percentile_curve(&bottom, "Expiry lag", "lag (ms)", lag))
        .and_then(|()| root.present())
        .map_err(|e| failed(path, e))
}

fn draw_expiry_rate(area: &Area, rows: &[Row]) -> DrawResult {
    let t_end = time_end(rows);
    let expiries: u64 = rows.iter().map(|r| r.expiries_per_s).sum();
    let false_expiries: u64 = rows.iter().map(|r| r.false_expiries_per_s).sum();
    let rate_max = rows
        .iter()
        .map(|r| r.expiries_per_s.max(r.false_expiries_per_s))
        .max()
        .unwrap_or(0);
    let caption = if rows.is_empty() {
        "Expiries: no data".to_string()
    } else {
        format!("Expiries: {expiries} total, {false_expiries} false (heartbeating)")
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_end, 0.0..headroom(rate_max))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("expiries/s")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            rows.iter().map(|r| (r.t_s, r.expiries_per_s as f64)),
            BLUE.stroke_width(2),
        ))?
        .label("expiries/s")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    // Only drawn when it happened, so a red line always means a bug.
    if false_expiries > 0 {
        chart
            .draw_series(LineSeries::new(
                rows.iter().map(|r| (r.t_s, r.false_expiries_per_s as f64)),
                RED.stroke_width(2),
            ))?
            .label("false expiries/s")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
}

/// Draws a microsecond histogram as latency (ms) against log-percentile.
/// Shared by the connect-latency and expiry-lag plots.
fn percentile_curve(area: &Area, title: &str, y_desc: &str, h: &Histogram<u64>) -> DrawResult {
    let points = percentile_points(h);
    let caption = if h.is_empty() {
        format!("{title}: no data")
    } else {
        format!(
            "{title}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (n = {})",
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
            h.len()
        )
    };
    // Whole decades, at least to 99%, so the tick labels are round numbers.
    let x_end = points.iter().map(|p| p.0).fold(2.0, f64::max).ceil();
    let y_end = headroom_f(points.iter().map(|p| p.1).fold(0.0, f64::max));

    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 22))
        .margin(10)
        .margin_right(40) // room for the last tick label, e.g. "99.9999%"
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_end, 0.0..y_end)?;
    chart
        .configure_mesh()
        // One label per decade: plotters' step-1 key points on 0..x_end.
        .x_labels(x_end as usize + 1)
        .x_desc("percentile")
        .y_desc(y_desc)
        .x_label_formatter(&|x| percentile_label(*x))
        .draw()?;
    chart.draw_series(LineSeries::new(points, BLUE.stroke_width(2)))?;
    Ok(())
}

/// (log10(1/(1-p)), ms) at HdrHistogram's usual 5 ticks per half distance.
fn percentile_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new(); // the quantile iterator divides by the count
    }
    let mut points: Vec<(f64, f64)> = Vec::new();
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let x = if q < 1.0 {
            (1.0 / (1.0 - q)).log10()
        } else {
            // p = 1 is infinitely far right; with n samples the max is
            // resolved at about p = 1 - 1/n, and the curve must not go back.
            let last = points.last().map_or(0.0, |p| p.0);
            (h.len() as f64).log10().max(last)
        };
        points.push((x, ms(v.value_iterated_to())));
    }
    points
}

/// Tick label for x = log10(1/(1-p)): 0 -> "0%", 1 -> "90%", 3 -> "99.9%".
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    // Decade d has d nines; the first two are before the decimal point.
    let prec = (x.ceil() - 2.0).max(0.0) as usize;
    format!("{p:.prec$}%")
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// End of the time axis; at least 1 s so an empty run still has an axis.
fn time_end(rows: &[Row]) -> f64 {
    rows.iter().map(|r| r.t_s).fold(1.0, f64::max)
}

/// Axis top with 10% headroom over `max`; at least 1 so ranges are never empty.
fn headroom(max: u64) -> f64 {
    headroom_f(max as f64)
}

fn headroom_f(max: f64) -> f64 {
    (max * 1.1).max(1.0)
}

fn failed(path: &Path, e: DrawingAreaErrorKind<std::io::Error>) -> String {
    format!("plot {}: {e}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh path in the temp dir, unique per test and process.
    fn temp_svg(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("c1m-plots-{}-{name}.svg", std::process::id()))
    }

    fn rows() -> Vec<Row> {
        (1..=30)
            .map(|t| Row {
                t_s: t as f64,
                established: (t * 100).min(2000),
                connects_per_s: if t <= 20 { 100 } else { 0 },
                expiries_per_s: if t > 10 { 50 } else { 0 },
                false_expiries_per_s: u64::from(t == 25),
                ..Row::default()
            })
            .collect()
    }

    fn latencies() -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for i in 1..=10_000u64 {
            h.record(i * i / 100 + 50).unwrap();
        }
        h
    }

    /// Reads the SVG back and removes it.
    fn take(path: &Path) -> String {
        let text = std::fs::read_to_string(path).unwrap();
        std::fs::remove_file(path).unwrap();
        assert!(text.starts_with("<svg"), "{}", &text[..text.len().min(80)]);
        text
    }

    fn has_line(svg: &str) -> bool {
        svg.contains("<path") || svg.contains("<polyline")
    }

    #[test]
    fn connect_rate_draws_lines() {
        let path = temp_svg("rate");
        connect_rate(&path, &rows(), 2000).unwrap();
        let svg = take(&path);
        assert!(has_line(&svg));
        assert!(svg.contains("<text"));
    }

    #[test]
    fn connect_latency_draws_curve_with_percentile_ticks() {
        let path = temp_svg("latency");
        connect_latency(&path, &latencies()).unwrap();
        let svg = take(&path);
        assert!(has_line(&svg));
        assert!(svg.contains("99.9%"));
        assert!(svg.contains("p99"));
    }

    #[test]
    fn expiry_draws_both_panels() {
        let path = temp_svg("expiry");
        expiry(&path, &rows(), &latencies()).unwrap();
        let svg = take(&path);
        assert!(has_line(&svg));
        assert!(svg.contains("false expiries/s"));
        assert!(svg.contains("Expiry lag"));
    }

    #[test]
    fn empty_inputs_draw_axes_and_say_no_data() {
        let empty = Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for (name, result) in [
            ("rate-empty", connect_rate(&temp_svg("rate-empty"), &[], 0)),
            (
                "latency-empty",
                connect_latency(&temp_svg("latency-empty"), &empty),
            ),
            (
                "expiry-empty",
                expiry(&temp_svg("expiry-empty"), &[], &empty),
            ),
        ] {
            result.unwrap();
            assert!(take(&temp_svg(name)).contains("no data"));
        }
    }

    #[test]
    fn unwritable_path_names_the_file() {
        let path = Path::new("/nonexistent-dir/x.svg");
        let err = connect_latency(path, &latencies()).unwrap_err();
        assert!(err.contains("/nonexistent-dir/x.svg"), "{err}");
    }

    #[test]
    fn percentile_labels() {
        let labels: Vec<String> = (0..5).map(|k| percentile_label(f64::from(k))).collect();
        assert_eq!(labels, ["0%", "90%", "99%", "99.9%", "99.99%"]);
    }
}
