//! OpenTelemetry metrics under the GenAI semantic-convention names, pushed over OTLP.
//!
//! The figures are the ones Prometheus gets: [`OtlpMetrics::record`] is called from
//! [`Telemetry::record`](super::Telemetry::record) with the same [`Finished`] report, once per
//! request when it ends, never per chunk. A stream's ITL samples (the conventions' time per
//! output chunk) wait in the request's [`ChunkTimes`] and are recorded with that report, or a
//! batch at a time when a long stream fills it. The SDK aggregates them in memory; a periodic reader
//! on a tokio task collects and exports every `interval_secs`, off the request path. An export
//! that fails or outlasts `timeout_secs` loses that interval's data (with delta temporality;
//! cumulative points carry it into the next export) and is counted in
//! `tokentap_otel_metric_exports_failed_total`: a slow or dead collector never slows a stream.
//!
//! Names, units, bucket advice and attributes follow the GenAI metrics of the OpenTelemetry
//! semantic conventions (`docs/gen-ai/gen-ai-metrics.md` in
//! `open-telemetry/semantic-conventions-genai`); docs/METRICS.md maps each one to tokentap's
//! figures.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::Counter;
use opentelemetry::metrics::{Histogram, MeterProvider as _};
use opentelemetry::{KeyValue, StringValue, Value};
use opentelemetry_otlp::{Protocol as OtlpProtocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader;
use opentelemetry_sdk::metrics::{SdkMeterProvider, Temporality};

use super::otel::{
    ExportClient, Server, build_resource, env, env_parse, header_map, http_endpoint, operation,
    protocol, sdk_disabled, timeout,
};
use super::{Finished, MODEL_NONE, Outcome, RouteMetrics, Telemetry};
use crate::config::{self, Config, Protocol};
use crate::route::Endpoint;

/// `gen_ai.server.time_to_first_token` bucket advice.
pub const TTFT_ADVICE: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// `gen_ai.server.time_per_output_token` bucket advice.
pub const TPOT_ADVICE: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
/// Bucket advice of `gen_ai.server.request.duration` and the client chunk timings.
pub const DURATION_ADVICE: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// `gen_ai.client.token.usage` bucket advice.
pub const TOKEN_ADVICE: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

/// The names of the exported instruments.
pub mod names {
    /// Time to the first token of a successful response, seconds.
    pub const TTFT: &str = "gen_ai.server.time_to_first_token";
    /// Time per output token after the first of a successful response, seconds.
    pub const TPOT: &str = "gen_ai.server.time_per_output_token";
    /// Whole request, seconds, any outcome (`error.type` on failures).
    pub const REQUEST_DURATION: &str = "gen_ai.server.request.duration";
    /// Prompt and generated tokens (`gen_ai.token.type`).
    pub const TOKEN_USAGE: &str = "gen_ai.client.token.usage";
    /// Time to the first chunk of a stream, seconds.
    pub const TIME_TO_FIRST_CHUNK: &str = "gen_ai.client.operation.time_to_first_chunk";
    /// Time between a stream's output chunks (tokentap's ITL samples), seconds.
    pub const TIME_PER_OUTPUT_CHUNK: &str = "gen_ai.client.operation.time_per_output_chunk";
    /// The Prometheus counter of exports that failed or timed out.
    pub const EXPORTS_FAILED: &str = "tokentap_otel_metric_exports_failed_total";
}

/// An `[otlp_metrics]` configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("otlp_metrics: {0}")]
pub struct OtlpMetricsError(String);

/// Most ITL samples a stream keeps for OTLP before they are recorded (2 KiB of `f64`s): a longer
/// stream records a full batch mid-stream and starts again.
pub const CHUNK_BATCH: usize = 256;

/// A stream's ITL samples not yet recorded as `gen_ai.client.operation.time_per_output_chunk`.
///
/// Filled only for streams of a GenAI operation while OTLP metrics are on
/// ([`OtlpMetrics::records_chunks`]), and allocates nothing until then; it grows with the stream
/// up to [`CHUNK_BATCH`] samples, so a request holds at most that many whatever its length. Its samples are recorded with the
/// request's report, or as a batch the moment it is full (see [`OtlpMetrics::record_chunks`]).
#[derive(Debug, Default)]
pub struct ChunkTimes {
    seconds: Vec<f64>,
}

impl ChunkTimes {
    /// Keeps one ITL sample; `true` when the batch is full and must be recorded now.
    #[inline]
    pub fn push(&mut self, itl: Duration) -> bool {
        self.seconds.push(itl.as_secs_f64());
        self.seconds.len() >= CHUNK_BATCH
    }

    /// The samples waiting, oldest first.
    pub fn seconds(&self) -> &[f64] {
        &self.seconds
    }
}

/// The configuration with the environment and defaults applied, checked.
#[derive(Debug, Clone, Copy)]
struct Settings {
    protocol: Protocol,
    interval: Duration,
    timeout: Duration,
    temporality: Temporality,
}

impl Settings {
    fn resolve(config: &config::OtlpMetricsConfig) -> Result<Settings, OtlpMetricsError> {
        let protocol = protocol(config.protocol, "METRICS").map_err(OtlpMetricsError)?;
        let timeout = timeout(config.timeout_secs, "METRICS").map_err(OtlpMetricsError)?;
        let interval = match config.interval_secs {
            Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
            Some(s) => {
                return Err(OtlpMetricsError(format!(
                    "interval_secs must be > 0, got {s}"
                )));
            }
            None => env_parse::<u64>(&["OTEL_METRIC_EXPORT_INTERVAL"])
                .filter(|ms| *ms > 0)
                .map_or(Duration::from_secs(60), Duration::from_millis),
        };
        const PREFERENCE: &str = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE";
        let temporality = match config.temporality {
            Some(config::Temporality::Cumulative) => Temporality::Cumulative,
            Some(config::Temporality::Delta) => Temporality::Delta,
            Some(config::Temporality::LowMemory) => Temporality::LowMemory,
            None => match env(PREFERENCE) {
                None => Temporality::Cumulative,
                Some(v) => v.trim().parse().map_err(|()| {
                    OtlpMetricsError(format!(
                        "{PREFERENCE}={v:?} is not one of cumulative, delta, lowmemory"
                    ))
                })?,
            },
        };
        Ok(Settings {
            protocol,
            interval,
            timeout,
            temporality,
        })
    }
}

/// The GenAI instruments and their exporter, built once at startup.
pub struct OtlpMetrics {
    provider: SdkMeterProvider,
    ttft: Histogram<f64>,
    tpot: Histogram<f64>,
    duration: Histogram<f64>,
    tokens: Histogram<u64>,
    first_chunk: Histogram<f64>,
    per_chunk: Histogram<f64>,
    provider_name: StringValue,
    shutdown_timeout: Duration,
}

impl fmt::Debug for OtlpMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpMetrics").finish_non_exhaustive()
    }
}

