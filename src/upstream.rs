//! Upstream connections: a pool of HTTP/1.1 connections that are read and written by the
//! request that uses them, with the framing of [`crate::h1`].
//!
//! A response body from the upstream is read by the task that writes it to the client: when the
//! client side polls [`UpstreamResponse`] for the next chunk, it reads the upstream socket into
//! the connection's buffer and hands the chunk on as a slice of it, uncopied. A chunk costs one
//! task wake-up (the socket's), no channel lies between a connection and its body, and chunks
//! that arrive together are handed on back to back. When the response ends the connection goes
//! back to the pool at once; when the body is dropped before its end (the client hung up) the
//! connection is closed, which cancels the request upstream.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

use crate::h1::{self, BodyLength, Decoder, Encoding, Parsed, ResponseHead, Step};
use crate::net::{BoxError, Connector};

/// Bytes a connection reads at once (nginx reads upstream responses 4–8 KiB at a time).
const READ_BUF: usize = 8 * 1024;
/// Longest response head or trailer section: the read buffer grows this far for one, and no
/// further.
const READ_MAX: usize = 64 * 1024;
/// A request body up to this size goes out in the same write as the head.
const INLINE_BODY: usize = 64 * 1024;

/// A request body to send upstream.
#[derive(Debug)]
pub enum RequestBody {
    /// A body the proxy holds whole (read to be inspected, maybe rewritten).
    Bytes(Bytes),
    /// The client's body, streamed as it arrives.
    Stream(Incoming),
}

/// An upstream connection's socket. A TLS session is about a kilobyte of state: boxed, it costs
/// plain-TCP connections (the usual case next to vLLM) nothing.
enum Io {
    Plain(TcpStream),
    Tls(Box<TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>>),
}

impl From<MaybeHttpsStream<TokioIo<TcpStream>>> for Io {
    fn from(stream: MaybeHttpsStream<TokioIo<TcpStream>>) -> Io {
        match stream {
            MaybeHttpsStream::Http(tcp) => Io::Plain(tcp.into_inner()),
            tls => Io::Tls(Box::new(TokioIo::new(tls))),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
    /// Reading or writing the connection failed.
    #[error("connection to the upstream failed: {0}")]
    Io(#[from] io::Error),
    /// The upstream closed the connection before a response head.
    #[error("the upstream closed the connection before sending a response")]
    Closed,
    /// The upstream's response is not valid HTTP/1.1.
    #[error(transparent)]
    Protocol(#[from] h1::Error),
    /// The client's request body broke off while it was being sent.
    #[error("reading the request body: {0}")]
    Body(#[source] BoxError),
}

/// One HTTP/1.1 connection and the bytes read from it that are not consumed yet.
struct Conn {
    io: Io,
    /// Read and not yet consumed; reads go into the spare capacity behind it. A body chunk is
    /// split off as a frame of its own (no copy); the buffer is reused once the frames read from
    /// it are dropped, which for a forwarded chunk is when it has been written to the client.
    buf: BytesMut,
}

impl Conn {
    fn new(io: Io) -> Conn {
        Conn {
            io,
            buf: BytesMut::with_capacity(READ_BUF),
        }
    }

    fn unread(&self) -> &[u8] {
        &self.buf
    }

    fn consume(&mut self, n: usize) {
        self.buf.advance(n);
        self.shrink_when_empty();
    }

    /// Consumes `used` unread bytes and returns `data` of them as a frame that shares the read
    /// buffer (the chunk's data between its framing).
    fn take(&mut self, data: Range<usize>, used: usize) -> Bytes {
        self.buf.advance(data.start);
        let frame = self.buf.split_to(data.len()).freeze();
        self.buf.advance(used - data.end);
        self.shrink_when_empty();
        frame
    }

    /// A buffer grown for a long head goes back to the usual size once it is all consumed.
    fn shrink_when_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > READ_BUF {
            self.buf = BytesMut::with_capacity(READ_BUF);
        }
    }

    /// Reads more bytes after the unread ones; `Ok(0)` once the upstream has closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, SendError>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            if self.buf.len() >= READ_MAX {
                return Poll::Ready(Err(h1::Error::Framing(
                    "response head or trailer section longer than 64 KiB",
                )
                .into()));
            }
            // A few unread bytes: room for a whole read again, made by moving them to the front
            // of the buffer once no frame holds it, else in a new buffer. Unread bytes filling
            // half of it or more (a long head): a buffer twice their size.
            let len = self.buf.len();
            let more = if len < READ_BUF / 2 {
                READ_BUF - len
            } else {
                len
            };
            self.buf.reserve(more.min(READ_MAX - len));
        }
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        Poll::Ready(Ok(n))
    }

    /// Reads until the final response head, skipping informational ones.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
    ) -> Poll<Result<Box<ResponseHead>, SendError>> {
        loop {
            match h1::parse_response_head(self.unread(), method)? {
                Parsed::Informational(len) => self.consume(len),
                Parsed::Head(len, head) => {
                    self.consume(len);
                    return Poll::Ready(Ok(head));
                }
                Parsed::Partial => {
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(if self.buf.is_empty() {
                            SendError::Closed
                        } else {
                            h1::Error::Framing("the upstream closed the connection mid-head").into()
                        }));
                    }
                }
            }
        }
    }

    /// Whether the connection can carry another request now: nothing is left unread, and the
    /// upstream has neither closed it nor sent anything unasked.
    fn reusable(&mut self) -> bool {
        self.buf.is_empty()
            && self
                .poll_fill(&mut Context::from_waker(Waker::noop()))
                .is_pending()
    }
}

