//! The shard core: one shard's broker state and logic, sans-IO.
//!
//! Owns: everything a shard decides — its sessions and the connections attached to them, its
//! slice of the client-id registry, its routing replica and local subscriber table, its
//! retained replica, the takeover protocol (register, hand-over, park, cut-over), the settle
//! sequence that holds acknowledgements until every shard applied a change, flow control
//! (pausing publishers that feed a full subscriber, cutting stalled ones loose), and every
//! timer (keepalive, session expiry, will delay, peer and client timeouts). Must not touch:
//! sockets, TLS, glommio, wakers, `Rc` or the clock. Time comes in as `Instant`; bytes are
//! the driver's (it decodes packets before `handle_packet` and encodes what `poll_transmit`
//! returns); mailboxes are the driver's (it moves what `poll_peer` returns to the peer's
//! `handle_peer`). The same core runs under the glommio driver (`crate::shard`) and under the
//! deterministic simulator (`tests/simulator.rs`).
//!
//! # Contract (after quinn-proto's `Connection`)
//!
//! Inputs (`handle_*`), each followed by the driver draining the outputs:
//! * [`ShardCore::handle_connect`]: a connection passed admission (CONNECT decoded,
//!   authenticated); the core registers it with the client id's home shard. Its input is
//!   paused until the session is installed.
//! * [`ShardCore::handle_packet`] for every packet decoded from an admitted connection, as
//!   long as [`ShardCore::input_paused`] is false (check it before decoding the next packet).
//! * [`ShardCore::handle_decode_error`], [`ShardCore::handle_write_stalled`],
//!   [`ShardCore::handle_conn_closed`] (exactly once per admitted connection, when the driver
//!   stops serving it, whatever the reason).
//! * [`ShardCore::handle_peer`] for every message from another shard, in mailbox order.
//! * [`ShardCore::handle_tick`] when `now >= poll_timeout()`.
//! * [`ShardCore::publish_internal`] (`$SYS`), [`ShardCore::shutdown`].
//!
//! Outputs, drained after every input in this order:
//! 1. [`ShardCore::poll_peer`] for each peer in [`ShardCore::peers_with_output`]: messages to
//!    move into that peer's mailbox. If the mailbox is full, give the message back with
//!    [`ShardCore::unpoll_peer`] and retry when it has room.
//! 2. [`ShardCore::poll_dirty`]: connections with something new — packets to send
//!    ([`ShardCore::poll_transmit`] until `None`), input resumed, or a close to carry out
//!    ([`ShardCore::wants_close`] once transmit is drained).
//! 3. [`ShardCore::poll_timeout`]: when to call `handle_tick` next.
//!
//! # Promises this code keeps (the simulator checks them)
//! * A PUBACK/PUBREC/SUBACK/CONNACK leaves a connection only when what it acknowledges is
//!   done: routed (the publisher's own forwards accepted by the peers' queues), and, where it
//!   changed routing or retained state, applied by every shard (the settle gate).
//! * An acknowledged QoS 1/2 message reaches every matching subscriber that is live and making
//!   progress: a full subscriber pauses the publishers feeding it instead of dropping. Drops
//!   happen only for offline sessions at mosquitto's queue limits, subscribers stalled for
//!   `stall_timeout`, and QoS 0 under pressure — each counted by cause.
//! * A persistent session survives any chain of takeovers; a clean start receives nothing of
//!   the old session; per-publisher order holds across shards and takeovers.
//! * Every wait on a peer has a bound (register, settle, park, switch timeouts) with a clear
//!   outcome for the client.

mod authz;
mod conn;
mod fanout;
mod flow;
mod lines;
pub mod msg;
mod outq;
mod persist;
pub mod registry;
mod settle;
mod takeover;
#[cfg(test)]
mod tests;
mod timers;

use core::net::SocketAddr;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytestring::ByteString;

use crate::codec::{Connect, Packet, ReasonCode};
use crate::metrics::ShardCounters;
use crate::routing::{self, LocalSubscriptions, RetainedLimits, RetainedStore, RoutingReplica};
use crate::session::SessionConfig;

pub use authz::{Authz, ConnAuth};
pub use msg::{ParkedMsg, PeerMsg, Transfer};
pub use persist::{PersistConfig, DEFAULT_MAX_BACKLOG};
pub use registry::{conn_key, conn_shard, home_shard, ConnKey, ShardId};

use conn::{Entry, Live, Registering};
use settle::Settle;
use takeover::{Parked, Switching};
use timers::Timers;

