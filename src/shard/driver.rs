//! One shard's driver: the glommio tasks around its sans-IO core.
//!
//! Owns: `Shard` (the core behind one `RefCell`, the connection handles, the mesh senders),
//! moving the core's outputs (peer messages into the mailboxes, dirty connections woken, the
//! one shard timer armed), the mailbox receivers, the peer flushers, the timer task, the
//! control task (shutdown, `$SYS`), the accept loops and shard start-up. Must not touch:
//! broker logic (that is `crate::shardcore`: this file only moves inputs in and outputs out),
//! bytes on a connection (that is `conn`).
//!
//! How the CPU per message is kept low (issue 13's findings, built in from the start):
//! * Inputs are handled in batches: a mailbox receiver drains everything available, a
//!   connection decodes every complete packet of a read, then outputs are drained once.
//! * A connection is woken (not written) when the core has output for it; its task writes
//!   everything due in one write. Tasks woken in the same reactor turn run after the one that
//!   woke them, so a write carries what every input of that turn queued for the client.
//! * One glommio timer per shard, re-armed only when the core's earliest deadline moves
//!   earlier by more than `TIMER_SLACK`; no timer per connection, nothing polled while a
//!   device is idle.
//!
//! Borrow discipline: `Shard::core` is borrowed only in short synchronous sections, never
//! across an `.await`.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::task::Poll;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use futures_lite::{future, Stream};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::net::TcpListener;
use tracing::{debug, info, warn};

use super::notify::Notify;
use super::{conn, Control, ListenerSpec, RuntimeConfig, StartError};
use crate::codec::QoS;
use crate::metrics::{Counter, DropCause, Gauge, RefuseCause, ShardCounters};
use crate::shardcore::{ConnKey, CoreConfig, PeerMsg, ShardCore, ShardId};

/// Timers may fire this much late: a deadline only this much earlier than the armed one
/// does not re-arm the shard's timer (every core timeout is seconds long; re-arming costs an
/// io_uring timeout and a cancel).
const TIMER_SLACK: Duration = Duration::from_millis(100);

/// Shortest wait of the shard timer (see `timer_task`).
const MIN_TIMER: Duration = Duration::from_millis(1);

/// How often the control task looks at the shutdown flag (set from a signal thread) and at
/// reloaded password and ACL files.
const CONTROL_PERIOD: Duration = Duration::from_millis(200);

/// Password checks (PBKDF2 on the blocking pool) in progress or queued per shard.
const MAX_VERIFYING: u64 = 64;

/// Broker-wide read-only settings plus the few atomics shards share.
pub(crate) struct Shared {
    pub cfg: RuntimeConfig,
    pub listeners: Vec<ListenerSpec>,
    pub shards: usize,
    /// Connections per listener, across shards (for `max_connections`).
    pub connections: Vec<AtomicUsize>,
    /// Each shard's counters (written by that shard only).
    pub counters: Vec<Arc<ShardCounters>>,
    /// Per shard, per listener: sockets accepted (written by that shard only).
    pub accepted: Vec<Vec<Counter>>,
    /// Per shard: when its control task last ran, in milliseconds since `epoch` (written by
    /// that shard only, every `CONTROL_PERIOD`; what `/healthz` judges a shard by).
    pub heartbeat: Vec<Gauge>,
    pub epoch: Instant,
    /// When the broker started, in seconds since the Unix epoch.
    pub started_unix: u64,
    /// Persistence: what each shard recovered and where it writes (`None`: off).
    pub store: Option<StoreStart>,
}

/// What start-up recovery hands to the shards.
pub(crate) struct StoreStart {
    pub persist: crate::shardcore::PersistConfig,
    pub sync: crate::config::SyncMode,
    pub dirs: Vec<std::path::PathBuf>,
    /// The generation in use (runtime compaction writes there).
    pub gen_dir: std::path::PathBuf,
    /// Runtime compaction: the shards' seals and the cadence (`None`: off).
    pub compaction: Option<(
        std::sync::Arc<crate::store::compact::SealBoard>,
        crate::store::compact::Cadence,
    )>,
    /// Per shard, taken once by that shard: its sessions (it is their home shard), the
    /// retained set, the message sequence to continue from.
    #[allow(clippy::type_complexity)]
    pub recovered: Vec<
        std::sync::Mutex<
            Option<(
                Vec<crate::session::SessionState>,
                Vec<crate::message::Message>,
                u64,
            )>,
        >,
    >,
    /// Shards whose recovered routes every peer has applied (none listens before all have).
    pub settled: AtomicUsize,
}

