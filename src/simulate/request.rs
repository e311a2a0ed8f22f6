//! What a generation request asks for: parsed from the JSON body into a plan (lengths, usage
//! options, the hash that seeds its random streams). Validation errors look like vLLM's.

use http::StatusCode;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

use super::config::SimConfig;

/// An error answered before any generation, shaped like vLLM's `ErrorResponse`.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: String,
    pub param: Option<&'static str>,
}

impl ApiError {
    /// A request-validation failure: vLLM answers these with 400 and type `"Bad Request"`.
    pub fn validation(param: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "Bad Request".to_owned(),
            param,
        }
    }

    /// An error whose type is the status' reason phrase (vLLM's HTTPException handler).
    pub fn status(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind: status.canonical_reason().unwrap_or("Error").to_owned(),
            param: None,
        }
    }
}

/// Which generation endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Completions,
}

/// Why a choice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// Ended with an end-of-sequence token (the last token, with empty text).
    Stop,
    /// Reached its token limit.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// One generation request, ready to run.
#[derive(Debug)]
pub(crate) struct GenPlan {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage: bool,
    pub prompt_tokens: u32,
    /// Tokens per choice, including the end-of-sequence token when `finish` is `Stop`.
    pub lengths: Vec<u32>,
    pub finish: Vec<Finish>,
    /// Hash of the request content (without `stream_options`): seeds the random streams.
    pub content_hash: u64,
    /// Chat only, with `tool_calls` on: the function every choice calls.
    pub tool_name: Option<String>,
    /// Chat only: leading tokens of every choice that are reasoning, not content.
    pub reasoning_tokens: u32,
}

/// What one token of a choice is, for the delta it goes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenKind {
    /// Ordinary text.
    Content,
    /// Reasoning text (a `reasoning` / `reasoning_content` delta).
    Reasoning,
    /// The tool call's opening delta: id, type and function name.
    ToolStart,
    /// A fragment of the tool call's arguments.
    ToolArgs,
    /// The end-of-sequence token: no text.
    Eos,
}

impl GenPlan {
    /// The kind of `choice`'s token at `step`.
    pub fn kind(&self, choice: usize, step: u32) -> TokenKind {
        if step + 1 == self.lengths[choice] && self.finish[choice] == Finish::Stop {
            TokenKind::Eos
        } else if self.tool_name.is_some() {
            if step == 0 {
                TokenKind::ToolStart
            } else {
                TokenKind::ToolArgs
            }
        } else if step < self.reasoning_tokens {
            TokenKind::Reasoning
        } else {
            TokenKind::Content
        }
    }

    /// `finish_reason` of `choice`: a tool call that stops says `"tool_calls"`.
    pub fn finish_reason(&self, choice: usize) -> &'static str {
        match self.finish[choice] {
            Finish::Stop if self.tool_name.is_some() => "tool_calls",
            f => f.as_str(),
        }
    }

    pub fn n(&self) -> usize {
        self.lengths.len()
    }
    pub fn max_len(&self) -> u32 {
        self.lengths.iter().copied().max().unwrap_or(0)
    }
}

/// Prompt tokens of a text: ceil(bytes / 4). The request total is at least 1.
pub(crate) fn text_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

/// FNV-1a, stable across builds and platforms (unlike std's hasher).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64 finaliser: spreads a 64-bit value over all bits.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A random stream for one purpose (`salt`) of one request: from the seed and the content
/// hash when seeded, from the thread RNG otherwise.
pub(crate) fn request_rng(seed: Option<u64>, content_hash: u64, salt: u64) -> SmallRng {
    match seed {
        Some(seed) => SmallRng::seed_from_u64(mix(seed ^ mix(content_hash ^ mix(salt)))),
        None => SmallRng::from_rng(&mut rand::rng()),
    }
}

/// Parses the body as JSON; vLLM (FastAPI) answers bad JSON with 400 "Bad Request".
pub(crate) fn parse_json(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::validation(
            None,
            "1 validation error: Input should be a valid dictionary or object to extract fields from",
        )),
        Err(e) => Err(ApiError::validation(
            None,
            format!("1 validation error: JSON decode error: {e}"),
        )),
    }
}