/// Settings of one shard core. Every field has a default (see [`CoreConfig::default`]).
///
/// # Defaults
/// | field | default | why |
/// |---|---|---|
/// | `peer_data_cap` | 4096 | forwards queued for one peer before QoS 0 is dropped and QoS 1/2 publishers are paused |
/// | `peer_control_high_water` | 65,536 | control messages queued for one peer before new connects and subscribes are refused |
/// | `max_pending_transmit` | 1000 | packets waiting for a slow socket before QoS 0 to it is dropped |
/// | `max_deferred_input` | 64 | packets a paused publisher may have read ahead before its socket is no longer read |
/// | `register_timeout` | 10 s | a home shard that does not answer a CONNECT: CONNACK 0x88 / 3 |
/// | `settle_timeout` | 10 s | a peer that does not confirm a route change: the client is disconnected |
/// | `park_timeout` | 5 s | a session move not confirmed by every shard is finished anyway |
/// | `stall_timeout` | 10 s | a subscriber with a full queue and no progress is cut loose |
/// | `write_timeout` | 30 s | a socket that accepts no bytes is closed |
/// | `security` | none | listeners without password or ACL files: nothing is checked |
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub shards: usize,
    /// Session limits (each connection brings its own, per listener, in `ConnectRequest`;
    /// this one is used for sessions rebuilt without a connection).
    pub session: SessionConfig,
    pub retained: RetainedLimits,
    /// Publishes with a larger payload are acknowledged but not routed (mosquitto's
    /// `message_size_limit`); `usize::MAX` = no limit.
    pub message_size_limit: usize,
    pub peer_data_cap: usize,
    pub peer_control_high_water: usize,
    pub max_pending_transmit: usize,
    pub max_deferred_input: usize,
    pub register_timeout: Duration,
    pub settle_timeout: Duration,
    pub park_timeout: Duration,
    pub stall_timeout: Duration,
    pub write_timeout: Duration,
    /// Each listener's password and ACL files, indexed by [`ConnAuth::listener`].
    pub security: Vec<crate::auth::ListenerSecurity>,
    /// Persistence on: what to record and how acknowledgements wait for it (`None`: off).
    pub persist: Option<PersistConfig>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            shards: 1,
            session: SessionConfig::default(),
            retained: RetainedLimits::default(),
            message_size_limit: usize::MAX,
            peer_data_cap: 4096,
            peer_control_high_water: 65_536,
            max_pending_transmit: 1000,
            max_deferred_input: 64,
            register_timeout: Duration::from_secs(10),
            settle_timeout: Duration::from_secs(10),
            park_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            security: Vec::new(),
            persist: None,
        }
    }
}

/// A connection that passed admission, as the driver hands it to the core.
#[derive(Debug)]
pub struct ConnectRequest {
    /// The decoded CONNECT.
    pub connect: Box<Connect>,
    /// The effective client id: the CONNECT's, or one the driver assigned to an empty id.
    pub client_id: ByteString,
    /// This listener's session limits.
    pub config: SessionConfig,
    /// The username the session runs as (the certificate identity, or the client's).
    pub username: Option<ByteString>,
    /// For the connect log line.
    pub peer: Option<SocketAddr>,
    /// How admission authenticated it (`None`: a listener without security files).
    pub auth: Option<ConnAuth>,
}

/// One shard's core. See the module doc for the contract.
pub struct ShardCore {
    pub(crate) id: ShardId,
    pub(crate) cfg: CoreConfig,
    pub(crate) counters: Arc<ShardCounters>,
    next_conn: u64,
    /// Bumped per routed publish: spreads share-group members and shards.
    pub(crate) pub_counter: u64,
    pub(crate) stopping: bool,

    /// Sessions hosted here, live or offline, by the key of the connection that installed
    /// them.
    pub(crate) sessions: AHashMap<ConnKey, Entry>,
    /// Connections the driver serves (admitted: registering, active, or closing).
    pub(crate) conns: AHashMap<ConnKey, Live>,
    /// Connections waiting for their home shard's answer (may outlive their connection).
    pub(crate) registering: AHashMap<ConnKey, Registering>,
    pub(crate) registry: registry::Registry,

    pub(crate) local: LocalSubscriptions<ConnKey>,
    pub(crate) replica: RoutingReplica,
    pub(crate) retained: RetainedStore,

    /// Sessions that moved away, whose routes are being switched (see `takeover.rs`).
    pub(crate) parked: AHashMap<ConnKey, Parked>,
    /// Sessions that moved here, whose routes are being switched.
    pub(crate) switching: AHashMap<ConnKey, Switching>,

