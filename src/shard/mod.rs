//! The sharded runtime: the only module that imports glommio.
//!
//! Owns: starting one pinned glommio executor per shard, their SO_REUSEPORT listeners, the
//! cross-shard mailbox mesh, connection tasks, signal-driven shutdown and reload, the metrics
//! listener (`exporter`, `scrape`: its own thread, reading the shards' counters): the I/O
//! around each shard's sans-IO core (`crate::shardcore`). Must not touch: broker logic
//! (routing, sessions, takeover, flow control: the core), protocol rules (codec/session), TLS
//! policy (tls). Shards share nothing mutable: each shard's state lives in `Rc<RefCell<_>>`
//! on its own thread, and shards talk only through the mailboxes.

mod conn;
mod driver;
pub mod exporter;
pub mod notify;
mod store_io;
pub use crate::shardcore::registry;
mod scrape;
mod sys;
mod tls;

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

/// What the runtime needs to know about one listener.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    pub allow_anonymous: bool,
    /// Connections this listener accepts in total across shards (0 = unlimited).
    pub max_connections: usize,
    /// Highest QoS granted or accepted on this listener (mosquitto's per-listener `max_qos`).
    pub max_qos: crate::codec::QoS,
    /// Topic aliases a v5 client may use towards us on this listener (`max_topic_alias`).
    pub topic_alias_maximum: u16,
    /// Mutual TLS (or server-only TLS) on this listener.
    pub tls: Option<Arc<TlsListener>>,
    /// Password and ACL files and the client-id rule (`crate::auth`); its `allow_anonymous`
    /// is replaced by the field above at start.
    pub security: crate::auth::ListenerSecurity,
}

/// A TLS listener's shared parts: the hot-reloadable rustls config and the policies the
/// connection task applies after the handshake.
#[derive(Debug)]
pub struct TlsListener {
    /// Current `ServerConfig`; SIGHUP swaps it, new handshakes on every shard pick it up.
    pub reloader: Arc<crate::tls::TlsReloader>,
    pub username_rule: crate::tls::UsernameRule,
    pub handshake_timeout: Duration,
    /// Per shard: handshakes in progress beyond this wait in the accept loop (and the
    /// kernel backlog) instead of competing with established clients for CPU.
    pub max_handshakes_in_progress: usize,
    /// Per-shard handshake counters, indexed by shard.
    pub stats: Vec<Arc<crate::tls::HandshakeStats>>,
}

/// Runtime settings, derived from `config::Config`.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub shards: usize,
    pub listeners: Vec<ListenerSpec>,
    /// A client that opens a connection and sends no complete CONNECT within this is dropped.
    pub connect_timeout: Duration,
    /// Capacity of each cross-shard queue.
    pub mailbox_capacity: usize,
    /// Diagnostics: each shard also listens on its own ephemeral loopback port, so tests and
    /// operators can reach a chosen shard regardless of the kernel's REUSEPORT hash. No
    /// password or ACL file applies there (anonymous, unrestricted): tests only; the
    /// configuration file cannot turn it on.
    pub shard_listeners: bool,
    /// Per-session limits (inflight, queues, packet size, keepalive, ...).
    pub session: crate::session::SessionConfig,
    pub retained: crate::routing::RetainedLimits,
    /// Publishes with a larger payload are acknowledged but not delivered (mosquitto's
    /// `message_size_limit`).
    pub message_size_limit: usize,
    /// Period of `$SYS/broker/...` updates; `None` disables them.
    pub sys_interval: Option<Duration>,
    /// A live subscriber with a full queue that makes no progress for this long is cut
    /// loose (its overflow is dropped); until then its publishers are paused.
    pub stall_timeout: Duration,
    /// A connection whose peer accepts none of our bytes for this long is dropped (a
    /// subscriber that stopped reading must not pin its queue and socket buffers forever).
    /// Lack of progress only: a slow reader that keeps taking bytes is never cut off.
    pub write_timeout: Duration,
    /// Longest wait for another shard's answer: a client id's home shard registering a
    /// connect (then CONNACK 0x88 / 3.1.1 return code 3), or every shard confirming the
    /// routes a SUBSCRIBE (or a resumed session) added before its SUBACK/CONNACK (then the
    /// connection is closed). Each is logged.
    pub peer_timeout: Duration,
    /// Control messages (route deltas, registrations, hand-overs) one peer may have queued
    /// beyond its mailbox before this shard refuses new connections (CONNACK 0x88 / 3).
    pub control_backlog_limit: usize,
    /// Test hook (not configurable from a file): lets a test stall a shard's thread, as a
    /// wedged core would, to exercise the bounded waits above.
    pub stall_hook: Option<Arc<StallHook>>,
    /// `metrics_listener`: where `/metrics` and `/healthz` are served (plain HTTP, on a
    /// thread of its own); `None` serves nothing.
    pub metrics_listener: Option<SocketAddr>,
    /// `persistence true`: the directory and sync mode (see `crate::store`).
    pub persistence: Option<crate::config::Persistence>,
}

