//! Prometheus metrics, the bounded `model` label, upstream health and the access log.
//!
//! Metric handles are resolved once per (model, endpoint) pair and shared by every request of
//! that pair, so the per-chunk path only records into a handle: no label formatting and no map
//! lookup per chunk. The recorder is owned by the [`Telemetry`] value, not installed globally, so
//! several proxies (tests, benches) can run in one process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::time::Instant;

use crate::config::{BucketConfig, Config};
use crate::histogram::Histograms;
use crate::latency::{Figures, Slo};
use crate::route::Endpoint;
use crate::stats::{ModelStats, Stats};

/// Default TTFT buckets (vLLM's `vllm:time_to_first_token_seconds`), seconds.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// Default ITL and TPOT buckets (vLLM's `vllm:inter_token_latency_seconds`), seconds.
pub const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
/// Default E2EL buckets (vLLM's `vllm:e2e_request_latency_seconds`), seconds.
pub const E2EL_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];
/// Default token-count buckets.
pub const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0,
];

/// Metric names, in one place.
pub mod names {
    /// Histogram: time to first token event, seconds.
    pub const TTFT: &str = "tokentap_time_to_first_token_seconds";
    /// Histogram: time to first token event with content, seconds.
    pub const TTFC: &str = "tokentap_time_to_first_content_seconds";
    /// Histogram: gap between consecutive token events of a choice, seconds.
    pub const ITL: &str = "tokentap_inter_token_latency_seconds";
    /// Histogram: time per output token after the first, seconds.
    pub const TPOT: &str = "tokentap_time_per_output_token_seconds";
    /// Histogram: request arrival to last token event, seconds.
    pub const E2EL: &str = "tokentap_e2e_request_latency_seconds";
    /// Histogram: prompt tokens per request.
    pub const PROMPT_TOKENS: &str = "tokentap_request_prompt_tokens";
    /// Histogram: generated tokens per request.
    pub const GENERATION_TOKENS: &str = "tokentap_request_generation_tokens";
    /// Histogram: completion tokens per token event.
    pub const TOKENS_PER_CHUNK: &str = "tokentap_tokens_per_chunk";
    /// Histogram: request arrival to upstream response head, seconds.
    pub const HEADER_TIME: &str = "tokentap_upstream_response_header_seconds";
    /// Counter: requests by outcome and status.
    pub const REQUESTS: &str = "tokentap_requests_total";
    /// Counter: requests that met every SLO bound.
    pub const GOODPUT: &str = "tokentap_goodput_requests_total";
    /// Counter: prompt tokens.
    pub const PROMPT_TOKENS_TOTAL: &str = "tokentap_prompt_tokens_total";
    /// Counter: generated tokens.
    pub const GENERATION_TOKENS_TOTAL: &str = "tokentap_generation_tokens_total";
    /// Counter: SSE events that were not token, usage, error or `[DONE]`.
    pub const UNRECOGNIZED: &str = "tokentap_sse_unrecognized_events_total";
    /// Gauge: requests being proxied.
    pub const IN_FLIGHT: &str = "tokentap_requests_in_flight";
    /// Gauge: 1 while the upstream answered recently.
    pub const UPSTREAM_READY: &str = "tokentap_upstream_ready";
    /// Gauge: always 1, labelled with the version.
    pub const BUILD_INFO: &str = "tokentap_build_info";
}

/// How a request ended (`docs/METRICS.md` §3), the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Upstream 2xx and, for a stream, a normal end.
    Ok,
    /// Upstream answered 4xx/5xx.
    UpstreamStatus,
    /// An error event arrived inside a 200 stream.
    InbandError,
    /// The client went away before the end.
    ClientDisconnect,
    /// The upstream body broke off mid-stream (or the connection closed before a response).
    UpstreamDisconnect,
    /// Connect, response head or an idle gap exceeded its limit.
    UpstreamTimeout,
    /// The upstream could not be reached.
    ConnectError,
    /// The proxy refused the request itself (body over `proxy.max_request_body_bytes`).
    Rejected,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::UpstreamStatus => "upstream_status",
            Outcome::InbandError => "inband_error",
            Outcome::ClientDisconnect => "client_disconnect",
            Outcome::UpstreamDisconnect => "upstream_disconnect",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::ConnectError => "connect_error",
            Outcome::Rejected => "rejected",
        }
    }
}

const METADATA: Metadata<'static> = Metadata::new("tokentap", Level::INFO, Some(module_path!()));

