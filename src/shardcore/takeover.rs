//! Client-id registration and session takeover across shards.
//!
//! Owns: the home-shard side (`Register` → `Takeover` or a fresh `Handover`), the old host's
//! side (close the previous connection with 0x8E, hand the session over or end it for a clean
//! start, park what still arrives for it), the new host's side (install the session, switch
//! every shard's routes with `CutoverRequest`/`Cutover`/`CutoverAck`, then deliver what was
//! parked before anything that came directly), and the bounds on each wait. Must not touch:
//! session rules (the session resumes or discards state in `Session::accept`), fan-out.
//!
//! The races this is built for (each has a simulator regression seed):
//! * A newer connect takes over one still waiting for its own hand-over (a flapping link):
//!   the waiting registration is *kicked*; when its hand-over arrives it is passed on to the
//!   newer connection, never dropped.
//! * A session is taken over again while its routes are still switching: the takeover waits
//!   until the switch is done (bounded), so parked messages always find their session.
//! * A clean start must get nothing of the old session [MQTT-3.1.2-4]: the old host ends the
//!   session instead of shipping it (its delayed will goes out), and drops what it parked.
//! * Per-publisher order across a move: the new host holds what arrives directly for the
//!   session until the old host's parked messages are in, and delivers those first.

use std::time::Instant;

use smallvec::SmallVec;
use tracing::{debug, info, warn};

use super::conn::{refusal, Entry, Phase, Registering};
use super::msg::{ParkedMsg, PeerMsg, Transfer};
use super::registry::{conn_shard, ConnKey, Registered, ShardId};
use super::timers::TimerKind;
use super::ShardCore;
use crate::codec::{ReasonCode, SubscriptionOptions, TopicFilter};
use crate::message::Message;
use crate::metrics::DropCause;
use crate::session::Session;

/// A session that moved away: its subscriptions stay in this shard's table (under its old
/// key) until every shard routes to the new host, and what matches them meanwhile is kept
/// for the new host — unless it came from a shard that already switched (that shard sends it
/// to the new host itself), so nothing is lost and nothing arrives twice.
pub(crate) struct Parked {
    new_conn: ConnKey,
    filters: Vec<TopicFilter>,
    /// Shards that have switched (bit per shard).
    cut: u64,
    msgs: Vec<ParkedMsg>,
    since: Instant,
}

/// A session that moved here while the shards switch their routes to it.
pub(crate) struct Switching {
    /// Shards whose later messages come here directly (bit per shard); messages from the
    /// others still come through the old host, parked. (The session's SUBSCRIBE and
    /// UNSUBSCRIBE wait until the switch is over, so its subscriptions here are exactly the
    /// ones the old host parks under: a filter added meanwhile would be served by neither
    /// host, or out of order.)
    pub acked: u64,
    /// The old host sent what it parked; until then direct messages wait in `buffer`.
    pub park_done: bool,
    pub buffer: Vec<ParkedMsg>,
    since: Instant,
    /// A takeover of this session that arrived meanwhile: `(conn, clean_start)`.
    deferred: Option<(ConnKey, bool)>,
}

impl ShardCore {
    fn all_shards_mask(&self) -> u64 {
        if self.cfg.shards >= 64 {
            u64::MAX
        } else {
            (1u64 << self.cfg.shards) - 1
        }
    }

    /// Home shard: `conn` connects with `client_id`.
    pub(super) fn on_register(
        &mut self,
        client_id: bytestring::ByteString,
        conn: ConnKey,
        clean_start: bool,
    ) {
        match self.registry.register(client_id, conn) {
            Registered::Fresh => {
                self.send(conn_shard(conn), PeerMsg::Handover { conn, state: None })
            }
            Registered::Takeover { previous } => self.send(
                conn_shard(previous),
                PeerMsg::Takeover {
                    previous,
                    conn,
                    clean_start,
                },
            ),
        }
    }

