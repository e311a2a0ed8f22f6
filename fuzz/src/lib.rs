//! The properties the fuzz targets check, one function per target. Each takes the raw fuzz
//! input and panics when a property fails; the targets in `fuzz_targets/` call them, and
//! `tests/fuzz_corpora.rs` in the main crate includes this file and runs them on every seed in
//! `corpus/`, so that an input that once failed keeps being checked by `cargo test`.
//!
//! Inputs that need settings (an event cap, where to split a stream into frames) take them
//! from a header of [`HEADER`] bytes; the rest is the bytes under test.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};

use tokentap::http1::{
    BodyLength, Decoder, Encoding, Framing, LAST_CHUNK, Parsed, Step, content_length,
    encode_chunk_size, encode_request_head, parse_response_head,
};
use tokentap::proxy::fuzzing::{Cutter, inspect_both};
use tokentap::proxy::inspect::{inject_usage, inspect};
use tokentap::proxy::strip_hop_by_hop;
use tokentap::sse::fuzzing::{Answer, Scanner, held, reference, scanned};
use tokentap::sse::{
    ApiEvent, ApiKind, ApiUsage, ChoiceInfo, Dialect, EventKind, Finish, FinishReason, Output,
    SseParser, Usage, api_events, classify, classify_api,
};

/// Bytes of settings before the bytes under test: a mode or size selector, then a 16-bit seed
/// for where frames are split.
pub const HEADER: usize = 3;

/// The settings header and the bytes under test.
fn header(data: &[u8]) -> Option<(u8, u16, &[u8])> {
    if data.len() < HEADER {
        return None;
    }
    Some((
        data[0],
        u16::from_le_bytes([data[1], data[2]]),
        &data[HEADER..],
    ))
}

/// Split points for `len` bytes from `seed` (xorshift): pieces of 1 to 64 bytes, with the
/// seed's low bits also choosing some longer ones, so that both tiny and whole-event frames
/// come up. Seed 0 gives one byte per frame.
fn splits(seed: u16, len: usize) -> Vec<usize> {
    let mut cuts = Vec::new();
    if seed == 0 {
        cuts.extend(1..len);
        return cuts;
    }
    let mut x = u32::from(seed) | 0x1_0000;
    let mut at = 0;
    loop {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let piece = if x & 7 == 0 {
            (x >> 3) as usize % 512
        } else {
            (x >> 3) as usize % 64
        };
        at += piece + 1;
        if at >= len {
            return cuts;
        }
        cuts.push(at);
    }
}

/// `bytes` cut at `cuts`.
fn pieces<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &c in cuts {
        out.push(&bytes[start..c]);
        start = c;
    }
    out.push(&bytes[start..]);
    out
}

/// The frame splits every stream target tries: one frame, one byte per frame, and those of
/// the seed.
fn frame_splits(seed: u16, len: usize) -> [Vec<usize>; 3] {
    [Vec::new(), splits(0, len), splits(seed.max(1), len)]
}

// ---------------------------------------------------------------------------------------------
// 1. Request head and framing, and request-body inspection.

