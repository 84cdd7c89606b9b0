//! Sequence accounting: loss, duplicates and reordering of one publisher's stream as seen by
//! one receiver (a subscriber, or a shared-subscription group).
//!
//! Owns: a growable bitmap of received sequence numbers, so loss is exact (sent - distinct
//! received) whatever the arrival order, and duplicates are exact (a bit already set). Must not
//! touch: I/O. Memory: one bit per sequence number; the loadgen caps messages per run.

/// What one receiver saw of one publisher's stream. Serializable so that worker processes
/// of a `fleet --procs` run hand their views to the coordinator, which merges them.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SeqTracker {
    bits: Vec<u64>,
    /// Highest sequence number seen so far (+1), for reorder detection.
    high: u64,
    /// Distinct sequence numbers received.
    pub distinct: u64,
    /// Arrivals of a sequence number already received.
    pub duplicates: u64,
    /// First arrivals of a sequence number lower than one already received.
    pub reordered: u64,
}

/// Hard cap on a tracked sequence number (a corrupt payload must not allocate gigabytes).
pub const MAX_SEQ: u64 = 1 << 32;

impl SeqTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record an arrival. Returns false if `seq` is beyond [`MAX_SEQ`] (ignored).
    pub fn record(&mut self, seq: u64) -> bool {
        if seq >= MAX_SEQ {
            return false;
        }
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.bits.len() {
            // Grow geometrically so a long stream costs amortised O(1) per message.
            let want = (w + 1).max(self.bits.len() * 2).max(16);
            self.bits.resize(want, 0);
        }
        let mask = 1u64 << b;
        if self.bits[w] & mask != 0 {
            self.duplicates += 1;
            return true;
        }
        self.bits[w] |= mask;
        self.distinct += 1;
        if seq + 1 < self.high {
            self.reordered += 1;
        }
        self.high = self.high.max(seq + 1);
        true
    }

    /// Messages never received out of `sent` (sequence numbers 0..sent).
    pub fn lost(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.distinct_below(sent))
    }

    /// Distinct sequence numbers received that are below `n`.
    pub fn distinct_below(&self, n: u64) -> u64 {
        let full = (n / 64) as usize;
        let mut c: u64 = self
            .bits
            .iter()
            .take(full)
            .map(|w| w.count_ones() as u64)
            .sum();
        let rem = n % 64;
        if rem > 0 {
            if let Some(w) = self.bits.get(full) {
                c += (w & ((1u64 << rem) - 1)).count_ones() as u64;
            }
        }
        c
    }

    /// Merge another receiver's view of the same stream (shared subscriptions: the group
    /// receives each message once across members). Overlap counts as duplicates; reorder
    /// counts add (each member's own arrival order).
    pub fn merge(&mut self, other: &SeqTracker) {
        if other.bits.len() > self.bits.len() {
            self.bits.resize(other.bits.len(), 0);
        }
        let mut overlap = 0u64;
        for (a, b) in self.bits.iter_mut().zip(other.bits.iter()) {
            overlap += (*a & *b).count_ones() as u64;
            *a |= *b;
        }
        self.distinct = self.distinct + other.distinct - overlap;
        self.duplicates += other.duplicates + overlap;
        self.reordered += other.reordered;
        self.high = self.high.max(other.high);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_has_no_loss_dup_or_reorder() {
        let mut t = SeqTracker::new();
        for s in 0..1000 {
            t.record(s);
        }
        assert_eq!((t.distinct, t.duplicates, t.reordered), (1000, 0, 0));
        assert_eq!(t.lost(1000), 0);
    }

    #[test]
    fn gaps_are_loss_including_the_tail() {
        let mut t = SeqTracker::new();
        for s in [0, 1, 2, 5, 6] {
            t.record(s);
        }
        // 3 and 4 missing in the middle, 7..10 never arrived.
        assert_eq!(t.lost(10), 5);
        assert_eq!(t.reordered, 0);
    }

    #[test]
    fn late_arrival_fills_gap_and_counts_as_reordered() {
        let mut t = SeqTracker::new();
        for s in [0, 1, 3, 2, 4] {
            t.record(s);
        }
        assert_eq!(t.lost(5), 0);
        assert_eq!(t.reordered, 1);
        assert_eq!(t.duplicates, 0);
    }

    #[test]
    fn duplicates_are_counted_not_double_counted_as_received() {
        let mut t = SeqTracker::new();
        for s in [0, 1, 1, 2, 0, 2] {
            t.record(s);
        }
        assert_eq!(t.distinct, 3);
        assert_eq!(t.duplicates, 3);
        assert_eq!(t.reordered, 0, "a duplicate is not a reorder");
        assert_eq!(t.lost(3), 0);
    }

    #[test]
    fn absurd_sequence_numbers_are_ignored() {
        let mut t = SeqTracker::new();
        assert!(!t.record(u64::MAX));
        assert_eq!(t.distinct, 0);
    }

    #[test]
    fn merge_of_shared_group_members() {
        // Two members of a shared group split a 0..10 stream; 4 was delivered to both.
        let mut a = SeqTracker::new();
        let mut b = SeqTracker::new();
        for s in [0, 2, 4, 6, 8] {
            a.record(s);
        }
        for s in [1, 3, 4, 5, 7, 9] {
            b.record(s);
        }
        a.merge(&b);
        assert_eq!(a.distinct, 10);
        assert_eq!(a.duplicates, 1);
        assert_eq!(a.lost(10), 0);
        assert_eq!(a.lost(12), 2);
    }

    #[test]
    fn word_boundaries() {
        let mut t = SeqTracker::new();
        for s in [63, 64, 127, 128] {
            t.record(s);
        }
        assert_eq!(t.distinct_below(64), 1);
        assert_eq!(t.distinct_below(65), 2);
        assert_eq!(t.distinct_below(129), 4);
        assert_eq!(t.lost(129), 125);
    }
}
