//! Upstream connections: a pool of HTTP/1.1 connections that are driven by the request that
//! uses them, not by a task of their own.
//!
//! A response body from the upstream is read by the task that writes it to the client: when the
//! client side polls [`UpstreamResponse`] for the next chunk, it polls the upstream connection
//! itself, so each chunk costs one task wake-up instead of two (connection task, then the client
//! connection's task) and the connection's socket readiness wakes the client task directly.
//! When the response ends the connection goes back to the pool; when the body is dropped early
//! (the client hung up) the connection is closed, which cancels the request upstream at once.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

use crate::observe::BoxError;
use crate::proxy::UpstreamBody;

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;
type Driver = http1::Connection<Io, UpstreamBody>;

/// Why a request could not be sent or got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened (refused, DNS, TLS, or `upstream.connect_timeout_secs`).
    #[error("connect: {0}")]
    Connect(#[source] BoxError),
    /// The connection failed or closed before the response head arrived.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// One HTTP/1.1 connection: the handle requests are sent with and the state machine that reads
/// and writes its socket whenever it is polled.
struct Conn {
    tx: http1::SendRequest<UpstreamBody>,
    /// `None` once dropped after it returned (see [`drive`]).
    driver: Option<Driver>,
    /// Set once the driver has returned: the connection is closed.
    done: bool,
}

impl Conn {
    /// Advances the connection; returns `true` once it has ended.
    fn poll_driver(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.done
            && let Some(driver) = &mut self.driver
            && Pin::new(driver).poll(cx).is_ready()
        {
            self.done = true;
        }
        self.done
    }

    /// Whether the connection can carry another request now (polls it once to settle).
    fn reusable(&mut self) -> bool {
        !self.poll_driver(&mut Context::from_waker(Waker::noop())) && self.tx.is_ready()
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The upstream's connection pool, shared by every request.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    uri: Uri,
    idle: Mutex<VecDeque<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("uri", &self.uri)
            .field("max_idle", &self.max_idle)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool that connects to `uri` (scheme and authority) with `connector` and keeps at most
    /// `max_idle` idle connections for at most `idle_timeout`.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        uri: Uri,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            connector,
            uri,
            idle: Mutex::new(VecDeque::new()),
            max_idle,
            idle_timeout,
        })
    }

    /// Sends `req` (origin-form URI, `Host` set) on an idle connection, or a new one, and waits
    /// for the response head. A request that an idle connection closed before it was written is
    /// retried on another connection; once written it is never sent twice.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<UpstreamResponse>, SendError> {
        while let Some(mut conn) = self.checkout() {
            let mut sent = std::pin::pin!(conn.tx.try_send_request(req));
            match drive(&mut conn, sent.as_mut()).await {
                Ok(response) => return Ok(self.wrap(response, conn)),
                Err(mut error) => match error.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(error.into_error().into()),
                },
            }
        }
        let io = self
            .connector
            .clone()
            .call(self.uri.clone())
            .await
            .map_err(SendError::Connect)?;
        let (tx, driver) = http1::handshake(io).await?;
        let mut conn = Conn {
            tx,
            driver: Some(driver),
            done: false,
        };
        let mut sent = std::pin::pin!(conn.tx.send_request(req));
        let response = drive(&mut conn, sent.as_mut()).await?;
        Ok(self.wrap(response, conn))
    }

    fn wrap(
        self: &Arc<Self>,
        response: Response<Incoming>,
        conn: Conn,
    ) -> Response<UpstreamResponse> {
        response.map(|body| UpstreamResponse {
            body,
            conn: Some(conn),
            pool: self.clone(),
            ended: false,
        })
    }

    /// The most recently used idle connection that is still open, dropping expired ones.
    fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut entry) = idle.pop_back() {
            if now.duration_since(entry.since) < self.idle_timeout && entry.conn.reusable() {
                return Some(entry.conn);
            }
        }
        None
    }

    fn put(&self, conn: Conn) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while idle.front().is_some_and(|e| {
            idle.len() >= self.max_idle || now.duration_since(e.since) >= self.idle_timeout
        }) {
            idle.pop_front();
        }
        if self.max_idle > 0 {
            idle.push_back(Idle { conn, since: now });
        }
    }

    /// Closes idle connections that expired or that the upstream closed. Called periodically so
    /// that an idle pool holds no dead sockets.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain_mut(|e| now.duration_since(e.since) < self.idle_timeout && e.conn.reusable());
    }

    /// Idle connections held right now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Polls the request future and its connection together until the response head arrives.
async fn drive<F, T>(conn: &mut Conn, mut sent: Pin<&mut F>) -> T
where
    F: Future<Output = T>,
{
    poll_fn(|cx| {
        if let Poll::Ready(out) = sent.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        if conn.poll_driver(cx) {
            // The connection ended (say the upstream closed it while idle) maybe before it took
            // the request: hyper answers queued requests only when the connection is dropped,
            // handing an unwritten request back so that it can be retried.
            conn.driver = None;
            return sent.as_mut().poll(cx);
        }
        Poll::Pending
    })
    .await
}

/// A response body from the upstream; polling it drives the upstream connection. Returns the
/// connection to the pool when dropped after the end of the body, closes it otherwise.
pub struct UpstreamResponse {
    body: Incoming,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    ended: bool,
}

