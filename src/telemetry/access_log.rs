//! The access log: one line per finished request.

use std::time::Duration;

use super::Finished;

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

/// Writes the access-log line of a finished request. Never headers, keys or prompt text: the
/// tenant is its label value (a header value only once it became a label).
pub(super) fn access_log(done: &Finished<'_>) {
    let f = done.figures;
    tracing::info!(
        target: "tokentap::access",
        request_id = done.request_id,
        model = &*done.route.model,
        endpoint = done.route.endpoint.as_str(),
        tenant = done.route.tenant.as_deref(),
        status = done.status,
        outcome = done.outcome.as_str(),
        stream = done.stream,
        ttft_ms = ms(f.ttft),
        ttfa_ms = ms(f.ttfa),
        reasoning_ms = ms(f.reasoning),
        queue_ms = ms(f.queue),
        prefill_ms = ms(f.prefill),
        outside_engine_ms = ms(f.outside_engine),
        decode_ms = ms(f.decode),
        cached_prompt_tokens = f.cached_prompt_tokens,
        tpot_ms = ms(f.tpot),
        itl_mean_ms = ms(f.itl_mean),
        itl_max_ms = ms(f.itl_max),
        e2el_ms = ms(Some(f.e2el)),
        chunks = f.chunks,
        itl_count = f.itl_count,
        prompt_tokens = f.prompt_tokens,
        output_tokens = f.output_tokens,
        reasoning_tokens = f.reasoning_tokens,
        token_source = f.token_source.as_str(),
        finish_reason = f.finish_reason.map(|r| r.as_str()),
        stop_reason = f.stop_reason,
        "request"
    );
}
