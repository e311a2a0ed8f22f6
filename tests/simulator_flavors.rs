//! The simulator's server flavors and response features, seen by a real HTTP client on
//! 127.0.0.1:0: llama.cpp's shapes, reasoning and tool-call deltas, vLLM's per-request
//! `metrics` and llama.cpp's `timings`, with exact bytes and, on tokio's paused clock, exact
//! times and values from the timing model.

mod common;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Value, json};
use tokentap::simulate::{Flavor, ReasoningField, SEEDED_CREATED, SimConfig, Simulator};
use tokio::time::Instant;

use common::{MODEL, TestClient};

/// TTFT 100 ms, 20 ms per token, seeded, no jitter.
fn exact(flavor: Flavor) -> SimConfig {
    SimConfig {
        flavor,
        ..common::exact_sim(100.0, 20.0)
    }
}

/// "Tell me about proxies": 21 bytes, 6 prompt tokens.
const PROMPT_TOKENS: u64 = 6;

fn chat(extra: Value) -> String {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about proxies"}],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body.to_string()
}

/// One SSE event: when (ms since the request was sent) the frame completing it arrived, and
/// its `data:` payload.
#[derive(Debug, Clone)]
struct Ev {
    ms: u128,
    data: String,
}

impl Ev {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {}", self.data))
    }
}

async fn stream(client: &TestClient, sim: &Simulator, path: &str, body: &str) -> Vec<Ev> {
    use http_body_util::BodyExt as _;
    let t0 = Instant::now();
    let req = http::Request::post(format!("{}{path}", sim.base_url()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.push_str(std::str::from_utf8(data).unwrap());
        let ms = t0.elapsed().as_millis();
        while let Some(end) = buf.find("\n\n") {
            let raw: String = buf.drain(..end + 2).collect();
            let data = raw
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {raw:?}"))
                .trim_end_matches('\n')
                .to_owned();
            out.push(Ev { ms, data });
        }
    }
    assert!(buf.is_empty(), "trailing bytes: {buf:?}");
    out
}

async fn full(client: &TestClient, sim: &Simulator, path: &str, body: &str) -> (String, Value) {
    let r = common::post(client, &format!("{}{path}", sim.base_url()), body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    let v = serde_json::from_str(&text).unwrap();
    (text, v)
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// The text of a delta field of a chunk.
fn delta_text(ev: &Ev, field: &str) -> String {
    ev.json()["choices"][0]["delta"][field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field}: {}", ev.data))
        .to_owned()
}

/// Keys of a JSON object, sorted (serde_json's map sorts them).
fn keys(v: &Value) -> Vec<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

/// Top-level keys of a raw JSON object, in the order they are written.
struct Ordered(Vec<String>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, IgnoredAny)) = map.next_entry::<String, IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(Ordered(keys))
            }
        }
        d.deserialize_map(V)
    }
}

fn key_order(raw: &str) -> Vec<String> {
    serde_json::from_str::<Ordered>(raw).unwrap().0
}

/// llama.cpp's chunk tail after the choices.
fn llama_tail(id: &str, object: &str) -> String {
    format!(
        ",\"created\":{SEEDED_CREATED},\"id\":\"{id}\",\"model\":\"{MODEL}\",\
         \"system_fingerprint\":\"b1-tokentap\",\"object\":\"{object}\""
    )
}

/// `timings` the timing model gives: prefill `prompt_ms`, decode `predicted_ms`.
fn timings_json(prompt_n: u64, prompt_ms: f64, predicted_n: u64, predicted_ms: f64) -> String {
    let f = |v: f64| serde_json::to_string(&v).unwrap();
    format!(
        "{{\"cache_n\":0,\"prompt_n\":{prompt_n},\"prompt_ms\":{},\"prompt_per_token_ms\":{},\
         \"prompt_per_second\":{},\"predicted_n\":{predicted_n},\"predicted_ms\":{},\
         \"predicted_per_token_ms\":{},\"predicted_per_second\":{}}}",
        f(prompt_ms),
        f(prompt_ms / prompt_n as f64),
        f(1e3 * prompt_n as f64 / prompt_ms),
        f(predicted_ms),
        f(predicted_ms / predicted_n as f64),
        f(1e3 * predicted_n as f64 / predicted_ms),
    )
}

