//! Configuration: one serde tree with documented defaults, loaded from TOML and then validated.
//!
//! Every field has a default, so an empty file is a valid configuration. Unknown fields are
//! rejected, so a typo is an error that names the field rather than a setting silently ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration of `tokentap serve`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the proxy listens on for clients.
    pub listen: SocketAddr,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`); `None` turns it off.
    pub admin_listen: Option<SocketAddr>,
    /// The upstream server and how to reach it. With `[[routes]]`, `upstream.url` is not used
    /// (and may not be set); the other `[upstream]` settings apply to every route's upstreams.
    pub upstream: UpstreamConfig,
    /// Per-model routes to several upstreams (`[[routes]]`); empty: every request goes to
    /// `upstream.url`.
    pub routes: Vec<RouteConfig>,
    /// Request handling.
    pub proxy: ProxyConfig,
    /// Metrics and logs.
    pub telemetry: TelemetryConfig,
    /// Objectives that decide which requests count as goodput.
    pub slo: SloConfig,
    /// OpenTelemetry tracing (off unless enabled).
    pub tracing: TracingConfig,
    /// OpenTelemetry metrics pushed over OTLP (off unless enabled).
    pub otlp_metrics: OtlpMetricsConfig,
    /// Worker threads, fixed at start-up; `None`: one per CPU the process may run on (see
    /// [`crate::runtime`]).
    pub workers: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            upstream: UpstreamConfig::default(),
            routes: Vec::new(),
            proxy: ProxyConfig::default(),
            telemetry: TelemetryConfig::default(),
            slo: SloConfig::default(),
            tracing: TracingConfig::default(),
            otlp_metrics: OtlpMetricsConfig::default(),
            workers: None,
        }
    }
}

/// Where requests go.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the OpenAI-compatible server, `http://` or `https://`, without a path.
    pub url: String,
    /// PEM file of extra CA certificates trusted for an `https://` upstream (besides the system roots).
    pub ca_file: Option<PathBuf>,
    /// Limit on establishing a TCP (and TLS) connection, seconds.
    pub connect_timeout_secs: f64,
    /// Limit on waiting for the upstream's response head after the request was sent, seconds.
    /// vLLM answers a stream's head at once, but a non-streaming request's head only when
    /// generation ends, so this is long.
    pub response_header_timeout_secs: f64,
    /// Limit on the silence between two body frames of a response, seconds. A queued vLLM
    /// request can be silent before its first token for as long as the queue is.
    pub idle_timeout_secs: f64,
    /// Idle pooled connections are closed after this many seconds.
    pub pool_idle_timeout_secs: f64,
    /// Idle connections kept per upstream.
    pub pool_max_idle: usize,
    /// An upstream given by a DNS name is one endpoint per address the name resolves to,
    /// resolved again this often, seconds.
    pub dns_refresh_secs: f64,
    /// At most this many endpoints per DNS name; addresses past it are left out (counted).
    pub dns_max_addresses: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "http://127.0.0.1:8000".to_owned(),
            ca_file: None,
            connect_timeout_secs: 5.0,
            response_header_timeout_secs: 600.0,
            idle_timeout_secs: 300.0,
            pool_idle_timeout_secs: 90.0,
            pool_max_idle: 1024,
            dns_refresh_secs: 30.0,
            dns_max_addresses: 16,
        }
    }
}

/// One `[[routes]]` entry: the models it serves and the upstreams that serve them.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Exact model names (the request body's `model`); `"*"`: any model no other route names,
    /// and requests without a usable model.
    pub models: Vec<String>,
    /// Base URLs of the upstreams (replicas) that serve these models, `http://` or `https://`,
    /// without a path. One listed in several routes is one endpoint (one pool, one health).
    pub upstreams: Vec<String>,
    /// How a request picks one of `upstreams`. Default `"least_request"`.
    #[serde(default)]
    pub balance: Balance,
    /// `upstream.connect_timeout_secs` for this route's upstreams; unset: `[upstream]`'s.
    pub connect_timeout_secs: Option<f64>,
    /// `upstream.response_header_timeout_secs` for this route's requests.
    pub response_header_timeout_secs: Option<f64>,
    /// `upstream.idle_timeout_secs` for this route's responses.
    pub idle_timeout_secs: Option<f64>,
    /// `upstream.pool_idle_timeout_secs` for this route's upstreams.
    pub pool_idle_timeout_secs: Option<f64>,
    /// `upstream.pool_max_idle` for this route's upstreams.
    pub pool_max_idle: Option<usize>,
}

