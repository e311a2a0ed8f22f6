//! `/stats`: a live summary of recent requests per model, in the layout `vllm bench serve`
//! prints, from HDR histograms over a sliding window.
//!
//! The window is cut into slices; a slice older than the window is cleared when its turn comes
//! again, so memory is fixed per model (a few hundred KiB) whatever the traffic. Values keep two
//! significant digits of HDR precision (under 1% relative error), independent of the
//! Prometheus buckets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use crate::latency::Figures;
use crate::report::{Distribution, ModelSummary};

/// Number of slices a window is cut into.
const SLICES: u32 = 10;
/// Largest value kept, microseconds (one hour); larger values are clamped to it.
const MAX_US: u64 = 3_600_000_000;

/// The latency figures that `/stats` summarizes: the index of each one's histogram in a slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Figure {
    Ttft = 0,
    Tpot = 1,
    Itl = 2,
    E2el = 3,
}

#[derive(Debug)]
struct Slice {
    epoch: u64,
    hist: [Histogram<u32>; 4],
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    first: Option<Instant>,
}

impl Slice {
    fn new() -> Slice {
        let h = || Histogram::new_with_bounds(1, MAX_US, 2).expect("static HDR bounds are valid");
        Slice {
            epoch: u64::MAX,
            hist: [h(), h(), h(), h()],
            requests: 0,
            input_tokens: 0,
            output_tokens: 0,
            first: None,
        }
    }

    fn reset(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.hist.iter_mut().for_each(Histogram::reset);
        self.requests = 0;
        self.input_tokens = 0;
        self.output_tokens = 0;
        self.first = None;
    }
}

/// ITL samples in a batch: a stream records its ITLs this many at a time, so that `/stats`
/// takes its lock once per batch instead of once per chunk. A sample lands in the window at
/// most this many chunks late.
pub const ITL_BATCH: usize = 16;

/// A stream's ITL samples not recorded yet (see [`ModelStats::record_itl`]).
#[derive(Debug, Default)]
#[repr(C)]
pub struct ItlBatch {
    len: usize,
    us: [u32; ITL_BATCH],
}

/// The recent requests of one model.
#[derive(Debug)]
pub struct ModelStats {
    base: Instant,
    slice_len: Duration,
    slices: Mutex<Vec<Slice>>,
}