    pub(crate) settle: Settle,
    pub(crate) timers: Timers,

    /// Messages for each peer, in order; the driver moves them into the mailboxes.
    pub(crate) out: Vec<outq::PeerQueue>,
    /// Messages to this shard itself, handled after the current input (never re-entrantly).
    pub(crate) self_queue: VecDeque<PeerMsg>,
    /// Publishers waiting for peer queues they filled past the data bound, oldest first.
    pub(crate) held_pubs: VecDeque<ConnKey>,
    /// Publishers whose pause ended: their deferred input runs after the current input.
    pub(crate) resumable: Vec<ConnKey>,
    /// Connections with new output or state for the driver (deduplicated by `Live::dirty`).
    pub(crate) dirty: Vec<ConnKey>,

    pub(crate) scratch: fanout::Scratch,

    /// This shard's view of each listener's ACL (see `authz.rs`).
    pub(crate) views: Vec<crate::auth::AccessView>,
    /// Per listener, the password file generation last applied.
    pub(crate) password_generations: Vec<u64>,
    pub(crate) store: persist::Store,
}

impl ShardCore {
    pub fn new(id: ShardId, cfg: CoreConfig, counters: Arc<ShardCounters>) -> ShardCore {
        let shards = cfg.shards.max(1);
        let routing_id = routing::ShardId::new(id).unwrap_or(routing::ShardId::new(0).unwrap());
        ShardCore {
            id,
            counters,
            next_conn: 0,
            pub_counter: 0,
            stopping: false,
            sessions: AHashMap::new(),
            conns: AHashMap::new(),
            registering: AHashMap::new(),
            registry: registry::Registry::default(),
            local: LocalSubscriptions::new(routing_id),
            replica: RoutingReplica::new(),
            retained: RetainedStore::new(cfg.retained),
            parked: AHashMap::new(),
            switching: AHashMap::new(),
            settle: Settle::new(shards),
            timers: Timers::default(),
            out: (0..shards).map(|_| outq::PeerQueue::default()).collect(),
            self_queue: VecDeque::new(),
            held_pubs: VecDeque::new(),
            resumable: Vec::new(),
            dirty: Vec::new(),
            scratch: fanout::Scratch::default(),
            views: authz::views(&cfg.security),
            password_generations: authz::password_generations(&cfg.security),
            store: persist::Store::new(id, cfg.persist),
            cfg: CoreConfig { shards, ..cfg },
        }
    }

    pub fn id(&self) -> ShardId {
        self.id
    }

    pub fn shards(&self) -> usize {
        self.cfg.shards
    }

    pub fn counters(&self) -> &Arc<ShardCounters> {
        &self.counters
    }

    /// A fresh connection key (unique broker-wide, never reused).
    pub fn next_conn_key(&mut self) -> ConnKey {
        self.next_conn += 1;
        conn_key(self.id, self.next_conn)
    }

    // ---- inputs ------------------------------------------------------------------------

    /// A connection passed admission: register it with its client id's home shard.
    pub fn handle_connect(&mut self, key: ConnKey, req: ConnectRequest, now: Instant) {
        self.on_connect(key, req, now);
        self.run_pending(now);
    }

    /// A packet decoded from connection `key` (only while `!input_paused(key)`).
    pub fn handle_packet(&mut self, key: ConnKey, packet: Packet, now: Instant) {
        if let Packet::Publish(p) = &packet {
            self.counters.count_received(p.qos as u8, p.payload.len());
        }
        self.on_packet(key, packet, now);
        self.run_pending(now);
    }

    /// The bytes of connection `key` did not decode: close it with `reason` (v5 DISCONNECT).
    pub fn handle_decode_error(&mut self, key: ConnKey, reason: ReasonCode, now: Instant) {
        self.on_decode_error(key, reason, now);
        self.run_pending(now);
    }

    /// The socket of `key` stopped accepting bytes (`true`) or made progress again (`false`).
    /// After `write_timeout` without progress the connection is closed.
    pub fn handle_write_stalled(&mut self, key: ConnKey, stalled: bool, now: Instant) {
        self.on_write_stalled(key, stalled, now);
        self.run_pending(now);
    }

    /// The driver stopped serving connection `key` (closed by either side, or failed).
    pub fn handle_conn_closed(&mut self, key: ConnKey, now: Instant) {
        self.on_conn_closed(key, now);
        self.run_pending(now);
    }

