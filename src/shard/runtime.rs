//! One shard: its state, its cross-shard message handling, and its tasks.
//!
//! Owns: `Shard` (per-core state behind one `RefCell`, never shared with other threads), the
//! `ShardMsg` protocol between shards, routing of publishes (local delivery + one forward per
//! remote shard), takeover and session hand-over, and shutdown of the shard. Must not touch:
//! socket reads/writes (that is `conn`), protocol rules (session/codec).
//!
//! Borrow discipline: `Shard::st` is borrowed only in short synchronous sections, never across
//! an `.await`, so tasks on the shard cannot observe each other half-way.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::mem;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ahash::{AHashMap, AHashSet};
use bytestring::ByteString;
use futures_lite::future;
use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::net::TcpListener;
use smallvec::SmallVec;
use tracing::{debug, info, warn};

use super::mailbox::{spawn_receivers, Forwarded, MeshMailbox, Outbox, ShardId};
use super::notify::Notify;
use super::registry::{conn_key, conn_shard, home_shard, ConnKey, Registered, Registry};
use super::{conn, Control, ListenerSpec, RuntimeConfig, StartError};
use crate::codec::{Packet, QoS, ReasonCode, TopicFilter};
use crate::message::Message;
use crate::routing::{
    self, shards_in, LocalSubscription, LocalSubscriptions, RetainedStore, RouteDelta,
    RoutingReplica, ShardMatch,
};
use crate::session::{CloseReason, DeliveryOutcome, Session, SessionEvent, SessionState};

/// Broker-wide read-only settings plus the few atomics shards share (connection counts).
pub(crate) struct Shared {
    pub cfg: RuntimeConfig,
    pub listeners: Vec<ListenerSpec>,
    pub shards: usize,
    pub connections: Vec<AtomicUsize>,
    /// Each shard's counters, copied by the shard on its control tick (read-only outside).
    pub stats: Vec<std::sync::Mutex<Stats>>,
}

impl Shared {
    pub fn new(cfg: RuntimeConfig, listeners: Vec<ListenerSpec>, shards: usize) -> Self {
        let connections = listeners.iter().map(|_| AtomicUsize::new(0)).collect();
        Shared {
            cfg,
            listeners,
            shards,
            connections,
            stats: (0..shards).map(|_| Default::default()).collect(),
        }
    }

    /// Each shard's latest counter snapshot, indexed by shard.
    pub fn stats_snapshot(&self) -> Vec<Stats> {
        self.stats
            .iter()
            .map(|s| s.lock().map(|s| *s).unwrap_or_default())
            .collect()
    }
}

/// Messages between shards. All `Send`: payloads are refcounted `Bytes`.
pub(crate) enum ShardMsg {
    /// A shard gained its first / lost its last subscriber on a filter. `seq` is the sender's
    /// broadcast sequence number, acknowledged with `Applied`.
    Route { delta: RouteDelta, seq: u64 },
    /// Deliver to this shard's plain subscribers (if `plain`) and to one local member of each
    /// share group in `groups`.
    Forward {
        msg: Message,
        plain: bool,
        groups: SmallVec<[TopicFilter; 1]>,
    },
    /// A retained message (or its deletion) to apply to this shard's retained replica.
    Retain { msg: Message, seq: u64 },
    /// The receiver applied the sender's broadcasts up to `seq` (see `Shard::settled`).
    Applied { seq: u64 },
    /// To the home shard: `conn` is connecting with `client_id`.
    Register {
        client_id: ByteString,
        conn: ConnKey,
    },
    /// To the shard hosting `previous`: close it (if live) and hand its session to `conn`.
    Takeover { previous: ConnKey, conn: ConnKey },
    /// To the shard hosting `conn`: the registration is done; here is the previous session.
    Handover {
        conn: ConnKey,
        state: Option<Transfer>,
    },
    /// From the new host of a moved session (`old` → `new`), to every other shard, after its
    /// route deltas: "switch now". Each shard answers `Cutover` to the old host and
    /// `CutoverAck` to the new one at the same moment, so both agree, per sending shard,
    /// which of its messages reach the session through the old host (parked there) and
    /// which directly (see `Parked`).
    CutoverRequest { old: ConnKey, new: ConnKey },
    /// To the old host: the sender's later messages reach the session directly.
    Cutover { old: ConnKey },
    /// To the new host: the sender's later messages for `new` are to be delivered.
    CutoverAck { new: ConnKey },
    /// Messages that matched a moved session while its routes were being switched, for its
    /// new connection `conn`.
    Unparked { conn: ConnKey, msgs: Vec<ParkedMsg> },
    /// To the home shard: the session of `conn` ended for good.
    Unregister {
        client_id: ByteString,
        conn: ConnKey,
    },
}

/// A session moving to another shard, with the key it had there (its old shard parks what
/// still arrives for it until every shard routes to the new host).
pub(crate) struct Transfer {
    pub from: ConnKey,
    pub state: Box<SessionState>,
}

pub(crate) type ParkedMsg = (
    Message,
    crate::codec::SubscriptionOptions,
    SmallVec<[u32; 2]>,
);

/// A session that moved away: its subscriptions stay in this shard's table (under its old
/// key) until every shard has switched to the new host, and what matches them meanwhile is
/// kept for the new host — unless it came from a shard that already switched (that shard
/// delivered it to the new host itself), so nothing is lost and nothing arrives twice.
pub(crate) struct Parked {
    new_conn: ConnKey,
    filters: Vec<TopicFilter>,
    /// Shards that have switched (bit per shard).
    cut: u64,
    msgs: Vec<ParkedMsg>,
    since: Instant,
}

