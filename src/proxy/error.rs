//! Answers the proxy writes itself: OpenAI-style error bodies, the outcome each stands for, and
//! what the client is told (never an internal address).

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use super::ProxyBody;
use super::body::ReadError;
use crate::net;
use crate::telemetry::Outcome;
use crate::upstream::SendError;

/// An answer the proxy writes itself instead of the upstream's, and how the request ended.
#[derive(Debug)]
pub struct Refusal {
    /// The status sent.
    pub status: StatusCode,
    /// The request's outcome.
    pub outcome: Outcome,
    /// The OpenAI-style error `type`.
    pub kind: &'static str,
    /// What the client is told (never the upstream's address).
    pub message: Cow<'static, str>,
    /// Whether the connection closes after the answer (a request body left unread).
    pub close: bool,
    /// The answer is the upstream's own (vLLM's words and `param`), so it is sent as the
    /// upstream would have: without the proxy's name in front.
    pub as_upstream: Option<&'static str>,
}

impl Refusal {
    fn new(
        status: StatusCode,
        outcome: Outcome,
        kind: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Refusal {
        Refusal {
            status,
            outcome,
            kind,
            message: message.into(),
            close: false,
            as_upstream: None,
        }
    }

    /// A request for a model no route serves: vLLM's own 404 for an unknown model, so that a
    /// client cannot tell the proxy's answer from a replica's.
    pub fn model_not_found(model: &str) -> Refusal {
        // The name is the client's own; a very long one is not sent back whole.
        let model: String = model.chars().take(256).collect();
        Refusal {
            as_upstream: Some("model"),
            ..Refusal::new(
                StatusCode::NOT_FOUND,
                Outcome::Rejected,
                "NotFoundError",
                format!("The model `{model}` does not exist."),
            )
        }
    }

    /// `CONNECT`: the proxy serves an API, it does not open tunnels. The connection closes
    /// after the answer: what a client sends after `CONNECT` is meant for the tunnel, and read
    /// as the next request it would be a request that anything in front of the proxy which
    /// tunnels without waiting for the answer never saw.
    pub fn connect() -> Refusal {
        Refusal {
            close: true,
            ..Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Outcome::Rejected,
                "invalid_request_error",
                "CONNECT is not served: requests go to the upstream's API, no tunnel is opened",
            )
        }
    }

    /// A request body that could not be read (whole, or streamed on to the upstream).
    pub fn body(error: ReadError, max: usize) -> Refusal {
        match error {
            ReadError::TooLarge => Refusal {
                close: true,
                ..Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Outcome::Rejected,
                    "invalid_request_error",
                    format!("request body exceeds proxy.max_request_body_bytes ({max} bytes)"),
                )
            },
            ReadError::OverBudget => Refusal {
                close: true,
                ..Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    Outcome::Rejected,
                    "rate_limit_error",
                    "the proxy holds as many request bodies as proxy.body_budget_bytes allows; retry shortly",
                )
            },
            ReadError::Timeout => Refusal {
                close: true,
                ..Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    Outcome::Rejected,
                    "invalid_request_error",
                    "the request body stalled for longer than proxy.body_read_timeout_secs",
                )
            },
            ReadError::Client(error) if client_went_away(&*error) => Refusal::new(
                StatusCode::BAD_REQUEST,
                Outcome::ClientDisconnect,
                "invalid_request_error",
                "the client closed the connection mid-body",
            ),
            ReadError::Client(error) => Refusal {
                close: true,
                ..Refusal::new(
                    StatusCode::BAD_REQUEST,
                    Outcome::Rejected,
                    "invalid_request_error",
                    format!(
                        "could not read the request body: {}",
                        net::error_chain(&*error)
                    ),
                )
            },
        }
    }

    /// The upstream could not be reached or failed before its response head.
    pub fn upstream(error: &SendError) -> Refusal {
        let (status, outcome, kind, message) = if net::is_timeout(error) {
            (
                StatusCode::GATEWAY_TIMEOUT,
                Outcome::UpstreamTimeout,
                "upstream_timeout",
                "could not connect to the upstream within upstream.connect_timeout_secs".to_owned(),
            )
        } else {
            // What went wrong, without the address: a connect error's text names it, so only
            // the kind of its cause is told.
            let message = match error {
                SendError::Connect(_) => match io_kind(error) {
                    Some(kind) => format!("could not connect to the upstream: {kind}"),
                    None => "could not connect to the upstream".to_owned(),
                },
                SendError::Closed => {
                    "the upstream closed the connection before sending a response".to_owned()
                }
                SendError::Protocol(e) => {
                    format!("the upstream's response is not valid HTTP/1.1: {e}")
                }
                SendError::Io(e) => format!("the connection to the upstream failed: {}", e.kind()),
                SendError::Body(_) => "the connection to the upstream failed".to_owned(),
            };
            let (outcome, kind) = if matches!(error, SendError::Connect(_)) {
                (Outcome::ConnectError, "upstream_connect_error")
            } else {
                (Outcome::UpstreamDisconnect, "upstream_disconnect")
            };
            (StatusCode::BAD_GATEWAY, outcome, kind, message)
        };
        Refusal::new(status, outcome, kind, message)
    }

    /// No response head within `upstream.response_header_timeout_secs`.
    pub fn head_timeout(limit: Duration) -> Refusal {
        Refusal::new(
            StatusCode::GATEWAY_TIMEOUT,
            Outcome::UpstreamTimeout,
            "upstream_timeout",
            format!(
                "upstream sent no response head within {limit:?} (upstream.response_header_timeout_secs)"
            ),
        )
    }

    /// The answer.
    pub fn response(self) -> Response<ProxyBody> {
        let mut response = match self.as_upstream {
            Some(param) => json_error(self.status, self.kind, Some(param), &self.message),
            None => error_response(self.status, self.kind, &self.message),
        };
        let headers = response.headers_mut();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// The kind of the I/O error at the root of `error`, if one is there.
fn io_kind(error: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    std::iter::successors(Some(error), |e| e.source())
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .last()
        .map(std::io::Error::kind)
}

/// Whether a client body's error says the client went away (rather than sent something wrong).
fn client_went_away(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message() || h.is_canceled() || h.is_closed())
            || e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                )
            })
    })
}

/// An OpenAI-style error response: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_response(status: StatusCode, kind: &str, message: &str) -> Response<ProxyBody> {
    json_error(status, kind, None, &format!("tokentap: {message}"))
}

/// `{"error": {"message", "type", "param", "code"}}` with these words, as vLLM writes it.
fn json_error(
    status: StatusCode,
    kind: &str,
    param: Option<&str>,
    message: &str,
) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": status.as_u16(),
        }
    });
    let mut response = Response::new(ProxyBody::Full {
        body: Full::new(Bytes::from(body.to_string())),
    });
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
