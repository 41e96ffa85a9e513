//! SVG charts of a suite's results (plotters): throughput per system and
//! scenario, and latency percentiles per system.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::report::{typed, Suite};
use crate::stats::BenchResult;

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Stable colour per system, in order of first appearance.
fn color_of(systems: &[String], system: &str) -> RGBColor {
    let i = systems.iter().position(|s| s == system).unwrap_or(0);
    PALETTE[i % PALETTE.len()]
}

fn systems(rows: &[BenchResult]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in rows {
        if !out.contains(&r.system) {
            out.push(r.system.clone());
        }
    }
    out
}

fn label(r: &BenchResult) -> String {
    let mut s = format!("{}: {}", r.system, r.scenario);
    if r.durable_before_ack == Some(false) {
        s.push_str(" [not durable]");
    }
    s
}

/// Bars of one chart: each result with the value to plot.
type Bars = Vec<(BenchResult, f64)>;

/// Rows that go on the throughput chart: (records/s, MB/s).
pub fn throughput_rows(suite: &Suite) -> (Bars, Bars) {
    let mut rps = Vec::new();
    let mut mbps = Vec::new();
    for v in &suite.results {
        let r = typed(v);
        if r.records_per_sec > 0.0 && r.records > 0 && r.system != "disk" {
            rps.push((r.clone(), r.records_per_sec));
        }
        if r.mb_per_sec > 0.0 {
            mbps.push((r.clone(), r.mb_per_sec));
        }
    }
    (rps, mbps)
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// Horizontal log-scale bars, one per row, labelled with system and scenario.
fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    rows: &[(BenchResult, f64)],
    all_systems: &[String],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    if rows.is_empty() {
        return Ok(());
    }
    let max = rows.iter().map(|(_, v)| *v).fold(1.0, f64::max) * 3.0;
    let min = rows
        .iter()
        .map(|(_, v)| *v)
        .fold(f64::INFINITY, f64::min)
        .max(1e-3)
        / 3.0;
    let labels: Vec<String> = rows.iter().map(|(r, _)| label(r)).collect();
    let n = rows.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(560)
        .build_cartesian_2d((min..max).log_scale(), 0f64..n as f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|y| {
            // Label only bar centres (k + 0.5).
            let k = (y - 0.5).round();
            if (y - 0.5 - k).abs() < 1e-6 && k >= 0.0 {
                labels
                    .get(n.saturating_sub(1).saturating_sub(k as usize))
                    .cloned()
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc(unit)
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, (r, v))| {
            // Top-to-bottom in suite order.
            let y = (n - 1 - i) as f64;
            Rectangle::new(
                [(min, y + 0.15), (*v, y + 0.85)],
                color_of(all_systems, &r.system).filled(),
            )
        }))
        .map_err(err)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, (_, v))| {
            let y = (n - 1 - i) as f64 + 0.5;
            Text::new(
                format!(" {}", crate::report::thousands(*v)),
                (*v, y),
                ("sans-serif", 11),
            )
        }))
        .map_err(err)?;
    Ok(())
}

