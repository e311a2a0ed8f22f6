//! Finding a response body's bytes in what was read: `Content-Length`, chunked, or until close.

use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Error, Framing, MAX_HEADERS, MAX_SIZE_LINE};

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
                    // The same limit whether the line's end came in this read or not, so that
                    // how the upstream's bytes are split into reads changes nothing.
                    let Some(nl) = memchr::memchr(b'\n', rest) else {
                        if rest.len() > MAX_SIZE_LINE {
                            return Err(Error::Framing("chunk-size line too long"));
                        }
                        return Ok((Step::More, pos));
                    };
                    if nl > MAX_SIZE_LINE {
                        return Err(Error::Framing("chunk-size line too long"));
                    }
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
