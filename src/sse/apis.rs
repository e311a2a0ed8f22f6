//! The APIs whose streams are not chat chunks: OpenAI's Responses API and Anthropic's Messages
//! API (`docs/METRICS.md`, their sections). Each event of theirs is named by its `type`; this
//! module reads that, says what the event is in the vocabulary the latency state machine
//! already consumes (output / non-output / usage / error / end), and leaves the bytes alone.
//!
//! Pure like the rest of `sse`: no I/O, no clock. Both APIs send few, small events per token
//! (the big ones, `response.completed` with the whole output, come once), so serde's borrowed
//! reading is all they need.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::classify::Classified;
use super::{ChoiceInfo, EventKind, Finish, ServerRaw, Usage};

/// Which API's event rules a stream follows: chosen once per request from its endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dialect {
    /// Chat and completions chunks (`choices`), the rules of `classify`.
    #[default]
    Chat,
    /// `/v1/responses`: `response.*` events.
    Responses,
    /// `/v1/messages`: Anthropic's `message_*` and `content_block_*` events.
    Messages,
}

/// What an output event carried. Every output event is one of these; the state machine
/// times all three alike (TTFT, ITL), and the answer a person reads is `Content`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Reasoning text (`response.reasoning_text.delta`, `thinking_delta`).
    Reasoning,
    /// Arguments of a tool call (`response.function_call_arguments.delta`,
    /// `input_json_delta`).
    ToolCall,
    /// Answer text (`response.output_text.delta`, `text_delta`).
    Content,
}

/// What one event of a Responses or Messages stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiKind {
    /// A delta of generated output: times TTFT and an ITL sample.
    Output(Output),
    /// An event of the API's own bookkeeping (`response.created`, `…added`, `…done`,
    /// `message_start`, `content_block_start`, `message_delta`, a `signature_delta`…): it
    /// neither makes an ITL sample nor resets its clock.
    NonOutput,
    /// The event that ends the response (`response.completed`, `response.incomplete`,
    /// `message_stop`).
    End,
    /// An in-band error (`error`, `response.failed`).
    Error,
    /// A keep-alive (`ping`).
    Ping,
    /// Not JSON, or JSON without a `type` string: counted as unrecognized, never fatal.
    Other,
}

/// Token counts a Responses or Messages event carried, in their own names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApiUsage {
    /// Prompt tokens: Responses' `input_tokens`; Messages' `input_tokens` plus its
    /// `cache_read_input_tokens` and `cache_creation_input_tokens` (Anthropic counts cached
    /// tokens apart; vLLM sends neither and counts all of them in `input_tokens`).
    pub input_tokens: Option<u64>,
    /// Generated tokens (`output_tokens`).
    pub output_tokens: Option<u64>,
    /// Prompt tokens served from the prefix cache: Responses'
    /// `input_tokens_details.cached_tokens`, Messages' `cache_read_input_tokens`.
    pub cached_tokens: Option<u64>,
    /// Responses' `output_tokens_details.reasoning_tokens`.
    pub reasoning_tokens: Option<u64>,
}

impl ApiUsage {
    /// The counts as chat's usage names them.
    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.input_tokens,
            completion_tokens: self.output_tokens,
            cached_prompt_tokens: self.cached_tokens,
            reasoning_tokens: self.reasoning_tokens,
        }
    }
}

/// One event of a Responses or Messages stream, read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiEvent<'a> {
    /// What it is.
    pub kind: ApiKind,
    /// The token counts it carried.
    pub usage: Option<ApiUsage>,
    /// The response's `id` (`resp_…`, `msg_…`), when the event names it as a plain string.
    pub id: Option<&'a str>,
    /// The response's `model`, when the event names it as a plain string.
    pub model: Option<&'a str>,
    /// Why generation stopped, when the event says (`message_delta`'s `stop_reason`, the
    /// status of `response.completed` / `response.incomplete`).
    pub finish: Option<Finish>,
}

impl<'a> ApiEvent<'a> {
    pub(super) fn of(kind: ApiKind) -> Self {
        ApiEvent {
            kind,
            usage: None,
            id: None,
            model: None,
            finish: None,
        }
    }

