//! Checks of the monitoring files shipped with tokentap: the Grafana dashboards
//! (`grafana/dashboards/*.json`), the Prometheus configuration and rules (`config/prometheus/`)
//! and their unit tests.
//!
//! The dashboard structure is checked here natively. The rest needs external tools: `promtool`
//! (Debian's `prometheus` package) for the config, the rules, the alert unit tests and the syntax
//! of every dashboard query; `node` and `npm` for the Grafana schema check in `.ci/dashboards/`.
//! A missing tool skips its test with a "skipped: ..." line, unless `TOKENTAP_REQUIRE_EXTERNAL=1`
//! is set, in which case the test fails and says what to install.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The only variables a dashboard query may use, so that queries can be extracted and run by a
/// script (substitute `.*` for the first four and a duration for the last).
const ALLOWED_VARIABLES: [&str; 5] = [
    "$model",
    "$endpoint",
    "$tenant",
    "$upstream",
    "$__rate_interval",
];

/// The datasource every panel, query and query variable must reference.
const DATASOURCE_VARIABLE: &str = "${datasource}";

const PROMQL_KEYWORDS: [&str; 13] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

const GROUPING_KEYWORDS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require_external() -> bool {
    std::env::var("TOKENTAP_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1")
}

/// Returns true when `tool` runs; otherwise prints why the caller is skipped (or fails when
/// external tools are required).
fn have_tool(tool: &str, version_arg: &str, install_hint: &str, what: &str) -> bool {
    let runs = Command::new(tool)
        .arg(version_arg)
        .output()
        .is_ok_and(|out| out.status.success());
    if runs {
        return true;
    }
    assert!(
        !require_external(),
        "TOKENTAP_REQUIRE_EXTERNAL=1 but `{tool}` is not installed or does not run, so {what} \
         cannot be checked; install it with: {install_hint} (bash .ci/setup does this)"
    );
    println!("skipped: {what}: `{tool}` is not installed ({install_hint})");
    false
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

fn assert_success(what: &str, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    println!("{what}: ok\n{stdout}");
}

fn files_with_extension(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.contains(&e))
        })
        .collect();
    files.sort();
    files
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = root().join("grafana/dashboards");
    let files = files_with_extension(&dir, &["json"]);
    assert!(!files.is_empty(), "no dashboards in {}", dir.display());
    files
        .iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let value = serde_json::from_str(&read(path))
                .unwrap_or_else(|e| panic!("{name} is not valid JSON: {e}"));
            (name, value)
        })
        .collect()
}

fn rule_files() -> Vec<PathBuf> {
    let files = files_with_extension(&root().join("config/prometheus/rules"), &["yml", "yaml"]);
    assert!(
        !files.is_empty(),
        "no rule files in config/prometheus/rules"
    );
    files
}

/// Names of the recording rules defined in config/prometheus/rules.
fn recorded_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in rule_files() {
        for line in read(&file).lines() {
            let line = line.trim_start().trim_start_matches("- ").trim_start();
            if let Some(rest) = line.strip_prefix("record:") {
                names.insert(rest.trim().trim_matches(['"', '\'']).to_owned());
            }
        }
    }
    names
}

