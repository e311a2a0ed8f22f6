//! Whole response bodies, shaped and ordered like the flavor's server: vLLM's full responses
//! like FastAPI's `JSONResponse(model.model_dump())`, llama.cpp's in nlohmann's insertion order,
//! in-band errors like `json.dumps` (spaces). Stream chunks are in [`super::chunks`].

use serde::Serialize;

use super::chunks::{LLAMA_CPP_FINGERPRINT, RequestMetrics, Timings};
use super::config::Flavor;
use super::request::{ApiError, Endpoint};

/// The end of every stream.
pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";

/// vLLM's in-band error event (`json.dumps` spacing) for an engine failure, then `[DONE]`.
pub(crate) fn inband_error(out: &mut Vec<u8>) {
    out.extend_from_slice(
        b"data: {\"error\": {\"message\": \"Internal server error\", \"type\": \"InternalServerError\", \"param\": null, \"code\": 500}}\n\n",
    );
    out.extend_from_slice(DONE);
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInfo<'a>,
}

#[derive(Serialize)]
struct ErrorInfo<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: u16,
}

/// `{"error":{"message","type","param","code"}}`, vLLM's `ErrorResponse`.
pub(crate) fn error_body(e: &ApiError) -> Vec<u8> {
    serde_json::to_vec(&ErrorBody {
        error: ErrorInfo {
            message: &e.message,
            kind: &e.kind,
            param: e.param,
            code: e.status.as_u16(),
        },
    })
    .unwrap_or_default()
}

/// `usage` of full responses (`prompt_tokens_details` is present, null).
#[derive(Serialize)]
pub(crate) struct Usage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
    pub completion_tokens: u64,
    pub prompt_tokens_details: Option<()>,
}

impl Usage {
    pub fn new(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            total_tokens: prompt + completion,
            completion_tokens: completion,
            prompt_tokens_details: None,
        }
    }
}

/// llama.cpp's `usage`: completion, prompt, total.
#[derive(Serialize)]
struct LlamaUsage {
    completion_tokens: u64,
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct VllmFunction<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[derive(Serialize)]
struct VllmToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: VllmFunction<'a>,
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    content: Option<&'a str>,
    refusal: Option<()>,
    annotations: Option<()>,
    audio: Option<()>,
    function_call: Option<()>,
    tool_calls: Vec<VllmToolCall<'a>>,
    /// Exactly one of these two is written: the configured reasoning field.
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<Option<&'a str>>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: usize,
    message: ChatMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
    stop_reason: Option<()>,
}

#[derive(Serialize)]
struct ChatResponse<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChatChoice<'a>>,
    service_tier: Option<()>,
    system_fingerprint: Option<()>,
    usage: Usage,
    prompt_logprobs: Option<()>,
    kv_transfer_params: Option<()>,
    /// Only with `request_metrics`: the object for `n = 1`, `null` otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<Option<RequestMetrics>>,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: usize,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: &'static str,
    stop_reason: Option<()>,
    prompt_logprobs: Option<()>,
}

#[derive(Serialize)]
struct CompletionResponse<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<CompletionChoice<'a>>,
    service_tier: Option<()>,
    system_fingerprint: Option<()>,
    usage: Usage,
    kv_transfer_params: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<Option<RequestMetrics>>,
}

#[derive(Serialize)]
struct LlamaFunction<'a> {
    name: &'a str,
    arguments: &'a str,
}

/// llama.cpp's tool call in a message: type, function, id.
#[derive(Serialize)]
struct LlamaToolCall<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: LlamaFunction<'a>,
    id: &'a str,
}

#[derive(Serialize)]
struct LlamaMessage<'a> {
    role: &'static str,
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[LlamaToolCall<'a>; 1]>,
}

#[derive(Serialize)]
struct LlamaChatChoice<'a> {
    finish_reason: &'static str,
    index: usize,
    message: LlamaMessage<'a>,
}

#[derive(Serialize)]
struct LlamaCompletionChoice<'a> {
    text: &'a str,
    index: usize,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

