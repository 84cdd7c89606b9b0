//! Property tests: every routing structure against the naive reference matcher
//! `TopicFilter::matches` (or a plain scan), over a small alphabet of levels so that
//! collisions, empty levels, `$` topics, wildcards and share groups all occur often.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::codec::{QoS, TopicFilter, TopicName};
use crate::message::Message;

fn topic_level() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("a"), Just("b"), Just(""), Just("$SYS"), Just("$x")]
}

fn topic() -> impl Strategy<Value = TopicName> {
    prop::collection::vec(topic_level(), 1..5)
        .prop_filter_map("non-empty", |l| TopicName::new(l.join("/")).ok())
}

fn filter() -> impl Strategy<Value = TopicFilter> {
    let level = prop_oneof![Just("a"), Just("b"), Just(""), Just("$SYS"), Just("+")];
    (
        prop::collection::vec(level, 0..4),
        any::<bool>(),
        prop_oneof![Just(None), Just(Some("g1")), Just(Some("g2"))],
    )
        .prop_filter_map("valid filter", |(mut levels, hash, group)| {
            if hash || levels.is_empty() {
                levels.push("#");
            }
            let f = levels.join("/");
            let s = match group {
                Some(g) => format!("$share/{g}/{f}"),
                None => f,
            };
            TopicFilter::new(s).ok()
        })
}

/// A filter/topic pair strategy whose first level is one of 20 numbers, so trie nodes get
/// more children than the linear-search threshold and switch to a map.
fn wide_filter() -> impl Strategy<Value = TopicFilter> {
    (0u8..20, filter()).prop_filter_map("valid", |(n, f)| {
        if f.is_shared() {
            return None;
        }
        TopicFilter::new(format!("{n}/{}", f.as_str())).ok()
    })
}

