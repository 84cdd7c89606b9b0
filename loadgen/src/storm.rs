//! The `storm` scenario: N devices connected; all drop at once and reconnect at once (a
//! network blip or a broker-side load balancer flap). Reports the time until every device is
//! back, per-device time-to-reconnect percentiles, failures (retried like real devices), and
//! the end-to-end latency a steady publisher → subscriber pair saw before, during and after.
//!
//! Owns: the storm's orchestration and report. Must not touch: pubsub/connect internals
//! beyond the shared connection and template helpers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use clap::Args;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::sync::Semaphore;
use midge::codec::{self, Limits, Packet, PubResp, QoS};
use serde::Serialize;

use crate::common::{parse_duration, spawn_cores, Clock, Common, CommonArgs};
use crate::common::{MAX_CONNECTIONS, MAX_DURATION};
use crate::net::{self, Conn};
use crate::payload;
use crate::pubsub::Template;
use crate::stats::{Lat, Summary};

#[derive(Args, Debug, Clone)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Devices that drop and reconnect.
    #[arg(long, default_value_t = 1000)]
    pub devices: u64,
    /// Reconnects in progress at once (all cores together).
    #[arg(long, default_value_t = 256)]
    pub concurrency: u32,
    /// Steady publisher rate (msg/s) on fleet/steady/telemetry.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// QoS of the steady pair.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Steady traffic before the drop.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub settle: Duration,
    /// Steady traffic after every device is back.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub after: Duration,
    /// Give up reconnecting after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub max_time: Duration,
}

#[derive(Serialize)]
pub struct StormReport {
    pub devices: u64,
    pub reconnected: u64,
    pub all_back_ms: Option<f64>,
    pub time_to_reconnect: Summary,
    pub attempts: u64,
    pub failures: HashMap<String, u64>,
    pub steady_before: Summary,
    pub steady_during: Summary,
    pub steady_after: Summary,
    pub steady_sent: u64,
    pub steady_received: u64,
}

struct Shared {
    clock: Clock,
    ready: AtomicU64,
    start_ns: AtomicU64,
    back: AtomicU64,
    last_back_ns: AtomicU64,
    stop: AtomicBool,
    failed: std::sync::Mutex<Option<String>>,
}

struct CoreResult {
    ttr: Lat,
    attempts: u64,
    failures: HashMap<String, u64>,
    steady: Vec<(u64, u64)>,
    steady_sent: u64,
}

