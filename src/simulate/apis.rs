//! `/v1/responses` and `/v1/messages`, served the way vLLM serves them: the request becomes the
//! chat completion it stands for, which is generated with the chat timing model, faults and
//! cancellation; its chunks are told as the API's own events as they come (vLLM's Anthropic
//! endpoint does exactly this with its chat stream). Reasoning and tool-call deltas of the chat
//! stream become the APIs' reasoning (`thinking`) and function-call (`tool_use`) output.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::metrics::Shared;
use super::request::{ApiError, Endpoint};
use super::service::{SimAbort, SimBody, api_error, generate_from, read_json, response};

/// Which API a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    /// OpenAI's Responses API.
    Responses,
    /// Anthropic's Messages API.
    Messages,
}

/// Serves one Responses or Messages request.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    api: Api,
    req: Request<hyper::body::Incoming>,
    arrival: Instant,
) -> Result<Response<SimBody>, SimAbort> {
    shared
        .counters
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (parts, obj) = match read_json(req).await {
        Ok(v) => v,
        Err(e) => return Ok(error(api, &e)),
    };
    let chat = match api {
        Api::Responses => responses_to_chat(obj),
        Api::Messages => messages_to_chat(obj),
    };
    let chat = match chat {
        Ok(c) => c,
        Err(e) => return Ok(error(api, &e)),
    };
    let resp = generate_from(shared, Endpoint::Chat, parts, chat, arrival).await?;
    let streamed = resp
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if resp.status() != StatusCode::OK {
        if api == Api::Messages {
            let (parts, body) = resp.into_parts();
            let chat = body
                .full_bytes()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                .unwrap_or(Value::Null);
            let message = chat["error"]["message"].as_str().unwrap_or("error");
            return Ok(response(
                parts.status,
                "application/json",
                SimBody::full(anthropic_error(parts.status, message)),
            ));
        }
        return Ok(resp);
    }
    let (parts, body) = resp.into_parts();
    if streamed {
        let mut resp = Response::from_parts(parts, SimBody::api(ApiStream::new(api, body)));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        return Ok(resp);
    }
    let full = body
        .full_bytes()
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .unwrap_or(Value::Null);
    let converted = match api {
        Api::Responses => full_response(&full),
        Api::Messages => full_message(&full),
    };
    Ok(response(
        StatusCode::OK,
        "application/json",
        SimBody::full(serde_json::to_vec(&converted).unwrap_or_default()),
    ))
}

/// An error answer in the API's shape: OpenAI's for Responses (as vLLM answers), Anthropic's
/// `{"type":"error","error":{"type","message"}}` for Messages.
fn error(api: Api, e: &ApiError) -> Response<SimBody> {
    match api {
        Api::Responses => api_error(e),
        Api::Messages => response(
            e.status,
            "application/json",
            SimBody::full(anthropic_error(e.status, &e.message)),
        ),
    }
}

/// Anthropic's error body for `status`.
fn anthropic_error(status: StatusCode, message: &str) -> Vec<u8> {
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 | 503 => "overloaded_error",
        _ => "api_error",
    };
    serde_json::to_vec(&json!({"type": "error", "error": {"type": kind, "message": message}}))
        .unwrap_or_default()
}

/// The text of a message `content`: a string, or the `text` of its parts joined.
fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// `stream` as a bool, refusing other types as vLLM's validation does.
fn stream_flag(obj: &Map<String, Value>) -> Result<bool, ApiError> {
    match obj.get("stream") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::validation(
            Some("stream"),
            "1 validation error: `stream` should be a valid boolean",
        )),
    }
}

/// The chat request a Responses request stands for: `instructions` as the system message,
/// `input` (a string or a list of messages) as the conversation, `max_output_tokens` as
/// `max_tokens`; streams ask for usage, which `response.completed` reports.
fn responses_to_chat(obj: Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    let mut messages = Vec::new();
    if let Some(Value::String(s)) = obj.get("instructions") {
        messages.push(json!({"role": "system", "content": s}));
    }
    match obj.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for item in items {
                let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                let content = match item.get("content") {
                    Some(c) => text_of(Some(c)),
                    None => text_of(item.get("output")),
                };
                messages.push(json!({"role": role, "content": content}));
            }
        }
        _ => {
            return Err(ApiError::validation(
                Some("input"),
                "1 validation error: `input` is required and must be a string or a list",
            ));
        }
    }
    chat_request(&obj, messages, obj.get("max_output_tokens"), false)
}

