//! The `fleet` scenario: the shape of a real device fleet. N devices, each with its own
//! client certificate over mutual TLS, connect at a bounded handshake rate from source
//! addresses spread over 127.0.0.0/8, subscribe to their command topic `fleet/ID/cmd`, sit
//! idle (PINGREQ at their keep-alive) and then publish QoS 1 telemetry to `fleet/ID/telemetry`
//! every few seconds with jitter; backend consumers take it from
//! `$share/backend/fleet/+/telemetry` (or `fleet/+/telemetry`), and a backend publishes
//! occasional commands to devices.
//!
//! Owns: the options, the coordinator (phases: prepare → ramp → settle → idle → traffic →
//! drain → stop, the broker's CPU and RSS sampled at the phase boundaries from /proc), the
//! workers' lifecycle (threads, or `--procs K` child processes of this binary), and the
//! report. Must not touch: the broker (only reads /proc/PID). Device-side behaviour lives in
//! `worker`, the wire format between coordinator and workers and the merge in `proto`.

pub mod proto;
mod worker;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use midge::codec::QoS;
use serde::{Deserialize, Serialize};

use crate::common::{parse_duration, Clock, CommonArgs, WriteMode, MAX_CONNECTIONS, MAX_DURATION};
use crate::limits;
use crate::stats::{Lat, Summary};
use proto::{Cmd, Event, Progress, ReadyInfo, WorkerResult, WorkerSpec};
pub use worker::child_main;

/// One source address per this many devices when `--source-addrs` is automatic: well below
/// the ~28,000 ephemeral ports of one address, so TIME_WAIT sockets of a previous run never
/// exhaust it.
pub const DEVICES_PER_SOURCE: u64 = 4000;

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct FleetArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Devices (each one connection, its own identity with --mint-ca-*). Capped, with a
    /// warning, by RLIMIT_NOFILE per process: use --procs beyond it.
    #[arg(long, default_value_t = 1000)]
    pub devices: u64,
    /// Telemetry interval of each device.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Jitter: each message is sent at a uniformly random point of the first JITTER × interval
    /// of its slot (0 = exactly periodic; at most 0.95).
    #[arg(long, default_value_t = 0.2)]
    pub jitter: f64,
    /// Telemetry and command payload bytes (≥ 16).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// QoS of telemetry and of the backend subscription (commands are always QoS 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Backend consumer connections.
    #[arg(long, default_value_t = 4)]
    pub backends: u32,
    /// Backends subscribe `fleet/+/telemetry` (each receives everything) instead of the shared
    /// subscription `$share/GROUP/fleet/+/telemetry`: for brokers without shared subscriptions.
    #[arg(long)]
    pub no_shared: bool,
    /// Shared subscription group of the backends.
    #[arg(long, default_value = "backend")]
    pub share_group: String,
    /// Commands per second in total from the backend to devices (`fleet/ID/cmd`, QoS 1,
    /// round robin over connected devices); 0 = none.
    #[arg(long, default_value_t = 10.0)]
    pub cmd_rate: f64,
    /// Devices connecting per second during the ramp (open loop: device d is due at
    /// d / rate; the handshake latency counts from then).
    #[arg(long, default_value_t = 500.0)]
    pub ramp_rate: f64,
    /// Connection attempts in flight at once during the ramp (over all workers and cores).
    #[arg(long, default_value_t = 64)]
    pub ramp_concurrency: u32,
    /// Pause after the ramp before the broker's RSS is read and the idle phase starts.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub settle: Duration,
    /// Idle phase: every device connected, only PINGREQs; the broker's CPU is measured over
    /// it (0 = skip).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub idle: Duration,
    /// Telemetry warm-up excluded from the figures.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Measured telemetry window after the warm-up.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// After the last publication, wait at most this long for deliveries in flight.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Unacknowledged QoS 1 telemetry messages per device before it waits.
    #[arg(long, default_value_t = 16)]
    pub inflight: u16,
    /// Source addresses from 127.0.0.2 to spread the devices over (bind before connect);
    /// 0 = one per 4,000 devices.
    #[arg(long, default_value_t = 0)]
    pub source_addrs: u32,
    /// Directory caching minted identities across runs (with --mint-ca-*); default
    /// $XDG_CACHE_HOME or ~/.cache /midge-loadgen/identities.
    #[arg(long)]
    pub cert_cache: Option<PathBuf>,
    /// Mint identities afresh on every run instead of caching them.
    #[arg(long)]
    pub no_cert_cache: bool,
    /// Broker pid: its CPU per message, idle CPU and RSS per device (/proc/PID).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Worker processes (this binary re-executed) sharing the devices: device d runs in
    /// worker d mod K, each with its own RLIMIT_NOFILE; results are merged.
    #[arg(long, default_value_t = 1)]
    pub procs: u32,
    /// per-packet: one write syscall (one TLS record) per MQTT packet, as device libraries
    /// send; coalesced: everything due at once in one write.
    #[arg(long, value_enum, default_value = "per-packet")]
    pub write_mode: WriteMode,
    /// Give up on the ramp after this long (it also ends when no device connected or failed
    /// for 4 connect timeouts + 10 s); devices not attempted by then stay out of the run.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    pub max_ramp: Duration,
}

