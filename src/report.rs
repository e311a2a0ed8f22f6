//! The table `vllm bench serve` prints, and the figures it is made of: shared by `tokentap bench`,
//! `tokentap demo` and the proxy's `/stats`.

use serde::Serialize;

/// Mean, median and percentiles of one figure, milliseconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Distribution {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub median: f64,
    /// Standard deviation.
    pub std: f64,
    /// `(percentile, value)` pairs, e.g. `(99.0, 41.2)`.
    pub percentiles: Vec<(f64, f64)>,
}

/// The summary of one model's recent requests.
#[derive(Clone, Debug, Serialize)]
pub struct ModelSummary {
    /// Requests that ended ok in the window.
    pub completed: u64,
    /// Seconds from the first of them to now (at most the window).
    pub duration_s: f64,
    /// Prompt tokens of those requests.
    pub total_input_tokens: u64,
    /// Output tokens of those requests.
    pub total_output_tokens: u64,
    /// Requests per second.
    pub request_throughput: f64,
    /// Output tokens per second.
    pub output_throughput: f64,
    /// Input and output tokens per second.
    pub total_token_throughput: f64,
    /// TTFT, ms.
    pub ttft_ms: Distribution,
    /// TPOT, ms.
    pub tpot_ms: Distribution,
    /// ITL, ms.
    pub itl_ms: Distribution,
    /// E2EL, ms.
    pub e2el_ms: Distribution,
    /// Figures beside TTFT that `vllm bench serve` does not print (time to first answer,
    /// reasoning time, max ITL, and where TTFT went when the upstream reports its timings),
    /// each shown once it has a sample.
    #[serde(flatten)]
    pub beside_ttft: BesideTtft,
}

/// The figures `/stats` shows beside TTFT, ms; `None` without a sample in the window.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct BesideTtft {
    /// Time to the first answer text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttfa_ms: Option<Distribution>,
    /// First reasoning to first answer, of requests that reasoned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_ms: Option<Distribution>,
    /// Largest ITL of each request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_itl_ms: Option<Distribution>,
    /// The upstream's queue time, when it reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<Distribution>,
    /// The upstream's prefill time, when it reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill_ms: Option<Distribution>,
    /// TTFT − queue − prefill, when the upstream reports both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outside_engine_ms: Option<Distribution>,
}

impl BesideTtft {
    /// `(short name, header, distribution)` of each figure, in the order a table shows them.
    pub fn rows(&self) -> [(&'static str, &'static str, Option<&Distribution>); 6] {
        [
            ("Queue", "TTFT: Queue (upstream)", self.queue_ms.as_ref()),
            (
                "Prefill",
                "TTFT: Prefill (upstream)",
                self.prefill_ms.as_ref(),
            ),
            (
                "Outside",
                "TTFT: Outside the Engine",
                self.outside_engine_ms.as_ref(),
            ),
            ("TTFA", "Time to First Answer", self.ttfa_ms.as_ref()),
            ("Reasoning", "Reasoning Time", self.reasoning_ms.as_ref()),
            (
                "Max ITL",
                "Max Inter-token Latency",
                self.max_itl_ms.as_ref(),
            ),
        ]
    }
}

/// The figures a table can show, by the names `--percentile-metrics` takes.
pub const ALL_METRICS: &[&str] = &["ttft", "tpot", "itl", "e2el"];

/// Formats one summary in the layout `vllm bench serve` prints: the counts, `extra` lines after
/// the first, then a section per figure named in `metrics`.
pub fn render_table(
    title: &str,
    s: &ModelSummary,
    extra: &[(&str, String)],
    metrics: &[&str],
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| {
        let _ = writeln!(out, "{k:<40} {v:<10}");
    };
    let _ = writeln!(out, "{:=^50}", format!(" {title} "));
    line(&mut out, "Successful requests:", s.completed.to_string());
    for (k, v) in extra {
        line(&mut out, k, v.clone());
    }
    line(
        &mut out,
        "Benchmark duration (s):",
        format!("{:.2}", s.duration_s),
    );
    line(
        &mut out,
        "Total input tokens:",
        s.total_input_tokens.to_string(),
    );
    line(
        &mut out,
        "Total generated tokens:",
        s.total_output_tokens.to_string(),
    );
    line(
        &mut out,
        "Request throughput (req/s):",
        format!("{:.2}", s.request_throughput),
    );
    line(
        &mut out,
        "Output token throughput (tok/s):",
        format!("{:.2}", s.output_throughput),
    );
    line(
        &mut out,
        "Total Token throughput (tok/s):",
        format!("{:.2}", s.total_token_throughput),
    );
    let wanted = |name: &str| metrics.iter().any(|m| m.eq_ignore_ascii_case(name));
    let mut sections: Vec<(&str, &str, &Distribution)> = Vec::new();
    if wanted("ttft") {
        sections.push(("TTFT", "Time to First Token", &s.ttft_ms));
        // Beside TTFT: what `vllm bench serve` does not print, once it has samples.
        for (name, header, d) in s.beside_ttft.rows() {
            if let Some(d) = d {
                sections.push((name, header, d));
            }
        }
    }
    for (name, header, d) in [
        (
            "TPOT",
            "Time per Output Token (excl. 1st token)",
            &s.tpot_ms,
        ),
        ("ITL", "Inter-token Latency", &s.itl_ms),
        ("E2EL", "End-to-end Latency", &s.e2el_ms),
    ] {
        if wanted(name) {
            sections.push((name, header, d));
        }
    }
    for (name, header, d) in sections {
        let _ = writeln!(out, "{header:-^50}");
        line(
            &mut out,
            &format!("Mean {name} (ms):"),
            format!("{:.2}", d.mean),
        );
        line(
            &mut out,
            &format!("Median {name} (ms):"),
            format!("{:.2}", d.median),
        );
        for (p, v) in &d.percentiles {
            line(
                &mut out,
                &format!("P{} {name} (ms):", fmt_pct(*p)),
                format!("{v:.2}"),
            );
        }
    }
    let _ = writeln!(out, "{}", "=".repeat(50));
    out
}

/// `99` for 99.0, `99.9` for 99.9.
pub fn fmt_pct(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{p:.0}")
    } else {
        format!("{p}")
    }
}
