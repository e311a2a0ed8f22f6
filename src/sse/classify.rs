//! What an event is (`docs/METRICS.md` §1): the serde reference path, and the rules both
//! paths share.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

use super::scan;
use super::{ChoiceInfo, EventKind, Finish, FinishReason, ServerRaw, ServerTimings, Usage};

/// What [`classify`] found in one event's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified<'a> {
    /// The kind.
    pub kind: EventKind,
    /// The `usage` object, if any.
    pub usage: Option<Usage>,
    /// The upstream's own timings (`metrics` or `timings`), if any.
    pub server: ServerRaw<'a>,
    /// The chunk's `id`.
    pub id: Option<&'a str>,
    /// The chunk's `model`.
    pub model: Option<&'a str>,
    /// Why the whole response ended (Responses and Messages only).
    pub finish: Option<Finish>,
}

impl Classified<'_> {
    pub(super) fn of(kind: EventKind) -> Self {
        Classified {
            kind,
            usage: None,
            server: ServerRaw::default(),
            id: None,
            model: None,
            finish: None,
        }
    }
}

/// Classifies one event's data. `choices` receives the choices of a token event.
pub fn classify<'a>(payload: &'a [u8], choices: &mut Vec<ChoiceInfo>) -> Classified<'a> {
    classify_in(payload, choices, None)
}

/// [`classify`], reading a payload that starts like an earlier one from where `prefix` ends.
pub(super) fn classify_in<'a>(
    payload: &'a [u8],
    choices: &mut Vec<ChoiceInfo>,
    prefix: Option<&'a mut scan::Prefix>,
) -> Classified<'a> {
    let trimmed = payload.trim_ascii();
    if trimmed == b"[DONE]" {
        return Classified::of(EventKind::Done);
    }
    if trimmed.first() != Some(&b'{') {
        return Classified::of(EventKind::Other);
    }
    choices.clear();
    if let Some(top) = scan::top(trimmed, choices, prefix) {
        return classified_in(&top, choices);
    }
    choices.clear();
    classify_serde(trimmed, choices)
}

/// [`classify`] of a JSON object by the serde visitor: the reference, and the fallback for
/// whatever the fast path does not handle.
pub(super) fn classify_serde<'a>(
    trimmed: &'a [u8],
    choices: &mut Vec<ChoiceInfo>,
) -> Classified<'a> {
    let mut de = serde_json::Deserializer::from_slice(trimmed);
    let top = match (TopSeed { choices }).deserialize(&mut de) {
        Ok(top) => top,
        Err(_) => {
            choices.clear();
            return Classified::of(EventKind::Other);
        }
    };
    let top = scan::Top {
        error: top.error,
        usage: top.usage,
        server: ServerRaw {
            metrics: top.metrics.map(|r| r.get().as_bytes()),
            timings: top.timings.map(|r| r.get().as_bytes()),
        },
        id: top.id.and_then(|r| plain_string(r.get().as_bytes())),
        model: top.model.and_then(|r| plain_string(r.get().as_bytes())),
    };
    classified_in(&top, choices)
}

/// The classification of a parsed event (the same for both parsers), whose token choices are
/// in `choices`; an error event keeps none.
pub(super) fn classified_in<'a>(
    top: &scan::Top<'a>,
    choices: &mut Vec<ChoiceInfo>,
) -> Classified<'a> {
    let c = classified(top, !choices.is_empty());
    if c.kind == EventKind::Error {
        choices.clear();
    }
    c
}

/// The classification of a parsed event that had token choices or not.
pub(super) fn classified<'a>(top: &scan::Top<'a>, has_choices: bool) -> Classified<'a> {
    let usage = top.usage;
    let kind = if top.error {
        EventKind::Error
    } else if has_choices {
        EventKind::Token
    } else if usage.is_some() {
        EventKind::Usage
    } else {
        EventKind::Other
    };
    let other = kind == EventKind::Other;
    Classified {
        kind,
        usage: if other { None } else { usage },
        // Read from any event that carries them: some llama.cpp versions put `timings` on
        // the finish-only choice event.
        server: if top.error {
            ServerRaw::default()
        } else {
            top.server
        },
        id: top.id,
        model: top.model,
        finish: None,
    }
}

/// The upstream's timings from the raw `metrics` (vLLM) and `timings` (llama.cpp) objects;
/// `None` when neither carried a usable field. Read with serde on both paths, so that both
/// agree to the bit; they come once per request, not per chunk.
pub(super) fn server_timings(
    metrics: Option<&[u8]>,
    timings: Option<&[u8]>,
) -> Option<ServerTimings> {
    use serde_json::{Map, Value};
    let object = |raw: Option<&[u8]>| -> Option<Map<String, Value>> {
        match serde_json::from_slice(raw?) {
            Ok(Value::Object(map)) => Some(map),
            _ => None,
        }
    };
    let ms = |o: &Map<String, Value>, key: &str| {
        let v = o.get(key)?.as_f64()?;
        // Negative or absurd: no observation.
        (v.is_finite() && (0.0..1e12).contains(&v))
            .then(|| std::time::Duration::from_secs_f64(v / 1000.0))
    };
    let mut t = ServerTimings::default();
    if let Some(m) = object(metrics) {
        t.queue = ms(&m, "queue_time_ms");
        t.prefill = ms(&m, "time_to_first_token_ms");
        t.decode = ms(&m, "generation_time_ms");
    }
    if let Some(l) = object(timings) {
        t.prefill = t.prefill.or(ms(&l, "prompt_ms"));
        t.decode = t.decode.or(ms(&l, "predicted_ms"));
        t.cached_prompt_tokens = l.get("cache_n").and_then(Value::as_u64);
    }
    (t != ServerTimings::default()).then_some(t)
}

