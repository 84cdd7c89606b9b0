//! The `pubsub` scenario: publishers and subscribers on `fleet/%d/telemetry`, in pairs,
//! fan-in, fan-out or a shared subscription group; QoS 0/1/2; open loop at a fixed rate
//! (latency from each message's intended send time) or closed loop with a bounded in-flight
//! window. Also the engine of `capacity`.
//!
//! Owns: the per-core connection tasks, the orchestration of a run (connect → start together →
//! warm-up → measure → drain → stop), and the accounting (sent, received, loss, duplicates,
//! reordering, latency). Must not touch: output formatting (see `report`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use clap::{Args, ValueEnum};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::sync::Semaphore;
use midge::codec::{
    self, Limits, Packet, ProtocolVersion, PubResp, Publish, PublishProperties, QoS, Subscribe,
    SubscribeProperties, SubscriptionOptions, TopicFilter, TopicName,
};
use serde::Serialize;

use crate::common::{
    parse_duration, thread_cpu, Clock, Common, CommonArgs, WriteMode, MAX_CONNECTIONS,
};
use crate::common::{spawn_cores, MAX_DURATION, MAX_MESSAGES};
use crate::net::{self, Conn, RecvError};
use crate::payload;
use crate::seq::SeqTracker;
use crate::stats::{Lat, Summary};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Publisher i → fleet/i/telemetry → subscriber i.
    Pairs,
    /// Many publishers, each subscriber subscribes fleet/+/telemetry (default 1 subscriber).
    FanIn,
    /// Few publishers (default 1), every subscriber gets every message.
    FanOut,
    /// Subscribers share $share/g/fleet/+/telemetry: each message to one of them.
    Shared,
}

#[derive(Args, Debug, Clone)]
pub struct PubsubArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// Options of the pubsub traffic itself (shared with `capacity`).
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    #[arg(long, value_enum, default_value = "pairs")]
    pub mode: Mode,
    /// Publisher connections (default: 10, or 1 for fan-out).
    #[arg(long)]
    pub publishers: Option<u32>,
    /// Subscriber connections (default: 10 for pairs/fan-out, 1 for fan-in, 4 for shared).
    #[arg(long)]
    pub subscribers: Option<u32>,
    /// QoS of publications and subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload bytes (≥ 16: publisher id, sequence number, intended send time).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Total offered messages/s across publishers (open loop); 0 = as fast as possible
    /// (closed loop, bounded by --inflight for QoS 1/2 and by TCP for QoS 0).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Max unacknowledged QoS 1/2 publications per publisher (also capped by the broker's
    /// v5 Receive Maximum).
    #[arg(long, default_value_t = 64)]
    pub inflight: u16,
    /// Warm-up excluded from the figures.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Measured duration after warm-up.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many messages in total (0 = no cap besides the duration).
    #[arg(long, default_value_t = 0)]
    pub messages: u64,
    /// After the last publication, wait at most this long for deliveries still in flight.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Topic pattern; %d is the publisher index.
    #[arg(long, default_value = "fleet/%d/telemetry")]
    pub topic: String,
    /// Broker pid: report its CPU-seconds per million delivered messages (/proc/PID/stat).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// per-packet: one write syscall per MQTT packet (one TLS record each), as device
    /// libraries send; coalesced: everything due at once in one write (catch-up publishes, the
    /// acknowledgements of one read), the loadgen's old behaviour.
    #[arg(long, value_enum, default_value = "per-packet")]
    pub write_mode: WriteMode,
}

/// A validated, `Send + Sync` description of the traffic.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub mode: Mode,
    pub publishers: u32,
    pub subscribers: u32,
    pub qos: u8,
    pub payload: usize,
    pub rate: f64,
    pub inflight: u16,
    pub warmup_ns: u64,
    pub duration_ns: u64,
    /// Total messages cap over all publishers (exact: split as evenly as possible).
    pub total_cap: u64,
    pub drain_ns: u64,
    pub topic: String,
    pub broker_pid: Option<u32>,
    pub write_mode: WriteMode,
}

impl LoadArgs {
    pub fn plan(&self) -> Result<Plan, String> {
        let (dp, ds) = match self.mode {
            Mode::Pairs => (10, 10),
            Mode::FanIn => (10, 1),
            Mode::FanOut => (1, 10),
            Mode::Shared => (10, 4),
        };
        let publishers = self.publishers.unwrap_or(dp);
        let subscribers = self.subscribers.unwrap_or(ds);
        if publishers == 0 || subscribers == 0 {
            return Err("need at least one publisher and one subscriber".into());
        }
        if self.mode == Mode::Pairs && publishers != subscribers {
            return Err(format!(
                "--mode pairs needs as many subscribers as publishers ({publishers} vs {subscribers})"
            ));
        }
        if (publishers + subscribers) as u64 > MAX_CONNECTIONS {
            return Err(format!("at most {MAX_CONNECTIONS} connections"));
        }
        if self.payload < payload::HEADER_LEN || self.payload > 1 << 20 {
            return Err(format!(
                "--payload must be {}..=1048576 bytes (it carries publisher id, sequence number and intended send time)",
                payload::HEADER_LEN
            ));
        }
        if !(self.rate >= 0.0 && self.rate <= 1e8) {
            return Err("--rate must be 0..=1e8 messages/s".into());
        }
        if self.warmup + self.duration > MAX_DURATION || self.duration.is_zero() {
            return Err(format!(
                "warm-up + duration must be > 0 and ≤ {MAX_DURATION:?}"
            ));
        }
        if self.drain > Duration::from_secs(60) {
            return Err("--drain must be ≤ 60s".into());
        }
        if self.inflight == 0 {
            return Err("--inflight must be ≥ 1".into());
        }
        if !self.topic.contains("%d") && self.mode == Mode::Pairs {
            return Err("--topic must contain %d in pairs mode".into());
        }
        let total_cap = if self.messages == 0 {
            MAX_MESSAGES
        } else {
            self.messages.min(MAX_MESSAGES)
        };
        if total_cap / publishers as u64 >= u32::MAX as u64 {
            return Err("--messages per publisher must fit 32-bit sequence numbers".into());
        }
        Ok(Plan {
            mode: self.mode,
            publishers,
            subscribers,
            qos: self.qos,
            payload: self.payload,
            rate: self.rate,
            inflight: self.inflight,
            warmup_ns: self.warmup.as_nanos() as u64,
            duration_ns: self.duration.as_nanos() as u64,
            total_cap,
            drain_ns: self.drain.as_nanos() as u64,
            topic: self.topic.clone(),
            broker_pid: self.broker_pid,
            write_mode: self.write_mode,
        })
    }
}

