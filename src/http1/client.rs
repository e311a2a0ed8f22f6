//! The client side of one upstream HTTP/1.1 connection: write a request, read its response
//! head, and hand the response body on as it arrives.
//!
//! A response body from the upstream is read by the task that writes it to the client: when the
//! client side polls [`UpstreamResponse`] for the next chunk, it reads the upstream socket into
//! the connection's buffer and hands the chunk on as a slice of it, uncopied. A chunk costs one
//! task wake-up (the socket's), no channel lies between a connection and its body, and chunks
//! that arrive together are handed on back to back. When the response ends the connection goes
//! back home at once; when the body is dropped before its end (the client hung up) the
//! connection is closed, which cancels the request upstream.

use std::future::poll_fn;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{self as h1, BodyLength, Decoder, Encoding, Parsed, ResponseHead, Step};
use crate::net::BoxError;

/// Bytes a connection reads at once (nginx reads upstream responses 4–8 KiB at a time).
const READ_BUF: usize = 8 * 1024;
/// Longest response head or trailer section: the read buffer grows this far for one, and no
/// further.
const READ_MAX: usize = 64 * 1024;
/// A request body up to this size goes out in the same write as the head.
const INLINE_BODY: usize = 64 * 1024;

/// A request body streamed as it arrives (the client's, with the proxy's limits around it).
pub type StreamBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A request body to send upstream.
#[derive(Debug)]
pub enum RequestBody {
    /// A body the proxy holds whole (read to be inspected, maybe rewritten).
    Bytes(Bytes),
    /// The client's body, streamed as it arrives.
    Stream(StreamBody),
}

/// An upstream connection's socket. A TLS session is about a kilobyte of state: boxed, it costs
/// plain-TCP connections (the usual case next to vLLM) nothing.
pub enum Io {
    /// A plain TCP connection.
    Plain(TcpStream),
    /// A TLS session over TCP.
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
pub struct Conn {
    io: Io,
    /// Read and not yet consumed; reads go into the spare capacity behind it. A body chunk is
    /// split off as a frame of its own (no copy); the buffer is reused once the frames read from
    /// it are dropped, which for a forwarded chunk is when it has been written to the client.
    buf: BytesMut,
}

impl Conn {
    /// A connection over `io`, with nothing read yet.
    pub fn new(io: Io) -> Conn {
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
        let too_long = || {
            Poll::Ready(Err(h1::Error::Framing(
                "response head or trailer section longer than 64 KiB",
            )
            .into()))
        };
        loop {
            match h1::parse_response_head(self.unread(), method)? {
                Parsed::Informational(len) | Parsed::Head(len, _) if len > READ_MAX => {
                    return too_long();
                }
                Parsed::Informational(len) => self.consume(len),
                Parsed::Head(len, head) => {
                    self.consume(len);
                    return Poll::Ready(Ok(head));
                }
                Parsed::Partial if self.buf.len() >= READ_MAX => return too_long(),
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
    pub fn reusable(&mut self) -> bool {
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
    stream: Option<StreamBody>,
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
                Some(Err(error)) => return Poll::Ready(Err(SendError::Body(error))),
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

/// Where a connection goes when the response on it has ended and it can carry another request
/// (the pool it came from).
pub trait Checkin: Send + Sync {
    /// Takes back an idle, reusable connection.
    fn checkin(&self, conn: Conn);
}

/// A request ready to go out on a connection: its head (with a short body inline) and what is
/// left of its body. It can be tried on another connection while nothing of it was written.
pub struct Outgoing {
    head: Vec<u8>,
    method: Method,
    writer: Option<BodyWriter>,
}

impl Outgoing {
    /// Encodes `req` (origin-form URI, `Host` set).
    pub fn new(req: Request<RequestBody>) -> Outgoing {
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
        let writer = match (body, encoding) {
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
        Outgoing {
            head,
            method: parts.method,
            writer,
        }
    }

    /// Sends the request on `conn` and waits for the response head; see [`exchange`].
    pub async fn send_on(&mut self, conn: &mut Conn) -> Result<Box<ResponseHead>, Failed> {
        exchange(conn, &self.head, &self.method, &mut self.writer).await
    }

    /// The response whose head `head` arrived on `conn`: its body reads `conn` and writes the
    /// rest of the request, then hands `conn` to `home`.
    pub fn into_response(
        self,
        head: ResponseHead,
        conn: Conn,
        home: Arc<dyn Checkin>,
    ) -> Response<UpstreamResponse> {
        let ResponseHead {
            parts,
            framing,
            keep_alive,
        } = head;
        let mut body = UpstreamResponse {
            conn: Some(conn),
            decoder: Decoder::new(framing),
            writer: self.writer,
            keep_alive,
            home,
            ended: false,
        };
        if body.decoder.is_end() {
            body.finish();
        }
        Response::from_parts(parts, body)
    }
}

/// A failed exchange, and whether the request can go out again on another connection (nothing
/// of it was written).
#[derive(Debug)]
pub struct Failed {
    /// What went wrong.
    pub error: SendError,
    /// Nothing of the request was written.
    pub unsent: bool,
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

/// A response body from the upstream. It owns the connection for the rest of the exchange:
/// polling it reads the response and writes what is left of the request body, the two things
/// that must move together on one HTTP/1.1 connection. The connection goes home (to its pool)
/// as soon as the body has ended, and is closed if the body is dropped before.
pub struct UpstreamResponse {
    /// `None` once the body has ended or failed.
    conn: Option<Conn>,
    decoder: Decoder,
    /// What is left of the request body: this body writes it while it reads the response.
    writer: Option<BodyWriter>,
    keep_alive: bool,
    /// Where the connection goes when the response has ended and it can carry another request.
    home: Arc<dyn Checkin>,
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
            self.home.checkin(conn);
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
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

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
}
