//! What this shard makes durable, and the gate that holds acknowledgements until it is.
//!
//! Owns: [`Store`] (the records this shard produced and the driver has not taken yet, how
//! many are durable, the connections whose output waits on them, the record clock, the
//! message sequence), the record each event becomes, the durability gate with its timeout,
//! the bound on the backlog of records not yet durable (what a failing disk may cost in
//! memory: at `max_backlog` input that would add records is held, persistent CONNECTs are
//! refused, and a connection held longer than the timeout is closed), and installing
//! sessions and retained messages recovered at start-up. Must not touch:
//! files or their format (`crate::store`, the driver writes), what a session decides.
//!
//! The rule: a connection's output waits until every record its input caused is durable —
//! a publisher's PUBACK/PUBREC its message, a SUBACK its subscription, a PUBCOMP the release
//! of the client's packet id, a CONNACK its session's start — and so does a QoS 2 PUBLISH
//! (or PUBREL) to a persistent subscriber until the packet id it carries is recorded, so a
//! re-send after a restart keeps it and exactly-once holds. The driver appends everything
//! produced in a reactor turn as one batch, syncs once, and calls `handle_durable`: one
//! fdatasync releases the acknowledgements of the whole batch (group commit). What is recorded
//! is keyed by client id with a timestamp, so recovery needs no knowledge of where a session
//! lived (see `crate::store::recover`). Non-persistent sessions (expiry 0) record nothing but
//! their messages.

use std::time::{Duration, Instant};

use bytestring::ByteString;
use tracing::warn;

use super::conn::Entry;
use super::registry::{ConnKey, ShardId};
use super::timers::TimerKind;
use super::ShardCore;
use crate::codec::{Packet, QoS, ReasonCode, SubscriptionOptions, TopicFilter};
use crate::message::Message;
use crate::session::{Note, Session, SessionState};
use crate::store::log::push_record;
use crate::store::record::{self, Record};

/// How the core is told about persistence (see `CoreConfig::persist`).
#[derive(Debug, Clone, Copy)]
pub struct PersistConfig {
    /// `now` and wall time in ns at the same moment: record timestamps are derived from
    /// `Instant`s with it (the core reads no clock). The driver sets `base_ns` past the
    /// latest timestamp in the recovered log, so timestamps keep increasing across runs.
    pub base: Instant,
    pub base_ns: u64,
    /// `persistence_sync none`: records count as durable as soon as they are made (written
    /// later, without fdatasync): acknowledgements are not held. mosquitto's risk.
    pub immediate: bool,
    /// A connection whose output waited this long for the disk is closed (v5: DISCONNECT
    /// 0x97) instead of acknowledging; so is one whose input waited this long for the
    /// backlog to drain.
    pub timeout: Duration,
    /// Bytes of records not yet durable (made by the core, or taken by the driver and not
    /// confirmed) at which input that would make more records is held (see [`Store`]'s
    /// `full`): the bound on what a failing disk costs in memory.
    pub max_backlog: usize,
}

/// The default of [`PersistConfig::max_backlog`]: 64 MiB. A healthy disk keeps the backlog at
/// one batch (a few hundred KiB at 100k msg/s); this much means the disk is failing or far
/// slower than the load, and holding input is then the only way to stay bounded without
/// dropping what clients were promised.
pub const DEFAULT_MAX_BACKLOG: usize = 64 << 20;

#[derive(Default)]
pub(crate) struct Store {
    shard: ShardId,
    pub cfg: Option<PersistConfig>,
    last_ts: u64,
    next_seq: u64,
    /// Records not yet taken by the driver (`[len u32][kind u8][payload]` each).
    buf: Vec<u8>,
    scratch: Vec<u8>,
    pub appended: u64,
    durable: u64,
    waiting: Vec<ConnKey>,
    notes: Vec<Note>,
    failing: bool,
    /// Bytes the driver took (`take_store_output`) that it has not confirmed durable yet.
    taken_bytes: u64,
    /// `appended` at the last take: a `handle_durable` for it confirms `taken_bytes`.
    last_take: u64,
    /// The backlog reached `max_backlog` and has not drained to half of it since: input that
    /// would make records is held (deferred; its connection's socket is no longer read once
    /// `max_deferred_input` packets wait), CONNECTs that would record are refused.
    pub full: bool,
    /// Connections whose input waits for the backlog to drain (each once: `Live::store_held`).
    pub held: Vec<ConnKey>,
    /// A connection was closed for waiting too long on the backlog in this episode (the
    /// first such close is logged, the rest counted).
    closed_logged: bool,
}

