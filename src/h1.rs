//! HTTP/1.1 framing of upstream exchanges, without I/O: the request head the proxy writes, the
//! response head it reads, and the decoder that finds a response body's bytes in what was read.
//!
//! The rules are hyper's client rules (RFC 9112 §6): a response to `HEAD`, a 1xx, 204 or 304
//! has no body; `Transfer-Encoding` ending in `chunked` is chunked, any other transfer coding
//! is read until the connection closes; otherwise `Content-Length` (all values equal) gives the
//! length, and without either the body ends when the connection closes. Informational (1xx)
//! heads are skipped. A chunk-size line is hex digits, spaces or tabs, optional extensions and
//! CRLF, as hyper reads it. A connection is reused only after an HTTP/1.1 response that does
//! not say `close` (hyper's client also reuses one after an HTTP/1.0 `keep-alive` and speaks
//! HTTP/1.0 on it from then on; this code closes it instead).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// Most header fields a response head or a trailer section may carry (hyper's default).
pub const MAX_HEADERS: usize = 100;

/// Most bytes a chunk-size line (with its extensions) may take.
const MAX_SIZE_LINE: usize = 4096;

/// Why an upstream response cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The status line or a header field is not valid HTTP/1.1.
    #[error("invalid response head from the upstream: {0}")]
    Head(#[from] httparse::Error),
    /// The framing (lengths, chunks, trailers) is broken, or the connection ended mid-message.
    #[error("{0}")]
    Framing(&'static str),
}

/// How a request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// No body bytes are written.
    Empty,
    /// Exactly this many bytes, as `Content-Length` says.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// What is known of a request body's length before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// The body is already at its end.
    Empty,
    /// Exactly this many bytes.
    Known(u64),
    /// Streamed, length unknown.
    Unknown,
}

/// Writes the head of a request for `target` (origin form) to `out` and returns how its body is
/// to be framed. Framing headers follow the body, as hyper's client sets them, except that a
/// `Transfer-Encoding` from the caller is always dropped (it is hop-by-hop): a body of known
/// length is sent with that length as `Content-Length`; a streamed one of unknown length keeps
/// a valid `Content-Length` from the caller, or else is chunked, except for `GET`, `HEAD` and
/// `CONNECT`, which send none.
pub fn encode_request_head(
    method: &Method,
    target: &str,
    headers: &mut HeaderMap,
    body: BodyLength,
    out: &mut Vec<u8>,
) -> Encoding {
    headers.remove(header::TRANSFER_ENCODING);
    let given = content_length(headers).ok().flatten();
    let encoding = match (body, given) {
        (BodyLength::Empty, _) => Encoding::Empty,
        (BodyLength::Unknown, Some(len)) => Encoding::Length(len),
        (BodyLength::Known(len), _) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            Encoding::Length(len)
        }
        (BodyLength::Unknown, None) => {
            if matches!(*method, Method::GET | Method::HEAD | Method::CONNECT) {
                Encoding::Empty
            } else {
                headers.remove(header::CONTENT_LENGTH);
                headers.insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
                Encoding::Chunked
            }
        }
    };
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    encoding
}

/// Appends the chunk-size line for a chunk of `len` bytes (`len` > 0).
pub fn encode_chunk_size(len: usize, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(HEX[(len >> (i * 4)) & 0xF]);
    }
    out.extend_from_slice(b"\r\n");
}

/// The last chunk of a chunked request body. Trailers of the client's are not sent on: hyper's
/// client sends only those a `Trailer` header announces, and the proxy strips that header.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A response head, parsed.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status, version and headers (and the reason phrase, as hyper's `ReasonPhrase`
    /// extension, when it is not the status's usual one).
    pub parts: http::response::Parts,
    /// How the body that follows is framed.
    pub framing: Framing,
    /// Whether the connection may carry another request after this response.
    pub keep_alive: bool,
}

/// What [`parse_response_head`] found at the start of the buffer.
#[derive(Debug)]
pub enum Parsed {
    /// Not a whole head yet: read more.
    Partial,
    /// An informational (1xx) head of this many bytes, to be skipped.
    Informational(usize),
    /// The final head, of this many bytes.
    Head(usize, Box<ResponseHead>),
}