pub fn run(c: &Common, a: &StormArgs) -> Result<StormReport, String> {
    if a.devices == 0 || a.devices > MAX_CONNECTIONS {
        return Err(format!("--devices must be 1..={MAX_CONNECTIONS}"));
    }
    if !(a.rate > 0.0 && a.rate <= 100_000.0) {
        return Err("--rate must be in (0, 100000]".into());
    }
    if a.concurrency == 0 || a.settle + a.after + a.max_time > MAX_DURATION {
        return Err("--concurrency ≥ 1 and settle + after + max-time ≤ 1h".into());
    }
    let ncores = c.cores.len();
    let shared = Arc::new(Shared {
        clock: Clock::new(),
        ready: AtomicU64::new(0),
        start_ns: AtomicU64::new(0),
        back: AtomicU64::new(0),
        last_back_ns: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        failed: std::sync::Mutex::new(None),
    });
    let handle = {
        let (shared, target, tls, prefix, cores, a) = (
            shared.clone(),
            c.target.clone(),
            c.tls.clone(),
            c.args.client_prefix.clone(),
            c.cores.clone(),
            a.clone(),
        );
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
    let quiet = c.args.quiet;
    let total_ready = a.devices + 2;
    let deadline = clock.now_ns() + 60_000_000_000 + a.devices * 5_000_000;
    while shared.ready.load(Ordering::SeqCst) < total_ready {
        if handle.is_finished() || shared.failed.lock().map(|f| f.is_some()).unwrap_or(true) {
            break;
        }
        if clock.now_ns() > deadline {
            *shared.failed.lock().map_err(|_| "lock")? = Some("devices did not all connect".into());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Some(e) = shared.failed.lock().map_err(|_| "lock")?.clone() {
        shared.stop.store(true, Ordering::SeqCst);
        let _ = handle.join();
        return Err(e);
    }
    let start = clock.now_ns() + 20_000_000;
    shared.start_ns.store(start, Ordering::SeqCst);
    let drop_ns = start + a.settle.as_nanos() as u64;
    if !quiet {
        eprintln!(
            "{} devices connected; dropping all in {:?}",
            a.devices, a.settle
        );
    }
    let give_up = drop_ns + a.max_time.as_nanos() as u64;
    let mut last_print = 0;
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let now = clock.now_ns();
        let back = shared.back.load(Ordering::SeqCst);
        if !quiet && now > drop_ns && now - last_print > 1_000_000_000 {
            last_print = now;
            eprintln!(
                "[{:>6.1}s after drop] {back} / {} devices back",
                (now - drop_ns) as f64 / 1e9,
                a.devices
            );
        }
        if back >= a.devices || now > give_up {
            break;
        }
    }
    std::thread::sleep(a.after);
    shared.stop.store(true, Ordering::SeqCst);
    let results = handle
        .join()
        .map_err(|_| "a loadgen core panicked".to_string())??;
    let back = shared.back.load(Ordering::SeqCst);
    let last = shared.last_back_ns.load(Ordering::SeqCst);
    let mut ttr = Lat::new();
    let mut failures: HashMap<String, u64> = HashMap::new();
    let (mut attempts, mut sent) = (0, 0);
    let mut steady = Vec::new();
    for r in results {
        ttr.merge(&r.ttr);
        attempts += r.attempts;
        sent += r.steady_sent;
        steady.extend(r.steady);
        for (k, v) in r.failures {
            *failures.entry(k).or_default() += v;
        }
    }
    let all_back = (back >= a.devices).then_some(last);
    let end_during = all_back.unwrap_or(give_up);
    let (mut b, mut d, mut af) = (Lat::new(), Lat::new(), Lat::new());
    for (intended, lat) in &steady {
        if *intended < drop_ns {
            b.record(*lat)
        } else if *intended < end_during {
            d.record(*lat)
        } else {
            af.record(*lat)
        }
    }
    Ok(StormReport {
        devices: a.devices,
        reconnected: back,
        all_back_ms: all_back.map(|t| t.saturating_sub(drop_ns) as f64 / 1e6),
        time_to_reconnect: ttr.summary(),
        attempts,
        failures,
        steady_before: b.summary(),
        steady_during: d.summary(),
        steady_after: af.summary(),
        steady_sent: sent,
        steady_received: steady.len() as u64,
    })
}

pub fn table(r: &StormReport) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "storm: {} of {} devices back{} ({} attempts)",
        r.reconnected,
        r.devices,
        r.all_back_ms
            .map(|m| format!(" after {m:.1} ms"))
            .unwrap_or_else(|| " — NOT all within --max-time".into()),
        r.attempts
    );
    let _ = writeln!(
        o,
        "  {:<22} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "latency (µs)", "count", "p50", "p99", "p99.9", "max"
    );
    for (n, s) in [
        ("time to reconnect", &r.time_to_reconnect),
        ("steady: before drop", &r.steady_before),
        ("steady: during storm", &r.steady_during),
        ("steady: after", &r.steady_after),
    ] {
        let _ = writeln!(
            o,
            "  {:<22} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            n, s.count, s.p50_us, s.p99_us, s.p999_us, s.max_us
        );
    }
    let _ = writeln!(
        o,
        "  steady pair: sent {} received {}",
        r.steady_sent, r.steady_received
    );
    for (e, n) in &r.failures {
        let _ = writeln!(o, "  failure (retried): {e} ×{n}");
    }
    o
}