fn wide_topic() -> impl Strategy<Value = TopicName> {
    (0u8..20, topic()).prop_map(|(n, t)| TopicName::new(format!("{n}/{t}")).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Wide nodes (map-backed children) match like narrow ones, and prune back to nothing.
    #[test]
    fn wide_trie_matches_naive(
        ops in prop::collection::vec((wide_filter(), 0u64..2, any::<bool>()), 1..120),
        topics in prop::collection::vec(wide_topic(), 1..20),
    ) {
        let mut trie = SubscriptionTrie::new();
        let mut model: HashMap<(TopicFilter, u64), u32> = HashMap::new();
        for (i, (f, key, insert)) in ops.iter().enumerate() {
            if *insert {
                prop_assert_eq!(trie.insert(f, *key, i as u32), model.insert((f.clone(), *key), i as u32));
            } else {
                prop_assert_eq!(trie.remove(f, key), model.remove(&(f.clone(), *key)));
            }
        }
        let mut out = Vec::new();
        for t in &topics {
            out.clear();
            trie.match_plain_into(t, &mut out);
            let mut got: Vec<u32> = out.iter().map(|(_, v)| *v).collect();
            got.sort_unstable();
            let mut want: Vec<u32> =
                model.iter().filter(|((f, _), _)| f.matches(t)).map(|(_, v)| *v).collect();
            want.sort_unstable();
            prop_assert_eq!(got, want, "topic {}", t);
        }
        for (f, key) in model.keys() {
            prop_assert!(trie.remove(f, key).is_some());
        }
        prop_assert_eq!(trie.node_count(), 0);
    }

    /// The trie's matches are exactly the naive matcher's, shared groups are tagged
    /// consistently, and removing everything leaves no node behind.
    #[test]
    fn trie_matches_naive(
        ops in prop::collection::vec((filter(), 0u64..4, any::<bool>()), 1..60),
        topics in prop::collection::vec(topic(), 1..20),
    ) {
        let mut trie = SubscriptionTrie::new();
        let mut model: HashMap<(TopicFilter, u64), u32> = HashMap::new();
        for (i, (f, key, insert)) in ops.iter().enumerate() {
            let i = i as u32;
            if *insert {
                prop_assert_eq!(trie.insert(f, *key, i), model.insert((f.clone(), *key), i));
            } else {
                prop_assert_eq!(trie.remove(f, key), model.remove(&(f.clone(), *key)));
            }
            prop_assert_eq!(trie.len(), model.len());
        }
        let by_value: HashMap<u32, &TopicFilter> =
            model.iter().map(|((f, _), v)| (*v, f)).collect();
        let mut out = Vec::new();
        for t in &topics {
            out.clear();
            trie.match_into(t, &mut out);
            let mut got: Vec<(u64, u32, bool)> =
                out.iter().map(|m| (m.key, m.value, m.group.is_some())).collect();
            got.sort_unstable();
            let mut want: Vec<(u64, u32, bool)> = model
                .iter()
                .filter(|((f, _), _)| f.matches(t))
                .map(|((f, k), v)| (*k, *v, f.is_shared()))
                .collect();
            want.sort_unstable();
            prop_assert_eq!(&got, &want, "topic {}", t);

            // A tag names exactly one `$share/g/f`, and members of a group are contiguous.
            let mut tag_filter: BTreeMap<u32, &TopicFilter> = BTreeMap::new();
            let mut closed = BTreeSet::new();
            let mut last_tag = None;
            for m in &out {
                if m.group != last_tag {
                    if let Some(prev) = last_tag {
                        closed.insert(prev);
                    }
                }
                if let Some(tag) = m.group {
                    prop_assert!(!closed.contains(&tag), "group {} not contiguous", tag);
                    let f = by_value[&m.value];
                    prop_assert_eq!(*tag_filter.entry(tag).or_insert(f), f);
                }
                last_tag = m.group;
            }
            let distinct: BTreeSet<&TopicFilter> = tag_filter.values().copied().collect();
            prop_assert_eq!(distinct.len(), tag_filter.len());

            // Picking keeps all plain matches and one member per group.
            let plain = out.iter().filter(|m| m.group.is_none()).count();
            pick_one_per_group(&mut out, 7);
            prop_assert_eq!(out.len(), plain + tag_filter.len());
            let picked: BTreeSet<u32> = out.iter().filter_map(|m| m.group).collect();
            prop_assert_eq!(picked.len(), tag_filter.len());
        }
        for (f, key) in model.keys() {
            prop_assert!(trie.remove(f, key).is_some());
        }
        prop_assert!(trie.is_empty());
        prop_assert_eq!(trie.node_count(), 0);
    }

    /// Deltas emitted by a local table, applied to a replica, leave exactly the filters
    /// with at least one local subscriber; and the replica's shard match equals a naive scan.
    #[test]
    fn local_deltas_keep_replica_exact(
        ops in prop::collection::vec((filter(), 0u64..3, 0usize..3, any::<bool>()), 1..60),
        topics in prop::collection::vec(topic(), 1..20),
    ) {
        let shards: Vec<ShardId> = (0..3).map(|i| ShardId::new(i).unwrap()).collect();
        let mut locals: Vec<LocalSubscriptions<u64>> =
            shards.iter().map(|&s| LocalSubscriptions::new(s)).collect();
        let mut replica = RoutingReplica::new();
        // (filter, shard) -> sessions subscribed there
        let mut model: HashMap<(TopicFilter, usize), BTreeSet<u64>> = HashMap::new();
        for (f, session, shard, subscribe) in &ops {
            let delta = if *subscribe {
                let out = locals[*shard]
                    .subscribe(f, *session, LocalSubscription::default())
                    .unwrap();
                model.entry((f.clone(), *shard)).or_default().insert(*session);
                out.delta
            } else {
                let out = locals[*shard].unsubscribe(f, session);
                if let Some(set) = model.get_mut(&(f.clone(), *shard)) {
                    set.remove(session);
                    if set.is_empty() {
                        model.remove(&(f.clone(), *shard));
                    }
                }
                out.delta
            };
            if let Some(d) = delta {
                prop_assert!(replica.apply(&d), "every emitted delta changes the replica");
                // Re-applying is harmless.
                prop_assert!(!replica.apply(&d));
            }
            prop_assert_eq!(replica.len(), model.len());
        }
        let mut m = ShardMatch::default();
        for t in &topics {
            replica.match_shards(t, &mut m);
            let mut want_plain = 0u64;
            let mut want_groups: BTreeMap<String, u64> = BTreeMap::new();
            for (f, shard) in model.keys() {
                if f.matches(t) {
                    if f.is_shared() {
                        *want_groups.entry(f.to_string()).or_default() |= shards[*shard].bit();
                    } else {
                        want_plain |= shards[*shard].bit();
                    }
                }
            }
            prop_assert_eq!(m.plain, want_plain);
            let got_groups: BTreeMap<String, u64> =
                m.groups.iter().map(|(f, mask)| (f.to_string(), *mask)).collect();
            prop_assert_eq!(got_groups.len(), m.groups.len(), "one entry per group");
            prop_assert_eq!(got_groups, want_groups);
        }
        for ((f, shard), sessions) in &model {
            for s in sessions {
                if let Some(d) = locals[*shard].unsubscribe(f, s).delta {
                    replica.apply(&d);
                }
            }
        }
        prop_assert!(replica.is_empty());
        prop_assert_eq!(replica.node_count(), 0);
        for l in &locals {
            prop_assert!(l.is_empty());
            prop_assert_eq!(l.node_count(), 0);
        }
    }

    /// The retained store answers a filter exactly as a scan of all topics would.
    #[test]
    fn retained_matches_scan(
        ops in prop::collection::vec((topic(), 0usize..3), 1..60),
        filters in prop::collection::vec(filter(), 1..20),
    ) {
        let mut store = RetainedStore::default();
        let mut model: BTreeMap<String, usize> = BTreeMap::new();
        for (t, len) in &ops {
            let payload = Bytes::from(vec![b'x'; *len]);
            store.set(Message {
                topic: t.clone(),
                payload,
                qos: QoS::AtMostOnce,
                retain: true,
                properties: None,
                expires_at: None,
                origin: "p".into(),
                sid: 0,
            });
            if *len == 0 {
                model.remove(t.as_str());
            } else {
                model.insert(t.to_string(), t.len() + len);
            }
        }
        prop_assert_eq!(store.len(), model.len());
        prop_assert_eq!(
            store.bytes(),
            model.values().sum::<usize>()
                + store.node_count() * crate::routing::RETAINED_NODE_BYTES
        );
        let now = Instant::now();
        let mut out = Vec::new();
        for f in &filters {
            out.clear();
            store.match_filter(f, now, &mut out);
            let mut got: Vec<String> = out.iter().map(|m| m.topic.to_string()).collect();
            got.sort();
            let want: Vec<String> = if f.is_shared() {
                Vec::new()
            } else {
                model
                    .keys()
                    .filter(|t| f.matches(&TopicName::new(t.to_string()).unwrap()))
                    .cloned()
                    .collect()
            };
            prop_assert_eq!(got, want, "filter {}", f);
        }
        for t in model.keys() {
            store.set(Message {
                topic: TopicName::new(t.to_string()).unwrap(),
                payload: Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: None,
                expires_at: None,
                origin: "p".into(),
                sid: 0,
            });
        }
        prop_assert!(store.is_empty());
        prop_assert_eq!(store.node_count(), 0);
    }

    /// End to end across three shards: subscriptions on any shard, deltas broadcast to all
    /// replicas, publishes from any shard fanned out with `choose`/`work_for`/
    /// `deliveries_into`. Every matching plain subscription gets exactly one copy and every
    /// matching share group exactly one member, whichever shard published.
    #[test]
    fn cross_shard_fanout_delivers_exactly_once(
        subs in prop::collection::vec((filter(), 0u64..4, 0usize..3), 1..40),
        publishes in prop::collection::vec((topic(), 0usize..3), 1..20),
    ) {
        const N: usize = 3;
        let ids: Vec<ShardId> = (0..N).map(|i| ShardId::new(i).unwrap()).collect();
        let mut locals: Vec<LocalSubscriptions<u64>> =
            ids.iter().map(|&s| LocalSubscriptions::new(s)).collect();
        let mut replicas: Vec<RoutingReplica> = (0..N).map(|_| RoutingReplica::new()).collect();
        // (filter, session) -> subscription id; session s lives on shard s / 10.
        let mut model: HashMap<(TopicFilter, u64), u32> = HashMap::new();
        for (i, (f, session, shard)) in subs.iter().enumerate() {
            let session = *shard as u64 * 10 + session;
            let sub = LocalSubscription { subscription_id: Some(i as u32), ..Default::default() };
            if let Some(d) = locals[*shard].subscribe(f, session, sub).unwrap().delta {
                for r in &mut replicas {
                    r.apply(&d);
                }
            }
            model.insert((f.clone(), session), i as u32);
        }
        let mut sm = ShardMatch::default();
        let mut chosen = Vec::new();
        let mut out = Vec::new();
        for (counter, (t, from)) in publishes.iter().enumerate() {
            let counter = counter as u64;
            replicas[*from].match_shards(t, &mut sm);
            chosen.clear();
            let mask = sm.choose(counter, &mut chosen);
            out.clear();
            for d in shards_in(mask) {
                let mut groups = smallvec::SmallVec::new();
                prop_assert!(sm.work_for(d, &chosen, &mut groups));
                let mut orphaned = smallvec::SmallVec::new();
                let before = out.len();
                let n_plain = locals[d.index()].deliveries_into(t, sm.plain & d.bit() != 0, &groups, counter, &mut out, &mut orphaned);
                prop_assert_eq!(out.len() - before - n_plain, groups.len(), "one pick per group, after the plain matches");
                prop_assert!(orphaned.is_empty());
            }
            let mut got_plain: Vec<(u64, u32)> = Vec::new();
            let mut got_groups: BTreeMap<String, usize> = BTreeMap::new();
            for (session, sub) in &out {
                let id = sub.subscription_id.unwrap();
                let ((f, _), _) = model.iter().find(|(_, v)| **v == id).unwrap();
                if f.is_shared() {
                    *got_groups.entry(f.to_string()).or_default() += 1;
                } else {
                    got_plain.push((*session, id));
                }
            }
            got_plain.sort_unstable();
            let mut want_plain: Vec<(u64, u32)> = model
                .iter()
                .filter(|((f, _), _)| !f.is_shared() && f.matches(t))
                .map(|((_, s), id)| (*s, *id))
                .collect();
            want_plain.sort_unstable();
            prop_assert_eq!(got_plain, want_plain);
            let want_groups: BTreeMap<String, usize> = model
                .keys()
                .filter(|(f, _)| f.is_shared() && f.matches(t))
                .map(|(f, _)| (f.to_string(), 1))
                .collect();
            prop_assert_eq!(got_groups, want_groups);
        }
    }
}
