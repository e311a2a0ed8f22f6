//! Picking an endpoint of a route for a request: round robin, least request (power of two
//! choices on outstanding requests) and peak EWMA (power of two choices on outstanding requests
//! weighted by a decaying, peak-sensitive latency estimate).
//!
//! Peak EWMA follows Finagle's `PeakEwma` and linkerd2-proxy's (tower's `PeakEwma`): an estimate
//! that jumps to any sample above it at once, falls toward samples below it as an exponentially
//! weighted average whose weight grows with the time since the last update, and decays toward
//! zero while nothing is heard, so an endpoint that was slow is tried again. Its cost is the
//! estimate times (outstanding requests + 1). What is estimated is not the response time, which
//! for a stream is its length, but what tokentap measures of each request as it goes: its TTFT
//! (fed at the first token) and its mean ITL (fed at the end); the cost counts the TTFT plus
//! [`NOMINAL_TOKENS`] ITLs, the time a typical answer takes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How fast the estimate forgets: the weight of the past after `DECAY` is 1/e (linkerd2-proxy's
/// default is 10 s).
pub const DECAY: Duration = Duration::from_secs(10);
/// Output tokens of the answer whose length the cost estimates.
pub const NOMINAL_TOKENS: f64 = 64.0;

/// A cheap shared random number generator (SplitMix64 over an atomic counter): good enough to
/// pick two endpoints, and lock-free.
#[derive(Debug)]
pub struct Rng(AtomicU64);

impl Rng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(AtomicU64::new(seed))
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&self, n: usize) -> usize {
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (((z >> 32) * n as u64) >> 32) as usize
    }
}

/// One peak-sensitive, decaying average, in seconds.
#[derive(Clone, Copy, Debug)]
struct Ewma {
    value: f64,
    at: Instant,
}

impl Ewma {
    fn new(now: Instant) -> Ewma {
        Ewma {
            value: 0.0,
            at: now,
        }
    }

    /// Takes a sample at `now` (tower's `RttEstimate::update`).
    fn update(&mut self, sample: f64, now: Instant) {
        if sample > self.value {
            self.value = sample;
        } else {
            let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
            let keep = (-elapsed / DECAY.as_secs_f64()).exp();
            self.value = self.value * keep + sample * (1.0 - keep);
        }
        self.at = now;
    }

    /// The estimate at `now`, decayed toward zero for the time nothing was heard.
    fn decayed(&mut self, now: Instant) -> f64 {
        self.update(0.0, now);
        self.value
    }
}

/// What the balancer knows of one endpoint: its outstanding requests and its latency estimate.
#[derive(Debug)]
pub struct Load {
    outstanding: AtomicUsize,
    /// TTFT and mean ITL.
    estimate: Mutex<(Ewma, Ewma)>,
}

impl Default for Load {
    fn default() -> Self {
        Load::new()
    }
}

impl Load {
    /// No requests, no estimate.
    pub fn new() -> Load {
        let now = Instant::now();
        Load {
            outstanding: AtomicUsize::new(0),
            estimate: Mutex::new((Ewma::new(now), Ewma::new(now))),
        }
    }

    /// Requests sent whose response has not ended.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// A request starts.
    pub fn start(&self) {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
    }

    /// A request ends (its response body ended or was dropped, or it failed).
    pub fn end(&self) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    fn estimate(&self) -> std::sync::MutexGuard<'_, (Ewma, Ewma)> {
        self.estimate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request's first token came `ttft` after it arrived.
    pub fn on_ttft(&self, ttft: Duration, now: Instant) {
        self.estimate().0.update(ttft.as_secs_f64(), now);
    }

    /// A request streamed with this mean ITL.
    pub fn on_itl(&self, itl: Duration, now: Instant) {
        self.estimate().1.update(itl.as_secs_f64(), now);
    }

    /// Peak EWMA's cost at `now`: (TTFT + [`NOMINAL_TOKENS`] × ITL) × (outstanding + 1).
    pub fn cost(&self, now: Instant) -> f64 {
        let latency = {
            let mut e = self.estimate();
            e.0.decayed(now) + NOMINAL_TOKENS * e.1.decayed(now)
        };
        latency * (self.outstanding() + 1) as f64
    }
}

/// How a route picks among its live endpoints.
#[derive(Debug)]
pub enum Policy {
    /// Each in turn.
    RoundRobin(AtomicUsize),
    /// The one with fewer outstanding requests of two picked at random.
    LeastRequest,
    /// The one with the lower peak-EWMA cost of two picked at random.
    PeakEwma,
}

impl Policy {
    /// The policy `balance` names.
    pub fn new(balance: crate::config::Balance) -> Policy {
        match balance {
            crate::config::Balance::RoundRobin => Policy::RoundRobin(AtomicUsize::new(0)),
            crate::config::Balance::LeastRequest => Policy::LeastRequest,
            crate::config::Balance::PeakEwma => Policy::PeakEwma,
        }
    }