/// Target `request`: a request as a client sends it. Its head goes through what the proxy
/// applies before writing it upstream (hop-by-hop headers dropped, origin-form target, the
/// framing headers written from what is known of the body), and the head written must parse
/// back whole, with exactly one framing that matches what the encoder said. Its body is read
/// as inspection reads it: the scanner agrees with serde or declines, and a body rewritten to
/// ask for usage says the same plus `include_usage`, every other byte unchanged when
/// `stream_options` was absent.
///
/// Byte 0 chooses how the body is known (empty, known length, streamed); the rest is the
/// request.
pub fn request(data: &[u8]) {
    let Some((&mode, request)) = data.split_first() else {
        return;
    };
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(head_len)) = parsed.parse(request) else {
        // Not a whole head: the body checks still apply to the bytes as a body.
        request_body(request);
        return;
    };
    let body = &request[head_len..];
    request_body(body);
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return;
    };
    // hyper's server refuses what `http` cannot hold; such a request never reaches the proxy.
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let Ok(uri) = target.parse::<Uri>() else {
        return;
    };
    let mut headers = HeaderMap::new();
    for f in parsed.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(f.name.as_bytes()),
            HeaderValue::from_bytes(f.value),
        ) else {
            return;
        };
        headers.append(name, value);
    }
    strip_hop_by_hop(&mut headers);
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let length = match mode % 3 {
        0 => BodyLength::Empty,
        1 => BodyLength::Known(body.len() as u64),
        _ => BodyLength::Unknown,
    };
    let given = content_length(&headers).ok().flatten();
    let mut out = Vec::new();
    let encoding = encode_request_head(&method, target, &mut headers, length, &mut out);

    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut again = httparse::Request::new(&mut fields);
    let status = again.parse(&out);
    assert!(
        matches!(status, Ok(httparse::Status::Complete(n)) if n == out.len()),
        "the head written does not parse back whole: {status:?}\n{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(again.method, Some(method.as_str()));
    assert_eq!(again.path, Some(target));
    let count = |name: &str| {
        again
            .headers
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(name))
            .count()
    };
    let te = count("transfer-encoding");
    let mut written = HeaderMap::new();
    for f in again.headers.iter() {
        written.append(
            HeaderName::from_bytes(f.name.as_bytes()).expect("a name the encoder wrote"),
            HeaderValue::from_bytes(f.value).expect("a value the encoder wrote"),
        );
    }
    let cl = content_length(&written);
    match encoding {
        Encoding::Chunked => {
            assert_eq!(length, BodyLength::Unknown);
            assert_eq!(te, 1, "chunked needs exactly one Transfer-Encoding");
            assert_eq!(
                written.get(header::TRANSFER_ENCODING).unwrap().as_bytes(),
                b"chunked"
            );
            assert_eq!(count("content-length"), 0, "chunked with a Content-Length");
        }
        Encoding::Length(n) => {
            assert_eq!(te, 0, "a length and a Transfer-Encoding");
            assert_eq!(cl, Ok(Some(n)), "Content-Length is not the length framed");
            match length {
                BodyLength::Known(len) => assert_eq!(n, len),
                BodyLength::Unknown => assert_eq!(Some(n), given),
                BodyLength::Empty => panic!("an empty body framed by a length"),
            }
        }
        Encoding::Empty => {
            assert_eq!(length, BodyLength::Empty);
            assert_eq!(te, 0, "an empty body with a Transfer-Encoding");
        }
    }
}

/// The request-body half of [`request`].
fn request_body(body: &[u8]) {
    let (fast, slow) = inspect_both(body);
    if let Some(fast) = &fast {
        assert_eq!(
            Some(fast),
            slow.as_ref(),
            "the scanner and serde disagree on {:?}",
            String::from_utf8_lossy(body)
        );
    }
    let info = inspect(body);
    assert_eq!(info.parsed, slow.is_some());
    if let Some(slow) = &slow {
        assert_eq!(&info, slow);
    }
    let Some(out) = inject_usage(body, &info) else {
        return;
    };
    assert!(info.wants_usage_injection());
    // serde reads past invalid UTF-8 in strings it skips, so such a body is inspected and
    // rewritten; the rewrite keeps it exactly as valid as it was.
    if serde_json::from_slice::<serde_json::Value>(body).is_ok() {
        let value: serde_json::Value =
            serde_json::from_slice(&out).expect("a rewritten body is JSON");
        assert!(value.is_object());
    }
    let after = inspect(&out);
    assert!(after.parsed && after.include_usage && after.has_stream_options);
    assert!(!after.wants_usage_injection());
    assert_eq!(
        (&after.model, after.stream, after.max_tokens, after.n),
        (&info.model, info.stream, info.max_tokens, info.n),
        "the rewrite changed what the body says"
    );
    if !info.has_stream_options {
        const KEY: &[u8] = br#""stream_options":{"include_usage":true}"#;
        let at = out
            .windows(KEY.len())
            .position(|w| w == KEY)
            .expect("the key spliced in");
        let mut back = out[..at].to_vec();
        let rest = &out[at + KEY.len()..];
        back.extend_from_slice(rest.strip_prefix(b",").unwrap_or(rest));
        assert_eq!(back, body, "the splice changed other bytes");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. The chunked decoder, and the chunked encoding of request bodies.

/// What decoding a whole body gave: its data, its trailers, and how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    data: Vec<u8>,
    trailers: Option<Vec<(String, Vec<u8>)>>,
    end: Ending,
}

#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// The body ended; this many bytes of the input came after it.
    End(usize),
    /// A framing error.
    Error,
    /// The input ended first; whether the decoder accepts a close there.
    Eof(bool),
}