/// `usage.prompt_tokens_details`, read leniently: its `cached_tokens` when that is a
/// non-negative integer, else `None`, whatever else the object holds.
pub(super) fn cached_tokens_de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = <Option<serde_json::Value> as serde::Deserialize>::deserialize(d)?;
    Ok(v.as_ref().and_then(cached_tokens))
}

/// `usage.completion_tokens_details`, read leniently: its `reasoning_tokens` when that is a
/// non-negative integer, else `None`, whatever else the object holds.
pub(super) fn reasoning_tokens_de<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    let v = <Option<serde_json::Value> as serde::Deserialize>::deserialize(d)?;
    Ok(v.as_ref().and_then(|v| v.get("reasoning_tokens")?.as_u64()))
}

/// `cached_tokens` of a `prompt_tokens_details` value.
pub(super) fn cached_tokens(v: &serde_json::Value) -> Option<u64> {
    v.get("cached_tokens")?.as_u64()
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
    metrics: Option<&'de RawValue>,
    timings: Option<&'de RawValue>,
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
    Metrics,
    Timings,
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
                    "metrics" => TopKey::Metrics,
                    "timings" => TopKey::Timings,
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
            metrics: None,
            timings: None,
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
                TopKey::Metrics => top.metrics = Some(map.next_value::<&'de RawValue>()?),
                TopKey::Timings => top.timings = Some(map.next_value::<&'de RawValue>()?),
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
    /// `None` without a `delta` (a completions choice), `Some(None)` for `delta: null`.
    #[serde(borrow, default, deserialize_with = "present")]
    delta: Option<Option<Delta<'a>>>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    finish_reason: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    role: Option<&'a RawValue>,
    #[serde(borrow, default)]
    function_call: Option<&'a RawValue>,
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
            r.map(|r| r.get().as_bytes()).filter(|r| *r != b"null")
        }
        let (output, answer, reasoning) = match &self.delta {
            Some(None) => (false, false, false),
            Some(Some(d)) => delta_output(&DeltaFields {
                role: raw(d.role),
                content: raw(d.content),
                reasoning: raw(d.reasoning),
                reasoning_content: raw(d.reasoning_content),
                tool_calls: raw(d.tool_calls),
                function_call: raw(d.function_call),
            }),
            None => (true, non_empty(raw(self.text)), false),
        };
        ChoiceInfo {
            index: self.index.unwrap_or(0),
            output,
            answer,
            reasoning,
            finish_reason: finish_reason(raw(self.finish_reason)),
        }
    }
}

/// A field that is present, `null` or not: `Some(None)` for `null`, `None` (by `default`)
/// when absent.
fn present<'de, D: Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    <Option<T> as serde::Deserialize<'de>>::deserialize(d).map(Some)
}

/// The raw values of a chat `delta`'s fields that classification reads (`None` when absent or
/// `null`).
#[derive(Default)]
pub(super) struct DeltaFields<'a> {
    pub(super) role: Option<&'a [u8]>,
    pub(super) content: Option<&'a [u8]>,
    pub(super) reasoning: Option<&'a [u8]>,
    pub(super) reasoning_content: Option<&'a [u8]>,
    pub(super) tool_calls: Option<&'a [u8]>,
    pub(super) function_call: Option<&'a [u8]>,
}

/// Whether a chat delta streamed output (`docs/METRICS.md` §1), carried answer text, and
/// carried reasoning. `content: ""` counts only without a `role`: vLLM's opening role chunk
/// carries it too, and is no token, while a special token that decodes to nothing is one.
pub(super) fn delta_output(d: &DeltaFields<'_>) -> (bool, bool, bool) {
    let answer = non_empty(d.content);
    let reasoning = non_empty(d.reasoning) || non_empty(d.reasoning_content);
    let output = answer
        || reasoning
        || non_empty(d.tool_calls)
        || non_empty(d.function_call)
        || (d.content == Some(&b"\"\""[..]) && d.role.is_none());
    (output, answer, reasoning)
}

/// A raw `finish_reason` value.
pub(super) fn finish_reason(raw: Option<&[u8]>) -> Option<FinishReason> {
    match raw? {
        b"null" => None,
        b"\"stop\"" => Some(FinishReason::Stop),
        b"\"length\"" => Some(FinishReason::Length),
        b"\"tool_calls\"" => Some(FinishReason::ToolCalls),
        _ => Some(FinishReason::Other),
    }
}

/// A raw JSON value that carries something: not `null`, `""`, `[]` or `{}`.
pub(super) fn non_empty(raw: Option<&[u8]>) -> bool {
    raw.is_some_and(|raw| !matches!(raw, b"null" | b"\"\"" | b"[]" | b"{}"))
}
