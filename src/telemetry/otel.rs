//! OpenTelemetry tracing: one span per proxied request, exported over OTLP.
//!
//! The proxy calls [`Tracer::start`] when a request arrives, [`RequestSpan::inject`] on the
//! upstream request's headers, the `on_*` methods as the response goes by, and
//! [`RequestSpan::finish`] exactly once when the request ends. Tracing is off unless
//! `[tracing] enabled = true`.
//!
//! Spans never slow the proxy down: an ended span is handed to a bounded queue with a
//! non-blocking `try_send`, and a background task exports batches. When the queue is full (the
//! collector is slow or down) or an export fails, the spans are dropped and counted in
//! `tokentap_otel_spans_dropped_total`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use metrics::Counter;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_http::{HeaderExtractor, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol as OtlpProtocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::{Protocol, TracingConfig};
use crate::latency::Figures;
use crate::route::{Endpoint, RequestInfo};
use crate::telemetry::{Outcome, Telemetry, TraceIds};

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// A tracing configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("tracing: {0}")]
pub struct TracingError(String);

/// The span factory and exporter, built once at startup.
pub struct Tracer {
    provider: SdkTracerProvider,
    tracer: opentelemetry_sdk::trace::Tracer,
    propagator: TraceContextPropagator,
    propagate: bool,
    provider_name: StringValue,
    control: mpsc::Sender<oneshot::Sender<()>>,
    shutdown_timeout: Duration,
}

impl fmt::Debug for Tracer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracer")
            .field("propagate", &self.propagate)
            .finish_non_exhaustive()
    }
}

/// What is known about a request when it arrives.
#[derive(Debug)]
pub struct RequestStart<'a> {
    /// The client's request headers (`traceparent`, `tracestate`).
    pub headers: &'a HeaderMap,
    /// HTTP method.
    pub method: &'a Method,
    /// Request path.
    pub path: &'a str,
    /// Endpoint.
    pub endpoint: Endpoint,
    /// What the body said.
    pub info: &'a RequestInfo,
    /// The request's `tenant` label value, when tenants are on (never the raw header value
    /// unless it became the label).
    pub tenant: Option<&'a str>,
    /// When the request head arrived (`t0`): the span starts there.
    pub arrived: Instant,
}

/// The span of one request, from [`Tracer::start`] to [`RequestSpan::finish`].
pub struct RequestSpan {
    span: opentelemetry_sdk::trace::Span,
    /// Wall clock and monotonic clock read together when the span was opened: every
    /// timestamp is `wall + (instant - start)`, so the span's times are consistent.
    wall: SystemTime,
    start: Instant,
    /// The wall-clock time the request arrived (the span's start): the first-token and
    /// first-answer events are this plus TTFT and TTFA, the instants those figures were taken
    /// at, whenever the span gets to hear of them.
    arrived: SystemTime,
    propagate: bool,
    stream: bool,
    status: u16,
}

