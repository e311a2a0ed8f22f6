//! Forwarding: rewrite the request to the upstream, keep headers clean, send it on a pooled
//! connection, and turn upstream failures into OpenAI-style error responses.

mod error;
mod forward;
pub mod inspect;
mod strip;

use error::classify_client_error;
pub use error::error_response;
pub use forward::{add_forwarded, strip_hop_by_hop};
use strip::StripUsage;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::config::{Config, secs};
use crate::net::{self, BoxError, Connector, TlsError};
use crate::observe::{Observer, TimedBody};
use crate::route::{Endpoint, RequestInfo};
use crate::telemetry::otel::Tracer;
use crate::telemetry::{Outcome, Telemetry};
use crate::upstream::{Pool, RequestBody, SendError, UpstreamResponse};

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
    /// `upstream.url` is not usable.
    #[error("upstream.url: {0}")]
    Url(String),
}

/// The forwarding half of `tokentap serve`, shared by all connections.
#[derive(Debug)]
pub struct Proxy {
    pool: Arc<Pool>,
    scheme: Scheme,
    authority: Authority,
    /// The `Host` header sent upstream: the authority without a default port.
    host: HeaderValue,
    observer: Observer,
    max_body: usize,
    inject_usage: bool,
    x_forwarded: bool,
    telemetry_enabled: bool,
    header_timeout: Duration,
    idle_timeout: Duration,
    next_id: AtomicU64,
}

/// The upstream connector of a configuration (`upstream.connect_timeout_secs`,
/// `upstream.ca_file`).
pub fn connector(config: &Config) -> Result<Connector, BuildError> {
    net::connector(
        secs(config.upstream.connect_timeout_secs),
        config.upstream.ca_file.as_deref(),
    )
    .map_err(|e| match e {
        TlsError::CaFile { path, reason } => BuildError::CaFile { path, reason },
        TlsError::Config(reason) => BuildError::Url(reason),
    })
}

