//! Cross-shard mailboxes: one bounded lock-free queue per ordered pair of shards.
//!
//! Owns: the `Mailbox` trait, its glommio `channel_mesh` implementation, and the overflow
//! policy applied when a peer's queue is full. Must not touch: what the messages mean (that is
//! `shard::state`).
//!
//! Policy when a peer's queue is full (a slow or stalled shard must not stall the sender):
//! - control messages (route deltas, registry, session hand-over, retained updates) are never
//!   dropped: they wait, in order, in a per-peer overflow list drained by a flusher task. Their
//!   volume is bounded by client operations (connects, subscribes), not by message traffic.
//! - forwarded QoS 0 publishes are dropped and counted when the overflow list holds
//!   `OVERFLOW_DATA_CAP` entries;
//! - forwarded QoS 1/2 publishes are refused at that point ([`Forwarded::Full`]): the publishing
//!   connection stops reading and retries, so its PUBACK/PUBREC waits (backpressure on the
//!   publisher) instead of memory growing.
//!
//! Per ordered pair, everything goes through one FIFO (direct send only when nothing is
//! waiting in the overflow list), so per-publisher order holds across shards.
//!
//! The control backlog's bound (`RuntimeConfig::control_backlog_limit`): control messages
//! are still never dropped, but while any peer's overflow list is above the limit, the
//! sending shard refuses new connections (CONNACK 0x88 / 3.1.1 return code 3) — connects and
//! the subscriptions they bring are what make it grow. Waits on a peer's answer are bounded
//! by `peer_timeout` (registration: CONNACK 0x88 / 3; route confirmation before a SUBACK or
//! resumed CONNACK: the connection is closed), so a stalled peer cannot hold a client forever
//! and a client cannot queue more than one packet's worth of subscriptions behind it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use glommio::channels::channel_mesh::{Receivers, Senders};
use glommio::GlommioError;

use super::notify::Notify;

pub type ShardId = usize;

/// Entries a peer's overflow list may hold before data messages are refused.
pub const OVERFLOW_DATA_CAP: usize = 4096;

/// The sending half of a shard's mailboxes.
pub trait Mailbox<T> {
    fn shard_id(&self) -> ShardId;
    fn nr_shards(&self) -> usize;
    /// Queue `msg` for shard `to` (never this shard) without waiting; gives it back when full.
    fn try_send(&self, to: ShardId, msg: T) -> Result<(), T>;
}

/// `channel_mesh` senders: the mesh peer id is the shard id (shards join in shard order).
pub struct MeshMailbox<T: Send> {
    senders: Senders<T>,
}

impl<T: Send> MeshMailbox<T> {
    pub fn new(senders: Senders<T>) -> Self {
        MeshMailbox { senders }
    }

    pub fn close(&self) {
        self.senders.close();
    }
}

impl<T: Send> Mailbox<T> for MeshMailbox<T> {
    fn shard_id(&self) -> ShardId {
        self.senders.peer_id()
    }
    fn nr_shards(&self) -> usize {
        self.senders.nr_consumers()
    }
    fn try_send(&self, to: ShardId, msg: T) -> Result<(), T> {
        self.senders.try_send_to(to, msg).map_err(|e| match e {
            GlommioError::WouldBlock(glommio::ResourceType::Channel(m))
            | GlommioError::Closed(glommio::ResourceType::Channel(m)) => m,
            // try_send_to only fails with the message inside, except for a bad peer index,
            // which shard code never produces; there is nothing to give back then.
            other => panic!("mesh send to shard {to} failed: {other}"),
        })
    }
}

/// Outcome of forwarding a publish.
pub enum Forwarded<T> {
    Sent,
    /// QoS 0 and the peer is saturated: dropped (counted by the caller).
    Dropped,
    /// QoS 1/2 and the peer is saturated: the caller holds it and retries.
    Full(T),
}

/// Adds the overflow policy above to a `Mailbox`.
pub struct Outbox<T, M: Mailbox<T>> {
    mailbox: M,
    overflow: Vec<RefCell<VecDeque<T>>>,
    flushers: Vec<Rc<Notify>>,
    pub dropped_qos0: Cell<u64>,
}

impl<T, M: Mailbox<T>> Outbox<T, M> {
    pub fn new(mailbox: M) -> Self {
        let n = mailbox.nr_shards();
        Outbox {
            mailbox,
            overflow: (0..n).map(|_| RefCell::new(VecDeque::new())).collect(),
            flushers: (0..n).map(|_| Rc::new(Notify::default())).collect(),
            dropped_qos0: Cell::new(0),
        }
    }

    pub fn shard_id(&self) -> ShardId {
        self.mailbox.shard_id()
    }

    pub fn nr_shards(&self) -> usize {
        self.mailbox.nr_shards()
    }

    pub fn mailbox(&self) -> &M {
        &self.mailbox
    }

