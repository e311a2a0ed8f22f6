//! Fixed-bucket Prometheus histograms, recorded with atomics and rendered on scrape.
//!
//! The exporter's own histograms keep every sample in a lock-free queue (an epoch-pinned push)
//! and sort them into buckets later, at upkeep or scrape: work per sample, and an ITL sample
//! comes with every forwarded chunk. Here a sample is a search of the bucket bounds and two
//! atomic updates; `/metrics` reads the counters as they are. The text is the exporter's: the
//! same `_bucket`/`_sum`/`_count` lines, cumulative buckets and a `+Inf` bucket.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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
}

impl Buckets {
    fn new(bounds: Arc<[f64]>) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Buckets {
            bounds,
            counts,
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Adds one sample; visible to the next scrape at once.
    pub fn record(&self, value: f64) {
        // The first bound at or above `value`: the bucket `le` that first counts it. NaN is
        // above every bound.
        let i = self
            .bounds
            .partition_point(|bound| *bound < value || value.is_nan());
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
        let mut rendered = String::new();
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                rendered.push(',');
            }
            let _ = write!(rendered, "{key}=\"{}\"", sanitize_label_value(value));
        }
        let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(family) = families.iter_mut().find(|f| f.name == name) else {
            return metrics::Histogram::noop();
        };
        if let Some((_, series)) = family.series.iter().find(|(l, _)| *l == rendered) {
            return metrics::Histogram::from_arc(series.clone());
        }
        let series = Arc::new(Buckets::new(family.bounds.clone()));
        family.series.push((rendered, series.clone()));
        metrics::Histogram::from_arc(series)
    }

    /// Appends every family that has a series, in the Prometheus text format.
    pub fn render_into(&self, out: &mut String) {
        let families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        for family in families.iter().filter(|f| !f.series.is_empty()) {
            let name = family.name;
            let _ = writeln!(out, "# HELP {name} {}", family.help);
            let _ = writeln!(out, "# TYPE {name} histogram");
            for (labels, series) in &family.series {
                let (cumulative, total, sum) = series.snapshot();
                let sep = if labels.is_empty() { "" } else { "," };
                for (bound, count) in family.bounds.iter().zip(cumulative) {
                    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
                }
                let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
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
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(h: &Histograms) -> String {
        let mut out = String::new();
        h.render_into(&mut out);
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
