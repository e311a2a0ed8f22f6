//! Simulator settings: one serde tree with documented defaults, loaded from TOML and validated.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Which server's response shapes the simulator speaks. The timing model is the same for
/// both; only the bytes differ.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum Flavor {
    /// vLLM's OpenAI server: pydantic field order, a `{"role":"assistant","content":""}` chunk
    /// in the same write as the first token, `finish_reason` on the last token's chunk.
    #[default]
    #[serde(rename = "vllm")]
    Vllm,
    /// llama.cpp's `llama-server`: nlohmann field order (`choices` first), a
    /// `{"role":"assistant","content":null}` chunk sent when the request gets its slot (before
    /// the first token), a finish-only `{"delta":{}}` chunk at the end, and a `timings` object
    /// beside `usage`.
    #[serde(rename = "llama.cpp", alias = "llamacpp", alias = "llama-cpp")]
    LlamaCpp,
}

impl Flavor {
    /// The name used in config files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Vllm => "vllm",
            Flavor::LlamaCpp => "llama.cpp",
        }
    }
}

impl std::fmt::Display for Flavor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Flavor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vllm" => Ok(Flavor::Vllm),
            "llama.cpp" | "llamacpp" | "llama-cpp" => Ok(Flavor::LlamaCpp),
            other => Err(format!(
                "unknown flavor `{other}` (expected `vllm` or `llama.cpp`)"
            )),
        }
    }
}

/// The delta field reasoning text goes in.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum ReasoningField {
    /// `reasoning`: vLLM 0.10 and later.
    #[serde(rename = "reasoning")]
    Reasoning,
    /// `reasoning_content`: older vLLM, llama.cpp, DeepSeek, SGLang.
    #[serde(rename = "reasoning_content")]
    ReasoningContent,
}

impl ReasoningField {
    /// The JSON key.
    pub fn key(self) -> &'static str {
        match self {
            ReasoningField::Reasoning => "reasoning",
            ReasoningField::ReasoningContent => "reasoning_content",
        }
    }
}

/// Everything the simulator can be told. Every field has a default, so an empty file is valid.
///
/// The defaults describe a single-GPU deployment of a 7B–32B model: about 25 ms + 50 ms per
/// 1,000 prompt tokens to the first token, 20 ms between tokens, 256 sequences in flight.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Seed for every random choice. With a seed, the same request body gets the same ids,
    /// `created`, text, token counts and timings; without one, ids are random and `created`
    /// is the wall clock. Default: none.
    pub seed: Option<u64>,
    /// Served model names, listed by `GET /v1/models`; a request naming another model gets 404.
    /// A request without `model` uses the first. Default: `["Qwen/Qwen2.5-7B-Instruct"]`.
    pub models: Vec<String>,
    /// Context length (prompt + output tokens) reported by `/v1/models` and enforced on requests
    /// (400 when `prompt_tokens + max_tokens` exceeds it). Default: 32768.
    pub max_model_len: u32,
    /// Length of the vectors `/v1/embeddings` returns. Default: 1024.
    pub embedding_dim: u32,
    /// How long shutdown waits for open connections (running streams) to finish before it
    /// drops them. Default: 10000 ms.
    pub shutdown_grace_ms: u64,
    /// The timing model.
    pub timing: TimingConfig,
    /// Output lengths.
    pub output: OutputConfig,
    /// Faults injected at random, per request (the `x-tokentap-sim-fault` header overrides them).
    pub faults: FaultRates,
    /// For one-way latency measurements (`tokentap bench --chunk-latency`): every streamed JSON
    /// chunk gets an extra last field `"tokentap_emit_ns": N`, the wall clock (ns since the Unix
    /// epoch) when the chunk was handed to the connection. A client on the same machine
    /// subtracts it from its own receive time. Off by default, because it changes the bytes
    /// (and makes seeded responses differ between runs). Default: false.
    pub stamp_emit_time: bool,
    /// Whose response shapes to speak: `"vllm"` or `"llama.cpp"` (`--flavor`). Default: `"vllm"`.
    pub flavor: Flavor,
    /// A reasoning model: the first `reasoning_tokens` tokens of every chat choice are reasoning
    /// deltas (`reasoning_field`), the rest content. They count in `completion_tokens`, and in
    /// the timing model like any token. 0 = no reasoning. Default: 0.
    pub reasoning_tokens: u32,
    /// Delta field of reasoning text. Default: `"reasoning"` for vLLM (its name since 0.10),
    /// `"reasoning_content"` for llama.cpp.
    pub reasoning_field: Option<ReasoningField>,
    /// Answer every chat request with one tool call instead of content: the first token is a
    /// `tool_calls` delta with the call's id, type and function name (the request's first
    /// `tools[].function.name`, else `"get_weather"`), every later token an argument fragment;
    /// a choice that stops ends with `finish_reason: "tool_calls"`. Default: false.
    pub tool_calls: bool,
    /// Like vLLM's `--enable-per-request-metrics`: a `metrics` object (`time_to_first_token_ms`,
    /// `generation_time_ms`, `queue_time_ms`, `mean_itl_ms`, `tokens_per_second`) beside `usage`
    /// in the final usage chunk and in non-streaming bodies, from the timing model, for `n = 1`.
    /// Default: false.
    pub request_metrics: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: None,
            models: vec!["Qwen/Qwen2.5-7B-Instruct".to_owned()],
            max_model_len: 32768,
            embedding_dim: 1024,
            shutdown_grace_ms: 10_000,
            timing: TimingConfig::default(),
            output: OutputConfig::default(),
            faults: FaultRates::default(),
            stamp_emit_time: false,
            flavor: Flavor::Vllm,
            reasoning_tokens: 0,
            reasoning_field: None,
            tool_calls: false,
            request_metrics: false,
        }
    }
}