/// A move that takes longer than this is finished anyway (a shard stopped answering).
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// The link between a session and its live connection task.
#[derive(Default)]
pub(crate) struct ConnLink {
    /// Woken when the session has packets to send or must close.
    pub notify: Notify,
    /// The session asked to close (after flushing what is queued).
    pub closing: Cell<bool>,
    /// Packets left by a session that was taken away from this connection (takeover): the
    /// connection writes them and closes.
    pub last_words: RefCell<Vec<Packet>>,
    /// The session was taken away (takeover) or the shard is stopping.
    pub detached: Cell<bool>,
}

impl ConnLink {
    /// The session leaves this connection (takeover, or it ended): keep its last packets
    /// (e.g. DISCONNECT) for the connection to write, then close it.
    fn detach(&self, session: &mut Session) {
        let mut words = self.last_words.borrow_mut();
        while let Some(p) = session.poll_transmit() {
            words.push(p);
        }
        self.detached.set(true);
        self.closing.set(true);
        self.notify.notify();
    }
}

pub(crate) struct Slot {
    /// Boxed: the map then holds small entries, and its spare capacity costs little.
    pub session: Box<Session>,
    pub link: Option<Rc<ConnLink>>,
}

/// A connection waiting for its home shard's answer.
#[derive(Default)]
pub(crate) struct Pending {
    pub result: RefCell<Option<Option<Transfer>>>,
    pub notify: Notify,
    /// A newer connection with the same id took over before this one started its session.
    pub kicked: Cell<bool>,
    /// The connection gave up waiting (`peer_timeout`); the home shard's answer is still to
    /// come.
    pub abandoned: Cell<bool>,
    pub client_id: ByteString,
}

#[derive(Default, Debug, Clone, Copy)]
pub struct Stats {
    pub publishes_in: u64,
    pub deliveries: u64,
    pub dropped_queue_full: u64,
    pub dropped_qos0_slow: u64,
    pub dropped_too_large: u64,
    pub dropped_expired: u64,
    pub forwards_out: u64,
    pub oversize_publishes: u64,
    /// Gauges, refreshed on the control tick.
    pub live_conns: u64,
    pub retained: u64,
}

pub(crate) struct State {
    pub registry: Registry,
    pub sessions: AHashMap<ConnKey, Slot>,
    /// Sessions without a live connection.
    pub offline: AHashSet<ConnKey>,
    /// Timers of offline sessions (session expiry, will delay): earliest first. Entries may
    /// be stale; they are checked against the session when they fire.
    pub timers: BinaryHeap<Reverse<(Instant, ConnKey)>>,
    pub local: LocalSubscriptions<ConnKey>,
    pub replica: RoutingReplica,
    pub retained: RetainedStore,
    pub pending: AHashMap<ConnKey, Rc<Pending>>,
    /// Sessions that moved away and whose routes are being switched (see `Parked`).
    pub parked: AHashMap<ConnKey, Parked>,
    /// Sessions that moved here, with the shards that have switched to us (bit per shard):
    /// messages from the others still come through the old host.
    pub switching: AHashMap<ConnKey, (u64, Instant)>,
    pub stats: Stats,
    /// QoS 1/2 forwards a saturated peer refused; the publishing connection retries them
    /// before it sends its acknowledgements.
    pub held: Vec<(ShardId, ShardMsg)>,
    // Scratch buffers reused across publishes (no allocation per message).
    match_buf: Vec<(ConnKey, LocalSubscription)>,
    shard_match: ShardMatch,
    chosen: Vec<(TopicFilter, routing::ShardId)>,
    events: Vec<SessionEvent>,
    retained_buf: Vec<Message>,
}

pub(crate) struct Shard {
    pub id: ShardId,
    pub shared: Arc<Shared>,
    pub outbox: Outbox<ShardMsg, MeshMailbox<ShardMsg>>,
    pub st: RefCell<State>,
    next_conn: Cell<u64>,
    pub_counter: Cell<u64>,
    pub stopping: Cell<bool>,
    pub stop_notify: Notify,
    pub live_conns: Cell<usize>,
    /// Of `live_conns`, those still waiting for their CONNECT: shutdown does not wait for
    /// them (they have nothing to flush).
    pub connecting: Cell<usize>,
    /// Sequence number of this shard's latest broadcast, and what each peer has applied.
    broadcast_seq: Cell<u64>,
    applied_by_peer: RefCell<Vec<u64>>,
    settle_waiters: super::notify::WaitList,
    /// Messages to this shard from itself, handled on the next turn (never re-entrantly).
    self_queue: RefCell<Vec<ShardMsg>>,
    self_notify: Notify,
}

/// Most packets a session may have waiting to be written before QoS 0 deliveries to it are
/// dropped (the session's bound, which its retained backlog honours too).
const MAX_PENDING_TRANSMIT: usize = crate::session::MAX_PENDING_TRANSMIT;

impl Shard {
    pub fn next_conn_key(&self) -> ConnKey {
        let n = self.next_conn.get() + 1;
        self.next_conn.set(n);
        conn_key(self.id, n)
    }

    fn routing_id(&self) -> routing::ShardId {
        // start() refuses more than MAX_SHARDS shards.
        routing::ShardId::new(self.id).unwrap_or(routing::ShardId::new(0).unwrap())
    }

    /// Send a control message to `to`, or queue it for this shard's own next turn.
    pub fn send_control(&self, to: ShardId, msg: ShardMsg) {
        if to == self.id {
            self.self_queue.borrow_mut().push(msg);
            self.self_notify.notify();
        } else {
            self.outbox.send_control(to, msg);
        }
    }

    fn broadcast_delta(&self, st: &mut State, delta: RouteDelta) {
        st.replica.apply(&delta);
        let seq = self.next_broadcast_seq();
        for peer in 0..self.shared.shards {
            if peer != self.id {
                let delta = delta.clone();
                self.outbox
                    .send_control(peer, ShardMsg::Route { delta, seq });
            }
        }
    }

