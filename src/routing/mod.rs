//! Routing: who gets a published message, on this shard and across shards. Sans-IO.
//!
//! Owns: the topic-filter trie ([`SubscriptionTrie`]), the cross-shard routing replica
//! ([`RoutingReplica`], [`RouteDelta`]), this shard's subscriber table
//! ([`LocalSubscriptions`]) and the retained store ([`RetainedStore`]). Must not touch:
//! glommio, rustls, sockets, mailboxes or session state; the shard runtime moves deltas,
//! forwards and retained broadcasts between shards and calls in here.
//!
//! Publish path as the runtime wires it (shard `me`, per-shard `counter` bumped per publish):
//! 1. `replica.match_shards(&msg.topic, &mut sm)`; nothing to do if `sm.is_empty()`;
//! 2. `mask = sm.choose(counter, &mut chosen)` picks one shard per share group;
//! 3. for each shard `d` in `shards_in(mask)`: `sm.work_for(d, &chosen, &mut groups)` gives
//!    `plain` and the groups `d` serves; for `d == me` call
//!    `local.deliveries_into(&topic, plain, &groups, counter, &mut out)` directly, otherwise
//!    send `Forward { message, plain, groups }` (payload `Bytes` shared, not copied) and the
//!    receiver makes the same `deliveries_into` call.
//!
//! SUBSCRIBE: `local.subscribe(..)`; a returned delta is applied to the local replica and
//! broadcast to all other shards; then `retained.match_filter(..)` (local replica).
//! Shard ids are bits of a `u64`: at most [`MAX_SHARDS`] (64) shards.

mod local;
#[cfg(test)]
mod proptests;
mod replica;
mod retained;
mod trie;

pub use local::{LocalSubscription, LocalSubscriptions, SubscribeOutcome, UnsubscribeOutcome};
pub use replica::{
    pick_shard, shards_in, Forward, RouteDelta, RouteOp, RoutingReplica, ShardId, ShardMatch,
    MAX_SHARDS,
};
pub use retained::{
    RefuseReason, RetainOutcome, RetainedLimits, RetainedStore, NODE_BYTES as RETAINED_NODE_BYTES,
};
pub use trie::{pick_one_per_group, Match, SubscriptionTrie};

use thiserror::Error;

/// Deepest topic filter (and retained topic) routing accepts, in levels. Every level costs a
/// trie node, so a 64 KiB filter of `/` would cost ~32k nodes; mosquitto refuses more than
/// 200 `/` for the same reason (TOPIC_HIERARCHY_LIMIT), which is 201 levels.
pub const MAX_FILTER_LEVELS: usize = 201;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RoutingError {
    #[error("topic filter has {levels} levels, more than the {MAX_FILTER_LEVELS} allowed")]
    TooManyLevels { levels: usize },
}
