//! Connections and the sessions attached to them: input, session events, output gating.
//!
//! Owns: [`Entry`] (a hosted session and its flow-control state), [`Live`] (one admitted
//! connection: its acknowledgement gate, peers it backed up, deferred input, pause count, close
//! state), handling of client packets and session events, and the release of a connection's
//! output. Must not touch: fan-out decisions (`fanout.rs`), the takeover protocol
//! (`takeover.rs`), pausing decisions (`flow.rs`).
//!
//! The gate: a connection's packets leave in order, and only when everything they may
//! acknowledge is done — route and retained changes applied by every shard (`gate`), and the
//! peer queues its own forwards filled draining below the bound (`held_on`). The whole output waits,
//! not just the acknowledgement, so the client sees packets in the order the session made them.

use std::collections::VecDeque;
use std::time::Instant;

use smallvec::SmallVec;
use tracing::{debug, info, warn};

use super::flow::SubFlow;
use super::msg::PeerMsg;
use super::registry::{home_shard, ConnKey};
use super::timers::TimerKind;
use super::{ConnectRequest, CoreConfig, ShardCore};
use crate::codec::{
    ConnAck, ConnAckProperties, Disconnect, Packet, ProtocolVersion, ReasonCode,
    SubscriptionOptions, TopicFilter,
};
use crate::metrics::RefuseCause;
use crate::routing::LocalSubscription;
use crate::session::{CloseReason, Notice, Session, SessionEvent};

/// A session hosted on this shard.
pub(crate) struct Entry {
    /// Boxed: the map holds small entries, and its spare capacity costs little.
    pub session: Box<Session>,
    /// A connection is attached and the session is connected (`conns[key]` is Active).
    pub live: bool,
    /// Set while the session's queue is full (it pauses publishers) or it is stalled.
    pub flow: Option<Box<SubFlow>>,
    /// The earliest session timer currently armed for it (dedups timer entries).
    pub timer_armed: Option<Instant>,
    /// Who the session is to the ACL (`None`: its listener has no security files).
    pub authz: Option<Box<super::Authz>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for the home shard; input deferred.
    Registering,
    /// The session under the same key is attached.
    Active,
    /// No session any more (taken over, ended, refused): send `last_words`, then close.
    Detached,
}

/// One admitted connection.
pub(crate) struct Live {
    pub version: ProtocolVersion,
    pub phase: Phase,
    /// Close once the output is sent.
    pub close: bool,
    /// Queued in `ShardCore::dirty`.
    pub dirty: bool,
    /// Broadcast sequence that must be settled before output may leave (0 = none).
    pub gate: u64,
    pub gate_since: Option<Instant>,
    /// Records (count) that must be durable before output may leave (0 = none).
    pub durable: u64,
    /// Peers (bit per shard) whose queue this publisher's QoS 1/2 forwards filled past the
    /// data bound: its acknowledgements and further publishes wait until they drain.
    pub held_on: u64,
    /// Packets read while paused, handled in order when the pause ends.
    pub deferred: VecDeque<Packet>,
    /// Subscribers (here or elsewhere) that paused this publisher.
    pub pause_refs: u32,
    /// Its deferred input waits for the store's backlog to drain (listed in `Store::held`).
    pub store_held: bool,
    /// The session's first packet (its CONNACK) has left: a close after this is a
    /// DISCONNECT, before it a refusing CONNACK.
    pub connack_sent: bool,
    /// Packets to send when no session is attached (refusal CONNACK, takeover DISCONNECT).
    pub last_words: VecDeque<Packet>,
    pub write_stalled_since: Option<Instant>,
    /// The last transmit batch fed retained messages (see `next_transmit`).
    fed_retained: bool,
    /// More retained messages are due once this batch is written.
    pub more_after_write: bool,
}

