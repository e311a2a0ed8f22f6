//! Routing and handlers, and the response body: a full buffer, or a stream driven by the
//! request's [`Generation`] timers inside `poll_frame` (no task, no channel per stream).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use rand::Rng;
use tokio::time::Instant;

use super::EMIT_STAMP_FIELD;
use super::chunks::{ChunkWriter, Pieces, RequestMetrics, StreamShape, Timings};
use super::config::Flavor;
use super::fault::{FAULT_HEADER, Faults};
use super::generate::{Event, Generation};
use super::metrics::{Shared, Tracker, render as render_metrics};
use super::render::{self, ChoiceText, DONE, FullResponse, Usage};
use super::request::{
    self, ApiError, Endpoint, SALT_FAULTS, SALT_IDS, TokenKind, fnv1a, mix, request_rng,
    text_tokens,
};

/// Largest request body read (larger ones get 413).
const MAX_BODY: usize = 32 << 20;

/// A response aborted on purpose (`disconnect_after`): hyper closes the connection without
/// finishing the response.
#[derive(Debug, thiserror::Error)]
#[error("simulated connection abort")]
pub struct SimAbort;

/// The body of every simulator response.
pub struct SimBody {
    inner: Inner,
}

enum Inner {
    Full(Option<Bytes>),
    Stream(Box<StreamBody>),
    /// A chat stream told as the Responses or Messages API's events.
    Api(Box<super::apis::ApiStream>),
}

impl SimBody {
    /// The chat body's bytes when it is a full (non-streamed) one.
    pub(super) fn full_bytes(&self) -> Option<&Bytes> {
        match &self.inner {
            Inner::Full(bytes) => bytes.as_ref(),
            _ => None,
        }
    }

    /// A chat stream's body, told as another API's events.
    pub(super) fn api(stream: super::apis::ApiStream) -> SimBody {
        SimBody {
            inner: Inner::Api(Box::new(stream)),
        }
    }