/// Parses the response head at the start of `buf`, the answer to a `method` request.
pub fn parse_response_head(buf: &[u8], method: &Method) -> Result<Parsed, Error> {
    // Room for a few fields first: setting up all `MAX_HEADERS` slots (3.2 KiB) cost ~1k
    // instructions per response, for heads that mostly carry half a dozen fields.
    let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
    match parse_response_head_into(buf, method, &mut few) {
        Err(Error::Head(httparse::Error::TooManyHeaders)) => {
            let mut all = [httparse::EMPTY_HEADER; MAX_HEADERS];
            parse_response_head_into(buf, method, &mut all)
        }
        parsed => parsed,
    }
}

/// Header slots tried before `MAX_HEADERS`.
const FEW_HEADERS: usize = 24;

fn parse_response_head_into<'b>(
    buf: &'b [u8],
    method: &Method,
    fields: &mut [httparse::Header<'b>],
) -> Result<Parsed, Error> {
    let mut response = httparse::Response::new(fields);
    let len = match response.parse(buf)? {
        httparse::Status::Partial => return Ok(Parsed::Partial),
        httparse::Status::Complete(len) => len,
    };
    let code = response.code.unwrap_or_default();
    let status = StatusCode::from_u16(code).map_err(|_| Error::Framing("invalid status code"))?;
    if status.is_informational() {
        if code == 101 {
            return Err(Error::Framing(
                "the upstream switched protocols, which the proxy does not tunnel",
            ));
        }
        return Ok(Parsed::Informational(len));
    }
    let version = match response.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for field in response.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| Error::Framing("invalid header name in the upstream's response"))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| Error::Framing("invalid header value in the upstream's response"))?;
        headers.append(name, value);
    }
    let framing = framing(status, method, version, &headers)?;
    // A message framed both ways may be read differently by another hop: not reused.
    let both = headers.contains_key(header::TRANSFER_ENCODING)
        && headers.contains_key(header::CONTENT_LENGTH);
    // After a 2xx to CONNECT the connection is a tunnel, not HTTP any more.
    let tunnel = *method == Method::CONNECT && status.is_success();
    let keep_alive =
        framing != Framing::Close && !both && !tunnel && keeps_alive(version, &headers);
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    if let Some(reason) = response.reason
        && Some(reason) != status.canonical_reason()
        && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason.as_bytes())
    {
        parts.extensions.insert(reason);
    }
    Ok(Parsed::Head(
        len,
        Box::new(ResponseHead {
            parts,
            framing,
            keep_alive,
        }),
    ))
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes (0 for a response that has no body).
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

fn framing(
    status: StatusCode,
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<Framing, Error> {
    if status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || *method == Method::HEAD
        || (*method == Method::CONNECT && status.is_success())
    {
        return Ok(Framing::Length(0));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(Error::Framing(
                "Transfer-Encoding in an HTTP/1.0 response from the upstream",
            ));
        }
        return Ok(if ends_in_chunked(headers) {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    let length = content_length(headers)
        .map_err(|_| Error::Framing("invalid Content-Length in the upstream's response"))?;
    Ok(match length {
        Some(len) => Framing::Length(len),
        None => Framing::Close,
    })
}

/// Whether the last transfer coding `Transfer-Encoding` names is `chunked`.
pub fn ends_in_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"))
}

/// A `Content-Length` that is not one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidLength;

/// The `Content-Length`, if any: every value (and comma-separated item) must be the same
/// number.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, InvalidLength> {
    let invalid = InvalidLength;
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
                return Err(invalid);
            }
            let n = item.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
            if length.is_some_and(|l| l != n) {
                return Err(invalid);
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Whether a response of `version` with `headers` leaves the connection open for the next
/// request.
fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    // An HTTP/1.0 upstream would want the next request in HTTP/1.0, unchunked: not reused.
    version != Version::HTTP_10 && !has_token(headers, header::CONNECTION, "close")
}

/// Whether a comma-separated header (`Connection`, `TE`) lists `token`, in any case.
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Finds a response body's bytes in the bytes read after its head.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes are left.
    Length(u64),
    /// Until the connection closes.
    Close,
    /// At a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// After a chunk's data, at its CRLF.
    DataEnd,
    /// After the last chunk, at the trailer section.
    Trailers,
    /// The body has ended.
    Done,
}

/// What [`Decoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// `buf[start..end]` is body data.
    Data {
        /// Where the data starts in the buffer given.
        start: usize,
        /// Where it ends.
        end: usize,
    },
    /// The trailer section (the body has ended).
    Trailers(HeaderMap),
    /// The body has ended.
    End,
    /// More bytes are needed.
    More,
}

