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
        poll_fn(|cx| {
            if self.pending.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}
