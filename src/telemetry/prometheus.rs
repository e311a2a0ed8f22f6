//! The Prometheus side: metric names, default buckets (vLLM's), and the help text of each.

use metrics::{KeyName, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::PrometheusRecorder;

use super::histogram::Histograms;
use super::upstreams::upstream_names;

/// Where the exporter's counters and gauges say they come from.
pub(super) const METADATA: Metadata<'static> =
    Metadata::new("tokentap", Level::INFO, Some(module_path!()));

/// Default TTFT buckets (vLLM's `vllm:time_to_first_token_seconds`), seconds.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// Default ITL and TPOT buckets (vLLM's `vllm:inter_token_latency_seconds`), seconds.
pub const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
/// Default E2EL buckets (vLLM's `vllm:e2e_request_latency_seconds`), seconds.
pub const E2EL_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];
/// Default token-count buckets.
pub const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0,
];

/// Metric names, in one place.
pub mod names {
    /// Histogram: time to first token event, seconds.
    pub const TTFT: &str = "tokentap_time_to_first_token_seconds";
    /// Histogram: time to the first output event with answer text, seconds.
    pub const TTFA: &str = "tokentap_time_to_first_answer_seconds";
    /// Histogram: first reasoning to first answer of requests that reasoned, seconds.
    pub const REASONING: &str = "tokentap_reasoning_time_seconds";
    /// Histogram: the largest ITL of each request, seconds.
    pub const MAX_ITL: &str = "tokentap_max_inter_token_latency_seconds";
    /// Histogram: the upstream's queue time (vLLM `queue_time_ms`), seconds.
    pub const QUEUE_TIME: &str = "tokentap_upstream_queue_time_seconds";
    /// Histogram: the upstream's prefill time, seconds.
    pub const PREFILL_TIME: &str = "tokentap_upstream_prefill_time_seconds";
    /// Histogram: the upstream's decode time, seconds.
    pub const DECODE_TIME: &str = "tokentap_upstream_decode_time_seconds";
    /// Histogram: TTFT − queue − prefill, seconds.
    pub const OUTSIDE_ENGINE: &str = "tokentap_time_to_first_token_outside_engine_seconds";
    /// Counter: requests whose TTFT − queue − prefill came out negative (not recorded).
    pub const OUTSIDE_ENGINE_NEGATIVE: &str =
        "tokentap_time_to_first_token_outside_engine_negative_total";
    /// Histogram: prompt tokens served from the prefix cache, per request.
    pub const CACHED_PROMPT_TOKENS: &str = "tokentap_request_cached_prompt_tokens";
    /// Histogram: generated tokens spent reasoning, per request that reported them.
    pub const REASONING_TOKENS: &str = "tokentap_request_reasoning_tokens";
    /// Histogram: gap between consecutive token events of a choice, seconds.
    pub const ITL: &str = "tokentap_inter_token_latency_seconds";
    /// Histogram: time per output token after the first, seconds.
    pub const TPOT: &str = "tokentap_time_per_output_token_seconds";
    /// Histogram: request arrival to last token event, seconds.
    pub const E2EL: &str = "tokentap_e2e_request_latency_seconds";
    /// Histogram: prompt tokens per request.
    pub const PROMPT_TOKENS: &str = "tokentap_request_prompt_tokens";
    /// Histogram: generated tokens per request.
    pub const GENERATION_TOKENS: &str = "tokentap_request_generation_tokens";
    /// Histogram: completion tokens per token event.
    pub const TOKENS_PER_CHUNK: &str = "tokentap_tokens_per_chunk";
    /// Histogram: request arrival to upstream response head, seconds.
    pub const HEADER_TIME: &str = "tokentap_upstream_response_header_seconds";
    /// Counter: requests by outcome and status.
    pub const REQUESTS: &str = "tokentap_requests_total";
    /// Counter: requests that met every SLO bound.
    pub const GOODPUT: &str = "tokentap_goodput_requests_total";
    /// Counter: prompt tokens.
    pub const PROMPT_TOKENS_TOTAL: &str = "tokentap_prompt_tokens_total";
    /// Counter: generated tokens.
    pub const GENERATION_TOKENS_TOTAL: &str = "tokentap_generation_tokens_total";
    /// Counter: SSE events that were not token, usage, error or `[DONE]`.
    pub const UNRECOGNIZED: &str = "tokentap_sse_unrecognized_events_total";
    /// Gauge: requests being proxied.
    pub const IN_FLIGHT: &str = "tokentap_requests_in_flight";
    /// Gauge: 1 while the upstream answered recently.
    pub const UPSTREAM_READY: &str = "tokentap_upstream_ready";
    /// Gauge: always 1, labelled with the version.
    pub const BUILD_INFO: &str = "tokentap_build_info";
    /// Counter: client connections the proxy closed or refused itself, by reason.
    pub const CONNECTIONS_CLOSED: &str = "tokentap_connections_closed_total";
    /// Gauge: open client connections.
    pub const CONNECTIONS_OPEN: &str = "tokentap_connections_open";
    /// Counter: failed accepts of client connections (for example at the open-file limit).
    pub const ACCEPT_ERRORS: &str = "tokentap_accept_errors_total";
    /// Gauge: request-body bytes held in memory now (bodies read to be inspected).
    pub const BODY_BYTES_HELD: &str = "tokentap_request_body_bytes_held";
    /// Counter: SSE events longer than `proxy.max_sse_event_bytes`, forwarded unparsed.
    pub const OVERSIZED: &str = "tokentap_sse_oversized_events_total";
}

