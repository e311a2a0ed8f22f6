use super::forward::{HOP_BY_HOP, push_ip};
use super::*;
use http::StatusCode;
use http::header::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use std::net::IpAddr;

#[test]
fn hop_by_hop_headers_and_connection_named_ones_go() {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, x-secret-hop"),
    );
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert("x-secret-hop", HeaderValue::from_static("1"));
    h.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert("traceparent", HeaderValue::from_static("00-abc-def-01"));
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
    strip_hop_by_hop(&mut h);
    let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    assert_eq!(left, vec!["traceparent", "authorization"]);
}

#[test]
fn each_hop_by_hop_header_goes_when_it_is_the_only_one() {
    assert_eq!(HOP_BY_HOP[0], header::CONNECTION, "bit 0 is Connection's");
    for name in &HOP_BY_HOP {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static("00-abc-def-01"));
        h.insert(name.clone(), HeaderValue::from_static("x"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["traceparent"], "{name} stays");
    }
    let mut h = HeaderMap::new();
    h.insert("x-request-id", HeaderValue::from_static("r1"));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    strip_hop_by_hop(&mut h);
    assert_eq!(h.len(), 2);
}

#[test]
fn forwarded_for_appends() {
    let mut h = HeaderMap::new();
    h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
    h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    add_forwarded(&mut h, "127.0.0.2:5000".parse().unwrap());
    assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
    assert_eq!(h["x-forwarded-proto"], "https");
}

#[test]
fn ip_text_matches_display() {
    for ip in [
        "0.0.0.0",
        "9.10.99.100",
        "127.0.0.1",
        "255.254.200.1",
        "::1",
        "2001:db8::8a2e:370:7334",
    ] {
        let ip: IpAddr = ip.parse().unwrap();
        let mut out = Vec::new();
        push_ip(ip, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
    }
}

#[test]
fn error_body_is_openai_shaped() {
    let r = error_response(StatusCode::BAD_GATEWAY, "upstream_connect_error", "refused");
    assert_eq!(r.status(), 502);
    let ProxyBody::Full { body } = r.into_body() else {
        panic!("a proxy-written body")
    };
    let bytes = futures_lite_collect(body);
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["error"]["code"], 502);
    assert_eq!(v["error"]["type"], "upstream_connect_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("refused"));
}

fn futures_lite_collect(body: Full<Bytes>) -> Bytes {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        body.collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default()
    })
}
