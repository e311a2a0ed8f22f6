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
//!
//! Why the response ended is read from the `response` that ends it: `completed` is chat's
//! `stop` (`tool_calls` when its output holds a `function_call`), `incomplete` for
//! `max_output_tokens` is `length`; the status or the incomplete reason is kept as the API's
//! own word.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::apis::{
    ApiEvent, ApiKind, ApiUsage, Output, count, lenient, lenient_items, non_empty_string, object,
    plain, whole_body,
};
use super::classify::Classified;
use super::{EventKind, Finish, FinishReason};

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
    /// The output items, left raw: only a response that ended has each one's type read.
    #[serde(borrow, default, deserialize_with = "lenient_items")]
    output: Option<Vec<&'a RawValue>>,
}

/// An item of a response's `output`: a `message`, a `reasoning`, a `function_call`…
#[derive(Deserialize)]
struct Item<'a> {
    #[serde(borrow, rename = "type", default)]
    kind: Option<&'a RawValue>,
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
    /// Why generation stopped, from the status of a response that ended: `None` while it is
    /// `in_progress` or `queued` (or the status is missing), which says nothing about it.
    fn finish(&self) -> Option<Finish> {
        let (reason, native) = match plain(self.status)? {
            "completed" if self.called_a_tool() => (FinishReason::ToolCalls, "completed"),
            "completed" => (FinishReason::Stop, "completed"),
            "incomplete" => {
                let reason = self
                    .incomplete_details
                    .as_ref()
                    .and_then(|d| plain(d.reason));
                match reason {
                    Some("max_output_tokens") => (FinishReason::Length, "max_output_tokens"),
                    Some("content_filter") => (FinishReason::Other, "content_filter"),
                    _ => (FinishReason::Other, "incomplete"),
                }
            }
            "failed" => (FinishReason::Other, "failed"),
            "cancelled" => (FinishReason::Other, "cancelled"),
            "in_progress" | "queued" => return None,
            _ => (FinishReason::Other, "other"),
        };
        Some(Finish { reason, native })
    }

    /// The output holds a function call: the model stopped to have a tool run.
    fn called_a_tool(&self) -> bool {
        self.output.iter().flatten().any(|item| {
            let item = item.get();
            item.starts_with('{')
                && serde_json::from_str::<Item<'_>>(item)
                    .is_ok_and(|i| plain(i.kind) == Some("function_call"))
        })
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
        finish: if kind == ApiKind::End {
            r.and_then(Response::finish)
        } else {
            None
        },
    }
}

/// Reads a non-streaming Responses body (a `response` object) for its usage, id, model and
/// why it ended.
pub fn body(body: &[u8]) -> Classified<'_> {
    let r = object(body).and_then(|json| serde_json::from_slice::<Response<'_>>(json).ok());
    let Some(r) = r else {
        return Classified::of(EventKind::Other);
    };
    whole_body(
        r.usage.as_ref().map(|u| u.counts()),
        plain(r.id),
        plain(r.model),
        r.finish(),
    )
}
