//! A client connection's socket, with the waits on the client bounded.
//!
//! The proxy waits on a client in three places that its HTTP server does not bound by itself:
//! for a request head, between requests on a kept-alive connection, and for a client that stopped
//! reading what is written to it. [`ClientIo`] enforces those limits at the socket, where every
//! one of those waits ends up, and only while the proxy waits on the client: a request in hand
//! (the upstream is working) has no read deadline, and a write that goes through has no timer.
//!
//! Which phase an HTTP/1.1 connection is in comes from [`ConnState`], which the service sets
//! when a request's head has been read and the response body clears when it has ended: between
//! the two, the request is in hand. The read side sees the rest: the first byte after a response
//! starts the next head.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::telemetry::CloseReason;

/// The answer to a request head that did not arrive in time. Written straight to the socket:
/// the server has written nothing for this request, and the connection closes after it.
static TIMEOUT_408: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let body = r#"{"error":{"message":"tokentap: the request head did not arrive within proxy.header_timeout_secs","type":"invalid_request_error","param":null,"code":408}}"#;
    format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// What the parts of one client connection tell each other.
#[derive(Debug, Default)]
pub(super) struct ConnState {
    /// HTTP/1.1: a request is in hand (its head was read, its response has not ended).
    busy: AtomicBool,
    /// HTTP/2: streams whose response has not ended.
    streams: AtomicUsize,
    /// The connection's task, woken when its request (HTTP/1.1) or its last stream (HTTP/2)
    /// ends, to start the idle limit.
    wake: AtomicWaker,
    /// The limit that closed the connection, if one did: `CloseReason as u8 + 1`.
    reason: AtomicU8,
    /// A 408 was written for a head that came too slowly.
    answered_408: AtomicBool,
}

impl ConnState {
    /// A request's head was read: it is in hand until [`ConnState::request_ended`].
    pub(super) fn request_began(&self, h1: bool) {
        if h1 {
            self.busy.store(true, Ordering::Relaxed);
        } else {
            self.streams.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A request's response ended (or its handling was dropped).
    pub(super) fn request_ended(&self, h1: bool) {
        if h1 {
            self.busy.store(false, Ordering::Release);
            self.wake.wake();
        } else if self.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake.wake();
        }
    }

    /// HTTP/2: no stream is open. Registers `cx` to be woken when the last one ends.
    pub(super) fn no_streams(&self, cx: &Context<'_>) -> bool {
        self.wake.register(cx.waker());
        self.streams.load(Ordering::Acquire) == 0
    }

    /// Notes that `reason` closed the connection (the first reason noted wins).
    pub(super) fn close_for(&self, reason: CloseReason) {
        let _ =
            self.reason
                .compare_exchange(0, reason as u8 + 1, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The limit that closed the connection, if one did.
    pub(super) fn closed_for(&self) -> Option<CloseReason> {
        match self.reason.load(Ordering::Relaxed) {
            0 => None,
            n => CloseReason::ALL.get(usize::from(n - 1)).copied(),
        }
    }

    /// Whether a 408 was written for a head that came too slowly.
    pub(super) fn answered_408(&self) -> bool {
        self.answered_408.load(Ordering::Relaxed)
    }
}

/// The limits [`ClientIo`] enforces.
#[derive(Clone, Copy, Debug)]
pub(super) struct Waits {
    pub(super) header: Duration,
    pub(super) keepalive_idle: Duration,
    pub(super) send: Duration,
}

/// Where an HTTP/1.1 connection is, as its socket sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request head; `started` once a byte of it came.
    Head { started: bool },
    /// Between requests on a kept-alive connection.
    Idle,
    /// A request in hand.
    Busy,
}

/// A client's socket whose reads (HTTP/1.1: while a head is awaited or the connection is idle)
/// and writes (both protocols: while one makes no progress) time out. Unpin (its timers are
/// boxed), as hyper wants its I/O.
pub(super) struct ClientIo {
    io: TcpStream,
    state: Arc<ConnState>,
    h1: bool,
    phase: Phase,
    waits: Waits,
    read_timer: Pin<Box<Sleep>>,
    write_stalled: bool,
    write_timer: Pin<Box<Sleep>>,
}

impl ClientIo {
    /// Wraps a connection accepted at `accepted`: its first head is due `waits.header` later.
    pub(super) fn new(
        io: TcpStream,
        state: Arc<ConnState>,
        h1: bool,
        waits: Waits,
        accepted: Instant,
    ) -> Self {
        ClientIo {
            io,
            state,
            h1,
            phase: Phase::Head { started: false },
            waits,
            read_timer: Box::pin(tokio::time::sleep_until(accepted + waits.header)),
            write_stalled: false,
            write_timer: Box::pin(tokio::time::sleep_until(accepted + waits.send)),
        }
    }
}

fn timed_out(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.h1 {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        if this.state.busy.load(Ordering::Relaxed) {
            this.phase = Phase::Busy;
            let read = Pin::new(&mut this.io).poll_read(cx, buf);
            if read.is_pending() {
                // Woken when the request ends, to start the keep-alive wait: the server, idle
                // by then, would otherwise read again only when the client sends something.
                this.state.wake.register(cx.waker());
            }
            return read;
        }
        if this.phase == Phase::Busy {
            // The response in hand has ended: the connection waits for the next request.
            this.phase = Phase::Idle;
            this.read_timer
                .as_mut()
                .reset(Instant::now() + this.waits.keepalive_idle);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    match &mut this.phase {
                        Phase::Idle => {
                            this.phase = Phase::Head { started: true };
                            this.read_timer
                                .as_mut()
                                .reset(Instant::now() + this.waits.header);
                        }
                        Phase::Head { started } => *started = true,
                        Phase::Busy => {}
                    }
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => {}
        }
        if this.read_timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if this.phase == Phase::Idle {
            this.state.close_for(CloseReason::KeepaliveIdle);
            return Poll::Ready(Err(timed_out("the connection was idle too long")));
        }
        this.state.close_for(CloseReason::HeaderTimeout);
        if this.phase == (Phase::Head { started: true }) && !this.write_stalled {
            // Part of a head came: the client is told why it gets no answer. Best effort, and
            // never a partial answer that could be taken for another.
            if this.io.try_write(&TIMEOUT_408).ok() == Some(TIMEOUT_408.len()) {
                this.state.answered_408.store(true, Ordering::Relaxed);
            }
        }
        Poll::Ready(Err(timed_out("the request head did not arrive in time")))
    }
}

impl ClientIo {
    /// A write that went through (or failed) ends a stall; one that has to wait starts or
    /// continues one, and a stall as long as the send limit fails the write.
    fn after_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let this = self;
        if written.is_ready() {
            this.write_stalled = false;
            return written;
        }
        if !this.write_stalled {
            this.write_stalled = true;
            this.write_timer
                .as_mut()
                .reset(Instant::now() + this.waits.send);
        }
        if this.write_timer.as_mut().poll(cx).is_ready() {
            this.state.close_for(CloseReason::SendTimeout);
            return Poll::Ready(Err(timed_out("the client stopped reading")));
        }
        Poll::Pending
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        this.after_write(cx, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