#[tokio::test(start_paused = true)]
async fn llama_cpp_chat_stream_bytes_and_times() {
    let sim = common::sim(exact(Flavor::LlamaCpp)).await;
    let c = common::client();
    let ev = stream(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "max_tokens": 4,
            "stream_options": {"include_usage": true}})),
    )
    .await;
    let times: Vec<u128> = ev.iter().map(|e| e.ms).collect();
    // Role chunk when the slot is taken (at once), tokens at 100 + 20k ms, then the
    // finish-only chunk and the usage chunk with the last token, then [DONE].
    assert_eq!(times, [0, 100, 120, 140, 160, 160, 160, 160], "{ev:#?}");
    let id = ev[0].json()["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("chatcmpl-") && id.len() == 9 + 32, "{id}");
    assert!(id[9..].bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
    let tail = llama_tail(&id, "chat.completion.chunk");
    assert_eq!(
        ev[0].data,
        format!(
            "{{\"choices\":[{{\"finish_reason\":null,\"index\":0,\"delta\":\
             {{\"role\":\"assistant\",\"content\":null}}}}]{tail}}}"
        )
    );
    let mut text = String::new();
    for e in &ev[1..5] {
        let word = delta_text(e, "content");
        assert_eq!(
            e.data,
            format!(
                "{{\"choices\":[{{\"finish_reason\":null,\"index\":0,\"delta\":\
                 {{\"content\":{}}}}}]{tail}}}",
                q(&word)
            )
        );
        text.push_str(&word);
    }
    assert_eq!(text.split(' ').count(), 4, "{text:?}");
    assert_eq!(
        ev[5].data,
        format!(
            "{{\"choices\":[{{\"finish_reason\":\"length\",\"index\":0,\"delta\":{{}}}}]{tail}}}"
        )
    );
    // Prefill 100 ms for 6 prompt tokens; 4 tokens over 60 ms of decode.
    assert_eq!(
        ev[6].data,
        format!(
            "{{\"choices\":[]{tail},\"usage\":{{\"completion_tokens\":4,\"prompt_tokens\":6,\
             \"total_tokens\":10}},\"timings\":{}}}",
            timings_json(PROMPT_TOKENS, 100.0, 4, 60.0)
        )
    );
    assert_eq!(ev[7].data, "[DONE]");
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn llama_cpp_without_usage_puts_timings_on_the_finish_chunk() {
    let mut config = exact(Flavor::LlamaCpp);
    config.output.min_tokens = 3;
    config.output.max_tokens = 3;
    let sim = common::sim(config).await;
    let c = common::client();
    // No max_tokens: 3 tokens drawn, the last the end-of-sequence token (no text).
    let ev = stream(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream": true})),
    )
    .await;
    let times: Vec<u128> = ev.iter().map(|e| e.ms).collect();
    assert_eq!(times, [0, 100, 120, 140, 140], "{ev:#?}");
    let id = ev[0].json()["id"].as_str().unwrap().to_owned();
    let tail = llama_tail(&id, "chat.completion.chunk");
    assert_eq!(
        ev[3].data,
        format!(
            "{{\"choices\":[{{\"finish_reason\":\"stop\",\"index\":0,\"delta\":{{}}}}]{tail},\
             \"timings\":{}}}",
            timings_json(PROMPT_TOKENS, 100.0, 3, 40.0)
        )
    );
    assert_eq!(ev[4].data, "[DONE]");
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn llama_cpp_full_responses_and_completions_stream() {
    let sim = common::sim(exact(Flavor::LlamaCpp)).await;
    let c = common::client();
    let (text, v) = full(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 3})),
    )
    .await;
    let id = v["id"].as_str().unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        text,
        format!(
            "{{\"choices\":[{{\"finish_reason\":\"length\",\"index\":0,\"message\":\
             {{\"role\":\"assistant\",\"content\":{}}}}}],\"created\":{SEEDED_CREATED},\
             \"model\":\"{MODEL}\",\"system_fingerprint\":\"b1-tokentap\",\
             \"object\":\"chat.completion\",\"usage\":{{\"completion_tokens\":3,\
             \"prompt_tokens\":6,\"total_tokens\":9}},\"id\":\"{id}\",\"timings\":{}}}",
            q(content),
            timings_json(PROMPT_TOKENS, 100.0, 3, 40.0)
        )
    );

    // Completions: text chunks, then a last chunk with empty text, usage, id and timings.
    let body = json!({"model": MODEL, "prompt": "Once upon a time", "stream": true,
        "max_tokens": 2})
    .to_string();
    let ev = stream(&c, &sim, "/v1/completions", &body).await;
    let times: Vec<u128> = ev.iter().map(|e| e.ms).collect();
    assert_eq!(times, [100, 120, 120, 120], "{ev:#?}");
    let id = ev[0].json()["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("chatcmpl-"), "{id}");
    let tail = format!(
        ",\"created\":{SEEDED_CREATED},\"model\":\"{MODEL}\",\
         \"system_fingerprint\":\"b1-tokentap\",\"object\":\"text_completion\""
    );
    let word = ev[0].json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        ev[0].data,
        format!(
            "{{\"choices\":[{{\"text\":{},\"index\":0,\"logprobs\":null,\
             \"finish_reason\":null}}]{tail},\"id\":\"{id}\"}}",
            q(&word)
        )
    );
    // "Once upon a time": 16 bytes, 4 prompt tokens.
    assert_eq!(
        ev[2].data,
        format!(
            "{{\"choices\":[{{\"text\":\"\",\"index\":0,\"logprobs\":null,\
             \"finish_reason\":\"length\"}}]{tail},\"usage\":{{\"completion_tokens\":2,\
             \"prompt_tokens\":4,\"total_tokens\":6}},\"id\":\"{id}\",\"timings\":{}}}",
            timings_json(4, 100.0, 2, 20.0)
        )
    );
    assert_eq!(ev[3].data, "[DONE]");
    sim.shutdown().await;
}

