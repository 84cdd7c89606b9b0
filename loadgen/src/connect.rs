//! The `connect` scenario: open N connections at a fixed rate (open loop) or as fast as
//! `--concurrency` allows, hold them idle, and measure each phase (TCP connect, TLS
//! handshake, CONNACK) separately, failures by reason, and — given the broker's pid — its
//! resident memory per connection and CPU per handshake.
//!
//! Owns: the connect scenario's tasks and report. Must not touch: pubsub traffic.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use clap::Args;
use glommio::sync::Semaphore;
use serde::Serialize;

use crate::common::{parse_duration, spawn_cores, thread_cpu, Clock, Common, CommonArgs};
use crate::common::{MAX_CONNECTIONS, MAX_DURATION};
use crate::net::{self, Conn};
use crate::stats::{Lat, Summary};

#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: u64,
    /// New connections per second (open loop); 0 = as fast as --concurrency allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Connection attempts in progress at once (closed loop), split over cores.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// Keep all connections open and idle this long once the last one is up.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Broker pid: report its RSS per connection and CPU per handshake.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Give up opening connections after this long.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub max_time: Duration,
}

#[derive(Default)]
struct CoreState {
    tcp: Lat,
    tls: Lat,
    connack: Lat,
    total: Lat,
    ok: u64,
    resumed: u64,
    failures: HashMap<String, u64>,
    held: Vec<Conn>,
    interval_ok: u64,
    interval_fail: u64,
    interval_total: Lat,
}

struct Snap {
    sec: u64,
    ok: u64,
    fail: u64,
    total: Lat,
}

struct CoreResult {
    tcp: Lat,
    tls: Lat,
    connack: Lat,
    total: Lat,
    ok: u64,
    resumed: u64,
    failures: HashMap<String, u64>,
    cpu: Duration,
    wall: Duration,
    runq_wait: Duration,
}

#[derive(Serialize, Debug, Clone)]
pub struct ConnectInterval {
    pub second: u64,
    pub connects_per_s: u64,
    pub failures: u64,
    pub latency: Summary,
}

