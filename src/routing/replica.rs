//! The routing replica: topic filter → set of shards with at least one subscriber.
//!
//! Owns: `ShardId`, `RouteDelta`, `RoutingReplica`, `ShardMatch`. Must not touch: sessions,
//! mailboxes (the runtime carries deltas and forwards), I/O.
//!
//! Every shard holds an identical replica. A shard's `LocalSubscriptions` emits a
//! [`RouteDelta`] when one of its filters gains its first or loses its last local subscriber;
//! the runtime applies it to its own replica and broadcasts it to every other shard.
//!
//! Convergence: the bit (filter, s) is written only by deltas that shard `s` emitted, and
//! each (s → d) mailbox is FIFO, so after the mailboxes drain every replica's bit equals the
//! last state shard `s` announced. `apply` is therefore a plain set/clear of one bit; applying
//! the same delta twice is a no-op. Between a SUBSCRIBE and the delta reaching another shard,
//! a publish on that shard does not reach the new subscriber (the usual window of a
//! replicated table, bounded by mailbox latency); a forward that arrives after its target
//! unsubscribed finds no local subscriber and is dropped.

use std::fmt;

use smallvec::SmallVec;

use crate::codec::{TopicFilter, TopicName};
use crate::message::Message;

use super::trie::{Payload, Trie};

/// Shard ids are bit positions in a `u64` mask, so at most 64 shards (cores) are supported.
pub const MAX_SHARDS: usize = 64;

/// A shard's index, guaranteed `< MAX_SHARDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(u8);

impl ShardId {
    /// `None` if `id >= MAX_SHARDS`.
    pub const fn new(id: usize) -> Option<ShardId> {
        if id < MAX_SHARDS {
            Some(ShardId(id as u8))
        } else {
            None
        }
    }

    pub const fn index(self) -> usize {
        self.0 as usize
    }

    pub const fn bit(self) -> u64 {
        1u64 << self.0
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard{}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteOp {
    /// `shard` now has at least one subscriber on `filter`.
    Add,
    /// `shard` no longer has any subscriber on `filter`.
    Remove,
}

/// A change of one shard's presence on one filter (shared filters keep their
/// `$share/{group}/` prefix: each group is routed separately). Send + cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteDelta {
    pub filter: TopicFilter,
    pub shard: ShardId,
    pub op: RouteOp,
}

/// Shard masks at one filter node.
#[derive(Default)]
pub(crate) struct Routes {
    plain: u64,
    /// One entry per share group at this filter; the full `$share/g/f` filter is kept so a
    /// match can name the group to the shard chosen to serve it.
    shared: Vec<(TopicFilter, u64)>,
}

impl Payload for Routes {
    fn is_empty(&self) -> bool {
        self.plain == 0 && self.shared.is_empty()
    }
}

/// Result of [`RoutingReplica::match_shards`]; reuse one across publishes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ShardMatch {
    /// Shards with at least one plain subscriber matching the topic.
    pub plain: u64,
    /// Each matching share group (its full `$share/g/f` filter) and the shards that have
    /// members of it. Exactly one shard per group must be sent the message for that group.
    pub groups: Vec<(TopicFilter, u64)>,
}

impl ShardMatch {
    pub fn clear(&mut self) {
        self.plain = 0;
        self.groups.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.plain == 0 && self.groups.is_empty()
    }

    /// Choose one shard per group (see [`pick_shard`]) into `chosen` (not cleared) and return
    /// the mask of every shard that must receive the message: plain subscribers' shards plus
    /// the chosen ones.
    pub fn choose(&self, counter: u64, chosen: &mut Vec<(TopicFilter, ShardId)>) -> u64 {
        let mut mask = self.plain;
        for (i, (filter, shards)) in self.groups.iter().enumerate() {
            if let Some(s) = pick_shard(*shards, counter.wrapping_add(i as u64)) {
                mask |= s.bit();
                chosen.push((filter.clone(), s));
            }
        }
        mask
    }
}

