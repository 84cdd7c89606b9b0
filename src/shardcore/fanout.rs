//! Fan-out: where a published message goes, on this shard and across shards.
//!
//! Owns: routing a publish (the retained update, one plan from the routing replica, local
//! delivery, one forward per remote shard), delivering to this shard's subscribers (one copy
//! per session with the highest granted QoS and all its subscription ids), the per-peer data
//! bound (QoS 0 dropped and counted, QoS 1/2 publishers paused), and route deltas.
//! Must not touch: matching rules (`crate::routing` plans: `match_shards`, `choose`,
//! `work_for`, `deliveries_into` — the functions its property tests cover), session rules
//! (the session decides what it sends, queues or drops), pausing decisions (`flow.rs`).

use std::time::Instant;

use smallvec::SmallVec;
use tracing::debug;

use super::msg::{Groups, PeerMsg};
use super::registry::{ConnKey, ShardId};
use super::ShardCore;
use crate::codec::{QoS, TopicFilter};
use crate::message::Message;
use crate::metrics::DropCause;
use crate::routing::{self, shards_in, Forward, LocalSubscription, RouteDelta, ShardMatch};
use crate::session::{DeliveryOutcome, DropReason, SessionEvent};

/// Buffers reused across publishes, so the message path allocates nothing of its own.
#[derive(Default)]
pub(crate) struct Scratch {
    pub events: Vec<SessionEvent>,
    pub matches: Vec<(ConnKey, LocalSubscription)>,
    pub plan: ShardMatch,
    pub chosen: Vec<(TopicFilter, routing::ShardId)>,
    pub orphaned: Groups,
    pub retained_buf: Vec<Message>,
}

impl ShardCore {
    fn routing_id(&self) -> routing::ShardId {
        self.local.shard()
    }

    /// Route a message from `publisher` (0: no client connection, e.g. a will or `$SYS`).
    pub(super) fn route(&mut self, msg: Message, publisher: ConnKey, now: Instant) {
        self.counters.publishes_in.inc();
        if msg.payload.len() > self.cfg.message_size_limit {
            // mosquitto's message_size_limit: acknowledged, not delivered.
            self.counters.count_drop(DropCause::OverSizeLimit);
            return;
        }
        let msg = self.record_msg(msg, publisher, now);
        if msg.retain {
            self.set_retained(&msg);
        }
        self.pub_counter = self.pub_counter.wrapping_add(1);
        let counter = self.pub_counter;
        let mut plan = std::mem::take(&mut self.scratch.plan);
        let mut chosen = std::mem::take(&mut self.scratch.chosen);
        plan.clear();
        chosen.clear();
        self.replica.match_shards(&msg.topic, &mut plan);
        if !plan.is_empty() {
            let mask = plan.choose(counter, &mut chosen);
            let me = self.routing_id();
            let mut mine: Groups = SmallVec::new();
            let mut local = false;
            for dest in shards_in(mask) {
                let mut groups: Groups = SmallVec::new();
                if !plan.work_for(dest, &chosen, &mut groups) {
                    continue;
                }
                let plain = plan.plain & dest.bit() != 0;
                if dest == me {
                    local = plain;
                    mine = groups;
                    continue;
                }
                let fwd = Forward {
                    message: msg.clone(),
                    plain,
                    groups,
                };
                self.send_forward(dest.index(), fwd, publisher);
            }
            if mask & me.bit() != 0 {
                self.deliver_local(self.id, &msg, local, &mine, publisher, now);
            }
        }
        self.scratch.plan = plan;
        self.scratch.chosen = chosen;
    }

    /// Store (or delete) a retained message here and on every shard.
    fn set_retained(&mut self, msg: &Message) {
        // The store keeps it indefinitely: its own allocation, shared by every replica.
        let kept = msg.detached();
        self.retained.set(kept.clone());
        self.refresh_retained_gauges();
        let seq = self.settle.next_seq();
        for peer in 0..self.cfg.shards {
            if peer != self.id {
                let msg = kept.clone();
                self.send(peer, PeerMsg::Retain { msg, seq });
            }
        }
    }

    /// Queue a forward for `to`, applying the per-peer data bound.
    ///
    /// QoS 1/2 forwards always join the peer's queue, in order (the takeover protocol and
    /// per-publisher order rely on one FIFO per peer: a forward set aside would be overtaken by
    /// later control messages). Past the bound, the publisher pays instead: its
    /// acknowledgements and further publishes wait until the queue drains below the bound.
    /// Forwards without a client (a will, a re-route) just join: those are few.
    fn send_forward(&mut self, to: ShardId, fwd: Forward, publisher: ConnKey) {
        self.counters.forwards_out.inc();
        let qos0 = fwd.message.qos == QoS::AtMostOnce;
        let full = self.out[to].len() >= self.cfg.peer_data_cap;
        if qos0 && full {
            self.counters.count_drop(DropCause::Qos0PeerFull);
            return;
        }
        self.queue_forward(to, PeerMsg::Forward { fwd, publisher });
        if qos0 || !full {
            return;
        }
        if let Some(l) = self.conns.get_mut(&publisher) {
            let was_paused = l.paused();
            if l.held_on == 0 {
                self.held_pubs.push_back(publisher);
            }
            l.held_on |= 1u64 << to;
            if !was_paused {
                self.counters.paused_now.inc();
            }
        }
    }

