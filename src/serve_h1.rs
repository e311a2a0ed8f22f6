//! HTTP/1.1 connections from clients: read a request head, hand the request to the handler,
//! write its response, and go on with the next request on the same connection.
//!
//! One task serves one connection and polls everything on it: the handler's future, the response
//! body (which, for a proxied response, reads the upstream socket) and the writes to the client.
//! A body frame is written as soon as it is handed over; frames that are ready together go out
//! in one write. While the response has nothing to write the connection watches the client's
//! socket: a client that hangs up (or whose connection fails) ends the request at once, which
//! drops the response body and so cancels the upstream request.
//!
//! The rules are hyper's server rules (RFC 9112): a request body is framed by
//! `Transfer-Encoding: chunked` or `Content-Length` (a request with neither has none); an
//! HTTP/1.1 connection stays open unless a side says `close`, an HTTP/1.0 one only when the
//! client asks for `keep-alive`; `Expect: 100-continue` is answered when the handler first reads
//! the body. A response without `Content-Length` is chunked for HTTP/1.1 clients and ends with
//! the connection for HTTP/1.0 ones; responses to `HEAD`, and 1xx, 204 and 304 responses, carry
//! no body. A `Date` header is added when the response has none. A request head that cannot be
//! read gets a 400 (431 when it is too large, 505 for a version other than 1.x) and the
//! connection is closed. Pipelined requests are answered in order.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::h1::{self, Decoder, Framing, Step};
use crate::observe::BoxError;

/// Bytes read from a client at once.
const READ_BUF: usize = 8 * 1024;
/// Longest request head (request line and header fields). uvicorn, which serves vLLM, takes
/// heads up to 16 KiB.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields a request may carry (hyper's default).
const MAX_HEADERS: usize = h1::MAX_HEADERS;
/// Header slots tried before `MAX_HEADERS` (see `h1::parse_response_head`).
const FEW_HEADERS: usize = 24;
/// Response bytes gathered from frames that are ready together before they are written.
const WRITE_BATCH: usize = 64 * 1024;
/// How long a closing connection keeps reading (and dropping) what the client still sends, so
/// that the response already written is not lost to a reset (nginx's `lingering_close`).
const LINGER: Duration = Duration::from_secs(2);
/// The interim response to `Expect: 100-continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The request body of an HTTP/1.1 request: reading it reads the client's connection.
pub struct H1Body {
    shared: Arc<Shared>,
    /// The body has ended (or failed): nothing more comes.
    ended: bool,
}

/// What the connection and the body of its current request both use.
struct Shared {
    io: TcpStream,
    inbound: Mutex<Inbound>,
}

/// Bytes read from the client and not consumed yet, and where the current request body is.
struct Inbound {
    buf: BytesMut,
    decoder: Decoder,
    /// Bytes of the `100 Continue` answer left to write before the body is read.
    continue_left: usize,
}

