//! Upstream connections: a pool of HTTP/1.1 connections that are driven by the request that
//! uses them, not by a task of their own.
//!
//! A response body from the upstream is read by the task that writes it to the client: when the
//! client side polls [`UpstreamResponse`] for the next chunk, it polls the upstream connection
//! itself, so each chunk costs one task wake-up instead of two (connection task, then the client
//! connection's task) and the connection's socket readiness wakes the client task directly.
//! When the response ends the connection goes back to the pool; when the body is dropped early
//! (the client hung up) the connection is closed, which cancels the request upstream at once.
//!
//! The connection hands each chunk to the body through hyper's one-slot channel, and taking it
//! from there wakes the connection "to read on". Polled from the client's task, that wake-up
//! would poll the whole task a second time per chunk for nothing: the body returns the chunk,
//! and its consumer polls again when it wants the next one. So the connection is polled with a
//! [`Relay`] waker, muted while a chunk is taken, which also remembers whether the connection
//! has been woken since its last poll: one that has not is not polled again.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
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

type Driver = http1::Connection<Io, UpstreamBody>;

/// Most bytes an upstream connection reads at once. hyper doubles its read buffer after every
/// read that fills it, up to ~400 KiB by default: an upstream that streams faster than the
/// client reads would grow every connection's buffer that far, for nothing.
const UPSTREAM_READ_MAX: usize = 64 * 1024;

/// An upstream connection's socket. A TLS session is about a kilobyte of state: boxed, it costs
/// plain-TCP connections (the usual case next to vLLM) nothing.
enum Io {
    Plain(TokioIo<TcpStream>),
    Tls(Box<MaybeHttpsStream<TokioIo<TcpStream>>>),
}

impl From<MaybeHttpsStream<TokioIo<TcpStream>>> for Io {
    fn from(stream: MaybeHttpsStream<TokioIo<TcpStream>>) -> Io {
        match stream {
            MaybeHttpsStream::Http(tcp) => Io::Plain(tcp),
            tls => Io::Tls(Box::new(tls)),
        }
    }
}

impl hyper::rt::Read for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

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
    /// The waker the driver is polled with while a request uses the connection.
    relay: Arc<Relay>,
    /// `relay` as a waker, made once.
    waker: Waker,
}

impl Conn {
    fn new(tx: http1::SendRequest<UpstreamBody>, driver: Driver) -> Conn {
        let relay = Arc::new(Relay::default());
        Conn {
            tx,
            driver: Some(driver),
            done: false,
            waker: Waker::from(relay.clone()),
            relay,
        }
    }

    /// Advances the connection on behalf of the task of `cx`; returns `true` once it has ended.
    fn poll_driver(&mut self, cx: &Context<'_>) -> bool {
        self.relay.task.register(cx.waker());
        self.relay.state.fetch_and(!STALE, Ordering::AcqRel);
        let Conn {
            driver,
            done,
            waker,
            ..
        } = self;
        advance(driver, done, &mut Context::from_waker(waker))
    }

    /// Whether the connection can carry another request now (polls it once to settle).
    fn reusable(&mut self) -> bool {
        !advance(
            &mut self.driver,
            &mut self.done,
            &mut Context::from_waker(Waker::noop()),
        ) && self.tx.is_ready()
    }
}

/// Polls `driver` unless it has ended; returns `done`, set once it has.
fn advance(driver: &mut Option<Driver>, done: &mut bool, cx: &mut Context<'_>) -> bool {
    if !*done
        && let Some(driver) = driver
        && Pin::new(driver).poll(cx).is_ready()
    {
        *done = true;
    }
    *done
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
        let (tx, driver) = http1::Builder::new()
            .max_buf_size(UPSTREAM_READ_MAX)
            .handshake(Io::from(io))
            .await?;
        let mut conn = Conn::new(tx, driver);
        let mut sent = std::pin::pin!(conn.tx.send_request(req));
        let response = drive(&mut conn, sent.as_mut()).await?;
        Ok(self.wrap(response, conn))
    }

    fn wrap(
        self: &Arc<Self>,
        response: Response<Incoming>,
        conn: Conn,
    ) -> Response<UpstreamResponse> {
        // Whatever the connection read along with the head, the body's first poll polls it.
        conn.relay.state.fetch_or(STALE, Ordering::AcqRel);
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

/// The waker a connection in use is polled with. It notes every wake-up (the connection has
/// something to do: [`STALE`]) and passes it on to the task that polls the connection, except
/// while muted: then it only notes it ([`MISSED`]).
#[derive(Default)]
struct Relay {
    task: AtomicWaker,
    state: AtomicU8,
}

/// Wake-ups are noted, not passed on.
const MUTED: u8 = 1;
/// A wake-up came since the last [`Relay::mute`].
const MISSED: u8 = 2;
/// A wake-up came since the driver was last polled (or the response head has just arrived).
const STALE: u8 = 4;

impl Relay {
    fn mute(&self) {
        self.state.fetch_and(!MISSED, Ordering::AcqRel);
        self.state.fetch_or(MUTED, Ordering::AcqRel);
    }

    /// Ends the muted stretch; returns whether a wake-up came during it.
    fn unmute(&self) -> bool {
        self.state.fetch_and(!MUTED, Ordering::AcqRel) & MISSED != 0
    }

    /// Whether the driver has been woken since it was last polled.
    fn stale(&self) -> bool {
        self.state.load(Ordering::Acquire) & STALE != 0
    }
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.state.fetch_or(MISSED | STALE, Ordering::AcqRel) & MUTED == 0 {
            self.task.wake();
        }
    }
}

