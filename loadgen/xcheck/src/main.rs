//! `midge-xcheck`: a cross-check for `midge-loadgen` built on a client Midge did not write
//! (rumqttc, tokio). It runs the loadgen's two headline shapes — QoS 1 pairs at a fixed
//! rate, and a small device fleet (own certificates, shared-subscription backends,
//! commands) — and reports delivered msg/s, the broker's CPU per message over the measured
//! window (utime + stime from /proc/PID/stat, the same method as the loadgen) and latency
//! percentiles, so a loadgen figure can be checked against an independent client.
//!
//! Owns: its own scheduling (open loop: message i is due at start + i / rate), payload (24
//! bytes: publisher, sequence, intended and actual send time) and accounting. Must not
//! touch: anything of the loadgen (no shared code: the point is independence).
//!
//! How rumqttc sends: one write per outgoing request (PUBLISH, SUBSCRIBE, PINGREQ), and the
//! acknowledgements of the packets decoded from one read in one write (rumqttc's
//! `readb` batch). tokio timers tick in milliseconds, so a due message leaves up to 1 ms
//! late: latency is reported both from the intended time (no coordinated omission, includes
//! that timer lateness) and from the actual send call.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS, Transport};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "midge-xcheck",
    about = "rumqttc-based cross-check of midge-loadgen figures"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Publisher i → fleet/i/telemetry → subscriber i, open loop at a fixed total rate.
    Pairs(PairsArgs),
    /// N devices with their own certificates publish telemetry every INTERVAL with jitter to
    /// backend consumers ($share/backend/fleet/+/telemetry) and receive commands.
    Fleet(FleetArgs),
}

#[derive(Args, Clone)]
struct Common {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// CA of the broker certificate: enables TLS (the server name is --host).
    #[arg(long)]
    cafile: Option<PathBuf>,
    /// Directory of NAME.crt/NAME.key client identities, used round robin (mutual TLS).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Broker pid: its CPU over the measured window (/proc/PID/stat).
    #[arg(long)]
    broker_pid: Option<u32>,
    /// tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Warm-up seconds excluded from the figures.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait for deliveries after the last publication.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct PairsArgs {
    #[command(flatten)]
    c: Common,
    #[arg(long, default_value_t = 16)]
    pairs: u32,
    /// Total messages per second over all publishers.
    #[arg(long, default_value_t = 20000.0)]
    rate: f64,
    #[arg(long, default_value_t = 1)]
    qos: u8,
}

#[derive(Args, Clone)]
struct FleetArgs {
    #[command(flatten)]
    c: Common,
    #[arg(long, default_value_t = 500)]
    devices: u32,
    /// Seconds between a device's telemetry messages.
    #[arg(long, default_value_t = 3.0)]
    interval: f64,
    /// Each message at a random point of the first JITTER × interval of its slot.
    #[arg(long, default_value_t = 0.2)]
    jitter: f64,
    #[arg(long, default_value_t = 4)]
    backends: u32,
    /// Backends subscribe fleet/+/telemetry (each gets everything) instead of $share.
    #[arg(long)]
    no_shared: bool,
    /// Commands per second from the backend to devices (fleet/ID/cmd, QoS 1).
    #[arg(long, default_value_t = 10.0)]
    cmd_rate: f64,
    /// Devices connecting per second.
    #[arg(long, default_value_t = 200.0)]
    ramp_rate: f64,
    /// Keep-alive seconds (rumqttc sends PINGREQ every keep-alive).
    #[arg(long, default_value_t = 30)]
    keepalive: u64,
}

const LAT_MAX: u64 = 60_000_000_000;

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LAT_MAX, 3).expect("valid bounds")
}

fn pct(h: &Histogram<u64>) -> serde_json::Value {
    let q = |p: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(p) as f64 / 1000.0
        }
    };
    json!({"count": h.len(), "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99),
           "p999_us": q(0.999), "max_us": if h.is_empty() { 0.0 } else { h.max() as f64 / 1000.0 }})
}

/// The run clock: ns since the start of this process.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
    fn at(&self, ns: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.0 + Duration::from_nanos(ns))
    }
}