impl OtlpMetrics {
    /// Builds the exporter and starts its periodic reader, or returns `None` when
    /// `[otlp_metrics]` is off. Called once at startup, inside the tokio runtime (the reader is a
    /// task on it); connects to nothing yet (the collector may be down).
    pub fn new(
        config: &Config,
        telemetry: &Telemetry,
    ) -> Result<Option<OtlpMetrics>, OtlpMetricsError> {
        let c = &config.otlp_metrics;
        if !c.enabled || sdk_disabled() {
            return Ok(None);
        }
        let settings = Settings::resolve(c)?;
        let failed = telemetry.counter(
            names::EXPORTS_FAILED,
            "OTLP metric exports that failed or timed out; the data of such an export is lost",
        );
        let exporter = Counted {
            inner: build_exporter(c, &settings)?,
            failed,
            failing: AtomicBool::new(false),
            timeout: settings.timeout,
        };
        // The reader gives up a little after the exporter's own limit, so that a slow export
        // ends in `Counted::export` (and is counted) rather than being cut off unseen.
        let reader = PeriodicReader::builder(exporter, opentelemetry_sdk::runtime::Tokio)
            .with_interval(settings.interval)
            .with_timeout(settings.timeout + Duration::from_secs(1))
            .build();
        let provider = SdkMeterProvider::builder()
            .with_resource(build_resource(&config.tracing))
            .with_reader(reader)
            .build();
        let meter = provider.meter("tokentap");
        let seconds = |name: &'static str, description: &'static str, advice: &[f64]| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(advice.to_vec())
                .build()
        };
        let ttft = seconds(
            names::TTFT,
            "Time to generate first token for successful responses.",
            TTFT_ADVICE,
        );
        let tpot = seconds(
            names::TPOT,
            "Time per output token generated after the first token for successful responses.",
            TPOT_ADVICE,
        );
        let duration = seconds(
            names::REQUEST_DURATION,
            "Generative AI server request duration such as time-to-last byte or last output token.",
            DURATION_ADVICE,
        );
        let first_chunk = seconds(
            names::TIME_TO_FIRST_CHUNK,
            "Time to receive the first chunk, measured from when the client issues the generation request to when the first chunk is received in the response stream.",
            DURATION_ADVICE,
        );
        let per_chunk = seconds(
            names::TIME_PER_OUTPUT_CHUNK,
            "Time per output chunk, recorded for each chunk received after the first one, measured as the time elapsed from the end of the previous chunk to the end of the current chunk.",
            DURATION_ADVICE,
        );
        let tokens = meter
            .u64_histogram(names::TOKEN_USAGE)
            .with_unit("{token}")
            .with_description("Number of input and output tokens used.")
            .with_boundaries(TOKEN_ADVICE.to_vec())
            .build();
        tracing::info!(
            protocol = settings.protocol.as_str(),
            interval = ?settings.interval,
            temporality = ?settings.temporality,
            "exporting GenAI metrics over OTLP"
        );
        Ok(Some(OtlpMetrics {
            provider,
            ttft,
            tpot,
            duration,
            tokens,
            first_chunk,
            per_chunk,
            provider_name: StringValue::from(
                config
                    .tracing
                    .provider_name
                    .clone()
                    .unwrap_or_else(|| "vllm".to_owned()),
            ),
            shutdown_timeout: settings.timeout + Duration::from_secs(2),
        }))
    }

    /// Records a request that has ended, from the same report Prometheus gets. Called once per
    /// request from [`Telemetry::record`](super::Telemetry::record); requests to endpoints that
    /// are no GenAI operation (`/v1/models`, other paths) are not recorded.
    ///
    /// - TTFT and TPOT only for requests that ended `ok` (the conventions' "successful
    ///   responses"), like the Prometheus histograms;
    /// - the request duration (E2EL) for every request, with `error.type` set to the outcome
    ///   when it is not `ok`;
    /// - the time to the first chunk for every stream that got one;
    /// - the time per output chunk: the stream's ITL samples not recorded yet
    ///   ([`Finished::chunk_times`]), whatever the outcome, like the Prometheus ITL histogram;
    /// - prompt (`input`) and generated (`output`) tokens whenever they are known.
    pub fn record(&self, done: &Finished<'_>) {
        let Some(mut attrs) = self.attributes(done.route, done.server) else {
            return;
        };
        let f = done.figures;
        let ok = done.outcome == Outcome::Ok;
        if ok {
            if let Some(ttft) = f.ttft {
                self.ttft.record(ttft.as_secs_f64(), &attrs);
            }
            if let Some(tpot) = f.tpot {
                self.tpot.record(tpot.as_secs_f64(), &attrs);
            }
        }
        if done.stream
            && let Some(ttft) = f.ttft
        {
            self.first_chunk.record(ttft.as_secs_f64(), &attrs);
        }
        for &itl in done.chunk_times {
            self.per_chunk.record(itl, &attrs);
        }
        let base = attrs.len();
        for (kind, n) in [("input", f.prompt_tokens), ("output", f.output_tokens)] {
            if let Some(n) = n {
                attrs.push(KeyValue::new("gen_ai.token.type", kind));
                self.tokens.record(n, &attrs);
                attrs.truncate(base);
            }
        }
        if !ok {
            attrs.push(KeyValue::new("error.type", done.outcome.as_str()));
        }
        self.duration.record(f.e2el.as_secs_f64(), &attrs);
    }

    /// Whether the ITL samples of a stream to `endpoint` are recorded (kept in its
    /// [`ChunkTimes`]): only for a GenAI operation. Asked once per request, when its response
    /// head says it streams.
    pub fn records_chunks(&self, endpoint: Endpoint) -> bool {
        operation(endpoint).is_some()
    }

    /// Records a stream's full batch of ITL samples mid-stream and empties it; called when
    /// [`ChunkTimes::push`] says it is full, once every [`CHUNK_BATCH`] chunks of a long stream.
    /// The attributes are those of the request's other client metrics, which do not depend on
    /// how it ends (the time per output chunk has no `error.type`): a batch recorded now is
    /// recorded exactly as it would have been at the end.
    pub fn record_chunks(
        &self,
        route: &RouteMetrics,
        server: Option<&Server>,
        times: &mut ChunkTimes,
    ) {
        if let Some(attrs) = self.attributes(route, server) {
            for &itl in &times.seconds {
                self.per_chunk.record(itl, &attrs);
            }
        }
        // The allocation is kept for the next batch.
        times.seconds.clear();
    }

    /// The attributes every instrument of a request to `route` carries, or `None` when it is
    /// no GenAI operation. `server` is the upstream endpoint it was sent to; a request that
    /// reached none (refused by the proxy, or no answer before the header timeout) has no
    /// `server.address`. A name resolved to several addresses is one server: the metrics do
    /// not grow with a Service's pods.
    fn attributes(&self, route: &RouteMetrics, server: Option<&Server>) -> Option<Vec<KeyValue>> {
        let op = operation(route.endpoint)?;
        let mut attrs = Vec::with_capacity(7);
        attrs.push(KeyValue::new("gen_ai.operation.name", op));
        attrs.push(KeyValue::new(
            "gen_ai.provider.name",
            self.provider_name.clone(),
        ));
        // The bounded model label: a configured or upstream-listed name, or `other`; a request
        // that named no model has no `gen_ai.request.model`.
        if &*route.model != MODEL_NONE {
            attrs.push(KeyValue::new(
                "gen_ai.request.model",
                Value::String(StringValue::from(route.model.clone())),
            ));
        }
        if let Some(server) = server {
            attrs.extend(server.attributes());
        }
        Some(attrs)
    }

    /// Exports what was recorded since the last export, then stops the reader; called once on
    /// graceful shutdown, after the last request ended. Waits at most a few seconds.
    pub async fn shutdown(&self) {
        let provider = self.provider.clone();
        // The SDK blocks its caller until the reader task has exported: off the runtime's
        // threads, so that the task can run.
        let done = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(self.shutdown_timeout, done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "last OTLP metric export failed"),
            Ok(Err(_)) | Err(_) => {
                tracing::warn!("OTLP metrics not exported before the shutdown timeout")
            }
        }
    }
}

