//! Incremental Server-Sent Events splitter and classifier.
//!
//! Pure: no I/O, no clock. [`SseParser::feed`] takes the bytes of one body frame as they arrive
//! (half an event, or many) and reports each event at the blank line that completes it, with
//! its byte offset in that frame, classified as `docs/METRICS.md` §1 says: token, usage,
//! error, `[DONE]` or other. JSON is looked at only as far as classification needs and is never
//! re-serialized; in the steady state nothing is allocated per event.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// What an SSE event is, for telemetry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A JSON object whose `choices` array is non-empty.
    Token,
    /// `choices` empty or absent, `usage` present.
    Usage,
    /// A top-level `error` object (an in-band error after HTTP 200).
    Error,
    /// The literal `[DONE]`.
    Done,
    /// Data that is none of the above, including JSON that does not parse.
    Other,
    /// A block with no `data:` line (comments, `event:`/`id:`/`retry:` only).
    NoData,
}

/// What one choice of a token event carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ChoiceInfo {
    /// The choice's `index` (0 when absent).
    pub index: u32,
    /// `delta.content`, `delta.reasoning_content`, `delta.reasoning`, `delta.tool_calls` or
    /// `text` was non-empty.
    pub has_content: bool,
    /// `finish_reason` was set.
    pub finish_reason: Option<FinishReason>,
}

/// Why a choice ended, as the upstream reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `stop`: an end-of-sequence or stop string.
    Stop,
    /// `length`: `max_tokens` or the context length was reached.
    Length,
    /// `tool_calls`.
    ToolCalls,
    /// Any other value.
    Other,
}

impl FinishReason {
    /// The wire name (`other` for values not listed).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::Other => "other",
        }
    }
}

/// Token counts an event carried in its `usage` object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
pub struct Usage {
    /// `usage.prompt_tokens`.
    #[serde(default)]
    pub prompt_tokens: Option<u64>,
    /// `usage.completion_tokens`.
    #[serde(default)]
    pub completion_tokens: Option<u64>,
}

/// One complete event, reported by [`SseParser::feed`] at the blank line that ends it.
#[derive(Debug)]
pub struct Event<'a> {
    /// The classification.
    pub kind: EventKind,
    /// The choices of a token event (empty for other kinds).
    pub choices: &'a [ChoiceInfo],
    /// The `usage` object, when the event had one (usage events, and every chunk under
    /// vLLM's `continuous_usage_stats`).
    pub usage: Option<Usage>,
    /// Offset in the current frame just past the blank line that ends this event.
    pub end: usize,
    /// The chunk's `id` (for example `chatcmpl-…`), when it is a plain JSON string.
    pub id: Option<&'a str>,
    /// The chunk's `model`, when it is a plain JSON string.
    pub model: Option<&'a str>,
    /// The event's data (its `data:` lines joined with `\n`); empty when it had none.
    pub data: &'a [u8],
}

impl<'a> Event<'a> {
    /// The event classified as `c`, whose choices (for a token event) are in `choices`.
    fn of(c: Classified<'a>, choices: &'a [ChoiceInfo], end: usize, data: &'a [u8]) -> Self {
        Event {
            kind: c.kind,
            choices: if c.kind == EventKind::Token {
                choices
            } else {
                &[]
            },
            usage: c.usage,
            end,
            id: c.id,
            model: c.model,
            data,
        }
    }
}

/// Where the current event's data is while its lines arrive.
#[derive(Debug, Clone, Copy)]
enum Data {
    /// No `data:` line yet.
    Empty,
    /// One `data:` line, still inside the frame being fed (no copy made).
    InFrame(usize, usize),
    /// Copied into `SseParser::data` (several lines, or it spans frames).
    Buffered,
}

/// Splits an SSE byte stream into events, one frame at a time. The fields every frame reads
/// come first (`repr(C)`): most frames need no others.
#[derive(Debug)]
#[repr(C)]
pub struct SseParser {
    /// The start of an earlier payload, so that the next ones need not read it again (boxed:
    /// a parser is embedded in other state and should stay small).
    prefix: Box<fast::Prefix>,
    /// The current block had a line of any kind (so a blank line ends an event).
    in_block: bool,
    /// The previous frame ended in `\r`: a leading `\n` in the next one belongs to it.
    skip_lf: bool,
    /// An incomplete line carried over from earlier frames.
    line: Vec<u8>,
    state: Data,
    /// Copied event data, when it could not be read in place.
    data: Vec<u8>,
    choices: Vec<ChoiceInfo>,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        SseParser {
            line: Vec::new(),
            data: Vec::new(),
            state: Data::Empty,
            in_block: false,
            skip_lf: false,
            choices: Vec::new(),
            prefix: Box::default(),
        }
    }

    /// Feeds the next frame; `on_event` is called for each event the frame completes, in order.
    pub fn feed(&mut self, frame: &[u8], mut on_event: impl FnMut(&Event<'_>)) {
        if self.one_templated_event(frame, &mut on_event) {
            return;
        }
        let mut pos = 0;
        if self.skip_lf && !frame.is_empty() {
            self.skip_lf = false;
            if frame[0] == b'\n' {
                pos = 1;
            }
        }
        while pos < frame.len() {
            let Some(i) = memchr::memchr2(b'\n', b'\r', &frame[pos..]) else {
                self.line.extend_from_slice(&frame[pos..]);
                break;
            };
            let eol = pos + i;
            let next = if frame[eol] == b'\r' {
                match frame.get(eol + 1) {
                    Some(b'\n') => eol + 2,
                    Some(_) => eol + 1,
                    None => {
                        self.skip_lf = true;
                        eol + 1
                    }
                }
            } else {
                eol + 1
            };
            if self.line.is_empty() {
                self.line_in_frame(frame, pos, eol, next, &mut on_event);
            } else {
                self.line.extend_from_slice(&frame[pos..eol]);
                let line = std::mem::take(&mut self.line);
                self.line_buffered(&line, next, &mut on_event);
                self.line = line;
                self.line.clear();
            }
            pos = next;
        }
        // Data still waiting for its blank line cannot point into this frame any longer.
        if let Data::InFrame(start, end) = self.state {
            self.data.clear();
            self.data.extend_from_slice(&frame[start..end]);
            self.state = Data::Buffered;
        }
    }

    /// Reports `frame` when it is exactly one event, `data: `, a payload that fits the template
    /// of the payloads before it, and a blank line: most chunks of a stream after its first
    /// events. Such a payload has no line break (the template's text has none, and its content
    /// string none unescaped), so reading it line by line would report the same event; this
    /// skips that reading. False, having changed nothing, for any other frame.
    fn one_templated_event(&mut self, frame: &[u8], on_event: &mut impl FnMut(&Event<'_>)) -> bool {
        if self.in_block || self.skip_lf || !self.line.is_empty() {
            return false;
        }
        let Some(payload) = frame
            .strip_prefix(b"data: ")
            .and_then(|rest| rest.strip_suffix(b"\n\n"))
        else {
            return false;
        };
        let Some((top, choices)) = fast::templated(payload, &self.prefix) else {
            return false;
        };
        let c = classified(top.error, top.usage, top.id, top.model, !choices.is_empty());
        on_event(&Event::of(c, choices, frame.len(), payload));
        true
    }

    /// True when bytes of an event that never got its blank line are pending: at end of stream
    /// that event is incomplete and, as the SSE standard says, is not dispatched.
    pub fn has_partial_event(&self) -> bool {
        self.in_block || !self.line.is_empty()
    }

    fn line_in_frame(
        &mut self,
        frame: &[u8],
        start: usize,
        eol: usize,
        next: usize,
        on_event: &mut impl FnMut(&Event<'_>),
    ) {
        let line = &frame[start..eol];
        if line.is_empty() {
            self.dispatch(Some(frame), next, on_event);
            return;
        }
        self.in_block = true;
        if let Some(value) = data_value(line) {
            let value_start = eol - value.len();
            match self.state {
                Data::Empty => self.state = Data::InFrame(value_start, eol),
                Data::InFrame(s, e) => {
                    self.data.clear();
                    self.data.extend_from_slice(&frame[s..e]);
                    self.data.push(b'\n');
                    self.data.extend_from_slice(value);
                    self.state = Data::Buffered;
                }
                Data::Buffered => {
                    self.data.push(b'\n');
                    self.data.extend_from_slice(value);
                }
            }
        }
    }

    fn line_buffered(&mut self, line: &[u8], next: usize, on_event: &mut impl FnMut(&Event<'_>)) {
        if line.is_empty() {
            self.dispatch(None, next, on_event);
            return;
        }
        self.in_block = true;
        if let Some(value) = data_value(line) {
            match self.state {
                Data::Empty => {
                    self.data.clear();
                    self.data.extend_from_slice(value);
                }
                // A buffered line always follows the end of the previous frame, which moved
                // in-frame data into the buffer already.
                Data::InFrame(..) | Data::Buffered => {
                    self.data.push(b'\n');
                    self.data.extend_from_slice(value);
                }
            }
            self.state = Data::Buffered;
        }
    }

    fn dispatch(
        &mut self,
        frame: Option<&[u8]>,
        end: usize,
        on_event: &mut impl FnMut(&Event<'_>),
    ) {
        if !self.in_block {
            return;
        }
        self.in_block = false;
        let state = std::mem::replace(&mut self.state, Data::Empty);
        let data = std::mem::take(&mut self.data);
        let payload: Option<&[u8]> = match (state, frame) {
            (Data::Empty, _) => None,
            (Data::InFrame(s, e), Some(frame)) => Some(&frame[s..e]),
            (Data::InFrame(..), None) => unreachable_in_frame(),
            (Data::Buffered, _) => Some(&data),
        };
        self.choices.clear();
        let c = match payload {
            None => Classified::of(EventKind::NoData),
            Some(payload) => classify_in(payload, &mut self.choices, Some(&mut self.prefix)),
        };
        on_event(&Event::of(
            c,
            &self.choices,
            end,
            payload.unwrap_or_default(),
        ));
        self.data = data;
        self.data.clear();
    }
}

/// In-frame data is moved to the buffer at the end of every frame, so a line assembled from
/// several frames never meets it; classify nothing rather than panic if that ever changes.
#[cold]
fn unreachable_in_frame() -> Option<&'static [u8]> {
    None
}

/// The value of a `data` field line (`data:x`, `data: x`, or a bare `data`), else `None`.
fn data_value(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"data")?;
    match rest.first() {
        None => Some(rest),
        Some(b':') => {
            let v = &rest[1..];
            Some(v.strip_prefix(b" ").unwrap_or(v))
        }
        Some(_) => None,
    }
}

/// What [`classify`] found in one event's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified<'a> {
    /// The kind.
    pub kind: EventKind,
    /// The `usage` object, if any.
    pub usage: Option<Usage>,
    /// The chunk's `id`.
    pub id: Option<&'a str>,
    /// The chunk's `model`.
    pub model: Option<&'a str>,
}

impl Classified<'_> {
    fn of(kind: EventKind) -> Self {
        Classified {
            kind,
            usage: None,
            id: None,
            model: None,
        }
    }
}