    /// Old host: hand the session of `previous` to `conn` (or end it for a clean start).
    pub(super) fn on_takeover(
        &mut self,
        previous: ConnKey,
        conn: ConnKey,
        clean: bool,
        now: Instant,
    ) {
        if let Some(r) = self.registering.get_mut(&previous) {
            // Not started yet: whatever its own hand-over brings goes on to `conn`.
            r.kicked = Some((conn, clean));
            if let Some(live) = self.conns.get_mut(&previous) {
                live.close = true;
                live.phase = Phase::Detached;
                live.deferred.clear();
            }
            self.mark_dirty(previous);
            debug!(
                shard = self.id,
                "connection taken over before its session started"
            );
            return;
        }
        if let Some(sw) = self.switching.get_mut(&previous) {
            // Its routes are still switching here: take it over once that is done.
            sw.deferred = Some((conn, clean));
            return;
        }
        let Some(mut e) = self.sessions.remove(&previous) else {
            // Ended meanwhile: nothing to hand over.
            self.send(conn_shard(conn), PeerMsg::Handover { conn, state: None });
            return;
        };
        self.counters.takeovers.inc();
        self.release_flow_of(&mut e);
        if e.live {
            self.counters.live_sessions.dec();
        } else {
            self.counters.offline_sessions.dec();
        }
        if e.session.is_connected() {
            super::lines::taken_over(e.session.client_id());
            e.session.disconnect(ReasonCode::SESSION_TAKEN_OVER, now);
        }
        // The session's last events (will, close) run with the session out of the map.
        self.drain_detached_events(previous, &mut e.session, e.authz.as_deref(), now);
        self.detach_conn(previous, &mut e.session);
        let Some(mut state) = e.session.into_state() else {
            self.send(conn_shard(conn), PeerMsg::Handover { conn, state: None });
            return;
        };
        let filters: Vec<TopicFilter> = state.subscriptions().map(|(f, _)| f.clone()).collect();
        if clean {
            // The new connection starts clean: the old session ends here and now.
            if let Some(will) = state.take_pending_will(now) {
                self.route_will(e.authz.as_deref(), will, now);
            }
            if state.session_expiry_interval() != 0 {
                let client = state.client_id().clone();
                self.record_end(&client, now);
                self.gate_on_end(conn, now);
            }
            self.drop_routes(previous, &filters);
            // The new connection's CONNACK (no session present) must not leave before the
            // old session's end is on disk, or a crash would bring the old one back.
            self.send_after_durable(conn_shard(conn), PeerMsg::Handover { conn, state: None });
            return;
        }
        self.parked.insert(
            previous,
            Parked {
                new_conn: conn,
                filters,
                cut: 0,
                msgs: Vec::new(),
                since: now,
            },
        );
        self.timers
            .push(now + self.cfg.park_timeout, TimerKind::Park(previous));
        let t = Transfer {
            from: previous,
            state: Box::new(state),
            authz: e.authz.take(),
        };
        self.send(
            conn_shard(conn),
            PeerMsg::Handover {
                conn,
                state: Some(t),
            },
        );
    }

    /// New host: the home shard's answer for `conn`.
    pub(super) fn on_handover(&mut self, conn: ConnKey, state: Option<Transfer>, now: Instant) {
        let Some(reg) = self.registering.remove(&conn) else {
            // Every registration waits here until its answer comes; an answer without one
            // cannot happen, but its state must not be lost if it does.
            warn!(
                shard = self.id,
                "hand-over for an unknown connection: kept offline"
            );
            if let Some(t) = state {
                self.install_orphan(conn, t, now);
            }
            return;
        };
        match reg.kicked {
            Some((by, clean)) => self.pass_on(state, by, clean, now),
            None => self.install(conn, reg, state, now),
        }
    }

    /// A kicked registration's answer goes on to the connection that kicked it.
    fn pass_on(&mut self, state: Option<Transfer>, by: ConnKey, clean: bool, now: Instant) {
        if clean {
            if let Some(t) = state {
                self.discard_transfer(t, by, now);
            }
            self.send_after_durable(
                conn_shard(by),
                PeerMsg::Handover {
                    conn: by,
                    state: None,
                },
            );
        } else {
            self.send(conn_shard(by), PeerMsg::Handover { conn: by, state });
        }
    }