impl Store {
    pub fn new(shard: ShardId, cfg: Option<PersistConfig>) -> Store {
        Store {
            shard,
            cfg,
            next_seq: 1,
            ..Store::default()
        }
    }

    /// Bytes of records made and not known durable: what this shard holds for the disk.
    pub fn backlog_bytes(&self) -> u64 {
        self.buf.len() as u64 + self.taken_bytes
    }

    fn max_backlog(&self) -> u64 {
        self.cfg.map_or(u64::MAX, |c| (c.max_backlog as u64).max(1))
    }

    fn timeout(&self) -> Duration {
        self.cfg.map_or(Duration::from_secs(30), |c| c.timeout)
    }

    pub fn on(&self) -> bool {
        self.cfg.is_some()
    }

    fn ts(&mut self, now: Instant) -> u64 {
        let Some(c) = &self.cfg else { return 0 };
        let t = c.base_ns + now.saturating_duration_since(c.base).as_nanos() as u64;
        self.last_ts = t.max(self.last_ts + 1);
        self.last_ts
    }

    fn push(&mut self, r: &Record) {
        self.scratch.clear();
        r.encode(&mut self.scratch);
        push_record(&mut self.buf, r.kind(), &self.scratch);
        self.appended += 1;
        if self.cfg.is_some_and(|c| c.immediate) {
            self.durable = self.appended;
        }
        if !self.full && self.backlog_bytes() >= self.max_backlog() {
            // Checked after the record: the input that made it was accepted before the bound
            // was reached, so the bound is exceeded by at most one packet's records (plus the
            // small records of acknowledgements, which are never held: see `holds_for_store`).
            self.full = true;
            self.closed_logged = false;
            warn!(
                shard = self.shard,
                "persistence: {} bytes of records wait for the disk (bound {}): holding \
                 input that would add records (QoS 1/2 and retained publishes, subscription \
                 changes of persistent sessions, persistent CONNECTs) until it drains; \
                 nothing held is acknowledged, QoS 0 keeps flowing",
                self.backlog_bytes(),
                self.max_backlog()
            );
        }
    }

    pub fn durable(&self) -> u64 {
        self.durable
    }

    fn gate_needed(&self) -> bool {
        self.durable < self.appended
    }
}

impl ShardCore {
    // ---- driver side -------------------------------------------------------------------

    /// Records are waiting for the driver.
    pub fn store_pending(&self) -> bool {
        !self.store.buf.is_empty()
    }

    /// Move the records made so far to `out` (appended); returns the count to pass to
    /// [`ShardCore::handle_durable`] once they are on disk.
    pub fn take_store_output(&mut self, out: &mut Vec<u8>) -> u64 {
        self.store.taken_bytes += self.store.buf.len() as u64;
        self.store.last_take = self.store.appended;
        if out.is_empty() {
            std::mem::swap(out, &mut self.store.buf);
        } else {
            out.append(&mut self.store.buf);
        }
        self.counters
            .store_backlog_bytes
            .set(self.store.backlog_bytes());
        self.store.appended
    }

    /// Timestamp of the last record made: every record taken so far has one ≤ this, every
    /// later one a larger one (runtime compaction's seal horizon, `crate::store::compact`).
    pub fn store_clock(&self) -> u64 {
        self.store.last_ts
    }

    /// Advance the record clock to `now` and return it: no later record gets a timestamp ≤
    /// it. With nothing pending, the horizon of an idle shard's seal.
    pub fn store_horizon(&mut self, now: Instant) -> u64 {
        self.store.ts(now)
    }