/// What a publishing shard sends to another shard (and, in effect, tells itself): the
/// message, whether the destination has plain subscribers to serve, and the share groups it
/// was chosen to serve (one member each). `Send`; the payload is shared, not copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub message: Message,
    pub plain: bool,
    pub groups: SmallVec<[TopicFilter; 1]>,
}

impl ShardMatch {
    /// The work for shard `dest` after [`ShardMatch::choose`] returned `chosen`: whether it
    /// serves plain subscribers and which groups (appended to `groups`). Returns false when
    /// `dest` has nothing to do.
    pub fn work_for(
        &self,
        dest: ShardId,
        chosen: &[(TopicFilter, ShardId)],
        groups: &mut SmallVec<[TopicFilter; 1]>,
    ) -> bool {
        let before = groups.len();
        groups.extend(
            chosen
                .iter()
                .filter(|(_, s)| *s == dest)
                .map(|(f, _)| f.clone()),
        );
        self.plain & dest.bit() != 0 || groups.len() > before
    }
}

/// The `(counter % n)`-th of the `n` shards set in `mask`; `None` if the mask is empty.
pub fn pick_shard(mask: u64, counter: u64) -> Option<ShardId> {
    let n = mask.count_ones();
    if n == 0 {
        return None;
    }
    let mut k = (counter % u64::from(n)) as u32;
    let mut m = mask;
    while k > 0 {
        m &= m - 1; // drop the lowest set bit
        k -= 1;
    }
    ShardId::new(m.trailing_zeros() as usize)
}

/// Iterate the shards set in `mask`.
pub fn shards_in(mask: u64) -> impl Iterator<Item = ShardId> {
    let mut m = mask;
    std::iter::from_fn(move || {
        if m == 0 {
            return None;
        }
        let i = m.trailing_zeros() as usize;
        m &= m - 1;
        ShardId::new(i)
    })
}

/// Filter → shards with subscribers, identical on every shard.
#[derive(Default)]
pub struct RoutingReplica {
    trie: Trie<Routes>,
    /// Number of (filter, shard) routes set.
    routes: usize,
}

impl RoutingReplica {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of (filter, shard) pairs present.
    pub fn len(&self) -> usize {
        self.routes
    }

    pub fn is_empty(&self) -> bool {
        self.routes == 0
    }

    pub fn node_count(&self) -> usize {
        self.trie.node_count()
    }

    /// Apply a delta: `Add` sets the shard's bit on the filter, `Remove` clears it. Returns
    /// whether anything changed (false for a repeated delta).
    pub fn apply(&mut self, delta: &RouteDelta) -> bool {
        let bit = delta.shard.bit();
        match delta.op {
            RouteOp::Add => {
                let routes = self.trie.get_or_create(delta.filter.levels());
                let mask = match delta.filter.share_group() {
                    None => &mut routes.plain,
                    Some(name) => {
                        let i = match routes
                            .shared
                            .iter()
                            .position(|(f, _)| f.share_group() == Some(name))
                        {
                            Some(i) => i,
                            None => {
                                routes.shared.push((delta.filter.clone(), 0));
                                routes.shared.len() - 1
                            }
                        };
                        &mut routes.shared[i].1
                    }
                };
                let changed = *mask & bit == 0;
                *mask |= bit;
                self.routes += usize::from(changed);
                // An Add for an already-set bit on a fresh group cannot happen: a new group
                // starts at 0 and gets the bit here.
                changed
            }
            RouteOp::Remove => {
                let Some(routes) = self.trie.get_mut(delta.filter.levels()) else {
                    return false;
                };
                let changed = match delta.filter.share_group() {
                    None => {
                        let changed = routes.plain & bit != 0;
                        routes.plain &= !bit;
                        changed
                    }
                    Some(name) => {
                        let Some(i) = routes
                            .shared
                            .iter()
                            .position(|(f, _)| f.share_group() == Some(name))
                        else {
                            return false;
                        };
                        let changed = routes.shared[i].1 & bit != 0;
                        routes.shared[i].1 &= !bit;
                        if routes.shared[i].1 == 0 {
                            routes.shared.swap_remove(i);
                        }
                        changed
                    }
                };
                let empty = routes.is_empty();
                self.routes -= usize::from(changed);
                if empty {
                    self.trie.prune(delta.filter.levels());
                }
                changed
            }
        }
    }

