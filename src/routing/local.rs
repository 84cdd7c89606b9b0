//! This shard's subscriber table: filter → local sessions with their options.
//!
//! Owns: `LocalSubscriptions` and the rule for when a shard's presence on a filter changes
//! (first local subscriber → `RouteDelta::Add`, last one gone → `RouteDelta::Remove`). Must
//! not touch: other shards' tables (they learn through the deltas), session state (sessions
//! keep their own list of filters and call `unsubscribe` for each when they end).

use crate::codec::{SubscriptionOptions, TopicFilter, TopicName};

use super::replica::{RouteDelta, RouteOp, ShardId};
use super::trie::{Match, SubscriptionTrie};
use super::{RoutingError, MAX_FILTER_LEVELS};

/// What a local subscriber asked for on one filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LocalSubscription {
    pub options: SubscriptionOptions,
    /// v5 subscription identifier, sent back on every matching PUBLISH [MQTT-3.3.4-3].
    pub subscription_id: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOutcome {
    /// The subscription this one replaced, if the session already had exactly this filter
    /// (v5 retain handling 1 sends retained messages only when this is `None`).
    pub replaced: Option<LocalSubscription>,
    /// Set when the filter got its first subscriber on this shard: apply locally and
    /// broadcast to every other shard.
    pub delta: Option<RouteDelta>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubscribeOutcome {
    /// The removed subscription; `None` if the session had no such filter (v5 UNSUBACK
    /// reason 0x11 "No subscription existed").
    pub removed: Option<LocalSubscription>,
    /// Set when the filter lost its last subscriber on this shard.
    pub delta: Option<RouteDelta>,
}

/// Filter → this shard's sessions `K` (e.g. a session slot id) with their options.
pub struct LocalSubscriptions<K> {
    shard: ShardId,
    trie: SubscriptionTrie<K, LocalSubscription>,
}

impl<K: Copy + Eq> LocalSubscriptions<K> {
    pub fn new(shard: ShardId) -> Self {
        LocalSubscriptions {
            shard,
            trie: SubscriptionTrie::new(),
        }
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// Number of (filter, session) subscriptions on this shard.
    pub fn len(&self) -> usize {
        self.trie.len()
    }

    pub fn is_empty(&self) -> bool {
        self.trie.is_empty()
    }

    pub fn node_count(&self) -> usize {
        self.trie.node_count()
    }

    /// Add or replace `session`'s subscription to `filter`. Refuses filters deeper than
    /// [`MAX_FILTER_LEVELS`] (answer SUBACK 0x8F / v3 0x80).
    pub fn subscribe(
        &mut self,
        filter: &TopicFilter,
        session: K,
        sub: LocalSubscription,
    ) -> Result<SubscribeOutcome, RoutingError> {
        let levels = filter.levels().count();
        if levels > MAX_FILTER_LEVELS {
            return Err(RoutingError::TooManyLevels { levels });
        }
        let was_empty = self.trie.subscribers(filter).is_empty();
        let replaced = self.trie.insert(filter, session, sub);
        let delta = (was_empty && replaced.is_none()).then(|| RouteDelta {
            filter: filter.clone(),
            shard: self.shard,
            op: RouteOp::Add,
        });
        Ok(SubscribeOutcome { replaced, delta })
    }

    /// Remove `session`'s subscription to exactly `filter`.
    pub fn unsubscribe(&mut self, filter: &TopicFilter, session: &K) -> UnsubscribeOutcome {
        let removed = self.trie.remove(filter, session);
        let delta =
            (removed.is_some() && self.trie.subscribers(filter).is_empty()).then(|| RouteDelta {
                filter: filter.clone(),
                shard: self.shard,
                op: RouteOp::Remove,
            });
        UnsubscribeOutcome { removed, delta }
    }

    /// Plain (non-shared) local subscriptions matching `topic`, appended to `out`. A session
    /// with overlapping filters appears once per filter; the caller decides whether to send
    /// one copy (max QoS, all subscription ids [MQTT-3.3.4-2]) or several.
    pub fn match_plain_into(&self, topic: &TopicName, out: &mut Vec<(K, LocalSubscription)>) {
        self.trie.match_plain_into(topic, out);
    }

    /// Every matching local subscription, shared ones tagged by group (single-shard use, or
    /// tests); see [`super::pick_one_per_group`].
    pub fn match_into(&self, topic: &TopicName, out: &mut Vec<Match<K, LocalSubscription>>) {
        self.trie.match_into(topic, out);
    }

    /// One local member of the share group `group_filter` (`$share/g/f`), chosen by
    /// `counter % members`; `None` if it has no member here (any more).
    pub fn pick_shared(
        &self,
        group_filter: &TopicFilter,
        counter: u64,
    ) -> Option<(K, LocalSubscription)> {
        let members = self.trie.subscribers(group_filter);
        if members.is_empty() {
            return None;
        }
        Some(members[(counter % members.len() as u64) as usize])
    }

    /// Everyone on this shard who gets a message that routing sent here: every matching
    /// plain subscription when `plain`, plus one member (by `counter`) of each group in
    /// `groups`. Appended to `out`; allocation-free when `out` has the capacity. A group that
    /// lost its last member here since the sender matched (the same window as any replicated
    /// table) is appended to `orphaned`, for the caller to hand to a shard that still has
    /// members: a message routed to a group must reach one of them. Returns how many of the
    /// appended entries are plain matches: they come first, the group picks after them.
    pub fn deliveries_into(
        &self,
        topic: &TopicName,
        plain: bool,
        groups: &[TopicFilter],
        counter: u64,
        out: &mut Vec<(K, LocalSubscription)>,
        orphaned: &mut smallvec::SmallVec<[TopicFilter; 1]>,
    ) -> usize {
        let before = out.len();
        if plain {
            self.trie.match_plain_into(topic, out);
        }
        let plain_matches = out.len() - before;
        for g in groups {
            match self.pick_shared(g, counter) {
                Some(m) => out.push(m),
                None => orphaned.push(g.clone()),
            }
        }
        plain_matches
    }

    /// The local subscribers of exactly `filter`.
    pub fn subscribers(&self, filter: &TopicFilter) -> &[(K, LocalSubscription)] {
        self.trie.subscribers(filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::QoS;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s.to_string()).unwrap()
    }
    fn t(s: &str) -> TopicName {
        TopicName::new(s.to_string()).unwrap()
    }
    fn sub(qos: QoS, id: Option<u32>) -> LocalSubscription {
        LocalSubscription {
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
            subscription_id: id,
        }
    }
    const SHARD: ShardId = match ShardId::new(3) {
        Some(s) => s,
        None => panic!(),
    };

    #[test]
    fn first_subscriber_emits_add_and_second_does_not() {
        let mut local = LocalSubscriptions::new(SHARD);
        let out = local
            .subscribe(&f("a/+"), 1u64, sub(QoS::AtLeastOnce, None))
            .unwrap();
        assert_eq!(out.replaced, None);
        assert_eq!(
            out.delta,
            Some(RouteDelta {
                filter: f("a/+"),
                shard: SHARD,
                op: RouteOp::Add
            })
        );
        let out = local
            .subscribe(&f("a/+"), 2, sub(QoS::AtMostOnce, None))
            .unwrap();
        assert_eq!(
            out,
            SubscribeOutcome {
                replaced: None,
                delta: None
            }
        );
    }

    #[test]
    fn replacing_options_emits_nothing_and_returns_old() {
        let mut local = LocalSubscriptions::new(SHARD);
        local
            .subscribe(&f("a/b"), 1u64, sub(QoS::AtMostOnce, None))
            .unwrap();
        let out = local
            .subscribe(&f("a/b"), 1, sub(QoS::ExactlyOnce, Some(7)))
            .unwrap();
        assert_eq!(out.replaced, Some(sub(QoS::AtMostOnce, None)));
        assert_eq!(out.delta, None);
        let mut m = Vec::new();
        local.match_plain_into(&t("a/b"), &mut m);
        assert_eq!(m, vec![(1, sub(QoS::ExactlyOnce, Some(7)))]);
    }

    #[test]
    fn last_unsubscribe_emits_remove() {
        let mut local = LocalSubscriptions::new(SHARD);
        local
            .subscribe(&f("a/#"), 1u64, sub(QoS::AtMostOnce, None))
            .unwrap();
        local
            .subscribe(&f("a/#"), 2, sub(QoS::AtMostOnce, None))
            .unwrap();
        let out = local.unsubscribe(&f("a/#"), &1);
        assert_eq!(out.removed, Some(sub(QoS::AtMostOnce, None)));
        assert_eq!(out.delta, None);
        // Unsubscribing something never subscribed: nothing removed, no delta.
        let out = local.unsubscribe(&f("a/#"), &1);
        assert_eq!(
            out,
            UnsubscribeOutcome {
                removed: None,
                delta: None
            }
        );
        let out = local.unsubscribe(&f("a/#"), &2);
        assert_eq!(
            out.delta,
            Some(RouteDelta {
                filter: f("a/#"),
                shard: SHARD,
                op: RouteOp::Remove
            })
        );
        assert!(local.is_empty());
        assert_eq!(local.node_count(), 0);
    }

    #[test]
    fn share_groups_are_routed_separately_from_plain() {
        let mut local = LocalSubscriptions::new(SHARD);
        let plain = local
            .subscribe(&f("j/+"), 1u64, sub(QoS::AtMostOnce, None))
            .unwrap();
        let g1 = local
            .subscribe(&f("$share/g/j/+"), 2, sub(QoS::AtMostOnce, None))
            .unwrap();
        let g2 = local
            .subscribe(&f("$share/g/j/+"), 3, sub(QoS::AtMostOnce, None))
            .unwrap();
        assert_eq!(plain.delta.map(|d| d.filter), Some(f("j/+")));
        assert_eq!(g1.delta.map(|d| d.filter), Some(f("$share/g/j/+")));
        assert_eq!(g2.delta, None);
        let mut m = Vec::new();
        local.match_plain_into(&t("j/1"), &mut m);
        assert_eq!(m.len(), 1);
        let picks: Vec<u64> = (0..4)
            .map(|c| local.pick_shared(&f("$share/g/j/+"), c).unwrap().0)
            .collect();
        assert_eq!(picks.iter().filter(|&&k| k == 2).count(), 2);
        assert_eq!(picks.iter().filter(|&&k| k == 3).count(), 2);
        assert_eq!(local.pick_shared(&f("$share/other/j/+"), 0), None);
    }

    #[test]
    fn absurdly_deep_filters_are_refused() {
        let mut local = LocalSubscriptions::new(SHARD);
        let ok = vec!["a"; MAX_FILTER_LEVELS].join("/");
        let deep = vec!["a"; MAX_FILTER_LEVELS + 1].join("/");
        assert!(local
            .subscribe(&f(&ok), 1u64, sub(QoS::AtMostOnce, None))
            .is_ok());
        assert_eq!(
            local.subscribe(&f(&deep), 1u64, sub(QoS::AtMostOnce, None)),
            Err(RoutingError::TooManyLevels {
                levels: MAX_FILTER_LEVELS + 1
            })
        );
        assert_eq!(local.len(), 1);
    }
}