    /// The first `upto` records are durable: release what waited for them.
    pub fn handle_durable(&mut self, upto: u64, now: Instant) {
        if upto >= self.store.last_take {
            // Everything taken is on disk (a driver that takes again before confirming keeps
            // the older bytes counted until it confirms the newer take: over, never under).
            self.store.taken_bytes = 0;
        }
        self.counters
            .store_backlog_bytes
            .set(self.store.backlog_bytes());
        self.release_held_input(now);
        if upto <= self.store.durable {
            self.run_pending(now);
            return;
        }
        self.store.durable = upto;
        if std::mem::take(&mut self.store.failing) {
            warn!(
                shard = self.id,
                "persistence: writes succeed again: acknowledging"
            );
        }
        let durable = self.store.durable;
        let mut waiting = std::mem::take(&mut self.store.waiting);
        waiting.retain(|k| {
            let Some(live) = self.conns.get_mut(k) else {
                return false;
            };
            if live.durable > durable {
                return true;
            }
            live.durable = 0;
            if !live.dirty {
                live.dirty = true;
                self.dirty.push(*k);
            }
            false
        });
        waiting.append(&mut self.store.waiting);
        self.store.waiting = waiting;
        self.run_pending(now);
    }

    /// The backlog drained to half its bound: input held for it runs again (in order, after
    /// the current input: `run_pending`).
    fn release_held_input(&mut self, _now: Instant) {
        if !self.store.full || self.store.backlog_bytes() > self.store.max_backlog() / 2 {
            return;
        }
        self.store.full = false;
        let held = std::mem::take(&mut self.store.held);
        warn!(
            shard = self.id,
            "persistence: the backlog drained to {} bytes: {} held connections resume",
            self.store.backlog_bytes(),
            held.len()
        );
        for k in held {
            if let Some(live) = self.conns.get_mut(&k) {
                if std::mem::take(&mut live.store_held) {
                    self.resumable.push(k);
                }
            }
        }
    }

    /// Whether `packet` from `key` must wait because the backlog is at its bound: it would
    /// make a record. Acknowledgements and PINGREQ never wait (they make at most a small
    /// record each and free more than they cost); nor do QoS 0 publishes, a clean session's
    /// subscription changes, or a DISCONNECT.
    pub(super) fn holds_for_store(&self, key: ConnKey, packet: &Packet) -> bool {
        if !self.store.full {
            return false;
        }
        match packet {
            Packet::Publish(p) => p.qos != QoS::AtMostOnce || p.retain,
            Packet::Subscribe(_) | Packet::Unsubscribe(_) => self
                .sessions
                .get(&key)
                .is_some_and(|e| e.session.journaled()),
            _ => false,
        }
    }

    /// Input of `key` was deferred by [`ShardCore::holds_for_store`]: remember to resume it,
    /// and bound the wait.
    pub(super) fn hold_for_store(&mut self, key: ConnKey, now: Instant) {
        let timeout = self.store.timeout();
        let Some(live) = self.conns.get_mut(&key) else {
            return;
        };
        if live.store_held {
            return;
        }
        live.store_held = true;
        self.store.held.push(key);
        self.counters.store_held_inputs.inc();
        self.timers.push(now + timeout, TimerKind::StoreHeld(key));
    }

    /// The backlog timer of `key` fired: still held, it is closed (v5: DISCONNECT 0x97), as
    /// a connection whose acknowledgement waited too long for the disk is.
    pub(super) fn check_store_held(&mut self, key: ConnKey, now: Instant) {
        let Some(live) = self.conns.get(&key) else {
            return;
        };
        if !live.store_held {
            return;
        }
        let words = live.closing_words(ReasonCode::QUOTA_EXCEEDED);
        self.counters.store_held_closes.inc();
        if !std::mem::replace(&mut self.store.closed_logged, true) {
            warn!(
                shard = self.id,
                "persistence: the disk has not taken the backlog for {}s: closing clients \
                 whose input waits for it (v5: DISCONNECT 0x97); the rest are counted in \
                 midge_store_held_closes_total",
                self.store.timeout().as_secs()
            );
        }
        self.store.held.retain(|k| *k != key);
        self.lose_connection(key, now);
        if let Some(live) = self.conns.get_mut(&key) {
            live.store_held = false;
            live.deferred.clear();
            live.last_words.extend(words);
        }
    }

