//! The Responses and Messages rules: bench's own answers for Responses (the `responses_*`
//! vectors), and one test per Anthropic event type for Messages.

use std::time::Duration;

use tokio::time::Instant;

use super::api_events::{messages, responses};
use super::*;
use crate::latency::{Latency, Observation, TokenSource};

const MS: Duration = Duration::from_millis(1);

#[derive(serde::Deserialize)]
struct Vectors {
    vectors: Vec<Vector>,
}

#[derive(serde::Deserialize)]
struct Vector {
    name: String,
    endpoint: String,
    events: Vec<String>,
    ttft_event: Option<usize>,
    itl_pairs: Vec<(usize, usize)>,
    e2el_event: Option<usize>,
    output_tokens: Option<u64>,
}

/// What a stream measured when its event `k` reached the client `k + 1` ms after the request
/// arrived, split into frames of `cut` bytes (0: one frame per event).
struct Run {
    observations: Vec<Observation>,
    /// Index of each event reported, in order.
    kinds: Vec<EventKind>,
    figures: crate::latency::Figures,
}

fn run(dialect: Dialect, events: &[String], cut: usize) -> Run {
    let t0 = Instant::now();
    let mut lat = Latency::new(t0);
    let mut p = SseParser::new().with_dialect(dialect);
    let mut observations = Vec::new();
    let mut kinds = Vec::new();
    let blocks: Vec<String> = events.iter().map(|e| format!("{e}\n\n")).collect();
    // Every frame is handed on when its event's time comes; with `cut`, an event's bytes are
    // handed on in pieces, the last of which completes it at its time.
    for (k, block) in blocks.iter().enumerate() {
        let now = t0 + MS * (k as u32 + 1);
        let pieces: Vec<&[u8]> = if cut == 0 {
            vec![block.as_bytes()]
        } else {
            block.as_bytes().chunks(cut).collect()
        };
        for piece in pieces {
            lat.on_bytes(now);
            p.feed(piece, |e| {
                kinds.push(e.kind);
                lat.on_event(e, now, |o| observations.push(o));
            });
        }
    }
    assert!(!p.has_partial_event());
    let figures = lat.figures(t0 + MS * 1000);
    Run {
        observations,
        kinds,
        figures,
    }
}

fn at(k: usize) -> Duration {
    MS * (k as u32 + 1)
}

/// Bench's answers for every Responses vector: the TTFT event, each ITL pair, the E2EL event
/// and the output tokens, whether the stream comes one event per frame or cut anywhere.
#[test]
fn responses_vectors_agree_with_bench() {
    let file: Vectors =
        serde_json::from_str(include_str!("../../tests/vectors/vllm-bench-0.33.json")).unwrap();
    let vectors: Vec<&Vector> = file
        .vectors
        .iter()
        .filter(|v| v.endpoint == "responses")
        .collect();
    assert!(vectors.len() >= 3, "the responses_* vectors are there");
    for v in vectors {
        for cut in [0, 1, 7, 64] {
            let r = run(Dialect::Responses, &v.events, cut);
            let name = format!("{} (cut {cut})", v.name);
            assert_eq!(r.kinds.len(), v.events.len(), "{name}: one event per block");
            assert_eq!(r.figures.ttft, v.ttft_event.map(at), "{name}: TTFT");
            let itls: Vec<Duration> = r
                .observations
                .iter()
                .filter_map(|o| match o {
                    Observation::Itl(d) => Some(*d),
                    _ => None,
                })
                .collect();
            let expected: Vec<Duration> = v.itl_pairs.iter().map(|&(a, b)| at(b) - at(a)).collect();
            assert_eq!(itls, expected, "{name}: ITL");
            let e2el = v.e2el_event.expect("every responses vector ends");
            assert_eq!(r.figures.e2el, at(e2el), "{name}: E2EL");
            assert_eq!(r.figures.output_tokens, v.output_tokens, "{name}: tokens");
            assert_eq!(r.figures.token_source, TokenSource::Usage, "{name}");
            assert!(r.figures.done, "{name}: the response ended");
            assert!(!r.figures.inband_error, "{name}");
            assert_eq!(r.figures.other_events, 0, "{name}: nothing unrecognized");
        }
    }
}

