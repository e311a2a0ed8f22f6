//! The simulator, in process on 127.0.0.1:0, seen by a real HTTP client: response shapes,
//! determinism, exact timing on tokio's paused clock, faults, cancellation, queueing, errors.

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokentap::simulate::{SimConfig, SimStats, Simulator, TimingConfig};
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Exact, fixed timings: TTFT 100 ms, 20 ms per token, no jitter, no slowdown, seeded.
fn exact() -> SimConfig {
    SimConfig {
        seed: Some(7),
        timing: TimingConfig {
            ttft_base_ms: 100.0,
            prefill_ms_per_1k_tokens: 0.0,
            itl_ms: 20.0,
            jitter: 0.0,
            slowdown_per_seq: 0.0,
            ..TimingConfig::default()
        },
        ..SimConfig::default()
    }
}

/// Fast timings for tests that only look at shapes (real clock).
fn fast() -> SimConfig {
    let mut c = exact();
    c.timing.ttft_base_ms = 2.0;
    c.timing.itl_ms = 1.0;
    c
}

const MODEL: &str = "Qwen/Qwen2.5-7B-Instruct";

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a story about a river."}],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn completion(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "prompt": "Once upon a time"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn send(
    client: &HttpClient,
    sim: &Simulator,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> http::Response<hyper::body::Incoming> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", sim.base_url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let body = Full::new(Bytes::copy_from_slice(body.unwrap_or_default()));
    client.request(req.body(body).unwrap()).await.unwrap()
}

async fn post(
    client: &HttpClient,
    sim: &Simulator,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> http::Response<hyper::body::Incoming> {
    let bytes = serde_json::to_vec(body).unwrap();
    send(client, sim, "POST", path, Some(&bytes), headers).await
}

async fn body_bytes(resp: http::Response<hyper::body::Incoming>) -> Bytes {
    resp.into_body().collect().await.unwrap().to_bytes()
}

async fn body_json(resp: http::Response<hyper::body::Incoming>) -> Value {
    serde_json::from_slice(&body_bytes(resp).await).unwrap()
}

/// One SSE event with the time (since `t0`) the frame completing it arrived.
#[derive(Debug)]
struct Event {
    at: Duration,
    data: String,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {}", self.data))
    }
}

/// Reads a whole SSE body, timestamping events.
async fn events(resp: http::Response<hyper::body::Incoming>, t0: Instant) -> Vec<Event> {
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.push_str(std::str::from_utf8(data).unwrap());
        let at = t0.elapsed();
        while let Some(end) = buf.find("\n\n") {
            let raw: String = buf.drain(..end + 2).collect();
            let data = raw
                .trim_end()
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {raw:?}"))
                .to_owned();
            out.push(Event { at, data });
        }
    }
    assert!(buf.is_empty(), "trailing bytes: {buf:?}");
    out
}