    fn next_broadcast_seq(&self) -> u64 {
        let seq = self.broadcast_seq.get() + 1;
        self.broadcast_seq.set(seq);
        seq
    }

    /// The latest broadcast (route delta or retained update) this shard has sent.
    pub fn broadcast_seq(&self) -> u64 {
        self.broadcast_seq.get()
    }

    /// Every other shard has applied this shard's broadcasts up to `seq`.
    pub fn settled(&self, seq: u64) -> bool {
        self.applied_by_peer
            .borrow()
            .iter()
            .enumerate()
            .all(|(peer, &a)| peer == self.id || a >= seq)
    }

    /// Wait until `settled(seq)`. A SUBACK (or the PUBACK of a retained publish) is held
    /// until then, so a client that saw it can rely on what it did being visible on every
    /// core: a publish that follows a SUBACK, from any client on any shard, is delivered;
    /// a subscribe that follows a retained PUBACK gets the message (mosquitto's guarantees).
    ///
    /// Bounded by `peer_timeout`: returns the shards that have not confirmed by then (empty
    /// when settled, or when the shard is stopping).
    pub async fn wait_settled(&self, seq: u64) -> Vec<ShardId> {
        let give_up = Instant::now() + self.shared.cfg.peer_timeout;
        while !self.settled(seq) && !self.stopping.get() {
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let applied = self.applied_by_peer.borrow();
                return (0..self.shared.shards)
                    .filter(|&p| p != self.id && applied[p] < seq)
                    .collect();
            }
            future::or(self.settle_waiters.wait(), glommio::timer::sleep(left)).await;
        }
        Vec::new()
    }

    /// A peer whose control backlog (messages beyond its mailbox) is above
    /// `control_backlog_limit`, with that backlog: while there is one, this shard refuses new
    /// connections (the operations that make the backlog grow), see `mailbox`.
    pub fn control_backlogged(&self) -> Option<(ShardId, usize)> {
        let limit = self.shared.cfg.control_backlog_limit;
        (0..self.shared.shards)
            .filter(|&p| p != self.id)
            .map(|p| (p, self.outbox.backlog(p)))
            .find(|&(_, n)| n > limit)
    }

    fn ack_broadcast(&self, from: ShardId, seq: u64) {
        if from != self.id {
            self.outbox.send_control(from, ShardMsg::Applied { seq });
        }
    }

    /// Handle a message from shard `from` (possibly this one).
    pub fn handle_msg(&self, from: ShardId, msg: ShardMsg) {
        let now = Instant::now();
        match msg {
            ShardMsg::Route { delta, seq } => {
                self.st.borrow_mut().replica.apply(&delta);
                self.ack_broadcast(from, seq);
            }
            ShardMsg::Applied { seq } => {
                let mut a = self.applied_by_peer.borrow_mut();
                if a[from] < seq {
                    a[from] = seq;
                }
                drop(a);
                self.settle_waiters.wake_all();
            }
            ShardMsg::Forward { msg, plain, groups } => {
                let mut st = self.st.borrow_mut();
                self.deliver_local(&mut st, from, &msg, plain, &groups, now);
            }
            ShardMsg::CutoverRequest { old, new } => {
                // Both answers leave now, so the old and the new host split this shard's
                // messages at the same point.
                let mut st = self.st.borrow_mut();
                self.cut_over(&mut st, old);
                drop(st);
                self.send_control(conn_shard(new), ShardMsg::CutoverAck { new });
            }
            ShardMsg::Cutover { old } => {
                let mut st = self.st.borrow_mut();
                self.mark_cut(&mut st, old, from);
            }
            ShardMsg::CutoverAck { new } => {
                let all = self.all_shards_mask();
                let mut st = self.st.borrow_mut();
                let done = st.switching.get_mut(&new).is_some_and(|(m, _)| {
                    *m |= 1 << from;
                    *m == all
                });
                if done {
                    st.switching.remove(&new);
                }
            }
            ShardMsg::Unparked { conn, msgs } => {
                let mut st = self.st.borrow_mut();
                let Some(slot) = st.sessions.get_mut(&conn) else {
                    return;
                };
                for (m, opts, ids) in msgs {
                    slot.session.deliver(&m, opts, &ids, now);
                }
                if let Some(link) = &slot.link {
                    link.notify.notify();
                }
                self.pump(&mut st, conn, now);
            }
            ShardMsg::Retain { msg, seq } => {
                self.st.borrow_mut().retained.set(msg);
                self.ack_broadcast(from, seq);
            }
            ShardMsg::Register { client_id, conn } => {
                let reg = self.st.borrow_mut().registry.register(client_id, conn);
                match reg {
                    Registered::Fresh => self
                        .send_control(conn_shard(conn), ShardMsg::Handover { conn, state: None }),
                    Registered::Takeover { previous } => self
                        .send_control(conn_shard(previous), ShardMsg::Takeover { previous, conn }),
                }
            }
            ShardMsg::Takeover { previous, conn } => {
                let state = self.take_session(previous, conn, now);
                self.send_control(conn_shard(conn), ShardMsg::Handover { conn, state });
            }
            ShardMsg::Handover { conn, state } => {
                // Stays in `pending` until the connection task installs its session, so a
                // takeover arriving in between finds the state here (see `take_session`).
                let pending = self.st.borrow().pending.get(&conn).cloned();
                match pending {
                    Some(p) if p.abandoned.get() => {
                        // The connection gave up waiting. No previous session: forget the
                        // registration. A session handed over: keep it here, where the
                        // registry now points, so the client's next connect takes it over
                        // (`take_session` finds it in `pending`).
                        match state {
                            None => {
                                self.st.borrow_mut().pending.remove(&conn);
                                let home = home_shard(&p.client_id, self.shared.shards);
                                let client_id = p.client_id.clone();
                                self.send_control(home, ShardMsg::Unregister { client_id, conn });
                            }
                            Some(t) => *p.result.borrow_mut() = Some(Some(t)),
                        }
                    }
                    Some(p) => {
                        *p.result.borrow_mut() = Some(state);
                        p.notify.notify();
                    }
                    None => {
                        // Only a stopping shard abandons a pending registration; the state
                        // goes with the process.
                        debug!(
                            shard = self.id,
                            has_state = state.is_some(),
                            "late hand-over"
                        );
                    }
                }
            }
            ShardMsg::Unregister { client_id, conn } => {
                self.st.borrow_mut().registry.unregister(&client_id, conn);
            }
        }
    }

    /// Detach the session of `key` (takeover): close its connection with 0x8E if live, remove
    /// its subscriptions from this shard, and return its persistent state.
    fn take_session(&self, key: ConnKey, new_conn: ConnKey, now: Instant) -> Option<Transfer> {
        let mut st = self.st.borrow_mut();
        let Some(mut slot) = st.sessions.remove(&key) else {
            // Not started yet: its hand-over may be waiting for the connection task.
            let p = st.pending.get(&key)?.clone();
            p.kicked.set(true);
            p.notify.notify();
            let state = p.result.borrow_mut().take().flatten();
            if p.abandoned.get() {
                // Its connection gave up waiting: nobody else will remove it.
                st.pending.remove(&key);
            }
            return state;
        };
        st.offline.remove(&key);
        if slot.session.is_connected() {
            slot.session.disconnect(ReasonCode::SESSION_TAKEN_OVER, now);
        }
        // Run the session's last events (will, close) with the session out of the map.
        let mut events = mem::take(&mut st.events);
        while let Some(ev) = slot.session.poll_event() {
            events.push(ev);
        }
        for ev in events.drain(..) {
            self.handle_event(&mut st, key, ev, now);
        }
        st.events = events;
        if let Some(link) = slot.link.take() {
            link.detach(&mut slot.session);
        }
        let state = slot.session.into_state()?;
        // The subscriptions stay here, parked, until every shard routes to the new host.
        st.parked.insert(
            key,
            Parked {
                new_conn,
                filters: state.subscriptions().map(|(f, _)| f.clone()).collect(),
                cut: 0,
                msgs: Vec::new(),
                since: now,
            },
        );
        Some(Transfer {
            from: key,
            state: Box::new(state),
        })
    }

    fn all_shards_mask(&self) -> u64 {
        if self.shared.shards >= 64 {
            u64::MAX
        } else {
            (1u64 << self.shared.shards) - 1
        }
    }

    /// This shard switches to the new host of `old`: tell the old host (or mark it here).
    fn cut_over(&self, st: &mut State, old: ConnKey) {
        let parked_at = conn_shard(old);
        if parked_at == self.id {
            self.mark_cut(st, old, self.id);
        } else {
            self.send_control(parked_at, ShardMsg::Cutover { old });
        }
    }

    /// Shard `from` has switched for the parked session `old`.
    fn mark_cut(&self, st: &mut State, old: ConnKey, from: ShardId) {
        let all = self.all_shards_mask();
        let done = st.parked.get_mut(&old).is_some_and(|p| {
            p.cut |= 1 << from;
            p.cut == all
        });
        if done {
            self.finish_parked(st, old);
        }
    }

    /// Remove `key`'s subscriptions to `filters` from this shard's table, broadcasting the
    /// route deltas that causes.
    fn drop_routes(&self, st: &mut State, key: ConnKey, filters: &[TopicFilter]) {
        for filter in filters {
            if let Some(d) = st.local.unsubscribe(filter, &key).delta {
                self.broadcast_delta(st, d);
            }
        }
    }

    /// Every shard routes to the new host of `old`: drop its parked subscriptions here and
    /// send what was kept to the new connection.
    fn finish_parked(&self, st: &mut State, old: ConnKey) {
        let Some(p) = st.parked.remove(&old) else {
            return;
        };
        self.drop_routes(st, old, &p.filters);
        if !p.msgs.is_empty() {
            let msg = ShardMsg::Unparked {
                conn: p.new_conn,
                msgs: p.msgs,
            };
            self.send_control(conn_shard(p.new_conn), msg);
        }
    }

    /// The new connection of a moved session installed it: ask every shard to switch, or,
    /// when it moved within this shard, switch at once (nothing else routes differently).
    pub fn start_cutover(&self, st: &mut State, old: ConnKey, new: ConnKey) {
        let parked_at = conn_shard(old);
        if parked_at == self.id {
            if let Some(p) = st.parked.remove(&old) {
                let now = Instant::now();
                self.drop_routes(st, old, &p.filters);
                if let Some(slot) = st.sessions.get_mut(&p.new_conn) {
                    for (m, opts, ids) in p.msgs {
                        slot.session.deliver(&m, opts, &ids, now);
                    }
                }
            }
            return;
        }
        // Until a shard acknowledges, its messages for `new` arrive through the old host.
        st.switching.insert(new, (1 << self.id, Instant::now()));
        self.cut_over(st, old);
        for shard in 0..self.shared.shards {
            if shard != self.id {
                self.send_control(shard, ShardMsg::CutoverRequest { old, new });
            }
        }
    }

    /// Drain `key`'s session events and act on them. Call after every input to a session.
    pub fn pump(&self, st: &mut State, key: ConnKey, now: Instant) {
        let mut events = mem::take(&mut st.events);
        while let Some(slot) = st.sessions.get_mut(&key) {
            while let Some(ev) = slot.session.poll_event() {
                events.push(ev);
            }
            if events.is_empty() {
                break;
            }
            for ev in events.drain(..) {
                self.handle_event(st, key, ev, now);
            }
        }
        st.events = events;
    }

    fn handle_event(&self, st: &mut State, key: ConnKey, ev: SessionEvent, now: Instant) {
        match ev {
            SessionEvent::Publish(msg) | SessionEvent::Will(msg) => {
                // Held-back QoS 1/2 forwards are resolved by the connection task; here a full
                // peer drops (wills and retained-only paths cannot wait).
                let held = self.route(st, msg, now);
                st.held.extend(held);
            }
            SessionEvent::Subscribe {
                filter,
                options,
                subscription_id,
                ..
            } => {
                let sub = LocalSubscription {
                    options,
                    subscription_id,
                };
                // Retained messages: the session asks for them as its client drains (see
                // `feed_retained`). Too-deep filters were refused in the SUBACK already.
                match st.local.subscribe(&filter, key, sub) {
                    Ok(out) => {
                        if let Some(d) = out.delta {
                            self.broadcast_delta(st, d);
                        }
                    }
                    Err(e) => warn!(
                        shard = self.id,
                        "subscription to {} not added: {e}",
                        crate::logging::escape(filter.as_str())
                    ),
                }
            }
            SessionEvent::Unsubscribe { filter } => {
                self.drop_routes(st, key, std::slice::from_ref(&filter));
            }
            SessionEvent::Notice(n) => self.log_notice(st, key, n),
            SessionEvent::Close { reason } => {
                match reason {
                    CloseReason::ClientDisconnect(_) | CloseReason::ConnectionLost => {
                        debug!(shard = self.id, ?reason, "connection closed")
                    }
                    _ => info!(shard = self.id, ?reason, "closing connection"),
                }
                if let Some(slot) = st.sessions.get_mut(&key) {
                    if let Some(link) = &slot.link {
                        link.closing.set(true);
                        link.notify.notify();
                    }
                }
            }
            SessionEvent::Ended => {
                if let Some(slot) = st.sessions.remove(&key) {
                    st.offline.remove(&key);
                    let client_id = slot.session.client_id().clone();
                    if let Some(link) = slot.link {
                        let mut session = slot.session;
                        link.detach(&mut session);
                    }
                    let home = home_shard(&client_id, self.shared.shards);
                    self.send_control(
                        home,
                        ShardMsg::Unregister {
                            client_id,
                            conn: key,
                        },
                    );
                }
            }
        }
    }

    /// Hand the session of `key` the retained messages its SUBSCRIBEs asked for, as far as
    /// its transmit bound and window allow: one filter's matches at a time, the next when
    /// those have gone out. The connection task calls this before each write.
    pub fn feed_retained(&self, st: &mut State, key: ConnKey, now: Instant) {
        let mut buf = mem::take(&mut st.retained_buf);
        while let Some(slot) = st.sessions.get_mut(&key) {
            slot.session.fill_retained(now);
            let Some((filter, options, id)) = slot.session.next_retained_request() else {
                break;
            };
            st.retained.match_filter(&filter, now, &mut buf);
            let ids: SmallVec<[u32; 1]> = id.into_iter().collect();
            if let Some(slot) = st.sessions.get_mut(&key) {
                for m in buf.drain(..) {
                    slot.session.deliver_retained(&m, options, &ids, now);
                }
            }
            buf.clear();
        }
        st.retained_buf = buf;
    }

    fn log_notice(&self, st: &State, key: ConnKey, n: crate::session::Notice) {
        use crate::logging::escape;
        use crate::session::Notice;
        let client = st.sessions.get(&key).map(|s| s.session.client_id().clone());
        let client = client.as_deref().unwrap_or("");
        match n {
            Notice::SubscribeRefused {
                too_deep,
                over_limit,
                first,
            } => warn!(
                shard = self.id,
                "SUBSCRIBE from {}: {} filter(s) refused ({} deeper than {} levels: 0x8F; {} \
                 beyond max_subscriptions_per_client {}: 0x97); first: {}",
                escape(client),
                too_deep + over_limit,
                too_deep,
                routing::MAX_FILTER_LEVELS,
                over_limit,
                self.shared.cfg.session.max_subscriptions,
                escape(first.as_str()),
            ),
            Notice::BrokerOnlyTopic { topic } => debug!(
                shard = self.id,
                "Denied PUBLISH from {} to broker-only topic '{}'",
                escape(client),
                escape(topic.as_str())
            ),
        }
    }

    /// Route a publish: retained update, local delivery, one forward per remote shard.
    /// Returns QoS 1/2 forwards a saturated peer refused, for the caller to retry.
    pub fn route(
        &self,
        st: &mut State,
        msg: Message,
        now: Instant,
    ) -> SmallVec<[(ShardId, ShardMsg); 1]> {
        let mut held = SmallVec::new();
        st.stats.publishes_in += 1;
        if msg.payload.len() > self.shared.cfg.message_size_limit {
            // mosquitto's message_size_limit: the publish is acknowledged but not delivered.
            st.stats.oversize_publishes += 1;
            return held;
        }
        if msg.retain {
            // The store keeps it indefinitely: give it its own allocation (one copy, shared
            // by every shard's replica).
            let kept = msg.detached();
            st.retained.set(kept.clone());
            let seq = self.next_broadcast_seq();
            for peer in 0..self.shared.shards {
                if peer != self.id {
                    let msg = kept.clone();
                    self.outbox
                        .send_control(peer, ShardMsg::Retain { msg, seq });
                }
            }
        }
        let counter = self.pub_counter.get().wrapping_add(1);
        self.pub_counter.set(counter);
        let mut sm = mem::take(&mut st.shard_match);
        let mut chosen = mem::take(&mut st.chosen);
        sm.clear();
        chosen.clear();
        st.replica.match_shards(&msg.topic, &mut sm);
        let mask = sm.choose(counter, &mut chosen);
        let me = self.routing_id();
        let mut mine: SmallVec<[TopicFilter; 1]> = SmallVec::new();
        for (f, s) in &chosen {
            if *s == me {
                mine.push(f.clone());
            }
        }
        for peer in shards_in(mask) {
            if peer == me {
                continue;
            }
            let groups: SmallVec<[TopicFilter; 1]> = chosen
                .iter()
                .filter(|(_, s)| *s == peer)
                .map(|(f, _)| f.clone())
                .collect();
            let fwd = ShardMsg::Forward {
                msg: msg.clone(),
                plain: sm.plain & peer.bit() != 0,
                groups,
            };
            st.stats.forwards_out += 1;
            match self
                .outbox
                .send_data(peer.index(), fwd, msg.qos == QoS::AtMostOnce)
            {
                Forwarded::Sent | Forwarded::Dropped => {}
                Forwarded::Full(m) => held.push((peer.index(), m)),
            }
        }
        if mask & me.bit() != 0 {
            let plain = sm.plain & me.bit() != 0;
            self.deliver_local(st, self.id, &msg, plain, &mine, now);
        }
        st.shard_match = sm;
        st.chosen = chosen;
        held
    }

    /// Deliver to this shard's matching sessions: each session gets one copy at the highest
    /// granted QoS with all its matching subscription identifiers [MQTT-3.3.4-2/3].
    fn deliver_local(
        &self,
        st: &mut State,
        from: ShardId,
        msg: &Message,
        plain: bool,
        groups: &[TopicFilter],
        now: Instant,
    ) {
        let mut buf = mem::take(&mut st.match_buf);
        buf.clear();
        if plain {
            st.local.match_plain_into(&msg.topic, &mut buf);
        }
        let counter = self.pub_counter.get();
        for g in groups {
            match st.local.pick_shared(g, counter) {
                Some(m) => buf.push(m),
                None => self.reroute_group(st, msg, g),
            }
        }
        if buf.len() > 1 {
            buf.sort_unstable_by_key(|(k, _)| *k);
        }
        let mut i = 0;
        while i < buf.len() {
            let key = buf[i].0;
            let mut opts = buf[i].1.options;
            let mut ids: SmallVec<[u32; 2]> = SmallVec::new();
            let mut j = i;
            while j < buf.len() && buf[j].0 == key {
                let s = &buf[j].1;
                if s.options.qos > opts.qos {
                    opts.qos = s.options.qos;
                }
                // A copy is kept for no-local only if every matching subscription says so.
                opts.no_local &= s.options.no_local;
                opts.retain_as_published |= s.options.retain_as_published;
                if let Some(id) = s.subscription_id {
                    ids.push(id);
                }
                j += 1;
            }
            i = j;
            if let Some((mask, _)) = st.switching.get(&key) {
                if mask & (1 << from) == 0 {
                    continue; // the old host parks this one for us
                }
            }
            let Some(slot) = st.sessions.get_mut(&key) else {
                if let Some(p) = st.parked.get_mut(&key) {
                    // A moved session: keep it for the new host unless the sending shard
                    // already routes to that host itself.
                    if p.cut & (1 << from) == 0 {
                        let cap = self.shared.cfg.session.max_queued_messages.max(1);
                        if p.msgs.len() < cap {
                            p.msgs.push((msg.clone(), opts, ids));
                        } else {
                            st.stats.dropped_queue_full += 1;
                        }
                    }
                }
                continue;
            };
            if msg.qos.min(opts.qos) == QoS::AtMostOnce
                && slot.session.pending_transmit() >= MAX_PENDING_TRANSMIT
            {
                st.stats.dropped_qos0_slow += 1;
                continue;
            }
            match slot.session.deliver(msg, opts, &ids, now) {
                DeliveryOutcome::Sent => {
                    st.stats.deliveries += 1;
                    if let Some(link) = &slot.link {
                        link.notify.notify();
                    }
                }
                DeliveryOutcome::Queued => st.stats.deliveries += 1,
                DeliveryOutcome::Dropped(r) => match r {
                    crate::session::DropReason::QueueFull => st.stats.dropped_queue_full += 1,
                    crate::session::DropReason::PacketTooLarge => st.stats.dropped_too_large += 1,
                    crate::session::DropReason::Expired => st.stats.dropped_expired += 1,
                    _ => {}
                },
            }
        }
        buf.clear();
        st.match_buf = buf;
    }

    /// The sender chose this shard for `group`, but its last local member has just left
    /// (our route removal was still in flight): hand the message to a shard that still has
    /// members, per our replica, instead of losing it.
    fn reroute_group(&self, st: &mut State, msg: &Message, group: &TopicFilter) {
        let mut sm = mem::take(&mut st.shard_match);
        st.replica.match_shards(&msg.topic, &mut sm);
        let shards = sm
            .groups
            .iter()
            .filter(|(f, _)| f == group)
            .fold(0, |m, (_, s)| m | s)
            & !self.routing_id().bit();
        st.shard_match = sm;
        let Some(to) = routing::pick_shard(shards, self.pub_counter.get()) else {
            return;
        };
        let fwd = ShardMsg::Forward {
            msg: msg.clone(),
            plain: false,
            groups: smallvec::smallvec![group.clone()],
        };
        if let Forwarded::Full(m) =
            self.outbox
                .send_data(to.index(), fwd, msg.qos == QoS::AtMostOnce)
        {
            st.held.push((to.index(), m));
        }
    }

    /// Register a connecting client with its home shard and wait for the previous session,
    /// at most `peer_timeout`. `Err(None)`: shutting down or taken over already (nothing to
    /// say); `Err(Some(home))`: the home shard did not answer in time.
    pub async fn register(
        &self,
        client_id: ByteString,
        key: ConnKey,
    ) -> Result<Option<Transfer>, Option<ShardId>> {
        let pending = Rc::new(Pending {
            client_id: client_id.clone(),
            ..Pending::default()
        });
        self.st.borrow_mut().pending.insert(key, pending.clone());
        let home = home_shard(&client_id, self.shared.shards);
        self.send_control(
            home,
            ShardMsg::Register {
                client_id,
                conn: key,
            },
        );
        let give_up = Instant::now() + self.shared.cfg.peer_timeout;
        loop {
            if pending.kicked.get() {
                // Taken over before it started: the newer connection has the session.
                self.st.borrow_mut().pending.remove(&key);
                debug!(
                    shard = self.id,
                    "connection taken over before its session started"
                );
                return Err(None);
            }
            let ready = pending.result.borrow_mut().take();
            if let Some(r) = ready {
                // The caller installs the session before its next await, so nothing can
                // come between this and the session being in `sessions`.
                self.st.borrow_mut().pending.remove(&key);
                return Ok(r);
            }
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // The entry stays, abandoned: the home shard's late answer is handled then
                // (see `ShardMsg::Handover`), so a session handed over late is not lost.
                pending.abandoned.set(true);
                return Err(Some(home));
            }
            let stop = async {
                self.stop_notify_wait().await;
                Some(false)
            };
            let got = async {
                pending.notify.notified().await;
                Some(true)
            };
            let timer = async {
                glommio::timer::sleep(left).await;
                None
            };
            let woke = future::or(future::or(got, stop), timer).await;
            if woke == Some(false) && self.stopping.get() {
                self.st.borrow_mut().pending.remove(&key);
                return Err(None);
            }
        }
    }

    async fn stop_notify_wait(&self) {
        while !self.stopping.get() {
            self.stop_notify.notified().await;
        }
    }

    /// Timers of offline sessions (session expiry, will delay); live sessions are driven by
    /// their connection tasks.
    fn tick_offline(&self, now: Instant) {
        let mut st = self.st.borrow_mut();
        if !st.parked.is_empty() {
            let stale: Vec<ConnKey> = st
                .parked
                .iter()
                .filter(|(_, p)| now.duration_since(p.since) > PARK_TIMEOUT)
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                warn!(
                    shard = self.id,
                    "session move not confirmed by every shard in time"
                );
                self.finish_parked(&mut st, k);
            }
        }
        if !st.switching.is_empty() {
            st.switching
                .retain(|_, (_, since)| now.duration_since(*since) <= PARK_TIMEOUT);
        }
        while let Some(Reverse((due, key))) = st.timers.peek().copied() {
            if due > now {
                break;
            }
            st.timers.pop();
            if !st.offline.contains(&key) {
                continue;
            }
            let Some(slot) = st.sessions.get_mut(&key) else {
                continue;
            };
            match slot.session.poll_timeout() {
                Some(t) if t <= now => {
                    slot.session.handle_timeout(now);
                    self.pump(&mut st, key, now);
                    self.schedule_offline(&mut st, key);
                }
                Some(t) => st.timers.push(Reverse((t, key))),
                None => {}
            }
        }
    }

    /// The session of `key` just lost its connection: mark it offline and arm its timer.
    pub fn schedule_offline(&self, st: &mut State, key: ConnKey) {
        if let Some(t) = st.sessions.get(&key).and_then(|s| s.session.poll_timeout()) {
            st.timers.push(Reverse((t, key)));
        }
    }

    /// Ask every live connection to close with 0x8B (server shutting down).
    fn close_all(&self) {
        let now = Instant::now();
        let mut st = self.st.borrow_mut();
        let live: Vec<ConnKey> = st
            .sessions
            .iter()
            .filter(|(_, s)| s.link.is_some())
            .map(|(k, _)| *k)
            .collect();
        for k in live {
            if let Some(slot) = st.sessions.get_mut(&k) {
                slot.session
                    .disconnect(ReasonCode::SERVER_SHUTTING_DOWN, now);
            }
            self.pump(&mut st, k, now);
        }
    }
}