impl ModelStats {
    fn new(base: Instant, window: Duration) -> Self {
        ModelStats {
            base,
            slice_len: window / SLICES,
            slices: Mutex::new(Vec::new()),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let nanos = self.slice_len.as_nanos().max(1);
        ((now - self.base).as_nanos() / nanos) as u64
    }

    fn with_slice(&self, now: Instant, f: impl FnOnce(&mut Slice)) {
        let epoch = self.epoch(now);
        let mut slices = self.slices.lock().unwrap_or_else(PoisonError::into_inner);
        if slices.is_empty() {
            slices.extend((0..SLICES).map(|_| Slice::new()));
        }
        let slice = &mut slices[(epoch % SLICES as u64) as usize];
        if slice.epoch != epoch {
            slice.reset(epoch);
        }
        f(slice);
    }

    /// Adds one ITL sample to a stream's `batch`; records the batch when it is full.
    pub fn record_itl(&self, batch: &mut ItlBatch, itl: Duration, now: Instant) {
        batch.us[batch.len] = micros(itl) as u32;
        batch.len += 1;
        if batch.len == ITL_BATCH {
            self.flush_itl(batch, now);
        }
    }

    /// Records the samples waiting in `batch` (at the end of a stream, or when it is full).
    pub fn flush_itl(&self, batch: &mut ItlBatch, now: Instant) {
        if batch.len == 0 {
            return;
        }
        self.with_slice(now, |s| {
            for &us in &batch.us[..batch.len] {
                record_us(&mut s.hist[Figure::Itl as usize], u64::from(us));
            }
        });
        batch.len = 0;
    }

    /// Records a request that ended ok at `now`, with its figures.
    pub fn record_request(&self, f: &Figures, t0: Instant, now: Instant) {
        self.with_slice(now, |s| {
            s.requests += 1;
            s.input_tokens += f.prompt_tokens.unwrap_or(0);
            s.output_tokens += f.output_tokens.unwrap_or(0);
            s.first = Some(s.first.map_or(t0, |first| first.min(t0)));
            if let Some(ttft) = f.ttft {
                record(&mut s.hist[Figure::Ttft as usize], ttft);
            }
            if let Some(tpot) = f.tpot {
                record(&mut s.hist[Figure::Tpot as usize], tpot);
            }
            record(&mut s.hist[Figure::E2el as usize], f.e2el);
        });
    }

    fn summary(&self, now: Instant, percentiles: &[f64]) -> Option<ModelSummary> {
        let current = self.epoch(now);
        let slices = self.slices.lock().unwrap_or_else(PoisonError::into_inner);
        let live: Vec<&Slice> = slices
            .iter()
            .filter(|s| s.epoch != u64::MAX && current - s.epoch.min(current) < SLICES as u64)
            .collect();
        let requests: u64 = live.iter().map(|s| s.requests).sum();
        let itl_samples: u64 = live
            .iter()
            .map(|s| s.hist[Figure::Itl as usize].len())
            .sum();
        if requests == 0 && itl_samples == 0 {
            return None;
        }
        let first = live.iter().filter_map(|s| s.first).min().unwrap_or(now);
        let duration = (now - first).as_secs_f64().max(1e-9);
        let figure = |f: Figure| {
            let mut h = Histogram::<u32>::new_with_bounds(1, MAX_US, 2)
                .expect("static HDR bounds are valid");
            for s in &live {
                // Same bounds on both sides: adding cannot fail.
                let _ = h.add(&s.hist[f as usize]);
            }
            distribution_of(&h, percentiles)
        };
        let input: u64 = live.iter().map(|s| s.input_tokens).sum();
        let output: u64 = live.iter().map(|s| s.output_tokens).sum();
        Some(ModelSummary {
            completed: requests,
            duration_s: duration,
            total_input_tokens: input,
            total_output_tokens: output,
            request_throughput: requests as f64 / duration,
            output_throughput: output as f64 / duration,
            total_token_throughput: (input + output) as f64 / duration,
            ttft_ms: figure(Figure::Ttft),
            tpot_ms: figure(Figure::Tpot),
            itl_ms: figure(Figure::Itl),
            e2el_ms: figure(Figure::E2el),
        })
    }
}

fn record(h: &mut Histogram<u32>, d: Duration) {
    record_us(h, micros(d));
}

fn record_us(h: &mut Histogram<u32>, us: u64) {
    // Saturating: a count that would overflow u32 keeps its maximum.
    let _ = h.record(us);
}

/// `d` in whole microseconds, within the histograms' bounds (which fit a `u32`).
fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_US)
}

/// The distribution of `h`'s microsecond samples, in milliseconds.
fn distribution_of(h: &Histogram<u32>, percentiles: &[f64]) -> Distribution {
    // The middle of the HDR bucket a quantile falls in.
    let ms = |us: u64| h.median_equivalent(us) as f64 / 1000.0;
    let empty = h.is_empty();
    Distribution {
        count: h.len(),
        mean: if empty { 0.0 } else { h.mean() / 1000.0 },
        median: if empty {
            0.0
        } else {
            ms(h.value_at_quantile(0.5))
        },
        std: if empty { 0.0 } else { h.stdev() / 1000.0 },
        percentiles: percentiles
            .iter()
            .map(|p| {
                (
                    *p,
                    if empty {
                        0.0
                    } else {
                        ms(h.value_at_quantile(p / 100.0))
                    },
                )
            })
            .collect(),
    }
}