/// The chat request a Messages request stands for, as vLLM builds it: `system` first, each
/// message's text, `max_tokens` (required); streams ask for usage and continuous usage.
fn messages_to_chat(obj: Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    let mut messages = Vec::new();
    if let Some(s @ (Value::String(_) | Value::Array(_))) = obj.get("system") {
        messages.push(json!({"role": "system", "content": text_of(Some(s))}));
    }
    let Some(Value::Array(items)) = obj.get("messages") else {
        return Err(ApiError::validation(
            Some("messages"),
            "1 validation error: `messages` is required and must be a list",
        ));
    };
    for item in items {
        let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
        messages.push(json!({"role": role, "content": text_of(item.get("content"))}));
    }
    if !obj.get("max_tokens").is_some_and(Value::is_u64) {
        return Err(ApiError::validation(
            Some("max_tokens"),
            "1 validation error: `max_tokens` is required and must be an integer",
        ));
    }
    chat_request(&obj, messages, obj.get("max_tokens"), true)
}

fn chat_request(
    obj: &Map<String, Value>,
    messages: Vec<Value>,
    max_tokens: Option<&Value>,
    continuous: bool,
) -> Result<Map<String, Value>, ApiError> {
    let stream = stream_flag(obj)?;
    let mut chat = Map::new();
    if let Some(model) = obj.get("model") {
        chat.insert("model".to_owned(), model.clone());
    }
    chat.insert("messages".to_owned(), Value::Array(messages));
    if let Some(max) = max_tokens.filter(|v| !v.is_null()) {
        chat.insert("max_tokens".to_owned(), max.clone());
    }
    // The simulator's own knobs pass through (`ignore_eos`, like vLLM's extra parameters).
    if let Some(v) = obj.get("ignore_eos") {
        chat.insert("ignore_eos".to_owned(), v.clone());
    }
    chat.insert("stream".to_owned(), Value::Bool(stream));
    if stream {
        chat.insert(
            "stream_options".to_owned(),
            json!({"include_usage": true, "continuous_usage_stats": continuous}),
        );
    }
    Ok(chat)
}

