//! Retained messages: the last retained PUBLISH per topic, found by topic filter.
//!
//! Owns: `RetainedStore` (a trie over topic levels, walked by a filter on SUBSCRIBE), its
//! bounds, and expiry. Must not touch: delivery (the caller applies retain-as-published,
//! retain handling and QoS downgrade), persistence (wave 2).
//!
//! Cross-shard design: every shard keeps a full replica of the retained store. The shard that
//! receives a retained PUBLISH applies it locally and broadcasts the `Message` to every other
//! shard (its payload `Bytes` and properties `Arc` are shared, never copied), and each shard
//! applies it on receipt, so a SUBSCRIBE reads its own shard's store with no cross-shard
//! round trip. Retained publishes are rare next to SUBSCRIBEs of a reconnecting fleet, which
//! is why reads are local and writes are broadcast. Two publishers retaining the same topic
//! at the same instant from different shards may leave replicas disagreeing until the next
//! retained publish on that topic (mailboxes are FIFO per pair, not globally ordered); the
//! store keeps whatever arrived last. Bounds are per replica and identical on every shard,
//! so every replica refuses the same publishes.
//!
//! Memory: a replica's size counts what it really keeps alive: each message's topic, payload
//! and v5 properties ([`Message::heap_size`]) plus its own trie nodes (one per topic level,
//! [`NODE_BYTES`] each, exact count). Payloads are shared by the replicas but counted in
//! each, so the whole store costs at most `shards × max_bytes`.

use std::time::Instant;

use crate::codec::TopicFilter;
use crate::message::Message;

use super::trie::{next_level, Node, Trie};
use super::MAX_FILTER_LEVELS;

/// Bounds of one retained store (per shard; every shard holds the same set). `max_bytes` is
/// counted per replica (see the module doc for what it counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedLimits {
    /// Most topics with a retained message.
    pub max_messages: usize,
    /// Most bytes held: messages (topic, payload, properties) and trie nodes.
    pub max_bytes: usize,
}

