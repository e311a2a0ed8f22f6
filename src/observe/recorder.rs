//! The per-request telemetry state: what the body wrapper feeds it frame by frame, and the one
//! report it makes when the request ends.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::latency::{Latency, Observation};
use crate::route::Endpoint;
use crate::sse::{self, Dialect, EventKind, SseParser};
use crate::telemetry::otel::{RequestSpan, Server};
use crate::telemetry::otlp_metrics::ChunkTimes;
use crate::telemetry::stats::ItlBatch;
use crate::telemetry::{Finished, Outcome, RouteMetrics, Telemetry, UpstreamLatency};

/// Largest non-streaming body kept (by reference, not copied) to read `usage` from at the end.
const MAX_JSON_USAGE_BODY: usize = 4 * 1024 * 1024;

/// How the response body is looked at.
#[derive(Debug)]
enum Mode {
    /// `text/event-stream`: parse events.
    Sse { parser: SseParser },
    /// A JSON body of a generation request: kept to read `usage` from when it ends.
    Json { frames: Vec<Bytes>, len: usize },
    /// Anything else: only the time of the last byte matters.
    Opaque,
}

/// A stream's OTLP buffer of ITL samples, where to record it when it is full, and the
/// upstream it came from.
type OtlpChunks<'a> = Option<(
    &'a mut ChunkTimes,
    &'a Arc<Telemetry>,
    &'a Option<Arc<Server>>,
)>;

/// The shared metrics a request's figures go to as they become known.
#[derive(Clone, Copy)]
struct Destinations<'a> {
    route: &'a RouteMetrics,
    /// The balancer's estimate of the upstream that serves the request.
    feedback: &'a Option<Arc<dyn Feedback>>,
    /// The histograms of the upstream that answered.
    upstream: &'a Option<Arc<UpstreamLatency>>,
}

/// How a body ended, before it is turned into an [`Outcome`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The upstream body ended normally.
    Complete,
    /// The upstream body failed mid-way.
    UpstreamError,
    /// No frame arrived within the idle timeout.
    IdleTimeout,
    /// The client went away (the body was dropped before its end).
    Dropped,
}

/// Where the latency a request's upstream showed is fed back (the load balancer's estimate of
/// that upstream): told at most once at the first token and once when the request ends well,
/// never per chunk.
pub trait Feedback: Send + Sync + std::fmt::Debug {
    /// The first token reached the client `ttft` after the request arrived.
    fn first_token(&self, ttft: Duration, now: Instant);
    /// The request has streamed with mean ITL `itl_mean` so far (see
    /// [`Observation::ItlSoFar`]).
    fn decoding(&self, itl_mean: Duration, now: Instant);
    /// The request ended well (outcome `ok`) after `e2el`: `itl_mean` is its mean ITL when it
    /// streamed tokens, and `ttft` its TTFT when one was timed (a non-streaming answer has
    /// none: its whole latency stands in for it).
    fn finished(
        &self,
        ttft: Option<Duration>,
        itl_mean: Option<Duration>,
        e2el: Duration,
        now: Instant,
    );
}

/// Per-request telemetry state, created when the request arrives and consumed by
/// [`Recorder::finish`] exactly once.
///
/// At a thousand streams a stream's state is out of the CPU's caches by the time its next
/// chunk comes, so every cache line a chunk touches costs a fetch: the fields each chunk reads
/// come first and in this order (`repr(C)`), those of the head and the end after them.
#[derive(Debug)]
#[repr(C)]
pub struct Recorder {
    mode: Mode,
    /// ITL samples on their way to `/stats`.
    itl: ItlBatch,
    route: Arc<RouteMetrics>,
    /// Boxed: most requests have none.
    span: Option<Box<RequestSpan>>,
    /// The response's id and model have been handed to the span.
    meta_seen: bool,
    /// The stream's ITL samples go to OTLP metrics too (`chunk_times`): set at the response head
    /// of an event stream of a GenAI operation while OTLP metrics are on. It sits in what was
    /// padding among the per-chunk fields, so that a chunk of any other request reads nothing
    /// more than before.
    otlp_chunks: bool,
    status: u16,
    latency: Latency,
    /// The ITL samples OTLP metrics have not recorded yet (empty unless `otlp_chunks`).
    chunk_times: ChunkTimes,
    telemetry: Arc<Telemetry>,
    request_id: Box<str>,
    /// The upstream's load balancer, when it wants the request's latency.
    feedback: Option<Arc<dyn Feedback>>,
    /// The latency histograms of the upstream endpoint that answered.
    upstream: Option<Arc<UpstreamLatency>>,
    /// The upstream endpoint the request was sent to, as OpenTelemetry names it.
    server: Option<Arc<Server>>,
}

