//! Accept loop: HTTP/1.1 (keep-alive) and HTTP/2 without TLS on one port, with the limits of
//! `docs/limits.md` on every client, and a graceful drain.
//!
//! The protocol is chosen by peeking at the first bytes of a connection (HTTP/2 starts with the
//! `PRI * HTTP/2.0` preface, which is not a valid HTTP/1.1 request), so the connection's server
//! then reads the whole request from the socket itself: no bytes are read ahead and replayed.
//! Both protocols are served by hyper; one task serves one connection and polls the response
//! body, which for a proxied response reads the upstream socket.
//!
//! A connection is owned by its task: the socket ([`io::ClientIo`], which bounds the waits on
//! the client), hyper's connection over it, and a [`io::ConnState`] that the service and the
//! response bodies share with the socket to say when a request is in hand.

mod drain;
mod io;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::config::Config;
use crate::net::BoxError;
use crate::telemetry::{CloseReason, ConnMetrics};
use drain::{Drain, Graceful};
use io::{ClientIo, ConnState, Waits};

/// The body of a client's request, on either protocol.
pub type ClientBody = Incoming;

/// Longest request head (request line and header fields). uvicorn, which serves vLLM, takes
/// heads up to 16 KiB.
pub const MAX_HEAD: usize = 64 * 1024;

/// Most header fields in a request head (hyper's default).
const MAX_HEADERS: usize = 100;

/// The limits a listener puts on its clients (`docs/limits.md`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Receiving a request head: from accept, or from the first byte of a later request.
    pub header_timeout: Duration,
    /// A kept-alive HTTP/1.1 connection between requests; an HTTP/2 one without streams.
    pub keepalive_idle: Duration,
    /// A write to the client that makes no progress.
    pub send_timeout: Duration,
    /// HTTP/2 keep-alive ping interval, and how long a ping may go unanswered.
    pub http2_keepalive: Duration,
    /// Concurrent streams of one HTTP/2 connection.
    pub http2_max_streams: u32,
    /// Open client connections.
    pub max_connections: usize,
}

impl Limits {
    /// The limits of the proxy's listener in `config`; `fd_limit` (the process's open-file
    /// limit) sizes the default connection limit.
    pub fn of(config: &Config, fd_limit: Option<u64>) -> Limits {
        let p = &config.proxy;
        let secs = crate::config::secs;
        Limits {
            header_timeout: secs(p.header_timeout_secs),
            keepalive_idle: secs(p.keepalive_idle_secs),
            send_timeout: secs(p.send_timeout_secs),
            http2_keepalive: secs(p.http2_keepalive_secs),
            http2_max_streams: p.http2_max_concurrent_streams,
            max_connections: p
                .max_connections
                .unwrap_or_else(|| default_max_connections(fd_limit)),
        }
    }

    fn waits(&self) -> Waits {
        Waits {
            header: self.header_timeout,
            keepalive_idle: self.keepalive_idle,
            send: self.send_timeout,
        }
    }
}

impl Default for Limits {
    /// The limits of the default configuration, with a connection limit of 1,024.
    fn default() -> Self {
        Limits::of(&Config::default(), Some(2 * 1024 + 128))
    }
}

/// Half the open-file limit (a proxied client connection needs an upstream one too), less a
/// reserve for listeners, the pool's idle connections and exporters; 1,024 when the limit is
/// not known.
pub fn default_max_connections(fd_limit: Option<u64>) -> usize {
    match fd_limit {
        Some(n) => usize::try_from(n / 2)
            .unwrap_or(usize::MAX)
            .saturating_sub(64)
            .max(16),
        None => 1024,
    }
}

/// Logs a failed accept at most once per interval, with how many went unlogged since: at the
/// open-file limit every accept fails at once, and a line each would flood the log.
struct AcceptErrors {
    last: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    const EVERY: Duration = Duration::from_secs(10);

    fn note(&mut self, name: &str, error: &std::io::Error) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < Self::EVERY) {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(listener = name, %error, unlogged = self.unlogged, "accept failed");
        self.last = Some(now);
        self.unlogged = 0;
    }
}

