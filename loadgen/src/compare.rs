//! The `compare` subcommand: run the same scenario against several brokers, alternating
//! (A B, B A, A B …) so drift on a shared machine hits both, each broker pinned with
//! `taskset -c <broker-cpu>` while the loadgen runs on its own `--cores`, and write a markdown
//! report with absolute figures, medians and ratios against the first broker — including broker
//! CPU-seconds per million delivered messages, which does not depend on whether the loadgen
//! saturated.
//!
//! Owns: broker process lifecycle (generated mosquitto.conf-style config, start, wait for the
//! port, stop) and the report. Must not touch: the scenarios' measurement.

use std::fmt::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use crate::common::{parse_duration, WriteMode};
use crate::connect::{self, ConnectArgs};
use crate::fleet::{self, FleetArgs};
use crate::pubsub::{self, PubsubArgs};
use crate::report;
use crate::stats::Lat;

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// A broker: NAME=COMMAND. In COMMAND, {port} and {conf} are replaced by the port and a
    /// generated mosquitto.conf-style file (listener 127.0.0.1, persistence false,
    /// set_tcp_nodelay true, allow_anonymous true). Give it twice or more; the first is the
    /// baseline of the ratios. Example: --broker mosquitto='mosquitto -c {conf}'
    #[arg(long = "broker", required = true)]
    pub brokers: Vec<String>,
    /// Rounds; each round runs every broker once, alternating the order.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// CPU the brokers are pinned to (taskset -c).
    #[arg(long, default_value_t = 0)]
    pub broker_cpu: usize,
    /// Markdown report path.
    #[arg(long, default_value = "compare.md")]
    pub out: PathBuf,
    /// Also write all runs as JSON.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Server certificate for a TLS listener (the scenario's --cafile is the client CA).
    #[arg(long, requires = "server_key")]
    pub server_cert: Option<PathBuf>,
    #[arg(long, requires = "server_cert")]
    pub server_key: Option<PathBuf>,
    /// Require client certificates on the TLS listener.
    #[arg(long)]
    pub require_cert: bool,
    /// Pause between runs (lets sockets in TIME_WAIT and CPU frequency settle).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub pause: Duration,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    Pubsub(PubsubArgs),
    Connect(ConnectArgs),
    Fleet(FleetArgs),
}

impl Scenario {
    fn common(&self) -> &crate::common::CommonArgs {
        match self {
            Scenario::Pubsub(p) => &p.common,
            Scenario::Connect(c) => &c.common,
            Scenario::Fleet(f) => &f.common,
        }
    }
    /// How the scenario's clients hand packets to the kernel (None: connect only).
    fn write_mode(&self) -> Option<WriteMode> {
        match self {
            Scenario::Pubsub(p) => Some(p.load.write_mode),
            Scenario::Connect(_) => None,
            Scenario::Fleet(f) => Some(f.write_mode),
        }
    }
    fn figures(&self) -> &'static [&'static str] {
        match self {
            Scenario::Pubsub(_) => PUBSUB_FIGURES,
            Scenario::Connect(_) => CONNECT_FIGURES,
            Scenario::Fleet(_) => FLEET_FIGURES,
        }
    }
}

struct Broker {
    name: String,
    cmd: String,
}

