//! The engine model: queue for a sequence slot, prefill, then one token per decode step, each
//! step ending at a deadline computed from the previous deadline (never from "now"), so a
//! stream does not drift however late it is polled. One `Sleep` per request, reset in place;
//! no task, no channel.

use std::future::Future;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use rand::Rng;
use rand::rngs::SmallRng;
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};

use super::fault::Faults;
use super::metrics::{Shared, WaitingGuard};
use super::request::{GenPlan, SALT_TEXT, SALT_TIME, TokenKind, request_rng};
use super::words::{WORDS, is_punctuation};

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// What the engine produced at a deadline.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The request got its sequence slot and prefill started (only with `announce_start`).
    Started,
    /// Tokens of these steps (per choice; a choice shorter than the range has fewer).
    Tokens(RangeInclusive<u32>),
    /// An injected in-band error, where this step's tokens would have been.
    Error,
    /// An injected connection abort, where this step's tokens would have been.
    Disconnect,
    /// All tokens were produced.
    End,
}

enum Phase {
    Queued,
    Prefill,
    Decode,
    Ended,
}

/// One request's generation schedule and token text.
pub(crate) struct Generation {
    shared: Arc<Shared>,
    pub plan: GenPlan,
    faults: Faults,
    text_rng: SmallRng,
    time_rng: SmallRng,
    phase: Phase,
    acquire: Option<Acquire>,
    waiting: Option<WaitingGuard>,
    permit: Option<OwnedSemaphorePermit>,
    sleep: Pin<Box<Sleep>>,
    /// When the schedule starts (arrival + header delay); the queue wait is measured from here.
    origin: Instant,
    /// Deadline of step `next - 1` (or of the start of prefill).
    deadline: Instant,
    /// First step not yet sent.
    next: u32,
    /// Emission step whose deadline `sleep` is set to, if armed.
    armed: Option<u32>,
    max_len: u32,
    /// Whether step 0 has been sent (for TTFT).
    pub first_sent_at: Option<Instant>,
    /// Return [`Event::Started`] when the slot is acquired.
    announce_start: bool,
    /// Engine-side instants (the schedule's deadlines, not the poll times): slot acquired,
    /// first token produced, latest token produced.
    scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

/// Where one request's time went inside the simulated engine, from its own schedule: what
/// vLLM's per-request `metrics` and llama.cpp's `timings` report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EngineTimes {
    /// Arrival (after any header delay) to getting a sequence slot.
    pub queue: Duration,
    /// Slot to first token: the prefill.
    pub prefill: Duration,
    /// First token to the latest token.
    pub decode: Duration,
}

fn duration_ms(ms: f64) -> Duration {
    Duration::from_nanos((ms * 1e6).round().max(0.0) as u64)
}

impl Generation {
    pub fn new(shared: Arc<Shared>, plan: GenPlan, faults: Faults, origin: Instant) -> Generation {
        let seed = shared.config.seed;
        let max_len = plan.max_len();
        Generation {
            text_rng: request_rng(seed, plan.content_hash, SALT_TEXT),
            time_rng: request_rng(seed, plan.content_hash, SALT_TIME),
            shared,
            plan,
            faults,
            phase: Phase::Queued,
            acquire: None,
            waiting: None,
            permit: None,
            sleep: Box::pin(tokio::time::sleep_until(origin)),
            origin,
            deadline: origin,
            next: 0,
            armed: None,
            max_len,
            first_sent_at: None,
            announce_start: false,
            scheduled_at: None,
            first_token_at: None,
            last_token_at: None,
        }
    }

    /// Makes `poll_event` return [`Event::Started`] once, when the request gets its slot
    /// (llama.cpp sends its role chunk then).
    pub fn announce_start(mut self) -> Generation {
        self.announce_start = true;
        self
    }

    /// The engine's view of this request so far, once its first token is out.
    pub fn engine_times(&self) -> Option<EngineTimes> {
        let scheduled = self.scheduled_at?;
        let first = self.first_token_at?;
        let last = self.last_token_at.unwrap_or(first);
        Some(EngineTimes {
            queue: scheduled.saturating_duration_since(self.origin),
            prefill: first.saturating_duration_since(scheduled),
            decode: last.saturating_duration_since(first),
        })
    }

    fn jitter(&mut self) -> f64 {
        let j = self.shared.config.timing.jitter;
        if j > 0.0 {
            1.0 + j * (2.0 * self.time_rng.random::<f64>() - 1.0)
        } else {
            1.0
        }
    }

    fn stall_before(&self, step: u32) -> Duration {
        if self.faults.stall_after == Some(step) {
            self.faults.stall
        } else {
            Duration::ZERO
        }
    }

    /// The step at which the next emission happens, given `self.next`.
    fn next_emission(&self) -> u32 {
        let from = self.next;
        let t = self.shared.config.timing.tokens_per_chunk.max(1);
        // Chunks: {0}, {1..=t}, {t+1..=2t}, ...
        let mut e = if from == 0 { 0 } else { from.div_ceil(t) * t };
        // A choice that ends inside the chunk is flushed at its last step.
        for &len in &self.plan.lengths {
            if len > from && len - 1 < e {
                e = len - 1;
            }
        }
        e = e.min(self.max_len - 1);
        // Tokens before an injected abort or error go out on time; the fault fires at its step.
        for f in [self.faults.error_after, self.faults.disconnect_after]
            .into_iter()
            .flatten()
        {
            if f > from && f <= e {
                e = f - 1;
            } else if f == from {
                e = from;
            }
        }
        e
    }

