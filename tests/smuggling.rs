//! Request smuggling, differentially. Every row of [`corpus`] is a malformed or ambiguous
//! HTTP/1.1 byte stream, written as it is, on a fresh connection, both to tokentap and to a plain
//! hyper HTTP/1 server built with the settings of tokentap's own listener (the reference). Two
//! recording servers note every request they parse, with its method, target and body: the
//! reference, and the upstream behind tokentap. A row then holds one of two things:
//!
//! - [`Same`]: the upstream received the requests the reference parsed out of the same bytes,
//!   no more, no fewer, with the same bodies, so the proxy neither made two requests of one nor
//!   one of two;
//! - [`Refused`]: the proxy forwarded only the requests before the bad one and answered that one
//!   with a 4xx, or closed the connection without an answer.
//!
//! What the proxy changes on purpose is left out of the comparison: the upstream request's
//! headers (`Host` rewritten, `X-Forwarded-*` added, hop-by-hop headers removed), its framing
//! (a body of unknown length goes upstream chunked), and the `stream_options` it adds to a
//! streaming chat/completions body (usage injection). A target without a path (authority form)
//! goes upstream as `/`, so both sides note it as `/`.
//!
//! All rows run at once, each from its own loopback address (127.77.x.y), which is how the
//! requests are told apart: the reference sees the client's address, the upstream sees it as the
//! last `X-Forwarded-For` entry. A request the upstream parses without one was not written by
//! the proxy as a request head: it came out of some other request's bytes, and fails the test.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokentap::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

use Expect::{Refused, Same};

/// Most header fields in a request head, as tokentap's listener allows (`src/server/mod.rs`,
/// hyper's default).
const MAX_HEADERS: usize = 100;

/// How long the proxy waits for a request head, or between reads of a request body, before it
/// gives up with a 408: shorter than [`QUIET`], so that a row whose bytes leave the proxy
/// waiting sees how the wait ends.
const PROXY_WAIT: Duration = Duration::from_secs(1);

/// A client stops reading after this long without a byte (the servers keep connections alive,
/// so most rows end this way).
const QUIET: Duration = Duration::from_millis(2500);

/// What a row asserts.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// The upstream got exactly the requests hyper's server parses out of the bytes, of which
    /// there are this many complete ones, and the client got a 2xx for each. A request whose
    /// body breaks off may also reach the upstream, broken off no later than in the reference.
    Same(usize),
    /// The upstream got only the first this many requests (as hyper's server parses them) and
    /// nothing of the next one; the client got their answers, then a 4xx or the end of the
    /// connection.
    Refused(usize),
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
}

fn row(name: &'static str, bytes: impl AsRef<[u8]>, expect: Expect) -> Case {
    Case {
        name,
        bytes: bytes.as_ref().to_vec(),
        expect,
    }
}

