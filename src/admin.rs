//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/stats` (`POST /-/reload` is answered
//! by the wiring in `app`, which owns the configuration file).

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
/// `?percentiles=90,99.9` picks the percentiles. `?tenant=NAME` gives one summary of that
/// tenant across models instead of one per model (`?tenant=*`: every tenant's); a name without
/// its own label is shown under the label it is counted in (`other`).
fn stats(telemetry: &Telemetry, query: &str) -> Response<Full<Bytes>> {
    let mut text = false;
    let mut percentiles = DEFAULT_PERCENTILES.to_vec();
    let mut tenant: Option<String> = None;
    for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match key {
            "format" => text = value == "text",
            "tenant" => match percent_decode(value) {
                Some(name) if name.len() <= 4 * crate::telemetry::MAX_TENANT_LEN => {
                    tenant = Some(name)
                }
                _ => return bad_request("tenant: a tenant name, or * for every tenant\n"),
            },
            "percentiles" => {
                let parsed: Option<Vec<f64>> = value
                    .split([',', '+', ' '])
                    .filter(|p| !p.is_empty())
                    .map(|p| p.parse::<f64>().ok().filter(|p| (0.0..=100.0).contains(p)))
                    .collect();
                match parsed {
                    Some(list) if !list.is_empty() && list.len() <= 16 => percentiles = list,
                    _ => {
                        return bad_request(
                            "percentiles: a comma-separated list of up to 16 numbers in 0..=100\n",
                        );
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(tenant) = tenant {
        return tenant_stats(telemetry, &tenant, &percentiles, text);
    }
    let report = telemetry
        .stats
        .report(tokio::time::Instant::now(), &percentiles);
    summaries(&report, "", report.window_s, &report.models, text)
}

/// `/stats?tenant=`: one summary per tenant across models.
fn tenant_stats(
    telemetry: &Telemetry,
    tenant: &str,
    percentiles: &[f64],
    text: bool,
) -> Response<Full<Bytes>> {
    let Some(labels) = &telemetry.tenants else {
        return bad_request("tenants are off: set telemetry.tenant_header\n");
    };
    // Looked up, never assigned: asking about a name does not give it a slot.
    let label = (tenant != "*").then(|| labels.lookup(tenant));
    let report =
        telemetry
            .stats
            .tenant_report(tokio::time::Instant::now(), percentiles, label.as_deref());
    summaries(&report, "tenant ", report.window_s, &report.tenants, text)
}

/// A `/stats` answer: `report` as JSON, or with `?format=text` one table per summary, each
/// titled `tokentap: {kind}{name}`.
fn summaries(
    report: &impl serde::Serialize,
    kind: &str,
    window_s: f64,
    by_name: &std::collections::BTreeMap<String, crate::report::ModelSummary>,
    text: bool,
) -> Response<Full<Bytes>> {
    let (content_type, body) = if text {
        let mut out = String::new();
        if by_name.is_empty() {
            out.push_str("no requests in the window yet\n");
        }
        for (name, summary) in by_name {
            out.push_str(&crate::report::render_table(
                &format!("tokentap: {kind}{name}, last {window_s:.0}s"),
                summary,
                &[],
                crate::report::ALL_METRICS,
            ));
        }
        ("text/plain; charset=utf-8", out)
    } else {
        (
            "application/json",
            serde_json::to_string_pretty(report).unwrap_or_default(),
        )
    };
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// A 400 answer that says what was wrong with the query.
fn bad_request(body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts are valid")
}

/// A query value with `%XX` escapes and `+` (a space) decoded; `None` when an escape is broken
/// or the result is not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(percent_decode("team%20a").as_deref(), Some("team a"));
        assert_eq!(percent_decode("a+b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("%2").as_deref(), None);
        assert_eq!(percent_decode("%zz").as_deref(), None);
        assert_eq!(percent_decode("%+f").as_deref(), None);
        assert_eq!(percent_decode("%ff").as_deref(), None);
        assert_eq!(percent_decode("*").as_deref(), Some("*"));
    }
}