    /// Deadline of step `to`, accumulating decode steps after the current deadline.
    fn deadline_of(&mut self, to: u32) -> Instant {
        let timing = &self.shared.config.timing;
        let (itl_ms, slowdown) = (timing.itl_ms, timing.slowdown_per_seq);
        let mut d = self.deadline;
        for step in self.next.max(1)..=to {
            let running = self.shared.running().max(1);
            let factor = 1.0 + slowdown * (running - 1) as f64;
            let ms = itl_ms * factor * self.jitter();
            d += duration_ms(ms) + self.stall_before(step);
        }
        d
    }

    /// Polls for the next event. After `End`, `Error` or `Disconnect` it keeps returning `End`.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        loop {
            match self.phase {
                Phase::Queued => {
                    let permit = match self.acquire.as_mut() {
                        None => match self.shared.seqs.clone().try_acquire_owned() {
                            Ok(p) => Some(p),
                            Err(_) => {
                                self.waiting = Some(WaitingGuard::new(self.shared.clone()));
                                self.acquire =
                                    Some(Box::pin(self.shared.seqs.clone().acquire_owned()));
                                None
                            }
                        },
                        Some(fut) => match ready!(fut.as_mut().poll(cx)) {
                            Ok(p) => Some(p),
                            // The semaphore is never closed.
                            Err(_) => return Poll::Ready(Event::End),
                        },
                    };
                    let Some(permit) = permit else { continue };
                    let start = if self.acquire.take().is_some() {
                        Instant::now().max(self.origin)
                    } else {
                        self.origin
                    };
                    self.waiting = None;
                    self.permit = Some(permit);
                    let timing = &self.shared.config.timing;
                    let prefill_ms = timing.ttft_base_ms
                        + timing.prefill_ms_per_1k_tokens * f64::from(self.plan.prompt_tokens)
                            / 1000.0;
                    let ms = prefill_ms * self.jitter();
                    self.deadline = start + duration_ms(ms) + self.stall_before(0);
                    self.scheduled_at = Some(start);
                    self.phase = Phase::Prefill;
                    self.sleep.as_mut().reset(self.deadline);
                    if self.announce_start {
                        return Poll::Ready(Event::Started);
                    }
                }
                Phase::Prefill => {
                    ready!(self.sleep.as_mut().poll(cx));
                    self.phase = Phase::Decode;
                    // Step 0 (the first token) is due at the end of prefill.
                    return Poll::Ready(self.fire(0));
                }
                Phase::Decode => {
                    if self.next >= self.max_len {
                        self.finish();
                        return Poll::Ready(Event::End);
                    }
                    let e = match self.armed {
                        Some(e) => e,
                        None => {
                            let e = self.next_emission();
                            let d = self.deadline_of(e);
                            self.deadline = d;
                            self.sleep.as_mut().reset(d);
                            self.armed = Some(e);
                            e
                        }
                    };
                    ready!(self.sleep.as_mut().poll(cx));
                    return Poll::Ready(self.fire(e));
                }
                Phase::Ended => return Poll::Ready(Event::End),
            }
        }
    }

    /// The deadline of emission step `e` has passed: produce its event.
    fn fire(&mut self, e: u32) -> Event {
        self.armed = None;
        let from = self.next;
        for (f, event) in [
            (self.faults.error_after, Event::Error),
            (self.faults.disconnect_after, Event::Disconnect),
        ] {
            if f == Some(from) {
                self.finish();
                return event;
            }
        }
        if from == 0 && self.first_sent_at.is_none() {
            self.first_sent_at = Some(Instant::now());
            self.first_token_at = Some(self.deadline);
        }
        self.last_token_at = Some(self.deadline);
        self.next = e + 1;
        let tokens: u64 = self
            .plan
            .lengths
            .iter()
            .map(|&len| u64::from(len.min(e + 1).saturating_sub(from)))
            .sum();
        self.shared
            .counters
            .generation_tokens
            .fetch_add(tokens, std::sync::atomic::Ordering::Relaxed);
        if self.next >= self.max_len {
            // Free the sequence slot as soon as the last token is out.
            self.permit = None;
        }
        Event::Tokens(from..=e)
    }

    fn finish(&mut self) {
        self.phase = Phase::Ended;
        self.permit = None;
        self.acquire = None;
        self.waiting = None;
    }

    /// Appends the text of `choice`'s token at `step`: a word for content and reasoning, a
    /// piece of `{"query": "..."}` for tool-call arguments (unescaped), nothing for the
    /// end-of-sequence token and the tool call's opening token.
    pub fn push_token_text(&mut self, choice: usize, step: u32, out: &mut Vec<u8>) {
        let kind = self.plan.kind(choice, step);
        if matches!(kind, TokenKind::Eos | TokenKind::ToolStart) {
            return;
        }
        let word = WORDS[self.text_rng.random_range(0..WORDS.len())];
        if kind == TokenKind::ToolArgs {
            if step == 1 {
                out.extend_from_slice(b"{\"query\": \"");
            } else {
                out.push(b' ');
            }
            out.extend_from_slice(word.as_bytes());
            if step + 1 == self.plan.lengths[choice]
                || self.plan.kind(choice, step + 1) != TokenKind::ToolArgs
            {
                out.extend_from_slice(b"\"}");
            }
            return;
        }
        // The first word of the answer after reasoning starts without a space, like the first
        // word of the reasoning.
        let starts =
            step == 0 || (kind == TokenKind::Content && step == self.plan.reasoning_tokens);
        if !starts && !is_punctuation(word) {
            out.push(b' ');
        }
        out.extend_from_slice(word.as_bytes());
    }

    /// Tokens `choice` has produced after step `e` (its cumulative completion tokens).
    pub fn produced(&self, choice: usize, e: u32) -> u32 {
        self.plan.lengths[choice].min(e + 1)
    }

    /// When generation started, for the server-side TTFT.
    pub fn origin(&self) -> Instant {
        self.origin
    }
}