/// The parts one after another.
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `data` as one chunk (hex size, CRLF, data, CRLF).
fn chunk(data: &[u8]) -> Vec<u8> {
    cat(&[format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"])
}

/// A `GET` whose head is exactly `len` bytes long, padded by one long header value.
fn head_of(len: usize) -> Vec<u8> {
    let start = b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-Pad: ";
    let pad = len - start.len() - 4;
    cat(&[start, &vec![b'a'; pad], b"\r\n\r\n"])
}

/// A `GET` with `n` header fields.
fn fields(n: usize) -> Vec<u8> {
    let mut out = b"GET /v1/models HTTP/1.1\r\nHost: t\r\n".to_vec();
    for i in 1..n {
        out.extend_from_slice(format!("X-Field-{i}: {i}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

const GET: &[u8] = b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n";
const SMUGGLED: &[u8] = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";

/// The table. Paths: `/v1/models` and `/v1/embeddings` are streamed through (the head goes
/// upstream before the body is read); `/v1/chat/completions` bodies are read whole first.
fn corpus() -> Vec<Case> {
    let big = tokentap::server::MAX_HEAD;
    vec![
        // Well-formed, for the baseline.
        row("GET", GET, Same(1)),
        row("HEAD", b"HEAD /v1/models HTTP/1.1\r\nHost: t\r\n\r\n", Same(1)),
        row(
            "query string",
            b"GET /v1/models?a=1&b=%20&c HTTP/1.1\r\nHost: t\r\n\r\n",
            Same(1),
        ),
        row(
            "POST with Content-Length, streamed",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
            Same(1),
        ),
        row(
            "POST with Content-Length, read whole",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 13\r\n\r\n{\"model\":\"m\"}",
            Same(1),
        ),
        row(
            "POST chunked, streamed",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "POST chunked, read whole",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nd\r\n{\"model\":\"m\"}\r\n0\r\n\r\n",
            Same(1),
        ),
        // Content-Length and Transfer-Encoding together: chunked wins, and hyper closes the
        // connection after the response, so bytes after the body are never read.
        row(
            "CL then TE",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "TE then CL",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "CL then TE, read whole",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\nd\r\n{\"model\":\"m\"}\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "CL.TE: a request's start after the last chunk",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
            Same(1),
        ),
        row(
            "TE.CL: a request inside a chunk",
            cat(&[
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
                &chunk(b"GPOST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 15\r\n\r\nx=1"),
                b"0\r\n\r\n",
            ]),
            Same(1),
        ),
        row(
            "CL and TE, then a pipelined request",
            cat(&[
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                SMUGGLED,
            ]),
            Same(1),
        ),
        row(
            "TE, then an invalid CL",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: abc\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "an invalid CL, then TE",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "CL, TE, a different CL",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nContent-Length: 7\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "two different CLs, then TE",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        // Content-Length values.
        row(
            "duplicate equal CL",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            Same(1),
        ),
        row(
            "conflicting CL",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            Refused(0),
        ),
        row(
            "CL list 5, 5",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 5\r\n\r\nhello",
            Refused(0),
        ),
        row(
            "CL +5",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello",
            Refused(0),
        ),
        row(
            "CL -1",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\nhello",
            Refused(0),
        ),
        row(
            "CL '5 5'",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 5 5\r\n\r\nhello",
            Refused(0),
        ),
        row(
            "CL 0x5",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 0x5\r\n\r\nhello",
            Refused(0),
        ),
        row(
            "CL empty",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: \r\n\r\nhello",
            Refused(0),
        ),
        row(
            "CL with leading zeros",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 0005\r\n\r\nhello",
            Same(1),
        ),
        row(
            "CL with a tab before and spaces after",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length:\t5  \r\n\r\nhello",
            Same(1),
        ),
        row(
            "CL past u64",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999999999999\r\n\r\nhello",
            Refused(0),
        ),
        row(
            "CL u64::MAX",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 18446744073709551615\r\n\r\nhello",
            Refused(0),
        ),
        row(
            "CL over the body limit, read whole",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 40000000\r\n\r\n{\"model\":\"m\"}",
            Refused(0),
        ),
        row(
            "CL shorter than the body: the rest starts a request",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nhello",
            Same(1),
        ),
        row(
            "CL longer than what comes, streamed",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello",
            Same(0),
        ),
        row(
            "CL longer than what comes, read whole",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 30\r\n\r\n{\"model\":\"m\"}",
            Refused(0),
        ),
        row(
            "CL 0, then a request",
            cat(&[
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
                SMUGGLED,
            ]),
            Same(2),
        ),
        row(
            "CL whose body is a request",
            cat(&[
                format!(
                    "POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
                    SMUGGLED.len()
                )
                .as_bytes(),
                SMUGGLED,
            ]),
            Same(1),
        ),
        // Transfer-Encoding lists and spellings.
        row(
            "TE gzip, chunked",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "TE chunked, gzip",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "TE chunked, chunked",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "TE identity",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "TE identity with CL",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello",
            Refused(0),
        ),
        row(
            "TE gzip, then TE chunked",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "TE chunked, then TE gzip",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "TE CHUNKED",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "TE name in odd case",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\ntRaNsFeR-eNcOdInG: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "TE value between spaces and tabs",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: \t chunked \t\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "TE with a vertical tab before the value",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\x0bchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "TE with a vertical tab after the value",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\x0b\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "TE with a form feed",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: \x0cchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "TE with a space before the colon",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "TE xchunked",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "TE quoted chunked",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: \"chunked\"\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "TE chunked with a trailing comma",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked,\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "TE with NUL",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\x00\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "TE folded onto the next line",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\r\n chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "TE in HTTP/1.0",
            b"POST /v1/embeddings HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Refused(0),
        ),
        // Header field syntax.
        row(
            "obs-fold in an ordinary header",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n",
            Refused(0),
        ),
        row(
            "obs-fold in CL",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length:\r\n 5\r\n\r\nhello",
            Refused(0),
        ),
        row(
            "bare CR in a header value",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n",
            Refused(0),
        ),
        row(
            "bare CR line endings",
            b"GET /v1/models HTTP/1.1\rHost: t\r\r",
            Refused(0),
        ),
        row(
            "bare CR before a header",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\rContent-Length: 5\r\n\r\nhello",
            Refused(0),
        ),
        row(
            "bare LF line endings",
            b"GET /v1/models HTTP/1.1\nHost: t\n\n",
            Same(1),
        ),
        row(
            "bare LF line endings, with a body",
            b"POST /v1/embeddings HTTP/1.1\nHost: t\nContent-Length: 5\n\nhello",
            Same(1),
        ),
        row(
            "bare LF ending the head only",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\nhello",
            Same(1),
        ),
        row(
            "NUL in a header value",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n",
            Refused(0),
        ),
        row(
            "NUL in a header name",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-\x00A: b\r\n\r\n",
            Refused(0),
        ),
        row(
            "control character 0x01 in a header value",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-A: a\x01b\r\n\r\n",
            Refused(0),
        ),
        row(
            "DEL in a header value",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-A: a\x7fb\r\n\r\n",
            Refused(0),
        ),
        row(
            "obs-text in a header value",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-A: caf\xc3\xa9 \xff\r\n\r\n",
            Same(1),
        ),
        row(
            "space before the colon of CL",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length : 5\r\n\r\nhello",
            Refused(0),
        ),
        row(
            "tab before the colon of CL",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length\t: 5\r\n\r\nhello",
            Refused(0),
        ),
        row(
            "empty header name",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\n: b\r\n\r\n",
            Refused(0),
        ),
        row(
            "header line without a colon",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-A b\r\n\r\n",
            Refused(0),
        ),
        row(
            "first header line starting with a space",
            b"GET /v1/models HTTP/1.1\r\n Host: t\r\n\r\n",
            Refused(0),
        ),
        row(
            "separator in a header name",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX(A): b\r\n\r\n",
            Refused(0),
        ),
        row(
            "UTF-8 in a header name",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-\xc3\xa9: b\r\n\r\n",
            Refused(0),
        ),
        // Chunked bodies. A body that breaks off after the head went upstream reaches the
        // upstream broken off too (`Same(0)`); one read whole reaches it not at all.
        row(
            "chunk size past u64, streamed",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
            Same(0),
        ),
        row(
            "chunk size past u64, read whole",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000d\r\n{\"model\":\"m\"}\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "negative chunk size",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
            Same(0),
        ),
        row(
            "chunk size 0x5",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
            Same(0),
        ),
        row(
            "chunk size after a space",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
            Same(0),
        ),
        row(
            "chunk size before spaces and a tab",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5 \t \r\nhello\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "chunk size with digits after a space",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5 1\r\nhello\r\n0\r\n\r\n",
            Same(0),
        ),
        row(
            "chunk extensions",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b;c=\"d;e\"\r\nhello\r\n0;f\r\n\r\n",
            Same(1),
        ),
        row(
            "chunk extension ended by a bare LF",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\nhello\r\n0\r\n\r\n",
            Same(0),
        ),
        row(
            "chunk size ended by a bare LF",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
            Same(0),
        ),
        row(
            "chunk data without its CRLF",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello0\r\n\r\n",
            Same(0),
        ),
        row(
            "chunk data longer than its size, streamed",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
            Same(0),
        ),
        row(
            "chunk data longer than its size, read whole",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"model\":\"m\"}\r\n0\r\n\r\n",
            Refused(0),
        ),
        row(
            "uppercase hex chunk size",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "chunk size with many leading zeros",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n000000000000000000000005\r\nhello\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "trailer fields",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: 1\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n",
            Same(1),
        ),
        row(
            "a request line in the trailer",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
            Same(0),
        ),
        row(
            "data after the last chunk size",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nhello\r\n\r\n",
            Same(0),
        ),
        row(
            "a request after the last chunk",
            cat(&[
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                SMUGGLED,
            ]),
            Same(2),
        ),
        row(
            "no last chunk",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            Same(0),
        ),
        row(
            "last chunk without the final CRLF",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n",
            Same(0),
        ),
        // Request targets and request lines.
        row(
            "absolute-form target",
            b"GET http://other/v1/models HTTP/1.1\r\nHost: t\r\n\r\n",
            Same(1),
        ),
        row(
            "absolute-form target with port and query",
            b"GET https://other:8443/v1/models?x=1 HTTP/1.1\r\nHost: t\r\n\r\n",
            Same(1),
        ),
        row(
            "absolute-form target without a path",
            b"GET http://other HTTP/1.1\r\nHost: t\r\n\r\n",
            Same(1),
        ),
        row(
            "asterisk-form OPTIONS",
            b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n",
            Same(1),
        ),
        row(
            "asterisk-form GET",
            b"GET * HTTP/1.1\r\nHost: t\r\n\r\n",
            Same(1),
        ),
        row(
            "authority-form GET",
            b"GET other:443 HTTP/1.1\r\nHost: t\r\n\r\n",
            Same(1),
        ),
        row(
            "CONNECT",
            b"CONNECT other:443 HTTP/1.1\r\nHost: other:443\r\n\r\n",
            Refused(0),
        ),
        row(
            "CONNECT, then a pipelined request",
            cat(&[
                b"CONNECT other:443 HTTP/1.1\r\nHost: other:443\r\n\r\n",
                SMUGGLED,
            ]),
            Refused(0),
        ),
        row(
            "lowercase method",
            b"get /v1/models HTTP/1.1\r\nHost: t\r\n\r\n",
            Same(1),
        ),
        row(
            "extension method with a body",
            b"PURGE /v1/models HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
            Same(1),
        ),
        row(
            "two spaces after the method",
            b"GET  /v1/models HTTP/1.1\r\nHost: t\r\n\r\n",
            Refused(0),
        ),
        row(
            "tab after the method",
            b"GET\t/v1/models HTTP/1.1\r\nHost: t\r\n\r\n",
            Refused(0),
        ),
        row(
            "space inside the target",
            b"GET /v1/mo dels HTTP/1.1\r\nHost: t\r\n\r\n",
            Refused(0),
        ),
        row(
            "NUL inside the target",
            b"GET /v1/mo\x00dels HTTP/1.1\r\nHost: t\r\n\r\n",
            Refused(0),
        ),
        row(
            "fragment in the target",
            b"GET /v1/models#frag HTTP/1.1\r\nHost: t\r\n\r\n",
            Same(1),
        ),
        row(
            "HTTP/0.9 request line",
            b"GET /v1/models\r\n\r\n",
            Refused(0),
        ),
        row(
            "HTTP/1.2",
            b"GET /v1/models HTTP/1.2\r\nHost: t\r\n\r\n",
            Refused(0),
        ),
        row(
            "HTTP/2.0 request line",
            b"GET /v1/models HTTP/2.0\r\nHost: t\r\n\r\n",
            Refused(0),
        ),
        row(
            "lowercase version",
            b"GET /v1/models http/1.1\r\nHost: t\r\n\r\n",
            Refused(0),
        ),
        row(
            "empty lines before the request line",
            b"\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n",
            Same(1),
        ),
        row(
            "target longer than the head limit",
            cat(&[
                b"GET /",
                &vec![b'a'; big],
                b" HTTP/1.1\r\nHost: t\r\n\r\n",
            ]),
            Refused(0),
        ),
        // HTTP/1.0.
        row(
            "HTTP/1.0 GET",
            b"GET /v1/models HTTP/1.0\r\n\r\n",
            Same(1),
        ),
        row(
            "HTTP/1.0 keep-alive, two pipelined",
            b"GET /v1/models HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /v1/models?2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            Same(2),
        ),
        row(
            "HTTP/1.0 without keep-alive, two pipelined",
            b"GET /v1/models HTTP/1.0\r\n\r\nGET /v1/models?2 HTTP/1.0\r\n\r\n",
            Same(1),
        ),
        row(
            "HTTP/1.0 POST with CL",
            b"POST /v1/embeddings HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello",
            Same(1),
        ),
        row(
            "HTTP/1.0 keep-alive POST without a length",
            b"POST /v1/embeddings HTTP/1.0\r\nConnection: keep-alive\r\n\r\nhello",
            Same(1),
        ),
        // HTTP/2 lookalikes.
        // A valid preface starts HTTP/2 (prior knowledge): the proxy answers in HTTP/2 and
        // waits for frames; no HTTP/1.1 request comes of it.
        row(
            "HTTP/2 preface alone",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            Same(0),
        ),
        row(
            "HTTP/2 preface, then HTTP/1.1",
            cat(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", GET]),
            Refused(0),
        ),
        row(
            "broken HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\nGET /v1/models HTTP/1.1\r\n\r\n",
            Refused(0),
        ),
        row(
            "PRI method over HTTP/1.1",
            b"PRI /v1/models HTTP/1.1\r\nHost: t\r\n\r\n",
            Refused(0),
        ),
        // Upgrades: not tunnelled, so what follows is read as HTTP/1.1 again.
        row(
            "Upgrade h2c",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
            Same(1),
        ),
        row(
            "Upgrade websocket",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            Same(1),
        ),
        row(
            "websocket frames after an upgrade request",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58",
            Same(1),
        ),
        row(
            "a request pipelined after an upgrade request",
            cat(&[
                b"GET /v1/models HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                SMUGGLED,
            ]),
            Same(2),
        ),
        row(
            "Upgrade on a POST with a body",
            cat(&[
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 5\r\n\r\nhello",
                SMUGGLED,
            ]),
            Same(2),
        ),
        // Expect.
        row(
            "Expect 100-continue with a body",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
            Same(1),
        ),
        row(
            "Expect 100-continue without a body",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n",
            Same(1),
        ),
        row(
            "Expect 100-continue, read whole",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 13\r\n\r\n{\"model\":\"m\"}",
            Same(1),
        ),
        row(
            "Expect 100-continue, chunked, then a request",
            cat(&[
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                SMUGGLED,
            ]),
            Same(2),
        ),
        row(
            "unknown expectation",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nExpect: 200-ok\r\nContent-Length: 5\r\n\r\nhello",
            Same(1),
        ),
        // Pipelining.
        row("two GETs in one write", cat(&[GET, SMUGGLED]), Same(2)),
        row(
            "three requests in one write",
            cat(&[
                GET,
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nworld\r\n0\r\n\r\n",
            ]),
            Same(3),
        ),
        row(
            "three chat requests in one write",
            [b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 13\r\n\r\n{\"model\":\"m\"}"
                as &[u8]; 3]
                .concat(),
            Same(3),
        ),
        // Streaming chat requests: their bodies are rewritten (usage injection) and go upstream
        // with a length of their own.
        row(
            "streaming chat request",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 27\r\n\r\n{\"model\":\"m\",\"stream\":true}",
            Same(1),
        ),
        row(
            "streaming chat requests, chunked and CL, then a request",
            cat(&[
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1b\r\n{\"model\":\"m\",\"stream\":true}\r\n0\r\n\r\n",
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 27\r\n\r\n{\"model\":\"m\",\"stream\":true}",
                SMUGGLED,
            ]),
            Same(3),
        ),
        row(
            "CL shorter than a streaming chat body",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 13\r\n\r\n{\"model\":\"m\",\"stream\":true}",
            Same(1),
        ),
        row(
            "a request inside a CL longer than a streaming chat body",
            cat(&[
                format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{{\"model\":\"m\",\"stream\":true}}",
                    27 + SMUGGLED.len()
                )
                .as_bytes(),
                SMUGGLED,
            ]),
            Same(1),
        ),
        row(
            "a request after a CL shorter than the body",
            cat(&[
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nhello",
                GET,
            ]),
            Same(2),
        ),
        row(
            "a request inside a CL longer than the body",
            cat(&[
                format!(
                    "POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\nhello",
                    5 + SMUGGLED.len()
                )
                .as_bytes(),
                SMUGGLED,
            ]),
            Same(1),
        ),
        row(
            "a request after Connection: close",
            cat(&[
                b"GET /v1/models HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                SMUGGLED,
            ]),
            Same(1),
        ),
        row(
            "HEAD, then GET",
            cat(&[b"HEAD /v1/models HTTP/1.1\r\nHost: t\r\n\r\n", GET]),
            Same(2),
        ),
        row(
            "the second of two malformed",
            cat(&[GET, b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-A : b\r\n\r\n"]),
            Refused(1),
        ),
        row(
            "the third of three malformed",
            cat(&[
                GET,
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            ]),
            Refused(2),
        ),
        // Limits: a head of at most 64 KiB and 100 fields.
        row("head of exactly 64 KiB", head_of(big), Same(1)),
        row("head one byte over 64 KiB", head_of(big + 1), Refused(0)),
        row(
            "head of 64 KiB, then a request",
            cat(&[&head_of(big), GET]),
            Same(2),
        ),
        row(
            "a request, then a head over 64 KiB",
            cat(&[GET, &head_of(big + 1)]),
            Refused(1),
        ),
        row("100 header fields", fields(MAX_HEADERS), Same(1)),
        row("101 header fields", fields(MAX_HEADERS + 1), Refused(0)),
        // Bodies where none is expected.
        row(
            "GET with a CL body",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
            Same(1),
        ),
        row(
            "GET with a chunked body",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Same(1),
        ),
        row(
            "HEAD with a CL body",
            b"HEAD /v1/models HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
            Same(1),
        ),
        row(
            "HEAD with a chunked body, then a request",
            cat(&[
                b"HEAD /v1/models HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                SMUGGLED,
            ]),
            Same(2),
        ),
        row(
            "GET whose body is a request",
            cat(&[
                format!(
                    "GET /v1/models HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
                    SMUGGLED.len()
                )
                .as_bytes(),
                SMUGGLED,
            ]),
            Same(1),
        ),
        // Connection naming framing headers (hop-by-hop for the proxy).
        row(
            "Connection names Content-Length",
            cat(&[
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
                SMUGGLED,
            ]),
            Same(2),
        ),
        row(
            "Connection names Transfer-Encoding",
            cat(&[
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                SMUGGLED,
            ]),
            Same(2),
        ),
        row(
            "Connection names Host",
            b"GET /v1/models HTTP/1.1\r\nHost: t\r\nConnection: host, keep-alive\r\n\r\n",
            Same(1),
        ),
    ]
}

/// One request as a server parsed it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    /// Path and query (`/` when the target has none).
    target: String,
    body: Vec<u8>,
    /// The body arrived whole (otherwise it broke off: what came of it is in `body`).
    complete: bool,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = self.body.escape_ascii().to_string();
        let body: String = body.chars().take(120).collect();
        write!(f, "{} {} body \"{body}\"", self.method, self.target)?;
        if !self.complete {
            write!(f, " (broken off)")?;
        }
        Ok(())
    }
}

/// Who sent a request, as a recording server tells it.
#[derive(Clone, Copy)]
enum Attribution {
    /// The connection's peer (the reference: clients connect to it directly).
    Peer,
    /// The last `X-Forwarded-For` entry (the upstream: the proxy connects to it).
    ForwardedFor,
}

/// What a recording server parsed, in order.
#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<(Option<IpAddr>, Seen)>>,
    /// Requests whose handling has begun and not ended.
    busy: AtomicUsize,
}

struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Recorder {
    fn len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    fn of(&self, client: IpAddr) -> Vec<Seen> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(c, _)| *c == Some(client))
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Notes the request as it is read: its head at once, its body as it comes, so that one
    /// whose connection ends mid-body is on record with what came of it.
    async fn record(
        &self,
        client: Option<IpAddr>,
        req: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        let _busy = Busy(&self.busy);
        let (parts, mut body) = req.into_parts();
        let seen = Seen {
            method: parts.method.to_string(),
            target: target(&parts.uri),
            body: Vec::new(),
            complete: false,
        };
        let index = {
            let mut log = self.log.lock().unwrap();
            log.push((client, seen));
            log.len() - 1
        };
        let mut whole = true;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        self.log.lock().unwrap()[index]
                            .1
                            .body
                            .extend_from_slice(data);
                    }
                }
                Err(_) => {
                    whole = false;
                    break;
                }
            }
        }
        self.log.lock().unwrap()[index].1.complete = whole;
        // A 2xx only for a request read whole, so that the number of 2xx answers a client got
        // is the number of requests that arrived whole.
        Response::builder()
            .status(if whole { 200 } else { 400 })
            .header("content-length", "2")
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap()
    }
}

fn target(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned())
}

fn forwarded_for(req: &Request<Incoming>) -> Option<IpAddr> {
    let value = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .next_back()?;
    value.to_str().ok()?.rsplit(',').next()?.trim().parse().ok()
}

/// Serves HTTP/1.1 on `listener` with `builder`, noting every request in `recorder`.
async fn serve(
    listener: TcpListener,
    builder: http1::Builder,
    recorder: Arc<Recorder>,
    attribution: Attribution,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let (builder, recorder) = (builder.clone(), recorder.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let recorder = recorder.clone();
                async move {
                    let client = match attribution {
                        Attribution::Peer => Some(peer.ip()),
                        Attribution::ForwardedFor => forwarded_for(&req),
                    };
                    Ok::<_, Infallible>(recorder.record(client, req).await)
                }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A recording server on a free loopback port.
async fn recording(
    builder: http1::Builder,
    attribution: Attribution,
) -> (SocketAddr, Arc<Recorder>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let recorder = Arc::new(Recorder::default());
    tokio::spawn(serve(listener, builder, recorder.clone(), attribution));
    (addr, recorder)
}

/// How a client's connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The server closed it.
    Closed,
    /// It failed (reset).
    Reset,
    /// Nothing more came for [`QUIET`].
    Quiet,
}

/// What a client got.
struct Reply {
    bytes: Vec<u8>,
    end: End,
}

impl Reply {
    /// The statuses of the final responses, in order. The servers' bodies (`ok` and JSON
    /// errors) never contain a status line, so a status line is wherever one appears.
    fn statuses(&self) -> Vec<u16> {
        let b = &self.bytes;
        (0..b.len().saturating_sub(12))
            .filter(|&i| {
                b[i..].starts_with(b"HTTP/1.")
                    && b[i + 8] == b' '
                    && b[i + 9..i + 12].iter().all(u8::is_ascii_digit)
                    && b[i + 12] == b' '
            })
            .map(|i| {
                b[i + 9..i + 12]
                    .iter()
                    .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'))
            })
            .filter(|&status| status >= 200)
            .collect()
    }

    fn successes(&self) -> usize {
        self.statuses()
            .iter()
            .filter(|s| (200..300).contains(*s))
            .count()
    }

    fn describe(&self) -> String {
        format!("statuses {:?}, then {:?}", self.statuses(), self.end)
    }
}

/// Writes `bytes` from `ip` to `to` on a new connection and reads until the server closes it or
/// goes quiet. The write half stays open throughout: a client that half-closed would tell the
/// server something the row does not say.
async fn exchange(ip: Ipv4Addr, to: SocketAddr, bytes: Vec<u8>) -> Reply {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip.into(), 0)).unwrap();
    let stream = socket.connect(to).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut read, mut write) = stream.into_split();
    // Written alongside the reads: a server that answers and closes before reading all of a
    // long head must not leave the writer stuck.
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&bytes).await;
        write
    });
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let end = loop {
        match tokio::time::timeout(QUIET, read.read(&mut buf)).await {
            Err(_) => break End::Quiet,
            Ok(Ok(0)) => break End::Closed,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break End::Reset,
        }
    };
    writer.abort();
    Reply { bytes: got, end }
}

/// The client address of row `i`.
fn client_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 77, (i / 200) as u8, (i % 200 + 1) as u8)
}

fn list(seen: &[Seen]) -> String {
    if seen.is_empty() {
        return "nothing".to_owned();
    }
    let items: Vec<String> = seen.iter().map(ToString::to_string).collect();
    format!("[{}]", items.join("; "))
}

/// Whether `up` is the request `sent` as the proxy forwards it: the same method, target and
/// body, except that a streaming JSON body that did not ask for usage asks for it upstream.
fn forwarded_as(up: &Seen, sent: &Seen) -> bool {
    use serde_json::{Map, Value, json};
    if (&up.method, &up.target, up.complete) != (&sent.method, &sent.target, sent.complete) {
        return false;
    }
    if up.body == sent.body {
        return true;
    }
    let object = |b: &[u8]| serde_json::from_slice::<Map<String, Value>>(b).ok();
    match (object(&up.body), object(&sent.body)) {
        (Some(mut up), Some(sent))
            if sent.get("stream") == Some(&Value::Bool(true))
                && !sent.contains_key("stream_options") =>
        {
            up.remove("stream_options") == Some(json!({ "include_usage": true })) && up == sent
        }
        _ => false,
    }
}

/// Whether the upstream got exactly `sent`, in order, each as the proxy forwards it.
fn all_forwarded(up: &[Seen], sent: &[Seen]) -> bool {
    up.len() == sent.len() && up.iter().zip(sent).all(|(u, s)| forwarded_as(u, s))
}

/// Checks one row; the reason it fails, if it does.
fn check(
    case: &Case,
    upstream: &[Seen],
    reference: &[Seen],
    via_proxy: &Reply,
    direct: &Reply,
) -> Option<String> {
    let complete = |s: &[Seen]| -> Vec<Seen> { s.iter().filter(|s| s.complete).cloned().collect() };
    let (up_whole, ref_whole) = (complete(upstream), complete(reference));
    let up_broken: Vec<&Seen> = upstream.iter().filter(|s| !s.complete).collect();
    let ref_broken: Vec<&Seen> = reference.iter().filter(|s| !s.complete).collect();
    let mut why = Vec::new();
    match case.expect {
        Same(n) => {
            if ref_whole.len() != n {
                why.push(format!(
                    "hyper's server parsed {} complete requests, the row says {n}",
                    ref_whole.len()
                ));
            }
            if !all_forwarded(&up_whole, &ref_whole) {
                why.push("the upstream's requests differ from hyper's".to_owned());
            }
            // A broken-off request reaches the upstream at most as far as hyper read it.
            for broken in &up_broken {
                let matched = ref_broken.iter().any(|r| {
                    r.method == broken.method
                        && r.target == broken.target
                        && r.body.starts_with(&broken.body)
                });
                if !matched {
                    why.push(format!(
                        "the upstream got a broken-off request hyper did not: {broken}"
                    ));
                }
            }
            if up_broken.len() > 1 {
                why.push("more than one broken-off request upstream".to_owned());
            }
            if via_proxy.successes() != n || direct.successes() != n {
                why.push(format!(
                    "{n} 2xx answers expected; via the proxy {}, direct {}",
                    via_proxy.successes(),
                    direct.successes()
                ));
            }
        }
        Refused(n) => {
            if ref_whole.len() < n {
                why.push(format!(
                    "hyper's server parsed only {} complete requests, the row says {n} come before the refused one",
                    ref_whole.len()
                ));
            } else if !all_forwarded(&up_whole, &ref_whole[..n]) {
                why.push(format!(
                    "the upstream should have got hyper's first {n} requests and nothing else"
                ));
            }
            if !up_broken.is_empty() {
                why.push("part of the refused request reached the upstream".to_owned());
            }
            let statuses = via_proxy.statuses();
            let answered = statuses.iter().take(n).all(|s| (200..300).contains(s));
            let refused = match statuses.get(n) {
                Some(status) => (400..500).contains(status),
                None => via_proxy.end != End::Quiet,
            };
            if statuses.len() < n || !answered || !refused {
                why.push(format!(
                    "the client should have got {n} 2xx answers, then a 4xx or the end of the connection"
                ));
            }
        }
    }
    if why.is_empty() {
        return None;
    }
    Some(format!(
        "row \"{}\" ({:?}): {}\n    upstream got:        {}\n    hyper's server made: {}\n    client via proxy:    {}\n    client direct:       {}",
        case.name,
        case.expect,
        why.join("; "),
        list(upstream),
        list(reference),
        via_proxy.describe(),
        direct.describe(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_and_upstream_agree_on_message_boundaries() {
    let cases = corpus();
    assert!(cases.len() >= 80, "{} rows", cases.len());
    let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
        panic!("two rows are named \"{}\"", pair[0]);
    }

    // The reference: hyper's HTTP/1 server as tokentap's listener builds it.
    let mut reference_builder = http1::Builder::new();
    reference_builder
        .max_header_size(tokentap::server::MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .max_buf_size(2 * tokentap::server::MAX_HEAD);
    let (reference_addr, reference) = recording(reference_builder, Attribution::Peer).await;
    // The upstream takes heads longer than the proxy's own limit: the proxy adds fields to a
    // head it accepted, and the upstream must not be the one that refuses it.
    let mut upstream_builder = http1::Builder::new();
    upstream_builder
        .max_header_size(4 * tokentap::server::MAX_HEAD)
        .max_headers(4 * MAX_HEADERS)
        .max_buf_size(8 * tokentap::server::MAX_HEAD);
    let (upstream_addr, upstream) = recording(upstream_builder, Attribution::ForwardedFor).await;

    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: None,
        ..Config::default()
    };
    config.upstream.url = format!("http://{upstream_addr}");
    config.telemetry.access_log = false;
    config.telemetry.discover_models = false;
    // The model poll asks once, at start, and not again while the rows run.
    config.telemetry.model_refresh_secs = 3600.0;
    config.proxy.header_timeout_secs = PROXY_WAIT.as_secs_f64();
    config.proxy.body_read_timeout_secs = PROXY_WAIT.as_secs_f64();
    config.proxy.shutdown_grace_secs = 1.0;
    let proxy = tokentap::start(config).await.unwrap();
    let proxy_addr = proxy.addr();

    // The proxy's own `GET /v1/models` comes first, without `X-Forwarded-For`; from then on
    // every request the upstream parses must be one a client sent.
    for _ in 0..500 {
        if upstream.len() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.len(), 1, "the proxy's model poll did not arrive");
    let polled = upstream.len();

    let runs: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, case)| {
            let ip = client_ip(i);
            let bytes = case.bytes.clone();
            tokio::spawn(async move {
                tokio::join!(
                    exchange(ip, proxy_addr, bytes.clone()),
                    exchange(ip, reference_addr, bytes),
                )
            })
        })
        .collect();
    let mut replies = Vec::new();
    for run in runs {
        replies.push(run.await.unwrap());
    }

    // Every client has hung up; let both servers finish what they were reading.
    let mut stable = 0;
    let mut last = (0, 0);
    while stable < 5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = (upstream.len(), reference.len());
        let idle =
            upstream.busy.load(Ordering::SeqCst) == 0 && reference.busy.load(Ordering::SeqCst) == 0;
        stable = if idle && now == last { stable + 1 } else { 0 };
        last = now;
    }

    let mut failures = String::new();
    for (i, (case, (via_proxy, direct))) in cases.iter().zip(&replies).enumerate() {
        let ip = IpAddr::V4(client_ip(i));
        if let Some(why) = check(case, &upstream.of(ip), &reference.of(ip), via_proxy, direct) {
            writeln!(failures, "{why}").unwrap();
        }
    }
    let strays: Vec<String> = upstream.log.lock().unwrap()[polled..]
        .iter()
        .filter(|(client, _)| client.is_none())
        .map(|(_, seen)| seen.to_string())
        .collect();
    if !strays.is_empty() {
        writeln!(
            failures,
            "the upstream parsed requests the proxy never wrote a head for: {}",
            strays.join("; ")
        )
        .unwrap();
    }
    proxy.shutdown().await;
    assert!(
        failures.is_empty(),
        "{} rows; failing:\n{failures}",
        cases.len()
    );
}
