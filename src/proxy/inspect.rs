//! Reading a chat/completions request body for the fields telemetry needs, and asking for usage.
//!
//! Inspection never makes the proxy stricter than the upstream: a body that is not JSON, or
//! whose fields have unexpected types, is forwarded unchanged and only labelled `none`.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use std::borrow::Cow;

use crate::route::RequestInfo;
use crate::sse::scan::Scan;

#[derive(Debug, Default, Deserialize)]
struct Body<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    /// Absent: `None`; `null`: `Some(None)`.
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<Option<StreamOptions>>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    /// The Responses API's name for it.
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
    #[serde(default)]
    continuous_usage_stats: Option<bool>,
}

/// Reads the fields telemetry needs from a request body, once per request before it is sent
/// on: with the classifier's JSON scanner when the body has the usual shape (1–2k
/// instructions fewer than serde's walk of a short chat request), else with serde, whose
/// answer is the reference either way.
pub fn inspect(body: &[u8]) -> RequestInfo {
    match scan(body).map_or_else(|| serde_json::from_slice(body).ok(), Some) {
        Some(b) => info(b),
        None => RequestInfo {
            n: 1,
            ..RequestInfo::default()
        },
    }
}

/// What the scanner alone reads in a body; `None` where it declines.
pub(super) fn scanned(body: &[u8]) -> Option<RequestInfo> {
    scan(body).map(info)
}

/// What serde alone reads in a body (the reference); `None` where it refuses.
pub(super) fn by_serde(body: &[u8]) -> Option<RequestInfo> {
    serde_json::from_slice(body).ok().map(info)
}

/// What a body that parsed says.
fn info(b: Body<'_>) -> RequestInfo {
    let has_stream_options = b.stream_options.is_some();
    let so = b.stream_options.as_ref().and_then(Option::as_ref);
    RequestInfo {
        parsed: true,
        model: b.model.map(|m| m.into_owned()),
        stream: b.stream.unwrap_or(false),
        include_usage: so.and_then(|s| s.include_usage).unwrap_or(false),
        continuous_usage: so.and_then(|s| s.continuous_usage_stats).unwrap_or(false),
        has_stream_options,
        max_tokens: b
            .max_completion_tokens
            .or(b.max_tokens)
            .or(b.max_output_tokens),
        n: b.n.unwrap_or(1),
    }
}

/// [`Body`] as serde reads it, from a JSON object whose keys are plain ASCII, whose `model` is
/// `null` or a string without escapes, and whose numbers of interest are plain integers; `None`
/// for anything else (and for what serde refuses), which serde then reads.
fn scan(body: &[u8]) -> Option<Body<'_>> {
    let mut s = Scan::new(body);
    let mut b = Body::default();
    let keys: [&[u8]; 7] = [
        b"model",
        b"stream",
        b"stream_options",
        b"max_tokens",
        b"max_completion_tokens",
        b"n",
        b"max_output_tokens",
    ];
    s.fields(&keys, 1, |s, k| {
        match k {
            0 => b.model = opt_str(s, body)?.map(Cow::Borrowed),
            1 => b.stream = opt_bool(s)?,
            2 => b.stream_options = Some(stream_options(s)?),
            3 => b.max_tokens = s.opt_uint()?,
            4 => b.max_completion_tokens = s.opt_uint()?,
            5 => b.n = s.opt_uint()?.map(u32::try_from).transpose().ok()?,
            _ => b.max_output_tokens = s.opt_uint()?,
        }
        Some(())
    })?;
    s.at_end().then_some(b)
}

/// `null` or a string without escapes that is UTF-8.
fn opt_str<'a>(s: &mut Scan<'a>, body: &'a [u8]) -> Option<Option<&'a str>> {
    match s.peek()? {
        b'n' => return s.literal(b"null").map(|()| None),
        b'"' => {}
        _ => return None,
    }
    let (start, end, plain) = s.string()?;
    if !plain {
        return None;
    }
    std::str::from_utf8(&body[start..end]).ok().map(Some)
}

