//! The proxy's usage cutter: when the proxy asked the upstream for usage on a client's behalf,
//! the usage-only event is cut out of the stream again, so that the client receives exactly
//! what it would have without the proxy. Bytes of an event that is not complete yet are held
//! until its blank line arrives (a client cannot act on half an event, so this delays nothing
//! it can see). Where the events end comes from the body wrapper, which parsed them already.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::net::BoxError;
use crate::observe::TimedBody;

pin_project! {
    /// A timed upstream body with the usage-only events cut out.
    pub struct StripUsage<B> {
        #[pin]
        inner: TimedBody<B>,
        cut: Cut,
        inner_done: bool,
    }
}

impl<B> StripUsage<B> {
    /// Cuts the usage events out of `inner`, which must keep its frames' event boundaries and
    /// parse events of up to `max_event` bytes: more than twice that is never held.
    pub fn new(inner: TimedBody<B>, max_event: usize) -> Self {
        StripUsage {
            inner,
            cut: Cut::new(max_event),
            inner_done: false,
        }
    }
}

/// The cutter's state between frames.
#[derive(Debug)]
pub(crate) struct Cut {
    /// Bytes of an incomplete event held back.
    pending: BytesMut,
    /// Most bytes held: past it the event cannot be one the parser read (it counts at least
    /// half of an event's bytes, and stops at its own limit), so it is not the usage event.
    max_held: usize,
    /// The last frame ended with an event whose blank line ended in `\r`: a `\n` that starts
    /// the next frame belongs to that event (cut with it, or sent with it), though the parser
    /// reported the event before the `\n` came. `Some(true)` when that event was cut.
    after_cr: Option<bool>,
    /// Inside an event too long to be the usage event, whose held bytes went out: the rest of
    /// it passes as it comes, until its end.
    passing: bool,
}

impl Cut {
    /// A cutter for events of up to `max_event` bytes.
    pub(crate) fn new(max_event: usize) -> Self {
        Cut {
            pending: BytesMut::new(),
            max_held: max_event.saturating_mul(2),
            after_cr: None,
            passing: false,
        }
    }

    /// Bytes held back, waiting for the end of their event.
    pub(crate) fn held(&self) -> usize {
        self.pending.len()
    }

    /// What goes out for one data `frame` whose events end at `ends` (offsets in the frame,
    /// and whether to cut each): the bytes that complete events, without the cut ones, and,
    /// once more than `max_held` bytes are held back, those too.
    pub(crate) fn frame(&mut self, frame: Bytes, ends: &[(usize, bool)]) -> Bytes {
        let ends_in_cr = |frame: &Bytes| {
            ends.last()
                .filter(|&&(end, _)| end == frame.len() && frame.ends_with(b"\r"))
                .map(|&(_, cut)| cut)
        };
        match self.after_cr.take() {
            Some(cut) if frame.starts_with(b"\n") => {
                // Offsets move with the byte taken off; the parser skipped it, so no event
                // ends at it.
                let next_cr = ends_in_cr(&frame);
                let shifted: Vec<(usize, bool)> = ends
                    .iter()
                    .map(|&(end, c)| (end.saturating_sub(1), c))
                    .collect();
                let out = self.strip(frame.slice(1..), &shifted);
                self.after_cr = next_cr;
                if cut {
                    out
                } else {
                    let mut joined = BytesMut::with_capacity(out.len() + 1);
                    joined.extend_from_slice(b"\n");
                    joined.extend_from_slice(&out);
                    joined.freeze()
                }
            }
            _ => {
                let next_cr = ends_in_cr(&frame);
                let out = self.strip(frame, ends);
                self.after_cr = next_cr;
                out
            }
        }
    }

    fn strip(&mut self, frame: Bytes, ends: &[(usize, bool)]) -> Bytes {
        if self.passing {
            if ends.is_empty() {
                return frame;
            }
            // The over-long event ends in this frame (it is no usage event, so it is kept).
            self.passing = false;
        }
        let pending = &mut self.pending;
        let out = cut_usage(frame, ends, pending);
        if pending.len() <= self.max_held {
            return out;
        }
        // An event too long to be parsed: what is held of it goes out now, and the rest of it
        // is passed on as it comes.
        self.passing = true;
        if out.is_empty() {
            return pending.split().freeze();
        }
        let mut joined = BytesMut::with_capacity(out.len() + pending.len());
        joined.extend_from_slice(&out);
        joined.extend_from_slice(pending);
        pending.clear();
        joined.freeze()
    }