fn build_exporter(
    config: &config::OtlpMetricsConfig,
    settings: &Settings,
) -> Result<opentelemetry_otlp::MetricExporter, OtlpMetricsError> {
    let headers = header_map(&config.headers).map_err(OtlpMetricsError)?;
    let built = match settings.protocol {
        Protocol::Grpc => {
            use opentelemetry_otlp::WithTonicConfig as _;
            let metadata =
                opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers);
            let mut builder = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_protocol(OtlpProtocol::Grpc)
                .with_timeout(settings.timeout)
                .with_temporality(settings.temporality)
                .with_metadata(metadata);
            if let Some(endpoint) = &config.endpoint {
                builder = builder.with_endpoint(endpoint.clone());
            }
            builder.build()
        }
        Protocol::HttpProtobuf => {
            let headers = config
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let mut builder = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(OtlpProtocol::HttpBinary)
                .with_timeout(settings.timeout)
                .with_temporality(settings.temporality)
                .with_headers(headers)
                .with_http_client(ExportClient::new(settings.timeout).map_err(OtlpMetricsError)?);
            if let Some(endpoint) = &config.endpoint {
                builder = builder.with_endpoint(http_endpoint(
                    endpoint,
                    Protocol::HttpProtobuf,
                    "/v1/metrics",
                ));
            }
            builder.build()
        }
    };
    built.map_err(|e| OtlpMetricsError(format!("OTLP exporter: {e}")))
}

