//! The level trie shared by every routing structure, and the subscription trie built on it.
//!
//! Owns: `Trie<P>` (one node per topic-filter level, separate slots for `+` and `#`, a payload
//! `P` per node, pruning of empty nodes) and `SubscriptionTrie<K, V>` (subscribers per filter,
//! plain and shared). Must not touch: shards, sessions, I/O.
//!
//! Depth: a filter may legally have ~32k levels. Matching, pruning and dropping are iterative
//! so a deep trie cannot overflow a shard's stack; the runtime should still refuse absurdly
//! deep filters ([`crate::routing::MAX_FILTER_LEVELS`]) because every level costs a node.

use std::collections::HashMap;

use smallvec::SmallVec;

use crate::codec::{TopicFilter, TopicName};

/// Nodes are boxed in the map so its buckets stay small (24 bytes): a 1000-device site's
/// map then fits far better in cache than with ~110-byte inline nodes.
type ChildMap<P> = HashMap<Box<str>, Box<Node<P>>, ahash::RandomState>;

/// Up to this many exact children live in a vector searched linearly; beyond, a hash map.
/// Most nodes of a fleet's tree have one child ("…/{device}/telemetry"), and a one-entry
/// `HashMap` costs ~400 bytes against ~110 for an exactly-sized vector.
const FEW_CHILDREN: usize = 8;

enum Children<P> {
    /// Capacity kept equal to length (`reserve_exact`): these are tiny and rarely grow.
    Few(Vec<(Box<str>, Node<P>)>),
    Many(Box<ChildMap<P>>),
}

impl<P> Children<P> {
    fn len(&self) -> usize {
        match self {
            Children::Few(v) => v.len(),
            Children::Many(m) => m.len(),
        }
    }

    #[inline]
    fn get(&self, level: &str) -> Option<&Node<P>> {
        match self {
            Children::Few(v) => v.iter().find(|(k, _)| **k == *level).map(|(_, n)| n),
            Children::Many(m) => m.get(level).map(|n| &**n),
        }
    }

    fn get_mut(&mut self, level: &str) -> Option<&mut Node<P>> {
        match self {
            Children::Few(v) => v.iter_mut().find(|(k, _)| **k == *level).map(|(_, n)| n),
            Children::Many(m) => m.get_mut(level).map(|n| &mut **n),
        }
    }

    /// The child at `level`, created if absent; the flag says whether it was created.
    fn get_or_insert(&mut self, level: &str) -> (&mut Node<P>, bool)
    where
        P: Default,
    {
        if let Children::Few(v) = self {
            if v.len() >= FEW_CHILDREN && !v.iter().any(|(k, _)| **k == *level) {
                let mut map =
                    ChildMap::with_capacity_and_hasher(FEW_CHILDREN * 2, ahash::RandomState::new());
                map.extend(v.drain(..).map(|(k, n)| (k, Box::new(n))));
                *self = Children::Many(Box::new(map));
            }
        }
        match self {
            Children::Few(v) => {
                if let Some(i) = v.iter().position(|(k, _)| **k == *level) {
                    return (&mut v[i].1, false);
                }
                v.reserve_exact(1);
                v.push((level.into(), Node::default()));
                let last = v.len() - 1;
                (&mut v[last].1, true)
            }
            Children::Many(m) => {
                // Look up before inserting so an existing level costs no key allocation.
                let created = !m.contains_key(level);
                if created {
                    m.insert(level.into(), Box::default());
                }
                (
                    &mut **m.get_mut(level).expect("level inserted above"),
                    created,
                )
            }
        }
    }

