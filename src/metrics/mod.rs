//! Per-shard counters and gauges, written by one shard and read by anyone.
//!
//! Owns: [`ShardCounters`], the figures one shard keeps about itself (messages, drops by
//! reason, connections, sessions, takeovers, flow control), and [`Counter`]/[`Gauge`], the
//! single-writer cells they are made of. Must not touch: what the figures mean for routing or
//! sessions (the shard core decides when to count), how they are exposed (`$SYS`, a scrape):
//! readers only load.
//!
//! Why single-writer relaxed atomics: the counters sit on the message path, so they must cost
//! what a plain `u64` costs. Only the owning shard writes a cell, so an increment is a relaxed
//! load and store (no locked read-modify-write, no contention); readers on other threads see
//! each value whole, possibly a moment old. Nothing here is ever used for synchronisation.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count, written only by its owning shard.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add `n`. Only the owning shard may call this (a second writer would lose updates).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down, written only by its owning shard.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.set(self.get().wrapping_add(1));
    }

    #[inline]
    pub fn dec(&self) {
        self.set(self.get().saturating_sub(1));
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why a message was not delivered to a subscriber (or not routed at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropCause {
    /// An offline session's queue is full (mosquitto's `max_queued_*`), or a live queue hit
    /// its last-resort hard limit.
    QueueFull,
    /// The subscriber made no progress for `stall_timeout` with a full queue: cut loose.
    Stalled,
    /// QoS 0 to a subscriber whose socket is not keeping up.
    Qos0Slow,
    /// QoS 0 forward refused because the peer shard's queue is full.
    Qos0PeerFull,
    /// Larger than the subscriber's Maximum Packet Size.
    TooLarge,
    /// The message expiry interval passed.
    Expired,
    /// Payload above `message_size_limit` (acknowledged, never routed, as mosquitto).
    OverSizeLimit,
    /// A client published to `$SYS/...` (acknowledged, never routed, as mosquitto).
    SysTopic,
    /// A client published (or its will would go) to a topic its ACL does not let it write
    /// (acknowledged as mosquitto does, never routed).
    PublishNotAuthorized,
    /// A subscriber was skipped because its ACL does not let it read the topic.
    ReadNotAuthorized,
}

impl DropCause {
    pub const ALL: [DropCause; 10] = [
        DropCause::QueueFull,
        DropCause::Stalled,
        DropCause::Qos0Slow,
        DropCause::Qos0PeerFull,
        DropCause::TooLarge,
        DropCause::Expired,
        DropCause::OverSizeLimit,
        DropCause::SysTopic,
        DropCause::PublishNotAuthorized,
        DropCause::ReadNotAuthorized,
    ];

    /// A stable lowercase name, for `$SYS` topics and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DropCause::QueueFull => "queue_full",
            DropCause::Stalled => "stalled",
            DropCause::Qos0Slow => "qos0_slow",
            DropCause::Qos0PeerFull => "qos0_peer_full",
            DropCause::TooLarge => "too_large",
            DropCause::Expired => "expired",
            DropCause::OverSizeLimit => "over_size_limit",
            DropCause::SysTopic => "sys_topic",
            DropCause::PublishNotAuthorized => "publish_not_authorized",
            DropCause::ReadNotAuthorized => "read_not_authorized",
        }
    }
}

/// One shard's figures. See the module doc for who writes and who reads.
#[derive(Debug, Default)]
pub struct ShardCounters {
    /// PUBLISH packets accepted from clients (and wills, `$SYS`) and routed.
    pub publishes_in: Counter,
    /// Messages handed to a subscriber's session (sent, or queued for it).
    pub deliveries: Counter,
    /// Forwards sent to other shards.
    pub forwards_out: Counter,
    drops: [Counter; DropCause::ALL.len()],
    /// Connections that completed CONNECT and were handed a session.
    pub connects: Counter,
    /// Sessions taken over by a newer connection with the same client id.
    pub takeovers: Counter,
    /// Connections closed for not sending anything within 1.5 × keepalive.
    pub keepalive_timeouts: Counter,
    /// Connections refused or closed because a peer shard did not answer in time.
    pub peer_timeouts: Counter,
    /// Subscribers declared stalled (made no progress for `stall_timeout` with a full queue).
    pub stalls: Counter,
    /// Times a publisher was paused because a subscriber it feeds was full.
    pub pauses: Counter,
    /// Live connections with a session on this shard.
    pub live_sessions: Gauge,
    /// Offline (persistent) sessions kept on this shard.
    pub offline_sessions: Gauge,
    /// Subscriptions in this shard's local table.
    pub subscriptions: Gauge,
    /// Retained messages in this shard's replica of the retained store.
    pub retained: Gauge,
    /// Bytes the retained replica costs on this shard.
    pub retained_bytes: Gauge,
    /// Subscribers currently declared stalled.
    pub stalled_now: Gauge,
    /// Publishers currently paused by flow control.
    pub paused_now: Gauge,
    /// Accepted sockets on this shard (all phases).
    pub sockets: Gauge,
}

impl ShardCounters {
    #[inline]
    pub fn count_drop(&self, cause: DropCause) {
        self.drops[cause as usize].inc();
    }

    pub fn dropped(&self, cause: DropCause) -> u64 {
        self.drops[cause as usize].get()
    }

    /// All drops, whatever the reason.
    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().map(Counter::get).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_count_and_gauges_move_both_ways() {
        let c = ShardCounters::default();
        c.publishes_in.inc();
        c.publishes_in.add(2);
        c.count_drop(DropCause::Stalled);
        c.count_drop(DropCause::Stalled);
        c.count_drop(DropCause::SysTopic);
        c.paused_now.inc();
        c.paused_now.inc();
        c.paused_now.dec();
        assert_eq!(c.publishes_in.get(), 3);
        assert_eq!(c.dropped(DropCause::Stalled), 2);
        assert_eq!(c.dropped(DropCause::QueueFull), 0);
        assert_eq!(c.dropped_total(), 3);
        assert_eq!(c.paused_now.get(), 1);
        c.paused_now.dec();
        c.paused_now.dec(); // never below zero
        assert_eq!(c.paused_now.get(), 0);
        for (i, d) in DropCause::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i, "ALL is in discriminant order");
        }
    }
}