/// Gives every metric its help text; histograms also get their bucket bounds.
pub(super) fn describe<'a>(
    r: &PrometheusRecorder,
    h: &Histograms,
    bounds: impl Fn(&str) -> &'a [f64],
) {
    let d = |name: &'static str, unit: Option<Unit>, help: &'static str, kind: char| {
        if kind == 'h' {
            return h.describe(name, help, bounds(name));
        }
        let key = KeyName::from_const_str(name);
        let help = SharedString::const_str(help);
        match kind {
            'c' => r.describe_counter(key, unit, help),
            _ => r.describe_gauge(key, unit, help),
        }
    };
    let s = Some(Unit::Seconds);
    d(
        names::TTFT,
        s,
        "Time from request arrival to the first output event handed to the client (vllm bench serve TTFT).",
        'h',
    );
    d(
        names::TTFA,
        s,
        "Time from request arrival to the first output event with answer text (content), after any reasoning or tool calls.",
        'h',
    );
    d(
        names::REASONING,
        s,
        "Time from the first reasoning event to the first answer event, of requests that reasoned before answering.",
        'h',
    );
    d(
        names::QUEUE_TIME,
        s,
        "Time the request waited for a slot in the engine, as the upstream reports it (vLLM --enable-per-request-metrics queue_time_ms).",
        'h',
    );
    d(
        names::PREFILL_TIME,
        s,
        "Time the engine spent reading the prompt, as the upstream reports it (vLLM time_to_first_token_ms, llama.cpp prompt_ms).",
        'h',
    );
    d(
        names::DECODE_TIME,
        s,
        "Time the engine spent generating after the first token, as the upstream reports it (vLLM generation_time_ms, llama.cpp predicted_ms).",
        'h',
    );
    d(
        names::OUTSIDE_ENGINE,
        s,
        "TTFT minus the upstream's queue and prefill time: API server, network both ways and the proxy. Recorded when the upstream reports both.",
        'h',
    );
    d(
        names::OUTSIDE_ENGINE_NEGATIVE,
        None,
        "Requests whose TTFT minus the upstream's queue and prefill time came out negative (not recorded in the histogram).",
        'c',
    );
    d(
        names::CACHED_PROMPT_TOKENS,
        None,
        "Prompt tokens served from the prefix cache, per request (usage.prompt_tokens_details.cached_tokens, llama.cpp cache_n).",
        'h',
    );
    d(
        names::REASONING_TOKENS,
        None,
        "Generated tokens spent reasoning, per request whose usage reported them (completion_tokens_details.reasoning_tokens; Responses output_tokens_details.reasoning_tokens); part of the generation tokens.",
        'h',
    );
    d(
        names::MAX_ITL,
        s,
        "Largest inter-token latency of each request that ended ok with at least one ITL sample: a stalled stream.",
        'h',
    );
    d(
        names::ITL,
        s,
        "Gap between consecutive output events of a choice, one sample per chunk after the first (vllm bench serve ITL).",
        'h',
    );
    d(
        names::TPOT,
        s,
        "(E2EL - TTFT) / (output tokens - 1) of requests that ended ok with more than one output token (vllm bench serve TPOT).",
        'h',
    );
    d(
        names::E2EL,
        s,
        "Time from request arrival to the last output event (last body byte for non-streaming) of requests that ended ok (vllm bench serve E2EL).",
        'h',
    );
    d(
        upstream_names::TTFT,
        s,
        "TTFT (as tokentap_time_to_first_token_seconds) of the requests each upstream endpoint answered.",
        'h',
    );
    d(
        upstream_names::TPOT,
        s,
        "TPOT (as tokentap_time_per_output_token_seconds) of the requests each upstream endpoint answered that ended ok.",
        'h',
    );
    d(
        upstream_names::E2EL,
        s,
        "E2EL (as tokentap_e2e_request_latency_seconds) of the requests each upstream endpoint answered that ended ok.",
        'h',
    );
    d(
        names::PROMPT_TOKENS,
        None,
        "Prompt tokens per request that ended ok, from usage.",
        'h',
    );
    d(
        names::GENERATION_TOKENS,
        None,
        "Output tokens per request that ended ok, from usage or counted chunks.",
        'h',
    );
    d(
        names::TOKENS_PER_CHUNK,
        None,
        "Completion tokens carried by one token event, when the stream reports cumulative usage.",
        'h',
    );
    d(
        names::HEADER_TIME,
        s,
        "Time from request arrival to the upstream's response head.",
        'h',
    );
    d(
        names::REQUESTS,
        None,
        "Requests by how they ended (outcome) and the HTTP status sent to the client.",
        'c',
    );
    d(
        names::GOODPUT,
        None,
        "Chat/completions requests that ended ok and met every configured SLO bound (vllm bench serve --goodput).",
        'c',
    );
    d(
        names::PROMPT_TOKENS_TOTAL,
        None,
        "Prompt tokens reported by the upstream's usage.",
        'c',
    );
    d(
        names::GENERATION_TOKENS_TOTAL,
        None,
        "Output tokens generated by the upstream, from usage or counted chunks.",
        'c',
    );
    d(
        names::UNRECOGNIZED,
        None,
        "SSE events forwarded that were not token, usage, error or [DONE] events (malformed streams).",
        'c',
    );
    d(names::IN_FLIGHT, None, "Requests being proxied now.", 'g');
    d(
        names::UPSTREAM_READY,
        None,
        "1 while the upstream answered within telemetry.ready_window_secs, else 0.",
        'g',
    );
    d(
        names::CONNECTIONS_CLOSED,
        None,
        "Client connections the proxy closed or refused itself, by reason (a timeout or limit of docs/limits.md, or a request head it could not read).",
        'c',
    );
    d(
        names::CONNECTIONS_OPEN,
        None,
        "Open client connections.",
        'g',
    );
    d(
        names::ACCEPT_ERRORS,
        None,
        "Failed accepts of client connections (for example at the open-file limit).",
        'c',
    );
    d(
        names::BODY_BYTES_HELD,
        None,
        "Request-body bytes held in memory now, of proxy.body_budget_bytes.",
        'g',
    );
    d(
        names::OVERSIZED,
        None,
        "SSE events longer than proxy.max_sse_event_bytes, forwarded as they came without being parsed.",
        'c',
    );
    d(
        names::BUILD_INFO,
        None,
        "Always 1; the version label says which tokentap is running.",
        'g',
    );
}