    fn remove(&mut self, level: &str) -> Option<Node<P>> {
        match self {
            Children::Few(v) => {
                let i = v.iter().position(|(k, _)| **k == *level)?;
                let n = v.swap_remove(i).1;
                v.shrink_to_fit();
                Some(n)
            }
            Children::Many(m) => {
                let n = m.remove(level).map(|n| *n);
                if m.is_empty() {
                    *self = Children::Few(Vec::new());
                }
                n
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &Node<P>)> {
        let (few, many) = match self {
            Children::Few(v) => (Some(v.iter()), None),
            Children::Many(m) => (None, Some(m.iter())),
        };
        few.into_iter()
            .flatten()
            .map(|(k, n)| (&**k, n))
            .chain(many.into_iter().flatten().map(|(k, n)| (&**k, &**n)))
    }

    fn drain_into(&mut self, out: &mut Vec<Node<P>>) {
        match std::mem::replace(self, Children::Few(Vec::new())) {
            Children::Few(v) => out.extend(v.into_iter().map(|(_, n)| n)),
            Children::Many(m) => out.extend(m.into_values().map(|n| *n)),
        }
    }
}

/// What a node carries; a node whose payload is empty and that has no children is pruned.
pub(crate) trait Payload: Default {
    fn is_empty(&self) -> bool;
}

impl<T> Payload for Option<T> {
    fn is_empty(&self) -> bool {
        self.is_none()
    }
}

pub(crate) struct Node<P> {
    /// Exact-level children.
    children: Children<P>,
    plus: Option<Box<Node<P>>>,
    /// `#` is always the last level, so this node never has children of its own.
    hash: Option<Box<Node<P>>>,
    pub(crate) payload: P,
}

impl<P: Default> Default for Node<P> {
    fn default() -> Self {
        Node {
            children: Children::Few(Vec::new()),
            plus: None,
            hash: None,
            payload: P::default(),
        }
    }
}

impl<P> Node<P> {
    fn child_count(&self) -> usize {
        self.children.len() + usize::from(self.plus.is_some()) + usize::from(self.hash.is_some())
    }

    #[inline]
    pub(crate) fn child(&self, level: &str) -> Option<&Node<P>> {
        self.children.get(level)
    }

    pub(crate) fn children(&self) -> impl Iterator<Item = (&str, &Node<P>)> {
        self.children.iter()
    }

    /// Exact children, then the `+` and `#` slots under those names.
    pub(crate) fn all_children(&self) -> impl Iterator<Item = (&str, &Node<P>)> {
        self.children()
            .chain(self.plus.as_deref().map(|n| ("+", n)))
            .chain(self.hash.as_deref().map(|n| ("#", n)))
    }

    fn step(&self, step: Step<'_>) -> Option<&Node<P>> {
        match step {
            Step::Exact(l) => self.child(l),
            Step::Plus => self.plus.as_deref(),
            Step::Hash => self.hash.as_deref(),
        }
    }

    fn step_mut(&mut self, step: Step<'_>) -> Option<&mut Node<P>> {
        match step {
            Step::Exact(l) => self.children.get_mut(l),
            Step::Plus => self.plus.as_deref_mut(),
            Step::Hash => self.hash.as_deref_mut(),
        }
    }

    /// Detach the child at `step`, returning it so the caller can count it.
    fn take_child(&mut self, step: Step<'_>) -> Option<Node<P>> {
        match step {
            Step::Exact(l) => self.children.remove(l),
            Step::Plus => self.plus.take().map(|b| *b),
            Step::Hash => self.hash.take().map(|b| *b),
        }
    }

    fn drain_children_into(&mut self, out: &mut Vec<Node<P>>) {
        self.children.drain_into(out);
        if let Some(n) = self.plus.take() {
            out.push(*n);
        }
        if let Some(n) = self.hash.take() {
            out.push(*n);
        }
    }
}

impl<P> Drop for Node<P> {
    // Iterative, so dropping a 30k-level chain cannot overflow the stack.
    fn drop(&mut self) {
        if self.child_count() == 0 {
            return;
        }
        let mut stack = Vec::new();
        self.drain_children_into(&mut stack);
        while let Some(mut n) = stack.pop() {
            n.drain_children_into(&mut stack);
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Step<'a> {
    Exact(&'a str),
    Plus,
    Hash,
}

impl<'a> Step<'a> {
    pub(crate) fn of(level: &'a str) -> Self {
        match level {
            "+" => Step::Plus,
            "#" => Step::Hash,
            l => Step::Exact(l),
        }
    }
}

/// Split `s` at `pos` into its next level and the start of the one after (None at the end).
#[inline]
pub(crate) fn next_level(s: &str, pos: usize) -> (&str, Option<usize>) {
    let rest = &s[pos..];
    match rest.find('/') {
        Some(i) => (&rest[..i], Some(pos + i + 1)),
        None => (rest, None),
    }
}

/// A level trie with a payload per node. Node count excludes the root.
pub(crate) struct Trie<P> {
    pub(crate) root: Node<P>,
    nodes: usize,
}

impl<P: Payload> Default for Trie<P> {
    fn default() -> Self {
        Trie {
            root: Node::default(),
            nodes: 0,
        }
    }
}

impl<P: Payload> Trie<P> {
    pub(crate) fn node_count(&self) -> usize {
        self.nodes
    }

    /// The payload at the end of `levels`, creating nodes on the way.
    pub(crate) fn get_or_create<'a>(&mut self, levels: impl Iterator<Item = &'a str>) -> &mut P {
        let mut node = &mut self.root;
        let mut created = 0;
        for level in levels {
            node = match Step::of(level) {
                Step::Exact(l) => {
                    let (n, new) = node.children.get_or_insert(l);
                    created += usize::from(new);
                    n
                }
                Step::Plus => node.plus.get_or_insert_with(|| {
                    created += 1;
                    Box::default()
                }),
                Step::Hash => node.hash.get_or_insert_with(|| {
                    created += 1;
                    Box::default()
                }),
            };
        }
        self.nodes += created;
        &mut node.payload
    }

    /// How many nodes `get_or_create(levels)` would create.
    pub(crate) fn missing_nodes<'a>(&self, levels: impl Iterator<Item = &'a str>) -> usize {
        let mut node = &self.root;
        let mut levels = levels.peekable();
        while let Some(level) = levels.peek() {
            match node.step(Step::of(level)) {
                Some(n) => {
                    node = n;
                    levels.next();
                }
                None => break,
            }
        }
        levels.count()
    }

    pub(crate) fn get<'a>(&self, levels: impl Iterator<Item = &'a str>) -> Option<&P> {
        let mut node = &self.root;
        for level in levels {
            node = node.step(Step::of(level))?;
        }
        Some(&node.payload)
    }

    pub(crate) fn get_mut<'a>(&mut self, levels: impl Iterator<Item = &'a str>) -> Option<&mut P> {
        let mut node = &mut self.root;
        for level in levels {
            node = node.step_mut(Step::of(level))?;
        }
        Some(&mut node.payload)
    }

    /// Remove the nodes at the end of `levels` that carry nothing and lead nowhere. Call after
    /// emptying a payload. Two walks (find the deepest node that must stay, then cut below
    /// it) avoid keeping a stack of mutable borrows.
    pub(crate) fn prune<'a>(&mut self, levels: impl Iterator<Item = &'a str> + Clone) {
        let mut node = &self.root;
        // Depth (0 = root) of the deepest node that must stay, and the total depth.
        let mut keep = 0usize;
        let mut depth = 0usize;
        for level in levels.clone() {
            let Some(next) = node.step(Step::of(level)) else {
                return; // path absent: nothing to prune
            };
            // `node` stays if it carries something or leads elsewhere besides `next`.
            if depth == 0 || !node.payload.is_empty() || node.child_count() > 1 {
                keep = depth;
            }
            node = next;
            depth += 1;
        }
        if depth == 0 || !node.payload.is_empty() || node.child_count() > 0 {
            return; // the last node itself stays, so every ancestor does
        }
        let mut node = &mut self.root;
        let mut levels = levels;
        for _ in 0..keep {
            let Some(level) = levels.next() else { return };
            let Some(next) = node.step_mut(Step::of(level)) else {
                return;
            };
            node = next;
        }
        if let Some(level) = levels.next() {
            if node.take_child(Step::of(level)).is_some() {
                self.nodes -= depth - keep;
            }
        }
    }

