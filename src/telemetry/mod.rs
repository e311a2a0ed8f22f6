//! The telemetry sink: Prometheus metrics, bounded labels, upstream readiness, the access log,
//! the `/stats` window and OpenTelemetry spans. It knows nothing of servers or proxies: a
//! finished request reaches it as one [`Finished`] report.
//!
//! Metric handles are resolved once per (model, endpoint) pair and shared by every request of
//! that pair, so the per-chunk path only records into a handle: no label formatting and no map
//! lookup per chunk. The recorder is owned by the [`Telemetry`] value, not installed globally, so
//! several proxies (tests, benches) can run in one process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::time::Instant;

use crate::config::{BucketConfig, Config};
use crate::latency::{Figures, Slo};
use crate::route::Endpoint;

mod access_log;
pub mod histogram;
mod labels;
pub mod openmetrics;
pub mod otel;
pub mod otlp_metrics;
mod prometheus;
pub mod stats;
mod upstreams;

use access_log::access_log;
use histogram::Histograms;
pub use histogram::{Series, TraceIds};
pub use labels::{
    MAX_TENANT_LEN, MODEL_NONE, MODEL_OTHER, ModelLabels, TENANT_NONE, TENANT_OTHER, TenantLabels,
};
pub use prometheus::{E2EL_BUCKETS, ITL_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS, names};
use prometheus::{METADATA, describe};
use stats::{RouteStats, Stats};
pub use upstreams::{DnsMetrics, EndpointMetrics, ReloadMetrics, UpstreamLatency, upstream_names};

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

/// Why the proxy closed or refused a client connection itself: the `reason` label of
/// `tokentap_connections_closed_total` (docs/limits.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// No whole request head within `proxy.header_timeout_secs`.
    HeaderTimeout,
    /// A kept-alive connection idle for `proxy.keepalive_idle_secs`.
    KeepaliveIdle,
    /// A write to the client made no progress for `proxy.send_timeout_secs`.
    SendTimeout,
    /// An HTTP/2 connection without streams for `proxy.keepalive_idle_secs`.
    Http2Idle,
    /// An HTTP/2 keep-alive ping went unanswered.
    Http2PingTimeout,
    /// Accepted beyond `proxy.max_connections`, closed at once.
    MaxConnections,
    /// A request head that could not be read (answered 400, 414 or 431 by the server).
    BadRequest,
}

impl CloseReason {
    /// Every reason, in the order of [`ConnMetrics`]' counters.
    pub const ALL: [CloseReason; 7] = [
        CloseReason::HeaderTimeout,
        CloseReason::KeepaliveIdle,
        CloseReason::SendTimeout,
        CloseReason::Http2Idle,
        CloseReason::Http2PingTimeout,
        CloseReason::MaxConnections,
        CloseReason::BadRequest,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::KeepaliveIdle => "keepalive_idle",
            CloseReason::SendTimeout => "send_timeout",
            CloseReason::Http2Idle => "http2_idle",
            CloseReason::Http2PingTimeout => "http2_ping_timeout",
            CloseReason::MaxConnections => "max_connections",
            CloseReason::BadRequest => "bad_request",
        }
    }
}

/// The metrics of client connections, resolved once and shared by the accept loop and every
/// connection.
#[derive(Clone, Debug)]
pub struct ConnMetrics {
    closed: [Counter; 7],
    open: Gauge,
    accept_errors: Counter,
    /// Where requests the server refused itself are counted (`None`: nowhere).
    telemetry: Option<Arc<Telemetry>>,
}

impl ConnMetrics {
    /// The statuses a server refuses a request with itself: a head it cannot read (400), one
    /// too slow (408), a target too long (414), a head too large (431).
    pub const REFUSED: [u16; 4] = [400, 408, 414, 431];

    /// Metrics that go nowhere (a listener that is not counted, such as the admin one).
    pub fn noop() -> Self {
        ConnMetrics {
            closed: std::array::from_fn(|_| Counter::noop()),
            open: Gauge::noop(),
            accept_errors: Counter::noop(),
            telemetry: None,
        }
    }