impl Decoder {
    /// A decoder for a body framed as `framing`.
    pub fn new(framing: Framing) -> Decoder {
        let state = match framing {
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size,
            Framing::Close => State::Close,
        };
        Decoder { state }
    }

    /// Whether the body has ended: no more bytes belong to it.
    pub fn is_end(&self) -> bool {
        self.state == State::Done
    }

    /// The body's size hint: exact when the framing tells the bytes left.
    pub fn size_hint(&self) -> http_body::SizeHint {
        match self.remaining() {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
        }
    }

    /// Bytes left, when the framing tells.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Reads on in `buf` (the bytes read and not yet consumed); returns what it found and how
    /// many bytes of `buf` it consumed, data included. Chunk framing is consumed as it is seen,
    /// so a chunk's data comes back as soon as any of it is in `buf`.
    pub fn decode(&mut self, buf: &[u8]) -> Result<(Step, usize), Error> {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            match self.state {
                State::Done => return Ok((Step::End, pos)),
                State::Close | State::Length(_) if rest.is_empty() => {
                    return Ok((Step::More, pos));
                }
                State::Close => {
                    return Ok((
                        Step::Data {
                            start: pos,
                            end: buf.len(),
                        },
                        buf.len(),
                    ));
                }
                State::Length(n) => {
                    let take = n.min(rest.len() as u64);
                    let end = pos + take as usize;
                    self.state = match n - take {
                        0 => State::Done,
                        left => State::Length(left),
                    };
                    return Ok((Step::Data { start: pos, end }, end));
                }
                State::Size => {
                    let Some(nl) = memchr::memchr(b'\n', rest) else {
                        if rest.len() > MAX_SIZE_LINE {
                            return Err(Error::Framing("chunk-size line too long"));
                        }
                        return Ok((Step::More, pos));
                    };
                    let size = chunk_size(&rest[..=nl])?;
                    pos += nl + 1;
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(_) if rest.is_empty() => return Ok((Step::More, pos)),
                State::Data(n) => {
                    let take = n.min(rest.len() as u64) as usize;
                    let start = pos;
                    pos += take;
                    self.state = match n - take as u64 {
                        0 => State::DataEnd,
                        left => State::Data(left),
                    };
                    if self.state == State::DataEnd && buf[pos..].starts_with(b"\r\n") {
                        pos += 2;
                        self.state = State::Size;
                        // The last chunk, when it came with this one, ends the body now.
                        if buf[pos..].starts_with(b"0\r\n\r\n") {
                            pos += 5;
                            self.state = State::Done;
                        }
                    }
                    return Ok((
                        Step::Data {
                            start,
                            end: start + take,
                        },
                        pos,
                    ));
                }
                State::DataEnd => {
                    if rest.len() < 2 {
                        return Ok((Step::More, pos));
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(Error::Framing("missing CRLF after chunk data"));
                    }
                    pos += 2;
                    self.state = State::Size;
                }
                State::Trailers => {
                    if rest.starts_with(b"\r\n") {
                        self.state = State::Done;
                        return Ok((Step::End, pos + 2));
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let parsed = httparse::parse_headers(rest, &mut fields)
                        .map_err(|_| Error::Framing("invalid trailer section"))?;
                    return match parsed {
                        httparse::Status::Partial => Ok((Step::More, pos)),
                        httparse::Status::Complete((len, [])) => {
                            self.state = State::Done;
                            Ok((Step::End, pos + len))
                        }
                        httparse::Status::Complete((len, fields)) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for field in fields {
                                let name = HeaderName::from_bytes(field.name.as_bytes())
                                    .map_err(|_| Error::Framing("invalid trailer name"))?;
                                let value = HeaderValue::from_bytes(field.value)
                                    .map_err(|_| Error::Framing("invalid trailer value"))?;
                                trailers.append(name, value);
                            }
                            self.state = State::Done;
                            Ok((Step::Trailers(trailers), pos + len))
                        }
                    };
                }
            }
        }
    }

    /// The connection ended (read returned 0): fine for a body read until close or one that
    /// has ended, an error for any other.
    pub fn eof(&mut self) -> Result<(), Error> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(Error::Framing(
                "the upstream closed the connection mid-body",
            )),
        }
    }
}