async fn flusher(shard: Rc<Shard>, peer: ShardId) {
    let notify = shard.outbox.flusher(peer);
    loop {
        notify.notified().await;
        while !shard.outbox.flush(peer) {
            // The peer is saturated: let it drain (it runs on another core).
            glommio::timer::sleep(Duration::from_micros(200)).await;
        }
    }
}

async fn self_dispatch(shard: Rc<Shard>) {
    loop {
        shard.self_notify.notified().await;
        loop {
            let batch = mem::take(&mut *shard.self_queue.borrow_mut());
            if batch.is_empty() {
                break;
            }
            for m in batch {
                shard.handle_msg(shard.id, m);
            }
        }
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
                shard.stop_notify_wait().await;
                None
            })
            .await;
            match p {
                Some(Ok(p)) => permit = Some(p),
                _ => break,
            }
        }
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            shard.stop_notify_wait().await;
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
            let n = shard.shared.connections[i].fetch_add(1, Ordering::AcqRel);
            if l.max_connections != 0 && n >= l.max_connections {
                shard.shared.connections[i].fetch_sub(1, Ordering::AcqRel);
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
        };
        // Separate task types for TLS and plain connections: each task is sized for its
        // own future, so plain connections do not pay for TLS state.
        match &tls {
            Some(t) => {
                let t = t.clone();
                glommio::spawn_local(conn_task(
                    shard.clone(),
                    idx,
                    async move |shard: Rc<Shard>| {
                        let hs = Box::pin(super::tls::handshake(&shard, &t, stream, peer)).await;
                        drop(permit);
                        if let Some((io, identity)) = hs {
                            conn::serve(shard, io, conn::Auth { identity, ..auth }, peer).await;
                        }
                    },
                ))
                .detach();
            }
            None => {
                glommio::spawn_local(conn_task(
                    shard.clone(),
                    idx,
                    async move |shard: Rc<Shard>| {
                        conn::serve(shard, stream, auth, peer).await;
                    },
                ))
                .detach();
            }
        }
    }
}