    /// Peer queues drained: publishers waiting on them get their acknowledgements released and
    /// resume once every queue they filled is below the bound again.
    pub(super) fn release_held(&mut self, _now: Instant) {
        let cap = self.cfg.peer_data_cap;
        let mut n = self.held_pubs.len();
        while n > 0 {
            n -= 1;
            let Some(p) = self.held_pubs.pop_front() else {
                break;
            };
            let Some(l) = self.conns.get_mut(&p) else {
                continue;
            };
            let mut m = l.held_on;
            while m != 0 {
                let to = m.trailing_zeros() as usize;
                m &= m - 1;
                if self.out[to].len() < cap {
                    l.held_on &= !(1u64 << to);
                }
            }
            if l.held_on == 0 {
                if !l.paused() {
                    self.counters.paused_now.dec();
                    self.resumable.push(p);
                }
                // Its gated acknowledgements may go now.
                self.mark_dirty(p);
            } else {
                self.held_pubs.push_back(p);
            }
        }
    }

    /// Deliver to this shard's subscribers as routing planned: every matching plain
    /// subscription if `plain`, one member of each group in `groups`. Plain matches give each
    /// session one copy, at the highest QoS its matching subscriptions granted, with all their
    /// subscription identifiers [MQTT-3.3.4-2/3]; each group pick is a delivery of its own
    /// (a shared subscription is its own stream, as in mosquitto).
    pub(super) fn deliver_local(
        &mut self,
        from: ShardId,
        msg: &Message,
        plain: bool,
        groups: &[TopicFilter],
        publisher: ConnKey,
        now: Instant,
    ) {
        let mut buf = std::mem::take(&mut self.scratch.matches);
        let mut orphaned = std::mem::take(&mut self.scratch.orphaned);
        buf.clear();
        orphaned.clear();
        let n_plain = self.local.deliveries_into(
            &msg.topic,
            plain,
            groups,
            self.pub_counter,
            &mut buf,
            &mut orphaned,
        );
        for g in orphaned.drain(..) {
            self.reroute_group(msg, g, publisher);
        }
        if n_plain > 1 {
            buf[..n_plain].sort_unstable_by_key(|(k, _)| *k);
        }
        // Split once, on the first subscriber that needs a read check.
        let mut levels = None;
        let mut i = 0;
        while i < n_plain {
            let key = buf[i].0;
            let mut opts = buf[i].1.options;
            let mut ids: SmallVec<[u32; 2]> = SmallVec::new();
            let mut j = i;
            while j < n_plain && buf[j].0 == key {
                let s = &buf[j].1;
                if s.options.qos > opts.qos {
                    opts.qos = s.options.qos;
                }
                // A copy is withheld for no-local only if every matching subscription says so.
                opts.no_local &= s.options.no_local;
                opts.retain_as_published |= s.options.retain_as_published;
                if let Some(id) = s.subscription_id {
                    ids.push(id);
                }
                j += 1;
            }
            i = j;
            self.deliver_to(
                key,
                from,
                msg,
                opts,
                ids,
                false,
                publisher,
                &mut levels,
                now,
            );
        }
        for &(key, s) in &buf[n_plain..] {
            let ids: SmallVec<[u32; 2]> = s.subscription_id.into_iter().collect();
            self.deliver_to(
                key,
                from,
                msg,
                s.options,
                ids,
                true,
                publisher,
                &mut levels,
                now,
            );
        }
        buf.clear();
        self.scratch.matches = buf;
        self.scratch.orphaned = orphaned;
    }

