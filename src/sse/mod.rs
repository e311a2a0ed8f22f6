//! Incremental Server-Sent Events splitter and classifier.
//!
//! Pure: no I/O, no clock. [`SseParser::feed`] takes the bytes of one body frame as they arrive
//! (half an event, or many) and reports each event at the blank line that completes it, with
//! its byte offset in that frame, classified as `docs/METRICS.md` §1 says: token, usage,
//! error, `[DONE]` or other. JSON is looked at only as far as classification needs and is never
//! re-serialized; in the steady state nothing is allocated per event.

/// What an SSE event is, for telemetry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A JSON object whose `choices` array is non-empty (a choice event). Whether it streamed
    /// output is per choice: [`ChoiceInfo::output`].
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
    /// An event longer than the parser may hold: passed over unread.
    Oversized,
}

/// What one choice of a token event carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ChoiceInfo {
    /// The choice's `index` (0 when absent).
    pub index: u32,
    /// The choice streamed output, by the rules of the current `vllm bench serve`
    /// (`docs/METRICS.md` §1): a chat delta with non-empty `content`, `reasoning`,
    /// `reasoning_content`, `tool_calls` or `function_call`, or with `content: ""` and no `role`
    /// (a special token that decodes to nothing); any completions choice (no `delta`), empty
    /// `text` included. Not so: a role chunk (`{"role":"assistant","content":""}` or
    /// `content: null`) or a finish-only `{"delta":{}}`.
    pub output: bool,
    /// Non-empty `delta.content` or `text`: part of the answer a person reads.
    pub answer: bool,
    /// Non-empty `delta.reasoning` or `delta.reasoning_content`: the model is thinking.
    pub reasoning: bool,
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

/// Why a Responses or Messages response ended: in chat's vocabulary, which every endpoint's
/// figures share, and in the API's own word, which that vocabulary may lose (Messages'
/// `stop_sequence` and `end_turn` are both `stop`; Responses' `content_filter` is `other`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finish {
    /// The chat finish reason it maps onto.
    pub reason: FinishReason,
    /// The API's own value, one of a fixed set (`docs/METRICS.md`, the sections of these APIs):
    /// Messages' `stop_reason`, or Responses' status or incomplete reason; `other` for any
    /// value not in the set, so that it stays bounded.
    pub native: &'static str,
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
    /// `usage.prompt_tokens_details.cached_tokens`: prompt tokens served from the prefix
    /// cache. A details object that is not one, or a count that is not a non-negative
    /// integer, is no observation (never a reason to drop the rest of the usage).
    #[serde(
        default,
        rename = "prompt_tokens_details",
        deserialize_with = "classify::cached_tokens_de"
    )]
    pub cached_prompt_tokens: Option<u64>,
    /// `usage.completion_tokens_details.reasoning_tokens` (Responses:
    /// `output_tokens_details.reasoning_tokens`): generated tokens the model spent reasoning,
    /// part of `completion_tokens`. Read as leniently as the cached tokens.
    #[serde(
        default,
        rename = "completion_tokens_details",
        deserialize_with = "classify::reasoning_tokens_de"
    )]
    pub reasoning_tokens: Option<u64>,
}

/// The raw `metrics` (vLLM) and `timings` (llama.cpp) values of an event, both `None` for
/// almost every event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerRaw<'a> {
    pub(crate) metrics: Option<&'a [u8]>,
    pub(crate) timings: Option<&'a [u8]>,
}

impl ServerRaw<'_> {
    /// What they say, when the event carried a usable field (`docs/METRICS.md` §6).
    pub fn timings(&self) -> Option<ServerTimings> {
        if self.metrics.is_none() && self.timings.is_none() {
            return None;
        }
        classify::server_timings(self.metrics, self.timings)
    }
}

/// Where the upstream says a request's time went (`docs/METRICS.md` §6): vLLM's per-request
/// `metrics` object (`--enable-per-request-metrics`) or llama.cpp's `timings`, read from
/// whichever event (or JSON body) carries them. A field that is absent, `null`, not a number
/// or negative is `None`: no observation, never a zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServerTimings {
    /// vLLM `queue_time_ms`: queued until scheduled.
    pub queue: Option<std::time::Duration>,
    /// vLLM `time_to_first_token_ms` (scheduled to first token), llama.cpp `prompt_ms`.
    pub prefill: Option<std::time::Duration>,
    /// vLLM `generation_time_ms`, llama.cpp `predicted_ms`: first token to last.
    pub decode: Option<std::time::Duration>,
    /// llama.cpp `cache_n`: prompt tokens reused from the cache.
    pub cached_prompt_tokens: Option<u64>,
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
    /// The upstream's own timings (`metrics` or `timings`), when the event carried them: read
    /// with [`ServerRaw::timings`] (most events carry none, and pay nothing for them).
    pub server: ServerRaw<'a>,
    /// Offset in the current frame just past the blank line that ends this event.
    pub end: usize,
    /// The chunk's `id` (for example `chatcmpl-…`), when it is a plain JSON string.
    pub id: Option<&'a str>,
    /// The chunk's `model`, when it is a plain JSON string.
    pub model: Option<&'a str>,
    /// Why the response ended, when this event says so for the whole response (the end of a
    /// Responses stream, Messages' `message_delta`); chat's finish reasons are per choice.
    pub finish: Option<Finish>,
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
            server: c.server,
            end,
            id: c.id,
            model: c.model,
            finish: c.finish,
            data,
        }
    }
}

mod apis;
mod classify;
mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod messages;
mod responses;
pub(crate) mod scan;

pub use apis::{ApiEvent, ApiKind, ApiUsage, Dialect, Output, classify_api, classify_body};
pub use classify::{Classified, classify};
pub use frame::SseParser;

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_apis;

/// The readers of each API's events, for tests and tools that want the richer answer.
pub mod api_events {
    pub use super::messages::event as messages;
    pub use super::responses::event as responses;
}
