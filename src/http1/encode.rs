//! Writing a request head and the framing of its body.

use http::Method;
use http::header::{self, HeaderMap, HeaderValue};

use super::content_length;

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
/// to be framed. Framing headers follow the body, and a `Transfer-Encoding` from the caller is
/// always dropped (it is hop-by-hop): a body of known length is sent with that length as
/// `Content-Length`; a streamed one of unknown length keeps a valid `Content-Length` from the
/// caller, or else is chunked, whatever the method. (hyper's client sends no body at all for a
/// `GET`, `HEAD` or `CONNECT` of unknown length; a proxy that did so would drop the chunked body
/// a client sent with one, and the upstream would answer a request the client did not make.)
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
            headers.remove(header::CONTENT_LENGTH);
            headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
            Encoding::Chunked
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