    /// Picks one of `n` candidates (`n` > 0), `load(i)` telling candidate `i`'s load.
    pub fn pick<'a>(
        &self,
        n: usize,
        rng: &Rng,
        now: Instant,
        load: impl Fn(usize) -> &'a Load,
    ) -> usize {
        if n == 1 {
            return 0;
        }
        let (a, b) = match self {
            Policy::RoundRobin(next) => return next.fetch_add(1, Ordering::Relaxed) % n,
            Policy::LeastRequest | Policy::PeakEwma => {
                let a = rng.below(n);
                let b = (a + 1 + rng.below(n - 1)) % n;
                (a, b)
            }
        };
        let (la, lb) = (load(a), load(b));
        let a_wins = match self {
            Policy::PeakEwma => {
                let (ca, cb) = (la.cost(now), lb.cost(now));
                // Equal costs (no estimate yet): fewer outstanding requests wins.
                ca < cb || (ca == cb && la.outstanding() <= lb.outstanding())
            }
            _ => la.outstanding() <= lb.outstanding(),
        };
        if a_wins { a } else { b }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_choices_are_distinct_and_cover_every_pair() {
        let rng = Rng::new(1);
        let mut seen = [[0u32; 4]; 4];
        for _ in 0..4000 {
            let a = rng.below(4);
            let b = (a + 1 + rng.below(3)) % 4;
            assert_ne!(a, b);
            seen[a][b] += 1;
        }
        for (a, row) in seen.iter().enumerate() {
            for (b, &count) in row.iter().enumerate() {
                assert!(
                    a == b || count > 200,
                    "pair ({a}, {b}) picked {count} times"
                );
            }
        }
    }

    #[test]
    fn round_robin_takes_each_in_turn() {
        let policy = Policy::new(crate::config::Balance::RoundRobin);
        let loads = [Load::new(), Load::new(), Load::new()];
        let (rng, now) = (Rng::new(1), Instant::now());
        let picks: Vec<usize> = (0..6)
            .map(|_| policy.pick(3, &rng, now, |i| &loads[i]))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_request_never_picks_the_busiest_of_three() {
        let policy = Policy::new(crate::config::Balance::LeastRequest);
        let loads = [Load::new(), Load::new(), Load::new()];
        for _ in 0..5 {
            loads[1].start();
        }
        loads[2].start();
        let (rng, now) = (Rng::new(3), Instant::now());
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[policy.pick(3, &rng, now, |i| &loads[i])] += 1;
        }
        assert_eq!(counts[1], 0, "{counts:?}");
        assert!(counts[0] > counts[2], "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_estimate_jumps_to_peaks_and_decays_toward_zero() {
        let load = Load::new();
        let now = Instant::now();
        load.on_ttft(Duration::from_millis(100), now);
        assert_eq!(load.cost(now), 0.1);
        load.on_ttft(Duration::from_millis(500), now);
        assert_eq!(load.cost(now), 0.5, "a peak is taken at once");
        // One decay period later, with nothing heard: down to 1/e.
        tokio::time::advance(DECAY).await;
        let later = Instant::now();
        let decayed = load.cost(later);
        assert!(
            (decayed - 0.5 / std::f64::consts::E).abs() < 1e-9,
            "{decayed}"
        );
        // A sample below the estimate moves it only part of the way.
        tokio::time::advance(DECAY).await;
        load.on_ttft(Duration::from_millis(10), Instant::now());
        let mixed = load.cost(Instant::now());
        let keep = (-1.0f64).exp();
        let want = decayed * keep + 0.010 * (1.0 - keep);
        assert!((mixed - want).abs() < 1e-9, "{mixed} != {want}");
        // ITL counts for a nominal answer's tokens; outstanding requests multiply.
        let other = Load::new();
        other.on_itl(Duration::from_millis(20), Instant::now());
        other.start();
        let cost = other.cost(Instant::now());
        assert!((cost - 2.0 * NOMINAL_TOKENS * 0.020).abs() < 1e-9, "{cost}");
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_prefers_the_faster_endpoint_at_equal_load() {
        let policy = Policy::new(crate::config::Balance::PeakEwma);
        let loads = [Load::new(), Load::new()];
        let now = Instant::now();
        loads[0].on_itl(Duration::from_millis(80), now);
        loads[1].on_itl(Duration::from_millis(20), now);
        let rng = Rng::new(5);
        for _ in 0..50 {
            assert_eq!(policy.pick(2, &rng, now, |i| &loads[i]), 1);
        }
        // Until the fast one has more than four times the slow one's requests in flight.
        for _ in 0..4 {
            loads[1].start();
        }
        assert_eq!(policy.pick(2, &rng, now, |i| &loads[i]), 0);
    }
}