    pub(super) fn full(bytes: impl Into<Bytes>) -> SimBody {
        let bytes = bytes.into();
        SimBody {
            inner: Inner::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }
}

struct StreamBody {
    generation: Generation,
    writer: ChunkWriter,
    tracker: Tracker,
    pieces: Pieces,
    ended: bool,
    /// When the previous token chunk went out (for `vllm:inter_token_latency_seconds`).
    last_tokens: Option<Instant>,
}

/// Appends the text of `choice`'s token at `step` to the piece its kind goes in.
fn push_piece(generation: &mut Generation, choice: usize, step: u32, pieces: &mut Pieces) {
    match generation.plan.kind(choice, step) {
        TokenKind::Content | TokenKind::Eos => {
            generation.push_token_text(choice, step, &mut pieces.content)
        }
        TokenKind::Reasoning => generation.push_token_text(choice, step, &mut pieces.reasoning),
        TokenKind::ToolStart => pieces.tool_start = true,
        TokenKind::ToolArgs => generation.push_token_text(choice, step, &mut pieces.args),
    }
}

/// vLLM's per-request `metrics`, when `request_metrics` is on and the request has one choice
/// (vLLM cannot attribute its stats to one of several).
fn request_metrics(shared: &Shared, generation: &Generation) -> Option<RequestMetrics> {
    let plan = &generation.plan;
    if !shared.config.request_metrics || plan.n() != 1 {
        return None;
    }
    let tokens = plan.lengths.iter().map(|&l| u64::from(l)).sum();
    Some(RequestMetrics::new(generation.engine_times()?, tokens))
}

/// llama.cpp's `timings`, for the llama.cpp flavor.
fn timings(shared: &Shared, generation: &Generation) -> Option<Timings> {
    if shared.config.flavor != Flavor::LlamaCpp {
        return None;
    }
    let plan = &generation.plan;
    let tokens = plan.lengths.iter().map(|&l| u64::from(l)).sum();
    Some(Timings::new(
        generation.engine_times()?,
        u64::from(plan.prompt_tokens),
        tokens,
    ))
}

impl StreamBody {
    fn tokens(&mut self, steps: std::ops::RangeInclusive<u32>) -> Vec<u8> {
        let (from, to) = (*steps.start(), *steps.end());
        let shared = self.tracker.shared().clone();
        let flavor = shared.config.flavor;
        let plan = &self.generation.plan;
        let n = plan.n();
        let chat = plan.endpoint == Endpoint::Chat;
        let continuous = plan.continuous_usage && flavor == Flavor::Vllm;
        let include_usage = plan.include_usage;
        let max_len = plan.max_len();
        // The choice whose end ends the response: llama.cpp puts `timings` on its last chunk.
        let last_choice = (0..n).rev().find(|&i| plan.lengths[i] == max_len);
        let mut out = Vec::with_capacity(n * 320);
        let now = Instant::now();
        if let Some(previous) = self.last_tokens.replace(now) {
            shared.counters.itl.observe(now - previous);
        }
        if from == 0 {
            let ttft = Instant::now() - self.generation.origin();
            shared.counters.observe_ttft(ttft);
            if chat && flavor == Flavor::Vllm {
                for i in 0..n {
                    self.writer.role(&mut out, i, continuous);
                }
            }
        }
        for i in 0..n {
            let len = self.generation.plan.lengths[i];
            if from >= len {
                continue;
            }
            let last = to.min(len - 1);
            self.pieces.clear();
            for step in from..=last {
                push_piece(&mut self.generation, i, step, &mut self.pieces);
            }
            let plan = &self.generation.plan;
            let finish = (last + 1 == len).then(|| plan.finish_reason(i));
            let usage = continuous.then(|| u64::from(self.generation.produced(i, last)));
            let ends_response = finish.is_some() && Some(i) == last_choice;
            let final_timings = ends_response
                .then(|| timings(&shared, &self.generation))
                .flatten();
            if flavor == Flavor::LlamaCpp && !chat {
                self.writer
                    .tokens(&mut out, i, &self.pieces, None, None, None);
                if let Some(f) = finish {
                    let metrics = ends_response
                        .then(|| request_metrics(&shared, &self.generation))
                        .flatten();
                    self.writer.completion_final(
                        &mut out,
                        i,
                        f,
                        u64::from(len),
                        metrics.as_ref(),
                        final_timings.as_ref(),
                    );
                }
            } else {
                let on_finish = if include_usage { None } else { final_timings };
                self.writer
                    .tokens(&mut out, i, &self.pieces, finish, usage, on_finish.as_ref());
            }
        }
        out
    }

