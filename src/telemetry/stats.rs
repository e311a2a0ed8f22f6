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
use crate::report::{BesideTtft, Distribution, ModelSummary};

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
    Ttfa = 4,
    Reasoning = 5,
    MaxItl = 6,
    Queue = 7,
    Prefill = 8,
    OutsideEngine = 9,
}

/// Figures a slice summarizes.
const FIGURES: usize = 10;

#[derive(Debug)]
struct Slice {
    epoch: u64,
    /// One histogram per [`Figure`], made at its first sample: a model whose requests never
    /// reason costs no reasoning histograms.
    hist: [Option<Box<Histogram<u32>>>; FIGURES],
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    first: Option<Instant>,
}

impl Slice {
    fn new() -> Slice {
        Slice {
            epoch: u64::MAX,
            hist: Default::default(),
            requests: 0,
            input_tokens: 0,
            output_tokens: 0,
            first: None,
        }
    }

    fn reset(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.hist.iter_mut().flatten().for_each(|h| h.reset());
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
        self.record_itl_samples(&batch.us[..batch.len], now);
        batch.len = 0;
    }

    fn record_itl_samples(&self, us: &[u32], now: Instant) {
        self.with_slice(now, |s| {
            for &us in us {
                record_us(s.hist(Figure::Itl), u64::from(us));
            }
        });
    }

    /// Records a request that ended ok at `now`, with its figures.
    pub fn record_request(&self, f: &Figures, t0: Instant, now: Instant) {
        self.with_slice(now, |s| {
            s.requests += 1;
            s.input_tokens += f.prompt_tokens.unwrap_or(0);
            s.output_tokens += f.output_tokens.unwrap_or(0);
            s.first = Some(s.first.map_or(t0, |first| first.min(t0)));
            for (figure, value) in [
                (Figure::Ttft, f.ttft),
                (Figure::Tpot, f.tpot),
                (Figure::E2el, Some(f.e2el)),
                (Figure::Ttfa, f.ttfa),
                (Figure::Reasoning, f.reasoning),
                (Figure::MaxItl, f.itl_max),
                (Figure::Queue, f.queue),
                (Figure::Prefill, f.prefill),
                (Figure::OutsideEngine, f.outside_engine),
            ] {
                if let Some(value) = value {
                    record(s.hist(figure), value);
                }
            }
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
            .map(|s| s.hist[Figure::Itl as usize].as_ref().map_or(0, |h| h.len()))
            .sum();
        if requests == 0 && itl_samples == 0 {
            return None;
        }
        let first = live.iter().filter_map(|s| s.first).min().unwrap_or(now);
        let duration = (now - first).as_secs_f64().max(1e-9);
        let figure = |f: Figure| {
            let mut h = new_histogram();
            for s in &live {
                if let Some(sh) = &s.hist[f as usize] {
                    // Same bounds on both sides: adding cannot fail.
                    let _ = h.add(&**sh);
                }
            }
            distribution_of(&h, percentiles)
        };
        // A figure beside TTFT is shown once it has a sample.
        let beside = |f: Figure| Some(figure(f)).filter(|d| d.count > 0);
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
            beside_ttft: BesideTtft {
                ttfa_ms: beside(Figure::Ttfa),
                reasoning_ms: beside(Figure::Reasoning),
                max_itl_ms: beside(Figure::MaxItl),
                queue_ms: beside(Figure::Queue),
                prefill_ms: beside(Figure::Prefill),
                outside_engine_ms: beside(Figure::OutsideEngine),
            },
        })
    }
}

impl Slice {
    /// The histogram of `f`, made at its first sample.
    fn hist(&mut self, f: Figure) -> &mut Histogram<u32> {
        self.hist[f as usize].get_or_insert_with(|| Box::new(new_histogram()))
    }
}

fn new_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, MAX_US, 2).expect("static HDR bounds are valid")
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

/// Where a request's figures go in `/stats`: its model's window, and its tenant's when tenants
/// are on. One request feeds both, so the ITL batch is recorded into each when it is flushed.
#[derive(Debug)]
pub struct RouteStats {
    model: Arc<ModelStats>,
    tenant: Option<Arc<ModelStats>>,
}

impl RouteStats {
    /// Adds one ITL sample to a stream's `batch`; records the batch when it is full.
    pub fn record_itl(&self, batch: &mut ItlBatch, itl: Duration, now: Instant) {
        batch.us[batch.len] = micros(itl) as u32;
        batch.len += 1;
        if batch.len == ITL_BATCH {
            self.flush_itl(batch, now);
        }
    }

    /// Records the samples waiting in `batch` into every window of the request.
    pub fn flush_itl(&self, batch: &mut ItlBatch, now: Instant) {
        if batch.len == 0 {
            return;
        }
        let samples = &batch.us[..batch.len];
        self.model.record_itl_samples(samples, now);
        if let Some(tenant) = &self.tenant {
            tenant.record_itl_samples(samples, now);
        }
        batch.len = 0;
    }

    /// Records a request that ended ok at `now` into every window of the request.
    pub fn record_request(&self, f: &Figures, t0: Instant, now: Instant) {
        self.model.record_request(f, t0, now);
        if let Some(tenant) = &self.tenant {
            tenant.record_request(f, t0, now);
        }
    }
}

/// One summary per tenant across models, as `/stats?tenant=` serves them.
#[derive(Clone, Debug, Serialize)]
pub struct TenantReport {
    /// Length of the sliding window, seconds.
    pub window_s: f64,
    /// Per tenant label.
    pub tenants: std::collections::BTreeMap<String, ModelSummary>,
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
    /// Per tenant label (bounded as the labels are: `telemetry.max_tenants` + 2 at most).
    tenants: Mutex<HashMap<Arc<str>, Arc<ModelStats>>>,
}