impl Recorder {
    /// Starts recording a request that arrived at `t0`; counts it in flight until `finish`.
    pub fn new(
        telemetry: Arc<Telemetry>,
        route: Arc<RouteMetrics>,
        request_id: Box<str>,
        t0: Instant,
        span: Option<RequestSpan>,
    ) -> Self {
        route.in_flight.increment(1.0);
        let latency = Latency::with_definitions(t0, telemetry.definitions);
        Recorder {
            telemetry,
            route,
            request_id,
            latency,
            status: 0,
            mode: Mode::Opaque,
            meta_seen: span.is_none(),
            span: span.map(Box::new),
            itl: ItlBatch::default(),
            otlp_chunks: false,
            chunk_times: ChunkTimes::default(),
            feedback: None,
            upstream: None,
            server: None,
        }
    }

    /// Feeds the request's first token and its end to `feedback` (set once the upstream that
    /// serves the request is known).
    pub fn set_feedback(&mut self, feedback: Arc<dyn Feedback>) {
        self.feedback = Some(feedback);
    }

    /// Records the request's TTFT, TPOT and E2EL in `upstream`'s histograms too (set once the
    /// endpoint that answered is known, before its response head is read): the same figures
    /// as the main histograms, at the same moments.
    pub fn set_upstream(&mut self, upstream: Arc<UpstreamLatency>) {
        self.upstream = Some(upstream);
    }

    /// The request was sent to `server` (the endpoint that answered it, or whose connection
    /// failed): the span and the OTLP metrics name it. Set once the endpoint is known.
    pub fn set_server(&mut self, server: Arc<Server>) {
        if let Some(span) = &mut self.span {
            span.on_upstream(&server);
        }
        self.server = Some(server);
    }

    /// Called when the upstream's response head arrives: records the header time and decides
    /// how the body will be read.
    /// An event stream is read with events of at most `max_event` bytes held.
    pub fn on_head(&mut self, status: u16, sse: bool, json: bool, max_event: usize, now: Instant) {
        self.status = status;
        if status < 500 {
            // The upstream answered: it is up, whatever the proxy does with the answer.
            self.telemetry.upstream.mark();
        }
        if let Some(span) = &mut self.span {
            span.on_response_head(status);
        }
        self.route
            .header_time
            .record((now - self.latency.t0()).as_secs_f64());
        let ok = (200..300).contains(&status);
        self.mode = if ok && sse {
            self.otlp_chunks = self
                .telemetry
                .otlp_metrics()
                .is_some_and(|otlp| otlp.records_chunks(self.route.endpoint));
            Mode::Sse {
                parser: SseParser::with_max_event(max_event)
                    .with_dialect(dialect(self.route.endpoint)),
            }
        } else if ok && json && self.route.endpoint.is_generation() {
            Mode::Json {
                frames: Vec::new(),
                len: 0,
            }
        } else {
            Mode::Opaque
        };
    }