/// Validated figures of a fleet run (every worker derives the same plan from the same args).
#[derive(Debug, Clone, Serialize)]
pub struct FleetPlan {
    pub devices: u64,
    pub procs: u32,
    pub interval_ns: u64,
    pub jitter: f64,
    pub payload: usize,
    #[serde(serialize_with = "qos_number")]
    pub qos: QoS,
    pub backends: u32,
    pub shared: bool,
    pub share_group: String,
    pub cmd_rate: f64,
    pub ramp_rate: f64,
    pub ramp_concurrency: u32,
    pub settle_ns: u64,
    pub idle_ns: u64,
    pub warmup_ns: u64,
    pub duration_ns: u64,
    pub drain_ns: u64,
    pub inflight: u16,
    pub keepalive: u16,
    /// Resolved: 0 = no binding (the kernel picks 127.0.0.1).
    pub source_addrs: u32,
    pub write_mode: WriteMode,
    pub prefix: String,
    pub cert_cache: Option<PathBuf>,
    pub max_ramp_ns: u64,
}

fn qos_number<S: serde::Serializer>(q: &QoS, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u8(*q as u8)
}

impl FleetPlan {
    pub fn device_id(&self, d: u64) -> String {
        format!("{}-d{d}", self.prefix)
    }
    pub fn backend_id(&self, b: u32) -> String {
        format!("{}-b{b}", self.prefix)
    }
    pub fn commander_id(&self, w: u64) -> String {
        format!("{}-cmd{w}", self.prefix)
    }
    pub fn tel_topic(&self, d: u64) -> String {
        format!("fleet/{d}/telemetry")
    }
    pub fn cmd_topic(&self, d: u64) -> String {
        format!("fleet/{d}/cmd")
    }
    pub fn filter(&self) -> String {
        if self.shared {
            format!("$share/{}/fleet/+/telemetry", self.share_group)
        } else {
            "fleet/+/telemetry".into()
        }
    }
    /// The telemetry receiver a backend's deliveries count under (the shared group is one).
    pub fn receiver_key(&self, b: u32) -> u32 {
        if self.shared {
            0
        } else {
            b
        }
    }
    pub fn receivers(&self) -> Vec<u32> {
        if self.shared {
            vec![0]
        } else {
            (0..self.backends).collect()
        }
    }
    /// Deliveries per telemetry message.
    pub fn fanout(&self) -> u64 {
        if self.shared {
            1
        } else {
            u64::from(self.backends)
        }
    }
}

impl FleetArgs {
    pub fn plan(&self) -> Result<FleetPlan, String> {
        if self.devices == 0 || self.devices > MAX_CONNECTIONS {
            return Err(format!("--devices must be 1..={MAX_CONNECTIONS}"));
        }
        if self.procs == 0 || self.procs > 64 || u64::from(self.procs) > self.devices {
            return Err("--procs must be 1..=64 and at most --devices".into());
        }
        if self.interval < Duration::from_millis(10) || self.interval > Duration::from_secs(3600) {
            return Err("--interval must be 10ms..=1h".into());
        }
        if !(0.0..=crate::sched::MAX_JITTER).contains(&self.jitter) {
            return Err(format!(
                "--jitter must be 0..={} (a fraction of the interval)",
                crate::sched::MAX_JITTER
            ));
        }
        if self.payload < crate::payload::HEADER_LEN || self.payload > 65536 {
            return Err(format!(
                "--payload must be {}..=65536 bytes",
                crate::payload::HEADER_LEN
            ));
        }
        if self.backends == 0 || self.backends > 1000 {
            return Err("--backends must be 1..=1000".into());
        }
        let g = &self.share_group;
        if g.is_empty() || g.contains(['/', '+', '#']) {
            return Err("--share-group must be non-empty without '/', '+' or '#'".into());
        }
        if !(0.0..=1e6).contains(&self.cmd_rate) {
            return Err("--cmd-rate must be 0..=1e6 commands/s".into());
        }
        if !(self.ramp_rate > 0.0 && self.ramp_rate <= 1e6) {
            return Err("--ramp-rate must be > 0 and ≤ 1e6 connections/s".into());
        }
        if self.ramp_concurrency == 0 {
            return Err("--ramp-concurrency must be ≥ 1".into());
        }
        if self.duration.is_zero() || self.warmup + self.duration > MAX_DURATION {
            return Err(format!(
                "--duration must be > 0 and warm-up + duration ≤ {MAX_DURATION:?}"
            ));
        }
        if self.idle > MAX_DURATION || self.max_ramp > MAX_DURATION {
            return Err(format!("--idle and --max-ramp must be ≤ {MAX_DURATION:?}"));
        }
        if self.settle > Duration::from_secs(60) || self.drain > Duration::from_secs(60) {
            return Err("--settle and --drain must be ≤ 60s".into());
        }
        if self.inflight == 0 {
            return Err("--inflight must be ≥ 1".into());
        }
        let messages = (self.warmup + self.duration).as_nanos() / self.interval.as_nanos() + 2;
        if messages >= u128::from(u32::MAX) {
            return Err("too many messages per device for 32-bit sequence numbers".into());
        }
        if !crate::tls::safe_name(&self.common.client_prefix) {
            return Err(
                "--client-prefix: letters, digits, '.', '_' and '-' only (client ids name certificate files)"
                    .into(),
            );
        }
        let v4_loopback = (self.common.host.as_str(), 0)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| a.is_ipv4() && a.ip().is_loopback());
        let source_addrs = match self.source_addrs {
            0 if v4_loopback => self.devices.div_ceil(DEVICES_PER_SOURCE).max(1) as u32,
            0 => 0,
            n if v4_loopback => n.min(crate::net::MAX_SOURCE_ADDRS),
            _ => {
                return Err(
                    "--source-addrs needs an IPv4 loopback broker address (127.0.0.0/8)".into(),
                )
            }
        };
        let cert_cache = if self.no_cert_cache {
            None
        } else {
            Some(
                self.cert_cache
                    .clone()
                    .unwrap_or_else(crate::tls::default_cache_root),
            )
        };
        let ns = |d: Duration| d.as_nanos() as u64;
        Ok(FleetPlan {
            devices: self.devices,
            procs: self.procs,
            interval_ns: ns(self.interval),
            jitter: self.jitter,
            payload: self.payload,
            qos: QoS::from_u8(self.qos).unwrap_or(QoS::AtLeastOnce),
            backends: self.backends,
            shared: !self.no_shared,
            share_group: self.share_group.clone(),
            cmd_rate: self.cmd_rate,
            ramp_rate: self.ramp_rate,
            ramp_concurrency: self.ramp_concurrency,
            settle_ns: ns(self.settle),
            idle_ns: ns(self.idle),
            warmup_ns: ns(self.warmup),
            duration_ns: ns(self.duration),
            drain_ns: ns(self.drain),
            inflight: self.inflight,
            keepalive: self.common.keepalive.unwrap_or(30),
            source_addrs,
            write_mode: self.write_mode,
            prefix: self.common.client_prefix.clone(),
            cert_cache,
            max_ramp_ns: ns(self.max_ramp),
        })
    }
}