    /// A message from shard `from`, in that shard's send order.
    pub fn handle_peer(&mut self, from: ShardId, msg: PeerMsg, now: Instant) {
        self.on_peer(from, msg, now);
        self.run_pending(now);
    }

    /// Run every timer due at `now`.
    pub fn handle_tick(&mut self, now: Instant) {
        self.on_tick(now);
        self.run_pending(now);
    }

    /// Route a message that no client published (`$SYS`). Never paused, never held.
    pub fn publish_internal(&mut self, msg: crate::message::Message, now: Instant) {
        self.route(msg, 0, now);
        self.run_pending(now);
    }

    /// Ask every live connection to close with 0x8B (server shutting down); refuse new ones.
    pub fn shutdown(&mut self, now: Instant) {
        self.on_shutdown(now);
        self.run_pending(now);
    }

    // ---- outputs -----------------------------------------------------------------------

    /// Peers with messages waiting in [`ShardCore::poll_peer`], as a bit mask.
    pub fn peers_with_output(&self) -> u64 {
        let mut m = 0u64;
        let durable = self.store.durable();
        for (i, q) in self.out.iter().enumerate() {
            if q.ready(durable) {
                m |= 1 << i;
            }
        }
        m
    }

    /// The next message for `peer`'s mailbox.
    pub fn poll_peer(&mut self, peer: ShardId, now: Instant) -> Option<PeerMsg> {
        let durable = self.store.durable();
        let m = self.out.get_mut(peer)?.pop_front(durable)?;
        if !self.held_pubs.is_empty() {
            // Room appeared (the bound counts every queued message, control included):
            // publishers waiting on it may resume.
            self.release_held(now);
            self.run_pending(now);
        }
        Some(m)
    }

    /// Give back a message the mailbox refused (full); it goes first next time.
    pub fn unpoll_peer(&mut self, peer: ShardId, msg: PeerMsg) {
        if let Some(q) = self.out.get_mut(peer) {
            q.push_front(msg);
        }
    }

    /// Messages queued for `peer` (the driver's view of backpressure).
    pub fn peer_backlog(&self, peer: ShardId) -> usize {
        self.out.get(peer).map_or(0, outq::PeerQueue::len)
    }

    /// The next connection with something new for the driver.
    pub fn poll_dirty(&mut self) -> Option<ConnKey> {
        while let Some(k) = self.dirty.pop() {
            if let Some(l) = self.conns.get_mut(&k) {
                if l.dirty {
                    l.dirty = false;
                    return Some(k);
                }
            }
        }
        None
    }

    /// The next packet to write on connection `key`; `None` when nothing may go now (nothing
    /// queued, or held behind an acknowledgement gate).
    pub fn poll_transmit(&mut self, key: ConnKey, now: Instant) -> Option<Packet> {
        let p = self.next_transmit(key, now);
        if let Some(Packet::Publish(p)) = &p {
            self.counters.count_sent(p.qos as u8, p.payload.len());
        }
        p
    }

    /// Whether the driver must stop decoding input of `key` (and stop reading its socket).
    pub fn input_paused(&self, key: ConnKey) -> bool {
        self.conns
            .get(&key)
            .is_none_or(|l| l.input_paused(&self.cfg))
    }

    /// After a batch of `poll_transmit`: more (retained messages) is due once it is written.
    /// Reading it clears it.
    pub fn take_more_after_write(&mut self, key: ConnKey) -> bool {
        self.conns
            .get_mut(&key)
            .is_some_and(|l| std::mem::take(&mut l.more_after_write))
    }

    /// Connection `key` is to be closed once `poll_transmit` returns `None`.
    pub fn wants_close(&self, key: ConnKey) -> bool {
        self.conns
            .get(&key)
            .is_none_or(|l| l.close && l.gate_open())
    }

    /// When `handle_tick` has work next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    // ---- introspection (tests, `$SYS`) ---------------------------------------------------

    /// Sessions hosted here: (live, offline).
    pub fn session_counts(&self) -> (usize, usize) {
        let live = self.sessions.values().filter(|e| e.live).count();
        (live, self.sessions.len() - live)
    }

    /// Client ids registered at this (home) shard.
    pub fn registered_ids(&self) -> usize {
        self.registry.len()
    }