/// `null`, `true` or `false`.
fn opt_bool(s: &mut Scan<'_>) -> Option<Option<bool>> {
    match s.peek()? {
        b'n' => s.literal(b"null").map(|()| None),
        b't' => s.literal(b"true").map(|()| Some(true)),
        b'f' => s.literal(b"false").map(|()| Some(false)),
        _ => None,
    }
}

/// `stream_options`: `null` or an object.
fn stream_options(s: &mut Scan<'_>) -> Option<Option<StreamOptions>> {
    if s.peek()? == b'n' {
        return s.literal(b"null").map(|()| None);
    }
    // Anything but an object is left to serde by `fields`.
    let mut so = StreamOptions::default();
    s.fields(&[b"include_usage", b"continuous_usage_stats"], 2, |s, k| {
        let v = opt_bool(s)?;
        if k == 0 {
            so.include_usage = v;
        } else {
            so.continuous_usage_stats = v;
        }
        Some(())
    })?;
    Some(Some(so))
}

/// Deserializes a field that is present (even as `null`) into `Some`.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl RequestInfo {
    /// Whether the proxy should ask the upstream for usage on the client's behalf: a stream
    /// that did not ask for usage itself. A client that asked for continuous usage without
    /// `include_usage` is left alone (adding it would change every chunk it receives).
    pub fn wants_usage_injection(&self) -> bool {
        self.parsed && self.stream && !self.include_usage && !self.continuous_usage
    }
}