impl Stats {
    /// Keeps requests of the last `window`.
    pub fn new(window: Duration) -> Self {
        Stats {
            base: Instant::now(),
            window,
            models: Mutex::new(HashMap::new()),
            tenants: Mutex::new(HashMap::new()),
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

    /// The windows a request of `model` (and `tenant`, when tenants are on) is summarized in.
    pub fn route(&self, model: &Arc<str>, tenant: Option<&Arc<str>>) -> RouteStats {
        RouteStats {
            model: self.model(model),
            tenant: tenant.map(|tenant| {
                let mut tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
                tenants
                    .entry(tenant.clone())
                    .or_insert_with(|| Arc::new(ModelStats::new(self.base, self.window)))
                    .clone()
            }),
        }
    }

    /// How many tenant windows exist (each costs up to a few hundred KiB).
    pub fn tenant_windows(&self) -> usize {
        self.tenants
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The summary of each tenant across its models at `now` (only `only`'s, when given).
    pub fn tenant_report(
        &self,
        now: Instant,
        percentiles: &[f64],
        only: Option<&str>,
    ) -> TenantReport {
        let tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        TenantReport {
            window_s: self.window.as_secs_f64(),
            tenants: tenants
                .iter()
                .filter(|(name, _)| only.is_none_or(|only| only == &***name))
                .filter_map(|(name, s)| Some((name.to_string(), s.summary(now, percentiles)?)))
                .collect(),
        }
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

    /// A request counts in its model's window and in its tenant's, ITL batches included; the
    /// tenant's summary spans its models.
    #[tokio::test(start_paused = true)]
    async fn tenant_windows_span_models() {
        let stats = Stats::new(Duration::from_secs(100));
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let t: Arc<str> = Arc::from("t");
        let t0 = Instant::now();
        for model in [&a, &b] {
            let route = stats.route(model, Some(&t));
            let mut batch = ItlBatch::default();
            for _ in 0..3 {
                route.record_itl(&mut batch, Duration::from_millis(20), Instant::now());
            }
            route.flush_itl(&mut batch, Instant::now());
            route.record_request(&figures(10, 110, 11), t0, Instant::now());
        }
        stats
            .route(&a, None)
            .record_request(&figures(10, 110, 11), t0, Instant::now());
        assert_eq!(stats.tenant_windows(), 1);
        let r = stats.report(Instant::now(), &[50.0]);
        assert_eq!(r.models["a"].completed, 2);
        assert_eq!(r.models["b"].completed, 1);
        assert_eq!(r.models["a"].itl_ms.count, 3);
        let r = stats.tenant_report(Instant::now(), &[50.0], None);
        assert_eq!(r.tenants.len(), 1);
        assert_eq!(r.tenants["t"].completed, 2);
        assert_eq!(r.tenants["t"].itl_ms.count, 6);
        assert_eq!(r.tenants["t"].total_output_tokens, 22);
        let r = stats.tenant_report(Instant::now(), &[50.0], Some("u"));
        assert!(r.tenants.is_empty());
    }

    /// Time to first answer, reasoning time, max ITL and where TTFT went are shown beside TTFT
    /// once they have a sample, and not at all before.
    #[tokio::test(start_paused = true)]
    async fn figures_beside_ttft_show_once_sampled() {
        let stats = Stats::new(Duration::from_secs(100));
        let m = stats.model(&Arc::from("m"));
        let t0 = Instant::now();
        m.record_request(&figures(40, 140, 11), t0, Instant::now());
        let r = stats.report(Instant::now(), &[50.0]);
        assert_eq!(r.models["m"].beside_ttft, BesideTtft::default());
        let table = crate::report::render_table("t", &r.models["m"], &[], &["ttft"]);
        assert!(!table.contains("TTFA"), "{table}");

        let mut f = figures(40, 140, 11);
        f.ttfa = Some(Duration::from_millis(90));
        f.reasoning = Some(Duration::from_millis(50));
        f.itl_max = Some(Duration::from_millis(30));
        f.queue = Some(Duration::from_millis(5));
        f.prefill = Some(Duration::from_millis(25));
        f.outside_engine = Some(Duration::from_millis(10));
        m.record_request(&f, t0, Instant::now());
        let r = stats.report(Instant::now(), &[50.0]);
        let b = &r.models["m"].beside_ttft;
        for (d, ms) in [
            (&b.ttfa_ms, 90.0),
            (&b.reasoning_ms, 50.0),
            (&b.max_itl_ms, 30.0),
            (&b.queue_ms, 5.0),
            (&b.prefill_ms, 25.0),
            (&b.outside_engine_ms, 10.0),
        ] {
            let d = d.as_ref().expect("sampled");
            assert_eq!(d.count, 1);
            assert!((d.mean - ms).abs() < ms * 0.01, "{} vs {ms}", d.mean);
        }
        let table = crate::report::render_table("t", &r.models["m"], &[], &["ttft"]);
        for line in [
            "Mean TTFT (ms):",
            "Mean Queue (ms):",
            "Median Prefill (ms):",
            "Mean Outside (ms):",
            "Mean TTFA (ms):",
            "Mean Reasoning (ms):",
            "P50 Max ITL (ms):",
        ] {
            assert!(table.contains(line), "{line} missing from\n{table}");
        }
        // Not asked for TTFT: nothing beside it either.
        let table = crate::report::render_table("t", &r.models["m"], &[], &["itl"]);
        assert!(
            !table.contains("TTFA") && !table.contains("Queue"),
            "{table}"
        );
        let json = serde_json::to_value(&r.models["m"]).unwrap();
        assert_eq!(json["queue_ms"]["count"], 1);
        assert!(json.get("decode_ms").is_none());
    }
}