impl fmt::Debug for RequestSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestSpan")
            .field("span_context", self.span.span_context())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Tracer {
    /// Builds the exporter and starts its background task, or returns `None` when tracing is
    /// off. Called once at startup, inside the tokio runtime; connects to nothing yet (the
    /// collector may be down).
    pub fn new(
        config: &TracingConfig,
        telemetry: &Telemetry,
    ) -> Result<Option<Tracer>, TracingError> {
        if !config.enabled || sdk_disabled() {
            return Ok(None);
        }
        let settings = Settings::resolve(config)?;
        let dropped = telemetry.counter(
            "tokentap_otel_spans_dropped_total",
            "Spans dropped because the export queue was full or the collector failed",
        );
        let mut exporter = build_exporter(config, &settings)?;
        let resource = build_resource(config);

        let (spans_tx, spans_rx) = mpsc::channel(settings.max_queue_size);
        let (control_tx, control_rx) = mpsc::channel(4);
        exporter.set_resource(&resource);
        tokio::spawn(
            Batcher {
                exporter,
                spans: spans_rx,
                control: control_rx,
                dropped: dropped.clone(),
                batch_size: settings.max_export_batch_size,
                delay: settings.scheduled_delay,
                timeout: settings.timeout,
                failing: false,
            }
            .run(),
        );

        let mut builder = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_span_processor(QueueProcessor {
                queue: spans_tx,
                dropped,
                closed: AtomicBool::new(false),
            });
        if let Some(ratio) = settings.sample_ratio {
            builder = builder.with_sampler(Sampler::ParentBased(Box::new(
                Sampler::TraceIdRatioBased(ratio),
            )));
        }
        let provider = builder.build();
        let tracer = provider.tracer("tokentap");

        tracing::info!(
            protocol = settings.protocol.as_str(),
            endpoint = settings.endpoint_for_log.as_deref().unwrap_or("(from env or default)"),
            sample_ratio = ?settings.sample_ratio,
            propagate = config.propagate,
            "exporting spans over OTLP"
        );
        Ok(Some(Tracer {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            propagate: config.propagate,
            provider_name: StringValue::from(
                config
                    .provider_name
                    .clone()
                    .unwrap_or_else(|| "vllm".to_owned()),
            ),
            control: control_tx,
            shutdown_timeout: settings.shutdown_timeout,
        }))
    }

    /// Opens the span of a request that just arrived, as a child of the client's
    /// `traceparent` when it sent one. Called once per request, before it goes upstream.
    pub fn start(&self, req: &RequestStart<'_>) -> RequestSpan {
        let wall = SystemTime::now();
        let start = Instant::now();
        let arrived = wall - start.saturating_duration_since(req.arrived);
        let parent = if req.headers.contains_key(TRACEPARENT) {
            self.propagator
                .extract_with_context(&Context::new(), &HeaderExtractor(req.headers))
        } else {
            Context::new()
        };
        let operation = operation(req.endpoint);
        let model = req.info.model.as_deref();
        let name = match (operation, model) {
            (Some(op), Some(model)) => format!("{op} {model}"),
            (Some(op), None) => op.to_owned(),
            (None, _) => format!("HTTP {}", req.method),
        };
        let mut attributes = Vec::with_capacity(12);
        if let Some(op) = operation {
            attributes.push(KeyValue::new("gen_ai.operation.name", op));
            attributes.push(KeyValue::new(
                "gen_ai.provider.name",
                self.provider_name.clone(),
            ));
            if let Some(model) = model {
                attributes.push(KeyValue::new("gen_ai.request.model", model.to_owned()));
            }
        }
        if req.endpoint.is_generation() {
            attributes.push(KeyValue::new("gen_ai.request.stream", req.info.stream));
            if let Some(max) = req.info.max_tokens {
                attributes.push(KeyValue::new("gen_ai.request.max_tokens", clamp(max)));
            }
            if req.info.n != 1 {
                attributes.push(KeyValue::new(
                    "gen_ai.request.choice.count",
                    i64::from(req.info.n),
                ));
            }
        }
        attributes.push(KeyValue::new(
            "http.request.method",
            req.method.as_str().to_owned(),
        ));
        attributes.push(KeyValue::new("url.path", req.path.to_owned()));
        if let Some(tenant) = req.tenant {
            attributes.push(KeyValue::new("tokentap.tenant", tenant.to_owned()));
        }
        let builder = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_start_time(arrived)
            .with_attributes(attributes);
        RequestSpan {
            span: self.tracer.build_with_context(builder, &parent),
            wall,
            start,
            arrived,
            propagate: self.propagate,
            stream: req.info.stream,
            status: 0,
        }
    }

    /// Exports the spans still queued; called once on graceful shutdown, after the last
    /// request ended. Waits at most `shutdown_timeout_secs`.
    pub async fn shutdown(&self) {
        let (done, finished) = oneshot::channel();
        let flushed = async {
            if self.control.send(done).await.is_ok() {
                let _ = finished.await;
            }
        };
        if tokio::time::timeout(self.shutdown_timeout, flushed)
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?self.shutdown_timeout,
                "spans not exported before the shutdown timeout"
            );
        }
        let _ = self.provider.shutdown();
    }
}