    /// Counts a request the server refused itself with `status` (one of
    /// [`ConnMetrics::REFUSED`]) as `outcome="rejected"`, `model="none"`, `endpoint="other"`.
    pub fn refused(&self, status: u16) {
        if let Some(telemetry) = &self.telemetry
            && Self::REFUSED.contains(&status)
        {
            let tenant = telemetry.tenants.as_ref().map(TenantLabels::none);
            let route = telemetry.route(Arc::from(MODEL_NONE), Endpoint::Other, tenant);
            telemetry
                .requests_counter(&route, Outcome::Rejected, status)
                .increment(1);
        }
    }

    /// Counts a connection closed or refused for `reason`.
    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].increment(1);
    }

    /// Counts a failed accept.
    pub fn accept_error(&self) {
        self.accept_errors.increment(1);
    }

    /// Tracks a connection as open until the returned guard is dropped.
    pub fn open(&self) -> OpenConnection {
        self.open.increment(1.0);
        OpenConnection(self.open.clone())
    }
}

/// A client connection counted as open; dropping it counts it closed.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Metric handles of one (model, endpoint) pair, or (model, endpoint, tenant) triple when
/// tenants are on, resolved once and shared. Only the request counters, goodput and the TTFT,
/// TPOT and E2EL histograms carry `tenant`; the other handles of a pair's triples are the
/// same series.
#[derive(Debug)]
pub struct RouteMetrics {
    /// The `model` label value.
    pub model: Arc<str>,
    /// The `endpoint` label value.
    pub endpoint: Endpoint,
    /// The `tenant` label value (`None`: tenants are off).
    pub tenant: Option<Arc<str>>,
    /// TTFT histogram (exemplars: the traces of sampled requests).
    pub ttft: Series,
    /// Time-to-first-answer histogram.
    pub ttfa: Histogram,
    /// Reasoning-time histogram.
    pub reasoning: Histogram,
    /// Max-ITL histogram.
    pub max_itl: Histogram,
    /// Upstream queue-time histogram.
    pub queue_time: Histogram,
    /// Upstream prefill-time histogram.
    pub prefill_time: Histogram,
    /// Upstream decode-time histogram.
    pub decode_time: Histogram,
    /// TTFT-outside-the-engine histogram.
    pub outside_engine: Histogram,
    /// Negative TTFT-outside-the-engine counter.
    pub outside_engine_negative: Counter,
    /// Cached prompt tokens histogram.
    pub cached_prompt_tokens: Histogram,
    /// Reasoning tokens histogram.
    pub reasoning_tokens: Histogram,
    /// ITL histogram (exemplars: each sampled request's largest gap).
    pub itl: Series,
    /// TPOT histogram.
    pub tpot: Histogram,
    /// E2EL histogram (exemplars: the traces of sampled requests).
    pub e2el: Series,
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
    /// Oversized SSE events counter.
    pub oversized: Counter,
    /// In-flight gauge.
    pub in_flight: Gauge,
    /// `/stats` summaries of the model and tenant (chat and completions only).
    pub stats: Option<RouteStats>,
    requests: Mutex<Vec<(Outcome, u16, Counter)>>,
}

/// Everything a finished request reports, handed to [`Telemetry::record`].
#[derive(Debug)]
pub struct Finished<'a> {
    /// Request id (from `x-request-id`, or made up by the proxy).
    pub request_id: &'a str,
    /// The (model, endpoint) metrics.
    pub route: &'a RouteMetrics,
    /// The upstream endpoint it was sent to, when it reached one.
    pub server: Option<&'a otel::Server>,
    /// Status sent to the client.
    pub status: u16,
    /// How it ended.
    pub outcome: Outcome,
    /// What it measured.
    pub figures: &'a Figures,
    /// It was a streaming (SSE) response.
    pub stream: bool,
    /// The request's trace, when its span was sampled: the exemplar of its E2EL and ITL.
    pub trace: Option<TraceIds>,
    /// The stream's ITL samples, in seconds, that OTLP metrics have not recorded yet (empty
    /// when OTLP metrics are off, and for anything but a stream of a GenAI operation).
    pub chunk_times: &'a [f64],
}

/// (model label, endpoint, tenant label): what a set of route metrics is resolved for.
type RouteKey = (Arc<str>, Endpoint, Option<Arc<str>>);