    /// The shards a publish to `topic` must reach, into `out` (cleared first). Allocation-free
    /// when no share group matches (plain routes are OR-ed into one mask); matching groups
    /// clone their filter (a refcount bump) into `out.groups`, reused across calls.
    pub fn match_shards(&self, topic: &TopicName, out: &mut ShardMatch) {
        out.clear();
        self.trie.for_each_match(topic.as_str(), |routes| {
            out.plain |= routes.plain;
            for (f, mask) in &routes.shared {
                out.groups.push((f.clone(), *mask));
            }
        });
    }

    /// Every route of `shard`, as `Remove` deltas would clear them: for a shard that restarts
    /// with an empty table. Returns how many routes were removed.
    pub fn remove_shard(&mut self, shard: ShardId) -> usize {
        let mut filters = Vec::new();
        collect_filters(&self.trie, shard.bit(), &mut filters);
        let mut n = 0;
        for filter in filters {
            n += usize::from(self.apply(&RouteDelta {
                filter,
                shard,
                op: RouteOp::Remove,
            }));
        }
        n
    }
}

/// Every filter (shared ones with their prefix) where `bit` is set. Rare, so it may allocate.
fn collect_filters(trie: &Trie<Routes>, bit: u64, out: &mut Vec<TopicFilter>) {
    use super::trie::Node;
    let mut stack: Vec<(&Node<Routes>, String)> = vec![(&trie.root, String::new())];
    while let Some((node, path)) = stack.pop() {
        if node.payload.plain & bit != 0 {
            if let Ok(f) = TopicFilter::new(path.clone()) {
                out.push(f);
            }
        }
        for (f, mask) in &node.payload.shared {
            if mask & bit != 0 {
                out.push(f.clone());
            }
        }
        for (level, child) in node.all_children() {
            let p = if std::ptr::eq(node, &trie.root) {
                level.to_string()
            } else {
                format!("{path}/{level}")
            };
            stack.push((child, p));
        }
    }
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
    fn s(i: usize) -> ShardId {
        ShardId::new(i).unwrap()
    }
    fn delta(filter: &str, shard: usize, op: RouteOp) -> RouteDelta {
        RouteDelta {
            filter: f(filter),
            shard: s(shard),
            op,
        }
    }

    #[test]
    fn cross_shard_values_are_send() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<RouteDelta>();
        assert_send::<Forward>();
    }

    #[test]
    fn shard_ids_are_bounded_by_the_mask_width() {
        assert!(ShardId::new(63).is_some());
        assert!(ShardId::new(64).is_none());
        assert_eq!(s(63).bit(), 1 << 63);
    }

    #[test]
    fn apply_sets_and_clears_bits_idempotently() {
        let mut r = RoutingReplica::new();
        assert!(r.apply(&delta("fleet/+/telemetry", 1, RouteOp::Add)));
        assert!(!r.apply(&delta("fleet/+/telemetry", 1, RouteOp::Add)));
        assert!(r.apply(&delta("fleet/#", 3, RouteOp::Add)));
        assert!(r.apply(&delta("fleet/s1/telemetry", 1, RouteOp::Add)));
        assert_eq!(r.len(), 3);
        let mut m = ShardMatch::default();
        r.match_shards(&t("fleet/s1/telemetry"), &mut m);
        assert_eq!(m.plain, s(1).bit() | s(3).bit());
        assert!(m.groups.is_empty());
        r.match_shards(&t("other/x"), &mut m);
        assert!(m.is_empty());

        assert!(r.apply(&delta("fleet/+/telemetry", 1, RouteOp::Remove)));
        assert!(!r.apply(&delta("fleet/+/telemetry", 1, RouteOp::Remove)));
        assert!(!r.apply(&delta("never/added", 1, RouteOp::Remove)));
        r.match_shards(&t("fleet/s2/telemetry"), &mut m);
        assert_eq!(m.plain, s(3).bit());
        r.apply(&delta("fleet/#", 3, RouteOp::Remove));
        r.apply(&delta("fleet/s1/telemetry", 1, RouteOp::Remove));
        assert!(r.is_empty());
        assert_eq!(r.node_count(), 0);
    }

    #[test]
    fn share_groups_are_reported_per_group_with_their_shards() {
        let mut r = RoutingReplica::new();
        r.apply(&delta("$share/g/jobs/+", 0, RouteOp::Add));
        r.apply(&delta("$share/g/jobs/+", 2, RouteOp::Add));
        r.apply(&delta("$share/h/jobs/+", 5, RouteOp::Add));
        r.apply(&delta("jobs/+", 7, RouteOp::Add));
        let mut m = ShardMatch::default();
        r.match_shards(&t("jobs/1"), &mut m);
        assert_eq!(m.plain, s(7).bit());
        let mut groups = m.groups.clone();
        groups.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        assert_eq!(
            groups,
            vec![
                (f("$share/g/jobs/+"), s(0).bit() | s(2).bit()),
                (f("$share/h/jobs/+"), s(5).bit())
            ]
        );
        // One shard per group, alternating with the counter.
        let mut chosen = Vec::new();
        let mut g_shards = Vec::new();
        for counter in 0..4 {
            chosen.clear();
            let mask = m.choose(counter, &mut chosen);
            assert_eq!(chosen.len(), 2);
            for (filter, shard) in &chosen {
                assert_ne!(mask & shard.bit(), 0);
                if filter.share_group() == Some("g") {
                    g_shards.push(shard.index());
                } else {
                    assert_eq!(shard.index(), 5);
                }
            }
            assert_ne!(mask & s(7).bit(), 0);
        }
        g_shards.sort_unstable();
        assert_eq!(g_shards, vec![0, 0, 2, 2]);
        r.apply(&delta("$share/g/jobs/+", 0, RouteOp::Remove));
        r.apply(&delta("$share/g/jobs/+", 2, RouteOp::Remove));
        r.match_shards(&t("jobs/1"), &mut m);
        assert_eq!(m.groups, vec![(f("$share/h/jobs/+"), s(5).bit())]);
    }

    #[test]
    fn pick_shard_walks_the_set_bits() {
        let mask = s(1).bit() | s(4).bit() | s(63).bit();
        let picked: Vec<usize> = (0..6)
            .map(|c| pick_shard(mask, c).unwrap().index())
            .collect();
        assert_eq!(picked, vec![1, 4, 63, 1, 4, 63]);
        assert_eq!(pick_shard(0, 3), None);
        assert_eq!(
            shards_in(mask).map(ShardId::index).collect::<Vec<_>>(),
            vec![1, 4, 63]
        );
    }

    #[test]
    fn remove_shard_clears_all_its_routes() {
        let mut r = RoutingReplica::new();
        r.apply(&delta("a/+/c", 2, RouteOp::Add));
        r.apply(&delta("a/#", 2, RouteOp::Add));
        r.apply(&delta("+", 2, RouteOp::Add));
        r.apply(&delta("$share/g/a/b", 2, RouteOp::Add));
        r.apply(&delta("a/#", 1, RouteOp::Add));
        assert_eq!(r.remove_shard(s(2)), 4);
        assert_eq!(r.len(), 1);
        let mut m = ShardMatch::default();
        r.match_shards(&t("a/b"), &mut m);
        assert_eq!(m.plain, s(1).bit());
        assert!(m.groups.is_empty());
    }
}
