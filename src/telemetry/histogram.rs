//! Fixed-bucket Prometheus histograms, recorded with atomics and rendered on scrape.
//!
//! The exporter's own histograms keep every sample in a lock-free queue (an epoch-pinned push)
//! and sort them into buckets later, at upkeep or scrape: work per sample, and an ITL sample
//! comes with every forwarded chunk. Here a sample is a search of the bucket bounds and two
//! atomic updates; `/metrics` reads the counters as they are. The text is the exporter's: the
//! same `_bucket`/`_sum`/`_count` lines, cumulative buckets and a `+Inf` bucket.
//!
//! A bucket also keeps the last [`Exemplar`] recorded into it: the trace of a sampled request
//! that fell there, shown only in the OpenMetrics exposition (`docs/METRICS.md`, "Exemplars").

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::formatting::sanitize_label_value;

/// One histogram series: per-bucket counts and the sum of the samples.
#[derive(Debug)]
pub struct Buckets {
    /// Upper bounds, strictly increasing (config validation checks user lists).
    bounds: Arc<[f64]>,
    /// `counts[i]` holds samples in `(bounds[i-1], bounds[i]]`; the last one those above every
    /// bound (and NaN), so the `+Inf` bucket is the sum of all.
    counts: Box<[AtomicU64]>,
    /// The sum of the samples, as `f64` bits.
    sum: AtomicU64,
    /// The last exemplar of each bucket (same indices as `counts`), made at the first one: a
    /// series that never sees a sampled trace holds none.
    exemplars: OnceLock<Box<[Mutex<Option<Exemplar>>]>>,
}

/// The trace and span of a sampled request, as an exemplar names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceIds {
    /// The W3C trace id.
    pub trace_id: u128,
    /// The request's own span id.
    pub span_id: u64,
}

/// One exemplar: a sample and the trace it came from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Exemplar {
    /// Whose trace.
    pub ids: TraceIds,
    /// The sample.
    pub value: f64,
    /// When it was recorded, seconds since the Unix epoch.
    pub unix_secs: f64,
}

impl Buckets {
    fn new(bounds: Arc<[f64]>) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Buckets {
            bounds,
            counts,
            sum: AtomicU64::new(0f64.to_bits()),
            exemplars: OnceLock::new(),
        }
    }

    /// The index of the bucket that counts `value`: the first bound at or above it (the `le`
    /// that first counts it). NaN is above every bound.
    fn bucket_of(&self, value: f64) -> usize {
        self.bounds
            .partition_point(|bound| *bound < value || value.is_nan())
    }

    /// Keeps `ids` as the exemplar of the bucket `value` falls in, without counting a sample:
    /// for a sample already recorded (the largest ITL of a request, known at its end).
    pub fn exemplar(&self, value: f64, ids: TraceIds) {
        let i = self.bucket_of(value);
        let slots = self
            .exemplars
            .get_or_init(|| (0..self.counts.len()).map(|_| Mutex::new(None)).collect());
        let unix_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        *slots[i].lock().unwrap_or_else(PoisonError::into_inner) = Some(Exemplar {
            ids,
            value,
            unix_secs,
        });
    }

    /// The exemplar of bucket `i`, if one was kept.
    fn exemplar_of(&self, i: usize) -> Option<Exemplar> {
        let slot = self.exemplars.get()?.get(i)?;
        *slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds one sample; visible to the next scrape at once.
    pub fn record(&self, value: f64) {
        let i = self.bucket_of(value);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let mut old = self.sum.load(Ordering::Relaxed);
        loop {
            let new = (f64::from_bits(old) + value).to_bits();
            match self
                .sum
                .compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => old = now,
            }
        }
    }

    /// Cumulative counts per bound, then the total, and the sum.
    fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let mut running = 0;
        let mut cumulative: Vec<u64> = self
            .counts
            .iter()
            .map(|c| {
                running += c.load(Ordering::Relaxed);
                running
            })
            .collect();
        let total = cumulative.pop().unwrap_or(0);
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        (cumulative, total, sum)
    }
}

impl metrics::HistogramFn for Buckets {
    fn record(&self, value: f64) {
        Buckets::record(self, value);
    }
}

/// A handle on one series that can also keep exemplars; records nothing when made by
/// [`Series::noop`] or for an undescribed name.
#[derive(Clone, Debug, Default)]
pub struct Series(Option<Arc<Buckets>>);

impl Series {
    /// A handle that records nothing.
    pub fn noop() -> Self {
        Series(None)
    }

    /// Adds one sample.
    #[inline]
    pub fn record(&self, value: f64) {
        if let Some(b) = &self.0 {
            b.record(value);
        }
    }

    /// Adds one sample and, when its request is traced and sampled, keeps the trace as the
    /// exemplar of the sample's bucket.
    pub fn record_traced(&self, value: f64, trace: Option<TraceIds>) {
        if let Some(b) = &self.0 {
            b.record(value);
            if let Some(ids) = trace {
                b.exemplar(value, ids);
            }
        }
    }