    /// The driver could not write or sync (disk full, I/O error): acknowledgements stay
    /// held (publishers see backpressure; connections waiting past the timeout are closed).
    pub fn handle_store_failed(&mut self, _now: Instant) {
        self.store.failing = true;
    }

    /// Records made and not yet durable.
    pub fn store_backlog(&self) -> u64 {
        self.store.appended - self.store.durable
    }

    // ---- the gate ----------------------------------------------------------------------

    /// Hold the output of `key` until everything recorded so far is durable.
    pub(super) fn gate_durable(&mut self, key: ConnKey, now: Instant) {
        if !self.store.gate_needed() {
            return;
        }
        let upto = self.store.appended;
        let timeout = self.store.timeout();
        let Some(live) = self.conns.get_mut(&key) else {
            return;
        };
        if live.durable == 0 {
            self.store.waiting.push(key);
            self.timers
                .push(now + timeout, TimerKind::Durable(key, upto));
        }
        live.durable = upto;
    }

    /// The durability timer of `key` (armed when it waited for record `upto`) fired.
    pub(super) fn check_durable(&mut self, key: ConnKey, upto: u64, now: Instant) {
        let Some(live) = self.conns.get(&key) else {
            return;
        };
        if live.durable == 0 || upto <= self.store.durable {
            if live.durable != 0 {
                // Gated again since: re-arm for the newer wait.
                let timeout = self.store.timeout();
                let up = live.durable;
                self.timers.push(now + timeout, TimerKind::Durable(key, up));
            }
            return;
        }
        let words = live.closing_words(ReasonCode::QUOTA_EXCEEDED);
        warn!(
            shard = self.id,
            "persistence: the disk did not confirm a write in time: closing a client \
             instead of acknowledging what is not stored"
        );
        self.store.waiting.retain(|k| *k != key);
        self.lose_connection(key, now);
        if let Some(live) = self.conns.get_mut(&key) {
            live.durable = 0;
            live.last_words.extend(words);
        }
    }

    // ---- what events record ------------------------------------------------------------

    /// A message about to be routed: give it a `sid` and record it if it must survive a
    /// restart (QoS 1/2 or retained, from a client or a will; not `$SYS`).
    pub(super) fn record_msg(
        &mut self,
        mut msg: Message,
        publisher: ConnKey,
        now: Instant,
    ) -> Message {
        if !self.store.on() || (msg.qos == QoS::AtMostOnce && !msg.retain) {
            return msg;
        }
        if msg.topic.as_str().starts_with("$SYS") {
            return msg;
        }
        let seq = self.store.next_seq;
        self.store.next_seq += 1;
        msg.sid = record::sid(self.id, seq);
        let in_pid = if msg.qos == QoS::ExactlyOnce {
            self.sessions
                .get(&publisher)
                .filter(|e| e.session.journaled())
                .map_or(0, |e| e.session.last_in_pid())
        } else {
            0
        };
        let expires = msg.expires_at.map_or(0, |t| {
            let c = self.store.cfg.expect("store on");
            (c.base_ns + t.saturating_duration_since(c.base).as_nanos() as u64).max(1)
        });
        let ts = self.store.ts(now);
        let r = Record::Msg {
            ts,
            sid: msg.sid,
            client: msg.origin.clone(),
            in_pid,
            expires,
            publish: record::encode_publish(&msg),
        };
        self.store.push(&r);
        msg
    }

    fn journaled(&self, key: ConnKey) -> Option<ByteString> {
        self.sessions
            .get(&key)
            .filter(|e| e.session.journaled())
            .map(|e| e.session.client_id().clone())
    }