#[derive(Serialize)]
pub struct ConnectReport {
    pub connections: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub resumed: u64,
    pub tls: bool,
    pub mqtt: String,
    pub open_seconds: f64,
    pub handshakes_per_s: f64,
    pub tcp_connect: Summary,
    pub tls_handshake: Summary,
    pub connack: Summary,
    pub total: Summary,
    pub failures: HashMap<String, u64>,
    pub intervals: Vec<ConnectInterval>,
    pub broker_rss_before: Option<u64>,
    pub broker_rss_after: Option<u64>,
    pub broker_rss_per_conn: Option<f64>,
    pub broker_cpu_seconds: Option<f64>,
    pub broker_cpu_ms_per_handshake: Option<f64>,
    pub loadgen_cpu_busy: Vec<f64>,
    /// Fraction of the open phase each loadgen core / the broker waited for a CPU.
    pub loadgen_runqueue_wait: Vec<f64>,
    pub broker_runqueue_wait: Option<f64>,
    pub warnings: Vec<String>,
    #[serde(skip)]
    pub hists: Vec<(&'static str, Lat)>,
}

struct Shared {
    clock: Clock,
    opened: AtomicU64,
    done: AtomicU64,
    release: AtomicBool,
    tx: std::sync::Mutex<mpsc::Sender<Snap>>,
}

pub fn run(c: &Common, a: &ConnectArgs) -> Result<ConnectReport, String> {
    if a.connections == 0 || a.connections > MAX_CONNECTIONS {
        return Err(format!("--connections must be 1..={MAX_CONNECTIONS}"));
    }
    if !(a.rate >= 0.0 && a.rate <= 1e6) {
        return Err("--rate must be 0..=1e6 connections/s".into());
    }
    if a.concurrency == 0 {
        return Err("--concurrency must be ≥ 1".into());
    }
    if a.hold > MAX_DURATION || a.max_time > MAX_DURATION {
        return Err(format!("--hold/--max-time must be ≤ {MAX_DURATION:?}"));
    }
    let nofile = nofile_limit();
    if a.connections + 64 > nofile {
        return Err(format!(
            "{} connections need more file descriptors than `ulimit -n` allows ({nofile})",
            a.connections
        ));
    }
    let ncores = c.cores.len();
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        clock: Clock::new(),
        opened: AtomicU64::new(0),
        done: AtomicU64::new(0),
        release: AtomicBool::new(false),
        tx: std::sync::Mutex::new(tx),
    });
    let rss0 = a.broker_pid.and_then(crate::cpu::proc_rss);
    let bcpu0 = a.broker_pid.and_then(crate::cpu::proc_cpu);
    let bsched0 = a.broker_pid.and_then(crate::cpu::proc_schedstat);
    if a.broker_pid.is_some() && (rss0.is_none() || bcpu0.is_none()) {
        return Err(format!(
            "--broker-pid {}: cannot read /proc/{0}/status or stat",
            a.broker_pid.unwrap_or(0)
        ));
    }
    let handle = {
        let (shared, target, tls, prefix, cores) = (
            shared.clone(),
            c.target.clone(),
            c.tls.clone(),
            c.args.client_prefix.clone(),
            c.cores.clone(),
        );
        let a = a.clone();
        std::thread::spawn(move || {
            spawn_cores(&cores, move |ci| {
                core_main(
                    ci,
                    ncores,
                    a.clone(),
                    shared.clone(),
                    target.clone(),
                    tls.clone(),
                    prefix.clone(),
                )
            })
        })
    };
    let clock = shared.clock;
    let t_start = clock.now_ns();
    let deadline = t_start + a.max_time.as_nanos() as u64;
    let mut pending: HashMap<u64, (usize, Snap)> = HashMap::new();
    let mut intervals = Vec::new();
    // Open phase: until every attempt finished (or max time).
    let mut t_open_end = loop {
        while let Ok(s) = rx.recv_timeout(Duration::from_millis(10)) {
            collect(&mut pending, &mut intervals, s, ncores, c.args.quiet);
        }
        let now = clock.now_ns();
        if shared.done.load(Ordering::SeqCst) >= a.connections || handle.is_finished() {
            break now;
        }
        if now > deadline {
            if !c.args.quiet {
                eprintln!("--max-time reached; releasing");
            }
            break now;
        }
    };
    // Let the broker settle its allocations before sampling its memory.
    std::thread::sleep(Duration::from_millis(200));
    let rss1 = a.broker_pid.and_then(crate::cpu::proc_rss);
    let bcpu1 = a.broker_pid.and_then(crate::cpu::proc_cpu);
    let bsched1 = a.broker_pid.and_then(crate::cpu::proc_schedstat);
    if !c.args.quiet && !a.hold.is_zero() {
        eprintln!(
            "holding {} connections for {:?}",
            shared.opened.load(Ordering::SeqCst),
            a.hold
        );
    }
    let hold_end = std::time::Instant::now() + a.hold;
    while std::time::Instant::now() < hold_end && !handle.is_finished() {
        while let Ok(s) = rx.recv_timeout(Duration::from_millis(50)) {
            collect(&mut pending, &mut intervals, s, ncores, c.args.quiet);
        }
    }
    shared.release.store(true, Ordering::SeqCst);
    let results = handle
        .join()
        .map_err(|_| "a loadgen core panicked".to_string())??;
    while let Ok(s) = rx.try_recv() {
        collect(&mut pending, &mut intervals, s, ncores, true);
    }
    for (_, (_, s)) in pending.drain() {
        intervals.push(interval_of(&s));
    }
    intervals.sort_by_key(|i| i.second);
    t_open_end = t_open_end.max(t_start + 1);
    let mut r = CoreResult {
        tcp: Lat::new(),
        tls: Lat::new(),
        connack: Lat::new(),
        total: Lat::new(),
        ok: 0,
        resumed: 0,
        failures: HashMap::new(),
        cpu: Duration::ZERO,
        wall: Duration::ZERO,
        runq_wait: Duration::ZERO,
    };
    let mut busy = Vec::new();
    let mut runq = Vec::new();
    for x in &results {
        runq.push(x.runq_wait.as_secs_f64() / x.wall.as_secs_f64().max(1e-9));
        r.tcp.merge(&x.tcp);
        r.tls.merge(&x.tls);
        r.connack.merge(&x.connack);
        r.total.merge(&x.total);
        r.ok += x.ok;
        r.resumed += x.resumed;
        for (k, v) in &x.failures {
            *r.failures.entry(k.clone()).or_default() += v;
        }
        busy.push(if x.wall.is_zero() {
            0.0
        } else {
            x.cpu.as_secs_f64() / x.wall.as_secs_f64()
        });
    }
    let failed: u64 = r.failures.values().sum();
    let open_s = (t_open_end - t_start) as f64 / 1e9;
    let mut warnings = Vec::new();
    for (i, b) in busy.iter().enumerate() {
        if *b >= 0.9 {
            warnings.push(format!(
                "loadgen core {i} (CPU {}) was {:.0}% busy: the loadgen, not the broker, may have been the bottleneck",
                c.cores[i],
                b * 100.0
            ));
        }
    }
    for (i, w) in runq.iter().enumerate() {
        if *w >= 0.1 {
            warnings.push(format!(
                "loadgen core {i} waited {:.0}% of the run for a CPU held by other processes: rates and latencies are limited by this machine",
                w * 100.0
            ));
        }
    }
    let bwait = match (bsched0, bsched1) {
        (Some(a), Some(b)) => Some(b.1.saturating_sub(a.1) as f64 / (open_s * 1e9).max(1.0)),
        _ => None,
    };
    if let Some(w) = bwait.filter(|w| *w >= 0.1) {
        warnings.push(format!(
            "the broker waited {:.0}% of the open phase for a CPU held by other processes (its CPU per handshake is still valid)",
            w * 100.0
        ));
    }
    let not_tried = a.connections.saturating_sub(r.ok + failed);
    if not_tried > 0 {
        warnings.push(format!(
            "{not_tried} connections were not attempted (--max-time)"
        ));
    }
    let bcpu = match (bcpu0, bcpu1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64()),
        _ => None,
    };
    let rss_per = match (rss0, rss1) {
        (Some(a), Some(b)) if r.ok > 0 => Some((b as f64 - a as f64) / r.ok as f64),
        _ => None,
    };
    Ok(ConnectReport {
        connections: a.connections,
        succeeded: r.ok,
        failed,
        resumed: r.resumed,
        tls: c.tls.is_some(),
        mqtt: c.args.mqtt.clone(),
        open_seconds: open_s,
        handshakes_per_s: r.ok as f64 / open_s,
        tcp_connect: r.tcp.summary(),
        tls_handshake: r.tls.summary(),
        connack: r.connack.summary(),
        total: r.total.summary(),
        failures: r.failures,
        intervals,
        broker_rss_before: rss0,
        broker_rss_after: rss1,
        broker_rss_per_conn: rss_per,
        broker_cpu_seconds: bcpu,
        broker_cpu_ms_per_handshake: bcpu.filter(|_| r.ok > 0).map(|s| s * 1e3 / r.ok as f64),
        loadgen_cpu_busy: busy,
        loadgen_runqueue_wait: runq,
        broker_runqueue_wait: bwait,
        warnings,
        hists: vec![
            ("tcp_connect", r.tcp),
            ("tls_handshake", r.tls),
            ("connack", r.connack),
            ("connect_total", r.total),
        ],
    })
}