/// All models' summaries, as `/stats` serves them.
#[derive(Clone, Debug, Serialize)]
pub struct StatsReport {
    /// Length of the sliding window, seconds.
    pub window_s: f64,
    /// Per model label.
    pub models: std::collections::BTreeMap<String, ModelSummary>,
}

/// Summaries for every model, created on a model's first request.
#[derive(Debug)]
pub struct Stats {
    base: Instant,
    window: Duration,
    models: Mutex<HashMap<Arc<str>, Arc<ModelStats>>>,
}

impl Stats {
    /// Keeps requests of the last `window`.
    pub fn new(window: Duration) -> Self {
        Stats {
            base: Instant::now(),
            window,
            models: Mutex::new(HashMap::new()),
        }
    }

    /// The summary handle of a model label (the labels are already bounded).
    pub fn model(&self, model: &Arc<str>) -> Arc<ModelStats> {
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        models
            .entry(model.clone())
            .or_insert_with(|| Arc::new(ModelStats::new(self.base, self.window)))
            .clone()
    }

    /// The report at `now`, with the given percentiles.
    pub fn report(&self, now: Instant, percentiles: &[f64]) -> StatsReport {
        let models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        StatsReport {
            window_s: self.window.as_secs_f64(),
            models: models
                .iter()
                .filter_map(|(name, s)| Some((name.to_string(), s.summary(now, percentiles)?)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::Latency;
    use tokio::time::advance;

    fn figures(ttft_ms: u64, e2el_ms: u64, tokens: u64) -> Figures {
        let t = Instant::now();
        let mut f = Latency::new(t).figures(t);
        f.ttft = Some(Duration::from_millis(ttft_ms));
        f.e2el = Duration::from_millis(e2el_ms);
        f.output_tokens = Some(tokens);
        f.tpot = Some(Duration::from_millis((e2el_ms - ttft_ms) / (tokens - 1)));
        f
    }

    #[tokio::test(start_paused = true)]
    async fn summarizes_and_forgets_after_the_window() {
        let stats = Stats::new(Duration::from_secs(100));
        let m = stats.model(&Arc::from("m"));
        let t0 = Instant::now();
        let mut batch = ItlBatch::default();
        for i in 1..=100u64 {
            m.record_request(&figures(i, i + 99, 100), t0, Instant::now());
            m.record_itl(&mut batch, Duration::from_millis(20), Instant::now());
        }
        // Six full batches are in; the last four samples wait for the end of their stream.
        let r = stats.report(Instant::now(), &[50.0]);
        assert_eq!(r.models["m"].itl_ms.count, 96);
        m.flush_itl(&mut batch, Instant::now());
        advance(Duration::from_secs(10)).await;
        let r = stats.report(Instant::now(), &[50.0, 99.0]);
        let s = &r.models["m"];
        assert_eq!(s.completed, 100);
        assert!((s.ttft_ms.mean - 50.5).abs() < 0.5, "{}", s.ttft_ms.mean);
        assert!(
            (s.ttft_ms.median - 50.0).abs() <= 0.5,
            "{}",
            s.ttft_ms.median
        );
        assert!((s.ttft_ms.percentiles[1].1 - 99.0).abs() <= 1.0);
        assert!(
            (s.tpot_ms.median - 1.0).abs() <= 0.01,
            "{}",
            s.tpot_ms.median
        );
        assert_eq!(s.itl_ms.count, 100);
        assert!((s.request_throughput - 10.0).abs() < 1e-6);
        assert_eq!(s.total_output_tokens, 10_000);
        let table = crate::report::render_table("tokentap", s, &[], crate::report::ALL_METRICS);
        assert!(table.contains("Median TTFT (ms):"));
        assert!(table.contains("P99 ITL (ms):"));
        advance(Duration::from_secs(101)).await;
        assert!(stats.report(Instant::now(), &[50.0]).models.is_empty());
    }
}
