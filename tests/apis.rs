//! The Responses and Messages APIs through the proxy: a scripted upstream on `127.0.0.1:0` sends
//! each event after a set delay on tokio's paused clock, so every figure is exact; the client
//! gets the upstream's bytes unchanged and the upstream gets the client's request unchanged.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::time::Sleep;

const MS: Duration = Duration::from_millis(1);

/// An upstream body that hands on each step's bytes after its delay, then ends cleanly or,
/// with `cut`, breaks off.
struct Script {
    steps: VecDeque<(Duration, Bytes)>,
    sleep: Option<Pin<Box<Sleep>>>,
    cut: bool,
}

impl Body for Script {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let Some((delay, _)) = self.steps.front() else {
            return Poll::Ready(self.cut.then(|| Err(std::io::Error::other("cut"))));
        };
        let delay = *delay;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.sleep = None;
        let (_, bytes) = self.steps.pop_front().expect("a step is there");
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }
}

/// What the scripted upstream answers and what it was asked.
#[derive(Clone)]
struct Scripted {
    content_type: &'static str,
    steps: Vec<(Duration, String)>,
    cut: bool,
    seen: Arc<Mutex<Vec<(String, Bytes)>>>,
}

impl Scripted {
    fn new(content_type: &'static str, steps: Vec<(Duration, String)>) -> Self {
        Scripted {
            content_type,
            steps,
            cut: false,
            seen: Arc::default(),
        }
    }

    /// The bytes of the whole answer.
    fn body(&self) -> String {
        self.steps.iter().map(|(_, s)| s.as_str()).collect()
    }

