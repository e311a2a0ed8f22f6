use super::parse::FEW_HEADERS;
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
    assert_eq!(
        (head.as_str(), enc),
        (
            "GET /v1/x?y=1 HTTP/1.1\r\na: b\r\ntransfer-encoding: chunked\r\n\r\n",
            Encoding::Chunked
        ),
        "a client's chunked body goes on whatever the method"
    );
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
