//! What an event is (`docs/METRICS.md` §1): the serde reference path, and the rules both
//! paths share.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

use super::scan;
use super::{ChoiceInfo, EventKind, FinishReason, Usage};

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
    pub(super) fn of(kind: EventKind) -> Self {
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
        return classified_in(top.error, top.usage, top.id, top.model, choices);
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
pub(super) fn classified_in<'a>(
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
pub(super) fn classified<'a>(
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