    /// Nothing in progress: no registration, move, gate, held forward, pause or queued peer
    /// message. The simulator checks this once a run has quiesced ("every wait ends").
    pub fn is_quiescent(&self) -> Result<(), String> {
        if !self.registering.is_empty() {
            return Err(format!("{} registrations pending", self.registering.len()));
        }
        if !self.parked.is_empty() {
            return Err(format!("{} parked sessions", self.parked.len()));
        }
        if !self.switching.is_empty() {
            return Err(format!("{} sessions switching", self.switching.len()));
        }
        if !self.held_pubs.is_empty() {
            return Err(format!(
                "{} publishers waiting on peer queues",
                self.held_pubs.len()
            ));
        }
        if !self.self_queue.is_empty() || self.out.iter().any(|q| !q.is_empty()) {
            return Err("peer messages not sent".into());
        }
        for (k, l) in &self.conns {
            if !l.gate_open() {
                return Err(format!("connection {k:#x} gated"));
            }
            if l.pause_refs != 0 {
                return Err(format!("connection {k:#x} paused ({})", l.pause_refs));
            }
            if !l.deferred.is_empty() {
                return Err(format!("connection {k:#x} has deferred input"));
            }
        }
        for (k, e) in &self.sessions {
            if e.flow.as_ref().is_some_and(|f| !f.blockers.is_empty()) {
                return Err(format!("session {k:#x} still pausing publishers"));
            }
        }
        Ok(())
    }

    // ---- internals shared by the sub-modules -------------------------------------------

    /// Queue `msg` for shard `to` (this shard: handled after the current input).
    pub(crate) fn send(&mut self, to: ShardId, msg: PeerMsg) {
        if to == self.id {
            self.self_queue.push_back(msg);
        } else if let Some(q) = self.out.get_mut(to) {
            q.push_back(msg);
        }
    }

    /// Mark `key` for the driver's attention.
    pub(crate) fn mark_dirty(&mut self, key: ConnKey) {
        if let Some(l) = self.conns.get_mut(&key) {
            if !l.dirty {
                l.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    /// Some peer's control backlog is past the high-water mark: refuse new work that would
    /// add to it (bounded memory when a peer stalls).
    pub(crate) fn peers_overloaded(&self) -> bool {
        self.out
            .iter()
            .any(|q| q.len() > self.cfg.peer_control_high_water)
    }

    /// Work queued by the input just handled: messages to ourselves, then publishers whose
    /// pause ended. Run to completion so no input is handled re-entrantly.
    fn run_pending(&mut self, now: Instant) {
        loop {
            if let Some(m) = self.self_queue.pop_front() {
                self.on_peer(self.id, m, now);
            } else if let Some(k) = self.resumable.pop() {
                self.resume_input(k, now);
            } else {
                break;
            }
        }
    }

    fn on_peer(&mut self, from: ShardId, msg: PeerMsg, now: Instant) {
        match msg {
            PeerMsg::Route { delta, seq } => {
                self.replica.apply(&delta);
                self.ack_broadcast(from, seq);
            }
            PeerMsg::Retain { msg, seq } => {
                self.retained.set(msg);
                self.refresh_retained_gauges();
                self.ack_broadcast(from, seq);
            }
            PeerMsg::Applied { seq } => self.on_applied(from, seq),
            PeerMsg::Forward { fwd, publisher } => {
                self.deliver_local(from, &fwd.message, fwd.plain, &fwd.groups, publisher, now)
            }
            PeerMsg::Register {
                client_id,
                conn,
                clean_start,
            } => self.on_register(client_id, conn, clean_start),
            PeerMsg::Takeover {
                previous,
                conn,
                clean_start,
            } => self.on_takeover(previous, conn, clean_start, now),
            PeerMsg::Handover { conn, state } => self.on_handover(conn, state, now),
            PeerMsg::CutoverRequest { old, new } => {
                self.cut_over(old, new);
                self.send(conn_shard(new), PeerMsg::CutoverAck { new });
            }
            PeerMsg::Cutover { old, new } => self.mark_cut(old, new, from),
            PeerMsg::CutoverAck { new } => self.on_cutover_ack(new, from, now),
            PeerMsg::ParkDone { conn, msgs } => self.on_park_done(conn, msgs, now),
            PeerMsg::ParkAbandon { old } => self.abandon_parked(old),
            PeerMsg::Unregister { client_id, conn } => {
                self.registry.unregister(&client_id, conn);
            }
            PeerMsg::Pause { conn } => self.pause_local(conn),
            PeerMsg::Resume { conn } => self.resume_local(conn),
        }
    }

    pub(crate) fn refresh_retained_gauges(&self) {
        self.counters.retained.set(self.retained.len() as u64);
        self.counters
            .retained_bytes
            .set(self.retained.bytes() as u64);
    }
}
