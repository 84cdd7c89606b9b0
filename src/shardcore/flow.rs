//! Flow control: a PUBACK is a promise, so a full subscriber slows its publishers down instead
//! of losing what they were told is delivered.
//!
//! Owns: [`SubFlow`] (a subscriber whose queue is full: the publishers it paused, when it last
//! made progress, whether it is stalled), pausing and resuming publishers on this shard and
//! on others (`PeerMsg::Pause`/`Resume`), stall detection and recovery. Must not touch:
//! what a publisher does while paused (`conn.rs` defers its packets and the driver stops
//! reading its socket), routing (`fanout.rs`).
//!
//! The rules:
//! * A live subscriber's queue may grow past `max_queued_*` (up to the session's hard limit).
//!   Each publisher whose message lands in a queue at or past the limit is paused once on
//!   that subscriber's account: its later publishes wait unacknowledged (TCP and the client's
//!   own window do the rest).
//! * Any acknowledgement from the subscriber is progress. When its queue is back to half the
//!   limit, every publisher it paused resumes.
//! * No progress for `stall_timeout` with a full queue: the subscriber is stalled. Its
//!   publishers resume, and messages past `max_queued_*` are dropped for it (counted, logged
//!   once) until it drains, so one stuck device cannot hold up the fleet.
//! * Offline sessions never pause anyone: they keep mosquitto's queue limits.

use std::time::Instant;

use std::collections::BTreeSet;
use tracing::{info, warn};

use super::conn::Entry;
use super::msg::PeerMsg;
use super::registry::{conn_shard, ConnKey};
use super::timers::TimerKind;
use super::ShardCore;

/// Flow-control state of one subscriber while its queue is full or it is stalled.
pub(crate) struct SubFlow {
    /// Publishers paused on this subscriber's account (each once; ordered, so a run replays).
    pub blockers: BTreeSet<ConnKey>,
    pub last_progress: Instant,
    pub stalled: bool,
}

impl ShardCore {
    /// A message for subscriber `key` from `publisher` (0: none) found its queue full.
    pub(super) fn congested(&mut self, key: ConnKey, publisher: ConnKey, now: Instant) {
        let stall = self.cfg.stall_timeout;
        let Some(e) = self.sessions.get_mut(&key) else {
            return;
        };
        if !e.live {
            return;
        }
        let flow = e.flow.get_or_insert_with(|| {
            self.timers.push(now + stall, TimerKind::Stall(key));
            Box::new(SubFlow {
                blockers: BTreeSet::new(),
                last_progress: now,
                stalled: false,
            })
        });
        if flow.stalled || publisher == 0 || publisher == key {
            // A publisher is never paused on its own account: it would stop reading the
            // acknowledgements that drain its queue.
            return;
        }
        if flow.blockers.insert(publisher) {
            self.pause(publisher);
        }
    }

    /// Subscriber `key` acknowledged something.
    pub(super) fn on_progress(&mut self, key: ConnKey, now: Instant) {
        let Some(e) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(flow) = e.flow.as_mut() else {
            return;
        };
        flow.last_progress = now;
        if e.session.queue_relieved() {
            let was_stalled = flow.stalled;
            self.release_flow(key);
            if was_stalled {
                if let Some(e) = self.sessions.get(&key) {
                    info!(
                        shard = self.id,
                        client = %crate::logging::escape(e.session.client_id()),
                        "client drained its queue: no longer stalled"
                    );
                }
            }
        }
    }

    /// The stall timer of subscriber `key` fired.
    pub(super) fn check_stall(&mut self, key: ConnKey, now: Instant) {
        let stall = self.cfg.stall_timeout;
        let Some(e) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(flow) = e.flow.as_mut() else {
            return;
        };
        if flow.stalled {
            return;
        }
        let due = flow.last_progress + stall;
        if now < due {
            self.timers.push(due, TimerKind::Stall(key));
            return;
        }
        flow.stalled = true;
        let blockers: Vec<ConnKey> = std::mem::take(&mut flow.blockers).into_iter().collect();
        e.session.set_queue_overflow(false);
        let queued = e.session.state().queued_len();
        let client = crate::logging::escape(e.session.client_id()).to_string();
        self.counters.stalls.inc();
        self.counters.stalled_now.inc();
        // Once per stall, not per dropped message.
        warn!(
            shard = self.id,
            "client {client} made no progress for {}s with {queued} messages queued: \
             cut loose, messages beyond max_queued_messages are dropped for it until it drains",
            stall.as_secs()
        );
        for p in blockers {
            self.resume(p);
        }
    }

    /// Subscriber `key` is no longer full, or no longer live: resume everyone it paused and
    /// forget its flow state.
    pub(super) fn release_flow(&mut self, key: ConnKey) {
        let Some(e) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(flow) = e.flow.take() else {
            return;
        };
        e.session.set_queue_overflow(e.live);
        self.release(*flow);
    }

    /// As [`ShardCore::release_flow`], for an entry already out of the map.
    pub(super) fn release_flow_of(&mut self, e: &mut Entry) {
        if let Some(flow) = e.flow.take() {
            self.release(*flow);
        }
    }

    fn release(&mut self, flow: SubFlow) {
        if flow.stalled {
            self.counters.stalled_now.dec();
        }
        for p in flow.blockers {
            self.resume(p);
        }
    }

    fn pause(&mut self, publisher: ConnKey) {
        let home = conn_shard(publisher);
        if home == self.id {
            self.pause_local(publisher);
        } else {
            self.send(home, PeerMsg::Pause { conn: publisher });
        }
    }

    fn resume(&mut self, publisher: ConnKey) {
        let home = conn_shard(publisher);
        if home == self.id {
            self.resume_local(publisher);
        } else {
            self.send(home, PeerMsg::Resume { conn: publisher });
        }
    }

    /// A subscriber somewhere paused `conn` (a connection of this shard).
    pub(super) fn pause_local(&mut self, conn: ConnKey) {
        let Some(l) = self.conns.get_mut(&conn) else {
            return;
        };
        let was = l.paused();
        l.pause_refs += 1;
        if !was {
            self.counters.pauses.inc();
            self.counters.paused_now.inc();
        }
    }

    /// One subscriber that paused `conn` let it go.
    pub(super) fn resume_local(&mut self, conn: ConnKey) {
        let Some(l) = self.conns.get_mut(&conn) else {
            return;
        };
        if l.pause_refs == 0 {
            return;
        }
        l.pause_refs -= 1;
        if !l.paused() {
            self.counters.paused_now.dec();
            self.resumable.push(conn);
        }
    }
}
