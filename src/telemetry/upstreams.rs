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
    /// Counter: resolutions of an upstream DNS name that gave no address (the last good set
    /// stays), by `name`.
    pub const DNS_FAILURES: &str = "tokentap_upstream_dns_failures_total";
    /// Counter: resolutions of a name with more addresses than `upstream.dns_max_addresses`.
    pub const DNS_TRUNCATED: &str = "tokentap_upstream_dns_truncated_total";
    /// Gauge: the addresses of a name in use as endpoints.
    pub const DNS_ADDRESSES: &str = "tokentap_upstream_dns_addresses";
    /// Counter: configuration reloads, by `result` (`ok`, `error`).
    pub const RELOADS: &str = "tokentap_config_reloads_total";
    /// Gauge: 1 when the last reload succeeded (or none was tried), 0 after a refused one.
    pub const LAST_RELOAD_OK: &str = "tokentap_config_last_reload_successful";
    /// Gauge: Unix time of the last successful reload (or of the start).
    pub const LAST_RELOAD_TIME: &str = "tokentap_config_last_reload_success_timestamp_seconds";
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

/// The handles of one upstream DNS name's metrics.
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    /// Resolutions that gave no address.
    pub failures: Counter,
    /// Resolutions past the cap.
    pub truncated: Counter,
    /// Addresses in use.
    pub addresses: Gauge,
}

/// The handles of the reload metrics.
#[derive(Clone, Debug)]
pub struct ReloadMetrics {
    /// Reloads put in force.
    pub ok: Counter,
    /// Reloads refused (the running configuration stayed).
    pub error: Counter,
    /// 1 after a successful reload (and at start), 0 after a refused one.
    pub last_ok: Gauge,
    /// Unix time, seconds, of the last successful reload (or the start).
    pub last_time: Gauge,
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

    /// The metrics of the upstream DNS name `name` (a host from the configuration).
    pub fn dns_name(&self, name: &str) -> DnsMetrics {
        let r = &self.recorder;
        let describe = |key: &'static str, help: &'static str| {
            (KeyName::from_const_str(key), SharedString::const_str(help))
        };
        let (k, h) = describe(
            n::DNS_FAILURES,
            "Resolutions of an upstream DNS name that gave no address; the last good set stays.",
        );
        r.describe_counter(k, Some(Unit::Count), h);
        let (k, h) = describe(
            n::DNS_TRUNCATED,
            "Resolutions of an upstream DNS name with more addresses than upstream.dns_max_addresses.",
        );
        r.describe_counter(k, Some(Unit::Count), h);
        let (k, h) = describe(
            n::DNS_ADDRESSES,
            "Addresses of an upstream DNS name in use as endpoints.",
        );
        r.describe_gauge(k, Some(Unit::Count), h);
        let key = |metric: &'static str| {
            Key::from_parts(metric, vec![Label::new("name", name.to_owned())])
        };
        DnsMetrics {
            failures: r.register_counter(&key(n::DNS_FAILURES), &METADATA),
            truncated: r.register_counter(&key(n::DNS_TRUNCATED), &METADATA),
            addresses: r.register_gauge(&key(n::DNS_ADDRESSES), &METADATA),
        }
    }

    /// The reload metrics: the counter of each result, the last result and its time.
    pub fn config_reloads(&self) -> ReloadMetrics {
        let r = &self.recorder;
        r.describe_counter(
            KeyName::from_const_str(n::RELOADS),
            Some(Unit::Count),
            SharedString::const_str("Configuration reloads (SIGHUP, POST /-/reload), by result."),
        );
        r.describe_gauge(
            KeyName::from_const_str(n::LAST_RELOAD_OK),
            None,
            SharedString::const_str(
                "1 when the last configuration reload succeeded (or none was tried), else 0.",
            ),
        );
        r.describe_gauge(
            KeyName::from_const_str(n::LAST_RELOAD_TIME),
            Some(Unit::Seconds),
            SharedString::const_str(
                "Unix time of the last successful configuration reload, or of the start.",
            ),
        );
        let counter = |result: &'static str| {
            r.register_counter(
                &Key::from_parts(n::RELOADS, vec![Label::new("result", result)]),
                &METADATA,
            )
        };
        ReloadMetrics {
            ok: counter("ok"),
            error: counter("error"),
            last_ok: r.register_gauge(&Key::from_name(n::LAST_RELOAD_OK), &METADATA),
            last_time: r.register_gauge(&Key::from_name(n::LAST_RELOAD_TIME), &METADATA),
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
