//! Per-request latency state machine: classified events and the instants they were handed to
//! the client in, figures out.
//!
//! Pure: no I/O and no clock of its own. The body wrapper passes `now` with each event; tests
//! pass instants from tokio's paused clock. Definitions are those of `docs/METRICS.md` §2, with
//! the output events of §1 as the current `vllm bench serve` counts them, or as the 0.10 line
//! did ([`Definitions`]).

use std::time::Duration;

use smallvec::SmallVec;
use tokio::time::Instant;

use crate::sse::{Event, EventKind, Finish, FinishReason, ServerTimings, Usage};

/// Choice indexes at or above this are not tracked for per-choice ITL (an upstream that sends
/// `"index": 4000000000` must not make the proxy allocate for it).
pub const MAX_TRACKED_CHOICES: usize = 128;

/// Which `vllm bench serve` decides what an output event is (`telemetry.definitions`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Definitions {
    /// The current bench (vLLM 0.33): only events whose choice streamed output count; a role
    /// chunk or a finish-only chunk neither starts TTFT, nor makes an ITL sample, nor moves
    /// E2EL.
    #[default]
    VllmBench,
    /// The bench of the vLLM 0.10 line: every event with non-empty `choices` is a token, the
    /// role chunk and a finish-only chunk included. For comparing with old benchmark runs.
    VllmBench010,
}

impl Definitions {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Definitions::VllmBench => "vllm-bench",
            Definitions::VllmBench010 => "vllm-bench-0.10",
        }
    }
}

/// A figure available as soon as the event that produces it has been handed downstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The first output event: its time since the request arrived (TTFT).
    FirstToken(Duration),
    /// The first output event with answer text (time to first answer).
    FirstAnswer(Duration),
    /// The first answer came this long after the first reasoning (reasoning time), for a
    /// request that reasoned before answering.
    Reasoning(Duration),
    /// The gap since the previous output event of the same choice (one ITL sample).
    Itl(Duration),
    /// Completion tokens a token event carried, known from cumulative usage.
    TokensPerChunk(u64),
    /// The mean ITL of the request so far, given at its 4th, 16th, 64th… ITL sample (powers
    /// of four), so that a balancer learns how fast an endpoint decodes while its first
    /// requests still stream, not only when they end.
    ItlSoFar(Duration),
}

/// Where the output token count came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `usage.completion_tokens` of the last usage the response carried.
    Usage,
    /// The number of output events (no usage was sent).
    Chunks,
    /// Nothing to count (no usage and no token events).
    None,
}

impl TokenSource {
    /// The name used in logs and spans.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Usage => "usage",
            TokenSource::Chunks => "chunks",
            TokenSource::None => "none",
        }
    }
}

/// The per-request state, fed as events reach the client. The fields a token event updates
/// come first and in this order (`repr(C)`), so that they share as few cache lines as they can.
#[derive(Debug)]
#[repr(C)]
pub struct Latency {
    last_byte: Option<Instant>,
    last_token: Option<Instant>,
    first_token: Option<Instant>,
    first_answer: Option<Instant>,
    token_events: u64,
    choice_events: u64,
    itl_count: u64,
    itl_sum: Duration,
    itl_max: Duration,
    last_by_choice: SmallVec<[Option<Instant>; 1]>,
    finish_reason: Option<FinishReason>,
    /// Read by an output event only when it carried reasoning: past the per-chunk fields.
    first_reasoning: Option<Instant>,
    /// The API's own word for why it stopped (Responses and Messages).
    stop_reason: Option<&'static str>,
    usage_seen: bool,
    inband_error: bool,
    done: bool,
    cumulative_completion: u64,
    other_events: u64,
    usage: Usage,
    server: ServerTimings,
    definitions: Definitions,
    t0: Instant,
}