impl RequestSpan {
    /// Writes this span's `traceparent` (and `tracestate`) into the upstream request's
    /// headers, replacing the client's, when `propagate` is on; leaves them as they are when
    /// it is off. Called once, before the request is sent upstream.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if !self.propagate {
            return;
        }
        let cx = self.span.span_context();
        let traceparent = format!(
            "00-{:032x}-{:016x}-{:02x}",
            cx.trace_id(),
            cx.span_id(),
            cx.trace_flags().to_u8()
        );
        if let Ok(value) = http::HeaderValue::try_from(traceparent) {
            headers.insert(TRACEPARENT, value);
        }
        let state = cx.trace_state().header();
        match http::HeaderValue::try_from(state) {
            Ok(value) if !value.is_empty() => {
                headers.insert(TRACESTATE, value);
            }
            _ => {
                headers.remove(TRACESTATE);
            }
        }
    }

    /// The span's trace and span ids when it is sampled, for the exemplars of its request's
    /// TTFT, ITL and E2EL: a bucket links only to a trace the collector was sent.
    pub fn trace(&self) -> Option<TraceIds> {
        let cx = self.span.span_context();
        (cx.is_valid() && cx.is_sampled()).then(|| TraceIds {
            trace_id: u128::from_be_bytes(cx.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(cx.span_id().to_bytes()),
        })
    }

    /// The request was sent to the upstream endpoint `server` (the one that answered, after a
    /// retry; or the one whose connection failed): its `server.address` and `server.port`,
    /// and `network.peer.address` when a DNS name was resolved to connect.
    pub fn on_upstream(&mut self, server: &Server) {
        if self.span.is_recording() {
            self.span.set_attributes(server.attributes());
            if let Some(peer) = &server.peer {
                self.span
                    .set_attribute(KeyValue::new("network.peer.address", peer.clone()));
            }
        }
    }

    /// The upstream's response head arrived with `status`.
    pub fn on_response_head(&mut self, status: u16) {
        self.status = status;
    }

    /// The first token event was handed to the client, `ttft` after arrival: adds the
    /// `gen_ai.first_token` event at this instant.
    pub fn on_first_token(&mut self, ttft: Duration) {
        if self.span.is_recording() {
            let at = self.arrived + ttft;
            self.span.add_event_with_timestamp(
                "gen_ai.first_token",
                at,
                vec![KeyValue::new("tokentap.ttft_s", ttft.as_secs_f64())],
            );
        }
    }

    /// The first output event with answer text was handed to the client, `ttfa` after
    /// arrival: adds the `gen_ai.first_answer` event at this instant (after the reasoning of a
    /// reasoning model, the moment a person starts reading).
    pub fn on_first_answer(&mut self, ttfa: Duration) {
        if self.span.is_recording() {
            let at = self.arrived + ttfa;
            self.span.add_event_with_timestamp(
                "gen_ai.first_answer",
                at,
                vec![KeyValue::new("tokentap.ttfa_s", ttfa.as_secs_f64())],
            );
        }
    }

    /// The response's `id` and `model`, from the first event (or JSON body) that carried them;
    /// called at most once.
    pub fn on_response_meta(&mut self, id: &str, model: &str) {
        if self.span.is_recording() {
            self.span
                .set_attribute(KeyValue::new("gen_ai.response.id", id.to_owned()));
            self.span
                .set_attribute(KeyValue::new("gen_ai.response.model", model.to_owned()));
        }
    }

    /// Ends the span, now, with the request's outcome, final status (0 when no response was
    /// sent) and figures. Called exactly once, when the request really ended. An outcome
    /// other than `ok` sets `error.type` to its name and the span status to ERROR.
    pub fn finish(mut self, outcome: Outcome, status: u16, figures: &Figures) {
        let end = self.now();
        if self.span.is_recording() {
            let status = if status != 0 { status } else { self.status };
            let mut attributes = Vec::with_capacity(16);
            if status != 0 {
                attributes.push(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
            }
            if let Some(tokens) = figures.prompt_tokens {
                attributes.push(KeyValue::new("gen_ai.usage.input_tokens", clamp(tokens)));
            }
            if let Some(tokens) = figures.output_tokens {
                attributes.push(KeyValue::new("gen_ai.usage.output_tokens", clamp(tokens)));
            }
            if let Some(reason) = figures.finish_reason {
                attributes.push(KeyValue::new(
                    "gen_ai.response.finish_reasons",
                    Value::Array(Array::String(vec![StringValue::from(reason.as_str())])),
                ));
            }
            if let Some(reason) = figures.stop_reason {
                // The Responses or Messages API's own word, which chat's may have lost.
                attributes.push(KeyValue::new("tokentap.stop_reason", reason));
            }
            if let Some(tokens) = figures.reasoning_tokens {
                attributes.push(KeyValue::new(
                    "gen_ai.usage.reasoning.output_tokens",
                    clamp(tokens),
                ));
            }
            if let Some(ttft) = figures.ttft {
                if self.stream {
                    attributes.push(KeyValue::new(
                        "gen_ai.response.time_to_first_chunk",
                        ttft.as_secs_f64(),
                    ));
                }
                attributes.push(KeyValue::new("tokentap.ttft_s", ttft.as_secs_f64()));
            }
            if let Some(ttfa) = figures.ttfa {
                attributes.push(KeyValue::new("tokentap.ttfa_s", ttfa.as_secs_f64()));
            }
            for (key, d) in [
                ("tokentap.upstream.queue_s", figures.queue),
                ("tokentap.upstream.prefill_s", figures.prefill),
                ("tokentap.upstream.decode_s", figures.decode),
                ("tokentap.ttft_outside_engine_s", figures.outside_engine),
            ] {
                if let Some(d) = d {
                    attributes.push(KeyValue::new(key, d.as_secs_f64()));
                }
            }
            if let Some(n) = figures.cached_prompt_tokens {
                attributes.push(KeyValue::new("tokentap.cached_prompt_tokens", clamp(n)));
            }
            if let Some(reasoning) = figures.reasoning {
                attributes.push(KeyValue::new(
                    "tokentap.reasoning_s",
                    reasoning.as_secs_f64(),
                ));
            }
            if let Some(tpot) = figures.tpot {
                attributes.push(KeyValue::new("tokentap.tpot_s", tpot.as_secs_f64()));
            }
            if let Some(itl) = figures.itl_mean {
                attributes.push(KeyValue::new("tokentap.itl_mean_s", itl.as_secs_f64()));
            }
            if let Some(itl) = figures.itl_max {
                attributes.push(KeyValue::new("tokentap.itl_max_s", itl.as_secs_f64()));
            }
            attributes.push(KeyValue::new("tokentap.e2el_s", figures.e2el.as_secs_f64()));
            attributes.push(KeyValue::new("tokentap.chunks", clamp(figures.chunks)));
            attributes.push(KeyValue::new(
                "tokentap.token_source",
                figures.token_source.as_str(),
            ));
            attributes.push(KeyValue::new("tokentap.outcome", outcome.as_str()));
            if outcome != Outcome::Ok {
                attributes.push(KeyValue::new("error.type", outcome.as_str()));
            }
            self.span.set_attributes(attributes);
            if outcome != Outcome::Ok {
                self.span.set_status(Status::error(outcome.as_str()));
            }
        }
        self.span.end_with_timestamp(end);
    }

    /// The wall-clock time of this instant, on the span's monotonic clock.
    fn now(&self) -> SystemTime {
        self.wall + self.start.elapsed()
    }
}

/// OTLP integers are signed.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// What the OpenTelemetry conventions call the server of a request: one upstream endpoint,
/// built once with it, handed to each request it serves (a reference count, no allocation).
#[derive(Debug)]
pub struct Server {
    /// `server.address`: the host as configured (a DNS name stays a name).
    pub address: Option<StringValue>,
    /// `server.port`: the URL's port, or the scheme's.
    pub port: Option<i64>,
    /// `network.peer.address`: the address a DNS name was resolved to, when it was.
    pub peer: Option<StringValue>,
}

impl Server {
    /// The server at `base` (the endpoint's URL), connected at `peer` when its name was
    /// resolved to pick one address.
    pub fn new(base: &http::Uri, peer: Option<std::net::IpAddr>) -> Server {
        let address = base
            .host()
            .map(|h| StringValue::from(h.trim_start_matches('[').trim_end_matches(']').to_owned()));
        let port = base
            .port_u16()
            .or_else(|| match base.scheme_str() {
                Some("https") => Some(443),
                Some("http") => Some(80),
                _ => None,
            })
            .map(i64::from);
        Server {
            address,
            port,
            peer: peer.map(|ip| StringValue::from(ip.to_string())),
        }
    }

    /// `server.address` and `server.port`, those of them that are known: what the span and
    /// every OTLP metric of the request carry (the peer address is the span's alone).
    pub fn attributes(&self) -> impl Iterator<Item = KeyValue> + '_ {
        let address = self
            .address
            .as_ref()
            .map(|a| KeyValue::new("server.address", a.clone()));
        let port = self.port.map(|p| KeyValue::new("server.port", p));
        address.into_iter().chain(port)
    }
}