impl Proxy {
    /// Builds the proxy for a validated configuration.
    pub fn new(
        config: &Config,
        telemetry: Arc<Telemetry>,
        tracer: Option<Arc<Tracer>>,
    ) -> Result<Proxy, BuildError> {
        let uri: Uri = config
            .upstream
            .url
            .parse()
            .map_err(|e: http::uri::InvalidUri| BuildError::Url(e.to_string()))?;
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            return Err(BuildError::Url("needs a scheme and a host".to_owned()));
        };
        let host = match authority.port_u16() {
            Some(443) if scheme == Scheme::HTTPS => authority.host().to_owned(),
            Some(80) if scheme == Scheme::HTTP => authority.host().to_owned(),
            _ => authority.as_str().to_owned(),
        };
        let host = HeaderValue::from_str(&host).map_err(|e| BuildError::Url(e.to_string()))?;
        let pool = Pool::new(
            connector(config)?,
            uri,
            config.upstream.pool_max_idle,
            secs(config.upstream.pool_idle_timeout_secs),
        );
        Ok(Proxy {
            pool,
            scheme,
            authority,
            host,
            observer: Observer::new(telemetry, tracer),
            max_body: config.proxy.max_request_body_bytes,
            inject_usage: config.proxy.inject_usage,
            x_forwarded: config.proxy.x_forwarded,
            telemetry_enabled: config.proxy.telemetry_enabled,
            header_timeout: secs(config.upstream.response_header_timeout_secs),
            idle_timeout: secs(config.upstream.idle_timeout_secs),
            next_id: AtomicU64::new(1),
        })
    }

    /// The upstream connection pool (swept by the upkeep task).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Sends a request of the proxy's own (for example the `/v1/models` poll) to the upstream,
    /// on the same pool as proxied requests.
    pub async fn get(&self, path: &'static str) -> Result<Response<UpstreamResponse>, SendError> {
        let req = Request::builder()
            .uri(path)
            .header(header::HOST, self.host.clone())
            .body(RequestBody::Bytes(Bytes::new()))
            .expect("static request parts are valid");
        self.pool.send(req).await
    }

    /// Proxies one request from the client at `remote`. Takes the proxy by `Arc` so that the
    /// future is the whole per-request state: the server keeps it in one box per connection.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        remote: SocketAddr,
    ) -> Response<ProxyBody> {
        let t0 = Instant::now();
        let (mut parts, body) = req.into_parts();
        let endpoint = Endpoint::from_path(parts.uri.path());
        let request_id: Box<str> = match parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
        {
            Some(id) if id.len() <= 128 => id.into(),
            _ => format!("tt-{:x}", self.next_id.fetch_add(1, Ordering::Relaxed)).into(),
        };

        let mut info = RequestInfo {
            n: 1,
            ..RequestInfo::default()
        };
        let mut injected = false;
        let body = if self.telemetry_enabled && endpoint.inspects_body(&parts.method) {
            match Limited::new(body, self.max_body).collect().await {
                Ok(collected) => {
                    let mut bytes = collected.to_bytes();
                    info = inspect::inspect(&bytes);
                    if self.inject_usage
                        && let Some(rewritten) = inspect::inject_usage(&bytes, &info)
                    {
                        // The upstream request's Content-Length is set from the body sent.
                        bytes = rewritten;
                        injected = true;
                    }
                    RequestBody::Bytes(bytes)
                }
                Err(error) => {
                    let recorder = self.observer.start(&parts, endpoint, &info, request_id, t0);
                    let too_large = error
                        .downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some();
                    let (status, outcome, message) = if too_large {
                        (
                            StatusCode::PAYLOAD_TOO_LARGE,
                            Outcome::Rejected,
                            format!(
                                "request body exceeds proxy.max_request_body_bytes ({} bytes)",
                                self.max_body
                            ),
                        )
                    } else {
                        (
                            StatusCode::BAD_REQUEST,
                            Outcome::ClientDisconnect,
                            format!("could not read the request body: {error}"),
                        )
                    };
                    recorder.finish_without_body(outcome, status.as_u16(), Instant::now());
                    return error_response(status, "invalid_request_error", &message);
                }
            }
        } else {
            RequestBody::Stream(body)
        };

        let recorder = self
            .telemetry_enabled
            .then(|| self.observer.start(&parts, endpoint, &info, request_id, t0));
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(header::HOST, self.host.clone());
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
        let sending = Box::pin(self.pool.send(upstream_req));
        let sent = tokio::time::timeout(self.header_timeout, sending).await;
        let now = Instant::now();
        let response = match sent {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                let (status, outcome, kind) = classify_client_error(&error);
                tracing::warn!(error = %net::error_chain(&error), outcome = outcome.as_str(), "upstream request failed");
                if let Some(recorder) = recorder {
                    recorder.finish_without_body(outcome, status.as_u16(), now);
                }
                let message = format!(
                    "upstream {}://{}: {}",
                    self.scheme,
                    self.authority,
                    net::error_chain(&error)
                );
                return error_response(status, kind, &message);
            }
            Err(_elapsed) => {
                if let Some(recorder) = recorder {
                    recorder.finish_without_body(Outcome::UpstreamTimeout, 504, now);
                }
                let message = format!(
                    "upstream sent no response head within {:?} (upstream.response_header_timeout_secs)",
                    self.header_timeout
                );
                return error_response(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", &message);
            }
        };

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
        recorder.on_head(parts.status.as_u16(), sse, json, now);
        let body = TimedBody::new(body, recorder, self.idle_timeout, now, strip);
        let body = if strip {
            ProxyBody::Stripped {
                body: StripUsage::new(body),
            }
        } else {
            ProxyBody::Timed { body }
        };
        Response::from_parts(parts, body)
    }
}

#[cfg(test)]
mod tests;