/// The loadgen CPUs worker `w` of `k` runs on: a share of `cores` when there are at least
/// as many cores as workers, else one core each, round robin.
pub fn worker_cores(cores: &[usize], w: usize, k: usize) -> Vec<usize> {
    if cores.is_empty() {
        return Vec::new();
    }
    if k <= cores.len() {
        cores
            .iter()
            .enumerate()
            .filter(|(i, _)| i % k == w)
            .map(|(_, c)| *c)
            .collect()
    } else {
        vec![cores[w % cores.len()]]
    }
}

/// Everything a fleet run measured.
#[derive(Serialize)]
pub struct FleetReport {
    pub plan: FleetPlan,
    pub write_mode: WriteMode,
    pub devices_requested: u64,
    pub mqtt: String,
    pub tls: bool,
    pub cores: Vec<usize>,
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    pub identities_minted: u64,
    pub identities_loaded: u64,
    pub prep_seconds: f64,
    // Ramp.
    pub connected: u64,
    pub failed: u64,
    pub failures: HashMap<String, u64>,
    pub ramp_seconds: f64,
    pub handshakes_per_s: f64,
    pub tcp_connect: Summary,
    pub tls_handshake: Summary,
    pub connack: Summary,
    pub suback: Summary,
    /// Intended connect time → SUBACK of the command subscription.
    pub connect_total: Summary,
    pub broker_rss_before: Option<u64>,
    pub broker_rss_after: Option<u64>,
    pub broker_rss_per_device: Option<f64>,
    // Idle.
    pub idle_seconds: f64,
    pub idle_pings: u64,
    pub idle_broker_cpu_seconds: Option<f64>,
    /// Broker CPU over the idle phase, % of one core.
    pub idle_broker_cpu_percent: Option<f64>,
    // Traffic.
    pub measured_seconds: f64,
    pub tel_sent: u64,
    pub tel_expected: u64,
    pub tel_received: u64,
    pub tel_acked: u64,
    pub tel_lost: u64,
    pub tel_duplicates: u64,
    pub foreign: u64,
    pub tel_sent_measured: u64,
    pub tel_send_rate: f64,
    pub tel_recv_rate: f64,
    pub latency: Summary,
    pub cmd_sent: u64,
    pub cmd_received: u64,
    pub cmd_lost: u64,
    pub cmd_duplicates: u64,
    pub cmd_sent_measured: u64,
    pub cmd_latency: Summary,
    pub pings: u64,
    pub pongs: u64,
    /// Broker CPU over the measured window (after warm-up), and per message published in it
    /// (telemetry + commands with an intended send time in the window).
    pub broker_cpu_seconds: Option<f64>,
    pub messages_in_window: u64,
    pub broker_cpu_us_per_msg: Option<f64>,
    pub broker_runqueue_wait: Option<f64>,
    pub loadgen_cpu_busy: Vec<f64>,
    pub loadgen_runqueue_wait: Vec<f64>,
    pub loadgen_cpu_seconds: f64,
    pub errors: HashMap<String, u64>,
    pub warnings: Vec<String>,
    #[serde(skip)]
    pub lat_hist: Lat,
    #[serde(skip)]
    pub connect_hist: Lat,
}

enum Worker {
    Thread {
        tx: mpsc::Sender<Cmd>,
        join: Option<std::thread::JoinHandle<()>>,
    },
    Process {
        child: Child,
        stdin: Option<ChildStdin>,
    },
}