/// Classifies one event's data. `choices` receives the choices of a token event.
pub fn classify<'a>(payload: &'a [u8], choices: &mut Vec<ChoiceInfo>) -> Classified<'a> {
    classify_in(payload, choices, None)
}

/// [`classify`], reading a payload that starts like an earlier one from where `prefix` ends.
fn classify_in<'a>(
    payload: &'a [u8],
    choices: &mut Vec<ChoiceInfo>,
    prefix: Option<&'a mut fast::Prefix>,
) -> Classified<'a> {
    let trimmed = payload.trim_ascii();
    if trimmed == b"[DONE]" {
        return Classified::of(EventKind::Done);
    }
    if trimmed.first() != Some(&b'{') {
        return Classified::of(EventKind::Other);
    }
    choices.clear();
    if let Some(top) = fast::top(trimmed, choices, prefix) {
        return classified_in(top.error, top.usage, top.id, top.model, choices);
    }
    choices.clear();
    classify_serde(trimmed, choices)
}

/// [`classify`] of a JSON object by the serde visitor: the reference, and the fallback for
/// whatever the fast path does not handle.
fn classify_serde<'a>(trimmed: &'a [u8], choices: &mut Vec<ChoiceInfo>) -> Classified<'a> {
    let mut de = serde_json::Deserializer::from_slice(trimmed);
    let top = match (TopSeed { choices }).deserialize(&mut de) {
        Ok(top) => top,
        Err(_) => {
            choices.clear();
            return Classified::of(EventKind::Other);
        }
    };
    classified_in(
        top.error,
        top.usage,
        top.id.and_then(|r| plain_string(r.get().as_bytes())),
        top.model.and_then(|r| plain_string(r.get().as_bytes())),
        choices,
    )
}

/// The classification of a parsed event (the same for both parsers), whose token choices are
/// in `choices`; an error event keeps none.
fn classified_in<'a>(
    error: bool,
    usage: Option<Usage>,
    id: Option<&'a str>,
    model: Option<&'a str>,
    choices: &mut Vec<ChoiceInfo>,
) -> Classified<'a> {
    let c = classified(error, usage, id, model, !choices.is_empty());
    if c.kind == EventKind::Error {
        choices.clear();
    }
    c
}

/// The classification of a parsed event that had token choices or not.
fn classified<'a>(
    error: bool,
    usage: Option<Usage>,
    id: Option<&'a str>,
    model: Option<&'a str>,
    has_choices: bool,
) -> Classified<'a> {
    let kind = if error {
        EventKind::Error
    } else if has_choices {
        EventKind::Token
    } else if usage.is_some() {
        EventKind::Usage
    } else {
        EventKind::Other
    };
    Classified {
        kind,
        usage: if kind == EventKind::Other {
            None
        } else {
            usage
        },
        id,
        model,
    }
}

/// The text of a raw JSON string without escapes (`"abc"` → `abc`), else `None`.
fn plain_string(raw: &[u8]) -> Option<&str> {
    let s = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if s.contains(&b'\\') {
        return None;
    }
    std::str::from_utf8(s).ok()
}

struct Top<'de> {
    usage: Option<Usage>,
    error: bool,
    id: Option<&'de RawValue>,
    model: Option<&'de RawValue>,
}

struct TopSeed<'s> {
    choices: &'s mut Vec<ChoiceInfo>,
}

impl<'de> DeserializeSeed<'de> for TopSeed<'_> {
    type Value = Top<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Top<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

/// Top-level keys that classification reads.
enum TopKey {
    Choices,
    Usage,
    Error,
    Id,
    Model,
    Other,
}