impl RouteConfig {
    /// The timeouts and pool settings of this route: its own where it sets them, else
    /// `upstream`'s.
    pub fn effective(&self, upstream: &UpstreamConfig) -> UpstreamConfig {
        let mut c = upstream.clone();
        let set = |mine: Option<f64>, theirs: &mut f64| {
            if let Some(v) = mine {
                *theirs = v;
            }
        };
        set(self.connect_timeout_secs, &mut c.connect_timeout_secs);
        set(
            self.response_header_timeout_secs,
            &mut c.response_header_timeout_secs,
        );
        set(self.idle_timeout_secs, &mut c.idle_timeout_secs);
        set(self.pool_idle_timeout_secs, &mut c.pool_idle_timeout_secs);
        if let Some(v) = self.pool_max_idle {
            c.pool_max_idle = v;
        }
        c
    }
}

/// How a route picks an upstream for a request (`routes.balance`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each live upstream in turn.
    RoundRobin,
    /// Power of two choices on outstanding requests.
    #[default]
    LeastRequest,
    /// Power of two choices on outstanding requests weighted by a decaying, peak-sensitive
    /// estimate of the upstream's TTFT and ITL.
    PeakEwma,
}

impl Balance {
    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastRequest => "least_request",
            Balance::PeakEwma => "peak_ewma",
        }
    }
}

/// The model name of the catch-all route.
pub const ANY_MODEL: &str = "*";

/// How requests are handled on the way through.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Largest chat/completions request body read to learn model and stream options; a larger
    /// one gets 413 with an OpenAI-style error body.
    pub max_request_body_bytes: usize,
    /// Ask a streaming upstream for usage (`stream_options.include_usage`) when the client did
    /// not, and remove the usage-only event from what the client receives.
    pub inject_usage: bool,
    /// Add `X-Forwarded-For` and `X-Forwarded-Proto` to upstream requests.
    pub x_forwarded: bool,
    /// On SIGINT/SIGTERM, how long in-flight requests may run on before the process exits, seconds.
    pub shutdown_grace_secs: f64,
    /// Forward bytes without parsing SSE or recording latency (to measure telemetry's own cost).
    pub telemetry_enabled: bool,
    /// Limit on receiving a request head, seconds: counted from accept on a new connection, and
    /// from the first byte of the next request on a kept-alive one. Past it the connection is
    /// closed (with a 408 when part of a head came).
    pub header_timeout_secs: f64,
    /// How long a kept-alive HTTP/1.1 connection may sit between requests, and an HTTP/2
    /// connection without open streams, before it is closed, seconds.
    pub keepalive_idle_secs: f64,
    /// Limit on the silence between two reads of a request body while the proxy waits for it,
    /// seconds; past it the client gets a 408 (when no response was started) and the
    /// connection closes.
    pub body_read_timeout_secs: f64,
    /// Limit on a write to the client that makes no progress (a client that stopped reading),
    /// seconds; past it the connection is closed and the upstream request cancelled.
    pub send_timeout_secs: f64,
    /// Interval of HTTP/2 keep-alive pings to clients, seconds; a ping unanswered for as long
    /// closes the connection.
    pub http2_keepalive_secs: f64,
    /// Most concurrent streams on one HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    /// Largest SSE event (or line) held to be parsed, bytes. The bytes of a longer one are
    /// forwarded as they come and the rest of it is not parsed (counted as oversized).
    pub max_sse_event_bytes: usize,
    /// All request-body bytes the proxy holds in memory at once (bodies read to be inspected);
    /// a request that would go over gets 429.
    pub body_budget_bytes: usize,
    /// Most open client connections; a connection accepted beyond it is closed at once.
    /// Default: half the open-file limit (each proxied connection needs an upstream one too),
    /// less a reserve of 64.
    pub max_connections: Option<usize>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_request_body_bytes: 32 * 1024 * 1024,
            inject_usage: true,
            x_forwarded: true,
            shutdown_grace_secs: 30.0,
            telemetry_enabled: true,
            header_timeout_secs: 30.0,
            keepalive_idle_secs: 60.0,
            body_read_timeout_secs: 30.0,
            send_timeout_secs: 60.0,
            http2_keepalive_secs: 20.0,
            http2_max_concurrent_streams: 128,
            max_sse_event_bytes: 1024 * 1024,
            body_budget_bytes: 256 * 1024 * 1024,
            max_connections: None,
        }
    }
}