/// Metric names dashboards may select: grafana/metrics.txt (histograms expand to their series),
/// `up`, and every recording rule. `vllm:*` is allowed separately.
fn allowed_metrics() -> BTreeSet<String> {
    let mut allowed: BTreeSet<String> = recorded_names();
    allowed.insert("up".to_owned());
    for line in read(&root().join("grafana/metrics.txt")).lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let name = parts.next().unwrap().to_owned();
        if parts.next() == Some("histogram") {
            for suffix in ["_bucket", "_sum", "_count"] {
                allowed.insert(format!("{name}{suffix}"));
            }
        }
        allowed.insert(name);
    }
    allowed
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric names a PromQL expression selects. String literals, label matchers, range and
/// subquery brackets, grouping label lists, function names, keywords and numbers are skipped.
fn metric_names(expr: &str) -> Vec<String> {
    // Pass 1: blank out strings, `{...}` and `[...]`.
    let mut plain = String::with_capacity(expr.len());
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                let mut escaped = false;
                for d in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if d == '\\' && c != '`' {
                        escaped = true;
                    } else if d == c {
                        break;
                    }
                }
                plain.push(' ');
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                for d in chars.by_ref() {
                    if d == close {
                        break;
                    }
                }
                plain.push(' ');
            }
            _ => plain.push(c),
        }
    }
    // Pass 2: tokens.
    let text: Vec<char> = plain.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let c = text[i];
        if c.is_ascii_digit() || (c == '.' && text.get(i + 1).is_some_and(char::is_ascii_digit)) {
            i += 1;
            while i < text.len() {
                let d = text[i];
                if d.is_ascii_digit() || d == '.' {
                    i += 1;
                } else if (d == 'e' || d == 'E')
                    && text
                        .get(i + 1)
                        .is_some_and(|n| n.is_ascii_digit() || *n == '+' || *n == '-')
                {
                    i += 2;
                } else {
                    break;
                }
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < text.len() && is_ident_char(text[i]) {
                i += 1;
            }
            let ident: String = text[start..i].iter().collect();
            let mut j = i;
            while j < text.len() && text[j].is_whitespace() {
                j += 1;
            }
            let mut call = text.get(j) == Some(&'(');
            let lower = ident.to_ascii_lowercase();
            if !call && !GROUPING_KEYWORDS.contains(&lower.as_str()) {
                // `sum by (le) (...)`: an aggregation whose grouping comes first.
                let next: String = text[j..]
                    .iter()
                    .take_while(|c| is_ident_char(**c))
                    .collect();
                call = matches!(next.to_ascii_lowercase().as_str(), "by" | "without");
            }
            if call && GROUPING_KEYWORDS.contains(&lower.as_str()) {
                // A grouping label list: skip to its closing parenthesis.
                while j < text.len() && text[j] != ')' {
                    j += 1;
                }
                i = j + 1;
            } else if !call && !PROMQL_KEYWORDS.contains(&lower.as_str()) {
                names.push(ident);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// `$name` / `${name}` references in an expression.
fn variables(expr: &str) -> Vec<String> {
    let mut vars = Vec::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == '$' {
            let braced = bytes.get(i + 1) == Some(&'{');
            let start = if braced { i + 2 } else { i + 1 };
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == '_') {
                end += 1;
            }
            let name: String = bytes[start..end].iter().collect();
            vars.push(format!("${name}"));
            i = end;
        } else {
            i += 1;
        }
    }
    vars
}

fn all_panels(panels: &[Value]) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in panels {
        out.push(panel);
        if let Some(children) = panel.get("panels").and_then(Value::as_array) {
            out.extend(all_panels(children));
        }
    }
    out
}