impl Live {
    fn new(version: ProtocolVersion) -> Live {
        Live {
            version,
            phase: Phase::Registering,
            close: false,
            dirty: false,
            gate: 0,
            gate_since: None,
            durable: 0,
            held_on: 0,
            deferred: VecDeque::new(),
            pause_refs: 0,
            store_held: false,
            connack_sent: false,
            last_words: VecDeque::new(),
            write_stalled_since: None,
            fed_retained: false,
            more_after_write: false,
        }
    }

    /// Output may leave (the acknowledgement gate is open and no peer is backed up with this
    /// publisher's forwards).
    pub fn gate_open(&self) -> bool {
        self.gate == 0 && self.held_on == 0 && self.durable == 0
    }

    /// Publishes from this connection must wait.
    pub fn paused(&self) -> bool {
        self.pause_refs > 0 || self.held_on != 0
    }

    pub fn input_paused(&self, cfg: &CoreConfig) -> bool {
        self.close || self.phase != Phase::Active || self.deferred.len() >= cfg.max_deferred_input
    }
}

/// A connection waiting for its home shard's answer. It outlives its connection if the client
/// goes away meanwhile (`abandoned`): a session handed over must still be installed.
pub(crate) struct Registering {
    pub req: Box<ConnectRequest>,
    /// A newer connection with the same id took over before the answer came: pass what
    /// arrives on to it (`by`), or discard it if that one starts clean.
    pub kicked: Option<(ConnKey, bool)>,
    /// The client is gone (closed, or refused on timeout): install offline.
    pub abandoned: bool,
}

/// Packets that never wait behind a paused publisher's deferred input: they carry no new
/// work, and a subscriber's acknowledgements must flow even while it is paused as a publisher
/// (otherwise two clients feeding each other could wait on each other forever).
fn bypasses_pause(p: &Packet) -> bool {
    matches!(
        p,
        Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)
            | Packet::PingReq
    )
}

fn is_progress(p: &Packet) -> bool {
    matches!(
        p,
        Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_)
    )
}

impl ShardCore {
    pub(super) fn on_connect(&mut self, key: ConnKey, req: ConnectRequest, now: Instant) {
        let version = req.connect.protocol;
        let mut live = Live::new(version);
        // A persistent session's CONNECT records its start: with the store's backlog at its
        // bound it is refused (v5 0x97, 3.1.1 3) rather than left waiting on a disk that may
        // not come back; a clean, non-persistent one records nothing and is served.
        let store_full = self.store.full
            && (!req.connect.clean_start
                || req
                    .connect
                    .properties
                    .session_expiry_interval
                    .is_some_and(|e| e != 0));
        if self.stopping || self.peers_overloaded() || store_full {
            // A refused CONNECT costs no peer traffic: answer at once.
            let reason = if self.stopping {
                self.counters.count_refusal(RefuseCause::ShuttingDown);
                ReasonCode::SERVER_SHUTTING_DOWN
            } else if store_full {
                self.counters.count_refusal(RefuseCause::StoreFull);
                debug!(
                    shard = self.id,
                    "CONNECT from {} refused (0x97): the store's backlog is at its bound",
                    crate::logging::escape(&req.client_id)
                );
                ReasonCode::QUOTA_EXCEEDED
            } else {
                self.counters.count_refusal(RefuseCause::ServerUnavailable);
                warn!(
                    shard = self.id,
                    "CONNECT from {} refused (0x88): a peer shard has more than \
                     control_backlog_limit ({}) control messages queued",
                    crate::logging::escape(&req.client_id),
                    self.cfg.peer_control_high_water
                );
                self.counters.peer_timeouts.inc();
                ReasonCode::SERVER_UNAVAILABLE
            };
            live.phase = Phase::Detached;
            live.close = true;
            live.last_words.push_back(refusal(reason));
            self.conns.insert(key, live);
            self.mark_dirty(key);
            return;
        }
        let client_id = req.client_id.clone();
        let clean_start = req.connect.clean_start;
        self.conns.insert(key, live);
        self.registering.insert(
            key,
            Registering {
                req: Box::new(req),
                kicked: None,
                abandoned: false,
            },
        );
        self.timers
            .push(now + self.cfg.register_timeout, TimerKind::Register(key));
        let home = home_shard(&client_id, self.cfg.shards);
        self.send(
            home,
            PeerMsg::Register {
                client_id,
                conn: key,
                clean_start,
            },
        );
    }