/// Access log format.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable `key=value` lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Metrics and logs.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Model names always used as `model` label values.
    pub models: Vec<String>,
    /// Also use the names the upstream lists at `GET /v1/models` (polled every
    /// `model_refresh_secs`). Any other model a request names is labelled `other`.
    pub discover_models: bool,
    /// How often `/v1/models` is polled, seconds. The poll also feeds `/readyz`.
    pub model_refresh_secs: f64,
    /// At most this many distinct `model` label values; names beyond it are labelled `other`.
    pub max_models: usize,
    /// `/readyz` is ready while the upstream answered (any HTTP response) within this many seconds.
    pub ready_window_secs: f64,
    /// Write one access-log line per request (target `tokentap::access`).
    pub access_log: bool,
    /// Format of all log lines.
    pub log_format: LogFormat,
    /// Histogram bucket overrides; an absent list keeps the default of `docs/METRICS.md`.
    pub buckets: BucketConfig,
    /// Length of the sliding window `/stats` summarizes, seconds.
    pub stats_window_secs: f64,
    /// Which `vllm bench serve` decides what an output event is: `"vllm-bench"` (the current
    /// one, default) or `"vllm-bench-0.10"` (every event with choices is a token, for
    /// comparing with old benchmark runs). See `docs/METRICS.md` §1.
    pub definitions: Definitions,
    /// The request header whose value is the request's tenant (set by an API gateway in front,
    /// for example `x-tenant-id`). Unset (the default): no `tenant` label exists at all.
    pub tenant_header: Option<String>,
    /// At most this many distinct `tenant` label values besides `other` and `none`, the
    /// allow-list included; values beyond them are labelled `other`.
    pub max_tenants: usize,
    /// Tenants that always have their own label value, whatever other clients send first.
    pub tenants: Vec<String>,
}

/// Which `vllm bench serve` decides what an output event is (`telemetry.definitions`, see
/// `docs/METRICS.md` §1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum Definitions {
    /// `"vllm-bench"`: the current bench (vLLM 0.33).
    #[default]
    #[serde(rename = "vllm-bench")]
    VllmBench,
    /// `"vllm-bench-0.10"`: the bench of the vLLM 0.10 line, for comparing with old runs.
    #[serde(rename = "vllm-bench-0.10")]
    VllmBench010,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            models: Vec::new(),
            discover_models: true,
            model_refresh_secs: 30.0,
            max_models: 256,
            ready_window_secs: 60.0,
            access_log: true,
            log_format: LogFormat::Text,
            buckets: BucketConfig::default(),
            stats_window_secs: 300.0,
            definitions: Definitions::default(),
            tenant_header: None,
            max_tenants: 64,
            tenants: Vec::new(),
        }
    }
}

/// Histogram buckets (upper bounds), per metric family. `None` keeps the default.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BucketConfig {
    /// `tokentap_time_to_first_token_seconds`, `tokentap_time_to_first_answer_seconds` and
    /// `tokentap_reasoning_time_seconds`.
    pub ttft: Option<Vec<f64>>,
    /// `tokentap_inter_token_latency_seconds`.
    pub itl: Option<Vec<f64>>,
    /// `tokentap_time_per_output_token_seconds`.
    pub tpot: Option<Vec<f64>>,
    /// `tokentap_e2e_request_latency_seconds` and `tokentap_upstream_response_header_seconds`.
    pub e2el: Option<Vec<f64>>,
    /// `tokentap_request_prompt_tokens`, `tokentap_request_generation_tokens`, `tokentap_tokens_per_chunk`.
    pub tokens: Option<Vec<f64>>,
}

/// Goodput objectives, as `vllm bench serve --goodput ttft:MS tpot:MS e2el:MS`; unset bounds
/// are not checked.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SloConfig {
    /// Bound on TTFT, milliseconds.
    pub ttft_ms: Option<f64>,
    /// Bound on TPOT, milliseconds.
    pub tpot_ms: Option<f64>,
    /// Bound on E2EL, milliseconds.
    pub e2el_ms: Option<f64>,
}

