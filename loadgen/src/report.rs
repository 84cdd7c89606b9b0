//! Output of a run: the final human table (stdout), `--json`, `--hgrm` and `--plot` files.
//!
//! Owns: formatting and file writing. Must not touch: measurement (it only reads reports).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::connect::ConnectReport;
use crate::pubsub::PubsubReport;
use crate::stats::{Lat, Summary};

pub fn write_json(path: &Path, v: &impl Serialize) -> Result<(), String> {
    let s = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    std::fs::write(path, s + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

pub fn write_hgrm(dir: &Path, name: &str, h: &Lat) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let p = dir.join(format!("{name}.hgrm"));
    std::fs::write(&p, h.hgrm()).map_err(|e| format!("{}: {e}", p.display()))
}

fn lat_row(out: &mut String, name: &str, s: &Summary) {
    let _ = writeln!(
        out,
        "  {:<14} {:>10} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1}",
        name, s.count, s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.mean_us, s.max_us
    );
}

fn lat_header(out: &mut String) {
    let _ = writeln!(
        out,
        "  {:<14} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "latency (µs)", "count", "p50", "p90", "p99", "p99.9", "mean", "max"
    );
}

pub fn pubsub_table(r: &PubsubReport) -> String {
    let p = &r.plan;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "pubsub {:?}: {} publishers → {} subscribers, QoS {}, {} B payload, MQTT {}{}, {}, {}",
        p.mode,
        p.publishers,
        p.subscribers,
        p.qos,
        p.payload,
        r.mqtt,
        if r.tls { " over TLS" } else { "" },
        if p.rate > 0.0 {
            format!("open loop at {:.0} msg/s", p.rate)
        } else if p.e2e_window() {
            format!(
                "closed loop (≤ {} undelivered per publisher, end to end)",
                p.inflight
            )
        } else if p.qos == 0 {
            "closed loop (bounded by TCP only)".to_string()
        } else {
            format!("closed loop (in-flight ≤ {})", p.inflight)
        },
        r.write_mode.label()
    );
    let _ = writeln!(
        o,
        "  measured {:.3}s after {:.1}s warm-up",
        r.measured_seconds,
        p.warmup_ns as f64 / 1e9
    );
    let _ = writeln!(
        o,
        "  throughput    sent {:>12.0} msg/s   received {:>12.0} msg/s",
        r.send_rate, r.recv_rate
    );
    let _ = writeln!(
        o,
        "  whole run     sent {:>12}   expected {:>12}   received {:>12}",
        r.sent, r.expected, r.received
    );
    let _ = writeln!(
        o,
        "  integrity     lost {:>12}   duplicates {:>10}   reordered {:>11}   (lost = not received by the end of the drain)",
        r.lost, r.duplicates, r.reordered
    );
    lat_header(&mut o);
    lat_row(&mut o, "end-to-end", &r.latency);
    let _ = writeln!(
        o,
        "  loadgen CPU   {:.2}s total; busy per core: {}; waited for a CPU: {}",
        r.loadgen_cpu_seconds,
        r.loadgen_cpu_busy
            .iter()
            .map(|b| format!("{:.0}%", b * 100.0))
            .collect::<Vec<_>>()
            .join(", "),
        r.loadgen_runqueue_wait
            .iter()
            .map(|b| format!("{:.0}%", b * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        o,
        "  loadgen CPU per delivered message: {:.2} µs",
        r.loadgen_cpu_us_per_msg
    );
    if let (Some(b), Some(m)) = (r.broker_cpu_seconds, r.broker_cpu_s_per_million) {
        let _ = writeln!(
            o,
            "  broker CPU    {b:.2}s: {m:.2} CPU-s per million delivered messages ({:.2} µs/msg); waited for a CPU: {:.0}%",
            m,
            r.broker_runqueue_wait.unwrap_or(0.0) * 100.0
        );
    }
    if let (Some(b), Some(m)) = (
        r.broker_cpu_window_seconds,
        r.broker_cpu_window_s_per_million,
    ) {
        let _ = writeln!(
            o,
            "  broker CPU    {b:.2}s in the measured window: {m:.2} µs per delivery of a message sent in it"
        );
    }
    for (e, n) in &r.errors {
        let _ = writeln!(o, "  error: {e} ×{n}");
    }
    for w in &r.warnings {
        let _ = writeln!(o, "  WARNING: {w}");
    }
    o
}

pub fn connect_table(r: &ConnectReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "connect: {} of {} connections up in {:.2}s → {:.0} handshakes/s (MQTT {}{}{})",
        r.succeeded,
        r.connections,
        r.open_seconds,
        r.handshakes_per_s,
        r.mqtt,
        if r.tls { ", TLS" } else { "" },
        if r.tls {
            format!(", {} resumed", r.resumed)
        } else {
            String::new()
        }
    );
    lat_header(&mut o);
    lat_row(&mut o, "tcp connect", &r.tcp_connect);
    if r.tls {
        lat_row(&mut o, "tls handshake", &r.tls_handshake);
    }
    lat_row(&mut o, "connack", &r.connack);
    lat_row(&mut o, "total", &r.total);
    if let Some(x) = r.broker_rss_per_conn {
        let _ = writeln!(
            o,
            "  broker RSS {} → {} KiB: {:.0} bytes per connection",
            r.broker_rss_before.unwrap_or(0) / 1024,
            r.broker_rss_after.unwrap_or(0) / 1024,
            x
        );
    }
    if let (Some(c), Some(m)) = (r.broker_cpu_seconds, r.broker_cpu_ms_per_handshake) {
        let _ = writeln!(o, "  broker CPU {c:.3}s: {m:.3} ms per handshake");
    }
    let _ = writeln!(
        o,
        "  failures {}{}",
        r.failed,
        if r.failed > 0 { ":" } else { "" }
    );
    for (e, n) in &r.failures {
        let _ = writeln!(o, "    {e} ×{n}");
    }
    for w in &r.warnings {
        let _ = writeln!(o, "  WARNING: {w}");
    }
    o
}

/// Percentile chart: x is log10(1/(1-p)) so the tail gets room, labelled as percentiles.
pub fn plot_percentiles(path: &Path, title: &str, series: &[(&str, &Lat)]) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let curves: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, h)| {
            let pts = h
                .percentile_curve()
                .into_iter()
                .map(|(p, v)| {
                    let q = (p / 100.0).min(0.999_999);
                    ((1.0 / (1.0 - q)).log10(), v)
                })
                .collect();
            (*n, pts)
        })
        .filter(|(_, p): &(&str, Vec<_>)| !p.is_empty())
        .collect();
    let xmax = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .fold(2.0f64, f64::max);
    let ymax = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(1.0f64, f64::max)
        * 1.05;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax.ceil(), 0f64..ymax)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_labels(xmax.ceil() as usize + 1)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            format!("{}%", trim(p))
        })
        .draw()
        .map_err(|x| e(&x))?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, pts)) in curves.into_iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

