//! The response body wrapper: it times each frame as it is handed to the client, feeds SSE
//! events to the latency state machine, and reports the request exactly once when it ends —
//! at the end of the body, on an upstream error or idle timeout, or when the client goes away
//! and the body is dropped.
//!
//! Frames are passed on as they are. The one exception is the usage-only event the proxy asked
//! for on the client's behalf: it is cut out, and so that it can be, bytes of an event that is
//! not yet complete are held until its blank line arrives (a client cannot act on half an event,
//! so this delays nothing it can see).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::latency::{Latency, Observation};
use crate::net::BoxError;
use crate::sse::{self, EventKind, SseParser};
use crate::telemetry::otel::RequestSpan;
use crate::telemetry::stats::ItlBatch;
use crate::telemetry::{Finished, Outcome, RouteMetrics, Telemetry};

/// Largest non-streaming body kept (by reference, not copied) to read `usage` from at the end.
const MAX_JSON_USAGE_BODY: usize = 4 * 1024 * 1024;

/// How the response body is looked at.
#[derive(Debug)]
enum Mode {
    /// `text/event-stream`: parse events; with `strip`, remove usage-only events (boxed: only
    /// streams whose usage the proxy asked for need it, and the recorder's per-chunk fields
    /// should share few cache lines).
    Sse {
        parser: SseParser,
        strip: Option<Box<Strip>>,
    },
    /// A JSON body of a generation request: kept to read `usage` from when it ends.
    Json { frames: Vec<Bytes>, len: usize },
    /// Anything else: only the time of the last byte matters.
    Opaque,
}

