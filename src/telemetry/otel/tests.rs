//! A request's span as the collector would get it: every attribute and event at its exact value,
//! on a paused clock.

use std::collections::BTreeMap;

use opentelemetry::trace::{SpanKind, Tracer as _, TracerProvider as _};

use super::*;
use crate::latency::TokenSource;
use crate::sse::FinishReason;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A tracer whose ended spans land in the returned queue, as the exporter's would.
fn capture() -> (SdkTracerProvider, mpsc::Receiver<SpanData>) {
    let (queue, spans) = mpsc::channel(8);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(QueueProcessor {
            queue,
            dropped: Counter::noop(),
            closed: AtomicBool::new(false),
        })
        .build();
    (provider, spans)
}

fn figures() -> Figures {
    Figures {
        ttft: Some(ms(120)),
        ttfa: Some(ms(340)),
        reasoning: Some(ms(220)),
        e2el: ms(900),
        itl_mean: Some(ms(20)),
        itl_max: Some(ms(75)),
        itl_count: 39,
        tpot: Some(ms(19)),
        output_tokens: Some(40),
        token_source: TokenSource::Usage,
        prompt_tokens: Some(512),
        chunks: 40,
        empty_choice_events: 2,
        inband_error: false,
        done: true,
        other_events: 0,
        queue: Some(ms(30)),
        prefill: Some(ms(80)),
        decode: Some(ms(760)),
        outside_engine: Some(ms(10)),
        outside_engine_negative: false,
        cached_prompt_tokens: Some(256),
        finish_reason: Some(FinishReason::Length),
        stop_reason: Some("max_tokens"),
        reasoning_tokens: Some(31),
    }
}

fn attributes(span: &SpanData) -> BTreeMap<String, Value> {
    span.attributes
        .iter()
        .map(|kv| (kv.key.as_str().to_owned(), kv.value.clone()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_figures_reach_the_span_exactly() {
    let (provider, mut spans) = capture();
    let tracer = provider.tracer("test");
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut span = RequestSpan {
        span: tracer.build(tracer.span_builder("chat m").with_kind(SpanKind::Server)),
        wall,
        start: Instant::now(),
        arrived: wall,
        propagate: true,
        stream: true,
        status: 0,
    };
    assert!(span.trace().is_some(), "an always-on sampler samples");
    span.on_response_head(200);
    tokio::time::advance(ms(120)).await;
    // Heard 5 ms after the first token was timed (a busy thread): its event is still at the
    // instant the TTFT was taken.
    tokio::time::advance(ms(5)).await;
    span.on_first_token(ms(120));
    tokio::time::advance(ms(215)).await;
    span.on_first_answer(ms(340));
    tokio::time::advance(ms(560)).await;
    span.finish(Outcome::Ok, 200, &figures());

    let got = spans.try_recv().expect("the span ended");
    assert_eq!(got.end_time, wall + ms(900));
    let events: Vec<(&str, SystemTime, Vec<KeyValue>)> = got
        .events
        .iter()
        .map(|e| (e.name.as_ref(), e.timestamp, e.attributes.clone()))
        .collect();
    assert_eq!(
        events,
        [
            (
                "gen_ai.first_token",
                wall + ms(120),
                vec![KeyValue::new("tokentap.ttft_s", 0.12)]
            ),
            (
                "gen_ai.first_answer",
                wall + ms(340),
                vec![KeyValue::new("tokentap.ttfa_s", 0.34)]
            ),
        ]
    );
    let d = |n: u64| Value::F64(ms(n).as_secs_f64());
    let expected: BTreeMap<String, Value> = [
        ("http.response.status_code", Value::I64(200)),
        ("gen_ai.usage.input_tokens", Value::I64(512)),
        ("gen_ai.usage.output_tokens", Value::I64(40)),
        (
            "gen_ai.response.finish_reasons",
            Value::Array(Array::String(vec![StringValue::from("length")])),
        ),
        ("tokentap.stop_reason", Value::from("max_tokens")),
        ("gen_ai.usage.reasoning.output_tokens", Value::I64(31)),
        ("gen_ai.response.time_to_first_chunk", d(120)),
        ("tokentap.ttft_s", d(120)),
        ("tokentap.ttfa_s", d(340)),
        ("tokentap.upstream.queue_s", d(30)),
        ("tokentap.upstream.prefill_s", d(80)),
        ("tokentap.upstream.decode_s", d(760)),
        ("tokentap.ttft_outside_engine_s", d(10)),
        ("tokentap.cached_prompt_tokens", Value::I64(256)),
        ("tokentap.reasoning_s", d(220)),
        ("tokentap.tpot_s", d(19)),
        ("tokentap.itl_mean_s", d(20)),
        ("tokentap.itl_max_s", d(75)),
        ("tokentap.e2el_s", d(900)),
        ("tokentap.chunks", Value::I64(40)),
        ("tokentap.token_source", Value::from("usage")),
        ("tokentap.outcome", Value::from("ok")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(attributes(&got), expected);
}

#[tokio::test(start_paused = true)]
async fn a_figure_not_known_is_no_attribute_and_a_failure_is_an_error() {
    let (provider, mut spans) = capture();
    let tracer = provider.tracer("test");
    let span = RequestSpan {
        span: tracer.build(tracer.span_builder("chat m")),
        wall: SystemTime::UNIX_EPOCH,
        start: Instant::now(),
        arrived: SystemTime::UNIX_EPOCH,
        propagate: true,
        stream: false,
        status: 502,
    };
    tokio::time::advance(ms(5)).await;
    let none = Figures {
        ttft: None,
        ttfa: None,
        reasoning: None,
        e2el: ms(5),
        itl_mean: None,
        itl_max: None,
        itl_count: 0,
        tpot: None,
        output_tokens: None,
        token_source: TokenSource::None,
        prompt_tokens: None,
        chunks: 0,
        queue: None,
        prefill: None,
        decode: None,
        outside_engine: None,
        outside_engine_negative: true,
        cached_prompt_tokens: None,
        finish_reason: None,
        stop_reason: None,
        reasoning_tokens: None,
        ..figures()
    };
    span.finish(Outcome::ConnectError, 0, &none);
    let got = spans.try_recv().expect("the span ended");
    let expected: BTreeMap<String, Value> = [
        // The status of the response head, as no response was sent.
        ("http.response.status_code", Value::I64(502)),
        ("tokentap.e2el_s", Value::F64(0.005)),
        ("tokentap.chunks", Value::I64(0)),
        ("tokentap.token_source", Value::from("none")),
        ("tokentap.outcome", Value::from("connect_error")),
        ("error.type", Value::from("connect_error")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(attributes(&got), expected);
    assert_eq!(got.status, Status::error("connect_error"));
    assert!(got.events.is_empty());
}