/// Serves `handler` on `listener` until `shutdown` resolves, then stops accepting and waits up
/// to `grace` for open connections to finish their requests. Every connection is held to
/// `limits`, and what the limits close is counted in `metrics`. Accept errors (for example too
/// many open files) are counted, logged at most every 10 s, and retried after a short pause;
/// they never end the loop.
pub async fn serve<H, Fut, B>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    name: &'static str,
    limits: Limits,
    metrics: ConnMetrics,
) where
    H: Fn(Request<ClientBody>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes, Error = BoxError> + Send + 'static,
{
    let handler = Arc::new(handler);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .keep_alive_interval(limits.http2_keepalive)
        .keep_alive_timeout(limits.http2_keepalive)
        .max_concurrent_streams(limits.http2_max_streams);
    let mut h1 = http1::Builder::new();
    // hyper's own head timeout is off: `ClientIo` bounds the head from accept, and apart from
    // the keep-alive wait, which hyper's would cut short.
    h1.max_header_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .max_buf_size(2 * MAX_HEAD)
        .writev(false);
    let drain = Drain::new();
    // Tells connections that have not sent their first bytes yet (so are not watched by
    // `drain`) that the server is draining.
    let (draining, drain_rx) = watch::channel(false);
    let open = Arc::new(AtomicUsize::new(0));
    let mut accept_errors = AcceptErrors {
        last: None,
        unlogged: 0,
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    metrics.accept_error();
                    accept_errors.note(name, &error);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if open.load(Ordering::Relaxed) >= limits.max_connections {
            // Refused at once: closing costs the client a reconnect, holding it would cost
            // everyone the descriptor.
            metrics.closed(CloseReason::MaxConnections);
            drop(stream);
            continue;
        }
        let accepted = Instant::now();
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let (h1, h2, watcher) = (h1.clone(), h2.clone(), drain.watcher());
        let mut drain_rx = drain_rx.clone();
        let slot = Slot::take(&open);
        let counted = metrics.open();
        let metrics = metrics.clone();
        // No tracing span around the connection: entering it on every poll costs a share of
        // the CPU per forwarded chunk; the one log line below names the connection instead.
        tokio::spawn(async move {
            let _slot = (slot, counted);
            let sniffed = tokio::select! {
                sniffed = tokio::time::timeout(limits.header_timeout, is_http2(&stream)) => sniffed,
                _ = drain_rx.wait_for(|draining| *draining) => return,
            };
            let Ok(h2_prior) = sniffed else {
                metrics.closed(CloseReason::HeaderTimeout);
                return;
            };
            let h1_conn = !h2_prior;
            let state = Arc::new(ConnState::default());
            let io = TokioIo::new(ClientIo::new(
                stream,
                state.clone(),
                h1_conn,
                limits.waits(),
                accepted,
            ));
            let service = {
                let state = state.clone();
                service_fn(move |req: Request<Incoming>| {
                    state.request_began(h1_conn);
                    Answer {
                        response: handler(req, remote),
                        guard: Some(InHand {
                            state: state.clone(),
                            h1: h1_conn,
                        }),
                    }
                })
            };
            let result: Result<(), hyper::Error> = if h2_prior {
                let conn = H2Idle {
                    conn: h2.serve_connection(io, service),
                    state: state.clone(),
                    idle: limits.keepalive_idle,
                    timer: tokio::time::sleep_until(accepted + limits.keepalive_idle),
                    armed: false,
                    stopping: false,
                };
                // Boxed: an HTTP/2 connection's state is twice an HTTP/1.1 one's, and inline it
                // would size every connection's task.
                Box::pin(watcher.watch(conn)).await
            } else {
                watcher.watch(h1.serve_connection(io, service)).await
            };
            let reason = state.closed_for().or(match &result {
                Err(error) if error.is_parse() || error.is_parse_too_large() => {
                    Some(CloseReason::BadRequest)
                }
                Err(error) if !h1_conn && error.is_timeout() => Some(CloseReason::Http2PingTimeout),
                _ => None,
            });
            if let Some(reason) = reason {
                metrics.closed(reason);
                if let Some(status) = refused_status(reason, &result, &state) {
                    metrics.refused(status);
                }
            }
            if let Err(error) = result {
                tracing::debug!(listener = name, %remote, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = draining.send(true);
    tracing::info!(
        listener = name,
        grace_secs = grace.as_secs_f64(),
        "draining connections"
    );
    tokio::select! {
        () = drain.shutdown() => tracing::info!(listener = name, "all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!(listener = name, "grace period over; closing remaining connections"),
    }
}

/// The status a client was answered with when the server refused its request itself (a head it
/// could not read, or one too slow), for the request counter; `None` when nothing was answered.
fn refused_status(
    reason: CloseReason,
    result: &Result<(), hyper::Error>,
    state: &ConnState,
) -> Option<u16> {
    match (reason, result) {
        (CloseReason::HeaderTimeout, _) if state.answered_408() => Some(408),
        // hyper answers a target too long for its buffer with 414, other heads too large with
        // 431; both are `is_parse_too_large`.
        (CloseReason::BadRequest, Err(error)) if error.to_string().contains("URI too long") => {
            Some(414)
        }
        (CloseReason::BadRequest, Err(error)) if error.is_parse_too_large() => Some(431),
        (CloseReason::BadRequest, _) => Some(400),
        _ => None,
    }
}

/// One of the listener's connection slots, given back when the connection's task ends.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Slot {
        open.fetch_add(1, Ordering::Relaxed);
        Slot(open.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request in hand on its connection, from the moment its head was read until its response
/// ended or its handling was dropped: whoever holds it last tells the connection.
struct InHand {
    state: Arc<ConnState>,
    h1: bool,
}

impl Drop for InHand {
    fn drop(&mut self) {
        self.state.request_ended(self.h1);
    }
}

pin_project! {
    /// The handler's future as a service's: its response as `Ok`, with the request's
    /// [`InHand`] moved into the response body. No async block around it, so that hyper boxes
    /// exactly the handler's state.
    struct Answer<F> {
        #[pin]
        response: F,
        guard: Option<InHand>,
    }
}

impl<F, B> Future for Answer<F>
where
    F: Future<Output = Response<B>>,
{
    type Output = Result<Response<InHandBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.response.poll(cx));
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|inner| InHandBody { inner, guard })))
    }
}

pin_project! {
    /// A response body that ends its request's [`InHand`] when it ends or is dropped.
    struct InHandBody<B> {
        #[pin]
        inner: B,
        guard: Option<InHand>,
    }
}

impl<B> Body for InHandBody<B>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// An HTTP/2 connection that closes gracefully once it has had no stream for its idle limit.
    struct H2Idle<C> {
        #[pin]
        conn: C,
        state: Arc<ConnState>,
        idle: Duration,
        #[pin]
        timer: Sleep,
        armed: bool,
        stopping: bool,
    }
}

impl<C: Graceful> Future for H2Idle<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if !*this.stopping {
            if this.state.no_streams(cx) {
                if !*this.armed {
                    *this.armed = true;
                    this.timer.as_mut().reset(Instant::now() + *this.idle);
                }
                if this.timer.as_mut().poll(cx).is_ready() {
                    *this.stopping = true;
                    this.state.close_for(CloseReason::Http2Idle);
                    this.conn.as_mut().graceful_shutdown();
                }
            } else {
                *this.armed = false;
            }
        }
        this.conn.poll(cx)
    }
}

impl<C: Graceful> Graceful for H2Idle<C> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.project();
        *this.stopping = true;
        this.conn.graceful_shutdown();
    }
}

/// The start of the HTTP/2 connection preface (RFC 9113 §3.4); no HTTP/1.1 method is `PRI`.
const H2_START: &[u8] = b"PRI ";

/// Whether a new connection speaks HTTP/2 (prior knowledge), judged from its first bytes
/// without consuming them. Waits until enough bytes arrived to tell; a connection that closes or
/// fails first is handed to HTTP/1.1, which reports it.
async fn is_http2(stream: &TcpStream) -> bool {
    let mut start = [0u8; H2_START.len()];
    // Bounded, so a client that sends one byte and stalls costs no more than a few wake-ups.
    for _ in 0..50 {
        let n = match stream.peek(&mut start).await {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 || start[..n] != H2_START[..n] {
            return false;
        }
        if n == start.len() {
            return true;
        }
        // A prefix of "PRI " arrived on its own: the rest is in flight. `peek` returns at once
        // while bytes are queued, so wait a little before looking again.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    false
}

#[cfg(test)]
mod tests;