/// vLLM's `metrics` for a request that waited `queue` ms for its slot and made 4 tokens.
fn vllm_metrics(queue: f64) -> String {
    // Prefill 100 ms, decode 3 steps of 20 ms; 4 tokens over the 160 ms after the slot.
    format!(
        "{{\"time_to_first_token_ms\":100.0,\"generation_time_ms\":60.0,\
         \"queue_time_ms\":{},\"mean_itl_ms\":20.0,\"tokens_per_second\":25.0}}",
        serde_json::to_string(&queue).unwrap()
    )
}

#[tokio::test(start_paused = true)]
async fn vllm_request_metrics_follow_the_timing_model_and_real_queueing() {
    let mut config = exact(Flavor::Vllm);
    config.request_metrics = true;
    config.timing.max_num_seqs = 1;
    let sim = common::sim(config).await;
    let c = common::client();
    let body = chat(json!({"stream": true, "max_tokens": 4,
        "stream_options": {"include_usage": true}}));
    let (a, b) = tokio::join!(
        stream(&c, &sim, "/v1/chat/completions", &body),
        stream(&c, &sim, "/v1/chat/completions", &body),
    );
    let mut runs = [a, b];
    runs.sort_by_key(|ev| ev[0].ms);
    // The second waits for the first's last token (160 ms), then prefills 100 ms.
    assert_eq!(runs[0][0].ms, 100);
    assert_eq!(runs[1][0].ms, 260);
    for (ev, queue) in runs.iter().zip([0.0, 160.0]) {
        // role + 4 tokens (the role in the first token's write), usage, [DONE]
        assert_eq!(ev.len(), 7, "{ev:#?}");
        let usage = &ev[5];
        let id = usage.json()["id"].as_str().unwrap().to_owned();
        assert_eq!(
            usage.data,
            format!(
                "{{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\
                 \"created\":{SEEDED_CREATED},\"model\":\"{MODEL}\",\"choices\":[],\
                 \"usage\":{{\"prompt_tokens\":6,\"total_tokens\":10,\"completion_tokens\":4}},\
                 \"metrics\":{}}}",
                vllm_metrics(queue)
            )
        );
        // Only the usage chunk carries metrics.
        assert_eq!(ev.iter().filter(|e| e.data.contains("metrics")).count(), 1);
    }

    // Without include_usage there is no usage chunk, so no metrics (like vLLM).
    let ev = stream(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "max_tokens": 4})),
    )
    .await;
    assert!(ev.iter().all(|e| !e.data.contains("metrics")), "{ev:#?}");

    // Non-streaming: the object after the other fields; n = 2 gets null.
    let (text, v) = full(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 4})),
    )
    .await;
    assert!(
        text.ends_with(&format!(
            ",\"prompt_logprobs\":null,\"kv_transfer_params\":null,\"metrics\":{}}}",
            vllm_metrics(0.0)
        )),
        "{text}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 4);
    // Without a reasoning model the message keeps vLLM's `reasoning_content: null`.
    assert!(
        text.contains("\"tool_calls\":[],\"reasoning_content\":null},\"logprobs\""),
        "{text}"
    );
    let (_, v) = full(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 4, "n": 2})),
    )
    .await;
    assert!(v["metrics"].is_null() && v.get("metrics").is_some(), "{v}");

    // A single token: no mean ITL, which the stream leaves out and the body writes as null.
    let ev = stream(
        &c,
        &sim,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Once upon a time", "stream": true,
            "max_tokens": 1, "stream_options": {"include_usage": true}})
        .to_string(),
    )
    .await;
    let m = ev[1].json()["metrics"].clone();
    assert_eq!(
        m,
        json!({"time_to_first_token_ms": 100.0, "generation_time_ms": 0.0,
            "queue_time_ms": 0.0, "tokens_per_second": 10.0})
    );
    let (_, v) = full(
        &c,
        &sim,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1}).to_string(),
    )
    .await;
    assert!(v["metrics"]["mean_itl_ms"].is_null(), "{v}");
    assert_eq!(v["metrics"]["tokens_per_second"], 10.0);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn llama_cpp_timings_and_metrics_combine() {
    let mut config = exact(Flavor::LlamaCpp);
    config.request_metrics = true;
    let sim = common::sim(config).await;
    let c = common::client();
    let ev = stream(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "max_tokens": 4,
            "stream_options": {"include_usage": true}})),
    )
    .await;
    let usage = ev[ev.len() - 2].json();
    assert_eq!(
        key_order(&ev[ev.len() - 2].data),
        [
            "choices",
            "created",
            "id",
            "model",
            "system_fingerprint",
            "object",
            "usage",
            "metrics",
            "timings"
        ]
    );
    assert!(
        ev[ev.len() - 2]
            .data
            .contains(&format!(",\"metrics\":{},\"timings\":", vllm_metrics(0.0))),
        "{}",
        ev[ev.len() - 2].data
    );
    assert_eq!(usage["timings"]["predicted_ms"], 60.0);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn reasoning_then_content() {
    let mut config = exact(Flavor::Vllm);
    config.reasoning_tokens = 2;
    let sim = common::sim(config).await;
    let c = common::client();
    let body = chat(json!({"stream": true, "max_tokens": 4}));
    let ev = stream(&c, &sim, "/v1/chat/completions", &body).await;
    let times: Vec<u128> = ev.iter().map(|e| e.ms).collect();
    assert_eq!(times, [100, 100, 120, 140, 160, 160], "{ev:#?}");
    assert_eq!(
        ev[0].json()["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let id = ev[0].json()["id"].as_str().unwrap().to_owned();
    let head = format!(
        "{{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{SEEDED_CREATED},\
         \"model\":\"{MODEL}\",\"choices\":[{{\"index\":0,\"delta\":"
    );
    for (e, field) in ev[1..5]
        .iter()
        .zip(["reasoning", "reasoning", "content", "content"])
    {
        let word = delta_text(e, field);
        let finish = if field == "content" && e.ms == 160 {
            "\"length\",\"stop_reason\":null"
        } else {
            "null"
        };
        assert_eq!(
            e.data,
            format!(
                "{head}{{\"{field}\":{}}},\"logprobs\":null,\"finish_reason\":{finish}}}]}}",
                q(&word)
            )
        );
    }
    // The answer starts a new text: no leading space.
    assert!(!delta_text(&ev[3], "content").starts_with(' '));

    // Not streamed: the words split into reasoning and content.
    let (text, v) = full(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 4})),
    )
    .await;
    let msg = &v["choices"][0]["message"];
    let words = |v: &Value| {
        v.as_str()
            .unwrap()
            .split(' ')
            .filter(|w| !w.is_empty())
            .count()
    };
    assert!((1..=2).contains(&words(&msg["reasoning"])), "{msg}");
    assert!((1..=2).contains(&words(&msg["content"])), "{msg}");
    assert!(msg.get("reasoning_content").is_none(), "{msg}");
    assert!(
        text.contains("\"tool_calls\":[],\"reasoning\":\""),
        "{text}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 4);
    sim.shutdown().await;

    // `reasoning_content`, and reasoning longer than the output: all reasoning, no content.
    let mut config = exact(Flavor::Vllm);
    config.reasoning_tokens = 10;
    config.reasoning_field = Some(ReasoningField::ReasoningContent);
    let sim = common::sim(config).await;
    let ev = stream(&c, &sim, "/v1/chat/completions", &body).await;
    for e in &ev[1..5] {
        let delta = &e.json()["choices"][0]["delta"];
        assert_eq!(keys(delta), ["reasoning_content"], "{}", e.data);
    }
    let (_, v) = full(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 4})),
    )
    .await;
    let msg = &v["choices"][0]["message"];
    assert!(msg["content"].is_null(), "{msg}");
    assert_eq!(
        msg["reasoning_content"]
            .as_str()
            .unwrap()
            .split(' ')
            .count(),
        4
    );
    sim.shutdown().await;

    // llama.cpp names it `reasoning_content` by default; each kind of text is its own event.
    let mut config = exact(Flavor::LlamaCpp);
    config.reasoning_tokens = 1;
    config.timing.tokens_per_chunk = 2;
    let sim = common::sim(config).await;
    let ev = stream(&c, &sim, "/v1/chat/completions", &body).await;
    let kinds: Vec<(u128, Vec<String>)> = ev[..ev.len() - 1]
        .iter()
        .map(|e| {
            let j = e.json();
            let d = &j["choices"][0]["delta"];
            (e.ms, keys(d).into_iter().map(str::to_owned).collect())
        })
        .collect();
    let k = |ms, v: &[&str]| (ms, v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(
        kinds,
        [
            k(0, &["content", "role"]),
            k(100, &["reasoning_content"]),
            k(140, &["content"]),
            k(160, &["content"]),
            k(160, &[]),
        ]
    );
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn tool_calls_in_both_flavors() {
    let tools = json!([{"type": "function", "function": {"name": "lookup_city",
        "parameters": {"type": "object"}}}]);
    for flavor in [Flavor::Vllm, Flavor::LlamaCpp] {
        let mut config = exact(flavor);
        config.tool_calls = true;
        config.output.min_tokens = 4;
        config.output.max_tokens = 4;
        let sim = common::sim(config).await;
        let c = common::client();
        // 4 tokens: the call's opening, two argument fragments, end of sequence.
        let ev = stream(
            &c,
            &sim,
            "/v1/chat/completions",
            &chat(json!({"stream": true, "tools": tools})),
        )
        .await;
        let calls: Vec<(u128, Value)> = ev
            .iter()
            .filter(|e| e.data.contains("\"tool_calls\":["))
            .map(|e| {
                (
                    e.ms,
                    e.json()["choices"][0]["delta"]["tool_calls"][0].clone(),
                )
            })
            .collect();
        assert_eq!(
            calls.iter().map(|c| c.0).collect::<Vec<_>>(),
            [100, 120, 140],
            "{ev:#?}"
        );
        let opening = &calls[0].1;
        let call_id = opening["id"].as_str().unwrap().to_owned();
        let opening_raw = match flavor {
            Flavor::Vllm => {
                assert!(call_id.starts_with("chatcmpl-tool-") && call_id.len() == 14 + 32);
                format!(
                    "{{\"tool_calls\":[{{\"id\":\"{call_id}\",\"type\":\"function\",\"index\":0,\
                     \"function\":{{\"name\":\"lookup_city\"}}}}]}}"
                )
            }
            Flavor::LlamaCpp => {
                assert_eq!(call_id.len(), 32);
                format!(
                    "{{\"tool_calls\":[{{\"index\":0,\"id\":\"{call_id}\",\"type\":\"function\",\
                     \"function\":{{\"name\":\"lookup_city\",\"arguments\":\"\"}}}}]}}"
                )
            }
        };
        assert!(
            ev.iter()
                .any(|e| e.data.contains(&format!("\"delta\":{opening_raw}"))),
            "{opening_raw} in {ev:#?}"
        );
        let mut args = String::new();
        for (_, frag) in &calls[1..] {
            assert_eq!(keys(frag), ["function", "index"]);
            assert_eq!(keys(&frag["function"]), ["arguments"]);
            args.push_str(frag["function"]["arguments"].as_str().unwrap());
        }
        let parsed: Value = serde_json::from_str(&args).unwrap();
        assert_eq!(
            parsed["query"].as_str().unwrap().split(' ').count(),
            2,
            "{args}"
        );
        // The end: `{}` with finish_reason "tool_calls" at the end-of-sequence step.
        let last = ev[ev.len() - 2].json();
        assert_eq!(ev[ev.len() - 2].ms, 160);
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
        // No answer text: only the role chunk mentions content.
        assert!(
            ev.iter()
                .all(|e| !e.data.contains("\"content\":\"") || e.data.contains("\"role\"")),
            "{ev:#?}"
        );

        // Not streamed: the same call in the message.
        let (_, v) = full(
            &c,
            &sim,
            "/v1/chat/completions",
            &chat(json!({"tools": tools})),
        )
        .await;
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert!(choice["message"]["content"].is_null(), "{v}");
        // (`stream` is part of the body that seeds ids and text, so they differ.)
        let call = &choice["message"]["tool_calls"][0];
        let id = call["id"].as_str().unwrap();
        assert_eq!(id.len(), call_id.len(), "{id}");
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "lookup_city");
        let parsed: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(parsed["query"].as_str().unwrap().split(' ').count(), 2);
        sim.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn tool_call_without_tools_and_cut_by_max_tokens() {
    let mut config = exact(Flavor::Vllm);
    config.tool_calls = true;
    let sim = common::sim(config).await;
    let c = common::client();
    let (_, v) = full(
        &c,
        &sim,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 2})),
    )
    .await;
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    let args = choice["message"]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap();
    let parsed: Value = serde_json::from_str(args).unwrap();
    assert_eq!(parsed["query"].as_str().unwrap().split(' ').count(), 1);
    // Completions are never tool calls.
    let (_, v) = full(
        &c,
        &sim,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}).to_string(),
    )
    .await;
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(!v["choices"][0]["text"].as_str().unwrap().is_empty());
    sim.shutdown().await;
}

