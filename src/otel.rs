//! OpenTelemetry tracing: one span per proxied request, exported over OTLP.
//!
//! The proxy calls [`Tracer::start`] when a request arrives, [`RequestSpan::inject`] on the
//! upstream request's headers, the `on_*` methods as the response goes by, and
//! [`RequestSpan::finish`] exactly once when the request ends. Tracing is off unless configured.

use std::time::Duration;

use http::HeaderMap;
use serde::Deserialize;

use crate::inspect::{Endpoint, RequestInfo};
use crate::latency::Figures;
use crate::telemetry::{Outcome, Telemetry};

/// The `[tracing]` section of the configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// Export spans. Off by default.
    pub enabled: bool,
}

/// A tracing configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("tracing: {0}")]
pub struct TracingError(String);

/// The span factory and exporter, built once.
#[derive(Debug)]
pub struct Tracer {}

/// What is known about a request when it arrives.
#[derive(Debug)]
pub struct RequestStart<'a> {
    /// The client's request headers (`traceparent`, `tracestate`).
    pub headers: &'a HeaderMap,
    /// HTTP method.
    pub method: &'a http::Method,
    /// Request path.
    pub path: &'a str,
    /// Endpoint.
    pub endpoint: Endpoint,
    /// What the body said.
    pub info: &'a RequestInfo,
}

/// The span of one request.
#[derive(Debug)]
pub struct RequestSpan {}

impl Tracer {
    /// Builds the exporter, or `None` when tracing is off. Must be called inside a runtime.
    pub fn new(
        config: &TracingConfig,
        _telemetry: &Telemetry,
        _upstream: &http::Uri,
    ) -> Result<Option<Tracer>, TracingError> {
        if config.enabled {
            return Err(TracingError("not available in this build".to_owned()));
        }
        Ok(None)
    }

    /// Opens the span of a request that just arrived (continuing an incoming `traceparent`).
    pub fn start(&self, _req: &RequestStart<'_>) -> RequestSpan {
        RequestSpan {}
    }

    /// Flushes spans not yet exported; called on graceful shutdown.
    pub async fn shutdown(&self) {}
}

impl RequestSpan {
    /// Writes the `traceparent` (and `tracestate`) of this span into the upstream request.
    pub fn inject(&self, _headers: &mut HeaderMap) {}

    /// The upstream's response head arrived with `status`.
    pub fn on_response_head(&mut self, _status: u16) {}

    /// The first token event was handed to the client, `ttft` after arrival.
    pub fn on_first_token(&mut self, _ttft: Duration) {}

    /// The first token event with content was handed to the client, `ttfc` after arrival.
    pub fn on_first_content(&mut self, _ttfc: Duration) {}

    /// The response's `id` and `model`, from the first event that carried them.
    pub fn on_response_meta(&mut self, _id: &str, _model: &str) {}

    /// Ends the span with the request's outcome and figures.
    pub fn finish(self, _outcome: Outcome, _status: u16, _figures: &Figures) {}
}