/// The TLS config of device `i` (minted once, before anything is timed).
fn config(
    tls: &Option<Arc<crate::tls::TlsSetup>>,
    minter: Option<&crate::tls::Minter>,
    i: u64,
    id: &str,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    match tls {
        None => Ok(None),
        Some(t) => t.config_for(i, id, minter).map(Some),
    }
}

async fn connect_one(
    target: &net::Target,
    cfg: Option<Arc<rustls::ClientConfig>>,
    id: &str,
) -> Result<Conn, String> {
    net::connect(target, cfg, id, true)
        .await
        .map(|(c, _)| c)
        .map_err(|e| e.to_string())
}

async fn core_main(
    ci: usize,
    ncores: usize,
    a: StormArgs,
    shared: Arc<Shared>,
    target: net::Target,
    tls: Option<Arc<crate::tls::TlsSetup>>,
    prefix: String,
) -> CoreResult {
    let clock = shared.clock;
    let minter = tls.as_ref().and_then(|t| t.minter());
    let mine: Vec<u64> = (0..a.devices)
        .filter(|i| *i as usize % ncores == ci)
        .collect();
    let fail = |e: String| {
        if let Ok(mut f) = shared.failed.lock() {
            f.get_or_insert(e);
        }
    };
    // Mint every identity up front: reconnect timing must not include key generation.
    let mut cfgs = Vec::with_capacity(mine.len());
    for &i in &mine {
        match config(&tls, minter.as_ref(), i, &format!("{prefix}-d{i}")) {
            Ok(c) => cfgs.push(c),
            Err(e) => {
                fail(e);
                return empty();
            }
        }
    }
    let steady: Rc<RefCell<Vec<(u64, u64)>>> = Rc::new(RefCell::new(Vec::new()));
    let sent = Rc::new(RefCell::new(0u64));
    let qos = QoS::from_u8(a.qos).unwrap_or_default();
    let topic = "fleet/steady/telemetry";
    // The steady pair lives on core 0.
    let mut steady_conns = None;
    if ci == 0 {
        let (sid, pid) = (format!("{prefix}-steady-s"), format!("{prefix}-steady-p"));
        let s = match config(&tls, minter.as_ref(), a.devices, &sid) {
            Ok(c) => connect_one(&target, c, &sid).await,
            Err(e) => Err(e),
        };
        let p = match config(&tls, minter.as_ref(), a.devices + 1, &pid) {
            Ok(c) => connect_one(&target, c, &pid).await,
            Err(e) => Err(e),
        };
        match (s, p) {
            (Ok(mut s), Ok(p)) => {
                let f =
                    midge::codec::TopicFilter::new(topic.to_string()).map_err(|e| e.to_string());
                let sub = f.map(|f| {
                    Packet::Subscribe(midge::codec::Subscribe {
                        packet_id: 1,
                        filters: vec![(
                            f,
                            midge::codec::SubscriptionOptions {
                                qos,
                                ..Default::default()
                            },
                        )],
                        properties: Default::default(),
                    })
                });
                let ok = match sub {
                    Ok(p) => {
                        s.send(&p).await.is_ok()
                            && matches!(s.recv(target.timeout).await, Ok(Packet::SubAck(_)))
                    }
                    Err(_) => false,
                };
                if !ok {
                    fail("steady subscriber: SUBSCRIBE failed".into());
                    return empty();
                }
                shared.ready.fetch_add(2, Ordering::SeqCst);
                steady_conns = Some((s, p));
            }
            (Err(e), _) | (_, Err(e)) => {
                fail(format!("steady pair: {e}"));
                return empty();
            }
        }
    }
    // Devices.
    let gate = Rc::new(Semaphore::new(
        (a.concurrency as usize).div_ceil(ncores).max(1) as u64,
    ));
    let held: Rc<RefCell<Vec<Option<Conn>>>> =
        Rc::new(RefCell::new((0..mine.len()).map(|_| None).collect()));
    let mut tasks = Vec::new();
    for (k, &i) in mine.iter().enumerate() {
        let (gate, held, target, shared) =
            (gate.clone(), held.clone(), target.clone(), shared.clone());
        let id = format!("{prefix}-d{i}");
        let cfg = cfgs[k].clone();
        tasks.push(glommio::spawn_local(async move {
            let _ = gate.acquire(1).await;
            let r = connect_one(&target, cfg, &id).await;
            gate.signal(1);
            match r {
                Ok(c) => {
                    held.borrow_mut()[k] = Some(c);
                    shared.ready.fetch_add(1, Ordering::SeqCst);
                    None
                }
                Err(e) => Some(format!("{id}: {e}")),
            }
        }));
    }
    for t in tasks {
        if let Some(e) = t.await {
            fail(e);
        }
    }
    let start = loop {
        if shared.stop.load(Ordering::SeqCst) {
            return empty();
        }
        let s = shared.start_ns.load(Ordering::SeqCst);
        if s != 0 {
            break s;
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    };
    let drop_ns = start + a.settle.as_nanos() as u64;
    let nonce = payload::new_nonce();
    let mut bg = Vec::new();
    if let Some((s, p)) = steady_conns.take() {
        bg.push(glommio::spawn_local(steady_sub(
            s,
            clock,
            nonce,
            steady.clone(),
        )));
        bg.push(glommio::spawn_local(steady_pub(
            p,
            clock,
            nonce,
            start,
            a.rate,
            qos,
            topic,
            sent.clone(),
        )));
    }
    clock.sleep_until(drop_ns).await;
    // Drop every device at once (closing the sockets), then reconnect them all at once.
    held.borrow_mut().clear();
    let ttr = Rc::new(RefCell::new(Lat::new()));
    let failures: Rc<RefCell<HashMap<String, u64>>> = Rc::default();
    let attempts = Rc::new(RefCell::new(0u64));
    let give_up = drop_ns + a.max_time.as_nanos() as u64;
    let mut tasks = Vec::new();
    for (k, &i) in mine.iter().enumerate() {
        let (gate, target, shared) = (gate.clone(), target.clone(), shared.clone());
        let (ttr, failures, attempts) = (ttr.clone(), failures.clone(), attempts.clone());
        let id = format!("{prefix}-d{i}");
        let cfg = cfgs[k].clone();
        tasks.push(glommio::spawn_local(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                let _ = gate.acquire(1).await;
                *attempts.borrow_mut() += 1;
                let r = connect_one(&target, cfg.clone(), &id).await;
                gate.signal(1);
                match r {
                    Ok(c) => {
                        let now = clock.now_ns();
                        ttr.borrow_mut().record(now - drop_ns);
                        shared.back.fetch_add(1, Ordering::SeqCst);
                        shared.last_back_ns.fetch_max(now, Ordering::SeqCst);
                        return Some(c);
                    }
                    Err(e) => {
                        *failures.borrow_mut().entry(e).or_default() += 1;
                        if clock.now_ns() > give_up || shared.stop.load(Ordering::SeqCst) {
                            return None;
                        }
                        glommio::timer::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }));
    }
    let mut back = Vec::new();
    for t in tasks {
        back.push(t.await);
    }
    while !shared.stop.load(Ordering::SeqCst) {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    drop(bg);
    drop(back);
    let ttr = ttr.borrow().clone();
    let failures = failures.borrow().clone();
    let attempts = *attempts.borrow();
    let steady = std::mem::take(&mut *steady.borrow_mut());
    let steady_sent = *sent.borrow();
    CoreResult {
        ttr,
        attempts,
        failures,
        steady,
        steady_sent,
    }
}

fn empty() -> CoreResult {
    CoreResult {
        ttr: Lat::new(),
        attempts: 0,
        failures: HashMap::new(),
        steady: Vec::new(),
        steady_sent: 0,
    }
}

async fn steady_sub(c: Conn, clock: Clock, nonce: u16, out: Rc<RefCell<Vec<(u64, u64)>>>) {
    let Conn {
        mut stream,
        mut rbuf,
        version,
        ..
    } = c;
    let mut tmp = vec![0u8; 16 << 10];
    let mut acks = BytesMut::new();
    loop {
        let n = match stream.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        rbuf.extend_from_slice(&tmp[..n]);
        let now = clock.now_ns();
        while let Ok(Some(p)) = codec::decode(&mut rbuf, version, &Limits::default()) {
            match p {
                Packet::Publish(p) => {
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => codec::encode(
                            &Packet::PubAck(PubResp::new(p.packet_id)),
                            version,
                            &mut acks,
                        ),
                        QoS::ExactlyOnce => codec::encode(
                            &Packet::PubRec(PubResp::new(p.packet_id)),
                            version,
                            &mut acks,
                        ),
                    }
                    if let Some(h) = payload::read(&p.payload).filter(|h| h.nonce == nonce) {
                        out.borrow_mut()
                            .push((h.intended_ns, now.saturating_sub(h.intended_ns)));
                    }
                }
                Packet::PubRel(r) => codec::encode(
                    &Packet::PubComp(PubResp::new(r.packet_id)),
                    version,
                    &mut acks,
                ),
                _ => {}
            }
        }
        if !acks.is_empty() {
            if stream.write_all(&acks).await.is_err() || stream.flush().await.is_err() {
                return;
            }
            acks.clear();
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn steady_pub(
    c: Conn,
    clock: Clock,
    nonce: u16,
    start: u64,
    rate: f64,
    qos: QoS,
    topic: &'static str,
    sent: Rc<RefCell<u64>>,
) {
    let Ok(t) = Template::new(topic, qos, 64, c.version) else {
        return;
    };
    let version = c.version;
    let (mut r, mut w) = futures_lite::io::split(c.stream);
    // Acknowledgements are drained (PUBREL answered) but not awaited: the steady publisher
    // keeps its schedule whatever the broker does, so stalls show up as latency.
    let pending_rel: Rc<RefCell<Vec<u16>>> = Rc::default();
    let tx = pending_rel.clone();
    let _reader = glommio::spawn_local(async move {
        let mut rbuf = c.rbuf;
        let mut tmp = vec![0u8; 4096];
        loop {
            let n = match r.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            rbuf.extend_from_slice(&tmp[..n]);
            while let Ok(Some(p)) = codec::decode(&mut rbuf, version, &Limits::default()) {
                if let Packet::PubRec(p) = p {
                    tx.borrow_mut().push(p.packet_id);
                }
            }
        }
    });
    let mut sched = crate::sched::RateScheduler::new(start, rate);
    let mut seq = 0u64;
    let mut out = Vec::with_capacity(4096);
    let mut rel = BytesMut::new();
    loop {
        clock.sleep_until(sched.peek()).await;
        while let Some(intended) = sched.take_due(clock.now_ns()) {
            let pid = if qos == QoS::AtMostOnce {
                0
            } else {
                (seq % 65535) as u16 + 1
            };
            t.append(
                &mut out,
                pid,
                payload::Header {
                    publisher: 0,
                    seq,
                    nonce,
                    intended_ns: intended,
                },
            );
            seq += 1;
        }
        for pid in pending_rel.borrow_mut().drain(..) {
            codec::encode(&Packet::PubRel(PubResp::new(pid)), version, &mut rel);
        }
        out.extend_from_slice(&rel);
        rel.clear();
        if w.write_all(&out).await.is_err() || w.flush().await.is_err() {
            return;
        }
        *sent.borrow_mut() = seq;
        out.clear();
    }
}