impl StoreStart {
    pub fn open(
        p: &crate::config::Persistence,
        shards: usize,
    ) -> Result<(StoreStart, std::fs::File), crate::store::StoreError> {
        let now = Instant::now();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let opened = crate::store::open(&p.dir, shards, now, wall)?;
        let rec = opened.recovered;
        let mut per: Vec<(
            Vec<crate::session::SessionState>,
            Vec<crate::message::Message>,
            u64,
        )> = (0..shards)
            .map(|k| {
                (
                    Vec::new(),
                    rec.retained.clone(),
                    rec.next_seq.get(&k).copied().unwrap_or(1),
                )
            })
            .collect();
        for s in rec.sessions {
            let home = crate::shardcore::home_shard(s.client_id(), shards);
            per[home].0.push(s);
        }
        let dirs = (0..shards)
            .map(|k| opened.gen_dir.join(format!("shard-{k}")))
            .collect();
        Ok((
            StoreStart {
                persist: crate::shardcore::PersistConfig {
                    base: now,
                    // Timestamps keep increasing across runs, whatever the wall clock did.
                    base_ns: wall.max(rec.max_ts + 1),
                    immediate: p.sync == crate::config::SyncMode::None,
                    timeout: p.timeout,
                    max_backlog: usize::try_from(p.max_backlog).unwrap_or(usize::MAX),
                },
                sync: p.sync,
                dirs,
                compaction: p.compaction.map(|c| {
                    (
                        std::sync::Arc::new(crate::store::compact::SealBoard::new(shards)),
                        c,
                    )
                }),
                gen_dir: opened.gen_dir.clone(),
                recovered: per
                    .into_iter()
                    .map(|r| std::sync::Mutex::new(Some(r)))
                    .collect(),
                settled: AtomicUsize::new(0),
            },
            opened.lock,
        ))
    }
}