/// Label value for requests that name no model (or whose body could not be read as JSON).
pub const MODEL_NONE: &str = "none";
/// Label value for model names that are not known to the proxy.
pub const MODEL_OTHER: &str = "other";

/// The set of model names allowed as label values: the configured ones plus those the upstream
/// lists, never more than a fixed number, so clients cannot grow the number of series.
#[derive(Debug)]
pub struct ModelLabels {
    known: RwLock<HashMap<Box<str>, Arc<str>>>,
    max: usize,
    other: Arc<str>,
    none: Arc<str>,
}

impl ModelLabels {
    /// Starts with the configured names (up to `max`).
    pub fn new(configured: &[String], max: usize) -> Self {
        let labels = ModelLabels {
            known: RwLock::new(HashMap::new()),
            max,
            other: Arc::from(MODEL_OTHER),
            none: Arc::from(MODEL_NONE),
        };
        labels.extend(configured.iter().map(String::as_str));
        labels
    }

    /// Allows more names (from the upstream's `/v1/models`), as long as there is room.
    pub fn extend<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
        for name in names {
            if known.len() >= self.max {
                break;
            }
            if !known.contains_key(name) {
                known.insert(name.into(), Arc::from(name));
            }
        }
    }

    /// The label value for a request's `model`.
    pub fn label(&self, model: Option<&str>) -> Arc<str> {
        let Some(model) = model else {
            return self.none.clone();
        };
        let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
        known
            .get(model)
            .cloned()
            .unwrap_or_else(|| self.other.clone())
    }
}

/// When the upstream last answered, for `/readyz` and `tokentap_upstream_ready`.
#[derive(Debug)]
pub struct UpstreamHealth {
    base: Instant,
    /// Milliseconds since `base` of the last answer, plus one (0: never).
    last: AtomicU64,
    window: Duration,
}

impl UpstreamHealth {
    /// Nothing heard yet; answers count for `window`.
    pub fn new(window: Duration) -> Self {
        UpstreamHealth {
            base: Instant::now(),
            last: AtomicU64::new(0),
            window,
        }
    }

    /// Notes that the upstream answered just now.
    pub fn mark(&self) {
        let ms = self.base.elapsed().as_millis() as u64 + 1;
        self.last.fetch_max(ms, Ordering::Relaxed);
    }

    /// Whether the upstream answered within the window.
    pub fn ready(&self) -> bool {
        match self.last.load(Ordering::Relaxed) {
            0 => false,
            last => {
                let now = self.base.elapsed().as_millis() as u64 + 1;
                now.saturating_sub(last) <= self.window.as_millis() as u64
            }
        }
    }
}

/// Metric handles of one (model, endpoint) pair, resolved once and shared.
#[derive(Debug)]
pub struct RouteMetrics {
    /// The `model` label value.
    pub model: Arc<str>,
    /// The `endpoint` label value.
    pub endpoint: Endpoint,
    /// TTFT histogram.
    pub ttft: Histogram,
    /// TTFC histogram.
    pub ttfc: Histogram,
    /// ITL histogram.
    pub itl: Histogram,
    /// TPOT histogram.
    pub tpot: Histogram,
    /// E2EL histogram.
    pub e2el: Histogram,
    /// Prompt tokens histogram.
    pub prompt_tokens: Histogram,
    /// Generation tokens histogram.
    pub generation_tokens: Histogram,
    /// Tokens per chunk histogram.
    pub tokens_per_chunk: Histogram,
    /// Upstream response head time histogram.
    pub header_time: Histogram,
    /// Goodput counter.
    pub goodput: Counter,
    /// Prompt tokens counter.
    pub prompt_tokens_total: Counter,
    /// Generation tokens counter.
    pub generation_tokens_total: Counter,
    /// Unrecognized SSE events counter.
    pub unrecognized: Counter,
    /// In-flight gauge.
    pub in_flight: Gauge,
    /// `/stats` summary of the model (chat and completions only).
    pub stats: Option<Arc<ModelStats>>,
    requests: Mutex<Vec<(Outcome, u16, Counter)>>,
}

/// Everything a finished request reports, handed to [`Telemetry::record`].
#[derive(Debug)]
pub struct Finished<'a> {
    /// Request id (from `x-request-id`, or made up by the proxy).
    pub request_id: &'a str,
    /// The (model, endpoint) metrics.
    pub route: &'a RouteMetrics,
    /// Status sent to the client.
    pub status: u16,
    /// How it ended.
    pub outcome: Outcome,
    /// What it measured.
    pub figures: &'a Figures,
    /// It was a streaming (SSE) response.
    pub stream: bool,
}