impl<'de> serde::Deserialize<'de> for TopKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TopKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TopKey, E> {
                Ok(match v {
                    "choices" => TopKey::Choices,
                    "usage" => TopKey::Usage,
                    "error" => TopKey::Error,
                    "id" => TopKey::Id,
                    "model" => TopKey::Model,
                    _ => TopKey::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

impl<'de> Visitor<'de> for TopSeed<'_> {
    type Value = Top<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de>, A::Error> {
        let mut top = Top {
            usage: None,
            error: false,
            id: None,
            model: None,
        };
        while let Some(key) = map.next_key::<TopKey>()? {
            match key {
                TopKey::Choices => map.next_value_seed(ChoicesSeed {
                    choices: &mut *self.choices,
                })?,
                TopKey::Usage => top.usage = map.next_value::<Option<Usage>>()?,
                TopKey::Error => top.error = map.next_value::<Option<IgnoredAny>>()?.is_some(),
                TopKey::Id => top.id = Some(map.next_value::<&'de RawValue>()?),
                TopKey::Model => top.model = Some(map.next_value::<&'de RawValue>()?),
                TopKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(top)
    }
}

struct ChoicesSeed<'s> {
    choices: &'s mut Vec<ChoiceInfo>,
}

impl<'de> DeserializeSeed<'de> for ChoicesSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ChoicesSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of choices")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(choice) = seq.next_element::<Choice<'de>>()? {
            self.choices.push(choice.info());
        }
        Ok(())
    }
}

/// The parts of a choice classification reads; everything else is skipped unparsed.
#[derive(serde::Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: Option<u32>,
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    finish_reason: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    reasoning_content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    reasoning: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
}

impl Choice<'_> {
    fn info(&self) -> ChoiceInfo {
        fn raw(r: Option<&RawValue>) -> Option<&[u8]> {
            r.map(|r| r.get().as_bytes())
        }
        let delta_content = self.delta.as_ref().is_some_and(|d| {
            non_empty(raw(d.content))
                || non_empty(raw(d.reasoning_content))
                || non_empty(raw(d.reasoning))
                || non_empty(raw(d.tool_calls))
        });
        ChoiceInfo {
            index: self.index.unwrap_or(0),
            has_content: delta_content || non_empty(raw(self.text)),
            finish_reason: finish_reason(raw(self.finish_reason)),
        }
    }
}

/// A raw `finish_reason` value.
fn finish_reason(raw: Option<&[u8]>) -> Option<FinishReason> {
    match raw? {
        b"null" => None,
        b"\"stop\"" => Some(FinishReason::Stop),
        b"\"length\"" => Some(FinishReason::Length),
        b"\"tool_calls\"" => Some(FinishReason::ToolCalls),
        _ => Some(FinishReason::Other),
    }
}

/// A raw JSON value that carries something: not `null`, `""`, `[]` or `{}`.
fn non_empty(raw: Option<&[u8]>) -> bool {
    raw.is_some_and(|raw| !matches!(raw, b"null" | b"\"\"" | b"[]" | b"{}"))
}

/// A single-pass classifier for well-formed JSON, several times faster than the serde visitor.
///
/// It reads what [`classify`] needs and skips everything else while checking JSON syntax as
/// strictly as `serde_json` does (strings, escapes, numbers, literals, nesting). Whenever the
/// input is not one it is sure to read exactly like the serde path (malformed JSON, a duplicate
/// or escaped key, a field of an unexpected type, deep nesting), it returns `None` and
/// [`classify`] falls back to serde, so both always agree. Its [`fast::Scan`] reads request
/// bodies for `inspect` the same way.
pub(crate) mod fast {
    use smallvec::SmallVec;

    use super::{ChoiceInfo, Usage, finish_reason, non_empty};

