//! Where TTFT goes (`docs/METRICS.md` §6), end to end: a purpose-built upstream on
//! `127.0.0.1:0` sends a fixed stream (vLLM's per-request `metrics`, llama.cpp's `timings`) on
//! tokio's paused clock, and the proxy's histograms, access log and client stream are checked
//! to the exact value.
//!
//! One test here installs a global log subscriber to read the access log.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Sleep;

/// A body that sends each frame a given time after the one before.
struct Scripted {
    steps: VecDeque<(Duration, Bytes)>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Body for Scripted {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        loop {
            if let Some(sleep) = self.sleep.as_mut() {
                std::task::ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
                let (_, frame) = self.steps.pop_front().expect("a step waits");
                return Poll::Ready(Some(Ok(Frame::data(frame))));
            }
            let Some(&(wait, _)) = self.steps.front() else {
                return Poll::Ready(None);
            };
            self.sleep = Some(Box::pin(tokio::time::sleep(wait)));
        }
    }
}

/// An upstream that answers every request with `content_type` and the frames of `steps`, each
/// `(ms after the previous one, bytes)`.
async fn scripted_upstream(
    content_type: &'static str,
    steps: Vec<(u64, String)>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let steps: Arc<Vec<(Duration, Bytes)>> = Arc::new(
        steps
            .into_iter()
            .map(|(ms, s)| (Duration::from_millis(ms), Bytes::from(s)))
            .collect(),
    );
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let steps = steps.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let body = Scripted {
                        steps: steps.iter().cloned().collect(),
                        sleep: None,
                    };
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", content_type)
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

fn event(json: &str) -> String {
    format!("data: {json}\n\n")
}

fn chunk(delta: &str, finish: &str) -> String {
    event(&format!(
        r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"{MODEL}","choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]}}"#
    ))
}

/// A proxy in front of `addr` whose labels need no model discovery.
async fn proxy(addr: std::net::SocketAddr) -> tokentap::Running {
    let mut config = proxy_config(&format!("http://{addr}"));
    config.telemetry.discover_models = false;
    config.telemetry.access_log = true;
    tokentap::start(config).await.unwrap()
}

fn assert_close(m: &str, name: &str, want: f64) {
    let got = value(m, name, &[("model", MODEL), ("endpoint", "chat")]);
    assert!((got - want).abs() < 1e-9, "{name}: {got} != {want}");
}

/// vLLM with `--enable-per-request-metrics`: the final usage event carries `metrics`, and usage
/// carries the prefix-cache hits. The client did not ask for usage, so the proxy asked for it
/// and cuts the usage event (metrics and all) from what the client receives.
#[tokio::test(start_paused = true)]
async fn vllm_metrics_break_ttft_into_queue_prefill_and_outside() {
    let usage = event(&format!(
        r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"{MODEL}","choices":[],"usage":{{"prompt_tokens":9,"total_tokens":11,"completion_tokens":2,"prompt_tokens_details":{{"cached_tokens":4}}}},"metrics":{{"queue_time_ms":3.25,"time_to_first_token_ms":12.5,"generation_time_ms":20.0,"mean_itl_ms":20.0,"tokens_per_second":50.0}}}}"#
    ));
    let addr = scripted_upstream(
        "text/event-stream",
        vec![
            (50, chunk(r#"{"role":"assistant","content":""}"#, "null")),
            (10, chunk(r#"{"content":"a"}"#, "null")),
            (20, chunk(r#"{"content":"b"}"#, r#""length""#)),
            (5, usage),
            (1, "data: [DONE]\n\n".to_owned()),
        ],
    )
    .await;
    let proxy = proxy(addr).await;
    let r = send(
        &client(),
        Method::POST,
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &chat_body(2, true, ""),
        &[("x-request-id", "vllm-metrics")],
    )
    .await;
    assert_eq!(r.status, 200);
    let body = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(!body.contains("\"usage\""), "usage was cut: {body}");
    assert!(!body.contains("queue_time_ms"), "metrics were cut: {body}");
    assert!(body.ends_with("data: [DONE]\n\n"));

    let m = scrape(proxy.admin_addr().unwrap()).await;
    // TTFT 60 ms: the role chunk at 50 ms is no token.
    assert_close(&m, "tokentap_time_to_first_token_seconds_sum", 0.060);
    assert_close(&m, "tokentap_upstream_queue_time_seconds_count", 1.0);
    assert_close(&m, "tokentap_upstream_queue_time_seconds_sum", 0.00325);
    assert_close(&m, "tokentap_upstream_prefill_time_seconds_sum", 0.0125);
    assert_close(&m, "tokentap_upstream_decode_time_seconds_sum", 0.020);
    // 60 − 3.25 − 12.5 ms: the API server, the network and the proxy.
    assert_close(
        &m,
        "tokentap_time_to_first_token_outside_engine_seconds_count",
        1.0,
    );
    assert_close(
        &m,
        "tokentap_time_to_first_token_outside_engine_seconds_sum",
        0.04425,
    );
    assert_close(
        &m,
        "tokentap_time_to_first_token_outside_engine_negative_total",
        0.0,
    );
    assert_close(&m, "tokentap_request_cached_prompt_tokens_sum", 4.0);
    assert_close(&m, "tokentap_e2e_request_latency_seconds_sum", 0.080);
    proxy.shutdown().await;
}

/// llama.cpp: the role chunk with `content: null` well before the first token, and `timings`
/// with `usage` on the finish-only choice event. The client asked for usage: it receives the
/// stream byte for byte. llama.cpp reports no queue time, so nothing is outside the engine.
#[tokio::test(start_paused = true)]
async fn llamacpp_timings_on_the_finish_only_chunk() {
    let finish = event(&format!(
        r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"{MODEL}","choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"length"}}],"usage":{{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}},"timings":{{"prompt_n":5,"prompt_ms":30.5,"predicted_n":2,"predicted_ms":20.25,"cache_n":3}}}}"#
    ));
    let steps = vec![
        (20, chunk(r#"{"role":"assistant","content":null}"#, "null")),
        (50, chunk(r#"{"content":"a"}"#, "null")),
        (20, chunk(r#"{"content":"b"}"#, "null")),
        (40, finish),
        (1, "data: [DONE]\n\n".to_owned()),
    ];
    let upstream_bytes: String = steps.iter().map(|(_, s)| s.as_str()).collect();
    let addr = scripted_upstream("text/event-stream", steps).await;
    let proxy = proxy(addr).await;
    let r = post(
        &client(),
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &chat_body(2, true, r#","stream_options":{"include_usage":true}"#),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(String::from_utf8(r.body.to_vec()).unwrap(), upstream_bytes);

    let m = scrape(proxy.admin_addr().unwrap()).await;
    assert_close(&m, "tokentap_time_to_first_token_seconds_sum", 0.070);
    // The finish-only chunk, 40 ms after the last token, moves neither E2EL nor ITL.
    assert_close(&m, "tokentap_e2e_request_latency_seconds_sum", 0.090);
    assert_close(&m, "tokentap_inter_token_latency_seconds_count", 1.0);
    assert_close(&m, "tokentap_max_inter_token_latency_seconds_sum", 0.020);
    assert_close(&m, "tokentap_upstream_prefill_time_seconds_sum", 0.0305);
    assert_close(&m, "tokentap_upstream_decode_time_seconds_sum", 0.02025);
    assert_close(&m, "tokentap_upstream_queue_time_seconds_count", 0.0);
    assert_close(
        &m,
        "tokentap_time_to_first_token_outside_engine_seconds_count",
        0.0,
    );
    assert_close(&m, "tokentap_request_cached_prompt_tokens_sum", 3.0);
    assert_close(&m, "tokentap_request_generation_tokens_sum", 2.0);
    proxy.shutdown().await;
}

/// Absent, `null`, non-numeric and negative fields are no observation; a negative remainder
/// (the server's queue and prefill add up to more than the proxy's TTFT) is counted, not
/// recorded.
#[tokio::test(start_paused = true)]
async fn missing_null_and_negative_values_are_not_observations() {
    for (metrics, queue, prefill, decode, outside, negative) in [
        (
            r#"{"queue_time_ms":null,"time_to_first_token_ms":"12","generation_time_ms":-5}"#,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
        ),
        // 50 + 30 ms in the engine, but the proxy saw the first token after 60 ms.
        (
            r#"{"queue_time_ms":50,"time_to_first_token_ms":30}"#,
            1.0,
            1.0,
            0.0,
            0.0,
            1.0,
        ),
    ] {
        let usage = event(&format!(
            r#"{{"choices":[],"usage":{{"prompt_tokens":9,"completion_tokens":1}},"metrics":{metrics}}}"#
        ));
        let addr = scripted_upstream(
            "text/event-stream",
            vec![
                (60, chunk(r#"{"content":"a"}"#, r#""stop""#)),
                (1, usage),
                (1, "data: [DONE]\n\n".to_owned()),
            ],
        )
        .await;
        let proxy = proxy(addr).await;
        let r = post(
            &client(),
            &format!("http://{}/v1/chat/completions", proxy.addr()),
            &chat_body(1, true, ""),
        )
        .await;
        assert_eq!(r.status, 200);
        let m = scrape(proxy.admin_addr().unwrap()).await;
        for (name, want) in [
            ("tokentap_upstream_queue_time_seconds_count", queue),
            ("tokentap_upstream_prefill_time_seconds_count", prefill),
            ("tokentap_upstream_decode_time_seconds_count", decode),
            (
                "tokentap_time_to_first_token_outside_engine_seconds_count",
                outside,
            ),
            (
                "tokentap_time_to_first_token_outside_engine_negative_total",
                negative,
            ),
        ] {
            assert_close(&m, name, want);
        }
        assert_close(&m, "tokentap_request_cached_prompt_tokens_count", 0.0);
        proxy.shutdown().await;
    }
}

/// A non-streaming body with vLLM's `metrics`: queue, prefill and decode are read; TTFT is not
/// observed, so nothing is outside the engine.
#[tokio::test(start_paused = true)]
async fn json_body_metrics_are_read() {
    let body = format!(
        r#"{{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"{MODEL}","choices":[{{"index":0,"message":{{"role":"assistant","content":"ab"}},"finish_reason":"length"}}],"usage":{{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{{"cached_tokens":8}}}},"metrics":{{"queue_time_ms":1.5,"time_to_first_token_ms":7.0,"generation_time_ms":9.5}}}}"#
    );
    let addr = scripted_upstream("application/json", vec![(40, body)]).await;
    let proxy = proxy(addr).await;
    let r = post(
        &client(),
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &chat_body(2, false, ""),
    )
    .await;
    assert_eq!(r.status, 200);
    let m = scrape(proxy.admin_addr().unwrap()).await;
    assert_close(&m, "tokentap_upstream_queue_time_seconds_sum", 0.0015);
    assert_close(&m, "tokentap_upstream_prefill_time_seconds_sum", 0.007);
    assert_close(&m, "tokentap_upstream_decode_time_seconds_sum", 0.0095);
    assert_close(
        &m,
        "tokentap_time_to_first_token_outside_engine_seconds_count",
        0.0,
    );
    assert_close(&m, "tokentap_request_cached_prompt_tokens_sum", 8.0);
    proxy.shutdown().await;
}

/// The access log carries the same figures, in milliseconds: a reasoning model's stream with
/// vLLM's `metrics`.
#[test]
fn access_log_carries_where_ttft_went() {
    let lines = access_log();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let usage = event(
            r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":6}},"metrics":{"queue_time_ms":2.0,"time_to_first_token_ms":8.0,"generation_time_ms":40.0}}"#,
        );
        let addr = scripted_upstream(
            "text/event-stream",
            vec![
                (30, chunk(r#"{"role":"assistant","content":""}"#, "null")),
                (0, chunk(r#"{"reasoning":"hm"}"#, "null")),
                (25, chunk(r#"{"content":"a"}"#, "null")),
                (15, chunk(r#"{"content":"b"}"#, r#""stop""#)),
                (1, usage),
                (1, "data: [DONE]\n\n".to_owned()),
            ],
        )
        .await;
        let proxy = proxy(addr).await;
        let r = send(
            &client(),
            Method::POST,
            &format!("http://{}/v1/chat/completions", proxy.addr()),
            &chat_body(3, true, ""),
            &[("x-request-id", "where-ttft-went")],
        )
        .await;
        assert_eq!(r.status, 200);
        proxy.shutdown().await;
    });
    let lines = lines.lock().unwrap();
    let l = lines
        .iter()
        .find(|l| l.get("request_id").map(String::as_str) == Some("where-ttft-went"))
        .expect("an access-log line");
    for (field, want) in [
        ("ttft_ms", "30"),
        ("ttfa_ms", "55"),
        ("reasoning_ms", "25"),
        ("queue_ms", "2"),
        ("prefill_ms", "8"),
        ("outside_engine_ms", "20"),
        ("decode_ms", "40"),
        ("cached_prompt_tokens", "6"),
        ("itl_max_ms", "25"),
        ("itl_count", "2"),
        ("e2el_ms", "70"),
    ] {
        assert_eq!(l[field], want, "{field} in {l:?}");
    }
}