/// Decodes `input` given in `frames` as the upstream client does: unconsumed bytes are kept
/// and the next read appended to them. Checks what every call returns.
fn decode(framing: Framing, input: &[u8], frames: &[&[u8]]) -> Decoded {
    let mut decoder = Decoder::new(framing);
    let mut buf: Vec<u8> = Vec::new();
    let mut data = Vec::new();
    let mut fed = 0;
    let mut next = frames.iter();
    loop {
        let (step, used) = match decoder.decode(&buf) {
            Ok(s) => s,
            Err(_) => {
                return Decoded {
                    data,
                    trailers: None,
                    end: Ending::Error,
                };
            }
        };
        assert!(used <= buf.len(), "consumed {used} of {} bytes", buf.len());
        match step {
            Step::Data { start, end } => {
                assert!(
                    start < end && end <= used,
                    "data {start}..{end}, consumed {used}"
                );
                data.extend_from_slice(&buf[start..end]);
                buf.drain(..used);
                if decoder.is_end() {
                    return Decoded {
                        data,
                        trailers: None,
                        end: Ending::End(buf.len() + input.len() - fed),
                    };
                }
            }
            Step::Trailers(t) => {
                assert!(decoder.is_end());
                buf.drain(..used);
                let mut trailers: Vec<_> = t
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                    .collect();
                trailers.sort();
                return Decoded {
                    data,
                    trailers: Some(trailers),
                    end: Ending::End(buf.len() + input.len() - fed),
                };
            }
            Step::End => {
                assert!(decoder.is_end());
                buf.drain(..used);
                return Decoded {
                    data,
                    trailers: None,
                    end: Ending::End(buf.len() + input.len() - fed),
                };
            }
            Step::More => {
                buf.drain(..used);
                // Only a chunk-size line or a trailer section is held unconsumed; a size line
                // at most 4 KiB (the client caps the rest at its read buffer).
                match next.next() {
                    Some(frame) => {
                        buf.extend_from_slice(frame);
                        fed += frame.len();
                    }
                    None => {
                        return Decoded {
                            data,
                            trailers: None,
                            end: Ending::Eof(decoder.eof().is_ok()),
                        };
                    }
                }
            }
        }
    }
}