impl Shared {
    pub fn new(cfg: RuntimeConfig, listeners: Vec<ListenerSpec>, shards: usize) -> Self {
        let connections = listeners.iter().map(|_| AtomicUsize::new(0)).collect();
        let accepted = (0..shards)
            .map(|_| listeners.iter().map(|_| Counter::default()).collect())
            .collect();
        Shared {
            cfg,
            shards,
            listeners,
            accepted,
            connections,
            counters: (0..shards).map(|_| Arc::default()).collect(),
            heartbeat: (0..shards).map(|_| Gauge::default()).collect(),
            epoch: Instant::now(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            store: None,
        }
    }

    /// Each shard's figures, indexed by shard.
    pub fn stats_snapshot(&self) -> Vec<Stats> {
        self.counters.iter().map(|c| Stats::of(c)).collect()
    }

    pub fn core_config(&self) -> CoreConfig {
        let c = &self.cfg;
        CoreConfig {
            shards: self.shards,
            session: c.session,
            retained: c.retained,
            message_size_limit: c.message_size_limit,
            stall_timeout: c.stall_timeout,
            write_timeout: c.write_timeout,
            register_timeout: c.peer_timeout,
            settle_timeout: c.peer_timeout,
            peer_control_high_water: c.control_backlog_limit,
            security: self.listeners.iter().map(|l| l.security.clone()).collect(),
            persist: self.store.as_ref().map(|s| s.persist),
            ..CoreConfig::default()
        }
    }
}

/// A snapshot of one shard's counters (see `crate::metrics::ShardCounters` for each).
#[derive(Default, Debug, Clone, Copy)]
pub struct Stats {
    pub publishes_in: u64,
    pub deliveries: u64,
    pub forwards_out: u64,
    pub dropped_queue_full: u64,
    pub dropped_stalled: u64,
    pub dropped_qos0_slow: u64,
    pub dropped_qos0_peer: u64,
    pub dropped_too_large: u64,
    pub dropped_expired: u64,
    pub oversize_publishes: u64,
    pub dropped_sys_topic: u64,
    pub stalls: u64,
    pub pauses: u64,
    pub takeovers: u64,
    pub live_conns: u64,
    pub offline_sessions: u64,
    pub retained: u64,
    pub stalled_now: u64,
    pub paused_now: u64,
}

impl Stats {
    fn of(c: &ShardCounters) -> Stats {
        Stats {
            publishes_in: c.publishes_in.get(),
            deliveries: c.deliveries.get(),
            forwards_out: c.forwards_out.get(),
            dropped_queue_full: c.dropped(DropCause::QueueFull),
            dropped_stalled: c.dropped(DropCause::Stalled),
            dropped_qos0_slow: c.dropped(DropCause::Qos0Slow),
            dropped_qos0_peer: c.dropped(DropCause::Qos0PeerFull),
            dropped_too_large: c.dropped(DropCause::TooLarge),
            dropped_expired: c.dropped(DropCause::Expired),
            oversize_publishes: c.dropped(DropCause::OverSizeLimit),
            dropped_sys_topic: c.dropped(DropCause::SysTopic),
            stalls: c.stalls.get(),
            pauses: c.pauses.get(),
            takeovers: c.takeovers.get(),
            live_conns: c.sockets.get(),
            offline_sessions: c.offline_sessions.get(),
            retained: c.retained.get(),
            stalled_now: c.stalled_now.get(),
            paused_now: c.paused_now.get(),
        }
    }
}

/// What a connection task waits on: woken when the core has something for it.
#[derive(Default)]
pub(crate) struct ConnHandle {
    pub notify: Notify,
}

pub(crate) struct Shard {
    pub id: ShardId,
    pub shared: Arc<Shared>,
    pub core: RefCell<ShardCore>,
    conns: RefCell<AHashMap<ConnKey, Rc<ConnHandle>>>,
    senders: Senders<PeerMsg>,
    /// Per peer: woken when its mailbox refused a message (the flusher waits for room).
    flush_wake: Vec<Notify>,
    flushing: Vec<Cell<bool>>,
    timer_wake: Notify,
    timer_armed: Cell<Option<Instant>>,
    pub stopping: Cell<bool>,
    pub stop_notify: Notify,
    /// Sockets being served (all phases), and of those, waiting for their CONNECT.
    pub live_conns: Cell<usize>,
    pub connecting: Cell<usize>,
    /// Encoding buffer lent to the connection that writes next (no allocation per write).
    pub scratch: RefCell<bytes::BytesMut>,
    /// Read buffer lent to the connection that reads next: a read lands here and only the
    /// bytes that arrived are copied to the connection's own buffer, so a wake-up that finds
    /// nothing to read allocates and clears nothing.
    pub read_scratch: RefCell<Box<[u8]>>,
    /// Successful password checks, for reconnect storms (this shard's only).
    pub verify_cache: RefCell<crate::auth::VerifyCache>,
    /// Password checks running or queued on the blocking pool: a storm of logins waits here
    /// (each within its connect timeout) instead of queueing unbounded work.
    pub verify_slots: glommio::sync::Semaphore,
    /// The log writer's side of persistence (`None`: off).
    pub store: Option<super::store_io::StoreIo>,
}

impl Shard {
    pub fn counters(&self) -> &ShardCounters {
        &self.shared.counters[self.id]
    }

    pub fn register_conn(&self, key: ConnKey) -> Rc<ConnHandle> {
        let h = Rc::new(ConnHandle::default());
        self.conns.borrow_mut().insert(key, h.clone());
        h
    }

    pub fn forget_conn(&self, key: ConnKey) {
        self.conns.borrow_mut().remove(&key);
    }

