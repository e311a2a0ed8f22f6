//! OpenTelemetry spans, checked end to end against OTLP receivers tokentap did not write: the
//! `fake-opentelemetry-collector` crate (OTLP/gRPC, in-process) and `oteltap` from PyPI
//! (OTLP/HTTP protobuf, a child process printing every span as OTLP JSON). The proxy runs
//! in-process in front of the simulator or of a small upstream that records the headers it got.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::otlp::{Oteltap, dead_endpoint};
use common::*;
use fake_opentelemetry_collector::{ExportedSpan, FakeCollectorServer};
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokentap::config::Config;
use tokentap::config::{Protocol, TracingConfig};
use tokio::time::Instant;

const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

// ---------------------------------------------------------------------------------------------
// A span as either receiver reports it.

#[derive(Clone, Debug, PartialEq)]
enum Val {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
    Strs(Vec<String>),
}

#[derive(Clone, Debug)]
struct Got {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    /// `SERVER`, `CLIENT`, ...
    kind: String,
    start: u64,
    end: u64,
    attrs: BTreeMap<String, Val>,
    events: Vec<(String, u64)>,
    /// `UNSET`, `OK`, `ERROR`.
    status: String,
}

impl Got {
    fn attr(&self, key: &str) -> &Val {
        self.attrs.get(key).unwrap_or_else(|| {
            panic!(
                "span {:?} has no attribute {key}: {:#?}",
                self.name, self.attrs
            )
        })
    }

    fn str(&self, key: &str) -> &str {
        match self.attr(key) {
            Val::Str(s) => s,
            other => panic!("{key} is {other:?}, not a string"),
        }
    }

    fn int(&self, key: &str) -> i64 {
        match self.attr(key) {
            Val::Int(i) => *i,
            other => panic!("{key} is {other:?}, not an int"),
        }
    }

    fn double(&self, key: &str) -> f64 {
        match self.attr(key) {
            Val::Double(d) => *d,
            other => panic!("{key} is {other:?}, not a double"),
        }
    }
}

/// The fake collector renders each attribute value as the `Debug` of the protobuf `AnyValue`.
fn parse_debug_value(s: &str) -> Val {
    let inner = s
        .strip_prefix("Some(AnyValue { value: Some(")
        .and_then(|s| s.strip_suffix(") })"))
        .unwrap_or_else(|| panic!("unexpected attribute rendering {s}"));
    if let Some(rest) = inner.strip_prefix("ArrayValue(") {
        let strs = rest
            .split("StringValue(")
            .skip(1)
            .map(|p| {
                let end = p.find("\")").expect("closing quote");
                serde_json::from_str::<String>(&p[..=end]).unwrap()
            })
            .collect();
        return Val::Strs(strs);
    }
    let (kind, value) = inner.split_once('(').expect("variant(value)");
    let value = value.strip_suffix(')').expect("closing paren");
    match kind {
        "StringValue" => Val::Str(serde_json::from_str(value).unwrap()),
        "IntValue" => Val::Int(value.parse().unwrap()),
        "DoubleValue" => Val::Double(value.parse().unwrap()),
        "BoolValue" => Val::Bool(value.parse().unwrap()),
        _ => panic!("unexpected attribute rendering {s}"),
    }
}

fn from_fake(s: ExportedSpan) -> Got {
    Got {
        trace_id: s.trace_id,
        span_id: s.span_id,
        parent_span_id: s.parent_span_id,
        name: s.name,
        kind: s.kind.trim_start_matches("SPAN_KIND_").to_owned(),
        start: s.start_time_unix_nano,
        end: s.end_time_unix_nano,
        attrs: s
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), parse_debug_value(v)))
            .collect(),
        events: s
            .events
            .iter()
            .map(|e| (e.name.clone(), e.time_unix_nano))
            .collect(),
        status: s.status.map_or("UNSET".to_owned(), |s| {
            s.code.trim_start_matches("STATUS_CODE_").to_owned()
        }),
    }
}