fn nofile_limit() -> u64 {
    // SAFETY: zeroed rlimit is valid; getrlimit writes into it.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1024;
    }
    rl.rlim_cur
}

fn interval_of(s: &Snap) -> ConnectInterval {
    ConnectInterval {
        second: s.sec,
        connects_per_s: s.ok,
        failures: s.fail,
        latency: s.total.summary(),
    }
}

fn collect(
    pending: &mut HashMap<u64, (usize, Snap)>,
    out: &mut Vec<ConnectInterval>,
    s: Snap,
    ncores: usize,
    quiet: bool,
) {
    let sec = s.sec;
    let e = pending.entry(sec).or_insert_with(|| {
        (
            0,
            Snap {
                sec,
                ok: 0,
                fail: 0,
                total: Lat::new(),
            },
        )
    });
    e.0 += 1;
    e.1.ok += s.ok;
    e.1.fail += s.fail;
    e.1.total.merge(&s.total);
    if e.0 == ncores {
        if let Some((_, m)) = pending.remove(&sec) {
            let iv = interval_of(&m);
            if !quiet {
                eprintln!(
                    "[{:>4}s] connects {:>7}/s  p50 {:>9.1}us  p99 {:>9.1}us  failures {}",
                    iv.second + 1,
                    iv.connects_per_s,
                    iv.latency.p50_us,
                    iv.latency.p99_us,
                    iv.failures
                );
            }
            out.push(iv);
        }
    }
}

