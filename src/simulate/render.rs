//! Response bytes, shaped and ordered like vLLM's: stream chunks are written like pydantic's
//! `model_dump_json(exclude_unset=True)` (compact, fields in model order), full responses like
//! FastAPI's `JSONResponse(model.model_dump())`, in-band errors like `json.dumps` (spaces).

use serde::Serialize;

use super::request::{ApiError, Endpoint, Finish};

/// Writes the chunks of one stream. The constant head of every chunk is serialized once.
pub(crate) struct ChunkWriter {
    /// `data: {"id":...,"object":...,"created":...,"model":...,"choices":[`
    head: Vec<u8>,
    endpoint: Endpoint,
    prompt_tokens: u32,
}

fn push_num(out: &mut Vec<u8>, n: impl std::fmt::Display) {
    use std::io::Write as _;
    let _ = write!(out, "{n}");
}

impl ChunkWriter {
    pub fn new(
        endpoint: Endpoint,
        id: &str,
        created: u64,
        model: &str,
        prompt_tokens: u32,
    ) -> Self {
        let object = match endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let mut head = Vec::with_capacity(128 + model.len());
        head.extend_from_slice(b"data: {\"id\":");
        let _ = serde_json::to_writer(&mut head, id);
        head.extend_from_slice(b",\"object\":\"");
        head.extend_from_slice(object.as_bytes());
        head.extend_from_slice(b"\",\"created\":");
        push_num(&mut head, created);
        head.extend_from_slice(b",\"model\":");
        let _ = serde_json::to_writer(&mut head, model);
        head.extend_from_slice(b",\"choices\":[");
        ChunkWriter {
            head,
            endpoint,
            prompt_tokens,
        }
    }

    fn usage(&self, out: &mut Vec<u8>, completion: u64) {
        let prompt = u64::from(self.prompt_tokens);
        out.extend_from_slice(b"\"usage\":{\"prompt_tokens\":");
        push_num(out, prompt);
        out.extend_from_slice(b",\"total_tokens\":");
        push_num(out, prompt + completion);
        out.extend_from_slice(b",\"completion_tokens\":");
        push_num(out, completion);
        out.push(b'}');
    }

    fn end(&self, out: &mut Vec<u8>, usage: Option<u64>) {
        out.push(b']');
        if let Some(completion) = usage {
            out.push(b',');
            self.usage(out, completion);
        }
        out.extend_from_slice(b"}\n\n");
    }

    /// The first chunk of a chat choice: `delta: {"role":"assistant","content":""}`.
    pub fn role(&self, out: &mut Vec<u8>, index: usize, usage: bool) {
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b"{\"index\":");
        push_num(out, index);
        out.extend_from_slice(
            b",\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}",
        );
        self.end(out, usage.then_some(0));
    }

    /// A chunk with the text of one or more tokens of one choice; `finish` on its last.
    /// `usage` is the choice's cumulative completion tokens (continuous usage stats).
    pub fn tokens(
        &self,
        out: &mut Vec<u8>,
        index: usize,
        text: &[u8],
        finish: Option<Finish>,
        usage: Option<u64>,
    ) {
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b"{\"index\":");
        push_num(out, index);
        match self.endpoint {
            Endpoint::Chat => out.extend_from_slice(b",\"delta\":{\"content\":\""),
            Endpoint::Completions => out.extend_from_slice(b",\"text\":\""),
        }
        out.extend_from_slice(text);
        match self.endpoint {
            Endpoint::Chat => out.extend_from_slice(b"\"}"),
            Endpoint::Completions => out.push(b'"'),
        }
        out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":");
        match finish {
            Some(f) => {
                out.push(b'"');
                out.extend_from_slice(f.as_str().as_bytes());
                out.extend_from_slice(b"\",\"stop_reason\":null}");
            }
            // Completions set `stop_reason` on every chunk, chat only on the last.
            None if self.endpoint == Endpoint::Completions => {
                out.extend_from_slice(b"null,\"stop_reason\":null}")
            }
            None => out.extend_from_slice(b"null}"),
        }
        self.end(out, usage);
    }

    /// The usage-only chunk sent after the last token when `include_usage` is on.
    pub fn usage_chunk(&self, out: &mut Vec<u8>, completion: u64) {
        out.extend_from_slice(&self.head);
        self.end(out, Some(completion));
    }
}

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

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
    annotations: Option<()>,
    audio: Option<()>,
    function_call: Option<()>,
    tool_calls: [(); 0],
    reasoning_content: Option<()>,
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
}

/// The whole non-streaming response of a chat or completions request.
pub(crate) struct FullResponse<'a> {
    pub endpoint: Endpoint,
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub texts: &'a [String],
    pub finish: &'a [Finish],
    pub usage: Usage,
}

impl FullResponse<'_> {
    pub fn into_json(self) -> Vec<u8> {
        let result = match self.endpoint {
            Endpoint::Chat => serde_json::to_vec(&ChatResponse {
                id: self.id,
                object: "chat.completion",
                created: self.created,
                model: self.model,
                choices: self
                    .texts
                    .iter()
                    .zip(self.finish)
                    .enumerate()
                    .map(|(index, (text, finish))| ChatChoice {
                        index,
                        message: ChatMessage {
                            role: "assistant",
                            content: text,
                            refusal: None,
                            annotations: None,
                            audio: None,
                            function_call: None,
                            tool_calls: [],
                            reasoning_content: None,
                        },
                        logprobs: None,
                        finish_reason: finish.as_str(),
                        stop_reason: None,
                    })
                    .collect(),
                service_tier: None,
                system_fingerprint: None,
                usage: self.usage,
                prompt_logprobs: None,
                kv_transfer_params: None,
            }),
            Endpoint::Completions => serde_json::to_vec(&CompletionResponse {
                id: self.id,
                object: "text_completion",
                created: self.created,
                model: self.model,
                choices: self
                    .texts
                    .iter()
                    .zip(self.finish)
                    .enumerate()
                    .map(|(index, (text, finish))| CompletionChoice {
                        index,
                        text,
                        logprobs: None,
                        finish_reason: finish.as_str(),
                        stop_reason: None,
                        prompt_logprobs: None,
                    })
                    .collect(),
                service_tier: None,
                system_fingerprint: None,
                usage: self.usage,
                kv_transfer_params: None,
            }),
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