fn panel_list(dashboard: &Value) -> &[Value] {
    dashboard
        .get("panels")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn title(panel: &Value) -> String {
    panel
        .get("title")
        .and_then(Value::as_str)
        .unwrap_or("(untitled)")
        .to_owned()
}

/// Every `datasource` object anywhere in the document, with its JSON path.
fn datasource_refs<'a>(value: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let child_path = format!("{path}.{key}");
                if key == "datasource" {
                    out.push((child_path.clone(), child));
                }
                datasource_refs(child, child_path, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                datasource_refs(child, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// All structural problems of one dashboard (empty when it is fine).
fn dashboard_problems(dashboard: &Value, allowed: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    if !dashboard.get("schemaVersion").is_some_and(Value::is_number) {
        problems.push("schemaVersion is missing or not a number".to_owned());
    }
    if dashboard.get("id").is_some_and(|id| !id.is_null()) {
        problems.push("a provisioned dashboard must not carry a numeric id".to_owned());
    }

    // Template variables.
    let vars: HashMap<&str, &Value> = dashboard
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|v| Some((v.get("name")?.as_str()?, v)))
                .collect()
        })
        .unwrap_or_default();
    match vars.get("datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        _ => problems.push("no `datasource` variable of type datasource (prometheus)".to_owned()),
    }
    let label_values = |name: &str| {
        vars.get(name).is_some_and(|v| {
            v["type"] == "query"
                && v["query"]
                    .as_str()
                    .is_some_and(|q| q.starts_with("label_values("))
        })
    };
    if !label_values("model") {
        problems.push("no `model` query variable using label_values".to_owned());
    }

    // Datasources: only the variable, never a uid.
    let mut refs = Vec::new();
    datasource_refs(dashboard, "$".to_owned(), &mut refs);
    for (path, ds) in refs {
        if let Some(uid) = ds.get("uid") {
            if uid != DATASOURCE_VARIABLE {
                problems.push(format!(
                    "{path}: hard-coded datasource uid {uid} (use {DATASOURCE_VARIABLE})"
                ));
            }
        } else if ds.is_string() {
            problems.push(format!("{path}: datasource given by name {ds}"));
        }
    }

    // Panels.
    let panels = all_panels(panel_list(dashboard));
    if panels.is_empty() {
        problems.push("no panels".to_owned());
    }
    let mut ids: BTreeMap<i64, String> = BTreeMap::new();
    let mut boxes: Vec<(String, i64, i64, i64, i64)> = Vec::new();
    let mut uses_endpoint = false;
    let mut uses_tenant = false;
    let mut uses_upstream = false;
    for panel in &panels {
        let name = title(panel);
        let is_row = panel["type"] == "row";
        match panel.get("id").and_then(Value::as_i64) {
            None => problems.push(format!("panel {name:?} has no numeric id")),
            Some(id) => {
                if let Some(other) = ids.insert(id, name.clone()) {
                    problems.push(format!("panel id {id} is used by {other:?} and {name:?}"));
                }
            }
        }
        match panel.get("gridPos") {
            Some(g) => {
                let n = |k: &str| g.get(k).and_then(Value::as_i64).unwrap_or(-1);
                let (x, y, w, h) = (n("x"), n("y"), n("w"), n("h"));
                if x < 0 || y < 0 || w <= 0 || h <= 0 || x + w > 24 {
                    problems.push(format!("panel {name:?} has a bad gridPos {g}"));
                }
                boxes.push((name.clone(), x, y, w, h));
            }
            None => problems.push(format!("panel {name:?} has no gridPos")),
        }
        if is_row {
            continue;
        }
        let described = panel
            .get("description")
            .and_then(Value::as_str)
            .is_some_and(|d| !d.trim().is_empty());
        if !described {
            problems.push(format!("panel {name:?} has no description"));
        }
        let targets = panel
            .get("targets")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        if targets.is_empty() {
            problems.push(format!("panel {name:?} has no query"));
        }
        for target in targets {
            let ref_id = target["refId"].as_str().unwrap_or("?");
            let Some(expr) = target.get("expr").and_then(Value::as_str) else {
                problems.push(format!(
                    "panel {name:?} query {ref_id}: no plain `expr` string"
                ));
                continue;
            };
            if expr.trim().is_empty() {
                problems.push(format!("panel {name:?} query {ref_id}: empty expr"));
            }
            for var in variables(expr) {
                if !ALLOWED_VARIABLES.contains(&var.as_str()) {
                    problems.push(format!(
                        "panel {name:?} query {ref_id}: variable {var} is not one of {ALLOWED_VARIABLES:?}"
                    ));
                }
                uses_endpoint |= var == "$endpoint";
                uses_tenant |= var == "$tenant";
                uses_upstream |= var == "$upstream";
            }
            for metric in metric_names(expr) {
                if !allowed.contains(&metric) && !metric.starts_with("vllm:") {
                    problems.push(format!(
                        "panel {name:?} query {ref_id}: unknown metric {metric} \
                         (not in grafana/metrics.txt, not vllm:*, not a recording rule)"
                    ));
                }
            }
        }
    }
    if uses_endpoint && !label_values("endpoint") {
        problems.push(
            "queries use $endpoint but there is no `endpoint` label_values variable".to_owned(),
        );
    }
    if uses_tenant && !label_values("tenant") {
        problems
            .push("queries use $tenant but there is no `tenant` label_values variable".to_owned());
    }
    if uses_upstream && !label_values("upstream") {
        problems.push(
            "queries use $upstream but there is no `upstream` label_values variable".to_owned(),
        );
    }
    for (i, a) in boxes.iter().enumerate() {
        for b in &boxes[i + 1..] {
            let overlap = a.1 < b.1 + b.3 && b.1 < a.1 + a.3 && a.2 < b.2 + b.4 && b.2 < a.2 + a.4;
            if overlap {
                problems.push(format!("panels {:?} and {:?} overlap", a.0, b.0));
            }
        }
    }
    problems
}

