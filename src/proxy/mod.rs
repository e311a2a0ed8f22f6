//! Forwarding: rewrite the request to the upstream, keep headers clean, send it on a pooled
//! connection, and turn upstream failures into OpenAI-style error responses.

mod body;
mod error;
mod forward;
#[doc(hidden)]
pub mod fuzzing;
pub mod inspect;
mod models;
pub mod strip;

use body::read_whole;
pub use body::{Budget, ReadError, ReadTimeout};
pub use error::{Refusal, error_response};
pub use forward::{add_forwarded, strip_hop_by_hop};
use strip::StripUsage;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::config::{Config, secs};
use crate::net::{self, BoxError, Connectors, TlsError};
use crate::observe::{Feedback, Observer, Recorder, TimedBody};
use crate::route::{Endpoint, RequestInfo};
use crate::telemetry::otel::Tracer;
use crate::telemetry::{Outcome, Telemetry};
use crate::upstream::dns::Resolved;
use crate::upstream::{self, Failed, RequestBody, Routes, SendError, UpstreamResponse};

pin_project! {
    /// The body of a response the proxy sends to a client.
    #[project = ProxyBodyProj]
    // pin-project-lite cannot carry doc comments on enum fields; each `body` is the variant's body.
    #[allow(missing_docs)]
    pub enum ProxyBody {
        /// An upstream body, timed and reported.
        Timed { #[pin] body: TimedBody<UpstreamResponse> },
        /// The same, with the usage event the proxy asked for cut out again.
        Stripped { #[pin] body: StripUsage<UpstreamResponse> },
        /// An upstream body passed through untouched (telemetry off).
        Plain { #[pin] body: UpstreamResponse },
        /// A body the proxy wrote itself (errors).
        Full { #[pin] body: Full<Bytes> },
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ProxyBodyProj::Timed { body } => body.poll_frame(cx),
            ProxyBodyProj::Stripped { body } => body.poll_frame(cx),
            ProxyBodyProj::Plain { body } => body.poll_frame(cx),
            ProxyBodyProj::Full { body } => body.poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Timed { body } => body.is_end_stream(),
            ProxyBody::Stripped { body } => body.is_end_stream(),
            ProxyBody::Plain { body } => body.is_end_stream(),
            ProxyBody::Full { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Timed { body } => body.size_hint(),
            ProxyBody::Stripped { body } => body.size_hint(),
            ProxyBody::Plain { body } => body.size_hint(),
            ProxyBody::Full { body } => body.size_hint(),
        }
    }
}

/// A proxy that cannot be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `upstream.ca_file` could not be read as PEM certificates.
    #[error("upstream.ca_file {path}: {reason}")]
    CaFile {
        /// The file.
        path: String,
        /// Why it was refused.
        reason: String,
    },
    /// An upstream URL (`upstream.url` or a route's) is not usable.
    #[error("upstream URL {0}")]
    Url(String),
}

/// The forwarding half of `tokentap serve`, shared by all connections.
#[derive(Debug)]
pub struct Proxy {
    /// The route table, replaced whole by a reload. Each request reads it once, at its start,
    /// and keeps that table (and the endpoint it picked) to its end.
    routes: RwLock<Arc<Routes>>,
    /// The telemetry that a reload's new endpoints register their metrics with.
    telemetry: Arc<Telemetry>,
    /// Held while a reload builds and swaps a table, so that two reloads do not both build on
    /// the same previous table.
    reloading: std::sync::Mutex<()>,
    observer: Observer,
    max_body: usize,
    /// Request bodies held in memory, all requests together.
    budget: Arc<Budget>,
    body_read_timeout: Duration,
    max_sse_event: usize,
    inject_usage: bool,
    x_forwarded: bool,
    telemetry_enabled: bool,
    next_id: AtomicU64,
}

/// The upstream connectors of a configuration (`upstream.connect_timeout_secs`,
/// `upstream.ca_file`). Reads the system's and the configured CA certificates: blocks.
pub fn connectors(config: &Config) -> Result<Connectors, BuildError> {
    Connectors::new(
        secs(config.upstream.connect_timeout_secs),
        config.upstream.ca_file.as_deref(),
    )
    .map_err(|e| match e {
        TlsError::CaFile { path, reason } => BuildError::CaFile { path, reason },
        TlsError::Config(reason) => BuildError::Url(reason),
    })
}

impl Proxy {
    /// Builds the proxy for a validated configuration, whose upstream names resolved to
    /// `resolved`.
    pub fn new(
        config: &Config,
        telemetry: Arc<Telemetry>,
        tracer: Option<Arc<Tracer>>,
        resolved: Resolved,
    ) -> Result<Proxy, BuildError> {
        let body_bytes_held = telemetry.body_bytes_held();
        let routes = Routes::new(config, &connectors(config)?, &telemetry, None, resolved)
            .map_err(BuildError::Url)?;
        Ok(Proxy {
            routes: RwLock::new(Arc::new(routes)),
            telemetry: telemetry.clone(),
            reloading: std::sync::Mutex::new(()),
            observer: Observer::new(telemetry, tracer),
            max_body: config.proxy.max_request_body_bytes,
            budget: Budget::new(config.proxy.body_budget_bytes, body_bytes_held),
            body_read_timeout: secs(config.proxy.body_read_timeout_secs),
            max_sse_event: config.proxy.max_sse_event_bytes,
            inject_usage: config.proxy.inject_usage,
            x_forwarded: config.proxy.x_forwarded,
            telemetry_enabled: config.proxy.telemetry_enabled,
            next_id: AtomicU64::new(1),
        })
    }

    /// The route table in force: the one a request that starts now gets (kept up by the
    /// upkeep task, polled by the model poller).
    pub fn routes(&self) -> Arc<Routes> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Builds the route table of `config` (its `[upstream]` and `[[routes]]`; the rest of the
    /// proxy is fixed at start) with `connectors` (`None`: the table's in force) and the DNS
    /// names' addresses `resolved`, and puts it in force for requests that start from now on;
    /// requests in flight finish on the table they started with. Endpoints whose address and
    /// settings are unchanged are kept with their pool, load and health. Returns the previous
    /// table and the new one; on error the table in force stays.
    pub fn rebuild(
        &self,
        config: &Config,
        connectors: Option<Connectors>,
        resolved: Resolved,
    ) -> Result<(Arc<Routes>, Arc<Routes>), BuildError> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let previous = self.routes();
        let connectors = connectors.unwrap_or_else(|| previous.connectors().clone());
        let routes = Routes::new(
            config,
            &connectors,
            &self.telemetry,
            Some(&previous),
            resolved,
        )
        .map_err(BuildError::Url)?;
        let routes = Arc::new(routes);
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = routes.clone();
        routes.retire(&previous);
        Ok((previous, routes))
    }

    /// Proxies one request from the client at `remote`. Takes the proxy by `Arc` so that the
    /// future is the whole per-request state: the server keeps it in one box per connection.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        remote: SocketAddr,
    ) -> Response<ProxyBody> {
        let t0 = Instant::now();
        // Once per request: the whole request, its retry and its stream use this table.
        let routes = self.routes();
        let (mut parts, body) = req.into_parts();
        let body = ReadTimeout::new(body, self.body_read_timeout);
        let endpoint = Endpoint::from_path(parts.uri.path());
        let request_id: Box<str> = match parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
        {
            Some(id) if id.len() <= 128 => id.into(),
            _ => format!("tt-{:x}", self.next_id.fetch_add(1, Ordering::Relaxed)).into(),
        };
        let observe = |info: &RequestInfo, parts: &http::request::Parts, id: Box<str>| {
            self.telemetry_enabled
                .then(|| self.observer.start(parts, endpoint, info, id, t0))
        };
        let refuse = |recorder: Option<Recorder>, refusal: Refusal| {
            if let Some(recorder) = recorder {
                recorder.finish_without_body(
                    refusal.outcome,
                    refusal.status.as_u16(),
                    Instant::now(),
                );
            }
            refusal.response()
        };

        let mut info = RequestInfo {
            n: 1,
            ..RequestInfo::default()
        };
        if parts.method == Method::GET
            && endpoint == Endpoint::Models
            && (routes.by_model() || routes.endpoints().len() > 1)
        {
            // Several replicas: the proxy's own list, the union of theirs.
            let recorder = observe(&info, &parts, request_id);
            let limit = routes
                .route(None)
                .map_or(Duration::from_secs(10), |r| r.header_timeout())
                .min(Duration::from_secs(10));
            let (response, ok) = models::union(&routes, limit).await;
            if let Some(recorder) = recorder {
                let outcome = if ok {
                    Outcome::Ok
                } else {
                    Outcome::ConnectError
                };
                recorder.finish_without_body(outcome, response.status().as_u16(), Instant::now());
            }
            return response;
        }
        if parts.method == Method::CONNECT {
            // Not a tunnel: the upstream serves an API.
            let recorder = observe(&info, &parts, request_id);
            return refuse(recorder, Refusal::connect());
        }
        let mut injected = false;
        // The body's share of the body budget, held until the upstream has answered.
        let mut _held = None;
        let telemetry_reads = self.telemetry_enabled && endpoint.inspects_body(&parts.method);
        // With routes by model, every body that carries `model` is read for it (the one parse
        // that telemetry's labels use too).
        let routing_reads = routes.by_model()
            && parts.method == Method::POST
            && (endpoint.is_generation() || endpoint == Endpoint::Embeddings);
        let body = if telemetry_reads || routing_reads {
            match read_whole(body, self.max_body, &self.budget).await {
                Ok((mut bytes, held)) => {
                    _held = Some(held);
                    info = inspect::inspect(&bytes);
                    if telemetry_reads
                        && self.inject_usage
                        && endpoint.takes_stream_options()
                        && let Some(rewritten) = inspect::inject_usage(&bytes, &info)
                    {
                        // The upstream request's Content-Length is set from the body sent.
                        bytes = rewritten;
                        injected = true;
                    }
                    RequestBody::Bytes(bytes)
                }
                Err(error) => {
                    let recorder = observe(&info, &parts, request_id);
                    return refuse(recorder, Refusal::body(error, self.max_body));
                }
            }
        } else if body.is_end_stream() {
            RequestBody::Bytes(Bytes::new())
        } else {
            RequestBody::Stream(UnsyncBoxBody::new(body))
        };

        let mut recorder = observe(&info, &parts, request_id);
        let Some(route) = routes.route(info.model.as_deref()) else {
            let model = info.model.as_deref().unwrap_or_default();
            return refuse(recorder, Refusal::model_not_found(model));
        };
        // A body held whole (or none) can be sent again, to another endpoint, when a connection
        // is refused before any of it was written; a streamed one cannot.
        let retry = matches!(body, RequestBody::Bytes(_));
        strip_hop_by_hop(&mut parts.headers);
        // Answered by the proxy's own server already (the body is read or streamed on).
        parts.headers.remove(header::EXPECT);
        if self.x_forwarded {
            add_forwarded(&mut parts.headers, remote);
        }
        if let Some(recorder) = &recorder {
            recorder.inject(&mut parts.headers);
        }
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(pq);
        parts.version = http::Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, body);

        // Boxed: connecting and sending are large futures that end at the response head; inline
        // they would stay in every connection's memory for the whole stream.
        let sending = Box::pin(route.send(upstream_req, retry));
        let header_timeout = route.header_timeout();
        let sent = tokio::time::timeout(header_timeout, sending).await;
        let (response, upstream) = match sent {
            Ok(Ok(sent)) => sent,
            Ok(Err(Failed { error, endpoint })) => {
                let refusal = match error {
                    SendError::Body(error) => Refusal::body(ReadError::from(error), self.max_body),
                    error => {
                        let failure = Refusal::upstream(&error);
                        // The address stays in the log; the client's answer does not name it.
                        tracing::warn!(
                            upstream = endpoint.address(),
                            error = %net::error_chain(&error),
                            outcome = failure.outcome.as_str(),
                            "upstream request failed"
                        );
                        failure
                    }
                };
                if let Some(recorder) = &mut recorder {
                    recorder.set_server(endpoint.server().clone());
                }
                return refuse(recorder, refusal);
            }
            Err(_elapsed) => return refuse(recorder, Refusal::head_timeout(header_timeout)),
        };
        let now = Instant::now();
        drop(_held);

        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let Some(mut recorder) = recorder else {
            return Response::from_parts(parts, ProxyBody::Plain { body });
        };
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let sse = content_type.starts_with("text/event-stream");
        let json = content_type.starts_with("application/json");
        let strip = injected && sse;
        if strip {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        recorder.set_upstream(upstream.latency().clone());
        recorder.set_server(upstream.server().clone());
        recorder.on_head(parts.status.as_u16(), sse, json, self.max_sse_event, now);
        if route.estimates_latency() {
            recorder.set_feedback(upstream);
        }
        let body = TimedBody::new(body, recorder, route.idle_timeout(), now, strip);
        let body = if strip {
            ProxyBody::Stripped {
                body: StripUsage::new(body, self.max_sse_event),
            }
        } else {
            ProxyBody::Timed { body }
        };
        Response::from_parts(parts, body)
    }
}

/// The balancer's latency estimate of an endpoint learns from the requests it serves: their
/// TTFT at the first token, their mean ITL at the end (a non-streaming answer's whole latency
/// stands in for its TTFT).
impl Feedback for upstream::Endpoint {
    fn first_token(&self, ttft: Duration, now: Instant) {
        self.load().on_ttft(ttft, now);
    }

    fn decoding(&self, itl_mean: Duration, now: Instant) {
        self.load().on_itl(itl_mean, now);
    }

    fn finished(
        &self,
        ttft: Option<Duration>,
        itl: Option<Duration>,
        e2el: Duration,
        now: Instant,
    ) {
        if ttft.is_none() {
            self.load().on_ttft(e2el, now);
        }
        if let Some(itl) = itl {
            self.load().on_itl(itl, now);
        }
    }
}

#[cfg(test)]
mod tests;