    /// Call `f` with the payload of every node whose filter matches `topic` [MQTT-4.7]:
    /// `+` one level, `#` zero or more trailing levels, and no wildcard first level for a
    /// topic starting with `$` [MQTT-4.7.2-1]. Allocation-free unless a topic branches into
    /// more than 16 pending `+` paths.
    #[inline]
    pub(crate) fn for_each_match<'s>(&'s self, topic: &str, mut f: impl FnMut(&'s P)) {
        let system = topic.starts_with('$');
        // Pending (node, start of the topic's next level); `None` = topic fully consumed.
        let mut stack: SmallVec<[(&'s Node<P>, Option<usize>); 16]> = SmallVec::new();
        stack.push((&self.root, Some(0)));
        while let Some((node, pos)) = stack.pop() {
            let wildcards_ok = !(system && std::ptr::eq(node, &self.root));
            if wildcards_ok {
                if let Some(h) = &node.hash {
                    f(&h.payload);
                }
            }
            match pos {
                None => f(&node.payload),
                Some(pos) => {
                    let (level, next) = next_level(topic, pos);
                    if wildcards_ok {
                        if let Some(p) = &node.plus {
                            stack.push((p, next));
                        }
                    }
                    if let Some(c) = node.child(level) {
                        stack.push((c, next));
                    }
                }
            }
        }
    }
}

/// A shared subscription group at one filter: `$share/{name}/{filter}`.
struct Group<K, V> {
    name: Box<str>,
    members: SmallVec<[(K, V); 1]>,
}

/// Subscribers at one filter node.
pub(crate) struct Subscribers<K, V> {
    plain: SmallVec<[(K, V); 1]>,
    shared: Vec<Group<K, V>>,
}

impl<K, V> Default for Subscribers<K, V> {
    fn default() -> Self {
        Subscribers {
            plain: SmallVec::new(),
            shared: Vec::new(),
        }
    }
}

impl<K, V> Payload for Subscribers<K, V> {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.shared.is_empty()
    }
}

/// One subscriber found by [`SubscriptionTrie::match_into`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match<K, V> {
    pub key: K,
    pub value: V,
    /// `None` for a plain subscription. For a shared one, a tag naming its group within this
    /// one call's results: members of a group are contiguous and share the tag, and different
    /// groups (different share name or different filter) have different tags.
    pub group: Option<u32>,
}