    pub(super) fn on_packet(&mut self, key: ConnKey, packet: Packet, now: Instant) {
        // `store.full` first: the common case costs one load, not a lookup.
        let store_full = self.store.full
            && self
                .conns
                .get(&key)
                .is_some_and(|l| l.phase == Phase::Active)
            && self.holds_for_store(key, &packet);
        let Some(live) = self.conns.get_mut(&key) else {
            return;
        };
        if live.close {
            return;
        }
        if store_full {
            // The store's backlog is at its bound: this would add to it. It waits, and what
            // the client sends after it waits behind it (order), up to max_deferred_input.
            live.deferred.push_back(packet);
            self.hold_for_store(key, now);
            return;
        }
        // Subscription changes of a session whose routes are switching wait for the switch
        // (see takeover.rs), and so does anything behind them.
        let switching = matches!(packet, Packet::Subscribe(_) | Packet::Unsubscribe(_))
            && self.switching.contains_key(&key);
        let defer = live.phase == Phase::Registering
            || switching
            || (!bypasses_pause(&packet) && (live.paused() || !live.deferred.is_empty()));
        if defer {
            live.deferred.push_back(packet);
            return;
        }
        if live.phase != Phase::Active {
            return;
        }
        self.process(key, packet, now);
    }

    /// Hand one packet to the session of `key` and act on what it asks.
    fn process(&mut self, key: ConnKey, packet: Packet, now: Instant) {
        let progress = is_progress(&packet);
        // A SUBACK waits for every route this shard has broadcast so far, not only one this
        // SUBSCRIBE caused: a second local subscriber to a filter relies on the delta the
        // first one sent, which may not be applied everywhere yet.
        let subscribe = matches!(packet, Packet::Subscribe(_));
        let seq_before = self.settle.seq();
        let rec_before = self.store.appended;
        let Some(e) = self.sessions.get_mut(&key) else {
            return;
        };
        if let Packet::Unsubscribe(u) = &packet {
            for f in &u.filters {
                super::lines::unsubscribed(e.session.client_id(), f.as_str());
            }
        }
        match packet {
            Packet::Subscribe(s)
                if self
                    .out
                    .iter()
                    .any(|q| q.len() > self.cfg.peer_control_high_water) =>
            {
                warn!(
                    shard = self.id,
                    client = %crate::logging::escape(e.session.client_id()),
                    "SUBSCRIBE refused: a peer shard is not keeping up"
                );
                e.session.refuse_subscribe(&s, ReasonCode::QUOTA_EXCEEDED);
            }
            packet => {
                if let Err(v) = self.session_input(key, packet, now) {
                    debug!(shard = self.id, "protocol violation: {v}");
                }
            }
        }
        self.pump(key, now);
        if progress {
            self.on_progress(key, now);
        }
        if subscribe || self.settle.seq() != seq_before {
            let seq = self.settle.seq();
            self.set_gate(key, seq, now);
        }
        if self.store.appended != rec_before {
            self.gate_durable(key, now);
        }
        self.after_session_input(key);
    }

    /// After input to the session of `key`: wake its connection if it has output, and keep
    /// its timer armed.
    pub(super) fn after_session_input(&mut self, key: ConnKey) {
        let Some(e) = self.sessions.get_mut(&key) else {
            return;
        };
        let has_output = e.session.pending_transmit() > 0;
        let deadline = e.session.poll_timeout();
        if let Some(t) = deadline {
            let t = self.timers.coarse(t);
            if e.timer_armed.is_none_or(|a| t < a) {
                e.timer_armed = Some(t);
                self.timers.push(t, TimerKind::Session(key));
            }
        }
        if has_output {
            self.mark_dirty(key);
        }
    }