struct Running {
    child: Child,
    pid: u32,
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Figures of a pubsub run, in display order (a failed run gets NaN for each).
const PUBSUB_FIGURES: &[&str] = &[
    "sent msg/s",
    "received msg/s",
    "p50 µs",
    "p90 µs",
    "p99 µs",
    "p99.9 µs",
    "max µs",
    "lost",
    "duplicates",
    "connection errors",
    "broker CPU-s per M msgs",
    "broker CPU-s per M msgs in window",
    "loadgen CPU-s per M msgs",
    "loadgen busy %",
    "broker peak RSS MiB",
    "broker waited for CPU %",
    "loadgen waited for CPU %",
];

/// Figures of a connect run, in display order.
const CONNECT_FIGURES: &[&str] = &[
    "handshakes/s",
    "succeeded",
    "failed",
    "resumed",
    "total p50 µs",
    "total p90 µs",
    "total p99 µs",
    "tls p99 µs",
    "connack p99 µs",
    "broker CPU-ms per handshake",
    "broker RSS bytes per conn",
    "loadgen busy %",
    "broker waited for CPU %",
    "loadgen waited for CPU %",
];

/// Figures of a fleet run, in display order.
const FLEET_FIGURES: &[&str] = &[
    "devices connected",
    "connect failures",
    "handshakes/s",
    "connect p50 µs",
    "connect p99 µs",
    "broker RSS bytes per device",
    "idle broker CPU %",
    "telemetry sent msg/s",
    "telemetry received msg/s",
    "broker CPU-s per M msgs",
    "p50 µs",
    "p99 µs",
    "p99.9 µs",
    "max µs",
    "command p99 µs",
    "lost",
    "duplicates",
    "commands lost",
    "connection errors",
    "loadgen busy %",
    "broker waited for CPU %",
    "loadgen waited for CPU %",
];

/// One run's figures: (metric, value), in display order.
struct Row {
    broker: String,
    round: u32,
    figures: Vec<(&'static str, f64)>,
    loadgen_bound: bool,
    warnings: Vec<String>,
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn write_conf(
    dir: &Path,
    port: u16,
    a: &CompareArgs,
    cafile: Option<&Path>,
) -> Result<PathBuf, String> {
    let mut c = String::new();
    let _ = writeln!(c, "# generated by midge-loadgen compare");
    let _ = writeln!(c, "per_listener_settings true");
    let _ = writeln!(c, "persistence false");
    // Fleet runs hold thousands of connections: no cap (mosquitto's default, said outright).
    let _ = writeln!(c, "max_connections -1");
    let _ = writeln!(c, "listener {port} 127.0.0.1");
    let _ = writeln!(c, "allow_anonymous true");
    let _ = writeln!(c, "set_tcp_nodelay true");
    if let (Some(ca), Some(cert), Some(key)) = (cafile, &a.server_cert, &a.server_key) {
        let _ = writeln!(c, "cafile {}", ca.display());
        let _ = writeln!(c, "certfile {}", cert.display());
        let _ = writeln!(c, "keyfile {}", key.display());
        if a.require_cert {
            let _ = writeln!(c, "require_certificate true");
        }
    }
    let p = dir.join(format!("broker-{port}.conf"));
    std::fs::write(&p, c).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(p)
}

fn start(b: &Broker, port: u16, conf: &Path, cpu: usize, log: &Path) -> Result<Running, String> {
    let cmd = b
        .cmd
        .replace("{port}", &port.to_string())
        .replace("{conf}", &conf.display().to_string());
    let logf = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let errf = logf.try_clone().map_err(|e| e.to_string())?;
    // taskset execs sh, which execs the broker: the child pid is the broker's pid.
    let child = Command::new("taskset")
        .args(["-c", &cpu.to_string(), "sh", "-c", &format!("exec {cmd}")])
        .stdin(Stdio::null())
        .stdout(logf)
        .stderr(errf)
        .spawn()
        .map_err(|e| format!("{}: cannot start `{cmd}` under taskset: {e}", b.name))?;
    let pid = child.id();
    let mut r = Running { child, pid };
    let t0 = Instant::now();
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(r);
        }
        if let Ok(Some(st)) = r.child.try_wait() {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!(
                "{} exited ({st}) before listening on {port}: {}",
                b.name,
                tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
            ));
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!("{} did not listen on {port} within 10 s", b.name));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn peak_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

pub fn run(a: &CompareArgs) -> Result<(), String> {
    if a.runs == 0 || a.runs > 50 {
        return Err("--runs must be 1..=50".into());
    }
    let brokers: Vec<Broker> = a
        .brokers
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(n, c)| Broker {
                    name: n.trim().to_string(),
                    cmd: c.trim().to_string(),
                })
                .ok_or_else(|| format!("--broker {s:?}: expected NAME=COMMAND"))
        })
        .collect::<Result<_, _>>()?;
    if brokers.len() < 2 {
        return Err("give at least two --broker NAME=COMMAND".into());
    }
    let dir = std::env::temp_dir().join(format!("midge-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // Remove the generated configs and logs however the run ends (errors included).
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let cafile = a.scenario.common().cafile.clone();
    // The brokers inherit this process's descriptor limit: as high as the hard limit allows,
    // so a broker can hold a fleet (mosquitto needs the raised ulimit besides
    // `max_connections -1`).
    let nofile = crate::limits::raise_nofile(u64::MAX);
    eprintln!(
        "compare: RLIMIT_NOFILE {} (hard {}) for the loadgen and the brokers",
        nofile.soft, nofile.hard
    );
    if cafile.is_some() && a.server_cert.is_none() {
        return Err(
            "TLS scenario: give --server-cert/--server-key for the brokers' listener".into(),
        );
    }
    let mut rows = Vec::new();
    let mut failed_runs = 0u32;
    // End-to-end (pubsub) or connect-total (connect) latency of every run, merged per broker.
    let mut hists: Vec<(String, Lat)> = Vec::new();
    for round in 0..a.runs {
        // Alternate the order each round so slow drift does not favour one broker.
        let mut order: Vec<&Broker> = brokers.iter().collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for b in order {
            let port = free_port()?;
            let conf = write_conf(&dir, port, a, cafile.as_deref())?;
            let log = dir.join(format!("{}-{round}.log", b.name));
            let mut running = start(b, port, &conf, a.broker_cpu, &log)?;
            eprintln!(
                "compare: round {} / {}: {} (pid {}) on CPU {}",
                round + 1,
                a.runs,
                b.name,
                running.pid,
                a.broker_cpu
            );
            let result = match &a.scenario {
                Scenario::Pubsub(p) => run_pubsub(p, port, &running),
                Scenario::Connect(x) => run_connect(x, port, &running),
                Scenario::Fleet(f) => run_fleet(f, port, &running),
            };
            // A broker that died during the run is the headline, not a footnote.
            let exited = running.child.try_wait().ok().flatten();
            let (figures, loadgen_bound, mut warnings, hist) = match result {
                Ok(r) => r,
                Err(e) => {
                    failed_runs += 1;
                    let names = a.scenario.figures();
                    let figs = names.iter().map(|n| (*n, f64::NAN)).collect();
                    (figs, false, vec![format!("RUN FAILED: {e}")], None)
                }
            };
            if let Some(st) = exited {
                failed_runs += 1;
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                warnings.push(format!(
                    "BROKER EXITED during the run ({st}); last log lines: {}",
                    tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                ));
            }
            if let Some(h) = hist {
                match hists.iter_mut().find(|(n, _)| *n == b.name) {
                    Some((_, m)) => m.merge(&h),
                    None => hists.push((b.name.clone(), h)),
                }
            }
            let row = Row {
                broker: b.name.clone(),
                round,
                figures,
                loadgen_bound,
                warnings,
            };
            drop(running);
            eprintln!(
                "compare:   {}",
                row.figures
                    .iter()
                    .take(4)
                    .map(|(k, v)| format!("{k} {v:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            rows.push(row);
            std::thread::sleep(a.pause);
        }
    }
    let md = markdown(a, &brokers, &rows);
    std::fs::write(&a.out, &md).map_err(|e| format!("{}: {e}", a.out.display()))?;
    if let Some(j) = &a.json_out {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let mut m = serde_json::Map::new();
                m.insert("broker".into(), r.broker.clone().into());
                m.insert("round".into(), r.round.into());
                m.insert("loadgen_bound".into(), r.loadgen_bound.into());
                m.insert(
                    "write_mode".into(),
                    serde_json::to_value(a.scenario.write_mode()).unwrap_or_default(),
                );
                for (k, v) in &r.figures {
                    m.insert((*k).into(), serde_json::json!(v));
                }
                serde_json::Value::Object(m)
            })
            .collect();
        crate::report::write_json(j, &v)?;
    }
    if let Some(d) = plot_dir(a) {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        let series: Vec<(&str, &Lat)> = hists.iter().map(|(n, h)| (n.as_str(), h)).collect();
        let (file, title) = match &a.scenario {
            Scenario::Pubsub(_) | Scenario::Fleet(_) => (
                "latency_percentiles.svg",
                "end-to-end latency by percentile, all runs merged",
            ),
            Scenario::Connect(_) => (
                "connect_percentiles.svg",
                "connect time (TCP + TLS + CONNACK) by percentile, all runs merged",
            ),
        };
        report::plot_percentiles_log(&d.join(file), title, &series)?;
    }
    print!("{md}");
    if failed_runs > 0 {
        return Err(format!(
            "{failed_runs} run(s) failed or lost their broker (see the report's warnings)"
        ));
    }
    Ok(())
}

/// The scenario's `--plot` directory: compare writes one chart there with every broker's
/// latency curve (all runs merged), instead of one chart set per run.
fn plot_dir(a: &CompareArgs) -> Option<&Path> {
    a.scenario.common().plot.as_deref()
}

type RunResult = (Vec<(&'static str, f64)>, bool, Vec<String>, Option<Lat>);

fn max_pct(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max) * 100.0
}

fn run_pubsub(p: &PubsubArgs, port: u16, running: &Running) -> Result<RunResult, String> {
    let mut p = p.clone();
    p.common.port = Some(port);
    p.common.quiet = true;
    p.common.json = None;
    p.common.hgrm = None;
    p.common.plot = None;
    p.load.broker_pid = Some(running.pid);
    let plan = p.load.plan()?;
    let c = p
        .common
        .validate((plan.publishers + plan.subscribers) as usize)?;
    let r = pubsub::run(&c, &plan)?;
    let errors: u64 = r.errors.values().sum();
    let vals = [
        r.send_rate,
        r.recv_rate,
        r.latency.p50_us,
        r.latency.p90_us,
        r.latency.p99_us,
        r.latency.p999_us,
        r.latency.max_us,
        r.lost as f64,
        r.duplicates as f64,
        errors as f64,
        r.broker_cpu_s_per_million.unwrap_or(f64::NAN),
        r.broker_cpu_window_s_per_million.unwrap_or(f64::NAN),
        // µs per message = s per million messages.
        r.loadgen_cpu_us_per_msg,
        max_pct(&r.loadgen_cpu_busy),
        peak_rss(running.pid).map_or(f64::NAN, |b| b as f64 / 1048576.0),
        r.broker_runqueue_wait.map_or(f64::NAN, |w| w * 100.0),
        max_pct(&r.loadgen_runqueue_wait),
    ];
    let mut warnings = r.warnings;
    let mut errs: Vec<_> = r.errors.iter().collect();
    errs.sort();
    for (e, n) in errs {
        warnings.push(format!("connection error ×{n}: {e}"));
    }
    Ok((
        PUBSUB_FIGURES.iter().copied().zip(vals).collect(),
        r.loadgen_cpu_busy.iter().any(|b| *b >= 0.9),
        warnings,
        Some(r.lat_hist),
    ))
}

fn run_connect(x: &ConnectArgs, port: u16, running: &Running) -> Result<RunResult, String> {
    let mut x = x.clone();
    x.common.port = Some(port);
    x.common.quiet = true;
    x.common.json = None;
    x.common.hgrm = None;
    x.common.plot = None;
    x.broker_pid = Some(running.pid);
    let c = x.common.validate(x.connections as usize)?;
    let r = connect::run(&c, &x)?;
    let vals = [
        r.handshakes_per_s,
        r.succeeded as f64,
        r.failed as f64,
        r.resumed as f64,
        r.total.p50_us,
        r.total.p90_us,
        r.total.p99_us,
        r.tls_handshake.p99_us,
        r.connack.p99_us,
        r.broker_cpu_ms_per_handshake.unwrap_or(f64::NAN),
        r.broker_rss_per_conn.unwrap_or(f64::NAN),
        max_pct(&r.loadgen_cpu_busy),
        r.broker_runqueue_wait.map_or(f64::NAN, |w| w * 100.0),
        max_pct(&r.loadgen_runqueue_wait),
    ];
    let mut warnings = r.warnings;
    let mut fails: Vec<_> = r.failures.iter().collect();
    fails.sort();
    for (e, n) in fails {
        warnings.push(format!("connection failed ×{n}: {e}"));
    }
    let total = r
        .hists
        .into_iter()
        .find(|(n, _)| *n == "connect_total")
        .map(|(_, h)| h);
    Ok((
        CONNECT_FIGURES.iter().copied().zip(vals).collect(),
        r.loadgen_cpu_busy.iter().any(|b| *b >= 0.9),
        warnings,
        total,
    ))
}

fn run_fleet(f: &FleetArgs, port: u16, running: &Running) -> Result<RunResult, String> {
    let mut f = f.clone();
    f.common.port = Some(port);
    f.common.quiet = true;
    f.common.json = None;
    f.common.hgrm = None;
    f.common.plot = None;
    f.broker_pid = Some(running.pid);
    let r = fleet::run(&f)?;
    let errors: u64 = r.errors.values().sum();
    let nan = f64::NAN;
    let vals = [
        r.connected as f64,
        r.failed as f64,
        r.handshakes_per_s,
        r.connect_total.p50_us,
        r.connect_total.p99_us,
        r.broker_rss_per_device.unwrap_or(nan),
        r.idle_broker_cpu_percent.unwrap_or(nan),
        r.tel_send_rate,
        r.tel_recv_rate,
        // µs per message = CPU-s per million messages.
        r.broker_cpu_us_per_msg.unwrap_or(nan),
        r.latency.p50_us,
        r.latency.p99_us,
        r.latency.p999_us,
        r.latency.max_us,
        r.cmd_latency.p99_us,
        r.tel_lost as f64,
        r.tel_duplicates as f64,
        r.cmd_lost as f64,
        errors as f64,
        max_pct(&r.loadgen_cpu_busy),
        r.broker_runqueue_wait.map_or(nan, |w| w * 100.0),
        max_pct(&r.loadgen_runqueue_wait),
    ];
    let mut warnings = r.warnings;
    let mut fails: Vec<_> = r.failures.iter().collect();
    fails.sort();
    for (e, n) in fails {
        warnings.push(format!("connect failed ×{n}: {e}"));
    }
    let mut errs: Vec<_> = r.errors.iter().collect();
    errs.sort();
    for (e, n) in errs {
        warnings.push(format!("connection error ×{n}: {e}"));
    }
    Ok((
        FLEET_FIGURES.iter().copied().zip(vals).collect(),
        r.loadgen_cpu_busy.iter().any(|b| *b >= 0.9),
        warnings,
        Some(r.lat_hist),
    ))
}

fn shell_quote(a: &str) -> String {
    let plain = !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn markdown(a: &CompareArgs, brokers: &[Broker], rows: &[Row]) -> String {
    let mut o = String::new();
    // Quoted so the command can be pasted back into a shell.
    let args: Vec<String> = std::env::args().map(|a| shell_quote(&a)).collect();
    let _ = writeln!(o, "# Broker comparison\n");
    let _ = writeln!(o, "Command: `{}`\n", args.join(" "));
    let uname = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(
        o,
        "Machine: {} CPUs, Linux {}. Brokers pinned to CPU {} (`taskset`); loadgen on its `--cores`. {} rounds, order alternated each round.\n",
        // Not available_parallelism: that honours this process's own taskset mask.
        // SAFETY: sysconf has no preconditions.
        unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) },
        uname.trim(),
        a.broker_cpu,
        a.runs
    );
    let _ = writeln!(
        o,
        "Client writes: {}.\n",
        match a.scenario.write_mode() {
            Some(WriteMode::PerPacket) => "**per-packet** (one write syscall per MQTT packet, one TLS record each: how device libraries send)",
            Some(WriteMode::Coalesced) => "**coalesced** (everything due at once in one write: NOT how devices send; an extra, not a headline)",
            None => "n/a (connections only)",
        }
    );
    for b in brokers {
        let _ = writeln!(o, "- **{}**: `{}`", b.name, b.cmd);
    }
    let Some(first) = rows.first() else {
        return o;
    };
    let names: Vec<&'static str> = first.figures.iter().map(|(k, _)| *k).collect();
    let _ = writeln!(
        o,
        "\n## Medians{}\n",
        a.scenario
            .write_mode()
            .map(|w| format!(" ({})", w.label()))
            .unwrap_or_default()
    );
    let mut hdr = String::from("| metric |");
    let mut sep = String::from("|---|");
    for b in brokers {
        let _ = write!(hdr, " {} |", b.name);
        sep.push_str("---:|");
    }
    for b in &brokers[1..] {
        let _ = write!(hdr, " {}/{} |", b.name, brokers[0].name);
        sep.push_str("---:|");
    }
    let _ = writeln!(o, "{hdr}\n{sep}");
    for (i, n) in names.iter().enumerate() {
        let meds: Vec<f64> = brokers
            .iter()
            .map(|b| {
                median(
                    rows.iter()
                        .filter(|r| r.broker == b.name)
                        .filter_map(|r| r.figures.get(i).map(|f| f.1))
                        .collect(),
                )
            })
            .collect();
        let mut line = format!("| {n} |");
        for m in &meds {
            let _ = write!(line, " {} |", fmt(*m));
        }
        for m in &meds[1..] {
            let ratio = if meds[0] != 0.0 {
                m / meds[0]
            } else {
                f64::NAN
            };
            let _ = write!(
                line,
                " {} |",
                if ratio.is_nan() {
                    "–".into()
                } else if ratio.abs() >= 10.0 {
                    format!("{ratio:.1}×")
                } else if ratio.abs() >= 0.1 || ratio == 0.0 {
                    format!("{ratio:.2}×")
                } else {
                    // Small ratios (latency far below the baseline) keep two significant digits.
                    let decimals = (1.0 - ratio.abs().log10().floor()).clamp(2.0, 9.0) as usize;
                    format!("{ratio:.decimals$}×")
                }
            );
        }
        let _ = writeln!(o, "{line}");
    }
    let _ = writeln!(o, "\n## All runs\n");
    let mut hdr = String::from("| round | broker |");
    let mut sep = String::from("|---:|---|");
    for n in &names {
        let _ = write!(hdr, " {n} |");
        sep.push_str("---:|");
    }
    hdr.push_str(" loadgen-bound |");
    sep.push_str("---|");
    let _ = writeln!(o, "{hdr}\n{sep}");
    for r in rows {
        let mut line = format!("| {} | {} |", r.round + 1, r.broker);
        for (_, v) in &r.figures {
            let _ = write!(line, " {} |", fmt(*v));
        }
        let _ = write!(line, " {} |", if r.loadgen_bound { "YES" } else { "no" });
        let _ = writeln!(o, "{line}");
    }
    let warns: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.warnings
                .iter()
                .map(move |w| format!("- round {} {}: {w}", r.round + 1, r.broker))
        })
        .collect();
    if !warns.is_empty() {
        let _ = writeln!(o, "\n## Warnings\n\n{}", warns.join("\n"));
    }
    let _ = writeln!(
        o,
        "\nNotes: latency is end-to-end from each message's intended send time (open loop) or its \
         enqueue time (closed loop). \"CPU-s per M msgs\" divides CPU time over the whole run by \
         messages delivered to subscribers (fleet: over the measured window, by messages sent \
         in it). A run marked loadgen-bound had a loadgen core ≥ 90% \
         busy: its throughput is a floor for the broker, but the broker's CPU per message is still valid. \
         \"waited for CPU\" is the share of the run a process was runnable but not running \
         (/proc/…/schedstat): above ~10% other processes shared its CPU and throughput/latency \
         reflect the machine more than the broker."
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_ignores_missing_values() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, f64::NAN, 2.0, 3.0]), 2.5);
        assert!(median(vec![f64::NAN]).is_nan());
    }

    #[test]
    fn commands_in_the_report_paste_back_into_a_shell() {
        assert_eq!(shell_quote("--runs"), "--runs");
        assert_eq!(
            shell_quote("midge=/bin/midge -c {conf}"),
            "'midge=/bin/midge -c {conf}'"
        );
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