/// Test hook: while `stall[i]` is set, shard `i`'s thread stops running (it blocks in its
/// control loop, so it neither reads its mailboxes nor serves its clients), and sets
/// `stalled[i]` so the test knows it has stopped. Shutdown still ends the stall.
#[derive(Debug)]
pub struct StallHook {
    pub stall: Vec<AtomicBool>,
    pub stalled: Vec<AtomicBool>,
}

impl StallHook {
    pub fn new(shards: usize) -> Self {
        StallHook {
            stall: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            stalled: (0..shards).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Called by shard `id` on each control tick: blocks its thread while asked to.
    pub(crate) fn stall_here(&self, id: usize, control: &Control) {
        if !self
            .stall
            .get(id)
            .is_some_and(|s| s.load(Ordering::Acquire))
        {
            return;
        }
        self.stalled[id].store(true, Ordering::Release);
        while self.stall[id].load(Ordering::Acquire) && !control.shutdown_requested() {
            // Blocking on purpose: this is the stall.
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stalled[id].store(false, Ordering::Release);
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            shards: default_shards(),
            listeners: vec![ListenerSpec {
                addr: SocketAddr::from(([127, 0, 0, 1], 1883)),
                allow_anonymous: true,
                max_connections: 0,
                max_qos: crate::codec::QoS::ExactlyOnce,
                topic_alias_maximum: 10,
                tls: None,
                security: crate::auth::ListenerSecurity::default(),
            }],
            connect_timeout: Duration::from_secs(10),
            mailbox_capacity: 1024,
            shard_listeners: false,
            session: crate::session::SessionConfig::default(),
            retained: crate::routing::RetainedLimits::default(),
            message_size_limit: usize::MAX,
            sys_interval: Some(Duration::from_secs(10)),
            stall_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            peer_timeout: Duration::from_secs(5),
            control_backlog_limit: 65_536,
            stall_hook: None,
            metrics_listener: None,
            persistence: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error(
        "{addr} is already in use by another process (is mosquitto or another Midge running?)"
    )]
    AddrInUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start shard {shard}: {reason}")]
    Executor { shard: usize, reason: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Flags the shards poll; set from signal handlers or the embedding program.
#[derive(Debug, Default)]
pub struct Control {
    shutdown: AtomicBool,
    reload_generation: AtomicU64,
}

impl Control {
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
    }
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }
    pub fn request_reload(&self) {
        self.reload_generation.fetch_add(1, Ordering::AcqRel);
    }
    pub fn reload_generation(&self) -> u64 {
        self.reload_generation.load(Ordering::Acquire)
    }
}

/// A running broker.
pub struct Broker {
    /// The bound address of each configured listener, in configuration order.
    pub listen_addrs: Vec<SocketAddr>,
    /// With `shard_listeners`: each shard's own plain listener, indexed by shard.
    pub shard_addrs: Vec<SocketAddr>,
    /// The bound address of the metrics listener, if one is configured.
    pub metrics_addr: Option<SocketAddr>,
    pub control: Arc<Control>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<driver::Shared>,
    /// Runtime compaction's thread (stopped and joined before the lock is released).
    _compactor: Option<crate::store::compact::Compactor>,
    /// The persistence directory's lock, held while the broker runs.
    _store_lock: Option<std::fs::File>,
}

impl Broker {
    /// Each shard's counters, indexed by shard (read as they are: shards write them on the
    /// message path, single-writer).
    pub fn stats(&self) -> Vec<Stats> {
        self.shared.stats_snapshot()
    }

    pub fn shutdown(&self) {
        self.control.request_shutdown();
    }

    /// Wait for every shard to finish.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Refuse a port another process already serves. The shards bind with SO_REUSEPORT, so a
/// second broker would otherwise silently share the port; a probe bind without that option
/// fails if any socket *listens* there. It has SO_REUSEADDR, so connections of an earlier run
/// lingering in TIME_WAIT or FIN_WAIT do not count (a restart must not wait for them). Port 0
/// is resolved here to one concrete port for all shards.
fn probe_listener(addr: SocketAddr) -> Result<SocketAddr, StartError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind = || -> io::Result<SocketAddr> {
        let sk = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        sk.set_reuse_address(true)?;
        sk.bind(&addr.into())?;
        let l: StdListener = sk.into();
        l.local_addr()
    };
    match bind() {
        Ok(a) => Ok(a),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(StartError::AddrInUse { addr }),
        Err(source) => Err(StartError::Bind { addr, source }),
    }
}

/// The CPUs shards are pinned to, shard i on `cpus[i % len]`.
fn shard_cpus() -> Vec<usize> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    if ids.is_empty() {
        ids.push(0);
    }
    ids
}

/// Default shard count: one per core the process may run on.
pub fn default_shards() -> usize {
    shard_cpus().len()
}

/// Start the broker; returns once every shard is listening.
pub fn start(cfg: RuntimeConfig) -> Result<Broker, StartError> {
    let shards = cfg.shards.max(1);
    if shards > crate::routing::MAX_SHARDS {
        return Err(StartError::Executor {
            shard: shards - 1,
            reason: format!(
                "at most {} shards are supported",
                crate::routing::MAX_SHARDS
            ),
        });
    }
    let mut resolved = Vec::with_capacity(cfg.listeners.len());
    for l in &cfg.listeners {
        let addr = probe_listener(l.addr)?;
        let mut spec = ListenerSpec { addr, ..l.clone() };
        spec.security.allow_anonymous = spec.allow_anonymous;
        resolved.push(spec);
    }
    // Bound before the shards start, so a port in use fails start-up like an MQTT port.
    let metrics_listener = match cfg.metrics_listener {
        Some(addr) => Some(exporter::bind(addr).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                StartError::AddrInUse { addr }
            } else {
                StartError::Bind { addr, source: e }
            }
        })?),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    // Recovery runs here, before any shard: plain threads, blocking file I/O stalls nobody.
    let (store_start, store_lock) = match &cfg.persistence {
        Some(p) => {
            let (s, lock) = driver::StoreStart::open(p, shards)?;
            (Some(s), Some(lock))
        }
        None => (None, None),
    };
    let cpus = shard_cpus();
    let control = Arc::new(Control::default());
    let mesh = glommio::channels::channel_mesh::MeshBuilder::<crate::shardcore::PeerMsg, _>::full(
        shards,
        cfg.mailbox_capacity,
    );
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(usize, Option<SocketAddr>), StartError>>();
    let mut shared = driver::Shared::new(cfg.clone(), resolved.clone(), shards);
    shared.store = store_start;
    let shared = Arc::new(shared);