    async fn start(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let me = me.clone();
                            async move {
                                let path = req.uri().path().to_owned();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                if path != "/v1/models" {
                                    // The proxy's own poller asks too; it is not the client.
                                    me.seen.lock().unwrap().push((path, body));
                                }
                                let body = Script {
                                    steps: me
                                        .steps
                                        .iter()
                                        .map(|(d, s)| (*d, Bytes::from(s.clone())))
                                        .collect(),
                                    sleep: None,
                                    cut: me.cut,
                                };
                                Ok::<_, Infallible>(
                                    Response::builder()
                                        .header("content-type", me.content_type)
                                        .body(body)
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
        addr
    }
}

fn sse(name: &str, data: &str) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// A Responses stream as vLLM sends it: reasoning, then text, then `response.completed`.
fn responses_stream() -> Vec<(Duration, String)> {
    let delta = |kind: &str, d: &str| {
        sse(
            &format!("response.{kind}.delta"),
            &format!(
                r#"{{"type":"response.{kind}.delta","sequence_number":0,"item_id":"x","output_index":0,"content_index":0,"delta":"{d}"}}"#
            ),
        )
    };
    vec![
        (
            30 * MS,
            sse(
                "response.created",
                &format!(
                    r#"{{"type":"response.created","sequence_number":0,"response":{{"id":"resp_1","model":"{MODEL}","status":"in_progress","usage":null}}}}"#
                ),
            ) + &sse(
                "response.in_progress",
                r#"{"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_1"}}"#,
            ),
        ),
        (
            Duration::ZERO,
            sse(
                "response.output_item.added",
                r#"{"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"type":"reasoning"}}"#,
            ),
        ),
        (70 * MS, delta("reasoning_text", "Hmm")),
        (10 * MS, delta("reasoning_text", ", so")),
        (
            5 * MS,
            sse(
                "response.reasoning_text.done",
                r#"{"type":"response.reasoning_text.done","sequence_number":5,"text":"Hmm, so"}"#,
            ) + &sse(
                "response.output_item.added",
                r#"{"type":"response.output_item.added","sequence_number":6,"output_index":1,"item":{"type":"message"}}"#,
            ),
        ),
        (15 * MS, delta("output_text", "Hi")),
        (20 * MS, delta("output_text", " there")),
        (
            20 * MS,
            sse(
                "response.output_text.done",
                r#"{"type":"response.output_text.done","sequence_number":9,"text":"Hi there"}"#,
            ),
        ),
        (
            5 * MS,
            sse(
                "response.completed",
                &format!(
                    r#"{{"type":"response.completed","sequence_number":10,"response":{{"id":"resp_1","model":"{MODEL}","status":"completed","usage":{{"input_tokens":12,"input_tokens_details":{{"cached_tokens":0}},"output_tokens":5,"output_tokens_details":{{"reasoning_tokens":3}},"total_tokens":17}}}}}}"#
                ),
            ),
        ),
    ]
}

/// A Messages stream as vLLM sends it: thinking, then text, with a ping in between.
fn messages_stream() -> Vec<(Duration, String)> {
    let delta = |index: u32, kind: &str, field: &str, d: &str| {
        sse(
            "content_block_delta",
            &format!(
                r#"{{"index":{index},"type":"content_block_delta","delta":{{"type":"{kind}","{field}":"{d}"}}}}"#
            ),
        )
    };
    vec![
        (
            40 * MS,
            sse(
                "message_start",
                &format!(
                    r#"{{"type":"message_start","message":{{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"{MODEL}","stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":9,"output_tokens":0}}}}}}"#
                ),
            ),
        ),
        (10 * MS, sse("ping", r#"{"type":"ping"}"#)),
        (
            50 * MS,
            sse(
                "content_block_start",
                r#"{"index":0,"type":"content_block_start","content_block":{"type":"thinking","thinking":""}}"#,
            ) + &delta(0, "thinking_delta", "thinking", "Let"),
        ),
        (25 * MS, delta(0, "thinking_delta", "thinking", " me")),
        (
            5 * MS,
            delta(0, "signature_delta", "signature", "a1b2")
                + &sse(
                    "content_block_stop",
                    r#"{"index":0,"type":"content_block_stop"}"#,
                )
                + &sse(
                    "content_block_start",
                    r#"{"index":1,"type":"content_block_start","content_block":{"type":"text","text":""}}"#,
                ),
        ),
        (20 * MS, delta(1, "text_delta", "text", "Hi")),
        (25 * MS, delta(1, "text_delta", "text", "!")),
        (
            10 * MS,
            sse(
                "content_block_stop",
                r#"{"index":1,"type":"content_block_stop"}"#,
            ) + &sse(
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":9,"output_tokens":4}}"#,
            ),
        ),
        (MS, sse("message_stop", r#"{"type":"message_stop"}"#)),
    ]
}

fn responses_request(stream: bool) -> String {
    format!(
        r#"{{"model":"{MODEL}","input":"Tell me about proxies","max_output_tokens":16,"stream":{stream}}}"#
    )
}

fn messages_request(stream: bool) -> String {
    format!(
        r#"{{"model":"{MODEL}","max_tokens":16,"messages":[{{"role":"user","content":"Tell me about proxies"}}],"stream":{stream}}}"#
    )
}

/// Sends `request` to `path` through a proxy in front of `upstream`; returns the reply, the
/// metrics afterwards, and what the upstream was asked.
async fn through(
    upstream: &Scripted,
    path: &str,
    request: &str,
) -> (Result<Reply, String>, String) {
    through_logged(upstream, path, request, None).await
}

/// [`through`], with the access log on when the request is sent with `request_id`.
async fn through_logged(
    upstream: &Scripted,
    path: &str,
    request: &str,
    request_id: Option<&str>,
) -> (Result<Reply, String>, String) {
    let addr = upstream.start().await;
    let mut config = proxy_config(&format!("http://{addr}"));
    config.telemetry.access_log = request_id.is_some();
    let proxy = tokentap::start(config).await.unwrap();
    let mut req = Request::post(format!("http://{}{path}", proxy.addr()))
        .header("content-type", "application/json");
    if let Some(id) = request_id {
        req = req.header("x-request-id", id);
    }
    let req = req
        .body(Full::new(Bytes::from(request.to_owned())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let reply = match body.collect().await {
        Ok(b) => Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: b.to_bytes(),
        }),
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            Err(text)
        }
    };
    tokio::time::sleep(50 * MS).await;
    let m = scrape(proxy.admin_addr().unwrap()).await;
    proxy.shutdown().await;
    (reply, m)
}

fn close(m: &str, name: &str, labels: &[(&str, &str)], want: f64) {
    let got = value(m, name, labels);
    assert!(
        (got - want).abs() < 1e-9,
        "{name} {labels:?}: {got} != {want}"
    );
}

#[tokio::test(start_paused = true)]
async fn responses_stream_exact_figures_and_bytes() {
    let up = Scripted::new("text/event-stream", responses_stream());
    let request = responses_request(true);
    let (reply, m) = through(&up, "/v1/responses", &request).await;
    let reply = reply.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.body,
        up.body(),
        "the stream reaches the client unchanged"
    );
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![("/v1/responses".to_owned(), Bytes::from(request))],
        "the request reaches the upstream unchanged: no stream_options"
    );
    let l = [("model", MODEL), ("endpoint", "responses")];
    // Output events at 100 (first reasoning), 110, 130 (first text), 150 ms.
    close(&m, "tokentap_time_to_first_token_seconds_count", &l, 1.0);
    close(&m, "tokentap_time_to_first_token_seconds_sum", &l, 0.100);
    // ITL: 10, then 20 across the bookkeeping events (they reset nothing), then 20.
    close(&m, "tokentap_inter_token_latency_seconds_count", &l, 3.0);
    close(&m, "tokentap_inter_token_latency_seconds_sum", &l, 0.050);
    // E2EL at the last output event, not at `response.completed` 25 ms later.
    close(&m, "tokentap_e2e_request_latency_seconds_sum", &l, 0.150);
    // Five tokens from usage: TPOT (150 - 100) / 4.
    close(&m, "tokentap_request_generation_tokens_sum", &l, 5.0);
    close(&m, "tokentap_request_prompt_tokens_sum", &l, 12.0);
    close(&m, "tokentap_time_per_output_token_seconds_sum", &l, 0.0125);
    close(
        &m,
        "tokentap_requests_total",
        &[
            ("endpoint", "responses"),
            ("outcome", "ok"),
            ("status", "200"),
        ],
        1.0,
    );
    close(&m, "tokentap_goodput_requests_total", &l, 1.0);
    close(&m, "tokentap_sse_unrecognized_events_total", &l, 0.0);
}

#[tokio::test(start_paused = true)]
async fn messages_stream_exact_figures_and_bytes() {
    let up = Scripted::new("text/event-stream", messages_stream());
    let request = messages_request(true);
    let (reply, m) = through(&up, "/v1/messages", &request).await;
    let reply = reply.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.body,
        up.body(),
        "the stream reaches the client unchanged"
    );
    assert_eq!(up.seen.lock().unwrap()[0].1, Bytes::from(request));
    let l = [("model", MODEL), ("endpoint", "messages")];
    // Output events at 100 (first thinking), 125, 150 (first text), 175 ms.
    close(&m, "tokentap_time_to_first_token_seconds_sum", &l, 0.100);
    close(&m, "tokentap_inter_token_latency_seconds_count", &l, 3.0);
    close(&m, "tokentap_inter_token_latency_seconds_sum", &l, 0.075);
    close(&m, "tokentap_e2e_request_latency_seconds_sum", &l, 0.175);
    close(&m, "tokentap_request_generation_tokens_sum", &l, 4.0);
    close(&m, "tokentap_request_prompt_tokens_sum", &l, 9.0);
    close(&m, "tokentap_time_per_output_token_seconds_sum", &l, 0.025);
    close(
        &m,
        "tokentap_requests_total",
        &[
            ("endpoint", "messages"),
            ("outcome", "ok"),
            ("status", "200"),
        ],
        1.0,
    );
    close(&m, "tokentap_sse_unrecognized_events_total", &l, 0.0);
}

#[tokio::test(start_paused = true)]
async fn non_streaming_bodies_give_e2el_and_usage() {
    let cases = [
        (
            "/v1/responses",
            "responses",
            responses_request(false),
            format!(
                r#"{{"id":"resp_2","object":"response","model":"{MODEL}","status":"completed","output":[{{"type":"message","content":[{{"type":"output_text","text":"Hi"}}]}}],"usage":{{"input_tokens":7,"output_tokens":11,"total_tokens":18}}}}"#
            ),
        ),
        (
            "/v1/messages",
            "messages",
            messages_request(false),
            format!(
                r#"{{"id":"msg_2","type":"message","role":"assistant","model":"{MODEL}","content":[{{"type":"text","text":"Hi"}}],"stop_reason":"end_turn","usage":{{"input_tokens":7,"output_tokens":11}}}}"#
            ),
        ),
    ];
    for (path, endpoint, request, body) in cases {
        let (head, tail) = body.split_at(body.len() / 2);
        let up = Scripted::new(
            "application/json",
            vec![(60 * MS, head.to_owned()), (40 * MS, tail.to_owned())],
        );
        let (reply, m) = through(&up, path, &request).await;
        let reply = reply.unwrap();
        assert_eq!(reply.body, body, "{endpoint}");
        let l = [("model", MODEL), ("endpoint", endpoint)];
        close(&m, "tokentap_e2e_request_latency_seconds_sum", &l, 0.100);
        close(&m, "tokentap_time_to_first_token_seconds_count", &l, 0.0);
        close(&m, "tokentap_request_generation_tokens_sum", &l, 11.0);
        close(&m, "tokentap_request_prompt_tokens_sum", &l, 7.0);
        close(
            &m,
            "tokentap_requests_total",
            &[("endpoint", endpoint), ("outcome", "ok")],
            1.0,
        );
    }
}

#[tokio::test(start_paused = true)]
async fn in_band_errors_are_their_outcome() {
    let responses = vec![
        (
            20 * MS,
            sse(
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta","delta":"a"}"#,
            ),
        ),
        (
            20 * MS,
            sse(
                "error",
                r#"{"type":"error","code":"server_error","message":"engine died"}"#,
            ),
        ),
    ];
    let messages = vec![
        (
            20 * MS,
            sse(
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"}}"#,
            ),
        ),
        (
            20 * MS,
            sse(
                "error",
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ),
        ),
    ];
    for (path, endpoint, steps, request) in [
        (
            "/v1/responses",
            "responses",
            responses,
            responses_request(true),
        ),
        ("/v1/messages", "messages", messages, messages_request(true)),
    ] {
        let up = Scripted::new("text/event-stream", steps);
        let (reply, m) = through(&up, path, &request).await;
        assert_eq!(reply.unwrap().body, up.body());
        let l = [
            ("endpoint", endpoint),
            ("outcome", "inband_error"),
            ("status", "200"),
        ];
        close(&m, "tokentap_requests_total", &l, 1.0);
        close(
            &m,
            "tokentap_goodput_requests_total",
            &[("endpoint", endpoint)],
            0.0,
        );
        let l = [("model", MODEL), ("endpoint", endpoint)];
        close(&m, "tokentap_time_to_first_token_seconds_sum", &l, 0.020);
    }
}

#[tokio::test(start_paused = true)]
async fn a_cut_stream_is_an_upstream_disconnect_with_partial_timings() {
    let mut steps = messages_stream();
    steps.truncate(6);
    // Half an event, then the connection breaks.
    steps.push((
        10 * MS,
        "event: content_block_delta\ndata: {\"type\":\"content_bl".to_owned(),
    ));
    let mut up = Scripted::new("text/event-stream", steps);
    up.cut = true;
    let (reply, m) = through(&up, "/v1/messages", &messages_request(true)).await;
    assert!(reply.is_err(), "the client sees the stream break off");
    close(
        &m,
        "tokentap_requests_total",
        &[("endpoint", "messages"), ("outcome", "upstream_disconnect")],
        1.0,
    );
    let l = [("model", MODEL), ("endpoint", "messages")];
    close(&m, "tokentap_time_to_first_token_seconds_sum", &l, 0.100);
    close(&m, "tokentap_inter_token_latency_seconds_sum", &l, 0.050);
    // Only requests that ended well have an E2EL.
    close(&m, "tokentap_e2e_request_latency_seconds_count", &l, 0.0);
    // No message_delta: the three output events are the count.
    close(&m, "tokentap_generation_tokens_total", &l, 3.0);
}

/// The simulator serves both APIs with its chat timing model: through the proxy, TTFT is the
/// model's 100 ms and every token 20 ms after the one before, for either API, and the client
/// gets the bytes it would get directly.
#[tokio::test(start_paused = true)]
async fn the_simulator_serves_both_apis_with_its_timing_model() {
    let sim = sim(exact_sim(100.0, 20.0)).await;
    let proxy = tokentap::start(proxy_config(&sim.base_url()))
        .await
        .unwrap();
    let c = client();
    let via = format!("http://{}", proxy.addr());
    let responses = format!(
        r#"{{"model":"{MODEL}","input":"Tell me about proxies","max_output_tokens":5,"stream":true}}"#
    );
    let messages = format!(
        r#"{{"model":"{MODEL}","max_tokens":5,"messages":[{{"role":"user","content":"Tell me about proxies"}}],"stream":true}}"#
    );
    for (path, body, endpoint) in [
        ("/v1/responses", &responses, "responses"),
        ("/v1/messages", &messages, "messages"),
    ] {
        let direct = post(&c, &format!("{}{path}", sim.base_url()), body).await;
        let proxied = post(&c, &format!("{via}{path}"), body).await;
        assert_eq!(proxied.status, 200, "{endpoint}");
        assert_eq!(proxied.body, direct.body, "{endpoint}: bytes unchanged");
        let text = String::from_utf8_lossy(&proxied.body);
        match endpoint {
            "responses" => {
                assert!(
                    text.starts_with("event: response.created\ndata: {"),
                    "{text}"
                );
                assert_eq!(text.matches("event: response.output_text.delta").count(), 5);
                assert!(
                    text.contains("event: response.incomplete"),
                    "max tokens reached"
                );
                assert!(text.contains(r#""output_tokens":5"#), "{text}");
            }
            _ => {
                assert!(text.starts_with("event: message_start\ndata: {"), "{text}");
                assert_eq!(text.matches(r#""type":"text_delta""#).count(), 5);
                assert!(text.contains(r#""stop_reason":"max_tokens""#), "{text}");
                assert!(
                    text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
                );
            }
        }
    }
    let m = scrape(proxy.admin_addr().unwrap()).await;
    for endpoint in ["responses", "messages"] {
        let l = [("model", MODEL), ("endpoint", endpoint)];
        close(&m, "tokentap_time_to_first_token_seconds_sum", &l, 0.100);
        close(&m, "tokentap_inter_token_latency_seconds_count", &l, 4.0);
        close(&m, "tokentap_inter_token_latency_seconds_sum", &l, 0.080);
        close(&m, "tokentap_e2e_request_latency_seconds_sum", &l, 0.180);
        close(&m, "tokentap_request_generation_tokens_sum", &l, 5.0);
        close(&m, "tokentap_time_per_output_token_seconds_sum", &l, 0.020);
        close(&m, "tokentap_sse_unrecognized_events_total", &l, 0.0);
    }
    // Not streamed: the API's own object, its usage read by the proxy.
    let r = post(
        &c,
        &format!("{via}/v1/messages"),
        &messages.replace("\"stream\":true", "\"stream\":false"),
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["usage"]["output_tokens"], 5);
    let r = post(
        &c,
        &format!("{via}/v1/responses"),
        &responses.replace("\"stream\":true", "\"stream\":false"),
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "incomplete");
    assert_eq!(v["usage"]["output_tokens"], 5);
    let m = scrape(proxy.admin_addr().unwrap()).await;
    for endpoint in ["responses", "messages"] {
        let l = [("model", MODEL), ("endpoint", endpoint)];
        close(&m, "tokentap_request_generation_tokens_sum", &l, 10.0);
        close(&m, "tokentap_e2e_request_latency_seconds_sum", &l, 0.360);
    }
    proxy.shutdown().await;
    sim.shutdown().await;
}

/// The simulator's faults reach the other APIs as their own in-band errors and cuts.
#[tokio::test(start_paused = true)]
async fn simulator_faults_become_each_apis_errors() {
    let sim = sim(exact_sim(10.0, 10.0)).await;
    let proxy = tokentap::start(proxy_config(&sim.base_url()))
        .await
        .unwrap();
    let via = format!("http://{}", proxy.addr());
    for (path, body) in [
        ("/v1/responses", responses_request(true)),
        ("/v1/messages", messages_request(true)),
    ] {
        let r = send(
            &client(),
            http::Method::POST,
            &format!("{via}{path}"),
            &body,
            &[("x-tokentap-sim-fault", "error_after=3")],
        )
        .await;
        let text = String::from_utf8_lossy(&r.body);
        assert!(text.contains("event: error\ndata: {"), "{path}: {text}");
        assert!(!text.contains("response.completed") && !text.contains("message_stop"));
    }
    // An overloaded server answers in the API's own error shape.
    let r = send(
        &client(),
        http::Method::POST,
        &format!("{via}/v1/messages"),
        &messages_request(true),
        &[("x-tokentap-sim-fault", "status=503")],
    )
    .await;
    assert_eq!(r.status, 503);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "overloaded_error");
    tokio::time::sleep(50 * MS).await;
    let m = scrape(proxy.admin_addr().unwrap()).await;
    for endpoint in ["responses", "messages"] {
        close(
            &m,
            "tokentap_requests_total",
            &[("endpoint", endpoint), ("outcome", "inband_error")],
            1.0,
        );
    }
    close(
        &m,
        "tokentap_requests_total",
        &[
            ("endpoint", "messages"),
            ("outcome", "upstream_status"),
            ("status", "503"),
        ],
        1.0,
    );
    proxy.shutdown().await;
    sim.shutdown().await;
}

/// `tokentap bench --backend openai-responses | anthropic-messages` times each request as the
/// proxy does: both see TTFT 50 ms and seven 10 ms gaps per request, and their totals agree.
#[tokio::test(start_paused = true)]
async fn bench_agrees_with_the_proxy_for_both_apis() {
    use tokentap::bench::{self, Backend, BenchArgs};
    for (backend, endpoint) in [
        (Backend::OpenaiResponses, "responses"),
        (Backend::AnthropicMessages, "messages"),
    ] {
        let sim = sim(exact_sim(50.0, 10.0)).await;
        let proxy = tokentap::start(proxy_config(&sim.base_url()))
            .await
            .unwrap();
        let mut args = BenchArgs::new(&format!("http://{}", proxy.addr()), MODEL);
        args.backend = Some(backend);
        args.num_prompts = 6;
        args.max_concurrency = Some(3);
        args.random_input_len = 32;
        args.random_output_len = 8;
        args.disable_tqdm = true;
        let result = bench::run(&args).await.unwrap();
        assert_eq!(result.completed().count(), 6, "{endpoint}");
        for r in result.completed() {
            assert!((r.ttft - 0.050).abs() < 1e-9, "{endpoint}: ttft {}", r.ttft);
            assert_eq!(r.output_tokens, 8, "{endpoint}");
            assert!(
                (r.latency - 0.120).abs() < 1e-9,
                "{endpoint}: {}",
                r.latency
            );
            // No role chunk here: every gap is one decode step.
            assert_eq!(r.itl.len(), 7, "{endpoint}");
            assert!(
                r.itl.iter().all(|g| (g - 0.010).abs() < 1e-9),
                "{:?}",
                r.itl
            );
        }
        tokio::time::sleep(50 * MS).await;
        let m = scrape(proxy.admin_addr().unwrap()).await;
        let l = [("model", MODEL), ("endpoint", endpoint)];
        close(&m, "tokentap_time_to_first_token_seconds_count", &l, 6.0);
        close(
            &m,
            "tokentap_time_to_first_token_seconds_sum",
            &l,
            6.0 * 0.050,
        );
        close(&m, "tokentap_inter_token_latency_seconds_count", &l, 42.0);
        close(
            &m,
            "tokentap_inter_token_latency_seconds_sum",
            &l,
            42.0 * 0.010,
        );
        close(
            &m,
            "tokentap_e2e_request_latency_seconds_sum",
            &l,
            6.0 * 0.120,
        );
        close(&m, "tokentap_generation_tokens_total", &l, 48.0);
        proxy.shutdown().await;
        sim.shutdown().await;
    }
}

/// `tokentap demo --backend anthropic-messages` (and openai-responses): the client's and the
/// proxy's tables side by side, every request counted by both.
#[tokio::test(start_paused = true)]
async fn demo_shows_either_api() {
    use tokentap::bench::Backend;
    for (backend, path) in [
        (Backend::AnthropicMessages, "/v1/messages"),
        (Backend::OpenaiResponses, "/v1/responses"),
    ] {
        let args = tokentap::demo::DemoArgs {
            num_prompts: 8,
            max_concurrency: 4,
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            exit: true,
            flavor: tokentap::simulate::Flavor::Vllm,
            backend: Some(backend),
        };
        let out = tokentap::demo::run(&args, std::future::pending())
            .await
            .unwrap();
        let row = out
            .lines()
            .find(|l| l.starts_with("Successful requests"))
            .unwrap_or_else(|| panic!("no comparison table in\n{out}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cols[2..4], &["8.00", "8.00"], "{row}");
        assert!(out.contains(path), "the example names {path}:\n{out}");
    }
}

/// A Responses stream that calls a tool: the function call's arguments stream, and the
/// completed response lists a `function_call` among its output.
fn responses_tool_stream() -> Vec<(Duration, String)> {
    let args = |d: &str| {
        sse(
            "response.function_call_arguments.delta",
            &format!(
                r#"{{"type":"response.function_call_arguments.delta","item_id":"fc_1","output_index":0,"delta":"{d}"}}"#
            ),
        )
    };
    vec![
        (
            20 * MS,
            sse(
                "response.created",
                &format!(
                    r#"{{"type":"response.created","response":{{"id":"resp_t","model":"{MODEL}","status":"in_progress","usage":null}}}}"#
                ),
            ),
        ),
        (30 * MS, args(r#"{\"city\":"#)),
        (10 * MS, args(r#" \"Paris\"}"#)),
        (
            5 * MS,
            sse(
                "response.completed",
                &format!(
                    r#"{{"type":"response.completed","response":{{"id":"resp_t","model":"{MODEL}","status":"completed","output":[{{"type":"function_call","name":"get_weather","arguments":"{{}}","status":"completed"}}],"usage":{{"input_tokens":20,"output_tokens":7,"output_tokens_details":{{"reasoning_tokens":0}}}}}}}}"#
                ),
            ),
        ),
    ]
}

/// Why each response ended reaches the access log in chat's words (`finish_reason`) and in
/// the API's own (`stop_reason`), with the reasoning tokens its usage reported; chat's
/// `completion_tokens_details.reasoning_tokens` likewise. The reasoning tokens are a
/// histogram per route, like the cached prompt tokens.
#[tokio::test(start_paused = true)]
async fn finish_and_reasoning_tokens_reach_the_access_log_and_metrics() {
    let lines = access_log();
    let mut max_tokens = messages_stream();
    let last = max_tokens.len() - 2;
    max_tokens[last].1 = max_tokens[last].1.replace("end_turn", "max_tokens");
    let chat = vec![
        (
            40 * MS,
            format!(
                "data: {{\"id\":\"chatcmpl-1\",\"model\":\"{MODEL}\",\"choices\":[{{\"index\":0,\"delta\":{{\"reasoning\":\"hm\"}},\"finish_reason\":null}}]}}\n\n"
            ),
        ),
        (
            10 * MS,
            format!(
                "data: {{\"id\":\"chatcmpl-1\",\"model\":\"{MODEL}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"a\"}},\"finish_reason\":\"length\"}}]}}\n\n"
            ),
        ),
        (
            MS,
            format!(
                "data: {{\"id\":\"chatcmpl-1\",\"model\":\"{MODEL}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":4,\"completion_tokens\":6,\"completion_tokens_details\":{{\"reasoning_tokens\":5}}}}}}\n\ndata: [DONE]\n\n"
            ),
        ),
    ];
    let chat_request = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":6,"stream":true,"stream_options":{{"include_usage":true}}}}"#
    );
    // (path, endpoint, upstream, request, id, finish_reason, stop_reason, reasoning tokens)
    let cases = [
        (
            "/v1/responses",
            "responses",
            responses_stream(),
            responses_request(true),
            "resp-text",
            "stop",
            Some("completed"),
            Some("3"),
        ),
        (
            "/v1/responses",
            "responses",
            responses_tool_stream(),
            responses_request(true),
            "resp-tool",
            "tool_calls",
            Some("completed"),
            Some("0"),
        ),
        (
            "/v1/messages",
            "messages",
            messages_stream(),
            messages_request(true),
            "msg-end-turn",
            "stop",
            Some("end_turn"),
            None,
        ),
        (
            "/v1/messages",
            "messages",
            max_tokens,
            messages_request(true),
            "msg-max-tokens",
            "length",
            Some("max_tokens"),
            None,
        ),
        (
            "/v1/chat/completions",
            "chat",
            chat,
            chat_request,
            "chat-reasoning",
            "length",
            None,
            Some("5"),
        ),
    ];
    let whole = |body: String| {
        let (head, tail) = body.split_at(body.len() / 2);
        vec![(60 * MS, head.to_owned()), (40 * MS, tail.to_owned())]
    };
    let cases = cases.into_iter().chain([
        (
            "/v1/responses",
            "responses",
            whole(format!(
                r#"{{"id":"resp_2","object":"response","model":"{MODEL}","status":"incomplete","incomplete_details":{{"reason":"max_output_tokens"}},"output":[],"usage":{{"input_tokens":7,"output_tokens":11,"output_tokens_details":{{"reasoning_tokens":9}}}}}}"#
            )),
            responses_request(false),
            "resp-whole",
            "length",
            Some("max_output_tokens"),
            Some("9"),
        ),
        (
            "/v1/messages",
            "messages",
            whole(format!(
                r#"{{"id":"msg_2","type":"message","model":"{MODEL}","content":[],"stop_reason":"stop_sequence","usage":{{"input_tokens":7,"output_tokens":11}}}}"#
            )),
            messages_request(false),
            "msg-whole",
            "stop",
            Some("stop_sequence"),
            None,
        ),
    ]);
    for (path, endpoint, steps, request, id, finish, stop, reasoning) in cases {
        let kind = if id.ends_with("whole") {
            "application/json"
        } else {
            "text/event-stream"
        };
        let up = Scripted::new(kind, steps);
        let (reply, m) = through_logged(&up, path, &request, Some(id)).await;
        assert_eq!(reply.unwrap().body, up.body(), "{id}");
        let lines = lines.lock().unwrap();
        let line = lines
            .iter()
            .find(|l| l.get("request_id").map(String::as_str) == Some(id))
            .unwrap_or_else(|| panic!("no access-log line for {id}"));
        assert_eq!(line["endpoint"], endpoint, "{id}");
        assert_eq!(line["outcome"], "ok", "{id}");
        assert_eq!(line["finish_reason"], finish, "{id}");
        assert_eq!(line.get("stop_reason").map(String::as_str), stop, "{id}");
        assert_eq!(
            line.get("reasoning_tokens").map(String::as_str),
            reasoning,
            "{id}"
        );
        let l = [("model", MODEL), ("endpoint", endpoint)];
        let want: f64 = reasoning.map_or(0.0, |r| r.parse().unwrap());
        close(&m, "tokentap_request_reasoning_tokens_sum", &l, want);
        close(
            &m,
            "tokentap_request_reasoning_tokens_count",
            &l,
            if reasoning.is_some() { 1.0 } else { 0.0 },
        );
    }
}

/// The span says it too: `gen_ai.response.finish_reasons` in chat's words (as for chat, so
/// that one query finds every truncated request), `tokentap.stop_reason` in the API's, and
/// `gen_ai.usage.reasoning.output_tokens`. Real clock: the exporter runs on its own timer.
#[tokio::test]
async fn finish_and_reasoning_tokens_reach_the_span() {
    use fake_opentelemetry_collector::FakeCollectorServer;
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let fast = |steps: Vec<(Duration, String)>| -> Vec<(Duration, String)> {
        steps
            .into_iter()
            .map(|(_, s)| (Duration::ZERO, s))
            .collect()
    };
    let cases = [
        (
            "/v1/responses",
            Scripted::new("text/event-stream", fast(responses_stream())),
            responses_request(true),
            "stop",
            "completed",
            Some(3),
        ),
        (
            "/v1/messages",
            Scripted::new("text/event-stream", fast(messages_stream())),
            messages_request(true),
            "stop",
            "end_turn",
            None,
        ),
        (
            "/v1/responses",
            Scripted::new("text/event-stream", fast(responses_tool_stream())),
            responses_request(true),
            "tool_calls",
            "completed",
            Some(0),
        ),
    ];
    for (path, up, request, finish, stop, reasoning) in cases {
        let addr = up.start().await;
        let mut config = proxy_config(&format!("http://{addr}"));
        config.telemetry.discover_models = false;
        config.tracing = tokentap::config::TracingConfig {
            enabled: true,
            protocol: Some(tokentap::config::Protocol::Grpc),
            endpoint: Some(collector.endpoint()),
            service_name: Some("tokentap-test".to_owned()),
            scheduled_delay_ms: Some(20),
            timeout_secs: Some(5.0),
            ..tokentap::config::TracingConfig::default()
        };
        let proxy = tokentap::start(config).await.unwrap();
        let r = post(
            &client(),
            &format!("http://{}{path}", proxy.addr()),
            &request,
        )
        .await;
        assert_eq!(r.status, 200);
        proxy.shutdown().await;
        let spans = collector.exported_spans(1, Duration::from_secs(15)).await;
        assert_eq!(spans.len(), 1, "{path}: one span per request");
        let attrs = &spans[0].attributes;
        let value = |v: &str| format!("Some(AnyValue {{ value: Some({v}) }})");
        assert_eq!(
            attrs["gen_ai.response.finish_reasons"],
            value(&format!(
                "ArrayValue(ArrayValue {{ values: [AnyValue {{ value: Some(StringValue(\"{finish}\")) }}] }})"
            )),
            "{path}"
        );
        assert_eq!(
            attrs["tokentap.stop_reason"],
            value(&format!("StringValue(\"{stop}\")")),
            "{path}"
        );
        assert_eq!(
            attrs.get("gen_ai.usage.reasoning.output_tokens"),
            reasoning.map(|n| value(&format!("IntValue({n})"))).as_ref(),
            "{path}"
        );
    }
}