impl SimConfig {
    /// The reasoning delta field in effect: `reasoning_field`, or the flavor's own name.
    pub fn reasoning_key(&self) -> &'static str {
        self.reasoning_field
            .unwrap_or(match self.flavor {
                Flavor::Vllm => ReasoningField::Reasoning,
                Flavor::LlamaCpp => ReasoningField::ReasoningContent,
            })
            .key()
    }
}

/// When tokens come out.
///
/// TTFT = time queued for a sequence slot + `ttft_base_ms` + `prefill_ms_per_1k_tokens` ×
/// prompt tokens / 1000. After the first token, one token per decode step; a step lasts
/// `itl_ms` × (1 + `slowdown_per_seq` × (running sequences − 1)), each multiplied by a random
/// factor in `1 ± jitter`. Deadlines accumulate from the previous deadline, so they never drift.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TimingConfig {
    /// Fixed part of the time to first token (scheduling, first forward pass). Default: 25 ms.
    pub ttft_base_ms: f64,
    /// Prefill time per 1,000 prompt tokens. Default: 50 ms (20k tokens/s).
    pub prefill_ms_per_1k_tokens: f64,
    /// Mean time of one decode step (the inter-token latency with one running sequence).
    /// Default: 20 ms.
    pub itl_ms: f64,
    /// Relative jitter of TTFT and of every step: each is multiplied by a uniform factor in
    /// `[1 - jitter, 1 + jitter]`. 0 gives exact, fixed timings. Default: 0.1.
    pub jitter: f64,
    /// Tokens per streamed chunk after the first, like vLLM's `--stream-interval` or speculative
    /// decoding: tokens are still produced one per step but sent in groups. The first token
    /// always goes out alone. Default: 1.
    pub tokens_per_chunk: u32,
    /// Decode slowdown per extra running sequence: 0.002 makes a step 50 % longer with 251
    /// sequences running. 0 disables. Default: 0.002.
    pub slowdown_per_seq: f64,
    /// Sequences (requests) generating at once, like vLLM's `--max-num-seqs`; the rest wait in
    /// a queue, and their wait counts in their TTFT. Default: 256.
    pub max_num_seqs: u32,
}

impl Default for TimingConfig {
    fn default() -> Self {
        TimingConfig {
            ttft_base_ms: 25.0,
            prefill_ms_per_1k_tokens: 50.0,
            itl_ms: 20.0,
            jitter: 0.1,
            tokens_per_chunk: 1,
            slowdown_per_seq: 0.002,
            max_num_seqs: 256,
        }
    }
}

/// How many tokens a response has.
///
/// With `max_tokens` / `max_completion_tokens` in the request, exactly that many
/// (`finish_reason: "length"`). Without, a length drawn uniformly from
/// `min_tokens..=max_tokens`, the last of which is the end-of-sequence token
/// (`finish_reason: "stop"`, empty text), or `"length"` when the request sets `ignore_eos`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// Shortest drawn output, in tokens. Default: 32.
    pub min_tokens: u32,
    /// Longest drawn output, in tokens. Default: 512.
    pub max_tokens: u32,
    /// `max_tokens` of a `/v1/completions` request that sets none: vLLM's default is 16.
    /// Set 0 to draw the length instead. Default: 16.
    pub completions_default_max_tokens: u32,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            min_tokens: 32,
            max_tokens: 512,
            completions_default_max_tokens: 16,
        }
    }
}

