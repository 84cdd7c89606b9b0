//! A single-threaded wake-up flag: one waiter (a connection task), many notifiers (whoever
//! queued something for it on the same shard). Cheaper than a channel: a notification that
//! arrives while the task is busy is remembered as one bit, so bursts coalesce into one wake-up
//! and one batched write.

use std::cell::Cell;
use std::future::poll_fn;
use std::task::{Poll, Waker};

#[derive(Default)]
pub struct Notify {
    pending: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.pending.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Resolves once `notify` has been called since the last time this resolved.
    pub async fn notified(&self) {
        poll_fn(|cx| self.poll_notified(cx)).await
    }

    /// `notified` as a poll function, for tasks that wait on several things in one
    /// `poll_fn` (a connection: its socket and its wake-up).
    pub fn poll_notified(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.pending.replace(false) {
            Poll::Ready(())
        } else {
            // Re-use the stored waker when it would wake the same task (no clone per poll).
            match self.waker.take() {
                Some(w) if w.will_wake(cx.waker()) => self.waker.set(Some(w)),
                _ => self.waker.set(Some(cx.waker().clone())),
            }
            Poll::Pending
        }
    }
}

/// Many waiters, woken all at once (waiters re-check their own condition).
#[derive(Default)]
pub struct WaitList {
    wakers: std::cell::RefCell<Vec<Waker>>,
}

impl WaitList {
    pub fn wake_all(&self) {
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Resolves at the next `wake_all`.
    pub async fn wait(&self) {
        let mut registered = false;
        poll_fn(|cx| {
            if registered {
                Poll::Ready(())
            } else {
                registered = true;
                self.wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}