    /// Drain the session events of `key` and act on them. Call after every input to a session.
    pub(super) fn pump(&mut self, key: ConnKey, now: Instant) {
        let mut events = std::mem::take(&mut self.scratch.events);
        while let Some(e) = self.sessions.get_mut(&key) {
            while let Some(ev) = e.session.poll_event() {
                events.push(ev);
            }
            if events.is_empty() {
                break;
            }
            for ev in events.drain(..) {
                self.handle_event(key, ev, now);
            }
        }
        self.scratch.events = events;
        self.drain_notes(key, now);
    }

    /// Events of a session that is no longer in `sessions` (taken over): routing effects only.
    pub(super) fn drain_detached_events(
        &mut self,
        key: ConnKey,
        session: &mut Session,
        authz: Option<&super::Authz>,
        now: Instant,
    ) {
        while let Some(ev) = session.poll_event() {
            match ev {
                SessionEvent::Publish(msg) => self.route(msg, key, now),
                SessionEvent::Will(msg) => self.route_will(authz, msg, now),
                SessionEvent::Unsubscribe { filter } => {
                    self.drop_routes(key, std::slice::from_ref(&filter))
                }
                SessionEvent::Notice(n) => self.log_notice(session.client_id(), n),
                SessionEvent::Subscribe { .. }
                | SessionEvent::Close { .. }
                | SessionEvent::Ended => {}
            }
        }
    }

    fn handle_event(&mut self, key: ConnKey, ev: SessionEvent, now: Instant) {
        match ev {
            SessionEvent::Publish(msg) => self.route(msg, key, now),
            SessionEvent::Will(msg) => {
                let authz = self.sessions.get_mut(&key).and_then(|e| e.authz.take());
                self.route_will(authz.as_deref(), msg, now);
                if let Some(e) = self.sessions.get_mut(&key) {
                    e.authz = authz;
                }
            }
            SessionEvent::Subscribe {
                filter,
                options,
                subscription_id,
                resumed,
                ..
            } => {
                if !resumed {
                    if let Some(e) = self.sessions.get(&key) {
                        super::lines::subscribed(
                            e.session.client_id(),
                            options.qos,
                            filter.as_str(),
                        );
                    }
                    self.record_sub(key, &filter, options, subscription_id, now);
                }
                self.on_subscribe(key, filter, options, subscription_id)
            }
            SessionEvent::Notice(n) => {
                let id = self
                    .sessions
                    .get(&key)
                    .map(|e| e.session.client_id().clone())
                    .unwrap_or_default();
                self.log_notice(&id, n);
            }
            SessionEvent::Unsubscribe { filter } => {
                self.record_unsub(key, &filter, now);
                self.drop_routes(key, std::slice::from_ref(&filter));
            }
            SessionEvent::Close { reason } => {
                self.record_disc(key, now);
                self.on_session_close(key, reason, now)
            }
            SessionEvent::Ended => self.on_session_ended(key, now),
        }
    }

    fn on_subscribe(
        &mut self,
        key: ConnKey,
        filter: TopicFilter,
        options: SubscriptionOptions,
        subscription_id: Option<u32>,
    ) {
        // Retained messages: the session asks for them as its client drains (see
        // `next_transmit`). Too-deep filters were refused in the SUBACK already.
        let sub = LocalSubscription {
            options,
            subscription_id,
        };
        match self.local.subscribe(&filter, key, sub) {
            Ok(out) => {
                if let Some(d) = out.delta {
                    self.broadcast_delta(d);
                }
                self.counters.subscriptions.set(self.local.len() as u64);
            }
            Err(e) => warn!(
                shard = self.id,
                "subscription to {} not added: {e}",
                crate::logging::escape(filter.as_str())
            ),
        }
    }

