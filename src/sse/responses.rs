//! The OpenAI Responses API's events (`POST /v1/responses`), read as `vllm bench serve
//! --backend openai-responses` reads them (vLLM 0.33's `async_request_openai_responses`).
//!
//! Every event is an `event:` line and a `data:` object whose `type` repeats its name. Output
//! events are `response.output_text.delta` and `response.reasoning_text.delta`, as for bench,
//! and `response.function_call_arguments.delta`, which bench does not count (a tool call is
//! output the model generated: tokentap times it like chat's `tool_calls` deltas). Each needs
//! a non-empty `delta` string. `response.completed` and `response.incomplete` end the response
//! and carry its `usage`; `error` and `response.failed` are in-band errors; every other event
//! (`response.created`, `…added`, `…done`, `…in_progress`) is bookkeeping.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::EventKind;
use super::FinishReason;
use super::apis::{
    ApiEvent, ApiKind, ApiUsage, Output, count, lenient, non_empty_string, object, plain,
    whole_body,
};
use super::classify::Classified;

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow, rename = "type", default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    delta: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "lenient")]
    response: Option<Response<'a>>,
}

/// The `response` object of `response.*` lifecycle events, and a non-streaming body.
#[derive(Deserialize)]
struct Response<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    status: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "lenient")]
    incomplete_details: Option<Incomplete<'a>>,
    #[serde(default, deserialize_with = "lenient")]
    usage: Option<ResponseUsage>,
}

#[derive(Deserialize)]
struct Incomplete<'a> {
    #[serde(borrow, default)]
    reason: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ResponseUsage {
    #[serde(default, deserialize_with = "count")]
    input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    output_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient")]
    input_tokens_details: Option<InputDetails>,
    #[serde(default, deserialize_with = "lenient")]
    output_tokens_details: Option<OutputDetails>,
}

#[derive(Deserialize)]
struct InputDetails {
    #[serde(default, deserialize_with = "count")]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct OutputDetails {
    #[serde(default, deserialize_with = "count")]
    reasoning_tokens: Option<u64>,
}

impl ResponseUsage {
    fn counts(&self) -> ApiUsage {
        ApiUsage {
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cached_tokens: self
                .input_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens),
            reasoning_tokens: self
                .output_tokens_details
                .as_ref()
                .and_then(|d| d.reasoning_tokens),
        }
    }
}

impl<'a> Response<'a> {
    /// Why generation stopped, from the status of a response that ended.
    fn finish_reason(&self) -> Option<FinishReason> {
        match plain(self.status)? {
            "completed" => Some(FinishReason::Stop),
            "incomplete" => {
                let reason = self
                    .incomplete_details
                    .as_ref()
                    .and_then(|d| plain(d.reason));
                Some(match reason {
                    Some("max_output_tokens") => FinishReason::Length,
                    _ => FinishReason::Other,
                })
            }
            _ => None,
        }
    }
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
    let output = |o| {
        if non_empty_string(e.delta) {
            ApiKind::Output(o)
        } else {
            ApiKind::NonOutput
        }
    };
    let kind = match name {
        "response.output_text.delta" => output(Output::Content),
        "response.reasoning_text.delta" => output(Output::Reasoning),
        "response.function_call_arguments.delta" => output(Output::ToolCall),
        "response.completed" | "response.incomplete" => ApiKind::End,
        "error" | "response.failed" => ApiKind::Error,
        _ => ApiKind::NonOutput,
    };
    let r = e.response.as_ref();
    ApiEvent {
        kind,
        usage: r.and_then(|r| r.usage.as_ref()).map(ResponseUsage::counts),
        id: r.and_then(|r| plain(r.id)),
        model: r.and_then(|r| plain(r.model)),
        finish_reason: if kind == ApiKind::End {
            r.and_then(Response::finish_reason)
        } else {
            None
        },
    }
}

/// Reads a non-streaming Responses body (a `response` object) for its usage, id and model.
pub fn body(body: &[u8]) -> Classified<'_> {
    let r = object(body).and_then(|json| serde_json::from_slice::<Response<'_>>(json).ok());
    let Some(r) = r else {
        return Classified::of(EventKind::Other);
    };
    whole_body(
        r.usage.as_ref().map(|u| u.counts()),
        plain(r.id),
        plain(r.model),
    )
}
