//! The response body wrapper: it times each frame as it is handed to the client, feeds it to
//! the request's [`Recorder`], and has the request reported exactly once when it ends — at the
//! end of the body, on an upstream error or idle timeout, or when the client goes away and the
//! body is dropped. It observes and never transforms: every frame is handed on as it came.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::recorder::{Ending, Recorder};
use crate::net::BoxError;

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
        // Where the events of the frame just handed on end (and which were usage-only), kept
        // for the proxy's usage cutter; `None` unless asked for.
        boundaries: Option<Box<Vec<(usize, bool)>>>,
        last_frame: Instant,
        // The waker `idle` was last polled with: until it fires or is reset it holds that
        // waker, and polling it again for the same task would only register it again.
        idle_waker: Option<Waker>,
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
    /// Wraps `inner`, whose response head was handed to `recorder` at `now`. With
    /// `boundaries`, each frame's event ends are kept for [`TimedBody::boundaries`].
    pub fn new(
        inner: B,
        recorder: Recorder,
        idle_timeout: Duration,
        now: Instant,
        boundaries: bool,
    ) -> Self {
        TimedBody {
            inner,
            idle: tokio::time::sleep_until(now + idle_timeout),
            idle_waker: None,
            idle_timeout,
            last_frame: now,
            boundaries: boundaries.then(Box::default),
            recorder: Some(Box::new(recorder)),
            upstream_done: false,
        }
    }

    /// Where the events that the frame last handed on completes end in it (offsets just past
    /// their blank lines), each with whether it was a usage-only event. Empty unless the body
    /// was built to keep them.
    pub fn boundaries(&self) -> &[(usize, bool)] {
        self.boundaries.as_deref().map_or(&[], Vec::as_slice)
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
                    continue;
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
            let mut boundaries = this.boundaries.as_deref_mut();
            if let Some(ends) = boundaries.as_deref_mut() {
                ends.clear();
            }
            if let (Some(data), Some(recorder)) = (frame.data_ref(), this.recorder.as_mut()) {
                recorder.on_data(data, now, boundaries);
            }
            if this.inner.is_end_stream() {
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
        self.inner.size_hint()
    }
}
