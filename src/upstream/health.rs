//! Passive health of an upstream endpoint: what its answers say about it, and when it is taken
//! out of balancing (ejected) and let back in.
//!
//! An endpoint is ejected when a connection to it cannot be opened, or after a burst of
//! [`BURST_5XX`] 5xx answers in a row. The ejection lasts [`FIRST_BACKOFF`], doubling with each
//! ejection that follows without a good answer between, up to [`MAX_BACKOFF`]; when it ends,
//! the endpoint is balanced onto again, and its next answer decides: a good one (any status
//! below 500) resets the backoff, a failure ejects it for the next, longer one. (Envoy's outlier
//! detection works alike, with a 30 s base; a replica that restarts is back within a second or
//! two here, which a fleet of a few vLLM replicas needs more than fewer probes.)

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The first ejection's length.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest ejection.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// 5xx answers in a row that eject an endpoint.
pub const BURST_5XX: u32 = 5;

/// The health of one endpoint; shared by every request, updated without locks.
#[derive(Debug)]
pub struct Health {
    base: Instant,
    /// Milliseconds since `base` until which the endpoint is ejected; 0: never ejected.
    until: AtomicU64,
    /// 5xx answers in a row.
    errors: AtomicU32,
    /// Ejections since the last good answer: the backoff's exponent.
    strikes: AtomicU32,
}

/// What an answer (or failure) did to an endpoint's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing that needs telling.
    None,
    /// The endpoint was ejected now, for this long.
    Ejected(Duration),
    /// A good answer after an ejection: the endpoint is healthy again.
    Recovered,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    /// A live endpoint with a clean record.
    pub fn new() -> Health {
        Health {
            base: Instant::now(),
            until: AtomicU64::new(0),
            errors: AtomicU32::new(0),
            strikes: AtomicU32::new(0),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_millis() as u64 + 1
    }

    /// Whether the endpoint is balanced onto at `now` (not within an ejection).
    pub fn is_live(&self, now: Instant) -> bool {
        self.ms(now) >= self.until.load(Ordering::Relaxed)
    }

    /// When the current ejection ends (`None` when live at `now`).
    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        let until = self.until.load(Ordering::Relaxed);
        (self.ms(now) < until).then(|| self.base + Duration::from_millis(until - 1))
    }

    /// A connection to the endpoint could not be opened at `now`.
    pub fn on_connect_error(&self, now: Instant) -> Change {
        self.eject(now)
    }

    /// The endpoint answered with `status` at `now`.
    pub fn on_status(&self, status: u16, now: Instant) -> Change {
        if status >= 500 {
            let errors = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
            if errors >= BURST_5XX {
                self.errors.store(0, Ordering::Relaxed);
                return self.eject(now);
            }
            return Change::None;
        }
        self.errors.store(0, Ordering::Relaxed);
        if self.strikes.swap(0, Ordering::Relaxed) > 0 {
            // Live again at once (an answer from an active probe may come within the ejection).
            self.until.store(0, Ordering::Relaxed);
            return Change::Recovered;
        }
        Change::None
    }

    /// Ejects the endpoint unless it is ejected already (requests that failed together are one
    /// ejection, not several).
    fn eject(&self, now: Instant) -> Change {
        let at = self.ms(now);
        let until = self.until.load(Ordering::Relaxed);
        if at < until {
            return Change::None;
        }
        let strikes = self.strikes.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = FIRST_BACKOFF.saturating_mul(1 << strikes).min(MAX_BACKOFF);
        let next = at + backoff.as_millis() as u64;
        match self
            .until
            .compare_exchange(until, next, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => Change::Ejected(backoff),
            Err(_) => {
                // Another request ejected it at the same moment: that one counts.
                self.strikes.fetch_sub(1, Ordering::Relaxed);
                Change::None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn advance(ms: u64) {
        tokio::time::advance(Duration::from_millis(ms)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connection_ejects_with_a_backoff_that_doubles_up_to_its_cap() {
        let h = Health::new();
        assert!(h.is_live(Instant::now()));
        let mut expected = vec![1, 2, 4, 8, 16, 30, 30];
        for want in expected.drain(..) {
            let now = Instant::now();
            assert_eq!(
                h.on_connect_error(now),
                Change::Ejected(Duration::from_secs(want))
            );
            assert!(!h.is_live(now));
            assert_eq!(h.ejected_until(now), Some(now + Duration::from_secs(want)));
            // Failures during the ejection do not lengthen it.
            assert_eq!(h.on_connect_error(now), Change::None);
            advance(want * 1000 - 1).await;
            assert!(
                !h.is_live(Instant::now()),
                "still ejected 1 ms before its end"
            );
            advance(1).await;
            assert!(h.is_live(Instant::now()), "tried again after {want} s");
        }
        // A good answer resets the backoff.
        assert_eq!(h.on_status(200, Instant::now()), Change::Recovered);
        assert_eq!(
            h.on_connect_error(Instant::now()),
            Change::Ejected(FIRST_BACKOFF)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_5xx_ejects_and_a_good_answer_between_breaks_the_burst() {
        let h = Health::new();
        let now = Instant::now();
        for _ in 0..BURST_5XX - 1 {
            assert_eq!(h.on_status(503, now), Change::None);
        }
        assert_eq!(h.on_status(404, now), Change::None, "4xx is the client's");
        for _ in 0..BURST_5XX - 1 {
            assert_eq!(h.on_status(500, now), Change::None);
        }
        assert!(h.is_live(now));
        assert_eq!(h.on_status(502, now), Change::Ejected(FIRST_BACKOFF));
        assert!(!h.is_live(now));
        // An answer within the ejection (an active probe) lets it back at once.
        advance(10).await;
        assert_eq!(h.on_status(200, Instant::now()), Change::Recovered);
        assert!(h.is_live(Instant::now()));
    }
}
