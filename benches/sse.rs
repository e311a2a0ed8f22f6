//! Throughput of the per-chunk hot path: SSE splitting + classification, and the same with the
//! latency state machine, on vLLM-shaped chat chunks, and on vLLM-shaped Responses and Messages
//! streams (the parser with their dialect).
//!
//! Run: `cargo bench --bench sse` (reports bytes/s; events/s is in the `events` group).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tokentap::latency::Latency;
use tokentap::sse::{Dialect, SseParser};

const WORDS: [&str; 7] = [
    "the",
    " proxy",
    " measures",
    " latency",
    ",",
    " token\\n",
    " by",
];

/// A vLLM chat stream of `tokens` content chunks, as one byte string.
fn vllm_stream(tokens: usize) -> Vec<u8> {
    let mut s = String::new();
    let head = r#"{"id":"chatcmpl-8f1c2a9e0b7d4e3fa1c25e6d7b8a9c0d","object":"chat.completion.chunk","created":1735689600,"model":"Qwen/Qwen2.5-7B-Instruct","choices":[{"index":0,"delta":"#;
    s.push_str(&format!(
        "data: {head}{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
    ));
    for i in 0..tokens {
        let word = WORDS[i % 7];
        s.push_str(&format!(
            "data: {head}{{\"content\":\"{word}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        ));
    }
    s.push_str(r#"data: {"id":"chatcmpl-8f1c2a9e0b7d4e3fa1c25e6d7b8a9c0d","object":"chat.completion.chunk","created":1735689600,"model":"Qwen/Qwen2.5-7B-Instruct","choices":[],"usage":{"prompt_tokens":120,"total_tokens":1120,"completion_tokens":1000}}"#);
    s.push_str("\n\ndata: [DONE]\n\n");
    s.into_bytes()
}

/// A vLLM `/v1/responses` stream of `tokens` text deltas, with its bookkeeping events, as one
/// byte string.
fn responses_stream(tokens: usize) -> Vec<u8> {
    let ev = |name: &str, data: &str| format!("event: {name}\ndata: {data}\n\n");
    let response = |status: &str, usage: &str| {
        format!(
            r#"{{"id":"resp_8f1c2a9e0b7d4e3fa1c25e6d7b8a9c0d","object":"response","created_at":1735689600,"model":"Qwen/Qwen2.5-7B-Instruct","status":"{status}","output":[],"usage":{usage}}}"#
        )
    };
    let mut s = ev(
        "response.created",
        &format!(
            r#"{{"type":"response.created","sequence_number":0,"response":{}}}"#,
            response("in_progress", "null")
        ),
    );
    s.push_str(&ev(
        "response.output_item.added",
        r#"{"type":"response.output_item.added","sequence_number":1,"output_index":0,"item":{"id":"msg_8f1c2a9e","type":"message","status":"in_progress","role":"assistant","content":[]}}"#,
    ));
    for i in 0..tokens {
        s.push_str(&ev(
            "response.output_text.delta",
            &format!(
                r#"{{"type":"response.output_text.delta","sequence_number":{},"item_id":"msg_8f1c2a9e","output_index":0,"content_index":0,"delta":"{}","logprobs":[]}}"#,
                i + 2,
                WORDS[i % 7]
            ),
        ));
    }
    s.push_str(&ev(
        "response.output_text.done",
        r#"{"type":"response.output_text.done","item_id":"msg_8f1c2a9e","output_index":0,"content_index":0,"text":"…"}"#,
    ));
    s.push_str(&ev(
        "response.completed",
        &format!(
            r#"{{"type":"response.completed","response":{}}}"#,
            response(
                "completed",
                r#"{"input_tokens":120,"input_tokens_details":{"cached_tokens":0},"output_tokens":1000,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":1120}"#
            )
        ),
    ));
    s.into_bytes()
}

/// A vLLM `/v1/messages` stream of `tokens` text deltas, with its bookkeeping events, as one
/// byte string.
fn messages_stream(tokens: usize) -> Vec<u8> {
    let ev = |name: &str, data: &str| format!("event: {name}\ndata: {data}\n\n");
    let mut s = ev(
        "message_start",
        r#"{"type":"message_start","message":{"id":"msg_8f1c2a9e0b7d4e3fa1c25e6d","type":"message","role":"assistant","content":[],"model":"Qwen/Qwen2.5-7B-Instruct","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":120,"output_tokens":0}}}"#,
    );
    s.push_str(&ev(
        "content_block_start",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    ));
    for i in 0..tokens {
        s.push_str(&ev(
            "content_block_delta",
            &format!(
                r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{}"}}}}"#,
                WORDS[i % 7]
            ),
        ));
    }
    s.push_str(&ev(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    ));
    s.push_str(&ev(
        "message_delta",
        r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens","stop_sequence":null},"usage":{"input_tokens":120,"output_tokens":1000}}"#,
    ));
    s.push_str(&ev("message_stop", r#"{"type":"message_stop"}"#));
    s.into_bytes()
}

/// The stream cut into one frame per event, as vLLM writes it.
fn frames_of(stream: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..stream.len().saturating_sub(1) {
        if &stream[i..i + 2] == b"\n\n" {
            out.push(&stream[start..i + 2]);
            start = i + 2;
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let stream = vllm_stream(1000);
    let frames = frames_of(&stream);
    let events = frames.len() as u64;

    let mut g = c.benchmark_group("bytes");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("parse_classify/frame_per_event", |b| {
        b.iter(|| {
            let mut p = SseParser::new();
            let mut n = 0u32;
            for f in &frames {
                p.feed(black_box(f), |e| n += e.choices.len() as u32);
            }
            n
        })
    });
    g.bench_function("parse_classify/one_big_frame", |b| {
        b.iter(|| {
            let mut p = SseParser::new();
            let mut n = 0u32;
            p.feed(black_box(&stream), |e| n += e.choices.len() as u32);
            n
        })
    });
    g.finish();

    let mut g = c.benchmark_group("events");
    g.throughput(Throughput::Elements(events));
    g.bench_function("parse_classify_latency/frame_per_event", |b| {
        let now = tokio::time::Instant::now();
        b.iter(|| {
            let mut p = SseParser::new();
            let mut lat = Latency::new(now);
            for f in &frames {
                p.feed(black_box(f), |e| {
                    lat.on_event(e, now, |o| {
                        black_box(o);
                    })
                });
            }
            lat.figures(now)
        })
    });
    g.finish();

    // The other APIs' streams: one frame per event, through the parser with their dialect and
    // the latency state machine, per byte and per event.
    for (name, dialect, stream) in [
        ("responses", Dialect::Responses, responses_stream(1000)),
        ("messages", Dialect::Messages, messages_stream(1000)),
    ] {
        let frames = frames_of(&stream);
        let run = |frames: &[&[u8]]| {
            let now = tokio::time::Instant::now();
            let mut p = SseParser::new().with_dialect(dialect);
            let mut lat = Latency::new(now);
            for f in frames {
                p.feed(black_box(f), |e| {
                    lat.on_event(e, now, |o| {
                        black_box(o);
                    })
                });
            }
            lat.figures(now)
        };
        assert_eq!(run(&frames).chunks, 1000, "{name}: every delta is output");
        let mut g = c.benchmark_group("bytes");
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_function(format!("{name}_latency/frame_per_event"), |b| {
            b.iter(|| run(&frames))
        });
        g.finish();
        let mut g = c.benchmark_group("events");
        g.throughput(Throughput::Elements(frames.len() as u64));
        g.bench_function(format!("{name}_latency/frame_per_event"), |b| {
            b.iter(|| run(&frames))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
