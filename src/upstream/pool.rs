//! The upstream's connection pool: idle HTTP/1.1 connections, reused most recent first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, Uri};
use tokio::time::Instant;
use tower_service::Service;

use crate::http1::client::{Checkin, Conn, Io, Outgoing, RequestBody, SendError, UpstreamResponse};
use crate::net::Connector;

/// A request [`Pool::try_send`] could not send.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub error: SendError,
    /// The request, untouched, when none of it was written or encoded.
    pub request: Option<Request<RequestBody>>,
}

impl Refused {
    fn consumed(error: SendError) -> Refused {
        Refused {
            error,
            request: None,
        }
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The upstream's connection pool, shared by every request.
pub struct Pool {
    connector: Connector,
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
        connector: Connector,
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
    /// for the response head. A request that an idle connection refused before any of it was
    /// written is sent again on another connection; once written it is never sent twice.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<Response<UpstreamResponse>, SendError> {
        self.try_send(req).await.map_err(|refused| refused.error)
    }

    /// [`Pool::send`], giving the request back when no connection could be opened before any
    /// of it was taken apart to be written (so that it can go to another upstream whole).
    ///
    /// The request is given back when a new connection was needed at once and could not be
    /// opened. After a pooled connection refused it, it is already encoded and is not.
    pub async fn try_send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<Response<UpstreamResponse>, Refused> {
        let mut req = Some(req);
        let mut out: Option<Outgoing> = None;
        while let Some(mut conn) = self.checkout() {
            let sending = out.get_or_insert_with(|| Outgoing::new(req.take().expect("taken once")));
            match sending.send_on(&mut conn).await {
                Ok(head) => {
                    let out = out.take().expect("set above");
                    return Ok(out.into_response(*head, conn, self.clone()));
                }
                Err(failed) if failed.unsent => {}
                Err(failed) => return Err(Refused::consumed(failed.error)),
            }
        }
        let io = match self.connector.clone().call(self.uri.clone()).await {
            Ok(io) => io,
            Err(error) => {
                return Err(Refused {
                    error: SendError::Connect(error),
                    request: req,
                });
            }
        };
        let mut out = match out {
            Some(out) => out,
            None => Outgoing::new(req.take().expect("taken once")),
        };
        let mut conn = Conn::new(Io::from(io));
        let head = out
            .send_on(&mut conn)
            .await
            .map_err(|failed| Refused::consumed(failed.error))?;
        Ok(out.into_response(*head, conn, self.clone()))
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

impl Checkin for Pool {
    fn checkin(&self, conn: Conn) {
        self.put(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body::Body;
    use http_body_util::BodyExt;
    use std::future::poll_fn;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Waker};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::net::TcpStream;

    /// How the test upstream answers each request on a connection.
    #[derive(Clone, Copy)]
    enum Answer {
        /// `ok` with a content length; the connection stays open.
        KeepAlive,
        /// `ok`, then the upstream closes the connection (without saying so in a header).
        ThenClose,
        /// A chunked body that never ends.
        Endless,
        /// Two informational heads, then `ok` with a content length.
        Informational,
        /// `ok` without a length, ended by closing the connection.
        UntilClose,
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
                            Answer::KeepAlive | Answer::ThenClose => {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            }
                            Answer::Endless => {
                                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n"
                            }
                            Answer::Informational => {
                                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            }
                            Answer::UntilClose => b"HTTP/1.1 200 OK\r\n\r\nok",
                        };
                        if socket.write_all(reply).await.is_err() {
                            break;
                        }
                        match answer {
                            Answer::ThenClose | Answer::UntilClose => break,
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
        let connector = crate::net::connector(Duration::from_secs(5), None).unwrap();
        Pool::new(connector, uri.clone(), max_idle, idle_timeout)
    }

    fn get(uri: &Uri) -> Request<RequestBody> {
        Request::builder()
            .uri("/")
            .header(http::header::HOST, uri.authority().unwrap().as_str())
            .body(RequestBody::Bytes(Bytes::new()))
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
    async fn a_connection_is_pooled_as_soon_as_its_body_ends() {
        let (uri, accepted, _) = upstream(Answer::KeepAlive).await;
        let pool = pool(&uri, 8, Duration::from_secs(60));
        let mut first = pool.send(get(&uri)).await.unwrap().into_body();
        assert_eq!(first.size_hint().exact(), Some(2));
        let data = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data, "ok");
        assert!(first.is_end_stream());
        assert_eq!(
            pool.idle_count(),
            1,
            "back in the pool before the body is dropped"
        );
        assert_eq!(body(&pool, &uri).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        drop(first);
    }

    #[tokio::test]
    async fn informational_heads_are_skipped() {
        let (uri, accepted, _) = upstream(Answer::Informational).await;
        let pool = pool(&uri, 8, Duration::from_secs(60));
        for _ in 0..2 {
            let response = pool.send(get(&uri)).await.unwrap();
            assert_eq!(response.status(), 200);
            assert!(!response.headers().contains_key("link"));
            assert_eq!(
                response.into_body().collect().await.unwrap().to_bytes(),
                "ok"
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_read_until_close_ends_there_and_its_connection_is_not_reused() {
        let (uri, accepted, _) = upstream(Answer::UntilClose).await;
        let pool = pool(&uri, 8, Duration::from_secs(60));
        for _ in 0..2 {
            assert_eq!(body(&pool, &uri).await, "ok");
            assert_eq!(pool.idle_count(), 0);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
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
    async fn a_request_a_reset_connection_refused_is_sent_again_elsewhere() {
        let (uri, accepted, closed) = upstream(Answer::KeepAlive).await;
        let pool = pool(&uri, 8, Duration::from_secs(60));
        assert_eq!(body(&pool, &uri).await, "ok");
        drop(pool.checkout().expect("the connection was pooled"));
        // A connection the upstream resets after a checkout found it open.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accept) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (server, _) = accept.unwrap();
        let mut client = client.unwrap();
        client.write_all(b"unread").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(server); // with bytes unread: a reset, not a close
        let mut conn = Conn::new(Io::Plain(client));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let failed = Outgoing::new(get(&uri))
            .send_on(&mut conn)
            .await
            .expect_err("the connection was reset");
        assert!(failed.unsent, "nothing was written: {}", failed.error);
        // And `send` does so by itself: the pooled connection is found dead, a new one is used.
        pool.put(conn);
        assert_eq!(body(&pool, &uri).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        eventually("the first connection closed", || {
            closed.load(Ordering::SeqCst) == 1
        })
        .await;
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
        let refused = pool.try_send(get(&uri)).await.unwrap_err();
        assert!(matches!(refused.error, SendError::Connect(_)));
        let back = refused.request.expect("given back whole");
        assert_eq!(back.uri(), "/");
        assert_eq!(
            back.headers()[http::header::HOST],
            uri.authority().unwrap().as_str()
        );
    }

    /// Accepts one connection, reads its request and answers with a chunked response head.
    async fn chunked_head(listener: TcpListener) -> TcpStream {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = socket.read(&mut buf).await.unwrap();
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        socket
    }

    /// An upstream that streams `n` chunks 20 ms apart, each in a write of its own.
    async fn trickle(n: usize) -> Uri {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        tokio::spawn(async move {
            let mut socket = chunked_head(listener).await;
            for _ in 0..n {
                tokio::time::sleep(Duration::from_millis(20)).await;
                socket.write_all(b"5\r\nchunk\r\n").await.unwrap();
            }
            socket.write_all(b"0\r\n\r\n").await.unwrap();
            let _ = socket.read(&mut [0u8; 64]).await;
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
        // Per chunk: one poll that finds nothing yet, and the one its arrival wakes.
        assert!(polls <= 2 * 10 + 3, "{polls} polls for 10 chunks");
    }

    /// An upstream that answers with a chunked head, then writes one piece of body per signal.
    async fn stepped(pieces: Vec<&'static [u8]>) -> (Uri, tokio::sync::mpsc::UnboundedSender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let (go, mut steps) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut socket = chunked_head(listener).await;
            for piece in pieces {
                steps.recv().await.unwrap();
                socket.write_all(piece).await.unwrap();
            }
            let _ = socket.read(&mut [0u8; 64]).await;
        });
        (uri, go)
    }

    fn poll_once(body: &mut UpstreamResponse) -> Poll<Option<Bytes>> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(body)
            .poll_frame(&mut cx)
            .map(|frame| frame.map(|f| f.unwrap().into_data().unwrap()))
    }

    /// The body of a request to a [`stepped`] upstream, and the signal for its next piece.
    async fn stepped_body(
        pieces: Vec<&'static [u8]>,
    ) -> (UpstreamResponse, tokio::sync::mpsc::UnboundedSender<()>) {
        let (uri, go) = stepped(pieces).await;
        let pool = pool(&uri, 8, Duration::from_secs(60));
        (pool.send(get(&uri)).await.unwrap().into_body(), go)
    }

    /// Lets a [`stepped`] upstream write its next piece, and the I/O driver see it arrive.
    async fn deliver(go: &tokio::sync::mpsc::UnboundedSender<()>) {
        go.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    #[tokio::test]
    async fn a_chunk_is_handed_on_when_it_arrives() {
        let (mut body, go) = stepped_body(vec![b"5\r\nchunk\r\n0\r\n\r\n"]).await;
        assert_eq!(poll_once(&mut body), Poll::Pending, "nothing sent yet");
        deliver(&go).await;
        assert_eq!(
            poll_once(&mut body),
            Poll::Ready(Some(Bytes::from("chunk")))
        );
        assert_eq!(poll_once(&mut body), Poll::Ready(None), "the body ends");
    }

    #[tokio::test]
    async fn chunks_read_together_are_handed_on_back_to_back() {
        let (mut body, go) = stepped_body(vec![b"5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n"]).await;
        deliver(&go).await;
        assert_eq!(
            poll_once(&mut body),
            Poll::Ready(Some(Bytes::from("first")))
        );
        assert_eq!(
            poll_once(&mut body),
            Poll::Ready(Some(Bytes::from("second")))
        );
        assert_eq!(poll_once(&mut body), Poll::Ready(None));
    }

    /// An upstream that sends `wire` once, in writes of the sizes `cuts` gives, flushing each.
    async fn scripted(wire: Vec<u8>, cuts: Vec<usize>) -> Uri {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            socket.set_nodelay(true).unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = socket.read(&mut buf).await.unwrap();
            let mut at = 0usize;
            for cut in cuts.into_iter().chain([usize::MAX]) {
                let end = at.saturating_add(cut).min(wire.len());
                socket.write_all(&wire[at..end]).await.unwrap();
                socket.flush().await.unwrap();
                at = end;
                if at == wire.len() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = socket.read(&mut buf).await;
        });
        uri
    }

    /// A small deterministic generator (xorshift), so failures are reproducible.
    fn numbers(mut x: u64) -> impl FnMut(usize) -> usize {
        move |below| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % below as u64) as usize
        }
    }

    #[tokio::test]
    async fn long_heads_and_chunked_bodies_arrive_whole_whatever_the_writes() {
        for seed in 1..=8u64 {
            let mut next = numbers(seed);
            // A head past the 8 KiB read buffer, then chunks of 1 B to 20 KiB with extensions,
            // mostly tiny, so that reads often end inside a chunk-size line.
            let mut wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n".to_vec();
            wire.extend_from_slice(format!("x-long: {}\r\n\r\n", "v".repeat(12_000)).as_bytes());
            let mut body = Vec::new();
            for i in 0..3000 {
                let len = if i % 300 == 0 {
                    1 + next(20_000)
                } else {
                    1 + next(16)
                };
                let data: Vec<u8> = (0..len).map(|_| b'a' + next(26) as u8).collect();
                wire.extend_from_slice(format!("{len:x}").as_bytes());
                if i % 3 == 0 {
                    wire.extend_from_slice(b";seq=1");
                }
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(&data);
                wire.extend_from_slice(b"\r\n");
                body.extend_from_slice(&data);
            }
            wire.extend_from_slice(b"0\r\nx-trailer: t\r\n\r\n");
            // Odd seeds: one write, so reads fill the buffer and leave partial size lines at
            // its end. Even seeds: writes of 1 B to 3 KB.
            let cuts: Vec<usize> = match seed % 2 {
                1 => vec![],
                _ => (0..wire.len() / 300).map(|_| 1 + next(3000)).collect(),
            };
            let uri = scripted(wire, cuts).await;
            let pool = pool(&uri, 8, Duration::from_secs(60));
            let response = pool.send(get(&uri)).await.unwrap();
            assert_eq!(response.headers()["x-long"].len(), 12_000);
            let collected = response.into_body().collect().await.unwrap();
            assert_eq!(
                collected.trailers().unwrap()["x-trailer"],
                "t",
                "seed {seed}"
            );
            assert!(
                collected.to_bytes() == body,
                "seed {seed}: the body differs"
            );
            assert_eq!(pool.idle_count(), 1, "seed {seed}: clean, so pooled");
        }
    }

    #[tokio::test]
    async fn a_head_longer_than_64_kib_is_refused() {
        let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
        wire.extend_from_slice(format!("x-long: {}\r\n\r\n", "v".repeat(70_000)).as_bytes());
        let uri = scripted(wire, vec![]).await;
        let pool = pool(&uri, 8, Duration::from_secs(60));
        let error = pool.send(get(&uri)).await.unwrap_err();
        assert!(error.to_string().contains("64 KiB"), "{error}");
    }
}