    /// Keeps `ids` as the exemplar of the bucket of a sample recorded earlier.
    pub fn exemplar(&self, value: f64, ids: TraceIds) {
        if let Some(b) = &self.0 {
            b.exemplar(value, ids);
        }
    }
}

/// A metric name with its help text, bounds and every series registered under it.
#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    bounds: Arc<[f64]>,
    /// Rendered label pairs (`model="m",endpoint="chat"`) and the series.
    series: Vec<(String, Arc<Buckets>)>,
}

/// The proxy's histograms, by name; series are added when a (model, endpoint) pair is first
/// seen and live as long as the registry.
#[derive(Debug, Default)]
pub struct Histograms {
    families: Mutex<Vec<Family>>,
}

impl Histograms {
    /// Declares a histogram name with its help text and bucket bounds, before any series.
    pub fn describe(&self, name: &'static str, help: &'static str, bounds: &[f64]) {
        let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        families.retain(|f| f.name != name);
        families.push(Family {
            name,
            help,
            bounds: bounds.into(),
            series: Vec::new(),
        });
    }

    /// A new series of `name` with `labels`, as a `metrics` handle. Series of one name and
    /// labels share their counts, so registering twice is harmless. A name never described
    /// gets a handle that records nothing.
    pub fn register(&self, name: &'static str, labels: &[(&str, &str)]) -> metrics::Histogram {
        match self.series(name, labels) {
            Series(Some(series)) => metrics::Histogram::from_arc(series),
            Series(None) => metrics::Histogram::noop(),
        }
    }