/// The chat completion's reasoning text (`reasoning` or `reasoning_content`).
fn reasoning_of(v: &Value) -> Option<&str> {
    v.get("reasoning")
        .or_else(|| v.get("reasoning_content"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn usage_of(chat: &Value) -> (u64, u64) {
    let u = &chat["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap_or(0),
        u["completion_tokens"].as_u64().unwrap_or(0),
    )
}

/// A non-streaming chat completion as a Responses `response` object.
fn full_response(chat: &Value) -> Value {
    let choice = &chat["choices"][0];
    let message = &choice["message"];
    let suffix = id_suffix(chat);
    let mut output = Vec::new();
    if let Some(r) = reasoning_of(message) {
        output.push(
            json!({"id": format!("rs_{suffix}"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": r}], "status": "completed"}),
        );
    }
    if let Some(text) = message["content"].as_str().filter(|s| !s.is_empty()) {
        output.push(
            json!({"id": format!("msg_{suffix}"), "type": "message", "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}),
        );
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        output.push(
            json!({"id": format!("fc_{suffix}"), "type": "function_call",
            "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": "completed"}),
        );
    }
    let (prompt, completion) = usage_of(chat);
    let finish = choice["finish_reason"].as_str();
    response_object(chat, output, finish, Some((prompt, completion, 0)))
}

fn id_suffix(chat: &Value) -> String {
    let id = chat["id"].as_str().unwrap_or("");
    id.rsplit('-').next().unwrap_or(id).to_owned()
}

/// A Responses `response` object; `usage` is (input, output, reasoning) tokens.
fn response_object(
    chat: &Value,
    output: Vec<Value>,
    finish: Option<&str>,
    usage: Option<(u64, u64, u64)>,
) -> Value {
    let (status, incomplete) = match finish {
        None => ("in_progress", Value::Null),
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some(_) => ("completed", Value::Null),
    };
    let usage = usage.map_or(Value::Null, |(input, output, reasoning)| {
        json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": input + output})
    });
    json!({"id": format!("resp_{}", id_suffix(chat)), "object": "response",
        "created_at": chat["created"], "model": chat["model"], "status": status,
        "incomplete_details": incomplete, "output": output, "usage": usage})
}

/// A non-streaming chat completion as an Anthropic `message`.
fn full_message(chat: &Value) -> Value {
    let choice = &chat["choices"][0];
    let message = &choice["message"];
    let mut content = Vec::new();
    if let Some(r) = reasoning_of(message) {
        content.push(json!({"type": "thinking", "thinking": r, "signature": id_suffix(chat)}));
    }
    if let Some(text) = message["content"].as_str().filter(|s| !s.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        let input = call["function"]["arguments"]
            .as_str()
            .and_then(|a| serde_json::from_str::<Value>(a).ok())
            .unwrap_or(json!({}));
        content.push(json!({"type": "tool_use", "id": call["id"],
            "name": call["function"]["name"], "input": input}));
    }
    let (prompt, completion) = usage_of(chat);
    json!({"id": chat["id"], "type": "message", "role": "assistant", "model": chat["model"],
        "content": content, "stop_reason": stop_reason(choice["finish_reason"].as_str()),
        "stop_sequence": null,
        "usage": {"input_tokens": prompt, "output_tokens": completion}})
}

/// vLLM's mapping of a chat `finish_reason` to an Anthropic `stop_reason`.
fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls") => "tool_use",
        _ => "end_turn",
    }
}

/// The block or item being streamed.
#[derive(Clone, Debug, PartialEq)]
enum Open {
    Reasoning,
    Text,
    /// A function call: its chat `index`, call id and name.
    Tool(u64, String, String),
}

/// A chat stream told as a Responses or Messages stream.
pub(crate) struct ApiStream {
    api: Api,
    inner: SimBody,
    /// Bytes of a chat event not yet complete.
    pending: Vec<u8>,
    started: bool,
    ended: bool,
    /// The response's `response` head (id, model, created) once known.
    chat_head: Value,
    open: Option<Open>,
    /// Text of the open block (for the Responses `…done` events).
    text: String,
    /// Index of the open block / output item.
    index: u64,
    /// Responses: output items completed.
    items: Vec<Value>,
    /// Responses: every event's `sequence_number`.
    sequence: u64,
    finish: Option<String>,
    prompt: u64,
    completion: u64,
    reasoning_events: u64,
    errored: bool,
}

impl ApiStream {
    fn new(api: Api, inner: SimBody) -> Self {
        ApiStream {
            api,
            inner,
            pending: Vec::new(),
            started: false,
            ended: false,
            chat_head: Value::Null,
            open: None,
            text: String::new(),
            index: 0,
            items: Vec::new(),
            sequence: 0,
            finish: None,
            prompt: 0,
            completion: 0,
            reasoning_events: 0,
            errored: false,
        }
    }

    pub(super) fn is_end_stream(&self) -> bool {
        self.ended
    }

    /// Polls the chat stream and hands on what its next frame becomes; a frame that becomes
    /// nothing is skipped.
    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, SimAbort>>> {
        loop {
            if self.ended {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                None => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
                Some(Err(e)) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Some(Ok(frame)) => {
                    let Some(data) = frame.data_ref() else {
                        continue;
                    };
                    self.pending.extend_from_slice(data);
                    let mut out = String::new();
                    while let Some(end) = memchr::memmem::find(&self.pending, b"\n\n") {
                        let event: Vec<u8> = self.pending.drain(..end + 2).collect();
                        let data = event
                            .strip_prefix(b"data: ")
                            .map(|d| d.trim_ascii())
                            .unwrap_or_default();
                        self.chat_event(data, &mut out);
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
            }
        }
    }

    /// Tells one chat event's data as the API's events, appended to `out`.
    fn chat_event(&mut self, data: &[u8], out: &mut String) {
        if data == b"[DONE]" {
            if !self.errored {
                self.close(out);
                self.finish(out);
            }
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        if let Some(error) = chunk.get("error") {
            self.errored = true;
            let message = error["message"].as_str().unwrap_or("Internal server error");
            match self.api {
                Api::Responses => self.emit(
                    out,
                    "error",
                    json!({"code": "server_error", "message": message, "param": null}),
                ),
                Api::Messages => self.emit(
                    out,
                    "error",
                    json!({"error": {"type": "api_error", "message": message}}),
                ),
            }
            return;
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.prompt = u["prompt_tokens"].as_u64().unwrap_or(self.prompt);
            self.completion = u["completion_tokens"].as_u64().unwrap_or(self.completion);
        }
        if !self.started {
            self.started = true;
            self.chat_head = json!({"id": chunk["id"], "model": chunk["model"],
                "created": chunk["created"]});
            self.start(out);
        }
        let Some(choice) = chunk["choices"].get(0) else {
            return;
        };
        if let Some(f) = choice["finish_reason"].as_str() {
            self.finish = Some(f.to_owned());
        }
        let delta = &choice["delta"];
        if let Some(r) = reasoning_of(delta) {
            self.reasoning_events += 1;
            self.output(out, Open::Reasoning, r);
        }
        if let Some(text) = delta["content"].as_str().filter(|s| !s.is_empty()) {
            self.output(out, Open::Text, text);
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap_or(0);
            let f = &call["function"];
            if let (Some(id), Some(name)) = (call["id"].as_str(), f["name"].as_str()) {
                let tool = Open::Tool(index, id.to_owned(), name.to_owned());
                if self.open.as_ref() != Some(&tool) {
                    self.close(out);
                    self.open_block(out, tool);
                }
            }
            if let Some(args) = f["arguments"].as_str().filter(|a| !a.is_empty())
                && matches!(&self.open, Some(Open::Tool(i, ..)) if *i == index)
            {
                self.text.push_str(args);
                self.delta(out, args);
            }
        }
    }

    /// One event: `event: name` and its data, with `type` (and for Responses
    /// `sequence_number`) set.
    fn emit(&mut self, out: &mut String, name: &str, mut data: Value) {
        if let Some(obj) = data.as_object_mut() {
            obj.insert("type".to_owned(), json!(name));
            if self.api == Api::Responses {
                obj.insert("sequence_number".to_owned(), json!(self.sequence));
                self.sequence += 1;
            }
        }
        out.push_str("event: ");
        out.push_str(name);
        out.push_str("\ndata: ");
        out.push_str(&data.to_string());
        out.push_str("\n\n");
    }

    fn start(&mut self, out: &mut String) {
        match self.api {
            Api::Responses => {
                let r = response_object(&self.chat_head, Vec::new(), None, None);
                self.emit(out, "response.created", json!({"response": r}));
                self.emit(out, "response.in_progress", json!({"response": r}));
            }
            Api::Messages => {
                let message = json!({"id": self.chat_head["id"], "type": "message",
                    "role": "assistant", "content": [], "model": self.chat_head["model"],
                    "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": self.prompt, "output_tokens": 0}});
                self.emit(out, "message_start", json!({"message": message}));
            }
        }
    }

    /// Output of kind `kind`: opens its block if another is open, then its delta.
    fn output(&mut self, out: &mut String, kind: Open, text: &str) {
        if self.open.as_ref() != Some(&kind) {
            self.close(out);
            self.open_block(out, kind);
        }
        self.text.push_str(text);
        self.delta(out, text);
    }

    fn item_id(&self, prefix: &str) -> String {
        format!("{prefix}_{}_{}", id_suffix(&self.chat_head), self.index)
    }

    fn open_block(&mut self, out: &mut String, kind: Open) {
        self.text.clear();
        let index = self.index;
        match self.api {
            Api::Responses => {
                let item = match &kind {
                    Open::Reasoning => json!({"id": self.item_id("rs"), "type": "reasoning",
                        "summary": [], "content": [], "status": "in_progress"}),
                    Open::Text => json!({"id": self.item_id("msg"), "type": "message",
                        "role": "assistant", "content": [], "status": "in_progress"}),
                    Open::Tool(_, id, name) => json!({"id": self.item_id("fc"),
                        "type": "function_call", "call_id": id, "name": name,
                        "arguments": "", "status": "in_progress"}),
                };
                self.emit(
                    out,
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                );
                if kind == Open::Text {
                    let id = self.item_id("msg");
                    self.emit(
                        out,
                        "response.content_part.added",
                        json!({"item_id": id, "output_index": index, "content_index": 0,
                            "part": {"type": "output_text", "text": "", "annotations": []}}),
                    );
                }
            }
            Api::Messages => {
                let block = match &kind {
                    Open::Reasoning => json!({"type": "thinking", "thinking": ""}),
                    Open::Text => json!({"type": "text", "text": ""}),
                    Open::Tool(_, id, name) => {
                        json!({"type": "tool_use", "id": id, "name": name, "input": {}})
                    }
                };
                self.emit(
                    out,
                    "content_block_start",
                    json!({"index": index, "content_block": block}),
                );
            }
        }
        self.open = Some(kind);
    }

    fn delta(&mut self, out: &mut String, text: &str) {
        let index = self.index;
        let Some(open) = self.open.clone() else {
            return;
        };
        match self.api {
            Api::Responses => {
                let (name, prefix) = match open {
                    Open::Reasoning => ("response.reasoning_text.delta", "rs"),
                    Open::Text => ("response.output_text.delta", "msg"),
                    Open::Tool(..) => ("response.function_call_arguments.delta", "fc"),
                };
                let id = self.item_id(prefix);
                let mut data = json!({"item_id": id, "output_index": index, "delta": text});
                if !matches!(open, Open::Tool(..)) {
                    data["content_index"] = json!(0);
                }
                self.emit(out, name, data);
            }
            Api::Messages => {
                let delta = match open {
                    Open::Reasoning => json!({"type": "thinking_delta", "thinking": text}),
                    Open::Text => json!({"type": "text_delta", "text": text}),
                    Open::Tool(..) => json!({"type": "input_json_delta", "partial_json": text}),
                };
                self.emit(
                    out,
                    "content_block_delta",
                    json!({"index": index, "delta": delta}),
                );
            }
        }
    }

    /// Closes the open block or item, if any.
    fn close(&mut self, out: &mut String) {
        let Some(open) = self.open.take() else {
            return;
        };
        let index = self.index;
        let text = std::mem::take(&mut self.text);
        match self.api {
            Api::Responses => {
                let item = match &open {
                    Open::Reasoning => {
                        let id = self.item_id("rs");
                        self.emit(
                            out,
                            "response.reasoning_text.done",
                            json!({"item_id": id, "output_index": index, "content_index": 0,
                                "text": text}),
                        );
                        json!({"id": id, "type": "reasoning", "summary": [],
                            "content": [{"type": "reasoning_text", "text": text}],
                            "status": "completed"})
                    }
                    Open::Text => {
                        let id = self.item_id("msg");
                        let part = json!({"type": "output_text", "text": text,
                            "annotations": []});
                        self.emit(
                            out,
                            "response.output_text.done",
                            json!({"item_id": id, "output_index": index, "content_index": 0,
                                "text": text}),
                        );
                        self.emit(
                            out,
                            "response.content_part.done",
                            json!({"item_id": id, "output_index": index, "content_index": 0,
                                "part": part}),
                        );
                        json!({"id": id, "type": "message", "role": "assistant",
                            "content": [part], "status": "completed"})
                    }
                    Open::Tool(_, call_id, name) => {
                        let id = self.item_id("fc");
                        self.emit(
                            out,
                            "response.function_call_arguments.done",
                            json!({"item_id": id, "output_index": index, "arguments": text}),
                        );
                        json!({"id": id, "type": "function_call", "call_id": call_id,
                            "name": name, "arguments": text, "status": "completed"})
                    }
                };
                self.emit(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item.clone()}),
                );
                self.items.push(item);
            }
            Api::Messages => {
                if open == Open::Reasoning {
                    let signature = self.item_id("sig");
                    self.emit(
                        out,
                        "content_block_delta",
                        json!({"index": index,
                            "delta": {"type": "signature_delta", "signature": signature}}),
                    );
                }
                self.emit(out, "content_block_stop", json!({"index": index}));
            }
        }
        self.index += 1;
    }

    /// The end of the response: its usage and why it stopped.
    fn finish(&mut self, out: &mut String) {
        let finish = self.finish.clone();
        match self.api {
            Api::Responses => {
                let r = response_object(
                    &self.chat_head,
                    std::mem::take(&mut self.items),
                    Some(finish.as_deref().unwrap_or("stop")),
                    Some((self.prompt, self.completion, self.reasoning_events)),
                );
                let name = if r["status"] == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                self.emit(out, name, json!({"response": r}));
            }
            Api::Messages => {
                self.emit(
                    out,
                    "message_delta",
                    json!({"delta": {"stop_reason": stop_reason(finish.as_deref()),
                            "stop_sequence": null},
                        "usage": {"input_tokens": self.prompt,
                            "output_tokens": self.completion}}),
                );
                self.emit(out, "message_stop", json!({}));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chat stream with reasoning, then text, then a tool call, as vLLM's chunks.
    const CHAT: [&str; 7] = [
        r#"{"id":"chatcmpl-abc","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":{"prompt_tokens":7,"completion_tokens":0}}"#,
        r#"{"id":"chatcmpl-abc","created":1,"model":"m","choices":[{"index":0,"delta":{"reasoning":"Hmm"}}]}"#,
        r#"{"id":"chatcmpl-abc","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
        r#"{"id":"chatcmpl-abc","created":1,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get","arguments":""}}]}}]}"#,
        r#"{"id":"chatcmpl-abc","created":1,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":1}"}}]},"finish_reason":"tool_calls"}]}"#,
        r#"{"id":"chatcmpl-abc","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":4}}"#,
        "[DONE]",
    ];

    /// The events (name, data) the chat stream becomes.
    fn told(api: Api) -> Vec<(String, Value)> {
        let mut s = ApiStream::new(api, SimBody::full(Bytes::new()));
        let mut out = String::new();
        for chunk in CHAT {
            s.chat_event(chunk.as_bytes(), &mut out);
        }
        out.split_terminator("\n\n")
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                let name = name.strip_prefix("event: ").unwrap().to_owned();
                assert_eq!(data["type"], name.as_str(), "type repeats the event name");
                (name, data)
            })
            .collect()
    }

    #[test]
    fn messages_events_follow_vllms_converter() {
        let events = told(Api::Messages);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let delta = |i: usize| events[i].1["delta"]["type"].as_str().unwrap().to_owned();
        assert_eq!(delta(2), "thinking_delta");
        assert_eq!(
            delta(3),
            "signature_delta",
            "a thinking block closes with its signature"
        );
        assert_eq!(delta(6), "text_delta");
        assert_eq!(delta(9), "input_json_delta");
        assert_eq!(events[9].1["delta"]["partial_json"], r#"{"a":1}"#);
        assert_eq!(events[8].1["content_block"]["name"], "get");
        assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 7);
        assert_eq!(events[11].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(events[11].1["usage"]["output_tokens"], 4);
    }

    #[test]
    fn responses_events_follow_the_openai_stream() {
        let events = told(Api::Responses);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (k, (_, data)) in events.iter().enumerate() {
            assert_eq!(data["sequence_number"], k as u64);
        }
        let done = &events[16].1["response"];
        assert_eq!(done["id"], "resp_abc");
        assert_eq!(done["usage"]["input_tokens"], 7);
        assert_eq!(done["usage"]["output_tokens"], 4);
        assert_eq!(
            done["usage"]["output_tokens_details"]["reasoning_tokens"],
            1
        );
        assert_eq!(done["output"].as_array().unwrap().len(), 3);
        assert_eq!(done["output"][2]["arguments"], r#"{"a":1}"#);
    }

    #[test]
    fn requests_become_the_chat_requests_they_stand_for() {
        let obj = |s: &str| serde_json::from_str::<Map<String, Value>>(s).unwrap();
        let chat = responses_to_chat(obj(
            r#"{"model":"m","instructions":"Be brief","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]}],"max_output_tokens":9,"stream":true}"#,
        ))
        .unwrap();
        assert_eq!(
            Value::Object(chat),
            json!({"model":"m","messages":[{"role":"system","content":"Be brief"},{"role":"user","content":"hi"}],
                "max_tokens":9,"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":false}})
        );
        let chat = messages_to_chat(obj(
            r#"{"model":"m","system":"S","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .unwrap();
        assert_eq!(chat["messages"][0], json!({"role":"system","content":"S"}));
        assert_eq!(chat["stream"], false);
        let body = anthropic_error(StatusCode::SERVICE_UNAVAILABLE, "busy");
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"type":"error","error":{"type":"overloaded_error","message":"busy"}})
        );
        let missing = messages_to_chat(obj(r#"{"model":"m","messages":[]}"#));
        assert_eq!(missing.unwrap_err().param, Some("max_tokens"));
        assert!(responses_to_chat(obj(r#"{"model":"m"}"#)).is_err());
    }
}