async fn stream(
    client: &HttpClient,
    sim: &Simulator,
    path: &str,
    body: &Value,
) -> (Vec<Event>, http::HeaderMap) {
    let t0 = Instant::now();
    let resp = post(client, sim, path, body, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let headers = resp.headers().clone();
    (events(resp, t0).await, headers)
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[tokio::test]
async fn chat_stream_has_vllm_shape() {
    let sim = common::sim(fast()).await;
    let c = client();
    let (ev, headers) = stream(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "max_tokens": 5})),
    )
    .await;
    assert_eq!(
        headers["content-type"], "text/event-stream; charset=utf-8",
        "{headers:?}"
    );
    // role chunk, 5 token chunks, [DONE]
    assert_eq!(ev.len(), 7, "{ev:#?}");
    assert_eq!(ev.last().unwrap().data, "[DONE]");
    let first = ev[0].json();
    let id = first["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-") && id.len() == "chatcmpl-".len() + 32);
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["model"], MODEL);
    assert!(first["created"].as_u64().unwrap() > 0);
    assert_eq!(
        first["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert!(first.get("usage").is_none());
    // vLLM's field order, compact.
    assert!(
        ev[0].data.starts_with(&format!(
            "{{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":"
        )),
        "{}",
        ev[0].data
    );
    assert!(
        ev[1]
            .data
            .ends_with("\"},\"logprobs\":null,\"finish_reason\":null}]}"),
        "{}",
        ev[1].data
    );
    let mut text = String::new();
    for (k, e) in ev[1..6].iter().enumerate() {
        let j = e.json();
        assert_eq!(j["id"], id);
        let choice = &j["choices"][0];
        let delta = choice["delta"].as_object().unwrap();
        assert_eq!(delta.len(), 1, "only content: {delta:?}");
        text.push_str(delta["content"].as_str().unwrap());
        if k == 4 {
            assert_eq!(choice["finish_reason"], "length");
            assert!(choice["stop_reason"].is_null());
        } else {
            assert!(choice["finish_reason"].is_null());
        }
    }
    assert!(!text.is_empty());
    assert_eq!(sim.stats().completed, 1);
    assert_eq!(sim.stats().streams_started, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn chat_stream_usage_and_continuous_usage() {
    let sim = common::sim(fast()).await;
    let c = client();
    let (ev, _) = stream(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "max_tokens": 4, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(ev.len(), 1 + 4 + 1 + 1);
    let usage = ev[5].json();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["object"], "chat.completion.chunk");
    // "Tell me a story about a river." is 30 bytes: ceil(30 / 4) = 8 prompt tokens.
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 8, "total_tokens": 12, "completion_tokens": 4})
    );
    assert!(ev[..5].iter().all(|e| e.json().get("usage").is_none()));

    let (ev, _) = stream(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "max_tokens": 4,
            "stream_options": {"include_usage": true, "continuous_usage_stats": true}})),
    )
    .await;
    assert_eq!(ev.len(), 7);
    let completions: Vec<u64> = ev[..6]
        .iter()
        .map(|e| e.json()["usage"]["completion_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(completions, [0, 1, 2, 3, 4, 4]);
    for e in &ev[..6] {
        let u = &e.json()["usage"];
        assert_eq!(u["prompt_tokens"], 8);
        assert_eq!(
            u["total_tokens"].as_u64().unwrap(),
            8 + u["completion_tokens"].as_u64().unwrap()
        );
    }
    // continuous_usage_stats without include_usage does nothing, like vLLM.
    let (ev, _) = stream(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "max_tokens": 2,
            "stream_options": {"include_usage": false, "continuous_usage_stats": true}})),
    )
    .await;
    assert_eq!(ev.len(), 4);
    assert!(ev[..3].iter().all(|e| e.json().get("usage").is_none()));
    sim.shutdown().await;
}