    /// Log what the session wants an operator to hear about (peer text escaped).
    fn log_notice(&self, client: &str, n: Notice) {
        use crate::logging::escape;
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
                crate::routing::MAX_FILTER_LEVELS,
                over_limit,
                self.cfg.session.max_subscriptions,
                escape(first.as_str()),
            ),
            Notice::BrokerOnlyTopic { topic } => {
                self.counters
                    .count_drop(crate::metrics::DropCause::SysTopic);
                debug!(
                    shard = self.id,
                    "Denied PUBLISH from {} to broker-only topic '{}'",
                    escape(client),
                    escape(topic.as_str())
                )
            }
        }
    }

    fn on_session_close(&mut self, key: ConnKey, reason: CloseReason, _now: Instant) {
        if reason == CloseReason::KeepAliveTimeout {
            self.counters.keepalive_timeouts.inc();
        }
        // A connection already closing was cut by the core itself (see `lose_connection`).
        let server_closed = self.conns.get(&key).is_some_and(|l| l.close);
        if let Some(e) = self.sessions.get(&key) {
            super::lines::closed(e.session.client_id(), reason, server_closed);
        }
        self.release_flow(key);
        if let Some(e) = self.sessions.get_mut(&key) {
            if e.live {
                e.live = false;
                self.counters.live_sessions.dec();
                self.counters.offline_sessions.inc();
            }
        }
        if let Some(live) = self.conns.get_mut(&key) {
            live.close = true;
        }
        self.mark_dirty(key);
    }

    fn on_session_ended(&mut self, key: ConnKey, now: Instant) {
        let Some(mut e) = self.sessions.remove(&key) else {
            return;
        };
        if e.session.journaled() {
            let client = e.session.client_id().clone();
            self.record_end(&client, now);
        }
        self.release_flow_of(&mut e);
        if e.live {
            self.counters.live_sessions.dec();
        } else {
            self.counters.offline_sessions.dec();
        }
        let client_id = e.session.client_id().clone();
        self.detach_conn(key, &mut e.session);
        let home = home_shard(&client_id, self.cfg.shards);
        self.send(
            home,
            PeerMsg::Unregister {
                client_id,
                conn: key,
            },
        );
    }

    /// The session leaves connection `key` (takeover, or it ended): the connection sends what
    /// the session still had queued for it (acknowledgements, DISCONNECT), then closes.
    /// PUBLISHes stay behind: the session re-sends its in-flight ones on its next connection,
    /// so a client never gets a message on a connection its session has already left.
    pub(super) fn detach_conn(&mut self, key: ConnKey, session: &mut Session) {
        if let Some(live) = self.conns.get_mut(&key) {
            while let Some(p) = session.poll_transmit() {
                if !matches!(p, Packet::Publish(_)) {
                    live.last_words.push_back(p);
                }
            }
            live.phase = Phase::Detached;
            live.close = true;
            live.deferred.clear();
            self.mark_dirty(key);
        }
    }

    pub(super) fn on_decode_error(&mut self, key: ConnKey, reason: ReasonCode, now: Instant) {
        if let Some(e) = self.sessions.get_mut(&key) {
            if e.live {
                e.session.disconnect(reason, now);
                self.pump(key, now);
                self.after_session_input(key);
                return;
            }
        }
        if let Some(live) = self.conns.get_mut(&key) {
            live.close = true;
            self.mark_dirty(key);
        }
    }

    pub(super) fn on_write_stalled(&mut self, key: ConnKey, stalled: bool, now: Instant) {
        let timeout = self.cfg.write_timeout;
        let Some(live) = self.conns.get_mut(&key) else {
            return;
        };
        if stalled {
            if live.write_stalled_since.is_none() {
                live.write_stalled_since = Some(now);
                self.timers.push(now + timeout, TimerKind::WriteStall(key));
            }
        } else {
            live.write_stalled_since = None;
        }
    }

    /// The write-stall timer of `key` fired.
    pub(super) fn check_write_stall(&mut self, key: ConnKey, now: Instant) {
        let timeout = self.cfg.write_timeout;
        let Some(live) = self.conns.get_mut(&key) else {
            return;
        };
        let Some(since) = live.write_stalled_since else {
            return;
        };
        if live.close && live.phase == Phase::Detached {
            // Already cut loose (an earlier stall timer of this connection fired first).
            return;
        }
        if now < since + timeout {
            self.timers
                .push(since + timeout, TimerKind::WriteStall(key));
            return;
        }
        info!(
            target: crate::logging::CONNECTION,
            "Client {} disconnected: it accepted no bytes for {}s.",
            crate::logging::escape(&self.client_of(key)),
            timeout.as_secs_f64()
        );
        self.lose_connection(key, now);
    }

    /// The connection of `key` is unusable (write stalled, gate timed out): the session sees a
    /// lost connection (its will may fire); the connection closes without sending more.
    pub(super) fn lose_connection(&mut self, key: ConnKey, now: Instant) {
        // Closing first: the session's "connection lost" is then known to be the core's own
        // decision (logged by the caller), not the client closing its connection.
        if let Some(live) = self.conns.get_mut(&key) {
            live.close = true;
        }
        if let Some(e) = self.sessions.get_mut(&key) {
            if e.live {
                e.session.connection_lost(now);
                self.pump(key, now);
                self.after_session_input(key);
            }
        }
        if let Some(live) = self.conns.get_mut(&key) {
            live.close = true;
            live.phase = Phase::Detached;
            live.last_words.clear();
            live.gate = 0;
            live.gate_since = None;
            live.durable = 0;
            self.mark_dirty(key);
        }
    }

    pub(super) fn on_conn_closed(&mut self, key: ConnKey, now: Instant) {
        let Some(live) = self.conns.remove(&key) else {
            return;
        };
        // Forwards already routed for this publisher must still go (their local copies did):
        // past the data bound, which is only a bound on what is *waiting to be accepted*.
        if live.paused() {
            self.counters.paused_now.dec();
        }
        if live.held_on != 0 {
            self.held_pubs.retain(|k| *k != key);
        }
        if live.store_held {
            self.store.held.retain(|k| *k != key);
        }
        self.settle.forget(key);
        if let Some(r) = self.registering.get_mut(&key) {
            r.abandoned = true;
            return;
        }
        if let Some(e) = self.sessions.get_mut(&key) {
            if e.session.is_connected() {
                e.session.connection_lost(now);
                self.pump(key, now);
            }
        }
        if let Some(e) = self.sessions.get_mut(&key) {
            if e.live {
                e.live = false;
                self.counters.live_sessions.dec();
                self.counters.offline_sessions.inc();
            }
        }
        self.release_flow(key);
        self.after_session_input(key);
    }

    pub(super) fn on_shutdown(&mut self, now: Instant) {
        self.stopping = true;
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for k in keys {
            let live_session = self.sessions.get(&k).is_some_and(|e| e.live);
            if live_session {
                if let Some(e) = self.sessions.get_mut(&k) {
                    e.session.disconnect(ReasonCode::SERVER_SHUTTING_DOWN, now);
                }
                self.pump(k, now);
                self.after_session_input(k);
            } else if let Some(live) = self.conns.get_mut(&k) {
                live.close = true;
                self.mark_dirty(k);
            }
        }
    }

    /// The client id of the session on connection `key` (empty if it has none), for lines.
    pub(super) fn client_of(&self, key: ConnKey) -> bytestring::ByteString {
        self.sessions
            .get(&key)
            .map(|e| e.session.client_id().clone())
            .unwrap_or_default()
    }

    /// The pause of publisher `key` ended: handle what it read meanwhile, in order.
    pub(super) fn resume_input(&mut self, key: ConnKey, now: Instant) {
        loop {
            let Some(live) = self.conns.get_mut(&key) else {
                return;
            };
            if live.phase != Phase::Active || live.close {
                live.deferred.clear();
                return;
            }
            let Some(live) = self.conns.get(&key) else {
                return;
            };
            let Some(p) = live.deferred.front() else {
                break;
            };
            if live.store_held || (live.paused() && !bypasses_pause(p)) {
                return;
            }
            if matches!(p, Packet::Subscribe(_) | Packet::Unsubscribe(_))
                && self.switching.contains_key(&key)
            {
                return;
            }
            if self.holds_for_store(key, p) {
                self.hold_for_store(key, now);
                return;
            }
            let Some(p) = self
                .conns
                .get_mut(&key)
                .and_then(|l| l.deferred.pop_front())
            else {
                break;
            };
            self.process(key, p, now);
        }
        // The driver may read its socket again and decode what it buffered.
        self.mark_dirty(key);
    }

    /// The next packet connection `key` may send now. A batch (the driver polls until
    /// `None`) carries what the session has queued plus at most one round of retained
    /// messages for its new subscriptions; if more are due, `more_after_write` tells the
    /// driver to come back once this batch is written (progress paces them, so a backlog
    /// waiting on the inflight window waits for the client's acknowledgements instead).
    pub(super) fn next_transmit(&mut self, key: ConnKey, now: Instant) -> Option<Packet> {
        let live = self.conns.get_mut(&key)?;
        if !live.gate_open() {
            return None;
        }
        if live.phase != Phase::Active {
            return live.last_words.pop_front();
        }
        let e = self.sessions.get_mut(&key)?;
        if let Some(p) = e.session.poll_transmit() {
            live.connack_sent = true;
            return Some(p);
        }
        if std::mem::take(&mut live.fed_retained) {
            live.more_after_write = e.session.retained_pending();
            return None;
        }
        if !e.session.retained_pending() {
            return None;
        }
        let buf = &mut self.scratch.retained_buf;
        loop {
            e.session.fill_retained(now);
            let Some((filter, options, id)) = e.session.next_retained_request() else {
                break;
            };
            buf.clear();
            self.retained.match_filter(&filter, now, buf);
            let ids: SmallVec<[u32; 1]> = id.into_iter().collect();
            for m in buf.drain(..) {
                let authz = e.authz.as_deref();
                if !Self::may_read(&self.views, &self.counters, authz, &m, &mut None) {
                    continue;
                }
                e.session.deliver_retained(&m, options, &ids, now);
            }
        }
        let p = e.session.poll_transmit();
        live.fed_retained = p.is_some();
        p
    }
}

/// A CONNACK refusing a connection in the v3 form every client version can read (the codec
/// maps the reason to a 3.1.1 return code).
pub(super) fn refusal(reason: ReasonCode) -> Packet {
    Packet::ConnAck(Box::new(ConnAck {
        session_present: false,
        reason,
        properties: ConnAckProperties::default(),
    }))
}

impl Live {
    /// What a connection the core closes for `reason` is told last: a refusing CONNACK if
    /// its CONNACK never left (nothing may precede a CONNACK, [MQTT-3.2.0-1]), a DISCONNECT
    /// on v5, nothing on 3.1/3.1.1.
    pub fn closing_words(&self, reason: ReasonCode) -> Option<Packet> {
        if !self.connack_sent {
            Some(refusal(reason))
        } else if self.version.is_v5() {
            Some(disconnect_packet(reason))
        } else {
            None
        }
    }
}

/// A v5 DISCONNECT with `reason`.
pub(super) fn disconnect_packet(reason: ReasonCode) -> Packet {
    Packet::Disconnect(Disconnect {
        reason,
        ..Disconnect::default()
    })
}