    /// The usage chunk (with `include_usage`) and `[DONE]`.
    fn end(&mut self) -> Vec<u8> {
        let shared = self.tracker.shared().clone();
        let plan = &self.generation.plan;
        let mut out = Vec::with_capacity(512);
        // llama.cpp's completions carry usage in their last chunk instead.
        let usage_chunk = plan.include_usage
            && !(shared.config.flavor == Flavor::LlamaCpp
                && plan.endpoint == Endpoint::Completions);
        if usage_chunk {
            let total = plan.lengths.iter().map(|&l| u64::from(l)).sum();
            let metrics = request_metrics(&shared, &self.generation);
            let timings = timings(&shared, &self.generation);
            self.writer
                .usage_chunk(&mut out, total, metrics.as_ref(), timings.as_ref());
        }
        out.extend_from_slice(DONE);
        out
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = SimAbort;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, SimAbort>>> {
        match &mut self.get_mut().inner {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Api(s) => s.poll_frame(cx),
            Inner::Stream(s) => {
                if s.ended {
                    return Poll::Ready(None);
                }
                let out = match ready!(s.generation.poll_event(cx)) {
                    Event::Started => {
                        // llama.cpp: the role chunk goes out when prompt processing starts.
                        let mut out = Vec::with_capacity(256);
                        for i in 0..s.generation.plan.n() {
                            s.writer.role(&mut out, i, false);
                        }
                        out
                    }
                    Event::Tokens(steps) => s.tokens(steps),
                    Event::Error => {
                        s.ended = true;
                        s.tracker.complete();
                        let mut out = Vec::with_capacity(160);
                        render::inband_error(&mut out);
                        out
                    }
                    Event::Disconnect => {
                        s.ended = true;
                        s.tracker.complete();
                        return Poll::Ready(Some(Err(SimAbort)));
                    }
                    Event::End => {
                        s.ended = true;
                        s.tracker.complete();
                        s.end()
                    }
                };
                let out = if s.tracker.shared().config.stamp_emit_time {
                    stamp_emit_time(&out, unix_nanos())
                } else {
                    out
                };
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Stream(s) => s.ended,
            Inner::Api(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Stream(_) | Inner::Api(_) => SizeHint::default(),
        }
    }
}

/// Wall clock, ns since the Unix epoch.
fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Adds `,"tokentap_emit_ns":ns` as the last field of every JSON event in `out`. Events are
/// `data: {...}\n\n`; a JSON string cannot hold a raw newline, so `}\n\n` only ends an event.
fn stamp_emit_time(out: &[u8], ns: u64) -> Vec<u8> {
    let stamp = format!(",\"{EMIT_STAMP_FIELD}\":{ns}");
    let mut stamped = Vec::with_capacity(out.len() + 4 * stamp.len());
    let mut start = 0;
    for end in memchr::memmem::find_iter(out, b"}\n\n") {
        stamped.extend_from_slice(&out[start..end]);
        stamped.extend_from_slice(stamp.as_bytes());
        start = end;
    }
    stamped.extend_from_slice(&out[start..]);
    stamped
}

pub(super) fn response(
    status: StatusCode,
    content_type: &'static str,
    body: SimBody,
) -> Response<SimBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<SimBody> {
    response(status, "application/json", SimBody::full(body))
}

pub(super) fn api_error(e: &ApiError) -> Response<SimBody> {
    json(e.status, render::error_body(e))
}

fn detail(status: StatusCode, detail: &'static str) -> Response<SimBody> {
    json(status, format!("{{\"detail\":\"{detail}\"}}").into_bytes())
}

fn hex_id(prefix: &str, rng: &mut impl Rng) -> String {
    format!(
        "{prefix}{:016x}{:016x}",
        rng.random::<u64>(),
        rng.random::<u64>()
    )
}

/// llama.cpp's ids: `prefix` and 32 random letters and digits.
fn alnum_id(prefix: &str, rng: &mut impl Rng) -> String {
    const CHARS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut id = String::with_capacity(prefix.len() + 32);
    id.push_str(prefix);
    for _ in 0..32 {
        id.push(char::from(CHARS[rng.random_range(0..CHARS.len())]));
    }
    id
}

fn created(shared: &Shared) -> u64 {
    match shared.config.seed {
        Some(_) => super::SEEDED_CREATED,
        None => super::unix_now(),
    }
}

/// Serves one request. `Err` aborts the connection (an injected disconnect).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<SimBody>, SimAbort> {
    let arrival = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let allowed: &'static str = match path.as_str() {
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" => "POST",
        "/v1/responses" | "/v1/messages" => "POST",
        "/v1/models" | "/health" | "/metrics" => "GET",
        "/ping" => "GET, POST",
        _ => return Ok(detail(StatusCode::NOT_FOUND, "Not Found")),
    };
    let method_ok = allowed.split(", ").any(|m| m == method.as_str())
        || (method == Method::HEAD && allowed.contains("GET"));
    if !method_ok {
        let mut resp = detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allowed));
        return Ok(resp);
    }
    match path.as_str() {
        "/v1/chat/completions" => generate(shared, Endpoint::Chat, req, arrival).await,
        "/v1/completions" => generate(shared, Endpoint::Completions, req, arrival).await,
        "/v1/responses" => {
            super::apis::serve(shared, super::apis::Api::Responses, req, arrival).await
        }
        "/v1/messages" => {
            super::apis::serve(shared, super::apis::Api::Messages, req, arrival).await
        }
        "/v1/embeddings" => Ok(embeddings(shared, req).await),
        "/v1/models" => Ok(models(&shared)),
        "/metrics" => Ok(response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            SimBody::full(render_metrics(&shared)),
        )),
        // /health and /ping: 200 with an empty body, like vLLM.
        _ => Ok(response(
            StatusCode::OK,
            "application/json",
            SimBody::full(Bytes::new()),
        )),
    }
}