    /// 4,096 SQEs (8,192 CQEs): the smallest depth with the kernel's full 256-bucket cancel
    /// table.
    const RING_DEPTH: usize = 4096;
    let mut threads = Vec::with_capacity(shards);
    for id in 0..shards {
        let cpu = cpus[id % cpus.len()];
        let mesh = mesh.clone();
        let control = control.clone();
        let ready = ready_tx.clone();
        let shared = shared.clone();
        let builder = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpu))
            .name(&format!("midge-shard-{id}"))
            // glommio's 10 MiB default cannot be locked under the usual 8 MiB memlock limit.
            .io_memory(256 << 10)
            // Deep rings for their cancel hash table, not for concurrency: the kernel sizes
            // it from the ring (ilog2(cq entries) - 5 bits, at most 8) and glommio cancels
            // its preemption timeouts on every reactor wake-up, a cancel that first walks one
            // bucket of the armed polls, i.e. every idle connection. With the default depth
            // of 128 that is 8 buckets: 15,000 idle TLS devices sending PINGREQs made the
            // broker 17x mosquitto's idle CPU, ~40% of it in the kernel's io_poll_find.
            .ring_depth(RING_DEPTH);
        let handle = builder
            .spawn(move || async move {
                driver::shard_main(id, cpu, shared, mesh, control, ready).await;
            })
            .map_err(|e| StartError::Executor {
                shard: id,
                reason: e.to_string(),
            })?;
        threads.push(std::thread::spawn(move || {
            let _ = handle.join();
        }));
    }
    drop(ready_tx);

    let mut shard_addrs = vec![None; shards];
    for _ in 0..shards {
        match ready_rx.recv() {
            Ok(Ok((id, addr))) => shard_addrs[id] = addr,
            Ok(Err(e)) => {
                control.request_shutdown();
                return Err(e);
            }
            Err(_) => {
                control.request_shutdown();
                return Err(StartError::Executor {
                    shard: 0,
                    reason: "a shard exited during start-up".into(),
                });
            }
        }
    }
    if let Some(listener) = metrics_listener {
        let (s1, s2, c) = (shared.clone(), shared.clone(), control.clone());
        let endpoints = Arc::new(exporter::Endpoints {
            metrics: Box::new(move |format| scrape::render(&s1, format)),
            health: Box::new(move || scrape::health(&s2)),
            stopped: Box::new(move || c.shutdown_requested()),
        });
        match exporter::spawn(listener, endpoints) {
            Ok(t) => threads.push(t),
            Err(e) => {
                control.request_shutdown();
                return Err(StartError::Executor {
                    shard: 0,
                    reason: format!("cannot start the metrics listener: {e}"),
                });
            }
        }
        if let Some(a) = metrics_addr {
            tracing::info!(target: crate::logging::NOTICE, "metrics listener on http://{a}/metrics");
        }
    }
    // Runtime compaction, off the shards (a plain thread: blocking file I/O is fine there).
    let compactor = match shared.store.as_ref().and_then(|s| {
        s.compaction
            .as_ref()
            .map(|(board, c)| (s.gen_dir.clone(), board.clone(), *c))
    }) {
        Some((gen, board, cadence)) => {
            match crate::store::compact::Compactor::spawn(gen, board, cadence) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(
                        "persistence: cannot start the compaction thread: {e}; the log is                          compacted at start-up only"
                    );
                    None
                }
            }
        }
        None => None,
    };
    Ok(Broker {
        _compactor: compactor,
        listen_addrs: resolved.iter().map(|l| l.addr).collect(),
        shard_addrs: shard_addrs.into_iter().flatten().collect(),
        metrics_addr,
        control,
        threads,
        shared,
        _store_lock: store_lock,
    })
}

pub use driver::Stats;

/// Run until SIGINT/SIGTERM (graceful: clients get 0x8B, exit 0); on SIGHUP call `on_reload`
/// (on the signal thread, never on a shard).
pub fn run_until_signalled(
    cfg: RuntimeConfig,
    on_reload: impl Fn() + Send + 'static,
) -> Result<(), StartError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let broker = start(cfg)?;
    let control = broker.control.clone();
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| {
            StartError::Executor {
                shard: 0,
                reason: format!("cannot install signal handlers: {e}"),
            }
        })?;
    let handle = signals.handle();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            match sig {
                SIGHUP => {
                    tracing::info!("SIGHUP: reloading");
                    control.request_reload();
                    on_reload();
                }
                _ => {
                    tracing::info!("signal {sig}: shutting down");
                    control.request_shutdown();
                    break;
                }
            }
        }
    });
    broker.join();
    handle.close();
    Ok(())
}