#[test]
fn metric_names_are_extracted_from_promql() {
    let expr = r#"histogram_quantile(0.99, sum by (le, model) (rate(tokentap_time_to_first_token_seconds_bucket{model=~"$model", endpoint=~"$endpoint"}[$__rate_interval]))) / on() group_left() tokentap:slo_goodput_objective and vllm:num_requests_running{model_name="a b"} > 1e-3 or vector(0)"#;
    assert_eq!(
        metric_names(expr),
        [
            "tokentap_time_to_first_token_seconds_bucket",
            "tokentap:slo_goodput_objective",
            "vllm:num_requests_running"
        ]
    );
    assert_eq!(variables(expr), ["$model", "$endpoint", "$__rate_interval"]);
    assert!(metric_names("sum without (instance) (up) * 2.5").contains(&"up".to_owned()));
    assert_eq!(variables("rate(x[${interval}])"), ["$interval"]);
}

#[test]
fn structural_check_catches_bad_dashboards() {
    let allowed = allowed_metrics();
    let (_, good) = dashboards().into_iter().next().unwrap();
    assert!(dashboard_problems(&good, &allowed).is_empty());

    let mut bad = good.clone();
    let panels = bad["panels"].as_array_mut().unwrap();
    let data_panel = panels.iter().position(|p| p["type"] != "row").unwrap();
    let p = &mut panels[data_panel];
    p["datasource"]["uid"] = Value::from("P1809F7CD0C75ACF3");
    p["description"] = Value::from("");
    p["targets"][0]["expr"] = Value::from("rate(tokentap_made_up_total[$interval])");
    let id = p["id"].clone();
    panels[data_panel + 1]["id"] = id;
    let problems = dashboard_problems(&bad, &allowed).join("\n");
    for expected in [
        "hard-coded datasource uid",
        "has no description",
        "unknown metric tokentap_made_up_total",
        "variable $interval",
        "is used by",
    ] {
        assert!(
            problems.contains(expected),
            "{expected:?} not reported in:\n{problems}"
        );
    }
}

