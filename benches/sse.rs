//! Throughput of the per-chunk hot path: SSE splitting + classification, and the same with the
//! latency state machine, on vLLM-shaped chat chunks.
//!
//! Run: `cargo bench --bench sse` (reports bytes/s; events/s is in the `events` group).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tokentap::latency::Latency;
use tokentap::sse::SseParser;

/// A vLLM chat stream of `tokens` content chunks, as one byte string.
fn vllm_stream(tokens: usize) -> Vec<u8> {
    let mut s = String::new();
    let head = r#"{"id":"chatcmpl-8f1c2a9e0b7d4e3fa1c25e6d7b8a9c0d","object":"chat.completion.chunk","created":1735689600,"model":"Qwen/Qwen2.5-7B-Instruct","choices":[{"index":0,"delta":"#;
    s.push_str(&format!(
        "data: {head}{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
    ));
    for i in 0..tokens {
        let word = [
            "the",
            " proxy",
            " measures",
            " latency",
            ",",
            " token\\n",
            " by",
        ][i % 7];
        s.push_str(&format!(
            "data: {head}{{\"content\":\"{word}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        ));
    }
    s.push_str(r#"data: {"id":"chatcmpl-8f1c2a9e0b7d4e3fa1c25e6d7b8a9c0d","object":"chat.completion.chunk","created":1735689600,"model":"Qwen/Qwen2.5-7B-Instruct","choices":[],"usage":{"prompt_tokens":120,"total_tokens":1120,"completion_tokens":1000}}"#);
    s.push_str("\n\ndata: [DONE]\n\n");
    s.into_bytes()
}

/// The stream cut into one frame per event, as vLLM writes it.
fn frames(stream: &[u8]) -> Vec<&[u8]> {
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
    let frames = frames(&stream);
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
