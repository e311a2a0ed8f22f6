//! Accept loop: HTTP/1.1 (keep-alive) and HTTP/2 without TLS on one port, graceful drain.
//!
//! The protocol is chosen by peeking at the first bytes of a connection (HTTP/2 starts with the
//! `PRI * HTTP/2.0` preface, which is not a valid HTTP/1.1 request), so the connection's server
//! then reads the whole request from the socket itself: no bytes are read ahead and replayed.
//! Both protocols are served by hyper; one task serves one connection and polls the response
//! body, which for a proxied response reads the upstream socket.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{Notify, watch};

use crate::net::BoxError;

/// The body of a client's request, on either protocol.
pub type ClientBody = Incoming;

/// Serves `handler` on `listener` until `shutdown` resolves, then stops accepting and waits up
/// to `grace` for open connections to finish their requests. Accept errors (for example too many
/// open files) are logged and retried after a short pause; they never end the loop.
pub async fn serve<H, Fut, B>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    name: &'static str,
) where
    H: Fn(Request<ClientBody>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes, Error = BoxError> + Send + 'static,
{
    let handler = Arc::new(handler);
    let h2 = http2::Builder::new(TokioExecutor::new());
    let mut h1 = http1::Builder::new();
    // Head limits as uvicorn's and hyper's: 64 KiB (431 above), 100 fields.
    h1.max_buf_size(MAX_HEAD).max_headers(100);
    let drain = Drain::new();
    // Tells connections that have not sent their first bytes yet (so are not watched by
    // `drain`) that the server is draining.
    let (draining, drain_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(listener = name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let (h1, h2, watcher) = (h1.clone(), h2.clone(), drain.watcher());
        let mut drain_rx = drain_rx.clone();
        // No tracing span around the connection: entering it on every poll costs ~1 % of the
        // CPU per forwarded chunk; the one log line below names the connection instead.
        tokio::spawn(async move {
            let h2_prior = tokio::select! {
                h2_prior = is_http2(&stream) => h2_prior,
                _ = drain_rx.wait_for(|draining| *draining) => return,
            };
            let service = service_fn(move |req: Request<Incoming>| Answer {
                response: handler(req, remote),
            });
            let result: Result<(), BoxError> = if h2_prior {
                // Boxed: an HTTP/2 connection's state is twice an HTTP/1.1 one's, and inline it
                // would size every connection's task.
                Box::pin(watcher.watch(h2.serve_connection(TokioIo::new(stream), service)))
                    .await
                    .map_err(Into::into)
            } else {
                watcher
                    .watch(h1.serve_connection(TokioIo::new(stream), service))
                    .await
                    .map_err(Into::into)
            };
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

/// Tells open connections to finish the request in hand and close, and waits until they have.
///
/// hyper-util's `GracefulShutdown` does the same, but polls its shutdown signal (a `watch`
/// receiver, through its `Notify`) on every poll of every connection: once per forwarded chunk,
/// about 3 % of the proxy's user-space instructions per chunk. Here a connection polls the
/// signal only when its waker changes or the drain has begun, and otherwise reads one flag.
struct Drain {
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
    fn new() -> Self {
        Drain {
            signal: Signal {
                draining: Arc::new(AtomicBool::new(false)),
                notify: Arc::new(Notify::new()),
            },
            alive: watch::channel(()).0,
        }
    }

    /// A handle for one connection, taken when it is accepted: it counts as open from then on.
    fn watcher(&self) -> Watcher {
        Watcher {
            signal: self.signal.clone(),
            alive: self.alive.subscribe(),
        }
    }

    /// Tells every watched connection to shut down gracefully, then resolves once all of them
    /// (and every watcher not yet used) are gone.
    async fn shutdown(self) {
        self.signal.draining.store(true, Ordering::Release);
        self.signal.notify.notify_waiters();
        self.alive.closed().await;
    }
}

/// One connection's share of a [`Drain`].
struct Watcher {
    signal: Signal,
    alive: watch::Receiver<()>,
}

impl Watcher {
    /// `conn`, shut down gracefully once the drain begins (at once if it already has).
    fn watch<C: GracefulConnection>(self, conn: C) -> Watched<C> {
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
    struct Watched<C> {
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

impl<C: GracefulConnection> Future for Watched<C> {
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

pin_project_lite::pin_project! {
    /// The handler's future as a service's: its response as `Ok`. No async block around it, so
    /// that hyper boxes exactly the handler's state.
    struct Answer<F> {
        #[pin]
        response: F,
    }
}

impl<F: Future> Future for Answer<F> {
    type Output = Result<F::Output, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().response.poll(cx).map(Ok)
    }
}

/// Longest request head (request line and header fields). uvicorn, which serves vLLM, takes
/// heads up to 16 KiB.
pub const MAX_HEAD: usize = 64 * 1024;

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
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;

    /// `is_http2` on the accepted side of a connection whose client writes `parts` with a pause
    /// between them, then closes.
    async fn sniff(parts: &[&'static [u8]]) -> bool {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let parts = parts.to_vec();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.set_nodelay(true).unwrap();
            for part in parts {
                c.write_all(part).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let (server, _) = listener.accept().await.unwrap();
        let verdict = is_http2(&server).await;
        client.await.unwrap();
        verdict
    }

    #[tokio::test]
    async fn the_http2_preface_is_told_from_http1_requests() {
        assert!(sniff(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).await);
        assert!(!sniff(&[b"POST /v1/chat/completions HTTP/1.1\r\n"]).await);
        assert!(!sniff(&[b"PUT / HTTP/1.1\r\n"]).await);
        assert!(!sniff(&[b"GET / HTTP/1.1\r\n"]).await);
    }

    #[tokio::test]
    async fn a_preface_split_across_packets_waits_for_the_rest() {
        assert!(sniff(&[b"PR", b"I * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).await);
        assert!(!sniff(&[b"P", b"OST / HTTP/1.1\r\n"]).await);
    }

    /// A server answering every request with `ok`, with 30 s of grace: its address, the sender
    /// that starts its drain, and its task.
    async fn ok_server() -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handler = |_req: Request<ClientBody>, _remote: SocketAddr| async {
            Response::new(
                http_body_util::Full::new(bytes::Bytes::from_static(b"ok"))
                    .map_err(|never| match never {}),
            )
        };
        let server = tokio::spawn(serve(
            listener,
            handler,
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(30),
            "test",
        ));
        (addr, stop, server)
    }

    #[tokio::test]
    async fn a_connection_that_sent_nothing_does_not_hold_up_the_drain() {
        let (addr, stop, server) = ok_server().await;
        let _silent = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("drained without waiting for the silent connection")
            .unwrap();
    }

    /// The drain wakes and closes keep-alive connections that sit idle between requests.
    #[tokio::test]
    async fn the_drain_closes_idle_keep_alive_connections() {
        use tokio::io::AsyncReadExt;
        let (addr, stop, server) = ok_server().await;
        let mut clients = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            while !got.ends_with(b"ok") {
                let mut buf = [0u8; 256];
                let n = c.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before the response");
                got.extend_from_slice(&buf[..n]);
            }
            clients.push(c);
        }
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("drained without waiting out the grace period")
            .unwrap();
        for mut c in clients {
            let mut buf = [0u8; 16];
            assert_eq!(c.read(&mut buf).await.unwrap(), 0, "closed by the server");
        }
    }

    /// A drain that began before a watched connection was first polled still shuts it down:
    /// an idle HTTP/1.1 connection, whose client stays open and silent, ends only that way.
    #[tokio::test]
    async fn a_connection_watched_after_the_drain_began_is_shut_down() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let drain = Drain::new();
        let watcher = drain.watcher();
        let stopping = tokio::spawn(drain.shutdown());
        tokio::task::yield_now().await;
        let service = service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
        });
        let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        tokio::time::timeout(Duration::from_secs(5), watcher.watch(conn))
            .await
            .expect("shut down")
            .unwrap();
        stopping.await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_closed_early_goes_to_http1() {
        assert!(!sniff(&[]).await);
        assert!(!sniff(&[b"PR"]).await);
    }
}