/// What a finished request measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Figures {
    /// Time to the first output event.
    pub ttft: Option<Duration>,
    /// Time to the first output event with answer text (`content` or `text`).
    pub ttfa: Option<Duration>,
    /// From the first reasoning to the first answer, when the request reasoned and answered.
    pub reasoning: Option<Duration>,
    /// Time to the last output event; for a response without output events, to its last byte.
    pub e2el: Duration,
    /// Mean of the ITL samples.
    pub itl_mean: Option<Duration>,
    /// Largest ITL sample.
    pub itl_max: Option<Duration>,
    /// Number of ITL samples.
    pub itl_count: u64,
    /// `(e2el - ttft) / (output_tokens - 1)`, when `output_tokens > 1`.
    pub tpot: Option<Duration>,
    /// Completion tokens (see `token_source`).
    pub output_tokens: Option<u64>,
    /// Where `output_tokens` came from.
    pub token_source: TokenSource,
    /// `usage.prompt_tokens`, when the response carried it.
    pub prompt_tokens: Option<u64>,
    /// Output events seen.
    pub chunks: u64,
    /// Events with non-empty `choices` that streamed no output (role and finish-only chunks).
    pub empty_choice_events: u64,
    /// An error event arrived in the stream.
    pub inband_error: bool,
    /// `[DONE]` arrived.
    pub done: bool,
    /// Events that were none of token/usage/error/done.
    pub other_events: u64,
    /// The upstream's queue time (vLLM `queue_time_ms`).
    pub queue: Option<Duration>,
    /// The upstream's prefill time (vLLM `time_to_first_token_ms`, llama.cpp `prompt_ms`).
    pub prefill: Option<Duration>,
    /// The upstream's decode time (vLLM `generation_time_ms`, llama.cpp `predicted_ms`).
    pub decode: Option<Duration>,
    /// TTFT − queue − prefill: the API server, the network both ways and the proxy. Known
    /// when all three are and the remainder is not negative.
    pub outside_engine: Option<Duration>,
    /// TTFT − queue − prefill came out negative (clocks on two machines, rounding): not
    /// recorded, but counted.
    pub outside_engine_negative: bool,
    /// Prompt tokens served from the prefix cache (`usage.prompt_tokens_details.cached_tokens`,
    /// llama.cpp `cache_n`).
    pub cached_prompt_tokens: Option<u64>,
    /// The last `finish_reason` a choice reported; for the Responses and Messages APIs, why
    /// the response ended, in chat's words.
    pub finish_reason: Option<FinishReason>,
    /// Why a Responses or Messages response ended, in the API's own word (Messages'
    /// `stop_reason`, Responses' status or incomplete reason); `None` for chat and completions.
    pub stop_reason: Option<&'static str>,
    /// Generated tokens spent reasoning, when the usage said
    /// (`completion_tokens_details.reasoning_tokens`, Responses'
    /// `output_tokens_details.reasoning_tokens`); part of `output_tokens`.
    pub reasoning_tokens: Option<u64>,
}

impl Latency {
    /// Bytes from the start of the state to the end of the fields a token event updates.
    #[cfg(test)]
    pub(crate) const TOKEN_FIELDS: usize = std::mem::offset_of!(Latency, finish_reason);

    /// Starts the clock of a request that arrived at `t0`, with the current definitions.
    pub fn new(t0: Instant) -> Self {
        Self::with_definitions(t0, Definitions::default())
    }

    /// Starts the clock of a request that arrived at `t0`, counting output events as
    /// `definitions` says.
    pub fn with_definitions(t0: Instant, definitions: Definitions) -> Self {
        Latency {
            t0,
            definitions,
            first_token: None,
            first_answer: None,
            first_reasoning: None,
            last_token: None,
            last_byte: None,
            last_by_choice: SmallVec::new(),
            itl_count: 0,
            itl_sum: Duration::ZERO,
            itl_max: Duration::ZERO,
            token_events: 0,
            choice_events: 0,
            usage: Usage::default(),
            server: ServerTimings::default(),
            usage_seen: false,
            cumulative_completion: 0,
            inband_error: false,
            done: false,
            other_events: 0,
            finish_reason: None,
            stop_reason: None,
        }
    }

    /// The instant the request arrived.
    pub fn t0(&self) -> Instant {
        self.t0
    }

    /// Notes that body bytes were handed to the client at `now`.
    pub fn on_bytes(&mut self, now: Instant) {
        self.last_byte = Some(now);
    }

    /// Records usage read from a non-streaming body.
    pub fn on_usage(&mut self, usage: Usage) {
        self.merge_usage(usage);
    }