    /// As [`Histograms::register`], as a handle that can also keep exemplars.
    pub fn series(&self, name: &'static str, labels: &[(&str, &str)]) -> Series {
        let mut rendered = String::new();
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                rendered.push(',');
            }
            let _ = write!(rendered, "{key}=\"{}\"", sanitize_label_value(value));
        }
        let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(family) = families.iter_mut().find(|f| f.name == name) else {
            return Series(None);
        };
        if let Some((_, series)) = family.series.iter().find(|(l, _)| *l == rendered) {
            return Series(Some(series.clone()));
        }
        let series = Arc::new(Buckets::new(family.bounds.clone()));
        family.series.push((rendered, series.clone()));
        Series(Some(series))
    }

    /// Appends every family that has a series, in the Prometheus text format (`openmetrics`
    /// false: a blank line after each family, no exemplars) or in OpenMetrics (no blank lines,
    /// each bucket's exemplar after its count).
    pub fn render_into(&self, out: &mut String, openmetrics: bool) {
        let families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        for family in families.iter().filter(|f| !f.series.is_empty()) {
            let name = family.name;
            let _ = writeln!(out, "# HELP {name} {}", family.help);
            let _ = writeln!(out, "# TYPE {name} histogram");
            for (labels, series) in &family.series {
                let (cumulative, total, sum) = series.snapshot();
                let sep = if labels.is_empty() { "" } else { "," };
                let exemplar = |out: &mut String, i: usize| {
                    if let Some(e) = openmetrics.then(|| series.exemplar_of(i)).flatten() {
                        let _ = write!(
                            out,
                            " # {{trace_id=\"{:032x}\",span_id=\"{:016x}\"}} {} {:.3}",
                            e.ids.trace_id, e.ids.span_id, e.value, e.unix_secs
                        );
                    }
                    out.push('\n');
                };
                for (i, (bound, count)) in family.bounds.iter().zip(cumulative).enumerate() {
                    let _ = write!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
                    exemplar(out, i);
                }
                let _ = write!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
                exemplar(out, family.bounds.len());
                let braces = |labels: &str| {
                    if labels.is_empty() {
                        String::new()
                    } else {
                        format!("{{{labels}}}")
                    }
                };
                let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
                let _ = writeln!(out, "{name}_count{} {total}", braces(labels));
            }
            if !openmetrics {
                out.push('\n');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(h: &Histograms) -> String {
        let mut out = String::new();
        h.render_into(&mut out, false);
        out
    }

    #[test]
    fn samples_land_in_the_first_bucket_at_or_above_them() {
        let h = Histograms::default();
        h.describe("t_seconds", "Help.", &[0.1, 0.5, 1.0]);
        let s = h.register("t_seconds", &[("model", "m"), ("endpoint", "chat")]);
        for v in [0.05, 0.1, 0.2, 0.5, 0.75, 3.0] {
            s.record(v);
        }
        assert_eq!(
            render(&h),
            "# HELP t_seconds Help.\n\
             # TYPE t_seconds histogram\n\
             t_seconds_bucket{model=\"m\",endpoint=\"chat\",le=\"0.1\"} 2\n\
             t_seconds_bucket{model=\"m\",endpoint=\"chat\",le=\"0.5\"} 4\n\
             t_seconds_bucket{model=\"m\",endpoint=\"chat\",le=\"1\"} 5\n\
             t_seconds_bucket{model=\"m\",endpoint=\"chat\",le=\"+Inf\"} 6\n\
             t_seconds_sum{model=\"m\",endpoint=\"chat\"} 4.6\n\
             t_seconds_count{model=\"m\",endpoint=\"chat\"} 6\n\n"
        );
    }

    #[test]
    fn a_pair_registered_twice_shares_its_series_and_labels_are_escaped() {
        let h = Histograms::default();
        h.describe("n", "N.", &[1.0]);
        h.register("n", &[("model", "a\"b\\c\nd")]).record(1.0);
        h.register("n", &[("model", "a\"b\\c\nd")]).record(2.0);
        h.register("n", &[("model", "x")]).record(0.5);
        h.register("undescribed", &[]).record(1.0);
        let out = render(&h);
        assert!(
            out.contains("n_bucket{model=\"a\\\"b\\\\c\\nd\",le=\"+Inf\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("n_count{model=\"x\"} 1\n"), "{out}");
        assert_eq!(out.matches("# TYPE n histogram").count(), 1);
        assert!(!out.contains("undescribed"));
    }

    #[test]
    fn names_without_series_are_not_rendered_and_nan_counts_only_in_inf() {
        let h = Histograms::default();
        h.describe("empty", "E.", &[1.0]);
        h.describe("nan", "N.", &[1.0]);
        assert_eq!(render(&h), "");
        h.register("nan", &[]).record(f64::NAN);
        let out = render(&h);
        assert!(
            out.contains("nan_bucket{le=\"1\"} 0\nnan_bucket{le=\"+Inf\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("nan_count 1\n"), "{out}");
        assert!(!out.contains("empty"));
    }

    #[test]
    fn exemplars_ride_on_their_bucket_in_openmetrics_only() {
        let h = Histograms::default();
        h.describe("t_seconds", "Help.", &[0.1, 1.0]);
        let s = h.series("t_seconds", &[("model", "m")]);
        let traced = TraceIds {
            trace_id: 0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
            span_id: 0x00f0_67aa_0ba9_02b7,
        };
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        s.record_traced(0.05, None);
        s.record_traced(0.5, Some(traced));
        // A later sampled request in the same bucket replaces the first.
        let later = TraceIds {
            trace_id: 7,
            span_id: 9,
        };
        s.record_traced(0.7, Some(later));
        // Recorded earlier, its trace known only at the end: no second count.
        s.record(3.0);
        s.exemplar(3.0, traced);
        let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();

        let text = render(&h);
        assert!(!text.contains("trace_id"), "{text}");
        assert!(
            text.ends_with("t_seconds_count{model=\"m\"} 4\n\n"),
            "{text}"
        );

        let mut om = String::new();
        h.render_into(&mut om, true);
        let lines: Vec<&str> = om.lines().collect();
        assert_eq!(lines[2], "t_seconds_bucket{model=\"m\",le=\"0.1\"} 1");
        let with_exemplar = |line: &str, count: &str, ids: &str, value: &str| {
            let rest = line
                .strip_prefix(count)
                .and_then(|l| l.strip_prefix(ids))
                .and_then(|l| l.strip_prefix(value))
                .unwrap_or_else(|| panic!("{line}"));
            let at: f64 = rest.trim().parse().unwrap();
            assert!(before.as_secs_f64() - 0.001 <= at && at <= after.as_secs_f64() + 0.001);
        };
        with_exemplar(
            lines[3],
            "t_seconds_bucket{model=\"m\",le=\"1\"} 3",
            " # {trace_id=\"00000000000000000000000000000007\",span_id=\"0000000000000009\"}",
            " 0.7 ",
        );
        with_exemplar(
            lines[4],
            "t_seconds_bucket{model=\"m\",le=\"+Inf\"} 4",
            " # {trace_id=\"0af7651916cd43dd8448eb211c80319c\",span_id=\"00f067aa0ba902b7\"}",
            " 3 ",
        );
        assert_eq!(
            lines[5..],
            [
                "t_seconds_sum{model=\"m\"} 4.25",
                "t_seconds_count{model=\"m\"} 4"
            ]
        );
        assert!(!om.contains("\n\n"));
        // A no-op handle keeps nothing.
        Series::noop().record_traced(1.0, Some(traced));
    }

    #[test]
    fn concurrent_samples_are_all_counted() {
        let h = Arc::new(Histograms::default());
        h.describe("c", "C.", &[0.5]);
        let s = h.register("c", &[]);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let s = s.clone();
                scope.spawn(move || (0..10_000).for_each(|_| s.record(1.0)));
            }
        });
        let out = render(&h);
        assert!(out.contains("c_sum 40000\n"), "{out}");
        assert!(out.contains("c_count 40000\n"), "{out}");
    }
}