fn opt_u64(obj: &Map<String, Value>, key: &'static str) -> Result<Option<u64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::validation(
                Some(key),
                format!("1 validation error: `{key}` should be a non-negative integer, got {v}"),
            )
        }),
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &'static str) -> Result<Option<bool>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::validation(
            Some(key),
            format!("1 validation error: `{key}` should be a valid boolean, got {v}"),
        )),
    }
}

/// Looks up `model` (absent: the first served model). Unknown → vLLM's 404.
pub(crate) fn resolve_model(
    obj: &Map<String, Value>,
    config: &SimConfig,
) -> Result<String, ApiError> {
    match obj.get("model") {
        None | Some(Value::Null) => Ok(config.models[0].clone()),
        Some(Value::String(m)) if config.models.iter().any(|s| s == m) => Ok(m.clone()),
        Some(Value::String(m)) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{m}` does not exist."),
            kind: "NotFoundError".to_owned(),
            param: Some("model"),
        }),
        Some(v) => Err(ApiError::validation(
            Some("model"),
            format!("1 validation error: `model` should be a valid string, got {v}"),
        )),
    }
}

/// Prompt tokens of chat messages: the sum over message contents (strings, or the `text`
/// of content parts) of ceil(bytes / 4).
fn chat_prompt_tokens(obj: &Map<String, Value>) -> Result<u64, ApiError> {
    let Some(Value::Array(messages)) = obj.get("messages") else {
        return Err(ApiError::validation(
            Some("messages"),
            "1 validation error: `messages` is required and must be a list",
        ));
    };
    let mut tokens = 0;
    for m in messages {
        let Value::Object(m) = m else {
            return Err(ApiError::validation(
                Some("messages"),
                "1 validation error: each message must be an object",
            ));
        };
        match m.get("content") {
            Some(Value::String(s)) => tokens += text_tokens(s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(Value::String(s)) = p.get("text") {
                        tokens += text_tokens(s);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(tokens)
}

/// Prompt tokens of a completions `prompt`: a string (ceil(bytes / 4)), a list of strings
/// (summed), a list of token ids or a list of lists of token ids (counted).
fn completion_prompt_tokens(obj: &Map<String, Value>) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::validation(
            Some("prompt"),
            "1 validation error: `prompt` must be a string, a list of strings or a list of token ids",
        )
    };
    match obj.get("prompt") {
        Some(Value::String(s)) => Ok(text_tokens(s)),
        Some(Value::Array(items)) => {
            let mut tokens = 0;
            for item in items {
                match item {
                    Value::String(s) => tokens += text_tokens(s),
                    Value::Number(_) => tokens += 1,
                    Value::Array(ids) => tokens += ids.len() as u64,
                    _ => return Err(bad()),
                }
            }
            Ok(tokens)
        }
        _ => Err(bad()),
    }
}

/// Turns a chat or completions body into a plan: validates like vLLM, counts prompt tokens,
/// draws output lengths from the request's own random stream.
pub(crate) fn plan(
    endpoint: Endpoint,
    mut obj: Map<String, Value>,
    config: &SimConfig,
) -> Result<GenPlan, ApiError> {
    let model = resolve_model(&obj, config)?;
    let prompt_tokens = match endpoint {
        Endpoint::Chat => chat_prompt_tokens(&obj)?,
        Endpoint::Completions => completion_prompt_tokens(&obj)?,
    }
    .clamp(1, u64::from(u32::MAX)) as u32;
    let stream = opt_bool(&obj, "stream")?.unwrap_or(false);
    let n = opt_u64(&obj, "n")?.unwrap_or(1);
    if n == 0 || n > 256 {
        return Err(ApiError::validation(
            Some("n"),
            format!("n must be between 1 and 256, got {n}."),
        ));
    }
    let ignore_eos = opt_bool(&obj, "ignore_eos")?.unwrap_or(false);
    let limit = match endpoint {
        Endpoint::Chat => match opt_u64(&obj, "max_completion_tokens")? {
            Some(v) => Some(v),
            None => opt_u64(&obj, "max_tokens")?,
        },
        Endpoint::Completions => {
            opt_u64(&obj, "max_tokens")?.or(match config.output.completions_default_max_tokens {
                0 => None,
                d => Some(u64::from(d)),
            })
        }
    };
    if limit == Some(0) {
        return Err(ApiError::validation(
            Some("max_tokens"),
            "max_tokens must be at least 1, got 0.",
        ));
    }
    let context_left = u64::from(config.max_model_len).saturating_sub(u64::from(prompt_tokens));
    if let Some(limit) = limit {
        if limit > context_left {
            return Err(context_error(config, prompt_tokens, limit));
        }
    } else if context_left == 0 {
        return Err(context_error(config, prompt_tokens, 1));
    }

    let (include_usage, continuous_usage) = match obj.get("stream_options") {
        None | Some(Value::Null) => (false, false),
        Some(Value::Object(opts)) => {
            if !stream {
                return Err(ApiError::validation(
                    Some("stream_options"),
                    "Stream options can only be defined when `stream=True`.",
                ));
            }
            // vLLM: `include_usage` defaults to true once `stream_options` is present.
            let include = opts
                .get("include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            let continuous = include
                && opts
                    .get("continuous_usage_stats")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
            (include, continuous)
        }
        Some(v) => {
            return Err(ApiError::validation(
                Some("stream_options"),
                format!("1 validation error: `stream_options` should be an object, got {v}"),
            ));
        }
    };

    let tool_name = (endpoint == Endpoint::Chat && config.tool_calls).then(|| {
        obj.get("tools")
            .and_then(Value::as_array)
            .and_then(|tools| tools.first())
            .and_then(|t| t.get("function"))
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .filter(|name| !name.is_empty())
            .unwrap_or("get_weather")
            .to_owned()
    });
    let reasoning_tokens = match endpoint {
        Endpoint::Chat => config.reasoning_tokens,
        Endpoint::Completions => 0,
    };

    // The content hash ignores `stream_options`: a proxy that adds `include_usage` must get
    // the same ids, text and timings as a direct request.
    obj.remove("stream_options");
    let endpoint_salt = match endpoint {
        Endpoint::Chat => 1,
        Endpoint::Completions => 2,
    };
    let canonical = serde_json::to_vec(&obj).unwrap_or_default();
    let content_hash = mix(fnv1a(&canonical) ^ endpoint_salt);

    let mut rng = request_rng(config.seed, content_hash, SALT_LENGTHS);
    let (min, max) = (config.output.min_tokens, config.output.max_tokens);
    let mut lengths = Vec::with_capacity(n as usize);
    let mut finish = Vec::with_capacity(n as usize);
    for _ in 0..n {
        match limit {
            Some(limit) => {
                lengths.push(limit as u32);
                finish.push(Finish::Length);
            }
            None => {
                let drawn = u64::from(rng.random_range(min..=max)).min(context_left) as u32;
                lengths.push(drawn.max(1));
                finish.push(if ignore_eos {
                    Finish::Length
                } else {
                    Finish::Stop
                });
            }
        }
    }
    Ok(GenPlan {
        endpoint,
        model,
        stream,
        include_usage,
        continuous_usage,
        prompt_tokens,
        lengths,
        finish,
        content_hash,
        tool_name,
        reasoning_tokens,
    })
}

fn context_error(config: &SimConfig, prompt: u32, completion: u64) -> ApiError {
    let total = u64::from(prompt) + completion;
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!(
            "This model's maximum context length is {} tokens. However, you requested {total} \
             tokens ({prompt} in the messages, {completion} in the completion). Please reduce \
             the length of the messages or completion.",
            config.max_model_len
        ),
        kind: "BadRequestError".to_owned(),
        param: None,
    }
}

/// Salts of the independent random streams of one request.
pub(crate) const SALT_LENGTHS: u64 = 0x6c65_6e67;
pub(crate) const SALT_TEXT: u64 = 0x7465_7874;
pub(crate) const SALT_TIME: u64 = 0x7469_6d65;
pub(crate) const SALT_IDS: u64 = 0x6964_7321;
pub(crate) const SALT_FAULTS: u64 = 0x6661_756c;