/// What removing usage-only events from a stream keeps between frames.
#[derive(Debug, Default)]
struct Strip {
    /// Bytes of an incomplete event held back.
    pending: BytesMut,
    /// (end offset, cut out) of the events of the current frame; reused.
    ends: Vec<(usize, bool)>,
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
    status: u16,
    latency: Latency,
    telemetry: Arc<Telemetry>,
    request_id: Box<str>,
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
        Recorder {
            telemetry,
            route,
            request_id,
            latency: Latency::new(t0),
            status: 0,
            mode: Mode::Opaque,
            meta_seen: span.is_none(),
            span: span.map(Box::new),
            itl: ItlBatch::default(),
        }
    }

    /// Called when the upstream's response head arrives: records the header time and decides
    /// how the body will be read.
    pub fn on_head(&mut self, status: u16, sse: bool, json: bool, strip_usage: bool, now: Instant) {
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
            Mode::Sse {
                parser: SseParser::new(),
                strip: strip_usage.then(Box::default),
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

    /// True when bytes may be held back (usage stripping), so the body length is not known.
    fn strips(&self) -> bool {
        matches!(self.mode, Mode::Sse { strip: Some(_), .. })
    }

    /// Takes a data frame that arrives at `now` and returns the bytes to hand to the client now
    /// (the frame itself, except when usage stripping holds or cuts bytes).
    pub fn on_data(&mut self, data: Bytes, now: Instant) -> Bytes {
        self.latency.on_bytes(now);
        let route = &*self.route;
        let latency = &mut self.latency;
        let span = &mut self.span;
        let itl = &mut self.itl;
        let meta_seen = &mut self.meta_seen;
        match &mut self.mode {
            Mode::Opaque => data,
            Mode::Json { frames, len } => {
                if *len + data.len() <= MAX_JSON_USAGE_BODY {
                    *len += data.len();
                    frames.push(data.clone());
                } else {
                    frames.clear();
                    *len = usize::MAX / 2;
                }
                data
            }
            Mode::Sse { parser, strip } => {
                if let Some(strip) = strip {
                    strip.ends.clear();
                }
                parser.feed(&data, |event| {
                    latency.on_event(event, now, |o| observe(route, span, itl, o, now));
                    if !*meta_seen
                        && let (Some(span), Some(id), Some(model)) =
                            (span.as_mut(), event.id, event.model)
                    {
                        span.on_response_meta(id, model);
                        *meta_seen = true;
                    }
                    if let Some(strip) = strip {
                        strip.ends.push((event.end, event.kind == EventKind::Usage));
                    }
                });
                match strip {
                    Some(strip) => cut_usage(data, &strip.ends, &mut strip.pending),
                    None => data,
                }
            }
        }
    }

    /// Bytes held back at the end of the stream (an incomplete last event), to be forwarded.
    pub fn take_pending(&mut self) -> Bytes {
        match &mut self.mode {
            Mode::Sse {
                strip: Some(strip), ..
            } => strip.pending.split().freeze(),
            _ => Bytes::new(),
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
                let body = json_body(&frames, &mut joined);
                if let Some(usage) = body.usage {
                    self.latency.on_usage(usage);
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
        if let Some(span) = self.span {
            (*span).finish(outcome, self.status, &figures);
        }
        self.telemetry.record(
            &Finished {
                request_id: &self.request_id,
                route: &self.route,
                status: self.status,
                outcome,
                figures: &figures,
                stream: figures.chunks > 0,
            },
            self.latency.t0(),
            now,
        );
    }
}

/// Records a figure the moment it is known (an ITL sample in `/stats` a batch at a time).
fn observe(
    route: &RouteMetrics,
    span: &mut Option<Box<RequestSpan>>,
    itl: &mut ItlBatch,
    o: Observation,
    now: Instant,
) {
    match o {
        Observation::FirstToken(d) => {
            route.ttft.record(d.as_secs_f64());
            if let Some(span) = span {
                span.on_first_token(d);
            }
        }
        Observation::FirstContent(d) => {
            route.ttfc.record(d.as_secs_f64());
            if let Some(span) = span {
                span.on_first_content(d);
            }
        }
        Observation::Itl(d) => {
            route.itl.record(d.as_secs_f64());
            if let Some(stats) = &route.stats {
                stats.record_itl(itl, d, now);
            }
        }
        Observation::TokensPerChunk(n) => route.tokens_per_chunk.record(n as f64),
    }
}

/// Returns the bytes of `frame` that complete events, without the events marked in `ends`,
/// preceded by the held-back `pending` bytes; what is left of `frame` becomes `pending`.
fn cut_usage(frame: Bytes, ends: &[(usize, bool)], pending: &mut BytesMut) -> Bytes {
    let Some(&(last_end, _)) = ends.last() else {
        pending.extend_from_slice(&frame);
        return Bytes::new();
    };
    let mut out: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut push = |b: Bytes| {
        if b.is_empty() {
            return;
        }
        match (&mut out, &mut joined) {
            (None, None) => out = Some(b),
            (Some(first), None) => {
                let mut j = BytesMut::with_capacity(first.len() + b.len());
                j.extend_from_slice(first);
                j.extend_from_slice(&b);
                joined = Some(j);
            }
            (_, Some(j)) => j.extend_from_slice(&b),
        }
    };
    let mut start = 0;
    let mut run_start = 0;
    for (i, &(end, cut)) in ends.iter().enumerate() {
        if cut {
            if i == 0 {
                pending.clear();
            } else if start > run_start {
                push(frame.slice(run_start..start));
            }
            run_start = end;
        } else if i == 0 && !pending.is_empty() {
            push(pending.split().freeze());
        }
        start = end;
    }
    if last_end > run_start {
        push(frame.slice(run_start..last_end));
    }
    pending.extend_from_slice(&frame[last_end..]);
    match (joined, out) {
        (Some(j), _) => j.freeze(),
        (None, Some(b)) => b,
        (None, None) => Bytes::new(),
    }
}

/// Reads a complete non-streaming JSON body, joined into `joined` when it came in several
/// frames: the events' classifier reads what telemetry needs of a whole body too (its usage,
/// and its id and model when they are plain strings) for two thirds of what serde's walk of it
/// cost.
fn json_body<'a>(frames: &'a [Bytes], joined: &'a mut Vec<u8>) -> sse::Classified<'a> {
    let body: &[u8] = match frames {
        [one] => one,
        _ => {
            frames.iter().for_each(|f| joined.extend_from_slice(f));
            joined
        }
    };
    sse::classify(body, &mut Vec::new())
}

/// Error returned to the server when the upstream went silent for too long mid-body.
#[derive(Debug, thiserror::Error)]
#[error("upstream sent nothing for {0:?}; stream cut")]
pub struct IdleTimeout(pub Duration);

pin_project! {
    /// Wraps the upstream response body; see the module documentation. The fields each frame
    /// reads and writes come first, next to the inner body (`repr(C)`); the timer after them.
    #[repr(C)]
    pub struct TimedBody<B> {
        recorder: Option<Box<Recorder>>,
        last_frame: Instant,
        // The waker `idle` was last polled with: until it fires or is reset it holds that
        // waker, and polling it again for the same task would only register it again.
        idle_waker: Option<Waker>,
        strips: bool,
        upstream_done: bool,
        #[pin]
        inner: B,
        idle_timeout: Duration,
        // Armed for `last_frame + idle_timeout`, but moved only when it fires early: resetting
        // a timer on every frame would cost a timer-wheel update per chunk.
        #[pin]
        idle: Sleep,
    }

    impl<B> PinnedDrop for TimedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(recorder) = this.project().recorder.take() {
                recorder.finish(Ending::Dropped, Instant::now());
            }
        }
    }
}

impl<B> TimedBody<B> {
    /// Wraps `inner`, whose response head was handed to `recorder` at `now`.
    pub fn new(inner: B, recorder: Recorder, idle_timeout: Duration, now: Instant) -> Self {
        TimedBody {
            inner,
            idle: tokio::time::sleep_until(now + idle_timeout),
            idle_waker: None,
            idle_timeout,
            last_frame: now,
            strips: recorder.strips(),
            recorder: Some(Box::new(recorder)),
            upstream_done: false,
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            if *this.upstream_done {
                if let Some(recorder) = this.recorder.take() {
                    recorder.finish(Ending::Complete, Instant::now());
                }
                return Poll::Ready(None);
            }
            let polled = this.inner.as_mut().poll_frame(cx);
            let frame = match polled {
                Poll::Pending => {
                    if !this.idle.is_elapsed()
                        && this
                            .idle_waker
                            .as_ref()
                            .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        return Poll::Pending;
                    }
                    loop {
                        if this.idle.as_mut().poll(cx).is_pending() {
                            *this.idle_waker = Some(cx.waker().clone());
                            return Poll::Pending;
                        }
                        let deadline = *this.last_frame + *this.idle_timeout;
                        if deadline <= Instant::now() {
                            break;
                        }
                        // A frame came since the timer was armed: wait from that frame on.
                        this.idle.as_mut().reset(deadline);
                    }
                    if let Some(recorder) = this.recorder.take() {
                        recorder.finish(Ending::IdleTimeout, Instant::now());
                    }
                    return Poll::Ready(Some(Err(IdleTimeout(*this.idle_timeout).into())));
                }
                Poll::Ready(None) => {
                    *this.upstream_done = true;
                    let rest = this
                        .recorder
                        .as_mut()
                        .map(|r| r.take_pending())
                        .unwrap_or_default();
                    if rest.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                Poll::Ready(Some(Err(error))) => {
                    if let Some(recorder) = this.recorder.take() {
                        recorder.finish(Ending::UpstreamError, Instant::now());
                    }
                    return Poll::Ready(Some(Err(error.into())));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let now = Instant::now();
            *this.last_frame = now;
            let frame = match (frame.into_data(), this.recorder.as_mut()) {
                (Ok(data), Some(recorder)) => {
                    let out = recorder.on_data(data, now);
                    if out.is_empty() && *this.strips {
                        // Everything was held back or cut: nothing to hand on yet.
                        continue;
                    }
                    Frame::data(out)
                }
                (Ok(data), None) => Frame::data(data),
                (Err(trailers), _) => trailers,
            };
            if this.inner.is_end_stream() && !*this.strips {
                // The consumer may not poll again after the last frame: report now.
                *this.upstream_done = true;
                if let Some(recorder) = this.recorder.take() {
                    recorder.finish(Ending::Complete, now);
                }
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.upstream_done && self.recorder.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.strips {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
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
    }

    fn cut(frames: &[&str]) -> String {
        let mut parser = SseParser::new();
        let mut pending = BytesMut::new();
        let mut out = Vec::new();
        for f in frames {
            let mut ends = Vec::new();
            parser.feed(f.as_bytes(), |e| {
                ends.push((e.end, e.kind == EventKind::Usage))
            });
            out.extend_from_slice(&cut_usage(
                Bytes::copy_from_slice(f.as_bytes()),
                &ends,
                &mut pending,
            ));
        }
        out.extend_from_slice(&pending);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn usage_event_is_cut_at_every_split() {
        let tok = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n";
        let usage =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n";
        let done = "data: [DONE]\n\n";
        let stream = format!("{tok}{tok}{usage}{done}");
        let want = format!("{tok}{tok}{done}");
        assert_eq!(cut(&[&stream]), want);
        for a in 0..=stream.len() {
            for b in a..=stream.len() {
                let got = cut(&[&stream[..a], &stream[a..b], &stream[b..]]);
                assert_eq!(got, want, "splits at {a} and {b}");
            }
        }
    }

    #[test]
    fn a_json_body_gives_its_usage_id_and_model_in_one_frame_or_several() {
        let body = r#"{"id":"chatcmpl-7","object":"chat.completion","created":1,"model":"m/x","choices":[{"index":0,"message":{"role":"assistant","content":"a \"b\" c","tool_calls":[]},"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":2,"total_tokens":18,"completion_tokens":16},"prompt_logprobs":null}"#;
        for cuts in [vec![], vec![40], vec![1, 150, 151]] {
            let mut frames = Vec::new();
            let mut at = 0;
            for cut in cuts.iter().copied().chain([body.len()]) {
                frames.push(Bytes::copy_from_slice(&body.as_bytes()[at..cut]));
                at = cut;
            }
            let mut joined = Vec::new();
            let got = json_body(&frames, &mut joined);
            let usage = got.usage.expect("usage is read");
            assert_eq!(
                (usage.prompt_tokens, usage.completion_tokens),
                (Some(2), Some(16))
            );
            assert_eq!((got.id, got.model), (Some("chatcmpl-7"), Some("m/x")));
        }
        let mut joined = Vec::new();
        let error = [Bytes::from_static(
            br#"{"error":{"message":"no","code":400}}"#,
        )];
        assert_eq!(json_body(&error, &mut joined).usage, None);
    }

    #[test]
    fn trailing_bytes_without_blank_line_are_kept() {
        let s = "data: [DONE]\n\ndata: partial";
        assert_eq!(cut(&[s]), s);
    }
}
