//! One upstream endpoint (a replica): its connection pool, load, health and metrics, and the
//! response body that counts a request outstanding on it until the body ends or is dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::Scheme;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::balance::Load;
use super::health::{Change, Health};
use super::pool::{Pool, Refused};
use crate::http1::client::{RequestBody, SendError, UpstreamResponse as Wire};
use crate::net::{BoxError, Connector};
use crate::telemetry::otel::Server;
use crate::telemetry::{EndpointMetrics, UpstreamLatency};

/// How an endpoint connects and keeps idle connections. A reload keeps an endpoint (its pool,
/// load, latency estimate and health) when its address and these are unchanged.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Limit on opening a connection (the connector's).
    pub connect_timeout: std::time::Duration,
    /// The extra CA certificates the connector trusts, as a digest
    /// ([`crate::net::Connectors::ca_digest`]): a certificate rotated in place is a change, the
    /// same certificates read again are not.
    pub ca_digest: u64,
    /// Idle connections kept.
    pub max_idle: usize,
    /// Idle connections are closed after this long.
    pub idle_timeout: std::time::Duration,
}

/// One of the addresses a DNS name resolved to, and the endpoint's slot among the name's
/// endpoints: the slot, not the address, is in the `upstream` label, so the label's values stay
/// bounded by `upstream.dns_max_addresses` however often the addresses change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pinned {
    /// The address connected to.
    pub ip: std::net::IpAddr,
    /// The slot, from 0.
    pub slot: usize,
}

/// One upstream endpoint, shared by every route that lists it.
#[derive(Debug)]
pub struct Endpoint {
    /// `scheme://authority` as the configuration gives it, with `#slot` for one of the
    /// addresses of a DNS name: logs and the `upstream` label.
    address: Arc<str>,
    /// `scheme://authority` as the configuration gives it.
    base: Arc<str>,
    /// The address of a DNS name this endpoint is (`None`: the host is resolved at each
    /// connection).
    pinned: Option<Pinned>,
    pool: Arc<Pool>,
    /// The `Host` header sent to it: the authority without a default port.
    host: HeaderValue,
    load: Load,
    health: Health,
    metrics: EndpointMetrics,
    settings: Settings,
    /// What spans and OTLP metrics name as the server of the requests it serves.
    server: Arc<Server>,
}