/// Topic-filter trie: filter → subscribers `(K, V)`, e.g. session id → options.
///
/// Plain and shared subscriptions on the same filter are kept apart, and each
/// `$share/{group}/{filter}` is its own group. A key appears at most once per exact filter
/// string (inserting again replaces the value).
pub struct SubscriptionTrie<K, V> {
    trie: Trie<Subscribers<K, V>>,
    len: usize,
}

impl<K, V> Default for SubscriptionTrie<K, V> {
    fn default() -> Self {
        SubscriptionTrie {
            trie: Trie::default(),
            len: 0,
        }
    }
}

impl<K: Eq + Clone, V: Clone> SubscriptionTrie<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of (filter, key) subscriptions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Trie nodes in use (root excluded); 0 once every subscription is removed.
    pub fn node_count(&self) -> usize {
        self.trie.node_count()
    }

    /// Subscribe `key` to `filter` with `value`; returns the previous value if `key` already
    /// had exactly this filter (same share group or none).
    pub fn insert(&mut self, filter: &TopicFilter, key: K, value: V) -> Option<V> {
        let subs = self.trie.get_or_create(filter.levels());
        let list = match filter.share_group() {
            None => &mut subs.plain,
            Some(name) => {
                let i = match subs.shared.iter().position(|g| &*g.name == name) {
                    Some(i) => i,
                    None => {
                        subs.shared.push(Group {
                            name: name.into(),
                            members: SmallVec::new(),
                        });
                        subs.shared.len() - 1
                    }
                };
                &mut subs.shared[i].members
            }
        };
        if let Some(slot) = list.iter_mut().find(|(k, _)| *k == key) {
            return Some(std::mem::replace(&mut slot.1, value));
        }
        list.push((key, value));
        self.len += 1;
        None
    }

    /// Unsubscribe `key` from exactly `filter`; prunes nodes left empty.
    pub fn remove(&mut self, filter: &TopicFilter, key: &K) -> Option<V> {
        let subs = self.trie.get_mut(filter.levels())?;
        let removed = match filter.share_group() {
            None => {
                let i = subs.plain.iter().position(|(k, _)| k == key)?;
                subs.plain.swap_remove(i).1
            }
            Some(name) => {
                let gi = subs.shared.iter().position(|g| &*g.name == name)?;
                let group = &mut subs.shared[gi];
                let i = group.members.iter().position(|(k, _)| k == key)?;
                let v = group.members.remove(i).1;
                if group.members.is_empty() {
                    subs.shared.swap_remove(gi);
                }
                v
            }
        };
        let now_empty = subs.is_empty();
        self.len -= 1;
        if now_empty {
            self.trie.prune(filter.levels());
        }
        Some(removed)
    }

    /// The subscribers of exactly `filter` (plain, or the members of its share group).
    pub fn subscribers(&self, filter: &TopicFilter) -> &[(K, V)] {
        let Some(subs) = self.trie.get(filter.levels()) else {
            return &[];
        };
        match filter.share_group() {
            None => &subs.plain,
            Some(name) => subs
                .shared
                .iter()
                .find(|g| &*g.name == name)
                .map_or(&[], |g| &g.members[..]),
        }
    }

    /// Append every subscription matching `topic` to `out` (not cleared first). Allocates
    /// nothing when `out` has the capacity.
    pub fn match_into(&self, topic: &TopicName, out: &mut Vec<Match<K, V>>) {
        let mut tag = 0u32;
        self.trie.for_each_match(topic.as_str(), |subs| {
            out.extend(subs.plain.iter().map(|(k, v)| Match {
                key: k.clone(),
                value: v.clone(),
                group: None,
            }));
            for g in &subs.shared {
                out.extend(g.members.iter().map(|(k, v)| Match {
                    key: k.clone(),
                    value: v.clone(),
                    group: Some(tag),
                }));
                tag += 1;
            }
        });
    }

    /// Like [`match_into`](Self::match_into) but only plain subscriptions, as `(K, V)`.
    pub fn match_plain_into(&self, topic: &TopicName, out: &mut Vec<(K, V)>) {
        self.trie.for_each_match(topic.as_str(), |subs| {
            out.extend(subs.plain.iter().cloned());
        });
    }
}