impl Shared {
    fn inbound(&self) -> MutexGuard<'_, Inbound> {
        // Nothing panics while holding the lock; a poisoned one still holds consistent bytes.
        self.inbound.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads what the client sent into `buf`, up to `limit` bytes held: `Ready(Ok(0))` once the
    /// client has closed its side, `Ready(Ok(n))` after a read, `Pending` when there is nothing
    /// (the task is woken when there is).
    fn poll_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        limit: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            let room = limit.saturating_sub(buf.len()).min(READ_BUF);
            if room == 0 {
                return Poll::Ready(Err(io::Error::other("read buffer full")));
            }
            if buf.capacity() - buf.len() < room.min(1024) {
                buf.reserve(room);
            }
            // `try_read_buf` reads into all the spare capacity: bounded by `limit` with a
            // separate buffer only when it matters, which a well-behaved client never makes.
            // A read that did not fill it drained the socket: its readiness is cleared (by
            // answering `WouldBlock` to `try_io`), as tokio's own `poll_read` does, so that the
            // next look at the socket waits for the client instead of reading it in vain.
            let spare = buf.capacity() - buf.len();
            let mut read = 0;
            let result = self.io.try_io(Interest::READABLE, || {
                read = self.io.try_read_buf(buf)?;
                if 0 < read && read < spare {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(read)
            });
            match result {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => {
                    return Poll::Ready(Ok(read));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes `out[*written..]`; `Ready(Ok)` once all is written. The write is tried first:
    /// `try_write` answers `WouldBlock` without a syscall while the socket is known not to be
    /// writable, and only then is the task registered to wait for it.
    fn poll_write(
        &self,
        cx: &mut Context<'_>,
        out: &[u8],
        written: &mut usize,
    ) -> Poll<io::Result<()>> {
        while *written < out.len() {
            match self.io.try_write(&out[*written..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.io.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Whether the client has hung up, judged while the response has nothing to write. Bytes it
    /// sent meanwhile (the next pipelined request) are kept; once `MAX_HEAD` of them are held
    /// the socket is no longer watched. The request body's own reads tell while it is alive.
    ///
    /// `watching` is the waker the socket was last left waiting with by this call: tokio keeps
    /// it until the socket turns readable, so while it is the task's and the socket is not
    /// readable nothing is registered again.
    fn hung_up(self: &Arc<Self>, cx: &mut Context<'_>, watching: &mut Option<Waker>) -> bool {
        if Arc::strong_count(self) > 1 {
            // The request body may read, and wait on, the socket meanwhile.
            *watching = None;
            return false;
        }
        if watching.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
            && self.io.try_io(Interest::READABLE, || Ok(())).is_err()
        {
            return false;
        }
        *watching = None;
        loop {
            // Readiness first: the usual answer (nothing came) takes no lock.
            match self.io.poll_read_ready(cx) {
                Poll::Pending => {
                    *watching = Some(cx.waker().clone());
                    return false;
                }
                Poll::Ready(Err(_)) => return true,
                Poll::Ready(Ok(())) => {}
            }
            let mut inbound = self.inbound();
            if inbound.buf.len() >= MAX_HEAD {
                return false;
            }
            match self.poll_read(cx, &mut inbound.buf, MAX_HEAD) {
                Poll::Pending => {
                    *watching = Some(cx.waker().clone());
                    return false;
                }
                // A client that sent its next requests and then closed its side still gets
                // their answers.
                Poll::Ready(Ok(0)) => return inbound.buf.is_empty(),
                Poll::Ready(Err(_)) => return true,
                Poll::Ready(Ok(_)) => {}
            }
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let shared = &*this.shared;
        let mut guard = shared.inbound();
        let inbound = &mut *guard;
        if inbound.continue_left > 0 {
            if inbound.buf.is_empty() {
                let mut written = CONTINUE.len() - inbound.continue_left;
                let result = shared.poll_write(cx, CONTINUE, &mut written);
                inbound.continue_left = CONTINUE.len() - written;
                if let Err(error) = ready!(result) {
                    this.ended = true;
                    return Poll::Ready(Some(Err(error.into())));
                }
            }
            // Body bytes that came unasked mean the client did not wait for the answer.
            inbound.continue_left = 0;
        }
        loop {
            let (step, used) = match inbound.decoder.decode(&inbound.buf) {
                Ok(decoded) => decoded,
                Err(error) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(error.into())));
                }
            };
            match step {
                Step::Data { start, end } => {
                    inbound.buf.advance(start);
                    let data = inbound.buf.split_to(end - start).freeze();
                    inbound.buf.advance(used - end);
                    this.ended = inbound.decoder.is_end();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Step::Trailers(trailers) => {
                    inbound.buf.advance(used);
                    this.ended = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Step::End => {
                    inbound.buf.advance(used);
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Step::More => inbound.buf.advance(used),
            }
            // What is held undecoded is at most a chunk-size line or a trailer section:
            // bounded like a head.
            match ready!(shared.poll_read(cx, &mut inbound.buf, MAX_HEAD)) {
                Ok(0) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(
                        "the client closed the connection mid-body".into()
                    )));
                }
                Ok(_) => {}
                Err(error) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(error.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended {
            return SizeHint::with_exact(0);
        }
        self.shared.inbound().decoder.size_hint()
    }
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

/// A request head, read.
#[derive(Debug)]
pub struct RequestHead {
    /// Method, target, version and header fields.
    pub parts: http::request::Parts,
    /// How the body that follows is framed.
    pub framing: Framing,
    /// Whether the client keeps the connection open after the response.
    pub keep_alive: bool,
    /// Whether the client waits for `100 Continue` before it sends the body.
    pub expect_continue: bool,
    /// Whether the client takes trailers (`TE: trailers`) in a chunked response.
    pub trailers: bool,
}

/// Why a request head cannot be read; each has the status the client is answered with.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Not a valid HTTP/1.x request head, or a body framing that cannot be read.
    #[error("invalid request head: {0}")]
    Invalid(&'static str),
    /// Longer than `MAX_HEAD` bytes or more than 100 header fields.
    #[error("request head too large")]
    TooLarge,
    /// A protocol version other than HTTP/1.0 or 1.1.
    #[error("unsupported HTTP version")]
    Version,
}

impl HeadError {
    /// The status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            HeadError::Invalid(_) => StatusCode::BAD_REQUEST,
            HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::Version => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
        }
    }
}

/// Where the parts of a parsed head lie in its bytes.
#[derive(Default)]
struct Layout {
    method: Range<usize>,
    target: Range<usize>,
    version: u8,
    /// Name and value of each field.
    fields: Vec<(Range<usize>, Range<usize>)>,
}

/// Reads the request head at the start of `buf`: `Ok(None)` when it is not whole yet. The head
/// is consumed from `buf`; header values and the target share its bytes.
pub fn parse_request_head(buf: &mut BytesMut) -> Result<Option<RequestHead>, HeadError> {
    let mut layout = Layout::default();
    let Some(len) = locate(buf, &mut layout)? else {
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        return Ok(None);
    };
    let head = buf.split_to(len).freeze();
    let method = Method::from_bytes(&head[layout.method.clone()])
        .map_err(|_| HeadError::Invalid("method"))?;
    let uri = Uri::from_maybe_shared(head.slice(layout.target.clone()))
        .map_err(|_| HeadError::Invalid("request target"))?;
    let version = if layout.version == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Room for the fields a proxy adds (`X-Forwarded-*`, `traceparent`, `tracestate`) without
    // growing the map, which rehashes every field.
    let mut headers = HeaderMap::with_capacity(layout.fields.len() + 4);
    for (name, value) in layout.fields {
        let name = HeaderName::from_bytes(&head[name]).map_err(|_| HeadError::Invalid("field"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value))
            .map_err(|_| HeadError::Invalid("field value"))?;
        headers.append(name, value);
    }
    let (framing, smuggled_length) = request_framing(version, &mut headers)?;
    let has = |name: HeaderName, token: &str| h1::has_token(&headers, name, token);
    // A request framed both ways is answered and the connection closed (RFC 9112 §6.1).
    let keep_alive = !smuggled_length
        && if version == Version::HTTP_10 {
            has(header::CONNECTION, "keep-alive")
        } else {
            !has(header::CONNECTION, "close")
        };
    let expect_continue = version == Version::HTTP_11
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let trailers = has(header::TE, "trailers");
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(RequestHead {
        parts,
        framing,
        keep_alive,
        expect_continue,
        trailers,
    }))
}

/// Parses the head at the start of `buf` into `layout`; its length once it is whole.
fn locate(buf: &[u8], layout: &mut Layout) -> Result<Option<usize>, HeadError> {
    let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
    match locate_with(buf, layout, &mut few) {
        Err(HeadError::TooLarge) => {
            let mut all = [httparse::EMPTY_HEADER; MAX_HEADERS];
            locate_with(buf, layout, &mut all)
        }
        located => located,
    }
}

fn locate_with<'b>(
    buf: &'b [u8],
    layout: &mut Layout,
    fields: &mut [httparse::Header<'b>],
) -> Result<Option<usize>, HeadError> {
    let mut req = httparse::Request::new(fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::Version),
        Err(_) => return Err(HeadError::Invalid("not an HTTP/1.x request head")),
    };
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Invalid("incomplete request line"));
    };
    layout.method = at(method.as_bytes());
    layout.target = at(target.as_bytes());
    layout.version = version;
    layout.fields.clear();
    layout.fields.extend(
        req.headers
            .iter()
            .map(|field| (at(field.name.as_bytes()), at(field.value))),
    );
    Ok(Some(len))
}

/// How a request body is framed (RFC 9112 §6.3): chunked when `Transfer-Encoding` ends in
/// `chunked` (a `Content-Length` beside it is dropped, and reported), any other transfer coding
/// is refused, else `Content-Length` (all values equal), else no body.
fn request_framing(
    version: Version,
    headers: &mut HeaderMap,
) -> Result<(Framing, bool), HeadError> {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(HeadError::Invalid(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if !h1::ends_in_chunked(headers) {
            return Err(HeadError::Invalid(
                "Transfer-Encoding does not end in chunked",
            ));
        }
        let both = headers.remove(header::CONTENT_LENGTH).is_some();
        return Ok((Framing::Chunked, both));
    }
    let length = h1::content_length(headers)
        .map_err(|_| HeadError::Invalid("Content-Length values differ or are not numbers"))?;
    Ok((Framing::Length(length.unwrap_or(0)), false))
}

/// How the response body is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// No body is written (`HEAD`, 1xx, 204, 304): the body is dropped unpolled.
    None,
    /// Exactly this many bytes are left.
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// What a response is written for.
struct Asked {
    method: Method,
    version: Version,
    keep_alive: bool,
    trailers: bool,
}

/// Writes the head of `parts` to `out` for the request `asked`, with the framing headers its
/// body (`hint`, `empty`) calls for; returns how the body is written and whether the
/// connection stays open after it.
fn encode_response_head(
    parts: &mut http::response::Parts,
    asked: &Asked,
    hint: &SizeHint,
    empty: bool,
    out: &mut Vec<u8>,
) -> (Out, bool) {
    let headers = &mut parts.headers;
    let status = parts.status;
    let mut keep_alive = asked.keep_alive && !h1::has_token(headers, header::CONNECTION, "close");
    let bodiless = asked.method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    headers.remove(header::TRANSFER_ENCODING);
    let given = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let out_framing = if bodiless {
        if status == StatusCode::NO_CONTENT || status.is_informational() {
            headers.remove(header::CONTENT_LENGTH);
        } else if asked.method == Method::HEAD
            && !headers.contains_key(header::CONTENT_LENGTH)
            && let Some(len) = if empty { Some(0) } else { hint.exact() }
        {
            // The length a GET would have had, as hyper writes it.
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        Out::None
    } else if let Some(len) = given {
        Out::Length(len)
    } else {
        headers.remove(header::CONTENT_LENGTH);
        let exact = if empty { Some(0) } else { hint.exact() };
        match exact {
            Some(len) => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                Out::Length(len)
            }
            None if asked.version == Version::HTTP_11 => {
                headers.insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
                Out::Chunked
            }
            None => {
                keep_alive = false;
                Out::Close
            }
        }
    };
    if !keep_alive {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    } else if asked.version == Version::HTTP_10 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    if !headers.contains_key(header::DATE) {
        headers.insert(header::DATE, date());
    }
    out.extend_from_slice(if asked.version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    encode_fields(headers, out);
    out.extend_from_slice(b"\r\n");
    (out_framing, keep_alive)
}

fn encode_fields(headers: &HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// The `Date` header for now, made once a second per thread.
fn date() -> HeaderValue {
    use std::cell::RefCell;
    thread_local! {
        static CACHED: RefCell<(u64, Option<HeaderValue>)> = const { RefCell::new((0, None)) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, value)| {
        if *at != secs || value.is_none() {
            *at = secs;
            *value = HeaderValue::from_str(&httpdate::fmt_http_date(now)).ok();
        }
        value.clone().unwrap_or(HeaderValue::from_static(""))
    })
}

/// Why serving a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Reading from or writing to the client failed.
    #[error("client connection: {0}")]
    Io(#[from] io::Error),
    /// The response body failed mid-way; the client's connection was cut.
    #[error("response body: {0}")]
    Body(BoxError),
    /// The response body was longer or shorter than its `Content-Length`.
    #[error("the response body does not match its Content-Length")]
    Length,
}

/// Serves the HTTP/1.1 requests of the client at `remote` on `io` with `handler` until either
/// side closes the connection. Once `drain` is set, the connection closes after the response in
/// hand, or at once when it is between requests (`drained` wakes it then).
pub async fn serve_connection<H, Fut, B, R>(
    io: TcpStream,
    remote: SocketAddr,
    handler: &H,
    drain: &AtomicBool,
    drained: &Notify,
) -> Result<(), ConnError>
where
    H: Fn(Request<R>, SocketAddr) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: Body<Data = Bytes, Error = BoxError>,
    R: From<H1Body>,
{
    let draining = || drain.load(Ordering::Acquire);
    let shared = Arc::new(Shared {
        io,
        inbound: Mutex::new(Inbound {
            buf: BytesMut::with_capacity(READ_BUF),
            decoder: Decoder::new(Framing::Length(0)),
            continue_left: 0,
        }),
    });
    let mut out = Vec::with_capacity(1024);
    loop {
        let head = {
            let parsed = parse_request_head(&mut shared.inbound().buf);
            match parsed {
                Ok(Some(head)) => head,
                Ok(None) => {
                    let idle = shared.inbound().buf.is_empty();
                    if idle && draining() {
                        return Ok(());
                    }
                    let woken = drained.notified();
                    let mut woken = pin!(woken);
                    let read = poll_fn(|cx| {
                        if idle && draining() {
                            return Poll::Ready(Ok(0));
                        }
                        if idle && woken.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Ok(0));
                        }
                        let mut inbound = shared.inbound();
                        shared.poll_read(cx, &mut inbound.buf, MAX_HEAD)
                    })
                    .await;
                    match read {
                        Ok(0) => return Ok(()),
                        Ok(_) => continue,
                        Err(error) => return Err(error.into()),
                    }
                }
                Err(error) => {
                    answer_bad_head(shared, &error, &mut out).await;
                    return Ok(());
                }
            }
        };
        let asked = Asked {
            method: head.parts.method.clone(),
            version: head.parts.version,
            keep_alive: head.keep_alive,
            trailers: head.trailers,
        };
        let no_body = head.framing == Framing::Length(0);
        {
            let mut inbound = shared.inbound();
            inbound.decoder = Decoder::new(head.framing);
            inbound.continue_left = if head.expect_continue && !no_body {
                CONTINUE.len()
            } else {
                0
            };
        }
        let body = H1Body {
            shared: shared.clone(),
            ended: no_body,
        };
        let request = Request::from_parts(head.parts, R::from(body));

        let response = {
            let mut answer = pin!(handler(request, remote));
            let mut watching = None;
            poll_fn(|cx| {
                if let Poll::Ready(response) = answer.as_mut().poll(cx) {
                    return Poll::Ready(Some(response));
                }
                if shared.hung_up(cx, &mut watching) {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await
        };
        let Some(response) = response else {
            return Ok(());
        };

        let (mut parts, body) = response.into_parts();
        // A request body the handler dropped unread leaves the next request's start unknown:
        // this is the last response, and it says so.
        let unread = Arc::strong_count(&shared) == 1 && !shared.inbound().decoder.is_end();
        let asked = Asked {
            keep_alive: asked.keep_alive && !unread && !draining(),
            ..asked
        };
        let declared = if asked.trailers {
            declared_trailers(&parts.headers)
        } else {
            Vec::new()
        };
        out.clear();
        let (framing, mut keep_alive) = encode_response_head(
            &mut parts,
            &asked,
            &body.size_hint(),
            body.is_end_stream(),
            &mut out,
        );
        write_body(&shared, body, framing, &declared, &mut out).await?;
        if out.capacity() > WRITE_BATCH * 2 {
            out = Vec::with_capacity(1024);
        }
        // A request body left unread (or still held) makes the next request's start unknown.
        keep_alive &= Arc::strong_count(&shared) == 1 && shared.inbound().decoder.is_end();
        if !keep_alive || draining() {
            close(shared, false).await;
            return Ok(());
        }
        shared.inbound().continue_left = 0;
    }
}

/// Writes the response body after the head in `out`, frame by frame as the body hands them
/// over, and returns once it has all been written; trailers named in `declared` go out after a
/// chunked body. The body is dropped unpolled when no body may be written, and is not polled
/// again once its `Content-Length` is reached.
async fn write_body<B>(
    shared: &Arc<Shared>,
    body: B,
    framing: Out,
    declared: &[HeaderName],
    out: &mut Vec<u8>,
) -> Result<(), ConnError>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    let mut body = pin!(body);
    let mut written = 0;
    let mut left = framing;
    let mut ended = framing == Out::None;
    let mut trailers = None;
    let mut watching = None;
    poll_fn(|cx| {
        loop {
            let mut waiting = false;
            if !ended && out.len() - written < WRITE_BATCH {
                match body.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        match frame.into_data() {
                            Ok(data) => {
                                if let Err(error) = append(&mut left, &data, out) {
                                    return Poll::Ready(Err(error));
                                }
                                ended = left == Out::Length(0);
                            }
                            Err(frame) => {
                                if let Ok(all) = frame.into_trailers()
                                    && left == Out::Chunked
                                {
                                    let mut kept = HeaderMap::new();
                                    for name in declared {
                                        for value in all.get_all(name) {
                                            kept.append(name.clone(), value.clone());
                                        }
                                    }
                                    trailers = Some(kept);
                                }
                            }
                        }
                        continue;
                    }
                    Poll::Ready(Some(Err(error))) => {
                        return Poll::Ready(Err(ConnError::Body(error)));
                    }
                    Poll::Ready(None) => {
                        ended = true;
                        match left {
                            Out::Length(0) | Out::None | Out::Close => {}
                            Out::Length(_) => return Poll::Ready(Err(ConnError::Length)),
                            Out::Chunked => match trailers.take() {
                                Some(t) => {
                                    out.extend_from_slice(b"0\r\n");
                                    encode_fields(&t, out);
                                    out.extend_from_slice(b"\r\n");
                                }
                                None => out.extend_from_slice(h1::LAST_CHUNK),
                            },
                        }
                    }
                    Poll::Pending => waiting = true,
                }
            }
            if written < out.len() {
                ready!(shared.poll_write(cx, out, &mut written))?;
                out.clear();
                written = 0;
                if !waiting {
                    continue;
                }
            }
            if ended {
                return Poll::Ready(Ok(()));
            }
            if shared.hung_up(cx, &mut watching) {
                return Poll::Ready(Err(ConnError::Io(io::ErrorKind::ConnectionReset.into())));
            }
            return Poll::Pending;
        }
    })
    .await
}

/// The trailer fields a response's `Trailer` header announces, as hyper sends them: none that
/// frame or route the message.
fn declared_trailers(headers: &HeaderMap) -> Vec<HeaderName> {
    const FORBIDDEN: [HeaderName; 8] = [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::HOST,
        header::TRAILER,
        header::TE,
        header::CONNECTION,
    ];
    headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !FORBIDDEN.contains(name))
        .collect()
}

/// Adds a data frame to `out` as the body is framed.
fn append(left: &mut Out, data: &[u8], out: &mut Vec<u8>) -> Result<(), ConnError> {
    match left {
        Out::None => {}
        Out::Length(n) => {
            let Some(rest) = n.checked_sub(data.len() as u64) else {
                return Err(ConnError::Length);
            };
            *n = rest;
            out.extend_from_slice(data);
        }
        Out::Chunked if !data.is_empty() => {
            h1::encode_chunk_size(data.len(), out);
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        Out::Chunked => {}
        Out::Close => out.extend_from_slice(data),
    }
    Ok(())
}

/// Answers a request head that cannot be read with an OpenAI-style error, then closes.
async fn answer_bad_head(shared: Arc<Shared>, error: &HeadError, out: &mut Vec<u8>) {
    let status = error.status();
    let body = serde_json::json!({
        "error": {
            "message": format!("tokentap: {error}"),
            "type": "invalid_request_error",
            "param": null,
            "code": status.as_u16(),
        }
    })
    .to_string();
    let mut response = Response::new(());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let (mut parts, ()) = response.into_parts();
    let asked = Asked {
        method: Method::GET,
        version: Version::HTTP_11,
        keep_alive: false,
        trailers: false,
    };
    out.clear();
    let hint = SizeHint::with_exact(body.len() as u64);
    encode_response_head(&mut parts, &asked, &hint, false, out);
    out.extend_from_slice(body.as_bytes());
    let mut written = 0;
    if poll_fn(|cx| shared.poll_write(cx, out, &mut written))
        .await
        .is_ok()
    {
        close(shared, true).await;
    }
}

/// Closes the connection after its last response. When the client may still be sending (a
/// request body or a pipelined request left unread, or after a head that could not be read:
/// `linger`) the
/// write side is shut first and what comes is read and dropped for up to `LINGER`: closing a
/// socket with unread bytes resets the connection, and the reset can destroy the response
/// before the client has read it (nginx's `lingering_close`).
async fn close(shared: Arc<Shared>, linger: bool) {
    let Ok(shared) = Arc::try_unwrap(shared) else {
        return;
    };
    let Shared { mut io, inbound } = shared;
    let inbound = inbound.into_inner().unwrap_or_else(|e| e.into_inner());
    if !linger && inbound.buf.is_empty() && inbound.decoder.is_end() {
        return;
    }
    if tokio::io::AsyncWriteExt::shutdown(&mut io).await.is_err() {
        return;
    }
    let mut buf = inbound.buf;
    let _ = tokio::time::timeout(LINGER, async {
        loop {
            buf.clear();
            match tokio::io::AsyncReadExt::read_buf(&mut io, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, oneshot};

    fn head(raw: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        parse_request_head(&mut BytesMut::from(raw))
    }

    #[test]
    fn a_request_head_is_read_with_its_framing() {
        let mut buf = BytesMut::from(
            &b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello"[..],
        );
        let h = parse_request_head(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..], b"hello", "the head is consumed, the body left");
        assert_eq!(h.parts.method, Method::POST);
        assert_eq!(h.parts.uri, "/v1/completions?x=1");
        assert_eq!(h.parts.version, Version::HTTP_11);
        assert_eq!(h.parts.headers["host"], "a");
        let xa: Vec<_> = h.parts.headers.get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive && !h.expect_continue && !h.trailers);
    }

    #[test]
    fn a_partial_head_waits_for_more() {
        assert!(head(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
        assert!(head(b"").unwrap().is_none());
    }

    #[test]
    fn bad_heads_get_their_status() {
        let status = |raw: &[u8]| head(raw).unwrap_err().status().as_u16();
        assert_eq!(status(b"GET / HTTP/1.1\r\nbad header\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(status(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        let many: Vec<u8> = (0..101)
            .flat_map(|i| format!("x-{i}: v\r\n").into_bytes())
            .collect();
        let raw = [&b"GET / HTTP/1.1\r\n"[..], &many, b"\r\n"].concat();
        assert_eq!(status(&raw), 431);
        let mut long = b"GET / HTTP/1.1\r\nx-long: ".to_vec();
        long.resize(MAX_HEAD, b'a');
        assert_eq!(status(&long), 431, "no end of head within the limit");
        let hundred: Vec<u8> = (0..100)
            .flat_map(|i| format!("x-{i}: v\r\n").into_bytes())
            .collect();
        let raw = [&b"GET / HTTP/1.1\r\n"[..], &hundred, b"\r\n"].concat();
        assert_eq!(head(&raw).unwrap().unwrap().parts.headers.len(), 100);
    }

    #[test]
    fn chunked_wins_over_content_length_and_connection_rules_follow_the_version() {
        let h = head(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.parts.headers.contains_key("content-length"));
        let keep = |raw: &[u8]| head(raw).unwrap().unwrap().keep_alive;
        assert!(!keep(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"));
        assert!(!keep(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(keep(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        let h = head(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nTE: trailers\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.expect_continue && h.trailers);
        assert_eq!(h.framing, Framing::Length(0));
    }

    /// A response body fed by a channel; `dropped` fires when the connection lets it go.
    struct ChanBody {
        rx: mpsc::Receiver<Bytes>,
        _dropped: oneshot::Sender<()>,
    }

    impl Body for ChanBody {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    /// A body fed by the sender it comes with; the receiver tells when it is dropped.
    fn channel_body() -> (mpsc::Sender<Bytes>, oneshot::Receiver<()>, ChanBody) {
        let (tx, rx) = mpsc::channel(4);
        let (dropped_tx, dropped) = oneshot::channel();
        let body = ChanBody {
            rx,
            _dropped: dropped_tx,
        };
        (tx, dropped, body)
    }

    /// A connection whose first request is answered with a [`channel_body`].
    async fn serve_stream() -> (
        SocketAddr,
        mpsc::Sender<Bytes>,
        oneshot::Receiver<()>,
        tokio::task::JoinHandle<Result<(), ConnError>>,
    ) {
        let (tx, dropped, body) = channel_body();
        let body = Mutex::new(Some(body));
        let (addr, _drain, task) = serve_one(move |_req, _| {
            let body = body.lock().unwrap().take().unwrap();
            async move { Response::new(body.boxed_unsync()) }
        })
        .await;
        (addr, tx, dropped, task)
    }

    type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

    fn full(body: impl Into<Bytes>) -> TestBody {
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    /// Serves one connection with `handler`; its address, the drain's flag and wake-up, and
    /// the task (which returns how serving ended).
    async fn serve_one<H, Fut>(
        handler: H,
    ) -> (
        SocketAddr,
        Arc<(AtomicBool, Notify)>,
        tokio::task::JoinHandle<Result<(), ConnError>>,
    )
    where
        H: Fn(Request<H1Body>, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = Arc::new((AtomicBool::new(false), Notify::new()));
        let signal = drain.clone();
        let task = tokio::spawn(async move {
            let (stream, remote) = listener.accept().await.unwrap();
            serve_connection(stream, remote, &handler, &signal.0, &signal.1).await
        });
        (addr, drain, task)
    }

    /// Echoes the request: method, target and body, with the body's length.
    async fn echo(req: Request<H1Body>, _remote: SocketAddr) -> Response<TestBody> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|c| c.to_bytes());
        let text = match body {
            Ok(b) => format!(
                "{} {} {}",
                parts.method,
                parts.uri,
                String::from_utf8_lossy(&b)
            ),
            Err(e) => format!("error {e}"),
        };
        Response::new(full(text))
    }

    /// Reads from `c` until `done` says the bytes so far are enough, or the server closes.
    async fn read_until(c: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !done(&got) {
                let mut buf = [0u8; 4096];
                let n = c.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("the server answered in time");
        got
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    /// How many complete responses `got` holds, each ending in `end`.
    fn count(got: &[u8], end: &str) -> usize {
        text(got).matches(end).count()
    }

    #[tokio::test]
    async fn keep_alive_and_pipelined_requests_are_answered_in_order() {
        let (addr, _drain, task) = serve_one(echo).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none")
            .await
            .unwrap();
        let got = read_until(&mut c, |g| g.ends_with(b"POST /a one")).await;
        let got = text(&got);
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains("content-length: 11\r\n"), "{got}");
        assert!(got.contains("date: "), "{got}");
        // Two requests in one write, the second with a chunked body, then a close.
        c.write_all(
            b"GET /b HTTP/1.1\r\nHost: x\r\n\r\nPOST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\ntwo\r\n4\r\n-ish\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        let got = text(&read_until(&mut c, |_| false).await);
        let b = got.find("GET /b ").expect(&got);
        let c_at = got.find("POST /c two-ish").expect(&got);
        assert!(b < c_at, "in order: {got}");
        assert!(got.contains("connection: close\r\n"), "{got}");
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_streamed_response_is_chunked_and_each_frame_goes_out_at_once() {
        let (addr, tx, dropped, task) = serve_stream().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /s HTTP/1.1\r\n\r\n").await.unwrap();
        let got = text(&read_until(&mut c, |g| g.ends_with(b"\r\n\r\n")).await);
        assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
        tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
        let got = read_until(&mut c, |g| g.ends_with(b"\n\n\r\n")).await;
        assert_eq!(
            got, b"9\r\ndata: 1\n\n\r\n",
            "sent before the next frame exists"
        );
        tx.send(Bytes::from(vec![b'x'; 300])).await.unwrap();
        drop(tx);
        let got = text(&read_until(&mut c, |g| g.ends_with(b"0\r\n\r\n")).await);
        assert!(got.starts_with("12C\r\nxxx"), "{got}");
        assert!(got.ends_with("\r\n0\r\n\r\n"), "{got}");
        dropped.await.unwrap_err();
        drop(c);
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn http10_clients_get_http10_answers_and_a_close_delimited_stream() {
        let (tx, _dropped, body) = channel_body();
        let body = Mutex::new(Some(body));
        let (addr, _drain, task) = serve_one(move |req, remote| {
            let body = if req.uri().path() == "/stream" {
                body.lock().unwrap().take().map(|b| b.boxed_unsync())
            } else {
                None
            };
            async move {
                match body {
                    Some(body) => Response::new(body),
                    None => echo(req, remote).await,
                }
            }
        })
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let got = text(&read_until(&mut c, |g| g.ends_with(b"GET /a ")).await);
        assert!(got.starts_with("HTTP/1.0 200 OK\r\n"), "{got}");
        assert!(got.contains("connection: keep-alive\r\n"), "{got}");
        c.write_all(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        tx.send(Bytes::from_static(b"abc")).await.unwrap();
        drop(tx);
        let got = text(&read_until(&mut c, |_| false).await);
        assert!(got.contains("connection: close\r\n"), "{got}");
        assert!(!got.contains("transfer-encoding"), "{got}");
        assert!(got.ends_with("\r\n\r\nabc"), "unframed, then closed: {got}");
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn expect_continue_is_answered_when_the_body_is_read() {
        let (addr, _drain, _task) = serve_one(echo).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /e HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        let got = read_until(&mut c, |g| g.ends_with(b"\r\n\r\n")).await;
        assert_eq!(text(&got), "HTTP/1.1 100 Continue\r\n\r\n");
        c.write_all(b"body").await.unwrap();
        let got = text(&read_until(&mut c, |g| g.ends_with(b"POST /e body")).await);
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    }

    #[tokio::test]
    async fn head_and_204_answers_carry_no_body() {
        let (addr, _drain, _task) = serve_one(|req: Request<H1Body>, _| async move {
            let mut response = Response::new(full("not sent"));
            if req.uri().path() == "/204" {
                *response.status_mut() = StatusCode::NO_CONTENT;
            }
            response
        })
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"HEAD / HTTP/1.1\r\n\r\nGET /204 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let got = text(&read_until(&mut c, |g| g.ends_with(b"not sent")).await);
        assert_eq!(count(got.as_bytes(), "HTTP/1.1 "), 3, "{got}");
        assert_eq!(got.matches("not sent").count(), 1, "{got}");
        let (head, rest) = got.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains("content-length: 8\r\n"),
            "HEAD has its length: {got}"
        );
        let (no_content, _) = rest.split_once("\r\n\r\n").unwrap();
        assert!(
            no_content.starts_with("HTTP/1.1 204 No Content\r\n"),
            "{got}"
        );
        assert!(!no_content.contains("content-length"), "{got}");
    }

    #[tokio::test]
    async fn a_bad_head_gets_an_openai_style_400_and_a_close() {
        let (addr, _drain, task) = serve_one(echo).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
            .await
            .unwrap();
        let got = text(&read_until(&mut c, |_| false).await);
        assert!(got.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{got}");
        assert!(got.contains("connection: close\r\n"), "{got}");
        let body = &got[got.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body).expect(body);
        assert_eq!(v["error"]["code"], 400);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_drops_the_answer_in_the_making() {
        let (started_tx, started) = oneshot::channel::<()>();
        let (dropped_tx, dropped) = oneshot::channel::<()>();
        let slots = Mutex::new(Some((started_tx, dropped_tx)));
        let (addr, _drain, task) = serve_one(move |_req, _| {
            let (started, guard) = slots.lock().unwrap().take().unwrap();
            async move {
                let _guard = guard;
                let _ = started.send(());
                std::future::pending::<Response<TestBody>>().await
            }
        })
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        started.await.unwrap();
        drop(c);
        tokio::time::timeout(Duration::from_secs(5), dropped)
            .await
            .expect("the handler's future was dropped")
            .unwrap_err();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_head_sent_in_pieces_is_read_as_they_come() {
        // Each piece is a read that does not fill the buffer, after which the socket counts as
        // drained until the client sends more.
        let (addr, _drain, task) = serve_one(echo).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        for piece in [
            "POST /p HTTP/1.1\r\nHost: x\r\n",
            "Content-Length: 2\r\n",
            "\r\nhi",
        ] {
            c.write_all(piece.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = read_until(&mut c, |g| g.ends_with(b"POST /p hi")).await;
        assert!(
            text(&got).starts_with("HTTP/1.1 200 OK\r\n"),
            "{}",
            text(&got)
        );
        drop(c);
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_mid_stream_drops_the_body() {
        let (addr, tx, dropped, task) = serve_stream().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        // Several frames, each read before the next: between them the connection waits with
        // the hang-up watch it set up for the first.
        for frame in ["one", "two", "three"] {
            tx.send(Bytes::from(frame)).await.unwrap();
            let end = format!("{frame}\r\n");
            read_until(&mut c, |g| g.ends_with(end.as_bytes())).await;
        }
        drop(c);
        tokio::time::timeout(Duration::from_secs(5), dropped)
            .await
            .expect("the body was dropped without another frame")
            .unwrap_err();
        assert!(task.await.unwrap().is_err(), "a cut stream is an error");
        drop(tx);
    }

    #[tokio::test]
    async fn a_body_longer_than_its_content_length_cuts_the_connection() {
        let (addr, _drain, task) = serve_one(|_req, _| async {
            let mut response = Response::new(full("twelve bytes"));
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(5));
            response
        })
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let got = text(&read_until(&mut c, |_| false).await);
        assert!(!got.contains("twelve"), "{got}");
        assert!(matches!(task.await.unwrap(), Err(ConnError::Length)));
    }

    #[tokio::test]
    async fn the_drain_closes_an_idle_connection_and_ends_a_busy_one_after_its_answer() {
        let (addr, drain, task) = serve_one(echo).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /1 HTTP/1.1\r\n\r\n").await.unwrap();
        read_until(&mut c, |g| g.ends_with(b"GET /1 ")).await;
        drain.0.store(true, Ordering::Release);
        drain.1.notify_waiters();
        let rest = read_until(&mut c, |_| false).await;
        assert!(rest.is_empty(), "closed without another answer");
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_request_framed_both_ways_is_answered_then_the_connection_closes() {
        let (addr, _drain, task) = serve_one(echo).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let got = text(&read_until(&mut c, |_| false).await);
        assert!(
            got.ends_with("POST /x hi"),
            "the chunked body is the body: {got}"
        );
        assert!(got.contains("connection: close\r\n"), "{got}");
        assert!(!got.contains("smuggled"), "{got}");
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_body_left_unread_makes_the_answer_the_last_and_says_so() {
        let (addr, _drain, task) = serve_one(|_req: Request<H1Body>, _| async {
            let mut response = Response::new(full("too large"));
            *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            response
        })
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST / HTTP/1.1\r\nContent-Length: 100000\r\n\r\nsome of it")
            .await
            .unwrap();
        let got = text(&read_until(&mut c, |g| g.ends_with(b"too large")).await);
        assert!(got.starts_with("HTTP/1.1 413 "), "{got}");
        assert!(got.contains("connection: close\r\n"), "{got}");
        // The client sends on; the server reads and drops it, then the connection ends.
        c.write_all(&[b'x'; 4096]).await.unwrap();
        c.shutdown().await.unwrap();
        assert!(read_until(&mut c, |_| false).await.is_empty());
        task.await.unwrap().unwrap();
    }

    /// A body of `frames`, each ready at once.
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    #[tokio::test]
    async fn only_trailers_the_response_declares_go_to_a_client_that_takes_them() {
        let (addr, _drain, _task) = serve_one(|req: Request<H1Body>, _| async move {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", HeaderValue::from_static("abc"));
            trailers.insert("x-other", HeaderValue::from_static("no"));
            let frames = Frames(
                [
                    Frame::data(Bytes::from_static(b"body")),
                    Frame::trailers(trailers),
                ]
                .into(),
            );
            let mut response = Response::new(frames.boxed_unsync());
            if req.uri().path() == "/declared" {
                response
                    .headers_mut()
                    .insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
            }
            response
        })
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /declared HTTP/1.1\r\nTE: trailers\r\n\r\n")
            .await
            .unwrap();
        let got = text(&read_until(&mut c, |g| g.ends_with(b"abc\r\n\r\n")).await);
        assert!(
            got.ends_with("4\r\nbody\r\n0\r\nx-checksum: abc\r\n\r\n"),
            "{got}"
        );
        c.write_all(b"GET /undeclared HTTP/1.1\r\nTE: trailers\r\n\r\n")
            .await
            .unwrap();
        let got = text(&read_until(&mut c, |g| g.ends_with(b"0\r\n\r\n")).await);
        assert!(got.ends_with("4\r\nbody\r\n0\r\n\r\n"), "{got}");
        assert!(!got.contains("x-other"), "{got}");
    }

    #[tokio::test]
    async fn pipelined_requests_sent_before_a_half_close_are_all_answered() {
        let (addr, _drain, task) = serve_one(|req: Request<H1Body>, remote| async move {
            // Slow enough that the client's close arrives while the first is in hand.
            tokio::time::sleep(Duration::from_millis(20)).await;
            echo(req, remote).await
        })
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        c.shutdown().await.unwrap();
        let got = text(&read_until(&mut c, |_| false).await);
        assert!(got.contains("GET /1 ") && got.ends_with("GET /2 "), "{got}");
        task.await.unwrap().unwrap();
    }
}