/// llama.cpp's response: choices, created, model, system_fingerprint, object, usage, id,
/// timings.
#[derive(Serialize)]
struct LlamaResponse<C> {
    choices: Vec<C>,
    created: u64,
    model: String,
    system_fingerprint: &'static str,
    object: &'static str,
    usage: LlamaUsage,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<Option<RequestMetrics>>,
    id: String,
    timings: Option<Timings>,
}

impl LlamaResponse<()> {
    fn with<C>(self, choices: Vec<C>) -> LlamaResponse<C> {
        LlamaResponse {
            choices,
            created: self.created,
            model: self.model,
            system_fingerprint: self.system_fingerprint,
            object: self.object,
            usage: self.usage,
            metrics: self.metrics,
            id: self.id,
            timings: self.timings,
        }
    }
}

/// The generated text of one choice of a full response.
#[derive(Debug, Default)]
pub(crate) struct ChoiceText {
    pub content: String,
    pub reasoning: String,
    pub args: String,
}

/// The whole non-streaming response of a chat or completions request.
pub(crate) struct FullResponse<'a> {
    pub flavor: Flavor,
    pub endpoint: Endpoint,
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [ChoiceText],
    pub finish: &'a [&'static str],
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub reasoning_key: &'static str,
    /// `reasoning_tokens` is set: the message names its reasoning field `reasoning_key`.
    pub reasoning_on: bool,
    /// (function name, call id) of a tool-call response.
    pub tool: Option<(&'a str, &'a str)>,
    /// `Some` with `request_metrics` on: the metrics for `n = 1`, `None` (null) otherwise.
    pub metrics: Option<Option<RequestMetrics>>,
    /// llama.cpp's `timings`.
    pub timings: Option<Timings>,
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

impl FullResponse<'_> {
    pub fn into_json(self) -> Vec<u8> {
        let finishes = self
            .choices
            .iter()
            .zip(self.finish.iter().copied())
            .enumerate();
        let result = match (self.flavor, self.endpoint) {
            (Flavor::Vllm, Endpoint::Chat) => serde_json::to_vec(&ChatResponse {
                id: self.id,
                object: "chat.completion",
                created: self.created,
                model: self.model,
                choices: finishes
                    .map(|(index, (text, finish_reason))| {
                        let answered = !text.reasoning.is_empty() || self.tool.is_some();
                        let reasoning = Some(non_empty(&text.reasoning));
                        // Without a reasoning model, vLLM's message ends `"reasoning_content":null`.
                        let (reasoning, reasoning_content) = match self.reasoning_key {
                            "reasoning" if self.reasoning_on => (reasoning, None),
                            _ => (None, reasoning),
                        };
                        ChatChoice {
                            index,
                            message: ChatMessage {
                                role: "assistant",
                                // With a reasoning or tool parser, no answer text is null.
                                content: if answered {
                                    non_empty(&text.content)
                                } else {
                                    Some(&text.content)
                                },
                                refusal: None,
                                annotations: None,
                                audio: None,
                                function_call: None,
                                tool_calls: self
                                    .tool
                                    .map(|(name, id)| VllmToolCall {
                                        id,
                                        kind: "function",
                                        function: VllmFunction {
                                            name,
                                            arguments: &text.args,
                                        },
                                    })
                                    .into_iter()
                                    .collect(),
                                reasoning,
                                reasoning_content,
                            },
                            logprobs: None,
                            finish_reason,
                            stop_reason: None,
                        }
                    })
                    .collect(),
                service_tier: None,
                system_fingerprint: None,
                usage: Usage::new(self.prompt_tokens, self.completion_tokens),
                prompt_logprobs: None,
                kv_transfer_params: None,
                metrics: self.metrics,
            }),
            (Flavor::Vllm, Endpoint::Completions) => serde_json::to_vec(&CompletionResponse {
                id: self.id,
                object: "text_completion",
                created: self.created,
                model: self.model,
                choices: finishes
                    .map(|(index, (text, finish_reason))| CompletionChoice {
                        index,
                        text: &text.content,
                        logprobs: None,
                        finish_reason,
                        stop_reason: None,
                        prompt_logprobs: None,
                    })
                    .collect(),
                service_tier: None,
                system_fingerprint: None,
                usage: Usage::new(self.prompt_tokens, self.completion_tokens),
                kv_transfer_params: None,
                metrics: self.metrics,
            }),
            (Flavor::LlamaCpp, endpoint) => {
                let usage = LlamaUsage {
                    completion_tokens: self.completion_tokens,
                    prompt_tokens: self.prompt_tokens,
                    total_tokens: self.prompt_tokens + self.completion_tokens,
                };
                let common = |object| LlamaResponse::<()> {
                    choices: Vec::new(),
                    created: self.created,
                    model: self.model.to_owned(),
                    system_fingerprint: LLAMA_CPP_FINGERPRINT,
                    object,
                    usage,
                    metrics: self.metrics,
                    id: self.id.to_owned(),
                    timings: self.timings,
                };
                if endpoint == Endpoint::Chat {
                    let r = common("chat.completion");
                    let choices: Vec<LlamaChatChoice<'_>> = finishes
                        .map(|(index, (text, finish_reason))| {
                            let reasoning = non_empty(&text.reasoning);
                            let (reasoning, reasoning_content) = match self.reasoning_key {
                                "reasoning" => (reasoning, None),
                                _ => (None, reasoning),
                            };
                            LlamaChatChoice {
                                finish_reason,
                                index,
                                message: LlamaMessage {
                                    role: "assistant",
                                    content: non_empty(&text.content),
                                    reasoning,
                                    reasoning_content,
                                    tool_calls: self.tool.map(|(name, id)| {
                                        [LlamaToolCall {
                                            kind: "function",
                                            function: LlamaFunction {
                                                name,
                                                arguments: &text.args,
                                            },
                                            id,
                                        }]
                                    }),
                                },
                            }
                        })
                        .collect();
                    serde_json::to_vec(&r.with(choices))
                } else {
                    let r = common("text_completion");
                    let choices: Vec<LlamaCompletionChoice<'_>> = finishes
                        .map(|(index, (text, finish_reason))| LlamaCompletionChoice {
                            text: &text.content,
                            index,
                            logprobs: None,
                            finish_reason,
                        })
                        .collect();
                    serde_json::to_vec(&r.with(choices))
                }
            }
        };
        result.unwrap_or_default()
    }
}