impl Endpoint {
    /// An endpoint at `uri` (scheme and authority), or at one address of its host name, with
    /// its own pool; `connector` is built with `settings`' connect timeout and CA file (and
    /// pinned to the address). `metrics` are those of [`label`]`(uri, pinned)`.
    pub fn new(
        uri: &Uri,
        pinned: Option<Pinned>,
        connector: Connector,
        settings: Settings,
        metrics: EndpointMetrics,
    ) -> Result<Endpoint, String> {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(format!("{uri}: needs a scheme and a host"));
        };
        let host = match authority.port_u16() {
            Some(443) if *scheme == Scheme::HTTPS => authority.host(),
            Some(80) if *scheme == Scheme::HTTP => authority.host(),
            _ => authority.as_str(),
        };
        let host = HeaderValue::from_str(host).map_err(|e| format!("{uri}: {e}"))?;
        let base: Uri = format!("{scheme}://{authority}")
            .parse()
            .map_err(|e| format!("{uri}: {e}"))?;
        let plain: Arc<str> = base.to_string().trim_end_matches('/').into();
        Ok(Endpoint {
            server: Arc::new(Server::new(&base, pinned.map(|p| p.ip))),
            address: label(&plain, pinned).into(),
            base: plain,
            pinned,
            pool: Pool::new(connector, base, settings.max_idle, settings.idle_timeout),
            host,
            load: Load::new(),
            health: Health::new(),
            metrics,
            settings,
        })
    }

    /// `scheme://authority`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// `scheme://authority` as configured (without the slot).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// What spans and OTLP metrics name as its requests' server.
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// The address of a DNS name it is pinned to.
    pub fn pinned(&self) -> Option<Pinned> {
        self.pinned
    }

    /// How it connects and pools.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Its connection pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Its load, as the balancer sees it.
    pub fn load(&self) -> &Load {
        &self.load
    }

    /// Its passive health.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The latency histograms of the requests it answers.
    pub fn latency(&self) -> &Arc<UpstreamLatency> {
        &self.metrics.latency
    }

    /// Sends `req` here (setting `Host`), counted outstanding until the response body ends;
    /// the answer's status, or a refused connection, is noted in the endpoint's health.
    pub(super) async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<UpstreamResponse>, Refused> {
        req.headers_mut().insert(header::HOST, self.host.clone());
        self.metrics.requests.increment(1);
        let in_flight = InFlight::new(self.clone());
        match self.pool.try_send(req).await {
            Ok(response) => {
                self.note(
                    self.health
                        .on_status(response.status().as_u16(), Instant::now()),
                );
                Ok(response.map(|body| UpstreamResponse {
                    body,
                    _in_flight: in_flight,
                }))
            }
            Err(refused) => {
                if matches!(refused.error, SendError::Connect(_)) {
                    self.metrics.connect_errors.increment(1);
                    self.note(self.health.on_connect_error(Instant::now()));
                }
                Err(refused)
            }
        }
    }

    /// Sends a request of the proxy's own (`GET path`, for example the `/v1/models` poll),
    /// noting the answer in the endpoint's health like any other.
    pub async fn get(
        self: &Arc<Self>,
        path: &'static str,
    ) -> Result<Response<UpstreamResponse>, SendError> {
        let req = Request::builder()
            .uri(path)
            .body(RequestBody::Bytes(Bytes::new()))
            .expect("static request parts are valid");
        self.send(req).await.map_err(|refused| refused.error)
    }

    /// A request was sent elsewhere after this endpoint refused its connection.
    pub(super) fn retried_elsewhere(&self) {
        self.metrics.retries.increment(1);
    }

    /// Clears the ejection gauge of an endpoint a reload took out of the configuration (its
    /// streams still in flight finish and are counted as usual).
    pub(super) fn retire(&self) {
        self.metrics.ejected.set(0.0);
    }

    /// Updates the ejection gauge to the endpoint's health at `now` (periodically, since an
    /// ejection ends by itself).
    pub(super) fn refresh(&self, now: Instant) {
        let live = self.health.is_live(now);
        self.metrics.ejected.set(if live { 0.0 } else { 1.0 });
    }

    fn note(&self, change: Change) {
        match change {
            Change::None => {}
            Change::Ejected(backoff) => {
                self.metrics.ejections.increment(1);
                self.metrics.ejected.set(1.0);
                tracing::warn!(
                    upstream = %self.address,
                    ip = ?self.pinned.map(|p| p.ip),
                    backoff_secs = backoff.as_secs_f64(),
                    "upstream ejected from balancing"
                );
            }
            Change::Recovered => {
                self.metrics.ejected.set(0.0);
                tracing::info!(upstream = %self.address, "upstream healthy again");
            }
        }
    }
}

/// The `upstream` label (and log name) of the endpoint at `base`: `base` itself, or
/// `base#slot` for one of the addresses of its DNS name.
pub fn label(base: &str, pinned: Option<Pinned>) -> String {
    match pinned {
        Some(p) => format!("{base}#{}", p.slot),
        None => base.to_owned(),
    }
}

/// A request outstanding on an endpoint: counted from the send until dropped.
#[derive(Debug)]
struct InFlight(Arc<Endpoint>);

impl InFlight {
    fn new(endpoint: Arc<Endpoint>) -> InFlight {
        endpoint.load.start();
        endpoint.metrics.in_flight.increment(1.0);
        InFlight(endpoint)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.load.end();
        self.0.metrics.in_flight.decrement(1.0);
    }
}

pin_project! {
    /// An upstream response body; its request counts as outstanding on its endpoint until the
    /// body is dropped (at its end, or when the client goes away).
    pub struct UpstreamResponse {
        #[pin]
        body: Wire,
        _in_flight: InFlight,
    }
}

impl std::fmt::Debug for UpstreamResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamResponse")
            .field("upstream", &self._in_flight.0.address)
            .finish_non_exhaustive()
    }
}

impl Body for UpstreamResponse {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