impl Default for RetainedLimits {
    fn default() -> Self {
        // Room for one retained status topic per device of a 100k fleet, at a few hundred
        // bytes each.
        RetainedLimits {
            max_messages: 1_000_000,
            max_bytes: 256 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainOutcome {
    Stored {
        replaced: bool,
    },
    /// Empty payload: the topic's retained message is removed [MQTT-3.3.1-10], nothing is
    /// stored [MQTT-3.3.1-11].
    Deleted {
        existed: bool,
    },
    Refused(RefuseReason),
}

/// Why a retained message was not stored. Policy when full: a topic not yet in the store is
/// refused; a replacement that would exceed the byte bound is refused *and the old message
/// removed*, so the store never serves a value older than the latest publish to its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    TooManyMessages,
    TooManyBytes,
    /// Deeper than [`MAX_FILTER_LEVELS`]; no subscription could be that deep either.
    TooManyLevels,
}

/// Memory of one trie node of the store, as laid out in its parent (key, node with its
/// inline `Option<Message>` payload), plus an allowance for the key's own allocation.
pub const NODE_BYTES: usize =
    std::mem::size_of::<(Box<str>, Node<Option<Message>>)>() + 2 * std::mem::size_of::<usize>();

pub struct RetainedStore {
    trie: Trie<Option<Message>>,
    limits: RetainedLimits,
    count: usize,
    /// Heap bytes of the stored messages (trie nodes are added from the node count).
    bytes: usize,
    refused: u64,
}

impl std::fmt::Debug for RetainedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetainedStore")
            .field("limits", &self.limits)
            .field("count", &self.count)
            .field("bytes", &self.bytes)
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

impl Default for RetainedStore {
    fn default() -> Self {
        Self::new(RetainedLimits::default())
    }
}

impl RetainedStore {
    pub fn new(limits: RetainedLimits) -> Self {
        RetainedStore {
            trie: Trie::default(),
            limits,
            count: 0,
            bytes: 0,
            refused: 0,
        }
    }

    /// Topics with a retained message.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes held: messages and trie nodes.
    pub fn bytes(&self) -> usize {
        self.bytes + self.trie.node_count() * NODE_BYTES
    }

    /// Retained publishes refused since start (for metrics).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    pub fn node_count(&self) -> usize {
        self.trie.node_count()
    }

    /// Apply a retained PUBLISH: store it, replacing the topic's previous one, or delete the
    /// topic's message when the payload is empty.
    pub fn set(&mut self, msg: Message) -> RetainOutcome {
        if msg.payload.is_empty() {
            let existed = self.remove_topic(&msg.topic);
            return RetainOutcome::Deleted { existed };
        }
        if msg.topic.levels().count() > MAX_FILTER_LEVELS {
            return self.refuse(RefuseReason::TooManyLevels);
        }
        let size = msg.heap_size();
        let old_size = self
            .trie
            .get(msg.topic.levels())
            .and_then(|m| m.as_ref())
            .map(Message::heap_size);
        match old_size {
            Some(old) => {
                if self.bytes() - old + size > self.limits.max_bytes {
                    self.remove_topic(&msg.topic);
                    return self.refuse(RefuseReason::TooManyBytes);
                }
                self.bytes = self.bytes - old + size;
                let topic = msg.topic.clone();
                *self.trie.get_or_create(topic.levels()) = Some(msg);
                RetainOutcome::Stored { replaced: true }
            }
            None => {
                if self.count >= self.limits.max_messages {
                    return self.refuse(RefuseReason::TooManyMessages);
                }
                let nodes = self.trie.missing_nodes(msg.topic.levels()) * NODE_BYTES;
                if self.bytes() + nodes + size > self.limits.max_bytes {
                    return self.refuse(RefuseReason::TooManyBytes);
                }
                self.bytes += size;
                self.count += 1;
                let topic = msg.topic.clone();
                *self.trie.get_or_create(topic.levels()) = Some(msg);
                RetainOutcome::Stored { replaced: false }
            }
        }
    }

    fn refuse(&mut self, why: RefuseReason) -> RetainOutcome {
        self.refused += 1;
        RetainOutcome::Refused(why)
    }

    fn remove_topic(&mut self, topic: &crate::codec::TopicName) -> bool {
        let Some(slot) = self.trie.get_mut(topic.levels()) else {
            return false;
        };
        let Some(old) = slot.take() else {
            return false;
        };
        self.count -= 1;
        self.bytes -= old.heap_size();
        self.trie.prune(topic.levels());
        true
    }

    /// Append to `out` every unexpired retained message whose topic matches `filter`
    /// [MQTT-3.3.1-6], walking the trie by the filter's levels (`+` fans out over one level,
    /// `#` takes a whole subtree; topics starting with `$` are skipped by a leading wildcard
    /// [MQTT-4.7.2-1]). Shared subscriptions get no retained messages (MQTT 5.0 §4.8.2, as
    /// mosquitto does), so a `$share/...` filter yields nothing.
    pub fn match_filter(&self, filter: &TopicFilter, now: Instant, out: &mut Vec<Message>) {
        if filter.is_shared() {
            return;
        }
        let f = filter.filter();
        let root = &self.trie.root;
        let mut emit = |n: &Node<Option<Message>>| {
            if let Some(m) = &n.payload {
                if !m.is_expired(now) {
                    out.push(m.clone());
                }
            }
        };
        // SUBSCRIBE path, not per message: a heap stack is fine here.
        let mut stack = vec![(root, Some(0usize))];
        let mut subtree = Vec::new();
        while let Some((node, pos)) = stack.pop() {
            let Some(pos) = pos else {
                emit(node);
                continue;
            };
            let at_root = std::ptr::eq(node, root);
            let (level, next) = next_level(f, pos);
            match level {
                "#" => {
                    // `#` also matches the parent level itself ("sport/#" matches "sport").
                    subtree.push(node);
                    while let Some(n) = subtree.pop() {
                        emit(n);
                        let n_is_root = std::ptr::eq(n, root);
                        subtree.extend(
                            n.children()
                                .filter(|(l, _)| !(n_is_root && l.starts_with('$')))
                                .map(|(_, c)| c),
                        );
                    }
                }
                "+" => stack.extend(
                    node.children()
                        .filter(|(l, _)| !(at_root && l.starts_with('$')))
                        .map(|(_, c)| (c, next)),
                ),
                exact => {
                    if let Some(c) = node.child(exact) {
                        stack.push((c, next));
                    }
                }
            }
        }
    }

    /// Drop every expired message; returns how many. A full sweep: call it from a periodic
    /// timer, not per publish.
    pub fn purge_expired(&mut self, now: Instant) -> usize {
        let mut expired = Vec::new();
        let mut stack = vec![&self.trie.root];
        while let Some(n) = stack.pop() {
            if let Some(m) = &n.payload {
                if m.is_expired(now) {
                    expired.push(m.topic.clone());
                }
            }
            stack.extend(n.children().map(|(_, c)| c));
        }
        for topic in &expired {
            self.remove_topic(topic);
        }
        expired.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{QoS, TopicName};
    use bytes::Bytes;
    use std::time::Duration;

    fn msg(topic: &str, payload: &'static str) -> Message {
        Message {
            topic: TopicName::new(topic.to_string()).unwrap(),
            payload: Bytes::from_static(payload.as_bytes()),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: None,
            expires_at: None,
            origin: "pub".into(),
            sid: 0,
        }
    }
    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s.to_string()).unwrap()
    }
    fn topics(store: &RetainedStore, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        store.match_filter(&f(filter), Instant::now(), &mut out);
        let mut t: Vec<String> = out.iter().map(|m| m.topic.to_string()).collect();
        t.sort();
        t
    }