    /// Move the core's outputs out: peer messages into the mailboxes, dirty connections woken,
    /// the timer re-armed if an earlier deadline appeared. Call after every batch of inputs.
    pub fn after_input(&self) {
        let now = Instant::now();
        let mut core = self.core.borrow_mut();
        let mask = core.peers_with_output();
        if mask != 0 {
            for peer in 0..self.shared.shards {
                if mask & (1 << peer) != 0
                    && !self.flushing[peer].get()
                    && self.push_peer(&mut core, peer, now)
                {
                    // Full: the peer's flusher waits for room and moves the rest.
                    self.flushing[peer].set(true);
                    self.flush_wake[peer].notify();
                }
            }
        }
        if let Some(io) = &self.store {
            if core.store_pending() {
                io.wake.notify();
            }
        }
        let conns = self.conns.borrow();
        while let Some(k) = core.poll_dirty() {
            if let Some(h) = conns.get(&k) {
                h.notify.notify();
            }
        }
        if let Some(t) = core.poll_timeout() {
            let rearm = self
                .timer_armed
                .get()
                .is_none_or(|armed| t + TIMER_SLACK < armed);
            if rearm {
                self.timer_wake.notify();
            }
        }
    }

    /// Move messages for `peer` into its mailbox; true if it filled up first (the message
    /// that did not fit goes back to the core, first in line).
    fn push_peer(&self, core: &mut ShardCore, peer: ShardId, now: Instant) -> bool {
        while let Some(m) = core.poll_peer(peer, now) {
            if let Err(e) = self.senders.try_send_to(peer, m) {
                match e {
                    glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m))
                    | glommio::GlommioError::Closed(glommio::ResourceType::Channel(m)) => {
                        core.unpoll_peer(peer, m);
                        return true;
                    }
                    other => {
                        // Only a bad peer index fails otherwise; shard code never makes one.
                        warn!(shard = self.id, "mailbox to shard {peer} failed: {other}");
                        return false;
                    }
                }
            }
        }
        false
    }
}

/// A peer's mailbox was full: wait for room (the peer drains it on its own core), move what
/// fits, repeat until the core has nothing more for that peer. While this runs it alone moves
/// messages to that peer (`Shard::flushing`), so their order holds.
async fn flusher(shard: Rc<Shard>, peer: ShardId) {
    loop {
        shard.flush_wake[peer].notified().await;
        loop {
            let m = shard.core.borrow_mut().poll_peer(peer, Instant::now());
            let Some(m) = m else { break };
            if shard.senders.send_to(peer, m).await.is_err() {
                break; // the peer is gone (shutting down)
            }
            let blocked = {
                let mut core = shard.core.borrow_mut();
                shard.push_peer(&mut core, peer, Instant::now())
            };
            if !blocked {
                break;
            }
        }
        shard.flushing[peer].set(false);
        shard.after_input();
    }
}