    /// A shipped session is discarded (clean start): its delayed will goes out now and its
    /// old host drops what it parked.
    fn discard_transfer(&mut self, t: Transfer, conn: ConnKey, now: Instant) {
        let mut state = *t.state;
        if let Some(will) = state.take_pending_will(now) {
            self.route_will(t.authz.as_deref(), will, now);
        }
        if state.session_expiry_interval() != 0 {
            let client = state.client_id().clone();
            self.record_end(&client, now);
            self.gate_on_end(conn, now);
        }
        self.send(conn_shard(t.from), PeerMsg::ParkAbandon { old: t.from });
    }

    fn install(&mut self, conn: ConnKey, reg: Registering, state: Option<Transfer>, now: Instant) {
        let Registering { req, abandoned, .. } = reg;
        let req = *req;
        let clean = req.connect.clean_start;
        let (from, prev) = match state {
            Some(t) if clean => {
                // Cannot happen (a clean start is ended by the old host), but be exact.
                self.discard_transfer(t, conn, now);
                (None, None)
            }
            Some(t) => (Some(t.from), Some(*t.state)),
            None => (None, None),
        };
        let authz = self.make_authz(req.auth.as_ref(), &req.client_id, req.username.as_deref());
        let mut prev = prev;
        if let Some(state) = prev.as_mut() {
            self.recheck_resumed(authz.as_deref(), state);
        }
        let session = Session::accept(&req.config, &req.connect, req.client_id.clone(), prev, now);
        let mut entry = Entry {
            session: Box::new(session),
            live: !abandoned,
            flow: None,
            timer_armed: None,
            authz,
        };
        entry.session.set_queue_overflow(!abandoned);
        self.sessions.insert(conn, entry);
        if abandoned {
            self.counters.offline_sessions.inc();
        } else {
            self.counters.live_sessions.inc();
            self.counters.connects.inc();
            if let Some(live) = self.conns.get_mut(&conn) {
                live.phase = Phase::Active;
            }
            info!(
                target: crate::logging::CONNECTION,
                "New client connected from {} as {} (p{}, c{}, k{}, u'{}') on shard {}",
                req.peer.map(|p| p.to_string()).unwrap_or_default(),
                crate::logging::escape(&req.client_id),
                req.connect.protocol.level(),
                u8::from(clean),
                req.connect.keep_alive,
                crate::logging::escape(req.username.as_deref().unwrap_or("")),
                self.id
            );
        }
        drop(req);
        let seq_before = self.settle.seq();
        self.record_install(conn, from.is_some(), now);
        self.pump(conn, now);
        if let Some(old) = from {
            self.start_cutover(old, conn, now);
        }
        if abandoned {
            if let Some(e) = self.sessions.get_mut(&conn) {
                e.session.connection_lost(now);
            }
            self.pump(conn, now);
        } else {
            // Resumed subscriptions rely on routes: the CONNACK waits until every shard has
            // applied what this shard broadcast (theirs, or earlier ones for the same filters),
            // and pipelined packets read meanwhile run now.
            if from.is_some() || self.settle.seq() != seq_before {
                let seq = self.settle.seq();
                self.set_gate(conn, seq, now);
            }
            self.resumable.push(conn);
        }
        self.after_session_input(conn);
    }

    /// A shipped session whose connection is unknown here: keep it offline.
    fn install_orphan(&mut self, conn: ConnKey, t: Transfer, now: Instant) {
        let from = t.from;
        let session = Session::offline(&self.cfg.session, *t.state);
        let mut entry = Entry {
            session: Box::new(session),
            live: false,
            flow: None,
            timer_armed: None,
            authz: t.authz,
        };
        self.journal_offline(&mut entry);
        self.sessions.insert(conn, entry);
        self.counters.offline_sessions.inc();
        let subs: Vec<(TopicFilter, SubscriptionOptions, Option<u32>)> = self.sessions[&conn]
            .session
            .state()
            .subscriptions()
            .map(|(f, s)| (f.clone(), s.options, s.subscription_id))
            .collect();
        for (f, o, id) in subs {
            let sub = crate::routing::LocalSubscription {
                options: o,
                subscription_id: id,
            };
            if let Ok(out) = self.local.subscribe(&f, conn, sub) {
                if let Some(d) = out.delta {
                    self.broadcast_delta(d);
                }
            }
        }
        self.start_cutover(from, conn, now);
        self.after_session_input(conn);
    }