    /// Reads a data frame handed to the client at `now`. When `boundaries` is given, the end
    /// offset of each event the frame completes is pushed to it, with whether the event was
    /// usage-only (what the proxy's usage cutter needs, so that it does not parse again).
    pub fn on_data(
        &mut self,
        data: &Bytes,
        now: Instant,
        mut boundaries: Option<&mut Vec<(usize, bool)>>,
    ) {
        self.latency.on_bytes(now);
        let route = &*self.route;
        let latency = &mut self.latency;
        let span = &mut self.span;
        let itl = &mut self.itl;
        let meta_seen = &mut self.meta_seen;
        // References only: the feedback and the upstream's histograms are read when a figure
        // for them comes, not on every chunk.
        let to = Destinations {
            route,
            feedback: &self.feedback,
            upstream: &self.upstream,
        };
        // The telemetry is read only when a batch of OTLP samples is full.
        let telemetry = &self.telemetry;
        let chunk_times = &mut self.chunk_times;
        // A reference: the server is read only when a batch is recorded.
        let server = &self.server;
        let mut otlp: OtlpChunks<'_> = self.otlp_chunks.then_some((chunk_times, telemetry, server));
        match &mut self.mode {
            Mode::Opaque => {}
            Mode::Json { frames, len } => {
                if *len + data.len() <= MAX_JSON_USAGE_BODY {
                    *len += data.len();
                    frames.push(data.clone());
                } else {
                    frames.clear();
                    *len = usize::MAX / 2;
                }
            }
            Mode::Sse { parser } => {
                parser.feed(data, |event| {
                    latency.on_event(event, now, |o| observe(&to, span, itl, &mut otlp, o, now));
                    if !*meta_seen
                        && let (Some(span), Some(id), Some(model)) =
                            (span.as_mut(), event.id, event.model)
                    {
                        span.on_response_meta(id, model);
                        *meta_seen = true;
                    }
                    if let Some(ends) = boundaries.as_deref_mut() {
                        ends.push((event.end, event.kind == EventKind::Usage));
                    }
                });
                let oversized = parser.take_oversized();
                if oversized > 0 {
                    route.oversized.increment(u64::from(oversized));
                }
            }
        }
    }

    /// Writes the request's trace context into the headers sent upstream (when it is traced and
    /// propagation is on), so that the server's own spans join the trace.
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        if let Some(span) = &self.span {
            span.inject(headers);
        }
    }

    /// Reports a request that ended without a response body from the upstream (the proxy
    /// answered it itself with `status`).
    pub fn finish_without_body(mut self, outcome: Outcome, status: u16, now: Instant) {
        self.status = status;
        self.report(outcome, now);
    }

    /// Reports the request: called once, when the body ends, fails or is dropped.
    pub fn finish(mut self, ending: Ending, now: Instant) {
        let outcome = match ending {
            Ending::Complete if self.status >= 400 => Outcome::UpstreamStatus,
            Ending::Complete if self.latency.inband_error() => Outcome::InbandError,
            Ending::Complete => Outcome::Ok,
            Ending::UpstreamError => Outcome::UpstreamDisconnect,
            Ending::IdleTimeout => Outcome::UpstreamTimeout,
            Ending::Dropped => Outcome::ClientDisconnect,
        };
        match std::mem::replace(&mut self.mode, Mode::Opaque) {
            Mode::Json { frames, len } if len <= MAX_JSON_USAGE_BODY => {
                let mut joined = Vec::new();
                let body = json_body(&frames, &mut joined, dialect(self.route.endpoint));
                if let Some(usage) = body.usage {
                    self.latency.on_usage(usage);
                }
                if let Some(finish) = body.finish {
                    // A Responses or Messages body's status or stop reason.
                    self.latency.on_finish(finish);
                }
                if let Some(server) = body.server.timings() {
                    self.latency.on_server(server);
                }
                if let (Some(span), Some(id), Some(model)) = (&mut self.span, body.id, body.model) {
                    span.on_response_meta(id, model);
                }
            }
            Mode::Sse { parser, .. } if parser.has_partial_event() => {
                // A stream that ended inside an event: noted as malformed.
                self.route.unrecognized.increment(1);
            }
            _ => {}
        }
        self.report(outcome, now);
    }

    fn report(mut self, outcome: Outcome, now: Instant) {
        self.route.in_flight.decrement(1.0);
        if let Some(stats) = &self.route.stats {
            stats.flush_itl(&mut self.itl, now);
        }
        let figures = self.latency.figures(now);
        let trace = self.span.as_ref().and_then(|span| span.trace());
        if let Some(feedback) = self.feedback.take()
            && outcome == Outcome::Ok
        {
            feedback.finished(figures.ttft, figures.itl_mean, figures.e2el, now);
        }
        if let Some(upstream) = &self.upstream {
            upstream.finished(outcome, &figures, trace);
        }
        if let Some(span) = self.span {
            (*span).finish(outcome, self.status, &figures);
        }
        self.telemetry.record(
            &Finished {
                request_id: &self.request_id,
                route: &self.route,
                server: self.server.as_deref(),
                status: self.status,
                outcome,
                figures: &figures,
                stream: figures.chunks + figures.empty_choice_events > 0,
                trace,
                chunk_times: self.chunk_times.seconds(),
            },
            self.latency.t0(),
            now,
        );
    }
}

