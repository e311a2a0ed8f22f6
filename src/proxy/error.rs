//! Answers the proxy writes itself: OpenAI-style error bodies, and which error an upstream
//! failure is.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use super::ProxyBody;
use crate::net;
use crate::telemetry::Outcome;
use crate::upstream::SendError;

pub(super) fn classify_client_error(error: &SendError) -> (StatusCode, Outcome, &'static str) {
    if net::is_timeout(error) {
        (
            StatusCode::GATEWAY_TIMEOUT,
            Outcome::UpstreamTimeout,
            "upstream_timeout",
        )
    } else if matches!(error, SendError::Connect(_)) {
        (
            StatusCode::BAD_GATEWAY,
            Outcome::ConnectError,
            "upstream_connect_error",
        )
    } else {
        (
            StatusCode::BAD_GATEWAY,
            Outcome::UpstreamDisconnect,
            "upstream_disconnect",
        )
    }
}

/// An OpenAI-style error response: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_response(status: StatusCode, kind: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": {
            "message": format!("tokentap: {message}"),
            "type": kind,
            "param": null,
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