    #[test]
    fn set_replace_and_empty_payload_delete() {
        let mut s = RetainedStore::default();
        assert_eq!(
            s.set(msg("a/b", "1")),
            RetainOutcome::Stored { replaced: false }
        );
        assert_eq!(
            s.set(msg("a/b", "22")),
            RetainOutcome::Stored { replaced: true }
        );
        // "a/b" + "22", and its two trie nodes.
        assert_eq!((s.len(), s.bytes()), (1, 5 + 2 * NODE_BYTES));
        let mut out = Vec::new();
        s.match_filter(&f("a/b"), Instant::now(), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0].payload[..], b"22");
        // A zero-byte retained publish removes it and is not stored [MQTT-3.3.1-10/11].
        assert_eq!(
            s.set(msg("a/b", "")),
            RetainOutcome::Deleted { existed: true }
        );
        assert_eq!(
            s.set(msg("a/b", "")),
            RetainOutcome::Deleted { existed: false }
        );
        assert!(s.is_empty());
        assert_eq!((s.bytes(), s.node_count()), (0, 0));
    }

    #[test]
    fn filters_walk_levels_with_spec_semantics() {
        let mut s = RetainedStore::default();
        for t in [
            "sport",
            "sport/tennis",
            "sport/tennis/player1",
            "sport/",
            "/finance",
            "$SYS/broker/load",
            "$SYS",
        ] {
            s.set(msg(t, "x"));
        }
        assert_eq!(
            topics(&s, "sport/#"),
            vec!["sport", "sport/", "sport/tennis", "sport/tennis/player1"]
        );
        assert_eq!(topics(&s, "sport/+"), vec!["sport/", "sport/tennis"]);
        assert_eq!(
            topics(&s, "+/+"),
            vec!["/finance", "sport/", "sport/tennis"]
        );
        assert_eq!(topics(&s, "+"), vec!["sport"]);
        assert_eq!(
            topics(&s, "#"),
            vec![
                "/finance",
                "sport",
                "sport/",
                "sport/tennis",
                "sport/tennis/player1"
            ]
        );
        assert_eq!(topics(&s, "$SYS/#"), vec!["$SYS", "$SYS/broker/load"]);
        assert_eq!(topics(&s, "$SYS/+/load"), vec!["$SYS/broker/load"]);
        assert!(topics(&s, "$share/g/sport/#").is_empty());
        assert!(topics(&s, "nothing/#").is_empty());
    }

    #[test]
    fn expired_messages_are_skipped_and_purged() {
        let mut s = RetainedStore::default();
        let now = Instant::now();
        let mut m = msg("a/1", "x");
        m.expires_at = Some(now + Duration::from_secs(10));
        s.set(m);
        s.set(msg("a/2", "y"));
        let mut out = Vec::new();
        s.match_filter(&f("a/+"), now, &mut out);
        assert_eq!(out.len(), 2);
        out.clear();
        let later = now + Duration::from_secs(11);
        s.match_filter(&f("a/+"), later, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic.as_str(), "a/2");
        assert_eq!(s.purge_expired(later), 1);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn bounds_refuse_new_topics_and_count_refusals() {
        // Room for two one-level topics' nodes and 12 bytes of messages.
        let n = NODE_BYTES;
        let mut s = RetainedStore::new(RetainedLimits {
            max_messages: 2,
            max_bytes: 12 + 2 * n,
        });
        assert_eq!(
            s.set(msg("a", "1")),
            RetainOutcome::Stored { replaced: false }
        );
        assert_eq!(
            s.set(msg("b", "1")),
            RetainOutcome::Stored { replaced: false }
        );
        assert_eq!(
            s.set(msg("c", "1")),
            RetainOutcome::Refused(RefuseReason::TooManyMessages)
        );
        // Replacing an existing topic is allowed while it fits.
        assert_eq!(
            s.set(msg("a", "12345")),
            RetainOutcome::Stored { replaced: true }
        );
        assert_eq!(s.bytes(), 8 + 2 * n);
        // A replacement that does not fit removes the stale value and is refused.
        assert_eq!(
            s.set(msg("a", "1234567890")),
            RetainOutcome::Refused(RefuseReason::TooManyBytes)
        );
        assert_eq!((s.len(), s.bytes(), s.refused()), (1, 2 + n, 2));
        assert!(topics(&s, "a").is_empty());
        assert_eq!(
            s.set(msg("d", "12345678901")),
            RetainOutcome::Refused(RefuseReason::TooManyBytes)
        );
        assert_eq!(s.refused(), 3);
    }

    #[test]
    fn bounds_count_trie_nodes_and_properties() {
        // 100 levels cost 100 nodes: far more than the topic's 199 bytes.
        let deep = vec!["a"; 100].join("/");
        let limit = 50 * NODE_BYTES;
        let mut s = RetainedStore::new(RetainedLimits {
            max_messages: 1000,
            max_bytes: limit,
        });
        assert_eq!(
            s.set(msg(&deep, "x")),
            RetainOutcome::Refused(RefuseReason::TooManyBytes)
        );
        assert_eq!(s.node_count(), 0, "nothing created for a refused message");
        let half = vec!["b"; 40].join("/");
        assert!(matches!(
            s.set(msg(&half, "x")),
            RetainOutcome::Stored { .. }
        ));
        assert!(s.bytes() >= 40 * NODE_BYTES && s.bytes() <= limit);
        // A sibling shares the first 39 nodes: it costs one more.
        let sibling = format!("{}/c", vec!["b"; 39].join("/"));
        let before = s.bytes();
        assert!(matches!(
            s.set(msg(&sibling, "x")),
            RetainOutcome::Stored { .. }
        ));
        assert_eq!(s.bytes() - before, NODE_BYTES + sibling.len() + 1);
        // v5 properties are counted: 1 KiB of user property on a one-byte payload.
        let mut p = msg("props", "x");
        p.properties = Some(std::sync::Arc::new(crate::codec::PublishProperties {
            user_properties: vec![("k".into(), "v".repeat(1024).into())],
            ..Default::default()
        }));
        let before = s.bytes();
        assert!(matches!(s.set(p), RetainOutcome::Stored { .. }));
        assert!(
            s.bytes() - before > 1024 + NODE_BYTES,
            "{}",
            s.bytes() - before
        );
        // Removing everything gives it all back.
        for t in [half.as_str(), sibling.as_str(), "props"] {
            s.set(msg(t, ""));
        }
        assert_eq!((s.bytes(), s.node_count()), (0, 0));
    }

    #[test]
    fn every_shard_replica_answers_after_a_broadcast() {
        // The runtime applies a retained publish on its own shard and broadcasts the same
        // `Message` to the others; each replica then serves SUBSCRIBEs locally.
        let mut shards: Vec<RetainedStore> = (0..3).map(|_| RetainedStore::default()).collect();
        let m = msg("fleet/s1/d7/status", "online");
        for s in &mut shards {
            assert_eq!(s.set(m.clone()), RetainOutcome::Stored { replaced: false });
        }
        for s in &shards {
            let mut out = Vec::new();
            s.match_filter(&f("fleet/+/+/status"), Instant::now(), &mut out);
            assert_eq!(out.len(), 1);
            assert_eq!(
                out[0].payload.as_ptr(),
                m.payload.as_ptr(),
                "payload not copied"
            );
        }
        // The delete is broadcast the same way.
        for s in &mut shards {
            s.set(msg("fleet/s1/d7/status", ""));
        }
        assert!(shards.iter().all(RetainedStore::is_empty));
    }

    #[test]
    fn payload_is_shared_not_copied() {
        let mut s = RetainedStore::default();
        let m = msg("a", "payload");
        let ptr = m.payload.as_ptr();
        s.set(m);
        let mut out = Vec::new();
        s.match_filter(&f("a"), Instant::now(), &mut out);
        assert_eq!(out[0].payload.as_ptr(), ptr);
    }
}