async fn core_main(
    ci: usize,
    ncores: usize,
    a: ConnectArgs,
    shared: Arc<Shared>,
    target: net::Target,
    tls: Option<Arc<crate::tls::TlsSetup>>,
    prefix: String,
) -> CoreResult {
    let st = Rc::new(RefCell::new(CoreState::default()));
    let mine: Vec<u64> = (0..a.connections)
        .filter(|i| *i as usize % ncores == ci)
        .collect();
    // Prepare TLS configs (and mint identities) before timing anything.
    let minter = tls.as_ref().and_then(|t| t.minter());
    let mut cfgs = Vec::with_capacity(mine.len());
    for &i in &mine {
        let id = format!("{prefix}-c{i}");
        let cfg = match &tls {
            None => None,
            Some(t) => match t.config_for(i, &id, minter.as_ref()) {
                Ok(c) => Some(c),
                Err(e) => {
                    st.borrow_mut()
                        .failures
                        .insert(format!("tls config: {e}"), 1);
                    None
                }
            },
        };
        cfgs.push((i, id, cfg));
    }
    let clock = shared.clock;
    let cpu0 = thread_cpu();
    let sched0 = crate::cpu::thread_schedstat().unwrap_or_default();
    let wall0 = clock.now_ns();
    let start = clock.now_ns() + 5_000_000;
    let per_core = (a.concurrency as usize).div_ceil(ncores).max(1) as u64;
    let gate = Rc::new(Semaphore::new(per_core));
    let mut sched = (a.rate > 0.0).then(|| {
        crate::sched::RateScheduler::new(
            start + (ci as f64 * 1e9 / a.rate) as u64,
            a.rate / ncores as f64,
        )
    });
    // Ticker for the live line.
    let ticker = {
        let (st, shared) = (st.clone(), shared.clone());
        glommio::spawn_local(async move {
            let tx = shared.tx.lock().map(|t| t.clone()).ok();
            let mut sec = 0;
            loop {
                clock.sleep_until(start + (sec + 1) * 1_000_000_000).await;
                let mut s = st.borrow_mut();
                let snap = Snap {
                    sec,
                    ok: std::mem::take(&mut s.interval_ok),
                    fail: std::mem::take(&mut s.interval_fail),
                    total: std::mem::take(&mut s.interval_total),
                };
                if let Some(tx) = &tx {
                    let _ = tx.send(snap);
                }
                sec += 1;
            }
        })
    };
    let mut tasks = Vec::new();
    for (_i, id, cfg) in cfgs {
        if shared.release.load(Ordering::Relaxed) {
            break;
        }
        // "total" counts from the intended start: in open loop the scheduled time, so time
        // spent waiting for a free slot (a slow broker) is not hidden.
        let intended = if let Some(s) = &mut sched {
            let t = s.peek();
            clock.sleep_until(t).await;
            let _ = s.take_due(clock.now_ns());
            // Open loop: a bounded safety valve so a dead broker cannot pile up sockets.
            let _ = gate.acquire(1).await;
            t
        } else {
            let _ = gate.acquire(1).await;
            clock.now_ns()
        };
        let (st, gate, target, shared) = (st.clone(), gate.clone(), target.clone(), shared.clone());
        let is_tls = cfg.is_some();
        tasks.push(glommio::spawn_local(async move {
            let r = net::connect(&target, cfg, &id, true).await;
            gate.signal(1);
            let mut s = st.borrow_mut();
            match r {
                Ok((conn, t)) => {
                    s.tcp.record(t.tcp_ns);
                    if is_tls {
                        s.tls.record(t.tls_ns);
                    }
                    s.connack.record(t.connack_ns);
                    let total = clock.now_ns().saturating_sub(intended);
                    s.total.record(total);
                    s.interval_total.record(total);
                    s.ok += 1;
                    s.interval_ok += 1;
                    if t.resumed {
                        s.resumed += 1;
                    }
                    s.held.push(conn);
                    shared.opened.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    *s.failures.entry(e.to_string()).or_default() += 1;
                    s.interval_fail += 1;
                }
            }
            shared.done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    for t in tasks {
        t.await;
    }
    let cpu = thread_cpu().saturating_sub(cpu0);
    let wall = Duration::from_nanos(clock.now_ns() - wall0);
    let runq_wait = Duration::from_nanos(
        crate::cpu::thread_schedstat()
            .unwrap_or_default()
            .1
            .saturating_sub(sched0.1),
    );
    while !shared.release.load(Ordering::SeqCst) {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    drop(ticker);
    let held = std::mem::take(&mut st.borrow_mut().held);
    for c in held {
        c.disconnect().await;
    }
    let s = std::mem::take(&mut *st.borrow_mut());
    CoreResult {
        tcp: s.tcp,
        tls: s.tls,
        connack: s.connack,
        total: s.total,
        ok: s.ok,
        resumed: s.resumed,
        failures: s.failures,
        cpu,
        wall,
        runq_wait,
    }
}