/// (model label, endpoint): what a set of route metrics is resolved for.
type RouteKey = (Arc<str>, Endpoint);

/// The proxy's metrics registry and its shared state.
pub struct Telemetry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Every histogram; counters and gauges are the exporter's.
    histograms: Histograms,
    routes: Mutex<HashMap<RouteKey, Arc<RouteMetrics>>>,
    /// Allowed model label values.
    pub models: ModelLabels,
    /// Upstream readiness.
    pub upstream: UpstreamHealth,
    /// The `/stats` summaries.
    pub stats: Stats,
    ready_gauge: Gauge,
    slo: Slo,
    access_log: bool,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Builds the registry with the configured buckets and describes every metric.
    pub fn new(config: &Config) -> Self {
        let b: &BucketConfig = &config.telemetry.buckets;
        let pick = |o: &Option<Vec<f64>>, d: &[f64]| o.clone().unwrap_or_else(|| d.to_vec());
        let (ttft, itl, tpot) = (
            pick(&b.ttft, TTFT_BUCKETS),
            pick(&b.itl, ITL_BUCKETS),
            pick(&b.tpot, ITL_BUCKETS),
        );
        let (e2el, tokens) = (pick(&b.e2el, E2EL_BUCKETS), pick(&b.tokens, TOKEN_BUCKETS));
        let bounds = |name: &str| -> &[f64] {
            match name {
                names::TTFT | names::TTFC => &ttft,
                names::ITL => &itl,
                names::TPOT => &tpot,
                names::E2EL | names::HEADER_TIME => &e2el,
                _ => &tokens,
            }
        };
        let builder = PrometheusBuilder::new();
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let histograms = Histograms::default();
        describe(&recorder, &histograms, bounds);
        let version = Label::new("version", env!("CARGO_PKG_VERSION"));
        recorder
            .register_gauge(
                &Key::from_parts(names::BUILD_INFO, vec![version]),
                &METADATA,
            )
            .set(1.0);
        let ready_gauge =
            recorder.register_gauge(&Key::from_name(names::UPSTREAM_READY), &METADATA);
        ready_gauge.set(0.0);
        Telemetry {
            recorder,
            handle,
            histograms,
            routes: Mutex::new(HashMap::new()),
            models: ModelLabels::new(&config.telemetry.models, config.telemetry.max_models),
            upstream: UpstreamHealth::new(crate::config::secs(config.telemetry.ready_window_secs)),
            stats: Stats::new(crate::config::secs(config.telemetry.stats_window_secs)),
            ready_gauge,
            slo: Slo::from_ms(config.slo.ttft_ms, config.slo.tpot_ms, config.slo.e2el_ms),
            access_log: config.telemetry.access_log,
        }
    }

    /// The metric handles for a (model, endpoint) pair; resolved on first use, then shared.
    pub fn route(&self, model: Arc<str>, endpoint: Endpoint) -> Arc<RouteMetrics> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(route) = routes.get(&(model.clone(), endpoint)) {
            return route.clone();
        }
        let labels = || {
            vec![
                Label::new("model", SharedString::from(model.clone())),
                Label::new("endpoint", endpoint.as_str()),
            ]
        };
        let r = &self.recorder;
        let h = |name: &'static str| {
            self.histograms
                .register(name, &[("model", &model), ("endpoint", endpoint.as_str())])
        };
        let c =
            |name: &'static str| r.register_counter(&Key::from_parts(name, labels()), &METADATA);
        // Token figures exist only for chat and completions; other endpoints get no such series.
        let generation = endpoint.is_generation();
        let g = |name: &'static str| {
            if generation {
                h(name)
            } else {
                Histogram::noop()
            }
        };
        let gc = |name: &'static str| {
            if generation { c(name) } else { Counter::noop() }
        };
        let route = Arc::new(RouteMetrics {
            model: model.clone(),
            endpoint,
            ttft: g(names::TTFT),
            ttfc: g(names::TTFC),
            itl: g(names::ITL),
            tpot: g(names::TPOT),
            e2el: h(names::E2EL),
            prompt_tokens: g(names::PROMPT_TOKENS),
            generation_tokens: g(names::GENERATION_TOKENS),
            tokens_per_chunk: g(names::TOKENS_PER_CHUNK),
            header_time: h(names::HEADER_TIME),
            goodput: gc(names::GOODPUT),
            prompt_tokens_total: gc(names::PROMPT_TOKENS_TOTAL),
            generation_tokens_total: gc(names::GENERATION_TOKENS_TOTAL),
            unrecognized: c(names::UNRECOGNIZED),
            in_flight: r.register_gauge(&Key::from_parts(names::IN_FLIGHT, labels()), &METADATA),
            stats: endpoint.is_generation().then(|| self.stats.model(&model)),
            requests: Mutex::new(Vec::new()),
        });
        // Common outcomes exist at 0 from the start, so that rate() sees their first increase.
        if endpoint.is_generation() {
            for (outcome, status) in [
                (Outcome::Ok, 200),
                (Outcome::InbandError, 200),
                (Outcome::ClientDisconnect, 200),
                (Outcome::UpstreamDisconnect, 200),
                (Outcome::UpstreamTimeout, 200),
                (Outcome::UpstreamTimeout, 504),
                (Outcome::ConnectError, 502),
                (Outcome::UpstreamStatus, 400),
                (Outcome::UpstreamStatus, 429),
                (Outcome::UpstreamStatus, 500),
                (Outcome::UpstreamStatus, 503),
            ] {
                let _ = self.requests_counter(&route, outcome, status);
            }
        }
        routes.insert((model, endpoint), route.clone());
        route
    }

    fn requests_counter(&self, route: &RouteMetrics, outcome: Outcome, status: u16) -> Counter {
        let mut cache = route
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, _, c)) = cache.iter().find(|(o, s, _)| *o == outcome && *s == status) {
            return c.clone();
        }
        let labels = vec![
            Label::new("model", SharedString::from(route.model.clone())),
            Label::new("endpoint", route.endpoint.as_str()),
            Label::new("outcome", outcome.as_str()),
            Label::new("status", status.to_string()),
        ];
        let counter = self
            .recorder
            .register_counter(&Key::from_parts(names::REQUESTS, labels), &METADATA);
        cache.push((outcome, status, counter.clone()));
        counter
    }

    /// Records a request that has ended: counters, the figures known only at the end, and the
    /// access-log line. Called exactly once per request, at `now`.
    pub fn record(&self, done: &Finished<'_>, t0: Instant, now: Instant) {
        let route = done.route;
        let f = done.figures;
        self.requests_counter(route, done.outcome, done.status)
            .increment(1);
        if let Some(n) = f.prompt_tokens {
            route.prompt_tokens_total.increment(n);
        }
        if done.outcome == Outcome::Ok {
            route.e2el.record(f.e2el.as_secs_f64());
            if let Some(tpot) = f.tpot {
                route.tpot.record(tpot.as_secs_f64());
            }
            if let Some(n) = f.prompt_tokens {
                route.prompt_tokens.record(n as f64);
            }
            if let Some(n) = f.output_tokens {
                route.generation_tokens.record(n as f64);
            }
            if route.endpoint.is_generation() && self.slo.is_good(f) {
                route.goodput.increment(1);
            }
            if let Some(stats) = &route.stats {
                stats.record_request(f, t0, now);
            }
        }
        // Tokens the upstream generated count even when the request did not end well.
        if let Some(n) = f.output_tokens {
            route.generation_tokens_total.increment(n);
        }
        if f.other_events > 0 {
            route.unrecognized.increment(f.other_events);
        }
        if self.access_log {
            access_log(done);
        }
    }

    /// Registers an unlabelled counter with its HELP text (for parts such as the span exporter
    /// that count their own events).
    pub fn counter(&self, name: &'static str, help: &'static str) -> Counter {
        self.recorder.describe_counter(
            KeyName::from_const_str(name),
            None,
            SharedString::const_str(help),
        );
        self.recorder
            .register_counter(&Key::from_name(name), &METADATA)
    }

    /// Renders `/metrics` in the Prometheus text format.
    pub fn render(&self) -> String {
        self.ready_gauge
            .set(if self.upstream.ready() { 1.0 } else { 0.0 });
        let mut out = self.handle.render();
        self.histograms.render_into(&mut out);
        out
    }

    /// Lets the exporter do its periodic housekeeping; run every few seconds. (Histograms,
    /// which are not the exporter's, need none.)
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// Gives every metric its help text; histograms also get their bucket bounds.
fn describe<'a>(r: &PrometheusRecorder, h: &Histograms, bounds: impl Fn(&str) -> &'a [f64]) {
    let d = |name: &'static str, unit: Option<Unit>, help: &'static str, kind: char| {
        if kind == 'h' {
            return h.describe(name, help, bounds(name));
        }
        let key = KeyName::from_const_str(name);
        let help = SharedString::const_str(help);
        match kind {
            'c' => r.describe_counter(key, unit, help),
            _ => r.describe_gauge(key, unit, help),
        }
    };
    let s = Some(Unit::Seconds);
    d(
        names::TTFT,
        s,
        "Time from request arrival to the first token event handed to the client (vllm bench serve TTFT).",
        'h',
    );
    d(
        names::TTFC,
        s,
        "Time from request arrival to the first token event with non-empty content, reasoning or tool calls.",
        'h',
    );
    d(
        names::ITL,
        s,
        "Gap between consecutive token events of a choice, one sample per chunk after the first (vllm bench serve ITL).",
        'h',
    );
    d(
        names::TPOT,
        s,
        "(E2EL - TTFT) / (output tokens - 1) of requests that ended ok with more than one output token (vllm bench serve TPOT).",
        'h',
    );
    d(
        names::E2EL,
        s,
        "Time from request arrival to the last token event (last body byte for non-streaming) of requests that ended ok (vllm bench serve E2EL).",
        'h',
    );
    d(
        names::PROMPT_TOKENS,
        None,
        "Prompt tokens per request that ended ok, from usage.",
        'h',
    );
    d(
        names::GENERATION_TOKENS,
        None,
        "Output tokens per request that ended ok, from usage or counted chunks.",
        'h',
    );
    d(
        names::TOKENS_PER_CHUNK,
        None,
        "Completion tokens carried by one token event, when the stream reports cumulative usage.",
        'h',
    );
    d(
        names::HEADER_TIME,
        s,
        "Time from request arrival to the upstream's response head.",
        'h',
    );
    d(
        names::REQUESTS,
        None,
        "Requests by how they ended (outcome) and the HTTP status sent to the client.",
        'c',
    );
    d(
        names::GOODPUT,
        None,
        "Chat/completions requests that ended ok and met every configured SLO bound (vllm bench serve --goodput).",
        'c',
    );
    d(
        names::PROMPT_TOKENS_TOTAL,
        None,
        "Prompt tokens reported by the upstream's usage.",
        'c',
    );
    d(
        names::GENERATION_TOKENS_TOTAL,
        None,
        "Output tokens generated by the upstream, from usage or counted chunks.",
        'c',
    );
    d(
        names::UNRECOGNIZED,
        None,
        "SSE events forwarded that were not token, usage, error or [DONE] events (malformed streams).",
        'c',
    );
    d(names::IN_FLIGHT, None, "Requests being proxied now.", 'g');
    d(
        names::UPSTREAM_READY,
        None,
        "1 while the upstream answered within telemetry.ready_window_secs, else 0.",
        'g',
    );
    d(
        names::BUILD_INFO,
        None,
        "Always 1; the version label says which tokentap is running.",
        'g',
    );
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

/// Writes the access-log line of a finished request. Never headers, keys or prompt text.
fn access_log(done: &Finished<'_>) {
    let f = done.figures;
    tracing::info!(
        target: "tokentap::access",
        request_id = done.request_id,
        model = &*done.route.model,
        endpoint = done.route.endpoint.as_str(),
        status = done.status,
        outcome = done.outcome.as_str(),
        stream = done.stream,
        ttft_ms = ms(f.ttft),
        ttfc_ms = ms(f.ttfc),
        tpot_ms = ms(f.tpot),
        itl_mean_ms = ms(f.itl_mean),
        itl_max_ms = ms(f.itl_max),
        e2el_ms = ms(Some(f.e2el)),
        chunks = f.chunks,
        prompt_tokens = f.prompt_tokens,
        output_tokens = f.output_tokens,
        token_source = f.token_source.as_str(),
        finish_reason = f.finish_reason.map(|r| r.as_str()),
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_are_bounded() {
        let labels = ModelLabels::new(&["a".to_owned()], 2);
        labels.extend(["b", "c", "d"]);
        assert_eq!(&*labels.label(Some("a")), "a");
        assert_eq!(&*labels.label(Some("b")), "b");
        assert_eq!(&*labels.label(Some("c")), MODEL_OTHER);
        assert_eq!(&*labels.label(None), MODEL_NONE);
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_ready_within_window() {
        let h = UpstreamHealth::new(Duration::from_secs(10));
        assert!(!h.ready());
        h.mark();
        assert!(h.ready());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(h.ready());
        tokio::time::advance(Duration::from_millis(5)).await;
        assert!(!h.ready());
    }
}