impl Plan {
    /// Messages publisher `i` may send so that the total is exactly `total_cap`.
    pub fn pub_cap(&self, i: u32) -> u64 {
        let p = self.publishers as u64;
        self.total_cap / p + u64::from((i as u64) < self.total_cap % p)
    }
    pub fn pub_topic(&self, i: u32) -> String {
        self.topic.replace("%d", &i.to_string())
    }
    pub fn sub_filter(&self, j: u32) -> String {
        match self.mode {
            Mode::Pairs => self.pub_topic(j),
            Mode::FanIn | Mode::FanOut => self.topic.replace("%d", "+"),
            Mode::Shared => format!("$share/g/{}", self.topic.replace("%d", "+")),
        }
    }
    /// Which tracking key subscriber j's arrivals count under (a shared group is one receiver).
    fn sub_key(&self, j: u32) -> u32 {
        if self.mode == Mode::Shared {
            0
        } else {
            j
        }
    }
    /// Deliveries each publication should cause.
    pub fn fanout(&self) -> u64 {
        match self.mode {
            Mode::Pairs | Mode::Shared => 1,
            Mode::FanIn | Mode::FanOut => self.subscribers as u64,
        }
    }
    /// Pairs in closed loop: a publisher may have at most `inflight` messages not yet received
    /// by its subscriber (same core in pairs mode). For QoS 0 there are no acknowledgements and
    /// TCP backpressure alone lets seconds of messages pile up in socket buffers and broker
    /// queues. For QoS 1/2 a broker acknowledges a publish before delivering it, so the ack
    /// window alone measures how fast a broker *accepts* messages: a broker faster at accepting
    /// than at delivering fills its subscribers' queues and drops by its queue policy. With
    /// both windows the run measures delivered throughput with no loss, for every broker.
    pub fn e2e_window(&self) -> bool {
        self.mode == Mode::Pairs && self.rate == 0.0
    }
    fn qos(&self) -> QoS {
        QoS::from_u8(self.qos).unwrap_or_default()
    }
}

/// One second of one core.
struct Snap {
    sec: u64,
    sent: u64,
    recv: u64,
    errors: u64,
    lat: Lat,
}

/// Cross-core coordination of a run.
struct Shared {
    clock: Clock,
    start_ns: AtomicU64,
    ready: AtomicU64,
    stop: AtomicBool,
    abort: Mutex<Option<String>>,
    aborted: AtomicBool,
    pubs_done: AtomicU64,
    /// Run nonce carried in every payload: deliveries of an earlier run are foreign.
    nonce: u16,
    /// Subscriber read buffer: large for few connections (fewer syscalls), small for many.
    read_buf: usize,
    /// Messages sent by finished publishers (exact once all are done; drives the drain).
    done_sent: AtomicU64,
    core_recv: Vec<AtomicU64>,
    tx: Mutex<mpsc::Sender<(usize, Snap)>>,
}

