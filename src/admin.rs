//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/stats`.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;

use crate::telemetry::{Telemetry, openmetrics};

/// Answers one admin request. `/readyz` is ready while the upstreams answered within
/// `telemetry.ready_window_secs` and `live()` says some route has an endpoint that is not
/// ejected (one model's outage does not take the whole proxy out of its Service).
pub fn handle<B>(
    telemetry: &Arc<Telemetry>,
    req: &Request<B>,
    live: impl Fn() -> bool,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("static response parts are valid")
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            // OpenMetrics (with exemplars) for scrapers that prefer it, as Prometheus does.
            let om = openmetrics::wanted(req.headers().get(header::ACCEPT).map(|v| v.as_bytes()));
            Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    if om {
                        openmetrics::CONTENT_TYPE
                    } else {
                        openmetrics::TEXT_CONTENT_TYPE
                    },
                )
                .body(Full::new(Bytes::from(telemetry.render(om))))
                .expect("static response parts are valid")
        }
        "/stats" => stats(telemetry, req.uri().query().unwrap_or("")),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if !telemetry.upstream.ready() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream has not answered within telemetry.ready_window_secs\n",
        ),
        "/readyz" if !live() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "every upstream is ejected after failing (passive health)\n",
        ),
        "/readyz" => text(StatusCode::OK, "ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /stats, /healthz or /readyz\n",
        ),
    }
}

/// Percentiles `/stats` reports unless `?percentiles=` says otherwise.
pub const DEFAULT_PERCENTILES: &[f64] = &[50.0, 90.0, 99.0];

/// `/stats`: JSON by default, the `vllm bench serve` table with `?format=text`;
/// `?percentiles=90,99.9` picks the percentiles.
fn stats(telemetry: &Telemetry, query: &str) -> Response<Full<Bytes>> {
    let mut text = false;
    let mut percentiles = DEFAULT_PERCENTILES.to_vec();
    for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match key {
            "format" => text = value == "text",
            "percentiles" => {
                let parsed: Option<Vec<f64>> = value
                    .split([',', '+', ' '])
                    .filter(|p| !p.is_empty())
                    .map(|p| p.parse::<f64>().ok().filter(|p| (0.0..=100.0).contains(p)))
                    .collect();
                match parsed {
                    Some(list) if !list.is_empty() && list.len() <= 16 => percentiles = list,
                    _ => {
                        return Response::builder()
                            .status(StatusCode::BAD_REQUEST)
                            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                            .body(Full::new(Bytes::from_static(
                                b"percentiles: a comma-separated list of up to 16 numbers in 0..=100\n",
                            )))
                            .expect("static response parts are valid");
                    }
                }
            }
            _ => {}
        }
    }
    let report = telemetry
        .stats
        .report(tokio::time::Instant::now(), &percentiles);
    let (content_type, body) = if text {
        let mut out = String::new();
        if report.models.is_empty() {
            out.push_str("no requests in the window yet\n");
        }
        for (model, summary) in &report.models {
            out.push_str(&crate::report::render_table(
                &format!("tokentap: {model}, last {:.0}s", report.window_s),
                summary,
                &[],
                crate::report::ALL_METRICS,
            ));
        }
        ("text/plain; charset=utf-8", out)
    } else {
        (
            "application/json",
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        )
    };
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
