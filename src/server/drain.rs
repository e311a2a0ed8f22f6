//! Graceful drain: on shutdown, connections finish the request in hand and close.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{Notify, watch};

/// A connection that can be told to finish the request in hand and close.
pub(super) trait Graceful: Future {
    /// Starts the graceful shutdown.
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<C: GracefulConnection> Graceful for C {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        GracefulConnection::graceful_shutdown(self);
    }
}

/// Tells open connections to finish the request in hand and close, and waits until they have.
///
/// hyper-util's `GracefulShutdown` does the same, but polls its shutdown signal (a `watch`
/// receiver, through its `Notify`) on every poll of every connection: once per forwarded chunk
/// (BENCHMARKS.md has what that cost). Here a connection polls the
/// signal only when its waker changes or the drain has begun, and otherwise reads one flag.
pub(super) struct Drain {
    signal: Signal,
    /// Every watched connection holds a receiver; `closed` resolves when all are dropped.
    alive: watch::Sender<()>,
}

/// The drain's flag and the wake-up that goes with it.
#[derive(Clone)]
struct Signal {
    /// Set before `notify` wakes the connections, so a poll that sees it polls the wake-up.
    draining: Arc<AtomicBool>,
    notify: Arc<Notify>,
}

impl Drain {
    pub(super) fn new() -> Self {
        Drain {
            signal: Signal {
                draining: Arc::new(AtomicBool::new(false)),
                notify: Arc::new(Notify::new()),
            },
            alive: watch::channel(()).0,
        }
    }

    /// A handle for one connection, taken when it is accepted: it counts as open from then on.
    pub(super) fn watcher(&self) -> Watcher {
        Watcher {
            signal: self.signal.clone(),
            alive: self.alive.subscribe(),
        }
    }

    /// Tells every watched connection to shut down gracefully, then resolves once all of them
    /// (and every watcher not yet used) are gone.
    pub(super) async fn shutdown(self) {
        self.signal.draining.store(true, Ordering::Release);
        self.signal.notify.notify_waiters();
        self.alive.closed().await;
    }
}

/// One connection's share of a [`Drain`].
pub(super) struct Watcher {
    signal: Signal,
    alive: watch::Receiver<()>,
}

impl Watcher {
    /// `conn`, shut down gracefully once the drain begins (at once if it already has).
    pub(super) fn watch<C: Graceful>(self, conn: C) -> Watched<C> {
        Watched {
            conn,
            // Created now, so it sees a drain that begins before its first poll.
            notified: self.signal.notify.notified_owned(),
            draining: self.signal.draining,
            registered: None,
            stopping: false,
            _alive: self.alive,
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection that a [`Drain`] can shut down gracefully.
    pub(super) struct Watched<C> {
        #[pin]
        conn: C,
        #[pin]
        notified: OwnedNotified,
        draining: Arc<AtomicBool>,
        // The waker `notified` was last polled with: while the task's waker stays the same, a
        // drain wakes it and sets the flag, so `notified` need not be polled again until then.
        registered: Option<Waker>,
        stopping: bool,
        _alive: watch::Receiver<()>,
    }
}

impl<C: Graceful> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if !*this.stopping {
            // The flag is what says a drain began (`notified` misses one that began before it
            // was created); `notified` is there to wake an idle connection when it does.
            let mut begun = this.draining.load(Ordering::Acquire);
            let stale = this
                .registered
                .as_ref()
                .is_none_or(|waker| !waker.will_wake(cx.waker()));
            if !begun && stale {
                begun = this.notified.as_mut().poll(cx).is_ready();
                *this.registered = Some(cx.waker().clone());
            }
            if begun {
                *this.stopping = true;
                this.conn.as_mut().graceful_shutdown();
            }
        }
        this.conn.poll(cx)
    }
}
