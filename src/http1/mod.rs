//! HTTP/1.1 to the upstream: framing without I/O (parse, decode, encode) and the client
//! connection that uses it. The framing part: the request head the proxy writes, the
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

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, StatusCode, Version};

pub mod client;
mod decode;
mod encode;
mod parse;

pub use decode::{Decoder, Step};
pub use encode::{BodyLength, Encoding, LAST_CHUNK, encode_chunk_size, encode_request_head};
pub use parse::{Parsed, ResponseHead, parse_response_head};

/// Most header fields a response head or a trailer section may carry (hyper's default).
pub const MAX_HEADERS: usize = 100;

/// Most bytes a chunk-size line (with its extensions) may take.
pub(crate) const MAX_SIZE_LINE: usize = 4096;

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

pub(crate) fn framing(
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
pub(crate) fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
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

#[cfg(test)]
mod tests;