    /// New host: the session moved here from `old`; switch every shard to us.
    fn start_cutover(&mut self, old: ConnKey, new: ConnKey, now: Instant) {
        if conn_shard(old) == self.id {
            // Moved within this shard: nothing else routes differently; deliver what was kept
            // for it, in order, before anything newer.
            if let Some(p) = self.parked.remove(&old) {
                self.drop_routes(old, &p.filters);
                self.deliver_parked(new, p.msgs, now);
            }
            return;
        }
        self.switching.insert(
            new,
            Switching {
                acked: 1u64 << self.id,
                park_done: false,
                buffer: Vec::new(),
                since: now,
                deferred: None,
            },
        );
        self.timers
            .push(now + self.cfg.park_timeout, TimerKind::Switch(new));
        self.cut_over(old, new);
        for shard in 0..self.cfg.shards {
            if shard != self.id {
                self.send(shard, PeerMsg::CutoverRequest { old, new });
            }
        }
    }

    /// This shard switches to the new host `new` of `old`: tell the old host.
    pub(super) fn cut_over(&mut self, old: ConnKey, new: ConnKey) {
        let parked_at = conn_shard(old);
        if parked_at == self.id {
            self.mark_cut(old, new, self.id);
        } else {
            self.send(parked_at, PeerMsg::Cutover { old, new });
        }
    }

    /// Old host: shard `from` has switched for the parked session `old`.
    pub(super) fn mark_cut(&mut self, old: ConnKey, new: ConnKey, from: ShardId) {
        let all = self.all_shards_mask();
        let Some(p) = self.parked.get_mut(&old) else {
            return;
        };
        // A registration that was kicked passes the session on: the host that finally
        // installs it is the one asking.
        p.new_conn = new;
        p.cut |= 1u64 << from;
        if p.cut == all {
            self.finish_parked(old);
        }
    }

    /// Every shard routes to the new host of `old`: drop its parked routes here and send what
    /// was kept (possibly nothing: the new host waits for this either way).
    fn finish_parked(&mut self, old: ConnKey) {
        let Some(p) = self.parked.remove(&old) else {
            return;
        };
        self.drop_routes(old, &p.filters);
        let conn = p.new_conn;
        self.send(conn_shard(conn), PeerMsg::ParkDone { conn, msgs: p.msgs });
    }

    /// The moved session was discarded by a clean start: its parked state goes.
    pub(super) fn abandon_parked(&mut self, old: ConnKey) {
        if let Some(p) = self.parked.remove(&old) {
            self.drop_routes(old, &p.filters);
        }
    }

    /// Old host: a message matched the parked session `key` (or one long gone).
    pub(super) fn park_message(
        &mut self,
        key: ConnKey,
        from: ShardId,
        msg: &Message,
        opts: SubscriptionOptions,
        ids: SmallVec<[u32; 2]>,
        via_group: bool,
    ) {
        let (cap, _) = Session::hard_limit_for(&self.cfg.session);
        let Some(p) = self.parked.get_mut(&key) else {
            return;
        };
        if !via_group && p.cut & (1u64 << from) != 0 {
            // That shard already sends plain matches to the new host itself. (A group pick
            // went to this shard only: it is kept whatever the sender switched.)
            return;
        }
        if cap != 0 && p.msgs.len() >= cap {
            self.counters.count_drop(DropCause::QueueFull);
            return;
        }
        p.msgs.push((msg.clone(), opts, ids));
    }

    pub(super) fn on_cutover_ack(&mut self, new: ConnKey, from: ShardId, now: Instant) {
        if let Some(sw) = self.switching.get_mut(&new) {
            sw.acked |= 1u64 << from;
        }
        self.maybe_finish_switch(new, now);
    }

