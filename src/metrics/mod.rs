//! Per-shard counters and gauges, written by one shard and read by anyone.
//!
//! Owns: [`ShardCounters`], the figures one shard keeps about itself (messages and bytes by
//! QoS, drops by reason, connections and refusals by reason, sessions, takeovers, flow
//! control), [`Counter`]/[`Gauge`]/[`Histogram`], the single-writer cells they are made of,
//! and the Prometheus/OpenMetrics text format with the table of every exported metric
//! ([`expose`]). Must not touch: what the figures mean for routing or sessions (the shard core
//! decides when to count), where they are served from (`crate::shard::exporter`, `$SYS`): readers
//! only load.
//!
//! Persistence (issue 11): each shard that owns a log also keeps its store figures here —
//! fdatasync latency ([`FsyncHistogram`], buckets from 50 µs to 1 s), bytes written, failed
//! writes, whether writes are failing now, the backlog of records not yet durable, and the
//! connections whose input was held (or closed) because that backlog reached its bound.
//! Written by the shard's log writer (`crate::shard::store_io`) and its core; with
//! persistence off they stay 0 and the histogram stays empty.
//!
//! Why single-writer relaxed atomics: the counters sit on the message path, so they must cost
//! what a plain `u64` costs. Only the owning shard writes a cell, so an increment is a relaxed
//! load and store (no locked read-modify-write, no contention); readers on other threads see
//! each value whole, possibly a moment old. Nothing here is ever used for synchronisation.

pub mod expose;

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
    /// PUBLISH packets received from clients, by QoS, and their payload bytes.
    received: [Counter; 3],
    received_bytes: [Counter; 3],
    /// PUBLISH packets sent to clients, by QoS, and their payload bytes.
    sent: [Counter; 3],
    sent_bytes: [Counter; 3],
    refused: [Counter; RefuseCause::ALL.len()],
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
    /// Bytes of records written to this shard's log (what a successful write carried).
    pub store_written_bytes: Counter,
    /// Writes or syncs of this shard's log that failed (each retry counts).
    pub store_write_errors: Counter,
    /// 1 while this shard's log writes fail (acknowledgements that need them are held).
    pub store_failing: Gauge,
    /// Bytes of records made and not yet confirmed durable.
    pub store_backlog_bytes: Gauge,
    /// Times a connection's input was held because the backlog reached its bound.
    pub store_held_inputs: Counter,
    /// Connections closed because their input was held for the backlog longer than the
    /// persistence timeout.
    pub store_held_closes: Counter,
    /// Latency of each fdatasync of this shard's log.
    pub store_fsync: FsyncHistogram,
}

/// The fdatasync latency histogram of one shard's log ([`FSYNC_BUCKETS_NS`]).
#[derive(Debug)]
pub struct FsyncHistogram(pub Histogram<14>);

impl Default for FsyncHistogram {
    fn default() -> Self {
        FsyncHistogram(Histogram::new(&FSYNC_BUCKETS_NS))
    }
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

    /// A PUBLISH of QoS `qos` (0..=2) with `bytes` of payload arrived from a client.
    #[inline]
    pub fn count_received(&self, qos: u8, bytes: usize) {
        let q = usize::from(qos.min(2));
        self.received[q].inc();
        self.received_bytes[q].add(bytes as u64);
    }

    /// A PUBLISH of QoS `qos` (0..=2) with `bytes` of payload left for a client.
    #[inline]
    pub fn count_sent(&self, qos: u8, bytes: usize) {
        let q = usize::from(qos.min(2));
        self.sent[q].inc();
        self.sent_bytes[q].add(bytes as u64);
    }

    /// (messages, payload bytes) received at QoS `qos`.
    pub fn received(&self, qos: u8) -> (u64, u64) {
        let q = usize::from(qos.min(2));
        (self.received[q].get(), self.received_bytes[q].get())
    }

    /// (messages, payload bytes) sent at QoS `qos`.
    pub fn sent(&self, qos: u8) -> (u64, u64) {
        let q = usize::from(qos.min(2));
        (self.sent[q].get(), self.sent_bytes[q].get())
    }

    #[inline]
    pub fn count_refusal(&self, cause: RefuseCause) {
        self.refused[cause as usize].inc();
    }

    pub fn refused(&self, cause: RefuseCause) -> u64 {
        self.refused[cause as usize].get()
    }
}

/// Why a connection was refused before it had a session (TLS handshake failures are counted
/// apart, by the TLS layer, with their own reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseCause {
    /// The listener's `max_connections` was reached: closed at accept.
    MaxConnections,
    /// No complete CONNECT within the connect timeout.
    ConnectTimeout,
    /// The first packet was not a well-formed CONNECT (or the peer closed before sending one).
    BadConnect,
    /// CONNACK 0x84 / 1: unsupported protocol version.
    ProtocolVersion,
    /// CONNACK 0x85 / 2: client identifier not valid.
    ClientIdNotValid,
    /// CONNACK 0x86 / 4: bad username or password (or no usable certificate identity).
    BadCredentials,
    /// CONNACK 0x87 / 5: not authorized (e.g. anonymous on a listener that forbids it).
    NotAuthorized,
    /// CONNACK 0x88 / 3: a peer shard is overloaded or did not answer in time.
    ServerUnavailable,
    /// CONNACK 0x8B: the broker is shutting down.
    ShuttingDown,
    /// CONNACK 0x97 / 3: a persistent session's CONNECT while the store's backlog is at its
    /// bound (the disk is failing or far behind).
    StoreFull,
    /// Any other CONNACK refusal (CONNECT outside the configured limits, ...).
    Other,
}

