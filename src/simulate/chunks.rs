//! Stream chunks in each flavor's shapes (vLLM: pydantic's `model_dump_json(exclude_unset=True)`
//! field order; llama.cpp: nlohmann's insertion order, `choices` first), and the engine's own
//! per-request figures they carry: vLLM's `metrics`, llama.cpp's `timings`.

use std::time::Duration;

use serde::Serialize;

use super::config::Flavor;
use super::generate::EngineTimes;
use super::request::Endpoint;

/// `system_fingerprint` of llama.cpp-flavored responses (llama-server puts its build there).
pub(crate) const LLAMA_CPP_FINGERPRINT: &str = "b1-tokentap";

fn millis(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e6
}

fn ratio(num: f64, den: f64) -> Option<f64> {
    (den > 0.0).then(|| num / den).filter(|v| v.is_finite())
}

/// vLLM's per-request `metrics` (`--enable-per-request-metrics`), in its field order, built
/// like vLLM's `build_per_request_timing_metrics` from the engine's own instants.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub(crate) struct RequestMetrics {
    /// Slot to first token (the prefill).
    pub time_to_first_token_ms: f64,
    /// First token to last token.
    pub generation_time_ms: f64,
    /// Arrival to slot.
    pub queue_time_ms: f64,
    /// `generation_time_ms / (tokens - 1)`; none for a single token.
    pub mean_itl_ms: Option<f64>,
    /// Tokens / (last token - slot), per second; none when that span is zero.
    pub tokens_per_second: Option<f64>,
}

impl RequestMetrics {
    pub fn new(t: EngineTimes, tokens: u64) -> RequestMetrics {
        let generation = millis(t.decode);
        RequestMetrics {
            time_to_first_token_ms: millis(t.prefill),
            generation_time_ms: generation,
            queue_time_ms: millis(t.queue),
            mean_itl_ms: (tokens > 1).then(|| generation / (tokens - 1) as f64),
            tokens_per_second: ratio(tokens as f64, (t.prefill + t.decode).as_secs_f64()),
        }
    }

    /// `,"metrics":{...}` as a stream chunk has it: vLLM drops none fields there
    /// (`exclude_none`).
    fn write_stream(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b",\"metrics\":{\"time_to_first_token_ms\":");
        push_f64(out, self.time_to_first_token_ms);
        out.extend_from_slice(b",\"generation_time_ms\":");
        push_f64(out, self.generation_time_ms);
        out.extend_from_slice(b",\"queue_time_ms\":");
        push_f64(out, self.queue_time_ms);
        if let Some(v) = self.mean_itl_ms {
            out.extend_from_slice(b",\"mean_itl_ms\":");
            push_f64(out, v);
        }
        if let Some(v) = self.tokens_per_second {
            out.extend_from_slice(b",\"tokens_per_second\":");
            push_f64(out, v);
        }
        out.push(b'}');
    }
}

/// llama.cpp's `timings` object, in its field order. Rates over a zero time are infinite in
/// llama.cpp, which its JSON library writes as `null`; so do these.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub(crate) struct Timings {
    /// Prompt tokens reused from the cache (the simulator has none).
    pub cache_n: u64,
    /// Prompt tokens processed.
    pub prompt_n: u64,
    /// Prompt processing time: slot to first token.
    pub prompt_ms: f64,
    pub prompt_per_token_ms: Option<f64>,
    pub prompt_per_second: Option<f64>,
    /// Tokens generated (all choices), the first included.
    pub predicted_n: u64,
    /// Generation time: first token to last token.
    pub predicted_ms: f64,
    pub predicted_per_token_ms: Option<f64>,
    pub predicted_per_second: Option<f64>,
}

impl Timings {
    pub fn new(t: EngineTimes, prompt_tokens: u64, tokens: u64) -> Timings {
        let (prompt_ms, predicted_ms) = (millis(t.prefill), millis(t.decode));
        Timings {
            cache_n: 0,
            prompt_n: prompt_tokens,
            prompt_ms,
            prompt_per_token_ms: ratio(prompt_ms, prompt_tokens as f64),
            prompt_per_second: ratio(1e3 * prompt_tokens as f64, prompt_ms),
            predicted_n: tokens,
            predicted_ms,
            predicted_per_token_ms: ratio(predicted_ms, tokens as f64),
            predicted_per_second: ratio(1e3 * tokens as f64, predicted_ms),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b",\"timings\":");
        let _ = serde_json::to_writer(&mut *out, self);
    }
}

fn push_num(out: &mut Vec<u8>, n: impl std::fmt::Display) {
    use std::io::Write as _;
    let _ = write!(out, "{n}");
}

/// A float the way Python's `json` and nlohmann write it (`40.0`, `12.5`).
fn push_f64(out: &mut Vec<u8>, v: f64) {
    let _ = serde_json::to_writer(&mut *out, &v);
}