fn ev(name: &str, data: &str) -> String {
    format!("event: {name}\ndata: {data}")
}

#[test]
fn responses_events_by_type() {
    let kind = |data: &str| responses(data.as_bytes()).kind;
    assert_eq!(
        kind(r#"{"type":"response.output_text.delta","delta":"a"}"#),
        ApiKind::Output(Output::Content)
    );
    assert_eq!(
        kind(r#"{"type":"response.reasoning_text.delta","delta":"r"}"#),
        ApiKind::Output(Output::Reasoning)
    );
    assert_eq!(
        kind(
            r#"{"type":"response.function_call_arguments.delta","item_id":"fc_1","output_index":0,"delta":"{\"ci"}"#
        ),
        ApiKind::Output(Output::ToolCall)
    );
    // An empty delta carries nothing.
    assert_eq!(
        kind(r#"{"type":"response.output_text.delta","delta":""}"#),
        ApiKind::NonOutput
    );
    for name in [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.function_call_arguments.done",
        "response.reasoning_summary_part.added",
    ] {
        assert_eq!(
            kind(&format!(r#"{{"type":"{name}","sequence_number":3}}"#)),
            ApiKind::NonOutput,
            "{name}"
        );
    }
    assert_eq!(
        kind(r#"{"type":"error","code":"server_error","message":"boom","sequence_number":4}"#),
        ApiKind::Error
    );
    assert_eq!(
        kind(
            r#"{"type":"response.failed","response":{"id":"resp_1","status":"failed","error":{"code":"server_error"}}}"#
        ),
        ApiKind::Error
    );
    assert_eq!(kind("not json"), ApiKind::Other);
    assert_eq!(kind(r#"{"delta":"a"}"#), ApiKind::Other);
    assert_eq!(kind(r#"{"type":7}"#), ApiKind::Other);
}

#[test]
fn responses_usage_id_model_and_status() {
    let e = responses(
        br#"{"type":"response.completed","sequence_number":9,"response":{"id":"resp_7","object":"response","model":"m/x","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":8},"output_tokens":30,"output_tokens_details":{"reasoning_tokens":20},"total_tokens":42}}}"#,
    );
    assert_eq!(e.kind, ApiKind::End);
    assert_eq!((e.id, e.model), (Some("resp_7"), Some("m/x")));
    assert_eq!(
        e.usage,
        Some(ApiUsage {
            input_tokens: Some(12),
            output_tokens: Some(30),
            cached_tokens: Some(8),
            reasoning_tokens: Some(20),
        })
    );
    assert_eq!(
        e.finish,
        Some(Finish {
            reason: FinishReason::Stop,
            native: "completed"
        })
    );
    let e = responses(
        br#"{"type":"response.incomplete","response":{"id":"r","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"usage":{"input_tokens":"x","output_tokens":null}}}"#,
    );
    assert_eq!(e.kind, ApiKind::End);
    assert_eq!(
        e.finish,
        Some(Finish {
            reason: FinishReason::Length,
            native: "max_output_tokens"
        })
    );
    // Counts that are not numbers are no observation, not zeros, and hide nothing else.
    assert_eq!(e.usage.map(|u| u.usage()), Some(Usage::default()));
    // `response.created` names the response before any output.
    let e = responses(
        br#"{"type":"response.created","response":{"id":"resp_7","model":"m","status":"in_progress","usage":null}}"#,
    );
    assert_eq!(
        (e.kind, e.id, e.model, e.usage),
        (ApiKind::NonOutput, Some("resp_7"), Some("m"), None)
    );
}

#[test]
fn responses_tool_call_and_error_through_the_state_machine() {
    let events = vec![
        ev(
            "response.created",
            r#"{"type":"response.created","response":{"id":"resp_1","model":"m"}}"#,
        ),
        ev(
            "response.output_item.added",
            r#"{"type":"response.output_item.added","output_index":0,"item":{"type":"function_call","name":"get"}}"#,
        ),
        ev(
            "response.function_call_arguments.delta",
            r#"{"type":"response.function_call_arguments.delta","delta":"{\"a\""}"#,
        ),
        ev(
            "response.function_call_arguments.delta",
            r#"{"type":"response.function_call_arguments.delta","delta":":1}"}"#,
        ),
        ev(
            "response.function_call_arguments.done",
            r#"{"type":"response.function_call_arguments.done","arguments":"{\"a\":1}"}"#,
        ),
        ev(
            "error",
            r#"{"type":"error","code":"server_error","message":"x"}"#,
        ),
    ];
    let r = run(Dialect::Responses, &events, 0);
    assert_eq!(r.figures.ttft, Some(at(2)));
    assert_eq!(r.figures.itl_count, 1);
    assert_eq!(r.figures.e2el, at(3));
    assert!(r.figures.inband_error);
    assert!(!r.figures.done);
    // No usage: the output events are counted.
    assert_eq!(r.figures.output_tokens, Some(2));
    assert_eq!(r.figures.token_source, TokenSource::Chunks);
}

#[test]
fn responses_done_marker_and_comments() {
    let events = vec![
        ": keep-alive".to_owned(),
        ev(
            "response.output_text.delta",
            r#"{"type":"response.output_text.delta","delta":"a"}"#,
        ),
        "data: [DONE]".to_owned(),
    ];
    let r = run(Dialect::Responses, &events, 0);
    assert_eq!(
        r.kinds,
        vec![EventKind::NoData, EventKind::Token, EventKind::Done]
    );
    assert!(r.figures.done);
}

/// A Messages stream as vLLM sends it: thinking, then text.
fn thinking_then_text() -> Vec<String> {
    vec![
        ev(
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"m","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":11,"output_tokens":0}}}"#,
        ),
        ev("ping", r#"{"type":"ping"}"#),
        ev(
            "content_block_start",
            r#"{"index":0,"type":"content_block_start","content_block":{"type":"thinking","thinking":""}}"#,
        ),
        ev(
            "content_block_delta",
            r#"{"index":0,"type":"content_block_delta","delta":{"type":"thinking_delta","thinking":"Let"}}"#,
        ),
        ev(
            "content_block_delta",
            r#"{"index":0,"type":"content_block_delta","delta":{"type":"thinking_delta","thinking":" me"}}"#,
        ),
        ev(
            "content_block_delta",
            r#"{"index":0,"type":"content_block_delta","delta":{"type":"signature_delta","signature":"9f1c"}}"#,
        ),
        ev(
            "content_block_stop",
            r#"{"index":0,"type":"content_block_stop"}"#,
        ),
        ev(
            "content_block_start",
            r#"{"index":1,"type":"content_block_start","content_block":{"type":"text","text":""}}"#,
        ),
        ev(
            "content_block_delta",
            r#"{"index":1,"type":"content_block_delta","delta":{"type":"text_delta","text":"Hi"}}"#,
        ),
        ev(
            "content_block_delta",
            r#"{"index":1,"type":"content_block_delta","delta":{"type":"text_delta","text":"!"}}"#,
        ),
        ev(
            "content_block_stop",
            r#"{"index":1,"type":"content_block_stop"}"#,
        ),
        ev(
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":11,"output_tokens":4}}"#,
        ),
        ev("message_stop", r#"{"type":"message_stop"}"#),
    ]
}

#[test]
fn messages_thinking_then_text() {
    for cut in [0, 1, 5, 33] {
        let r = run(Dialect::Messages, &thinking_then_text(), cut);
        let f = &r.figures;
        assert_eq!(f.ttft, Some(at(3)), "cut {cut}: the first thinking delta");
        // Thinking 3→4, then across the signature, block stop and start to the text 4→8,
        // then 8→9: bookkeeping neither samples nor resets the clock.
        let itls: Vec<_> = r
            .observations
            .iter()
            .filter_map(|o| match o {
                Observation::Itl(d) => Some(*d),
                _ => None,
            })
            .collect();
        assert_eq!(itls, vec![MS, 4 * MS, MS], "cut {cut}");
        assert_eq!(f.e2el, at(9), "cut {cut}: the last text delta");
        assert_eq!(f.output_tokens, Some(4));
        assert_eq!(f.token_source, TokenSource::Usage);
        assert_eq!(f.prompt_tokens, Some(11));
        assert_eq!(f.tpot, Some((at(9) - at(3)) / 3));
        assert!(f.done && !f.inband_error);
        assert_eq!(f.finish_reason, Some(FinishReason::Stop), "cut {cut}");
        assert_eq!(f.stop_reason, Some("end_turn"), "cut {cut}");
        assert_eq!(f.reasoning_tokens, None, "Anthropic's usage does not say");
        assert_eq!(
            f.other_events, 0,
            "ping and bookkeeping are not unrecognized"
        );
        assert_eq!(f.chunks, 4);
    }
}

#[test]
fn messages_events_by_type() {
    let kind = |data: &str| messages(data.as_bytes()).kind;
    let delta = |d: &str| {
        kind(&format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{d}}}"#
        ))
    };
    assert_eq!(
        delta(r#"{"type":"text_delta","text":"a"}"#),
        ApiKind::Output(Output::Content)
    );
    assert_eq!(
        delta(r#"{"type":"thinking_delta","thinking":"t"}"#),
        ApiKind::Output(Output::Reasoning)
    );
    assert_eq!(
        delta(r#"{"type":"input_json_delta","partial_json":"{\"city\": \"Pa"}"#),
        ApiKind::Output(Output::ToolCall)
    );
    // Anthropic opens a tool's input with an empty fragment: nothing generated yet.
    assert_eq!(
        delta(r#"{"type":"input_json_delta","partial_json":""}"#),
        ApiKind::NonOutput
    );
    assert_eq!(
        delta(r#"{"type":"signature_delta","signature":"EqQB"}"#),
        ApiKind::NonOutput
    );
    assert_eq!(
        delta(r#"{"type":"citations_delta","citation":{}}"#),
        ApiKind::NonOutput
    );
    assert_eq!(kind(r#"{"type":"ping"}"#), ApiKind::Ping);
    assert_eq!(kind(r#"{"type":"message_stop"}"#), ApiKind::End);
    assert_eq!(
        kind(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#),
        ApiKind::Error
    );
    for name in [
        "content_block_start",
        "content_block_stop",
        "message_delta",
        "message_start",
    ] {
        assert_eq!(
            kind(&format!(r#"{{"type":"{name}"}}"#)),
            ApiKind::NonOutput,
            "{name}"
        );
    }
    assert_eq!(kind("{"), ApiKind::Other);
    assert_eq!(kind(r#"{"text":"a"}"#), ApiKind::Other);
}

#[test]
fn messages_start_and_delta_carry_usage_and_stop_reason() {
    let start = messages(
        br#"{"type":"message_start","message":{"id":"msg_9","model":"claude-x","usage":{"input_tokens":5,"cache_read_input_tokens":100,"cache_creation_input_tokens":20,"output_tokens":1}}}"#,
    );
    assert_eq!((start.id, start.model), (Some("msg_9"), Some("claude-x")));
    assert_eq!(
        start.usage,
        Some(ApiUsage {
            input_tokens: Some(125),
            output_tokens: None,
            cached_tokens: Some(100),
            reasoning_tokens: None,
        }),
        "cached tokens count as prompt; message_start's output count is a placeholder"
    );
    let delta = messages(
        br#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":15}}"#,
    );
    assert_eq!(delta.kind, ApiKind::NonOutput);
    assert_eq!(delta.usage.and_then(|u| u.output_tokens), Some(15));
    assert_eq!(
        delta.finish,
        Some(Finish {
            reason: FinishReason::ToolCalls,
            native: "tool_use"
        })
    );
    // Chat's words lose some of Anthropic's: the stop reason itself is kept beside them, and
    // a value outside Anthropic's documented set is `other` (bounded, whatever is sent).
    for (reason, want, native) in [
        ("end_turn", FinishReason::Stop, "end_turn"),
        ("stop_sequence", FinishReason::Stop, "stop_sequence"),
        ("max_tokens", FinishReason::Length, "max_tokens"),
        (
            "model_context_window_exceeded",
            FinishReason::Length,
            "model_context_window_exceeded",
        ),
        ("tool_use", FinishReason::ToolCalls, "tool_use"),
        ("pause_turn", FinishReason::Other, "pause_turn"),
        ("refusal", FinishReason::Other, "refusal"),
        ("x-new-reason", FinishReason::Other, "other"),
    ] {
        let data = format!(r#"{{"type":"message_delta","delta":{{"stop_reason":"{reason}"}}}}"#);
        let d = messages(data.as_bytes());
        assert_eq!(
            d.finish,
            Some(Finish {
                reason: want,
                native
            }),
            "{reason}"
        );
    }
    for data in [
        r#"{"type":"message_delta","delta":{"stop_reason":null}}"#,
        r#"{"type":"message_delta","delta":{"stop_reason":7}}"#,
        // Escaped: not a value vLLM or Anthropic sends; read as no stop reason.
        r#"{"type":"message_delta","delta":{"stop_reason":"end\u005fturn"}}"#,
        r#"{"type":"message_delta","usage":{"output_tokens":3}}"#,
    ] {
        assert_eq!(messages(data.as_bytes()).finish, None, "{data}");
    }
}

#[test]
fn messages_tool_use() {
    let events = vec![
        ev(
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_1","model":"m","usage":{"input_tokens":3,"output_tokens":0}}}"#,
        ),
        ev(
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{}}}"#,
        ),
        ev(
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":""}}"#,
        ),
        ev(
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"city\":"}}"#,
        ),
        ev(
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":" \"Paris\"}"}}"#,
        ),
        ev(
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#,
        ),
        ev(
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":9}}"#,
        ),
        ev("message_stop", r#"{"type":"message_stop"}"#),
    ];
    let r = run(Dialect::Messages, &events, 0);
    assert_eq!(r.figures.ttft, Some(at(3)));
    assert_eq!(r.figures.itl_count, 1);
    assert_eq!(r.figures.e2el, at(4));
    assert_eq!(r.figures.output_tokens, Some(9));
}

#[test]
fn messages_in_band_error() {
    let mut events = thinking_then_text();
    events.truncate(9);
    events.push(ev(
        "error",
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    ));
    let r = run(Dialect::Messages, &events, 0);
    assert!(r.figures.inband_error);
    assert!(!r.figures.done);
    assert_eq!(r.figures.e2el, at(8));
}

/// A stream cut before `message_stop` (and before `message_delta`): no end, and the output
/// tokens are the output events counted, not `message_start`'s placeholder.
#[test]
fn messages_cut_before_message_stop() {
    let mut events = thinking_then_text();
    events.truncate(9);
    let r = run(Dialect::Messages, &events, 0);
    assert!(!r.figures.done);
    assert_eq!(r.figures.e2el, at(8));
    assert_eq!(r.figures.output_tokens, Some(3));
    assert_eq!(r.figures.token_source, TokenSource::Chunks);
    assert_eq!(r.figures.prompt_tokens, Some(11));
    assert_eq!(
        r.figures.finish_reason, None,
        "no message_delta, no stop reason"
    );
    assert_eq!(r.figures.stop_reason, None);
    // Cut inside an event: the parser says so.
    let mut p = SseParser::new().with_dialect(Dialect::Messages);
    p.feed(b"event: message_stop\ndata: {\"type\":\"mess", |_| {});
    assert!(p.has_partial_event());
}

#[test]
fn whole_bodies_give_usage_id_and_model() {
    let r = classify_body(
        Dialect::Responses,
        br#"{"id":"resp_3","object":"response","model":"m","status":"completed","output":[],"usage":{"input_tokens":4,"output_tokens":6,"total_tokens":10}}"#,
    );
    assert_eq!(
        (r.id, r.model, r.usage),
        (
            Some("resp_3"),
            Some("m"),
            Some(Usage {
                prompt_tokens: Some(4),
                completion_tokens: Some(6),
                cached_prompt_tokens: None,
                reasoning_tokens: None,
            })
        )
    );
    let m = classify_body(
        Dialect::Messages,
        br#"{"id":"msg_3","type":"message","role":"assistant","model":"c","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":7,"output_tokens":2}}"#,
    );
    assert_eq!(
        (m.id, m.model, m.usage),
        (
            Some("msg_3"),
            Some("c"),
            Some(Usage {
                prompt_tokens: Some(7),
                completion_tokens: Some(2),
                cached_prompt_tokens: None,
                reasoning_tokens: None,
            })
        )
    );
    assert_eq!(classify_body(Dialect::Messages, b"oops").usage, None);
}

/// The chat rules are untouched by the dialect switch: a chat stream reads the same through
/// a parser built with `Dialect::Chat`.
#[test]
fn chat_dialect_is_the_default() {
    let chunk = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n";
    let mut kinds = Vec::new();
    SseParser::new()
        .with_dialect(Dialect::Chat)
        .feed(chunk, |e| kinds.push(e.kind));
    SseParser::new().feed(chunk, |e| kinds.push(e.kind));
    assert_eq!(kinds, vec![EventKind::Token, EventKind::Token]);
    // Chat chunks mean nothing to the other APIs' rules.
    SseParser::new()
        .with_dialect(Dialect::Responses)
        .feed(chunk, |e| kinds.push(e.kind));
    assert_eq!(kinds[2], EventKind::Other);
}

/// No input makes either API's rules panic: every byte of a real stream changed to bytes that
/// matter to JSON and SSE, and every cut of it, are read through.
#[test]
fn mutated_streams_never_panic() {
    let file: Vectors =
        serde_json::from_str(include_str!("../../tests/vectors/vllm-bench-0.33.json")).unwrap();
    let responses: String = file
        .vectors
        .iter()
        .filter(|v| v.endpoint == "responses")
        .flat_map(|v| v.events.iter().map(|e| format!("{e}\n\n")))
        .collect();
    let messages: String = thinking_then_text()
        .iter()
        .map(|e| format!("{e}\n\n"))
        .collect();
    let mut events = 0u64;
    for (dialect, stream) in [
        (Dialect::Responses, responses),
        (Dialect::Messages, messages),
    ] {
        let bytes = stream.as_bytes();
        for at in (0..bytes.len()).step_by(7) {
            for c in [b'"', b'\\', b'}', b'\n', 0xff] {
                let mut v = bytes.to_vec();
                v[at] = c;
                let mut p = SseParser::new().with_dialect(dialect);
                p.feed(&v, |_| events += 1);
                p.feed(&v[..at], |_| events += 1);
            }
        }
    }
    assert!(events > 2_000, "{events} events read");
}

/// How a Responses stream ended reaches the figures, in chat's words and in its own: a
/// completed response that called a tool is `tool_calls`, a filtered one `other` with its
/// reason kept; the reasoning tokens of its usage come with it.
#[test]
fn responses_finish_and_reasoning_tokens_reach_the_figures() {
    let text = ev(
        "response.output_text.delta",
        r#"{"type":"response.output_text.delta","delta":"a"}"#,
    );
    let end = |name: &str, response: &str| {
        ev(
            name,
            &format!(r#"{{"type":"{name}","sequence_number":4,"response":{response}}}"#),
        )
    };
    let usage = r#""usage":{"input_tokens":9,"output_tokens":40,"output_tokens_details":{"reasoning_tokens":31}}"#;
    let cases = [
        (
            end(
                "response.completed",
                &format!(
                    r#"{{"id":"r","status":"completed","output":[{{"type":"reasoning"}},{{"type":"function_call","name":"get","arguments":"{{}}"}}],{usage}}}"#
                ),
            ),
            FinishReason::ToolCalls,
            "completed",
        ),
        (
            end(
                "response.completed",
                &format!(
                    r#"{{"id":"r","status":"completed","output":[{{"type":"message"}}],{usage}}}"#
                ),
            ),
            FinishReason::Stop,
            "completed",
        ),
        (
            end(
                "response.incomplete",
                &format!(
                    r#"{{"id":"r","status":"incomplete","incomplete_details":{{"reason":"content_filter"}},{usage}}}"#
                ),
            ),
            FinishReason::Other,
            "content_filter",
        ),
        (
            end(
                "response.incomplete",
                &format!(
                    r#"{{"id":"r","status":"incomplete","incomplete_details":{{"reason":"max_output_tokens"}},{usage}}}"#
                ),
            ),
            FinishReason::Length,
            "max_output_tokens",
        ),
        (
            end(
                "response.incomplete",
                &format!(r#"{{"id":"r","status":"incomplete","incomplete_details":null,{usage}}}"#),
            ),
            FinishReason::Other,
            "incomplete",
        ),
    ];
    for (last, reason, native) in cases {
        for cut in [0, 7] {
            let r = run(Dialect::Responses, &[text.clone(), last.clone()], cut);
            let f = &r.figures;
            assert_eq!(f.finish_reason, Some(reason), "{native} {last}");
            assert_eq!(f.stop_reason, Some(native), "{last}");
            assert_eq!(f.reasoning_tokens, Some(31), "{last}");
            assert_eq!(f.output_tokens, Some(40));
            assert!(f.done);
        }
    }
    // `response.created` says `in_progress`: nothing about why it ends, and no finish before
    // the end even when a bookkeeping event carries a status.
    let created = ev(
        "response.created",
        r#"{"type":"response.created","response":{"id":"r","status":"in_progress","usage":null}}"#,
    );
    let r = run(Dialect::Responses, &[created, text], 0);
    assert_eq!(
        (r.figures.finish_reason, r.figures.stop_reason),
        (None, None)
    );
    assert_eq!(r.figures.reasoning_tokens, None);
    // A failed response is an error, and says nothing of a finish either.
    let failed = responses(
        br#"{"type":"response.failed","response":{"id":"r","status":"failed","usage":null}}"#,
    );
    assert_eq!((failed.kind, failed.finish), (ApiKind::Error, None));
}

/// Whole bodies say why they ended too, as their streams do.
#[test]
fn whole_bodies_give_their_finish() {
    let r = classify_body(
        Dialect::Responses,
        br#"{"id":"r","object":"response","status":"completed","output":[{"type":"function_call","name":"f","arguments":"{}"}],"usage":{"input_tokens":4,"output_tokens":6,"output_tokens_details":{"reasoning_tokens":2}}}"#,
    );
    assert_eq!(
        r.finish,
        Some(Finish {
            reason: FinishReason::ToolCalls,
            native: "completed"
        })
    );
    assert_eq!(r.usage.and_then(|u| u.reasoning_tokens), Some(2));
    let m = classify_body(
        Dialect::Messages,
        br#"{"id":"m","type":"message","content":[],"stop_reason":"max_tokens","usage":{"input_tokens":7,"output_tokens":2}}"#,
    );
    assert_eq!(
        m.finish,
        Some(Finish {
            reason: FinishReason::Length,
            native: "max_tokens"
        })
    );
    // Chat's bodies keep their finish reasons per choice.
    let c = classify_body(
        Dialect::Chat,
        br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":5,"completion_tokens_details":{"reasoning_tokens":3}}}"#,
    );
    assert_eq!(c.finish, None);
    assert_eq!(c.usage.and_then(|u| u.reasoning_tokens), Some(3));
}