impl RefuseCause {
    pub const ALL: [RefuseCause; 11] = [
        RefuseCause::MaxConnections,
        RefuseCause::ConnectTimeout,
        RefuseCause::BadConnect,
        RefuseCause::ProtocolVersion,
        RefuseCause::ClientIdNotValid,
        RefuseCause::BadCredentials,
        RefuseCause::NotAuthorized,
        RefuseCause::ServerUnavailable,
        RefuseCause::ShuttingDown,
        RefuseCause::StoreFull,
        RefuseCause::Other,
    ];

    /// A stable lowercase name, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseCause::MaxConnections => "max_connections",
            RefuseCause::ConnectTimeout => "connect_timeout",
            RefuseCause::BadConnect => "bad_connect",
            RefuseCause::ProtocolVersion => "protocol_version",
            RefuseCause::ClientIdNotValid => "client_id_not_valid",
            RefuseCause::BadCredentials => "bad_credentials",
            RefuseCause::NotAuthorized => "not_authorized",
            RefuseCause::ServerUnavailable => "server_unavailable",
            RefuseCause::ShuttingDown => "shutting_down",
            RefuseCause::StoreFull => "store_full",
            RefuseCause::Other => "other",
        }
    }

    /// The cause of a CONNACK refusal with MQTT v5 reason `code` (3.1.1 return codes are
    /// mapped from these by the codec).
    pub fn of_connack(code: u8) -> RefuseCause {
        match code {
            0x84 => RefuseCause::ProtocolVersion,
            0x85 => RefuseCause::ClientIdNotValid,
            0x86 => RefuseCause::BadCredentials,
            0x87 => RefuseCause::NotAuthorized,
            0x88 => RefuseCause::ServerUnavailable,
            0x8B => RefuseCause::ShuttingDown,
            _ => RefuseCause::Other,
        }
    }
}

/// A fixed-bucket histogram of durations, written only by its owning shard (each cell is a
/// [`Counter`]: no locked read-modify-write). `BOUNDS` are the buckets' upper bounds in
/// nanoseconds, ascending; one more cell counts everything above the last bound.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds_ns: &'static [u64; N],
    buckets: [Counter; N],
    above: Counter,
    sum_ns: Counter,
}

/// A copy of a [`Histogram`]: per-bucket (not cumulative) counts, the count above the last
/// bound, and the sum of every observation in nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub bounds_ns: &'static [u64],
    pub buckets: Vec<u64>,
    pub above: u64,
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum::<u64>() + self.above
    }

    /// Add `other` (same bounds) into this one: several shards' histograms make one family.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.above += other.above;
        self.sum_ns += other.sum_ns;
    }
}

impl<const N: usize> Histogram<N> {
    pub fn new(bounds_ns: &'static [u64; N]) -> Self {
        Histogram {
            bounds_ns,
            buckets: std::array::from_fn(|_| Counter::default()),
            above: Counter::default(),
            sum_ns: Counter::default(),
        }
    }

    /// Record one observation of `ns` nanoseconds. Only the owning shard may call this.
    #[inline]
    pub fn observe_ns(&self, ns: u64) {
        match self.bounds_ns.iter().position(|&b| ns <= b) {
            Some(i) => self.buckets[i].inc(),
            None => self.above.inc(),
        }
        self.sum_ns.add(ns);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds_ns: self.bounds_ns,
            buckets: self.buckets.iter().map(Counter::get).collect(),
            above: self.above.get(),
            sum_ns: self.sum_ns.get(),
        }
    }
}

/// Buckets of the TLS handshake-time histogram: 0.5 ms to 10 s (a full ECDSA handshake costs
/// ~0.3 ms of CPU; a loaded shard or a slow link stretches it by orders of magnitude).
pub const HANDSHAKE_BUCKETS_NS: [u64; 13] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

/// Buckets of the fdatasync histogram: 50 µs (a write-back cache or NVMe with power-loss
/// protection) to 1 s (a disk in trouble); a healthy SSD lands between 0.1 and 5 ms.
pub const FSYNC_BUCKETS_NS: [u64; 14] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

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
        for (i, d) in RefuseCause::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i, "ALL is in discriminant order");
        }
    }

    #[test]
    fn messages_and_bytes_count_by_qos_and_refusals_by_cause() {
        let c = ShardCounters::default();
        c.count_received(1, 10);
        c.count_received(1, 5);
        c.count_received(7, 1); // out of range: counted as QoS 2, never a panic
        c.count_sent(0, 3);
        assert_eq!(c.received(1), (2, 15));
        assert_eq!(c.received(2), (1, 1));
        assert_eq!(c.received(0), (0, 0));
        assert_eq!(c.sent(0), (1, 3));
        c.count_refusal(RefuseCause::of_connack(0x87));
        c.count_refusal(RefuseCause::of_connack(0x99));
        assert_eq!(c.refused(RefuseCause::NotAuthorized), 1);
        assert_eq!(c.refused(RefuseCause::Other), 1);
    }

    #[test]
    fn histogram_buckets_are_upper_bounds_inclusive() {
        static B: [u64; 3] = [10, 100, 1000];
        let h = Histogram::new(&B);
        for ns in [0, 10, 11, 100, 1000, 1001, 5000] {
            h.observe_ns(ns);
        }
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![2, 2, 1]);
        assert_eq!(s.above, 2);
        assert_eq!(s.count(), 7);
        assert_eq!(s.sum_ns, 10 + 11 + 100 + 1000 + 1001 + 5000);
        let mut m = s.clone();
        m.merge(&s);
        assert_eq!(m.count(), 14);
        assert_eq!(m.sum_ns, 2 * s.sum_ns);
    }
}