    pub(super) fn record_sub(
        &mut self,
        key: ConnKey,
        filter: &TopicFilter,
        options: SubscriptionOptions,
        sub_id: Option<u32>,
        now: Instant,
    ) {
        if let Some(client) = self.journaled(key) {
            let ts = self.store.ts(now);
            self.store.push(&Record::Sub {
                ts,
                client,
                filter: ByteString::from(filter.as_str()),
                options: record::options_byte(options),
                sub_id: sub_id.unwrap_or(0),
            });
        }
    }

    pub(super) fn record_unsub(&mut self, key: ConnKey, filter: &TopicFilter, now: Instant) {
        if let Some(client) = self.journaled(key) {
            let ts = self.store.ts(now);
            self.store.push(&Record::Unsub {
                ts,
                client,
                filter: ByteString::from(filter.as_str()),
            });
        }
    }

    /// The connection of a persistent session closed; the session stays.
    pub(super) fn record_disc(&mut self, key: ConnKey, now: Instant) {
        let Some(e) = self.sessions.get(&key) else {
            return;
        };
        let expiry = e.session.state().session_expiry_interval();
        if expiry == 0 {
            return; // it ends now, and says so
        }
        if let Some(client) = self.journaled(key) {
            let ts = self.store.ts(now);
            self.store.push(&Record::Disc { ts, client, expiry });
        }
    }

    /// The session of `client` ended for good (or was discarded by a clean start).
    pub(super) fn record_end(&mut self, client: &ByteString, now: Instant) {
        if self.store.on() {
            let ts = self.store.ts(now);
            self.store.push(&Record::End {
                ts,
                client: client.clone(),
            });
        }
    }

    /// A session was installed on connection `key` (`carried`: state came with it). Turns
    /// its journal on if it is persistent and records its start; a non-persistent session
    /// that replaced a persistent one records its end. The CONNACK waits for either.
    pub(super) fn record_install(&mut self, key: ConnKey, carried: bool, now: Instant) {
        if !self.store.on() {
            return;
        }
        let Some(e) = self.sessions.get_mut(&key) else {
            return;
        };
        let expiry = e.session.state().session_expiry_interval();
        let client = e.session.client_id().clone();
        e.session.set_journal(expiry != 0);
        let ts = self.store.ts(now);
        if expiry != 0 {
            let will = e.session.durable_will().map(|w| {
                let delay = w.properties.will_delay_interval.unwrap_or(0);
                let (listener, username) = match e.authz.as_deref() {
                    Some(a) => (
                        u16::try_from(a.listener).unwrap_or(record::NO_LISTENER),
                        a.subject.client().username.map(ByteString::from),
                    ),
                    None => (record::NO_LISTENER, None),
                };
                (delay, listener, username, record::encode_will(w))
            });
            self.store.push(&Record::Start {
                ts,
                client: client.clone(),
                clean: !carried,
                expiry,
            });
            if let Some((delay, listener, username, publish)) = will {
                let ts = self.store.ts(now);
                self.store.push(&Record::Will {
                    ts,
                    client,
                    delay,
                    listener,
                    username,
                    publish,
                });
            }
        } else if carried {
            self.store.push(&Record::End { ts, client });
        }
        // The CONNACK waits only for records it depends on: this session's start, or the end
        // of the one it replaced (see `gate_on_end`). A clean, non-persistent client depends
        // on none, so it connects, and its QoS 0 flows, while the disk fails.
        if expiry != 0 || carried {
            self.gate_durable(key, now);
        }
    }

    /// A clean start of `conn` ended the persistent session it replaced, just recorded here:
    /// its CONNACK must not leave before that end is durable, or a crash would bring the old
    /// session back. On this shard the connection's own gate holds it (set now, while it
    /// registers); on another, its Handover waits (`send_after_durable`).
    pub(super) fn gate_on_end(&mut self, conn: ConnKey, now: Instant) {
        if super::registry::conn_shard(conn) == self.id {
            self.gate_durable(conn, now);
        }
    }

    /// Send `msg` to shard `to` once everything recorded so far is durable (to this shard
    /// itself: at once; its own gate covers it).
    pub(super) fn send_after_durable(&mut self, to: super::ShardId, msg: super::msg::PeerMsg) {
        if to != self.id && self.store.gate_needed() {
            let upto = self.store.appended;
            if let Some(q) = self.out.get_mut(to) {
                q.push_back_after(msg, upto);
            }
        } else {
            self.send(to, msg);
        }
    }

