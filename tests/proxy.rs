//! The proxy end to end: an in-process simulator (or a purpose-built upstream) and proxy on
//! `127.0.0.1:0`, real HTTP in between.

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokentap::config::Config;

/// Every end-to-end header except those a server sets per connection or per moment.
fn end_to_end(h: &http::HeaderMap) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = h
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "date" | "transfer-encoding" | "connection" | "keep-alive"
            )
        })
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn clients_get_the_bytes_they_would_get_directly() {
    let sim = sim(exact_sim(5.0, 1.0)).await;
    let proxy = tokentap::start(proxy_config(&sim.base_url()))
        .await
        .unwrap();
    let direct = sim.base_url();
    let via = format!("http://{}", proxy.addr());
    let usage = r#","stream_options":{"include_usage":true}"#;
    let continuous = r#","stream_options":{"include_usage":true,"continuous_usage_stats":true}"#;
    let cases: Vec<(Method, &str, String)> = vec![
        (Method::POST, "/v1/chat/completions", chat_body(6, true, "")),
        (
            Method::POST,
            "/v1/chat/completions",
            chat_body(6, true, usage),
        ),
        (
            Method::POST,
            "/v1/chat/completions",
            chat_body(6, true, continuous),
        ),
        (
            Method::POST,
            "/v1/chat/completions",
            chat_body(6, true, r#","n":2"#),
        ),
        (
            Method::POST,
            "/v1/chat/completions",
            chat_body(6, false, ""),
        ),
        (
            Method::POST,
            "/v1/completions",
            completions_body(6, true, ""),
        ),
        (
            Method::POST,
            "/v1/completions",
            completions_body(6, true, usage),
        ),
        (
            Method::POST,
            "/v1/completions",
            completions_body(6, false, ""),
        ),
        (
            Method::POST,
            "/v1/embeddings",
            format!(r#"{{"model":"{MODEL}","input":"hi"}}"#),
        ),
        (Method::GET, "/v1/models", String::new()),
        (Method::GET, "/health", String::new()),
        (Method::GET, "/some/other/path?x=1", String::new()),
        // Not JSON: forwarded unchanged, and the upstream's 400 comes back unchanged.
        (Method::POST, "/v1/chat/completions", "{not json".to_owned()),
        (
            Method::POST,
            "/v1/chat/completions",
            chat_body(6, true, "").replace(MODEL, "no-such-model"),
        ),
    ];
    let c = client();
    for (method, path, body) in cases {
        let a = send(&c, method.clone(), &format!("{direct}{path}"), &body, &[]).await;
        let b = send(&c, method.clone(), &format!("{via}{path}"), &body, &[]).await;
        let what = format!("{method} {path} {body}");
        assert_eq!(a.status, b.status, "{what}");
        assert_eq!(
            String::from_utf8_lossy(&a.body),
            String::from_utf8_lossy(&b.body),
            "{what}"
        );
        assert_eq!(end_to_end(&a.headers), end_to_end(&b.headers), "{what}");
        if body.contains("\"stream\":true") && a.status == 200 {
            assert!(a.body.ends_with(b"data: [DONE]\n\n"), "{what}");
            let usage_event = String::from_utf8_lossy(&a.body).contains("\"choices\":[]");
            assert_eq!(body.contains("include_usage"), usage_event, "{what}");
        }
    }
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn http2_clients_get_the_same_bytes() {
    let sim = sim(exact_sim(5.0, 1.0)).await;
    let proxy = tokentap::start(proxy_config(&sim.base_url()))
        .await
        .unwrap();
    let h2: TestClient = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let body = chat_body(5, true, "");
    let direct = post(
        &client(),
        &format!("{}/v1/chat/completions", sim.base_url()),
        &body,
    )
    .await;
    let via = send(
        &h2,
        Method::POST,
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &body,
        &[],
    )
    .await;
    assert_eq!(via.status, 200);
    assert_eq!(direct.body, via.body);
    proxy.shutdown().await;
    sim.shutdown().await;
}

/// Token events in an SSE body.
fn token_events(body: &[u8]) -> usize {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter(|e| e.starts_with("data: {") && !e.contains("\"choices\":[]"))
        .count()
}

#[tokio::test(start_paused = true)]
async fn histograms_hold_exact_timings() {
    // TTFT 100 ms, then one token every 20 ms, on tokio's paused clock.
    let sim = sim(exact_sim(100.0, 20.0)).await;
    let proxy = tokentap::start(proxy_config(&sim.base_url()))
        .await
        .unwrap();
    let c = client();
    let via = format!("http://{}", proxy.addr());
    let r = post(
        &c,
        &format!("{via}/v1/chat/completions"),
        &chat_body(10, true, ""),
    )
    .await;
    assert_eq!(r.status, 200);
    let chunks = token_events(&r.body);
    let r = post(
        &c,
        &format!("{via}/v1/completions"),
        &completions_body(10, false, ""),
    )
    .await;
    assert_eq!(r.status, 200);

    let m = scrape(proxy.admin_addr().unwrap()).await;
    let chat = [("model", MODEL), ("endpoint", "chat")];
    let close = |name: &str, labels: &[(&str, &str)], want: f64| {
        let got = value(&m, name, labels);
        assert!(
            (got - want).abs() < 1e-9,
            "{name} {labels:?}: {got} != {want}"
        );
    };
    close("tokentap_time_to_first_token_seconds_count", &chat, 1.0);
    close("tokentap_time_to_first_token_seconds_sum", &chat, 0.100);
    close("tokentap_time_to_first_answer_seconds_sum", &chat, 0.100);
    // TTFT lands in the (0.08, 0.1] bucket.
    fn le(b: &str) -> [(&str, &str); 3] {
        [("model", MODEL), ("endpoint", "chat"), ("le", b)]
    }
    close(
        "tokentap_time_to_first_token_seconds_bucket",
        &le("0.08"),
        0.0,
    );
    close(
        "tokentap_time_to_first_token_seconds_bucket",
        &le("0.1"),
        1.0,
    );
    // One ITL sample per output event after the first (the role chunk, sent with the first
    // token, is none); the 9 decode steps add up to 180 ms.
    assert_eq!(chunks, 11, "the role chunk and 10 tokens");
    close("tokentap_inter_token_latency_seconds_count", &chat, 9.0);
    close("tokentap_inter_token_latency_seconds_sum", &chat, 0.180);
    // The largest gap of the request: one decode step.
    close("tokentap_max_inter_token_latency_seconds_count", &chat, 1.0);
    close("tokentap_max_inter_token_latency_seconds_sum", &chat, 0.020);
    // No reasoning: the answer starts with the first token, and no reasoning time.
    close("tokentap_reasoning_time_seconds_count", &chat, 0.0);
    // TPOT from usage tokens (injected by the proxy): (280 ms - 100 ms) / 9.
    close("tokentap_time_per_output_token_seconds_sum", &chat, 0.020);
    close("tokentap_e2e_request_latency_seconds_sum", &chat, 0.280);
    close("tokentap_request_generation_tokens_sum", &chat, 10.0);
    close("tokentap_generation_tokens_total", &chat, 10.0);
    close(
        "tokentap_requests_total",
        &[("endpoint", "chat"), ("outcome", "ok"), ("status", "200")],
        1.0,
    );
    close("tokentap_goodput_requests_total", &chat, 1.0);
    close("tokentap_requests_in_flight", &chat, 0.0);
    // Non-streaming: E2EL to the last byte, no TTFT, tokens from the body's usage.
    let cmpl = [("model", MODEL), ("endpoint", "completions")];
    close("tokentap_e2e_request_latency_seconds_sum", &cmpl, 0.280);
    close("tokentap_time_to_first_token_seconds_count", &cmpl, 0.0);
    close("tokentap_request_generation_tokens_sum", &cmpl, 10.0);
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn goodput_counts_only_requests_within_every_bound() {
    let sim = sim(exact_sim(100.0, 20.0)).await;
    let mut config = proxy_config(&sim.base_url());
    config.slo.ttft_ms = Some(150.0);
    config.slo.tpot_ms = Some(19.0);
    let proxy = tokentap::start(config).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    // One output token: no TPOT, so only the TTFT bound applies and it holds.
    assert_eq!(
        post(&client(), &url, &chat_body(1, true, "")).await.status,
        200
    );
    // TPOT is 20 ms > 19 ms: not good.
    assert_eq!(
        post(&client(), &url, &chat_body(5, true, "")).await.status,
        200
    );
    let m = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(
        value(
            &m,
            "tokentap_goodput_requests_total",
            &[("endpoint", "chat")]
        ),
        1.0
    );
    assert_eq!(
        value(&m, "tokentap_requests_total", &[("outcome", "ok")]),
        2.0
    );
    proxy.shutdown().await;
    sim.shutdown().await;
}

async fn outcome_of(
    fault: &str,
    config: impl FnOnce(&mut Config),
) -> (Result<Reply, String>, String) {
    let sim = sim(exact_sim(10.0, 10.0)).await;
    let mut c = proxy_config(&sim.base_url());
    config(&mut c);
    let proxy = tokentap::start(c).await.unwrap();
    let req = Request::post(format!("http://{}/v1/chat/completions", proxy.addr()))
        .header("content-type", "application/json")
        .header("x-tokentap-sim-fault", fault)
        .body(Full::new(Bytes::from(chat_body(8, true, ""))))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let reply = match body.collect().await {
        Ok(b) => Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: b.to_bytes(),
        }),
        Err(e) => Err(e.to_string()),
    };
    // The report is written when the body ends; give the server task a moment to run.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let m = scrape(proxy.admin_addr().unwrap()).await;
    proxy.shutdown().await;
    sim.shutdown().await;
    (reply, m)
}

fn openai_error(body: &[u8], code: u16) {
    let v: serde_json::Value = serde_json::from_slice(body).expect("error body is JSON");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    assert!(v["error"]["type"].is_string(), "{v}");
}

#[tokio::test]
async fn outcome_upstream_status() {
    let (reply, m) = outcome_of("status=503", |_| {}).await;
    let reply = reply.unwrap();
    assert_eq!(reply.status, 503);
    openai_error(&reply.body, 503);
    assert_eq!(requests_total(&m, "upstream_status", "503"), 1.0);
    assert_eq!(value(&m, "tokentap_goodput_requests_total", &[]), 0.0);
}

#[tokio::test]
async fn outcome_inband_error() {
    let (reply, m) = outcome_of("error_after=3", |_| {}).await;
    let reply = reply.unwrap();
    assert_eq!(reply.status, 200);
    assert!(String::from_utf8_lossy(&reply.body).contains("\"error\""));
    assert_eq!(requests_total(&m, "inband_error", "200"), 1.0);
}

#[tokio::test]
async fn outcome_upstream_disconnect() {
    let (reply, m) = outcome_of("disconnect_after=3", |_| {}).await;
    assert!(reply.is_err(), "the client sees the stream break off");
    assert_eq!(requests_total(&m, "upstream_disconnect", "200"), 1.0);
    // Partial timings are kept: TTFT was seen.
    assert_eq!(
        value(&m, "tokentap_time_to_first_token_seconds_count", &[]),
        1.0
    );
}

#[tokio::test]
async fn outcome_upstream_timeout_between_chunks() {
    let (reply, m) = outcome_of("stall_after=3,stall_ms=5000", |c| {
        c.upstream.idle_timeout_secs = 0.2
    })
    .await;
    assert!(reply.is_err(), "the stream is cut");
    assert_eq!(requests_total(&m, "upstream_timeout", "200"), 1.0);
}

#[tokio::test]
async fn outcome_upstream_timeout_waiting_for_headers() {
    let (reply, m) = outcome_of("header_delay_ms=5000", |c| {
        c.upstream.response_header_timeout_secs = 0.2
    })
    .await;
    let reply = reply.unwrap();
    assert_eq!(reply.status, 504);
    openai_error(&reply.body, 504);
    assert_eq!(requests_total(&m, "upstream_timeout", "504"), 1.0);
}

#[tokio::test]
async fn outcome_connect_error() {
    // A port that was just free: nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = proxy_config(&format!("http://{closed}"));
    config.telemetry.discover_models = false;
    let proxy = tokentap::start(config).await.unwrap();
    let r = post(
        &client(),
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &chat_body(3, true, ""),
    )
    .await;
    assert_eq!(r.status, 502);
    openai_error(&r.body, 502);
    let m = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(requests_total(&m, "connect_error", "502"), 1.0);
    assert_eq!(value(&m, "tokentap_upstream_ready", &[]), 0.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn oversized_request_body_gets_413() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let mut config = proxy_config(&sim.base_url());
    config.proxy.max_request_body_bytes = 64;
    let proxy = tokentap::start(config).await.unwrap();
    let r = post(
        &client(),
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &chat_body(3, true, ""),
    )
    .await;
    assert_eq!(r.status, 413);
    openai_error(&r.body, 413);
    assert_eq!(sim.stats().requests, 0, "nothing reached the upstream");
    let m = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(requests_total(&m, "rejected", "413"), 1.0);
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let sim = sim(exact_sim(10.0, 20.0)).await;
    let proxy = tokentap::start(proxy_config(&sim.base_url()))
        .await
        .unwrap();
    let req = Request::post(format!("http://{}/v1/chat/completions", proxy.addr()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat_body(10_000, true, ""))))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    // Read a few chunks, then hang up.
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    drop(body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.stats().cancelled == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the simulator never saw the cancel"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sim.stats().completed, 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let m = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(
        value(
            &m,
            "tokentap_requests_total",
            &[("outcome", "client_disconnect")]
        ),
        1.0
    );
    assert_eq!(value(&m, "tokentap_requests_in_flight", &[]), 0.0);
    assert!(
        value(&m, "tokentap_inter_token_latency_seconds_count", &[]) >= 1.0,
        "partial timings are kept"
    );
    proxy.shutdown().await;
    sim.shutdown().await;
}

/// Starts a one-route upstream on 127.0.0.1:0 that answers every request with `respond`.
async fn upstream<F, B>(respond: F) -> std::net::SocketAddr
where
    F: Fn(Request<Incoming>) -> Response<B> + Send + Sync + Clone + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let respond = respond.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let r = respond.clone();
                    async move { Ok::<_, Infallible>(r(req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An endless SSE body that counts the bytes it has produced.
struct Firehose {
    produced: Arc<AtomicU64>,
    event: Bytes,
}

impl Body for Firehose {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.produced
            .fetch_add(self.event.len() as u64, Ordering::Relaxed);
        Poll::Ready(Some(Ok(Frame::data(self.event.clone()))))
    }
}

#[tokio::test]
async fn a_slow_client_slows_the_upstream_instead_of_filling_memory() {
    let produced = Arc::new(AtomicU64::new(0));
    let mut event = b"data: ".to_vec();
    event.resize(64 * 1024, b'x');
    event.extend_from_slice(b"\n\n");
    let event = Bytes::from(event);
    let p = produced.clone();
    let addr = upstream(move |_req| {
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Firehose {
                produced: p.clone(),
                event: event.clone(),
            })
            .unwrap()
    })
    .await;
    let mut config = proxy_config(&format!("http://{addr}"));
    config.telemetry.discover_models = false;
    let proxy = tokentap::start(config).await.unwrap();
    let req = Request::post(format!("http://{}/v1/chat/completions", proxy.addr()))
        .body(Full::new(Bytes::from(chat_body(5, true, ""))))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    // The client stops reading. Without backpressure the upstream would be drained into
    // memory at loopback speed (gigabytes per second).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stalled = produced.load(Ordering::Relaxed);
    assert!(
        stalled < 64 * 1024 * 1024,
        "upstream produced {stalled} bytes for a client that reads nothing"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = produced.load(Ordering::Relaxed);
    assert!(
        later - stalled <= 2 * 64 * 1024 + 2,
        "the upstream kept being read: {stalled} -> {later}"
    );
    // Reading again resumes the flow.
    for _ in 0..200 {
        body.frame().await.unwrap().unwrap();
    }
    assert!(produced.load(Ordering::Relaxed) > later);
    drop(body);
    proxy.shutdown().await;
}

#[tokio::test]
async fn large_bodies_pass_both_ways_unchanged() {
    // An upstream that echoes the request body: several MiB cross the proxy in both
    // directions, in many reads, on an inspected endpoint (chat) and a passed-through one.
    let addr = upstream(|req: Request<Incoming>| {
        Response::builder()
            .header("content-type", "application/json")
            .body(req.into_body())
            .unwrap()
    })
    .await;
    let mut config = proxy_config(&format!("http://{addr}"));
    config.telemetry.discover_models = false;
    let proxy = tokentap::start(config).await.unwrap();
    let mut big = Vec::with_capacity(3 << 20);
    let mut x: u32 = 1;
    while big.len() < 3 << 20 {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        big.push(b'a' + (x >> 27) as u8 % 26);
    }
    for path in ["/v1/chat/completions", "/v1/embeddings"] {
        let r = post(
            &client(),
            &format!("http://{}{path}", proxy.addr()),
            std::str::from_utf8(&big).unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.body == big,
            "{path}: {} bytes back for {}",
            r.body.len(),
            big.len()
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn headers_are_cleaned_and_forwarded() {
    let seen = Arc::new(std::sync::Mutex::new(None::<(http::HeaderMap, Bytes)>));
    let s = seen.clone();
    let addr = upstream(move |req: Request<Incoming>| {
        let s = s.clone();
        let headers = req.headers().clone();
        let post = req.method() == Method::POST;
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            // The proxy's own GET /v1/models readiness polls are not the request under test.
            if post {
                *s.lock().unwrap() = Some((headers, body));
            }
            let _ = tx.send(());
        });
        drop(rx);
        Response::builder()
            .header("content-type", "application/json")
            .header("x-upstream", "yes")
            .header("connection", "x-hop")
            .header("x-hop", "drop me")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    })
    .await;
    let mut config = proxy_config(&format!("http://{addr}"));
    config.telemetry.discover_models = false;
    let proxy = tokentap::start(config).await.unwrap();
    let body = chat_body(3, true, "");
    let r = send(
        &client(),
        Method::POST,
        &format!("http://{}/v1/chat/completions?q=1", proxy.addr()),
        &body,
        &[
            ("authorization", "Bearer sk-secret"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("x-request-id", "req-42"),
            ("connection", "x-client-hop"),
            ("x-client-hop", "1"),
            ("proxy-authorization", "Basic abc"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-upstream"], "yes");
    assert!(
        r.headers.get("x-hop").is_none(),
        "a header named by Connection is hop-by-hop"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let (h, got) = loop {
        if let Some(v) = seen.lock().unwrap().clone() {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(h["host"], addr.to_string());
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["authorization"], "Bearer sk-secret");
    assert_eq!(
        h["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(h["x-request-id"], "req-42");
    assert!(h.get("x-client-hop").is_none());
    assert!(h.get("proxy-authorization").is_none());
    // Usage was asked for on the client's behalf; the rest of the body is byte for byte the same.
    let expected = body.replacen('{', r#"{"stream_options":{"include_usage":true},"#, 1);
    assert_eq!(String::from_utf8_lossy(&got), expected);
    assert_eq!(h["content-length"], expected.len().to_string());
    proxy.shutdown().await;
}

#[tokio::test]
async fn model_label_stays_bounded_under_made_up_names() {
    let sim = sim(exact_sim(0.0, 0.0)).await;
    let proxy = tokentap::start(proxy_config(&sim.base_url()))
        .await
        .unwrap();
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let c = client();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..20 {
        let (c, url) = (c.clone(), url.clone());
        tasks.spawn(async move {
            for i in 0..500 {
                let body = chat_body(1, false, "").replace(MODEL, &format!("made-up-{worker}-{i}"));
                let r = post(&c, &url, &body).await;
                assert_eq!(r.status, 404);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(post(&c, &url, &chat_body(1, false, "")).await.status, 200);
    let m = scrape(proxy.admin_addr().unwrap()).await;
    let mut models: Vec<String> = samples(&m)
        .into_iter()
        .flat_map(|s| s.labels)
        .filter(|(k, _)| k == "model")
        .map(|(_, v)| v)
        .collect();
    models.sort();
    models.dedup();
    assert_eq!(models, vec![MODEL.to_owned(), "other".to_owned()]);
    assert_eq!(
        value(
            &m,
            "tokentap_requests_total",
            &[("model", "other"), ("status", "404")]
        ),
        10_000.0
    );
    assert!(
        m.lines().count() < 2_000,
        "{} lines of metrics",
        m.lines().count()
    );
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn models_are_learned_from_the_upstream_and_readyz_follows_it() {
    let mut sc = exact_sim(1.0, 1.0);
    sc.models = vec!["served-a".to_owned(), "served-b".to_owned()];
    let sim = sim(sc).await;
    let mut config = proxy_config(&sim.base_url());
    config.telemetry.models = vec![];
    let proxy = tokentap::start(config).await.unwrap();
    let admin = proxy.admin_addr().unwrap();
    let c = client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while send(&c, Method::GET, &format!("http://{admin}/readyz"), "", &[])
        .await
        .status
        != 200
    {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let body = chat_body(2, true, "").replace(MODEL, "served-b");
    post(
        &c,
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &body,
    )
    .await;
    let m = scrape(admin).await;
    assert_eq!(
        value(
            &m,
            "tokentap_requests_total",
            &[("model", "served-b"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(value(&m, "tokentap_upstream_ready", &[]), 1.0);
    assert_eq!(
        send(&c, Method::GET, &format!("http://{admin}/healthz"), "", &[])
            .await
            .status,
        200
    );
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn metrics_pass_promtool_check() {
    let sim = sim(exact_sim(5.0, 2.0)).await;
    let proxy = tokentap::start(proxy_config(&sim.base_url()))
        .await
        .unwrap();
    let c = client();
    let via = format!("http://{}", proxy.addr());
    post(
        &c,
        &format!("{via}/v1/chat/completions"),
        &chat_body(
            4,
            true,
            r#","stream_options":{"include_usage":true,"continuous_usage_stats":true}"#,
        ),
    )
    .await;
    post(
        &c,
        &format!("{via}/v1/completions"),
        &completions_body(4, false, ""),
    )
    .await;
    send(&c, Method::GET, &format!("{via}/v1/models"), "", &[]).await;
    let m = scrape(proxy.admin_addr().unwrap()).await;
    for name in [
        "tokentap_time_to_first_token_seconds",
        "tokentap_time_to_first_answer_seconds",
        "tokentap_max_inter_token_latency_seconds",
        "tokentap_inter_token_latency_seconds",
        "tokentap_time_per_output_token_seconds",
        "tokentap_e2e_request_latency_seconds",
        "tokentap_request_prompt_tokens",
        "tokentap_request_generation_tokens",
        "tokentap_tokens_per_chunk",
        "tokentap_upstream_response_header_seconds",
        "tokentap_requests_total",
        "tokentap_goodput_requests_total",
        "tokentap_prompt_tokens_total",
        "tokentap_generation_tokens_total",
        "tokentap_requests_in_flight",
        "tokentap_upstream_ready",
    ] {
        assert!(
            m.contains(&format!("# HELP {name} ")),
            "{name} has a HELP line"
        );
    }
    // Continuous usage stats give one sample per token event that carried tokens.
    assert_eq!(
        value(&m, "tokentap_tokens_per_chunk_sum", &[("endpoint", "chat")]),
        4.0
    );
    proxy.shutdown().await;
    sim.shutdown().await;

    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match promtool {
        Ok(child) => child,
        Err(e) if !require_external() => {
            eprintln!("skipped: promtool not found ({e}); install Debian's prometheus package");
            return;
        }
        Err(e) => panic!("promtool is required (TOKENTAP_REQUIRE_EXTERNAL=1): {e}"),
    };
    use std::io::Write;
    child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn shutdown_lets_in_flight_streams_finish() {
    let sim = sim(exact_sim(10.0, 10.0)).await;
    let mut config = proxy_config(&sim.base_url());
    config.proxy.shutdown_grace_secs = 10.0;
    let proxy = tokentap::start(config).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let stream = tokio::spawn(async move { post(&client(), &url, &chat_body(50, true, "")).await });
    while sim.stats().streams_started == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let addr = proxy.addr();
    proxy.shutdown().await;
    let r = stream.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.body.ends_with(b"data: [DONE]\n\n"),
        "the stream ran to its end"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    sim.shutdown().await;
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut serving = Serving::start(&[
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--upstream",
        "http://127.0.0.1:9",
    ]);
    serving.signal("-TERM");
    let status = serving.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn check_config_names_the_bad_field() {
    let dir = std::env::temp_dir().join(format!("tokentap-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[upstream]\nidle_timeout_secs = -3\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokentap"))
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.idle_timeout_secs"));
    let good = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tokentap.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokentap"))
        .args(["check-config", good])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn outcome_upstream_timeout_on_connect() {
    // A listener whose accept queue is full and never drained: the kernel drops further SYNs,
    // so a connect to it hangs until the proxy's connect timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let mut config = proxy_config(&format!("http://{addr}"));
    config.telemetry.discover_models = false;
    config.upstream.connect_timeout_secs = 0.3;
    let proxy = tokentap::start(config).await.unwrap();
    let r = post(
        &client(),
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &chat_body(3, true, ""),
    )
    .await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    openai_error(&r.body, 504);
    let m = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(requests_total(&m, "upstream_timeout", "504"), 1.0);
    proxy.shutdown().await;
    drop((fillers, listener));
}

#[tokio::test(start_paused = true)]
async fn steady_chunks_keep_a_stream_alive_past_the_idle_timeout() {
    // One token every 100 ms for a second, with a 250 ms idle limit: never idle that long.
    let sim = sim(exact_sim(100.0, 100.0)).await;
    let mut config = proxy_config(&sim.base_url());
    config.upstream.idle_timeout_secs = 0.25;
    let proxy = tokentap::start(config).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let r = post(&client(), &url, &chat_body(10, true, "")).await;
    assert_eq!(r.status, 200);
    assert!(r.body.ends_with(b"data: [DONE]\n\n"));
    // A 300 ms stall mid-stream is too long.
    let req = Request::post(&url)
        .header("content-type", "application/json")
        .header("x-tokentap-sim-fault", "stall_after=5,stall_ms=300")
        .body(Full::new(Bytes::from(chat_body(10, true, ""))))
        .unwrap();
    let body = client()
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await;
    assert!(body.is_err(), "the stalled stream is cut");
    let m = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(
        value(&m, "tokentap_requests_total", &[("outcome", "ok")]),
        1.0
    );
    assert_eq!(requests_total(&m, "upstream_timeout", "200"), 1.0);
    proxy.shutdown().await;
    sim.shutdown().await;
}

/// Sends `raw` to `addr` over a fresh connection and reads one response; returns its head and
/// its decoded body.
async fn raw_exchange(addr: std::net::SocketAddr, raw: &[u8]) -> (http::response::Parts, Vec<u8>) {
    use tokentap::http1::{Decoder, Parsed, Step, parse_response_head};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(raw).await.unwrap();
    let (mut buf, mut head, mut body) = (Vec::new(), None, Vec::new());
    let mut chunk = [0u8; 4096];
    loop {
        let n = socket.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the proxy closed before the end of the response");
        buf.extend_from_slice(&chunk[..n]);
        if head.is_none()
            && let Parsed::Head(len, parsed) = parse_response_head(&buf, &Method::POST).unwrap()
        {
            buf.drain(..len);
            head = Some((parsed.parts, Decoder::new(parsed.framing)));
        }
        let Some((_, decoder)) = &mut head else {
            continue;
        };
        loop {
            let (step, used) = decoder.decode(&buf).unwrap();
            if let Step::Data { start, end } = step {
                body.extend_from_slice(&buf[start..end]);
            }
            buf.drain(..used);
            if !matches!(step, Step::Data { .. }) {
                break;
            }
        }
        if decoder.is_end() {
            return (head.unwrap().0, body);
        }
    }
}

#[tokio::test]
async fn a_chunked_request_body_streams_to_the_upstream_chunked() {
    let addr = upstream(|req: Request<Incoming>| {
        let te = req.headers().get("transfer-encoding").cloned();
        let mut response = Response::builder().header("content-type", "application/json");
        if let Some(te) = te {
            response = response.header("x-seen-transfer-encoding", te);
        }
        response.body(req.into_body()).unwrap()
    })
    .await;
    let raw = b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n";
    for telemetry in [true, false] {
        let mut config = proxy_config(&format!("http://{addr}"));
        config.telemetry.discover_models = false;
        config.proxy.telemetry_enabled = telemetry;
        let proxy = tokentap::start(config).await.unwrap();
        let (head, body) = raw_exchange(proxy.addr(), raw).await;
        assert_eq!(head.status, 200, "telemetry {telemetry}");
        assert_eq!(head.headers["x-seen-transfer-encoding"], "chunked");
        assert_eq!(body, b"hello world", "telemetry {telemetry}");
        proxy.shutdown().await;
    }
}

/// A raw upstream on 127.0.0.1:0 that answers every request with the `parts` of `reply`, 50 ms
/// apart.
async fn raw_upstream(reply: &'static [&'static [u8]]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                for part in reply {
                    if socket.write_all(part).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // Hold the connection open a moment: the proxy must not wait for more.
                tokio::time::sleep(Duration::from_millis(200)).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_malformed_upstream_response_is_a_502_or_a_cut_stream() {
    let bad_head = raw_upstream(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello"]).await;
    let bad_chunk = raw_upstream(&[
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
          9\r\ndata: x\n\n\r\n",
        b"zz\r\nnot a chunk\r\n",
    ])
    .await;
    let mut config = proxy_config(&format!("http://{bad_head}"));
    config.telemetry.discover_models = false;
    let proxy = tokentap::start(config).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let r = post(&client(), &url, &chat_body(4, true, "")).await;
    assert_eq!(r.status, 502);
    openai_error(&r.body, 502);
    assert!(
        String::from_utf8_lossy(&r.body).contains("Content-Length"),
        "the error says what was wrong: {:?}",
        r.body
    );
    proxy.shutdown().await;

    let mut config = proxy_config(&format!("http://{bad_chunk}"));
    config.telemetry.discover_models = false;
    let proxy = tokentap::start(config).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let req = Request::post(url)
        .body(Full::new(Bytes::from(chat_body(4, true, ""))))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "data: x\n\n", "the good chunk is forwarded");
    let rest = body.collect().await;
    assert!(rest.is_err(), "the stream is cut, not ended cleanly");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let m = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(requests_total(&m, "upstream_disconnect", "200"), 1.0);
    proxy.shutdown().await;
}
