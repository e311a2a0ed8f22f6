//! A number for each poll of a client connection's task, so that a response body can tell
//! that it is polled again within the same poll of its connection.
//!
//! A client connection ([`crate::serve_h1`]) polls the response body again after each chunk, to
//! write the frames that are ready together in one write. Nothing can arrive for the body
//! between two polls of one turn without waking the task (and a woken task is polled again, in
//! a new turn), so a body that has registered the task for its socket's next bytes in this
//! turn (the upstream body does so when it hands on a chunk that empties its buffer) may answer
//! `Pending` again without asking the socket: no readiness check, lock or layers above it.
//!
//! Outside a connection's poll (an HTTP/2 stream runs in a task of its own) the turn is `None`,
//! and nothing may be skipped.

use std::cell::Cell;
use std::future::Future;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

/// Turns are numbered across threads: a task may be polled on another worker next time, and
/// must not meet its old number there.
static LAST: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static CURRENT: Cell<Option<NonZeroU64>> = const { Cell::new(None) };
}

/// The turn the calling code runs in, if it runs inside [`Turn::begin`]'s scope.
pub fn current() -> Option<NonZeroU64> {
    CURRENT.get()
}

/// A turn in progress; it ends when dropped (also when the poll panics).
pub struct Turn {
    outer: Option<NonZeroU64>,
}

impl Turn {
    /// Starts a new turn on this thread: called as a connection's task polls the connection.
    pub fn begin() -> Turn {
        let n = NonZeroU64::new(LAST.fetch_add(1, Ordering::Relaxed) + 1);
        Turn {
            outer: CURRENT.replace(n),
        }
    }
}

pin_project_lite::pin_project! {
    /// A future each poll of which is a turn of its own: what a connection's task polls.
    pub struct Turns<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Turns<F> {
    /// Wraps `inner`.
    pub fn new(inner: F) -> Self {
        Turns { inner }
    }
}

impl<F: Future> Future for Turns<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _turn = Turn::begin();
        self.project().inner.poll(cx)
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        CURRENT.set(self.outer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_turn_has_its_own_number_and_ends_when_dropped() {
        assert_eq!(current(), None);
        let first = Turn::begin();
        let a = current().expect("inside a turn");
        drop(first);
        assert_eq!(current(), None);
        let second = Turn::begin();
        let b = current().expect("inside a turn");
        assert_ne!(a, b);
        {
            let _inner = Turn::begin();
            assert_ne!(current(), Some(b));
        }
        assert_eq!(current(), Some(b), "an inner turn gives the outer one back");
        drop(second);
        assert_eq!(current(), None);
    }

    #[test]
    fn a_turn_ends_when_its_poll_panics() {
        let caught = std::panic::catch_unwind(|| {
            let _turn = Turn::begin();
            panic!("the poll panics");
        });
        assert!(caught.is_err());
        assert_eq!(current(), None);
    }
}