#[test]
fn flavor_settings_parse_and_name_their_errors() {
    let c = SimConfig::from_toml_str(
        "flavor = \"llama.cpp\"\nreasoning_tokens = 3\nreasoning_field = \"reasoning\"\n\
         tool_calls = true\nrequest_metrics = true\n",
    )
    .unwrap();
    assert_eq!(c.flavor, Flavor::LlamaCpp);
    assert_eq!(c.reasoning_tokens, 3);
    assert_eq!(c.reasoning_field, Some(ReasoningField::Reasoning));
    assert!(c.tool_calls && c.request_metrics);
    assert_eq!(SimConfig::default().flavor, Flavor::Vllm);
    let err = SimConfig::from_toml_str("flavor = \"tgi\"").unwrap_err();
    assert!(err.to_string().contains("flavor"), "{err}");
    let err = SimConfig::from_toml_str("reasoning_field = \"thinking\"").unwrap_err();
    assert!(err.to_string().contains("reasoning_field"), "{err}");
    assert_eq!("llama.cpp".parse::<Flavor>(), Ok(Flavor::LlamaCpp));
    assert_eq!("vllm".parse::<Flavor>(), Ok(Flavor::Vllm));
    assert!("sglang".parse::<Flavor>().unwrap_err().contains("sglang"));
    assert_eq!(Flavor::LlamaCpp.to_string(), "llama.cpp");
}