impl Body for UpstreamResponse {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // Only the connection, polled right here, puts data into `body`: a no-op waker for the
        // body is enough, and the real waker goes to the connection (socket and flow control).
        let mut quiet = Context::from_waker(Waker::noop());
        let mut polled = Pin::new(&mut this.body).poll_frame(&mut quiet);
        if polled.is_pending()
            && let Some(conn) = &mut this.conn
        {
            let closed = conn.poll_driver(cx);
            polled = Pin::new(&mut this.body).poll_frame(&mut quiet);
            if closed && polled.is_pending() {
                // Nothing can feed the body any more; never wait forever.
                return Poll::Ready(Some(Err("upstream connection closed mid-body".into())));
            }
        }
        // hyper drops a body after its trailers without asking for the end.
        if let Poll::Ready(None) = polled {
            this.ended = true;
        } else if let Poll::Ready(Some(Ok(frame))) = &polled
            && frame.is_trailers()
        {
            this.ended = true;
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamResponse {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take()
            && (self.ended || self.body.is_end_stream())
            && conn.reusable()
        {
            self.pool.put(conn);
        }
    }
}

impl std::fmt::Debug for UpstreamResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamResponse")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http_body_util::{BodyExt, Either, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// How the test upstream answers each request on a connection.
    #[derive(Clone, Copy)]
    enum Answer {
        /// `ok` with a content length; the connection stays open.
        KeepAlive,
        /// `ok`, then the upstream closes the connection (without saying so in a header).
        ThenClose,
        /// A chunked body that never ends.
        Endless,
        /// `ok`, then the upstream closes the idle connection 100 ms later.
        IdleClose,
    }

    /// A raw HTTP/1.1 upstream on 127.0.0.1:0; counts connections, and closed connections.
    async fn upstream(answer: Answer) -> (Uri, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let counts = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counts.0.fetch_add(1, Ordering::SeqCst);
                let closed = counts.1.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        if !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            continue;
                        }
                        buf.clear();
                        let reply: &[u8] = match answer {
                            Answer::KeepAlive | Answer::ThenClose | Answer::IdleClose => {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            }
                            Answer::Endless => {
                                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n"
                            }
                        };
                        if socket.write_all(reply).await.is_err() {
                            break;
                        }
                        match answer {
                            Answer::ThenClose => break,
                            Answer::IdleClose => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                break;
                            }
                            _ => {}
                        }
                    }
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (uri, accepted, closed)
    }

    fn pool(uri: &Uri, max_idle: usize, idle_timeout: Duration) -> Arc<Pool> {
        let connector = crate::proxy::connector(&Config::default()).unwrap();
        Pool::new(connector, uri.clone(), max_idle, idle_timeout)
    }

    fn get(uri: &Uri) -> Request<UpstreamBody> {
        Request::builder()
            .uri("/")
            .header(http::header::HOST, uri.authority().unwrap().as_str())
            .body(Either::Left(Full::new(Bytes::new())))
            .unwrap()
    }

    async fn body(pool: &Arc<Pool>, uri: &Uri) -> Bytes {
        let response = pool.send(get(uri)).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never happened: {what}");
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (uri, accepted, _) = upstream(Answer::KeepAlive).await;
        let pool = pool(&uri, 8, Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(body(&pool, &uri).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_get_their_own_connections_and_max_idle_bounds_the_pool() {
        let (uri, accepted, closed) = upstream(Answer::KeepAlive).await;
        let pool = pool(&uri, 1, Duration::from_secs(60));
        let (a, b) = tokio::join!(pool.send(get(&uri)), pool.send(get(&uri)));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(a.into_body().collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(b.into_body().collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(pool.idle_count(), 1);
        eventually("the second connection closed", || {
            closed.load(Ordering::SeqCst) == 1
        })
        .await;
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_the_connection() {
        let (uri, _, closed) = upstream(Answer::Endless).await;
        let pool = pool(&uri, 8, Duration::from_secs(60));
        let mut body = pool.send(get(&uri)).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "ok");
        drop(body);
        assert_eq!(pool.idle_count(), 0);
        eventually("the upstream saw the close", || {
            closed.load(Ordering::SeqCst) == 1
        })
        .await;
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_reused() {
        let (uri, accepted, closed) = upstream(Answer::ThenClose).await;
        let pool = pool(&uri, 8, Duration::from_secs(60));
        assert_eq!(body(&pool, &uri).await, "ok");
        eventually("the upstream closed", || closed.load(Ordering::SeqCst) == 1).await;
        assert_eq!(body(&pool, &uri).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_on_a_connection_closed_after_checkout_comes_back_for_a_retry() {
        let (uri, _, closed) = upstream(Answer::IdleClose).await;
        let pool = pool(&uri, 8, Duration::from_secs(60));
        assert_eq!(body(&pool, &uri).await, "ok");
        let mut conn = pool.checkout().expect("the connection was pooled");
        eventually("the upstream closed", || closed.load(Ordering::SeqCst) == 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut sent = std::pin::pin!(conn.tx.try_send_request(get(&uri)));
        let result = tokio::time::timeout(Duration::from_secs(2), drive(&mut conn, sent.as_mut()))
            .await
            .expect("the request is answered, not left queued on a closed connection");
        let mut error = result.expect_err("the connection is closed");
        assert!(error.take_message().is_some(), "unwritten, so given back");
    }

    #[tokio::test]
    async fn sweep_closes_expired_idle_connections() {
        let (uri, accepted, closed) = upstream(Answer::KeepAlive).await;
        let pool = pool(&uri, 8, Duration::from_millis(20));
        assert_eq!(body(&pool, &uri).await, "ok");
        assert_eq!(pool.idle_count(), 1);
        tokio::time::sleep(Duration::from_millis(40)).await;
        pool.sweep();
        assert_eq!(pool.idle_count(), 0);
        eventually("the upstream saw the close", || {
            closed.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(body(&pool, &uri).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(listener);
        let pool = pool(&uri, 8, Duration::from_secs(60));
        let error = pool.send(get(&uri)).await.unwrap_err();
        assert!(matches!(error, SendError::Connect(_)), "{error:?}");
    }
}
