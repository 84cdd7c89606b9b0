//! One peer's outgoing queue, with the durability barriers that hold it.
//!
//! Owns: the FIFO of messages for one peer shard and the points in it that may not pass
//! until this shard's log is durable up to some record. Must not touch: what the messages
//! mean (the core decides what needs a barrier), mailboxes (the driver moves what
//! [`PeerQueue::pop_front`] gives it).
//!
//! Why a barrier: a QoS 2 message forwarded to another shard before its own record is
//! durable can reach a subscriber there, and then be lost by a crash before the publisher got
//! its PUBREC; the publisher sends it again after the restart and the subscriber gets it
//! twice. Exactly-once needs the origin's record on disk before any copy leaves the shard.
//! A barrier stops the whole queue, not only that message: per-publisher order and the
//! takeover protocol rely on one FIFO per peer.

use std::collections::VecDeque;

use super::msg::PeerMsg;

#[derive(Default)]
pub(crate) struct PeerQueue {
    q: VecDeque<PeerMsg>,
    /// Messages ever popped (net of those given back): the position of `q`'s front.
    head: u64,
    /// (position in the queue, records that must be durable before it may leave), in order.
    gates: VecDeque<(u64, u64)>,
}

impl PeerQueue {
    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    pub fn push_back(&mut self, m: PeerMsg) {
        self.q.push_back(m);
    }

    /// Queue `m`, which may leave only once the first `upto` records are durable.
    pub fn push_back_after(&mut self, m: PeerMsg, upto: u64) {
        let pos = self.head + self.q.len() as u64;
        self.gates.push_back((pos, upto));
        self.q.push_back(m);
    }

    /// Something may leave now, with the log durable up to `durable`.
    pub fn ready(&self, durable: u64) -> bool {
        !self.q.is_empty() && !self.blocked(durable)
    }

    fn blocked(&self, durable: u64) -> bool {
        self.gates
            .front()
            .is_some_and(|&(pos, upto)| pos == self.head && upto > durable)
    }

    pub fn pop_front(&mut self, durable: u64) -> Option<PeerMsg> {
        if self.q.is_empty() || self.blocked(durable) {
            return None;
        }
        while self.gates.front().is_some_and(|&(pos, _)| pos <= self.head) {
            self.gates.pop_front();
        }
        self.head += 1;
        self.q.pop_front()
    }

    /// Give back the message just popped (the mailbox was full): it goes first again. Its
    /// barrier, if it had one, was passed already and stays passed.
    pub fn push_front(&mut self, m: PeerMsg) {
        self.head -= 1;
        self.q.push_front(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(seq: u64) -> PeerMsg {
        PeerMsg::Applied { seq }
    }

    fn seq(p: PeerMsg) -> u64 {
        match p {
            PeerMsg::Applied { seq } => seq,
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_barrier_holds_everything_behind_it_until_durable() {
        let mut q = PeerQueue::default();
        q.push_back(m(1));
        q.push_back_after(m(2), 5);
        q.push_back(m(3));
        q.push_back_after(m(4), 7);
        assert_eq!(q.pop_front(0).map(seq), Some(1));
        assert!(!q.ready(4));
        assert!(q.pop_front(4).is_none(), "record 5 is not durable");
        assert_eq!(q.pop_front(5).map(seq), Some(2));
        assert_eq!(q.pop_front(5).map(seq), Some(3), "no barrier of its own");
        assert!(q.pop_front(6).is_none());
        // Given back after passing its barrier: it does not wait again.
        let four = q.pop_front(7).unwrap();
        q.push_front(four);
        assert_eq!(q.pop_front(0).map(seq), Some(4));
        assert!(q.is_empty() && !q.ready(100));
    }

    #[test]
    fn a_queue_drained_and_refilled_keeps_its_positions() {
        let mut q = PeerQueue::default();
        q.push_back_after(m(1), 3);
        assert!(q.pop_front(2).is_none());
        q.push_back(m(2));
        assert_eq!(q.pop_front(3).map(seq), Some(1));
        assert_eq!(q.pop_front(3).map(seq), Some(2));
        q.push_back_after(m(3), 9);
        assert!(q.pop_front(8).is_none());
        assert_eq!(q.pop_front(9).map(seq), Some(3));
    }
}