#[derive(Serialize)]
struct ModelPermission<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    allow_create_engine: bool,
    allow_sampling: bool,
    allow_logprobs: bool,
    allow_search_indices: bool,
    allow_view: bool,
    allow_fine_tuning: bool,
    organization: &'static str,
    group: Option<()>,
    is_blocking: bool,
}

#[derive(Serialize)]
struct ModelCard<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    root: &'a str,
    parent: Option<()>,
    max_model_len: u32,
    permission: [ModelPermission<'a>; 1],
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelCard<'a>>,
}

/// `GET /v1/models`, vLLM's `ModelList`.
pub(crate) fn model_list(
    models: &[String],
    created: u64,
    max_model_len: u32,
    perm_ids: &[String],
) -> Vec<u8> {
    let data = models
        .iter()
        .zip(perm_ids)
        .map(|(m, perm)| ModelCard {
            id: m,
            object: "model",
            created,
            owned_by: "vllm",
            root: m,
            parent: None,
            max_model_len,
            permission: [ModelPermission {
                id: perm,
                object: "model_permission",
                created,
                allow_create_engine: false,
                allow_sampling: true,
                allow_logprobs: true,
                allow_search_indices: false,
                allow_view: true,
                allow_fine_tuning: false,
                organization: "*",
                group: None,
                is_blocking: false,
            }],
        })
        .collect();
    serde_json::to_vec(&ModelList {
        object: "list",
        data,
    })
    .unwrap_or_default()
}

#[derive(Serialize)]
#[serde(untagged)]
pub(crate) enum Embedding {
    Floats(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
pub(crate) struct EmbeddingData {
    pub index: usize,
    pub object: &'static str,
    pub embedding: Embedding,
}

/// `POST /v1/embeddings`, vLLM's `EmbeddingResponse`.
#[derive(Serialize)]
pub(crate) struct EmbeddingResponse<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub data: Vec<EmbeddingData>,
    pub usage: Usage,
}

/// Standard base64 (with padding), for `encoding_format: "base64"` embeddings.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