fn push_str(out: &mut Vec<u8>, s: &[u8]) {
    let _ = serde_json::to_writer(&mut *out, &String::from_utf8_lossy(s));
}

/// What one streamed chunk carries for one choice, gathered over the chunk's tokens.
#[derive(Debug, Default)]
pub(crate) struct Pieces {
    /// Answer text (JSON-safe words).
    pub content: Vec<u8>,
    /// Reasoning text (JSON-safe words).
    pub reasoning: Vec<u8>,
    /// The chunk opens the tool call (id, type, name).
    pub tool_start: bool,
    /// Tool-call argument text (escaped when written).
    pub args: Vec<u8>,
}

impl Pieces {
    pub fn clear(&mut self) {
        self.content.clear();
        self.reasoning.clear();
        self.tool_start = false;
        self.args.clear();
    }
}

/// Writes the chunks of one stream, in the flavor's shapes. The constant parts of every chunk
/// are serialized once.
pub(crate) struct ChunkWriter {
    flavor: Flavor,
    endpoint: Endpoint,
    /// vLLM: `data: {"id":...,"object":...,"created":...,"model":...,"choices":[`;
    /// llama.cpp: `data: {"choices":[`.
    head: Vec<u8>,
    /// After the choices' `]`: empty for vLLM; llama.cpp chat:
    /// `,"created":..,"id":..,"model":..,"system_fingerprint":..,"object":".."`; llama.cpp
    /// completions: the same without `id`, which comes last (`id_field`).
    tail: Vec<u8>,
    /// `,"id":"..."` (llama.cpp completions only).
    id_field: Vec<u8>,
    prompt_tokens: u32,
    reasoning_key: &'static str,
    /// Tool name and call id, when the response is a tool call.
    tool: Option<(String, String)>,
    /// A tool call's opening chunk was written: argument fragments follow.
    tool_mode: bool,
}

/// What a [`ChunkWriter`] is built from.
pub(crate) struct StreamShape<'a> {
    pub flavor: Flavor,
    pub endpoint: Endpoint,
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub prompt_tokens: u32,
    pub reasoning_key: &'static str,
    /// (function name, call id) of a tool-call response.
    pub tool: Option<(String, String)>,
}

impl ChunkWriter {
    pub fn new(shape: StreamShape<'_>) -> Self {
        let StreamShape {
            flavor,
            endpoint,
            id,
            created,
            model,
            prompt_tokens,
            reasoning_key,
            tool,
        } = shape;
        let object = match endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let mut head = Vec::with_capacity(128 + model.len());
        let mut tail = Vec::new();
        let mut id_field = Vec::new();
        match flavor {
            Flavor::Vllm => {
                head.extend_from_slice(b"data: {\"id\":");
                let _ = serde_json::to_writer(&mut head, id);
                head.extend_from_slice(b",\"object\":\"");
                head.extend_from_slice(object.as_bytes());
                head.extend_from_slice(b"\",\"created\":");
                push_num(&mut head, created);
                head.extend_from_slice(b",\"model\":");
                let _ = serde_json::to_writer(&mut head, model);
                head.extend_from_slice(b",\"choices\":[");
            }
            Flavor::LlamaCpp => {
                head.extend_from_slice(b"data: {\"choices\":[");
                tail.extend_from_slice(b",\"created\":");
                push_num(&mut tail, created);
                if endpoint == Endpoint::Chat {
                    tail.extend_from_slice(b",\"id\":");
                    let _ = serde_json::to_writer(&mut tail, id);
                } else {
                    id_field.extend_from_slice(b",\"id\":");
                    let _ = serde_json::to_writer(&mut id_field, id);
                }
                tail.extend_from_slice(b",\"model\":");
                let _ = serde_json::to_writer(&mut tail, model);
                tail.extend_from_slice(b",\"system_fingerprint\":\"");
                tail.extend_from_slice(LLAMA_CPP_FINGERPRINT.as_bytes());
                tail.extend_from_slice(b"\",\"object\":\"");
                tail.extend_from_slice(object.as_bytes());
                tail.push(b'"');
            }
        }
        ChunkWriter {
            flavor,
            endpoint,
            head,
            tail,
            id_field,
            prompt_tokens,
            reasoning_key,
            tool,
            tool_mode: false,
        }
    }

    fn usage(&self, out: &mut Vec<u8>, completion: u64) {
        let prompt = u64::from(self.prompt_tokens);
        match self.flavor {
            Flavor::Vllm => {
                out.extend_from_slice(b",\"usage\":{\"prompt_tokens\":");
                push_num(out, prompt);
                out.extend_from_slice(b",\"total_tokens\":");
                push_num(out, prompt + completion);
                out.extend_from_slice(b",\"completion_tokens\":");
                push_num(out, completion);
            }
            Flavor::LlamaCpp => {
                out.extend_from_slice(b",\"usage\":{\"completion_tokens\":");
                push_num(out, completion);
                out.extend_from_slice(b",\"prompt_tokens\":");
                push_num(out, prompt);
                out.extend_from_slice(b",\"total_tokens\":");
                push_num(out, prompt + completion);
            }
        }
        out.push(b'}');
    }