    /// Offer one message to the session of `key` (or to what stands for it while it moves).
    /// `via_group`: this shard was chosen to serve a share group (no other shard got it).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn deliver_to<'m>(
        &mut self,
        key: ConnKey,
        from: ShardId,
        msg: &'m Message,
        opts: crate::codec::SubscriptionOptions,
        ids: SmallVec<[u32; 2]>,
        via_group: bool,
        publisher: ConnKey,
        levels: &mut Option<crate::auth::TopicLevels<'m>>,
        now: Instant,
    ) {
        if let Some(sw) = self.switching.get_mut(&key) {
            // Plain matches from a shard that has not switched yet reach the old host too,
            // which parks them for the session.
            if !via_group && sw.acked & (1u64 << from) == 0 {
                return;
            }
            if !sw.park_done {
                sw.buffer.push((msg.clone(), opts, ids));
                return;
            }
        }
        let Some(e) = self.sessions.get_mut(&key) else {
            self.park_message(key, from, msg, opts, ids, via_group);
            return;
        };
        // The read check (mosquitto's src/subs.c): a denied subscriber is skipped, nothing
        // queued. A share-group pick that is denied is not given to another member (as
        // mosquitto, which picks the member before checking).
        if !Self::may_read(&self.views, &self.counters, e.authz.as_deref(), msg, levels) {
            return;
        }
        if msg.qos.min(opts.qos) == QoS::AtMostOnce
            && e.session.pending_transmit() >= self.cfg.max_pending_transmit
        {
            self.counters.count_drop(DropCause::Qos0Slow);
            return;
        }
        let live = e.live;
        let stalled = e.flow.as_ref().is_some_and(|f| f.stalled);
        match e.session.deliver(msg, opts, &ids, now) {
            DeliveryOutcome::Sent => {
                self.counters.deliveries.inc();
                self.mark_dirty(key);
            }
            DeliveryOutcome::Queued => {
                self.counters.deliveries.inc();
                if live && e.session.queue_congested() {
                    self.congested(key, publisher, now);
                }
            }
            DeliveryOutcome::Dropped(r) => match r {
                DropReason::QueueFull if stalled => self.counters.count_drop(DropCause::Stalled),
                DropReason::QueueFull => {
                    self.counters.count_drop(DropCause::QueueFull);
                    if live {
                        debug!(shard = self.id, "live queue at its hard limit: dropped");
                    }
                }
                DropReason::PacketTooLarge => self.counters.count_drop(DropCause::TooLarge),
                DropReason::Expired => self.counters.count_drop(DropCause::Expired),
                DropReason::NoLocal | DropReason::Offline => {}
            },
        }
        self.drain_notes(key, now);
    }

    /// The sender chose this shard for `group`, but its last local member has just left (our
    /// route removal was still in flight): hand the message to a shard that still has
    /// members, per our replica, instead of losing it.
    fn reroute_group(&mut self, msg: &Message, group: TopicFilter, publisher: ConnKey) {
        let mut plan = std::mem::take(&mut self.scratch.plan);
        plan.clear();
        self.replica.match_shards(&msg.topic, &mut plan);
        let shards = plan
            .groups
            .iter()
            .filter(|(f, _)| *f == group)
            .fold(0, |m, (_, s)| m | s)
            & !self.routing_id().bit();
        self.scratch.plan = plan;
        let Some(to) = routing::pick_shard(shards, self.pub_counter) else {
            debug!(shard = self.id, %group, "share group has no members left: not delivered");
            return;
        };
        let fwd = Forward {
            message: msg.clone(),
            plain: false,
            groups: smallvec::smallvec![group],
        };
        // The publisher's acknowledgement may already be out: never held, never dropped.
        let _ = publisher;
        self.counters.forwards_out.inc();
        self.queue_forward(to.index(), PeerMsg::Forward { fwd, publisher: 0 });
    }

    /// Queue a forward for `to`. A QoS 2 message leaves only once this shard's log holds its
    /// record (and everything recorded before it): otherwise a crash could lose the record
    /// after a subscriber on `to` got the message, and the publisher, never having had its
    /// PUBREC, would send it again: a second delivery (see `outq.rs`).
    fn queue_forward(&mut self, to: ShardId, m: PeerMsg) {
        let needs = match &m {
            PeerMsg::Forward { fwd, .. } => {
                fwd.message.qos == QoS::ExactlyOnce
                    && fwd.message.sid != 0
                    && crate::store::record::sid_origin(fwd.message.sid) == self.id
            }
            _ => false,
        };
        if needs {
            self.send_after_durable(to, m);
        } else {
            self.out[to].push_back(m);
        }
    }

    /// Apply a route delta here and broadcast it to every other shard.
    pub(super) fn broadcast_delta(&mut self, delta: RouteDelta) {
        self.replica.apply(&delta);
        let seq = self.settle.next_seq();
        for peer in 0..self.cfg.shards {
            if peer != self.id {
                let delta = delta.clone();
                self.send(peer, PeerMsg::Route { delta, seq });
            }
        }
    }

    /// Remove `key`'s subscriptions to `filters` from this shard's table, broadcasting the
    /// route deltas that causes.
    pub(super) fn drop_routes(&mut self, key: ConnKey, filters: &[TopicFilter]) {
        for filter in filters {
            if let Some(d) = self.local.unsubscribe(filter, &key).delta {
                self.broadcast_delta(d);
            }
        }
        self.counters.subscriptions.set(self.local.len() as u64);
    }
}