/// The proxy's metrics registry and its shared state.
pub struct Telemetry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Every histogram; counters and gauges are the exporter's.
    histograms: Histograms,
    routes: Mutex<HashMap<RouteKey, Arc<RouteMetrics>>>,
    /// Allowed model label values.
    pub models: ModelLabels,
    /// Allowed tenant label values (`None`: `telemetry.tenant_header` is unset).
    pub tenants: Option<TenantLabels>,
    /// Upstream readiness.
    pub upstream: UpstreamHealth,
    /// The `/stats` summaries.
    pub stats: Stats,
    ready_gauge: Gauge,
    slo: Slo,
    access_log: bool,
    /// What counts as an output event (`telemetry.definitions`).
    pub definitions: crate::latency::Definitions,
    /// The OTLP metrics, once built inside the runtime (`[otlp_metrics]`).
    otlp: OnceLock<otlp_metrics::OtlpMetrics>,
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
                names::TTFT
                | names::TTFA
                | names::REASONING
                | names::QUEUE_TIME
                | names::PREFILL_TIME
                | names::OUTSIDE_ENGINE
                | upstream_names::TTFT => &ttft,
                names::ITL | names::MAX_ITL => &itl,
                names::TPOT | upstream_names::TPOT => &tpot,
                names::E2EL | names::HEADER_TIME | names::DECODE_TIME | upstream_names::E2EL => {
                    &e2el
                }
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
            tenants: config
                .telemetry
                .tenant_header
                .as_deref()
                .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
                .map(|header| {
                    TenantLabels::new(
                        header,
                        &config.telemetry.tenants,
                        config.telemetry.max_tenants,
                    )
                }),
            upstream: UpstreamHealth::new(crate::config::secs(config.telemetry.ready_window_secs)),
            stats: Stats::new(crate::config::secs(config.telemetry.stats_window_secs)),
            ready_gauge,
            slo: Slo::from_ms(config.slo.ttft_ms, config.slo.tpot_ms, config.slo.e2el_ms),
            access_log: config.telemetry.access_log,
            definitions: match config.telemetry.definitions {
                crate::config::Definitions::VllmBench => crate::latency::Definitions::VllmBench,
                crate::config::Definitions::VllmBench010 => {
                    crate::latency::Definitions::VllmBench010
                }
            },
            otlp: OnceLock::new(),
        }
    }

    /// The metric handles for a (model, endpoint) pair, of `tenant` when tenants are on
    /// (`tenant` is `None` exactly when they are off); resolved on first use, then shared.
    pub fn route(
        &self,
        model: Arc<str>,
        endpoint: Endpoint,
        tenant: Option<Arc<str>>,
    ) -> Arc<RouteMetrics> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (model, endpoint, tenant);
        if let Some(route) = routes.get(&key) {
            return route.clone();
        }
        let (model, _, tenant) = &key;
        let labels = || {
            vec![
                Label::new("model", SharedString::from(model.clone())),
                Label::new("endpoint", endpoint.as_str()),
            ]
        };
        let r = &self.recorder;
        let h = |name: &'static str| {
            self.histograms
                .register(name, &[("model", model), ("endpoint", endpoint.as_str())])
        };
        // The families that carry `tenant` (docs/METRICS.md §7).
        let ht = |name: &'static str| match tenant {
            Some(tenant) => self.histograms.register(
                name,
                &[
                    ("model", model),
                    ("endpoint", endpoint.as_str()),
                    ("tenant", tenant),
                ],
            ),
            None => h(name),
        };
        let c =
            |name: &'static str| r.register_counter(&Key::from_parts(name, labels()), &METADATA);
        let ct = |name: &'static str| {
            let mut labels = labels();
            if let Some(tenant) = tenant {
                labels.push(Label::new("tenant", SharedString::from(tenant.clone())));
            }
            r.register_counter(&Key::from_parts(name, labels), &METADATA)
        };
        // Token figures exist only for chat and completions; other endpoints get no such series.
        let generation = endpoint.is_generation();
        let g = |name: &'static str| {
            if generation {
                h(name)
            } else {
                Histogram::noop()
            }
        };
        let gt = |name: &'static str| {
            if generation {
                ht(name)
            } else {
                Histogram::noop()
            }
        };
        let series = |name: &'static str| {
            self.histograms
                .series(name, &[("model", model), ("endpoint", endpoint.as_str())])
        };
        // TTFT and E2EL carry `tenant` too (docs/METRICS.md §7), with their exemplars.
        let series_t = |name: &'static str| match tenant {
            Some(tenant) => self.histograms.series(
                name,
                &[
                    ("model", model),
                    ("endpoint", endpoint.as_str()),
                    ("tenant", tenant),
                ],
            ),
            None => series(name),
        };
        let gs = |name: &'static str| {
            if generation {
                series(name)
            } else {
                Series::noop()
            }
        };
        let gst = |name: &'static str| {
            if generation {
                series_t(name)
            } else {
                Series::noop()
            }
        };
        let gc = |name: &'static str| {
            if generation { c(name) } else { Counter::noop() }
        };
        let route = Arc::new(RouteMetrics {
            model: model.clone(),
            endpoint,
            tenant: tenant.clone(),
            ttft: gst(names::TTFT),
            ttfa: g(names::TTFA),
            reasoning: g(names::REASONING),
            max_itl: g(names::MAX_ITL),
            queue_time: g(names::QUEUE_TIME),
            prefill_time: g(names::PREFILL_TIME),
            decode_time: g(names::DECODE_TIME),
            outside_engine: g(names::OUTSIDE_ENGINE),
            outside_engine_negative: gc(names::OUTSIDE_ENGINE_NEGATIVE),
            cached_prompt_tokens: g(names::CACHED_PROMPT_TOKENS),
            reasoning_tokens: g(names::REASONING_TOKENS),
            itl: gs(names::ITL),
            tpot: gt(names::TPOT),
            e2el: series_t(names::E2EL),
            prompt_tokens: g(names::PROMPT_TOKENS),
            generation_tokens: g(names::GENERATION_TOKENS),
            tokens_per_chunk: g(names::TOKENS_PER_CHUNK),
            header_time: h(names::HEADER_TIME),
            goodput: if generation {
                ct(names::GOODPUT)
            } else {
                Counter::noop()
            },
            prompt_tokens_total: gc(names::PROMPT_TOKENS_TOTAL),
            generation_tokens_total: gc(names::GENERATION_TOKENS_TOTAL),
            unrecognized: c(names::UNRECOGNIZED),
            oversized: c(names::OVERSIZED),
            in_flight: r.register_gauge(&Key::from_parts(names::IN_FLIGHT, labels()), &METADATA),
            stats: generation.then(|| self.stats.route(model, tenant.as_ref())),
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
        routes.insert(key, route.clone());
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
        let mut labels = vec![
            Label::new("model", SharedString::from(route.model.clone())),
            Label::new("endpoint", route.endpoint.as_str()),
            Label::new("outcome", outcome.as_str()),
            Label::new("status", status.to_string()),
        ];
        if let Some(tenant) = &route.tenant {
            labels.push(Label::new("tenant", SharedString::from(tenant.clone())));
        }
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
        if let (Some(ids), Some(max)) = (done.trace, f.itl_max) {
            route.itl.exemplar(max.as_secs_f64(), ids);
        }
        if done.outcome == Outcome::Ok {
            route.e2el.record_traced(f.e2el.as_secs_f64(), done.trace);
            if let Some(tpot) = f.tpot {
                route.tpot.record(tpot.as_secs_f64());
            }
            if let Some(max) = f.itl_max {
                route.max_itl.record(max.as_secs_f64());
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
        // The upstream's own timings, whenever it reported them: they describe its side of
        // the request even when the client went away at the end.
        for (h, d) in [
            (&route.queue_time, f.queue),
            (&route.prefill_time, f.prefill),
            (&route.decode_time, f.decode),
            (&route.outside_engine, f.outside_engine),
        ] {
            if let Some(d) = d {
                h.record(d.as_secs_f64());
            }
        }
        if f.outside_engine_negative {
            route.outside_engine_negative.increment(1);
        }
        if let Some(n) = f.cached_prompt_tokens {
            route.cached_prompt_tokens.record(n as f64);
        }
        if let Some(n) = f.reasoning_tokens {
            route.reasoning_tokens.record(n as f64);
        }
        // Tokens the upstream generated count even when the request did not end well.
        if let Some(n) = f.output_tokens {
            route.generation_tokens_total.increment(n);
        }
        if f.other_events > 0 {
            route.unrecognized.increment(f.other_events);
        }
        if let Some(otlp) = self.otlp.get() {
            otlp.record(done);
        }
        if self.access_log {
            access_log(done);
        }
    }

    /// Sends every later request's figures to OTLP too; called once at startup. A second call
    /// is ignored.
    pub fn set_otlp_metrics(&self, otlp: otlp_metrics::OtlpMetrics) {
        let _ = self.otlp.set(otlp);
    }

    /// The OTLP metrics, when `[otlp_metrics]` is on (for the shutdown flush).
    pub fn otlp_metrics(&self) -> Option<&otlp_metrics::OtlpMetrics> {
        self.otlp.get()
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

    /// Renders `/metrics` in the Prometheus text format, or in OpenMetrics (with exemplars)
    /// when `openmetrics` is set.
    pub fn render(&self, openmetrics: bool) -> String {
        self.ready_gauge
            .set(if self.upstream.ready() { 1.0 } else { 0.0 });
        let text = self.handle.render();
        if !openmetrics {
            let mut out = text;
            self.histograms.render_into(&mut out, false);
            return out;
        }
        let mut out = String::with_capacity(text.len() * 2);
        openmetrics::from_text(&text, &mut out);
        self.histograms.render_into(&mut out, true);
        out.push_str("# EOF\n");
        out
    }

    /// The client-connection metrics of the proxy's listener.
    pub fn connections(self: &Arc<Self>) -> ConnMetrics {
        let r = &self.recorder;
        ConnMetrics {
            closed: CloseReason::ALL.map(|reason| {
                r.register_counter(
                    &Key::from_parts(
                        names::CONNECTIONS_CLOSED,
                        vec![Label::new("reason", reason.as_str())],
                    ),
                    &METADATA,
                )
            }),
            open: r.register_gauge(&Key::from_name(names::CONNECTIONS_OPEN), &METADATA),
            accept_errors: r.register_counter(&Key::from_name(names::ACCEPT_ERRORS), &METADATA),
            telemetry: Some(self.clone()),
        }
    }

    /// The gauge of request-body bytes held in memory.
    pub fn body_bytes_held(&self) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_name(names::BODY_BYTES_HELD), &METADATA)
    }

    /// Lets the exporter do its periodic housekeeping; run every few seconds. (Histograms,
    /// which are not the exporter's, need none.)
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
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

    fn with_tenant(value: &[u8]) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-tenant", http::HeaderValue::from_bytes(value).unwrap());
        headers
    }

    #[test]
    fn tenant_labels_keep_the_allow_list_and_are_bounded() {
        let labels = TenantLabels::new(
            http::HeaderName::from_static("x-tenant"),
            &["vip".to_owned()],
            3,
        );
        let label = |v: &[u8]| labels.label(&with_tenant(v)).to_string();
        assert_eq!(labels.label(&http::HeaderMap::new()).as_ref(), TENANT_NONE);
        assert_eq!(label(b""), TENANT_NONE);
        assert_eq!(label(b"  "), TENANT_NONE);
        assert_eq!(label(b"a"), "a");
        assert_eq!(label(b" b "), "b");
        // Both first-come slots are taken: later names are other, the allow-list keeps its own.
        assert_eq!(label(b"c"), TENANT_OTHER);
        assert_eq!(label(b"vip"), "vip");
        assert_eq!(label(b"a"), "a");
        assert_eq!(labels.len(), 3);
        // Values that cannot be labels, whatever room is left, and the reserved names.
        let fresh = TenantLabels::new(http::HeaderName::from_static("x-tenant"), &[], 10);
        let fresh_label = |v: &[u8]| fresh.label(&with_tenant(v)).to_string();
        assert_eq!(fresh_label(&[b'x'; MAX_TENANT_LEN + 1]), TENANT_OTHER);
        assert_eq!(fresh_label(&[b'x'; MAX_TENANT_LEN]).len(), MAX_TENANT_LEN);
        assert_eq!(fresh_label("caf\u{e9}".as_bytes()), TENANT_OTHER);
        assert_eq!(fresh_label(b"a\tb"), TENANT_OTHER);
        assert_eq!(fresh_label(b"none"), TENANT_OTHER);
        assert_eq!(fresh_label(b"other"), TENANT_OTHER);
        assert_eq!(fresh.len(), 1);
        // Looking a name up never takes a slot.
        assert_eq!(fresh.lookup("zzz").as_ref(), TENANT_OTHER);
        assert_eq!(fresh.lookup("none").as_ref(), TENANT_NONE);
        assert_eq!(fresh.len(), 1);
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