    /// Send a control message; never dropped (see module doc).
    pub fn send_control(&self, to: ShardId, msg: T) {
        let mut q = self.overflow[to].borrow_mut();
        if q.is_empty() {
            match self.mailbox.try_send(to, msg) {
                Ok(()) => return,
                Err(m) => q.push_back(m),
            }
        } else {
            q.push_back(msg);
        }
        self.flushers[to].notify();
    }

    /// Forward a data message; `droppable` is true for QoS 0.
    pub fn send_data(&self, to: ShardId, msg: T, droppable: bool) -> Forwarded<T> {
        let mut q = self.overflow[to].borrow_mut();
        if q.is_empty() {
            match self.mailbox.try_send(to, msg) {
                Ok(()) => return Forwarded::Sent,
                Err(m) => {
                    q.push_back(m);
                    self.flushers[to].notify();
                    return Forwarded::Sent;
                }
            }
        }
        if q.len() >= OVERFLOW_DATA_CAP {
            if droppable {
                self.dropped_qos0.set(self.dropped_qos0.get() + 1);
                return Forwarded::Dropped;
            }
            return Forwarded::Full(msg);
        }
        q.push_back(msg);
        self.flushers[to].notify();
        Forwarded::Sent
    }

    /// One round of draining peer `to`'s overflow list into its queue; returns true when the
    /// list is empty. The flusher task calls this, then yields or waits.
    pub fn flush(&self, to: ShardId) -> bool {
        let mut q = self.overflow[to].borrow_mut();
        while let Some(m) = q.pop_front() {
            if let Err(m) = self.mailbox.try_send(to, m) {
                q.push_front(m);
                return false;
            }
        }
        true
    }

    /// Messages waiting in peer `to`'s overflow list (beyond its mailbox).
    pub fn backlog(&self, to: ShardId) -> usize {
        self.overflow[to].borrow().len()
    }

    pub fn flusher(&self, to: ShardId) -> Rc<Notify> {
        self.flushers[to].clone()
    }
}

/// Receiving half: spawn one task per peer that hands each message to `handle`.
pub fn spawn_receivers<T: Send + 'static>(
    mut receivers: Receivers<T>,
    handle: Rc<dyn Fn(ShardId, T)>,
) -> Vec<glommio::task::JoinHandle<()>> {
    receivers
        .streams()
        .into_iter()
        .map(|(peer, rx)| {
            let handle = handle.clone();
            glommio::spawn_local(async move {
                while let Some(msg) = rx.recv().await {
                    handle(peer, msg);
                }
            })
            .detach()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mailbox with a fixed capacity per peer, to test the overflow policy without glommio.
    struct FakeMailbox {
        cap: usize,
        queues: Vec<RefCell<Vec<u32>>>,
    }

    impl Mailbox<u32> for FakeMailbox {
        fn shard_id(&self) -> ShardId {
            0
        }
        fn nr_shards(&self) -> usize {
            self.queues.len()
        }
        fn try_send(&self, to: ShardId, msg: u32) -> Result<(), u32> {
            let mut q = self.queues[to].borrow_mut();
            if q.len() >= self.cap {
                Err(msg)
            } else {
                q.push(msg);
                Ok(())
            }
        }
    }

    fn outbox(cap: usize) -> Outbox<u32, FakeMailbox> {
        Outbox::new(FakeMailbox {
            cap,
            queues: (0..2).map(|_| RefCell::new(Vec::new())).collect(),
        })
    }

    #[test]
    fn control_messages_are_never_dropped_and_keep_order() {
        let o = outbox(1);
        for i in 0..10 {
            o.send_control(1, i);
        }
        assert_eq!(*o.mailbox.queues[1].borrow(), vec![0]);
        // The consumer drains; the flusher moves the rest in order.
        let mut seen = Vec::new();
        while !o.flush(1) || !o.mailbox.queues[1].borrow().is_empty() {
            seen.append(&mut o.mailbox.queues[1].borrow_mut());
        }
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn saturated_peer_drops_qos0_and_refuses_qos1() {
        let o = outbox(0);
        for i in 0..OVERFLOW_DATA_CAP as u32 {
            assert!(matches!(o.send_data(1, i, false), Forwarded::Sent));
        }
        assert!(matches!(o.send_data(1, 1, true), Forwarded::Dropped));
        assert_eq!(o.dropped_qos0.get(), 1);
        assert!(matches!(o.send_data(1, 7, false), Forwarded::Full(7)));
        // Control still goes through.
        o.send_control(1, 99);
        assert_eq!(o.overflow[1].borrow().back(), Some(&99));
    }

    #[test]
    fn data_after_queued_control_stays_behind_it() {
        let o = outbox(1);
        o.send_control(1, 1);
        o.send_control(1, 2); // overflows
        assert!(matches!(o.send_data(1, 3, true), Forwarded::Sent));
        assert_eq!(
            o.overflow[1].borrow().iter().copied().collect::<Vec<_>>(),
            [2, 3]
        );
    }
}