impl Shared {
    fn fail(&self, msg: String) {
        if let Ok(mut a) = self.abort.lock() {
            if a.is_none() {
                *a = Some(msg);
            }
        }
        self.aborted.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Per-core mutable state, shared by that core's tasks (single thread: RefCell, never held
/// across an await).
#[derive(Default)]
struct CoreState {
    lat: Lat,
    lat_interval: Lat,
    sent: u64,
    sent_interval: u64,
    sent_measured: u64,
    /// Latest intended send time written (the measured window ends there if a cap hit first).
    last_intended: u64,
    recv: u64,
    recv_interval: u64,
    recv_measured: u64,
    /// Arrivals inside the measured window (by arrival time), and the last of them.
    recv_window: u64,
    last_arrival: u64,
    foreign: u64,
    sent_per_pub: HashMap<u32, u64>,
    trackers: HashMap<(u32, u32), SeqTracker>,
    errors: HashMap<String, u64>,
    error_count: u64,
    acks: u64,
    /// End-to-end window waits that timed out (QoS 0 messages presumed dropped).
    window_timeouts: u64,
}

impl CoreState {
    fn error(&mut self, e: String) {
        *self.errors.entry(e).or_default() += 1;
        self.error_count += 1;
    }
}

/// What a core hands back.
struct CoreResult {
    lat: Lat,
    sent: u64,
    sent_measured: u64,
    last_intended: u64,
    recv: u64,
    recv_measured: u64,
    recv_window: u64,
    last_arrival: u64,
    foreign: u64,
    sent_per_pub: HashMap<u32, u64>,
    trackers: HashMap<(u32, u32), SeqTracker>,
    errors: HashMap<String, u64>,
    window_timeouts: u64,
    cpu: Duration,
    wall: Duration,
    runq_wait: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Interval {
    pub second: u64,
    pub sent_per_s: u64,
    pub recv_per_s: u64,
    pub errors: u64,
    pub latency: Summary,
}

/// Everything a pubsub run measured.
#[derive(Serialize)]
pub struct PubsubReport {
    pub plan: Plan,
    /// "per-packet" or "coalesced" (also in `plan`): how packets were handed to the kernel.
    pub write_mode: WriteMode,
    pub mqtt: String,
    pub tls: bool,
    pub cores: Vec<usize>,
    /// Publications written (whole run, warm-up included).
    pub sent: u64,
    /// Deliveries expected (sent × fan-out).
    pub expected: u64,
    /// Deliveries received (duplicates included).
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Deliveries whose payload was not ours.
    pub foreign: u64,
    /// Measured window (after warm-up), by intended send time.
    pub sent_measured: u64,
    pub received_measured: u64,
    pub measured_seconds: f64,
    /// Publications per second with an intended send time in the measured window.
    pub send_rate: f64,
    /// Deliveries per second arriving in the measured window (by arrival time).
    pub recv_rate: f64,
    /// End-to-end latency from intended send time to receipt, measured window only.
    pub latency: Summary,
    pub intervals: Vec<Interval>,
    pub errors: HashMap<String, u64>,
    /// Loadgen CPU busy fraction per core (1.0 = a whole CPU) during the run.
    pub loadgen_cpu_busy: Vec<f64>,
    pub loadgen_cpu_seconds: f64,
    /// Fraction of the run each loadgen core was runnable but waiting for a CPU.
    pub loadgen_runqueue_wait: Vec<f64>,
    /// Same for the broker (given --broker-pid), summed over its threads.
    pub broker_runqueue_wait: Option<f64>,
    /// Loadgen CPU per delivered message (whole run), µs.
    pub loadgen_cpu_us_per_msg: f64,
    /// Broker CPU over the whole run (given --broker-pid).
    pub broker_cpu_seconds: Option<f64>,
    /// Broker CPU-seconds per million delivered messages.
    pub broker_cpu_s_per_million: Option<f64>,
    /// Broker CPU over the measured window only (after warm-up, before the drain; None when
    /// a message cap ended the run first), and per million deliveries of the messages whose
    /// intended send time is in that window.
    pub broker_cpu_window_seconds: Option<f64>,
    pub broker_cpu_window_s_per_million: Option<f64>,
    pub warnings: Vec<String>,
    #[serde(skip)]
    pub lat_hist: Lat,
}

pub fn run(c: &Common, plan: &Plan) -> Result<PubsubReport, String> {
    let ncores = c.cores.len();
    let (tx, rx) = mpsc::channel::<(usize, Snap)>();
    let shared = Arc::new(Shared {
        clock: Clock::new(),
        start_ns: AtomicU64::new(0),
        ready: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        abort: Mutex::new(None),
        aborted: AtomicBool::new(false),
        pubs_done: AtomicU64::new(0),
        nonce: payload::new_nonce(),
        read_buf: if (plan.publishers + plan.subscribers) as usize / ncores > 1000 {
            4 << 10
        } else {
            64 << 10
        },
        done_sent: AtomicU64::new(0),
        core_recv: (0..ncores).map(|_| AtomicU64::new(0)).collect(),
        tx: Mutex::new(tx),
    });
    let total_conns = (plan.publishers + plan.subscribers) as u64;
    let handle = {
        let shared = shared.clone();
        let plan = Arc::new(plan.clone());
        let target = c.target.clone();
        let tls = c.tls.clone();
        let prefix = c.args.client_prefix.clone();
        let cores = c.cores.clone();
        std::thread::spawn(move || {
            spawn_cores(&cores, move |ci| {
                let ctx = Ctx {
                    ci,
                    ncores,
                    plan: plan.clone(),
                    shared: shared.clone(),
                    target: target.clone(),
                    tls: tls.clone(),
                    prefix: prefix.clone(),
                };
                core_main(ctx)
            })
        })
    };
    let clock = shared.clock;
    let quiet = c.args.quiet;
    // Phase 1: everyone connected and subscribed (or someone failed).
    let connect_deadline = clock.now_ns()
        + (c.target.timeout.as_nanos() as u64) * 2
        + total_conns * 2_000_000
        + 10_000_000_000;
    loop {
        if shared.aborted.load(Ordering::SeqCst) || handle.is_finished() {
            break;
        }
        if shared.ready.load(Ordering::SeqCst) >= total_conns {
            // Start together shortly in the future so every core sees the same t0.
            shared
                .start_ns
                .store(clock.now_ns() + 20_000_000, Ordering::SeqCst);
            break;
        }
        if clock.now_ns() > connect_deadline {
            shared.fail(format!(
                "only {} of {total_conns} connections ready before the deadline",
                shared.ready.load(Ordering::SeqCst)
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if !quiet && !shared.aborted.load(Ordering::SeqCst) {
        eprintln!(
            "connected {total_conns} clients on {ncores} core(s); running {:.1}s warm-up + {:.1}s",
            plan.warmup_ns as f64 / 1e9,
            plan.duration_ns as f64 / 1e9
        );
    }
    // Phase 2: progress, then drain, then stop.
    let start = shared.start_ns.load(Ordering::SeqCst);
    let run_end = start + plan.warmup_ns + plan.duration_ns;
    let hard_end = run_end + plan.drain_ns + 10_000_000_000;
    let mut pending: HashMap<u64, (usize, Snap)> = HashMap::new();
    let mut intervals = Vec::new();
    let mut drain_deadline: Option<u64> = None;
    let cpu0 = crate::cpu::self_cpu();
    let bcpu0 = plan.broker_pid.and_then(crate::cpu::proc_cpu);
    let bsched0 = plan.broker_pid.and_then(crate::cpu::proc_schedstat);
    let t_b0 = clock.now_ns();
    if plan.broker_pid.is_some() && bcpu0.is_none() {
        shared.fail("--broker-pid: cannot read /proc/PID/stat".into());
    }
    // The broker's CPU at the measured window's edges (warm-up and drain excluded).
    let (win_from, win_to) = (start + plan.warmup_ns, run_end);
    let (mut bw0, mut bw1): (Option<Duration>, Option<Duration>) = (None, None);
    while !shared.stopped() {
        while let Ok((_core, s)) = rx.recv_timeout(Duration::from_millis(10)) {
            let sec = s.sec;
            let e = pending.entry(sec).or_insert_with(|| {
                (
                    0,
                    Snap {
                        sec,
                        sent: 0,
                        recv: 0,
                        errors: 0,
                        lat: Lat::new(),
                    },
                )
            });
            e.0 += 1;
            e.1.sent += s.sent;
            e.1.recv += s.recv;
            e.1.errors += s.errors;
            e.1.lat.merge(&s.lat);
            if e.0 == ncores {
                if let Some((_, m)) = pending.remove(&sec) {
                    let iv = interval_of(&m);
                    if !quiet {
                        progress(&iv, plan);
                    }
                    intervals.push(iv);
                }
            }
        }
        let now = clock.now_ns();
        if plan.broker_pid.is_some() && start != 0 {
            if bw0.is_none() && now >= win_from {
                bw0 = plan.broker_pid.and_then(crate::cpu::proc_cpu);
            } else if bw0.is_some() && bw1.is_none() && now >= win_to {
                bw1 = plan.broker_pid.and_then(crate::cpu::proc_cpu);
            }
        }
        if start == 0 || now > hard_end {
            shared.stop.store(true, Ordering::SeqCst);
            break;
        }
        if drain_deadline.is_none()
            && shared.pubs_done.load(Ordering::SeqCst) >= plan.publishers as u64
        {
            drain_deadline = Some(now + plan.drain_ns);
        }
        if let Some(d) = drain_deadline {
            let sent = shared.done_sent.load(Ordering::SeqCst);
            let recv: u64 = shared
                .core_recv
                .iter()
                .map(|a| a.load(Ordering::SeqCst))
                .sum();
            if recv >= sent * plan.fanout() || now > d {
                shared.stop.store(true, Ordering::SeqCst);
            }
        }
    }
    let results = handle
        .join()
        .map_err(|_| "a loadgen core panicked".to_string())??;
    let cpu_all = crate::cpu::self_cpu().saturating_sub(cpu0);
    let bcpu = match (bcpu0, plan.broker_pid.and_then(crate::cpu::proc_cpu)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let bwait = match (
        bsched0,
        plan.broker_pid.and_then(crate::cpu::proc_schedstat),
    ) {
        (Some(a), Some(b)) => {
            Some(b.1.saturating_sub(a.1) as f64 / (clock.now_ns() - t_b0).max(1) as f64)
        }
        _ => None,
    };
    if let Some(msg) = shared.abort.lock().ok().and_then(|a| a.clone()) {
        return Err(msg);
    }
    let mut rest: Vec<_> = pending
        .into_values()
        .map(|(_, s)| interval_of(&s))
        .collect();
    intervals.append(&mut rest);
    intervals.sort_by_key(|i| i.second);
    Ok(merge(
        c,
        plan,
        results,
        intervals,
        cpu_all,
        (bcpu, bwait, bw0.zip(bw1).map(|(a, b)| b.saturating_sub(a))),
        start,
    ))
}

fn interval_of(s: &Snap) -> Interval {
    Interval {
        second: s.sec,
        sent_per_s: s.sent,
        recv_per_s: s.recv,
        errors: s.errors,
        latency: s.lat.summary(),
    }
}

fn progress(iv: &Interval, plan: &Plan) {
    let warm = iv.second < plan.warmup_ns.div_ceil(1_000_000_000);
    eprintln!(
        "[{:>4}s{}] sent {:>9}/s  recv {:>9}/s  p50 {:>9.1}us  p99 {:>9.1}us  max {:>9.1}us  errors {}",
        iv.second + 1,
        if warm { " warm" } else { "     " },
        iv.sent_per_s,
        iv.recv_per_s,
        iv.latency.p50_us,
        iv.latency.p99_us,
        iv.latency.max_us,
        iv.errors
    );
}

fn merge(
    c: &Common,
    plan: &Plan,
    results: Vec<CoreResult>,
    intervals: Vec<Interval>,
    cpu_all: Duration,
    // Broker CPU used and fraction of the run it waited for a CPU (given --broker-pid).
    // … and its CPU over the measured window only.
    (bcpu, bwait, bwin): (Option<Duration>, Option<f64>, Option<Duration>),
    start_ns: u64,
) -> PubsubReport {
    let mut lat = Lat::new();
    let mut sent_per_pub: HashMap<u32, u64> = HashMap::new();
    let mut trackers: HashMap<(u32, u32), SeqTracker> = HashMap::new();
    let mut errors: HashMap<String, u64> = HashMap::new();
    let (mut sent, mut sent_m, mut recv, mut recv_m, mut foreign) = (0, 0, 0, 0, 0);
    let mut busy = Vec::new();
    let mut last_intended = 0u64;
    let (mut recv_w, mut last_arrival) = (0u64, 0u64);
    let mut window_timeouts = 0u64;
    let mut runq = Vec::new();
    for r in &results {
        runq.push(r.runq_wait.as_secs_f64() / r.wall.as_secs_f64().max(1e-9));
        window_timeouts += r.window_timeouts;
        recv_w += r.recv_window;
        last_arrival = last_arrival.max(r.last_arrival);
        last_intended = last_intended.max(r.last_intended);
        lat.merge(&r.lat);
        sent += r.sent;
        sent_m += r.sent_measured;
        recv += r.recv;
        recv_m += r.recv_measured;
        foreign += r.foreign;
        for (p, n) in &r.sent_per_pub {
            *sent_per_pub.entry(*p).or_default() += n;
        }
        for (k, t) in &r.trackers {
            trackers.entry(*k).or_default().merge(t);
        }
        for (e, n) in &r.errors {
            *errors.entry(e.clone()).or_default() += n;
        }
        busy.push(if r.wall.is_zero() {
            0.0
        } else {
            r.cpu.as_secs_f64() / r.wall.as_secs_f64()
        });
    }
    // Loss: every receiver key against every publisher it should hear from.
    let keys: Vec<u32> = match plan.mode {
        Mode::Shared => vec![0],
        _ => (0..plan.subscribers).collect(),
    };
    let (mut lost, mut dups, mut reord) = (0u64, 0u64, 0u64);
    let empty = SeqTracker::new();
    for &k in &keys {
        let pubs: Vec<u32> = match plan.mode {
            Mode::Pairs => vec![k],
            _ => (0..plan.publishers).collect(),
        };
        for p in pubs {
            let n = sent_per_pub.get(&p).copied().unwrap_or(0);
            let t = trackers.get(&(k, p)).unwrap_or(&empty);
            lost += t.lost(n);
            dups += t.duplicates;
            // Within a shared group arrival order across members is not meaningful.
            if plan.mode != Mode::Shared {
                reord += t.reordered;
            }
        }
    }
    // The measured window is the duration, or shorter if the message cap ended sending first.
    let measure_from = start_ns + plan.warmup_ns;
    let window_ns = if sent < plan.total_cap {
        plan.duration_ns
    } else {
        last_intended
            .saturating_sub(measure_from)
            .min(plan.duration_ns)
    };
    let secs = (window_ns as f64 / 1e9).max(1e-9);
    let recv_window_ns = if sent < plan.total_cap {
        plan.duration_ns
    } else {
        last_arrival
            .saturating_sub(measure_from)
            .min(plan.duration_ns)
    };
    let mut warnings = Vec::new();
    if sent >= plan.total_cap && sent_m == 0 {
        warnings.push(
            "the message cap was reached during warm-up: nothing measured (use --warmup 0)".into(),
        );
    }
    for (i, b) in busy.iter().enumerate() {
        if *b >= 0.9 {
            warnings.push(format!(
                "loadgen core {} (CPU {}) was {:.0}% busy: the loadgen, not the broker, may have been the bottleneck",
                i,
                c.cores[i],
                b * 100.0
            ));
        }
    }
    if plan.rate > 0.0 && sent < plan.total_cap && (sent_m as f64) < plan.rate * secs * 0.95 {
        warnings.push(format!(
            "offered {:.0}/s but only {:.0}/s were sent in the measured window",
            plan.rate,
            sent_m as f64 / secs
        ));
    }
    for (i, w) in runq.iter().enumerate() {
        if *w >= 0.1 {
            warnings.push(format!(
                "loadgen core {i} waited {:.0}% of the run for a CPU held by other processes: throughput and latency are limited by this machine",
                w * 100.0
            ));
        }
    }
    if let Some(w) = bwait.filter(|w| *w >= 0.1) {
        warnings.push(format!(
            "the broker waited {:.0}% of the run for a CPU held by other processes: its throughput and latency are limited by this machine (its CPU per message is still valid)",
            w * 100.0
        ));
    }
    if window_timeouts > 0 {
        warnings.push(format!(
            "{window_timeouts} end-to-end window waits timed out after 1 s: a message was presumed dropped and the window widened by one each time{}",
            if lost == 0 {
                " (none was actually lost: the broker stalled)"
            } else {
                ""
            }
        ));
    }
    if lost > 0 && recv < sent * plan.fanout() {
        warnings.push(format!(
            "{} deliveries had not arrived when the drain ended: dropped by the broker or still queued (a longer --drain tells which)",
            sent * plan.fanout() - recv.min(sent * plan.fanout())
        ));
    }
    if sent_m > 0 && lat.is_empty() {
        warnings.push(
            "no message sent in the measured window arrived before the run ended (latency beyond the run)".into(),
        );
    }
    if lat.clamped > 0 {
        warnings.push(format!("{} latencies above 60 s were clamped", lat.clamped));
    }
    PubsubReport {
        plan: plan.clone(),
        write_mode: plan.write_mode,
        mqtt: c.args.mqtt.clone(),
        tls: c.tls.is_some(),
        cores: c.cores.clone(),
        sent,
        expected: sent * plan.fanout(),
        received: recv,
        lost,
        duplicates: dups,
        reordered: reord,
        foreign,
        sent_measured: sent_m,
        received_measured: recv_m,
        measured_seconds: secs,
        send_rate: sent_m as f64 / secs,
        recv_rate: recv_w as f64 / (recv_window_ns as f64 / 1e9).max(1e-9),
        latency: lat.summary(),
        intervals,
        errors,
        loadgen_cpu_busy: busy,
        loadgen_runqueue_wait: runq,
        broker_runqueue_wait: bwait,
        loadgen_cpu_seconds: cpu_all.as_secs_f64(),
        loadgen_cpu_us_per_msg: cpu_all.as_secs_f64() * 1e6 / recv.max(1) as f64,
        broker_cpu_seconds: bcpu.map(|d| d.as_secs_f64()),
        broker_cpu_s_per_million: bcpu.map(|d| d.as_secs_f64() * 1e6 / recv.max(1) as f64),
        broker_cpu_window_seconds: bwin.map(|d| d.as_secs_f64()),
        broker_cpu_window_s_per_million: bwin
            .filter(|_| recv_m > 0)
            .map(|d| d.as_secs_f64() * 1e6 / recv_m as f64),
        warnings,
        lat_hist: lat,
    }
}

/// What a core needs; cloned into each executor.
#[derive(Clone)]
struct Ctx {
    ci: usize,
    ncores: usize,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    target: net::Target,
    tls: Option<Arc<crate::tls::TlsSetup>>,
    prefix: String,
}

async fn open(ctx: &Ctx, i: u64, client_id: &str) -> Result<Conn, String> {
    let cfg = match &ctx.tls {
        None => None,
        Some(t) => {
            let m = t.minter();
            Some(t.config_for(i, client_id, m.as_ref())?)
        }
    };
    net::connect(&ctx.target, cfg, client_id, true)
        .await
        .map(|(c, _)| c)
        .map_err(|e| format!("{client_id}: {e}"))
}

async fn subscribe(
    conn: &mut Conn,
    filter: &str,
    qos: QoS,
    timeout: Duration,
) -> Result<(), String> {
    let f = TopicFilter::new(filter.to_string()).map_err(|e| format!("filter {filter}: {e}"))?;
    let p = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            f,
            SubscriptionOptions {
                qos,
                ..Default::default()
            },
        )],
        properties: SubscribeProperties::default(),
    });
    conn.send(&p).await.map_err(|e| format!("subscribe: {e}"))?;
    loop {
        match conn.recv(timeout).await {
            Ok(Packet::SubAck(a)) => {
                return match a.reason_codes.first() {
                    Some(rc) if rc.0 < 0x80 => Ok(()),
                    Some(rc) => Err(format!("SUBACK refused {filter}: {rc}")),
                    None => Err("empty SUBACK".into()),
                }
            }
            Ok(_) => continue,
            Err(RecvError::Timeout) => return Err("SUBACK timeout".into()),
            Err(RecvError::Closed) => return Err("closed before SUBACK".into()),
            Err(RecvError::Protocol(e)) => return Err(format!("SUBACK: {e}")),
        }
    }
}

async fn core_main(ctx: Ctx) -> CoreResult {
    let st = Rc::new(RefCell::new(CoreState::default()));
    let plan = ctx.plan.clone();
    let shared = ctx.shared.clone();
    // Connect this core's share of subscribers, then publishers, a bounded number at a time.
    let gate = Rc::new(Semaphore::new(64));
    let mut sub_tasks = Vec::new();
    for j in (0..plan.subscribers).filter(|j| *j as usize % ctx.ncores == ctx.ci) {
        let (ctx2, gate) = (ctx.clone(), gate.clone());
        sub_tasks.push(glommio::spawn_local(async move {
            let _ = gate.acquire(1).await;
            let id = format!("{}-s{j}", ctx2.prefix);
            let r = async {
                let mut c = open(&ctx2, j as u64, &id).await?;
                subscribe(
                    &mut c,
                    &ctx2.plan.sub_filter(j),
                    ctx2.plan.qos(),
                    ctx2.target.timeout,
                )
                .await
                .map_err(|e| format!("{id}: {e}"))?;
                Ok::<_, String>(c)
            }
            .await;
            gate.signal(1);
            if r.is_ok() {
                ctx2.shared.ready.fetch_add(1, Ordering::SeqCst);
            }
            (j, r)
        }));
    }
    let mut subs = Vec::new();
    for t in sub_tasks {
        match t.await {
            (j, Ok(c)) => subs.push((j, c)),
            (_, Err(e)) => shared.fail(e),
        }
    }
    let mut pub_tasks = Vec::new();
    for i in (0..plan.publishers).filter(|i| *i as usize % ctx.ncores == ctx.ci) {
        let (ctx2, gate) = (ctx.clone(), gate.clone());
        pub_tasks.push(glommio::spawn_local(async move {
            let _ = gate.acquire(1).await;
            let id = format!("{}-p{i}", ctx2.prefix);
            let r = open(&ctx2, (ctx2.plan.subscribers + i) as u64, &id).await;
            gate.signal(1);
            if r.is_ok() {
                ctx2.shared.ready.fetch_add(1, Ordering::SeqCst);
            }
            (i, r)
        }));
    }
    let mut pubs = Vec::new();
    for t in pub_tasks {
        match t.await {
            (i, Ok(c)) => pubs.push((i, c)),
            (_, Err(e)) => shared.fail(e),
        }
    }
    // Wait for the common start.
    let start = loop {
        if shared.stopped() {
            break 0;
        }
        let s = shared.start_ns.load(Ordering::SeqCst);
        if s != 0 {
            break s;
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    };
    let cpu0 = thread_cpu();
    let sched0 = crate::cpu::thread_schedstat().unwrap_or_default();
    let wall0 = shared.clock.now_ns();
    let mut tasks = Vec::new();
    let e2e: HashMap<u32, Rc<Semaphore>> = if plan.e2e_window() {
        subs.iter()
            .map(|(j, _)| (*j, Rc::new(Semaphore::new(u64::from(plan.inflight)))))
            .collect()
    } else {
        HashMap::new()
    };
    if start != 0 {
        for (j, c) in subs {
            tasks.push(glommio::spawn_local(subscriber(
                c,
                plan.write_mode.per_packet(),
                plan.sub_key(j),
                e2e.get(&j).cloned(),
                start + plan.warmup_ns,
                start + plan.warmup_ns + plan.duration_ns,
                shared.clone(),
                st.clone(),
            )));
        }
        let npubs = plan.publishers as f64;
        for (i, c) in pubs {
            tasks.push(glommio::spawn_local(publisher(
                c,
                i,
                // Stagger publishers so the aggregate is evenly spaced: phase i / rate.
                if plan.rate > 0.0 {
                    start + (i as f64 * 1e9 / plan.rate) as u64
                } else {
                    start
                },
                plan.rate / npubs,
                start,
                e2e.get(&i).cloned(),
                plan.clone(),
                shared.clone(),
                st.clone(),
            )));
        }
        // Ticker: per-second snapshots for the progress line, and counters for the drain.
        let mut next_sec = start + 1_000_000_000;
        let mut sec = 0u64;
        let tx = shared.tx.lock().map(|t| t.clone()).ok();
        while !shared.stopped() {
            glommio::timer::sleep(Duration::from_millis(20)).await;
            let now = shared.clock.now_ns();
            let mut s = st.borrow_mut();
            shared.core_recv[ctx.ci].store(s.recv, Ordering::SeqCst);
            if now >= next_sec {
                let snap = Snap {
                    sec,
                    sent: std::mem::take(&mut s.sent_interval),
                    recv: std::mem::take(&mut s.recv_interval),
                    errors: s.error_count,
                    lat: std::mem::take(&mut s.lat_interval),
                };
                if let Some(tx) = &tx {
                    let _ = tx.send((ctx.ci, snap));
                }
                sec += 1;
                next_sec += 1_000_000_000;
            }
        }
    }
    // Stop: cancel every connection task (dropping closes the sockets).
    drop(tasks);
    let cpu = thread_cpu().saturating_sub(cpu0);
    let wall = Duration::from_nanos(shared.clock.now_ns().saturating_sub(wall0));
    let runq_wait = Duration::from_nanos(
        crate::cpu::thread_schedstat()
            .unwrap_or_default()
            .1
            .saturating_sub(sched0.1),
    );
    let s = std::mem::take(&mut *st.borrow_mut());
    CoreResult {
        lat: s.lat,
        sent: s.sent,
        sent_measured: s.sent_measured,
        last_intended: s.last_intended,
        recv: s.recv,
        recv_measured: s.recv_measured,
        recv_window: s.recv_window,
        last_arrival: s.last_arrival,
        foreign: s.foreign,
        sent_per_pub: s.sent_per_pub,
        trackers: s.trackers,
        errors: s.errors,
        window_timeouts: s.window_timeouts,
        cpu,
        wall,
        runq_wait,
    }
}

#[allow(clippy::too_many_arguments)]
async fn subscriber(
    conn: Conn,
    per_packet: bool,
    key: u32,
    e2e: Option<Rc<Semaphore>>,
    measure_from: u64,
    measure_end: u64,
    shared: Arc<Shared>,
    st: Rc<RefCell<CoreState>>,
) {
    let nonce = shared.nonce;
    let Conn {
        mut stream,
        mut rbuf,
        version,
        ..
    } = conn;
    let clock = shared.clock;
    let mut tmp = vec![0u8; shared.read_buf];
    let mut out = BytesMut::with_capacity(4096);
    let mut ends: Vec<usize> = Vec::new();
    let limits = Limits::default();
    loop {
        let n = match stream.read(&mut tmp).await {
            Ok(0) => {
                if !shared.stopped() {
                    st.borrow_mut().error("subscriber: closed by broker".into());
                }
                return;
            }
            Ok(n) => n,
            Err(e) => {
                st.borrow_mut().error(format!("subscriber read: {e}"));
                return;
            }
        };
        rbuf.extend_from_slice(&tmp[..n]);
        // Everything in this read arrived by now.
        let now = clock.now_ns();
        let mut from_pair = 0u64;
        {
            let mut s = st.borrow_mut();
            loop {
                let p = match codec::decode(&mut rbuf, version, &limits) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => {
                        s.error(format!("subscriber decode: {}", net::decode_err(e)));
                        return;
                    }
                };
                match p {
                    Packet::Publish(p) => {
                        match p.qos {
                            QoS::AtMostOnce => {}
                            QoS::AtLeastOnce => codec::encode(
                                &Packet::PubAck(PubResp::new(p.packet_id)),
                                version,
                                &mut out,
                            ),
                            QoS::ExactlyOnce => codec::encode(
                                &Packet::PubRec(PubResp::new(p.packet_id)),
                                version,
                                &mut out,
                            ),
                        }
                        if p.qos != QoS::AtMostOnce {
                            ends.push(out.len());
                        }
                        let h = match payload::read(&p.payload) {
                            Some(h) if h.nonce == nonce => h,
                            _ => {
                                s.foreign += 1;
                                continue;
                            }
                        };
                        if now >= measure_from && now < measure_end {
                            s.recv_window += 1;
                            s.last_arrival = s.last_arrival.max(now);
                        }
                        let lat = now.saturating_sub(h.intended_ns);
                        s.recv += 1;
                        s.recv_interval += 1;
                        s.lat_interval.record(lat);
                        if h.intended_ns >= measure_from {
                            s.recv_measured += 1;
                            s.lat.record(lat);
                        }
                        s.trackers
                            .entry((key, h.publisher))
                            .or_default()
                            .record(h.seq);
                        if h.publisher == key {
                            from_pair += 1;
                        }
                    }
                    Packet::PubRel(r) => {
                        codec::encode(
                            &Packet::PubComp(PubResp::new(r.packet_id)),
                            version,
                            &mut out,
                        );
                        ends.push(out.len());
                    }
                    Packet::Disconnect(d) => {
                        s.error(format!("subscriber: DISCONNECT from broker: {}", d.reason));
                        return;
                    }
                    _ => {}
                }
            }
        }
        if let Some(w) = &e2e {
            if from_pair > 0 {
                w.signal(from_pair);
            }
        }
        if !out.is_empty() {
            if let Err(e) = write_packets(&mut stream, &out, &ends, per_packet).await {
                st.borrow_mut().error(format!("subscriber write: {e}"));
                return;
            }
            out.clear();
            ends.clear();
        }
    }
}

/// A PUBLISH encoded once by the codec, with the offsets of the fields patched per message.
pub struct Template {
    pub bytes: Vec<u8>,
    pub pid_off: Option<usize>,
    pub payload_off: usize,
}

impl Template {
    /// Encode a PUBLISH with marker values and locate them, so per-message sends patch bytes
    /// in place instead of re-encoding (no allocation per message).
    pub fn new(
        topic: &str,
        qos: QoS,
        payload_len: usize,
        version: ProtocolVersion,
    ) -> Result<Self, String> {
        let topic = TopicName::new(topic.to_string()).map_err(|e| format!("topic {topic}: {e}"))?;
        let marker_pid = 0xA5C3u16;
        let p = Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic,
            packet_id: if qos == QoS::AtMostOnce {
                0
            } else {
                marker_pid
            },
            payload: Bytes::from(vec![0xEEu8; payload_len]),
            properties: PublishProperties::default(),
        });
        let mut b = BytesMut::new();
        codec::encode(&p, version, &mut b);
        let bytes = b.to_vec();
        let payload_off = bytes
            .len()
            .checked_sub(payload_len)
            .ok_or("encoded PUBLISH shorter than its payload")?;
        if bytes[payload_off..].iter().any(|&x| x != 0xEE) {
            return Err("payload is not at the end of the encoded PUBLISH".into());
        }
        let pid_off = if qos == QoS::AtMostOnce {
            None
        } else {
            // v5 puts a property length (0 → one byte) between packet id and payload.
            let off = payload_off
                .checked_sub(2 + usize::from(version.is_v5()))
                .ok_or("encoded PUBLISH too short for a packet id")?;
            if bytes[off..off + 2] != marker_pid.to_be_bytes() {
                return Err("cannot locate the packet id in the encoded PUBLISH".into());
            }
            Some(off)
        };
        let mut t = Template {
            bytes,
            pid_off,
            payload_off,
        };
        t.bytes[payload_off..].fill(0);
        Ok(t)
    }

    /// Append one message to `out`.
    #[inline]
    pub fn append(&self, out: &mut Vec<u8>, pid: u16, h: payload::Header) {
        let at = out.len();
        out.extend_from_slice(&self.bytes);
        if let Some(o) = self.pid_off {
            out[at + o..at + o + 2].copy_from_slice(&pid.to_be_bytes());
        }
        payload::write(&mut out[at + self.payload_off..], h);
    }
}

type WHalf = futures_lite::io::WriteHalf<net::Stream>;

#[allow(clippy::too_many_arguments)]
async fn publisher(
    conn: Conn,
    id: u32,
    first_ns: u64,
    rate: f64,
    start: u64,
    e2e: Option<Rc<Semaphore>>,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    st: Rc<RefCell<CoreState>>,
) {
    let qos = plan.qos();
    let version = conn.version;
    let tmpl = match Template::new(&plan.pub_topic(id), qos, plan.payload, version) {
        Ok(t) => t,
        Err(e) => {
            shared.fail(e);
            return;
        }
    };
    let window = u64::from(plan.inflight.min(conn.receive_maximum).max(1));
    let win = Rc::new(Semaphore::new(window));
    let Conn { stream, rbuf, .. } = conn;
    let (r, w) = futures_lite::io::split(stream);
    // The windows that bound this publisher: broker acknowledgements (QoS 1/2) and end-to-end
    // deliveries (pairs, closed loop); none for open loop QoS 0 (it runs on its schedule).
    let gates: Vec<Rc<Semaphore>> = e2e
        .into_iter()
        .chain((qos != QoS::AtMostOnce).then(|| win.clone()))
        .collect();
    // The write half is shared with the ack reader (QoS 2 sends PUBREL); `wlock` serialises
    // writers and the half is taken out while written so no RefCell borrow spans an await.
    let w: Rc<RefCell<Option<WHalf>>> = Rc::new(RefCell::new(Some(w)));
    let wlock = Rc::new(Semaphore::new(1));
    let per_packet = plan.write_mode.per_packet();
    let reader = if qos != QoS::AtMostOnce {
        Some(glommio::spawn_local(ack_reader(
            r,
            rbuf,
            version,
            win.clone(),
            w.clone(),
            wlock.clone(),
            st.clone(),
            per_packet,
        )))
    } else {
        None
    };
    let clock = shared.clock;
    let measure_from = start + plan.warmup_ns;
    let end = start + plan.warmup_ns + plan.duration_ns;
    let mut sched = (rate > 0.0).then(|| crate::sched::RateScheduler::new(first_ns, rate));
    let cap = plan.pub_cap(id);
    let mut seq: u64 = 0;
    let mut pid: u16 = 0;
    // Grows to a batch's size only when catching up (many connections must stay cheap).
    let mut out: Vec<u8> = Vec::new();
    let batch_max = (64 << 10usize).max(tmpl.bytes.len());
    // Everyone starts at the common t0 (open loop: the schedule starts there anyway).
    clock.sleep_until(start).await;
    'run: while !shared.stopped() && seq < cap {
        // Wait for the first message of the next batch.
        if let Some(s) = &sched {
            let t = s.peek();
            if t >= end {
                break;
            }
            clock.sleep_until(t).await;
        } else if clock.now_ns() >= end {
            break;
        }
        // Fast path: every window has room (no timer armed per message).
        let have_all = try_acquire_all(&gates);
        for g in gates.iter().filter(|_| !have_all) {
            // An end-to-end window leaks a permit for every message the broker drops, so a
            // stalled wait is bounded: after 1 s the oldest message is presumed lost.
            // (Acknowledgement windows wait in 1 s slices so a stop is noticed.)
            let is_ack_window = Rc::ptr_eq(g, &win);
            loop {
                let got =
                    futures_lite::future::or(async { Some(g.acquire(1).await.is_ok()) }, async {
                        glommio::timer::sleep(Duration::from_secs(1)).await;
                        None
                    })
                    .await;
                match got {
                    Some(true) => break,
                    Some(false) => break 'run, // connection closed
                    None if shared.stopped() => break 'run,
                    None if is_ack_window => continue,
                    None => {
                        st.borrow_mut().window_timeouts += 1;
                        break;
                    }
                }
            }
        }
        let mut n = 0u64;
        let mut measured = 0u64;
        let mut last_intended = 0u64;
        loop {
            let now = clock.now_ns();
            let intended = match &mut sched {
                Some(s) => match s.take_due(now) {
                    Some(t) if t < end => t,
                    _ => break,
                },
                None if now < end => now,
                None => break,
            };
            pid = if qos == QoS::AtMostOnce {
                0
            } else if pid == u16::MAX {
                1
            } else {
                pid + 1
            };
            last_intended = intended;
            tmpl.append(
                &mut out,
                pid,
                payload::Header {
                    publisher: id,
                    seq,
                    nonce: shared.nonce,
                    intended_ns: intended,
                },
            );
            seq += 1;
            n += 1;
            if intended >= measure_from {
                measured += 1;
            }
            // A device writes each packet on its own.
            if per_packet {
                break;
            }
            // Batch overdue messages (catch-up) or, closed loop, as many as fit, while the
            // in-flight window allows.
            if seq >= cap || out.len() + tmpl.bytes.len() > batch_max {
                break;
            }
            if let Some(s) = &sched {
                if s.peek() > clock.now_ns() {
                    break;
                }
            }
            if !try_acquire_all(&gates) {
                break;
            }
        }
        if n == 0 {
            // Acquired a window slot but nothing was due (end reached): give it back.
            for g in &gates {
                g.signal(1);
            }
            if sched.as_ref().is_some_and(|s| s.peek() >= end) || clock.now_ns() >= end {
                break;
            }
            continue;
        }
        if write_locked(&w, &wlock, &out).await.is_err() {
            st.borrow_mut().error("publisher write failed".into());
            break 'run;
        }
        out.clear();
        let mut s = st.borrow_mut();
        s.sent += n;
        s.sent_interval += n;
        s.sent_measured += measured;
        s.last_intended = s.last_intended.max(last_intended);
        *s.sent_per_pub.entry(id).or_default() += n;
    }
    shared.done_sent.fetch_add(seq, Ordering::SeqCst);
    shared.pubs_done.fetch_add(1, Ordering::SeqCst);
    // Keep the connection (and the ack reader) alive until the run stops so QoS 1/2 flows
    // complete; the core cancels this task at stop.
    if let Some(r) = reader {
        r.await;
    } else {
        futures_lite::future::pending::<()>().await;
    }
}

async fn write_locked(
    w: &Rc<RefCell<Option<WHalf>>>,
    lock: &Rc<Semaphore>,
    buf: &[u8],
) -> std::io::Result<()> {
    lock.acquire(1)
        .await
        .map_err(|_| std::io::Error::other("closed"))?;
    let mut half = w
        .borrow_mut()
        .take()
        .ok_or_else(|| std::io::Error::other("no writer"))?;
    // flush: TLS may keep the tail of a record buffered until flushed.
    let r = match half.write_all(buf).await {
        Ok(()) => half.flush().await,
        e => e,
    };
    *w.borrow_mut() = Some(half);
    lock.signal(1);
    r
}

#[allow(clippy::too_many_arguments)]
async fn ack_reader(
    mut r: futures_lite::io::ReadHalf<net::Stream>,
    mut rbuf: BytesMut,
    version: ProtocolVersion,
    win: Rc<Semaphore>,
    w: Rc<RefCell<Option<WHalf>>>,
    wlock: Rc<Semaphore>,
    st: Rc<RefCell<CoreState>>,
    per_packet: bool,
) {
    let mut tmp = vec![0u8; 2048];
    let mut out = BytesMut::with_capacity(1024);
    let mut ends: Vec<usize> = Vec::new();
    let limits = Limits::default();
    loop {
        let n = match r.read(&mut tmp).await {
            Ok(0) | Err(_) => {
                st.borrow_mut().error("publisher: connection closed".into());
                win.close();
                return;
            }
            Ok(n) => n,
        };
        rbuf.extend_from_slice(&tmp[..n]);
        let mut freed = 0;
        loop {
            match codec::decode(&mut rbuf, version, &limits) {
                Ok(Some(Packet::PubAck(_))) | Ok(Some(Packet::PubComp(_))) => freed += 1,
                Ok(Some(Packet::PubRec(p))) => {
                    codec::encode(
                        &Packet::PubRel(PubResp::new(p.packet_id)),
                        version,
                        &mut out,
                    );
                    ends.push(out.len());
                }
                Ok(Some(Packet::Disconnect(d))) => {
                    st.borrow_mut()
                        .error(format!("publisher: DISCONNECT from broker: {}", d.reason));
                    win.close();
                    return;
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    st.borrow_mut()
                        .error(format!("publisher decode: {}", net::decode_err(e)));
                    win.close();
                    return;
                }
            }
        }
        if freed > 0 {
            st.borrow_mut().acks += freed;
            win.signal(freed);
        }
        if !out.is_empty() {
            let mut from = 0;
            let segments: &[usize] = if per_packet { &ends } else { &[out.len()] };
            for &to in segments {
                if write_locked(&w, &wlock, &out[from..to]).await.is_err() {
                    win.close();
                    return;
                }
                from = to;
            }
            out.clear();
            ends.clear();
        }
    }
}

/// Write `buf`, packets ending at the offsets in `ends`: one write each (per-packet), or all
/// in one write (coalesced). Flushed, so a TLS stream sends its records now.
pub async fn write_packets<W: futures_lite::AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    ends: &[usize],
    per_packet: bool,
) -> std::io::Result<()> {
    if per_packet {
        let mut from = 0;
        for &to in ends {
            w.write_all(&buf[from..to]).await?;
            w.flush().await?;
            from = to;
        }
        Ok(())
    } else {
        w.write_all(buf).await?;
        w.flush().await
    }
}