    /// What goes out when the stream ends: the held bytes of an incomplete last event.
    pub(crate) fn finish(&mut self) -> Bytes {
        self.pending.split().freeze()
    }
}

impl<B> Body for StripUsage<B>
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
            if *this.inner_done {
                // An incomplete last event is forwarded as it came.
                let rest = this.cut.finish();
                if rest.is_empty() {
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Ok(Frame::data(rest))));
            }
            let frame = match std::task::ready!(this.inner.as_mut().poll_frame(cx)) {
                None => {
                    *this.inner_done = true;
                    continue;
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                Some(Ok(frame)) => frame,
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
            };
            let out = this.cut.frame(data, this.inner.boundaries());
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            // Everything was held back or cut: nothing to hand on yet.
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner_done && self.cut.held() == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Returns the bytes of `frame` that complete events, without the events marked in `ends`,
/// preceded by the held-back `pending` bytes; what is left of `frame` becomes `pending`.
pub(crate) fn cut_usage(frame: Bytes, ends: &[(usize, bool)], pending: &mut BytesMut) -> Bytes {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{EventKind, SseParser};

    fn cut(frames: &[&str]) -> String {
        let mut parser = SseParser::new();
        let mut cutter = Cut::new(SseParser::DEFAULT_MAX_EVENT);
        let mut out = Vec::new();
        for f in frames {
            let mut ends = Vec::new();
            parser.feed(f.as_bytes(), |e| {
                ends.push((e.end, e.kind == EventKind::Usage))
            });
            out.extend_from_slice(&cutter.frame(Bytes::copy_from_slice(f.as_bytes()), &ends));
        }
        out.extend_from_slice(&cutter.finish());
        String::from_utf8(out).unwrap()
    }

    /// Past the hold limit an over-long event goes out as its bytes come, not in bursts of the
    /// limit, and the events after it are cut as before.
    #[test]
    fn an_over_long_event_flows_once_past_the_limit() {
        let max = 64;
        let mut parser = SseParser::with_max_event(max);
        let mut cutter = Cut::new(max);
        let mut feed = |f: &[u8]| {
            let mut ends = Vec::new();
            parser.feed(f, |e| ends.push((e.end, e.kind == EventKind::Usage)));
            cutter.frame(Bytes::copy_from_slice(f), &ends)
        };
        let xs = [b'x'; 100];
        assert_eq!(&feed(b"data: ")[..], b"", "an incomplete event is held");
        assert_eq!(&feed(&xs)[..], b"", "held up to twice the cap");
        assert_eq!(feed(&xs).len(), 206, "past it, what was held goes out");
        for _ in 0..5 {
            assert_eq!(&feed(&xs)[..], &xs[..], "then each frame as it comes");
        }
        let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n";
        let tail = format!("\n\n{usage}data: [DONE]\n\n");
        assert_eq!(&feed(tail.as_bytes())[..], b"\n\ndata: [DONE]\n\n");
    }

    /// A frame that ends between the CR and LF of an event's blank line: the LF goes with the
    /// event, cut or kept, as when the stream comes in one frame.
    #[test]
    fn crlf_split_between_cr_and_lf() {
        let tok = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\r\n\r\n";
        let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\r\n\r\n";
        let done = "data: [DONE]\r\n\r\n";
        let stream = format!("{tok}{usage}{usage}{done}");
        let want = format!("{tok}{done}");
        assert_eq!(cut(&[&stream]), want);
        for a in 0..=stream.len() {
            let got = cut(&[&stream[..a], &stream[a..]]);
            assert_eq!(got, want, "split at {a}");
        }
        let bytes: Vec<String> = stream.chars().map(String::from).collect();
        let frames: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(cut(&frames), want);
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
    fn trailing_bytes_without_blank_line_are_kept() {
        let s = "data: [DONE]\n\ndata: partial";
        assert_eq!(cut(&[s]), s);
    }
}