pub fn throughput_svg(suite: &Suite, path: &Path) -> Result<()> {
    let (rps, mbps) = throughput_rows(suite);
    let all: Vec<BenchResult> = suite.results.iter().map(typed).collect();
    let sys = systems(&all);
    let rows = rps.len().max(mbps.len()).max(1);
    let height = (160 + 24 * rows) as u32 * 2;
    let root = SVGBackend::new(path, (1600, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(height / 2);
    bars(
        &top,
        &format!("Throughput, records/s — {}", suite.date),
        "records/s (log)",
        &rps,
        &sys,
    )?;
    bars(
        &bottom,
        "Throughput, MB/s (payload; disk and loopback = physical limits)",
        "MB/s (log)",
        &mbps,
        &sys,
    )?;
    root.present().map_err(err)?;
    Ok(())
}

/// Rows with latency, as (label, [p50, p90, p99, p99.9, max]).
pub fn latency_rows(suite: &Suite) -> Vec<(BenchResult, [f64; 5])> {
    suite
        .results
        .iter()
        .map(typed)
        .filter_map(|r| {
            let l = r.latency_ms?;
            Some((r, [l.p50, l.p90, l.p99, l.p999, l.max]))
        })
        .filter(|(_, p)| p.iter().all(|x| x.is_finite() && *x > 0.0))
        .collect()
}

/// One panel per system (physical limits included), one line per scenario
/// across p50, p90, p99, p99.9 and max, on a log scale.
pub fn latency_svg(suite: &Suite, path: &Path) -> Result<()> {
    let rows = latency_rows(suite);
    let mut sys: Vec<String> = Vec::new();
    for (r, _) in &rows {
        if !sys.contains(&r.system) {
            sys.push(r.system.clone());
        }
    }
    let panel_h = |n: usize| (140 + 16 * n).max(340) as u32;
    let heights: Vec<u32> = sys
        .iter()
        .map(|s| panel_h(rows.iter().filter(|(r, _)| &r.system == s).count()))
        .collect();
    let total: u32 = heights.iter().sum::<u32>().max(200);
    let root = SVGBackend::new(path, (1500, total)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut rest = root.clone();
    for (system, h) in sys.iter().zip(&heights) {
        let (panel, below) = rest.split_vertically(*h);
        rest = below;
        let mine: Vec<&(BenchResult, [f64; 5])> =
            rows.iter().filter(|(r, _)| &r.system == system).collect();
        latency_panel(&panel, system, &suite.date, &mine)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn latency_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    system: &str,
    date: &str,
    rows: &[&(BenchResult, [f64; 5])],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let all = || rows.iter().flat_map(|(_, p)| p.iter().copied());
    let max = all().fold(1e-3, f64::max) * 2.0;
    let min = all().fold(f64::INFINITY, f64::min).max(1e-4) / 2.0;
    let names = ["p50", "p90", "p99", "p99.9", "max"];
    let (plot, legend) = area.split_horizontally(700);
    let mut chart = ChartBuilder::on(&plot)
        .caption(
            format!("{system}: latency percentiles, ms — {date}"),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.2f64..4.2f64, (min..max).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(5)
        .x_label_formatter(&|x| {
            let k = x.round();
            if (x - k).abs() < 1e-6 && k >= 0.0 {
                names
                    .get(k as usize)
                    .map(|s| (*s).to_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("ms (log)")
        .draw()
        .map_err(err)?;
    let legend_area = legend.margin(40, 10, 10, 10);
    for (i, (r, p)) in rows.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                p.iter().enumerate().map(|(k, v)| (k as f64, *v)),
                color.stroke_width(2),
            ))
            .map_err(err)?;
        chart
            .draw_series(
                p.iter()
                    .enumerate()
                    .map(|(k, v)| Circle::new((k as f64, *v), 3, color.filled())),
            )
            .map_err(err)?;
        let y = (i * 16) as i32;
        legend_area
            .draw(&Rectangle::new([(0, y + 3), (14, y + 13)], color.filled()))
            .map_err(err)?;
        let mut text = r.scenario.clone();
        if r.durable_before_ack == Some(false) {
            text.push_str(" [not durable]");
        }
        legend_area
            .draw(&Text::new(text, (20, y), ("sans-serif", 12)))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn suite() -> Suite {
        Suite {
            date: "2026-11-26".into(),
            meta: Default::default(),
            results: vec![
                json!({"system":"sluice","scenario":"produce 100 B","records":10,"records_per_sec":1000.0,
                       "mb_per_sec":0.1,"durable_before_ack":true,
                       "latency_ms":{"p50":1.0,"p90":2.0,"p99":3.0,"p999":4.0,"max":5.0,"mean":1.2}}),
                json!({"system":"disk","scenario":"seq write","records":8,"records_per_sec":8.0,
                       "mb_per_sec":300.0,"durable_before_ack":true}),
                json!({"system":"nats-jetstream","scenario":"lazy","records":10,"records_per_sec":50.0,
                       "mb_per_sec":0.005,"durable_before_ack":false,
                       "latency_ms":{"p50":0.5,"p90":0.6,"p99":0.7,"p999":0.8,"max":0.9,"mean":0.55}}),
            ],
        }
    }

    #[test]
    fn disk_rows_only_on_the_mb_chart() {
        let (rps, mbps) = throughput_rows(&suite());
        assert_eq!(rps.len(), 2);
        assert!(rps.iter().all(|(r, _)| r.system != "disk"));
        assert_eq!(mbps.len(), 3);
        assert_eq!(latency_rows(&suite()).len(), 2);
    }

    #[test]
    fn writes_svgs_with_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path().join("t.svg");
        let l = dir.path().join("l.svg");
        throughput_svg(&suite(), &t).expect("throughput chart");
        latency_svg(&suite(), &l).expect("latency chart");
        let t = std::fs::read_to_string(&t).expect("read");
        let l = std::fs::read_to_string(&l).expect("read");
        assert!(t.starts_with("<svg"), "{}", &t[..t.len().min(100)]);
        assert!(t.contains("sluice: produce 100 B"));
        assert!(t.contains("nats-jetstream: lazy [not durable]"));
        assert!(l.contains("p99.9"));
        // Latency panels are per system; the legend names the scenario.
        assert!(l.contains("sluice: latency percentiles"));
        assert!(l.contains("nats-jetstream: latency percentiles"));
        assert!(l.contains("lazy [not durable]"));
    }
}