/// Take one slot of every window, or none (a partial take is given back).
fn try_acquire_all(gates: &[Rc<Semaphore>]) -> bool {
    for (i, g) in gates.iter().enumerate() {
        if !g.try_acquire(1).unwrap_or(false) {
            for h in &gates[..i] {
                h.signal(1);
            }
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(version: ProtocolVersion, qos: QoS) {
        let t = Template::new("fleet/7/telemetry", qos, 40, version).unwrap();
        let mut out = Vec::new();
        for (pid, seq) in [(77u16, 5u64), (65535, 6)] {
            t.append(
                &mut out,
                pid,
                payload::Header {
                    publisher: 7,
                    seq,
                    nonce: 3,
                    intended_ns: 123_456 + seq,
                },
            );
        }
        let mut buf = BytesMut::from(&out[..]);
        for (pid, seq) in [(77u16, 5u64), (65535, 6)] {
            let p = codec::decode(&mut buf, version, &Limits::default())
                .unwrap()
                .unwrap();
            let Packet::Publish(p) = p else {
                panic!("not a publish")
            };
            assert_eq!(p.topic.as_str(), "fleet/7/telemetry");
            assert_eq!(p.qos, qos);
            assert_eq!(p.packet_id, if qos == QoS::AtMostOnce { 0 } else { pid });
            assert_eq!(p.payload.len(), 40);
            let h = payload::read(&p.payload).unwrap();
            assert_eq!((h.publisher, h.seq, h.intended_ns), (7, seq, 123_456 + seq));
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn template_patches_decode_as_the_intended_publish() {
        for v in [ProtocolVersion::V311, ProtocolVersion::V5] {
            for q in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                roundtrip(v, q);
            }
        }
    }

    fn args(mode: Mode, p: Option<u32>, s: Option<u32>) -> LoadArgs {
        LoadArgs {
            mode,
            publishers: p,
            subscribers: s,
            qos: 0,
            payload: 64,
            rate: 0.0,
            inflight: 64,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(1),
            messages: 0,
            drain: Duration::from_secs(1),
            topic: "fleet/%d/telemetry".into(),
            broker_pid: None,
            write_mode: WriteMode::PerPacket,
        }
    }

    #[test]
    fn topology_filters_and_fanout() {
        let p = args(Mode::Pairs, Some(3), Some(3)).plan().unwrap();
        assert_eq!(p.sub_filter(2), "fleet/2/telemetry");
        assert_eq!(p.fanout(), 1);
        let p = args(Mode::FanOut, None, Some(5)).plan().unwrap();
        assert_eq!((p.publishers, p.fanout()), (1, 5));
        assert_eq!(p.sub_filter(0), "fleet/+/telemetry");
        let p = args(Mode::Shared, None, None).plan().unwrap();
        assert_eq!(p.sub_filter(1), "$share/g/fleet/+/telemetry");
        assert_eq!(p.fanout(), 1);
        assert!(args(Mode::Pairs, Some(3), Some(2)).plan().is_err());
        let mut a = args(Mode::Pairs, None, None);
        a.payload = 15;
        assert!(a.plan().is_err());
        a.payload = 16;
        a.messages = 25;
        let p = a.plan().unwrap();
        let caps: Vec<u64> = (0..10).map(|i| p.pub_cap(i)).collect();
        assert_eq!(caps, vec![3, 3, 3, 3, 3, 2, 2, 2, 2, 2]);
        assert_eq!(caps.iter().sum::<u64>(), 25);
    }
}