impl Worker {
    fn send(&mut self, c: &Cmd) {
        match self {
            Worker::Thread { tx, .. } => {
                let _ = tx.send(c.clone());
            }
            Worker::Process { stdin, .. } => {
                if let (Some(s), Ok(line)) = (stdin.as_mut(), serde_json::to_string(c)) {
                    let _ = writeln!(s, "{line}").and_then(|_| s.flush());
                }
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        match self {
            Worker::Thread { tx, join } => {
                let _ = tx.send(Cmd::Stop);
                if let Some(j) = join.take() {
                    let _ = j.join();
                }
            }
            Worker::Process { child, stdin } => {
                // Closing stdin tells the worker to stop; give it a moment, then kill it.
                drop(stdin.take());
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(5) {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn spawn_worker(spec: WorkerSpec, tx: mpsc::Sender<(usize, Event)>) -> Result<Worker, String> {
    let w = spec.index as usize;
    if spec.count == 1 {
        let (ctx, crx) = mpsc::channel();
        let join = std::thread::Builder::new()
            .name(format!("fleet-worker-{w}"))
            .spawn(move || {
                let tx = std::sync::Mutex::new(tx);
                worker::worker_main(spec, crx, &|ev| {
                    if let Ok(t) = tx.lock() {
                        let _ = t.send((w, ev));
                    }
                })
            })
            .map_err(|e| format!("cannot start a worker thread: {e}"))?;
        return Ok(Worker::Thread {
            tx: ctx,
            join: Some(join),
        });
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let mut child = Command::new(exe)
        .arg("fleet-worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start worker process {w}: {e}"))?;
    let mut stdin = child.stdin.take();
    let line = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
    if let Some(s) = stdin.as_mut() {
        writeln!(s, "{line}")
            .and_then(|_| s.flush())
            .map_err(|e| format!("worker {w}: {e}"))?;
    }
    let stdout = child.stdout.take().ok_or("worker stdout")?;
    std::thread::spawn(move || {
        let mut got_result = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Event>(&line) {
                Ok(ev) => {
                    got_result |= matches!(ev, Event::Result(_));
                    if tx.send((w, ev)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send((w, Event::Failed(format!("worker {w}: bad event: {e}"))));
                }
            }
        }
        if !got_result {
            let _ = tx.send((
                w,
                Event::Failed(format!("worker {w} exited before reporting")),
            ));
        }
    });
    Ok(Worker::Process { child, stdin })
}

#[derive(Default)]
struct WState {
    ready: Option<ReadyInfo>,
    ramped: Option<(u64, u64)>,
    progress: Progress,
    result: Option<WorkerResult>,
}

struct Coord {
    rx: mpsc::Receiver<(usize, Event)>,
    st: Vec<WState>,
    clock: Clock,
    quiet: bool,
    /// Live line: (phase label, when the phase started, next print).
    live: Option<(&'static str, u64, u64)>,
    last_print: Progress,
}

impl Coord {
    fn total(&self) -> Progress {
        let mut t = Progress::default();
        for s in &self.st {
            let p = &s.progress;
            t.connected += p.connected;
            t.failed += p.failed;
            t.tel_sent += p.tel_sent;
            t.tel_recv += p.tel_recv;
            t.tel_acked += p.tel_acked;
            t.cmd_sent += p.cmd_sent;
            t.cmd_recv += p.cmd_recv;
            t.cmd_acked += p.cmd_acked;
            t.pings += p.pings;
            t.senders_done += p.senders_done;
            t.senders += p.senders;
            t.errors += p.errors;
        }
        t
    }

    /// Handle events until `done(self)` holds (true) or the clock reads `deadline` (false).
    /// A worker's `Failed` is an error.
    fn pump(&mut self, deadline: u64, done: impl Fn(&Coord) -> bool) -> Result<bool, String> {
        loop {
            if done(self) {
                return Ok(true);
            }
            let now = self.clock.now_ns();
            if now >= deadline {
                return Ok(false);
            }
            self.live_line(now);
            let wait = Duration::from_nanos((deadline - now).min(50_000_000));
            match self.rx.recv_timeout(wait) {
                Ok((w, ev)) => match ev {
                    Event::Ready(r) => self.st[w].ready = Some(r),
                    Event::Ramped { ok, failed } => self.st[w].ramped = Some((ok, failed)),
                    Event::Progress(p) => self.st[w].progress = p,
                    Event::Result(r) => self.st[w].result = Some(*r),
                    Event::Failed(msg) => return Err(msg),
                },
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if done(self) {
                        return Ok(true);
                    }
                    return Err("every worker has gone".into());
                }
            }
        }
    }

    fn live_line(&mut self, now: u64) {
        let Some((label, t0, next)) = self.live else {
            return;
        };
        if self.quiet || now < next {
            return;
        }
        let t = self.total();
        let l = &self.last_print;
        eprintln!(
            "[{:>4}s {label:<7}] connected {:>6}  telemetry sent {:>7}/s recv {:>7}/s  commands {:>5}/s  pings {:>6}/s  errors {}",
            (now - t0) / 1_000_000_000,
            t.connected,
            t.tel_sent - l.tel_sent,
            t.tel_recv - l.tel_recv,
            t.cmd_sent - l.cmd_sent,
            t.pings - l.pings,
            t.errors
        );
        self.last_print = t;
        self.live = Some((label, t0, next + 1_000_000_000));
    }

    fn phase(&mut self, label: &'static str) {
        let now = self.clock.now_ns();
        self.last_print = self.total();
        self.live = Some((label, now, now + 1_000_000_000));
    }

    fn say(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }
}

/// Broker CPU time, its run-queue wait and RSS, read from /proc.
fn broker_sample(pid: Option<u32>) -> (Option<Duration>, Option<u64>, Option<u64>) {
    match pid {
        None => (None, None, None),
        Some(p) => (
            crate::cpu::proc_cpu(p),
            crate::cpu::proc_schedstat(p).map(|s| s.1),
            crate::cpu::proc_rss(p),
        ),
    }
}

pub fn run(a: &FleetArgs) -> Result<FleetReport, String> {
    let plan = a.plan()?;
    // Validate the common options (host, cores, TLS files) before starting anything.
    let common = a.common.validate(1)?;
    let cores = common.cores.clone();
    let k = plan.procs as usize;
    let mut warnings = Vec::new();
    // Each process holds its share of the devices, one descriptor each.
    let per_proc = plan.devices.div_ceil(k as u64);
    let per_worker_cores = (0..k)
        .map(|w| worker_cores(&cores, w, k).len())
        .max()
        .unwrap_or(1);
    let extra = u64::from(plan.backends).div_ceil(k as u64) + 1;
    let reserve = limits::reserve_fds(per_worker_cores, extra) + if k > 1 { 0 } else { 8 };
    let lim = limits::raise_nofile(per_proc + reserve);
    // A child process raises its own soft limit up to the same hard limit.
    let cap = limits::device_cap(if k == 1 { lim.soft } else { lim.hard }, reserve);
    let mut devices = plan.devices;
    if per_proc > cap {
        devices = cap * k as u64;
        let w = format!(
            "capped --devices {} at {devices}: RLIMIT_NOFILE allows {} descriptors per process (soft {}, hard {}, {reserve} reserved); use --procs or raise the hard limit",
            plan.devices,
            if k == 1 { lim.soft } else { lim.hard },
            lim.soft,
            lim.hard
        );
        if !a.common.quiet {
            eprintln!("fleet: {w}");
        }
        warnings.push(w);
    }
    if devices < k as u64 {
        return Err(format!(
            "no room for devices: RLIMIT_NOFILE is {} (hard {})",
            lim.soft, lim.hard
        ));
    }
    if let Some(pid) = a.broker_pid {
        if crate::cpu::proc_cpu(pid).is_none() {
            return Err(format!("--broker-pid {pid}: cannot read /proc/{pid}/stat"));
        }
    }
    let clock = Clock::new();
    let nonce = crate::payload::new_nonce();
    let (tx, rx) = mpsc::channel::<(usize, Event)>();
    let mut co = Coord {
        rx,
        st: (0..k).map(|_| WState::default()).collect(),
        clock,
        quiet: a.common.quiet,
        live: None,
        last_print: Progress::default(),
    };
    let mut workers = Vec::new();
    for w in 0..k {
        let spec = WorkerSpec {
            index: w as u32,
            count: k as u32,
            clock_base_ns: clock.base_ns(),
            nonce,
            cores: worker_cores(&cores, w, k),
            allowed_cpus: crate::common::allowed_cpus(),
            devices,
            args: a.clone(),
        };
        workers.push(spawn_worker(spec, tx.clone())?);
    }
    drop(tx);
    let r = coordinate(&mut co, &mut workers, a, &plan, devices);
    // Whatever happened, every worker is told to stop and its result collected.
    for w in workers.iter_mut() {
        w.send(&Cmd::Stop);
    }
    let got_all = co.pump(clock.now_ns() + 30_000_000_000, |c| {
        c.st.iter().all(|s| s.result.is_some())
    });
    drop(workers);
    let phases = r?;
    if !got_all? {
        return Err("not every worker reported its results".into());
    }
    let results: Vec<WorkerResult> = co.st.iter_mut().filter_map(|s| s.result.take()).collect();
    Ok(report(
        a, &plan, devices, lim, &cores, &results, phases, warnings,
    ))
}

/// Broker and timing figures gathered by the coordinator between phases.
#[derive(Default)]
struct Phases {
    rss0: Option<u64>,
    rss1: Option<u64>,
    idle_ns: u64,
    idle_cpu: Option<Duration>,
    idle_pings: u64,
    ramp_at: u64,
    traffic_at: u64,
    window_cpu: Option<Duration>,
    window_wait: Option<u64>,
    ready: Vec<ReadyInfo>,
    ramp_note: Option<String>,
}

fn coordinate(
    co: &mut Coord,
    workers: &mut [Worker],
    a: &FleetArgs,
    plan: &FleetPlan,
    devices: u64,
) -> Result<Phases, String> {
    let clock = co.clock;
    let pid = a.broker_pid;
    let mut ph = Phases::default();
    let send_all = |ws: &mut [Worker], c: Cmd| {
        for w in ws.iter_mut() {
            w.send(&c);
        }
    };
    // Prepare: identities minted or loaded, backends and commanders connected.
    co.say(&format!(
        "fleet: {devices} devices in {} worker(s), preparing identities and backends…",
        plan.procs
    ));
    let ok = co.pump(clock.now_ns() + 900_000_000_000, |c| {
        c.st.iter().all(|s| s.ready.is_some())
    })?;
    if !ok {
        return Err("workers not ready within 15 minutes".into());
    }
    ph.ready = co.st.iter().filter_map(|s| s.ready.clone()).collect();
    let (minted, loaded): (u64, u64) = ph.ready.iter().fold((0, 0), |(m, l), r| {
        (m + r.identities_minted, l + r.identities_loaded)
    });
    let prep = ph.ready.iter().map(|r| r.prep_seconds).fold(0.0, f64::max);
    let cache = ph.ready.iter().find_map(|r| r.cache_dir.clone());
    co.say(&format!(
        "fleet: identities: {minted} minted, {loaded} from the cache{}, in {prep:.1}s; ramping at {:.0} connections/s from {} source address(es)",
        cache.map(|d| format!(" ({d})")).unwrap_or_default(),
        plan.ramp_rate,
        plan.source_addrs.max(1)
    ));
    // Ramp.
    (_, _, ph.rss0) = broker_sample(pid);
    ph.ramp_at = clock.now_ns() + 100_000_000;
    send_all(workers, Cmd::Ramp { at_ns: ph.ramp_at });
    co.phase("ramp");
    // The ramp takes as long as the broker needs (an open-loop schedule it cannot keep shows
    // as connect latency), bounded by --max-ramp and by a stall: no attempt finishing for
    // 4 connect timeouts + 10 s.
    let ramp_deadline = ph.ramp_at + plan.max_ramp_ns;
    let stall_ns = 4 * a.common.connect_timeout.as_nanos() as u64 + 10_000_000_000;
    let mut seen = (0u64, clock.now_ns());
    loop {
        let step = (clock.now_ns() + 1_000_000_000).min(ramp_deadline);
        if co.pump(step, |c| c.st.iter().all(|s| s.ramped.is_some()))? {
            break;
        }
        let t = co.total();
        let now = clock.now_ns();
        if t.connected + t.failed != seen.0 {
            seen = (t.connected + t.failed, now);
        }
        if now >= ramp_deadline || now - seen.1 >= stall_ns {
            let w = format!(
                "the ramp {} after {:.0}s with {} of {devices} devices attempted: the rest stay out of the run",
                if now >= ramp_deadline { "reached --max-ramp" } else { "stalled" },
                (now - ph.ramp_at) as f64 / 1e9,
                t.connected + t.failed
            );
            co.say(&format!("fleet: {w}"));
            ph.ramp_note = Some(w);
            break;
        }
    }
    let (okn, failn) = co
        .st
        .iter()
        .filter_map(|s| s.ramped)
        .fold((0, 0), |(a, b), (o, f)| (a + o, b + f));
    co.say(&format!(
        "fleet: ramp done: {okn} connected, {failn} failed in {:.1}s",
        (clock.now_ns() - ph.ramp_at) as f64 / 1e9
    ));
    // Settle, then memory.
    co.phase("settle");
    co.pump(clock.now_ns() + plan.settle_ns, |_| false)?;
    (_, _, ph.rss1) = broker_sample(pid);
    // Idle: only keep-alives.
    if plan.idle_ns > 0 {
        co.phase("idle");
        let (c0, _, _) = broker_sample(pid);
        let p0 = co.total().pings;
        let t0 = clock.now_ns();
        co.pump(t0 + plan.idle_ns, |_| false)?;
        let (c1, _, _) = broker_sample(pid);
        ph.idle_ns = clock.now_ns() - t0;
        ph.idle_cpu = c0.zip(c1).map(|(a, b)| b.saturating_sub(a));
        ph.idle_pings = co.total().pings - p0;
        if let Some(c) = ph.idle_cpu {
            co.say(&format!(
                "fleet: idle {:.1}s: broker CPU {:.2}% of a core, {} PINGREQs",
                ph.idle_ns as f64 / 1e9,
                c.as_secs_f64() / (ph.idle_ns as f64 / 1e9) * 100.0,
                ph.idle_pings
            ));
        }
    }
    // Traffic: the broker's CPU is read at the measured window's edges.
    ph.traffic_at = clock.now_ns() + 100_000_000;
    send_all(
        workers,
        Cmd::Traffic {
            at_ns: ph.traffic_at,
        },
    );
    co.phase("traffic");
    let m0 = ph.traffic_at + plan.warmup_ns;
    let m1 = m0 + plan.duration_ns;
    co.pump(m0, |_| false)?;
    let (c0, q0, _) = broker_sample(pid);
    co.pump(m1, |_| false)?;
    let (c1, q1, _) = broker_sample(pid);
    ph.window_cpu = c0.zip(c1).map(|(a, b)| b.saturating_sub(a));
    ph.window_wait = q0.zip(q1).map(|(a, b)| b.saturating_sub(a));
    // Every sender finished its schedule, then the drain.
    co.phase("drain");
    let senders_deadline = m1 + plan.drain_ns + 10_000_000_000;
    co.pump(senders_deadline, |c| {
        let t = c.total();
        t.senders_done >= t.senders
    })?;
    // Drained: every message delivered and, at QoS 1, acknowledged to its sender.
    let fanout = plan.fanout();
    let qos1 = plan.qos != QoS::AtMostOnce;
    co.pump(clock.now_ns() + plan.drain_ns, |c| {
        let t = c.total();
        t.tel_recv >= t.tel_sent * fanout
            && t.cmd_recv >= t.cmd_sent
            && t.cmd_acked >= t.cmd_sent
            && (!qos1 || t.tel_acked >= t.tel_sent)
    })?;
    co.live = None;
    Ok(ph)
}

#[allow(clippy::too_many_arguments)]
fn report(
    a: &FleetArgs,
    plan: &FleetPlan,
    devices: u64,
    lim: limits::NoFile,
    cores: &[usize],
    results: &[WorkerResult],
    ph: Phases,
    mut warnings: Vec<String>,
) -> FleetReport {
    let m = proto::merge(results, &plan.receivers());
    let ramp_s = m.ramp_last_ns.saturating_sub(ph.ramp_at) as f64 / 1e9;
    let measured = plan.duration_ns as f64 / 1e9;
    let in_window = m.tel_sent_measured + m.cmd_sent_measured;
    let mut plan_out = plan.clone();
    plan_out.devices = devices;
    warnings.extend(ph.ramp_note.iter().cloned());
    warnings.extend(m.warnings.iter().cloned());
    if m.failed > 0 {
        warnings.push(format!(
            "{} of {} devices could not connect (see failures)",
            m.failed, m.devices
        ));
    }
    if m.tel_lost > 0 || m.cmd_lost > 0 {
        warnings.push(format!(
            "{} telemetry and {} command messages not received by the end of the drain: dropped by the broker or still queued (a longer --drain tells which)",
            m.tel_lost, m.cmd_lost
        ));
    }
    let expected_in_window = m.connected as f64 * measured / (plan.interval_ns as f64 / 1e9);
    if m.connected > 0 && (m.tel_sent_measured as f64) < expected_in_window * 0.95 {
        warnings.push(format!(
            "devices sent {} telemetry messages in the window, {:.0} were due: the loadgen or the broker's acknowledgements held them back",
            m.tel_sent_measured, expected_in_window
        ));
    }
    let bwait = ph
        .window_wait
        .map(|w| w as f64 / plan.duration_ns.max(1) as f64);
    if let Some(w) = bwait.filter(|w| *w >= 0.1) {
        warnings.push(format!(
            "the broker waited {:.0}% of the window for a CPU held by other processes: its latency is limited by this machine (its CPU per message is still valid)",
            w * 100.0
        ));
    }
    for (i, w) in m.core_runq.iter().enumerate() {
        if *w >= 0.1 {
            warnings.push(format!(
                "loadgen core {} waited {:.0}% of the traffic phase for a CPU held by other processes: latency figures include that",
                m.cores.get(i).copied().unwrap_or(0),
                w * 100.0
            ));
        }
    }
    if m.tel_lat.clamped > 0 {
        warnings.push(format!(
            "{} latencies above 60 s were clamped",
            m.tel_lat.clamped
        ));
    }
    if m.connect_total.clamped > 0 {
        warnings.push(format!(
            "{} devices connected more than 60 s after their ramp slot (recorded as 60 s): the broker accepted far fewer handshakes per second than --ramp-rate",
            m.connect_total.clamped
        ));
    }
    let rss_per = match (ph.rss0, ph.rss1) {
        (Some(a), Some(b)) if m.connected > 0 => Some((b as f64 - a as f64) / m.connected as f64),
        _ => None,
    };
    FleetReport {
        plan: plan_out,
        write_mode: plan.write_mode,
        devices_requested: a.devices,
        mqtt: a.common.mqtt.clone(),
        tls: a.common.cafile.is_some(),
        cores: cores.to_vec(),
        nofile_soft: lim.soft,
        nofile_hard: lim.hard,
        identities_minted: m.identities_minted,
        identities_loaded: m.identities_loaded,
        prep_seconds: m.prep_seconds,
        connected: m.connected,
        failed: m.failed,
        failures: m.failures.clone(),
        ramp_seconds: ramp_s,
        handshakes_per_s: if ramp_s > 0.0 {
            m.connected as f64 / ramp_s
        } else {
            0.0
        },
        tcp_connect: m.tcp.summary(),
        tls_handshake: m.tls.summary(),
        connack: m.connack.summary(),
        suback: m.suback.summary(),
        connect_total: m.connect_total.summary(),
        broker_rss_before: ph.rss0,
        broker_rss_after: ph.rss1,
        broker_rss_per_device: rss_per,
        idle_seconds: ph.idle_ns as f64 / 1e9,
        idle_pings: ph.idle_pings,
        idle_broker_cpu_seconds: ph.idle_cpu.map(|d| d.as_secs_f64()),
        idle_broker_cpu_percent: ph
            .idle_cpu
            .filter(|_| ph.idle_ns > 0)
            .map(|d| d.as_secs_f64() / (ph.idle_ns as f64 / 1e9) * 100.0),
        measured_seconds: measured,
        tel_sent: m.tel_sent,
        tel_expected: m.tel_expected,
        tel_received: m.tel_recv,
        tel_acked: m.tel_acked,
        tel_lost: m.tel_lost,
        tel_duplicates: m.tel_duplicates,
        foreign: m.foreign,
        tel_sent_measured: m.tel_sent_measured,
        tel_send_rate: m.tel_sent_measured as f64 / measured,
        tel_recv_rate: m.tel_recv_window as f64 / measured,
        latency: m.tel_lat.summary(),
        cmd_sent: m.cmd_sent,
        cmd_received: m.cmd_recv,
        cmd_lost: m.cmd_lost,
        cmd_duplicates: m.cmd_duplicates,
        cmd_sent_measured: m.cmd_sent_measured,
        cmd_latency: m.cmd_lat.summary(),
        pings: m.pings,
        pongs: m.pongs,
        broker_cpu_seconds: ph.window_cpu.map(|d| d.as_secs_f64()),
        messages_in_window: in_window,
        broker_cpu_us_per_msg: ph
            .window_cpu
            .filter(|_| in_window > 0)
            .map(|d| d.as_secs_f64() * 1e6 / in_window as f64),
        broker_runqueue_wait: bwait,
        loadgen_cpu_busy: m.core_busy.clone(),
        loadgen_runqueue_wait: m.core_runq.clone(),
        loadgen_cpu_seconds: m.cpu_seconds,
        errors: m.errors.clone(),
        warnings,
        lat_hist: m.tel_lat,
        connect_hist: m.connect_total,
    }
}

fn lat_line(o: &mut String, name: &str, s: &Summary) {
    let _ = writeln!(
        o,
        "  {:<16} {:>9} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>11.1}",
        name, s.count, s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us
    );
}

pub fn table(r: &FleetReport) -> String {
    let p = &r.plan;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "fleet: {} devices ({} requested) over {}MQTT {}, QoS {} telemetry every {:.1}s ±{:.0}% jitter, {} B, {} backend(s) on {}, {:.0} commands/s, {}",
        p.devices,
        r.devices_requested,
        if r.tls { "mutual TLS, " } else { "" },
        r.mqtt,
        p.qos as u8,
        p.interval_ns as f64 / 1e9,
        p.jitter * 100.0,
        p.payload,
        p.backends,
        p.filter(),
        p.cmd_rate,
        r.write_mode.label()
    );
    let _ = writeln!(
        o,
        "  {} worker process(es) on CPU(s) {:?}, {} source address(es) from 127.0.0.2, keep-alive {}s, RLIMIT_NOFILE {} (hard {}); identities: {} minted, {} cached",
        p.procs,
        r.cores,
        p.source_addrs,
        p.keepalive,
        r.nofile_soft,
        r.nofile_hard,
        r.identities_minted,
        r.identities_loaded
    );
    let _ = writeln!(
        o,
        "  ramp          {} connected, {} failed in {:.2}s → {:.0} handshakes/s (offered {:.0}/s)",
        r.connected, r.failed, r.ramp_seconds, r.handshakes_per_s, p.ramp_rate
    );
    let _ = writeln!(
        o,
        "  {:<16} {:>9} {:>10} {:>10} {:>10} {:>10} {:>11}",
        "latency (µs)", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    lat_line(&mut o, "tcp connect", &r.tcp_connect);
    if r.tls {
        lat_line(&mut o, "tls handshake", &r.tls_handshake);
    }
    lat_line(&mut o, "connack", &r.connack);
    lat_line(&mut o, "suback (cmd)", &r.suback);
    lat_line(&mut o, "connect total", &r.connect_total);
    if let Some(x) = r.broker_rss_per_device {
        let _ = writeln!(
            o,
            "  broker RSS    {} → {} KiB: {:.0} bytes per connected device",
            r.broker_rss_before.unwrap_or(0) / 1024,
            r.broker_rss_after.unwrap_or(0) / 1024,
            x
        );
    }
    if let Some(c) = r.idle_broker_cpu_percent {
        let _ = writeln!(
            o,
            "  idle          {:.1}s, {} PINGREQs: broker CPU {:.3}s = {:.2}% of a core",
            r.idle_seconds,
            r.idle_pings,
            r.idle_broker_cpu_seconds.unwrap_or(0.0),
            c
        );
    }
    let _ = writeln!(
        o,
        "  traffic       measured {:.1}s after {:.1}s warm-up: telemetry sent {:.0}/s, received {:.0}/s",
        r.measured_seconds,
        p.warmup_ns as f64 / 1e9,
        r.tel_send_rate,
        r.tel_recv_rate
    );
    let _ = writeln!(
        o,
        "  telemetry     sent {}  expected {}  received {}  lost {}  duplicates {}  (lost = not received by the end of the drain)",
        r.tel_sent, r.tel_expected, r.tel_received, r.tel_lost, r.tel_duplicates
    );
    let _ = writeln!(
        o,
        "  commands      sent {}  received {}  lost {}  duplicates {};  PINGREQ {} / PINGRESP {}",
        r.cmd_sent, r.cmd_received, r.cmd_lost, r.cmd_duplicates, r.pings, r.pongs
    );
    let _ = writeln!(
        o,
        "  {:<16} {:>9} {:>10} {:>10} {:>10} {:>10} {:>11}",
        "latency (µs)", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    lat_line(&mut o, "telemetry e2e", &r.latency);
    lat_line(&mut o, "command e2e", &r.cmd_latency);
    if let (Some(c), Some(u)) = (r.broker_cpu_seconds, r.broker_cpu_us_per_msg) {
        let _ = writeln!(
            o,
            "  broker CPU    {c:.3}s over the window: {u:.2} µs per message ({} messages: telemetry + commands); waited for a CPU: {:.0}%",
            r.messages_in_window,
            r.broker_runqueue_wait.unwrap_or(0.0) * 100.0
        );
    }
    let _ = writeln!(
        o,
        "  loadgen CPU   {:.2}s in traffic; busy per core: {}; waited for a CPU: {}",
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
    let mut f: Vec<_> = r.failures.iter().collect();
    f.sort();
    for (e, n) in f {
        let _ = writeln!(o, "  connect failure: {e} ×{n}");
    }
    let mut e: Vec<_> = r.errors.iter().collect();
    e.sort();
    for (e, n) in e {
        let _ = writeln!(o, "  error: {e} ×{n}");
    }
    for w in &r.warnings {
        let _ = writeln!(o, "  WARNING: {w}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        f: FleetArgs,
    }

    fn args(extra: &[&str]) -> FleetArgs {
        let mut v = vec!["t"];
        v.extend_from_slice(extra);
        T::try_parse_from(v).unwrap().f
    }

    #[test]
    fn workers_share_cores_or_take_one_each() {
        assert_eq!(worker_cores(&[1, 2, 3, 4], 0, 2), vec![1, 3]);
        assert_eq!(worker_cores(&[1, 2, 3, 4], 1, 2), vec![2, 4]);
        assert_eq!(worker_cores(&[1], 0, 3), vec![1]);
        assert_eq!(worker_cores(&[1, 2], 2, 3), vec![1]);
        assert_eq!(worker_cores(&[], 0, 1), Vec::<usize>::new());
    }

    #[test]
    fn plan_defaults_and_limits() {
        let p = args(&["--devices", "15000"]).plan().unwrap();
        assert_eq!(p.keepalive, 30, "fleet devices keep alive by default");
        assert_eq!(p.source_addrs, 4, "one source address per 4,000 devices");
        assert_eq!(p.filter(), "$share/backend/fleet/+/telemetry");
        assert_eq!((p.fanout(), p.receivers()), (1, vec![0]));
        assert_eq!(p.write_mode, WriteMode::PerPacket);
        let p = args(&["--no-shared", "--backends", "2", "--keepalive", "5"])
            .plan()
            .unwrap();
        assert_eq!(p.filter(), "fleet/+/telemetry");
        assert_eq!((p.fanout(), p.receivers()), (2, vec![0, 1]));
        assert_eq!(p.keepalive, 5);
        assert_eq!(p.receiver_key(1), 1);
        for bad in [
            &["--devices", "0"][..],
            &["--jitter", "1.5"],
            &["--payload", "8"],
            &["--share-group", "a/b"],
            &["--procs", "3", "--devices", "2"],
            &["--ramp-rate", "0"],
            &["--client-prefix", "../x"],
            &["--host", "::1", "--source-addrs", "3"],
        ] {
            assert!(args(bad).plan().is_err(), "{bad:?}");
        }
        assert_eq!(
            args(&["--source-addrs", "7"]).plan().unwrap().source_addrs,
            7
        );
    }

    #[test]
    fn fleet_args_travel_to_worker_processes() {
        let a = args(&[
            "--devices",
            "20",
            "--procs",
            "2",
            "--write-mode",
            "coalesced",
        ]);
        let back: FleetArgs = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.devices, 20);
        assert_eq!(back.write_mode, WriteMode::Coalesced);
        assert_eq!(back.interval, a.interval);
        assert_eq!(back.common.host, a.common.host);
    }
}