#[test]
fn dashboards_follow_the_structural_rules() {
    let allowed = allowed_metrics();
    let mut uids: BTreeMap<String, String> = BTreeMap::new();
    let mut failures = Vec::new();
    for (name, dashboard) in dashboards() {
        match dashboard.get("uid").and_then(Value::as_str) {
            Some(uid) if !uid.is_empty() => {
                if let Some(other) = uids.insert(uid.to_owned(), name.clone()) {
                    failures.push(format!("{name}: uid {uid} is also used by {other}"));
                }
            }
            _ => failures.push(format!("{name}: no uid")),
        }
        for problem in dashboard_problems(&dashboard, &allowed) {
            failures.push(format!("{name}: {problem}"));
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard problems:\n{}",
        failures.join("\n")
    );
    // The two dashboards the docs promise.
    assert!(uids.contains_key("tokentap-latency") && uids.contains_key("tokentap-slo"));
}

#[test]
fn latency_dashboard_covers_the_promised_panels() {
    let (_, dashboard) = dashboards()
        .into_iter()
        .find(|(_, d)| d["uid"] == "tokentap-latency")
        .expect("tokentap-latency dashboard");
    let exprs: Vec<String> = all_panels(panel_list(&dashboard))
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    let uses = |needle: &str| exprs.iter().any(|e| e.contains(needle));
    for metric in [
        "tokentap_time_to_first_token_seconds_bucket",
        "tokentap_time_per_output_token_seconds_bucket",
        "tokentap_inter_token_latency_seconds_bucket",
        "tokentap_e2e_request_latency_seconds_bucket",
        "tokentap_goodput_requests_total",
        "tokentap_generation_tokens_total",
        "tokentap_prompt_tokens_total",
        "tokentap_request_prompt_tokens_bucket",
        "tokentap_request_generation_tokens_bucket",
        "tokentap_tokens_per_chunk",
        "tokentap_upstream_response_header_seconds_bucket",
        "tokentap_requests_in_flight",
        "tokentap_time_to_first_answer_seconds_bucket",
        "tokentap_reasoning_time_seconds_bucket",
        "tokentap_max_inter_token_latency_seconds_bucket",
        "tokentap_upstream_queue_time_seconds_sum",
        "tokentap_upstream_prefill_time_seconds_sum",
        "tokentap_time_to_first_token_outside_engine_seconds_sum",
        "tokentap_time_to_first_token_outside_engine_negative_total",
        "tokentap_request_cached_prompt_tokens_sum",
        "vllm:time_to_first_token_seconds_bucket",
        "tokentap:slo_goodput_objective",
        // The Replicas row.
        "tokentap_upstream_requests_total",
        "tokentap_upstream_requests_in_flight",
        "tokentap_upstream_time_to_first_token_seconds_bucket",
        "tokentap_upstream_e2e_request_latency_seconds_bucket",
        "tokentap_upstream_time_per_output_token_seconds_bucket",
        "tokentap_upstream_ejected",
        "tokentap_upstream_ejections_total",
        "tokentap_upstream_connect_errors_total",
        "tokentap_upstream_retries_total",
        "tokentap_route_live_upstreams",
    ] {
        assert!(uses(metric), "no panel queries {metric}");
    }
    // Per-replica panels filter on an `upstream` variable, under a row of their own.
    let upstream_var = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "upstream")
        .expect("an `upstream` variable");
    assert_eq!(
        upstream_var["query"],
        "label_values(tokentap_upstream_requests_total, upstream)"
    );
    assert!(
        all_panels(panel_list(&dashboard))
            .iter()
            .any(|p| p["type"] == "row" && title(p).starts_with("Replicas")),
        "a Replicas row"
    );
    for e in exprs
        .iter()
        .filter(|e| e.contains("tokentap_upstream_time_"))
    {
        assert!(e.contains("$upstream"), "not filtered by $upstream: {e}");
    }
    // Quantiles add replicas up before taking the quantile.
    for e in exprs.iter().filter(|e| e.contains("histogram_quantile(")) {
        assert!(
            e.contains("sum by (le"),
            "quantile without `sum by (le, ...)`: {e}"
        );
    }
    // TTFT broken down: queue, prefill and outside-the-engine time stacked under the mean TTFT,
    // and a description that says how to make the upstream report its timings.
    let panels = all_panels(panel_list(&dashboard));
    let where_ttft_goes = panels
        .iter()
        .find(|p| p["type"] != "row" && title(p).starts_with("Where TTFT goes"))
        .expect("a 'Where TTFT goes' panel");
    assert_eq!(
        where_ttft_goes["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"], "normal",
        "queue, prefill and outside-the-engine time are stacked"
    );
    let parts: Vec<&str> = where_ttft_goes["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["expr"].as_str())
        .collect();
    for metric in [
        "tokentap_upstream_queue_time_seconds",
        "tokentap_upstream_prefill_time_seconds",
        "tokentap_time_to_first_token_outside_engine_seconds",
        "tokentap_time_to_first_token_seconds",
    ] {
        assert!(
            parts.iter().any(|e| e.contains(metric)),
            "'Where TTFT goes' does not query {metric}"
        );
    }
    let description = where_ttft_goes["description"].as_str().unwrap_or_default();
    for needle in ["--enable-per-request-metrics", "llama.cpp", "timings"] {
        assert!(
            description.contains(needle),
            "'Where TTFT goes' description does not mention {needle}"
        );
    }
    let heatmaps = all_panels(panel_list(&dashboard))
        .iter()
        .filter(|p| p["type"] == "heatmap")
        .count();
    assert!(heatmaps >= 4, "TTFT, TPOT, ITL and E2EL heatmaps expected");
}

/// Alert rules and their unit tests, read line by line (the files are plain, regular YAML).
#[test]
fn every_alert_is_labelled_annotated_and_unit_tested() {
    let alerts_file = root().join("config/prometheus/rules/tokentap-alerts.yml");
    let text = read(&alerts_file);
    let mut alerts: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            current = Some(name.trim().to_owned());
            alerts.insert(name.trim().to_owned(), String::new());
        } else if trimmed.starts_with("- name:") || trimmed.starts_with("- record:") {
            current = None;
        } else if let Some(name) = &current {
            let body = alerts.get_mut(name).unwrap();
            body.push_str(trimmed);
            body.push('\n');
        }
    }
    assert!(
        alerts.len() >= 10,
        "expected the full alert set, found {alerts:?}"
    );

    let tests = read(&root().join("config/prometheus/tests/tokentap-alerts.test.yml"));
    let mut fires: BTreeSet<String> = BTreeSet::new();
    let mut quiet: BTreeSet<String> = BTreeSet::new();
    let mut last_alertname: Option<String> = None;
    for line in tests.lines() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("alertname:") {
            last_alertname = Some(name.trim().to_owned());
        } else if let Some(rest) = trimmed.strip_prefix("exp_alerts:") {
            let name = last_alertname.clone().expect("exp_alerts before alertname");
            if rest.trim() == "[]" {
                quiet.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }

    let mut failures = Vec::new();
    for (name, body) in &alerts {
        if !(body.contains("severity: page") || body.contains("severity: ticket")) {
            failures.push(format!("{name}: no severity page|ticket label"));
        }
        for annotation in ["summary:", "description:", "runbook:"] {
            if !body.contains(annotation) {
                failures.push(format!("{name}: no {annotation} annotation"));
            }
        }
        if !fires.contains(name) {
            failures.push(format!("{name}: no unit test where it fires"));
        }
        if !quiet.contains(name) {
            failures.push(format!("{name}: no unit test where it stays quiet"));
        }
    }
    assert!(
        failures.is_empty(),
        "alert problems:\n{}",
        failures.join("\n")
    );
}