/// Target `chunked`: byte 0 even: the bytes after the header are a response body framed by
/// byte 0's choice (chunked, a length, or until close), and decoding them gives the same data,
/// trailers and ending however they are split into reads. Byte 0 odd: the bytes are cut into
/// chunks as the proxy encodes a streamed request body, and decoding the encoding gives them
/// back exactly, the body ending at its last chunk.
pub fn chunked(data: &[u8]) {
    let Some((mode, seed, input)) = header(data) else {
        return;
    };
    if mode % 2 == 0 {
        let framing = match (mode / 2) % 4 {
            0 | 1 => Framing::Chunked,
            2 => Framing::Length(u64::from(seed) % 300),
            _ => Framing::Close,
        };
        let [one, bytes, seeded] = frame_splits(seed, input.len());
        let whole = decode(framing, input, &pieces(input, &one));
        for cuts in [bytes, seeded] {
            let split = decode(framing, input, &pieces(input, &cuts));
            assert_eq!(
                whole,
                split,
                "{framing:?} read whole and split at {cuts:?}: {:?}",
                String::from_utf8_lossy(input)
            );
        }
        if let Framing::Length(n) = framing {
            let n = n as usize;
            if input.len() >= n {
                assert_eq!(whole.data, &input[..n]);
                assert_eq!(whole.end, Ending::End(input.len() - n));
            } else {
                assert_eq!(whole.data, input);
                assert_eq!(whole.end, Ending::Eof(n == 0));
            }
        }
        return;
    }
    // The encoding side: chunks as the proxy writes them.
    let mut wire = Vec::new();
    for chunk in pieces(input, &splits(seed.max(1), input.len())) {
        if chunk.is_empty() {
            continue;
        }
        encode_chunk_size(chunk.len(), &mut wire);
        wire.extend_from_slice(chunk);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(LAST_CHUNK);
    for cuts in frame_splits(seed.rotate_left(7), wire.len()) {
        let got = decode(Framing::Chunked, &wire, &pieces(&wire, &cuts));
        assert_eq!(got.data, input, "the chunked encoding did not decode back");
        assert_eq!(got.trailers, None);
        assert_eq!(got.end, Ending::End(0));
    }
    // Any chunk size writes a line that reads back as that size.
    let size = (usize::from(seed) << (mode % 48)) | 1;
    let mut line = Vec::new();
    encode_chunk_size(size, &mut line);
    let hex = std::str::from_utf8(&line[..line.len() - 2]).expect("hex digits");
    assert_eq!(usize::from_str_radix(hex, 16), Ok(size), "{hex}");
    assert_eq!(
        Decoder::new(Framing::Chunked).decode(&line).ok(),
        Some((Step::More, line.len())),
        "{hex}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. The response head.

/// Target `response_head`: byte 0 chooses the request method; the rest is what the upstream
/// sent. A head that parses is stable (its own bytes parse to the same), no shorter start of
/// it is a head, and its framing follows RFC 9112 §6: no body after `HEAD`, 204 or 304;
/// `Transfer-Encoding` wins over `Content-Length`, which is then dropped; a connection is
/// reused only when the body's end is known. The body after it decodes without panicking.
pub fn response_head(data: &[u8]) {
    let Some((&m, buf)) = data.split_first() else {
        return;
    };
    let method = match m % 5 {
        0 => Method::GET,
        1 => Method::POST,
        2 => Method::HEAD,
        3 => Method::CONNECT,
        _ => Method::OPTIONS,
    };
    let parsed = parse_response_head(buf, &method);
    let (len, head) = match parsed {
        Ok(Parsed::Head(len, head)) => (len, head),
        Ok(Parsed::Informational(len)) => {
            assert!(len > 0 && len <= buf.len());
            assert!(matches!(
                parse_response_head(&buf[..len], &method),
                Ok(Parsed::Informational(n)) if n == len
            ));
            return;
        }
        Ok(Parsed::Partial) | Err(_) => return,
    };
    assert!(len > 0 && len <= buf.len());
    match parse_response_head(&buf[..len], &method) {
        Ok(Parsed::Head(n, again)) => {
            assert_eq!(n, len);
            assert_eq!(again.parts.status, head.parts.status);
            assert_eq!(again.parts.headers, head.parts.headers);
            assert_eq!(again.framing, head.framing);
            assert_eq!(again.keep_alive, head.keep_alive);
        }
        other => panic!("the head's own bytes parse to {other:?}"),
    }
    for k in [len - 1, len / 2] {
        let prefix = parse_response_head(&buf[..k], &method);
        assert!(
            matches!(prefix, Ok(Parsed::Partial)),
            "a start of a head parsed as {prefix:?}"
        );
    }
    let h = &head.parts.headers;
    let status = head.parts.status;
    assert!(!status.is_informational());
    let tunnel = method == Method::CONNECT && status.is_success();
    if method == Method::HEAD || status.as_u16() == 204 || status.as_u16() == 304 || tunnel {
        assert_eq!(head.framing, Framing::Length(0));
    } else if h.contains_key(header::TRANSFER_ENCODING) {
        assert!(matches!(head.framing, Framing::Chunked | Framing::Close));
    }
    if h.contains_key(header::TRANSFER_ENCODING) {
        assert!(
            !h.contains_key(header::CONTENT_LENGTH),
            "a stale length kept"
        );
    }
    if tunnel {
        assert!(!head.keep_alive, "a tunnel reused for HTTP");
    }
    // What the upstream sent, before the parser dropped anything.
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut raw = httparse::Response::new(&mut fields);
    if raw.parse(&buf[..len]).is_ok() {
        let has = |name: &str| {
            raw.headers
                .iter()
                .any(|f| f.name.eq_ignore_ascii_case(name))
        };
        if has("transfer-encoding") && has("content-length") {
            assert!(!head.keep_alive, "a message framed both ways reused");
        }
    }
    if head.framing == Framing::Close {
        assert!(
            !head.keep_alive,
            "a body read until close on a reused connection"
        );
    }
    if let Framing::Length(n) = head.framing
        && n > 0
    {
        assert_eq!(content_length(h), Ok(Some(n)));
    }
    let body = &buf[len..];
    decode(head.framing, body, &[body]);
}

// ---------------------------------------------------------------------------------------------
// 4. The SSE splitter and classifier.

/// One event as the parser reported it, with its end as an offset in the whole stream.
#[derive(Debug, PartialEq, Eq)]
struct Ev {
    kind: EventKind,
    choices: Vec<ChoiceInfo>,
    usage: Option<Usage>,
    end: usize,
    id: Option<String>,
    model: Option<String>,
    finish: Option<Finish>,
    data: Vec<u8>,
}

/// The cap an input's byte 0 chooses: from a few bytes, to exercise the cap, to the default.
fn max_event(selector: u8) -> usize {
    match selector % 8 {
        0 => SseParser::DEFAULT_MAX_EVENT,
        s => 8 << (s + selector / 64),
    }
}

/// Feeds `stream`, cut into `frames`, to a parser capped at `max`, checking what it holds
/// after each frame.
fn events(max: usize, stream: &[u8], frames: &[&[u8]]) -> (Vec<Ev>, bool) {
    events_in(Dialect::Chat, max, stream, frames)
}

/// [`events`] with a parser that reads `dialect`'s events.
fn events_in(dialect: Dialect, max: usize, stream: &[u8], frames: &[&[u8]]) -> (Vec<Ev>, bool) {
    let mut parser = SseParser::with_max_event(max).with_dialect(dialect);
    let mut out = Vec::new();
    let mut at = 0;
    for frame in frames {
        parser.feed(frame, |e| {
            assert!(e.end <= frame.len());
            // An event whose blank line ends in `\r` at the end of a frame is reported before
            // the `\n` that may follow in the next frame; read in one frame, it ends after it.
            let mut end = at + e.end;
            if e.end == frame.len() && frame.ends_with(b"\r") && stream.get(end) == Some(&b'\n') {
                end += 1;
            }
            out.push(Ev {
                kind: e.kind,
                choices: e.choices.to_vec(),
                usage: e.usage,
                end,
                id: e.id.map(str::to_owned),
                model: e.model.map(str::to_owned),
                finish: e.finish,
                data: e.data.to_vec(),
            });
        });
        at += frame.len();
        let [line, data, prefix] = held(&parser);
        // Each is at most one event's bytes, grown by doubling (plus the room the scanner
        // keeps for a longer content string).
        let bound = 2 * max + 64;
        assert!(
            line <= bound && data <= bound && prefix <= bound + 256,
            "holds {line} + {data} + {prefix} bytes with events capped at {max}"
        );
    }
    (out, parser.has_partial_event())
}

/// Target `sse`: byte 0 chooses the event cap, bytes 1–2 the split; the rest is a stream. Any
/// split of the stream into frames gives the same events as one frame, each event is
/// classified as its data alone is (whatever the parser remembers of earlier events), no event
/// is longer than the cap, and what the parser holds stays within a small multiple of the cap.
pub fn sse(data: &[u8]) {
    let Some((sel, seed, stream)) = header(data) else {
        return;
    };
    let max = max_event(sel);
    let [one, bytes, seeded] = frame_splits(seed, stream.len());
    let whole = events(max, stream, &pieces(stream, &one));
    for cuts in [bytes, seeded] {
        let split = events(max, stream, &pieces(stream, &cuts));
        assert_eq!(
            whole,
            split,
            "one frame and split at {cuts:?}: {:?}",
            String::from_utf8_lossy(stream)
        );
    }
    let mut choices = Vec::new();
    let mut prev = 0;
    for e in &whole.0 {
        assert!(e.end > prev && e.end <= stream.len());
        if e.kind == EventKind::Oversized {
            assert!(
                e.end - prev > max,
                "an event of {} bytes passed over",
                e.end - prev
            );
        } else if e.kind == EventKind::NoData {
            assert!(e.data.is_empty() && e.choices.is_empty() && e.usage.is_none());
        } else {
            assert!(e.data.len() <= max);
            let c = classify(&e.data, &mut choices);
            assert_eq!(
                (c.kind, c.usage, c.id, c.model),
                (e.kind, e.usage, e.id.as_deref(), e.model.as_deref()),
                "classified differently in the stream: {:?}",
                String::from_utf8_lossy(&e.data)
            );
            if e.kind == EventKind::Token {
                assert_eq!(choices, e.choices);
            } else {
                assert!(e.choices.is_empty());
            }
        }
        prev = e.end;
    }
}

// ---------------------------------------------------------------------------------------------
// 5. The fast JSON scanner, against serde.

fn same(fast: &Answer<'_>, json: &[u8]) {
    let slow = reference(json);
    assert_eq!(
        fast,
        &slow,
        "the scanner and serde disagree on {:?}",
        String::from_utf8_lossy(json)
    );
}

/// Target `json_scan`: byte 0 even: the rest is one event's data, and the scanner gives
/// serde's answer or declines. Byte 0 odd: the rest is several payloads separated by `0xff`
/// (never in JSON), read in turn by one scanner that remembers the earlier ones, as a stream's
/// parser does: each answer, from a remembered start or from a template, is serde's.
pub fn json_scan(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let json = rest.trim_ascii();
        if let Some(fast) = scanned(json) {
            same(&fast, json);
        }
        return;
    }
    let mut scanner = Scanner::new();
    for payload in rest.split(|&b| b == 0xff) {
        let json = payload.trim_ascii();
        if let Some(t) = scanner.templated(json) {
            same(&t, json);
        }
        if let Some(fast) = scanner.scan(json) {
            same(&fast, json);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 6. The usage cutter.

/// Target `usage_cut`: byte 0 chooses the event cap, bytes 1–2 the split; the rest is a stream.
/// What the client receives is the stream minus exactly its usage events (each from the end of
/// the event before it), however the stream is split into frames, and the cutter never holds
/// more than twice the cap plus one frame.
pub fn usage_cut(data: &[u8]) {
    let Some((sel, seed, stream)) = header(data) else {
        return;
    };
    let max = max_event(sel);
    let (evs, _) = events(max, stream, &[stream]);
    let mut want = Vec::with_capacity(stream.len());
    let mut prev = 0;
    for e in &evs {
        if e.kind != EventKind::Usage {
            want.extend_from_slice(&stream[prev..e.end]);
        }
        prev = e.end;
    }
    want.extend_from_slice(&stream[prev..]);
    for cuts in frame_splits(seed, stream.len()) {
        let mut cutter = Cutter::new(max);
        let mut got: Vec<u8> = Vec::with_capacity(stream.len());
        for frame in pieces(stream, &cuts) {
            let out: Bytes = cutter.frame(frame);
            got.extend_from_slice(&out);
            assert!(
                cutter.held() <= 2 * max + frame.len(),
                "holds {} bytes with events capped at {max}",
                cutter.held()
            );
        }
        got.extend_from_slice(&cutter.finish());
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "split at {cuts:?}"
        );
        assert_eq!(got, want);
    }
}

// ---------------------------------------------------------------------------------------------
// 7. The Responses and Messages readers.

/// Target `responses`: byte 0 chooses the event cap, bytes 1–2 the split; the rest is a
/// `/v1/responses` stream. See [`api_stream`].
pub fn responses(data: &[u8]) {
    api_stream(Dialect::Responses, data);
}

/// Target `messages`: byte 0 chooses the event cap, bytes 1–2 the split; the rest is a
/// `/v1/messages` stream. See [`api_stream`].
pub fn messages(data: &[u8]) {
    api_stream(Dialect::Messages, data);
}

/// A stream of `dialect`'s events: any split into frames gives the same events as one frame,
/// each event is classified as its data alone is, what the parser holds stays bounded, and
/// each event's reading is consistent with itself and, when the JSON is unambiguous (no
/// escapes, no key given twice), is what a plain `serde_json::Value` reading of the API's
/// rules gives ([`model`]).
fn api_stream(dialect: Dialect, data: &[u8]) {
    let Some((sel, seed, stream)) = header(data) else {
        return;
    };
    let max = max_event(sel);
    let [one, bytes, seeded] = frame_splits(seed, stream.len());
    let whole = events_in(dialect, max, stream, &pieces(stream, &one));
    for cuts in [bytes, seeded] {
        let split = events_in(dialect, max, stream, &pieces(stream, &cuts));
        assert_eq!(
            whole,
            split,
            "one frame and split at {cuts:?}: {:?}",
            String::from_utf8_lossy(stream)
        );
    }
    let mut choices = Vec::new();
    for e in &whole.0 {
        if matches!(e.kind, EventKind::Oversized | EventKind::NoData) && e.data.is_empty() {
            assert!(e.choices.is_empty() && e.usage.is_none() && e.finish.is_none());
            continue;
        }
        assert!(e.data.len() <= max);
        let c = classify_api(dialect, &e.data, &mut choices);
        assert_eq!(
            (c.kind, c.usage, c.id, c.model, c.finish),
            (
                e.kind,
                e.usage,
                e.id.as_deref(),
                e.model.as_deref(),
                e.finish
            ),
            "classified differently in the stream: {:?}",
            String::from_utf8_lossy(&e.data)
        );
        if e.kind == EventKind::Token {
            assert_eq!(choices, e.choices);
        } else {
            assert!(e.choices.is_empty());
        }
        api_event(dialect, &e.data);
    }
    // Each line of the stream read as one event's data too: most inputs are not well-framed.
    for line in stream.split(|&b| b == b'\n') {
        api_event(dialect, line.strip_prefix(b"data:").unwrap_or(line));
    }
}

/// The checks of one event's data.
fn api_event(dialect: Dialect, payload: &[u8]) {
    let e = match dialect {
        Dialect::Responses => api_events::responses(payload),
        Dialect::Messages => api_events::messages(payload),
        Dialect::Chat => return,
    };
    let mut choices = Vec::new();
    let c = e.classified(&mut choices);
    match e.kind {
        ApiKind::Output(o) => {
            assert_eq!(c.kind, EventKind::Token);
            assert_eq!(
                choices,
                [ChoiceInfo {
                    index: 0,
                    output: true,
                    answer: o == Output::Content,
                    reasoning: o == Output::Reasoning,
                    finish_reason: None,
                }]
            );
        }
        _ => assert!(choices.is_empty()),
    }
    if let Some(f) = e.finish {
        let (kind, words): (ApiKind, &[(&str, FinishReason)]) = match dialect {
            Dialect::Responses => (ApiKind::End, RESPONSES_FINISH),
            _ => (ApiKind::NonOutput, MESSAGES_FINISH),
        };
        assert_eq!(e.kind, kind, "a finish on {:?}", e.kind);
        // A word of the table with chat's word for it, `other` for anything else, or a
        // completed response that called a tool.
        let tool = dialect == Dialect::Responses && f.native == "completed";
        assert!(
            words.contains(&(f.native, f.reason))
                || (f.native, f.reason) == ("other", FinishReason::Other)
                || (tool && f.reason == FinishReason::ToolCalls),
            "{f:?}"
        );
    }
    if let Some(u) = e.usage {
        assert_eq!(u.usage().prompt_tokens, u.input_tokens);
        if let (Some(input), Some(cached)) = (u.input_tokens, u.cached_tokens)
            && dialect == Dialect::Messages
        {
            assert!(
                input >= cached,
                "cached tokens are part of the prompt: {u:?}"
            );
        }
    }
    let json = payload.trim_ascii();
    if !json.contains(&b'\\') && !has_duplicate_keys(json) {
        let want = model(dialect, json);
        assert_eq!(
            e,
            want,
            "the reader and the model disagree on {:?}",
            String::from_utf8_lossy(json)
        );
    }
}

/// Responses' own words for why a response ended, and chat's for each.
const RESPONSES_FINISH: &[(&str, FinishReason)] = &[
    ("completed", FinishReason::Stop),
    ("max_output_tokens", FinishReason::Length),
    ("content_filter", FinishReason::Other),
    ("incomplete", FinishReason::Other),
    ("failed", FinishReason::Other),
    ("cancelled", FinishReason::Other),
];

/// Anthropic's stop reasons, and chat's word for each.
const MESSAGES_FINISH: &[(&str, FinishReason)] = &[
    ("end_turn", FinishReason::Stop),
    ("stop_sequence", FinishReason::Stop),
    ("max_tokens", FinishReason::Length),
    ("model_context_window_exceeded", FinishReason::Length),
    ("tool_use", FinishReason::ToolCalls),
    ("pause_turn", FinishReason::Other),
    ("refusal", FinishReason::Other),
];

/// True when some object in `json` (which must parse) names a key twice; `true` too for text
/// that is not JSON, which the model does not read.
fn has_duplicate_keys(json: &[u8]) -> bool {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    struct Unique;
    impl<'de> Deserialize<'de> for Unique {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(Unique)
        }
    }
    impl<'de> Visitor<'de> for Unique {
        type Value = Unique;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_unit<E>(self) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Unique, A::Error> {
            while a.next_element::<Unique>()?.is_some() {}
            Ok(Unique)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Unique, A::Error> {
            let mut keys = std::collections::HashSet::new();
            while let Some(k) = a.next_key::<String>()? {
                if !keys.insert(k) {
                    return Err(serde::de::Error::custom("duplicate key"));
                }
                a.next_value::<Unique>()?;
            }
            Ok(Unique)
        }
    }
    serde_json::from_slice::<Unique>(json).is_err()
}

/// The API's rules (`docs/METRICS.md`, their sections) read from a `serde_json::Value`: the
/// reference for JSON without escapes or repeated keys.
fn model(dialect: Dialect, json: &[u8]) -> ApiEvent<'_> {
    use serde_json::Value;
    let mut out = ApiEvent {
        kind: ApiKind::Other,
        usage: None,
        id: None,
        model: None,
        finish: None,
    };
    let Ok(v) = serde_json::from_slice::<Value>(json) else {
        return out;
    };
    let Some(name) = v.get("type").and_then(Value::as_str) else {
        return out;
    };
    let count = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    let obj = |v: Option<&Value>| v.filter(|v| v.is_object()).cloned();
    // Borrowed strings of the input: without escapes, a string's text is in the bytes.
    let text = |s: Option<&str>| -> Option<&[u8]> {
        let s = s?;
        let at = json.windows(s.len() + 2).position(|w| {
            w[0] == b'"' && &w[1..=s.len()] == s.as_bytes() && w[s.len() + 1] == b'"'
        })?;
        Some(&json[at + 1..at + 1 + s.len()])
    };
    let borrowed = |s: Option<&str>| text(s).map(|b| std::str::from_utf8(b).expect("utf-8"));
    out.kind = ApiKind::NonOutput;
    match dialect {
        Dialect::Responses => {
            let non_empty = v
                .get("delta")
                .and_then(Value::as_str)
                .is_some_and(|d| !d.is_empty());
            let output = |o| {
                if non_empty {
                    ApiKind::Output(o)
                } else {
                    ApiKind::NonOutput
                }
            };
            out.kind = match name {
                "response.output_text.delta" => output(Output::Content),
                "response.reasoning_text.delta" => output(Output::Reasoning),
                "response.function_call_arguments.delta" => output(Output::ToolCall),
                "response.completed" | "response.incomplete" => ApiKind::End,
                "error" | "response.failed" => ApiKind::Error,
                _ => ApiKind::NonOutput,
            };
            let Some(r) = obj(v.get("response")) else {
                return out;
            };
            out.id = borrowed(r.get("id").and_then(Value::as_str));
            out.model = borrowed(r.get("model").and_then(Value::as_str));
            out.usage = obj(r.get("usage")).map(|u| ApiUsage {
                input_tokens: count(&u, "input_tokens"),
                output_tokens: count(&u, "output_tokens"),
                cached_tokens: obj(u.get("input_tokens_details"))
                    .and_then(|d| count(&d, "cached_tokens")),
                reasoning_tokens: obj(u.get("output_tokens_details"))
                    .and_then(|d| count(&d, "reasoning_tokens")),
            });
            if out.kind == ApiKind::End {
                let tool = r
                    .get("output")
                    .and_then(Value::as_array)
                    .is_some_and(|items| {
                        items
                            .iter()
                            .any(|i| i.get("type").and_then(Value::as_str) == Some("function_call"))
                    });
                let reason = obj(r.get("incomplete_details"))
                    .and_then(|d| d.get("reason").and_then(Value::as_str).map(str::to_owned));
                out.finish = match r.get("status").and_then(Value::as_str) {
                    None | Some("in_progress" | "queued") => None,
                    Some("completed") if tool => Some(Finish {
                        reason: FinishReason::ToolCalls,
                        native: "completed",
                    }),
                    Some("incomplete") => {
                        let native = match reason.as_deref() {
                            Some("max_output_tokens") => "max_output_tokens",
                            Some("content_filter") => "content_filter",
                            _ => "incomplete",
                        };
                        Some(finish_of(RESPONSES_FINISH, native))
                    }
                    Some(status) => Some(finish_of(RESPONSES_FINISH, status)),
                };
            }
        }
        _ => {
            let usage = |u: &Value| {
                let (cached, created) = (
                    count(u, "cache_read_input_tokens"),
                    count(u, "cache_creation_input_tokens"),
                );
                ApiUsage {
                    input_tokens: count(u, "input_tokens").map(|n| {
                        n.saturating_add(cached.unwrap_or(0))
                            .saturating_add(created.unwrap_or(0))
                    }),
                    output_tokens: count(u, "output_tokens"),
                    cached_tokens: cached,
                    reasoning_tokens: None,
                }
            };
            match name {
                "content_block_delta" => {
                    let Some(d) = obj(v.get("delta")) else {
                        return out;
                    };
                    let (o, field) = match d.get("type").and_then(Value::as_str) {
                        Some("text_delta") => (Output::Content, "text"),
                        Some("thinking_delta") => (Output::Reasoning, "thinking"),
                        Some("input_json_delta") => (Output::ToolCall, "partial_json"),
                        _ => return out,
                    };
                    if d.get(field)
                        .and_then(Value::as_str)
                        .is_some_and(|t| !t.is_empty())
                    {
                        out.kind = ApiKind::Output(o);
                    }
                }
                "message_start" => {
                    if let Some(m) = obj(v.get("message")) {
                        out.id = borrowed(m.get("id").and_then(Value::as_str));
                        out.model = borrowed(m.get("model").and_then(Value::as_str));
                        out.usage = obj(m.get("usage")).map(|u| ApiUsage {
                            output_tokens: None,
                            ..usage(&u)
                        });
                    }
                }
                "message_delta" => {
                    out.usage = obj(v.get("usage")).map(|u| usage(&u));
                    out.finish = obj(v.get("delta"))
                        .and_then(|d| {
                            d.get("stop_reason")
                                .and_then(Value::as_str)
                                .map(str::to_owned)
                        })
                        .map(|r| finish_of(MESSAGES_FINISH, &r));
                }
                "message_stop" => out.kind = ApiKind::End,
                "ping" => out.kind = ApiKind::Ping,
                "error" => out.kind = ApiKind::Error,
                _ => {}
            }
        }
    }
    out
}

/// The finish a table gives `native`, `other` when it is not there.
fn finish_of(table: &[(&'static str, FinishReason)], native: &str) -> Finish {
    let (native, reason) = table
        .iter()
        .find(|(n, _)| *n == native)
        .copied()
        .unwrap_or(("other", FinishReason::Other));
    Finish { reason, native }
}

/// `accept`: reading a scraper's `Accept` header (which format `/metrics` answers in) never
/// panics, and picks OpenMetrics only for a UTF-8 header that names it.
pub fn accept(data: &[u8]) {
    if tokentap::telemetry::openmetrics::wanted(Some(data)) {
        let text =
            std::str::from_utf8(data).expect("OpenMetrics picked for a header that is not UTF-8");
        assert!(
            text.to_ascii_lowercase()
                .contains("application/openmetrics-text"),
            "OpenMetrics picked for {text:?}"
        );
    }
}