/// Writes `out[*written..]` and flushes.
fn write_all(
    io: &mut Io,
    cx: &mut Context<'_>,
    out: &[u8],
    written: &mut usize,
) -> Poll<io::Result<()>> {
    while *written < out.len() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, &out[*written..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *written += n;
    }
    Pin::new(&mut *io).poll_flush(cx)
}

/// What of a request body is left to write: bytes already framed, and the client's body when
/// it is streamed.
struct BodyWriter {
    out: Vec<u8>,
    written: usize,
    stream: Option<Incoming>,
    /// How the stream is framed; for a `Content-Length`, the bytes it still promises.
    framing: Encoding,
}

impl BodyWriter {
    /// Writes on until the body is all sent (`Ready(Ok)`), or the socket or the client's body
    /// has to wait.
    fn poll(&mut self, io: &mut Io, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        loop {
            if !self.out.is_empty() {
                ready!(write_all(io, cx, &self.out, &mut self.written))?;
                self.out.clear();
                self.written = 0;
            }
            let Some(stream) = &mut self.stream else {
                return Poll::Ready(Ok(()));
            };
            match ready!(Pin::new(stream).poll_frame(cx)) {
                None => {
                    match self.framing {
                        Encoding::Length(left) if left > 0 => {
                            return Poll::Ready(Err(SendError::Body(
                                "the body ended before its Content-Length".into(),
                            )));
                        }
                        Encoding::Chunked => self.out.extend_from_slice(h1::LAST_CHUNK),
                        _ => {}
                    }
                    self.stream = None;
                }
                Some(Err(error)) => return Poll::Ready(Err(SendError::Body(error.into()))),
                Some(Ok(frame)) => {
                    // Trailers are not sent on (see `h1::LAST_CHUNK`).
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    match &mut self.framing {
                        Encoding::Length(left) => {
                            let Some(rest) = left.checked_sub(data.len() as u64) else {
                                return Poll::Ready(Err(SendError::Body(
                                    "the body is longer than its Content-Length".into(),
                                )));
                            };
                            *left = rest;
                            self.out.extend_from_slice(&data);
                        }
                        Encoding::Chunked if !data.is_empty() => {
                            h1::encode_chunk_size(data.len(), &mut self.out);
                            self.out.extend_from_slice(&data);
                            self.out.extend_from_slice(b"\r\n");
                        }
                        _ => {}
                    }
                }
            }
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

/// A failed exchange, and whether the request can go out again on another connection (nothing
/// of it was written).
struct Failed {
    error: SendError,
    unsent: bool,
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
        let (mut parts, body) = req.into_parts();
        let length = match &body {
            RequestBody::Bytes(bytes) if bytes.is_empty() => BodyLength::Empty,
            RequestBody::Bytes(bytes) => BodyLength::Known(bytes.len() as u64),
            RequestBody::Stream(stream) if stream.is_end_stream() => BodyLength::Empty,
            RequestBody::Stream(stream) => stream
                .size_hint()
                .exact()
                .map_or(BodyLength::Unknown, BodyLength::Known),
        };
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut head = Vec::with_capacity(1024);
        let encoding =
            h1::encode_request_head(&parts.method, target, &mut parts.headers, length, &mut head);
        let mut writer = match (body, encoding) {
            (_, Encoding::Empty) => None,
            (RequestBody::Bytes(bytes), _) if bytes.len() <= INLINE_BODY => {
                head.extend_from_slice(&bytes);
                None
            }
            (RequestBody::Bytes(bytes), _) => Some(BodyWriter {
                out: bytes.into(),
                written: 0,
                stream: None,
                framing: encoding,
            }),
            (RequestBody::Stream(stream), framing) => Some(BodyWriter {
                out: Vec::new(),
                written: 0,
                stream: Some(stream),
                framing,
            }),
        };
        let method = parts.method;
        while let Some(mut conn) = self.checkout() {
            match exchange(&mut conn, &head, &method, &mut writer).await {
                Ok(response) => return Ok(self.wrap(*response, conn, writer)),
                Err(failed) if failed.unsent => {}
                Err(failed) => return Err(failed.error),
            }
        }
        let io = self
            .connector
            .clone()
            .call(self.uri.clone())
            .await
            .map_err(SendError::Connect)?;
        let mut conn = Conn::new(Io::from(io));
        let response = exchange(&mut conn, &head, &method, &mut writer)
            .await
            .map_err(|failed| failed.error)?;
        Ok(self.wrap(*response, conn, writer))
    }

    fn wrap(
        self: &Arc<Self>,
        head: ResponseHead,
        conn: Conn,
        writer: Option<BodyWriter>,
    ) -> Response<UpstreamResponse> {
        let ResponseHead {
            parts,
            framing,
            keep_alive,
        } = head;
        let mut body = UpstreamResponse {
            conn: Some(conn),
            decoder: Decoder::new(framing),
            writer,
            keep_alive,
            pool: self.clone(),
            ended: false,
        };
        if body.decoder.is_end() {
            body.finish();
        }
        Response::from_parts(parts, body)
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

/// Writes the request head on `conn`, then writes the body (`writer`) while it waits for the
/// response head. What is left of the body when the head arrives stays in `writer`.
async fn exchange(
    conn: &mut Conn,
    head: &[u8],
    method: &Method,
    writer: &mut Option<BodyWriter>,
) -> Result<Box<ResponseHead>, Failed> {
    let mut written = 0;
    if let Err(error) = poll_fn(|cx| write_all(&mut conn.io, cx, head, &mut written)).await {
        return Err(Failed {
            error: error.into(),
            unsent: written == 0,
        });
    }
    poll_fn(|cx| {
        if let Poll::Ready(head) = conn.poll_head(cx, method) {
            return Poll::Ready(head);
        }
        if let Some(body) = writer {
            ready!(body.poll(&mut conn.io, cx))?;
            *writer = None;
            // Writing may have been all that was left to do before the head could arrive.
            return conn.poll_head(cx, method);
        }
        Poll::Pending
    })
    .await
    .map_err(|error| Failed {
        error,
        unsent: false,
    })
}

/// A response body from the upstream; polling it reads the upstream connection (and writes
/// what is left of the request body). The connection goes back to the pool as soon as the body
/// has ended, and is closed if the body is dropped before.
pub struct UpstreamResponse {
    /// `None` once the body has ended or failed.
    conn: Option<Conn>,
    decoder: Decoder,
    writer: Option<BodyWriter>,
    keep_alive: bool,
    pool: Arc<Pool>,
    ended: bool,
}

impl UpstreamResponse {
    /// The body has ended: the connection is pooled if it can carry another request.
    fn finish(&mut self) {
        self.ended = true;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && self.writer.is_none()
            && conn.buf.is_empty()
        {
            self.pool.put(conn);
        }
    }

    fn fail(&mut self, error: SendError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.ended = true;
        Poll::Ready(Some(Err(error.into())))
    }
}

impl Body for UpstreamResponse {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(conn) = &mut this.conn else {
            return Poll::Ready(None);
        };
        if let Some(writer) = &mut this.writer {
            match writer.poll(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => this.writer = None,
                // The upstream has answered and may not want the rest of the request; what was
                // written of it is not ended as if it were whole, and the connection is not
                // reused.
                Poll::Ready(Err(_)) => {
                    this.writer = None;
                    this.keep_alive = false;
                }
                Poll::Pending => {}
            }
        }
        loop {
            let (step, used) = match this.decoder.decode(conn.unread()) {
                Ok(decoded) => decoded,
                Err(error) => return this.fail(error.into()),
            };
            match step {
                Step::Data { start, end } => {
                    let data = conn.take(start..end, used);
                    if this.decoder.is_end() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Step::Trailers(trailers) => {
                    conn.consume(used);
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Step::End => {
                    conn.consume(used);
                    this.finish();
                    return Poll::Ready(None);
                }
                Step::More => conn.consume(used),
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    return match this.decoder.eof() {
                        Ok(()) => {
                            this.keep_alive = false;
                            this.finish();
                            Poll::Ready(None)
                        }
                        Err(error) => this.fail(error.into()),
                    };
                }
                Ok(_) => {}
                Err(error) => return this.fail(error),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
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
    use http_body_util::BodyExt;
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
        let mut conn = pool.checkout().expect("the connection was pooled");
        // The upstream resets the connection after the checkout found it open.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accept) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (server, _) = accept.unwrap();
        let mut client = client.unwrap();
        client.write_all(b"unread").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(server); // with bytes unread: a reset, not a close
        conn.io = Io::Plain(client);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let head = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        let failed = exchange(&mut conn, head, &Method::GET, &mut None)
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

    /// Reads into `conn` until `n` more bytes are unread.
    async fn fill(conn: &mut Conn, n: usize) {
        let want = conn.unread().len() + n;
        while conn.unread().len() < want {
            assert_ne!(poll_fn(|cx| conn.poll_fill(cx)).await.unwrap(), 0);
        }
    }

    #[tokio::test]
    async fn body_frames_are_the_read_buffer_itself_reused_once_they_are_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut server = accepted.unwrap().0;
        let mut conn = Conn::new(Io::Plain(client.unwrap()));
        let base = conn.buf.as_ptr() as usize;
        // 40 KB in frames of 200 B, each dropped at once (as when it is written to the client):
        // all are read into the one 8 KiB buffer and handed on without a copy.
        for i in 0..200u8 {
            server.write_all(&[i; 200]).await.unwrap();
            fill(&mut conn, 200).await;
            let frame = conn.take(0..200, 200);
            assert!(
                (base..base + READ_BUF).contains(&(frame.as_ptr() as usize)),
                "frame {i} is not in the connection's first buffer"
            );
            assert!(frame.iter().all(|&b| b == i), "frame {i}");
        }
        assert!(conn.buf.capacity() <= READ_BUF);
        // Frames held while the connection reads on (a slow client): their bytes stay theirs.
        let mut held = Vec::new();
        for i in 0..100u8 {
            server.write_all(&[i; 200]).await.unwrap();
            fill(&mut conn, 200).await;
            held.push(conn.take(0..200, 200));
        }
        for (i, frame) in held.iter().enumerate() {
            assert!(frame.iter().all(|&b| b == i as u8), "held frame {i}");
        }
        // A long head grows the buffer; once consumed it is back to the usual size.
        server.write_all(&[b'h'; 20_000]).await.unwrap();
        fill(&mut conn, 20_000).await;
        assert!(conn.buf.capacity() >= 20_000);
        conn.consume(20_000);
        assert!(conn.buf.capacity() <= READ_BUF);
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