    /// The event in the vocabulary of chat events, which the latency state machine reads: an
    /// output event is a token event with one choice that has content; the end is `[DONE]`
    /// (with its usage); bookkeeping events and pings carry no data for it (their usage, id,
    /// model and finish reason are still passed on); an error is an error.
    pub fn classified(&self, choices: &mut Vec<ChoiceInfo>) -> Classified<'a> {
        choices.clear();
        let kind = match self.kind {
            ApiKind::Output(output) => {
                choices.push(ChoiceInfo {
                    index: 0,
                    output: true,
                    answer: output == Output::Content,
                    reasoning: output == Output::Reasoning,
                    finish_reason: None,
                });
                EventKind::Token
            }
            ApiKind::NonOutput | ApiKind::Ping => EventKind::NoData,
            ApiKind::End => EventKind::Done,
            ApiKind::Error => EventKind::Error,
            ApiKind::Other => EventKind::Other,
        };
        Classified {
            kind,
            usage: self.usage.map(|u| u.usage()),
            server: ServerRaw::default(),
            id: self.id,
            model: self.model,
            finish: self.finish,
        }
    }
}

/// Classifies one event's data by `dialect`'s rules. `choices` receives the choices of a
/// token event.
pub fn classify_api<'a>(
    dialect: Dialect,
    payload: &'a [u8],
    choices: &mut Vec<ChoiceInfo>,
) -> Classified<'a> {
    if dialect != Dialect::Chat && payload.trim_ascii() == b"[DONE]" {
        // Neither API sends it, but a gateway in between may: the end, as for chat.
        choices.clear();
        return Classified::of(EventKind::Done);
    }
    match dialect {
        Dialect::Chat => super::classify(payload, choices),
        Dialect::Responses => super::responses::event(payload).classified(choices),
        Dialect::Messages => super::messages::event(payload).classified(choices),
    }
}

/// Reads a whole non-streaming body of `dialect`'s API for its usage, id and model.
pub fn classify_body(dialect: Dialect, body: &[u8]) -> Classified<'_> {
    match dialect {
        Dialect::Chat => super::classify(body, &mut Vec::new()),
        Dialect::Responses => super::responses::body(body),
        Dialect::Messages => super::messages::body(body),
    }
}

/// A JSON payload's trimmed bytes, `None` for `[DONE]`-like or non-object data.
pub(super) fn object(payload: &[u8]) -> Option<&[u8]> {
    let trimmed = payload.trim_ascii();
    (trimmed.first() == Some(&b'{')).then_some(trimmed)
}

/// The classification of a whole (non-streaming) answer of either API: a usage event when it
/// carried its counts, else nothing the latency state machine reads.
pub(super) fn whole_body<'a>(
    usage: Option<ApiUsage>,
    id: Option<&'a str>,
    model: Option<&'a str>,
    finish: Option<Finish>,
) -> Classified<'a> {
    let usage = usage.map(|u| u.usage());
    Classified {
        kind: if usage.is_some() {
            EventKind::Usage
        } else {
            EventKind::Other
        },
        usage,
        server: ServerRaw::default(),
        id,
        model,
        finish,
    }
}

/// The text of a raw JSON string without escapes (`"abc"` → `abc`), else `None`.
pub(super) fn plain(raw: Option<&RawValue>) -> Option<&str> {
    let s = raw?.get().strip_prefix('"')?.strip_suffix('"')?;
    (!s.contains('\\')).then_some(s)
}

/// A raw JSON value that is a non-empty string.
pub(super) fn non_empty_string(raw: Option<&RawValue>) -> bool {
    raw.is_some_and(|r| {
        let r = r.get();
        r.starts_with('"') && r != "\"\""
    })
}

/// A token count: a non-negative integer; anything else (absent, `null`, a string, a
/// fraction) is no observation, never a 0, and never makes the event unreadable.
pub(super) fn count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let raw = <&RawValue>::deserialize(d)?;
    Ok(raw.get().parse::<u64>().ok())
}

/// An optional object read leniently: one of an unexpected type is `None` rather than an
/// error, so that a stray field never hides the event's kind. Only a JSON object is one
/// (serde would read a struct from an array too, by position).
pub(super) fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let raw = <&'de RawValue>::deserialize(d)?;
    let raw = raw.get();
    if !raw.starts_with('{') {
        return Ok(None);
    }
    Ok(serde_json::from_str::<T>(raw).ok())
}

/// An optional array read leniently, its items left raw: anything but an array is `None`.
pub(super) fn lenient_items<'de, D>(d: D) -> Result<Option<Vec<&'de RawValue>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let raw = <&'de RawValue>::deserialize(d)?;
    Ok(serde_json::from_str(raw.get()).ok())
}
