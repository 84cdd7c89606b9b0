//! The settle sequence: an acknowledgement that follows a routing or retained change waits
//! until every shard has applied that change.
//!
//! Owns: this shard's broadcast sequence (route deltas and retained updates), what each peer
//! has acknowledged (`Applied`), and the connections whose output waits on it (their gate,
//! with a timeout). Must not touch: what was broadcast (`fanout.rs`), the output itself
//! (`conn.rs`).
//!
//! Why: a client that saw a SUBACK may publish at once from another shard, or tell another
//! client to; that publish must find the subscription. Likewise a subscribe that follows a
//! retained PUBACK must get the message (mosquitto's guarantees, which one thread gives for
//! free). Without this, 2–30% of such publishes missed on two shards (wave 1).

use std::time::Instant;

use tracing::warn;

use super::msg::PeerMsg;
use super::registry::{ConnKey, ShardId};
use super::timers::TimerKind;
use super::ShardCore;
use crate::codec::ReasonCode;

pub(crate) struct Settle {
    seq: u64,
    applied: Vec<u64>,
    /// Connections gated on some sequence (checked when acknowledgements arrive).
    waiting: Vec<ConnKey>,
}

impl Settle {
    pub fn new(shards: usize) -> Settle {
        Settle {
            seq: 0,
            applied: vec![0; shards],
            waiting: Vec::new(),
        }
    }

    /// The latest broadcast this shard sent.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Every other shard applied this shard's broadcasts up to `seq`.
    pub fn settled(&self, me: ShardId, seq: u64) -> bool {
        self.applied
            .iter()
            .enumerate()
            .all(|(peer, &a)| peer == me || a >= seq)
    }

    pub fn forget(&mut self, key: ConnKey) {
        self.waiting.retain(|k| *k != key);
    }
}

impl ShardCore {
    /// Hold the output of `key` until broadcast `seq` is applied everywhere.
    pub(super) fn set_gate(&mut self, key: ConnKey, seq: u64, now: Instant) {
        if self.settle.settled(self.id, seq) {
            return;
        }
        let timeout = self.cfg.settle_timeout;
        let Some(live) = self.conns.get_mut(&key) else {
            return;
        };
        if live.gate == 0 {
            live.gate_since = Some(now);
            self.settle.waiting.push(key);
            self.timers.push(now + timeout, TimerKind::Gate(key));
        }
        live.gate = seq;
    }

    pub(super) fn ack_broadcast(&mut self, from: ShardId, seq: u64) {
        if from != self.id {
            self.send(from, PeerMsg::Applied { seq });
        }
    }

    pub(super) fn on_applied(&mut self, from: ShardId, seq: u64) {
        if let Some(a) = self.settle.applied.get_mut(from) {
            if *a < seq {
                *a = seq;
            }
        }
        let mut waiting = std::mem::take(&mut self.settle.waiting);
        waiting.retain(|k| {
            let Some(live) = self.conns.get_mut(k) else {
                return false;
            };
            if live.gate != 0 && !self.settle.settled(self.id, live.gate) {
                return true;
            }
            live.gate = 0;
            live.gate_since = None;
            if !live.dirty {
                live.dirty = true;
                self.dirty.push(*k);
            }
            false
        });
        waiting.append(&mut self.settle.waiting);
        self.settle.waiting = waiting;
    }

    /// The gate timer of `key` fired: a peer did not confirm in time.
    pub(super) fn check_gate(&mut self, key: ConnKey, now: Instant) {
        let timeout = self.cfg.settle_timeout;
        let Some(live) = self.conns.get(&key) else {
            return;
        };
        let Some(since) = live.gate_since else {
            return;
        };
        if live.gate == 0 {
            return;
        }
        if now < since + timeout {
            self.timers.push(since + timeout, TimerKind::Gate(key));
            return;
        }
        let lagging: Vec<ShardId> = (0..self.cfg.shards)
            .filter(|&p| p != self.id && self.settle.applied[p] < live.gate)
            .collect();
        let v5 = live.version.is_v5();
        warn!(
            shard = self.id,
            "shard(s) {lagging:?} did not confirm a routing change within {}s: \
             disconnecting client {} instead of acknowledging",
            timeout.as_secs(),
            crate::logging::escape(&self.client_of(key))
        );
        self.counters.peer_timeouts.inc();
        self.settle.forget(key);
        self.lose_connection(key, now);
        if v5 {
            if let Some(live) = self.conns.get_mut(&key) {
                live.last_words
                    .push_back(super::conn::disconnect_packet(ReasonCode::SERVER_BUSY));
            }
        }
    }
}