    /// New host: the old host's parked messages for `conn`; they go before anything that came
    /// directly meanwhile.
    pub(super) fn on_park_done(&mut self, conn: ConnKey, msgs: Vec<ParkedMsg>, now: Instant) {
        let buffer = match self.switching.get_mut(&conn) {
            Some(sw) => {
                sw.park_done = true;
                std::mem::take(&mut sw.buffer)
            }
            None => Vec::new(),
        };
        self.deliver_parked(conn, msgs, now);
        self.deliver_parked(conn, buffer, now);
        self.maybe_finish_switch(conn, now);
    }

    fn deliver_parked(&mut self, key: ConnKey, msgs: Vec<ParkedMsg>, now: Instant) {
        if msgs.is_empty() {
            return;
        }
        let me = self.id;
        for (m, opts, ids) in msgs {
            // From "this shard": the switch is over for these, they are delivered as they come.
            self.deliver_parked_one(key, me, &m, opts, ids, now);
        }
        self.after_session_input(key);
    }

    fn deliver_parked_one(
        &mut self,
        key: ConnKey,
        from: ShardId,
        msg: &Message,
        opts: SubscriptionOptions,
        ids: SmallVec<[u32; 2]>,
        now: Instant,
    ) {
        // Bypass the switching filter: these are exactly the messages it held back.
        let sw = self.switching.remove(&key);
        self.deliver_to(key, from, msg, opts, ids, false, 0, &mut None, now);
        if let Some(sw) = sw {
            self.switching.insert(key, sw);
        }
    }

    fn maybe_finish_switch(&mut self, new: ConnKey, now: Instant) {
        let all = self.all_shards_mask();
        let done = self
            .switching
            .get(&new)
            .is_some_and(|sw| sw.park_done && sw.acked == all);
        if done {
            self.end_switch(new, now);
        }
    }

    fn end_switch(&mut self, new: ConnKey, now: Instant) {
        let Some(sw) = self.switching.remove(&new) else {
            return;
        };
        if !sw.buffer.is_empty() {
            self.deliver_parked(new, sw.buffer, now);
        }
        if let Some((conn, clean)) = sw.deferred {
            self.on_takeover(new, conn, clean, now);
        } else {
            // Its subscription changes waited for the switch: they run now.
            self.resumable.push(new);
        }
    }

    pub(super) fn check_register(&mut self, key: ConnKey, now: Instant) {
        let _ = now;
        let Some(r) = self.registering.get_mut(&key) else {
            return;
        };
        if r.abandoned || r.kicked.is_some() {
            return;
        }
        r.abandoned = true;
        let client = crate::logging::escape(&r.req.client_id).to_string();
        warn!(
            shard = self.id,
            "client {client}: its home shard did not answer within {}s: refused with \
             'server unavailable' (the session is kept if it arrives later)",
            self.cfg.register_timeout.as_secs()
        );
        self.counters.peer_timeouts.inc();
        self.counters
            .count_refusal(crate::metrics::RefuseCause::ServerUnavailable);
        if let Some(live) = self.conns.get_mut(&key) {
            live.phase = Phase::Detached;
            live.close = true;
            live.deferred.clear();
            live.last_words
                .push_back(refusal(ReasonCode::SERVER_UNAVAILABLE));
        }
        self.mark_dirty(key);
    }

    pub(super) fn check_parked(&mut self, old: ConnKey, now: Instant) {
        let Some(p) = self.parked.get(&old) else {
            return;
        };
        if now < p.since + self.cfg.park_timeout {
            return;
        }
        warn!(
            shard = self.id,
            "session move not confirmed by every shard within {}s: finished anyway",
            self.cfg.park_timeout.as_secs()
        );
        self.counters.peer_timeouts.inc();
        self.finish_parked(old);
    }

    pub(super) fn check_switching(&mut self, new: ConnKey, now: Instant) {
        let Some(sw) = self.switching.get(&new) else {
            return;
        };
        if now < sw.since + self.cfg.park_timeout {
            return;
        }
        warn!(
            shard = self.id,
            "session move: the old host or a shard did not answer within {}s: finished anyway",
            self.cfg.park_timeout.as_secs()
        );
        self.counters.peer_timeouts.inc();
        self.end_switch(new, now);
    }
}
