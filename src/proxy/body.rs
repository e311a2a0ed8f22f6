//! Request bodies from clients: read with a limit on the silence between reads, and, when the
//! proxy holds one whole to inspect it, within a budget shared by every request.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use metrics::Gauge;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::net::BoxError;

/// No byte of the body came for `proxy.body_read_timeout_secs` while the proxy waited for one.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for longer than proxy.body_read_timeout_secs")]
pub struct BodyTimeout;

pin_project! {
    /// A client's request body whose reads time out: the limit runs only while the proxy
    /// waits for the client's next bytes (a poll that found none), never while it is busy
    /// elsewhere (writing to a slow upstream).
    pub struct ReadTimeout<B> {
        #[pin]
        inner: B,
        limit: Duration,
        waiting: bool,
        #[pin]
        timer: Sleep,
    }
}

impl<B> ReadTimeout<B> {
    /// `inner`, whose reads may wait at most `limit` each.
    pub fn new(inner: B, limit: Duration) -> Self {
        ReadTimeout {
            inner,
            limit,
            waiting: false,
            timer: tokio::time::sleep(limit),
        }
    }
}

impl<B> Body for ReadTimeout<B>
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
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if !*this.waiting {
                    *this.waiting = true;
                    this.timer.as_mut().reset(Instant::now() + *this.limit);
                }
                if this.timer.poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(BodyTimeout.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request-body bytes all requests may hold in memory at once (`proxy.body_budget_bytes`).
#[derive(Debug)]
pub struct Budget {
    held: AtomicUsize,
    limit: usize,
    gauge: Gauge,
}

impl Budget {
    /// A budget of `limit` bytes, whose use `gauge` shows.
    pub fn new(limit: usize, gauge: Gauge) -> Arc<Budget> {
        Arc::new(Budget {
            held: AtomicUsize::new(0),
            limit,
            gauge,
        })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes of the budget, or none when that would go over it.
    fn take(self: &Arc<Self>, n: usize) -> Option<Held> {
        let mut held = Held {
            budget: self.clone(),
            bytes: 0,
        };
        held.grow(n).then_some(held)
    }
}

/// A share of the [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Held {
    /// Takes `n` more bytes; false (and nothing taken) when that would go over the budget.
    fn grow(&mut self, n: usize) -> bool {
        let budget = &self.budget;
        let taken = budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|&total| total <= budget.limit)
            })
            .is_ok();
        if taken {
            self.bytes += n;
            budget.gauge.increment(n as f64);
        }
        taken
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.gauge.decrement(self.bytes as f64);
    }
}

/// Why a body could not be read whole.
#[derive(Debug)]
pub enum ReadError {
    /// Longer than the limit (declared so, or found so).
    TooLarge,
    /// Holding it would go over the budget.
    OverBudget,
    /// The client stalled mid-body.
    Timeout,
    /// The client's body broke off or was malformed.
    Client(BoxError),
}

/// Reads `body` whole, at most `max` bytes, holding them within `budget`: the declared length
/// is taken from the budget (and checked against `max`) before any byte is read, the rest as
/// the bytes come. The bytes come back with their share of the budget.
pub async fn read_whole<B>(
    body: B,
    max: usize,
    budget: &Arc<Budget>,
) -> Result<(Bytes, Held), ReadError>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    let declared = usize::try_from(body.size_hint().lower()).unwrap_or(usize::MAX);
    if declared > max {
        return Err(ReadError::TooLarge);
    }
    let mut held = budget.take(declared).ok_or(ReadError::OverBudget)?;
    let mut body = std::pin::pin!(body);
    let mut bytes = BytesMut::with_capacity(declared);
    let mut first: Option<Bytes> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadError::from)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let len = bytes.len() + first.as_ref().map_or(0, Bytes::len) + data.len();
        if len > max {
            return Err(ReadError::TooLarge);
        }
        if len > held.bytes && !held.grow(len - held.bytes) {
            return Err(ReadError::OverBudget);
        }
        // A body that came in one frame is kept as it came, without a copy.
        match first.take() {
            None if bytes.is_empty() => first = Some(data),
            Some(earlier) => {
                bytes.extend_from_slice(&earlier);
                bytes.extend_from_slice(&data);
            }
            None => bytes.extend_from_slice(&data),
        }
    }
    Ok((first.unwrap_or_else(|| bytes.freeze()), held))
}

impl From<BoxError> for ReadError {
    /// A streamed body's error, as it reached the upstream writer.
    fn from(error: BoxError) -> ReadError {
        match error.downcast::<BodyTimeout>() {
            Ok(_) => ReadError::Timeout,
            Err(error) => ReadError::Client(error),
        }
    }
}