fn payload(len: usize, publisher: u32, seq: u32, intended: u64, sent: u64) -> Vec<u8> {
    let mut p = vec![0u8; len.max(24)];
    p[0..4].copy_from_slice(&publisher.to_be_bytes());
    p[4..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(&intended.to_be_bytes());
    p[16..24].copy_from_slice(&sent.to_be_bytes());
    p
}

fn parse(p: &[u8]) -> Option<(u32, u32, u64, u64)> {
    if p.len() < 24 {
        return None;
    }
    let u32_at = |o: usize| u32::from_be_bytes(p[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_be_bytes(p[o..o + 8].try_into().unwrap_or_default());
    Some((u32_at(0), u32_at(4), u64_at(8), u64_at(16)))
}

/// What one receiver (a subscriber, or a shared group) saw.
struct Rec {
    from_intended: Histogram<u64>,
    from_sent: Histogram<u64>,
    seen: HashMap<u32, Vec<u64>>,
    recv: u64,
    recv_window: u64,
    dups: u64,
}

impl Rec {
    fn new() -> Self {
        Rec {
            from_intended: hist(),
            from_sent: hist(),
            seen: HashMap::new(),
            recv: 0,
            recv_window: 0,
            dups: 0,
        }
    }
    fn record(&mut self, p: &[u8], now: u64, window: (u64, u64)) -> bool {
        let Some((publ, seq, intended, sent)) = parse(p) else {
            return false;
        };
        self.recv += 1;
        if now >= window.0 && now < window.1 {
            self.recv_window += 1;
        }
        if intended >= window.0 && intended < window.1 {
            let _ = self
                .from_intended
                .record(now.saturating_sub(intended).clamp(1, LAT_MAX));
            let _ = self
                .from_sent
                .record(now.saturating_sub(sent).clamp(1, LAT_MAX));
        }
        let bits = self.seen.entry(publ).or_default();
        let (w, b) = (seq as usize / 64, seq % 64);
        if bits.len() <= w {
            bits.resize(w + 1, 0);
        }
        if bits[w] & (1 << b) != 0 {
            self.dups += 1;
        }
        bits[w] |= 1 << b;
        true
    }
    fn distinct(&self, publ: u32, sent: u64) -> u64 {
        let Some(bits) = self.seen.get(&publ) else {
            return 0;
        };
        (0..sent)
            .filter(|s| {
                bits.get(*s as usize / 64)
                    .is_some_and(|w| w & (1 << (s % 64)) != 0)
            })
            .count() as u64
    }
}

fn proc_cpu_ns(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1_000_000_000 / hz)
}

fn proc_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid struct; the soft limit only goes up to hard.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

/// TLS material: the CA and the identities of a --cert-dir.
struct Tls {
    ca: Vec<u8>,
    ids: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Tls {
    fn load(c: &Common) -> Result<Option<Tls>, String> {
        let Some(ca) = &c.cafile else {
            return Ok(None);
        };
        let ca = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let mut ids = Vec::new();
        if let Some(d) = &c.cert_dir {
            let mut names: Vec<PathBuf> = std::fs::read_dir(d)
                .map_err(|e| format!("{}: {e}", d.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "crt"))
                .collect();
            names.sort();
            for crt in names {
                let key = crt.with_extension("key");
                let c = std::fs::read(&crt).map_err(|e| format!("{}: {e}", crt.display()))?;
                let k = std::fs::read(&key).map_err(|e| format!("{}: {e}", key.display()))?;
                ids.push((c, k));
            }
            if ids.is_empty() {
                return Err(format!("{}: no NAME.crt/NAME.key pairs", d.display()));
            }
        }
        Ok(Some(Tls { ca, ids }))
    }
}

fn options(c: &Common, id: &str, i: usize, tls: Option<&Tls>, keepalive: u64) -> MqttOptions {
    let mut o = MqttOptions::new(id, c.host.clone(), c.port);
    o.set_keep_alive(Duration::from_secs(keepalive.max(5)));
    o.set_clean_session(true);
    o.set_request_channel_capacity(4096);
    o.set_inflight(64);
    if let Some(t) = tls {
        let auth = (!t.ids.is_empty()).then(|| t.ids[i % t.ids.len()].clone());
        o.set_transport(Transport::tls(t.ca.clone(), auth, None));
    }
    o
}

/// Drive an event loop until `stop`; `on` sees every incoming packet. `up` is told once the
/// CONNACK (and, when subscribing, the SUBACK) arrived. Errors end the client (no
/// reconnection: a failure is a finding, not something to paper over).
async fn drive(
    mut el: EventLoop,
    want_suback: bool,
    up: tokio::sync::oneshot::Sender<Result<u64, String>>,
    clock: Clock,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    mut on: impl FnMut(&Incoming) + Send,
) {
    let mut up = Some(up);
    loop {
        match el.poll().await {
            Ok(Event::Incoming(p)) => {
                match &p {
                    Incoming::ConnAck(_) if !want_suback => {
                        if let Some(u) = up.take() {
                            let _ = u.send(Ok(clock.ns()));
                        }
                    }
                    Incoming::SubAck(_) => {
                        if let Some(u) = up.take() {
                            let _ = u.send(Ok(clock.ns()));
                        }
                    }
                    _ => {}
                }
                on(&p);
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(u) = up.take() {
                    let _ = u.send(Err(e.to_string()));
                } else if !stop.load(Ordering::Relaxed) {
                    eprintln!("midge-xcheck: connection error: {e}");
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
    }
}

fn write_json(c: &Common, v: &serde_json::Value) -> Result<(), String> {
    let s = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    println!("{s}");
    if let Some(p) = &c.json {
        std::fs::write(p, s + "\n").map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

async fn pairs(a: PairsArgs) -> Result<(), String> {
    let c = &a.c;
    let tls = Tls::load(c)?;
    let clock = Clock(Instant::now());
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let qos = match a.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => return Err("--qos 0 or 1".into()),
    };
    if a.pairs == 0 || a.rate <= 0.0 {
        return Err("--pairs and --rate must be > 0".into());
    }
    let window = Arc::new(Mutex::new((u64::MAX, u64::MAX)));
    let mut recs = Vec::new();
    // Clients live until the end (dropping one ends its event loop).
    let mut keep = Vec::new();
    // Subscribers first.
    for i in 0..a.pairs {
        let rec = Arc::new(Mutex::new(Rec::new()));
        recs.push(rec.clone());
        let o = options(c, &format!("xc-s{i}"), i as usize, tls.as_ref(), 60);
        let (cl, el) = AsyncClient::new(o, 4096);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let win = window.clone();
        tokio::spawn(drive(
            el,
            true,
            tx,
            clock,
            stop.clone(),
            errors.clone(),
            move |p| {
                if let Incoming::Publish(p) = p {
                    let now = clock.ns();
                    let w = *win.lock().unwrap_or_else(|e| e.into_inner());
                    rec.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(&p.payload, now, w);
                }
            },
        ));
        cl.subscribe(format!("fleet/{i}/telemetry"), qos)
            .await
            .map_err(|e| e.to_string())?;
        rx.await.map_err(|_| "subscriber ended")??;
        keep.push(cl);
    }
    let mut pubs = Vec::new();
    for i in 0..a.pairs {
        let o = options(
            c,
            &format!("xc-p{i}"),
            (a.pairs + i) as usize,
            tls.as_ref(),
            60,
        );
        let (cl, el) = AsyncClient::new(o, 4096);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(drive(
            el,
            false,
            tx,
            clock,
            stop.clone(),
            errors.clone(),
            |_| {},
        ));
        rx.await.map_err(|_| "publisher ended")??;
        pubs.push(cl);
    }
    let start = clock.ns() + 200_000_000;
    let from = start + (a.c.warmup * 1e9) as u64;
    let end = from + (a.c.duration * 1e9) as u64;
    *window.lock().unwrap_or_else(|e| e.into_inner()) = (from, end);
    let per = a.rate / f64::from(a.pairs);
    let sent: Vec<Arc<AtomicU64>> = (0..a.pairs).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let sent_window = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, cl) in pubs.into_iter().enumerate() {
        let (sent, sent_window) = (sent[i].clone(), sent_window.clone());
        let plen = c.payload;
        tasks.push(tokio::spawn(async move {
            let first = start + (i as f64 * 1e9 / a.rate) as u64;
            let topic = format!("fleet/{i}/telemetry");
            for k in 0u64.. {
                let intended = first + (k as f64 * 1e9 / per) as u64;
                if intended >= end {
                    break;
                }
                tokio::time::sleep_until(clock.at(intended)).await;
                let p = payload(plen, i as u32, k as u32, intended, clock.ns());
                if cl.publish(topic.as_str(), qos, false, p).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                if intended >= from {
                    sent_window.fetch_add(1, Ordering::Relaxed);
                }
            }
            cl
        }));
    }
    tokio::time::sleep_until(clock.at(from)).await;
    let cpu0 = c.broker_pid.and_then(proc_cpu_ns);
    tokio::time::sleep_until(clock.at(end)).await;
    let cpu1 = c.broker_pid.and_then(proc_cpu_ns);
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.map_err(|e| e.to_string())?);
    }
    let total_sent: u64 = sent.iter().map(|s| s.load(Ordering::Relaxed)).sum();
    let drain_end = clock.ns() + (c.drain * 1e9) as u64;
    while clock.ns() < drain_end {
        let r: u64 = recs
            .iter()
            .map(|r| r.lock().map(|r| r.recv).unwrap_or(0))
            .sum();
        if r >= total_sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (mut fi, mut fs) = (hist(), hist());
    let (mut recv, mut recv_w, mut dups, mut lost) = (0, 0, 0, 0);
    for (i, r) in recs.iter().enumerate() {
        let r = r.lock().unwrap_or_else(|e| e.into_inner());
        let _ = fi.add(&r.from_intended);
        let _ = fs.add(&r.from_sent);
        recv += r.recv;
        recv_w += r.recv_window;
        dups += r.dups;
        let n = sent[i].load(Ordering::Relaxed);
        lost += n - r.distinct(i as u32, n).min(n);
    }
    let secs = a.c.duration;
    let in_window = sent_window.load(Ordering::Relaxed);
    let cpu = cpu0
        .zip(cpu1)
        .map(|(a, b)| b.saturating_sub(a) as f64 / 1e9);
    write_json(
        c,
        &json!({
            "client": "rumqttc 0.25 (midge-xcheck)",
            "scenario": "pairs", "pairs": a.pairs, "qos": a.qos, "rate": a.rate, "tls": tls.is_some(),
            "payload": c.payload, "measured_seconds": secs,
            "sent": total_sent, "received": recv, "lost": lost, "duplicates": dups,
            "sent_per_s": in_window as f64 / secs, "received_per_s": recv_w as f64 / secs,
            "latency_from_intended": pct(&fi), "latency_from_send": pct(&fs),
            "broker_cpu_seconds": cpu,
            "broker_cpu_us_per_msg": cpu.map(|s| s * 1e6 / in_window.max(1) as f64),
            "broker_cpu_percent": cpu.map(|s| s / secs * 100.0),
            "connection_errors": errors.load(Ordering::Relaxed),
        }),
    )?;
    drop((clients, keep));
    Ok(())
}

async fn fleet(a: FleetArgs) -> Result<(), String> {
    let c = &a.c;
    let tls = Arc::new(Tls::load(c)?);
    let clock = Clock(Instant::now());
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    if a.devices == 0 || a.ramp_rate <= 0.0 || a.interval <= 0.0 || !(0.0..1.0).contains(&a.jitter)
    {
        return Err("--devices, --ramp-rate, --interval must be > 0 and --jitter in [0, 1)".into());
    }
    let n = a.devices as usize;
    let window = Arc::new(Mutex::new((u64::MAX, u64::MAX)));
    // Backends: one receiver (the shared group) or one each.
    let nrec = if a.no_shared { a.backends as usize } else { 1 };
    let recs: Vec<Arc<Mutex<Rec>>> = (0..nrec)
        .map(|_| Arc::new(Mutex::new(Rec::new())))
        .collect();
    let filter = if a.no_shared {
        "fleet/+/telemetry".to_string()
    } else {
        "$share/backend/fleet/+/telemetry".to_string()
    };
    let mut keep = Vec::new();
    for b in 0..a.backends as usize {
        let rec = recs[b % nrec].clone();
        let o = options(c, &format!("xc-b{b}"), n + b, tls.as_ref().as_ref(), 600);
        let (cl, el) = AsyncClient::new(o, 4096);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let win = window.clone();
        tokio::spawn(drive(
            el,
            true,
            tx,
            clock,
            stop.clone(),
            errors.clone(),
            move |p| {
                if let Incoming::Publish(p) = p {
                    let now = clock.ns();
                    let w = *win.lock().unwrap_or_else(|e| e.into_inner());
                    rec.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(&p.payload, now, w);
                }
            },
        ));
        cl.subscribe(filter.as_str(), QoS::AtLeastOnce)
            .await
            .map_err(|e| e.to_string())?;
        rx.await.map_err(|_| "backend ended")??;
        keep.push(cl);
    }
    let o = options(
        c,
        "xc-cmd",
        n + a.backends as usize,
        tls.as_ref().as_ref(),
        600,
    );
    let (commander, el) = AsyncClient::new(o, 4096);
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(drive(
        el,
        false,
        tx,
        clock,
        stop.clone(),
        errors.clone(),
        |_| {},
    ));
    rx.await.map_err(|_| "commander ended")??;
    // Ramp: device d due at t0 + d / ramp_rate; handshake time from then to its SUBACK.
    let rss0 = c.broker_pid.and_then(proc_rss);
    let (traffic_tx, traffic_rx) = tokio::sync::watch::channel(0u64);
    let cmd_recs: Vec<Arc<Mutex<Rec>>> = (0..n).map(|_| Arc::new(Mutex::new(Rec::new()))).collect();
    let sent: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let sent_window = Arc::new(AtomicU64::new(0));
    let connect = Arc::new(Mutex::new(hist()));
    let t0 = clock.ns() + 100_000_000;
    let mut ups = Vec::new();
    for d in 0..n {
        let intended = t0 + (d as f64 * 1e9 / a.ramp_rate) as u64;
        tokio::time::sleep_until(clock.at(intended)).await;
        let o = options(
            c,
            &format!("xc-d{d}"),
            d,
            tls.as_ref().as_ref(),
            a.keepalive,
        );
        let (cl, el) = AsyncClient::new(o, 64);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let rec = cmd_recs[d].clone();
        let win = window.clone();
        tokio::spawn(drive(
            el,
            true,
            tx,
            clock,
            stop.clone(),
            errors.clone(),
            move |p| {
                if let Incoming::Publish(p) = p {
                    let now = clock.ns();
                    let w = *win.lock().unwrap_or_else(|e| e.into_inner());
                    rec.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(&p.payload, now, w);
                }
            },
        ));
        let _ = cl
            .subscribe(format!("fleet/{d}/cmd"), QoS::AtLeastOnce)
            .await;
        let (connect, sent, sent_window, mut traffic) = (
            connect.clone(),
            sent[d].clone(),
            sent_window.clone(),
            traffic_rx.clone(),
        );
        let (interval, jitter, plen, devices) = (a.interval, a.jitter, c.payload, n);
        let (warmup, duration) = (c.warmup, c.duration);
        ups.push(tokio::spawn(async move {
            let ok = match rx.await {
                Ok(Ok(t)) => {
                    let _ = connect
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(t.saturating_sub(intended).clamp(1, LAT_MAX));
                    true
                }
                _ => false,
            };
            if !ok {
                return (false, cl);
            }
            // Telemetry from the traffic start, jittered inside each slot.
            let Ok(start) = traffic.wait_for(|t| *t != 0).await.map(|t| *t) else {
                return (true, cl);
            };
            let from = start + (warmup * 1e9) as u64;
            let end = from + (duration * 1e9) as u64;
            let iv = interval * 1e9;
            let base = start + (d as f64 / devices as f64 * iv) as u64;
            let topic = format!("fleet/{d}/telemetry");
            let mut rng = (d as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for k in 0u64.. {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
                let intended = base + (k as f64 * iv + u * jitter * iv) as u64;
                if intended >= end {
                    break;
                }
                tokio::time::sleep_until(clock.at(intended)).await;
                let p = payload(plen, d as u32, k as u32, intended, clock.ns());
                if cl
                    .publish(topic.as_str(), QoS::AtLeastOnce, false, p)
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                if intended >= from {
                    sent_window.fetch_add(1, Ordering::Relaxed);
                }
            }
            // The client (and its connection) lives until the run ends.
            (true, cl)
        }));
    }
    // Wait for every device's SUBACK (bounded).
    let ramp_deadline = clock.ns() + 60_000_000_000;
    loop {
        let done = connect.lock().map(|h| h.len()).unwrap_or(0);
        if done as usize >= n || clock.ns() > ramp_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected = connect.lock().map(|h| h.len()).unwrap_or(0);
    let ramp_s = (clock.ns() - t0) as f64 / 1e9;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = c.broker_pid.and_then(proc_rss);
    // Traffic.
    let start = clock.ns() + 100_000_000;
    let from = start + (c.warmup * 1e9) as u64;
    let end = from + (c.duration * 1e9) as u64;
    *window.lock().unwrap_or_else(|e| e.into_inner()) = (from, end);
    let _ = traffic_tx.send(start);
    let cmd_sent: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let cmd_window = Arc::new(AtomicU64::new(0));
    let cmd_task = {
        let (cmd_sent, cmd_window) = (cmd_sent.clone(), cmd_window.clone());
        let (rate, plen) = (a.cmd_rate, c.payload);
        tokio::spawn(async move {
            if rate <= 0.0 {
                return commander;
            }
            for k in 0u64.. {
                let intended = start + (k as f64 * 1e9 / rate) as u64;
                if intended >= end {
                    break;
                }
                tokio::time::sleep_until(clock.at(intended)).await;
                let d = (k as usize) % n;
                let seq = cmd_sent[d].load(Ordering::Relaxed);
                let p = payload(plen, d as u32, seq as u32, intended, clock.ns());
                if commander
                    .publish(format!("fleet/{d}/cmd"), QoS::AtLeastOnce, false, p)
                    .await
                    .is_err()
                {
                    break;
                }
                cmd_sent[d].fetch_add(1, Ordering::Relaxed);
                if intended >= from {
                    cmd_window.fetch_add(1, Ordering::Relaxed);
                }
            }
            commander
        })
    };
    tokio::time::sleep_until(clock.at(from)).await;
    let cpu0 = c.broker_pid.and_then(proc_cpu_ns);
    tokio::time::sleep_until(clock.at(end)).await;
    let cpu1 = c.broker_pid.and_then(proc_cpu_ns);
    let mut failed = 0;
    let mut devices = Vec::new();
    for u in ups {
        match u.await {
            Ok((true, cl)) => devices.push(cl),
            Ok((false, _)) | Err(_) => failed += 1,
        }
    }
    let commander = cmd_task.await.map_err(|e| e.to_string())?;
    let total: u64 = sent.iter().map(|s| s.load(Ordering::Relaxed)).sum();
    let total_cmd: u64 = cmd_sent.iter().map(|s| s.load(Ordering::Relaxed)).sum();
    let fanout = nrec as u64;
    let drain_end = clock.ns() + (c.drain * 1e9) as u64;
    while clock.ns() < drain_end {
        let r: u64 = recs
            .iter()
            .map(|r| r.lock().map(|r| r.recv).unwrap_or(0))
            .sum();
        let rc: u64 = cmd_recs
            .iter()
            .map(|r| r.lock().map(|r| r.recv).unwrap_or(0))
            .sum();
        if r >= total * fanout && rc >= total_cmd {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (mut fi, mut fs) = (hist(), hist());
    let (mut recv, mut recv_w, mut dups, mut lost) = (0, 0, 0, 0);
    for r in &recs {
        let r = r.lock().unwrap_or_else(|e| e.into_inner());
        let _ = fi.add(&r.from_intended);
        let _ = fs.add(&r.from_sent);
        recv += r.recv;
        recv_w += r.recv_window;
        dups += r.dups;
        for (d, s) in sent.iter().enumerate() {
            let k = s.load(Ordering::Relaxed);
            lost += k - r.distinct(d as u32, k).min(k);
        }
    }
    let (mut cmd_recv, mut cmd_lost, mut cmd_lat) = (0, 0, hist());
    for (d, r) in cmd_recs.iter().enumerate() {
        let r = r.lock().unwrap_or_else(|e| e.into_inner());
        cmd_recv += r.recv;
        let _ = cmd_lat.add(&r.from_intended);
        let k = cmd_sent[d].load(Ordering::Relaxed);
        cmd_lost += k - r.distinct(d as u32, k).min(k);
    }
    let secs = c.duration;
    let in_window = sent_window.load(Ordering::Relaxed) + cmd_window.load(Ordering::Relaxed);
    let cpu = cpu0
        .zip(cpu1)
        .map(|(a, b)| b.saturating_sub(a) as f64 / 1e9);
    let connect = connect.lock().map(|h| h.clone()).unwrap_or_else(|_| hist());
    write_json(
        c,
        &json!({
            "client": "rumqttc 0.25 (midge-xcheck)",
            "scenario": "fleet", "devices": n, "connected": connected, "failed": failed,
            "tls": tls.is_some(), "interval_s": a.interval, "jitter": a.jitter,
            "backends": a.backends, "filter": filter, "cmd_rate": a.cmd_rate,
            "ramp_seconds": ramp_s, "connect_latency": pct(&connect),
            "broker_rss_per_device": rss0.zip(rss1).map(|(a, b)| (b as f64 - a as f64) / connected.max(1) as f64),
            "measured_seconds": secs,
            "sent": total, "expected": total * fanout, "received": recv, "lost": lost, "duplicates": dups,
            "cmd_sent": total_cmd, "cmd_received": cmd_recv, "cmd_lost": cmd_lost,
            "sent_per_s": sent_window.load(Ordering::Relaxed) as f64 / secs,
            "received_per_s": recv_w as f64 / secs,
            "latency_from_intended": pct(&fi), "latency_from_send": pct(&fs),
            "cmd_latency_from_intended": pct(&cmd_lat),
            "messages_in_window": in_window,
            "broker_cpu_seconds": cpu,
            "broker_cpu_us_per_msg": cpu.map(|s| s * 1e6 / in_window.max(1) as f64),
            "connection_errors": errors.load(Ordering::Relaxed),
        }),
    )?;
    drop((commander, keep, devices));
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    raise_nofile();
    let threads = match &cli.cmd {
        Cmd::Pairs(a) => a.c.threads,
        Cmd::Fleet(a) => a.c.threads,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("midge-xcheck: {e}");
            std::process::exit(2);
        }
    };
    let r = rt.block_on(async move {
        // Every run ends by itself; this is the backstop.
        let limit = Duration::from_secs(3600);
        match tokio::time::timeout(limit, async {
            match cli.cmd {
                Cmd::Pairs(a) => pairs(a).await,
                Cmd::Fleet(a) => fleet(a).await,
            }
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err("run exceeded one hour".into()),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    if let Err(e) = r {
        eprintln!("midge-xcheck: error: {e}");
        std::process::exit(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip_and_loss_accounting() {
        let p = payload(64, 7, 3, 1_000, 1_500);
        assert_eq!(parse(&p), Some((7, 3, 1_000, 1_500)));
        assert_eq!(parse(&p[..20]), None);
        let mut r = Rec::new();
        for s in [0u32, 1, 1, 3] {
            assert!(r.record(&payload(64, 7, s, 2_000, 2_100), 2_500, (0, 10_000)));
        }
        assert_eq!((r.recv, r.dups, r.recv_window), (4, 1, 4));
        assert_eq!(r.distinct(7, 5), 3, "2 and 4 missing");
        assert_eq!(r.from_intended.len(), 4);
        assert_eq!(r.from_sent.value_at_quantile(0.5), 400);
    }

    #[test]
    fn proc_readings_of_this_process() {
        let me = std::process::id();
        assert!(proc_cpu_ns(me).is_some());
        assert!(proc_rss(me).unwrap() > 0);
    }
}