/// How spans travel to the collector.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP over gRPC (default port 4317).
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP over HTTP with a protobuf body, `POST {endpoint}/v1/traces` (default port 4318).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl Protocol {
    /// The name used in config files and `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// The `[tracing]` section of the configuration.
///
/// Every optional field falls back to the standard OpenTelemetry environment variable named in
/// its description, then to the default given there: a value written in the file wins over the
/// environment. Export headers are the exception: those from the file and from
/// `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS` are all sent, the environment's value winning for a
/// header named in both.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// Export one span per proxied request. Default `false`: nothing is traced, whatever the
    /// `OTEL_*` environment says. `OTEL_SDK_DISABLED=true` turns tracing off even when this is on.
    pub enabled: bool,
    /// `"grpc"` or `"http/protobuf"`. Default: `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, then
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, then `"grpc"`.
    pub protocol: Option<Protocol>,
    /// The collector's base URL, as in `OTEL_EXPORTER_OTLP_ENDPOINT`: for `http/protobuf`,
    /// `/v1/traces` is appended unless the URL already ends with it. Default:
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is), then `OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// then `http://localhost:4317` (gRPC) or `http://localhost:4318/v1/traces` (HTTP).
    /// `https://` works for both protocols (system roots).
    pub endpoint: Option<String>,
    /// Headers (gRPC metadata) sent with every export, e.g. an API key. Default: none, plus those
    /// of `OTEL_EXPORTER_OTLP_TRACES_HEADERS` / `OTEL_EXPORTER_OTLP_HEADERS`.
    pub headers: BTreeMap<String, String>,
    /// Limit on one export, retries included, in seconds. Default:
    /// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, then `OTEL_EXPORTER_OTLP_TIMEOUT` (both in
    /// milliseconds), then 10.
    pub timeout_secs: Option<f64>,
    /// The `service.name` resource attribute. Default: `OTEL_SERVICE_NAME`, then a
    /// `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, then `"tokentap"`.
    pub service_name: Option<String>,
    /// More resource attributes, e.g. `{ "deployment.environment.name" = "prod" }`. They are
    /// added to those of `OTEL_RESOURCE_ATTRIBUTES`, winning on the same key. Default: none.
    pub resource_attributes: BTreeMap<String, String>,
    /// Fraction of new traces to record, between 0 and 1; a request that carries a
    /// `traceparent` follows its parent's decision (parent-based ratio sampling). Default:
    /// the sampler of `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, then 1 (every request).
    pub sample_ratio: Option<f64>,
    /// Send the proxy span's `traceparent` / `tracestate` upstream so that the server's own
    /// spans (vLLM reads `traceparent`) become its children. When `false`, the client's trace
    /// headers are forwarded untouched. An incoming `traceparent` is continued either way.
    /// Default `true`.
    pub propagate: bool,
    /// The `gen_ai.provider.name` attribute. vLLM is not one of the semantic conventions'
    /// well-known providers, which allow a custom value. Default `"vllm"`.
    pub provider_name: Option<String>,
    /// Ended spans waiting for export; more are dropped (and counted). Default:
    /// `OTEL_BSP_MAX_QUEUE_SIZE`, then 2048.
    pub max_queue_size: Option<usize>,
    /// Most spans in one export request. Default: `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, then 512.
    pub max_export_batch_size: Option<usize>,
    /// Longest a span waits for its batch to fill before it is exported, in milliseconds.
    /// Default: `OTEL_BSP_SCHEDULE_DELAY`, then 5000.
    pub scheduled_delay_ms: Option<u64>,
    /// On graceful shutdown, how long to wait for the queued spans to be exported, in seconds.
    /// Default 5.
    pub shutdown_timeout_secs: Option<f64>,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            enabled: false,
            protocol: None,
            endpoint: None,
            headers: BTreeMap::new(),
            timeout_secs: None,
            service_name: None,
            resource_attributes: BTreeMap::new(),
            sample_ratio: None,
            propagate: true,
            provider_name: None,
            max_queue_size: None,
            max_export_batch_size: None,
            scheduled_delay_ms: None,
            shutdown_timeout_secs: None,
        }
    }
}

/// How cumulative or delta the exported metrics are, as
/// `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE` names them.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Temporality {
    /// Every point covers the time since the process started (what Prometheus-style backends
    /// expect).
    Cumulative,
    /// Every point covers one export interval (what Datadog and similar backends expect).
    Delta,
    /// Delta for counters and histograms, cumulative for up-down counters and gauges (the
    /// specification's `lowmemory`): tokentap's OTLP metrics are all histograms, so delta.
    LowMemory,
}

/// The `[otlp_metrics]` section: the GenAI semantic-convention metrics pushed over OTLP.
///
/// Every optional field falls back to the standard OpenTelemetry environment variable named in
/// its description, then to the default given there, with the same precedence as `[tracing]`:
/// a value written in the file wins over the environment. The resource (`service.name` and
/// attributes) and `gen_ai.provider.name` are those of `[tracing]`, so spans and metrics name
/// the same service.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpMetricsConfig {
    /// Push metrics over OTLP. Default `false`. `OTEL_SDK_DISABLED=true` turns them off even
    /// when this is on.
    pub enabled: bool,
    /// `"grpc"` or `"http/protobuf"`. Default: `OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`, then
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, then `"grpc"`.
    pub protocol: Option<Protocol>,
    /// The collector's base URL: for `http/protobuf`, `/v1/metrics` is appended unless the URL
    /// already ends with it. Default: `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` (used as is), then
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, then `http://localhost:4317` (gRPC) or
    /// `http://localhost:4318/v1/metrics` (HTTP).
    pub endpoint: Option<String>,
    /// Headers (gRPC metadata) sent with every export. Default: none, plus those of
    /// `OTEL_EXPORTER_OTLP_METRICS_HEADERS` / `OTEL_EXPORTER_OTLP_HEADERS`.
    pub headers: BTreeMap<String, String>,
    /// Time between two exports, seconds. Default: `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds),
    /// then 60.
    pub interval_secs: Option<f64>,
    /// Limit on one export, seconds; an export that takes longer is abandoned and counted as
    /// failed. Default: `OTEL_EXPORTER_OTLP_METRICS_TIMEOUT`, then `OTEL_EXPORTER_OTLP_TIMEOUT`
    /// (both milliseconds), then 10.
    pub timeout_secs: Option<f64>,
    /// Default: `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`, then `cumulative`.
    pub temporality: Option<Temporality>,
}

