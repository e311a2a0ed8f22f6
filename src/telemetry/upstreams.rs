//! Metrics of each upstream endpoint and route: requests sent, in flight, connect errors,
//! retries and ejections, and the TTFT, TPOT and E2EL of the requests each endpoint answered.
//! The `upstream` label is an endpoint's address as the configuration gives it and `route` a
//! route's first model name, so both are bounded by the configuration.
//!
//! The latency histograms per endpoint are families of their own, labelled with `upstream`
//! only, rather than an `upstream` label on the main histograms: those are already one series
//! per model × endpoint kind (× tenant), and multiplying them by the replicas would make every
//! dashboard query and every scrape pay for a breakdown that only the replicas row needs. They
//! are fed the same figures as the main histograms at the same moments, so per endpoint they
//! add up to the main ones (`docs/METRICS.md` §8).

use std::sync::Arc;

use metrics::{Counter, Gauge, Key, KeyName, Label, Recorder, SharedString, Unit};

use super::histogram::{Series, TraceIds};
use super::prometheus::METADATA;
use super::{Outcome, Telemetry};
use crate::latency::Figures;

/// Metric names of endpoints and routes.
pub mod upstream_names {
    /// Counter: requests sent to an endpoint (each try of a retried request counts).
    pub const REQUESTS: &str = "tokentap_upstream_requests_total";
    /// Gauge: requests sent to an endpoint whose response has not ended.
    pub const IN_FLIGHT: &str = "tokentap_upstream_requests_in_flight";
    /// Counter: connections to an endpoint that could not be opened.
    pub const CONNECT_ERRORS: &str = "tokentap_upstream_connect_errors_total";
    /// Counter: requests sent to another endpoint after this one refused the connection.
    pub const RETRIES: &str = "tokentap_upstream_retries_total";
    /// Counter: times an endpoint was ejected (taken out of balancing for a backoff).
    pub const EJECTIONS: &str = "tokentap_upstream_ejections_total";
    /// Gauge: 1 while an endpoint is ejected.
    pub const EJECTED: &str = "tokentap_upstream_ejected";
    /// Gauge: endpoints of a route that are not ejected.
    pub const ROUTE_LIVE: &str = "tokentap_route_live_upstreams";
    /// Histogram: TTFT of the requests an endpoint answered, seconds.
    pub const TTFT: &str = "tokentap_upstream_time_to_first_token_seconds";
    /// Histogram: TPOT of the requests an endpoint answered that ended ok, seconds.
    pub const TPOT: &str = "tokentap_upstream_time_per_output_token_seconds";
    /// Histogram: E2EL of the requests an endpoint answered that ended ok, seconds.
    pub const E2EL: &str = "tokentap_upstream_e2e_request_latency_seconds";
}

use upstream_names as n;

/// The metric handles of one upstream endpoint, resolved once when the routes are built.
#[derive(Clone, Debug)]
pub struct EndpointMetrics {
    /// Requests sent.
    pub requests: Counter,
    /// Requests whose response has not ended.
    pub in_flight: Gauge,
    /// Connections that could not be opened.
    pub connect_errors: Counter,
    /// Requests retried elsewhere after a refused connection here.
    pub retries: Counter,
    /// Ejections.
    pub ejections: Counter,
    /// 1 while ejected.
    pub ejected: Gauge,
    /// The latency of the requests it answered.
    pub latency: Arc<UpstreamLatency>,
}

/// The latency histograms of one endpoint, handed to each request it answers (one reference
/// count per request, nothing per chunk): the first token's TTFT is recorded when the main
/// TTFT is, and TPOT and E2EL at the request's one report, under the main histograms' rules.
/// A retried request is the endpoint's that answered it.
#[derive(Debug)]
pub struct UpstreamLatency {
    /// TTFT (exemplars: the traces of sampled requests).
    ttft: Series,
    /// TPOT.
    tpot: Series,
    /// E2EL (exemplars: the traces of sampled requests).
    e2el: Series,
}

impl UpstreamLatency {
    /// A request this endpoint answered handed its first token to the client `ttft` after it
    /// arrived.
    pub fn first_token(&self, ttft: f64, trace: Option<TraceIds>) {
        self.ttft.record_traced(ttft, trace);
    }

    /// A request this endpoint answered ended with `outcome`: its E2EL and TPOT count when it
    /// ended ok, as in `tokentap_e2e_request_latency_seconds` and
    /// `tokentap_time_per_output_token_seconds`.
    pub fn finished(&self, outcome: Outcome, figures: &Figures, trace: Option<TraceIds>) {
        if outcome != Outcome::Ok {
            return;
        }
        self.e2el.record_traced(figures.e2el.as_secs_f64(), trace);
        if let Some(tpot) = figures.tpot {
            self.tpot.record(tpot.as_secs_f64());
        }
    }
}

impl Telemetry {
    /// The metrics of the endpoint at `upstream` (an address from the configuration).
    pub fn upstream_endpoint(&self, upstream: &str) -> EndpointMetrics {
        let r = &self.recorder;
        let describe = |name: &'static str, help: &'static str, gauge: bool| {
            let (key, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
            if gauge {
                r.describe_gauge(key, Some(Unit::Count), help);
            } else {
                r.describe_counter(key, Some(Unit::Count), help);
            }
        };
        describe(
            n::REQUESTS,
            "Requests sent to an upstream endpoint, retries included.",
            false,
        );
        describe(
            n::IN_FLIGHT,
            "Requests sent to an upstream endpoint whose response has not ended.",
            true,
        );
        describe(
            n::CONNECT_ERRORS,
            "Connections to an upstream endpoint that could not be opened.",
            false,
        );
        describe(
            n::RETRIES,
            "Requests sent to another endpoint of the route after this one refused the connection.",
            false,
        );
        describe(
            n::EJECTIONS,
            "Times an upstream endpoint was taken out of balancing (passive health).",
            false,
        );
        describe(
            n::EJECTED,
            "1 while an upstream endpoint is ejected from balancing.",
            true,
        );
        let key = |name: &'static str| {
            Key::from_parts(name, vec![Label::new("upstream", upstream.to_owned())])
        };
        let series = |name: &'static str| self.histograms.series(name, &[("upstream", upstream)]);
        EndpointMetrics {
            latency: Arc::new(UpstreamLatency {
                ttft: series(n::TTFT),
                tpot: series(n::TPOT),
                e2el: series(n::E2EL),
            }),
            requests: r.register_counter(&key(n::REQUESTS), &METADATA),
            in_flight: r.register_gauge(&key(n::IN_FLIGHT), &METADATA),
            connect_errors: r.register_counter(&key(n::CONNECT_ERRORS), &METADATA),
            retries: r.register_counter(&key(n::RETRIES), &METADATA),
            ejections: r.register_counter(&key(n::EJECTIONS), &METADATA),
            ejected: r.register_gauge(&key(n::EJECTED), &METADATA),
        }
    }

    /// The gauge of live (not ejected) endpoints of the route named `route`.
    pub fn route_live(&self, route: &str) -> Gauge {
        self.recorder.describe_gauge(
            KeyName::from_const_str(n::ROUTE_LIVE),
            Some(Unit::Count),
            SharedString::const_str("Upstream endpoints of a route that are not ejected."),
        );
        self.recorder.register_gauge(
            &Key::from_parts(n::ROUTE_LIVE, vec![Label::new("route", route.to_owned())]),
            &METADATA,
        )
    }
}