    /// Feeds one event that was handed to the client at `now`; `observe` receives the figures
    /// it completes, at once, so histograms can record them while the stream goes on.
    pub fn on_event(
        &mut self,
        event: &Event<'_>,
        now: Instant,
        mut observe: impl FnMut(Observation),
    ) {
        match event.kind {
            EventKind::Token => self.on_token(event, now, &mut observe),
            EventKind::Usage => {}
            EventKind::Error => self.inband_error = true,
            EventKind::Done => self.done = true,
            EventKind::Other => self.other_events += 1,
            EventKind::NoData | EventKind::Oversized => {}
        }
        if let Some(usage) = event.usage {
            self.merge_usage(usage);
        }
        if let Some(finish) = event.finish {
            self.on_finish(finish);
        }
        if let Some(server) = event.server.timings() {
            self.on_server(server);
        }
    }

    /// Records why a Responses or Messages response ended (from its stream, or a
    /// non-streaming body); a later one replaces an earlier one, as for chat's choices.
    pub fn on_finish(&mut self, finish: Finish) {
        self.finish_reason = Some(finish.reason);
        self.stop_reason = Some(finish.native);
    }

    /// Records the upstream's own timings (from the stream, or a non-streaming body); a field
    /// seen later replaces one seen earlier.
    pub fn on_server(&mut self, t: ServerTimings) {
        let s = &mut self.server;
        s.queue = t.queue.or(s.queue);
        s.prefill = t.prefill.or(s.prefill);
        s.decode = t.decode.or(s.decode);
        s.cached_prompt_tokens = t.cached_prompt_tokens.or(s.cached_prompt_tokens);
    }

    fn on_token(&mut self, event: &Event<'_>, now: Instant, observe: &mut impl FnMut(Observation)) {
        self.choice_events += 1;
        let every = self.definitions == Definitions::VllmBench010;
        let mut output = false;
        let mut answer = false;
        let mut reasoning = false;
        for choice in event.choices {
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason);
            }
            if !(every || choice.output) {
                // No sample, and the clock of the choice runs on from its last output.
                continue;
            }
            output = true;
            answer |= choice.answer;
            reasoning |= choice.reasoning;
            let index = choice.index as usize;
            if index >= MAX_TRACKED_CHOICES {
                continue;
            }
            if index >= self.last_by_choice.len() {
                self.last_by_choice.resize(index + 1, None);
            }
            if let Some(previous) = self.last_by_choice[index].replace(now) {
                let gap = now - previous;
                self.itl_count += 1;
                self.itl_sum += gap;
                self.itl_max = self.itl_max.max(gap);
                observe(Observation::Itl(gap));
                let n = self.itl_count;
                if n >= 4 && n.is_power_of_two() && n.trailing_zeros() % 2 == 0 {
                    observe(Observation::ItlSoFar(self.itl_sum / n as u32));
                }
            }
        }
        if let Some(cumulative) = event.usage.and_then(|u| u.completion_tokens) {
            let carried = cumulative.saturating_sub(self.cumulative_completion);
            self.cumulative_completion = cumulative;
            if carried > 0 {
                observe(Observation::TokensPerChunk(carried));
            }
        }
        if !output {
            return;
        }
        self.token_events += 1;
        if self.first_token.is_none() {
            self.first_token = Some(now);
            observe(Observation::FirstToken(now - self.t0));
        }
        if reasoning && self.first_reasoning.is_none() {
            self.first_reasoning = Some(now);
        }
        if answer && self.first_answer.is_none() {
            self.first_answer = Some(now);
            observe(Observation::FirstAnswer(now - self.t0));
            if let Some(first_reasoning) = self.first_reasoning {
                observe(Observation::Reasoning(now - first_reasoning));
            }
        }
        self.last_token = Some(now);
    }

    fn merge_usage(&mut self, usage: Usage) {
        self.usage_seen = true;
        if usage.prompt_tokens.is_some() {
            self.usage.prompt_tokens = usage.prompt_tokens;
        }
        if usage.completion_tokens.is_some() {
            self.usage.completion_tokens = usage.completion_tokens;
        }
        if usage.cached_prompt_tokens.is_some() {
            self.usage.cached_prompt_tokens = usage.cached_prompt_tokens;
        }
        if usage.reasoning_tokens.is_some() {
            self.usage.reasoning_tokens = usage.reasoning_tokens;
        }
    }

    /// True once an error event has been seen.
    pub fn inband_error(&self) -> bool {
        self.inband_error
    }

    /// The figures of the request, which ended (or was cut off) at `end`.
    pub fn figures(&self, end: Instant) -> Figures {
        let ttft = self.first_token.map(|t| t - self.t0);
        let last = self.last_token.or(self.last_byte).unwrap_or(end);
        let e2el = last.saturating_duration_since(self.t0);
        let (output_tokens, token_source) = match self.usage.completion_tokens {
            Some(n) if self.usage_seen => (Some(n), TokenSource::Usage),
            _ if self.token_events > 0 => (Some(self.token_events), TokenSource::Chunks),
            _ => (None, TokenSource::None),
        };
        let tpot = match (ttft, output_tokens) {
            (Some(ttft), Some(n)) if n > 1 => Some(e2el.saturating_sub(ttft) / (n - 1) as u32),
            _ => None,
        };
        let server = self.server;
        let engine = server.queue.zip(server.prefill).map(|(q, p)| q + p);
        let (outside_engine, outside_engine_negative) = match (ttft, engine) {
            (Some(ttft), Some(engine)) => match ttft.checked_sub(engine) {
                Some(outside) => (Some(outside), false),
                None => (None, true),
            },
            _ => (None, false),
        };
        Figures {
            queue: server.queue,
            prefill: server.prefill,
            decode: server.decode,
            outside_engine,
            outside_engine_negative,
            cached_prompt_tokens: self
                .usage
                .cached_prompt_tokens
                .or(server.cached_prompt_tokens),
            ttft,
            ttfa: self.first_answer.map(|t| t - self.t0),
            reasoning: match (self.first_reasoning, self.first_answer) {
                (Some(r), Some(a)) => Some(a - r),
                _ => None,
            },
            e2el,
            itl_mean: (self.itl_count > 0).then(|| self.itl_sum / self.itl_count as u32),
            itl_max: (self.itl_count > 0).then_some(self.itl_max),
            itl_count: self.itl_count,
            tpot,
            output_tokens,
            token_source,
            prompt_tokens: self.usage.prompt_tokens,
            chunks: self.token_events,
            empty_choice_events: self.choice_events - self.token_events,
            inband_error: self.inband_error,
            done: self.done,
            other_events: self.other_events,
            finish_reason: self.finish_reason,
            stop_reason: self.stop_reason,
            reasoning_tokens: self.usage.reasoning_tokens,
        }
    }
}

