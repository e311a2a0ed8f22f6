//! Reading a response head.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use super::{Error, Framing, MAX_HEADERS, framing, keeps_alive};

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
    // Room for a few fields first: setting up all `MAX_HEADERS` slots costs more than the rest
    // of the parse, for heads that mostly carry half a dozen fields.
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
pub(crate) const FEW_HEADERS: usize = 24;

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
    // A message framed both ways may be read differently by another hop: not reused. The
    // transfer coding frames it (RFC 9112 §6.1), and the stale length is not passed on.
    let both = headers.contains_key(header::TRANSFER_ENCODING)
        && headers.contains_key(header::CONTENT_LENGTH);
    if both {
        headers.remove(header::CONTENT_LENGTH);
    }
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