/// The OTLP exporter, with a time limit on each export and failures counted and logged once
/// per outage.
struct Counted<E> {
    inner: E,
    failed: Counter,
    failing: AtomicBool,
    timeout: Duration,
}

impl<E: PushMetricExporter> PushMetricExporter for Counted<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = match tokio::time::timeout(self.timeout, self.inner.export(metrics)).await {
            Ok(result) => result,
            Err(_) => Err(OTelSdkError::Timeout(self.timeout)),
        };
        match &result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("OTLP metric export recovered");
                }
            }
            Err(error) => {
                self.failed.increment(1);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "OTLP metric export failed; dropping metrics until the collector answers");
                }
            }
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer says it is full at exactly `CHUNK_BATCH` samples, keeps them in order, and is
    /// bounded: the caller records and empties it then.
    #[test]
    fn chunk_times_fill_at_the_batch_size() {
        let mut times = ChunkTimes::default();
        for i in 1..CHUNK_BATCH {
            assert!(!times.push(Duration::from_millis(i as u64)), "full at {i}");
        }
        assert!(times.push(Duration::from_millis(CHUNK_BATCH as u64)));
        assert_eq!(times.seconds().len(), CHUNK_BATCH);
        assert_eq!(times.seconds()[0], 0.001);
        assert_eq!(
            times.seconds()[CHUNK_BATCH - 1],
            CHUNK_BATCH as f64 / 1000.0
        );
    }
}