    /// What the top level carried.
    pub(super) struct Top<'a> {
        pub(super) usage: Option<Usage>,
        pub(super) error: bool,
        pub(super) id: Option<&'a str>,
        pub(super) model: Option<&'a str>,
    }

    /// The top-level fields read up to some point of a scan.
    #[derive(Debug, Clone, Copy, Default)]
    struct Fields {
        /// One bit per key read, to refuse duplicates.
        seen: u8,
        usage: Option<Usage>,
        error: bool,
        /// Where the `id` string's text is, when it is a plain string.
        id: Option<(usize, usize)>,
        /// Where the `model` string's text is, when it is a plain string.
        model: Option<(usize, usize)>,
    }

    impl Fields {
        /// Reads the value of the top-level member `key`, pushing token choices into `choices`.
        #[inline]
        fn read(
            &mut self,
            s: &mut Scan<'_>,
            key: &[u8],
            choices: &mut Vec<ChoiceInfo>,
        ) -> Option<()> {
            let bit = match key {
                b"choices" => 1,
                b"usage" => 2,
                b"error" => 4,
                b"id" => 8,
                b"model" => 16,
                _ => return s.value(1),
            };
            if self.seen & bit != 0 {
                return None;
            }
            self.seen |= bit;
            match bit {
                1 => s.choices(choices)?,
                2 => self.usage = s.usage()?,
                4 => self.error = s.raw(1)? != b"null",
                8 => self.id = s.plain_string()?,
                _ => self.model = s.plain_string()?,
            }
            Some(())
        }
    }

    /// An earlier payload, where its `choices` member starts and the fields read before it, and
    /// what reading it gave.
    ///
    /// The scanner decides everything before a position from the bytes before it, so a payload
    /// that starts with the same bytes reaches that position in the same state and is read on
    /// from there. Every chunk of a vLLM stream repeats its `id`, `object`, `created` and
    /// `model`, which are most of its bytes; most chunks differ from the one before only in
    /// the text of their content string, and then they read exactly like it (see [`Template`]).
    #[derive(Debug, Clone, Default)]
    #[repr(C)]
    pub(super) struct Prefix {
        /// What most chunks are checked against, first, next to the text's pointer and length
        /// (`repr(C)`): a chunk that fits the template reads nothing else here.
        template: Option<Template>,
        /// The payload, kept only when it is UTF-8 so that `id` and `model` can be read from
        /// it without checking them again.
        pub(super) text: String,
        /// The text has no line break (`\n` or `\r`), so neither has a payload that fits its
        /// template (see [`templated`]).
        single_line: bool,
        /// Where its `choices` member starts; 0 when there is nothing to resume from.
        at: usize,
        /// The fields read before `at`.
        fields: Fields,
    }

    /// Where the first content string of a payload is (`delta.content` or `text` of a choice),
    /// and everything reading the payload gave. A payload that differs only inside that string,
    /// with a valid string there that is empty exactly when the old one was, gives the same:
    /// the scanner reads that string only to check it and to see whether it is empty.
    #[derive(Debug, Clone, Default)]
    #[repr(C)]
    struct Template {
        /// Positions of its opening and closing quotes.
        open: usize,
        close: usize,
        /// The top-level fields read, `id` and `model` before `open`.
        fields: Fields,
        /// Inline for one or two choices, so that reading them touches no other allocation.
        choices: SmallVec<[ChoiceInfo; 2]>,
    }

    impl Prefix {
        /// Whether `json` is read on from the remembered state (tests count them).
        #[cfg(test)]
        pub(super) fn resumes(&self, json: &[u8]) -> bool {
            self.at > 0 && json.starts_with(&self.text.as_bytes()[..self.at])
        }

        /// Whether `json` is answered from the template (tests count them).
        #[cfg(test)]
        pub(super) fn templated(&self, json: &[u8]) -> bool {
            self.template.as_ref().is_some_and(|t| self.fits(json, t))
        }

        /// Whether `json` differs from the remembered payload only inside its template's
        /// string: the same bytes up to the string and after it, and a valid string there.
        fn fits(&self, json: &[u8], t: &Template) -> bool {
            let old = self.text.as_bytes();
            if json.get(..=t.open) != old.get(..=t.open) {
                return false;
            }
            let mut s = Scan {
                b: json,
                i: t.open,
                var: None,
            };
            let Some((start, end, _)) = s.string() else {
                return false;
            };
            (end == start) == (t.close == t.open + 1)
                && json.get(end..) == old.get(t.close..)
                && (json[start..end].is_ascii() || std::str::from_utf8(&json[start..end]).is_ok())
        }

        /// Remembers the template of the payload just read, reusing the old one's allocation
        /// (none without a content string, or with `id` or `model` after it).
        fn remember(&mut self, var: Option<(usize, usize)>, f: Fields, choices: &[ChoiceInfo]) {
            let before =
                |open: usize, r: Option<(usize, usize)>| r.is_none_or(|(_, end)| end < open);
            match var {
                Some((open, close)) if before(open, f.id) && before(open, f.model) => {
                    let t = self.template.get_or_insert_with(Template::default);
                    (t.open, t.close, t.fields) = (open, close, f);
                    t.choices.clear();
                    t.choices.extend_from_slice(choices);
                }
                _ => self.template = None,
            }
        }
    }

    /// Nesting beyond this is left to serde (whose limit is 128).
    const MAX_DEPTH: u32 = 64;

    /// A position in a JSON text, read forwards.
    pub(crate) struct Scan<'a> {
        b: &'a [u8],
        i: usize,
        /// The opening and closing quotes of the first content string read (see [`Template`]).
        var: Option<(usize, usize)>,
    }

    /// Reads `json` (which starts with `{`), pushing token choices into `choices`. With a
    /// `prefix`, a payload that fits its template gives what that one gave, one that starts like
    /// the payload it remembers is read from where its `choices` start (and remembered), and
    /// any other is read whole and remembered.
    pub(super) fn top<'a>(
        json: &'a [u8],
        choices: &mut Vec<ChoiceInfo>,
        prefix: Option<&'a mut Prefix>,
    ) -> Option<Top<'a>> {
        match prefix {
            Some(p) if p.template.as_ref().is_some_and(|t| p.fits(json, t)) => {
                let p: &'a Prefix = p;
                let t = p.template.as_ref()?;
                choices.extend_from_slice(&t.choices);
                top_of(json, &p.text[..t.open], &t.fields)
            }
            Some(p) if p.at > 0 && json.starts_with(&p.text.as_bytes()[..p.at]) => {
                let mut f = p.fields;
                let mut s = Scan {
                    b: json,
                    i: p.at,
                    var: None,
                };
                s.members(|s, _, key| f.read(s, key, choices))?;
                // The same start: only the rest needs checking to remember this payload.
                if let Ok(rest) = std::str::from_utf8(&json[p.at..]) {
                    p.text.truncate(p.at);
                    p.text.push_str(rest);
                    p.single_line = memchr::memchr2(b'\n', b'\r', p.text.as_bytes()).is_none();
                    p.remember(s.var, f, choices);
                }
                let p: &'a Prefix = p;
                top_of(json, &p.text[..p.at], &f)
            }
            prefix => {
                // Where the `choices` member starts, and the fields read before it; only after
                // a comma, as the first member's position depends on the byte there (`{}`).
                let mut mark = None;
                let mut first = true;
                let mut f = Fields::default();
                let mut s = Scan {
                    b: json,
                    i: 0,
                    var: None,
                };
                s.object_at(|s, at, key| {
                    let after_comma = !std::mem::replace(&mut first, false);
                    if key == b"choices" && after_comma {
                        mark = Some((at, f));
                    }
                    f.read(s, key, choices)
                })?;
                if let (Some(p), Some((at, fields))) = (prefix, mark)
                    && let Ok(text) = std::str::from_utf8(json)
                {
                    p.text.clear();
                    // Room for the longer content strings of the chunks to come: they replace
                    // this text without growing it.
                    p.text.reserve(text.len() + 128);
                    p.text.push_str(text);
                    p.single_line = memchr::memchr2(b'\n', b'\r', text.as_bytes()).is_none();
                    p.at = at;
                    p.fields = fields;
                    p.remember(s.var, f, choices);
                }
                top_of(json, "", &f)
            }
        }
    }

    /// What `json` carried, and its token choices, when it fits the template of the payload
    /// `p` remembers and that payload had no line break: then `json` has none either. `None`
    /// for any other payload.
    pub(super) fn templated<'a>(
        json: &'a [u8],
        p: &'a Prefix,
    ) -> Option<(Top<'a>, &'a [ChoiceInfo])> {
        let t = p.template.as_ref()?;
        if !p.single_line || !p.fits(json, t) {
            return None;
        }
        Some((top_of(json, &p.text[..t.open], &t.fields)?, &t.choices))
    }

    /// What the top level of `json` carried, from the fields read; `known` is a start of `json`
    /// already checked to be UTF-8.
    fn top_of<'a>(json: &'a [u8], known: &'a str, f: &Fields) -> Option<Top<'a>> {
        Some(Top {
            usage: f.usage,
            error: f.error,
            id: text(json, known, f.id)?,
            model: text(json, known, f.model)?,
        })
    }

    /// The text at `range` of `json`, whose first bytes are `known`: `Some(None)` without a
    /// range, `None` when it is not UTF-8.
    fn text<'a>(
        json: &'a [u8],
        known: &'a str,
        range: Option<(usize, usize)>,
    ) -> Option<Option<&'a str>> {
        let Some((start, end)) = range else {
            return Some(None);
        };
        match known.get(start..end) {
            Some(text) => Some(Some(text)),
            None => std::str::from_utf8(json.get(start..end)?).ok().map(Some),
        }
    }

    /// The position of the first byte of `b` from `i` on that a string cannot hold as it is
    /// (`"`, `\\` or a control character), or with `ascii` that is not ASCII either; `b.len()`
    /// when there is none. Eight bytes are looked at a time.
    #[inline]
    fn special(b: &[u8], mut i: usize, ascii: bool) -> usize {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        let non_ascii = if ascii { HIGH } else { 0 };
        while let Some(chunk) = b.get(i..).and_then(<[u8]>::first_chunk::<8>) {
            let v = u64::from_le_bytes(*chunk);
            let quote = v ^ (ONES * u64::from(b'"'));
            let backslash = v ^ (ONES * u64::from(b'\\'));
            // A byte is flagged when it is zero (after the xor) or below 0x20, or (with
            // `ascii`) has its high bit set.
            let flagged = (quote.wrapping_sub(ONES) & !quote)
                | (backslash.wrapping_sub(ONES) & !backslash)
                | (v.wrapping_sub(ONES * 0x20) & !v)
                | (v & non_ascii);
            let flagged = flagged & HIGH;
            if flagged != 0 {
                // The lowest flagged byte is exact (borrows only run towards higher bytes).
                return i + flagged.trailing_zeros() as usize / 8;
            }
            i += 8;
        }
        while let Some(&c) = b.get(i) {
            if matches!(c, b'"' | b'\\' | 0..=0x1f) || (ascii && !c.is_ascii()) {
                return i;
            }
            i += 1;
        }
        i
    }

    impl<'a> Scan<'a> {
        /// A scanner at the start of `b`.
        pub(crate) fn new(b: &'a [u8]) -> Self {
            Scan { b, i: 0, var: None }
        }

        /// Whether only whitespace is left (serde's check for trailing characters).
        pub(crate) fn at_end(&mut self) -> bool {
            self.ws();
            self.i == self.b.len()
        }

        #[inline]
        fn ws(&mut self) {
            while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.b.get(self.i) {
                self.i += 1;
            }
        }

        #[inline]
        pub(crate) fn peek(&mut self) -> Option<u8> {
            self.ws();
            self.b.get(self.i).copied()
        }

        /// `{ "key": value, … }`; `field` reads each value (the scanner is just past the `:`).
        #[inline]
        fn object(
            &mut self,
            mut field: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
        ) -> Option<()> {
            self.object_at(|s, _, key| field(s, key))
        }

        /// An object whose members named in `keys` are each read by `read`, given the key's
        /// index, at most once (serde refuses a field given twice: `None`); other members are
        /// skipped, their syntax checked, as values at `depth`.
        pub(crate) fn fields(
            &mut self,
            keys: &[&[u8]],
            depth: u32,
            mut read: impl FnMut(&mut Self, usize) -> Option<()>,
        ) -> Option<()> {
            let mut seen = 0u32;
            self.object(|s, key| {
                let Some(k) = keys.iter().position(|k| *k == key) else {
                    return s.value(depth);
                };
                if seen & 1 << k != 0 {
                    return None;
                }
                seen |= 1 << k;
                read(s, k)
            })
        }

        /// [`Self::object`], telling `field` where each member starts.
        #[inline]
        fn object_at(
            &mut self,
            field: impl FnMut(&mut Self, usize, &'a [u8]) -> Option<()>,
        ) -> Option<()> {
            if self.peek()? != b'{' {
                return None;
            }
            self.i += 1;
            if self.peek()? == b'}' {
                self.i += 1;
                return Some(());
            }
            self.members(field)
        }

        /// The members of an object from the first (or one after a comma) to its `}`; `field`
        /// gets the position each member starts at and its key.
        #[inline]
        fn members(
            &mut self,
            mut field: impl FnMut(&mut Self, usize, &'a [u8]) -> Option<()>,
        ) -> Option<()> {
            loop {
                let at = self.i;
                if self.peek()? != b'"' {
                    return None;
                }
                let key = self.key()?;
                if self.peek()? != b':' {
                    return None;
                }
                self.i += 1;
                self.ws();
                field(self, at, key)?;
                match self.peek()? {
                    b',' => self.i += 1,
                    b'}' => {
                        self.i += 1;
                        return Some(());
                    }
                    _ => return None,
                }
            }
        }

        /// A string at `self.i` (on its opening quote): the range of its contents, and whether
        /// it had no escapes.
        #[inline]
        pub(crate) fn string(&mut self) -> Option<(usize, usize, bool)> {
            let b = self.b;
            let start = self.i + 1;
            let mut i = start;
            let mut plain = true;
            loop {
                i = special(b, i, false);
                let c = *b.get(i)?;
                i += 1;
                match c {
                    b'"' => {
                        self.i = i;
                        return Some((start, i - 1, plain));
                    }
                    b'\\' => {
                        plain = false;
                        match *b.get(i)? {
                            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 1,
                            b'u' => {
                                let hex = b.get(i + 1..i + 5)?;
                                if !hex.iter().all(u8::is_ascii_hexdigit) {
                                    return None;
                                }
                                i += 5;
                            }
                            _ => return None,
                        }
                    }
                    // A control character.
                    _ => return None,
                }
            }
        }

        /// A key at `self.i` (on its opening quote): its text, when it is ASCII without
        /// escapes (other keys are left to serde).
        #[inline]
        fn key(&mut self) -> Option<&'a [u8]> {
            let start = self.i + 1;
            let end = special(self.b, start, true);
            if self.b.get(end) != Some(&b'"') {
                return None;
            }
            self.i = end + 1;
            self.b.get(start..end)
        }

        /// Skips one value (the scanner is on its first byte), checking its syntax.
        fn value(&mut self, depth: u32) -> Option<()> {
            match *self.b.get(self.i)? {
                b'"' => self.string().map(|_| ()),
                b'{' => {
                    if depth > MAX_DEPTH {
                        return None;
                    }
                    self.object(|s, _| s.value(depth + 1))
                }
                b'[' => {
                    if depth > MAX_DEPTH {
                        return None;
                    }
                    self.array(|s| s.value(depth + 1))
                }
                b'n' => self.literal(b"null"),
                b't' => self.literal(b"true"),
                b'f' => self.literal(b"false"),
                b'-' | b'0'..=b'9' => self.number(),
                _ => None,
            }
        }

        /// A value's raw bytes, checked to be UTF-8 as serde's `RawValue` is.
        fn raw(&mut self, depth: u32) -> Option<&'a [u8]> {
            let start = self.i;
            self.value(depth)?;
            let raw = &self.b[start..self.i];
            if !raw.is_ascii() {
                std::str::from_utf8(raw).ok()?;
            }
            Some(raw)
        }

        /// A value read as a raw value would be, and where its text is when it is a string
        /// without escapes (see `super::plain_string`; the caller checks the text is UTF-8).
        fn plain_string(&mut self) -> Option<Option<(usize, usize)>> {
            if self.b.get(self.i) == Some(&b'"') {
                let at = self.i;
                let (start, end, plain) = self.string()?;
                if plain {
                    return Some(Some((start, end)));
                }
                self.i = at;
            }
            self.raw(1)?;
            Some(None)
        }

        /// A raw value, `None` for `null` (serde's `Option<&RawValue>`).
        fn opt_raw(&mut self) -> Option<Option<&'a [u8]>> {
            let raw = self.raw(2)?;
            Some((raw != b"null").then_some(raw))
        }

        /// `[ value, … ]`; `element` reads each (the scanner is on its first byte).
        #[inline]
        fn array(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
            self.i += 1;
            if self.peek()? == b']' {
                self.i += 1;
                return Some(());
            }
            loop {
                self.ws();
                element(self)?;
                match self.peek()? {
                    b',' => self.i += 1,
                    b']' => {
                        self.i += 1;
                        return Some(());
                    }
                    _ => return None,
                }
            }
        }

        pub(crate) fn literal(&mut self, lit: &[u8]) -> Option<()> {
            if self.b.get(self.i..self.i + lit.len())? != lit {
                return None;
            }
            self.i += lit.len();
            Some(())
        }

        fn digits(&mut self) -> usize {
            let start = self.i;
            while let Some(b'0'..=b'9') = self.b.get(self.i) {
                self.i += 1;
            }
            self.i - start
        }

        /// A JSON number: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
        fn number(&mut self) -> Option<()> {
            if self.b.get(self.i) == Some(&b'-') {
                self.i += 1;
            }
            let first = *self.b.get(self.i)?;
            let n = self.digits();
            if n == 0 || (first == b'0' && n > 1) {
                return None;
            }
            if self.b.get(self.i) == Some(&b'.') {
                self.i += 1;
                if self.digits() == 0 {
                    return None;
                }
            }
            if let Some(b'e' | b'E') = self.b.get(self.i) {
                self.i += 1;
                if let Some(b'+' | b'-') = self.b.get(self.i) {
                    self.i += 1;
                }
                if self.digits() == 0 {
                    return None;
                }
            }
            Some(())
        }

        /// `null` or a plain non-negative integer that fits in a `u64` (anything else is left
        /// to serde, which knows which other spellings it accepts).
        pub(crate) fn opt_uint(&mut self) -> Option<Option<u64>> {
            if self.b.get(self.i) == Some(&b'n') {
                self.literal(b"null")?;
                return Some(None);
            }
            let start = self.i;
            let n = self.digits();
            let digits = &self.b[start..self.i];
            if n == 0 || (digits[0] == b'0' && n > 1) {
                return None;
            }
            if let Some(b'.' | b'e' | b'E') = self.b.get(self.i) {
                return None;
            }
            let mut v: u64 = 0;
            for d in digits {
                v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            }
            Some(Some(v))
        }

        /// Notes the value just read from `at` as the payload's content string (see [`Template`])
        /// when it is a string and the first one.
        #[inline]
        fn note_var(&mut self, at: usize) {
            if self.var.is_none() && self.b[at] == b'"' {
                self.var = Some((at, self.i - 1));
            }
        }

        /// `choices`: `null` or an array of choice objects.
        fn choices(&mut self, choices: &mut Vec<ChoiceInfo>) -> Option<()> {
            match *self.b.get(self.i)? {
                b'n' => self.literal(b"null"),
                b'[' => self.array(|s| {
                    let info = s.choice()?;
                    choices.push(info);
                    Some(())
                }),
                _ => None,
            }
        }

        fn choice(&mut self) -> Option<ChoiceInfo> {
            if *self.b.get(self.i)? != b'{' {
                return None;
            }
            let mut index = None;
            let mut delta_content = false;
            let mut text = None;
            let mut finish = None;
            let keys: [&[u8]; 4] = [b"index", b"delta", b"text", b"finish_reason"];
            self.fields(&keys, 2, |s, k| {
                match k {
                    0 => {
                        index = s.opt_uint()?;
                        if index.is_some_and(|i| i > u64::from(u32::MAX)) {
                            return None;
                        }
                    }
                    1 => delta_content = s.delta()?,
                    2 => {
                        let at = s.i;
                        text = s.opt_raw()?;
                        s.note_var(at);
                    }
                    _ => finish = s.opt_raw()?,
                }
                Some(())
            })?;
            Some(ChoiceInfo {
                index: index.map_or(0, |i| i as u32),
                has_content: delta_content || non_empty(text),
                finish_reason: finish_reason(finish),
            })
        }

        /// `delta`: `null` or an object; true when one of its content fields is non-empty.
        fn delta(&mut self) -> Option<bool> {
            match *self.b.get(self.i)? {
                b'n' => {
                    self.literal(b"null")?;
                    Some(false)
                }
                b'{' => {
                    let mut content = false;
                    let keys: [&[u8]; 4] = [
                        b"content",
                        b"reasoning_content",
                        b"reasoning",
                        b"tool_calls",
                    ];
                    self.fields(&keys, 3, |s, k| {
                        let at = s.i;
                        content |= non_empty(s.opt_raw()?);
                        if k == 0 {
                            s.note_var(at);
                        }
                        Some(())
                    })?;
                    Some(content)
                }
                _ => None,
            }
        }

        /// `usage`: `null` or an object with optional integer token counts.
        fn usage(&mut self) -> Option<Option<Usage>> {
            match *self.b.get(self.i)? {
                b'n' => {
                    self.literal(b"null")?;
                    Some(None)
                }
                b'{' => {
                    let mut u = Usage::default();
                    self.fields(&[b"prompt_tokens", b"completion_tokens"], 2, |s, k| {
                        let v = s.opt_uint()?;
                        if k == 0 {
                            u.prompt_tokens = v;
                        } else {
                            u.completion_tokens = v;
                        }
                        Some(())
                    })?;
                    Some(Some(u))
                }
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Seen {
        kind: EventKind,
        choices: Vec<ChoiceInfo>,
        usage: Option<Usage>,
        /// Offset of the event's end in the whole stream.
        end: usize,
    }

    /// Feeds `frames` in order and returns every event with its end offset in the whole stream.
    fn run(frames: &[&[u8]]) -> (Vec<Seen>, bool) {
        let mut p = SseParser::new();
        let mut seen = Vec::new();
        let mut base = 0;
        for f in frames {
            p.feed(f, |e| {
                seen.push(Seen {
                    kind: e.kind,
                    choices: e.choices.to_vec(),
                    usage: e.usage,
                    end: base + e.end,
                })
            });
            base += f.len();
        }
        (seen, p.has_partial_event())
    }

    const ROLE: &str = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#;
    const TOKEN: &str = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" hello\n\"x\""},"logprobs":null,"finish_reason":null}]}"#;
    const FINISH: &str = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"length"}]}"#;
    const USAGE: &str = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":12,"total_tokens":112,"completion_tokens":100}}"#;

    fn stream() -> String {
        format!("{ROLE}\n\n{TOKEN}\n\n{FINISH}\n\n{USAGE}\n\ndata: [DONE]\n\n")
    }

    fn expected(s: &str) -> Vec<Seen> {
        let mut ends = s.match_indices("\n\n").map(|(i, _)| i + 2);
        let tok = |has_content, finish_reason| ChoiceInfo {
            index: 0,
            has_content,
            finish_reason,
        };
        vec![
            Seen {
                kind: EventKind::Token,
                choices: vec![tok(false, None)],
                usage: None,
                end: ends.next().unwrap(),
            },
            Seen {
                kind: EventKind::Token,
                choices: vec![tok(true, None)],
                usage: None,
                end: ends.next().unwrap(),
            },
            Seen {
                kind: EventKind::Token,
                choices: vec![tok(false, Some(FinishReason::Length))],
                usage: None,
                end: ends.next().unwrap(),
            },
            Seen {
                kind: EventKind::Usage,
                choices: vec![],
                usage: Some(Usage {
                    prompt_tokens: Some(12),
                    completion_tokens: Some(100),
                }),
                end: ends.next().unwrap(),
            },
            Seen {
                kind: EventKind::Done,
                choices: vec![],
                usage: None,
                end: ends.next().unwrap(),
            },
        ]
    }

    /// The fast path and the serde visitor agree on every input the fast path accepts; it
    /// accepts the usual shapes.
    #[test]
    fn fast_path_agrees_with_serde() {
        let payloads: Vec<String> = [ROLE, TOKEN, FINISH, USAGE]
            .iter()
            .map(|e| e.strip_prefix("data: ").unwrap().to_owned())
            .chain(
                [
                    r#"{"choices":[{"index":1,"text":"x","finish_reason":null}]}"#,
                    r#"{"choices":[{"index":0,"text":"","finish_reason":"stop"},{"index":1,"text":"y"}]}"#,
                    r#"{"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
                    r#"{"choices":null,"usage":null}"#,
                    r#"{"choices":[{"delta":{"content":null,"tool_calls":[]}}]}"#,
                    r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#,
                    r#"{"choices":[{"index":0,"delta":{"reasoning_content":"think"}}]}"#,
                    r#"{"error":{"message":"boom","type":"BadRequestError","code":400}}"#,
                    r#"{"error":null,"choices":[]}"#,
                    r#" { "id" : "a"b" , "model":null, "choices" : [ { "index" : 3 , "delta" : { "content" : "é
" } , "logprobs" : { "x" : [ 1.5e-3 , -0 , true , false , null ] } } ] } "#,
                    r#"{"choices":[{"index":0,"delta":{"content":"é"},"finish_reason":"tool_calls"}],"x":[[[]]],"y":{}}"#,
                    r#"{"choices":[{"index":0,"index":1}]}"#,
                    r#"{"choices":[{"index":-1}]}"#,
                    r#"{"choices":[{"index":1.0}]}"#,
                    r#"{"choices":[{"index":4294967296}]}"#,
                    r#"{"choices":[[0,{"content":"a"}]]}"#,
                    r#"{"choices":[],"usage":{"prompt_tokens":1e3}}"#,
                    r#"{"choices":[],"usage":[1,2]}"#,
                    r#"{"choices":[{"text":"a"}]}"#,
                    r#"{"choices":[{"text":"a"}],"choices":[{"text":"b"}]}"#,
                    r#"{"choices":[{"text":"a"}]} trailing"#,
                    r#"{"choices":[{"text":"a"}],}"#,
                    r#"{"choices":[{"text":"a",}]}"#,
                    r#"{"choices":[{"text":01}]}"#,
                    r#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"error":null,"id":"a\u0041","model":7,"x":[1],"choices":[{"index":0,"delta":{"content":"a"}}]}"#,
                ]
                .iter()
                .map(|s| (*s).to_owned()),
            )
            .collect();
        fn read<'a>(
            json: &'a [u8],
            prefix: Option<&'a mut fast::Prefix>,
        ) -> Option<(Classified<'a>, Vec<ChoiceInfo>)> {
            let mut choices = Vec::new();
            let top = fast::top(json, &mut choices, prefix)?;
            let c = classified_in(top.error, top.usage, top.id, top.model, &mut choices);
            Some((c, choices))
        }
        let mut accepted = 0;
        let mut checked = 0;
        let mut resumed = 0;
        let mut templated = 0;
        for p in &payloads {
            let b = p.as_bytes();
            let mut variants: Vec<Vec<u8>> = vec![b.to_vec()];
            for cut in 1..b.len() {
                variants.push(b[..cut].to_vec());
                for c in [b'"', b'\\', b'}', b']', b',', b'0', b'-', b' ', 0x01, 0xff] {
                    let mut v = b.to_vec();
                    v[cut] = c;
                    variants.push(v);
                }
            }
            // Other content strings in place of the first one, longer and shorter, valid or not.
            let value = ["\"content\":", "\"text\":"]
                .iter()
                .filter_map(|k| p.find(k).map(|at| at + k.len()))
                .min()
                .map(|at| at + p[at..].len() - p[at..].trim_start().len())
                .filter(|&at| b[at] == b'"');
            if let Some(open) = value {
                let close = open + 1 + p[open + 1..].find('"').unwrap();
                let strings: [&[u8]; 14] = [
                    b"\"\"",
                    b"\"x\"",
                    b"\" a much longer piece of text than before\"",
                    b"\"a\\\"b\"",
                    b"\"\\u00e9\\ud83d\\ude00\"",
                    "\"é😀\"".as_bytes(),
                    b"\"\xff\xfe\"",
                    b"\"\xc3\"",
                    b"\"bad\\q\"",
                    b"\"\\u12\"",
                    b"\"tab\there\"",
                    b"\"unterminated",
                    b"\"a\",\"b\"",
                    b"null",
                ];
                for with in strings {
                    variants.push([&b[..open], with, &b[close + 1..]].concat());
                }
            }
            // What reading the unmutated payload remembers, for the variants to start from.
            let mut primed = fast::Prefix::default();
            fast::top(b.trim_ascii(), &mut Vec::new(), Some(&mut primed));
            for v in &variants {
                let t = v.trim_ascii();
                if t.first() != Some(&b'{') {
                    continue;
                }
                let fresh = read(t, None);
                let mut prefix = primed.clone();
                let resumes = prefix.resumes(t);
                templated += usize::from(prefix.templated(t));
                assert_eq!(
                    read(t, Some(&mut prefix)),
                    fresh,
                    "resuming from {:?}: {}",
                    primed.text,
                    String::from_utf8_lossy(v)
                );
                let Some((fast, fast_choices)) = fresh else {
                    continue;
                };
                if v == b {
                    accepted += 1;
                }
                checked += 1;
                resumed += usize::from(resumes);
                let mut serde_choices = Vec::new();
                let serde = classify_serde(t, &mut serde_choices);
                assert_eq!(fast, serde, "{}", String::from_utf8_lossy(v));
                if fast.kind == EventKind::Token {
                    assert_eq!(
                        fast_choices,
                        serde_choices,
                        "{}",
                        String::from_utf8_lossy(v)
                    );
                }
            }
        }
        assert!(
            accepted >= 18,
            "fast path accepted only {accepted} payloads"
        );
        assert!(checked > 1000, "{checked}");
        assert!(resumed > 1000, "{resumed}");
        assert!(templated > 100, "{templated}");
    }

    #[test]
    fn many_events_in_one_frame() {
        let s = stream();
        let (seen, partial) = run(&[s.as_bytes()]);
        assert_eq!(seen, expected(&s));
        assert!(!partial);
    }

    #[test]
    fn split_at_every_byte_offset() {
        let s = stream();
        let want = expected(&s);
        for cut in 0..=s.len() {
            let (a, b) = s.as_bytes().split_at(cut);
            let (seen, partial) = run(&[a, b]);
            assert_eq!(seen, want, "split at {cut}");
            assert!(!partial);
        }
    }

    /// A frame that is one event fitting the template is reported as reading it line by line
    /// reports it: the same events, ends, ids and data, whatever frames carried the stream.
    #[test]
    fn one_event_frames_read_as_the_whole_stream() {
        let token = |text: &str| TOKEN.replace(r#"" hello\n\"x\"""#, text);
        let events = [
            ROLE.to_owned(),
            TOKEN.to_owned(),
            token(r#""a""#),
            token(r#""longer text, \u00e9""#),
            token(r#""b""#),
            // Empty where the template's is not: read, not answered from the template.
            token(r#""""#),
            FINISH.to_owned(),
            USAGE.to_owned(),
        ];
        let frames: Vec<String> = events.iter().map(|e| format!("{e}\n\n")).collect();
        let whole = frames.concat();
        let read = |frames: &[&[u8]]| {
            let mut p = SseParser::new();
            let mut seen = Vec::new();
            let mut base = 0;
            let mut templated = 0;
            for f in frames {
                let fits = f
                    .strip_prefix(b"data: ")
                    .and_then(|r| r.strip_suffix(b"\n\n"))
                    .is_some_and(|d| fast::templated(d, &p.prefix).is_some());
                templated += usize::from(fits);
                p.feed(f, |e| {
                    seen.push((
                        e.kind,
                        e.choices.to_vec(),
                        e.usage,
                        base + e.end,
                        e.id.map(str::to_owned),
                        e.model.map(str::to_owned),
                        e.data.to_vec(),
                    ))
                });
                base += f.len();
            }
            (seen, templated)
        };
        let one: Vec<&[u8]> = frames.iter().map(|f| f.as_bytes()).collect();
        let (by_event, templated) = read(&one);
        assert_eq!(templated, 3, "the frames that fit the template");
        assert_eq!(by_event, read(&[whole.as_bytes()]).0);
        assert_eq!(by_event.len(), events.len());
    }

    /// A remembered payload whose data came in two lines has a line break in it, and a frame
    /// with the same bytes is two lines again, not one event that fits it.
    #[test]
    fn a_payload_with_a_line_break_is_not_a_template() {
        let split = TOKEN.replace(r#","choices""#, "\ndata: \"choices\"");
        let again = TOKEN.replace(r#","choices""#, ",\n\"choices\"");
        let frames = [
            format!("{ROLE}\n\n"),
            format!("{}\n\n", split.replacen("\ndata: ", ",\ndata: ", 1)),
            format!("{again}\n\n"),
        ];
        let frames: Vec<&[u8]> = frames.iter().map(|f| f.as_bytes()).collect();
        let kinds: Vec<EventKind> = run(&frames).0.iter().map(|e| e.kind).collect();
        // The third frame's data is its first line only, which is not JSON.
        assert_eq!(
            kinds,
            [EventKind::Token, EventKind::Token, EventKind::Other]
        );
    }

    #[test]
    fn one_byte_frames() {
        let s = stream();
        let frames: Vec<&[u8]> = s.as_bytes().chunks(1).collect();
        assert_eq!(run(&frames).0, expected(&s));
    }

    #[test]
    fn crlf_and_cr_line_endings_at_every_split() {
        for eol in ["\r\n", "\r"] {
            let s = stream().replace('\n', eol);
            let want: Vec<EventKind> = expected(&stream()).iter().map(|e| e.kind).collect();
            for cut in 0..=s.len() {
                let (a, b) = s.as_bytes().split_at(cut);
                let (seen, partial) = run(&[a, b]);
                let kinds: Vec<EventKind> = seen.iter().map(|e| e.kind).collect();
                assert_eq!(kinds, want, "eol {eol:?} split at {cut}");
                // A "\r\n" split between its two bytes: the event ends at the '\r' and the
                // '\n' is skipped at the start of the next frame.
                let end = if eol == "\r\n" && cut == s.len() - 1 {
                    s.len() - 1
                } else {
                    s.len()
                };
                assert_eq!(seen.last().unwrap().end, end);
                assert!(!partial);
            }
        }
    }

    #[test]
    fn response_id_and_model_are_read_in_place() {
        let mut p = SseParser::new();
        let mut seen = Vec::new();
        p.feed(format!("{ROLE}\n\n").as_bytes(), |e| {
            seen.push((e.id.map(str::to_owned), e.model.map(str::to_owned)))
        });
        assert_eq!(
            seen,
            vec![(Some("chatcmpl-1".to_owned()), Some("m".to_owned()))]
        );
    }

    #[test]
    fn id_and_model_follow_each_chunk_when_the_start_repeats_or_changes() {
        let other = TOKEN
            .replace("chatcmpl-1", "chatcmpl-2")
            .replace(r#""m""#, r#""m2""#);
        let escaped = TOKEN.replace("chatcmpl-1", r"chatcmpl-\u0033");
        let s = format!("{ROLE}\n\n{TOKEN}\n\n{other}\n\n{other}\n\n{escaped}\n\n{TOKEN}\n\n");
        let mut p = SseParser::new();
        let mut seen = Vec::new();
        p.feed(s.as_bytes(), |e| {
            assert_eq!(e.kind, EventKind::Token);
            seen.push((e.id.map(str::to_owned), e.model.map(str::to_owned)))
        });
        let chunk = |id: Option<&str>, model: &str| (id.map(str::to_owned), Some(model.to_owned()));
        assert_eq!(
            seen,
            vec![
                chunk(Some("chatcmpl-1"), "m"),
                chunk(Some("chatcmpl-1"), "m"),
                chunk(Some("chatcmpl-2"), "m2"),
                chunk(Some("chatcmpl-2"), "m2"),
                chunk(None, "m"),
                chunk(Some("chatcmpl-1"), "m"),
            ]
        );
    }

    #[test]
    fn comments_and_other_fields_are_not_data() {
        let s = format!(": keep-alive\n\nevent: message\nid: 7\n{TOKEN}\nretry: 10\n\n");
        let (seen, _) = run(&[s.as_bytes()]);
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].kind, EventKind::NoData);
        assert_eq!(seen[1].kind, EventKind::Token);
        assert!(seen[1].choices[0].has_content);
    }

    #[test]
    fn multi_line_data_is_joined_with_newlines() {
        let s = "data: {\"choices\":\ndata: [{\"index\":0,\"text\":\"a\"}]}\n\n";
        for cut in 0..=s.len() {
            let (a, b) = s.as_bytes().split_at(cut);
            let (seen, _) = run(&[a, b]);
            assert_eq!(seen.len(), 1, "split at {cut}");
            assert_eq!(seen[0].kind, EventKind::Token, "split at {cut}");
            assert!(seen[0].choices[0].has_content);
        }
    }

    #[test]
    fn data_without_space_and_bare_data_field() {
        let (seen, _) = run(&[b"data:[DONE]\n\ndata\n\n"]);
        assert_eq!(seen[0].kind, EventKind::Done);
        assert_eq!(seen[1].kind, EventKind::Other);
    }

    #[test]
    fn n_greater_than_one_reports_each_index() {
        let s = r#"data: {"choices":[{"index":1,"text":"x","finish_reason":null}]}

data: {"choices":[{"index":0,"text":"","finish_reason":"stop"},{"index":1,"text":"y"}]}

"#;
        let (seen, _) = run(&[s.as_bytes()]);
        assert_eq!(
            seen[0].choices,
            vec![ChoiceInfo {
                index: 1,
                has_content: true,
                finish_reason: None
            }]
        );
        assert_eq!(
            seen[1].choices,
            vec![
                ChoiceInfo {
                    index: 0,
                    has_content: false,
                    finish_reason: Some(FinishReason::Stop)
                },
                ChoiceInfo {
                    index: 1,
                    has_content: true,
                    finish_reason: None
                }
            ]
        );
    }

    #[test]
    fn continuous_usage_rides_on_token_events() {
        let s = r#"data: {"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}

"#;
        let (seen, _) = run(&[s.as_bytes()]);
        assert_eq!(seen[0].kind, EventKind::Token);
        assert_eq!(
            seen[0].usage,
            Some(Usage {
                prompt_tokens: Some(3),
                completion_tokens: Some(2)
            })
        );
    }

    #[test]
    fn null_usage_and_null_choices_are_absent() {
        let (seen, _) = run(&[b"data: {\"choices\":null,\"usage\":null}\n\n"]);
        assert_eq!(seen[0].kind, EventKind::Other);
        let (seen, _) =
            run(&[b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n"]);
        assert_eq!(seen[0].kind, EventKind::Token);
        assert_eq!(seen[0].usage, None);
    }

    #[test]
    fn reasoning_and_tool_call_deltas_are_content() {
        for delta in [
            r#"{"reasoning_content":"think"}"#,
            r#"{"reasoning":"think"}"#,
            r#"{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}"#,
        ] {
            let s = format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{delta}}}]}}\n\n");
            let (seen, _) = run(&[s.as_bytes()]);
            assert!(seen[0].choices[0].has_content, "{delta}");
        }
        let (seen, _) =
            run(&[b"data: {\"choices\":[{\"delta\":{\"content\":null,\"tool_calls\":[]}}]}\n\n"]);
        assert!(!seen[0].choices[0].has_content);
    }

    #[test]
    fn error_event_after_200() {
        let s = r#"data: {"error":{"message":"boom","type":"BadRequestError","code":400}}

"#;
        let (seen, _) = run(&[s.as_bytes()]);
        assert_eq!(seen[0].kind, EventKind::Error);
        assert!(seen[0].choices.is_empty());
    }

    #[test]
    fn non_json_and_broken_json_are_other() {
        let s = "data: hello\n\ndata: {\"choices\":[{\"delta\":\n\ndata: 42\n\ndata: {\"choices\":[]}\n\n";
        let (seen, _) = run(&[s.as_bytes()]);
        let kinds: Vec<_> = seen.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec![EventKind::Other; 4]);
    }

    #[test]
    fn stream_ending_without_done_or_blank_line() {
        let s = format!("{TOKEN}\n\n{TOKEN}\n");
        let (seen, partial) = run(&[s.as_bytes()]);
        assert_eq!(seen.len(), 1);
        assert!(partial, "an event without its blank line is pending");
        let (_, partial) = run(&[format!("{TOKEN}\n\n").as_bytes()]);
        assert!(!partial);
    }

    #[test]
    fn empty_frames_change_nothing() {
        let s = stream();
        let (a, b) = s.as_bytes().split_at(10);
        assert_eq!(run(&[b"", a, b"", b, b""]).0, expected(&s));
        // A frame ending in '\r' followed by an empty frame and then '\n'.
        let (seen, _) = run(&[b"data: [DONE]\r", b"", b"\n\r\n"]);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].kind, EventKind::Done);
    }
}