/// Probabilities (0 to 1) of faults injected into generation requests, drawn per request from
/// the request's random stream (so a seeded run repeats them). A fault set by the
/// `x-tokentap-sim-fault` header replaces all of these for that request.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FaultRates {
    /// Answer 429 with an OpenAI-style error body instead of generating. Default: 0.
    pub rate_429: f64,
    /// Answer 500. Default: 0.
    pub rate_500: f64,
    /// Answer 503. Default: 0.
    pub rate_503: f64,
    /// Send an in-band error event (then `[DONE]`) at a random token. Default: 0.
    pub rate_error: f64,
    /// Abort the connection at a random token. Default: 0.
    pub rate_disconnect: f64,
    /// Pause for `stall_ms` at a random token. Default: 0.
    pub rate_stall: f64,
    /// Length of a random stall. Default: 0 (set it together with `rate_stall`).
    pub stall_ms: u64,
    /// Delay the response headers by `header_delay_ms`. Default: 0.
    pub rate_header_delay: f64,
    /// Length of a random header delay. Default: 0.
    pub header_delay_ms: u64,
}

/// Why a simulator config could not be used; the message names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum SimConfigError {
    /// The file could not be read.
    #[error("cannot read simulator config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown field or a value of the wrong type.
    #[error("invalid simulator config {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said (it names the field).
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid simulator config: `{field}` {reason}")]
    Invalid {
        /// The offending field, as written in the file (`timing.jitter`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl SimConfig {
    /// Reads, parses and validates a TOML file; every field is optional.
    pub fn load(path: &Path) -> Result<SimConfig, SimConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| SimConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: SimConfig = toml::from_str(&text).map_err(|source| SimConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates TOML text (what [`SimConfig::load`] does after reading the file).
    pub fn from_toml_str(text: &str) -> Result<SimConfig, SimConfigError> {
        let config: SimConfig = toml::from_str(text).map_err(|source| SimConfigError::Parse {
            path: PathBuf::from("<string>"),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges; called by `load`, and by `Simulator::start` / `run` for configs built in code.
    pub fn validate(&self) -> Result<(), SimConfigError> {
        fn invalid(field: &'static str, reason: impl Into<String>) -> SimConfigError {
            SimConfigError::Invalid {
                field,
                reason: reason.into(),
            }
        }
        fn non_negative(field: &'static str, v: f64) -> Result<(), SimConfigError> {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(invalid(
                    field,
                    format!("must be a finite number >= 0, got {v}"),
                ))
            }
        }
        fn probability(field: &'static str, v: f64) -> Result<(), SimConfigError> {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(invalid(field, format!("must be between 0 and 1, got {v}")))
            }
        }
        if self.models.is_empty() {
            return Err(invalid("models", "must name at least one model"));
        }
        if let Some(i) = self.models.iter().position(|m| m.is_empty()) {
            return Err(invalid("models", format!("entry {i} is empty")));
        }
        if self.max_model_len == 0 {
            return Err(invalid("max_model_len", "must be at least 1"));
        }
        if self.embedding_dim == 0 || self.embedding_dim > 65536 {
            return Err(invalid("embedding_dim", "must be between 1 and 65536"));
        }
        let t = &self.timing;
        non_negative("timing.ttft_base_ms", t.ttft_base_ms)?;
        non_negative(
            "timing.prefill_ms_per_1k_tokens",
            t.prefill_ms_per_1k_tokens,
        )?;
        non_negative("timing.itl_ms", t.itl_ms)?;
        non_negative("timing.slowdown_per_seq", t.slowdown_per_seq)?;
        probability("timing.jitter", t.jitter)?;
        if t.tokens_per_chunk == 0 {
            return Err(invalid("timing.tokens_per_chunk", "must be at least 1"));
        }
        if t.max_num_seqs == 0 || t.max_num_seqs as usize > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(invalid("timing.max_num_seqs", "must be at least 1"));
        }
        let o = &self.output;
        if o.min_tokens == 0 {
            return Err(invalid("output.min_tokens", "must be at least 1"));
        }
        if o.max_tokens < o.min_tokens {
            return Err(invalid(
                "output.max_tokens",
                format!("must be >= output.min_tokens ({})", o.min_tokens),
            ));
        }
        let f = &self.faults;
        probability("faults.rate_429", f.rate_429)?;
        probability("faults.rate_500", f.rate_500)?;
        probability("faults.rate_503", f.rate_503)?;
        probability("faults.rate_error", f.rate_error)?;
        probability("faults.rate_disconnect", f.rate_disconnect)?;
        probability("faults.rate_stall", f.rate_stall)?;
        probability("faults.rate_header_delay", f.rate_header_delay)?;
        if f.rate_429 + f.rate_500 + f.rate_503 > 1.0 {
            return Err(invalid(
                "faults.rate_429",
                "rate_429 + rate_500 + rate_503 must not exceed 1",
            ));
        }
        Ok(())
    }
}