    /// Closes the choices and the event: the flavor's trailing fields, then `usage`,
    /// `metrics` and `timings` when given.
    fn end(
        &self,
        out: &mut Vec<u8>,
        usage: Option<u64>,
        metrics: Option<&RequestMetrics>,
        timings: Option<&Timings>,
    ) {
        out.push(b']');
        out.extend_from_slice(&self.tail);
        if let Some(completion) = usage {
            self.usage(out, completion);
        }
        if let Some(m) = metrics {
            m.write_stream(out);
        }
        out.extend_from_slice(&self.id_field);
        if let Some(t) = timings {
            t.write(out);
        }
        out.extend_from_slice(b"}\n\n");
    }

    /// The first chunk of a chat choice: vLLM's `{"role":"assistant","content":""}` (with
    /// zero usage under continuous usage stats), llama.cpp's `{"role":"assistant","content":null}`.
    pub fn role(&self, out: &mut Vec<u8>, index: usize, usage: bool) {
        out.extend_from_slice(&self.head);
        match self.flavor {
            Flavor::Vllm => {
                out.extend_from_slice(b"{\"index\":");
                push_num(out, index);
                out.extend_from_slice(
                    b",\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}",
                );
                self.end(out, usage.then_some(0), None, None);
            }
            Flavor::LlamaCpp => {
                out.extend_from_slice(b"{\"finish_reason\":null,\"index\":");
                push_num(out, index);
                out.extend_from_slice(b",\"delta\":{\"role\":\"assistant\",\"content\":null}}");
                self.end(out, None, None, None);
            }
        }
    }

    /// `"tool_calls":[...]` of a chunk: the opening delta or an argument fragment.
    fn tool_delta(&self, out: &mut Vec<u8>, p: &Pieces) {
        let (name, call_id) = match &self.tool {
            Some((name, id)) => (name.as_str(), id.as_str()),
            None => ("", ""),
        };
        out.extend_from_slice(b"\"tool_calls\":[{");
        match (self.flavor, p.tool_start) {
            // vLLM's DeltaToolCall: id, type, index, function (unset fields left out).
            (Flavor::Vllm, true) => {
                out.extend_from_slice(b"\"id\":");
                push_str(out, call_id.as_bytes());
                out.extend_from_slice(
                    b",\"type\":\"function\",\"index\":0,\"function\":{\"name\":",
                );
                push_str(out, name.as_bytes());
                out.push(b'}');
            }
            // llama.cpp: index, id, type, function with name and (empty) arguments.
            (Flavor::LlamaCpp, true) => {
                out.extend_from_slice(b"\"index\":0,\"id\":");
                push_str(out, call_id.as_bytes());
                out.extend_from_slice(b",\"type\":\"function\",\"function\":{\"name\":");
                push_str(out, name.as_bytes());
                out.extend_from_slice(b",\"arguments\":\"\"}");
            }
            (_, false) => {
                out.extend_from_slice(b"\"index\":0,\"function\":{\"arguments\":");
                push_str(out, &p.args);
                out.push(b'}');
            }
        }
        out.extend_from_slice(b"}]");
    }

