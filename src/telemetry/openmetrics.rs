//! The OpenMetrics exposition of `/metrics`, beside the Prometheus text format.
//!
//! Prometheus asks for OpenMetrics first (its scrape `Accept` header lists it before the text
//! format), and only OpenMetrics carries exemplars. The counters and gauges come from the
//! exporter in the text format; [`from_text`] rewrites them into OpenMetrics at scrape time
//! (a counter family is named without its `_total` suffix, no blank lines, `"` escaped in help
//! text), and the histograms render themselves in either format.

/// `Content-Type` of the OpenMetrics exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper's `Accept` header prefers OpenMetrics (1.0.0 or 0.0.1) to the text format:
/// its quality is above zero and at least that of `text/plain` (or of a wildcard that covers
/// it). Anything unreadable counts as not asking; no header means the text format.
pub fn wanted(accept: Option<&[u8]>) -> bool {
    let Some(accept) = accept.and_then(|a| std::str::from_utf8(a).ok()) else {
        return false;
    };
    let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim();
        let (mut q, mut version) = (1.0f32, None);
        for param in parts {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            match key.trim() {
                "q" => q = value.trim().parse().unwrap_or(0.0),
                "version" => version = Some(value.trim()),
                _ => {}
            }
        }
        if !(0.0..=1.0).contains(&q) {
            continue;
        }
        if media.eq_ignore_ascii_case("application/openmetrics-text") {
            if matches!(version, None | Some("1.0.0") | Some("0.0.1")) {
                openmetrics = openmetrics.max(q);
            }
        } else if media.eq_ignore_ascii_case("text/plain")
            || media.eq_ignore_ascii_case("text/*")
            || media == "*/*"
        {
            text = text.max(q);
        }
    }
    openmetrics > 0.0 && openmetrics >= text
}

/// Appends the exporter's text-format `text` to `out` as OpenMetrics families (without the
/// closing `# EOF`, which the caller writes after the histograms).
pub fn from_text(text: &str, out: &mut String) {
    // Counter families are known from their TYPE line, which follows their HELP line.
    let counters: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    // A counter named without `_total` cannot be an OpenMetrics counter: it is `unknown`.
    let family = |name: &str| -> String {
        match name.strip_suffix("_total") {
            Some(base) if counters.contains(&name) => base.to_owned(),
            _ => name.to_owned(),
        }
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str("# HELP ");
            out.push_str(&family(name));
            out.push(' ');
            // Text-format help escapes `\` and newlines already; OpenMetrics also escapes `"`.
            out.push_str(&help.replace('"', "\\\""));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, "unknown"));
            let kind = match kind {
                "counter" if !name.ends_with("_total") => "unknown",
                "counter" | "gauge" | "histogram" | "summary" => kind,
                _ => "unknown",
            };
            out.push_str("# TYPE ");
            out.push_str(&family(name));
            out.push(' ');
            out.push_str(kind);
        } else if line.starts_with('#') {
            continue;
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_accept_header_asks_for_openmetrics() {
        // What Prometheus 2.42 sends.
        let prom = b"application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wanted(Some(prom)));
        assert!(wanted(Some(b"application/openmetrics-text")));
        assert!(!wanted(None));
        assert!(!wanted(Some(b"text/plain")));
        assert!(!wanted(Some(b"*/*")));
        assert!(!wanted(Some(
            b"text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5"
        )));
        assert!(!wanted(Some(b"application/openmetrics-text;q=0")));
        assert!(!wanted(Some(b"application/openmetrics-text;version=2.0.0")));
        assert!(!wanted(Some(b"application/openmetrics-text;q=nonsense")));
        assert!(!wanted(Some(b"\xff\xfe")));
        assert!(!wanted(Some(b";;,,=;q=;")));
    }

    #[test]
    fn counters_lose_total_in_their_family_name_and_blank_lines_go() {
        let text = "# HELP a_total Requests \"ok\".\n# TYPE a_total counter\na_total{x=\"1\"} 3\n\n\
                    # HELP g Open.\n# TYPE g gauge\ng 2\n\n\
                    # TYPE odd counter\nodd 1\n\n";
        let mut out = String::new();
        from_text(text, &mut out);
        assert_eq!(
            out,
            "# HELP a Requests \\\"ok\\\".\n# TYPE a counter\na_total{x=\"1\"} 3\n\
             # HELP g Open.\n# TYPE g gauge\ng 2\n\
             # TYPE odd unknown\nodd 1\n"
        );
    }
}