/// Records a figure the moment it is known (an ITL sample in `/stats` and OTLP a batch at a
/// time).
fn observe(
    to: &Destinations<'_>,
    span: &mut Option<Box<RequestSpan>>,
    itl: &mut ItlBatch,
    otlp: &mut OtlpChunks<'_>,
    o: Observation,
    now: Instant,
) {
    let Destinations {
        route,
        feedback,
        upstream,
    } = *to;
    match o {
        Observation::FirstToken(d) => {
            let trace = span.as_ref().and_then(|s| s.trace());
            route.ttft.record_traced(d.as_secs_f64(), trace);
            if let Some(upstream) = upstream {
                upstream.first_token(d.as_secs_f64(), trace);
            }
            if let Some(feedback) = feedback {
                feedback.first_token(d, now);
            }
            if let Some(span) = span {
                span.on_first_token(d);
            }
        }
        Observation::FirstAnswer(d) => {
            route.ttfa.record(d.as_secs_f64());
            if let Some(span) = span {
                span.on_first_answer(d);
            }
        }
        Observation::Reasoning(d) => route.reasoning.record(d.as_secs_f64()),
        Observation::Itl(d) => {
            route.itl.record(d.as_secs_f64());
            if let Some(stats) = &route.stats {
                stats.record_itl(itl, d, now);
            }
            if let Some((times, telemetry, server)) = otlp
                && times.push(d)
                && let Some(otlp) = telemetry.otlp_metrics()
            {
                otlp.record_chunks(route, server.as_deref(), times);
            }
        }
        Observation::TokensPerChunk(n) => route.tokens_per_chunk.record(n as f64),
        Observation::ItlSoFar(mean) => {
            if let Some(feedback) = feedback {
                feedback.decoding(mean, now);
            }
        }
    }
}

/// Reads a complete non-streaming JSON body, joined into `joined` when it came in several
/// frames: the events' classifier reads what telemetry needs of a whole body too (its usage,
/// and its id and model when they are plain strings) for two thirds of what serde's walk of it
/// cost.
pub(super) fn json_body<'a>(
    frames: &'a [Bytes],
    joined: &'a mut Vec<u8>,
    dialect: Dialect,
) -> sse::Classified<'a> {
    let body: &[u8] = match frames {
        [one] => one,
        _ => {
            frames.iter().for_each(|f| joined.extend_from_slice(f));
            joined
        }
    };
    sse::classify_body(dialect, body)
}

/// Whose event rules read an endpoint's streams and bodies: the Responses and Messages APIs
/// have their own; everything else is read as chat.
fn dialect(endpoint: Endpoint) -> Dialect {
    match endpoint {
        Endpoint::Responses => Dialect::Responses,
        Endpoint::Messages => Dialect::Messages,
        _ => Dialect::Chat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a templated chunk touches of its recorder, from its start to the end of the
    /// latency state's token fields, stays within six cache lines.
    #[test]
    fn per_chunk_fields_share_few_cache_lines() {
        let end = std::mem::offset_of!(Recorder, latency) + Latency::TOKEN_FIELDS;
        assert!(end <= 6 * 64, "{end} bytes");
        assert!(std::mem::offset_of!(Recorder, telemetry) >= end);
        // Whether OTLP keeps ITL samples is read with the per-chunk fields; the samples
        // themselves, read only when it does, are kept past them.
        assert!(
            std::mem::offset_of!(Recorder, otlp_chunks) < std::mem::offset_of!(Recorder, latency)
        );
        assert!(std::mem::offset_of!(Recorder, chunk_times) >= end);
    }
}