    /// The chunk(s) of one or more tokens of one choice; `finish` on its last token.
    /// `usage` is the choice's cumulative completion tokens (vLLM's continuous usage stats).
    /// `timings` go on llama.cpp's finish-only chunk when no usage chunk follows.
    pub fn tokens(
        &mut self,
        out: &mut Vec<u8>,
        index: usize,
        p: &Pieces,
        finish: Option<&str>,
        usage: Option<u64>,
        timings: Option<&Timings>,
    ) {
        if p.tool_start {
            self.tool_mode = true;
        }
        match (self.flavor, self.endpoint) {
            (Flavor::Vllm, Endpoint::Chat) => {
                out.extend_from_slice(&self.head);
                out.extend_from_slice(b"{\"index\":");
                push_num(out, index);
                out.extend_from_slice(b",\"delta\":{");
                let mut sep = false;
                let nothing_else = p.reasoning.is_empty() && !p.tool_start && p.args.is_empty();
                // A chunk with no text (the end-of-sequence token) is `{"content":""}`, or `{}`
                // in a tool call (vLLM's tool parser returns no delta for it).
                if !p.content.is_empty() || (nothing_else && !self.tool_mode) {
                    out.extend_from_slice(b"\"content\":\"");
                    out.extend_from_slice(&p.content);
                    out.push(b'"');
                    sep = true;
                }
                if !p.reasoning.is_empty() {
                    if sep {
                        out.push(b',');
                    }
                    out.push(b'"');
                    out.extend_from_slice(self.reasoning_key.as_bytes());
                    out.extend_from_slice(b"\":\"");
                    out.extend_from_slice(&p.reasoning);
                    out.push(b'"');
                    sep = true;
                }
                if p.tool_start || !p.args.is_empty() {
                    if sep {
                        out.push(b',');
                    }
                    self.tool_delta(out, p);
                }
                out.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":");
                match finish {
                    Some(f) => {
                        out.push(b'"');
                        out.extend_from_slice(f.as_bytes());
                        out.extend_from_slice(b"\",\"stop_reason\":null}");
                    }
                    None => out.extend_from_slice(b"null}"),
                }
                self.end(out, usage, None, None);
            }
            (Flavor::Vllm, Endpoint::Completions) => {
                out.extend_from_slice(&self.head);
                out.extend_from_slice(b"{\"index\":");
                push_num(out, index);
                out.extend_from_slice(b",\"text\":\"");
                out.extend_from_slice(&p.content);
                out.extend_from_slice(b"\",\"logprobs\":null,\"finish_reason\":");
                // Completions set `stop_reason` on every chunk.
                match finish {
                    Some(f) => {
                        out.push(b'"');
                        out.extend_from_slice(f.as_bytes());
                        out.extend_from_slice(b"\",\"stop_reason\":null}");
                    }
                    None => out.extend_from_slice(b"null,\"stop_reason\":null}"),
                }
                self.end(out, usage, None, None);
            }
            (Flavor::LlamaCpp, Endpoint::Chat) => {
                // One event per kind of text, like llama.cpp's message diffs; none for a
                // token without text.
                let delta = |out: &mut Vec<u8>, write: &dyn Fn(&mut Vec<u8>)| {
                    out.extend_from_slice(&self.head);
                    out.extend_from_slice(b"{\"finish_reason\":null,\"index\":");
                    push_num(out, index);
                    out.extend_from_slice(b",\"delta\":{");
                    write(out);
                    out.extend_from_slice(b"}}");
                    self.end(out, None, None, None);
                };
                if !p.reasoning.is_empty() {
                    delta(out, &|out| {
                        out.push(b'"');
                        out.extend_from_slice(self.reasoning_key.as_bytes());
                        out.extend_from_slice(b"\":\"");
                        out.extend_from_slice(&p.reasoning);
                        out.push(b'"');
                    });
                }
                if !p.content.is_empty() {
                    delta(out, &|out| {
                        out.extend_from_slice(b"\"content\":\"");
                        out.extend_from_slice(&p.content);
                        out.push(b'"');
                    });
                }
                if p.tool_start || !p.args.is_empty() {
                    delta(out, &|out| self.tool_delta(out, p));
                }
                if let Some(f) = finish {
                    out.extend_from_slice(&self.head);
                    out.extend_from_slice(b"{\"finish_reason\":\"");
                    out.extend_from_slice(f.as_bytes());
                    out.extend_from_slice(b"\",\"index\":");
                    push_num(out, index);
                    out.extend_from_slice(b",\"delta\":{}}");
                    self.end(out, None, None, timings);
                }
            }
            (Flavor::LlamaCpp, Endpoint::Completions) => {
                if !p.content.is_empty() {
                    out.extend_from_slice(&self.head);
                    out.extend_from_slice(b"{\"text\":\"");
                    out.extend_from_slice(&p.content);
                    out.extend_from_slice(b"\",\"index\":");
                    push_num(out, index);
                    out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":null}");
                    self.end(out, None, None, None);
                }
            }
        }
    }

    /// llama.cpp's last completions chunk: empty text, `finish_reason`, always `usage`, then
    /// `id` and `timings`.
    pub fn completion_final(
        &self,
        out: &mut Vec<u8>,
        index: usize,
        finish: &str,
        completion: u64,
        metrics: Option<&RequestMetrics>,
        timings: Option<&Timings>,
    ) {
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b"{\"text\":\"\",\"index\":");
        push_num(out, index);
        out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":\"");
        out.extend_from_slice(finish.as_bytes());
        out.extend_from_slice(b"\"}");
        self.end(out, Some(completion), metrics, timings);
    }

    /// The usage-only chunk sent after the last token when `include_usage` is on, with the
    /// request's `metrics` (vLLM) or `timings` (llama.cpp) when given.
    pub fn usage_chunk(
        &self,
        out: &mut Vec<u8>,
        completion: u64,
        metrics: Option<&RequestMetrics>,
        timings: Option<&Timings>,
    ) {
        out.extend_from_slice(&self.head);
        self.end(out, Some(completion), metrics, timings);
    }
}