const PROMTOOL_HINT: &str = "apt-get install -y prometheus";

#[test]
fn prometheus_config_and_rules_pass_promtool() {
    if !have_tool(
        "promtool",
        "--version",
        PROMTOOL_HINT,
        "Prometheus config and rules",
    ) {
        return;
    }
    assert_success(
        "promtool check config",
        &run(Command::new("promtool")
            .args(["check", "config"])
            .arg("config/prometheus/prometheus.yml")),
    );
    assert_success(
        "promtool check rules",
        &run(Command::new("promtool")
            .args(["check", "rules"])
            .args(rule_files())),
    );
    let tests = files_with_extension(&root().join("config/prometheus/tests"), &["yml", "yaml"]);
    assert!(
        !tests.is_empty(),
        "no promtool unit tests in config/prometheus/tests"
    );
    assert_success(
        "promtool test rules",
        &run(Command::new("promtool")
            .args(["test", "rules"])
            .args(&tests)),
    );
}

#[test]
fn dashboard_queries_are_valid_promql() {
    if !have_tool(
        "promtool",
        "--version",
        PROMTOOL_HINT,
        "dashboard query syntax",
    ) {
        return;
    }
    // Each query becomes a recording rule, with the variables replaced as a script would.
    let mut yaml = String::from("groups:\n  - name: dashboard-queries\n    rules:\n");
    let mut count = 0;
    for (name, dashboard) in dashboards() {
        for panel in all_panels(panel_list(&dashboard)) {
            for target in panel["targets"].as_array().cloned().unwrap_or_default() {
                let Some(expr) = target["expr"].as_str() else {
                    continue;
                };
                let concrete = expr
                    .replace("$model", ".*")
                    .replace("$endpoint", ".*")
                    .replace("$tenant", ".*")
                    .replace("$upstream", ".*")
                    .replace("$__rate_interval", "1m");
                count += 1;
                let quoted = serde_json::to_string(&concrete).unwrap();
                yaml.push_str(&format!(
                    "      # {name}: {}\n      - record: dashboard:query_{count}\n        expr: {quoted}\n",
                    title(panel).replace('\n', " ")
                ));
            }
        }
    }
    let dir =
        std::env::temp_dir().join(format!("tokentap-dashboard-queries-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join("queries.yml");
    fs::write(&file, yaml).unwrap();
    let out = run(Command::new("promtool").args(["check", "rules"]).arg(&file));
    let _ = fs::remove_dir_all(&dir);
    assert_success(
        &format!("promtool check rules on {count} dashboard queries"),
        &out,
    );
}

#[test]
fn dashboards_match_the_grafana_schema() {
    let what = "dashboards against @grafana/schema";
    if !have_tool("node", "--version", "apt-get install -y nodejs npm", what) {
        return;
    }
    let tooling = root().join(".ci/dashboards");
    if !tooling.join("node_modules").is_dir() {
        if !have_tool("npm", "--version", "apt-get install -y npm", what) {
            return;
        }
        let out = run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(&tooling));
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !require_external(),
                "TOKENTAP_REQUIRE_EXTERNAL=1 but `npm ci --prefix .ci/dashboards` failed:\n{stderr}"
            );
            println!("skipped: {what}: `npm ci --prefix .ci/dashboards` failed:\n{stderr}");
            return;
        }
    }
    assert_success(
        "node .ci/dashboards/validate.mjs",
        &run(Command::new("node").arg(tooling.join("validate.mjs"))),
    );
}