#[tokio::test]
async fn stop_finish_ends_with_empty_eos_token() {
    let mut config = fast();
    config.output.min_tokens = 6;
    config.output.max_tokens = 6;
    let sim = common::sim(config).await;
    let c = client();
    let (ev, _) = stream(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(ev.len(), 1 + 6 + 2);
    let last = ev[6].json();
    assert_eq!(last["choices"][0]["delta"]["content"], "");
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(ev[7].json()["usage"]["completion_tokens"], 6);
    sim.shutdown().await;
}

#[tokio::test]
async fn n2_interleaves_choices() {
    let sim = common::sim(fast()).await;
    let c = client();
    let (ev, _) = stream(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "max_tokens": 3, "n": 2,
            "stream_options": {"include_usage": true}})),
    )
    .await;
    // 2 role chunks, 2 x 3 token chunks, usage, [DONE]
    assert_eq!(ev.len(), 2 + 6 + 2, "{ev:#?}");
    let indices: Vec<u64> = ev[..8]
        .iter()
        .map(|e| e.json()["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 0, 1, 0, 1, 0, 1]);
    for i in 0..2 {
        let finishes = ev[..8]
            .iter()
            .map(Event::json)
            .filter(|j| j["choices"][0]["index"] == i)
            .filter(|j| j["choices"][0]["finish_reason"] == "length")
            .count();
        assert_eq!(finishes, 1);
    }
    assert_eq!(ev[8].json()["usage"]["completion_tokens"], 6);

    // Completions, n=2.
    let (ev, _) = stream(
        &c,
        &sim,
        "/v1/completions",
        &completion(json!({"stream": true, "max_tokens": 3, "n": 2})),
    )
    .await;
    assert_eq!(ev.len(), 6 + 1);
    let indices: Vec<u64> = ev[..6]
        .iter()
        .map(|e| e.json()["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 0, 1, 0, 1]);
    sim.shutdown().await;
}

#[tokio::test]
async fn completions_stream_and_full_responses() {
    let sim = common::sim(fast()).await;
    let c = client();
    let (ev, _) = stream(
        &c,
        &sim,
        "/v1/completions",
        &completion(json!({"stream": true, "max_tokens": 3,
            "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(ev.len(), 3 + 2);
    let first = ev[0].json();
    assert!(first["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(first["object"], "text_completion");
    let choice = first["choices"][0].as_object().unwrap();
    let keys: Vec<&str> = choice.keys().map(String::as_str).collect();
    for k in ["index", "text", "logprobs", "finish_reason", "stop_reason"] {
        assert!(keys.contains(&k), "{keys:?}");
    }
    assert_eq!(ev[2].json()["choices"][0]["finish_reason"], "length");
    let usage = ev[3].json();
    assert_eq!(usage["object"], "text_completion");
    assert_eq!(usage["choices"], json!([]));
    // "Once upon a time": 16 bytes, 4 tokens.
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 4, "total_tokens": 7, "completion_tokens": 3})
    );

    // Non-streaming completions; vLLM's default max_tokens for completions is 16.
    let resp = post(&c, &sim, "/v1/completions", &completion(json!({})), &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let j = body_json(resp).await;
    assert_eq!(j["object"], "text_completion");
    assert_eq!(j["choices"][0]["finish_reason"], "length");
    assert!(!j["choices"][0]["text"].as_str().unwrap().is_empty());
    assert_eq!(j["usage"]["completion_tokens"], 16);
    assert_eq!(j["usage"]["prompt_tokens"], 4);
    assert_eq!(j["usage"]["total_tokens"], 20);

    // Non-streaming chat.
    let resp = post(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"max_completion_tokens": 7, "n": 2})),
        &[],
    )
    .await;
    let j = body_json(resp).await;
    assert_eq!(j["object"], "chat.completion");
    assert!(j["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(j["choices"].as_array().unwrap().len(), 2);
    assert_eq!(j["choices"][1]["index"], 1);
    assert_eq!(j["choices"][0]["message"]["role"], "assistant");
    assert!(
        j["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len()
            > 7
    );
    assert_eq!(j["choices"][0]["finish_reason"], "length");
    assert_eq!(
        j["usage"],
        json!({"prompt_tokens": 8, "total_tokens": 22, "completion_tokens": 14,
            "prompt_tokens_details": null})
    );
    assert_eq!(sim.stats().streams_started, 1);
    assert_eq!(sim.stats().completed, 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn seeded_requests_are_byte_identical() {
    let sim = common::sim(fast()).await;
    let c = client();
    let body = chat(json!({"stream": true, "max_tokens": 12}));
    let a = body_bytes(post(&c, &sim, "/v1/chat/completions", &body, &[]).await).await;
    let b = body_bytes(post(&c, &sim, "/v1/chat/completions", &body, &[]).await).await;
    assert_eq!(a, b);
    let created = format!("\"created\":{}", tokentap::simulate::SEEDED_CREATED);
    assert!(std::str::from_utf8(&a).unwrap().contains(&created));

    // What a proxy adds to get usage changes nothing but the usage event.
    let mut with_usage = body.clone();
    with_usage["stream_options"] = json!({"include_usage": true});
    let u = body_bytes(post(&c, &sim, "/v1/chat/completions", &with_usage, &[]).await).await;
    let u = std::str::from_utf8(&u).unwrap();
    let usage_event = u
        .split_inclusive("\n\n")
        .find(|e| e.contains("\"choices\":[]"))
        .unwrap();
    assert_eq!(u.replacen(usage_event, "", 1).as_bytes(), &a[..]);

    // A different prompt gives different text.
    let other = chat(json!({"stream": true, "max_tokens": 12,
        "messages": [{"role": "user", "content": "Something else"}]}));
    let o = body_bytes(post(&c, &sim, "/v1/chat/completions", &other, &[]).await).await;
    assert_ne!(o, a);

    // Non-streaming too.
    let body = completion(json!({"max_tokens": 9}));
    let a = body_bytes(post(&c, &sim, "/v1/completions", &body, &[]).await).await;
    let b = body_bytes(post(&c, &sim, "/v1/completions", &body, &[]).await).await;
    assert_eq!(a, b);
    sim.shutdown().await;

    // Without a seed: different ids.
    let mut config = fast();
    config.seed = None;
    let sim = common::sim(config).await;
    let body = chat(json!({"max_tokens": 2}));
    let a = body_json(post(&c, &sim, "/v1/chat/completions", &body, &[]).await).await;
    let b = body_json(post(&c, &sim, "/v1/chat/completions", &body, &[]).await).await;
    assert_ne!(a["id"], b["id"]);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn exact_timing_on_paused_clock() {
    let sim = common::sim(exact()).await;
    let c = client();
    let (ev, _) = stream(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "max_tokens": 5,
            "stream_options": {"include_usage": true}})),
    )
    .await;
    let times: Vec<u128> = ev.iter().map(|e| ms(e.at)).collect();
    // role + token 0 at TTFT, then one token every 20 ms; usage and [DONE] right after.
    assert_eq!(times, [100, 100, 120, 140, 160, 180, 180, 180]);

    // Prefill grows with the prompt: 1 ms per token here.
    let mut config = exact();
    config.timing.prefill_ms_per_1k_tokens = 1000.0;
    config.timing.tokens_per_chunk = 3;
    let sim2 = common::sim(config).await;
    let (ev, _) = stream(
        &c,
        &sim2,
        "/v1/completions",
        // 40 bytes: 10 prompt tokens.
        &json!({"model": MODEL, "prompt": "x".repeat(40), "stream": true, "max_tokens": 8}),
    )
    .await;
    // Chunks: {0}, {1,2,3}, {4,5,6}, {7}; token k is produced at 110 + 20k ms.
    let times: Vec<u128> = ev.iter().map(|e| ms(e.at)).collect();
    assert_eq!(times, [110, 170, 230, 250, 250]);
    let words: Vec<usize> = ev[..4]
        .iter()
        .map(|e| {
            e.json()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .split(' ')
                .filter(|w| !w.is_empty())
                .count()
        })
        .collect();
    assert!(words[1] >= 2 && words[2] >= 2, "{words:?}");
    sim2.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn concurrency_slows_decode() {
    let mut config = exact();
    config.timing.slowdown_per_seq = 0.5;
    let sim = common::sim(config).await;
    let c = client();
    let body = chat(json!({"stream": true, "max_tokens": 3}));
    let (a, b) = tokio::join!(
        stream(&c, &sim, "/v1/chat/completions", &body),
        stream(&c, &sim, "/v1/chat/completions", &body),
    );
    // Two sequences running: each step takes 20 ms x 1.5.
    for ev in [a.0, b.0] {
        let times: Vec<u128> = ev.iter().map(|e| ms(e.at)).collect();
        assert_eq!(times, [100, 100, 130, 160, 160]);
    }
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn max_num_seqs_queues_requests() {
    let mut config = exact();
    config.timing.max_num_seqs = 1;
    let sim = common::sim(config).await;
    let c = client();
    let body = chat(json!({"stream": true, "max_tokens": 3}));
    let (a, b) = tokio::join!(
        stream(&c, &sim, "/v1/chat/completions", &body),
        stream(&c, &sim, "/v1/chat/completions", &body),
    );
    let mut firsts = [ms(a.0[0].at), ms(b.0[0].at)];
    firsts.sort();
    // The second waits for the first to finish (token 2 at 140 ms), then prefills 100 ms.
    assert_eq!(firsts, [100, 240]);
    let stats = sim.stats();
    assert_eq!(stats.active, 0);
    assert_eq!(stats.completed, 2);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn faults_from_the_header() {
    let sim = common::sim(exact()).await;
    let c = client();
    let body = chat(json!({"stream": true, "max_tokens": 6}));
    let path = "/v1/chat/completions";

    for code in [429u16, 500, 503] {
        let header = format!("status={code}");
        let resp = post(&c, &sim, path, &body, &[("x-tokentap-sim-fault", &header)]).await;
        assert_eq!(resp.status().as_u16(), code);
        let j = body_json(resp).await;
        assert_eq!(j["error"]["code"], code);
        assert!(j["error"]["message"].is_string() && j["error"]["type"].is_string());
        assert!(j["error"]["param"].is_null());
    }

    // In-band error after 2 tokens, then [DONE].
    let t0 = Instant::now();
    let resp = post(
        &c,
        &sim,
        path,
        &body,
        &[("x-tokentap-sim-fault", "error_after=2")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let ev = events(resp, t0).await;
    assert_eq!(ev.len(), 1 + 2 + 2, "{ev:#?}");
    let err = ev[3].json();
    assert_eq!(err["error"]["code"], 500);
    assert_eq!(err["error"]["type"], "InternalServerError");
    assert!(
        ev[3].data.starts_with("{\"error\": {\"message\": "),
        "{}",
        ev[3].data
    );
    assert_eq!(ms(ev[3].at), 140);
    assert_eq!(ev[4].data, "[DONE]");

    // Abrupt close after 2 tokens: the body errors instead of ending.
    let resp = post(
        &c,
        &sim,
        path,
        &body,
        &[("x-tokentap-sim-fault", "disconnect_after=2")],
    )
    .await;
    let mut b = resp.into_body();
    let mut got = String::new();
    let mut failed = false;
    while let Some(frame) = b.frame().await {
        match frame {
            Ok(f) => got.push_str(std::str::from_utf8(f.data_ref().unwrap()).unwrap()),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "body ended cleanly: {got}");
    assert_eq!(got.matches("data: ").count(), 3);
    assert!(!got.contains("[DONE]"));

    // Stall: 500 ms before token 2.
    let t0 = Instant::now();
    let resp = post(
        &c,
        &sim,
        path,
        &body,
        &[("x-tokentap-sim-fault", "stall_after=2, stall_ms=500")],
    )
    .await;
    let times: Vec<u128> = events(resp, t0).await.iter().map(|e| ms(e.at)).collect();
    assert_eq!(times, [100, 100, 120, 640, 660, 680, 700, 700]);

    // Slow headers: the schedule starts after them.
    let t0 = Instant::now();
    let resp = post(
        &c,
        &sim,
        path,
        &body,
        &[("x-tokentap-sim-fault", "header_delay_ms=300")],
    )
    .await;
    assert_eq!(ms(t0.elapsed()), 300);
    let ev = events(resp, t0).await;
    assert_eq!(ms(ev[0].at), 400);

    // A bad header is a 400 naming the key.
    let resp = post(
        &c,
        &sim,
        path,
        &body,
        &[("x-tokentap-sim-fault", "explode=1")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let j = body_json(resp).await;
    assert!(j["error"]["message"].as_str().unwrap().contains("explode"));

    // Non-streaming: error_after gives a 500 with vLLM's body.
    let resp = post(
        &c,
        &sim,
        path,
        &chat(json!({"max_tokens": 6})),
        &[("x-tokentap-sim-fault", "error_after=3")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        body_json(resp).await["error"]["type"],
        "InternalServerError"
    );

    let stats = sim.stats();
    assert_eq!(stats.cancelled, 0, "{stats:?}");
    assert_eq!(stats.active, 0, "{stats:?}");
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn faults_from_config_rates() {
    let mut config = exact();
    config.faults.rate_503 = 1.0;
    let sim = common::sim(config).await;
    let c = client();
    let resp = post(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 2})),
        &[],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    sim.shutdown().await;

    let mut config = exact();
    config.faults.rate_error = 1.0;
    let sim = common::sim(config).await;
    let (ev, _) = stream(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "max_tokens": 20})),
    )
    .await;
    assert!(ev.iter().any(|e| e.data.starts_with("{\"error\"")));
    assert_eq!(ev.last().unwrap().data, "[DONE]");
    sim.shutdown().await;
}

async fn wait_for(sim: &Simulator, what: impl Fn(SimStats) -> bool) -> SimStats {
    for _ in 0..1000 {
        let s = sim.stats();
        if what(s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never held: {:?}", sim.stats());
}

#[tokio::test(start_paused = true)]
async fn client_going_away_cancels_the_stream() {
    let sim = common::sim(exact()).await;
    let c = client();
    let resp = post(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "max_tokens": 1000})),
        &[],
    )
    .await;
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    body.frame().await.unwrap().unwrap();
    assert_eq!(sim.stats().active, 1);
    drop(body);
    drop(c);
    let stats = wait_for(&sim, |s| s.cancelled == 1).await;
    assert_eq!(stats.active, 0);
    assert_eq!(stats.completed, 0);
    // Generation stopped: the sequence slot is free and nothing is produced any more.
    let metrics = body_bytes(send(&client(), &sim, "GET", "/metrics", None, &[]).await).await;
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    assert!(
        metrics.contains(&format!(
            "vllm:num_requests_running{{model_name=\"{MODEL}\"}} 0"
        )),
        "{metrics}"
    );
    let tokens = |m: &str| -> String {
        m.lines()
            .find(|l| l.starts_with("vllm:generation_tokens_total"))
            .unwrap()
            .to_owned()
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = body_bytes(send(&client(), &sim, "GET", "/metrics", None, &[]).await).await;
    assert_eq!(
        tokens(&metrics),
        tokens(std::str::from_utf8(&later).unwrap())
    );
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn client_going_away_cancels_a_pending_full_response() {
    let sim = common::sim(exact()).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", sim.base_url());
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&chat(json!({"max_tokens": 1000}))).unwrap(),
        )))
        .unwrap();
    let pending = tokio::spawn(async move { c.request(req).await });
    wait_for(&sim, |s| s.active == 1).await;
    pending.abort();
    let stats = wait_for(&sim, |s| s.cancelled == 1).await;
    assert_eq!(stats.active, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn other_endpoints_and_errors() {
    let sim = common::sim(fast()).await;
    let c = client();

    let resp = send(&c, &sim, "GET", "/health", None, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(body_bytes(resp).await.is_empty());

    let resp = send(&c, &sim, "GET", "/nope", None, &[]).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(&body_bytes(resp).await[..], b"{\"detail\":\"Not Found\"}");

    let resp = send(&c, &sim, "GET", "/v1/chat/completions", None, &[]).await;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        &body_bytes(resp).await[..],
        b"{\"detail\":\"Method Not Allowed\"}"
    );

    let resp = send(&c, &sim, "GET", "/v1/models", None, &[]).await;
    let j = body_json(resp).await;
    assert_eq!(j["object"], "list");
    assert_eq!(j["data"][0]["id"], MODEL);
    assert_eq!(j["data"][0]["object"], "model");
    assert_eq!(j["data"][0]["owned_by"], "vllm");
    assert_eq!(j["data"][0]["max_model_len"], 32768);

    let resp = send(
        &c,
        &sim,
        "POST",
        "/v1/chat/completions",
        Some(b"{\"model\": "),
        &[],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let j = body_json(resp).await;
    let keys: Vec<&str> = j["error"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 4);
    for k in ["message", "type", "param", "code"] {
        assert!(keys.contains(&k));
    }
    assert_eq!(j["error"]["code"], 400);

    let resp = post(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"model": "gpt-nonexistent", "stream": true})),
        &[],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let j = body_json(resp).await;
    assert_eq!(j["error"]["type"], "NotFoundError");
    assert_eq!(j["error"]["code"], 404);
    assert_eq!(j["error"]["param"], "model");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gpt-nonexistent")
    );

    // stream_options without stream, and a prompt longer than the context.
    let resp = post(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream_options": {"include_usage": true}})),
        &[],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = post(
        &c,
        &sim,
        "/v1/completions",
        &completion(json!({"max_tokens": 40000})),
        &[],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(
        body_json(resp).await["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length")
    );

    let resp = post(
        &c,
        &sim,
        "/v1/embeddings",
        &json!({"model": MODEL, "input": ["hello world", "bye"]}),
        &[],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let j = body_json(resp).await;
    assert_eq!(j["object"], "list");
    assert!(j["id"].as_str().unwrap().starts_with("embd-"));
    assert_eq!(j["data"].as_array().unwrap().len(), 2);
    assert_eq!(j["data"][1]["index"], 1);
    assert_eq!(j["data"][0]["object"], "embedding");
    assert_eq!(j["data"][0]["embedding"].as_array().unwrap().len(), 1024);
    assert_eq!(j["usage"]["prompt_tokens"], 3 + 1);
    assert_eq!(j["usage"]["completion_tokens"], 0);

    let resp = send(&c, &sim, "GET", "/metrics", None, &[]).await;
    let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
    for name in [
        "tokentap_sim_requests_total",
        "tokentap_sim_cancelled_total",
        "tokentap_sim_completed_total",
        "tokentap_sim_active_streams",
        "vllm:num_requests_running",
        "vllm:time_to_first_token_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    // Every request to a generation or embedding endpoint counts.
    assert!(text.contains("tokentap_sim_requests_total 5"), "{text}");
    sim.shutdown().await;
}

#[test]
fn config_files_are_validated() {
    let e = SimConfig::from_toml_str("[timing]\nitl = 5\n").unwrap_err();
    assert!(e.to_string().contains("itl"), "{e}");
    let e = SimConfig::from_toml_str("[timing]\njitter = 2.0\n").unwrap_err();
    assert!(e.to_string().contains("timing.jitter"), "{e}");
    let e = SimConfig::from_toml_str("models = []\n").unwrap_err();
    assert!(e.to_string().contains("models"), "{e}");
    let c =
        SimConfig::from_toml_str("seed = 3\n[output]\nmin_tokens = 2\nmax_tokens = 4\n").unwrap();
    assert_eq!(c.seed, Some(3));
    assert_eq!(c.output.max_tokens, 4);
    assert_eq!(c.timing, SimConfig::default().timing);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/simulate.toml");
    SimConfig::load(std::path::Path::new(example)).unwrap();
    let e = SimConfig::load(std::path::Path::new("/nonexistent/sim.toml")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/sim.toml"), "{e}");
}

/// The OpenAI Python SDK consumes the simulator's streams and responses without complaint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_accepts_the_responses() {
    let required = std::env::var("TOKENTAP_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1");
    let probe = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        other => {
            let why = match other {
                Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                Err(e) => format!("python3: {e}"),
            };
            assert!(!required, "python3 with `openai` is required: {why}");
            println!("skipped: python3 with the `openai` module is not available ({why})");
            return;
        }
    }
    let sim = common::sim(fast()).await;
    let base = format!("{}/v1", sim.base_url());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/openai_sdk_check.py"
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([script, &base])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai_sdk_check.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    println!("{stdout}");
    sim.shutdown().await;
}