pub(super) async fn read_json(
    req: Request<hyper::body::Incoming>,
) -> Result<
    (
        http::request::Parts,
        serde_json::Map<String, serde_json::Value>,
    ),
    ApiError,
> {
    let (parts, body) = req.into_parts();
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::status(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {MAX_BODY} bytes"),
            ));
        }
        Err(e) => {
            return Err(ApiError::validation(None, format!("cannot read body: {e}")));
        }
    };
    Ok((parts, request::parse_json(&bytes)?))
}

async fn generate(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    req: Request<hyper::body::Incoming>,
    arrival: Instant,
) -> Result<Response<SimBody>, SimAbort> {
    shared.counters.requests.fetch_add(1, Relaxed);
    let (parts, obj) = match read_json(req).await {
        Ok(v) => v,
        Err(e) => return Ok(api_error(&e)),
    };
    generate_from(shared, endpoint, parts, obj, arrival).await
}

/// [`generate`] for a request whose body has been read (the other APIs are served by
/// generating the chat completion they stand for).
pub(super) async fn generate_from(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    parts: http::request::Parts,
    obj: serde_json::Map<String, serde_json::Value>,
    arrival: Instant,
) -> Result<Response<SimBody>, SimAbort> {
    let plan = match request::plan(endpoint, obj, &shared.config) {
        Ok(p) => p,
        Err(e) => return Ok(api_error(&e)),
    };
    let faults = match parts.headers.get(FAULT_HEADER) {
        Some(v) => match v
            .to_str()
            .map_err(|_| ())
            .and_then(|s| Faults::parse(s).map_err(|_| ()))
        {
            Ok(f) => f,
            Err(()) => {
                let msg = match v.to_str() {
                    Ok(s) => Faults::parse(s).err().map(|e| e.to_string()),
                    Err(_) => None,
                }
                .unwrap_or_else(|| format!("invalid {FAULT_HEADER} header"));
                return Ok(api_error(&ApiError::validation(None, msg)));
            }
        },
        None => {
            let mut rng = request_rng(shared.config.seed, plan.content_hash, SALT_FAULTS);
            Faults::draw(&shared.config.faults, plan.max_len(), &mut rng)
        }
    };
    shared
        .counters
        .prompt_tokens
        .fetch_add(u64::from(plan.prompt_tokens), Relaxed);
    let mut ids = request_rng(shared.config.seed, plan.content_hash, SALT_IDS);
    let id = match (shared.config.flavor, endpoint) {
        (Flavor::Vllm, Endpoint::Chat) => hex_id("chatcmpl-", &mut ids),
        (Flavor::Vllm, Endpoint::Completions) => hex_id("cmpl-", &mut ids),
        // llama-server names both kinds `chatcmpl-`.
        (Flavor::LlamaCpp, _) => alnum_id("chatcmpl-", &mut ids),
    };
    let created = created(&shared);
    let mut tracker = Tracker::new(
        shared.clone(),
        if plan.stream { "stream" } else { "response" },
        id.clone(),
    );
    if !faults.header_delay.is_zero() {
        tokio::time::sleep_until(arrival + faults.header_delay).await;
    }
    if let Some(code) = faults.status {
        tracker.complete();
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = match code {
            429 => "Too many requests: simulated rate limit",
            503 => "Service unavailable: simulated overload",
            _ => "Simulated server error",
        };
        return Ok(api_error(&ApiError::status(status, message)));
    }
    let origin = arrival + faults.header_delay;
    let stream = plan.stream;
    let flavor = shared.config.flavor;
    let reasoning_key = shared.config.reasoning_key();
    let tool = plan.tool_name.clone().map(|name| {
        let call_id = match flavor {
            Flavor::Vllm => hex_id("chatcmpl-tool-", &mut ids),
            Flavor::LlamaCpp => alnum_id("", &mut ids),
        };
        (name, call_id)
    });
    let writer = ChunkWriter::new(StreamShape {
        flavor,
        endpoint,
        id: &id,
        created,
        model: &plan.model,
        prompt_tokens: plan.prompt_tokens,
        reasoning_key,
        tool: tool.clone(),
    });
    let mut generation = Generation::new(shared.clone(), plan, faults, origin);
    if stream {
        if flavor == Flavor::LlamaCpp && endpoint == Endpoint::Chat {
            generation = generation.announce_start();
        }
        shared.counters.streams_started.fetch_add(1, Relaxed);
        let body = StreamBody {
            generation,
            writer,
            tracker,
            pieces: Pieces::default(),
            ended: false,
            last_tokens: None,
        };
        let mut resp = response(
            StatusCode::OK,
            "text/event-stream; charset=utf-8",
            SimBody {
                inner: Inner::Stream(Box::new(body)),
            },
        );
        resp.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(resp);
    }

    let n = generation.plan.n();
    let mut texts: Vec<Pieces> = (0..n).map(|_| Pieces::default()).collect();
    loop {
        match std::future::poll_fn(|cx| generation.poll_event(cx)).await {
            Event::Started => {}
            Event::Tokens(steps) => {
                if *steps.start() == 0 {
                    shared.counters.observe_ttft(Instant::now() - origin);
                }
                for (i, text) in texts.iter_mut().enumerate() {
                    let len = generation.plan.lengths[i];
                    for step in steps.clone().filter(|s| *s < len) {
                        push_piece(&mut generation, i, step, text);
                    }
                }
            }
            Event::Error => {
                tracker.complete();
                return Ok(api_error(&ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: "Internal server error".to_owned(),
                    kind: "InternalServerError".to_owned(),
                    param: None,
                }));
            }
            Event::Disconnect => {
                tracker.complete();
                return Err(SimAbort);
            }
            Event::End => break,
        }
    }
    tracker.complete();
    let plan = &generation.plan;
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap_or_default();
    let choices: Vec<ChoiceText> = texts
        .into_iter()
        .map(|p| ChoiceText {
            content: text(p.content),
            reasoning: text(p.reasoning),
            args: text(p.args),
        })
        .collect();
    let finish: Vec<&'static str> = (0..n).map(|i| plan.finish_reason(i)).collect();
    let completion: u64 = plan.lengths.iter().map(|&l| u64::from(l)).sum();
    let body = FullResponse {
        flavor,
        endpoint,
        id: &id,
        created,
        model: &plan.model,
        choices: &choices,
        finish: &finish,
        prompt_tokens: u64::from(plan.prompt_tokens),
        completion_tokens: completion,
        reasoning_key,
        reasoning_on: plan.reasoning_tokens > 0,
        tool: tool.as_ref().map(|(name, id)| (name.as_str(), id.as_str())),
        metrics: shared
            .config
            .request_metrics
            .then(|| request_metrics(&shared, &generation)),
        timings: timings(&shared, &generation),
    }
    .into_json();
    Ok(json(StatusCode::OK, body))
}