/// As [`plot_percentiles`] with a logarithmic latency axis: for comparing brokers whose
/// latencies differ by orders of magnitude (a linear axis flattens the faster curve to zero).
pub fn plot_percentiles_log(
    path: &Path,
    title: &str,
    series: &[(&str, &Lat)],
) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let curves: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, h)| {
            let pts = h
                .percentile_curve()
                .into_iter()
                .map(|(p, v)| {
                    let q = (p / 100.0).min(0.999_999);
                    ((1.0 / (1.0 - q)).log10(), v.max(0.001))
                })
                .collect();
            (*n, pts)
        })
        .filter(|(_, p): &(&str, Vec<_>)| !p.is_empty())
        .collect();
    let xmax = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .fold(2.0f64, f64::max);
    let ys = || curves.iter().flat_map(|(_, p)| p.iter().map(|x| x.1));
    let ymax = ys().fold(1.0f64, f64::max) * 1.5;
    let ymin = ys().fold(ymax, f64::min) / 1.5;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax.ceil(), (ymin..ymax).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs, log scale)")
        .x_labels(xmax.ceil() as usize + 1)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            format!("{}%", trim(p))
        })
        .y_label_formatter(&|y| trim(*y))
        .draw()
        .map_err(|x| e(&x))?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, pts)) in curves.into_iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