/// Through the proxy, a client gets every flavor's bytes unchanged: with its own
/// `include_usage` the usage chunk with `metrics` / `timings` too, without it the same stream
/// minus the usage chunk the proxy asked for and cut.
#[tokio::test]
async fn flavors_pass_through_the_proxy_unchanged() {
    for flavor in [Flavor::Vllm, Flavor::LlamaCpp] {
        let mut config = common::exact_sim(2.0, 1.0);
        config.flavor = flavor;
        config.request_metrics = true;
        config.reasoning_tokens = 1;
        let sim = common::sim(config).await;
        let proxy = tokentap::start(common::proxy_config(&sim.base_url()))
            .await
            .unwrap();
        let c = common::client();
        let direct = sim.base_url();
        let via = format!("http://{}", proxy.addr());
        for body in [
            chat(json!({"stream": true, "max_tokens": 4,
                "stream_options": {"include_usage": true}})),
            chat(json!({"stream": true, "max_tokens": 4})),
        ] {
            let a = common::post(&c, &format!("{direct}/v1/chat/completions"), &body).await;
            let b = common::post(&c, &format!("{via}/v1/chat/completions"), &body).await;
            assert_eq!(b.status, 200);
            let a = String::from_utf8(a.body.to_vec()).unwrap();
            let b = String::from_utf8(b.body.to_vec()).unwrap();
            if flavor == Flavor::LlamaCpp && !body.contains("include_usage") {
                // llama.cpp puts `timings` on the finish chunk without a usage chunk, and on
                // the usage chunk (cut by the proxy) when usage was asked for.
                assert!(
                    a.contains("\"delta\":{}}],") && a.contains("\"timings\":"),
                    "{a}"
                );
                assert!(
                    !b.contains("\"timings\":") && !b.contains("\"usage\""),
                    "{b}"
                );
                assert_eq!(b.matches("data: ").count(), a.matches("data: ").count());
            } else {
                assert_eq!(a, b, "{flavor}");
            }
            assert!(a.ends_with("data: [DONE]\n\n"));
        }
        proxy.shutdown().await;
        sim.shutdown().await;
    }
}