/// A configuration that cannot be used; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown field, wrong type, ...).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message, which names the field and line.
        message: String,
    },
    /// A field has a value that parses but cannot work.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// Dotted path of the field, as written in the file (`routes[1].upstreams` for the
        /// second route's).
        field: std::borrow::Cow<'static, str>,
        /// What is wrong with it.
        reason: String,
    },
}

impl Config {
    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let parse_error = |e: toml::de::Error| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        };
        let config: Config = toml::from_str(text).map_err(parse_error)?;
        if !config.routes.is_empty() {
            // `upstream.url` written in the file, even as its default value, is refused with
            // routes: which of the two was meant cannot be told.
            let table: toml::Table = toml::from_str(text).map_err(parse_error)?;
            let url_given = table
                .get("upstream")
                .and_then(toml::Value::as_table)
                .is_some_and(|u| u.contains_key("url"));
            if url_given {
                return Err(url_with_routes());
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks `[[routes]]`: each names models and upstreams, no model in two routes, one `"*"`
    /// route at most, and `upstream.url` (or `--upstream`) left unset.
    fn validate_routes(&self) -> Result<(), ConfigError> {
        if self.routes.is_empty() {
            return Ok(());
        }
        if self.upstream.url != UpstreamConfig::default().url {
            return Err(url_with_routes());
        }
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, route) in self.routes.iter().enumerate() {
            let field = |name: &str| format!("routes[{i}].{name}").into();
            if route.models.is_empty() {
                return Err(ConfigError::Invalid {
                    field: field("models"),
                    reason: "must name at least one model, or \"*\" for any".to_owned(),
                });
            }
            for model in &route.models {
                if model.is_empty() {
                    return Err(ConfigError::Invalid {
                        field: field("models"),
                        reason: "a model name is empty".to_owned(),
                    });
                }
                if let Some(first) = seen.insert(model, i) {
                    let reason = if model == ANY_MODEL {
                        format!("a second \"*\" route (routes[{first}] is one already)")
                    } else {
                        format!("model {model:?} is routed by routes[{first}] already")
                    };
                    return Err(ConfigError::Invalid {
                        field: field("models"),
                        reason,
                    });
                }
            }
            if route.upstreams.is_empty() {
                return Err(ConfigError::Invalid {
                    field: field("upstreams"),
                    reason: "must list at least one upstream URL".to_owned(),
                });
            }
            let overrides = [
                ("connect_timeout_secs", route.connect_timeout_secs),
                (
                    "response_header_timeout_secs",
                    route.response_header_timeout_secs,
                ),
                ("idle_timeout_secs", route.idle_timeout_secs),
                ("pool_idle_timeout_secs", route.pool_idle_timeout_secs),
            ];
            for (name, value) in overrides {
                if let Some(value) = value
                    && !(value.is_finite() && value > 0.0 && value < 1e9)
                {
                    return Err(ConfigError::Invalid {
                        field: field(name),
                        reason: format!("must be a positive number of seconds, got {value}"),
                    });
                }
            }
            for (j, url) in route.upstreams.iter().enumerate() {
                check_url(&format!("routes[{i}].upstreams"), url)?;
                if route.upstreams[..j].contains(url) {
                    return Err(ConfigError::Invalid {
                        field: field("upstreams"),
                        reason: format!("{url} is listed twice"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks values that parse but cannot work; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workers == Some(0) {
            return Err(ConfigError::Invalid {
                field: "workers".into(),
                reason: "must be at least 1".to_owned(),
            });
        }
        check_url("upstream.url", &self.upstream.url)?;
        self.validate_routes()?;
        let seconds = [
            (
                "upstream.connect_timeout_secs",
                self.upstream.connect_timeout_secs,
            ),
            (
                "upstream.response_header_timeout_secs",
                self.upstream.response_header_timeout_secs,
            ),
            (
                "upstream.idle_timeout_secs",
                self.upstream.idle_timeout_secs,
            ),
            (
                "upstream.pool_idle_timeout_secs",
                self.upstream.pool_idle_timeout_secs,
            ),
            ("upstream.dns_refresh_secs", self.upstream.dns_refresh_secs),
            ("proxy.shutdown_grace_secs", self.proxy.shutdown_grace_secs),
            ("proxy.header_timeout_secs", self.proxy.header_timeout_secs),
            ("proxy.keepalive_idle_secs", self.proxy.keepalive_idle_secs),
            (
                "proxy.body_read_timeout_secs",
                self.proxy.body_read_timeout_secs,
            ),
            ("proxy.send_timeout_secs", self.proxy.send_timeout_secs),
            (
                "proxy.http2_keepalive_secs",
                self.proxy.http2_keepalive_secs,
            ),
            (
                "telemetry.model_refresh_secs",
                self.telemetry.model_refresh_secs,
            ),
            (
                "telemetry.ready_window_secs",
                self.telemetry.ready_window_secs,
            ),
            (
                "telemetry.stats_window_secs",
                self.telemetry.stats_window_secs,
            ),
        ];
        for (field, value) in seconds {
            if !(value.is_finite() && value > 0.0 && value < 1e9) {
                return Err(ConfigError::Invalid {
                    field: field.into(),
                    reason: format!("must be a positive number of seconds, got {value}"),
                });
            }
        }
        let slo = [
            ("slo.ttft_ms", self.slo.ttft_ms),
            ("slo.tpot_ms", self.slo.tpot_ms),
            ("slo.e2el_ms", self.slo.e2el_ms),
        ];
        for (field, value) in slo {
            if let Some(v) = value
                && !(v.is_finite() && v > 0.0 && v < 1e12)
            {
                return Err(ConfigError::Invalid {
                    field: field.into(),
                    reason: format!("must be a positive number of milliseconds, got {v}"),
                });
            }
        }
        let at_least_one = [
            (
                "proxy.max_request_body_bytes",
                self.proxy.max_request_body_bytes,
            ),
            ("proxy.body_budget_bytes", self.proxy.body_budget_bytes),
            (
                "proxy.max_connections",
                self.proxy.max_connections.unwrap_or(1),
            ),
            (
                "proxy.http2_max_concurrent_streams",
                self.proxy.http2_max_concurrent_streams as usize,
            ),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    field: field.into(),
                    reason: "must be at least 1".to_owned(),
                });
            }
        }
        if !(1..=256).contains(&self.upstream.dns_max_addresses) {
            return Err(ConfigError::Invalid {
                field: "upstream.dns_max_addresses".into(),
                reason: "must be from 1 to 256".to_owned(),
            });
        }
        if self.proxy.max_sse_event_bytes < 1024 {
            return Err(ConfigError::Invalid {
                field: "proxy.max_sse_event_bytes".into(),
                reason: "must be at least 1024".to_owned(),
            });
        }
        if self.proxy.body_budget_bytes < self.proxy.max_request_body_bytes {
            return Err(ConfigError::Invalid {
                field: "proxy.body_budget_bytes".into(),
                reason: format!(
                    "must hold at least one body of proxy.max_request_body_bytes ({})",
                    self.proxy.max_request_body_bytes
                ),
            });
        }
        let buckets = [
            ("telemetry.buckets.ttft", &self.telemetry.buckets.ttft),
            ("telemetry.buckets.itl", &self.telemetry.buckets.itl),
            ("telemetry.buckets.tpot", &self.telemetry.buckets.tpot),
            ("telemetry.buckets.e2el", &self.telemetry.buckets.e2el),
            ("telemetry.buckets.tokens", &self.telemetry.buckets.tokens),
        ];
        for (field, list) in buckets {
            if let Some(list) = list {
                let increasing = list.windows(2).all(|w| w[0] < w[1]);
                if list.is_empty() || !increasing || list.iter().any(|b| !b.is_finite()) {
                    return Err(ConfigError::Invalid {
                        field: field.into(),
                        reason: "must be a non-empty list of finite, strictly increasing numbers"
                            .to_owned(),
                    });
                }
            }
        }
        self.telemetry.validate_tenants()?;
        if let Some(ca) = &self.upstream.ca_file
            && !ca.is_file()
        {
            return Err(ConfigError::Invalid {
                field: "upstream.ca_file".into(),
                reason: format!("{} is not a readable file", ca.display()),
            });
        }
        Ok(())
    }
}

/// Settings given on the command line (`tokentap serve --listen ...`), which take precedence over
/// the file's; kept so that a reload applies them again over the re-read file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--upstream`: `upstream.url`, refused beside `[[routes]]`.
    pub upstream: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<SocketAddr>,
}

/// Where `tokentap serve` got its configuration: the file it reads at start and again at each
/// reload (`None`: the defaults), and the command-line settings applied over it.
#[derive(Clone, Debug, Default)]
pub struct Source {
    /// The TOML file (`--config`).
    pub path: Option<PathBuf>,
    /// The command-line settings.
    pub overrides: Overrides,
}

impl Source {
    /// Reads and parses the file, applies the command-line settings and validates the result;
    /// the error names the field.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.path {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        let o = &self.overrides;
        if let Some(listen) = o.listen {
            config.listen = listen;
        }
        if let Some(upstream) = &o.upstream {
            // Even when it names the default URL, which validation cannot tell from unset.
            if !config.routes.is_empty() {
                return Err(ConfigError::Invalid {
                    field: "upstream.url".into(),
                    reason: "--upstream set together with [[routes]]: give the upstreams in \
                             the routes, or use --upstream alone for one upstream"
                        .to_owned(),
                });
            }
            config.upstream.url = upstream.clone();
        }
        if let Some(admin) = o.admin_listen {
            config.admin_listen = Some(admin);
        }
        config.validate()?;
        Ok(config)
    }
}

/// `upstream.url` and `[[routes]]` together.
fn url_with_routes() -> ConfigError {
    ConfigError::Invalid {
        field: "upstream.url".into(),
        reason: "set together with [[routes]]: give the upstreams in the routes, or use \
                 upstream.url (--upstream) alone for one upstream"
            .to_owned(),
    }
}

/// An upstream base URL: `http://` or `https://`, a host, no path or query.
fn check_url(field: &str, url: &str) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        field: field.to_owned().into(),
        reason,
    };
    let uri: http::Uri = url.parse().map_err(|e| invalid(format!("{url}: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(invalid(format!(
                "{url}: must start with http:// or https://"
            )));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(format!("{url}: has no host")));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid(format!(
            "{url}: must not have a path or query: request paths are forwarded as they are"
        )));
    }
    Ok(())
}

