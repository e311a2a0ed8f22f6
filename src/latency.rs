//! Per-request latency state machine: classified events and the instants they were handed to
//! the client in, figures out.
//!
//! Pure: no I/O and no clock of its own. The body wrapper passes `now` with each event; tests
//! pass instants from tokio's paused clock. Definitions are those of `docs/METRICS.md` §2.

use std::time::Duration;

use smallvec::SmallVec;
use tokio::time::Instant;

use crate::sse::{Event, EventKind, FinishReason, Usage};

/// Choice indexes at or above this are not tracked for per-choice ITL (an upstream that sends
/// `"index": 4000000000` must not make the proxy allocate for it).
pub const MAX_TRACKED_CHOICES: usize = 128;

/// A figure available as soon as the event that produces it has been handed downstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The first token event: its time since the request arrived (TTFT).
    FirstToken(Duration),
    /// The first token event with content (TTFC).
    FirstContent(Duration),
    /// The gap since the previous token event of the same choice (one ITL sample).
    Itl(Duration),
    /// Completion tokens a token event carried, known from cumulative usage.
    TokensPerChunk(u64),
}

/// Where the output token count came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `usage.completion_tokens` of the last usage the response carried.
    Usage,
    /// The number of token events that carried content (no usage was sent).
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
    first_content: Option<Instant>,
    token_events: u64,
    content_events: u64,
    itl_count: u64,
    itl_sum: Duration,
    itl_max: Duration,
    last_by_choice: SmallVec<[Option<Instant>; 1]>,
    finish_reason: Option<FinishReason>,
    usage_seen: bool,
    inband_error: bool,
    done: bool,
    cumulative_completion: u64,
    other_events: u64,
    usage: Usage,
    t0: Instant,
}

/// What a finished request measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Figures {
    /// Time to the first token event.
    pub ttft: Option<Duration>,
    /// Time to the first token event with content.
    pub ttfc: Option<Duration>,
    /// Time to the last token event; for a response without token events, to its last byte.
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
    /// Token events seen.
    pub chunks: u64,
    /// An error event arrived in the stream.
    pub inband_error: bool,
    /// `[DONE]` arrived.
    pub done: bool,
    /// Events that were none of token/usage/error/done.
    pub other_events: u64,
    /// The last `finish_reason` a choice reported.
    pub finish_reason: Option<FinishReason>,
}

impl Latency {
    /// Bytes from the start of the state to the end of the fields a token event updates.
    #[cfg(test)]
    pub(crate) const TOKEN_FIELDS: usize = std::mem::offset_of!(Latency, finish_reason);

    /// Starts the clock of a request that arrived at `t0`.
    pub fn new(t0: Instant) -> Self {
        Latency {
            t0,
            first_token: None,
            first_content: None,
            last_token: None,
            last_byte: None,
            last_by_choice: SmallVec::new(),
            itl_count: 0,
            itl_sum: Duration::ZERO,
            itl_max: Duration::ZERO,
            token_events: 0,
            content_events: 0,
            usage: Usage::default(),
            usage_seen: false,
            cumulative_completion: 0,
            inband_error: false,
            done: false,
            other_events: 0,
            finish_reason: None,
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
    }

    fn on_token(&mut self, event: &Event<'_>, now: Instant, observe: &mut impl FnMut(Observation)) {
        self.token_events += 1;
        if self.first_token.is_none() {
            self.first_token = Some(now);
            observe(Observation::FirstToken(now - self.t0));
        }
        let has_content = event.choices.iter().any(|c| c.has_content);
        if has_content {
            self.content_events += 1;
            if self.first_content.is_none() {
                self.first_content = Some(now);
                observe(Observation::FirstContent(now - self.t0));
            }
        }
        for choice in event.choices {
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason);
            }
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
            }
        }
        if let Some(cumulative) = event.usage.and_then(|u| u.completion_tokens) {
            let carried = cumulative.saturating_sub(self.cumulative_completion);
            self.cumulative_completion = cumulative;
            if carried > 0 {
                observe(Observation::TokensPerChunk(carried));
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
            _ if self.token_events > 0 => (Some(self.content_events), TokenSource::Chunks),
            _ => (None, TokenSource::None),
        };
        let tpot = match (ttft, output_tokens) {
            (Some(ttft), Some(n)) if n > 1 => Some(e2el.saturating_sub(ttft) / (n - 1) as u32),
            _ => None,
        };
        Figures {
            ttft,
            ttfc: self.first_content.map(|t| t - self.t0),
            e2el,
            itl_mean: (self.itl_count > 0).then(|| self.itl_sum / self.itl_count as u32),
            itl_max: (self.itl_count > 0).then_some(self.itl_max),
            itl_count: self.itl_count,
            tpot,
            output_tokens,
            token_source,
            prompt_tokens: self.usage.prompt_tokens,
            chunks: self.token_events,
            inband_error: self.inband_error,
            done: self.done,
            other_events: self.other_events,
            finish_reason: self.finish_reason,
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

        assert_eq!(
            seen,
            vec![
                Observation::FirstToken(150 * MS),
                Observation::FirstContent(150 * MS),
                Observation::Itl(Duration::ZERO),
                Observation::Itl(20 * MS),
                Observation::Itl(20 * MS),
                Observation::Itl(20 * MS),
                Observation::Itl(25 * MS),
            ]
        );
        let f = lat.figures(Instant::now());
        assert_eq!(f.ttft, Some(150 * MS));
        assert_eq!(f.ttfc, Some(150 * MS));
        // E2EL ends at the last token event: usage, [DONE] and the end do not move it.
        assert_eq!(f.e2el, 235 * MS);
        assert_eq!(f.output_tokens, Some(5));
        assert_eq!(f.token_source, TokenSource::Usage);
        assert_eq!(f.prompt_tokens, Some(9));
        assert_eq!(f.tpot, Some((235 - 150) * MS / 4));
        assert_eq!(f.itl_count, 5);
        assert_eq!(f.itl_mean, Some(85 * MS / 5));
        assert_eq!(f.itl_max, Some(25 * MS));
        assert_eq!(f.chunks, 6);
        assert!(f.done);
        assert!(!f.inband_error);
        assert_eq!(f.finish_reason, Some(FinishReason::Stop));
    }

    #[tokio::test(start_paused = true)]
    async fn early_role_chunk_separates_ttft_from_ttfc() {
        let mut p = SseParser::new();
        let mut lat = Latency::new(Instant::now());
        let mut seen = Vec::new();
        advance(10 * MS).await;
        feed(
            &mut p,
            &mut lat,
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            &mut seen,
        );
        advance(90 * MS).await;
        feed(&mut p, &mut lat, &chat("a"), &mut seen);
        let f = lat.figures(Instant::now());
        assert_eq!(f.ttft, Some(10 * MS));
        assert_eq!(f.ttfc, Some(100 * MS));
        // No usage: output tokens are the token events with content.
        assert_eq!(f.output_tokens, Some(1));
        assert_eq!(f.token_source, TokenSource::Chunks);
        assert_eq!(f.tpot, None);
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
