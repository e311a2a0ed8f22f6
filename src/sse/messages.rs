//! Anthropic's Messages API events (`POST /v1/messages`), which vLLM's `/v1/messages` follows.
//!
//! Every event is an `event:` line and a `data:` object whose `type` repeats its name.
//! Output events are `content_block_delta`s whose delta is a `text_delta`, a `thinking_delta`
//! or an `input_json_delta` with non-empty text (a `signature_delta`, which closes a thinking
//! block, is not output). `message_start` carries the prompt's token counts,
//! `message_delta` the generated tokens and the stop reason, `message_stop` ends the
//! response, `ping` keeps the connection alive and `error` is an in-band error.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::apis::{
    ApiEvent, ApiKind, ApiUsage, Output, count, lenient, non_empty_string, object, plain,
    whole_body,
};
use super::classify::Classified;
use super::{EventKind, Finish, FinishReason};

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow, rename = "type", default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "lenient")]
    message: Option<Message<'a>>,
    #[serde(borrow, default, deserialize_with = "lenient")]
    delta: Option<Delta<'a>>,
    #[serde(default, deserialize_with = "lenient")]
    usage: Option<MessageUsage>,
}

/// `message_start`'s `message`, and a non-streaming body.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "lenient")]
    usage: Option<MessageUsage>,
    /// Set in a whole message; `null` in `message_start` (it comes with `message_delta`).
    #[serde(borrow, default)]
    stop_reason: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, rename = "type", default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    thinking: Option<&'a RawValue>,
    #[serde(borrow, default)]
    partial_json: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stop_reason: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MessageUsage {
    #[serde(default, deserialize_with = "count")]
    input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    output_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    cache_read_input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    cache_creation_input_tokens: Option<u64>,
}

impl MessageUsage {
    /// The counts; Anthropic's `input_tokens` leaves out the cached tokens, which are added
    /// back so that prompt tokens mean what they mean for chat.
    fn counts(&self) -> ApiUsage {
        let cached = self.cache_read_input_tokens.unwrap_or(0);
        let created = self.cache_creation_input_tokens.unwrap_or(0);
        ApiUsage {
            input_tokens: self
                .input_tokens
                .map(|n| n.saturating_add(cached).saturating_add(created)),
            output_tokens: self.output_tokens,
            cached_tokens: self.cache_read_input_tokens,
            reasoning_tokens: None,
        }
    }
}

/// An Anthropic `stop_reason`, in chat's words and kept as it is when it is one of Anthropic's
/// documented values (anything else is `other`); `None` for `null` or a missing one.
fn finish(raw: Option<&RawValue>) -> Option<Finish> {
    let (reason, native) = match plain(raw)? {
        "end_turn" => (FinishReason::Stop, "end_turn"),
        "stop_sequence" => (FinishReason::Stop, "stop_sequence"),
        "max_tokens" => (FinishReason::Length, "max_tokens"),
        "model_context_window_exceeded" => (FinishReason::Length, "model_context_window_exceeded"),
        "tool_use" => (FinishReason::ToolCalls, "tool_use"),
        "pause_turn" => (FinishReason::Other, "pause_turn"),
        "refusal" => (FinishReason::Other, "refusal"),
        _ => (FinishReason::Other, "other"),
    };
    Some(Finish { reason, native })
}

/// Reads one event's data.
pub fn event(payload: &[u8]) -> ApiEvent<'_> {
    let Some(json) = object(payload) else {
        return ApiEvent::of(ApiKind::Other);
    };
    let Ok(e) = serde_json::from_slice::<Event<'_>>(json) else {
        return ApiEvent::of(ApiKind::Other);
    };
    let Some(name) = plain(e.kind) else {
        return ApiEvent::of(ApiKind::Other);
    };
    let mut out = ApiEvent::of(ApiKind::NonOutput);
    match name {
        "content_block_delta" => {
            if let Some(d) = &e.delta {
                let (output, text) = match plain(d.kind) {
                    Some("text_delta") => (Output::Content, d.text),
                    Some("thinking_delta") => (Output::Reasoning, d.thinking),
                    Some("input_json_delta") => (Output::ToolCall, d.partial_json),
                    _ => return out,
                };
                if non_empty_string(text) {
                    out.kind = ApiKind::Output(output);
                }
            }
        }
        "message_start" => {
            if let Some(m) = &e.message {
                out.id = plain(m.id);
                out.model = plain(m.model);
                // The output count here is a placeholder (vLLM sends 0): the one that counts
                // comes with `message_delta`, and a stream cut before it falls back to
                // counting output events.
                out.usage = m.usage.as_ref().map(|u| ApiUsage {
                    output_tokens: None,
                    ..u.counts()
                });
            }
        }
        "message_delta" => {
            out.usage = e.usage.as_ref().map(MessageUsage::counts);
            out.finish = e.delta.as_ref().and_then(|d| finish(d.stop_reason));
        }
        "message_stop" => out.kind = ApiKind::End,
        "ping" => out.kind = ApiKind::Ping,
        "error" => out.kind = ApiKind::Error,
        _ => {}
    }
    out
}

/// Reads a non-streaming Messages body (a `message` object) for its usage, id, model and
/// stop reason.
pub fn body(body: &[u8]) -> Classified<'_> {
    let m = object(body).and_then(|json| serde_json::from_slice::<Message<'_>>(json).ok());
    let Some(m) = m else {
        return Classified::of(EventKind::Other);
    };
    whole_body(
        m.usage.as_ref().map(|u| u.counts()),
        plain(m.id),
        plain(m.model),
        finish(m.stop_reason),
    )
}