/// Service-level objectives of one request, as `vllm bench serve --goodput ttft:MS tpot:MS
/// e2el:MS` takes them: a request is good when every configured bound holds (`<=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slo {
    /// Bound on TTFT.
    pub ttft: Option<Duration>,
    /// Bound on TPOT. A request with one output token has no TPOT and passes it.
    pub tpot: Option<Duration>,
    /// Bound on E2EL.
    pub e2el: Option<Duration>,
}

impl Slo {
    /// The bounds of `vllm bench serve --goodput`, given in milliseconds (finite and positive
    /// after the configuration was validated).
    pub fn from_ms(ttft: Option<f64>, tpot: Option<f64>, e2el: Option<f64>) -> Slo {
        let ms = |v: Option<f64>| v.map(|ms| Duration::from_secs_f64(ms / 1000.0));
        Slo {
            ttft: ms(ttft),
            tpot: ms(tpot),
            e2el: ms(e2el),
        }
    }

    /// Whether a request that ended `ok` with these figures meets every bound. A figure that was
    /// not observed (no TTFT on a non-streaming response, no TPOT with one token) passes.
    pub fn is_good(&self, f: &Figures) -> bool {
        let within = |bound: Option<Duration>, value: Option<Duration>| match (bound, value) {
            (Some(bound), Some(value)) => value <= bound,
            _ => true,
        };
        within(self.ttft, f.ttft) && within(self.tpot, f.tpot) && within(self.e2el, Some(f.e2el))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::SseParser;
    use tokio::time::{Instant, advance};

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `frame` through a parser into `lat` at the current (paused) time.
    fn feed(p: &mut SseParser, lat: &mut Latency, frame: &str, seen: &mut Vec<Observation>) {
        let now = Instant::now();
        lat.on_bytes(now);
        p.feed(frame.as_bytes(), |e| lat.on_event(e, now, |o| seen.push(o)));
    }

    fn chat(content: &str) -> String {
        format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{content:?}}},\"finish_reason\":null}}]}}\n\n"
        )
    }

    #[tokio::test(start_paused = true)]
    async fn vllm_stream_timings_are_exact() {
        let mut p = SseParser::new();
        let mut lat = Latency::new(Instant::now());
        let mut seen = Vec::new();
        advance(150 * MS).await;
        // vLLM sends the role chunk and the first token in the same step.
        let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        feed(
            &mut p,
            &mut lat,
            &format!("{role}{}", chat("Hi")),
            &mut seen,
        );
        for _ in 0..3 {
            advance(20 * MS).await;
            feed(&mut p, &mut lat, &chat(" there"), &mut seen);
        }
        advance(25 * MS).await;
        // Empty content without a role: a token that decodes to nothing, which is output.
        feed(
            &mut p,
            &mut lat,
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"},\"finish_reason\":\"stop\"}]}\n\n",
            &mut seen,
        );
        advance(5 * MS).await;
        feed(
            &mut p,
            &mut lat,
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":5}}\n\n",
            &mut seen,
        );
        advance(MS).await;
        feed(&mut p, &mut lat, "data: [DONE]\n\n", &mut seen);
        advance(MS).await;

        // The role chunk makes no sample: no zero gap beside the first token.
        assert_eq!(
            seen,
            vec![
                Observation::FirstToken(150 * MS),
                Observation::FirstAnswer(150 * MS),
                Observation::Itl(20 * MS),
                Observation::Itl(20 * MS),
                Observation::Itl(20 * MS),
                Observation::Itl(25 * MS),
                Observation::ItlSoFar(85 * MS / 4),
            ]
        );
        let f = lat.figures(Instant::now());
        assert_eq!(f.ttft, Some(150 * MS));
        assert_eq!(f.ttfa, Some(150 * MS));
        assert_eq!(f.reasoning, None);
        // E2EL ends at the last output event: usage, [DONE] and the end do not move it.
        assert_eq!(f.e2el, 235 * MS);
        assert_eq!(f.output_tokens, Some(5));
        assert_eq!(f.token_source, TokenSource::Usage);
        assert_eq!(f.prompt_tokens, Some(9));
        assert_eq!(f.tpot, Some((235 - 150) * MS / 4));
        assert_eq!(f.itl_count, 4);
        assert_eq!(f.itl_mean, Some(85 * MS / 4));
        assert_eq!(f.itl_max, Some(25 * MS));
        assert_eq!(f.chunks, 5);
        assert_eq!(f.empty_choice_events, 1);
        assert!(f.done);
        assert!(!f.inband_error);
        assert_eq!(f.finish_reason, Some(FinishReason::Stop));
    }

    /// The running mean ITL comes at the 4th and 16th samples only, and is exact.
    #[tokio::test(start_paused = true)]
    async fn itl_so_far_at_powers_of_four() {
        let mut p = SseParser::new();
        let mut lat = Latency::new(Instant::now());
        let mut seen = Vec::new();
        feed(&mut p, &mut lat, &chat("a"), &mut seen);
        // Gaps of 1, 2, …, 20 ms.
        for gap in 1..=20 {
            advance(gap * MS).await;
            feed(&mut p, &mut lat, &chat("b"), &mut seen);
        }
        let so_far: Vec<_> = seen
            .iter()
            .filter_map(|o| match o {
                Observation::ItlSoFar(d) => Some(*d),
                _ => None,
            })
            .collect();
        assert_eq!(so_far, vec![10 * MS / 4, 136 * MS / 16]);
        // Each comes right after the sample that completes its count.
        let at = seen
            .iter()
            .position(|o| matches!(o, Observation::ItlSoFar(_)))
            .unwrap();
        assert_eq!(seen[at - 1], Observation::Itl(4 * MS));
    }

    /// llama.cpp's shape: a role chunk with `content: null` well before the first token, and a
    /// finish-only chunk well after the last. Neither is a token; the finish reason is still
    /// read from the finish-only chunk.
    #[tokio::test(start_paused = true)]
    async fn role_and_finish_only_chunks_neither_start_nor_end_nor_sample() {
        let mut p = SseParser::new();
        let mut lat = Latency::new(Instant::now());
        let mut seen = Vec::new();
        advance(10 * MS).await;
        feed(
            &mut p,
            &mut lat,
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\n\n",
            &mut seen,
        );
        advance(90 * MS).await;
        feed(&mut p, &mut lat, &chat("a"), &mut seen);
        advance(30 * MS).await;
        feed(&mut p, &mut lat, &chat("b"), &mut seen);
        advance(40 * MS).await;
        // A finish-only chunk 40 ms later: no ITL sample, E2EL stays at "b".
        feed(
            &mut p,
            &mut lat,
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
            &mut seen,
        );
        advance(5 * MS).await;
        let f = lat.figures(Instant::now());
        assert_eq!(f.ttft, Some(100 * MS));
        assert_eq!(f.ttfa, Some(100 * MS));
        assert_eq!(f.e2el, 130 * MS);
        assert_eq!(f.itl_count, 1);
        assert_eq!(f.itl_max, Some(30 * MS));
        // No usage: output tokens are the output events.
        assert_eq!(f.output_tokens, Some(2));
        assert_eq!(f.token_source, TokenSource::Chunks);
        assert_eq!(f.tpot, Some(30 * MS));
        assert_eq!(f.chunks, 2);
        assert_eq!(f.empty_choice_events, 2);
        assert_eq!(f.finish_reason, Some(FinishReason::Length));
    }

    /// The same stream under `telemetry.definitions = "vllm-bench-0.10"`: every event with
    /// choices is a token, as that bench counted them.
    #[tokio::test(start_paused = true)]
    async fn old_definitions_count_every_choice_event() {
        let mut p = SseParser::new();
        let mut lat = Latency::with_definitions(Instant::now(), Definitions::VllmBench010);
        let mut seen = Vec::new();
        advance(10 * MS).await;
        feed(
            &mut p,
            &mut lat,
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\n\n",
            &mut seen,
        );
        advance(90 * MS).await;
        feed(&mut p, &mut lat, &chat("a"), &mut seen);
        advance(30 * MS).await;
        feed(&mut p, &mut lat, &chat("b"), &mut seen);
        advance(40 * MS).await;
        feed(
            &mut p,
            &mut lat,
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
            &mut seen,
        );
        advance(5 * MS).await;
        let f = lat.figures(Instant::now());
        assert_eq!(f.ttft, Some(10 * MS));
        assert_eq!(f.ttfa, Some(100 * MS), "the answer starts where it did");
        assert_eq!(f.e2el, 170 * MS);
        assert_eq!(f.itl_count, 3);
        assert_eq!(f.itl_max, Some(90 * MS));
        assert_eq!(f.output_tokens, Some(4));
        assert_eq!(f.chunks, 4);
        assert_eq!(f.empty_choice_events, 0);
    }

    /// A reasoning model: reasoning deltas are output (TTFT at the first), the answer starts
    /// at the first content, and the reasoning time lies between. A tool-call delta is output
    /// but no answer.
    #[tokio::test(start_paused = true)]
    async fn reasoning_then_answer_times_are_exact() {
        let mut p = SseParser::new();
        let mut lat = Latency::new(Instant::now());
        let mut seen = Vec::new();
        let delta = |d: &str| format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{d}}}]}}\n\n");
        advance(50 * MS).await;
        feed(
            &mut p,
            &mut lat,
            &delta(r#"{"role":"assistant","content":""}"#),
            &mut seen,
        );
        advance(10 * MS).await;
        feed(&mut p, &mut lat, &delta(r#"{"reasoning":"hm"}"#), &mut seen);
        advance(15 * MS).await;
        feed(
            &mut p,
            &mut lat,
            &delta(r#"{"reasoning_content":"so"}"#),
            &mut seen,
        );
        advance(200 * MS).await;
        feed(&mut p, &mut lat, &chat("Yes"), &mut seen);
        advance(15 * MS).await;
        feed(&mut p, &mut lat, &chat("."), &mut seen);
        assert_eq!(
            seen,
            vec![
                Observation::FirstToken(60 * MS),
                Observation::Itl(15 * MS),
                Observation::Itl(200 * MS),
                Observation::FirstAnswer(275 * MS),
                Observation::Reasoning(215 * MS),
                Observation::Itl(15 * MS),
            ]
        );
        let f = lat.figures(Instant::now());
        assert_eq!(f.ttft, Some(60 * MS));
        assert_eq!(f.ttfa, Some(275 * MS));
        assert_eq!(f.reasoning, Some(215 * MS));
        assert_eq!(f.itl_max, Some(200 * MS));
        assert_eq!(f.e2el, 290 * MS);

        let mut p = SseParser::new();
        let mut lat = Latency::new(Instant::now());
        advance(20 * MS).await;
        feed(
            &mut p,
            &mut lat,
            &delta(r#"{"tool_calls":[{"index":0,"function":{"name":"f"}}]}"#),
            &mut seen,
        );
        let f = lat.figures(Instant::now());
        assert_eq!(f.ttft, Some(20 * MS));
        assert_eq!(f.ttfa, None);
        assert_eq!(f.reasoning, None);
    }

    /// Every chat and completions vector of bench 0.33: each event handed downstream at its
    /// own instant (event `i` at `(i + 1)²` ms, so every gap differs), and the figures are
    /// bench's, to the nanosecond.
    #[tokio::test(start_paused = true)]
    async fn vectors_give_benchs_figures() {
        for v in crate::sse::tests::vectors::load() {
            let t0 = Instant::now();
            let at = |i: usize| t0 + ((i as u32 + 1) * (i as u32 + 1)) * MS;
            let mut p = SseParser::new();
            let mut lat = Latency::new(t0);
            let mut itls = Vec::new();
            for (i, e) in v.events.iter().enumerate() {
                let now = at(i);
                advance(now - Instant::now()).await;
                lat.on_bytes(now);
                p.feed(crate::sse::tests::vectors::sse(e).as_bytes(), |ev| {
                    lat.on_event(ev, now, |o| {
                        if let Observation::Itl(d) = o {
                            itls.push(d);
                        }
                    })
                });
            }
            advance(7 * MS).await;
            let f = lat.figures(Instant::now());
            assert_eq!(f.ttft, Some(at(v.ttft_event) - t0), "{}", v.name);
            let expected: Vec<Duration> = v.itl_pairs.iter().map(|&(a, b)| at(b) - at(a)).collect();
            assert_eq!(itls, expected, "{}", v.name);
            assert_eq!(f.itl_count, expected.len() as u64, "{}", v.name);
            assert_eq!(f.itl_max, expected.iter().max().copied(), "{}", v.name);
            assert_eq!(f.e2el, at(v.e2el_event) - t0, "{}", v.name);
            assert_eq!(f.output_tokens, Some(v.output_tokens), "{}", v.name);
            let decode = at(v.e2el_event) - at(v.ttft_event);
            assert_eq!(
                f.tpot,
                Some(decode / (v.output_tokens as u32 - 1)),
                "{}",
                v.name
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn itl_is_per_choice_when_n_is_two() {
        let mut p = SseParser::new();
        let mut lat = Latency::new(Instant::now());
        let mut seen = Vec::new();
        let c = |i: u32| format!("data: {{\"choices\":[{{\"index\":{i},\"text\":\"x\"}}]}}\n\n");
        advance(50 * MS).await;
        feed(&mut p, &mut lat, &c(0), &mut seen);
        advance(MS).await;
        feed(&mut p, &mut lat, &c(1), &mut seen);
        advance(19 * MS).await;
        feed(&mut p, &mut lat, &c(0), &mut seen);
        advance(MS).await;
        feed(&mut p, &mut lat, &c(1), &mut seen);
        let itls: Vec<_> = seen
            .iter()
            .filter_map(|o| match o {
                Observation::Itl(d) => Some(*d),
                _ => None,
            })
            .collect();
        assert_eq!(itls, vec![20 * MS, 20 * MS]);
        assert_eq!(lat.figures(Instant::now()).chunks, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn continuous_usage_gives_tokens_per_chunk() {
        let mut p = SseParser::new();
        let mut lat = Latency::new(Instant::now());
        let mut seen = Vec::new();
        let c = |n: u64| {
            format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"x\"}}}}],\"usage\":{{\"prompt_tokens\":4,\"completion_tokens\":{n}}}}}\n\n"
            )
        };
        feed(&mut p, &mut lat, &c(1), &mut seen);
        advance(40 * MS).await;
        feed(&mut p, &mut lat, &c(4), &mut seen);
        advance(40 * MS).await;
        feed(&mut p, &mut lat, &c(7), &mut seen);
        let per_chunk: Vec<_> = seen
            .iter()
            .filter_map(|o| match o {
                Observation::TokensPerChunk(n) => Some(*n),
                _ => None,
            })
            .collect();
        assert_eq!(per_chunk, vec![1, 3, 3]);
        let f = lat.figures(Instant::now());
        assert_eq!(f.output_tokens, Some(7));
        assert_eq!(f.tpot, Some(80 * MS / 6));
    }

    #[tokio::test(start_paused = true)]
    async fn error_other_and_missing_done_are_noted() {
        let mut p = SseParser::new();
        let mut lat = Latency::new(Instant::now());
        let mut seen = Vec::new();
        advance(30 * MS).await;
        feed(&mut p, &mut lat, &chat("a"), &mut seen);
        feed(&mut p, &mut lat, "data: not json\n\n", &mut seen);
        advance(30 * MS).await;
        feed(
            &mut p,
            &mut lat,
            "data: {\"error\":{\"message\":\"x\",\"code\":500}}\n\n",
            &mut seen,
        );
        advance(30 * MS).await;
        let f = lat.figures(Instant::now());
        assert!(f.inband_error);
        assert!(!f.done);
        assert_eq!(f.other_events, 1);
        assert_eq!(f.e2el, 30 * MS, "ends at the last token event");
    }

    #[tokio::test(start_paused = true)]
    async fn response_without_tokens_ends_at_last_byte() {
        let mut lat = Latency::new(Instant::now());
        advance(70 * MS).await;
        lat.on_bytes(Instant::now());
        lat.on_usage(Usage {
            prompt_tokens: Some(3),
            completion_tokens: Some(12),
            cached_prompt_tokens: None,
            reasoning_tokens: None,
        });
        advance(70 * MS).await;
        let f = lat.figures(Instant::now());
        assert_eq!(f.e2el, 70 * MS);
        assert_eq!(f.ttft, None);
        assert_eq!(f.tpot, None, "no TTFT, no TPOT");
        assert_eq!(f.output_tokens, Some(12));
        // Nothing at all: E2EL runs to the end.
        let lat = Latency::new(Instant::now());
        advance(5 * MS).await;
        let f = lat.figures(Instant::now());
        assert_eq!(f.e2el, 5 * MS);
        assert_eq!(f.token_source, TokenSource::None);
    }

    #[test]
    fn huge_choice_index_is_not_tracked() {
        let mut p = SseParser::new();
        let t = Instant::now();
        let mut lat = Latency::new(t);
        p.feed(
            b"data: {\"choices\":[{\"index\":4000000000,\"text\":\"x\"}]}\n\n",
            |e| lat.on_event(e, t, |_| {}),
        );
        assert!(lat.last_by_choice.is_empty());
        assert_eq!(lat.figures(t).chunks, 1);
    }

    #[test]
    fn slo_bounds_are_inclusive_and_unobserved_figures_pass() {
        let t = Instant::now();
        let mut f = Latency::new(t).figures(t);
        f.ttft = Some(100 * MS);
        f.tpot = Some(20 * MS);
        f.e2el = 500 * MS;
        let slo = Slo {
            ttft: Some(100 * MS),
            tpot: Some(20 * MS),
            e2el: Some(500 * MS),
        };
        assert!(slo.is_good(&f));
        f.tpot = Some(21 * MS);
        assert!(!slo.is_good(&f));
        f.tpot = None;
        assert!(slo.is_good(&f), "one output token has no TPOT and passes");
        f.e2el = 501 * MS;
        assert!(!slo.is_good(&f));
        assert!(Slo::default().is_good(&f));
    }

    #[test]
    fn slo_in_milliseconds() {
        let slo = Slo::from_ms(Some(250.0), Some(12.5), None);
        assert_eq!(slo.ttft, Some(Duration::from_millis(250)));
        assert_eq!(slo.tpot, Some(Duration::from_micros(12_500)));
        assert_eq!(slo.e2el, None);
    }
}
