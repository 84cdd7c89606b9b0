//! Every timer of a shard in one heap, so the driver arms one timer per shard.
//!
//! Owns: [`Timers`] (deadline-ordered entries naming what to check) and the dispatch of due
//! entries to their owners. Must not touch: what each timer decides (the owner re-checks its
//! own state: entries are hints and may be stale).
//!
//! Why one heap: a glommio timer is an io_uring submission (and a cancel when dropped), so a
//! timer per connection re-armed on every packet costs on every message. Here a connection's
//! keepalive deadline moves forward with each packet without touching the heap; when its old
//! entry pops, the session reports its real deadline and one new entry goes in. An idle
//! device costs one heap entry per keepalive period and nothing in between. Session entries
//! are rounded up to a 250 ms grid, so thousands of devices share a few wake-ups a second.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::registry::ConnKey;
use super::ShardCore;

/// What a timer entry asks to re-check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TimerKind {
    /// A session's own timers: keepalive, will delay, session expiry.
    Session(ConnKey),
    /// A registration waiting for its home shard.
    Register(ConnKey),
    /// A connection's output waiting for peers to settle.
    Gate(ConnKey),
    /// A full subscriber's stall check.
    Stall(ConnKey),
    /// A parked (moved-away) session.
    Park(ConnKey),
    /// A session moving here, waiting for the switch to finish.
    Switch(ConnKey),
    /// A socket that stopped accepting bytes.
    WriteStall(ConnKey),
    /// A connection's output waiting for the disk (for the record count given).
    Durable(ConnKey, u64),
    /// A connection's input waiting for the store's backlog to drain.
    StoreHeld(ConnKey),
}

/// The grid session timers are rounded up to (see [`Timers::coarse`]).
pub(crate) const SESSION_TIMER_GRID: Duration = Duration::from_millis(250);

#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, TimerKind)>>,
    /// Origin of the session-timer grid (the first deadline rounded).
    grid: Option<Instant>,
}

impl Timers {
    /// `t` rounded up to the next point of a [`SESSION_TIMER_GRID`] grid. Session timers
    /// (keepalive, will delay, session expiry) are seconds long, and each device's falls due
    /// at its own instant: rounded, the shard wakes at most four times a second for all of
    /// them instead of once per device (15,000 devices with a 30 s keepalive made ~330
    /// wake-ups a second, each a sleep and a wake of the shard). They fire up to 250 ms late.
    pub fn coarse(&mut self, t: Instant) -> Instant {
        let grid = *self.grid.get_or_insert(t);
        let Some(since) = t.checked_duration_since(grid) else {
            return t; // before the origin: not worth a grid of its own
        };
        let step = SESSION_TIMER_GRID.as_nanos();
        let steps = since.as_nanos().div_ceil(step);
        grid + Duration::from_nanos((steps * step) as u64)
    }

    pub fn push(&mut self, at: Instant, kind: TimerKind) {
        self.heap.push(Reverse((at, kind)));
    }

    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _))| *t)
    }

    fn pop_due(&mut self, now: Instant) -> Option<(Instant, TimerKind)> {
        match self.heap.peek() {
            Some(Reverse((t, _))) if *t <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }
}

impl ShardCore {
    pub(super) fn on_tick(&mut self, now: Instant) {
        while let Some((at, kind)) = self.timers.pop_due(now) {
            match kind {
                TimerKind::Session(k) => self.session_timer(k, at, now),
                TimerKind::Register(k) => self.check_register(k, now),
                TimerKind::Gate(k) => self.check_gate(k, now),
                TimerKind::Stall(k) => self.check_stall(k, now),
                TimerKind::Park(k) => self.check_parked(k, now),
                TimerKind::Switch(k) => self.check_switching(k, now),
                TimerKind::WriteStall(k) => self.check_write_stall(k, now),
                TimerKind::Durable(k, upto) => self.check_durable(k, upto, now),
                TimerKind::StoreHeld(k) => self.check_store_held(k, now),
            }
        }
    }

    fn session_timer(&mut self, key: ConnKey, at: Instant, now: Instant) {
        let Some(e) = self.sessions.get_mut(&key) else {
            return;
        };
        if e.timer_armed != Some(at) {
            return; // superseded by an earlier entry, which already ran or will run
        }
        e.timer_armed = None;
        // Once per keepalive period at most: an idle session gives back its empty queues.
        e.session.shrink_idle();
        match e.session.poll_timeout() {
            Some(t) if t <= now => {
                e.session.handle_timeout(now);
                self.pump(key, now);
            }
            _ => {}
        }
        // Re-arm at the session's real deadline (it moves forward with every packet).
        self.after_session_input(key);
    }

    /// Distinct instants the shard's timer will wake at for session timers, for tests.
    #[cfg(test)]
    pub fn session_timer_wakeups(&self) -> usize {
        let mut at: Vec<Instant> = (self.timers.heap.iter())
            .filter(|Reverse((_, k))| matches!(k, TimerKind::Session(_)))
            .map(|Reverse((t, _))| *t)
            .collect();
        at.sort();
        at.dedup();
        at.len()
    }

    /// Heap entries, for tests that check idle connections cost nothing.
    pub fn timer_entries(&self) -> usize {
        self.timers.len()
    }
}
