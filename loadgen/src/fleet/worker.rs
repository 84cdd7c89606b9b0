//! One fleet worker: a share of the devices (device d belongs to worker d mod K), a share of
//! the backend consumers and one commander, on its own pinned glommio executors. It runs in
//! a thread of the coordinator (`--procs 1`) or as a child process (`midge-loadgen
//! fleet-worker`, spec and commands on stdin, events on stdout as JSON lines).
//!
//! Owns: identity preparation (minted certificates from the cache), the device, backend and
//! commander connection tasks, and this worker's accounting. Must not touch: the broker's
//! process (the coordinator measures it) or other workers' state.
//!
//! A device: connects at its ramp slot from its own source address, subscribes
//! `fleet/ID/cmd`, then waits; from the traffic start it publishes telemetry on its jittered
//! open-loop schedule (latency from the intended time), acknowledges commands, and sends
//! PINGREQ whenever it has sent nothing for a keep-alive. One task per device: it sleeps on
//! its socket and one timer (next telemetry or next PINGREQ), so an idle device costs the
//! loadgen nothing between keep-alives.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::AsyncReadExt;
use glommio::sync::Semaphore;
use midge::codec::{
    self, Limits, Packet, PubResp, Publish, PublishProperties, QoS, Subscribe, SubscribeProperties,
    SubscriptionOptions, TopicFilter, TopicName,
};
use rustls::ClientConfig;

use super::proto::{Cmd, Event, LatData, Progress, ReadyInfo, WorkerResult, WorkerSpec};
use super::FleetPlan;
use crate::common::{spawn_cores, thread_cpu, Clock, Common};
use crate::limits;
use crate::net::{self, Conn, RecvError, Stream};
use crate::payload;
use crate::pubsub::{write_packets, Template};
use crate::sched::{phase_ns, JitterScheduler, RateScheduler};
use crate::seq::SeqTracker;
use crate::stats::Lat;
use crate::tls::IdentityCache;

/// State shared by this worker's cores and its control thread.
struct WShared {
    clock: Clock,
    nonce: u16,
    index: u64,
    count: u64,
    ramp_at: AtomicU64,
    traffic_at: AtomicU64,
    stop: AtomicBool,
    abort: Mutex<Option<String>>,
    /// Backend consumers and the commander connected and subscribed.
    ready: AtomicU64,
    ramp_ok: AtomicU64,
    ramp_fail: AtomicU64,
    tel_sent: AtomicU64,
    tel_recv: AtomicU64,
    tel_acked: AtomicU64,
    cmd_sent: AtomicU64,
    cmd_recv: AtomicU64,
    cmd_acked: AtomicU64,
    pings: AtomicU64,
    senders_done: AtomicU64,
    commander_up: AtomicU64,
    errors: AtomicU64,
    /// Per device of this worker (by position in `mine`): connected and not yet lost.
    connected: Vec<AtomicBool>,
}

impl WShared {
    fn fail(&self, msg: String) {
        if let Ok(mut a) = self.abort.lock() {
            if a.is_none() {
                *a = Some(msg);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    /// The measured window (intended times), once the traffic start is known.
    fn window(&self, plan: &FleetPlan) -> Option<(u64, u64)> {
        let t = self.traffic_at.load(Ordering::Relaxed);
        (t != 0).then(|| {
            let from = t + plan.warmup_ns;
            (from, from + plan.duration_ns)
        })
    }
}

type Cfg = Option<Arc<ClientConfig>>;

/// What one core runs: devices (position in `mine`, device id, identity), backends (key,
/// identity) and possibly the commander.
#[derive(Clone, Default)]
struct CorePlan {
    devices: Vec<(usize, u64, Cfg)>,
    backends: Vec<(u32, Cfg)>,
    commander: Option<Cfg>,
}

#[derive(Clone)]
struct Ctx {
    plan: Arc<FleetPlan>,
    shared: Arc<WShared>,
    target: net::Target,
    /// Devices of this worker in order (the commander's targets).
    mine: Arc<Vec<u64>>,
    ramp_permits: u64,
}

#[derive(Default)]
struct CoreState {
    tcp: Lat,
    tls: Lat,
    connack: Lat,
    suback: Lat,
    total: Lat,
    failures: HashMap<String, u64>,
    errors: HashMap<String, u64>,
    ramp_first: u64,
    ramp_last: u64,
    tel_lat: Lat,
    cmd_lat: Lat,
    tel_sent: HashMap<u32, u64>,
    tel_sent_measured: u64,
    tel_acked: u64,
    tel_trackers: HashMap<(u32, u32), SeqTracker>,
    tel_recv: u64,
    tel_recv_window: u64,
    foreign: u64,
    cmd_sent: HashMap<u32, u64>,
    cmd_sent_measured: u64,
    cmd_acked: u64,
    cmd_trackers: HashMap<u32, SeqTracker>,
    cmd_recv: u64,
    pings: u64,
    pongs: u64,
}

impl CoreState {
    fn error(&mut self, shared: &WShared, e: &str) {
        *self.errors.entry(e.to_string()).or_default() += 1;
        shared.errors.fetch_add(1, Ordering::Relaxed);
    }
}

struct CoreResult {
    st: CoreState,
    busy: f64,
    runq: f64,
    cpu: Duration,
}

/// Run a worker in this thread: `cmds` from the coordinator, `emit` to it. Always ends with a
/// `Result` event (after a `Failed` one if something went wrong) unless it could not start.
pub fn worker_main(spec: WorkerSpec, cmds: mpsc::Receiver<Cmd>, emit: &(dyn Fn(Event) + Sync)) {
    if let Err(e) = run(spec, cmds, emit) {
        emit(Event::Failed(e));
    }
}

/// `midge-loadgen fleet-worker`: a worker process (spawned by `fleet --procs K`).
pub fn child_main() -> Result<(), String> {
    let mut first = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut first)
        .map_err(|e| format!("fleet-worker: stdin: {e}"))?;
    let spec: WorkerSpec = serde_json::from_str(first.trim())
        .map_err(|e| format!("fleet-worker: bad spec on stdin: {e}"))?;
    crate::common::set_allowed_cpus(&spec.allowed_cpus);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Cmd>(line.trim()) {
                Ok(c) => {
                    if tx.send(c).is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!("fleet-worker: ignoring bad command {line:?}: {e}"),
            }
        }
        // The coordinator went away: stop.
        let _ = tx.send(Cmd::Stop);
    });
    let out = Mutex::new(std::io::stdout());
    worker_main(spec, rx, &|ev| {
        if let (Ok(s), Ok(mut o)) = (serde_json::to_string(&ev), out.lock()) {
            let _ = writeln!(o, "{s}");
            let _ = o.flush();
        }
    });
    Ok(())
}

