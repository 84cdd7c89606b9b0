//! What this shard makes durable, and the gate that holds acknowledgements until it is.
//!
//! Owns: [`Store`] (the records this shard produced and the driver has not taken yet, how
//! many are durable, the connections whose output waits on them, the record clock, the
//! message sequence), the record each event becomes, the durability gate with its timeout,
//! and installing sessions and retained messages recovered at start-up. Must not touch:
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

use super::conn::{disconnect_packet, Entry};
use super::registry::ConnKey;
use super::timers::TimerKind;
use super::ShardCore;
use crate::codec::{QoS, ReasonCode, SubscriptionOptions, TopicFilter};
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
    /// 0x97) instead of acknowledging.
    pub timeout: Duration,
}

#[derive(Default)]
pub(crate) struct Store {
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
}

impl Store {
    pub fn new(cfg: Option<PersistConfig>) -> Store {
        Store {
            cfg,
            next_seq: 1,
            ..Store::default()
        }
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
        if out.is_empty() {
            std::mem::swap(out, &mut self.store.buf);
        } else {
            out.append(&mut self.store.buf);
        }
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
    pub fn handle_durable(&mut self, upto: u64, _now: Instant) {
        if upto <= self.store.durable {
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
        let timeout = self
            .store
            .cfg
            .map_or(Duration::from_secs(30), |c| c.timeout);
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
                let timeout = self
                    .store
                    .cfg
                    .map_or(Duration::from_secs(30), |c| c.timeout);
                let up = live.durable;
                self.timers.push(now + timeout, TimerKind::Durable(key, up));
            }
            return;
        }
        let v5 = live.version.is_v5();
        warn!(
            shard = self.id,
            "persistence: the disk did not confirm a write in time: closing a client \
             instead of acknowledging what is not stored"
        );
        self.store.waiting.retain(|k| *k != key);
        self.lose_connection(key, now);
        if let Some(live) = self.conns.get_mut(&key) {
            live.durable = 0;
            if v5 {
                live.last_words
                    .push_back(disconnect_packet(ReasonCode::QUOTA_EXCEEDED));
            }
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
            self.store.push(&Record::Start {
                ts,
                client,
                clean: !carried,
                expiry,
            });
        } else if carried {
            self.store.push(&Record::End { ts, client });
        }
        self.gate_durable(key, now);
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
            let mut e = Entry {
                session: Box::new(Session::offline(&self.cfg.session, state)),
                live: false,
                flow: None,
                timer_armed: None,
                // Set again by the connection that resumes it; what was queued meanwhile is
                // checked against that connection's ACL then (`recheck_resumed`).
                authz: None,
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