/// Run one connection's future with the shard's connection accounting around it.
async fn conn_task<F, Fut>(shard: Rc<Shard>, idx: Option<usize>, f: F)
where
    F: FnOnce(Rc<Shard>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    shard.live_conns.set(shard.live_conns.get() + 1);
    f(shard.clone()).await;
    shard.live_conns.set(shard.live_conns.get() - 1);
    if let Some(i) = idx {
        shard.shared.connections[i].fetch_sub(1, Ordering::AcqRel);
    }
}

/// Bind a shard's listener. Like glommio's own `bind` (SO_REUSEPORT, so every shard has its
/// own accept queue on the same port), plus SO_REUSEADDR so a restart is not refused while old
/// connections sit in TIME_WAIT, and a deeper backlog for reconnect storms.
/// Also returns a second descriptor of the socket, to stop listening at shutdown.
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
    mesh: MeshBuilder<ShardMsg, Full>,
    control: Arc<Control>,
    ready: Ready,
) {
    // Every shard must join, even one that then fails to bind, or the others wait forever.
    let Ok((senders, receivers)) = mesh.join().await else {
        let _ = ready.send(Err(StartError::Executor {
            shard: id,
            reason: "could not join the shard mesh".into(),
        }));
        return;
    };
    let outbox = Outbox::new(MeshMailbox::new(senders));
    let my_routing_id = routing::ShardId::new(id).unwrap_or(routing::ShardId::new(0).unwrap());
    let shard = Rc::new(Shard {
        id,
        shared: shared.clone(),
        outbox,
        st: RefCell::new(State {
            registry: Registry::default(),
            sessions: AHashMap::new(),
            offline: AHashSet::new(),
            timers: BinaryHeap::new(),
            local: LocalSubscriptions::new(my_routing_id),
            replica: RoutingReplica::new(),
            retained: RetainedStore::new(shared.cfg.retained),
            pending: AHashMap::new(),
            parked: AHashMap::new(),
            switching: AHashMap::new(),
            stats: Stats::default(),
            held: Vec::new(),
            match_buf: Vec::new(),
            shard_match: ShardMatch::default(),
            chosen: Vec::new(),
            events: Vec::new(),
            retained_buf: Vec::new(),
        }),
        next_conn: Cell::new(0),
        pub_counter: Cell::new(0),
        stopping: Cell::new(false),
        stop_notify: Notify::default(),
        live_conns: Cell::new(0),
        connecting: Cell::new(0),
        broadcast_seq: Cell::new(0),
        applied_by_peer: RefCell::new(vec![0; shared.shards]),
        settle_waiters: super::notify::WaitList::default(),
        self_queue: RefCell::new(Vec::new()),
        self_notify: Notify::default(),
    });

    let handler_shard = shard.clone();
    let _receivers = spawn_receivers(
        receivers,
        Rc::new(move |peer, msg| handler_shard.handle_msg(peer, msg)),
    );
    for peer in 0..shared.shards {
        if peer != id {
            glommio::spawn_local(flusher(shard.clone(), peer)).detach();
        }
    }
    glommio::spawn_local(self_dispatch(shard.clone())).detach();

    let mut bound = Vec::new();
    let mut unlisten = Vec::new();
    for (i, l) in shared.listeners.iter().enumerate() {
        match bind_reuseport(l.addr) {
            Ok((listener, fd)) => {
                bound.push((listener, Some(i)));
                unlisten.push(fd);
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
                unlisten.push(fd);
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

    // Control loop: shutdown flag, offline-session timers, counter snapshots, $SYS.
    let tick = Duration::from_millis(50);
    let started = Instant::now();
    let mut next_sys = shared.cfg.sys_interval.map(|d| started + d);
    loop {
        glommio::timer::sleep(tick).await;
        if let Some(h) = &shared.cfg.stall_hook {
            h.stall_here(id, &control);
        }
        let now = Instant::now();
        shard.tick_offline(now);
        {
            let mut st = shard.st.borrow_mut();
            st.stats.live_conns = shard.live_conns.get() as u64;
            st.stats.retained = st.retained.len() as u64;
            if let Ok(mut s) = shared.stats[id].lock() {
                *s = st.stats;
            }
        }
        if id == 0 && next_sys.is_some_and(|t| now >= t) {
            super::sys::publish(&shard, started);
            next_sys = shared.cfg.sys_interval.map(|d| now + d);
        }
        if control.shutdown_requested() {
            break;
        }
    }
    shard.stopping.set(true);
    // Stop listening now, synchronously. Dropping a listener only closes its descriptor: the
    // accept still pending in io_uring keeps the socket listening until the ring is torn
    // down, after the process exited, and a broker restarted at once then shares the port
    // (SO_REUSEPORT) with that dead socket, which swallows some of its connections.
    for fd in unlisten {
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown(2) on a socket descriptor we own (closed when `fd` drops).
        unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
    }
    shard.stop_notify.notify();
    shard.close_all();
    let deadline = Instant::now() + Duration::from_secs(3);
    while shard.live_conns.get() > shard.connecting.get() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    shard.outbox.mailbox().close();
    debug!("shard {id} stopped");
}