/// A response body from the upstream; polling it drives the upstream connection. Returns the
/// connection to the pool when dropped after the end of the body, closes it otherwise.
pub struct UpstreamResponse {
    body: Incoming,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    ended: bool,
}

impl UpstreamResponse {
    /// Takes what the connection has put into the body so far. A wake-up this causes is
    /// dropped when a frame is returned (the consumer polls again for the next one) and passed
    /// on when not (it may be the connection's socket, polled from another thread).
    fn take(&mut self, cx: &Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // Only the connection, polled from here, puts data into `body`: a no-op waker for the
        // body is enough.
        let mut quiet = Context::from_waker(Waker::noop());
        let Some(conn) = &self.conn else {
            return Pin::new(&mut self.body).poll_frame(&mut quiet);
        };
        conn.relay.mute();
        let polled = Pin::new(&mut self.body).poll_frame(&mut quiet);
        if conn.relay.unmute() && polled.is_pending() {
            cx.waker().wake_by_ref();
        }
        polled
    }
}

/// Chunks up to this size are copied out of the connection's read buffer (see `poll_frame`).
const SMALL_CHUNK: usize = 2048;

impl Body for UpstreamResponse {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut polled = this.take(cx);
        if polled.is_pending()
            && let Some(conn) = &mut this.conn
        {
            // Wake-ups reach this task from here on, and a driver that has not been woken since
            // it was last polled has nothing new to give.
            conn.relay.task.register(cx.waker());
            if !conn.relay.stale() {
                return Poll::Pending;
            }
            let closed = conn.poll_driver(cx);
            polled = this.take(cx);
            if closed && polled.is_pending() {
                // Nothing can feed the body any more; never wait forever.
                return Poll::Ready(Some(Err("upstream connection closed mid-body".into())));
            }
        }
        // A small chunk is a slice of the connection's read buffer: handed on as it is, it would
        // keep that buffer shared until written, and hyper's next read would allocate a new one.
        let polled = polled.map_ok(|frame| match frame.into_data() {
            Ok(data) if data.len() <= SMALL_CHUNK => Frame::data(Bytes::copy_from_slice(&data)),
            Ok(data) => Frame::data(data),
            Err(frame) => frame,
        });
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

    /// An upstream that streams `n` chunks 20 ms apart, each in a write of its own.
    async fn trickle(n: usize) -> Uri {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = socket.read(&mut buf).await.unwrap();
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            for _ in 0..n {
                tokio::time::sleep(Duration::from_millis(20)).await;
                socket.write_all(b"5\r\nchunk\r\n").await.unwrap();
            }
            socket.write_all(b"0\r\n\r\n").await.unwrap();
            let _ = socket.read(&mut buf).await;
        });
        uri
    }

    #[tokio::test]
    async fn each_chunk_wakes_the_reader_once() {
        let uri = trickle(10).await;
        let pool = pool(&uri, 8, Duration::from_secs(60));
        let mut body = pool.send(get(&uri)).await.unwrap().into_body();
        let (mut chunks, mut polls) = (0, 0);
        loop {
            let frame = poll_fn(|cx| {
                polls += 1;
                Pin::new(&mut body).poll_frame(cx)
            })
            .await;
            match frame {
                Some(frame) => {
                    chunks += usize::from(frame.unwrap().data_ref() == Some(&Bytes::from("chunk")))
                }
                None => break,
            }
        }
        assert_eq!(chunks, 10, "every chunk arrives: no wake-up is lost");
        // Per chunk: one poll that finds nothing yet, and the one its arrival wakes. Taking a
        // chunk from hyper's body channel must not wake the reader a third time.
        assert!(polls <= 2 * 10 + 3, "{polls} polls for 10 chunks");
    }
}