/// Returns the body with `"stream_options": {"include_usage": true}` added, or `None` when it
/// cannot be done without changing anything else. A body without `stream_options` gets the key
/// spliced in after its opening brace, every other byte unchanged.
pub fn inject_usage(body: &[u8], info: &RequestInfo) -> Option<Bytes> {
    if !info.wants_usage_injection() {
        return None;
    }
    if info.has_stream_options {
        // stream_options is there but without include_usage: set it inside the object.
        let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let obj = value.as_object_mut()?;
        let so = obj
            .entry("stream_options")
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if so.is_null() {
            *so = serde_json::Value::Object(Default::default());
        }
        so.as_object_mut()?
            .insert("include_usage".to_owned(), serde_json::Value::Bool(true));
        return serde_json::to_vec(&value).ok().map(Bytes::from);
    }
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let empty = body[open + 1..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'}');
    const KEY: &[u8] = br#""stream_options":{"include_usage":true}"#;
    let mut out = BytesMut::with_capacity(body.len() + KEY.len() + 1);
    out.put_slice(&body[..=open]);
    out.put_slice(KEY);
    if !empty {
        out.put_u8(b',');
    }
    out.put_slice(&body[open + 1..]);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields() {
        let i = inspect(
            br#"{"model":"m\u00e9","messages":[],"stream":true,"max_tokens":5,"max_completion_tokens":7,"n":2,"stream_options":{"continuous_usage_stats":true}}"#,
        );
        assert!(i.parsed);
        assert_eq!(i.model.as_deref(), Some("m\u{e9}"));
        assert!(i.stream);
        assert!(!i.include_usage);
        assert!(i.continuous_usage);
        assert!(i.has_stream_options);
        assert_eq!(i.max_tokens, Some(7));
        assert_eq!(i.n, 2);
        assert!(!i.wants_usage_injection());
    }

    #[test]
    fn reads_responses_and_messages_bodies() {
        let r = inspect(br#"{"model":"m","input":"hi","stream":true,"max_output_tokens":9}"#);
        assert_eq!((r.model.as_deref(), r.stream), (Some("m"), true));
        assert_eq!(r.max_tokens, Some(9));
        let m = inspect(
            br#"{"model":"c","max_tokens":64,"messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        );
        assert_eq!((m.model.as_deref(), m.stream), (Some("c"), true));
        assert_eq!(m.max_tokens, Some(64));
    }

    /// The scanner reads every body it accepts as serde does, mutated ones included, and it
    /// accepts the usual shapes.
    #[test]
    fn the_scanner_agrees_with_serde() {
        let bodies: [&[u8]; 12] = [
            br#"{"model":"m","input":[{"role":"user","content":"hi"}],"max_output_tokens":9,"stream":true,"reasoning":{"effort":"low"}}"#,
            br#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"say \"hi\"\n"}],"max_tokens":16,"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":false}}"#,
            br#"{"model":"m","prompt":"once upon a time","max_completion_tokens":7,"max_tokens":5,"n":2,"stream":false,"temperature":0.7,"stop":["\n"],"logit_bias":{"50256":-100}}"#,
            b" {\n \"model\" : null , \"stream\" : null , \"stream_options\" : null , \"n\" : null , \"max_tokens\" : null } \r\n",
            br#"{"stream_options":{"x":[1,{"y":[]}],"include_usage":null},"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]}"#,
            "{\"model\":\"m\u{e9}\",\"messages\":[{\"content\":\"\u{1f600} \\ud83d\\ude00\"}]}".as_bytes(),
            br#"{}"#,
            br#"{"n":4294967295,"max_tokens":18446744073709551615}"#,
            br#"{"n":4294967296}"#,
            br#"{"max_tokens":-1,"stream":"yes","max_completion_tokens":1.0}"#,
            // One byte from a field given twice (`x` → `n`), and a field given twice.
            br#"{"n":1,"x":2}"#,
            br#"{"stream_options":{"include_usage":true},"stream_options":null}"#,
        ];
        let mut accepted = 0;
        let mut checked = 0;
        for body in bodies {
            let mut variants = vec![body.to_vec()];
            for at in 0..body.len() {
                variants.push(body[..at].to_vec());
                for c in [
                    b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'0', b'-', b'.', b'e', b'n',
                    b' ', 0x0c, 0x01, 0xff,
                ] {
                    let mut v = body.to_vec();
                    v[at] = c;
                    variants.push(v);
                }
            }
            for v in &variants {
                let Some(fast) = scan(v) else { continue };
                let serde = serde_json::from_slice::<Body<'_>>(v)
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(v)));
                assert_eq!(info(fast), info(serde), "{}", String::from_utf8_lossy(v));
                checked += 1;
            }
            accepted += usize::from(scan(body).is_some());
        }
        assert_eq!(accepted, 9, "the usual shapes are read by the scanner");
        assert!(checked > 1000, "{checked} variants read by the scanner");
    }

    #[test]
    fn malformed_bodies_are_not_parsed() {
        for body in [&b"{not json"[..], b"[1,2]", b"{\"stream\":\"yes\"}", b""] {
            let i = inspect(body);
            assert!(!i.parsed);
            assert!(inject_usage(body, &i).is_none());
        }
    }

    #[test]
    fn splices_stream_options_without_touching_other_bytes() {
        let body = b" {\n  \"model\": \"m\", \"stream\": true }";
        let out = inject_usage(body, &inspect(body)).unwrap();
        assert_eq!(
            &out[..],
            &b" {\"stream_options\":{\"include_usage\":true},\n  \"model\": \"m\", \"stream\": true }"[..]
        );
        let i = inspect(&out);
        assert!(i.include_usage && i.stream);
    }

    #[test]
    fn sets_include_usage_inside_existing_options() {
        for body in [
            &br#"{"stream":true,"stream_options":{"include_usage":false}}"#[..],
            br#"{"stream":true,"stream_options":null}"#,
            br#"{"stream":true,"stream_options":{}}"#,
        ] {
            let out = inject_usage(body, &inspect(body)).unwrap();
            assert!(
                inspect(&out).include_usage,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn no_injection_when_not_needed() {
        for body in [
            &br#"{"stream":false}"#[..],
            br#"{"model":"m"}"#,
            br#"{"stream":true,"stream_options":{"include_usage":true}}"#,
        ] {
            assert!(inject_usage(body, &inspect(body)).is_none());
        }
    }
}