fn trim(p: f64) -> String {
    let s = format!("{p:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Several series over time (x = seconds).
pub fn plot_time(
    path: &Path,
    title: &str,
    y_desc: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let xmax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .fold(1.0f64, f64::max);
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(1.0f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(y_desc)
        .draw()
        .map_err(|x| e(&x))?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

/// All files for a pubsub run.
pub fn pubsub_files(
    r: &PubsubReport,
    json: Option<&Path>,
    hgrm: Option<&Path>,
    plot: Option<&Path>,
) -> Result<(), String> {
    if let Some(p) = json {
        write_json(p, r)?;
    }
    if let Some(d) = hgrm {
        write_hgrm(d, "pubsub_latency", &r.lat_hist)?;
    }
    if let Some(d) = plot {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        plot_percentiles(
            &d.join("pubsub_latency_percentiles.svg"),
            "end-to-end latency by percentile (from intended send time)",
            &[("end-to-end", &r.lat_hist)],
        )?;
        let x = |f: fn(&crate::pubsub::Interval) -> f64| {
            r.intervals
                .iter()
                .map(|i| ((i.second + 1) as f64, f(i)))
                .collect::<Vec<_>>()
        };
        plot_time(
            &d.join("pubsub_rate.svg"),
            "messages per second",
            "msg/s",
            &[
                ("sent", x(|i| i.sent_per_s as f64)),
                ("received", x(|i| i.recv_per_s as f64)),
            ],
        )?;
        plot_time(
            &d.join("pubsub_latency_over_time.svg"),
            "latency per second",
            "µs",
            &[
                ("p50", x(|i| i.latency.p50_us)),
                ("p99", x(|i| i.latency.p99_us)),
                ("max", x(|i| i.latency.max_us)),
            ],
        )?;
    }
    Ok(())
}

/// Files for a fleet run: telemetry and connect latency distributions and chart.
pub fn fleet_files(
    r: &crate::fleet::FleetReport,
    hgrm: Option<&Path>,
    plot: Option<&Path>,
) -> Result<(), String> {
    if let Some(d) = hgrm {
        write_hgrm(d, "fleet_telemetry_latency", &r.lat_hist)?;
        write_hgrm(d, "fleet_connect_total", &r.connect_hist)?;
    }
    if let Some(d) = plot {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        plot_percentiles_log(
            &d.join("fleet_latency_percentiles.svg"),
            "fleet: telemetry end-to-end and connect latency by percentile",
            &[("telemetry", &r.lat_hist), ("connect", &r.connect_hist)],
        )?;
    }
    Ok(())
}

/// All files for a connect run.
pub fn connect_files(
    r: &ConnectReport,
    json: Option<&Path>,
    hgrm: Option<&Path>,
    plot: Option<&Path>,
) -> Result<(), String> {
    if let Some(p) = json {
        write_json(p, r)?;
    }
    if let Some(d) = hgrm {
        for (n, h) in &r.hists {
            if !h.is_empty() {
                write_hgrm(d, n, h)?;
            }
        }
    }
    if let Some(d) = plot {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        let series: Vec<(&str, &Lat)> = r
            .hists
            .iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(n, h)| (*n, h))
            .collect();
        plot_percentiles(
            &d.join("connect_latency_percentiles.svg"),
            "connection phases by percentile",
            &series,
        )?;
        let pts = r
            .intervals
            .iter()
            .map(|i| ((i.second + 1) as f64, i.connects_per_s as f64))
            .collect();
        plot_time(
            &d.join("connect_rate.svg"),
            "connections per second",
            "conn/s",
            &[("connected", pts)],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_charts_are_written_without_system_fonts() {
        let d = tempfile::tempdir().unwrap();
        let mut h = Lat::new();
        for i in 1..10_000u64 {
            h.record(i * 100);
        }
        let p = d.path().join("p.svg");
        plot_percentiles(&p, "t", &[("x", &h)]).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..50.min(svg.len())]);
        assert!(svg.contains("99%"), "percentile axis labels present");
        let q = d.path().join("t.svg");
        plot_time(&q, "t", "msg/s", &[("a", vec![(1.0, 5.0), (2.0, 7.0)])]).unwrap();
        assert!(std::fs::read_to_string(&q).unwrap().contains("<polyline"));
    }

    #[test]
    fn log_chart_shows_both_curves_three_decades_apart() {
        let d = tempfile::tempdir().unwrap();
        let (mut fast, mut slow) = (Lat::new(), Lat::new());
        for i in 1..1_000u64 {
            fast.record(10_000 + i); // ~10 µs
            slow.record(10_000_000 + i * 1000); // ~10 ms
        }
        let p = d.path().join("l.svg");
        plot_percentiles_log(&p, "t", &[("fast", &fast), ("slow", &slow)]).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.contains("log scale"));
        // A log axis spans the decades from ~10 µs to ~10 ms; both series are in the legend.
        for label in [
            ">\n10\n<",
            ">\n100\n<",
            ">\n1000\n<",
            ">\n10000\n<",
            "fast",
            "slow",
        ] {
            assert!(svg.contains(label), "missing {label:?}");
        }
    }
}