/// Keep every plain match and exactly one member of each shared group in `matches` (as
/// produced by one [`SubscriptionTrie::match_into`] call), in place. The member chosen is
/// `(counter + tag) % group size`: a caller that bumps `counter` once per message gets
/// round-robin within each group while membership is stable.
pub fn pick_one_per_group<K, V>(matches: &mut Vec<Match<K, V>>, counter: u64) {
    let mut w = 0;
    let mut r = 0;
    while r < matches.len() {
        match matches[r].group {
            None => {
                matches.swap(w, r);
                w += 1;
                r += 1;
            }
            Some(tag) => {
                let end = matches[r..]
                    .iter()
                    .position(|m| m.group != Some(tag))
                    .map_or(matches.len(), |i| r + i);
                let n = (end - r) as u64;
                let chosen = r + (counter.wrapping_add(u64::from(tag)) % n) as usize;
                matches.swap(w, chosen);
                w += 1;
                r = end;
            }
        }
    }
    matches.truncate(w);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s.to_string()).unwrap()
    }
    fn t(s: &str) -> TopicName {
        TopicName::new(s.to_string()).unwrap()
    }

    fn keys<V: Clone>(trie: &SubscriptionTrie<u64, V>, topic: &str) -> Vec<u64> {
        let mut out = Vec::new();
        trie.match_into(&t(topic), &mut out);
        let mut k: Vec<u64> = out.iter().map(|m| m.key).collect();
        k.sort_unstable();
        k
    }

    #[test]
    fn spec_examples_match() {
        let mut trie = SubscriptionTrie::new();
        trie.insert(&f("sport/tennis/player1/#"), 1, 0);
        trie.insert(&f("sport/#"), 2, 0);
        trie.insert(&f("sport/tennis/+"), 3, 0);
        trie.insert(&f("sport/+"), 4, 0);
        trie.insert(&f("+/+"), 5, 0);
        trie.insert(&f("/+"), 6, 0);
        trie.insert(&f("+"), 7, 0);
        trie.insert(&f("#"), 8, 0);
        trie.insert(&f("$SYS/#"), 9, 0);
        assert_eq!(keys(&trie, "sport/tennis/player1"), vec![1, 2, 3, 8]);
        assert_eq!(keys(&trie, "sport/tennis/player1/ranking"), vec![1, 2, 8]);
        // "sport/#" matches the parent level itself [MQTT-4.7.1.2].
        assert_eq!(keys(&trie, "sport"), vec![2, 7, 8]);
        // "sport/+" matches "sport/" (an empty level is a level).
        assert_eq!(keys(&trie, "sport/"), vec![2, 4, 5, 8]);
        assert_eq!(keys(&trie, "/finance"), vec![5, 6, 8]);
        // $-topics are invisible to leading wildcards [MQTT-4.7.2-1].
        assert_eq!(keys(&trie, "$SYS/broker/load"), vec![9]);
        assert_eq!(keys(&trie, "$SYS"), vec![9]);
    }

    #[test]
    fn insert_replaces_same_key_and_filter() {
        let mut trie = SubscriptionTrie::new();
        assert_eq!(trie.insert(&f("a/b"), 1u64, 10u8), None);
        assert_eq!(trie.insert(&f("a/b"), 1, 11), Some(10));
        assert_eq!(trie.len(), 1);
        // Same filter, shared: a distinct subscription.
        assert_eq!(trie.insert(&f("$share/g/a/b"), 1, 12), None);
        assert_eq!(trie.insert(&f("$share/h/a/b"), 1, 13), None);
        assert_eq!(trie.len(), 3);
        assert_eq!(trie.subscribers(&f("a/b")), &[(1, 11)]);
        assert_eq!(trie.subscribers(&f("$share/h/a/b")), &[(1, 13)]);
        assert_eq!(trie.remove(&f("$share/g/a/b"), &1), Some(12));
        assert_eq!(trie.remove(&f("$share/g/a/b"), &1), None);
        assert_eq!(trie.remove(&f("a/b"), &2), None);
        assert_eq!(trie.remove(&f("a/b"), &1), Some(11));
        assert_eq!(trie.node_count(), 2);
        assert_eq!(trie.remove(&f("$share/h/a/b"), &1), Some(13));
        assert!(trie.is_empty());
        assert_eq!(trie.node_count(), 0);
    }

    #[test]
    fn prune_keeps_shared_prefixes() {
        let mut trie = SubscriptionTrie::new();
        trie.insert(&f("a/b/c/d"), 1u64, ());
        trie.insert(&f("a/b"), 2, ());
        trie.insert(&f("a/+/#"), 3, ());
        assert_eq!(trie.node_count(), 6); // a, b, c, d, +, #
        trie.remove(&f("a/b/c/d"), &1);
        assert_eq!(trie.node_count(), 4); // c and d pruned, b kept (has a subscriber)
        trie.remove(&f("a/b"), &2);
        assert_eq!(trie.node_count(), 3); // a, +, #
        trie.remove(&f("a/+/#"), &3);
        assert_eq!(trie.node_count(), 0);
    }

    #[test]
    fn shared_groups_are_tagged_and_one_member_is_picked() {
        let mut trie = SubscriptionTrie::new();
        trie.insert(&f("a/+"), 1u64, ());
        trie.insert(&f("$share/g/a/+"), 2, ());
        trie.insert(&f("$share/g/a/+"), 3, ());
        trie.insert(&f("$share/g/a/#"), 4, ()); // same name, other filter: another group
        trie.insert(&f("$share/h/a/+"), 5, ());
        let mut out = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for counter in 0..4u64 {
            out.clear();
            trie.match_into(&t("a/x"), &mut out);
            assert_eq!(out.len(), 5);
            pick_one_per_group(&mut out, counter);
            let mut k: Vec<u64> = out.iter().map(|m| m.key).collect();
            k.sort_unstable();
            assert_eq!(k.len(), 4, "{k:?}");
            assert!(k.contains(&1) && k.contains(&4) && k.contains(&5));
            let picked = if k.contains(&2) { 2 } else { 3 };
            assert!(!(k.contains(&2) && k.contains(&3)));
            *seen.entry(picked).or_insert(0) += 1;
        }
        // Round-robin over the counter: both members of group g served equally.
        assert_eq!(seen.get(&2), Some(&2));
        assert_eq!(seen.get(&3), Some(&2));
    }

    #[test]
    fn match_into_reuses_buffer_without_growing() {
        let mut trie = SubscriptionTrie::new();
        for i in 0..10u64 {
            trie.insert(&f(&format!("d/{i}/t")), i, ());
        }
        trie.insert(&f("d/+/t"), 100, ());
        trie.insert(&f("d/#"), 101, ());
        let mut out = Vec::with_capacity(8);
        let cap = out.capacity();
        let ptr = out.as_ptr();
        for _ in 0..100 {
            out.clear();
            trie.match_into(&t("d/3/t"), &mut out);
            assert_eq!(out.len(), 3);
        }
        assert_eq!((out.capacity(), out.as_ptr()), (cap, ptr));
    }

    #[test]
    fn wide_nodes_switch_to_a_map_and_back() {
        let mut trie = SubscriptionTrie::new();
        let n = FEW_CHILDREN as u64 * 3;
        for i in 0..n {
            trie.insert(&f(&format!("w/{i}")), i, ());
            trie.insert(&f(&format!("w/{i}/x")), 1000 + i, ());
        }
        trie.insert(&f("w/+"), 5000, ());
        assert_eq!(trie.node_count(), 1 + 2 * n as usize + 1);
        for i in 0..n {
            assert_eq!(keys(&trie, &format!("w/{i}")), vec![i, 5000]);
            assert_eq!(keys(&trie, &format!("w/{i}/x")), vec![1000 + i]);
        }
        assert_eq!(keys(&trie, "w/none"), vec![5000]);
        for i in (0..n).rev() {
            assert_eq!(trie.remove(&f(&format!("w/{i}/x")), &(1000 + i)), Some(()));
            assert_eq!(trie.remove(&f(&format!("w/{i}")), &i), Some(()));
            for j in 0..i {
                assert_eq!(keys(&trie, &format!("w/{j}/x")), vec![1000 + j]);
            }
        }
        assert_eq!(trie.node_count(), 2);
        trie.remove(&f("w/+"), &5000);
        assert_eq!(trie.node_count(), 0);
    }

    #[test]
    fn very_deep_filters_do_not_overflow_the_stack() {
        let deep = vec!["a"; 30_000].join("/");
        let mut trie = SubscriptionTrie::new();
        trie.insert(&f(&deep), 1u64, ());
        trie.insert(&f(&format!("{deep}/#")), 2, ());
        assert_eq!(keys(&trie, &deep), vec![1, 2]);
        assert_eq!(trie.node_count(), 30_001);
        trie.remove(&f(&deep), &1);
        trie.remove(&f(&format!("{deep}/#")), &2);
        assert_eq!(trie.node_count(), 0);
        // And dropping a deep trie is iterative.
        trie.insert(&f(&deep), 1, ());
        drop(trie);
    }
}