/// Longest header value that can become a `tenant` label value, bytes: room for a UUID with a
/// prefix, not for a document.
pub const MAX_TENANT_LEN: usize = 64;

/// Largest `telemetry.max_tenants`: each tenant costs the series of its request counters and
/// TTFT, TPOT and E2EL histograms per model and endpoint.
pub const MAX_TENANTS_LIMIT: usize = 1000;

/// Headers that carry credentials: their values must never become label values.
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "api-key",
];

/// Whether `name` can be a `tenant` label value as it is: 1 to [`MAX_TENANT_LEN`] bytes of
/// printable ASCII (space included), not starting or ending with a space.
pub fn valid_tenant(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TENANT_LEN
        && name.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !name.starts_with(' ')
        && !name.ends_with(' ')
}

impl TelemetryConfig {
    fn validate_tenants(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: String| {
            Err(ConfigError::Invalid {
                field: field.into(),
                reason,
            })
        };
        let Some(header) = &self.tenant_header else {
            if !self.tenants.is_empty() {
                return invalid(
                    "telemetry.tenants",
                    "has no effect without telemetry.tenant_header".to_owned(),
                );
            }
            return Ok(());
        };
        match http::HeaderName::from_bytes(header.as_bytes()) {
            Err(_) => {
                return invalid(
                    "telemetry.tenant_header",
                    format!("{header:?} is not a valid HTTP header name"),
                );
            }
            Ok(name) if CREDENTIAL_HEADERS.contains(&name.as_str()) => {
                return invalid(
                    "telemetry.tenant_header",
                    format!(
                        "{name} carries credentials, which must not become label values; \
                         have the gateway set a tenant id header"
                    ),
                );
            }
            Ok(_) => {}
        }
        if self.max_tenants > MAX_TENANTS_LIMIT {
            return invalid(
                "telemetry.max_tenants",
                format!("must be at most {MAX_TENANTS_LIMIT}"),
            );
        }
        if self.tenants.len() > self.max_tenants {
            return invalid(
                "telemetry.tenants",
                format!(
                    "lists {} names, more than telemetry.max_tenants ({})",
                    self.tenants.len(),
                    self.max_tenants
                ),
            );
        }
        for (i, name) in self.tenants.iter().enumerate() {
            if !valid_tenant(name) {
                return invalid(
                    "telemetry.tenants",
                    format!(
                        "{name:?} must be 1 to {MAX_TENANT_LEN} bytes of printable ASCII, \
                         without spaces at either end"
                    ),
                );
            }
            if name == "other" || name == "none" {
                return invalid(
                    "telemetry.tenants",
                    format!("{name:?} is a reserved label value"),
                );
            }
            if self.tenants[..i].contains(name) {
                return invalid("telemetry.tenants", format!("{name:?} is listed twice"));
            }
        }
        Ok(())
    }
}