fn models(shared: &Shared) -> Response<SimBody> {
    let config = &shared.config;
    let perm_ids: Vec<String> = (0..config.models.len())
        .map(|i| {
            let mut rng = request_rng(config.seed, i as u64, SALT_IDS);
            hex_id("modelperm-", &mut rng)
        })
        .collect();
    json(
        StatusCode::OK,
        render::model_list(
            &config.models,
            shared.started_unix,
            config.max_model_len,
            &perm_ids,
        ),
    )
}

async fn embeddings(shared: Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<SimBody> {
    let arrival = Instant::now();
    shared.counters.requests.fetch_add(1, Relaxed);
    let (_, obj) = match read_json(req).await {
        Ok(v) => v,
        Err(e) => return api_error(&e),
    };
    let model = match request::resolve_model(&obj, &shared.config) {
        Ok(m) => m,
        Err(e) => return api_error(&e),
    };
    let bad_input = || {
        api_error(&ApiError::validation(
            Some("input"),
            "1 validation error: `input` must be a string, a list of strings or a list of token ids",
        ))
    };
    // Each input: (hash of its content, prompt tokens).
    let mut inputs: Vec<(u64, u64)> = Vec::new();
    match obj.get("input") {
        Some(serde_json::Value::String(s)) => inputs.push((fnv1a(s.as_bytes()), text_tokens(s))),
        Some(serde_json::Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(serde_json::Value::is_number) {
                let bytes = serde_json::to_vec(items).unwrap_or_default();
                inputs.push((fnv1a(&bytes), items.len() as u64));
            } else {
                for item in items {
                    match item {
                        serde_json::Value::String(s) => {
                            inputs.push((fnv1a(s.as_bytes()), text_tokens(s)))
                        }
                        serde_json::Value::Array(ids) => {
                            let bytes = serde_json::to_vec(ids).unwrap_or_default();
                            inputs.push((fnv1a(&bytes), ids.len() as u64));
                        }
                        _ => return bad_input(),
                    }
                }
            }
        }
        _ => return bad_input(),
    }
    let base64 = match obj.get("encoding_format") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::String(f)) if f == "float" => false,
        Some(serde_json::Value::String(f)) if f == "base64" => true,
        Some(_) => {
            return api_error(&ApiError::validation(
                Some("encoding_format"),
                "1 validation error: `encoding_format` must be \"float\" or \"base64\"",
            ));
        }
    };
    let prompt_tokens: u64 = inputs.iter().map(|(_, t)| (*t).max(1)).sum();
    shared
        .counters
        .prompt_tokens
        .fetch_add(prompt_tokens, Relaxed);
    let mut tracker = Tracker::new(shared.clone(), "embedding", String::new());
    let timing = &shared.config.timing;
    let ms = timing.ttft_base_ms + timing.prefill_ms_per_1k_tokens * prompt_tokens as f64 / 1000.0;
    tokio::time::sleep_until(arrival + std::time::Duration::from_nanos((ms * 1e6) as u64)).await;
    tracker.complete();

    let dim = shared.config.embedding_dim as usize;
    let seed = shared.config.seed.unwrap_or(0);
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, (hash, _))| {
            // The same input always gets the same vector (for a given seed).
            let mut state = mix(seed ^ mix(*hash));
            let mut v: Vec<f32> = (0..dim)
                .map(|_| {
                    state = mix(state);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect();
            let norm = v
                .iter()
                .map(|x| x * x)
                .sum::<f32>()
                .sqrt()
                .max(f32::EPSILON);
            v.iter_mut().for_each(|x| *x /= norm);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                render::Embedding::Base64(render::base64(&bytes))
            } else {
                render::Embedding::Floats(v)
            };
            render::EmbeddingData {
                index,
                object: "embedding",
                embedding,
            }
        })
        .collect();
    let hash = fnv1a(&serde_json::to_vec(&obj).unwrap_or_default());
    let mut ids = request_rng(shared.config.seed, hash, SALT_IDS);
    let id = hex_id("embd-", &mut ids);
    let body = serde_json::to_vec(&render::EmbeddingResponse {
        id: &id,
        object: "list",
        created: created(&shared),
        model: &model,
        data,
        usage: Usage::new(prompt_tokens, 0),
    })
    .unwrap_or_default();
    json(StatusCode::OK, body)
}

#[cfg(test)]
mod stamp_tests {
    use super::*;

    #[test]
    fn every_json_event_gets_the_stamp_and_done_does_not() {
        let out = b"data: {\"a\":\"}\\n\\n\"}\n\ndata: {\"b\":1}\n\ndata: [DONE]\n\n";
        let s = stamp_emit_time(out, 42);
        assert_eq!(
            String::from_utf8(s).unwrap(),
            "data: {\"a\":\"}\\n\\n\",\"tokentap_emit_ns\":42}\n\n\
             data: {\"b\":1,\"tokentap_emit_ns\":42}\n\ndata: [DONE]\n\n"
        );
    }
}