/// The size in a chunk-size line (ending in its `\n`): hex digits, optional whitespace, then
/// optional `;` extensions, then CRLF.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let Some(line) = line.strip_suffix(b"\r\n") else {
        return Err(Error::Framing("chunk-size line without CRLF"));
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(Error::Framing("invalid chunk size"));
    }
    let mut size: u64 = 0;
    for &d in &line[..digits] {
        let value = (d as char).to_digit(16).unwrap_or_default();
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(value)))
            .ok_or(Error::Framing("chunk size too large"))?;
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    if !(rest.is_empty() || rest.starts_with(b";")) || rest.contains(&b'\r') {
        return Err(Error::Framing("invalid chunk size"));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str, method: Method) -> Result<ResponseHead, Error> {
        match parse_response_head(raw.as_bytes(), &method)? {
            Parsed::Head(len, head) => {
                assert_eq!(len, raw.len());
                Ok(*head)
            }
            other => panic!("not a final head: {other:?}"),
        }
    }

    fn framing_of(raw: &str, method: Method) -> Framing {
        head(raw, method).unwrap().framing
    }

    #[test]
    fn framing_follows_the_message_length_rules() {
        let get = || Method::GET;
        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n";
        assert_eq!(framing_of(chunked, get()), Framing::Chunked);
        assert_eq!(
            framing_of(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n",
                get()
            ),
            Framing::Chunked
        );
        assert_eq!(
            framing_of(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
                get()
            ),
            Framing::Close
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", get()),
            Framing::Length(12)
        );
        assert_eq!(
            framing_of(
                "HTTP/1.1 200 OK\r\ncontent-length: 12, 12\r\ncontent-length: 12\r\n\r\n",
                get()
            ),
            Framing::Length(12)
        );
        assert_eq!(framing_of("HTTP/1.1 200 OK\r\n\r\n", get()), Framing::Close);
        let with_length = "HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n";
        assert_eq!(framing_of(with_length, Method::HEAD), Framing::Length(0));
        for status in ["204 No Content", "304 Not Modified"] {
            let raw = format!("HTTP/1.1 {status}\r\ncontent-length: 12\r\n\r\n");
            assert_eq!(framing_of(&raw, get()), Framing::Length(0), "{status}");
        }
        for bad in ["12, 13", "-1", "0x10", "", "99999999999999999999"] {
            let raw = format!("HTTP/1.1 200 OK\r\ncontent-length: {bad}\r\n\r\n");
            assert!(
                head(&raw, get()).is_err(),
                "content-length {bad:?} is refused"
            );
        }
        let te_in_10 = "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(head(te_in_10, get()).is_err());
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        let alive = |raw: &str| head(raw, Method::GET).unwrap().keep_alive;
        assert!(alive("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(!alive(
            "HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(!alive("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"));
        let http10 = "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n";
        assert!(!alive(http10), "the next request would have to be HTTP/1.0");
        let connect = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert!(
            !head(connect, Method::CONNECT).unwrap().keep_alive,
            "a tunnel"
        );
        assert!(!alive("HTTP/1.1 200 OK\r\n\r\n"), "read until close");
        let both = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n";
        assert!(!alive(both), "framed two ways");
    }

    #[test]
    fn heads_keep_status_headers_and_an_unusual_reason() {
        let raw = "HTTP/1.1 429 Slow Down\r\nx-a: 1\r\nX-A: 2\r\ncontent-length: 0\r\n\r\n";
        let head = head(raw, Method::POST).unwrap();
        assert_eq!(head.parts.status, 429);
        let values: Vec<_> = head.parts.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        let reason = head.parts.extensions.get::<hyper::ext::ReasonPhrase>();
        assert_eq!(reason.map(|r| r.as_bytes()), Some(&b"Slow Down"[..]));
        let usual = "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        let head = parse_response_head(usual.as_bytes(), &Method::GET).unwrap();
        let Parsed::Head(_, head) = head else {
            panic!("a head")
        };
        assert!(
            head.parts
                .extensions
                .get::<hyper::ext::ReasonPhrase>()
                .is_none()
        );
    }

    #[test]
    fn heads_with_many_fields_keep_them_all_up_to_the_limit() {
        for n in [
            FEW_HEADERS - 1,
            FEW_HEADERS,
            FEW_HEADERS + 1,
            MAX_HEADERS - 1,
        ] {
            let fields: String = (0..n).map(|i| format!("x-h{i}: {i}\r\n")).collect();
            let raw = format!("HTTP/1.1 200 OK\r\n{fields}content-length: 0\r\n\r\n");
            let head = head(&raw, Method::GET).unwrap();
            assert_eq!(head.parts.headers.len(), n + 1, "{n} fields");
            let last = format!("x-h{}", n - 1);
            assert_eq!(head.parts.headers[last.as_str()], (n - 1).to_string());
            // Cut before its end, the same head waits for more bytes.
            let partial = &raw.as_bytes()[..raw.len() - 3];
            assert!(matches!(
                parse_response_head(partial, &Method::GET),
                Ok(Parsed::Partial)
            ));
        }
        let fields: String = (0..MAX_HEADERS)
            .map(|i| format!("x-h{i}: {i}\r\n"))
            .collect();
        let raw = format!("HTTP/1.1 200 OK\r\n{fields}content-length: 0\r\n\r\n");
        assert!(matches!(
            parse_response_head(raw.as_bytes(), &Method::GET),
            Err(Error::Head(httparse::Error::TooManyHeaders))
        ));
    }

    #[test]
    fn informational_heads_are_skipped_and_partial_heads_wait() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n";
        let Parsed::Informational(len) = parse_response_head(raw, &Method::POST).unwrap() else {
            panic!("1xx")
        };
        assert_eq!(len, 25);
        let rest = parse_response_head(&raw[len..], &Method::POST).unwrap();
        assert!(matches!(rest, Parsed::Partial), "{rest:?}");
        let switch = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n";
        assert!(parse_response_head(switch, &Method::GET).is_err());
        assert!(parse_response_head(b"HTPT/1.1 200 OK\r\n\r\n", &Method::GET).is_err());
    }

    /// Decodes `wire` handed over in pieces that end at `splits`; returns the data, the
    /// trailers and whether the body ended.
    fn decode_in_pieces(
        framing: Framing,
        wire: &[u8],
        splits: &[usize],
    ) -> Result<(Vec<u8>, Option<HeaderMap>, bool), Error> {
        let mut decoder = Decoder::new(framing);
        let (mut buf, mut data, mut trailers) = (Vec::new(), Vec::new(), None);
        let mut fed = 0;
        for &until in splits.iter().chain([&wire.len()]) {
            buf.extend_from_slice(&wire[fed..until]);
            fed = until;
            loop {
                let (step, used) = decoder.decode(&buf)?;
                let more = match step {
                    Step::Data { start, end } => {
                        assert!(start <= end && end <= used);
                        data.extend_from_slice(&buf[start..end]);
                        true
                    }
                    Step::Trailers(t) => {
                        trailers = Some(t);
                        false
                    }
                    Step::End | Step::More => false,
                };
                buf.drain(..used);
                if !more {
                    break;
                }
            }
        }
        assert!(buf.is_empty() || decoder.is_end(), "unconsumed {buf:?}");
        Ok((data, trailers, decoder.is_end()))
    }

    #[test]
    fn chunked_bodies_decode_the_same_whatever_the_read_boundaries() {
        let wire = b"5\r\nhello\r\n1A;name=\"v\" \r\nabcdefghijklmnopqrstuvwxyz\r\n3 \r\n\r\n\r\r\n0\r\nx-usage: 7\r\nx-b: 8\r\n\r\n";
        let want = b"helloabcdefghijklmnopqrstuvwxyz\r\n\r";
        for split in 0..=wire.len() {
            for second in split..=wire.len() {
                let (data, trailers, ended) =
                    decode_in_pieces(Framing::Chunked, wire, &[split, second]).unwrap();
                assert_eq!(data, want, "split at {split}, {second}");
                let trailers = trailers.expect("trailers");
                assert_eq!(trailers["x-usage"], "7");
                assert_eq!(trailers["x-b"], "8");
                assert!(ended);
            }
        }
        let plain_end = b"2\r\nok\r\n0\r\n\r\n";
        for split in 0..=plain_end.len() {
            let (data, trailers, ended) =
                decode_in_pieces(Framing::Chunked, plain_end, &[split]).unwrap();
            assert_eq!(
                (data.as_slice(), trailers.is_none(), ended),
                (&b"ok"[..], true, true)
            );
        }
    }

    #[test]
    fn a_last_chunk_read_with_the_data_ends_the_body_at_once() {
        let mut decoder = Decoder::new(Framing::Chunked);
        let wire = b"2\r\nok\r\n0\r\n\r\n";
        let (step, used) = decoder.decode(wire).unwrap();
        assert_eq!((step, used), (Step::Data { start: 3, end: 5 }, wire.len()));
        assert!(decoder.is_end());
    }

    #[test]
    fn broken_chunked_bodies_are_errors() {
        let bad: [&[u8]; 8] = [
            b"zz\r\nhello\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXY",
            b"5 x\r\nhello\r\n",
            b"11111111111111111\r\n",
            b"5;a\rb\r\nhello\r\n",
            b"5\r\r\nhello\r\n",
            b"0\r\nbad header\r\n\r\n",
        ];
        for wire in bad {
            let got = decode_in_pieces(Framing::Chunked, wire, &[]);
            assert!(
                got.is_err(),
                "{:?} gave {got:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let mut long = vec![b'1'; 3];
        long.extend(std::iter::repeat_n(b' ', MAX_SIZE_LINE + 1));
        assert!(Decoder::new(Framing::Chunked).decode(&long).is_err());
    }

    #[test]
    fn the_end_of_the_connection_ends_only_a_close_delimited_body() {
        let (data, _, ended) = decode_in_pieces(Framing::Close, b"abc", &[1]).unwrap();
        assert_eq!((data.as_slice(), ended), (&b"abc"[..], false));
        assert!(Decoder::new(Framing::Close).eof().is_ok());
        assert!(Decoder::new(Framing::Length(3)).eof().is_err());
        assert!(Decoder::new(Framing::Chunked).eof().is_err());
        assert!(Decoder::new(Framing::Length(0)).eof().is_ok());
    }

    #[test]
    fn a_length_body_stops_at_its_length() {
        let mut decoder = Decoder::new(Framing::Length(4));
        assert_eq!(decoder.remaining(), Some(4));
        let (step, used) = decoder.decode(b"ab").unwrap();
        assert_eq!((step, used), (Step::Data { start: 0, end: 2 }, 2));
        assert_eq!(decoder.remaining(), Some(2));
        let (step, used) = decoder.decode(b"cdEXTRA").unwrap();
        assert_eq!((step, used), (Step::Data { start: 0, end: 2 }, 2));
        assert!(decoder.is_end());
        assert_eq!(decoder.decode(b"EXTRA").unwrap(), (Step::End, 0));
    }

    fn request(method: Method, headers: &[(&str, &str)], body: BodyLength) -> (String, Encoding) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let mut out = Vec::new();
        let encoding = encode_request_head(&method, "/v1/x?y=1", &mut map, body, &mut out);
        (String::from_utf8(out).unwrap(), encoding)
    }

    #[test]
    fn request_heads_carry_the_framing_the_body_needs() {
        let (head, enc) = request(Method::POST, &[("host", "up")], BodyLength::Known(12));
        assert_eq!(
            head,
            "POST /v1/x?y=1 HTTP/1.1\r\nhost: up\r\ncontent-length: 12\r\n\r\n"
        );
        assert_eq!(enc, Encoding::Length(12));
        let stale = [("content-length", "99")];
        let (head, enc) = request(Method::POST, &stale, BodyLength::Known(12));
        assert_eq!(
            head,
            "POST /v1/x?y=1 HTTP/1.1\r\ncontent-length: 12\r\n\r\n"
        );
        assert_eq!(
            enc,
            Encoding::Length(12),
            "a body of known length is sent with it"
        );
        let (head, enc) = request(
            Method::POST,
            &[("content-length", "3")],
            BodyLength::Unknown,
        );
        assert_eq!(head, "POST /v1/x?y=1 HTTP/1.1\r\ncontent-length: 3\r\n\r\n");
        assert_eq!(enc, Encoding::Length(3));
        let (head, enc) = request(Method::POST, &[], BodyLength::Unknown);
        assert_eq!(
            head,
            "POST /v1/x?y=1 HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(enc, Encoding::Chunked);
        let (head, enc) = request(Method::GET, &[("a", "b")], BodyLength::Unknown);
        assert_eq!(head, "GET /v1/x?y=1 HTTP/1.1\r\na: b\r\n\r\n");
        assert_eq!(enc, Encoding::Empty);
        let (head, enc) = request(Method::GET, &[], BodyLength::Empty);
        assert_eq!(
            (head.as_str(), enc),
            ("GET /v1/x?y=1 HTTP/1.1\r\n\r\n", Encoding::Empty)
        );
    }

    #[test]
    fn chunks_are_encoded_in_hex() {
        let mut out = Vec::new();
        for len in [1, 15, 16, 255, 4096, 0x1_2345] {
            encode_chunk_size(len, &mut out);
        }
        assert_eq!(out, b"1\r\nF\r\n10\r\nFF\r\n1000\r\n12345\r\n");
    }
}