/// Seconds from a validated config field.
pub(crate) fn secs(value: f64) -> Duration {
    Duration::from_secs_f64(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_documented_default() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin_listen.unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(c.upstream.url, "http://127.0.0.1:8000");
    }

    #[test]
    fn shipped_example_file_parses_to_the_defaults() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tokentap.toml"))
                .unwrap();
        assert_eq!(Config::parse(&text).unwrap(), Config::default());
    }

    #[test]
    fn definitions_are_named_as_bench_versions() {
        let c = Config::parse("[telemetry]\ndefinitions = \"vllm-bench-0.10\"\n").unwrap();
        assert_eq!(c.telemetry.definitions, Definitions::VllmBench010);
        let c = Config::parse("[telemetry]\ndefinitions = \"vllm-bench\"\n").unwrap();
        assert_eq!(c.telemetry.definitions, Definitions::VllmBench);
        let err = Config::parse("[telemetry]\ndefinitions = \"0.10\"\n").unwrap_err();
        assert!(err.to_string().contains("vllm-bench-0.10"), "{err}");
    }

    #[test]
    fn unknown_field_is_named() {
        let err = Config::parse("[upstream]\nurll = \"http://x\"\n").unwrap_err();
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn bad_values_name_their_field() {
        for (text, field) in [
            ("[upstream]\nurl = \"ftp://x\"", "upstream.url"),
            ("[upstream]\nurl = \"http://x/v1\"", "upstream.url"),
            (
                "[upstream]\nidle_timeout_secs = 0",
                "upstream.idle_timeout_secs",
            ),
            ("[slo]\nttft_ms = -1", "slo.ttft_ms"),
            (
                "[telemetry.buckets]\nitl = [0.2, 0.1]",
                "telemetry.buckets.itl",
            ),
            (
                "[proxy]\nmax_request_body_bytes = 0",
                "proxy.max_request_body_bytes",
            ),
            (
                "[upstream]\nca_file = \"/nonexistent.pem\"",
                "upstream.ca_file",
            ),
            ("workers = 0", "workers"),
            (
                "[telemetry]\ntenant_header = \"x tenant\"",
                "telemetry.tenant_header",
            ),
            (
                "[telemetry]\ntenant_header = \"Authorization\"",
                "telemetry.tenant_header",
            ),
            (
                "[telemetry]\ntenant_header = \"x-tenant\"\nmax_tenants = 100000",
                "telemetry.max_tenants",
            ),
            (
                "[telemetry]\ntenant_header = \"x-tenant\"\nmax_tenants = 1\ntenants = [\"a\", \"b\"]",
                "telemetry.tenants",
            ),
            (
                "[telemetry]\ntenant_header = \"x-tenant\"\ntenants = [\"a\", \"a\"]",
                "telemetry.tenants",
            ),
            (
                "[telemetry]\ntenant_header = \"x-tenant\"\ntenants = [\"other\"]",
                "telemetry.tenants",
            ),
            (
                "[telemetry]\ntenant_header = \"x-tenant\"\ntenants = [\"café\"]",
                "telemetry.tenants",
            ),
            ("[telemetry]\ntenants = [\"a\"]", "telemetry.tenants"),
        ] {
            let err = Config::parse(text).unwrap_err();
            assert!(err.to_string().contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn routes_parse_with_their_balance() {
        let c = Config::parse(
            r#"
[[routes]]
models = ["a", "b"]
upstreams = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
balance = "peak_ewma"

[[routes]]
models = ["*"]
upstreams = ["https://fallback:8443/"]
"#,
        )
        .unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].models, ["a", "b"]);
        assert_eq!(c.routes[0].balance, Balance::PeakEwma);
        assert_eq!(c.routes[1].balance, Balance::LeastRequest, "the default");
    }

    #[test]
    fn bad_routes_name_their_field() {
        let route = |models: &str, upstreams: &str, extra: &str| {
            format!("[[routes]]\nmodels = {models}\nupstreams = {upstreams}\n{extra}\n")
        };
        let ok = route(r#"["a"]"#, r#"["http://h:1"]"#, "");
        for (text, field) in [
            (
                ok.clone() + &route(r#"["b", "a"]"#, r#"["http://h:1"]"#, ""),
                "routes[1].models",
            ),
            (
                route(r#"["*"]"#, r#"["http://h:1"]"#, "")
                    + &route(r#"["*"]"#, r#"["http://h:2"]"#, ""),
                "routes[1].models",
            ),
            (route(r#"["a"]"#, "[]", ""), "routes[0].upstreams"),
            (route("[]", r#"["http://h:1"]"#, ""), "routes[0].models"),
            (
                route(r#"["a"]"#, r#"["http://h:1"]"#, r#"balance = "fastest""#),
                "balance",
            ),
            (
                route(r#"["a"]"#, r#"["http://h:1", "http://h:2/v1"]"#, ""),
                "routes[0].upstreams",
            ),
            (
                route(r#"["a"]"#, r#"["http://h:1", "http://h:1"]"#, ""),
                "routes[0].upstreams",
            ),
            (route(r#"["a"]"#, r#"["h:1"]"#, ""), "routes[0].upstreams"),
            (
                "[upstream]\nurl = \"http://127.0.0.1:8000\"\n".to_owned() + &ok,
                "upstream.url",
            ),
            (
                ok.clone()
                    + "[[routes]]\nmodels = [\"c\"]\nupstreams = [\"http://h:1\"]\nweight = 2\n",
                "weight",
            ),
        ] {
            let err = Config::parse(&text).unwrap_err();
            assert!(err.to_string().contains(field), "{text}: {err}");
        }
        // Sharing an upstream between routes is fine.
        let shared = ok.clone() + &route(r#"["b"]"#, r#"["http://h:1"]"#, "");
        Config::parse(&shared).unwrap();
        // `--upstream` on top of a file with routes: refused by `validate`.
        let mut c = Config::parse(&ok).unwrap();
        c.upstream.url = "http://elsewhere:8000".to_owned();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("upstream.url")
        );
    }
}