/// The `gen_ai.operation.name` of an endpoint; `None` for those that are no GenAI operation.
pub(super) fn operation(endpoint: Endpoint) -> Option<&'static str> {
    match endpoint {
        Endpoint::Chat => Some("chat"),
        Endpoint::Completions => Some("text_completion"),
        Endpoint::Embeddings => Some("embeddings"),
        // Both are conversations with a model: GenAI's `chat`, as their own SDKs' spans say.
        Endpoint::Responses | Endpoint::Messages => Some("chat"),
        Endpoint::Models | Endpoint::Other => None,
    }
}

/// `OTEL_SDK_DISABLED=true`: every OpenTelemetry signal is off, whatever the configuration.
pub(super) fn sdk_disabled() -> bool {
    env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

pub(super) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The first of these environment variables that is set and parses.
pub(super) fn env_parse<T: std::str::FromStr>(names: &[&str]) -> Option<T> {
    names
        .iter()
        .find_map(|name| env(name).and_then(|v| v.trim().parse().ok()))
}

/// The configuration with the environment and defaults applied, checked.
#[derive(Debug)]
struct Settings {
    protocol: Protocol,
    endpoint_for_log: Option<String>,
    timeout: Duration,
    sample_ratio: Option<f64>,
    max_queue_size: usize,
    max_export_batch_size: usize,
    scheduled_delay: Duration,
    shutdown_timeout: Duration,
}

impl Settings {
    fn resolve(config: &TracingConfig) -> Result<Settings, TracingError> {
        let err = |m: String| Err(TracingError(m));
        let protocol = protocol(config.protocol, "TRACES").map_err(TracingError)?;
        let timeout = timeout(config.timeout_secs, "TRACES").map_err(TracingError)?;
        let sample_ratio = match config.sample_ratio {
            Some(r) if (0.0..=1.0).contains(&r) => Some(r),
            Some(r) => return err(format!("sample_ratio must be within 0..=1, got {r}")),
            None => None,
        };
        let max_queue_size = config
            .max_queue_size
            .or_else(|| env_parse(&["OTEL_BSP_MAX_QUEUE_SIZE"]))
            .unwrap_or(2048);
        if max_queue_size == 0 {
            return err("max_queue_size must be at least 1".to_owned());
        }
        let max_export_batch_size = config
            .max_export_batch_size
            .or_else(|| env_parse(&["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"]))
            .unwrap_or(512);
        if max_export_batch_size == 0 {
            return err("max_export_batch_size must be at least 1".to_owned());
        }
        let scheduled_delay = Duration::from_millis(
            config
                .scheduled_delay_ms
                .or_else(|| env_parse(&["OTEL_BSP_SCHEDULE_DELAY"]))
                .unwrap_or(5000),
        );
        let shutdown_timeout = match config.shutdown_timeout_secs {
            Some(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
            Some(s) => return err(format!("shutdown_timeout_secs must be >= 0, got {s}")),
            None => Duration::from_secs(5),
        };
        let endpoint_for_log = config
            .endpoint
            .as_ref()
            .map(|e| http_endpoint(e, protocol, "/v1/traces"));
        Ok(Settings {
            protocol,
            endpoint_for_log,
            timeout,
            sample_ratio,
            max_queue_size,
            max_export_batch_size: max_export_batch_size.min(max_queue_size),
            scheduled_delay,
            shutdown_timeout,
        })
    }
}

/// The export protocol: the configured one, else `OTEL_EXPORTER_OTLP_{signal}_PROTOCOL`, else
/// `OTEL_EXPORTER_OTLP_PROTOCOL`, else gRPC. An unknown name is refused.
pub(super) fn protocol(configured: Option<Protocol>, signal: &str) -> Result<Protocol, String> {
    if let Some(p) = configured {
        return Ok(p);
    }
    match env(&format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .as_deref()
        .map(str::trim)
    {
        None | Some("grpc") => Ok(Protocol::Grpc),
        Some("http/protobuf") => Ok(Protocol::HttpProtobuf),
        Some(other) => Err(format!(
            "OTLP protocol {other:?} is not supported (use \"grpc\" or \"http/protobuf\")"
        )),
    }
}

/// The limit on one export: the configured seconds, else
/// `OTEL_EXPORTER_OTLP_{signal}_TIMEOUT`, else `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds), else
/// 10 s.
pub(super) fn timeout(configured: Option<f64>, signal: &str) -> Result<Duration, String> {
    match configured {
        Some(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err(format!("timeout_secs must be > 0, got {s}")),
        None => Ok(env_parse::<u64>(&[
            &format!("OTEL_EXPORTER_OTLP_{signal}_TIMEOUT"),
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ])
        .filter(|ms| *ms > 0)
        .map_or(Duration::from_secs(10), Duration::from_millis)),
    }
}

/// The URL a signal is sent to, from the configured base URL: for HTTP, the signal's `path`
/// (`/v1/traces`, `/v1/metrics`) is appended unless the URL already ends with it.
pub(super) fn http_endpoint(base: &str, protocol: Protocol, path: &str) -> String {
    match protocol {
        Protocol::Grpc => base.to_owned(),
        Protocol::HttpProtobuf if base.trim_end_matches('/').ends_with(path) => base.to_owned(),
        Protocol::HttpProtobuf => format!("{}{path}", base.trim_end_matches('/')),
    }
}

fn build_exporter(
    config: &TracingConfig,
    settings: &Settings,
) -> Result<opentelemetry_otlp::SpanExporter, TracingError> {
    let built = match settings.protocol {
        Protocol::Grpc => {
            use opentelemetry_otlp::WithTonicConfig as _;
            let metadata = opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(
                header_map(&config.headers).map_err(TracingError)?,
            );
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_protocol(OtlpProtocol::Grpc)
                .with_timeout(settings.timeout)
                .with_metadata(metadata);
            if let Some(endpoint) = &config.endpoint {
                builder = builder.with_endpoint(endpoint.clone());
            }
            builder.build()
        }
        Protocol::HttpProtobuf => {
            header_map(&config.headers).map_err(TracingError)?;
            let headers = config
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(OtlpProtocol::HttpBinary)
                .with_timeout(settings.timeout)
                .with_headers(headers)
                .with_http_client(ExportClient::new(settings.timeout).map_err(TracingError)?);
            if let Some(endpoint) = &config.endpoint {
                builder = builder.with_endpoint(http_endpoint(
                    endpoint,
                    Protocol::HttpProtobuf,
                    "/v1/traces",
                ));
            }
            builder.build()
        }
    };
    built.map_err(|e| TracingError(format!("OTLP exporter: {e}")))
}

/// The configured export headers, checked.
pub(super) fn header_map(headers: &BTreeMap<String, String>) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let name = http::HeaderName::try_from(name.as_str())
            .map_err(|e| format!("header name {name:?}: {e}"))?;
        let value = http::HeaderValue::try_from(value.as_str())
            .map_err(|e| format!("header {name} value: {e}"))?;
        map.insert(name, value);
    }
    Ok(map)
}

/// The resource of every signal: `[tracing]`'s service name and attributes over the
/// environment's.
pub(super) fn build_resource(config: &TracingConfig) -> Resource {
    // `Resource::builder()` reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    let mut builder = Resource::builder();
    let env_names_service = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|v| {
            v.split(',').any(|kv| {
                kv.split('=')
                    .next()
                    .is_some_and(|k| k.trim() == "service.name")
            })
        });
    builder = builder.with_attributes(
        config
            .resource_attributes
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
    );
    match &config.service_name {
        Some(name) => builder = builder.with_service_name(name.clone()),
        None if !env_names_service && !config.resource_attributes.contains_key("service.name") => {
            builder = builder.with_service_name("tokentap")
        }
        None => {}
    }
    builder.build()
}

/// The HTTP client of the OTLP/HTTP exporter: hyper with rustls (system roots), so both
/// `http://` and `https://` collectors work without another TLS stack.
#[derive(Debug)]
pub(super) struct ExportClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl ExportClient {
    pub(super) fn new(timeout: Duration) -> Result<ExportClient, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(ExportClient {
            client: Client::builder(TokioExecutor::new()).build(https),
            timeout,
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let exchange = async {
            let response = self.client.request(request.map(Full::new)).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, 4 << 20).collect().await?.to_bytes();
            Ok::<_, HttpError>(http::Response::from_parts(parts, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HttpError::from("OTLP export timed out"))?
    }
}

/// Hands ended spans to the export task without ever waiting: a full queue drops the span.
#[derive(Debug)]
struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
    dropped: Counter,
    closed: AtomicBool,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.closed.load(Ordering::Relaxed) || self.queue.try_send(span).is_err() {
            self.dropped.increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // Flushing is asynchronous: see `Tracer::shutdown`.
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        if self.closed.swap(true, Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        Ok(())
    }
}

/// The background task that batches queued spans and exports them, one export at a time.
struct Batcher {
    exporter: opentelemetry_otlp::SpanExporter,
    spans: mpsc::Receiver<SpanData>,
    control: mpsc::Receiver<oneshot::Sender<()>>,
    dropped: Counter,
    batch_size: usize,
    delay: Duration,
    timeout: Duration,
    failing: bool,
}

impl Batcher {
    async fn run(mut self) {
        let mut batch: Vec<SpanData> = Vec::with_capacity(self.batch_size);
        let mut deadline: Option<Instant> = None;
        loop {
            let timed = deadline.is_some();
            let timer = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now));
            tokio::select! {
                biased;
                flush = self.control.recv() => {
                    let Some(done) = flush else { break };
                    while let Ok(span) = self.spans.try_recv() {
                        batch.push(span);
                        if batch.len() >= self.batch_size {
                            self.export(&mut batch).await;
                        }
                    }
                    self.export(&mut batch).await;
                    deadline = None;
                    let _ = done.send(());
                }
                received = self.spans.recv_many(&mut batch, self.batch_size) => {
                    if received == 0 {
                        self.export(&mut batch).await;
                        break;
                    }
                    if batch.len() >= self.batch_size {
                        self.export(&mut batch).await;
                        deadline = None;
                    } else if deadline.is_none() {
                        deadline = Some(Instant::now() + self.delay);
                    }
                }
                () = timer, if timed => {
                    self.export(&mut batch).await;
                    deadline = None;
                }
            }
        }
    }

    async fn export(&mut self, batch: &mut Vec<SpanData>) {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::replace(batch, Vec::with_capacity(self.batch_size));
        let count = spans.len() as u64;
        let error = match tokio::time::timeout(self.timeout, self.exporter.export(spans)).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!("no answer within {:?}", self.timeout)),
        };
        match error {
            None if self.failing => {
                self.failing = false;
                tracing::info!("span export recovered");
            }
            None => {}
            Some(error) => {
                self.dropped.increment(count);
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(%error, spans = count, "span export failed; dropping spans until the collector answers");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