    /// Turn the journal of an offline session rebuilt here on if it is persistent.
    pub(super) fn journal_offline(&mut self, e: &mut Entry) {
        let on = self.store.on() && e.session.state().session_expiry_interval() != 0;
        e.session.set_journal(on);
    }

    /// Record what the session of `key` noted about its deliveries; a QoS 2 PUBLISH or
    /// PUBREL (or a PUBCOMP for the client's own message) waits for its record.
    pub(super) fn drain_notes(&mut self, key: ConnKey, now: Instant) {
        let Some(e) = self.sessions.get_mut(&key) else {
            return;
        };
        if !e.session.journaled() {
            return;
        }
        let mut notes = std::mem::take(&mut self.store.notes);
        e.session.take_notes(&mut notes);
        if notes.is_empty() {
            self.store.notes = notes;
            return;
        }
        let client = e.session.client_id().clone();
        let mut gate = false;
        for n in notes.drain(..) {
            let ts = self.store.ts(now);
            let client = client.clone();
            let r = match n {
                Note::Sent { sid, pid } => {
                    gate = true;
                    Record::Sent {
                        ts,
                        client,
                        sid,
                        pid,
                    }
                }
                Note::Released { sid } => {
                    gate = true;
                    Record::Rel { ts, client, sid }
                }
                Note::Done { sid } => Record::Ack { ts, client, sid },
                Note::InRel { pid } => {
                    gate = true;
                    Record::InRel { ts, client, pid }
                }
                Note::WillGone => Record::WillGone { ts, client },
            };
            self.store.push(&r);
        }
        self.store.notes = notes;
        if gate {
            self.gate_durable(key, now);
        }
    }

    // ---- start-up ----------------------------------------------------------------------

    /// Install what recovery rebuilt for this shard (before any client connects): offline
    /// sessions (this is their home shard: registered here, subscribed here, routes
    /// broadcast), the retained set, and the message sequence to continue from.
    pub fn recover(
        &mut self,
        sessions: Vec<SessionState>,
        retained: Vec<Message>,
        next_seq: u64,
        now: Instant,
    ) {
        self.store.next_seq = self.store.next_seq.max(next_seq);
        for m in retained {
            self.retained.set(m);
        }
        self.refresh_retained_gauges();
        for state in sessions {
            let key = self.next_conn_key();
            let client = state.client_id().clone();
            let subs: Vec<(TopicFilter, SubscriptionOptions, Option<u32>)> = state
                .subscriptions()
                .map(|(f, s)| (f.clone(), s.options, s.subscription_id))
                .collect();
            // A pending will is checked, when published, with the identity its connection
            // had; otherwise the connection that resumes the session sets one, and what was
            // queued meanwhile is checked against its ACL then (`recheck_resumed`).
            let authz = state.recovered_will_auth().and_then(|w| {
                let auth = super::ConnAuth {
                    listener: w.listener,
                    password: None,
                };
                self.make_authz(Some(&auth), &client, w.username.as_deref())
            });
            let mut e = Entry {
                session: Box::new(Session::offline(&self.cfg.session, state)),
                live: false,
                flow: None,
                timer_armed: None,
                authz,
            };
            self.journal_offline(&mut e);
            self.sessions.insert(key, e);
            self.counters.offline_sessions.inc();
            self.registry.register(client, key);
            for (f, o, id) in subs {
                let sub = crate::routing::LocalSubscription {
                    options: o,
                    subscription_id: id,
                };
                if let Ok(out) = self.local.subscribe(&f, key, sub) {
                    if let Some(d) = out.delta {
                        self.broadcast_delta(d);
                    }
                }
            }
            self.after_session_input(key);
        }
        self.counters.subscriptions.set(self.local.len() as u64);
        self.run_pending(now);
    }

    /// Every route this shard broadcast has been applied by every peer.
    pub fn broadcasts_settled(&self) -> bool {
        self.settle.settled(self.id, self.settle.seq())
    }
}