fn run(
    spec: WorkerSpec,
    cmds: mpsc::Receiver<Cmd>,
    emit: &(dyn Fn(Event) + Sync),
) -> Result<(), String> {
    let mut plan = spec.args.plan()?;
    plan.devices = spec.devices;
    let plan = Arc::new(plan);
    let (w, k) = (u64::from(spec.index), u64::from(spec.count));
    let mine: Vec<u64> = (w..plan.devices).step_by(k as usize).collect();
    let my_backends: Vec<u32> = (0..plan.backends)
        .filter(|b| u64::from(*b) % k == w)
        .collect();
    let has_cmd = !mine.is_empty() && plan.cmd_rate > 0.0;
    let extra = my_backends.len() as u64 + u64::from(has_cmd);
    let reserve = limits::reserve_fds(spec.cores.len(), extra);
    let lim = limits::raise_nofile(mine.len() as u64 + reserve);
    if lim.soft < mine.len() as u64 + reserve {
        return Err(format!(
            "worker {w}: {} devices need {} file descriptors; RLIMIT_NOFILE allows {} (hard {})",
            mine.len(),
            mine.len() as u64 + reserve,
            lim.soft,
            lim.hard
        ));
    }
    let mut common = spec.args.common.clone();
    common.cores = spec
        .cores
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let c: Common = common.validate(mine.len() + extra as usize)?;
    let mut target = c.target.clone();
    target.keep_alive = plan.keepalive;
    let ncores = c.cores.len();

    // Identities, before anything is timed.
    let t_prep = Instant::now();
    let cache = match (&c.tls, &plan.cert_cache) {
        (Some(t), Some(root)) => match t.mint_ca() {
            Some((ca, key)) => Some(IdentityCache::open(root, ca, key)?),
            None => None,
        },
        _ => None,
    };
    let minter = if cache.is_none() {
        c.tls.as_ref().and_then(|t| t.minter())
    } else {
        None
    };
    let (mut minted, mut loaded) = (0u64, 0u64);
    let mut identity = |i: u64, name: &str| -> Result<Cfg, String> {
        let Some(t) = &c.tls else { return Ok(None) };
        if let Some(cache) = &cache {
            let (id, was_minted) = cache.get(name)?;
            if was_minted {
                minted += 1;
            } else {
                loaded += 1;
            }
            return t.config(Some(id)).map(Some);
        }
        if minter.is_some() {
            minted += 1;
        }
        t.config_for(i, name, minter.as_ref()).map(Some)
    };
    let mut cores: Vec<CorePlan> = vec![CorePlan::default(); ncores];
    for (pos, &d) in mine.iter().enumerate() {
        let cfg = identity(d, &plan.device_id(d))?;
        cores[pos % ncores].devices.push((pos, d, cfg));
    }
    for (j, &b) in my_backends.iter().enumerate() {
        let cfg = identity(plan.devices + u64::from(b), &plan.backend_id(b))?;
        cores[j % ncores].backends.push((b, cfg));
    }
    if has_cmd {
        cores[0].commander = Some(identity(plan.devices + 1000 + w, &plan.commander_id(w))?);
    }
    let prep_seconds = t_prep.elapsed().as_secs_f64();

    let shared = Arc::new(WShared {
        clock: Clock::with_base(spec.clock_base_ns),
        nonce: spec.nonce,
        index: w,
        count: k,
        ramp_at: AtomicU64::new(0),
        traffic_at: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        abort: Mutex::new(None),
        ready: AtomicU64::new(0),
        ramp_ok: AtomicU64::new(0),
        ramp_fail: AtomicU64::new(0),
        tel_sent: AtomicU64::new(0),
        tel_recv: AtomicU64::new(0),
        tel_acked: AtomicU64::new(0),
        cmd_sent: AtomicU64::new(0),
        cmd_recv: AtomicU64::new(0),
        cmd_acked: AtomicU64::new(0),
        pings: AtomicU64::new(0),
        senders_done: AtomicU64::new(0),
        commander_up: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        connected: (0..mine.len()).map(|_| AtomicBool::new(false)).collect(),
    });
    let ctx = Ctx {
        plan: plan.clone(),
        shared: shared.clone(),
        target,
        mine: Arc::new(mine.clone()),
        ramp_permits: u64::from(plan.ramp_concurrency)
            .div_ceil(k * ncores as u64)
            .max(1),
    };
    let cores = Arc::new(cores);
    let core_ids = c.cores.clone();
    let handle = std::thread::spawn(move || {
        spawn_cores(&core_ids, move |ci| {
            core_main(ctx.clone(), cores[ci].clone())
        })
    });

    // Control loop: commands in, events out.
    let needed = extra;
    let ready_deadline = Instant::now()
        + c.target.timeout * 3
        + Duration::from_millis(200) * needed as u32
        + Duration::from_secs(10);
    let (mut ready_sent, mut ramped_sent) = (false, false);
    let mut last_progress = Instant::now();
    let progress = |shared: &WShared| Progress {
        connected: shared.ramp_ok.load(Ordering::SeqCst),
        failed: shared.ramp_fail.load(Ordering::SeqCst),
        tel_sent: shared.tel_sent.load(Ordering::SeqCst),
        tel_recv: shared.tel_recv.load(Ordering::SeqCst),
        tel_acked: shared.tel_acked.load(Ordering::SeqCst),
        cmd_sent: shared.cmd_sent.load(Ordering::SeqCst),
        cmd_recv: shared.cmd_recv.load(Ordering::SeqCst),
        cmd_acked: shared.cmd_acked.load(Ordering::SeqCst),
        pings: shared.pings.load(Ordering::SeqCst),
        senders_done: shared.senders_done.load(Ordering::SeqCst),
        senders: shared.ramp_ok.load(Ordering::SeqCst) + shared.commander_up.load(Ordering::SeqCst),
        errors: shared.errors.load(Ordering::SeqCst),
    };
    loop {
        match cmds.recv_timeout(Duration::from_millis(20)) {
            Ok(Cmd::Ramp { at_ns }) => shared.ramp_at.store(at_ns, Ordering::SeqCst),
            Ok(Cmd::Traffic { at_ns }) => shared.traffic_at.store(at_ns, Ordering::SeqCst),
            Ok(Cmd::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                shared.stop.store(true, Ordering::SeqCst);
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(msg) = shared.abort.lock().ok().and_then(|a| a.clone()) {
            emit(Event::Failed(format!("worker {w}: {msg}")));
            break;
        }
        if handle.is_finished() {
            emit(Event::Failed(format!(
                "worker {w}: its cores stopped early"
            )));
            shared.stop.store(true, Ordering::SeqCst);
            break;
        }
        if !ready_sent {
            if shared.ready.load(Ordering::SeqCst) >= needed {
                ready_sent = true;
                emit(Event::Ready(ReadyInfo {
                    devices: mine.len() as u64,
                    identities_minted: minted,
                    identities_loaded: loaded,
                    prep_seconds,
                    nofile_soft: lim.soft,
                    nofile_hard: lim.hard,
                    cache_dir: cache.as_ref().map(|c| c.dir().display().to_string()),
                }));
            } else if Instant::now() > ready_deadline {
                emit(Event::Failed(format!(
                    "worker {w}: backend consumers / commander not connected in time"
                )));
                shared.stop.store(true, Ordering::SeqCst);
                break;
            }
        }
        let (ok, fail) = (
            shared.ramp_ok.load(Ordering::SeqCst),
            shared.ramp_fail.load(Ordering::SeqCst),
        );
        if !ramped_sent
            && ok + fail >= mine.len() as u64
            && shared.ramp_at.load(Ordering::SeqCst) != 0
        {
            ramped_sent = true;
            emit(Event::Ramped { ok, failed: fail });
        }
        if ready_sent && last_progress.elapsed() >= Duration::from_millis(200) {
            last_progress = Instant::now();
            emit(Event::Progress(progress(&shared)));
        }
    }
    let results = handle
        .join()
        .map_err(|_| format!("worker {w}: a loadgen core panicked"))??;
    emit(Event::Progress(progress(&shared)));
    let mut r = WorkerResult {
        index: spec.index,
        devices: mine.len() as u64,
        connected: shared.ramp_ok.load(Ordering::SeqCst),
        failed: shared.ramp_fail.load(Ordering::SeqCst),
        identities_minted: minted,
        identities_loaded: loaded,
        prep_seconds,
        nofile_soft: lim.soft,
        cores: c.cores.clone(),
        ramp_first_ns: u64::MAX,
        ..Default::default()
    };
    let (mut tcp, mut tls, mut connack, mut suback, mut total, mut tel_lat, mut cmd_lat) = (
        Lat::new(),
        Lat::new(),
        Lat::new(),
        Lat::new(),
        Lat::new(),
        Lat::new(),
        Lat::new(),
    );
    let (mut failures, mut errors): (HashMap<String, u64>, HashMap<String, u64>) =
        Default::default();
    for x in results {
        let s = x.st;
        r.core_busy.push(x.busy);
        r.core_runq.push(x.runq);
        r.cpu_seconds += x.cpu.as_secs_f64();
        tcp.merge(&s.tcp);
        tls.merge(&s.tls);
        connack.merge(&s.connack);
        suback.merge(&s.suback);
        total.merge(&s.total);
        tel_lat.merge(&s.tel_lat);
        cmd_lat.merge(&s.cmd_lat);
        for (k, v) in s.failures {
            *failures.entry(k).or_default() += v;
        }
        for (k, v) in s.errors {
            *errors.entry(k).or_default() += v;
        }
        if s.ramp_last > 0 {
            r.ramp_first_ns = r.ramp_first_ns.min(s.ramp_first);
            r.ramp_last_ns = r.ramp_last_ns.max(s.ramp_last);
        }
        r.tel_sent.extend(s.tel_sent);
        r.tel_sent_measured += s.tel_sent_measured;
        r.tel_acked += s.tel_acked;
        r.tel_trackers
            .extend(s.tel_trackers.into_iter().map(|((k, d), t)| (k, d, t)));
        r.tel_recv += s.tel_recv;
        r.tel_recv_window += s.tel_recv_window;
        r.foreign += s.foreign;
        r.cmd_sent.extend(s.cmd_sent);
        r.cmd_sent_measured += s.cmd_sent_measured;
        r.cmd_acked += s.cmd_acked;
        r.cmd_trackers.extend(s.cmd_trackers);
        r.cmd_recv += s.cmd_recv;
        r.pings += s.pings;
        r.pongs += s.pongs;
    }
    if r.ramp_first_ns == u64::MAX {
        r.ramp_first_ns = 0;
    }
    r.tcp = LatData::from(&tcp);
    r.tls = LatData::from(&tls);
    r.connack = LatData::from(&connack);
    r.suback = LatData::from(&suback);
    r.connect_total = LatData::from(&total);
    r.tel_lat = LatData::from(&tel_lat);
    r.cmd_lat = LatData::from(&cmd_lat);
    r.failures = failures.into_iter().collect();
    r.errors = errors.into_iter().collect();
    for (i, b) in r.core_busy.iter().enumerate() {
        if *b >= 0.9 {
            r.warnings.push(format!(
                "worker {w} core {} was {:.0}% busy during the traffic: the loadgen may have been the bottleneck (latency figures include its queueing)",
                r.cores.get(i).copied().unwrap_or(0),
                b * 100.0
            ));
        }
    }
    emit(Event::Result(Box::new(r)));
    Ok(())
}

async fn core_main(ctx: Ctx, cp: CorePlan) -> CoreResult {
    let st = Rc::new(RefCell::new(CoreState {
        ramp_first: u64::MAX,
        ..Default::default()
    }));
    let shared = ctx.shared.clone();
    let clock = shared.clock;
    let mut tasks = Vec::new();
    // Backends and the commander send nothing until the traffic starts (a backend only
    // receives): no keep-alive, so a long ramp or idle phase cannot time them out.
    let mut quiet_target = ctx.target.clone();
    quiet_target.keep_alive = 0;
    for (key, cfg) in cp.backends {
        let id = ctx.plan.backend_id(key);
        let r = async {
            let (mut c, _) = net::connect(&quiet_target, cfg, &id, true)
                .await
                .map_err(|e| format!("{id}: {e}"))?;
            subscribe(&mut c, &ctx.plan.filter(), ctx.plan.qos, ctx.target.timeout)
                .await
                .map_err(|e| format!("{id}: {e}"))?;
            Ok::<_, String>(c)
        }
        .await;
        match r {
            Ok(c) => {
                tasks.push(glommio::spawn_local(backend(
                    c,
                    key,
                    ctx.clone(),
                    st.clone(),
                )));
                shared.ready.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => shared.fail(e),
        }
    }
    let gate = Rc::new(Semaphore::new(0));
    if let Some(cfg) = cp.commander {
        let id = ctx.plan.commander_id(shared.index);
        match net::connect(&quiet_target, cfg, &id, true).await {
            Ok((c, _)) => {
                tasks.push(glommio::spawn_local(commander(
                    c,
                    ctx.clone(),
                    gate.clone(),
                    st.clone(),
                )));
                shared.ready.fetch_add(1, Ordering::SeqCst);
                shared.commander_up.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => shared.fail(format!("{id}: {e}")),
        }
    }
    let ramp_at = loop {
        if shared.stopped() {
            break 0;
        }
        let t = shared.ramp_at.load(Ordering::SeqCst);
        if t != 0 {
            break t;
        }
        glommio::timer::sleep(Duration::from_millis(2)).await;
    };
    // CPU of this core over the traffic phase: (cpu, runqueue wait, wall) at its start.
    let traffic0: Rc<RefCell<Option<(Duration, u64, u64)>>> = Rc::default();
    {
        let (shared, gate, traffic0) = (shared.clone(), gate.clone(), traffic0.clone());
        tasks.push(glommio::spawn_local(async move {
            while !shared.stopped() {
                if shared.traffic_at.load(Ordering::SeqCst) != 0 {
                    *traffic0.borrow_mut() = Some((
                        thread_cpu(),
                        crate::cpu::thread_schedstat().unwrap_or_default().1,
                        clock.now_ns(),
                    ));
                    gate.close();
                    return;
                }
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    if ramp_at != 0 {
        let permits = Rc::new(Semaphore::new(ctx.ramp_permits));
        for (pos, d, cfg) in cp.devices {
            // The coordinator gave up on the ramp (it stalled or --max-ramp passed) and
            // started the traffic: devices not yet attempted stay out of the run.
            if shared.stopped() || shared.traffic_at.load(Ordering::SeqCst) != 0 {
                break;
            }
            // Device d's slot on the whole run's ramp (all workers and cores interleave).
            let intended = ramp_at + (d as f64 * 1e9 / ctx.plan.ramp_rate) as u64;
            clock.sleep_until(intended).await;
            // At most ramp_permits attempts in flight per core; each attempt is bounded by
            // its connect / TLS / CONNACK / SUBACK timeouts, so this wait is too.
            if permits.acquire(1).await.is_err() {
                break;
            }
            tasks.push(glommio::spawn_local(device(
                ctx.clone(),
                pos,
                d,
                cfg,
                intended,
                permits.clone(),
                gate.clone(),
                st.clone(),
            )));
        }
    }
    while !shared.stopped() {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    let (busy, runq, cpu) = match *traffic0.borrow() {
        Some((c0, q0, w0)) => {
            let wall = clock.now_ns().saturating_sub(w0).max(1) as f64;
            let cpu = thread_cpu().saturating_sub(c0);
            let q = crate::cpu::thread_schedstat()
                .unwrap_or_default()
                .1
                .saturating_sub(q0);
            (cpu.as_nanos() as f64 / wall, q as f64 / wall, cpu)
        }
        None => (0.0, 0.0, Duration::ZERO),
    };
    // Stop: cancel every connection task (dropping closes the sockets).
    drop(tasks);
    let st = std::mem::take(&mut *st.borrow_mut());
    CoreResult {
        st,
        busy,
        runq,
        cpu,
    }
}

/// SUBSCRIBE one filter and wait for its SUBACK. Errors name no device (they are counted by
/// reason across thousands of devices).
async fn subscribe(c: &mut Conn, filter: &str, qos: QoS, timeout: Duration) -> Result<(), String> {
    let f = TopicFilter::new(filter.to_string()).map_err(|e| format!("filter: {e}"))?;
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
    c.send(&p).await.map_err(|_| "closed before SUBSCRIBE")?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left).await {
            Ok(Packet::SubAck(a)) => {
                return match a.reason_codes.first() {
                    Some(rc) if rc.0 < 0x80 => Ok(()),
                    Some(rc) => Err(format!("SUBACK refused: {rc}")),
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

enum Wake {
    Read(std::io::Result<usize>),
    Timer,
    Gate,
}

/// Wait for bytes, the timer at `at` (if any) or the traffic gate (if given), whichever
/// comes first. Reads first: bytes already there are never delayed by a due timer.
async fn next_wake(
    stream: &mut Stream,
    buf: &mut [u8],
    clock: Clock,
    at: Option<u64>,
    gate: Option<&Semaphore>,
) -> Wake {
    let read = async { Wake::Read(stream.read(buf).await) };
    let timer = async {
        match at {
            Some(t) => {
                clock.sleep_until(t).await;
                Wake::Timer
            }
            None => futures_lite::future::pending().await,
        }
    };
    let gate = async {
        match gate {
            Some(g) => {
                let _ = g.acquire(1).await;
                Wake::Gate
            }
            None => futures_lite::future::pending().await,
        }
    };
    futures_lite::future::or(read, futures_lite::future::or(timer, gate)).await
}

/// The telemetry of a device once the traffic started.
struct Telemetry {
    sched: JitterScheduler,
    from: u64,
    end: u64,
    done: bool,
}

#[allow(clippy::too_many_arguments)]
async fn device(
    ctx: Ctx,
    pos: usize,
    d: u64,
    cfg: Cfg,
    intended: u64,
    permits: Rc<Semaphore>,
    gate: Rc<Semaphore>,
    st: Rc<RefCell<CoreState>>,
) {
    let shared = ctx.shared.clone();
    let plan = ctx.plan.clone();
    let clock = shared.clock;
    let id = plan.device_id(d);
    let src = net::source_addr(d, plan.source_addrs);
    let r = async {
        let (mut c, tm) = net::connect_from(&ctx.target, cfg, &id, true, src)
            .await
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        subscribe(
            &mut c,
            &plan.cmd_topic(d),
            QoS::AtLeastOnce,
            ctx.target.timeout,
        )
        .await
        .map_err(|e| format!("command subscription: {e}"))?;
        Ok::<_, String>((c, tm, t.elapsed()))
    }
    .await;
    permits.signal(1);
    let now = clock.now_ns();
    let conn = match r {
        Err(e) => {
            *st.borrow_mut().failures.entry(e).or_default() += 1;
            shared.ramp_fail.fetch_add(1, Ordering::SeqCst);
            return;
        }
        Ok((c, tm, sub)) => {
            let mut s = st.borrow_mut();
            s.tcp.record(tm.tcp_ns);
            if ctx.target.server_name.is_some() {
                s.tls.record(tm.tls_ns);
            }
            s.connack.record(tm.connack_ns);
            s.suback.record(sub.as_nanos() as u64);
            s.total.record(now.saturating_sub(intended));
            s.ramp_first = s.ramp_first.min(now);
            s.ramp_last = s.ramp_last.max(now);
            shared.connected[pos].store(true, Ordering::SeqCst);
            shared.ramp_ok.fetch_add(1, Ordering::SeqCst);
            c
        }
    };
    let mut done = false;
    let e = run_device(&ctx, conn, d, &gate, &st, &mut done).await;
    shared.connected[pos].store(false, Ordering::SeqCst);
    if !done {
        shared.senders_done.fetch_add(1, Ordering::SeqCst);
    }
    if !shared.stopped() {
        st.borrow_mut().error(&shared, e);
    }
}

/// A connected device until its connection ends (the reason is returned).
async fn run_device(
    ctx: &Ctx,
    conn: Conn,
    d: u64,
    gate: &Semaphore,
    st: &RefCell<CoreState>,
    done: &mut bool,
) -> &'static str {
    let shared = &ctx.shared;
    let plan = &ctx.plan;
    let clock = shared.clock;
    let per_packet = plan.write_mode.per_packet();
    let Conn {
        mut stream,
        mut rbuf,
        version,
        receive_maximum,
    } = conn;
    let tmpl = match Template::new(&plan.tel_topic(d), plan.qos, plan.payload, version) {
        Ok(t) => t,
        Err(_) => return "device: cannot encode telemetry",
    };
    let window = u32::from(plan.inflight.min(receive_maximum).max(1));
    let ka_ns = u64::from(plan.keepalive) * 1_000_000_000;
    // How long a PINGRESP may take: one keep-alive, as client libraries allow, but never less
    // than 5 s, so a short test keep-alive on a loaded machine is not a lost connection.
    let pong_ns = ka_ns.max(5_000_000_000);
    let limits = Limits::default();
    let mut buf = [0u8; 1024];
    let mut out: Vec<u8> = Vec::new();
    let mut ends: Vec<usize> = Vec::new();
    let mut acks = BytesMut::new();
    let mut ack_ends: Vec<usize> = Vec::new();
    let mut last_tx = clock.now_ns();
    let mut ping_out: Option<u64> = None;
    let mut tel: Option<Telemetry> = None;
    let mut inflight = 0u32;
    let mut pid = 0u16;
    let mut seq = 0u64;
    loop {
        if tel.is_none() {
            if let Some((from, end)) = shared.window(plan) {
                let t0 = from - plan.warmup_ns;
                tel = Some(Telemetry {
                    sched: JitterScheduler::new(
                        t0 + phase_ns(d, plan.devices, plan.interval_ns),
                        plan.interval_ns,
                        plan.jitter,
                        d ^ u64::from(shared.nonce) << 40,
                    ),
                    from,
                    end,
                    done: false,
                });
            }
        }
        // Telemetry due now (catch-up keeps each message's intended time).
        if let Some(t) = tel.as_mut().filter(|t| !t.done) {
            let now = clock.now_ns();
            while inflight < window {
                let due = t.sched.peek();
                if due >= t.end {
                    t.done = true;
                    *done = true;
                    shared.senders_done.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                if due > now {
                    break;
                }
                t.sched.take_due(now);
                if plan.qos != QoS::AtMostOnce {
                    pid = if pid == u16::MAX { 1 } else { pid + 1 };
                    inflight += 1;
                }
                tmpl.append(
                    &mut out,
                    pid,
                    payload::Header {
                        publisher: d as u32,
                        seq,
                        nonce: shared.nonce,
                        intended_ns: due,
                    },
                );
                ends.push(out.len());
                seq += 1;
                {
                    let mut s = st.borrow_mut();
                    *s.tel_sent.entry(d as u32).or_default() += 1;
                    if due >= t.from {
                        s.tel_sent_measured += 1;
                    }
                }
                shared.tel_sent.fetch_add(1, Ordering::Relaxed);
                if per_packet {
                    if write_packets(&mut stream, &out, &ends, true).await.is_err() {
                        return "device: write failed";
                    }
                    out.clear();
                    ends.clear();
                    last_tx = clock.now_ns();
                }
            }
            if !out.is_empty() {
                if write_packets(&mut stream, &out, &ends, false)
                    .await
                    .is_err()
                {
                    return "device: write failed";
                }
                out.clear();
                ends.clear();
                last_tx = clock.now_ns();
            }
        }
        // Keep-alive: PINGREQ after a keep-alive with nothing sent; no PINGRESP within the
        // next keep-alive ends the connection (as client libraries do).
        if ka_ns > 0 {
            let now = clock.now_ns();
            if let Some(p) = ping_out {
                if now >= p + pong_ns {
                    return "device: no PINGRESP within the keep-alive";
                }
            } else if now >= last_tx + ka_ns {
                if write_packets(&mut stream, &[0xC0, 0x00], &[2], true)
                    .await
                    .is_err()
                {
                    return "device: write failed";
                }
                last_tx = clock.now_ns();
                ping_out = Some(last_tx);
                st.borrow_mut().pings += 1;
                shared.pings.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut at: Option<u64> = None;
        let mut wake_at = |t: u64| at = Some(at.map_or(t, |a: u64| a.min(t)));
        if ka_ns > 0 {
            wake_at(match ping_out {
                Some(p) => p + pong_ns,
                None => last_tx + ka_ns,
            });
        }
        if let Some(t) = tel.as_ref().filter(|t| !t.done && inflight < window) {
            wake_at(t.sched.peek().min(t.end));
        }
        let g = tel.is_none().then_some(gate);
        let n = match next_wake(&mut stream, &mut buf, clock, at, g).await {
            Wake::Timer | Wake::Gate => continue,
            Wake::Read(Ok(0)) | Wake::Read(Err(_)) => return "device: closed by broker",
            Wake::Read(Ok(n)) => n,
        };
        rbuf.extend_from_slice(&buf[..n]);
        let now = clock.now_ns();
        {
            let mut s = st.borrow_mut();
            loop {
                let p = match codec::decode(&mut rbuf, version, &limits) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(_) => return "device: undecodable packet from broker",
                };
                match p {
                    Packet::PubAck(_) => {
                        inflight = inflight.saturating_sub(1);
                        s.tel_acked += 1;
                        shared.tel_acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Packet::PingResp => {
                        ping_out = None;
                        s.pongs += 1;
                    }
                    Packet::Publish(p) => {
                        if p.qos != QoS::AtMostOnce {
                            codec::encode(
                                &Packet::PubAck(PubResp::new(p.packet_id)),
                                version,
                                &mut acks,
                            );
                            ack_ends.push(acks.len());
                        }
                        match payload::read(&p.payload) {
                            Some(h) if h.nonce == shared.nonce && u64::from(h.publisher) == d => {
                                s.cmd_trackers.entry(d as u32).or_default().record(h.seq);
                                s.cmd_recv += 1;
                                shared.cmd_recv.fetch_add(1, Ordering::Relaxed);
                                if let Some((from, end)) = shared.window(plan) {
                                    if h.intended_ns >= from && h.intended_ns < end {
                                        s.cmd_lat.record(now.saturating_sub(h.intended_ns));
                                    }
                                }
                            }
                            _ => s.foreign += 1,
                        }
                    }
                    Packet::Disconnect(_) => return "device: DISCONNECT from broker",
                    _ => {}
                }
            }
        }
        if !acks.is_empty() {
            if write_packets(&mut stream, &acks, &ack_ends, per_packet)
                .await
                .is_err()
            {
                return "device: write failed";
            }
            acks.clear();
            ack_ends.clear();
            last_tx = clock.now_ns();
        }
    }
}

/// A backend consumer: every telemetry delivery checked against its device's sequence.
async fn backend(conn: Conn, key: u32, ctx: Ctx, st: Rc<RefCell<CoreState>>) {
    let shared = ctx.shared.clone();
    let plan = ctx.plan.clone();
    let clock = shared.clock;
    let per_packet = plan.write_mode.per_packet();
    let Conn {
        mut stream,
        mut rbuf,
        version,
        ..
    } = conn;
    let mut tmp = vec![0u8; 64 << 10];
    let mut out = BytesMut::with_capacity(4096);
    let mut ends: Vec<usize> = Vec::new();
    let limits = Limits::default();
    loop {
        let n = match stream.read(&mut tmp).await {
            Ok(0) | Err(_) => {
                if !shared.stopped() {
                    shared.fail(format!("{}: closed by broker", plan.backend_id(key)));
                }
                return;
            }
            Ok(n) => n,
        };
        rbuf.extend_from_slice(&tmp[..n]);
        let now = clock.now_ns();
        let win = shared.window(&plan);
        {
            let mut s = st.borrow_mut();
            loop {
                let p = match codec::decode(&mut rbuf, version, &limits) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => {
                        drop(s);
                        shared.fail(format!("{}: decode: {e}", plan.backend_id(key)));
                        return;
                    }
                };
                let Packet::Publish(p) = p else { continue };
                if p.qos != QoS::AtMostOnce {
                    codec::encode(
                        &Packet::PubAck(PubResp::new(p.packet_id)),
                        version,
                        &mut out,
                    );
                    ends.push(out.len());
                }
                let h = match payload::read(&p.payload) {
                    Some(h) if h.nonce == shared.nonce => h,
                    _ => {
                        s.foreign += 1;
                        continue;
                    }
                };
                s.tel_recv += 1;
                shared.tel_recv.fetch_add(1, Ordering::Relaxed);
                s.tel_trackers
                    .entry((plan.receiver_key(key), h.publisher))
                    .or_default()
                    .record(h.seq);
                if let Some((from, end)) = win {
                    if h.intended_ns >= from && h.intended_ns < end {
                        s.tel_lat.record(now.saturating_sub(h.intended_ns));
                    }
                    if now >= from && now < end {
                        s.tel_recv_window += 1;
                    }
                }
            }
        }
        if !out.is_empty() {
            if write_packets(&mut stream, &out, &ends, per_packet)
                .await
                .is_err()
            {
                if !shared.stopped() {
                    shared.fail(format!("{}: write failed", plan.backend_id(key)));
                }
                return;
            }
            out.clear();
            ends.clear();
        }
    }
}

/// The backend's command publisher for this worker's devices: `cmd_rate / K` commands per
/// second, open loop, round robin over the devices that are connected.
async fn commander(conn: Conn, ctx: Ctx, gate: Rc<Semaphore>, st: Rc<RefCell<CoreState>>) {
    let shared = ctx.shared.clone();
    let plan = ctx.plan.clone();
    let clock = shared.clock;
    let id = plan.commander_id(shared.index);
    let per_packet = plan.write_mode.per_packet();
    let Conn {
        mut stream,
        mut rbuf,
        version,
        receive_maximum,
    } = conn;
    // Idle until the traffic starts (nothing is sent to a commander before).
    let _ = gate.acquire(1).await;
    let Some((from, end)) = shared.window(&plan) else {
        return;
    };
    let t0 = from - plan.warmup_ns;
    let rate = plan.cmd_rate / shared.count as f64;
    let mut sched = RateScheduler::new(
        t0 + (shared.index as f64 * 1e9 / plan.cmd_rate) as u64,
        rate,
    );
    let window = u32::from(receive_maximum.min(64));
    let mut inflight = 0u32;
    let mut pid = 0u16;
    let mut next = 0usize;
    let mut seqs: HashMap<u64, u64> = HashMap::new();
    let mut out = BytesMut::new();
    let mut ends: Vec<usize> = Vec::new();
    let mut buf = vec![0u8; 4096];
    let limits = Limits::default();
    let mut done = false;
    loop {
        if !done {
            let now = clock.now_ns();
            while inflight < window {
                let due = sched.peek();
                if due >= end {
                    done = true;
                    shared.senders_done.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                if due > now {
                    break;
                }
                sched.take_due(now);
                // The next connected device, round robin; none connected: nothing to send.
                let mine = &ctx.mine;
                let Some(slot) = (0..mine.len())
                    .map(|i| (next + i) % mine.len())
                    .find(|&i| shared.connected[i].load(Ordering::Relaxed))
                else {
                    continue;
                };
                next = slot + 1;
                let d = mine[slot];
                let seq = seqs.entry(d).or_default();
                let mut payload = vec![0u8; plan.payload];
                payload::write(
                    &mut payload,
                    payload::Header {
                        publisher: d as u32,
                        seq: *seq,
                        nonce: shared.nonce,
                        intended_ns: due,
                    },
                );
                *seq += 1;
                pid = if pid == u16::MAX { 1 } else { pid + 1 };
                inflight += 1;
                let Ok(topic) = TopicName::new(plan.cmd_topic(d)) else {
                    shared.fail(format!("{id}: bad command topic"));
                    return;
                };
                codec::encode(
                    &Packet::Publish(Publish {
                        dup: false,
                        qos: QoS::AtLeastOnce,
                        retain: false,
                        topic,
                        packet_id: pid,
                        payload: Bytes::from(payload),
                        properties: PublishProperties::default(),
                    }),
                    version,
                    &mut out,
                );
                ends.push(out.len());
                {
                    let mut s = st.borrow_mut();
                    *s.cmd_sent.entry(d as u32).or_default() += 1;
                    if due >= from {
                        s.cmd_sent_measured += 1;
                    }
                }
                shared.cmd_sent.fetch_add(1, Ordering::Relaxed);
                if per_packet {
                    if write_packets(&mut stream, &out, &ends, true).await.is_err() {
                        break;
                    }
                    out.clear();
                    ends.clear();
                }
            }
            if !out.is_empty()
                && write_packets(&mut stream, &out, &ends, false)
                    .await
                    .is_err()
            {
                if !shared.stopped() {
                    shared.fail(format!("{id}: write failed"));
                }
                return;
            }
            out.clear();
            ends.clear();
        }
        let at = (!done && inflight < window).then(|| sched.peek().min(end));
        let n = match next_wake(&mut stream, &mut buf, clock, at, None).await {
            Wake::Timer | Wake::Gate => continue,
            Wake::Read(Ok(0)) | Wake::Read(Err(_)) => {
                if !shared.stopped() {
                    shared.fail(format!("{id}: closed by broker"));
                }
                return;
            }
            Wake::Read(Ok(n)) => n,
        };
        rbuf.extend_from_slice(&buf[..n]);
        loop {
            match codec::decode(&mut rbuf, version, &limits) {
                Ok(Some(Packet::PubAck(_))) => {
                    inflight = inflight.saturating_sub(1);
                    st.borrow_mut().cmd_acked += 1;
                    shared.cmd_acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    shared.fail(format!("{id}: decode: {e}"));
                    return;
                }
            }
        }
    }
}