/// One span in the OTLP JSON encoding (what oteltap prints, one per line).
fn from_otlp_json(v: &serde_json::Value) -> Got {
    fn num(v: &serde_json::Value) -> u64 {
        match v {
            serde_json::Value::String(s) => s.parse().unwrap(),
            serde_json::Value::Number(n) => n.as_u64().unwrap(),
            _ => 0,
        }
    }
    fn val(v: &serde_json::Value) -> Val {
        if let Some(s) = v.get("stringValue") {
            Val::Str(s.as_str().unwrap().to_owned())
        } else if let Some(i) = v.get("intValue") {
            Val::Int(num(i) as i64)
        } else if let Some(d) = v.get("doubleValue") {
            Val::Double(d.as_f64().unwrap())
        } else if let Some(b) = v.get("boolValue") {
            Val::Bool(b.as_bool().unwrap())
        } else if let Some(a) = v.get("arrayValue") {
            Val::Strs(
                a["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["stringValue"].as_str().unwrap().to_owned())
                    .collect(),
            )
        } else {
            panic!("unexpected attribute value {v}")
        }
    }
    let kinds = [
        "UNSPECIFIED",
        "INTERNAL",
        "SERVER",
        "CLIENT",
        "PRODUCER",
        "CONSUMER",
    ];
    let codes = ["UNSET", "OK", "ERROR"];
    let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    Got {
        trace_id: s("traceId"),
        span_id: s("spanId"),
        parent_span_id: s("parentSpanId"),
        name: s("name"),
        kind: kinds[v["kind"].as_u64().unwrap_or(0) as usize].to_owned(),
        start: num(&v["startTimeUnixNano"]),
        end: num(&v["endTimeUnixNano"]),
        attrs: v["attributes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|kv| (kv["key"].as_str().unwrap().to_owned(), val(&kv["value"])))
                    .collect()
            })
            .unwrap_or_default(),
        events: v["events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["name"].as_str().unwrap().to_owned(),
                            num(&e["timeUnixNano"]),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        status: codes[v["status"]["code"].as_u64().unwrap_or(0) as usize].to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Receivers.

enum Receiver {
    Grpc(FakeCollectorServer),
    Http(Oteltap),
}

impl Receiver {
    async fn grpc() -> Receiver {
        Receiver::Grpc(FakeCollectorServer::start().await.expect("fake collector"))
    }

    /// oteltap on a free loopback port, or `None` (after printing why) when it is not installed
    /// and `TOKENTAP_REQUIRE_EXTERNAL` is not `1`.
    async fn http(test: &str) -> Option<Receiver> {
        Oteltap::start(test).await.map(Receiver::Http)
    }

    fn tracing(&self) -> TracingConfig {
        let (protocol, endpoint) = match self {
            Receiver::Grpc(server) => (Protocol::Grpc, server.endpoint()),
            Receiver::Http(oteltap) => (Protocol::HttpProtobuf, oteltap.endpoint()),
        };
        TracingConfig {
            enabled: true,
            protocol: Some(protocol),
            endpoint: Some(endpoint),
            service_name: Some("tokentap-test".to_owned()),
            scheduled_delay_ms: Some(20),
            timeout_secs: Some(5.0),
            ..TracingConfig::default()
        }
    }

    /// Every span received until `done` holds for the spans so far or `within` has passed.
    async fn collect(&mut self, within: Duration, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        loop {
            match self {
                Receiver::Grpc(server) => got.extend(
                    server
                        .exported_spans(0, Duration::ZERO)
                        .await
                        .into_iter()
                        .map(from_fake),
                ),
                Receiver::Http(oteltap) => {
                    while let Ok(line) = oteltap.lines.try_recv() {
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                            && v.get("traceId").is_some()
                        {
                            got.push(from_otlp_json(&v));
                        }
                    }
                }
            }
            if done(&got) || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The one span of trace `trace_id` (waits for it).
    async fn span_of(&mut self, seen: &mut Vec<Got>, trace_id: &str) -> Got {
        let find = |spans: &[Got]| spans.iter().find(|s| s.trace_id == trace_id).cloned();
        if let Some(s) = find(seen) {
            return s;
        }
        let more = self
            .collect(Duration::from_secs(15), |s| find(s).is_some())
            .await;
        seen.extend(more);
        find(seen).unwrap_or_else(|| panic!("no span of trace {trace_id} arrived; got {seen:#?}"))
    }

    async fn stop(self) {
        match self {
            Receiver::Grpc(server) => server.abort(),
            Receiver::Http(oteltap) => drop(oteltap),
        }
    }
}

fn traceparent(trace: &str, span: &str, flags: &str) -> String {
    format!("00-{trace}-{span}-{flags}")
}

/// A fresh random-looking trace id per request, so spans can be told apart.
fn trace_id(n: u32) -> String {
    format!(
        "{:032x}",
        0x5eed_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(n)
    )
}

// ---------------------------------------------------------------------------------------------
// Upstreams.

const SSE: &str = concat!(
    "data: {\"id\":\"chatcmpl-42\",\"object\":\"chat.completion.chunk\",\"model\":\"served-qwen\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
    "data: {\"id\":\"chatcmpl-42\",\"object\":\"chat.completion.chunk\",\"model\":\"served-qwen\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n",
    "data: {\"id\":\"chatcmpl-42\",\"object\":\"chat.completion.chunk\",\"model\":\"served-qwen\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"}}]}\n\n",
    "data: {\"id\":\"chatcmpl-42\",\"object\":\"chat.completion.chunk\",\"model\":\"served-qwen\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
    "data: {\"id\":\"chatcmpl-42\",\"object\":\"chat.completion.chunk\",\"model\":\"served-qwen\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"total_tokens\":15}}\n\n",
    "data: [DONE]\n\n",
);

type Seen = Arc<Mutex<Vec<HeaderMap>>>;

/// An upstream on 127.0.0.1:0 that records the headers of every POST and answers with `SSE`.
async fn recording_upstream() -> (std::net::SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let s = s.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move {
                        if req.method() == Method::POST {
                            s.lock().unwrap().push(req.headers().clone());
                        }
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(Full::new(Bytes::from_static(SSE.as_bytes())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn traced(upstream: &str, tracing: TracingConfig) -> Config {
    let mut c = proxy_config(upstream);
    c.telemetry.discover_models = false;
    c.tracing = tracing;
    c
}

async fn chat(proxy: std::net::SocketAddr, headers: &[(&str, &str)]) -> Reply {
    send(
        &client(),
        Method::POST,
        &format!("http://{proxy}/v1/chat/completions"),
        &chat_body(3, true, ""),
        headers,
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// The checks, run once per protocol.

/// A successful streamed chat: name, kind, every attribute, events, parent/child through
/// `traceparent`, and the `traceparent` the upstream received.
async fn check_success(rx: &mut Receiver) {
    let (addr, seen) = recording_upstream().await;
    let proxy = tokentap::start(traced(&format!("http://{addr}"), rx.tracing()))
        .await
        .unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let client_parent = traceparent(CLIENT_TRACE, CLIENT_SPAN, "01");
    let r = chat(
        proxy.addr(),
        &[
            ("traceparent", &client_parent),
            ("tracestate", "vendor=abc"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let root = chat(proxy.addr(), &[]).await;
    assert_eq!(root.status, 200);
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;

    let mut spans = Vec::new();
    let span = rx.span_of(&mut spans, CLIENT_TRACE).await;
    // The upstream got our span as its parent, in the client's trace, with the client's state.
    let upstream_headers = seen.lock().unwrap().clone();
    assert_eq!(upstream_headers.len(), 2);
    assert_eq!(
        upstream_headers[0]["traceparent"],
        traceparent(CLIENT_TRACE, &span.span_id, "01")
    );
    assert_eq!(upstream_headers[0]["tracestate"], "vendor=abc");

    assert_eq!(span.name, format!("chat {MODEL}"));
    assert_eq!(span.kind, "SERVER");
    assert_eq!(span.parent_span_id, CLIENT_SPAN);
    assert_ne!(span.span_id, CLIENT_SPAN);
    assert_eq!(span.status, "UNSET");
    assert!(before <= span.start && span.start <= span.end && span.end <= after);

    assert_eq!(span.str("gen_ai.operation.name"), "chat");
    assert_eq!(span.str("gen_ai.provider.name"), "vllm");
    assert_eq!(span.str("gen_ai.request.model"), MODEL);
    assert_eq!(span.attr("gen_ai.request.stream"), &Val::Bool(true));
    assert_eq!(span.int("gen_ai.request.max_tokens"), 3);
    assert_eq!(span.str("gen_ai.response.model"), "served-qwen");
    assert_eq!(span.str("gen_ai.response.id"), "chatcmpl-42");
    assert_eq!(span.int("gen_ai.usage.input_tokens"), 12);
    assert_eq!(span.int("gen_ai.usage.output_tokens"), 3);
    assert_eq!(
        span.attr("gen_ai.response.finish_reasons"),
        &Val::Strs(vec!["length".to_owned()])
    );
    assert_eq!(span.str("server.address"), "127.0.0.1");
    assert_eq!(span.int("server.port"), i64::from(addr.port()));
    assert_eq!(span.str("http.request.method"), "POST");
    assert_eq!(span.str("url.path"), "/v1/chat/completions");
    assert_eq!(span.int("http.response.status_code"), 200);
    assert!(!span.attrs.contains_key("error.type"));
    let ttft = span.double("tokentap.ttft_s");
    assert!(ttft >= 0.0 && ttft * 1e9 <= (span.end - span.start) as f64);
    assert_eq!(span.double("gen_ai.response.time_to_first_chunk"), ttft);
    let e2el = span.double("tokentap.e2el_s");
    assert!(e2el >= ttft);
    assert!(span.double("tokentap.ttfa_s") >= ttft);
    assert!(span.double("tokentap.tpot_s") >= 0.0);
    assert!(span.double("tokentap.itl_mean_s") >= 0.0);
    assert!(span.double("tokentap.itl_max_s") >= span.double("tokentap.itl_mean_s"));
    // Output events: the role chunk and the finish-only chunk are none.
    assert_eq!(span.int("tokentap.chunks"), 2);
    assert_eq!(span.str("tokentap.token_source"), "usage");
    assert_eq!(span.str("tokentap.outcome"), "ok");
    // One event at the first token and one at the first answer, inside the span; none per
    // chunk.
    let names: Vec<&str> = span.events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["gen_ai.first_token", "gen_ai.first_answer"]);
    for (name, at) in &span.events {
        assert!(
            span.start <= *at && *at <= span.end,
            "{name} at {at} outside {}..{}",
            span.start,
            span.end
        );
    }
    assert!(span.events[0].1 <= span.events[1].1);
    // The span starts when the request arrived: its first-token event is TTFT later.
    let first = (span.events[0].1 - span.start) as f64 / 1e9;
    assert!(
        (first - ttft).abs() < 0.002,
        "event at {first} s, ttft {ttft} s"
    );

    // Without an incoming traceparent the span is a root, and the upstream joins its trace.
    let parent = &upstream_headers[1]["traceparent"];
    let parent = parent.to_str().unwrap();
    let parts: Vec<&str> = parent.split('-').collect();
    assert_eq!(parts.len(), 4, "{parent}");
    let root_span = rx.span_of(&mut spans, parts[1]).await;
    assert_eq!(root_span.span_id, parts[2]);
    assert_eq!(parts[3], "01");
    assert_eq!(root_span.parent_span_id, "");
    assert!(upstream_headers[1].get("tracestate").is_none());

    // A route that is not an inference call is an `HTTP {method}` span without GenAI
    // attributes.
    let trace = trace_id(999);
    let tp = traceparent(&trace, CLIENT_SPAN, "01");
    let _ = send(
        &client(),
        Method::GET,
        &format!("http://{}/v1/models", proxy.addr()),
        "",
        &[("traceparent", &tp)],
    )
    .await;
    let other = rx.span_of(&mut spans, &trace).await;
    assert_eq!(other.name, "HTTP GET");
    assert_eq!(other.kind, "SERVER");
    assert_eq!(other.str("url.path"), "/v1/models");
    assert!(!other.attrs.contains_key("gen_ai.operation.name"));

    proxy.shutdown().await;
}

/// Each failure ends its span with `error.type` = the outcome and status ERROR.
async fn check_outcomes(rx: &mut Receiver) {
    // Decode steps far apart: on a busy runtime the simulator's steps must not run together,
    // or it aborts the connection before the tokens it wrote reach the proxy, and a span with
    // partial timings would have no first token to show.
    let sim = sim(exact_sim(5.0, 40.0)).await;
    let mut tracing = rx.tracing();
    tracing.provider_name = Some("sim".to_owned());
    let mut config = traced(&sim.base_url(), tracing.clone());
    config.upstream.idle_timeout_secs = 0.3;
    let proxy = tokentap::start(config).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let mut expected = Vec::new();
    let faults = [
        ("status=503", "upstream_status", 503),
        ("error_after=3", "inband_error", 200),
        ("disconnect_after=3", "upstream_disconnect", 200),
        ("stall_after=2,stall_ms=5000", "upstream_timeout", 200),
    ];
    for (n, (fault, outcome, status)) in faults.into_iter().enumerate() {
        let trace = trace_id(n as u32);
        let tp = traceparent(&trace, CLIENT_SPAN, "01");
        let req = Request::post(&url)
            .header("content-type", "application/json")
            .header("traceparent", &tp)
            .header("x-tokentap-sim-fault", fault)
            .body(Full::new(Bytes::from(chat_body(8, true, ""))))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        let _ = resp.into_body().collect().await;
        expected.push((trace, outcome, status));
    }

    // The client hangs up after a few chunks.
    let trace = trace_id(10);
    let req = Request::post(&url)
        .header("content-type", "application/json")
        .header("traceparent", traceparent(&trace, CLIENT_SPAN, "01"))
        .body(Full::new(Bytes::from(chat_body(10_000, true, ""))))
        .unwrap();
    let mut body = client().request(req).await.unwrap().into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    drop(body);
    expected.push((trace, "client_disconnect", 200));

    // An upstream nobody listens on.
    let dead = dead_endpoint().await;
    let refused = tokentap::start(traced(&dead, tracing)).await.unwrap();
    let trace = trace_id(11);
    let r = chat(
        refused.addr(),
        &[("traceparent", &traceparent(&trace, CLIENT_SPAN, "01"))],
    )
    .await;
    assert_eq!(r.status, 502);
    expected.push((trace, "connect_error", 502));

    let mut spans = Vec::new();
    for (trace, outcome, status) in &expected {
        let span = rx.span_of(&mut spans, trace).await;
        assert_eq!(span.name, format!("chat {MODEL}"), "{outcome}");
        assert_eq!(span.kind, "SERVER", "{outcome}");
        assert_eq!(span.parent_span_id, CLIENT_SPAN, "{outcome}");
        assert_eq!(span.status, "ERROR", "{outcome}");
        assert_eq!(span.str("error.type"), *outcome);
        assert_eq!(span.str("tokentap.outcome"), *outcome);
        assert_eq!(span.str("gen_ai.provider.name"), "sim");
        assert_eq!(
            span.int("http.response.status_code"),
            i64::from(*status),
            "{outcome}"
        );
        assert!(span.start <= span.end);
        // The server is the endpoint the request went to, even when it refused the connection.
        let url = if *outcome == "connect_error" {
            dead.clone()
        } else {
            sim.base_url()
        };
        let port: i64 = url.rsplit(':').next().unwrap().parse().unwrap();
        assert_eq!(span.int("server.port"), port, "{outcome}");
        if [
            "inband_error",
            "upstream_disconnect",
            "client_disconnect",
            "upstream_timeout",
        ]
        .contains(outcome)
        {
            assert!(
                span.double("tokentap.ttft_s") > 0.0,
                "{outcome}: partial timings"
            );
            assert!(
                span.events.iter().any(|(n, _)| n == "gen_ai.first_token"),
                "{outcome}"
            );
        }
    }
    refused.shutdown().await;
    proxy.shutdown().await;
    sim.shutdown().await;
}

/// With routes, a span names the replica that served its request (not the first one
/// configured), and a request no route serves names none.
#[tokio::test]
async fn spans_name_the_upstream_that_served() {
    let mut rx = Receiver::grpc().await;
    let (a, _) = recording_upstream().await;
    let (b, _) = recording_upstream().await;
    let mut config = Config::parse(&format!(
        "[[routes]]\nmodels = [\"{MODEL}\"]\nupstreams = [\"http://{a}\"]\n\
         [[routes]]\nmodels = [\"small\"]\nupstreams = [\"http://localhost:{}\"]\n",
        b.port()
    ))
    .unwrap();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.telemetry.discover_models = false;
    config.tracing = rx.tracing();
    let proxy = tokentap::start(config).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let cases = [(MODEL, 200), ("small", 200), ("nobody", 404)];
    for (n, (model, status)) in cases.iter().enumerate() {
        let body = chat_body(3, true, "").replace(MODEL, model);
        let parent = traceparent(&trace_id(700 + n as u32), CLIENT_SPAN, "01");
        let r = send(
            &client(),
            Method::POST,
            &url,
            &body,
            &[("traceparent", &parent)],
        )
        .await;
        assert_eq!(r.status, *status, "{model}");
    }
    let mut spans = Vec::new();
    let first = rx.span_of(&mut spans, &trace_id(700)).await;
    assert_eq!(first.str("server.address"), "127.0.0.1");
    assert_eq!(first.int("server.port"), i64::from(a.port()));
    assert!(!first.attrs.contains_key("network.peer.address"));
    // A name stays the name; the address it was resolved to is the peer.
    let second = rx.span_of(&mut spans, &trace_id(701)).await;
    assert_eq!(second.str("server.address"), "localhost");
    assert_eq!(second.int("server.port"), i64::from(b.port()));
    assert_eq!(second.str("network.peer.address"), "127.0.0.1");
    let refused = rx.span_of(&mut spans, &trace_id(702)).await;
    assert_eq!(refused.str("error.type"), "rejected");
    assert!(!refused.attrs.contains_key("server.address"), "{refused:?}");
    assert!(!refused.attrs.contains_key("server.port"), "{refused:?}");
    proxy.shutdown().await;
    rx.stop().await;
}

/// A collector that refuses connections, or accepts them and never answers: requests are as
/// fast as without tracing, spans are dropped and counted, and shutdown stays bounded.
async fn check_collector_down(protocol: Protocol, hanging: bool) {
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    if hanging {
        let held = held.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = collector.accept().await {
                held.lock().unwrap().push(s);
            }
        });
    } else {
        drop(collector);
    }
    let sim = sim(exact_sim(20.0, 5.0)).await;
    let tracing = TracingConfig {
        enabled: true,
        protocol: Some(protocol),
        endpoint: Some(endpoint),
        timeout_secs: Some(30.0),
        max_queue_size: Some(2),
        max_export_batch_size: Some(1),
        scheduled_delay_ms: Some(1),
        shutdown_timeout_secs: Some(0.5),
        ..TracingConfig::default()
    };
    let plain = tokentap::start(traced(&sim.base_url(), TracingConfig::default()))
        .await
        .unwrap();
    let proxy = tokentap::start(traced(&sim.base_url(), tracing))
        .await
        .unwrap();
    let mut slowest = [Duration::ZERO; 2];
    for _ in 0..12 {
        for (i, p) in [&plain, &proxy].into_iter().enumerate() {
            let t = Instant::now();
            let r = chat(p.addr(), &[]).await;
            assert_eq!(r.status, 200);
            slowest[i] = slowest[i].max(t.elapsed());
        }
    }
    // The simulator takes ~30 ms per request; an export blocking the request path would show
    // up as seconds (the export timeout is 30 s).
    assert!(
        slowest[1] < slowest[0] + Duration::from_millis(500),
        "traced {:?} vs plain {:?}",
        slowest[1],
        slowest[0]
    );
    let admin = proxy.admin_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let dropped = value(
            &scrape(admin).await,
            "tokentap_otel_spans_dropped_total",
            &[],
        );
        if dropped >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no span was counted as dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    proxy.shutdown().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
    plain.shutdown().await;
    sim.shutdown().await;
    if hanging {
        assert!(!held.lock().unwrap().is_empty(), "the exporter did try");
    }
}

// ---------------------------------------------------------------------------------------------
// OTLP/gRPC.

#[tokio::test]
async fn grpc_span_attributes_and_trace_context() {
    let mut rx = Receiver::grpc().await;
    check_success(&mut rx).await;
    rx.stop().await;
}

#[tokio::test]
async fn grpc_error_spans_for_each_outcome() {
    let mut rx = Receiver::grpc().await;
    check_outcomes(&mut rx).await;
    rx.stop().await;
}

#[tokio::test]
async fn grpc_collector_refusing_drops_and_counts() {
    check_collector_down(Protocol::Grpc, false).await;
}

#[tokio::test]
async fn grpc_collector_hanging_drops_and_counts() {
    check_collector_down(Protocol::Grpc, true).await;
}

/// Spans still queued at graceful shutdown are exported then.
#[tokio::test]
async fn spans_are_flushed_on_shutdown() {
    let mut rx = Receiver::grpc().await;
    let (addr, _) = recording_upstream().await;
    let mut tracing = rx.tracing();
    tracing.scheduled_delay_ms = Some(600_000);
    let proxy = tokentap::start(traced(&format!("http://{addr}"), tracing))
        .await
        .unwrap();
    let trace = trace_id(50);
    let r = chat(
        proxy.addr(),
        &[("traceparent", &traceparent(&trace, CLIENT_SPAN, "01"))],
    )
    .await;
    assert_eq!(r.status, 200);
    let early = rx
        .collect(Duration::from_millis(300), |s| !s.is_empty())
        .await;
    assert!(early.is_empty(), "the batch waits for its delay: {early:?}");
    proxy.shutdown().await;
    let mut spans = Vec::new();
    rx.span_of(&mut spans, &trace).await;
    rx.stop().await;
}

/// `sample_ratio = 0` records no new trace but follows a sampled parent; the upstream gets a
/// `traceparent` either way, with the sampled flag telling the decision.
#[tokio::test]
async fn parent_based_ratio_sampling() {
    let mut rx = Receiver::grpc().await;
    let (addr, seen) = recording_upstream().await;
    let mut tracing = rx.tracing();
    tracing.sample_ratio = Some(0.0);
    let proxy = tokentap::start(traced(&format!("http://{addr}"), tracing))
        .await
        .unwrap();
    assert_eq!(chat(proxy.addr(), &[]).await.status, 200);
    let unsampled_parent = traceparent(&trace_id(61), CLIENT_SPAN, "00");
    assert_eq!(
        chat(proxy.addr(), &[("traceparent", &unsampled_parent)])
            .await
            .status,
        200
    );
    let sampled = trace_id(60);
    let tp = traceparent(&sampled, CLIENT_SPAN, "01");
    assert_eq!(
        chat(proxy.addr(), &[("traceparent", &tp)]).await.status,
        200
    );
    let mut spans = Vec::new();
    rx.span_of(&mut spans, &sampled).await;
    spans.extend(rx.collect(Duration::from_millis(300), |_| false).await);
    assert_eq!(
        spans.len(),
        1,
        "only the sampled parent's child: {spans:#?}"
    );
    let headers = seen.lock().unwrap().clone();
    assert!(headers[0]["traceparent"].to_str().unwrap().ends_with("-00"));
    let second = headers[1]["traceparent"].to_str().unwrap();
    assert!(second.starts_with(&format!("00-{}-", trace_id(61))) && second.ends_with("-00"));
    assert!(headers[2]["traceparent"].to_str().unwrap().ends_with("-01"));
    proxy.shutdown().await;
    rx.stop().await;
}

/// `propagate = false`: the client's trace headers reach the upstream untouched (and none is
/// made up), while the span still continues the client's trace.
#[tokio::test]
async fn propagation_can_be_turned_off() {
    let mut rx = Receiver::grpc().await;
    let (addr, seen) = recording_upstream().await;
    let mut tracing = rx.tracing();
    tracing.propagate = false;
    let proxy = tokentap::start(traced(&format!("http://{addr}"), tracing))
        .await
        .unwrap();
    let tp = traceparent(CLIENT_TRACE, CLIENT_SPAN, "01");
    assert_eq!(
        chat(proxy.addr(), &[("traceparent", &tp)]).await.status,
        200
    );
    assert_eq!(chat(proxy.addr(), &[]).await.status, 200);
    let headers = seen.lock().unwrap().clone();
    assert_eq!(headers[0]["traceparent"], tp.as_str());
    assert!(headers[1].get("traceparent").is_none());
    let mut spans = Vec::new();
    let span = rx.span_of(&mut spans, CLIENT_TRACE).await;
    assert_eq!(span.parent_span_id, CLIENT_SPAN);
    proxy.shutdown().await;
    rx.stop().await;
}

// ---------------------------------------------------------------------------------------------
// OTLP/HTTP (protobuf).

#[tokio::test]
async fn http_span_attributes_and_trace_context() {
    let Some(mut rx) = Receiver::http("http_span_attributes_and_trace_context").await else {
        return;
    };
    check_success(&mut rx).await;
    rx.stop().await;
}

#[tokio::test]
async fn http_error_spans_for_each_outcome() {
    let Some(mut rx) = Receiver::http("http_error_spans_for_each_outcome").await else {
        return;
    };
    check_outcomes(&mut rx).await;
    rx.stop().await;
}

#[tokio::test]
async fn http_collector_refusing_drops_and_counts() {
    check_collector_down(Protocol::HttpProtobuf, false).await;
}

#[tokio::test]
async fn http_collector_hanging_drops_and_counts() {
    check_collector_down(Protocol::HttpProtobuf, true).await;
}

// ---------------------------------------------------------------------------------------------
// Configuration.

#[test]
fn tracing_section_parses() {
    let c: TracingConfig = toml::from_str(
        r#"
        enabled = true
        protocol = "http/protobuf"
        endpoint = "https://otel.example:4318"
        headers = { authorization = "Bearer x" }
        timeout_secs = 3.5
        service_name = "gateway"
        resource_attributes = { "deployment.environment.name" = "prod" }
        sample_ratio = 0.25
        propagate = false
        provider_name = "vllm"
        max_queue_size = 100
        max_export_batch_size = 10
        scheduled_delay_ms = 250
        shutdown_timeout_secs = 2
        "#,
    )
    .unwrap();
    assert!(c.enabled && !c.propagate);
    assert_eq!(c.protocol, Some(Protocol::HttpProtobuf));
    assert_eq!(c.headers["authorization"], "Bearer x");
    assert_eq!(c.sample_ratio, Some(0.25));
    let d: TracingConfig = toml::from_str("").unwrap();
    assert!(!d.enabled && d.propagate);
    assert!(toml::from_str::<TracingConfig>("endpoit = \"x\"").is_err());
    assert!(toml::from_str::<TracingConfig>("protocol = \"http/json\"").is_err());
}

#[tokio::test]
async fn tracing_off_builds_nothing_and_bad_settings_are_refused() {
    let c = Config::default();
    let telemetry = tokentap::telemetry::Telemetry::new(&c);
    let off = TracingConfig::default();
    assert!(
        tokentap::telemetry::otel::Tracer::new(&off, &telemetry)
            .unwrap()
            .is_none()
    );
    for bad in [
        TracingConfig {
            enabled: true,
            sample_ratio: Some(1.5),
            ..TracingConfig::default()
        },
        TracingConfig {
            enabled: true,
            max_queue_size: Some(0),
            ..TracingConfig::default()
        },
        TracingConfig {
            enabled: true,
            headers: [("bad header".to_owned(), "x".to_owned())].into(),
            ..TracingConfig::default()
        },
    ] {
        assert!(
            tokentap::telemetry::otel::Tracer::new(&bad, &telemetry).is_err(),
            "{bad:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The Responses and Messages APIs.

const RESPONSES_SSE: &str = concat!(
    "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_42\",\"model\":\"served-qwen\",\"status\":\"in_progress\"}}\n\n",
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"Hi\"}\n\n",
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":2,\"delta\":\"!\"}\n\n",
    "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":3,\"response\":{\"id\":\"resp_42\",\"model\":\"served-qwen\",\"status\":\"completed\",\"usage\":{\"input_tokens\":12,\"output_tokens\":2,\"total_tokens\":14}}}\n\n",
);

const MESSAGES_SSE: &str = concat!(
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_42\",\"type\":\"message\",\"model\":\"served-qwen\",\"usage\":{\"input_tokens\":9,\"output_tokens\":0}}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":1}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
);

/// An upstream that answers `/v1/responses` and `/v1/messages` with their streams.
async fn apis_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = match req.uri().path() {
                        "/v1/responses" => RESPONSES_SSE,
                        _ => MESSAGES_SSE,
                    };
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(Full::new(Bytes::from_static(body.as_bytes())))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Spans of Responses and Messages requests carry the GenAI attributes chat's do: the
/// operation, the response's id and model from the API's own events, and its usage.
#[tokio::test]
async fn grpc_spans_of_responses_and_messages() {
    let mut rx = Receiver::grpc().await;
    let addr = apis_upstream().await;
    let proxy = tokentap::start(traced(&format!("http://{addr}"), rx.tracing()))
        .await
        .unwrap();
    let cases = [
        (
            "/v1/responses",
            format!(r#"{{"model":"{MODEL}","input":"hi","max_output_tokens":7,"stream":true}}"#),
            "resp_42",
            (12, 2),
        ),
        (
            "/v1/messages",
            format!(
                r#"{{"model":"{MODEL}","max_tokens":7,"messages":[{{"role":"user","content":"hi"}}],"stream":true}}"#
            ),
            "msg_42",
            (9, 1),
        ),
    ];
    for (n, (path, body, _, _)) in cases.iter().enumerate() {
        let parent = traceparent(&trace_id(900 + n as u32), CLIENT_SPAN, "01");
        let r = send(
            &client(),
            Method::POST,
            &format!("http://{}{path}", proxy.addr()),
            body,
            &[("traceparent", &parent)],
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let mut spans = Vec::new();
    for (n, (path, _, id, (input, output))) in cases.iter().enumerate() {
        let span = rx.span_of(&mut spans, &trace_id(900 + n as u32)).await;
        assert_eq!(span.name, format!("chat {MODEL}"), "{path}");
        assert_eq!(span.str("gen_ai.operation.name"), "chat", "{path}");
        assert_eq!(span.str("gen_ai.request.model"), MODEL, "{path}");
        assert_eq!(span.int("gen_ai.request.max_tokens"), 7, "{path}");
        assert_eq!(
            span.attr("gen_ai.request.stream"),
            &Val::Bool(true),
            "{path}"
        );
        assert_eq!(span.str("gen_ai.response.id"), *id, "{path}");
        assert_eq!(span.str("gen_ai.response.model"), "served-qwen", "{path}");
        assert_eq!(span.int("gen_ai.usage.input_tokens"), *input, "{path}");
        assert_eq!(span.int("gen_ai.usage.output_tokens"), *output, "{path}");
    }
    proxy.shutdown().await;
    rx.stop().await;
}