/// Hand every message from `peer` to the core, a batch at a time.
async fn receiver(
    shard: Rc<Shard>,
    peer: ShardId,
    mut rx: glommio::channels::shared_channel::ConnectedReceiver<PeerMsg>,
) {
    loop {
        let open = poll_fn(|cx| {
            let mut handled = 0usize;
            let mut core = shard.core.borrow_mut();
            let now = Instant::now();
            loop {
                match Pin::new(&mut rx).poll_next(cx) {
                    Poll::Ready(Some(m)) => {
                        core.handle_peer(peer, m, now);
                        handled += 1;
                        // Bound the batch so one busy peer cannot starve the shard.
                        if handled >= 256 {
                            return Poll::Ready(true);
                        }
                    }
                    Poll::Ready(None) => return Poll::Ready(false),
                    Poll::Pending if handled > 0 => return Poll::Ready(true),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
        shard.after_input();
        if !open {
            break;
        }
    }
}

/// The shard's one timer: sleeps until the core's earliest deadline (or until woken because
/// an earlier one appeared), then ticks the core.
async fn timer_task(shard: Rc<Shard>) {
    loop {
        let next = shard.core.borrow().poll_timeout();
        shard.timer_armed.set(next);
        match next {
            Some(t) => {
                let now = Instant::now();
                {
                    // Even a deadline already due costs a real timer of MIN_TIMER: a deadline
                    // that failed to move forward degrades into a slow poll, never into a task
                    // that does not yield (glommio does not preempt).
                    let left = t.saturating_duration_since(now).max(MIN_TIMER);
                    let sleep = async {
                        glommio::timer::sleep(left).await;
                        true
                    };
                    let woken = async {
                        shard.timer_wake.notified().await;
                        false
                    };
                    if !future::or(sleep, woken).await {
                        continue; // re-arm for the earlier deadline
                    }
                }
            }
            None => {
                shard.timer_wake.notified().await;
                continue;
            }
        }
        let now = Instant::now();
        shard.core.borrow_mut().handle_tick(now);
        shard.after_input();
    }
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, idx: Option<usize>) {
    let spec = idx.map(|i| shard.shared.listeners[i].clone());
    let tls = spec.as_ref().and_then(|l| l.tls.clone());
    // Handshakes in progress on this shard for this listener (see TlsListener).
    let handshakes = tls.as_ref().map(|t| {
        Rc::new(glommio::sync::Semaphore::new(
            t.max_handshakes_in_progress as u64,
        ))
    });
    loop {
        let mut permit = None;
        if let Some(sem) = &handshakes {
            // Take a handshake slot before accepting: a reconnect storm queues in the kernel
            // backlog instead of starving established clients.
            let p = future::or(async { Some(sem.acquire_static_permit(1).await) }, async {
                stop_wait(&shard).await;
                None
            })
            .await;
            match p {
                Some(Ok(p)) => permit = Some(p),
                _ => break,
            }
        }
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            stop_wait(&shard).await;
            None
        })
        .await;
        let Some(res) = accepted else { break };
        let stream = match res {
            Ok(s) => s,
            Err(_) if shard.stopping.get() => break, // the listener was shut down
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(shard = shard.id, "accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!("set_nodelay: {e}");
        }
        let peer = stream.peer_addr().ok();
        if let (Some(i), Some(l)) = (idx, &spec) {
            shard.shared.accepted[shard.id][i].inc();
            let n = shard.shared.connections[i].fetch_add(1, Ordering::AcqRel);
            if l.max_connections != 0 && n >= l.max_connections {
                shard.shared.connections[i].fetch_sub(1, Ordering::AcqRel);
                shard.counters().count_refusal(RefuseCause::MaxConnections);
                debug!(shard = shard.id, "max_connections reached: refusing");
                drop(stream);
                continue;
            }
        }
        let allow_anonymous = spec.as_ref().map(|l| l.allow_anonymous).unwrap_or(true);
        let auth = conn::Auth {
            allow_anonymous,
            max_qos: spec.as_ref().map(|l| l.max_qos).unwrap_or(QoS::ExactlyOnce),
            topic_alias_maximum: spec.as_ref().map(|l| l.topic_alias_maximum).unwrap_or(10),
            rule: tls
                .as_ref()
                .map(|t| t.username_rule)
                .unwrap_or(crate::tls::UsernameRule::FromClient),
            identity: None,
            listener: idx,
        };
        // Separate task types for TLS and plain connections: each task is sized for its
        // own future, so plain connections do not pay for TLS state.
        let count = ConnCount::new(&shard, idx);
        match &tls {
            Some(t) => {
                let (t, sh) = (t.clone(), shard.clone());
                let start = async move {
                    let hs = super::tls::handshake(&sh, &t, stream, peer).await;
                    drop(permit);
                    let (io, identity) = hs?;
                    Some((io, conn::Auth { identity, ..auth }))
                };
                // Boxed: the handshake's state is freed when it ends, before CONNECT is read.
                let start = Box::pin(start);
                glommio::spawn_local(conn::serve(shard.clone(), start, peer, count)).detach();
            }
            None => {
                let start = async move { Some((stream, auth)) };
                glommio::spawn_local(conn::serve(shard.clone(), start, peer, count)).detach();
            }
        }
    }
}

pub(crate) async fn stop_wait(shard: &Shard) {
    while !shard.stopping.get() {
        shard.stop_notify.notified().await;
    }
}

/// The shard's count of one connection's task, from accept until the task ends (or is
/// dropped with the executor).
struct ConnCount {
    shard: Rc<Shard>,
    idx: Option<usize>,
}

impl ConnCount {
    fn new(shard: &Rc<Shard>, idx: Option<usize>) -> ConnCount {
        shard.live_conns.set(shard.live_conns.get() + 1);
        shard.counters().sockets.inc();
        ConnCount {
            shard: shard.clone(),
            idx,
        }
    }
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        let shard = &self.shard;
        shard.live_conns.set(shard.live_conns.get() - 1);
        shard.counters().sockets.dec();
        if let Some(i) = self.idx {
            shard.shared.connections[i].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Bind a shard's listener. Like glommio's own `bind` (SO_REUSEPORT, so every shard has its
/// own accept queue on the same port), plus SO_REUSEADDR so a restart is not refused while old
/// connections sit in TIME_WAIT, and a deeper backlog for reconnect storms.
/// Also returns a second descriptor of the socket, to stop listening at shutdown: the accept
/// pending in io_uring keeps a dropped listener listening until the ring is torn down, and a
/// broker restarted at once would share the port with the dead one.
fn bind_reuseport(
    addr: std::net::SocketAddr,
) -> std::io::Result<(TcpListener, std::os::fd::OwnedFd)> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let sk = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sk.set_reuse_address(true)?;
    sk.set_reuse_port(true)?;
    sk.bind(&addr.into())?;
    sk.listen(4096)?;
    let second = sk.try_clone()?.into();
    // SAFETY: the fd is a bound, listening TCP socket we own; glommio takes ownership.
    Ok((
        unsafe { TcpListener::from_raw_fd(sk.into_raw_fd()) },
        second,
    ))
}

type Ready = mpsc::Sender<Result<(usize, Option<std::net::SocketAddr>), StartError>>;

pub(crate) async fn shard_main(
    id: usize,
    cpu: usize,
    shared: Arc<Shared>,
    mesh: MeshBuilder<PeerMsg, Full>,
    control: Arc<Control>,
    ready: Ready,
) {
    // Every shard must join, even one that then fails to bind, or the others wait forever.
    let Ok((senders, mut receivers)) = mesh.join().await else {
        let _ = ready.send(Err(StartError::Executor {
            shard: id,
            reason: "could not join the shard mesh".into(),
        }));
        return;
    };
    let core = ShardCore::new(id, shared.core_config(), shared.counters[id].clone());
    let shard = Rc::new(Shard {
        id,
        shared: shared.clone(),
        core: RefCell::new(core),
        conns: RefCell::new(AHashMap::new()),
        senders,
        flush_wake: (0..shared.shards).map(|_| Notify::default()).collect(),
        flushing: (0..shared.shards).map(|_| Cell::new(false)).collect(),
        timer_wake: Notify::default(),
        timer_armed: Cell::new(None),
        stopping: Cell::new(false),
        stop_notify: Notify::default(),
        live_conns: Cell::new(0),
        connecting: Cell::new(0),
        scratch: RefCell::new(bytes::BytesMut::new()),
        read_scratch: RefCell::new(vec![0; super::conn::READ_CHUNK].into_boxed_slice()),
        verify_cache: RefCell::new(crate::auth::VerifyCache::default()),
        verify_slots: glommio::sync::Semaphore::new(MAX_VERIFYING),
        store: shared.store.as_ref().map(|s| {
            super::store_io::StoreIo::new(s.dirs[id].clone(), s.sync, Duration::from_millis(2))
                .with_seal(
                    s.compaction
                        .as_ref()
                        .map(|(board, c)| (board.clone(), c.seal_every())),
                )
        }),
    });

    for (peer, rx) in receivers.streams() {
        glommio::spawn_local(receiver(shard.clone(), peer, rx)).detach();
    }
    for peer in 0..shared.shards {
        if peer != id {
            glommio::spawn_local(flusher(shard.clone(), peer)).detach();
        }
    }
    glommio::spawn_local(timer_task(shard.clone())).detach();
    if let Some(st) = &shared.store {
        glommio::spawn_local(super::store_io::store_task(shard.clone())).detach();
        let mine = st.recovered[id].lock().ok().and_then(|mut r| r.take());
        if let Some((sessions, retained, next_seq)) = mine {
            shard
                .core
                .borrow_mut()
                .recover(sessions, retained, next_seq, Instant::now());
            shard.after_input();
        }
        // Nobody listens before every shard routes to every recovered session: a message
        // acknowledged at once must find them (bounded: a shard that never answers is
        // reported, and the broker starts anyway).
        let deadline = Instant::now() + shared.cfg.peer_timeout;
        let mut counted = false;
        loop {
            if !counted && shard.core.borrow().broadcasts_settled() {
                counted = true;
                st.settled.fetch_add(1, Ordering::AcqRel);
            }
            if counted && st.settled.load(Ordering::Acquire) >= shared.shards {
                break;
            }
            if Instant::now() > deadline {
                warn!(
                    shard = id,
                    "persistence: recovered routes not confirmed by every shard in time"
                );
                break;
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    let mut bound = Vec::new();
    let mut listen_fds = Vec::new();
    for (i, l) in shared.listeners.iter().enumerate() {
        match bind_reuseport(l.addr) {
            Ok((listener, fd)) => {
                bound.push((listener, Some(i)));
                listen_fds.push(fd);
            }
            Err(e) => {
                let _ = ready.send(Err(StartError::Bind {
                    addr: l.addr,
                    source: std::io::Error::other(e.to_string()),
                }));
                return;
            }
        }
    }
    let mut shard_addr = None;
    if shared.cfg.shard_listeners {
        match bind_reuseport(std::net::SocketAddr::from(([127, 0, 0, 1], 0))) {
            Ok((listener, fd)) => {
                shard_addr = listener.local_addr().ok();
                bound.push((listener, None));
                listen_fds.push(fd);
            }
            Err(e) => {
                let _ = ready.send(Err(StartError::Executor {
                    shard: id,
                    reason: format!("shard listener: {e}"),
                }));
                return;
            }
        }
    }
    let addrs: Vec<String> = bound
        .iter()
        .filter_map(|(l, _)| l.local_addr().ok().map(|a| a.to_string()))
        .collect();
    info!(
        "shard {id} on core {cpu}: listening on {}",
        addrs.join(", ")
    );
    for (listener, idx) in bound {
        glommio::spawn_local(accept_loop(shard.clone(), listener, idx)).detach();
    }
    let _ = ready.send(Ok((id, shard_addr)));

    // Control: the shutdown flag (set from a signal thread) and `$SYS` (shard 0).
    shared.heartbeat[id].set(shared.epoch.elapsed().as_millis() as u64);
    let started = Instant::now();
    let mut next_sys = shared.cfg.sys_interval.map(|d| started + d);
    loop {
        glommio::timer::sleep(CONTROL_PERIOD).await;
        if let Some(h) = &shared.cfg.stall_hook {
            h.stall_here(id, &control);
        }
        shared.heartbeat[id].set(shared.epoch.elapsed().as_millis() as u64);
        if control.shutdown_requested() {
            break;
        }
        let now = Instant::now();
        // Reloaded password/ACL files (SIGHUP): one atomic load per file when unchanged.
        let refreshed = shard.core.borrow_mut().refresh_security(now);
        if refreshed {
            shard.after_input();
        }
        if id == 0 && next_sys.is_some_and(|t| now >= t) {
            super::sys::publish(&shard, started);
            next_sys = shared.cfg.sys_interval.map(|d| now + d);
        }
    }
    shard.stopping.set(true);
    // Stop listening now, synchronously (see `bind_reuseport`).
    for fd in &listen_fds {
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown(2) on a socket descriptor we own; it only changes its state.
        unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
    }
    shard.stop_notify.notify();
    shard.core.borrow_mut().shutdown(Instant::now());
    shard.after_input();
    // Connections flush their DISCONNECT and close; bounded.
    let deadline = Instant::now() + Duration::from_secs(3);
    while shard.live_conns.get() > shard.connecting.get() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if let Some(io) = &shard.store {
        // What was recorded goes to disk before the shard stops (bounded).
        let deadline = Instant::now() + Duration::from_secs(3);
        while (!io.idle.get() || shard.core.borrow().store_pending()) && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        debug!(
            "shard {id}: persistence wrote {} batches, {} bytes of records",
            io.batches.get(),
            io.bytes.get()
        );
    }
    shard.senders.close();
    debug!("shard {id} stopped");
}
